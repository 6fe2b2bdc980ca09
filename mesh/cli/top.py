"""`mesh top`: a live, full-screen view of the mesh, from KV and the event stream.

Two halves, so the view can be tested without a server:

- `build(snapshot)` is pure: a `Snapshot` (GPU states, telemetry, queue depths, running tasks,
  recent events, alerts firing) in, a rich renderable out.
- `gather` and `run_top` read a running mesh: the gpus and telemetry buckets (what `mesh gpus`
  shows too: `read_gpus` and `gpu_row` are shared with it), the plan records (queue depths by
  class), the agents bucket (which tasks each worker runs), and the event stream, folded by an
  `EventFold` (the last events, and the alerts raised and not yet resolved).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js import api
from rich.console import Console, Group, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mesh import events
from mesh.bus import client
from mesh.bus.publish import Bus
from mesh.bus.read import read_bucket, read_stream
from mesh.bus.route import decode_or_none
from mesh.cli import render
from mesh.errors import MeshError
from mesh.records import PENDING, READY, RUNNING, UNREADABLE, WAITING, Damaged, decode_agent
from mesh.samples import GpuSample, HostSample, decode_sample

RECENT_EVENTS = 15
# how far back in the event stream the first frame looks for its recent events
BACKLOG = 200
QUEUE_STATES = (PENDING, WAITING, READY, RUNNING)
HOT_C = 85.0

# ---------------------------------------------------------------- GPUs (shared with `mesh gpus`)


@dataclass
class GpuView:
    """What the gpus and telemetry buckets say about the GPUs now."""

    states: dict[str, events.GpuState] = field(default_factory=dict)
    samples: dict[str, GpuSample] = field(default_factory=dict)
    hosts: dict[str, HostSample] = field(default_factory=dict)


async def read_gpus(bus: Bus) -> GpuView:
    """Every GPU's latest `gpu.state` (by its worker) and telemetry sample (by its host's
    watchdog), and each host's sample. A bucket that does not exist yet reads as empty."""
    view = GpuView()
    try:
        states_raw = await read_bucket(await bus.gpus_kv())
    except MeshError:
        states_raw = {}
    try:
        tel_raw = await read_bucket(await bus.telemetry_kv(), "*.*")
    except MeshError:
        tel_raw = {}  # no watchdog ever ran against this server
    for value in states_raw.values():
        try:
            st = events.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        match st:
            case events.GpuState() if st.index >= 0:
                view.states[st.gpu] = st
    for value in tel_raw.values():
        try:
            sample = decode_sample(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        match sample:
            case GpuSample():
                view.samples[sample.gpu_id] = sample
            case HostSample():
                view.hosts[sample.host] = sample
    return view


def gpu_row(gid: str, sample: GpuSample | None, state: events.GpuState | None) -> dict[str, Any]:
    """One GPU as `mesh gpus --json` prints it: its worker's state beside its last reading."""
    return {
        "gpu": gid,
        "host": sample.host if sample else state.host if state else "",
        "index": sample.index if sample else state.index if state else -1,
        "name": (sample.name if sample else "") or (state.name if state else ""),
        "state": state.state if state else "",
        "model": (state.llm or state.fetching or ",".join(state.script_models)) if state else "",
        # while `fetching`: how much of the model's file has arrived (0 to 1)
        "progress": state.progress if state and state.state == "fetching" else None,
        "temp_c": sample.temp_c if sample else None,
        "util_pct": sample.util_pct if sample else None,
        "mem_used_mb": sample.mem_used_mb if sample else (state.vram_used_mb if state else None),
        "mem_total_mb": sample.mem_total_mb if sample else (state.vram_total_mb if state else None),
        "power_w": sample.power_w if sample else None,
        "power_limit_w": sample.power_limit_w if sample else None,
        "power_cap_w": sample.power_cap_w if sample else None,
        "throttle": list(sample.throttle_reasons) if sample else [],
        "sampled_at": sample.at if sample else None,
    }


def gpu_rows(view: GpuView) -> list[dict[str, Any]]:
    return [
        gpu_row(gid, view.samples.get(gid), view.states.get(gid))
        for gid in sorted(set(view.samples) | set(view.states))
    ]


def num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


# ---------------------------------------------------------------- the snapshot and its view


@dataclass
class Snapshot:
    """Everything one frame of `mesh top` shows."""

    at: float
    gpus: GpuView = field(default_factory=GpuView)
    # class -> task state (pending, waiting, ready, running) -> tasks of unfinished plans
    queue: dict[str, dict[str, int]] = field(default_factory=dict)
    # worker (agent id) -> the tasks it runs now, as `<plan>.<task>`
    running: dict[str, list[str]] = field(default_factory=dict)
    # the last events, oldest first, as `client.follow` yields them
    recent: list[tuple[str, events.Message | None]] = field(default_factory=list)
    # alerts raised and not yet resolved, oldest first
    alerts: list[events.AlertRaised] = field(default_factory=list)
    server: str = ""
    # task and plan records that do not decode (the brain rebuilds them when it starts)
    damaged: list[Damaged] = field(default_factory=list)


def _state_cell(state: events.GpuState | None) -> Text:
    if state is None:
        return Text("-", style="dim")
    style = {"paused": "yellow", "offline": "red", "idle": "dim"}.get(state.state, "cyan")
    cell = Text(state.state, style=style)
    if state.state == "fetching":
        cell.append(f" {state.fetching} {state.progress:.0%}")
    if state.hold:
        cell.append(f" ({state.hold})", style="yellow")
    elif state.error:
        cell.append(f" ({state.error})", style="red")
    return cell


def _task_cell(state: events.GpuState | None, running: dict[str, list[str]]) -> Text:
    if state is None:
        return Text("-", style="dim")
    tasks = running.get(state.worker, [])
    count = max(state.running, len(tasks))
    if not count:
        return Text("-", style="dim")
    cell = Text(f"{count} ", style="bold")
    cell.append(", ".join(tasks) if tasks else "running")
    return cell


def gpus_panel(snap: Snapshot) -> Panel:
    table = Table(expand=True, box=None, pad_edge=False)
    for col, justify in (
        ("gpu", "left"),
        ("name", "left"),
        ("state", "left"),
        ("model", "left"),
        ("temp °C", "right"),
        ("util %", "right"),
        ("VRAM MB", "right"),
        ("power W", "right"),
        ("task", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    view = snap.gpus
    for gid in sorted(set(view.samples) | set(view.states)):
        row = gpu_row(gid, view.samples.get(gid), view.states.get(gid))
        state = view.states.get(gid)
        temp = Text(num(row["temp_c"]), style="red" if (row["temp_c"] or 0) >= HOT_C else "")
        if row["throttle"]:
            temp.append(" " + ",".join(row["throttle"]), style="yellow")
        power = num(row["power_w"])
        if row["power_limit_w"]:
            power += f"/{row['power_limit_w']:.0f}"
        table.add_row(
            gid,
            row["name"],
            _state_cell(state),
            row["model"] or "-",
            temp,
            num(row["util_pct"]),
            f"{num(row['mem_used_mb'])}/{num(row['mem_total_mb'])}",
            power,
            _task_cell(state, snap.running),
        )
    body: RenderableType = table
    if not view.samples and not view.states:
        body = Text("no GPUs known: start a watchdog (`mesh agent watchdog`) or a GPU worker", style="dim")
    hosts = [_host_line(h) for _, h in sorted(view.hosts.items())]
    return Panel(Group(body, *hosts) if hosts else body, title="GPUs", title_align="left")


def _host_line(h: HostSample) -> Text:
    line = Text(f"{h.host}: ", style="bold")
    ram = f"{h.ram_used_mb / 1024:.1f}/{h.ram_total_mb / 1024:.1f} GB"
    line.append(f"cpu {h.cpu_pct:.0f}%  load {h.load1:.2f}  ram {ram}")
    line.append(f"  disk free {h.disk_free_pct:.0f}%", style="red" if h.disk_free_pct < 5 else "")
    return line


def queue_panel(snap: Snapshot) -> Panel:
    table = Table(expand=True, box=None, pad_edge=False)
    table.add_column("class")
    for st in QUEUE_STATES:
        table.add_column(st, justify="right", style=render.STYLE.get(st, ""))
    totals = dict.fromkeys(QUEUE_STATES, 0)
    for cls in sorted(snap.queue):
        counts = snap.queue[cls]
        for st in QUEUE_STATES:
            totals[st] += counts.get(st, 0)
        table.add_row(cls, *(str(counts.get(st, 0)) for st in QUEUE_STATES))
    if len(snap.queue) != 1:
        table.add_row(Text("all", style="bold"), *(str(totals[st]) for st in QUEUE_STATES))
    title = f"queue: {totals[WAITING] + totals[READY]} queued, {totals[RUNNING]} running"
    return Panel(table, title=title, title_align="left")


def alerts_panel(snap: Snapshot) -> Panel:
    if not snap.alerts and not snap.damaged:
        return Panel(Text("none firing", style="green"), title="alerts", title_align="left")
    lines = []
    for d in snap.damaged:
        line = Text(f"damaged {d.bucket} {d.key}", style="bold red")
        line.append(f": {d.describe()}")
        lines.append(line)
    for a in snap.alerts:
        style = "bold red" if a.severity == "critical" else "red" if a.severity == "warn" else ""
        line = Text(f"{render.clock(a.at)} ", style="dim")
        line.append(f"{a.severity} {a.rule} {a.target}", style=style)
        if a.message:
            line.append(f": {a.message}")
        lines.append(line)
    title = f"alerts firing: {len(snap.alerts)}"
    if snap.damaged:
        title += f", damaged records: {len(snap.damaged)}"
    return Panel(Group(*lines), title=title, title_align="left")


def events_panel(snap: Snapshot) -> Panel:
    lines = [render.event_line(subject, msg) for subject, msg in snap.recent[-RECENT_EVENTS:]]
    for line in lines:
        line.no_wrap = True
        line.overflow = "ellipsis"
    body: RenderableType = Group(*lines) if lines else Text("no events yet", style="dim")
    return Panel(body, title="recent events", title_align="left")


def header(snap: Snapshot) -> Text:
    running = sum(counts.get(RUNNING, 0) for counts in snap.queue.values())
    line = Text("mesh top", style="bold")
    if snap.server:
        line.append(f"  {snap.server}", style="dim")
    line.append(f"  {time.strftime('%H:%M:%S', time.localtime(snap.at))}")
    line.append(f"  {len(set(snap.gpus.samples) | set(snap.gpus.states))} GPUs, {running} running")
    if snap.alerts:
        line.append(f", {len(snap.alerts)} alerts firing", style="red")
    if snap.damaged:
        line.append(f", {len(snap.damaged)} damaged records", style="bold red")
    return line


def build(snap: Snapshot, height: int | None = None) -> RenderableType:
    """The frame for a snapshot. Without `height`, the panels stacked (what `--once` prints,
    nothing cut); with it, a full-screen `Layout` of that many lines (the live view)."""
    gpus, queue, alerts, recent = gpus_panel(snap), queue_panel(snap), alerts_panel(snap), events_panel(snap)
    if height is None:
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(queue, alerts)
        return Group(header(snap), gpus, grid, recent)
    n_gpus = len(set(snap.gpus.samples) | set(snap.gpus.states))
    gpu_lines = max(n_gpus, 1) + 1 + len(snap.gpus.hosts) + 2
    middle_lines = max(len(snap.queue) + 2, len(snap.alerts) + len(snap.damaged), 1) + 2
    layout = Layout()
    layout.split_column(
        Layout(header(snap), name="header", size=1),
        Layout(gpus, name="gpus", size=gpu_lines),
        Layout(name="middle", size=middle_lines),
        Layout(recent, name="events", minimum_size=3),
    )
    layout["middle"].split_row(Layout(queue, name="queue"), Layout(alerts, name="alerts"))
    return layout


# ---------------------------------------------------------------- folding the event stream


class EventFold:
    """What `mesh top` keeps from the event stream: the last events and the alerts firing."""

    def __init__(self, keep: int = RECENT_EVENTS) -> None:
        self.recent: deque[tuple[str, events.Message | None]] = deque(maxlen=keep)
        self.firing: dict[tuple[str, str], events.AlertRaised] = {}
        self.last_seq = 0

    def add(self, subject: str, msg: events.Message | None, recent: bool = True) -> None:
        match msg:
            case events.AlertRaised():
                self.firing[(msg.rule, msg.target)] = msg
            case events.AlertResolved():
                self.firing.pop((msg.rule, msg.target), None)
        if recent:
            self.recent.append((subject, msg))

    def alerts(self) -> list[events.AlertRaised]:
        return sorted(self.firing.values(), key=lambda a: a.at)


async def prime(bus: Bus, fold: EventFold, backlog: int = BACKLOG) -> int:
    """Fold what is already in the event stream: every alert event (to know which fire now) and
    the last `backlog` events. Returns the stream's last sequence read."""
    names = bus.names
    info = await bus.js.stream_info(names.events_stream)
    last = int(info.state.last_seq)
    every = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    async for raw in read_stream(bus.js, names.events_stream, names.alerts_all, every):
        if raw.metadata.sequence.stream > last:
            break
        fold.add(raw.subject, decode_or_none(raw)[0], recent=False)
    if last:
        tail = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, last - backlog + 1)
        )
        async for raw in read_stream(bus.js, names.events_stream, names.evt_all, tail):
            if raw.metadata.sequence.stream > last:
                break
            # alerts are folded already: only remember the event
            fold.recent.append((raw.subject, decode_or_none(raw)[0]))
    fold.last_seq = last
    return last


async def follow_events(bus: Bus, fold: EventFold, start_seq: int) -> None:
    """Fold events as they come, from `start_seq` on, until cancelled."""
    async for subject, _, msg in client.follow(bus, bus.names.evt_all, start_seq=start_seq):
        fold.add(subject, msg)


# ---------------------------------------------------------------- tasks


def count_tasks(records: Iterable[Any]) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
    """Queue depths by class and state, and the running tasks by worker, of task records."""
    queue: dict[str, dict[str, int]] = {}
    running: dict[str, list[str]] = {}
    for rec in records:
        if rec.status not in QUEUE_STATES:
            continue
        by_state = queue.setdefault(rec.spec.cls, {})
        by_state[rec.status] = by_state.get(rec.status, 0) + 1
        if rec.status == RUNNING and rec.worker:
            running.setdefault(rec.worker, []).append(rec.key)
    for tasks in running.values():
        tasks.sort()
    return queue, running


async def read_tasks(bus: Bus) -> tuple[dict[str, dict[str, int]], dict[str, list[str]], list[Damaged]]:
    """Queue depths and running tasks, without reading every task: the depths are the plan
    records' counts by class (only unfinished plans can have any), the running tasks the ones
    each worker's registration lists. Only a plan whose record has no counts by class (written
    by an older brain) or is damaged (it may be unfinished) has its tasks read. Also the
    damaged records met on the way."""
    plans, damaged = await client.read_plans(bus)
    queue: dict[str, dict[str, int]] = {}
    read = [d.key for d in damaged]
    for plan in plans:
        if plan.final:
            continue
        if plan.counts and not plan.by_class:
            read.append(plan.plan_id)
            continue
        for cls, counts in plan.by_class.items():
            for status in QUEUE_STATES:
                if counts.get(status):
                    by_state = queue.setdefault(cls, {})
                    by_state[status] = by_state.get(status, 0) + counts[status]
    records = []
    for plan_id in read:
        try:
            tasks, bad = await client.read_tasks(bus, plan_id)
        except ValueError:
            continue  # a damaged plan key that is no plan id: it has no tasks
        records += tasks
        damaged += bad
    more, running = count_tasks(records)
    for cls, counted in more.items():
        for name, n in counted.items():
            by_state = queue.setdefault(cls, {})
            by_state[name] = by_state.get(name, 0) + n
    for value in (await read_bucket(await bus.agents_kv())).values():
        try:
            agent = decode_agent(value)
        except UNREADABLE:
            continue  # (`mesh agents` says which)
        if agent.running:
            running[agent.agent_id] = sorted({*running.get(agent.agent_id, ()), *agent.running})
    return queue, running, damaged


async def gather(bus: Bus, fold: EventFold, server: str = "") -> Snapshot:
    """One snapshot of a running mesh (the event fold kept up by `prime` and `follow_events`)."""
    gpus = await read_gpus(bus)
    queue, running, damaged = await read_tasks(bus)
    return Snapshot(
        at=time.time(),
        gpus=gpus,
        queue=queue,
        running=running,
        recent=list(fold.recent),
        alerts=fold.alerts(),
        server=server,
        damaged=damaged,
    )


async def run_top(bus: Bus, console: Console, interval_s: float = 1.0, once: bool = False) -> int:
    """Print one frame (`once`), or redraw the full-screen view every `interval_s` until Ctrl-C."""
    fold = EventFold()
    last = await prime(bus, fold)
    server = str(bus.nc.connected_url.netloc) if bus.nc.connected_url else ""
    if once:
        console.print(build(await gather(bus, fold, server)))
        return 0
    follower = asyncio.create_task(follow_events(bus, fold, last + 1))
    try:
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                if follower.done():
                    follower.result()  # the follow failed: say why
                snap = await gather(bus, fold, server)
                live.update(build(snap, height=console.height), refresh=True)
                await asyncio.sleep(interval_s)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
