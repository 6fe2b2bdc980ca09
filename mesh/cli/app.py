"""The `mesh` command: parse, call the library, render with rich."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agents.base import run_loop
from mesh import events
from mesh.bus import client
from mesh.bus.connect import connect
from mesh.bus.publish import Bus
from mesh.bus.store import full_error
from mesh.cli import render
from mesh.errors import MeshError
from mesh.events import TASK_CLASSES
from mesh.host.logs import configure
from mesh.records import Damaged
from mesh.settings import Settings, load_settings
from mesh.status import PlanStatus, TaskStatus

app = typer.Typer(
    name="mesh",
    help="Run plans of local AI work across your GPUs, coordinated through NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
agent_app = typer.Typer(help="Run one agent in the foreground (what `mesh up` and systemd run).")
app.add_typer(agent_app, name="agent")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


class Opts:
    server: str | None = None
    config: str | None = None


OPTS = Opts()


@app.callback()
def main(
    server: Annotated[
        str | None,
        typer.Option(
            "--server", "-s", help="NATS URL (else MESH_NATS_URL, the config file, the embedded default)"
        ),
    ] = None,
    config: Annotated[str | None, typer.Option("--config", help="config file (TOML)")] = None,
) -> None:
    OPTS.server = server
    OPTS.config = config


def settings(**overrides: Any) -> Settings:
    return load_settings(server=OPTS.server, config=OPTS.config, **overrides)


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning mesh and server errors into a message and an exit code."""
    try:
        return run_loop(coro_fn())  # type: ignore[arg-type]
    except MeshError as exc:
        raise fail(str(exc)) from None
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        if full_error(exc):
            raise fail(
                f"the NATS server's store is full (it says: {full_error(exc)}); nothing was written. "
                "Free space in its store (`mesh doctor` shows where and how much) and try again"
            ) from None
        raise fail(f"NATS error: {exc.__class__.__name__}: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _bus(s: Settings) -> Bus:
    return await connect(s, "mesh-cli")


def parse_vars(pairs: list[str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise fail(f"--var wants NAME=value, got {pair!r}")
        values[name.strip()] = value
    return values


def load(path: Path, var: list[str] | None, s: Settings, glob_outside: bool = False) -> events.PlanSpec:
    """Read and check a plan within the limits of the settings `plan_*`."""
    from mesh.plan import PlanLimits, load_plan

    limits = PlanLimits(
        max_expansions=s.plan_max_expansions,
        max_tasks=s.plan_max_tasks,
        max_bytes=s.plan_max_bytes,
        glob_outside=glob_outside or s.plan_glob_outside,
    )
    try:
        return load_plan(path, parse_vars(var), limits=limits)
    except MeshError as exc:
        raise fail(str(exc)) from None


def checked_settings() -> Settings:
    try:
        return settings()
    except MeshError as exc:
        raise fail(str(exc)) from None


VarOpt = Annotated[
    list[str] | None, typer.Option("--var", "-v", help="NAME=value, overriding a plan variable")
]
GlobOutsideOpt = Annotated[
    bool,
    typer.Option(
        "--glob-outside",
        help="let foreach globs match files outside the plan's directory (setting plan_glob_outside)",
    ),
]


# ------------------------------------------------------------------ plans


@app.command()
def check(
    plan: Annotated[Path, typer.Argument(help="plan file (markdown)")],
    var: VarOpt = None,
    glob_outside: GlobOutsideOpt = False,
) -> None:
    """Parse and validate a plan without submitting it."""
    spec = load(plan, var, checked_settings(), glob_outside)
    out.print(f"[green]ok[/green] {plan}: {spec.title!r}, {len(spec.tasks)} tasks")


@app.command()
def submit(
    plan: Annotated[Path, typer.Argument(help="plan file (markdown)")],
    var: VarOpt = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow the plan until it is final")] = False,
    plan_id: Annotated[str | None, typer.Option("--id", help="plan id (default: from the title)")] = None,
    glob_outside: GlobOutsideOpt = False,
) -> None:
    """Validate a plan and submit it; prints the plan id."""
    s = checked_settings()
    spec = load(plan, var, s, glob_outside)

    async def go() -> int:
        bus = await _bus(s)
        try:
            await bus.ensure_resources()
            pid = await client.submit(bus, spec, plan_id)
            out.print(pid, highlight=False)
            if not wait:
                return 0
            return await follow_plan(bus, pid, len(spec.tasks))
        finally:
            await bus.close()

    raise typer.Exit(run(go))


async def follow_plan(bus: Bus, plan_id: str, total: int, start_seq: int | None = None) -> int:
    """Show a plan's progress from its history until it is final; 0 only if it succeeded."""
    final: dict[str, str] = {}
    status = ""
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
    with progress:
        bar = progress.add_task(plan_id, total=total, detail="")
        follow = client.follow(bus, bus.names.plan_filter(plan_id), from_start=True, start_seq=start_seq)
        async for subject, _, msg in follow:
            if msg is None:
                continue
            if isinstance(msg, events.TaskSucceeded | events.TaskFailed | events.TaskCancelled):
                final[msg.task_id] = events.type_of(msg).rsplit(".", 1)[-1]
            if isinstance(
                msg, events.TaskSucceeded | events.TaskFailed | events.TaskCancelled | events.TaskRetrying
            ):
                if not interactive or not isinstance(msg, events.TaskSucceeded):
                    progress.console.print(render.event_line(subject, msg))
            elif isinstance(msg, events.TaskStarted) and not interactive:
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
            if isinstance(msg, events.PlanFinished | events.PlanRejected):
                status = msg.status if isinstance(msg, events.PlanFinished) else PlanStatus.REJECTED
                if isinstance(msg, events.PlanRejected):
                    err.print(f"[red]plan rejected:[/red] {msg.error}")
                break
    records, damaged = await client.read_tasks(bus, plan_id)
    plan = await client.read_plan(bus, plan_id)
    if plan is not None and (damaged or any(r.status != TaskStatus.SUCCEEDED for r in records)):
        unfinished = [r for r in records if r.status != TaskStatus.SUCCEEDED]
        err.print(render.tasks_table(plan, unfinished, damaged=damaged))
    style = render.STYLE.get(status, "")
    err.print(f"plan {plan_id} [{style}]{status}[/{style}]" if style else f"plan {plan_id} {status}")
    return 0 if status == PlanStatus.SUCCEEDED else 1


DAMAGED_HINT = (
    "{n} record(s) cannot be read (damaged). The brain sets each aside as a dead letter "
    "(`mesh dead`) and rebuilds it from the history when it starts; `mesh replay --plan PLAN` "
    "shows what the history holds."
)


@app.command()
def status(
    plan: Annotated[str | None, typer.Argument(help="a plan id: show its tasks")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="records as JSON lines")] = False,
) -> None:
    """Plans, or one plan's tasks, from the KV state."""
    s = settings()

    async def go() -> int:
        bus = await _bus(s)
        try:
            if plan is None:
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
                return 0
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
            return 0
        finally:
            await bus.close()

    raise typer.Exit(run(go))


@app.command()
def cancel(plan: Annotated[str, typer.Argument(help="plan id")]) -> None:
    """Cancel a plan: running tasks are killed, the rest are cancelled."""
    s = settings()

    async def go() -> int:
        bus = await _bus(s)
        try:
            await client.cancel(bus, plan)
            out.print(f"cancel requested for {plan}")
            return 0
        finally:
            await bus.close()

    raise typer.Exit(run(go))


@app.command()
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
        bus = await _bus(s)
        try:
            seq = await client.retry(bus, plan_id, (task_id,) if task_id else ())
            out.print(f"retry requested for {target}")
            if not wait:
                return 0
            plan = await client.get_plan(bus, plan_id)
            return await follow_plan(bus, plan_id, plan.total if plan else 0, start_seq=seq)
        finally:
            await bus.close()

    raise typer.Exit(run(go))


@app.command()
def tail(
    filter: Annotated[
        str | None,
        typer.Argument(help="a plan id, or a subject pattern under <prefix>.evt (e.g. 'task.*.*.failed')"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print each payload as it is")] = False,
    from_start: Annotated[
        bool, typer.Option("--all", help="start from the beginning of the history")
    ] = False,
) -> None:
    """Follow events live, pretty or raw."""
    s = settings()
    names = s.names
    if filter is None:
        subject = names.evt_all
    elif any(c in filter for c in ".*>"):
        subject = names.evt_filter(filter)
    else:
        subject = names.plan_filter(filter)

    async def go() -> int:
        bus = await _bus(s)
        try:
            async for subj, data, msg in client.follow(bus, subject, from_start=from_start):
                if as_json:
                    sys.stdout.write(data.decode("utf-8", errors="replace") + "\n")
                    sys.stdout.flush()
                else:
                    out.print(render.event_line(subj, msg))
            return 0
        finally:
            await bus.close()

    raise typer.Exit(run(go))


@app.command()
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
        bus = await _bus(s)
        try:
            result = await history.replay(bus, plan_id=plan, since=start)
            rate = result.events / result.seconds if result.seconds else 0.0
            err.print(
                f"replayed {result.events} events ({result.transitions} transitions, "
                f"{result.undecodable} undecodable) in {result.seconds:.2f}s, {rate:,.0f} events/s"
            )
            plans = sorted(result.state.plans.values(), key=lambda p: p.accepted_at)
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
        finally:
            await bus.close()

    raise typer.Exit(run(go))


@app.command()
def dead(
    since: Annotated[str | None, typer.Option("--since", help="2h, 7d, or a date")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON record per line")] = False,
) -> None:
    """Dead letters: messages an agent could not use, kept so nothing vanishes silently."""
    from mesh.bus import history

    s = settings()
    start = history.parse_since(since) if since else None

    async def go() -> int:
        bus = await _bus(s)
        try:
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
        finally:
            await bus.close()

    raise typer.Exit(run(go))


@app.command()
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
        bus = await _bus(s)
        try:
            rows = await history.escalation_costs(bus, by, since=start)
        finally:
            await bus.close()
        if rows:
            out.print(render.costs_table(rows, by))
        else:
            out.print("no escalations yet")
        return 0

    raise typer.Exit(run(go))


# ------------------------------------------------------------------ servers and agents


@app.command()
def init(
    render_dir: Annotated[
        Path | None, typer.Option("--render", help="write the nats/ config files to this dir instead")
    ] = None,
    secure_dir: Annotated[
        Path | None,
        typer.Option(
            "--secure",
            help="write a server config with a user per role, and each role's config file, to this dir",
        ),
    ] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            help="with --secure: a worker's id, one user each (a GPU worker's is worker-<host>-gpu<N>) "
            "[default: this host's GPUs and worker-<host>-cpu1]",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="with --secure: the URL the agents reach the server at [nats://<host>:4222]"
        ),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="with --secure: the server's client port")] = 4222,
    store_dir: Annotated[
        str, typer.Option("--store-dir", help="with --secure: the server's JetStream store")
    ] = "/var/lib/mesh/jetstream",
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="with --secure: the server's TLS certificate (PEM)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="with --secure: its private key")] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="with --secure: the CA that signed it (the agents trust this CA)"),
    ] = None,
    verify_clients: Annotated[
        bool, typer.Option("--verify-clients", help="with --tls-ca: also require client certificates")
    ] = False,
    leaf_port: Annotated[
        int, typer.Option("--leaf-port", help="with --secure: accept leaf node connections on this port")
    ] = 0,
    domain: Annotated[
        str,
        typer.Option(
            "--domain",
            help="with --leaf-port: name the server's JetStream domain, and write gateway.toml and "
            "gateway-host.conf for a gateway on a leaf node server (docs/multihost.md)",
        ),
    ] = "",
) -> None:
    """Create (or update) every stream, bucket and consumer on the server. Safe to repeat."""
    s = settings()
    if secure_dir is not None:
        _init_secure(
            s,
            secure_dir,
            worker,
            url,
            port,
            store_dir,
            tls_cert,
            tls_key,
            tls_ca,
            verify_clients,
            leaf_port,
            domain,
        )
        return
    if render_dir is not None:
        from mesh.ops.natsconf import write_config

        for path in write_config(s, render_dir):
            out.print(f"wrote {path}")
        return

    async def go() -> int:
        bus = await _bus(s)
        try:
            # every class's queue: workers whose users may not create consumers bind to them
            await bus.ensure_resources(TASK_CLASSES)
            n = s.names
            out.print(f"streams: {n.events_stream}, {n.work_stream}, {n.cmd_stream}, {n.esc_stream}")
            out.print(f"buckets: {n.tasks_bucket}, {n.plans_bucket}, {n.agents_bucket}, {n.gateway_bucket}")
            return 0
        finally:
            await bus.close()

    raise typer.Exit(run(go))


def _init_secure(
    s: Settings,
    directory: Path,
    workers: list[str] | None,
    url: str | None,
    port: int,
    store_dir: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    verify_clients: bool,
    leaf_port: int,
    domain: str,
) -> None:
    from mesh.host.gpu import count_gpus
    from mesh.host.telemetry import host_token
    from mesh.ops.security import Tls, write_secure

    host = host_token()
    if not workers:
        workers = [f"worker-{host}-gpu{i}" for i in range(count_gpus())] + [f"worker-{host}-cpu1"]
    if bool(tls_cert) != bool(tls_key):
        raise fail("--tls-cert and --tls-key go together: the server needs its certificate and its key")
    if domain and not leaf_port:
        raise fail("--domain needs --leaf-port: the domain is how a leaf node server reaches this one")
    if verify_clients and not tls_ca:
        raise fail("--verify-clients needs --tls-ca: the CA the clients' certificates are checked against")
    for path in (tls_cert, tls_key, tls_ca):
        if path is not None and not path.is_file():
            raise fail(f"{path} is not a file")
    tls = None
    if tls_cert and tls_key:
        tls = Tls(
            str(tls_cert.resolve()),
            str(tls_key.resolve()),
            str(tls_ca.resolve()) if tls_ca else "",
            verify_clients,
        )
    scheme = "tls" if tls else "nats"
    server_url = url or f"{scheme}://{host}:{port}"
    try:
        written = write_secure(
            s,
            directory,
            workers=workers,
            server_url=server_url,
            port=port,
            store_dir=store_dir,
            tls=tls,
            client_ca=str(tls_ca.resolve()) if tls_ca else "",
            leaf_port=leaf_port,
            domain=domain,
        )
    except (MeshError, ValueError) as exc:
        raise fail(str(exc)) from None
    for path in written:
        out.print(f"wrote {path}", highlight=False)
    out.print(
        f"start the server with `nats-server -c {directory / 'server.conf'}`; give each agent its file "
        "(MESH_CONFIG=FILE), keep them mode 0600; then `mesh --config "
        f"{directory / 'cli.toml'} init` creates the streams and buckets",
        highlight=False,
    )
    if domain:
        out.print(
            "on the gateway host: `MESH_LEAF_URL=nats-leaf://gateway:PASSWORD@<this host>:"
            f"{leaf_port} nats-server -c gateway-host.conf` (PASSWORD from gateway.toml), then "
            "`MESH_CONFIG=gateway.toml mesh agent gateway`",
            highlight=False,
        )


@app.command()
def up(
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="server store and logs")] = None,
    port: Annotated[int | None, typer.Option("--port", help="server port (default 4222)")] = None,
    workers: Annotated[int, typer.Option("--workers", help="CPU workers to start")] = 2,
    slots: Annotated[int, typer.Option("--slots", help="concurrent tasks per worker")] = 2,
    gpus: Annotated[
        str,
        typer.Option(
            "--gpus",
            help="model workers: 'auto' (one per NVIDIA GPU, else one on the CPU), 'cpu', 'off', "
            "or GPU indices such as 0,1",
        ),
    ] = "auto",
    plan: Annotated[
        Path | None, typer.Option("--submit", help="submit this plan, follow it, then stop everything")
    ] = None,
    var: VarOpt = None,
    glob_outside: GlobOutsideOpt = False,
) -> None:
    """Start an embedded nats-server, a brain, N CPU workers and the model workers; Ctrl-C stops them all."""
    from mesh.ops.up import Stack

    configure()
    s = settings()
    spec = load(plan, var, s, glob_outside) if plan is not None else None
    data = Path(data_dir or s.data_dir)
    model_workers = _model_workers(gpus)
    stack = Stack(
        str(data),
        port or s.embedded_port,
        workers,
        slots,
        log_dir=str(data / "logs"),
        gpus=model_workers,
        durability=s.durability,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except MeshError as exc:
        raise fail(str(exc)) from None
    err.print(
        f"mesh up: server {stack.url}, store {data / 'jetstream'} (durability {s.durability}), "
        f"brain + {workers} worker(s)"
        f" + {len(model_workers)} model worker(s) ({_show_gpus(model_workers)}) + watchdog + gateway, "
        f"logs in {data / 'logs'}"
    )
    code = 0
    try:
        if spec is None:
            err.print("watch it: `mesh tail` or `nats sub 'mesh.evt.>'`; Ctrl-C stops everything")
            while not stop.wait(0.5):
                stack.supervise()
        else:
            code = _submit_and_follow(s, stack, spec, stop)
    finally:
        err.print("stopping agents and server…")
        stack.stop()
    raise typer.Exit(code)


def _show_gpus(gpus: tuple[int | None, ...]) -> str:
    return ", ".join("cpu" if g is None else f"gpu {g}" for g in gpus) or "none"


def _model_workers(spec: str) -> tuple[int | None, ...]:
    word = spec.strip().lower()
    if word == "off":
        return ()
    if word == "cpu":
        return (None,)
    if word == "auto":
        from mesh.host.gpu import count_gpus

        n = count_gpus()
        return tuple(range(n)) if n else (None,)
    try:
        return tuple(int(p) for p in word.split(",") if p.strip())
    except ValueError:
        raise fail(f"--gpus {spec!r}: write auto, cpu, off, or GPU indices such as 0,1") from None


def _submit_and_follow(s: Settings, stack: Any, spec: events.PlanSpec, stop: threading.Event) -> int:
    s = load_settings(server=stack.url, config=OPTS.config)
    result: dict[str, int] = {}

    def work() -> None:
        async def go() -> int:
            bus = await connect(s, "mesh-up", wait_s=10.0)
            try:
                await bus.ensure_resources()
                pid = await client.submit(bus, spec)
                err.print(f"submitted {spec.source or spec.title} as {pid}")
                return await follow_plan(bus, pid, len(spec.tasks))
            finally:
                await bus.close()

        try:
            result["code"] = run_loop(go())
        except MeshError as exc:
            err.print(f"[red]error:[/red] {exc}")
            result["code"] = 2
        finally:
            stop.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while not stop.wait(0.5):
        stack.supervise()
    thread.join(timeout=5)
    return result.get("code", 130)


@agent_app.command("brain")
def agent_brain(
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The brain: releases tasks, cascades results, retries."""
    from agents.base import run_agent
    from agents.brain import Brain

    configure(log_level, name="brain")
    s = settings()
    raise typer.Exit(run_agent(Brain(s)))


@agent_app.command("auditor")
def agent_auditor(
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The auditor: dead-letters malformed messages on event subjects nobody else consumes."""
    from agents.auditor import Auditor
    from agents.base import run_agent

    configure(log_level, name="auditor")
    raise typer.Exit(run_agent(Auditor(settings())))


@agent_app.command("watchdog")
def agent_watchdog(
    host: Annotated[
        str | None,
        typer.Option("--host", help="the host name telemetry is filed under (default: this host's)"),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The watchdog (one per host): GPU and host telemetry, and alerts."""
    from agents.base import run_agent
    from agents.watchdog import Watchdog

    configure(log_level, name="watchdog")
    raise typer.Exit(run_agent(Watchdog(settings(), host=host)))


@agent_app.command("exporter")
def agent_exporter(
    port: Annotated[int | None, typer.Option("--port", help="serve /metrics on this port [9464]")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The Prometheus exporter: GPU telemetry and states, queues, task durations, alerts on /metrics."""
    from agents.base import run_agent
    from agents.exporter import Exporter

    configure(log_level, name="exporter")
    raise typer.Exit(run_agent(Exporter(settings(metrics_port=port))))


@agent_app.command("gateway")
def agent_gateway(
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The gateway: answers escalated tasks with Claude, within budgets and rate limits."""
    from agents.base import run_agent
    from agents.gateway import Gateway

    configure(log_level, name="gateway")
    raise typer.Exit(run_agent(Gateway(settings())))


@agent_app.command("worker")
def agent_worker(
    slots: Annotated[int | None, typer.Option("--slots", help="concurrent shell tasks")] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes", help="comma list of task classes to take [default: cpu; script,llm with --gpu N]"
        ),
    ] = None,
    gpu: Annotated[
        str, typer.Option("--gpu", help="the GPU this worker owns (NVML index), or 'none' for the CPU")
    ] = "none",
    memory_mb: Annotated[
        int,
        typer.Option(
            "--memory-mb", help="memory model kinds may use (MB; 0: all of the GPU, or the host's free RAM)"
        ),
    ] = 0,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", help="on stop, seconds to let running tasks finish")
    ] = 30.0,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """A worker: claims tasks of its classes and runs them; with --gpu N it owns GPU N."""
    s = settings()
    if gpu.strip().lower() in ("none", "cpu", ""):
        index: int | None = None
    elif gpu.strip().isdigit():
        index = int(gpu)
    else:
        raise fail(
            f"--gpu {gpu!r} is not a GPU index or 'none': e.g. --gpu 0, or --gpu none for a CPU worker"
        )
    from mesh.host.gpu import gpu_environment

    # CUDA reads CUDA_VISIBLE_DEVICES, and the dynamic loader LD_LIBRARY_PATH, when they first
    # load: set both before anything imports a CUDA library (the loader only at exec)
    env = gpu_environment(index, s.gpu_library_path, dict(os.environ))
    if env.get("LD_LIBRARY_PATH", "") != os.environ.get("LD_LIBRARY_PATH", ""):
        os.execve(sys.executable, [sys.executable, "-m", "mesh", *sys.argv[1:]], env)
    os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"]
    from agents.base import run_agent
    from agents.worker import Worker
    from mesh.host.gpu import GpuError

    configure(log_level, name="worker")
    default = "script,llm" if index is not None else "cpu"
    wanted = tuple(c.strip() for c in (classes or default).split(",") if c.strip())
    if not wanted:
        raise fail("--classes needs at least one class")
    unknown = [c for c in wanted if c not in TASK_CLASSES]
    if unknown:
        raise fail(f"unknown class {', '.join(unknown)}; known classes: {', '.join(TASK_CLASSES)}")
    worker = Worker(
        s, classes=wanted, slots=slots, drain_timeout_s=drain_timeout, gpu=index, memory_mb=memory_mb
    )
    try:
        code = run_agent(worker)
    except GpuError as exc:
        raise fail(str(exc)) from exc
    raise typer.Exit(code)


@app.command()
def agents() -> None:
    """Agents registered now (from the agents bucket)."""
    s = settings()

    async def go() -> int:
        from mesh.bus.read import read_bucket
        from mesh.records import decode_agent

        bus = await _bus(s)
        try:
            raw = await read_bucket(await bus.agents_kv())
            now = time.time()
            for rec in sorted((decode_agent(v) for v in raw.values()), key=lambda a: a.agent_id):
                out.print(
                    f"{rec.agent_id:<40} {rec.role:<8} {rec.state:<9} seen {now - rec.seen_at:4.1f}s ago"
                    f"  running {len(rec.running)}/{rec.slots or '-'}",
                    highlight=False,
                )
            return 0
        finally:
            await bus.close()

    raise typer.Exit(run(go))


gpu_app = typer.Typer(help="Pause, resume or cordon a GPU (its worker stops or starts claiming work).")
app.add_typer(gpu_app, name="gpu")


def _gpu_id(gpu: str) -> str:
    """A GPU id as the gpus bucket has it; a bare index means this host's GPU."""
    if gpu.isdigit():
        from mesh.host.telemetry import host_token

        return f"{host_token()}-gpu{gpu}"
    return gpu


def _control(gpu: str, paused: bool, cordoned: bool | None, reason: str) -> None:
    s = settings()
    gpu_id = _gpu_id(gpu)

    async def go() -> int:
        from mesh.events import GpuControl

        bus = await _bus(s)
        try:
            # a GPU may be cordoned before any agent has run (and created the bucket)
            await bus.ensure_resources()
            kv = await bus.gpu_control_kv()
            key = s.names.gpu_control_key(gpu_id, "operator")
            was = False
            try:
                entry = await kv.get(key)
                old = events.decode(entry.value or b"")
                was = isinstance(old, GpuControl) and old.cordoned
            except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
                pass
            control = GpuControl(
                gpu=gpu_id,
                source="operator",
                at=time.time(),
                paused=paused,
                cordoned=was if cordoned is None else cordoned,
                reason=reason,
                by=client._user(),
            )
            await bus.emit(control)
            await kv.put(key, events.encode(control))
            state = "cordoned" if control.cordoned else "paused" if paused else "taking work"
            out.print(f"{gpu_id}: {state}" + (f" ({reason})" if reason else ""), highlight=False)
            return 0
        finally:
            await bus.close()

    raise typer.Exit(run(go))


ReasonOpt = Annotated[str, typer.Option("--reason", help="why (shown in mesh gpus and the events)")]


@gpu_app.command("pause")
def gpu_pause(gpu: str, reason: ReasonOpt = "") -> None:
    """Stop GPU's worker claiming work (running tasks finish). GPU: an id from `mesh gpus`, or an
    index on this host."""
    _control(gpu, True, None, reason)


@gpu_app.command("resume")
def gpu_resume(gpu: str, reason: ReasonOpt = "") -> None:
    """Lift an operator's pause (a cordon stays until `mesh gpu uncordon`)."""
    _control(gpu, False, None, reason)


@gpu_app.command("cordon")
def gpu_cordon(gpu: str, reason: ReasonOpt = "") -> None:
    """Mark a GPU not to be used (e.g. it reports XID errors) until `mesh gpu uncordon`."""
    _control(gpu, False, True, reason)


@gpu_app.command("uncordon")
def gpu_uncordon(gpu: str, reason: ReasonOpt = "") -> None:
    """Let a cordoned GPU take work again."""
    _control(gpu, False, False, reason)


@app.command()
def models(
    offline: Annotated[
        bool, typer.Option("--offline", help="list the registry without asking the server")
    ] = False,
) -> None:
    """The model registry (config [models] over the built-in models) and where each is loaded now."""
    from rich.table import Table

    from mesh.events import GpuState
    from mesh.models import ModelError, resolve_path

    s = settings()
    registry = s.model_registry()

    async def loaded_where() -> dict[str, list[str]]:
        from mesh.bus.read import read_bucket

        bus = await _bus(s)
        try:
            raw = await read_bucket(await bus.gpus_kv())
        finally:
            await bus.close()
        where: dict[str, list[str]] = {}
        for value in raw.values():
            try:
                gpu = events.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if not isinstance(gpu, GpuState) or gpu.state == "offline":
                continue
            place = f"{gpu.gpu} ({gpu.state})"
            for name in {gpu.llm, *gpu.script_models} - {""}:
                where.setdefault(name, []).append(place)
        return where

    where = {} if offline else run(loaded_where)
    table = Table(title_justify="left")
    for col in ("model", "kind", "vram MB", "default", "file", "loaded on"):
        table.add_column(col)
    for name, spec in sorted(registry.items()):
        try:
            path = resolve_path(name, spec)
        except ModelError as exc:
            path = f"[red]missing[/red]: {exc}"
        table.add_row(
            name,
            spec.kind,
            str(spec.vram_mb),
            "yes" if s.default_model(spec.kind) == name else "",
            path,
            ", ".join(sorted(where.get(name, []))) or ("?" if offline else "-"),
        )
    out.print(table)
    raise typer.Exit(0)


@app.command()
def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per GPU")] = False,
) -> None:
    """Every GPU: its worker's state and model (gpus bucket) beside its watchdog's last reading."""
    s = settings()

    async def go() -> int:
        from mesh.cli.top import gpu_rows, read_gpus

        bus = await _bus(s)
        try:
            rows = gpu_rows(await read_gpus(bus))
        finally:
            await bus.close()
        if as_json:
            for row in rows:
                print(msgspec.json.encode(row).decode())
        elif rows:
            out.print(_gpus_table(rows))
        else:
            out.print("no GPUs known: start a watchdog (`mesh agent watchdog`) or a GPU worker on each host")
        return 0

    raise typer.Exit(run(go))


def _gpus_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from mesh.cli.top import num as _num

    table = Table(title_justify="left")
    for col in ("host", "gpu", "name", "state", "model", "temp °C", "util %", "VRAM MB", "power W", "seen"):
        table.add_column(col, justify="right" if col[0] in "tuVps" and col != "state" else "left")
    now = time.time()
    for r in rows:
        temp = _num(r["temp_c"])
        if r["temp_c"] is not None and r["temp_c"] >= 85:
            temp = f"[red]{temp}[/red]"
        power = _num(r["power_w"])
        if r["power_limit_w"]:
            power += f"/{r['power_limit_w']:.0f}"
        vram = f"{_num(r['mem_used_mb'])}/{_num(r['mem_total_mb'])}"
        seen = f"{now - r['sampled_at']:.0f}s ago" if r["sampled_at"] else "-"
        table.add_row(
            r["host"],
            str(r["index"]),
            r["name"],
            r["state"] or "-",
            r["model"] or "-",
            temp + (" " + ",".join(r["throttle"]) if r["throttle"] else ""),
            _num(r["util_pct"]),
            vram,
            power,
            seen,
        )
    return table


@app.command()
def top(
    interval: Annotated[float, typer.Option("--interval", "-n", help="seconds between redraws")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
) -> None:
    """A live full-screen view: GPUs, queues, recent events and alerts firing (Ctrl-C quits)."""
    from mesh.cli.top import run_top

    s = settings()

    async def go() -> int:
        bus = await _bus(s)
        try:
            return await run_top(bus, out, interval_s=max(0.1, interval), once=once)
        finally:
            await bus.close()

    raise typer.Exit(run(go))


# ------------------------------------------------------------------ running as services


@app.command("install-units")
def install_units(
    user: Annotated[
        bool, typer.Option("--user", help="units for `systemctl --user` (~/.config/systemd/user)")
    ] = False,
    venv: Annotated[
        str | None,
        typer.Option("--venv", "--prefix", help="the virtual environment mesh runs from [this one]"),
    ] = None,
    config_dir: Annotated[
        str | None, typer.Option("--config-dir", help="role configs [/etc/mesh; --user: ~/.config/mesh]")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option("--data-dir", help="server store, caches [/var/lib/mesh; --user: ~/.local/share/mesh]"),
    ] = None,
    gpus: Annotated[
        str, typer.Option("--gpus", help="workers this host runs: GPU indices and/or cpu, e.g. 0,1,cpu")
    ] = "cpu",
    service_user: Annotated[
        str, typer.Option("--service-user", help="the account system units run as")
    ] = "mesh",
    drain_s: Annotated[
        float,
        typer.Option("--drain-s", help="seconds a stopping worker lets running tasks finish"),
    ] = 600.0,
    writable: Annotated[
        list[str] | None,
        typer.Option("--writable", help="a path workers' tasks may write besides the data dir (repeat)"),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="the server's port, for a new nats-server.conf")] = 4222,
    out_dir: Annotated[Path | None, typer.Option("--out", help="write the units to this dir")] = None,
    install: Annotated[
        bool,
        typer.Option(
            "--install",
            help="write the units to systemd's dir, role configs where missing, then daemon-reload",
        ),
    ] = False,
) -> None:
    """Render systemd units (server, brain, workers, watchdog, gateway, health timer) for this host."""
    import dataclasses

    from mesh.ops import units

    if (out_dir is None) == (not install):
        raise fail("say where the units go: --out DIR to look at them, or --install")
    s = settings()
    base = units.default_layout(user)
    layout = dataclasses.replace(
        base,
        venv=(venv or base.venv).rstrip("/") or "/",
        config_dir=(config_dir or base.config_dir).rstrip("/"),
        data_dir=(data_dir or base.data_dir).rstrip("/"),
        service_user=service_user,
        drain_s=drain_s,
        writable=tuple(p.rstrip("/") for p in writable or ()),
        port=port,
        gpus=tuple(g.strip() for g in gpus.split(",") if g.strip()),
    )
    try:
        files = units.rendered(layout, s)
        if out_dir is not None:
            for path in units.write_units(files, out_dir):
                out.print(f"wrote {path}", highlight=False, soft_wrap=True)
            return
        units.check_binaries(layout)
        written = units.install(layout, s, files)
    except PermissionError as exc:
        hint = "" if user else ": run it as root (sudo), or add --user for units of your own"
        raise fail(f"{exc}{hint}") from None
    except (units.UnitError, OSError) as exc:
        raise fail(str(exc)) from None
    for path in written:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    reloaded, why = units.daemon_reload(user)
    if not reloaded:
        err.print(f"[yellow]could not reload systemd:[/yellow] {why}", highlight=False, soft_wrap=True)
    out.print("start mesh on this host with:", highlight=False, soft_wrap=True)
    out.print(f"  {units.enable_command(layout)}", highlight=False, soft_wrap=True)
    if not layout.user:
        out.print(
            "a host without a watchdog: sudo systemctl enable --now mesh-health.timer",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def health(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per check")] = False,
) -> None:
    """One round of the [health.NAME] checks (what the watchdog runs continuously); restarts what
    stays unhealthy. Exit 1 if any check failed. mesh-health.timer runs it on hosts without a watchdog."""
    from mesh.host.health import HealthCheck, Verdict, check_once, probe_http

    s = settings()
    if not s.health:
        out.print("no [health.NAME] checks configured (docs/watchdog.md#health-checks-and-restarts)")
        raise typer.Exit(0)

    async def go() -> int:
        bus: Bus | None = None
        if any(c.agent for c in s.health.values()):
            bus = await _bus(s)

        async def probe(check: HealthCheck) -> tuple[bool, str]:
            if check.url:
                return await asyncio.to_thread(probe_http, check.url, check.timeout_s)
            assert bus is not None
            try:
                entry = await (await bus.agents_kv()).get(check.agent)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return False, f"agent {check.agent} is not registered (no heartbeat)"
            except MeshError as exc:  # no agents bucket: no agent ever ran against this server
                return False, f"agent {check.agent} is not registered ({exc})"
            return bool(entry.value), "registered"

        try:
            verdicts: list[Verdict] = list(
                await asyncio.gather(*(check_once(n, c, probe) for n, c in sorted(s.health.items())))
            )
        finally:
            if bus is not None:
                await bus.close()
        for v in verdicts:
            if as_json:
                print(msgspec.json.encode(v).decode())
                continue
            state = "[green]healthy[/green]" if v.healthy else "[red]unhealthy[/red]"
            out.print(f"{v.name}: {state} ({v.target}: {v.detail})")
            if not v.healthy:
                done = "restarted" if v.restarted else "[red]not restarted[/red]"
                out.print(f"  {done}: {v.restart_detail or 'no unit or command configured'}")
        return 0 if all(v.healthy for v in verdicts) else 1

    raise typer.Exit(run(go))


# ------------------------------------------------------------------ training data


@app.command("export")
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
        bus = await _bus(s)
        progress = Progress(
            TextColumn("[bold]export"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        try:
            with progress:
                bar = progress.add_task("export", total=None, detail="")

                def advance(seq: int, first: int, last: int) -> None:
                    done, total = seq - first + 1, last - first + 1
                    progress.update(bar, completed=done, total=total, detail=f"seq {seq:,} of {last:,}")

                manifest = await export.export(bus, options, advance)
        finally:
            await bus.close()
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


@app.command()
def doctor(
    quick: Annotated[
        bool, typer.Option("--quick", help="leave out the slow checks (model files, CUDA libraries)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per finding")] = False,
) -> None:
    """Check this host's mesh: server and JetStream, stream and bucket config, clocks, GPUs, models,
    disk, systemd units; each problem with its fix. Exit 1 if anything failed."""
    from rich.table import Table

    from mesh.ops.doctor import diagnose, failed

    s = settings()
    findings = run(lambda: diagnose(s, quick=quick))
    if as_json:
        for finding in findings:
            print(msgspec.json.encode(finding).decode())
    else:
        table = Table(title_justify="left", show_lines=False)
        for col in ("check", "", "finding", "fix"):
            table.add_column(col, overflow="fold")
        marks = {
            "ok": "[green]ok[/green]",
            "warn": "[yellow]warn[/yellow]",
            "fail": "[red]FAIL[/red]",
            "skip": "[dim]skip[/dim]",
        }
        for f in findings:
            table.add_row(f.check, marks[f.level], f.message, f.fix)
        out.print(table)
        counts = {level: sum(f.level == level for f in findings) for level in ("fail", "warn")}
        out.print(f"{counts['fail']} failed, {counts['warn']} warnings, {len(findings)} checks")
    raise typer.Exit(1 if failed(findings) else 0)


def entry() -> None:
    try:
        app()
    except MeshError as exc:  # settings and config errors raised outside `run`
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    entry()


__all__ = ["app", "entry"]
