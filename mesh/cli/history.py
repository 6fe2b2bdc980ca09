"""The history commands: follow events live (tail), rebuild state from the history (replay),
dead letters, escalation costs, and the history written out as training data (export).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mesh.bus import client
from mesh.bus.publish import Bus
from mesh.cli import render
from mesh.cli.common import connected, err, fail, out, run, settings
from mesh.errors import MeshError
from mesh.events import RunFinished
from mesh.textstream import TextChunk, TextView


def tail(
    filter: Annotated[
        str | None,
        typer.Argument(help="a plan id, or a subject pattern under <prefix>.evt (e.g. 'task.*.*.failed')"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print each payload as it is")] = False,
    from_start: Annotated[
        bool, typer.Option("--all", help="start from the beginning of the history")
    ] = False,
    text: Annotated[
        bool,
        typer.Option(
            "--text/--no-text", help="with a plan id: also the answers of its LLM tasks as they are generated"
        ),
    ] = True,
) -> None:
    """Follow events live, pretty or raw; a plan's LLM answers appear as they are generated."""
    s = settings()
    names = s.names
    plan_id = ""
    if filter is None:
        subject = names.evt_all
    elif any(c in filter for c in ".*>"):
        subject = names.evt_filter(filter)
    else:
        subject = names.plan_filter(filter)
        plan_id = filter if text else ""
    view = TextView()

    def show_text(chunk: TextChunk) -> None:
        if as_json:
            _json_line(msgspec.json.encode(chunk))
        else:
            for line in view.take(chunk):
                out.print(render.text_line(line), soft_wrap=True)

    async def go() -> int:
        async with connected(s) as bus, _text_of(bus, plan_id, show_text):
            async for subj, data, msg in client.follow(bus, subject, from_start=from_start):
                if as_json:
                    _json_line(data)
                    continue
                if isinstance(msg, RunFinished):
                    for line in view.end(msg.task_id):  # what its last chunks left unsaid
                        out.print(render.text_line(line), soft_wrap=True)
                out.print(render.event_line(subj, msg))
            return 0

    raise typer.Exit(run(go))


def _json_line(data: bytes) -> None:
    sys.stdout.write(data.decode("utf-8", errors="replace") + "\n")
    sys.stdout.flush()


def _text_of(
    bus: Bus, plan_id: str, show: Callable[[TextChunk], None]
) -> contextlib.AbstractAsyncContextManager[None]:
    """The plan's streamed text shown while inside; nothing without a plan."""
    return client.watching_text(bus, plan_id, show) if plan_id else contextlib.nullcontext()


def replay(
    plan: Annotated[str | None, typer.Option("--plan", help="only this plan")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="only plans accepted since: 2h, 7d, or a date")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="compare with KV; exit 1 on any difference")
    ] = False,
) -> None:
    """Rebuild task and plan state from the event history, with the brain's own state machine."""
    from mesh.bus import history

    s = settings()
    start = history.parse_since(since) if since else None

    async def go() -> int:
        async with connected(s) as bus:
            result = await history.replay(bus, plan_id=plan, since=start)
            rate = result.events / result.seconds if result.seconds else 0.0
            err.print(
                f"replayed {result.events} events ({result.transitions} transitions, "
                f"{result.undecodable} undecodable) in {result.seconds:.2f}s, {rate:,.0f} events/s"
            )
            plans = sorted(result.state.plans.values(), key=lambda p: p.accepted_at)
            if plan is not None and not result.events:
                # (an id with no history: a typo, or a plan its retention removed)
                raise fail(f"the history holds no events of plan {plan!r}; `mesh status` lists the plans")
            if not verify:
                if plans:
                    out.print(render.plans_table(plans))
                return 0
            check = await history.verify(bus, result, plan_id=plan, since=start)
            for diff in check.differences:
                out.print(str(diff), highlight=False)
            if check.differences:
                err.print(
                    f"[red]{len(check.differences)} differences[/red] "
                    f"over {check.plans} plans, {check.tasks} tasks"
                )
                return 1
            err.print(f"[green]KV and history agree[/green] on {check.plans} plans and {check.tasks} tasks")
            return 0

    raise typer.Exit(run(go))


