"""The plan commands: check, submit, status, cancel and retry, and a plan's progress shown
as it runs (`--wait`, and `mesh up --submit`), ending with its final outputs in short.

A plan is submitted with the files it uses under its directory (`mesh.host.bundle` finds them,
`mesh.bus.bundle` stores them) and the id of the host it came from (`send_plan`).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

import msgspec
import nats.js.errors
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mesh import events
from mesh.bus import client
from mesh.bus.bundle import send_bundle
from mesh.bus.files import FileTransferError
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.bus.report import finish_report, plan_report
from mesh.bus.store import full_error
from mesh.cli import outputs, render, report
from mesh.cli.common import (
    GlobOutsideOpt,
    VarOpt,
    checked_settings,
    connected,
    err,
    fail,
    load,
    out,
    run,
    settings,
)
from mesh.errors import MeshError
from mesh.host.bundle import MB, BundleFiles, BundleTooBig, bundle_files
from mesh.host.config import host_id
from mesh.records import Damaged
from mesh.report import ReportBuilder
from mesh.settings import Settings
from mesh.status import PlanStatus, TaskStatus
from mesh.textstream import TextChunk, TextView

# how long `--wait` waits for a plan's acceptance before it looks for a brain
NO_BRAIN_AFTER_S = 5.0

DAMAGED_HINT = (
    "{n} record(s) cannot be read (damaged). The brain sets each aside as a dead letter "
    "(`mesh dead`) and rebuilds it from the history when it starts; `mesh replay --plan PLAN` "
    "shows what the history holds."
)


def check(
    plan: Annotated[Path, typer.Argument(help="plan file (markdown)")],
    var: VarOpt = None,
    glob_outside: GlobOutsideOpt = False,
) -> None:
    """Parse and validate a plan without submitting it."""
    spec = load(plan, var, checked_settings(), glob_outside)
    # (the path and the title are the user's text: rich would read '[...]' in them as markup)
    out.print(f"[green]ok[/green] {escape(str(plan))}: {escape(repr(spec.title))}, {len(spec.tasks)} tasks")


def submit(
    plan: Annotated[Path, typer.Argument(help="plan file (markdown)")],
    var: VarOpt = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow the plan until it is final")] = False,
    plan_id: Annotated[str | None, typer.Option("--id", help="plan id (default: from the title)")] = None,
    glob_outside: GlobOutsideOpt = False,
) -> None:
    """Validate a plan and submit it; prints the plan id."""
    s = checked_settings()
    matched: list[str] = []
    spec = load(plan, var, s, glob_outside, matched)
    files = plan_files(spec, matched, s)

    async def go() -> int:
        async with connected(s) as bus:
            # (a user that may not create them only checks they are there)
            await (bus.ensure_resources() if s.manage_resources else bus.bind_resources(wait_s=0.0))
            pid = await send_plan(bus, s, spec, files, plan_id)
            out.print(pid, highlight=False)
            if not wait:
                return 0
            return await follow_plan(bus, pid, len(spec.tasks))

    raise typer.Exit(run(go))


def plan_files(spec: events.PlanSpec, matched: list[str], s: Settings) -> BundleFiles:
    """The files that travel with the plan (its foreach matches, the files its bodies name);
    a bundle over `bundle_max_mb` is refused here, before anything is sent."""
    try:
        return bundle_files(spec, matched, max_mb=s.bundle_max_mb)
    except BundleTooBig as exc:
        raise fail(str(exc)) from None


async def send_plan(
    bus: Bus, s: Settings, spec: events.PlanSpec, files: BundleFiles, plan_id: str | None = None
) -> str:
    """Store the plan's files in the object store, then submit it with its bundle and this
    host's id; says in one line what the bundle held. Returns the plan id."""
    for note in files.notes:
        err.print(f"note: {note}", highlight=False)
    try:
        sent = await send_bundle(
            await bus.objects(),
            [(f.rel, f.path) for f in files.files],
            # the store keeps a file events_max_age_days: one halfway there is sent again
            refresh_after_s=s.events_max_age_days * 86400 / 2,
        )
    except FileTransferError as exc:
        if isinstance(exc.__cause__, nats.js.errors.Error) and full_error(exc.__cause__):
            raise exc.__cause__ from None  # said as every command says it (`run`)
        raise fail(f"the plan's files could not be stored: {exc}; nothing was submitted") from None
    if sent.files:
        err.print(
            f"bundle: {sent.files} file(s), {sent.size / MB:.1f} MB, {sent.already} already in the "
            f"store ({sent.took_s:.1f} s)",
            highlight=False,
        )
    spec = msgspec.structs.replace(spec, host=host_id(s), bundle=sent.sha256)
    return await client.submit(bus, spec, plan_id)


