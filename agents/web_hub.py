"""The web console's one view of the mesh: it follows NATS once and fans what changes out to every
browser watching, so a hundred open pages cost the server what one does.

What it follows, each with one ordered consumer (never a durable one, never a poll):

- the event stream from its end (`<p>.evt.>`): task transitions colour the plan pages, and plan,
  GPU, alert, dead-letter, escalation and agent events wake the pages that show them;
- the plans, gpus, agents and telemetry buckets, from the latest value of each key on: the
  plans list, the GPUs and hosts pages are served from memory.

A plan's tasks are read once, when a page first asks for them (`PlanView`: their ids, statuses and
dependencies, laid out by `mesh.consoleview.layout`), with the latest transitions the events told
of laid on top (a record is written after its event: read alone, it may lag), then kept current
from the events. Updates are gathered and sent every `FLUSH_S` as one batch per topic: a plan
whose tasks change a thousand times a second costs each browser four messages a second. A
browser too slow to keep up is cut off (its page reconnects and reloads) rather than letting its
queue grow. A page reloads what it shows each time its stream (re)opens, holding the updates that
come meanwhile until the reload is drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

from mesh import events
from mesh.bus.follows import Follows
from mesh.bus.publish import Bus
from mesh.bus.read import kv_gone, read_bucket
from mesh.bus.route import decode_checked
from mesh.consoleview import RESHAPING_EVENTS, STATUS_OF_EVENT, Layout, layout
from mesh.names import kv_keys
from mesh.records import UNREADABLE, AgentRecord, PlanRecord, decode_agent, decode_plan
from mesh.samples import GpuSample, HostSample, decode_sample

log = logging.getLogger(__name__)

FLUSH_S = 0.25
# what a browser may have waiting before it is cut off
CLIENT_QUEUE = 256
# plans whose tasks are kept in memory at once (the pages open on them)
VIEWS = 4
# telemetry samples kept per GPU or host for the charts a page opens with
RING = 360
# task transitions remembered, whatever plan they are in: a plan view read from the tasks bucket
# takes those of its plan on top (the brain writes a task's record after its event, so a record
# read now may not yet say what an event already did)
RECENT = 8192


class _Spec(msgspec.Struct):
    depends_on: tuple[str, ...] = ()
    cls: str = msgspec.field(default="cpu", name="class")
    kind: str = "shell"


class _Task(msgspec.Struct):
    """What a plan view reads of a task record (the rest is skipped, not decoded)."""

    task_id: str
    index: int = 0
    status: str = "pending"
    attempt: int = 0
    worker: str = ""
    spec: _Spec = msgspec.field(default_factory=_Spec)


_task_decoder = msgspec.json.Decoder(_Task)


@dataclass
class PlanView:
    """One plan's tasks as the console draws them: plan order, statuses, edges and layout."""

    plan_id: str
    ids: list[str]
    status: list[str]
    attempt: list[int]
    worker: list[str]
    cls: list[str]
    deps: list[list[int]]
    lay: Layout
    where: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, plan_id: str, tasks: list[_Task]) -> PlanView:
        tasks.sort(key=lambda t: t.index)
        where = {t.task_id: i for i, t in enumerate(tasks)}
        deps = [[where[d] for d in t.spec.depends_on if d in where] for t in tasks]
        return cls(
            plan_id=plan_id,
            ids=[t.task_id for t in tasks],
            status=[str(t.status) for t in tasks],
            attempt=[t.attempt for t in tasks],
            worker=[t.worker for t in tasks],
            cls=[t.spec.cls for t in tasks],
            deps=deps,
            lay=layout(deps),
            where=where,
        )

    def take(self, task_id: str, status: str, attempt: int, worker: str) -> None:
        """A task's transition, from its event (none where the task is not in this view)."""
        i = self.where.get(task_id)
        if i is None:
            return
        self.status[i] = status
        self.attempt[i] = max(self.attempt[i], attempt)
        if worker:
            self.worker[i] = worker

    def row(self, i: int) -> dict[str, Any]:
        return {
            "i": i,
            "id": self.ids[i],
            "status": self.status[i],
            "attempt": self.attempt[i],
            "worker": self.worker[i],
            "class": self.cls[i],
            "deps": len(self.deps[i]),
            "layer": self.lay.layer[i],
            "pos": self.lay.pos[i],
        }


@dataclass(eq=False)
class Client:
    """One browser's server-sent event stream: the topics it watches and what waits for it."""

    topics: set[str]
    queue: asyncio.Queue[tuple[str, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=CLIENT_QUEUE)
    )
    dropped: bool = False
    # whether the browser is still connected (its socket open)
    connected: Callable[[], bool] = lambda: True