def dead(
    since: Annotated[str | None, typer.Option("--since", help="2h, 7d, or a date")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON record per line")] = False,
) -> None:
    """Dead letters: messages an agent could not use, kept so nothing vanishes silently."""
    from mesh.bus import history

    s = settings()
    start = history.parse_since(since) if since else None

    async def go() -> int:
        async with connected(s) as bus:
            letters = await history.dead_letters(bus, since=start)
            if as_json:
                for letter in letters:
                    print(msgspec.json.encode(letter).decode())
                return 0
            if not letters:
                out.print("no dead letters")
                return 0
            table = render.dead_table(letters)
            out.print(table)
            return 0

    raise typer.Exit(run(go))


def costs(
    by: Annotated[str, typer.Option("--by", help="group by 'day' (UTC) or 'plan'")] = "day",
    since: Annotated[str | None, typer.Option("--since", help="2h, 7d, or a date")] = None,
) -> None:
    """What escalations to Claude cost: calls, tokens and USD, from the history."""
    from mesh.bus import history

    if by not in ("day", "plan"):
        raise fail(f"--by {by!r}: write --by day or --by plan")
    s = settings()
    start = history.parse_since(since) if since else None

    async def go() -> int:
        async with connected(s) as bus:
            rows = await history.escalation_costs(bus, by, since=start)
        if rows:
            out.print(render.costs_table(rows, by))
        else:
            out.print("no escalations yet")
        return 0

    raise typer.Exit(run(go))


def export_cmd(
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="FILE.jsonl (or FILE.parquet, with pyarrow installed)")
    ],
    since: Annotated[
        str | None,
        typer.Option("--since", help="start: an age (2h, 3d), a date/time, or a stream sequence (seq:1234)"),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="end (included): same forms as --since")
    ] = None,
    plan: Annotated[str | None, typer.Option("--plan", help="only this plan")] = None,
    cls: Annotated[
        str | None, typer.Option("--class", help="only tasks of this class: cpu, script, llm, external")
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="only attempts that ended so: succeeded, failed, cancelled")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="chat: LLM attempts as messages; raw: as prompt and response")
    ] = "chat",
) -> None:
    """Write the history as training data: one redacted record per task attempt, and a manifest."""
    from mesh.ops import export

    s = settings()
    try:
        options = export.Options(
            out=out_path,
            since=export.parse_point(since, "--since") if since else None,
            until=export.parse_point(until, "--until") if until else None,
            plan_id=plan,
            cls=cls,
            status=status,
            fmt=fmt,
        )
        options.check()
    except MeshError as exc:
        raise fail(str(exc)) from None

    async def go() -> int:
        async with connected(s) as bus:
            progress = Progress(
                TextColumn("[bold]export"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=err,
                disable=not err.is_terminal,
            )
            with progress:
                bar = progress.add_task("export", total=None, detail="")

                def advance(seq: int, first: int, last: int) -> None:
                    done, total = seq - first + 1, last - first + 1
                    progress.update(bar, completed=done, total=total, detail=f"seq {seq:,} of {last:,}")

                manifest = await export.export(bus, options, advance)
        err.print(
            f"exported {manifest.records:,} records from {manifest.events_read:,} events "
            f"(seq {manifest.first_seq}-{manifest.last_seq}) in {manifest.seconds:.2f}s, "
            f"{manifest.events_per_s:,.0f} events/s; {manifest.duplicates_dropped} duplicates dropped, "
            f"{sum(manifest.redacted.values())} redactions, "
            f"{manifest.sensitive_metadata_only} sensitive as metadata only",
            highlight=False,
            soft_wrap=True,
        )
        err.print(f"wrote {options.out} and {options.manifest_path}", highlight=False, soft_wrap=True)
        if manifest.sensitive_leaks_in_history:
            err.print(
                f"[yellow]warning:[/yellow] {manifest.sensitive_leaks_in_history} sensitive attempts have "
                "what they saw or made in the history (not exported); see the log",
                highlight=False,
            )
        return 0

    raise typer.Exit(run(go))
