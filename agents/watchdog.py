"""The watchdog, one per host: samples the host's GPUs and the host itself, and raises alerts.

Every `watchdog_interval_s` it

1. reads each GPU (NVML, or the simulated set named by `simulated_gpus`) and the host
   (psutil), in a thread so a slow driver never stalls the event loop;
2. publishes each sample as a core NATS message on `<p>.tel.gpu.<host>.<index>` /
   `<p>.tel.host.<host>` (nothing stores these: a subscriber sees them live), and puts it in
   the telemetry bucket under `<host>.gpu<index>` / `<host>.host` (latest only), and stores
   them averaged per tier in the history stream (`agents.watchdog_history`);
3. feeds the samples, and the heartbeats of this host's agents, to the alert engine
   (`mesh.alerts`), publishes each change as `alert.raised` / `alert.resolved` on
   `<p>.evt.alert.<rule>.<kind>`, and hands it to the sinks (log, webhook, e-mail, notify-send;
   retried, then spooled). What the server does not take is spooled too, as sink `stream`,
   and published first when it answers again, by this run or the next.
4. holds each GPU at its power cap (`[gpus]`, `mesh gpu power`; agents/watchdog_power.py),
   setting it again after a driver reset.

On SIGHUP (`systemctl reload mesh-watchdog`) it reads its config again and applies alert
rules, thresholds, sinks, health checks and power caps live, or refuses a broken config and
keeps the old (agents/watchdog_reload.py).

Without NVML (no NVIDIA driver) it watches the host alone and says so once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
import psutil
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

from agents.watchdog_history import HistoryRecorder
from agents.watchdog_power import PowerControl
from agents.watchdog_reload import Reloading
from mesh.alerts import AlertEngine, Change, build_rules
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.read import iter_bucket, read_bucket
from mesh.bus.route import decode_checked
from mesh.events import (
    AgentStopped,
    AlertRaised,
    AlertResolved,
    GpuControl,
    GpuState,
    TaskFailed,
    TaskRetrying,
    decode,
    encode,
)
from mesh.health import HealthCheck, Tracker
from mesh.host.alertsinks import Sinks
from mesh.host.alertspool import Spool, for_stream, publish_spooled, spool_path
from mesh.host.health import probe, restart
from mesh.host.telemetry import GpuSource, host_token, open_source, sample_host
from mesh.names import HEADER_TYPE
from mesh.records import READY, UNREADABLE, WAITING, decode_agent, decode_plan, decode_task
from mesh.samples import GpuSample, HostSample, encode_sample
from mesh.settings import Settings
from mesh.status import FailReason

log = logging.getLogger("mesh.watchdog")

HOST_ONLY = "no NVIDIA GPU readable through NVML on this host: watching the host only"
# failures not of the task's own doing (a dependency failed, it was cancelled): not counted
NEVER_RAN = (FailReason.DEPENDENCY, FailReason.CANCELLED)


def busy_with_model(st: GpuState) -> bool:
    """A GPU whose worker runs work on a model it holds (an LLM answering, or a script task's
    model): such a GPU at 0% utilisation for minutes is stuck (rule gpu_stuck). A script task
    without a model may well use no GPU at all, so it does not count."""
    return st.running > 0 and (
        (st.state == "llm_busy" and bool(st.llm)) or (st.state == "script_busy" and bool(st.script_models))
    )


class Watchdog(Reloading):
    role = "watchdog"

    def __init__(
        self,
        settings: Settings,
        host: str | None = None,
        agent_id: str | None = None,
        loader: Callable[[], Settings] | None = None,
    ) -> None:
        super().__init__(settings, agent_id)
        # reads the settings again on SIGHUP (agents/watchdog_reload.py); None: no reload
        self.loader = loader
        self.tel_host = host_token(host)
        self.source: GpuSource | None = None
        self.engine = AlertEngine(
            build_rules(settings.alerts, settings.alert_hysteresis_c), settings.alert_xid_window_s
        )
        self.sinks = Sinks.from_settings(settings, self.tel_host)
        self._stopped: list[tuple[str, float]] = []
        # alerts raised or resolved and not yet in the stream, oldest first
        self.unsent: list[AlertRaised | AlertResolved] = []
        # where they wait on disk while the server is away (sink `stream`, beside the sinks');
        # an earlier run (or `mesh health`) may have left some: they go first
        self.stream_spool = Spool(spool_path(settings.data_dir))
        self._spooled_for_stream = True
        # the tick and each health check flush; one at a time, so each alert is sent once, in order
        self._flushing = asyncio.Lock()
        self._agents_read_at = 0.0
        self._failing: set[int] = set()
        # GPU id -> whether this watchdog paused it for heat (read back from KV at start)
        self.thermal_paused: dict[str, bool] = {}
        self.health = [Tracker(name, check) for name, check in sorted(settings.health.items())]
        self._mesh_read_at = 0.0
        # failed attempts seen since the last round (task key, when), and per class in the window
        self._failures_seen: list[tuple[str, float]] = []
        self._damaged_seen: set[tuple[str, str]] = set()
        self._failures: dict[str, collections.deque[float]] = {}
        self._health_raised: dict[tuple[str, str], float] = {}
        self.power = PowerControl(self, self.tel_host, lambda: self.source)

    async def start(self) -> None:
        await super().start()
        self.source = await asyncio.to_thread(open_source, self.tel_host, self.settings.simulated_gpus)
        if self.source is None:
            log.info(HOST_ONLY)
        else:
            log.info("watching %d GPU(s) on %s", await asyncio.to_thread(self.source.count), self.tel_host)
        psutil.cpu_percent(percpu=True)  # the first reading is since import: start the clock now
        self.history = HistoryRecorder(self.bus)
        # the server may go away at any time, now too: the watchdog must keep watching then, so
        # what it reads and follows of the mesh is retried meanwhile, not waited for
        try:
            await self._read_thermal()
        except TRANSIENT as exc:
            log.warning("reading the thermal pauses failed (%r); reading them again in the background", exc)
            self.spawn(self.retrying(self._read_thermal, "reading the thermal pauses"), "thermal")
        await self.bus.nc.subscribe(self.names.agent_stopped_all, cb=self._on_stopped)
        if self.settings.watchdog_mesh_rules:
            # from the start of the failure window, then live, with no gap between the two
            since = datetime.datetime.fromtimestamp(
                time.time() - self.settings.failure_window_s, tz=datetime.UTC
            )
            for kind in ("failed", "retrying"):
                follow = functools.partial(
                    self.bus.js.subscribe,
                    self.names.task_event("*", "*", kind),
                    stream=self.names.events_stream,
                    ordered_consumer=True,
                    config=api.ConsumerConfig(
                        deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=since
                    ),
                    cb=self._on_failure,
                )
                self.spawn(self.retrying(follow, f"following task.{kind}"), f"follow-{kind}")
        if self.health:
            self.spawn(self._health_loop(), "health")
        self.spawn(self._spool_loop(), "alert-spool")
        await self.power.start()

    async def _read_thermal(self) -> None:
        """This host's thermal pauses as a previous run left them (so a hot GPU stays paused)."""
        kv = await self.bus.gpu_control_kv()
        async for key, value in iter_bucket(kv, "*.thermal"):
            if not key.startswith(f"{self.tel_host}-gpu"):
                continue
            with contextlib.suppress(ValueError):
                match decode(value):
                    case GpuControl() as control:
                        self.thermal_paused[key.rsplit(".", 1)[0]] = control.paused

    async def _on_stopped(self, raw: NatsMsg) -> None:
        match decode_checked(raw, self.names)[0]:
            case AgentStopped() as msg:
                self._stopped.append((msg.agent_id, msg.at))

    async def run(self) -> None:
        interval = self.settings.watchdog_interval_s
        while not self.stop_requested.is_set():
            began = time.monotonic()
            await self.tick()
            remaining = max(0.05, interval - (time.monotonic() - began))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), remaining)

    async def stop(self, reason: str = "stopped") -> None:
        if getattr(self, "history", None) is not None:
            await self.history.close()
        if self.source is not None:
            self.source.close()
            self.source = None
        await super().stop(reason)

    # one round ---------------------------------------------------------------------------
    def read(self) -> tuple[list[GpuSample], HostSample]:
        """Every GPU and the host now (blocking: runs in a thread)."""
        gpus: list[GpuSample] = []
        source = self.source
        if source is not None:
            try:
                count = source.count()
            except Exception as exc:
                log.warning("cannot count GPUs: %r", exc)
                count = 0
            for index in range(count):
                try:
                    gpus.append(source.sample(index))
                    self._failing.discard(index)
                except Exception as exc:
                    if index not in self._failing:
                        log.warning("cannot read GPU %d: %r", index, exc)
                        self._failing.add(index)
        return gpus, sample_host(self.tel_host, self.settings.data_dir)

    async def tick(self) -> None:
        gpus, host = await asyncio.to_thread(self.read)
        gpus = self.power.marked(gpus)
        now = time.time()
        await self.publish_samples(gpus, host)
        changes: list[Change] = []
        for g in gpus:
            changes += self.engine.gpu(g, now)
        # (simulated GPUs make no GPU host: the CPU governor matters to real cards)
        changes += self.engine.host(host, now, gpu_host=any(not g.simulated for g in gpus))
        changes += await self.watch_agents(now)
        changes += await self.watch_mesh(gpus, now)
        await self.thermal(gpus, now)
        await self.power.enforce([g.index for g in gpus])
        for c in changes:
            ev = c.event()
            self.unsent.append(ev)
            self.spawn(self.sinks.deliver(ev), f"alert-{c.rule}")
        await self.flush_alerts()

    async def _health_loop(self) -> None:
        """Probe each configured health check when due; restart what stays unhealthy."""
        while True:
            now = time.time()
            for tracker in self.health:
                if tracker.due(now):
                    ok, detail = await self._probe(tracker.check)
                    for action in tracker.observe(ok, time.time(), detail):
                        await self._health_action(tracker, action, detail)
            await asyncio.sleep(0.2)

    async def _spool_loop(self) -> None:
        """Alerts no sink took (spooled by this or an earlier run, or by `mesh health`): tried
        again at start and every `alert_spool_retry_s`."""
        while True:
            try:
                await self.sinks.retry_spool()
            except OSError as exc:
                log.warning("retrying the alert spool failed: %r", exc)
            await asyncio.sleep(self.settings.alert_spool_retry_s)

    async def _probe(self, check: HealthCheck) -> tuple[bool, str]:
        if not check.agent:
            return await asyncio.to_thread(probe, check)
        try:
            entry = await (await self.bus.agents_kv()).get(check.agent)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False, f"agent {check.agent} is not registered (no heartbeat)"
        except TRANSIENT as exc:
            return False, f"cannot read the agents bucket: {exc!r}"
        return bool(entry.value), "registered"

    async def _health_action(self, tracker: Tracker, action: str, detail: str) -> None:
        check, name, now = tracker.check, tracker.name, time.time()
        what = check.target
        ev: AlertRaised | AlertResolved | None = None
        if action == "raise":
            ev = self._raise(
                "health", name, "warning", f"{what} unhealthy after {check.retries} checks: {detail}"
            )
        elif action == "loop":
            ev = self._raise(
                "restart_loop",
                name,
                "critical",
                f"{what}: {check.restart_max} restarts within {check.restart_window_s:g}s and still "
                "unhealthy; not restarting it again until that window has passed",
            )
        elif action == "resolve":
            for rule in ("health", "restart_loop"):
                raised_at = self._health_raised.pop((rule, name), None)
                if raised_at is not None:
                    self._resolve(rule, name, raised_at, "health", f"{what} healthy again ({detail})", now)
        elif action == "restart":
            argv = check.restart_argv()
            worked, said = await asyncio.to_thread(restart, argv)
            if worked:
                log.warning("restarted %s (%s): %s", name, what, said)
            else:
                log.error("restarting %s failed: %s", name, said)
        if ev is not None:
            self._queue_alert(ev)
        await self.flush_alerts()

    def _raise(self, rule: str, target: str, severity: str, message: str) -> AlertRaised:
        now = time.time()
        self._health_raised[(rule, target)] = now
        return AlertRaised(
            rule=rule,
            target=target,
            host=self.tel_host,
            severity=severity,
            at=now,
            metric="health",
            message=message,
        )

    def _queue_alert(self, ev: AlertRaised | AlertResolved) -> None:
        self.unsent.append(ev)
        self.spawn(self.sinks.deliver(ev), f"alert-{ev.rule}")

    async def _on_failure(self, raw: NatsMsg) -> None:
        match decode_checked(raw, self.names)[0]:
            case TaskFailed() | TaskRetrying() as msg if msg.reason not in NEVER_RAN:
                self._failures_seen.append((f"{msg.plan_id}.{msg.task_id}", msg.at))

    async def watch_mesh(self, gpus: list[GpuSample], now: float) -> list[Change]:
        """The rules over the mesh's state, read at most every `agent_refresh_s`: GPU memory held
        on this host's idle GPUs; queue depth and failures per class (with watchdog_mesh_rules)."""
        if now - self._mesh_read_at < self.settings.agent_refresh_s:
            return []
        self._mesh_read_at = now
        changes: list[Change] = []
        try:
            states = await read_bucket(await self.bus.gpus_kv())
            idle: set[str] = set()
            busy: set[str] = set()
            for value in states.values():
                with contextlib.suppress(ValueError):
                    match decode(value):
                        case GpuState(state="idle") as st if not st.llm and not st.script_models:
                            idle.add(st.gpu)
                            # a set's worker reports the set; the samples are of its cards
                            idle.update(f"{st.host}-gpu{i}" for i in st.indices)
                        case GpuState() as st if busy_with_model(st):
                            busy.add(st.gpu)
                            busy.update(f"{st.host}-gpu{i}" for i in st.indices)
            for g in gpus:
                held = float(g.mem_used_mb or 0) if g.gpu_id in idle else 0.0
                changes += self.engine.mesh({"idle_gpu_mem_mb": held}, g.gpu_id, self.tel_host, now)
                changes += self.engine.stuck(g, g.gpu_id in busy, now)
            if self.settings.watchdog_mesh_rules:
                changes += await self._queue_and_failures(now)
        except TRANSIENT as exc:
            log.warning("reading the mesh's state failed: %r", exc)
        return changes

    async def _queue_and_failures(self, now: float) -> list[Change]:
        depth = 0
        for key, value in (await read_bucket(await self.bus.plans_kv())).items():
            try:
                plan = decode_plan(value)
            except UNREADABLE as exc:
                self._unreadable(self.names.plans_bucket, key, exc)
                continue
            if not plan.final:
                depth += plan.counts.get(WAITING, 0) + plan.counts.get(READY, 0)
        changes = self.engine.mesh({"queue_depth": float(depth)}, "queue", self.tel_host, now)
        seen, self._failures_seen = self._failures_seen, []
        if seen:
            kv = await self.bus.tasks_kv()
            for key, at in seen:
                try:
                    rec = decode_task((await kv.get(key)).value or b"")
                except nats.js.errors.KeyNotFoundError:
                    continue
                except UNREADABLE as exc:
                    self._unreadable(self.names.tasks_bucket, key, exc)
                    continue
                self._failures.setdefault(rec.spec.cls, collections.deque()).append(at)
        window = self.settings.failure_window_s
        for cls, times in sorted(self._failures.items()):
            while times and now - times[0] > window:
                times.popleft()
            changes += self.engine.mesh(
                {"class_failures": float(len(times))}, f"class-{cls}", self.tel_host, now
            )
        return changes

    def _unreadable(self, bucket: str, key: str, exc: Exception) -> None:
        """A damaged record is left out of what the watchdog counts; said once per key."""
        if (bucket, key) not in self._damaged_seen:
            self._damaged_seen.add((bucket, key))
            log.warning("%s %s is unreadable (%s); not counted", bucket, key, exc)

    async def thermal(self, gpus: list[GpuSample], now: float) -> None:
        """Pause a GPU at or above thermal_pause_c (its worker stops claiming work) and resume it
        below thermal_resume_c; the gap keeps it from flapping. Both are `gpu.control` events."""
        pause_c, resume_c = self.settings.thermal_pause_c, self.settings.thermal_resume_c
        for g in gpus:
            if g.temp_c is None:
                continue
            paused = self.thermal_paused.get(g.gpu_id, False)
            if not paused and g.temp_c >= pause_c:
                why = f"{g.temp_c:.0f} °C >= {pause_c:g} °C; resumes below {resume_c:g} °C"
            elif paused and g.temp_c < resume_c:
                why = f"{g.temp_c:.0f} °C < {resume_c:g} °C"
            else:
                continue
            control = GpuControl(
                gpu=g.gpu_id, source="thermal", at=now, paused=not paused, reason=why, by=self.agent_id
            )
            try:
                await self.bus.emit(control)
                kv = await self.bus.gpu_control_kv()
                await kv.put(self.names.gpu_control_key(g.gpu_id, "thermal"), encode(control))
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning(
                        "could not %s %s (%s); next round", "pause" if not paused else "resume", g.gpu_id, exc
                    )
                continue
            self.thermal_paused[g.gpu_id] = not paused
            log.warning("%s %s: %s", "paused" if not paused else "resumed", g.gpu_id, why)

    async def publish_samples(self, gpus: list[GpuSample], host: HostSample) -> None:
        n = self.names
        bucket = n.telemetry_bucket
        puts: list[tuple[str, str, bytes]] = []
        try:
            for g in gpus:
                data = encode_sample(g)
                await self.bus.nc.publish(n.tel_gpu(g.host, g.index), data, headers={HEADER_TYPE: "tel.gpu"})
                puts.append((bucket, n.telemetry_gpu_key(g.host, g.index), data))
            data = encode_sample(host)
            await self.bus.nc.publish(n.tel_host(host.host), data, headers={HEADER_TYPE: "tel.host"})
            puts.append((bucket, n.telemetry_host_key(host.host), data))
            await self.bus.kv_put_many(puts)
        except TRANSIENT as exc:
            log.warning("publishing telemetry failed: %r", exc)
        await self.history.record([*gpus, host])

    async def watch_agents(self, now: float) -> list[Change]:
        """Heartbeats of this host's agents (read at most every `agent_refresh_s`), and the
        clean stops seen since the last round."""
        changes: list[Change] = []
        stopped, self._stopped = self._stopped, []
        for agent_id, _ in stopped:
            changes += self.engine.forget_agent(agent_id, now)
        if now - self._agents_read_at < self.settings.agent_refresh_s:
            return changes
        try:
            raw = await read_bucket(await self.bus.agents_kv())
        except TRANSIENT as exc:
            # no reading is no evidence: heartbeats are judged only on a successful read
            log.warning("reading the agents bucket failed: %r", exc)
            return changes
        self._agents_read_at = now
        gone = {a for a, _ in stopped}
        seen: dict[str, float] = {}
        for agent_id, value in raw.items():
            try:
                rec = decode_agent(value)
            except ValueError:
                continue
            if rec.host != self.host or agent_id == self.agent_id or agent_id in gone:
                continue
            seen[agent_id] = rec.seen_at
        changes += self.engine.agents(seen, self.tel_host, now)
        return changes

    async def flush_alerts(self) -> None:
        """Publish the alerts not yet in the stream, in order: those spooled for it first (by an
        earlier flush, run or `mesh health`), then this run's. What the server does not take is
        spooled, and tried next round (its `Nats-Msg-Id` keeps a retried one from being stored
        twice). The tick and the health checks flush concurrently: one flush runs at a time."""
        async with self._flushing:
            if self._spooled_for_stream:
                try:
                    _, left = await publish_spooled(self.stream_spool, self.bus.emit, TRANSIENT)
                except OSError as exc:
                    # this round's alerts still go out; the spool is read again next round
                    log.warning("reading the alert spool %s failed: %r", self.stream_spool.path, exc)
                    left = 0
                else:
                    self._spooled_for_stream = left > 0
                if left:
                    await self._spool_unsent("older alerts are still waiting for the server")
                    return
            while self.unsent:
                try:
                    await self.bus.emit(self.unsent[0])
                except TRANSIENT as exc:
                    if not self.bus.store.full:  # (the bus said that once)
                        log.warning("publishing an alert failed (%r): %d kept", exc, len(self.unsent))
                    await self._spool_unsent(repr(exc))
                    return
                self.unsent.pop(0)

    async def _spool_unsent(self, why: str) -> None:
        """Keep the alerts not yet in the stream on disk, after those kept already (a watchdog
        killed while the server is away loses none); in memory still where the disk refuses."""
        kept = 0
        try:
            for ev in self.unsent:
                await asyncio.to_thread(self.stream_spool.add, for_stream(ev, why))
                kept += 1
        except OSError as exc:
            log.error(
                "%d alert(s) for the event stream cannot be spooled in %s (%r): kept in memory only",
                len(self.unsent) - kept,
                self.stream_spool.path,
                exc,
            )
        del self.unsent[:kept]
        self._spooled_for_stream = self._spooled_for_stream or kept > 0