class Hub:
    """The followed state and the browsers it is fanned out to (see the module's docstring)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.names = bus.names
        self.plans: dict[str, PlanRecord] = {}
        self.gpus: dict[str, events.GpuState] = {}
        self.agents: dict[str, AgentRecord] = {}
        self.samples: dict[str, GpuSample | HostSample] = {}
        self.rings: dict[str, deque[dict[str, Any]]] = {}
        self.alerts: dict[tuple[str, str], events.AlertRaised | events.AlertResolved] = {}
        self.views: OrderedDict[str, PlanView] = OrderedDict()
        self._building: dict[str, asyncio.Future[PlanView]] = {}
        # (plan, task, status, attempt, worker) of the latest task transitions, oldest first
        self._recent: deque[tuple[str, str, str, int, str]] = deque(maxlen=RECENT)
        self.clients: set[Client] = set()
        self.seen = 0  # events taken from the stream (the tests wait on it)
        self._pending: dict[str, dict[str, Any]] = {}
        self._follows = Follows(bus)
        self._flusher: asyncio.Task[None] | None = None

    # life -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.subscribe()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="web-flush")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._follows.close()
        for client in list(self.clients):
            self._drop(client)

    async def subscribe(self) -> None:
        """(Again, after a reconnect:) follow the buckets from their latest values and the events
        from now; the plan views are read anew when next asked for."""
        await self._follows.close()
        self.views.clear()
        n = self.names
        follows: list[tuple[str, Callable[[str, bytes | None], None]]] = [
            (n.plans_bucket, self._on_plan),
            (n.gpus_bucket, self._on_gpu),
            (n.agents_bucket, self._on_agent),
            (n.telemetry_bucket, self._on_sample),
        ]
        for bucket, take in follows:
            await self._follows.bucket(bucket, self._kv_callback(bucket, take))
        # the alerts firing now: every raise and resolve the history holds, then what comes
        await self._follows.stream(n.alerts_all, n.events_stream, self._on_alert, api.DeliverPolicy.ALL)
        await self._follows.stream(n.evt_all, n.events_stream, self._on_event, api.DeliverPolicy.NEW)

    # the buckets ------------------------------------------------------------------------
    def _kv_callback(self, bucket: str, take: Callable[[str, bytes | None], None]) -> Any:
        prefix = len(kv_keys(bucket))

        async def cb(raw: NatsMsg) -> None:
            take(raw.subject[prefix:], None if kv_gone(raw) else raw.data)

        return cb

    def _on_plan(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.plans.pop(key, None)
            self.views.pop(key, None)
        else:
            try:
                decoded = decode_plan(data)
            except UNREADABLE as exc:
                log.warning("unreadable plan record %s: %s", key, exc)
                return
            if decoded.plan_id != key:  # a record under another plan's key is not shown
                log.warning("plan record %s names plan %r", key, decoded.plan_id)
                return
            self.plans[key] = decoded
        record = self.plans.get(key)
        self._mark("plans", key, plan_row(record, time.time()) if record else None)

    def _on_gpu(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.gpus.pop(key, None)
        else:
            try:
                ev = events.decode(data)
            except UNREADABLE:
                return
            if not isinstance(ev, events.GpuState) or ev.gpu != key:
                return
            self.gpus[key] = ev
        self._mark("gpus", key, True)

    def _on_agent(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.agents.pop(key, None)
        else:
            try:
                agent = decode_agent(data)
            except UNREADABLE:
                return
            if agent.agent_id != key:  # an agent speaks for itself alone
                return
            self.agents[key] = agent
        self._mark("agents", key, True)

    def _on_sample(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.samples.pop(key, None)
            return
        try:
            sample = decode_sample(data)
        except UNREADABLE:
            return
        self.samples[key] = sample
        point = chart_point(sample)
        ring = self.rings.setdefault(key, deque(maxlen=RING))
        if ring and ring[-1]["at"] == point["at"]:
            return
        ring.append(point)
        self._mark("telemetry", key, {"key": key, **point})

    async def _on_alert(self, raw: NatsMsg) -> None:
        msg, _ = decode_checked(raw, self.names)
        match msg:
            case events.AlertRaised() | events.AlertResolved():
                self.alerts[(msg.rule, msg.target)] = msg
                self._mark("alerts", f"{msg.rule}/{msg.target}", True)

    # the event stream ---------------------------------------------------------------------
    async def _on_event(self, raw: NatsMsg) -> None:
        self.seen += 1
        msg, _ = decode_checked(raw, self.names)
        if msg is None:
            return
        tag = type(msg).__struct_config__.tag
        assert isinstance(tag, str)
        plan_id = getattr(msg, "plan_id", "")
        task_id = getattr(msg, "task_id", "")
        if plan_id and tag in RESHAPING_EVENTS:
            self.views.pop(plan_id, None)
            self._mark(f"plan:{plan_id}", "reshaped", True)
        status = STATUS_OF_EVENT.get(tag)
        if plan_id and task_id:
            view = self.views.get(plan_id)
            i = view.where.get(task_id) if view is not None else None
            if status is not None:
                attempt, worker = getattr(msg, "attempt", 0) or 0, getattr(msg, "worker", "")
                change = (plan_id, task_id, status, attempt, worker)
                self._recent.append(change)
                if view is not None:
                    view.take(*change[1:])
            elif view is not None and i is not None:
                status = view.status[i]
            pending = self._pending.get(f"plan:{plan_id}", {})
            if status is not None:
                self._mark(f"plan:{plan_id}", task_id, status)
            elif tag.startswith(("run.", "esc.")) and task_id not in pending:
                # (a report, say: the page's task detail reloads; a status never gives way to it)
                self._mark(f"plan:{plan_id}", task_id, tag)
        if tag.startswith("dead."):
            self._mark("dead", "new", True)
        elif tag.startswith("esc."):
            self._mark("costs", "new", True)
        elif tag.startswith("gpu."):
            self._mark("gpus", getattr(msg, "gpu", ""), True)
        elif tag.startswith("agent."):
            self._mark("agents", getattr(msg, "agent_id", ""), True)
        elif tag.startswith("plan.") and plan_id:
            self._mark(f"plan:{plan_id}", "plan", tag)

    # the plan views ---------------------------------------------------------------------
    async def view(self, plan_id: str) -> PlanView:
        """A plan's view, read from the tasks bucket the first time it is asked for (one read
        however many pages ask at once), then kept current from the events."""
        found = self.views.get(plan_id)
        if found is not None:
            self.views.move_to_end(plan_id)
            return found
        building = self._building.get(plan_id)
        if building is None:
            building = asyncio.get_running_loop().create_future()
            self._building[plan_id] = building
            try:
                built = await self._read_view(plan_id)
                # the transitions its records may not say yet, and those that came while reading
                for change in self._recent:
                    if change[0] == plan_id:
                        built.take(*change[1:])
            except BaseException as exc:
                building.set_exception(exc)
                building.exception()  # (retrieved: the waiters, if any, see it)
                raise
            finally:
                self._building.pop(plan_id, None)
            building.set_result(built)
            self.views[plan_id] = built
            while len(self.views) > VIEWS:
                self.views.popitem(last=False)
            return built
        return await asyncio.shield(building)

    async def _read_view(self, plan_id: str) -> PlanView:
        raw = await read_bucket(await self.bus.tasks_kv(), f"{plan_id}.>")
        tasks = []
        for key, value in raw.items():
            try:
                tasks.append(_task_decoder.decode(value))
            except UNREADABLE as exc:
                log.warning("unreadable task record %s: %s", key, exc)
        return PlanView.of(plan_id, tasks)

    # fan-out ----------------------------------------------------------------------------
    def attach(self, topics: set[str], connected: Callable[[], bool] = lambda: True) -> Client:
        client = Client(topics, connected=connected)
        self.clients.add(client)
        return client

    def prune(self) -> None:
        """Let go of the streams whose browser has gone (their handler finds out only when it
        next writes, up to a keepalive later)."""
        for client in list(self.clients):
            if not client.connected():
                self._drop(client)

    def detach(self, client: Client) -> None:
        self.clients.discard(client)

    def _drop(self, client: Client) -> None:
        client.dropped = True
        self.clients.discard(client)
        with contextlib.suppress(asyncio.QueueFull):
            client.queue.put_nowait(None)

    def _mark(self, topic: str, key: str, value: Any) -> None:
        self._pending.setdefault(topic, {})[key] = value

    def flush(self) -> None:
        """Send what changed since the last flush: one message per topic to each browser."""
        pending, self._pending = self._pending, {}
        if not pending or not self.clients:
            return
        batches = {topic: msgspec.json.encode(changes) for topic, changes in pending.items()}
        for client in list(self.clients):
            for topic, data in batches.items():
                if topic in client.topics or (topic.startswith("plan:") and "plan:*" in client.topics):
                    try:
                        client.queue.put_nowait((topic, data))
                    except asyncio.QueueFull:
                        log.info("a browser fell behind; cutting it off (it reconnects)")
                        self._drop(client)
                        break

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self.flush()
            except Exception:  # a bad batch must not end the console's updates
                log.exception("flushing updates failed")


def plan_row(p: PlanRecord, now: float) -> dict[str, Any]:
    """What the plans list shows of a plan (and what its live updates carry)."""
    return {
        "id": p.plan_id,
        "title": p.title,
        "status": str(p.status),
        "total": p.total,
        "done": p.done,
        "counts": p.counts,
        "by": p.by,
        "accepted_at": p.accepted_at,
        "finished_at": p.finished_at,
        "age_s": age(p.accepted_at, now),
        "error": p.error,
    }


def chart_point(sample: GpuSample | HostSample) -> dict[str, Any]:
    """The figures a chart plots of one telemetry sample."""
    if isinstance(sample, GpuSample):
        return {
            "at": sample.at,
            "temp": sample.temp_c,
            "util": sample.util_pct,
            "mem": sample.mem_used_mb,
            "mem_total": sample.mem_total_mb,
            "power": sample.power_w,
        }
    return {
        "at": sample.at,
        "cpu": sample.cpu_pct,
        "ram": sample.ram_used_mb,
        "ram_total": sample.ram_total_mb,
        "disk_free": sample.disk_free_pct,
    }


def age(ts: float, now: float | None = None) -> float:
    return max(0.0, (now or time.time()) - ts) if ts else 0.0