async def follow_plan(
    bus: Bus, plan_id: str, total: int, start_seq: int | None = None, brain_starting: bool = False
) -> int:
    """Show a plan's progress from its history until it is final, and its LLM tasks' answers
    as they are generated; 0 only if it succeeded. Unless a brain is `brain_starting` (`mesh
    up` starts one), a plan still not accepted after a few seconds with no brain registered is
    said to wait for one."""
    interactive = err.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not interactive,
    )
    view = TextView()

    def show_text(chunk: TextChunk) -> None:
        for line in view.take(chunk):
            progress.console.print(render.text_line(line), soft_wrap=True)

    # what the report says at the end is folded from the events the bar shows (all of them, but
    # for a retry's, which start at the retry: its report reads the plan's history again)
    builder = ReportBuilder(plan_id)
    # a plan's LLM answers as they are generated, above the bar (the text of what runs from now)
    watch = None if brain_starting else asyncio.ensure_future(_say_if_no_brain(bus, plan_id, progress))
    try:
        async with client.watching_text(bus, plan_id, show_text):
            with progress:
                status = await _progress(bus, plan_id, total, start_seq, progress, view, interactive, builder)
    finally:
        if watch is not None:
            watch.cancel()
    records, damaged = await client.read_tasks(bus, plan_id)
    plan = await client.read_plan(bus, plan_id)
    if plan is not None and (damaged or any(r.status != TaskStatus.SUCCEEDED for r in records)):
        unfinished = [r for r in records if r.status != TaskStatus.SUCCEEDED]
        err.print(render.tasks_table(plan, unfinished, damaged=damaged))
    for line in await outputs.summary_lines(bus, plan_id):
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    for line in await _report_lines(bus, builder if start_seq is None else None, plan_id):
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    style = render.STYLE.get(status, "")
    err.print(f"plan {plan_id} [{style}]{status}[/{style}]" if style else f"plan {plan_id} {status}")
    return 0 if status == PlanStatus.SUCCEEDED else 1


async def _say_if_no_brain(bus: Bus, plan_id: str, progress: Progress) -> None:
    """A plan not accepted `NO_BRAIN_AFTER_S` after it was sent, with no brain registered, waits
    for one: say so once, rather than leave the bar at 0 with no word (the wait goes on: the
    plan is kept, and runs once a brain starts)."""
    await asyncio.sleep(NO_BRAIN_AFTER_S)
    with contextlib.suppress(*TRANSIENT, MeshError):
        if await client.read_plan(bus, plan_id) is not None:
            return
        if not any(a.role == "brain" for a in await client.read_agents(bus)):
            progress.console.print(
                f"no brain is registered: plan {plan_id} waits in the queue until one starts "
                "(`mesh up`, or `systemctl start mesh-brain`); `mesh agents` lists what runs",
                highlight=False,
                markup=False,
            )


async def _report_lines(bus: Bus, builder: ReportBuilder | None, plan_id: str) -> list[str]:
    """The plan report's short form (`mesh report` has it all); nothing when it cannot be read."""
    try:
        found = await (finish_report(bus, builder) if builder else plan_report(bus, plan_id))
    except (*TRANSIENT, MeshError) as exc:
        return [f"(no report: {exc}; `mesh report {plan_id}` tries again)"]
    return report.summary_lines(found)


