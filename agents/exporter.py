"""The Prometheus exporter (`mesh agent exporter`): the mesh's state as metrics on /metrics.

Where each metric comes from:

- GPU and host telemetry (`mesh_gpu_temperature_celsius`, ...): the telemetry bucket, read at
  scrape time (it holds one small value per GPU and host, and expires a silent host's).
- GPU states (`mesh_gpu_state`): the gpus bucket, read at scrape time.
- Tasks by state and queue depth per class (`mesh_tasks`, `mesh_queue_depth`, `mesh_plans`):
  the plans bucket (each plan record counts its tasks by class and state), followed with an
  ordered consumer on the bucket's stream that starts with the latest value of every key and
  then sees every put and delete. A scrape adds up the plans' counts: it never reads every task.
- The class and kind a task's run is counted under: the tasks bucket, followed the same way;
  the exporter keeps them only for tasks released and not yet finished (a million-task plan
  costs it no memory per task).
- Task durations and prompt throughput (`mesh_task_duration_seconds`,
  `mesh_prompt_tokens_per_second`, `mesh_runs_total`): `run.finished` events seen while the
  exporter runs (an ordered consumer from the stream's end); a restarted exporter starts
  its histograms from zero, which Prometheus's `rate()` and `histogram_quantile()` expect.
- Alerts firing (`mesh_alert_firing`): every `alert.raised`/`alert.resolved` the event stream
  still holds (its retention: `events_max_age_days`), replayed at start-up and then followed.

After a reconnect the exporter subscribes again: the bucket-derived and alert state is rebuilt
from scratch; run.finished events published while it was cut off are not counted.

The HTTP server is prometheus_client's own (a thread); a scrape asks the agent's event loop
for a snapshot, so no state is shared across threads but the thread-safe histograms.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import api
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agents.base import Agent
from mesh import events
from mesh.bus.follows import Follows
from mesh.bus.read import kv_gone, read_bucket
from mesh.errors import MeshError
from mesh.names import kv_keys
from mesh.records import (
    INFLIGHT_STATES,
    PLAN_FINAL_STATES,
    PLAN_RUNNING,
    READY,
    TASK_STATES,
    WAITING,
    decode_plan,
)
from mesh.samples import GpuSample, HostSample, decode_sample
from mesh.settings import Settings

log = logging.getLogger(__name__)

MB = 1024 * 1024
SCRAPE_TIMEOUT_S = 5.0
QUEUED_STATES = (WAITING, READY)
PLAN_STATES = (PLAN_RUNNING, *sorted(PLAN_FINAL_STATES))
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))
TOKENS_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, float("inf"))
# finished tasks whose labels are kept for their run.finished still to come
KEEP_FINISHED = 10_000


class _SpecLabels(msgspec.Struct):
    cls: str = msgspec.field(default="cpu", name="class")
    kind: str = "shell"


class _TaskLabels(msgspec.Struct):
    """What the exporter reads of a task record: its status, class and kind (the rest of the
    record is skipped, not decoded)."""

    status: str
    spec: _SpecLabels


_labels_decoder = msgspec.json.Decoder(_TaskLabels)


@dataclass
class Snapshot:
    """What one scrape shows, built on the event loop."""

    gpus: list[GpuSample] = field(default_factory=list)
    hosts: list[HostSample] = field(default_factory=list)
    states: list[events.GpuState] = field(default_factory=list)
    tasks: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, class) -> count
    plans: dict[str, int] = field(default_factory=dict)
    alerts: dict[tuple[str, str], events.AlertRaised | events.AlertResolved] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def families(snap: Snapshot) -> list[GaugeMetricFamily]:
    """The gauges of one snapshot (pure: the tests and the collector share it)."""
    out: list[GaugeMetricFamily] = []
    gl = ["host", "gpu"]
    per_gpu: list[tuple[str, str, Any]] = [
        ("mesh_gpu_temperature_celsius", "GPU temperature", lambda g: g.temp_c),
        ("mesh_gpu_utilization_percent", "GPU utilisation (0-100)", lambda g: g.util_pct),
        (
            "mesh_gpu_memory_used_bytes",
            "GPU memory in use",
            lambda g: None if g.mem_used_mb is None else g.mem_used_mb * MB,
        ),
        (
            "mesh_gpu_memory_total_bytes",
            "GPU memory in all",
            lambda g: None if g.mem_total_mb is None else g.mem_total_mb * MB,
        ),
        ("mesh_gpu_power_watts", "GPU power draw", lambda g: g.power_w),
        ("mesh_gpu_power_limit_watts", "GPU power limit", lambda g: g.power_limit_w),
        ("mesh_gpu_power_cap_watts", "the power cap mesh holds the GPU at", lambda g: g.power_cap_w),
        ("mesh_gpu_sample_timestamp_seconds", "when the watchdog read the GPU", lambda g: g.at),
    ]
    for name, doc, get in per_gpu:
        fam = _gauge(name, doc, gl)
        for g in snap.gpus:
            value = get(g)
            if value is not None:
                fam.add_metric([g.host, g.gpu_id], float(value))
        out.append(fam)
    info = _gauge("mesh_gpu_info", "a GPU the watchdog sees (always 1)", [*gl, "index", "name"])
    throttled = _gauge("mesh_gpu_throttled", "1 while the GPU's clocks are held down", gl)
    for g in snap.gpus:
        info.add_metric([g.host, g.gpu_id, str(g.index), g.name], 1.0)
        throttled.add_metric([g.host, g.gpu_id], 1.0 if g.throttle_reasons else 0.0)
    out += [info, throttled]

    per_host: list[tuple[str, str, Any]] = [
        ("mesh_host_cpu_percent", "host CPU use (0-100)", lambda h: h.cpu_pct),
        ("mesh_host_load1", "host load average over 1 minute", lambda h: h.load1),
        ("mesh_host_memory_used_bytes", "host RAM in use", lambda h: h.ram_used_mb * MB),
        ("mesh_host_memory_total_bytes", "host RAM in all", lambda h: h.ram_total_mb * MB),
        (
            "mesh_host_disk_free_percent",
            "free space on the data directory's filesystem",
            lambda h: h.disk_free_pct,
        ),
    ]
    for name, doc, get in per_host:
        fam = _gauge(name, doc, ["host"])
        for h in snap.hosts:
            fam.add_metric([h.host], float(get(h)))
        out.append(fam)

    state = _gauge(
        "mesh_gpu_state", "1 for the state a GPU's worker reports, 0 for the others", [*gl, "state"]
    )
    running = _gauge("mesh_gpu_running_tasks", "tasks a GPU's worker runs now", gl)
    for st in snap.states:
        for name in events.GPU_STATES:
            state.add_metric([st.host, st.gpu, name], 1.0 if st.state == name else 0.0)
        if st.state not in events.GPU_STATES:
            state.add_metric([st.host, st.gpu, st.state], 1.0)
        running.add_metric([st.host, st.gpu], float(st.running))
    out += [state, running]

    tasks = _gauge("mesh_tasks", "tasks in the tasks bucket by state and class", ["state", "class"])
    queue = _gauge("mesh_queue_depth", "tasks waiting or ready (not yet running) per class", ["class"])
    classes = sorted({cls for _, cls in snap.tasks})
    for cls in classes:
        for st_name in TASK_STATES:
            tasks.add_metric([st_name, cls], float(snap.tasks.get((st_name, cls), 0)))
        queue.add_metric([cls], float(sum(snap.tasks.get((s, cls), 0) for s in QUEUED_STATES)))
    plans = _gauge("mesh_plans", "plans in the plans bucket by state", ["state"])
    for plan_state in sorted(set(PLAN_STATES) | set(snap.plans)):
        plans.add_metric([plan_state], float(snap.plans.get(plan_state, 0)))
    out += [tasks, queue, plans]

    firing = _gauge(
        "mesh_alert_firing",
        "1 while an alert is raised, 0 once resolved",
        ["rule", "target", "host", "severity"],
    )
    for (rule, target), ev in sorted(snap.alerts.items()):
        firing.add_metric(
            [rule, target, ev.host, ev.severity], 1.0 if isinstance(ev, events.AlertRaised) else 0.0
        )
    errors = _gauge("mesh_exporter_read_errors", "buckets the last scrape could not read", [])
    errors.add_metric([], float(len(snap.errors)))
    out += [firing, errors]
    return out


class _SnapshotCollector(Collector):
    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return families(self.exporter.snapshot_from_thread())


class Exporter(Agent):
    role = "exporter"

    def __init__(self, settings: Settings, agent_id: str | None = None) -> None:
        super().__init__(settings, agent_id)
        self.registry = CollectorRegistry()
        self.durations = Histogram(
            "mesh_task_duration_seconds",
            "how long a task's run took (run.finished events seen by this exporter)",
            ["class", "kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.runs = Counter(
            "mesh_runs",
            "runs finished (run.finished events seen by this exporter) by outcome",
            ["class", "kind", "outcome"],
            registry=self.registry,
        )
        self.tokens = Histogram(
            "mesh_prompt_tokens_per_second",
            "generation speed of prompt tasks (run.finished metrics tokens_per_s)",
            ["model"],
            buckets=TOKENS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(self))
        # key -> (class, kind) of a task released or running; plan id -> (status, counts by class
        # and state); (rule, target) -> the latest event
        self.tasks: dict[str, tuple[str, str]] = {}
        self.finished: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.plans: dict[str, tuple[str, dict[str, dict[str, int]]]] = {}
        self.alerts: dict[tuple[str, str], events.AlertRaised | events.AlertResolved] = {}
        # its follows of the buckets and events, on the connection of the latest `_subscribe`
        self._follows: Follows | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    # life -----------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        await self._subscribe()
        host, port = self.settings.metrics_host, self.settings.metrics_port
        self._server, self._server_thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("serving metrics on http://%s:%d/metrics", host, port)

    async def run(self) -> None:
        await self.stop_requested.wait()

    async def stop(self, reason: str = "stopped") -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        await self._unsubscribe()
        await super().stop(reason)

    async def on_reconnect(self) -> None:
        # the ordered consumers may have gone with the server: start over from the buckets and history
        self.spawn(self._subscribe(), "resubscribe")

    # following the buckets and events ---------------------------------------------------
    async def _unsubscribe(self) -> None:
        if self._follows is not None:
            await self._follows.close()

    async def _subscribe(self) -> None:
        await self._unsubscribe()
        self.tasks.clear()
        self.finished.clear()
        self.plans.clear()
        self.alerts.clear()
        n = self.names
        follows = self._follows = Follows(self.bus)
        for bucket, cb in ((n.tasks_bucket, self._on_task), (n.plans_bucket, self._on_plan)):
            await follows.bucket(bucket, cb)
        await follows.stream(
            n.run_events(kind="finished"), n.events_stream, self._on_run, api.DeliverPolicy.NEW
        )
        await follows.stream(n.alerts_all, n.events_stream, self._on_alert, api.DeliverPolicy.ALL)

    @staticmethod
    def _key(raw: NatsMsg, bucket: str) -> tuple[str, bool]:
        """The key a KV message is about, and whether it is gone (deleted, purged, expired)."""
        return raw.subject[len(kv_keys(bucket)) :], kv_gone(raw)

    async def _on_task(self, raw: NatsMsg) -> None:
        key, gone = self._key(raw, self.names.tasks_bucket)
        if gone:
            self.tasks.pop(key, None)
            return
        try:
            rec = _labels_decoder.decode(raw.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable task record %s: %s", key, exc)
            return
        if rec.status in INFLIGHT_STATES:
            self.tasks[key] = (rec.spec.cls, rec.spec.kind)
        elif key in self.tasks:
            # finished: its run.finished (another consumer) may not have come in yet, so the
            # last few thousand finished keep their labels a while
            self.finished[key] = self.tasks.pop(key)
            if len(self.finished) > KEEP_FINISHED:
                self.finished.popitem(last=False)

    async def _on_plan(self, raw: NatsMsg) -> None:
        key, gone = self._key(raw, self.names.plans_bucket)
        if gone:
            self.plans.pop(key, None)
            return
        try:
            plan = decode_plan(raw.data)
            self.plans[key] = (plan.status, plan.by_class)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable plan record %s: %s", key, exc)

    async def _on_run(self, raw: NatsMsg) -> None:
        try:
            ev = events.decode(raw.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # the auditor's business
        if not isinstance(ev, events.RunFinished) or ev.dead_letter:
            return
        key = f"{ev.plan_id}.{ev.task_id}"
        cls, kind = self.tasks.get(key) or self.finished.get(key) or ("unknown", "unknown")
        self.durations.labels(cls, kind).observe(max(ev.duration_s, 0.0))
        outcome = (
            "ok" if ev.ok else "timed_out" if ev.timed_out else "cancelled" if ev.cancelled else "failed"
        )
        self.runs.labels(cls, kind, outcome).inc()
        tps = ev.metrics.get("tokens_per_s")
        if ev.ok and tps:
            self.tokens.labels(ev.model or "unknown").observe(tps)

    async def _on_alert(self, raw: NatsMsg) -> None:
        try:
            ev = events.decode(raw.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        match ev:
            case events.AlertRaised() | events.AlertResolved():
                self.alerts[(ev.rule, ev.target)] = ev

    # scrapes ----------------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        snap = Snapshot()
        for name, get in (("telemetry", self.bus.telemetry_kv), ("gpus", self.bus.gpus_kv)):
            try:
                raw = await read_bucket(await get(), "*.*" if name == "telemetry" else ">")
            except (MeshError, TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                snap.errors.append(f"{name}: {exc}")
                continue
            for value in raw.values():
                try:
                    item: Any = decode_sample(value) if name == "telemetry" else events.decode(value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                match item:
                    case GpuSample():
                        snap.gpus.append(item)
                    case HostSample():
                        snap.hosts.append(item)
                    case events.GpuState() if item.index >= 0:
                        snap.states.append(item)
        snap.gpus.sort(key=lambda g: (g.host, g.index))
        snap.hosts.sort(key=lambda h: h.host)
        snap.states.sort(key=lambda s: s.gpu)
        tasks: Tally[tuple[str, str]] = Tally()
        for _, by_class in self.plans.values():
            for cls, counts in by_class.items():
                for status, n in counts.items():
                    tasks[(status, cls)] += n
        snap.tasks = dict(tasks)
        snap.plans = dict(Tally(status for status, _ in self.plans.values()))
        snap.alerts = dict(self.alerts)
        return snap

    def snapshot_from_thread(self) -> Snapshot:
        """A snapshot for the HTTP server's thread, built on the agent's loop."""
        if self._loop is None or self._loop.is_closed():
            return Snapshot(errors=["not running"])
        future = asyncio.run_coroutine_threadsafe(self.snapshot(), self._loop)
        try:
            return future.result(timeout=SCRAPE_TIMEOUT_S)
        except Exception as exc:  # a scrape must answer whatever happened
            future.cancel()
            log.warning("scrape failed: %r", exc)
            return Snapshot(errors=[repr(exc)])
