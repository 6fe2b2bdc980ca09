"""A worker: claims work items of its classes and runs them, `slots` at a time.

For each item: check the task record (skip work the brain no longer wants),
report `run.started`, run the body while telling JetStream it is still in
progress (so it is never redelivered to a second worker while this one lives),
report `run.finished`, then acknowledge. A worker that dies stops sending
progress, and the item is redelivered once `ack_wait` lapses.

`run.started` of a first delivery is held back `start_report_after_s` (20 ms): a
task that ends sooner reports its start in `run.finished` (`started_at`) instead,
and the brain records both transitions from that one report. Half the reports
and half the brain's commits for short tasks, and a dependent's release no
longer waits behind the commit of its predecessor's start.

On stop it takes no new work, lets running tasks finish for up to
`drain_timeout_s` while still registered, then kills what is left and hands it
back (`nak`) so another worker runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext

from agents.base import Agent
from mesh import placement as gs
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.outputs import OutputError, task_output
from mesh.bus.resources import llm_consumer_definition, own_consumer_definition
from mesh.bus.route import decode_checked
from mesh.errors import ConfigError
from mesh.events import (
    MODEL_BODY_KINDS,
    GpuControl,
    GpuState,
    ResourceItem,
    RunFinished,
    RunStarted,
    TaskCancelled,
    WorkItem,
    decode,
    encode,
    type_of,
)
from mesh.host.executors import EXECUTORS, RunContext, RunResult
from mesh.host.gpu import Device, Memory, open_device
from mesh.host.reaper import Reaper
from mesh.host.telemetry import host_token
from mesh.models import ModelError, ModelSpec
from mesh.records import INFLIGHT_STATES, RUNNING, UNREADABLE, decode_task
from mesh.settings import Settings
from mesh.status import FailReason

log = logging.getLogger("mesh.worker")

CANCELLED_MEMORY = 100_000
FRESH_S = 2.0
# an item whose task has no record yet is offered again after this long
LATER_S = 2.0


MODEL_CLASSES = ("script", "llm")
# a resource task older than this was meant for an earlier state of the mesh: not acted on
RESOURCE_STALE_S = 600.0


RESOURCE_SAMPLE_S = 0.5


class ResourceUse:
    """GPU readings taken while one task ran."""

    def __init__(self) -> None:
        self.samples = 0
        self.peak_mb = 0
        self.util_sum = 0.0
        self.util_n = 0

    def add(self, used_mb: int, util: float | None) -> None:
        self.samples += 1
        self.peak_mb = max(self.peak_mb, used_mb)
        if util is not None:
            self.util_sum += util
            self.util_n += 1

    def metrics(self) -> dict[str, float]:
        out = {"gpu_mem_peak_mb": float(self.peak_mb), "gpu_samples": float(self.samples)}
        if self.util_n:
            out["gpu_util_mean_pct"] = round(self.util_sum / self.util_n, 1)
        return out


class Running:
    def __init__(self, item: WorkItem, raw: NatsMsg) -> None:
        self.item = item
        self.raw = raw
        self.ctx = RunContext()
        self.handed_back = False


class StartReport:
    """A `run.started` held back a moment; `settle` says whether it went out (or is going
    out: then it waits for it, so the start is stored before the end). A timer, not a task,
    until it is due: most short tasks end first, and cancelling a timer costs nothing."""

    def __init__(
        self, send: Callable[[RunStarted], Coroutine[Any, Any, None]], ev: RunStarted, after_s: float
    ) -> None:
        self.send = send
        self.ev = ev
        self.after_s = after_s
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        if self.after_s <= 0:
            await self.send(self.ev)
        else:
            self.timer = asyncio.get_running_loop().call_later(self.after_s, self._due)

    def _due(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.send(self.ev))

    async def settle(self) -> bool:
        if self.timer is None:
            return True  # sent at once
        if self.task is None:
            self.timer.cancel()
            return False
        await self.task
        return True


class Lane:
    """One queue this worker takes work from, with its own number of slots."""

    def __init__(self, name: str, sub: JetStreamContext.PullSubscription, slots: int) -> None:
        self.name = name
        self.sub = sub
        self.slots = slots
        self.running = 0
        self.enabled = True
        self.closed = False
        self.changed = asyncio.Event()
        self.loop: asyncio.Task[Any] | None = None
        # a fetch is in flight: what it returns is run even if the lane was disabled meanwhile
        self.fetching = False

    def wake(self) -> None:
        self.changed.set()

    async def until_idle(self) -> None:
        """Until the lane runs nothing, and no fetch in flight can still hand it work."""
        while self.running or self.fetching:
            self.changed.clear()
            await self.changed.wait()


class Worker(Agent):
    role = "worker"

    def __init__(
        self,
        settings: Settings,
        agent_id: str | None = None,
        classes: tuple[str, ...] = ("cpu",),
        slots: int | None = None,
        drain_timeout_s: float = 30.0,
        gpu: int | None = None,
        memory_mb: int = 0,
    ) -> None:
        if agent_id is None and gpu is not None:
            # a GPU's worker keeps its name across restarts: its own queue waits for it
            agent_id = f"worker-{host_token()}-gpu{gpu}"
            if settings.agent_id and settings.agent_id != agent_id:
                raise ConfigError(
                    f"agent_id is {settings.agent_id!r}, but the worker of GPU {gpu} on this host is "
                    f"{agent_id!r}: a GPU worker's id names its host and GPU. Use the config file "
                    f"`mesh init --secure --worker {agent_id}` writes for it"
                )
        super().__init__(settings, agent_id)
        self.classes = list(classes)
        self.slots = slots or settings.slots
        self.drain_timeout_s = drain_timeout_s
        self.running: dict[str, Running] = {}
        self._slot_tasks: set[asyncio.Task[Any]] = set()
        self.lanes: dict[str, Lane] = {}
        # tasks recently cancelled (insertion-ordered, bounded): their queued items are not run
        self.cancelled: dict[str, None] = {}
        # task key -> attempt, of what finished here recently (bounded): never run twice here
        self.finished: dict[str, int] = {}
        # models: a worker of class script or llm owns a GPU (or the CPU standing in for one)
        self.gpu_index = gpu
        self.memory_mb = memory_mb or (0 if gpu is not None else settings.cpu_model_memory_mb)
        self.models_on = any(c in MODEL_CLASSES for c in self.classes)
        self.gpu_id = f"{host_token()}-gpu{gpu}" if gpu is not None else self.agent_id
        self.device: Device | None = None
        self.registry: dict[str, ModelSpec] = settings.model_registry()
        self.llm: Any = None  # mesh.host.loaders.Loaded
        self.llm_name = ""
        self.script_models: dict[str, Any] = {}
        self.booting = ""  # gs.BOOTING_LLM / gs.BOOTING_SCRIPT while a load runs
        # '' until the first report: a report with no previous state says the worker (re)started
        self.gpu_state = ""
        self.gpu_since = time.time()
        self.gpu_rid = ""
        self.gpu_error = ""
        self._gpu_outbox: list[tuple[GpuState, bool]] = []
        # this GPU's control keys by source ('thermal', 'operator')
        self.controls: dict[str, GpuControl] = {}
        self._mem: Memory | None = None
        self._gpu_flush_lock = asyncio.Lock()
        self._gpu_changed = asyncio.Event()
        self._model_lock = asyncio.Lock()
        # task records found unreadable (each said once)
        self.damaged_seen: set[str] = set()

    def running_keys(self) -> list[str]:
        return sorted(self.running)

    async def start(self) -> None:
        self.reaper = Reaper()
        if self.models_on:
            self.device = await asyncio.to_thread(
                open_device, self.gpu_index, self.memory_mb, self.settings.simulated_gpus
            )
            await self._read_memory()
        await super().start()
        for cls in self.classes:
            if cls == "llm":
                continue  # taken from a per-model queue while this GPU holds the model
            sub = await self.bus.js.pull_subscribe_bind(
                durable=self.names.workers_consumer(cls), stream=self.names.work_stream
            )
            slots = self.settings.script_slots if cls == "script" else self.slots
            self.lanes[cls] = Lane(cls, sub, slots)
        if self.models_on:
            own = await self.bus.bind_consumer(own_consumer_definition(self.settings, self.gpu_worker_id))
            self.lanes["own"] = Lane("own", own, 1)
            # a paused or cordoned GPU's worker must not claim work in its first moments either
            await self._load_controls()
            self._update_lanes()
            self._publish_state(force=True)
            self.spawn(self._gpu_publisher(), "gpu-state")
            self.spawn(self._control_loop(), "gpu-control")
        self._cancel_sub = await self.bus.nc.subscribe(self.names.task_cancelled_all, cb=self._on_cancel)

    def bound_consumers(self) -> tuple[str, ...]:
        return tuple(self.names.workers_consumer(c) for c in self.classes if c != "llm")

    @property
    def gpu_worker_id(self) -> str:
        return self.agent_id

    async def _on_cancel(self, raw: NatsMsg) -> None:
        msg, _ = decode_checked(raw, self.names)
        if not isinstance(msg, TaskCancelled):
            return  # the brain dead-letters bad messages; a core subscriber only listens
        key = f"{msg.plan_id}.{msg.task_id}"
        self.cancelled[key] = None
        while len(self.cancelled) > CANCELLED_MEMORY:
            del self.cancelled[next(iter(self.cancelled))]
        run = self.running.get(key)
        if run is not None:
            log.info("cancelling %s.%s", msg.plan_id, msg.task_id)
            run.ctx.cancel.set()

    # the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        for lane in list(self.lanes.values()):
            self._start_lane(lane)
        self._update_lanes()
        await self.stop_requested.wait()
        for lane in list(self.lanes.values()):
            lane.wake()
        loops = [lane.loop for lane in self.lanes.values() if lane.loop is not None]
        if loops:
            await asyncio.wait(loops, timeout=self.settings.fetch_timeout_s + 5)
        await self._drain()

    def _start_lane(self, lane: Lane) -> None:
        lane.loop = asyncio.get_running_loop().create_task(self._lane_loop(lane), name=f"lane-{lane.name}")

    async def _lane_loop(self, lane: Lane) -> None:
        while not self.stop_requested.is_set() and not lane.closed:
            free = lane.slots - lane.running
            if free <= 0 or not lane.enabled:
                lane.changed.clear()
                await self._wait_any(lane.changed.wait())
                continue
            lane.fetching = True
            try:
                msgs = await lane.sub.fetch(free, timeout=self.settings.fetch_timeout_s)
            except nats.errors.TimeoutError:
                continue
            except TRANSIENT as exc:
                if lane.closed:
                    return
                if not self.bus.store.full:  # (a full store also fails fetches; said once)
                    log.warning("fetching %s work failed (%r); retrying", lane.name, exc)
                await self._wait_any(asyncio.sleep(0.5))
                continue
            finally:
                # (the fetched items are counted in `running` below, before anything else runs)
                lane.fetching = False
                lane.wake()
            if lane.name != "own" and self.hold_reason():
                # paused while this fetch was in flight: hand the work back for another GPU
                for raw in msgs:
                    with contextlib.suppress(*TRANSIENT):
                        await raw.nak()
                continue
            for raw in msgs:
                lane.running += 1
                task = asyncio.get_running_loop().create_task(self._take(raw, lane))
                self._slot_tasks.add(task)
                task.add_done_callback(lambda t, ln=lane: self._slot_done(t, ln))  # type: ignore[misc]
            self._publish_state()

    async def _wait_any(self, aw: Any) -> None:
        waiter = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()

    def _slot_done(self, task: asyncio.Task[Any], lane: Lane) -> None:
        self._slot_tasks.discard(task)
        lane.running -= 1
        lane.wake()
        self._publish_state()
        if not task.cancelled() and task.exception() is not None:
            log.error("a slot failed: %r", task.exception(), exc_info=task.exception())

    async def stop(self, reason: str = "stopped") -> None:
        if self.models_on and self._bus is not None:
            self.gpu_state_override = gs.OFFLINE
            self._publish_state(force=True)
            with contextlib.suppress(*TRANSIENT):
                await asyncio.wait_for(self._flush_gpu_states(), timeout=5)
        for name in list(self.script_models):
            self.script_models.pop(name).close()
        if self.llm is not None:
            self.llm.close()
            self.llm = None
        if self.device is not None:
            self.device.close()
        await super().stop(reason)
        reaper = getattr(self, "reaper", None)
        if reaper is not None:
            reaper.close()

    async def _drain(self) -> None:
        if not self._slot_tasks:
            return
        log.info(
            "stopping: waiting up to %.0fs for %d running task(s)", self.drain_timeout_s, len(self.running)
        )
        _, pending = await asyncio.wait(set(self._slot_tasks), timeout=self.drain_timeout_s)
        if pending:
            for run in self.running.values():
                run.handed_back = True
                run.ctx.cancel.set()
            await asyncio.wait(pending)

    # the GPU's state ---------------------------------------------------------------------
    gpu_state_override = ""

    def _derive_state(self) -> str:
        if self.gpu_state_override:
            return self.gpu_state_override
        if self.hold_reason():
            return gs.PAUSED
        if self.booting:
            return self.booting
        llm = self.lanes.get("llm")
        if self.llm is not None:
            return gs.LLM_BUSY if llm is not None and llm.running else gs.LLM_READY
        script = self.lanes.get("script")
        if script is not None and script.running:
            return gs.SCRIPT_BUSY
        return gs.IDLE

    def _update_lanes(self) -> None:
        """Script work runs only where no LLM is loaded or loading (it would not fit beside it);
        a paused or cordoned GPU's worker claims nothing (what runs finishes)."""
        held = bool(self.hold_reason())
        for name, lane in self.lanes.items():
            if name == "own":
                continue
            enabled = not held
            if name == "script":
                enabled = enabled and (
                    self.llm is None and self.booting != gs.BOOTING_LLM and not self._model_lock.locked()
                )
            if enabled != lane.enabled:
                lane.enabled = enabled
                lane.wake()

    def hold_reason(self) -> str:
        """Why this GPU takes no work now ('' when it does): a thermal or an operator's pause, or
        a cordon."""
        reasons = [
            f"{c.source} {'cordon' if c.cordoned else 'pause'}: {c.reason}".rstrip(": ")
            for c in self.controls.values()
            if c.paused or c.cordoned
        ]
        return "; ".join(sorted(reasons))

    async def _load_controls(self) -> None:
        kv = await self.bus.gpu_control_kv()
        for source in ("thermal", "operator"):
            try:
                entry = await kv.get(self.names.gpu_control_key(self.gpu_id, source))
                control = decode(entry.value or b"")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("ignoring an unreadable %s control value for %s", source, self.gpu_id)
                continue
            if isinstance(control, GpuControl) and (control.gpu, control.source) == (self.gpu_id, source):
                self.controls[source] = control

    async def _control_loop(self) -> None:
        """Follow this GPU's keys in the control bucket: pause, resume, cordon."""
        kv = await self.bus.gpu_control_kv()
        while True:
            try:
                watcher = await kv.watch(f"{self.gpu_id}.*")
                async for entry in watcher:
                    if entry is None:
                        continue  # the end of the initial values
                    source = entry.key.rsplit(".", 1)[-1]
                    try:
                        control = decode(entry.value) if entry.value else None
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("ignoring an unreadable control value for %s", entry.key)
                        continue
                    before = self.hold_reason()
                    if isinstance(control, GpuControl) and (control.gpu, control.source) == (
                        self.gpu_id,
                        source,
                    ):
                        self.controls[source] = control
                    else:
                        self.controls.pop(source, None)
                    after = self.hold_reason()
                    if after != before:
                        log.info("%s: %s", self.gpu_id, f"holding: {after}" if after else "taking work again")
                        self._update_lanes()
                        self._publish_state(force=True)
            except TRANSIENT as exc:
                log.warning("watching the GPU's control keys failed (%s); again in 1s", exc)
                await asyncio.sleep(1.0)

    def _reserved_mb(self) -> int:
        return sum(m.spec.vram_mb for m in self.script_models.values())

    def _mesh_used_mb(self) -> int:
        return self._reserved_mb() + (self.llm.spec.vram_mb if self.llm is not None else 0)

    def _publish_state(
        self, force: bool = False, error: str = "", rid: str = "", refresh: bool = False
    ) -> None:
        if not self.models_on:
            return
        state = self._derive_state()
        if state == self.gpu_state and not (force or error or rid or refresh):
            return
        now = time.time()
        device = self.device
        mem = self._memory()
        ev = GpuState(
            gpu=self.gpu_id,
            worker=self.agent_id,
            host=self.host,
            state=state,
            at=now,
            previous=self.gpu_state,
            took_s=round(now - self.gpu_since, 3),
            index=self.gpu_index if self.gpu_index is not None else -1,
            name=device.name if device is not None else "",
            device=device.kind if device is not None else "cpu",
            llm=self.llm_name if self.llm is not None else "",
            script_models=tuple(sorted(self.script_models)),
            vram_total_mb=mem.total_mb if mem else 0,
            vram_used_mb=mem.used_mb if mem else 0,
            vram_reserved_mb=self._reserved_mb(),
            llm_slots=self.settings.llm_slots,
            script_slots=self.settings.script_slots,
            running=len(self.running),
            rid=rid,
            error=error,
            hold=self.hold_reason(),
        )
        # a change (or an answer to the brain) is an event; a fresh reading only updates KV
        event = state != self.gpu_state or bool(error or rid) or force
        if state != self.gpu_state:
            self.gpu_since = now
        self.gpu_state = state
        self._gpu_outbox.append((ev, event))
        self._gpu_changed.set()

    async def _flush_gpu_states(self) -> None:
        async with self._gpu_flush_lock:
            while self._gpu_outbox:
                ev, event = self._gpu_outbox[0]
                if event:
                    await self.bus.emit(ev)
                kv = await self.bus.gpus_kv()
                await kv.put(self.gpu_id, encode(ev))
                self._gpu_outbox.pop(0)

    async def _gpu_publisher(self) -> None:
        """Publish GPU states in order, riding out a server restart; refresh the reading now and then."""
        while True:
            try:
                # not wait_for: on Python 3.11 it swallows a cancel that lands as the event is set
                # (stop() sets it with the last state), and this loop would never end
                async with asyncio.timeout(self.settings.agent_refresh_s):
                    await self._gpu_changed.wait()
            except TimeoutError:
                await self._read_memory()
                self._publish_state(refresh=True)
            self._gpu_changed.clear()
            try:
                await self._flush_gpu_states()
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("publishing the GPU state failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                self._gpu_changed.set()

    # models --------------------------------------------------------------------------------
    async def _load(self, name: str, spec: ModelSpec) -> Any:
        from mesh.host.loaders import load_model

        device = "cpu" if spec.device == "cpu" or self.device is None else self.device.kind
        return await asyncio.to_thread(load_model, name, spec, device)

    def _memory(self) -> Memory | None:
        """The device's memory as last read. A GPU is read through NVML in a thread, never on the
        event loop: a driver call that waits on a CUDA initialisation in another thread must not
        stop this worker's heartbeats."""
        if self.device is None:
            return None
        if self.device.kind == "cpu" or self._mem is None:
            return self.device.memory(self._mesh_used_mb())
        return self._mem

    async def _read_memory(self, mesh_used_mb: int | None = None) -> None:
        if self.device is not None and self.device.kind != "cpu":
            used = self._mesh_used_mb() if mesh_used_mb is None else mesh_used_mb
            self._mem = await asyncio.to_thread(self.device.memory, used)

    async def _free_mb(self) -> int:
        await self._read_memory()
        mem = self._memory()
        assert mem is not None
        return mem.total_mb - mem.used_mb

    async def _resource(self, item: ResourceItem) -> None:
        """Load or unload the LLM as the brain asked. A refusal or failure is reported, not raised."""
        if time.time() - item.at > RESOURCE_STALE_S:
            log.info(
                "ignoring a stale %s of %s (asked %.0fs ago)", item.action, item.model, time.time() - item.at
            )
            self._publish_state(force=True, rid=item.rid)
            return
        try:
            await self._resource_locked(item)
        finally:
            # whatever happened, script work may run again if no LLM is left
            self._update_lanes()

    async def _resource_locked(self, item: ResourceItem) -> None:
        async with self._model_lock:
            self._update_lanes()
            if item.action == "unload":
                await self._unload_llm()
                self._publish_state(force=True, rid=item.rid)
                return
            if self.llm is not None and self.llm_name == item.model:
                self._publish_state(force=True, rid=item.rid)
                return
            spec = self.registry.get(item.model)
            if spec is None or spec.kind != "llm":
                self._publish_state(
                    force=True, rid=item.rid, error=f"load refused: {item.model!r} is not an llm model here"
                )
                return
            await self._unload_llm()
            await self._wait_lane_idle("script")
            for name in list(self.script_models):
                self.script_models.pop(name).close()
            free = await self._free_mb()
            if spec.vram_mb > free:
                why = f"load of {item.model} refused: it needs {spec.vram_mb} MB and {free} MB are free"
                log.warning("%s", why)
                self._publish_state(force=True, rid=item.rid, error=why)
                return
            self.booting = gs.BOOTING_LLM
            self._publish_state(rid=item.rid)
            began = time.monotonic()
            try:
                loaded = await self._load(item.model, spec)
            except (ModelError, OSError, RuntimeError, ValueError) as exc:
                self.booting = ""
                log.error("loading %s failed: %s", item.model, exc)
                self._publish_state(force=True, rid=item.rid, error=f"load of {item.model} failed: {exc}")
                return
            self.booting = ""
            self.llm, self.llm_name = loaded, item.model
            log.info("loaded %s in %.1fs", item.model, time.monotonic() - began)
            sub = await self.bus.bind_consumer(llm_consumer_definition(self.settings, item.model))
            lane = self.lanes["llm"] = Lane("llm", sub, self.settings.llm_slots)
            self._start_lane(lane)
            await self._read_memory()
            self._publish_state(rid=item.rid)

    async def _wait_lane_idle(self, name: str) -> None:
        lane = self.lanes.get(name)
        if lane is not None:
            await lane.until_idle()

    async def _unload_llm(self) -> None:
        lane = self.lanes.pop("llm", None)
        if lane is not None:
            lane.closed = True
            lane.wake()
            if lane.loop is not None:
                # first its fetch in flight, which may still start a task, then that task
                await asyncio.wait({lane.loop}, timeout=self.settings.fetch_timeout_s + 5)
            await lane.until_idle()
            with contextlib.suppress(*TRANSIENT):
                await lane.sub.unsubscribe()
        if self.llm is not None:
            # the LLM is gone for the GPU's state only once it is closed and the memory read
            # without it, with no wait after: a state reported while it closed (the publisher's
            # refresh) said `idle` without the unload's rid, and the unload's own answer then
            # came as idle -> idle (seen on a busy machine, where closing takes longer)
            loaded = self.llm
            await asyncio.to_thread(loaded.close)
            log.info("unloaded %s", loaded.name)
            await self._read_memory(self._reserved_mb())
            self.llm, self.llm_name = None, ""

    async def _script_model(self, name: str) -> Any:
        """A script model, loaded on first use (seconds) and kept while no LLM needs the room."""
        loaded = self.script_models.get(name)
        if loaded is not None:
            return loaded
        spec = self.registry.get(name)
        if spec is None:
            raise ModelError(f"model {name!r} is not in this worker's registry; add it under [models]")
        self.booting = gs.BOOTING_SCRIPT
        self._publish_state()
        try:
            loaded = await self._load(name, spec)
        finally:
            self.booting = ""
        self.script_models[name] = loaded
        await self._read_memory()
        self._publish_state(force=True)
        return loaded

    async def _inputs(self, item: WorkItem, ctx: RunContext) -> dict[str, str]:
        """The outputs of the dependencies the task takes, from their completion events (a
        worker's report, or Claude's answer for an escalated task)."""
        out: dict[str, str] = {}
        for dep in item.inputs:
            try:
                found = await task_output(self.bus, item.plan_id, dep)
            except OutputError as exc:
                raise ModelError(f"input {exc}") from exc
            if found.sensitive:
                # what reads a secret is kept out of the history like the secret itself
                ctx.sensitive = True
            out[dep] = found.text
        return out

    # one item --------------------------------------------------------------------------
    async def _take(self, raw: NatsMsg, lane: Lane) -> None:
        msg, why = decode_checked(raw, self.names)
        if isinstance(msg, ResourceItem) and lane.name == "own":
            try:
                await self._resource(msg)
            finally:
                await raw.ack()
            return
        if not isinstance(msg, WorkItem):
            reason = why or f"a worker does not take {type_of(msg)} messages"  # type: ignore[arg-type]
            await self.bus.dead_letter(self.agent_id, raw, reason)
            await raw.term()
            return
        key = f"{msg.plan_id}.{msg.task_id}"
        if self.finished.get(key) == msg.attempt:
            # ran here and reported already; delivered again because a server restart lost
            # the consumer's record of the first delivery or its acknowledgement
            log.info("%s attempt %d already ran here; acknowledging the repeat", key, msg.attempt)
            await raw.ack()
            return
        current = self.running.get(key)
        if current is not None and current.item.attempt == msg.attempt:
            # the same attempt delivered again while this worker runs it (a server restart can
            # lose the consumer's record of the first delivery): keep running it once, and
            # acknowledge the newer delivery when it is done
            log.info(
                "%s attempt %d delivered again while running here; not starting it twice", key, msg.attempt
            )
            current.raw = raw
            return
        meta = raw.metadata
        delivery = meta.num_delivered or 1
        queued_s = time.time() - meta.timestamp.timestamp() if meta.timestamp else FRESH_S + 1
        # An item taken fresh off the queue is current: the brain deletes the queued item of a
        # task it cancels, resets or gives up. One redelivered, one that sat in the queue (the
        # brain may have restarted since), or one of a task seen cancelled is checked first.
        suspect = delivery > 1 or queued_s > FRESH_S or key in self.cancelled
        if suspect:
            verdict = await self._still_wanted(msg, key, delivery)
            if verdict == "later" and delivery < self.settings.max_deliveries:
                await raw.nak(delay=LATER_S)
                return
            if verdict != "run":
                # skip: the task no longer wants this attempt. held: a live worker runs it, so
                # no second copy beside it; should that worker die, the brain gives the
                # attempt up as lost and releases a new one
                await raw.ack()
                return
        if delivery > self.settings.max_deliveries:
            await self._dead_letter(msg, raw, delivery)
            return
        run = Running(msg, raw)
        run.ctx.tail_bytes = self.settings.output_tail_bytes
        run.ctx.kill_grace_s = self.settings.kill_grace_s
        run.ctx.shell = self.settings.shell
        run.ctx.on_start = self.reaper.watch
        run.ctx.on_end = self.reaper.forget
        self.running[key] = run
        try:
            await self._execute(run, key)
        finally:
            self.running.pop(key, None)

    async def _dead_letter(self, item: WorkItem, raw: NatsMsg, delivery: int) -> None:
        """Every worker that took this item died with it: stop the cycle, record it, fail the task."""
        why = (
            f"delivered {delivery} times (more than max_deliveries={self.settings.max_deliveries}); "
            "every worker that took it stopped heartbeating"
        )
        log.error("dead-lettering %s.%s attempt %d: %s", item.plan_id, item.task_id, item.attempt, why)
        await self.bus.dead_letter(self.agent_id, raw, why)
        await self._emit(
            RunFinished(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=self.agent_id,
                at=time.time(),
                ok=False,
                duration_s=0.0,
                error=why,
                dead_letter=True,
                claim=item.claim,
            )
        )
        await raw.term()

    async def _emit(self, ev: RunStarted | RunFinished) -> None:
        """Publish a report, riding out a server restart: a finished task is not run twice for it."""
        delay = 0.2
        while True:
            try:
                await self.bus.emit(ev)
                return
            except TRANSIENT as exc:
                if self.stop_requested.is_set() and delay > 5:
                    raise
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("publishing %s failed (%s); retrying in %.1fs", type_of(ev), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _still_wanted(self, item: WorkItem, key: str, delivery: int) -> str:
        """'run', 'skip' (the task no longer wants this attempt), 'wait' (another live worker
        runs this very attempt) or 'later' (no record of the task yet: look again soon).

        The brain writes a task's record and its work item in the same round trip, and a
        brain that crashed between the two leaves the record for the next one to repair: a
        record behind the item's attempt has not caught up with the release the item comes
        from, and the item is as current as a fresh one.

        A redelivery (delivery > 1) of a running attempt means JetStream stopped hearing from
        its worker: this one takes over. A first delivery of an attempt already running
        elsewhere happens when a server restart lost the consumer's record of the first one:
        if that worker is still registered, it still runs it."""
        kv = await self.bus.tasks_kv()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            log.warning("no record of %s (delivery %d): not written yet, or long archived", key, delivery)
            return "later"
        try:
            rec = decode_task(entry.value or b"")
        except UNREADABLE as exc:
            # the brain released this attempt; a record that cannot be read cannot say
            # otherwise (the brain rebuilds it from the history when it starts)
            if key not in self.damaged_seen:
                self.damaged_seen.add(key)
                log.warning("the record of %s is unreadable (%s); running the item as released", key, exc)
            return "run"
        if rec.attempt < item.attempt:
            return "run"
        if rec.status not in INFLIGHT_STATES or rec.attempt != item.attempt:
            log.info(
                "skipping %s attempt %d: task is %s at attempt %d", key, item.attempt, rec.status, rec.attempt
            )
            return "skip"
        if delivery == 1 and rec.status == RUNNING and rec.worker and rec.worker != self.agent_id:
            agents = await self.bus.agents_kv()
            try:
                await agents.get(rec.worker)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return "run"  # its worker is gone: this is the redelivery that takes over
            log.info(
                "%s attempt %d is running on live worker %s; not running a second copy",
                key,
                item.attempt,
                rec.worker,
            )
            return "wait"
        return "run"

    async def _execute(self, run: Running, key: str) -> None:
        item, raw = run.item, run.raw
        delivery = raw.metadata.num_delivered or 1
        started_at = time.time()
        # a redelivery is reported at once: the brain records who took the task over
        start = StartReport(
            self._emit,
            RunStarted(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=self.agent_id,
                at=started_at,
                delivery=delivery,
                claim=item.claim,
            ),
            0.0 if delivery > 1 else self.settings.start_report_after_s,
        )
        await start.begin()
        log.info("running %s attempt %d (delivery %d)", key, item.attempt, delivery)
        beat = asyncio.get_running_loop().create_task(self._heartbeat(run))
        usage = ResourceUse()
        sampler = (
            asyncio.get_running_loop().create_task(self._sample_resources(usage))
            if self.device is not None and self.device.measured
            else None
        )
        try:
            executor = EXECUTORS.get(item.kind)
            if executor is None:
                result = RunResult(
                    ok=False, duration_s=0.0, error=f"this worker cannot run {item.kind!r} bodies"
                )
            else:
                failed = await self._prepare(item, run.ctx)
                result = failed or await executor(item, run.ctx)
        finally:
            beat.cancel()
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        if sampler is not None:
            with contextlib.suppress(Exception):
                await self._sample_once(usage)  # the end of the task, too (and a short task's only)
            if usage.samples:
                result.metrics.update(usage.metrics())
        await start.settle()
        if run.handed_back:
            log.info("handing %s back to the queue", key)
            await run.raw.nak()
            return
        sensitive = item.sensitive or run.ctx.sensitive
        output, output_object = await self._keep_output(item, result, sensitive)
        limit = self.settings.output_event_bytes
        await self._emit(
            RunFinished(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=self.agent_id,
                at=time.time(),
                started_at=started_at,
                ok=result.ok,
                duration_s=result.duration_s,
                rc=result.rc,
                timed_out=result.timed_out,
                cancelled=result.cancelled,
                error=result.error,
                stdout_tail="" if sensitive else result.stdout_tail,
                stderr_tail="" if sensitive else result.stderr_tail,
                stdout_bytes=result.stdout_bytes,
                stderr_bytes=result.stderr_bytes,
                reason=FailReason.DEFINITION if result.definition_error else FailReason.NONE,
                output=output,
                output_object=output_object,
                prompt="" if sensitive else result.prompt[:limit],
                model=item.model if item.kind in MODEL_BODY_KINDS else "",
                gpu=self.gpu_id if self.models_on else "",
                metrics=result.metrics,
                artifacts=tuple(result.artifacts),
                sensitive=sensitive,
                claim=item.claim,
            )
        )
        self.finished[key] = item.attempt
        while len(self.finished) > CANCELLED_MEMORY:
            del self.finished[next(iter(self.finished))]
        try:
            await run.raw.ack()
        except TRANSIENT as exc:
            # the report is out; a redelivery finds the task final and is skipped
            log.warning("could not acknowledge %s (%s)", key, exc)
        log.info(
            "%s %s in %.3fs%s",
            key,
            "succeeded" if result.ok else "failed",
            result.duration_s,
            "" if result.ok else f": {result.error}",
        )

    async def _prepare(self, item: WorkItem, ctx: RunContext) -> RunResult | None:
        """Give a model task its model and inputs; a result instead when that is impossible."""
        ctx.device = self.device.kind if self.device is not None else "cpu"
        ctx.artifacts_dir = os.path.join(self.settings.data_dir, "artifacts")
        try:
            if item.inputs:
                ctx.inputs = await self._inputs(item, ctx)
            need = MODEL_BODY_KINDS.get(item.kind)
            if need is None:
                return None
            if not self.models_on:
                return RunResult(ok=False, duration_s=0.0, error=f"this worker runs no models ({item.kind})")
            if need == "llm":
                if self.llm is None or self.llm_name != item.model:
                    return RunResult(
                        ok=False,
                        duration_s=0.0,
                        error=f"{item.model} is not loaded here (this GPU holds {self.llm_name or 'none'})",
                    )
                ctx.model = self.llm
            else:
                ctx.model = await self._script_model(item.model)
        except ModelError as exc:
            return RunResult(ok=False, duration_s=0.0, error=str(exc))
        except TRANSIENT as exc:
            return RunResult(ok=False, duration_s=0.0, error=f"could not read the task's inputs: {exc}")
        return None

    async def _keep_output(self, item: WorkItem, result: RunResult, sensitive: bool) -> tuple[str, str]:
        """The output for the completion event, and the object holding it when it does not fit
        (or the task is sensitive: its output is never in the history)."""
        text = result.output
        if not text:
            return "", ""
        data = text.encode()
        if not sensitive and len(data) <= self.settings.output_event_bytes:
            return text, ""
        name = f"outputs/{item.plan_id}/{item.task_id}/{item.attempt}"
        try:
            await (await self.bus.objects()).put(name, data)
        except TRANSIENT as exc:
            log.warning("could not store the output of %s.%s: %s", item.plan_id, item.task_id, exc)
            return ("" if sensitive else text[: self.settings.output_event_bytes]), ""
        return "", name

    async def _sample_once(self, usage: ResourceUse) -> None:
        device = self.device
        assert device is not None
        mem = await asyncio.to_thread(device.memory, self._mesh_used_mb())
        usage.add(mem.used_mb, await asyncio.to_thread(device.utilization))

    async def _sample_resources(self, usage: ResourceUse) -> None:
        """Read the GPU while a task runs: its peak memory and mean utilisation go into the
        task's completion event (the GPU's, so they include whatever else runs on it)."""
        while True:
            try:
                await self._sample_once(usage)
            except Exception as exc:  # a reading that fails must never fail the task
                log.debug("GPU reading failed: %r", exc)
            await asyncio.sleep(RESOURCE_SAMPLE_S)

    async def _heartbeat(self, run: Running) -> None:
        interval = self.settings.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            try:
                await run.raw.in_progress()
            except TRANSIENT as exc:
                log.warning("progress heartbeat failed: %s", exc)