async def _progress(
    bus: Bus,
    plan_id: str,
    total: int,
    start_seq: int | None,
    progress: Progress,
    view: TextView,
    interactive: bool,
    builder: ReportBuilder,
) -> str:
    """Follow a plan's events on its progress bar until it is final; its final status. Each
    event goes to `builder` too."""
    final: dict[str, str] = {}
    status = ""
    bar = progress.add_task(plan_id, total=total, detail="")
    async for subject, msg in client.plan_events(bus, plan_id, start_seq):
        builder.add(msg)
        match msg:
            case events.RunFinished():
                for line in view.end(msg.task_id):  # what its last chunks left unsaid
                    progress.console.print(render.text_line(line), soft_wrap=True)
            case events.TaskSucceeded():
                final[msg.task_id] = "succeeded"
                if not interactive:
                    progress.console.print(render.event_line(subject, msg))
            case events.TaskFailed() | events.TaskCancelled():
                final[msg.task_id] = events.type_of(msg).rsplit(".", 1)[-1]
                progress.console.print(render.event_line(subject, msg))
            case events.TaskRetrying():
                progress.console.print(render.event_line(subject, msg))
            case events.TaskStarted() if not interactive:
                progress.console.print(render.event_line(subject, msg))
        counts = {
            k: list(final.values()).count(k)
            for k in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
        }
        progress.update(
            bar,
            completed=len(final),
            detail=" ".join(f"{k} {v}" for k, v in counts.items() if v),
        )
        match msg:
            case events.PlanFinished():
                status = msg.status
            case events.PlanRejected():
                status = PlanStatus.REJECTED
                err.print(f"[red]plan rejected:[/red] {msg.error}")
    return status


def status(
    plan: Annotated[str | None, typer.Argument(help="a plan id: show its tasks")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="records as JSON lines")] = False,
) -> None:
    """Plans, or one plan's tasks, from the KV state."""
    s = settings()

    async def go() -> int:
        async with connected(s) as bus:
            if plan is None:
                await _plans(bus, as_json)
            else:
                await _plan(bus, plan, as_json)
            return 0

    raise typer.Exit(run(go))


async def _plans(bus: Bus, as_json: bool) -> None:
    plans, damaged = await client.read_plans(bus)
    if as_json:
        for p in plans:
            print(msgspec.json.encode(p).decode())
        for d in damaged:
            print(msgspec.json.encode({"damaged": d}).decode())
    elif plans or damaged:
        out.print(render.plans_table(plans, damaged))
        if damaged:
            err.print(DAMAGED_HINT.format(n=len(damaged)), highlight=False)
        escalating = sum(p.counts.get(TaskStatus.ESCALATING, 0) for p in plans if not p.final)
        if escalating:
            out.print(f"{escalating} task(s) waiting on escalation (`mesh status PLAN` says why)")
    else:
        out.print("no plans yet: `mesh submit PLAN.md`")


async def _plan(bus: Bus, plan: str, as_json: bool) -> None:
    record = await client.read_plan(bus, plan)
    if record is None:
        raise fail(f"no plan {plan!r}; `mesh status` lists the plans")
    tasks, damaged = await client.read_tasks(bus, plan)
    if isinstance(record, Damaged):
        damaged.insert(0, record)
    if as_json:
        if not isinstance(record, Damaged):
            print(msgspec.json.encode(record).decode())
        for t in tasks:
            print(msgspec.json.encode(t).decode())
        for d in damaged:
            print(msgspec.json.encode({"damaged": d}).decode())
    else:
        from mesh.bus.history import escalation_waits

        notes = await escalation_waits(bus, tasks)
        bad_tasks = [d for d in damaged if d is not record]
        out.print(render.tasks_table(record, tasks, notes, bad_tasks))
        if damaged:
            err.print(DAMAGED_HINT.format(n=len(damaged)), highlight=False)


def cancel(plan: Annotated[str, typer.Argument(help="plan id")]) -> None:
    """Cancel a plan: running tasks are killed, the rest are cancelled."""
    s = settings()

    async def go() -> int:
        async with connected(s) as bus:
            await client.cancel(bus, plan)
            out.print(f"cancel requested for {plan}")
            return 0

    raise typer.Exit(run(go))


def retry(
    target: Annotated[
        str, typer.Argument(help="a plan id, or PLAN.TASK for one task (and what failed because of it)")
    ],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow the plan until it is final")] = False,
) -> None:
    """Run failed or cancelled work again, with a fresh retry budget."""
    s = settings()
    plan_id, _, task_id = target.partition(".")

    async def go() -> int:
        async with connected(s) as bus:
            seq = await client.retry(bus, plan_id, (task_id,) if task_id else ())
            out.print(f"retry requested for {target}")
            if not wait:
                return 0
            plan = await client.get_plan(bus, plan_id)
            return await follow_plan(bus, plan_id, plan.total if plan else 0, start_seq=seq)

    raise typer.Exit(run(go))
