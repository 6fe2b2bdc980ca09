"""A GPU worker's GPU: its device and memory readings, its controls (pause, cordon), and the
`gpu.state` it publishes (an event on each change, the latest in the gpus bucket).

The state is derived (`mesh.work.gpu_state`) from what the worker holds and runs, which the
worker tells through `view`; a change of the controls is told back through `on_hold`. A
worker that runs no models has a `Gpu` that publishes nothing.

A worker that owns a set of GPUs (`--gpu 0,3`) reports one GPU, the set (`<host>-gpu0_3`),
and follows the controls of the set and of each of its cards: a card's thermal pause (the
watchdog reads each card on its own) or an operator's pause or cordon of a card holds the set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import msgspec
import nats.js.errors

from agents.base import Agent
from mesh import placement as gs
from mesh import work
from mesh.bus.jetstream import TRANSIENT
from mesh.events import GpuControl, GpuState, decode, encode
from mesh.host.gpu import Device, Memory, as_indices, gpu_id, gpu_label, open_device
from mesh.host.telemetry import host_token

log = logging.getLogger("mesh.worker")


class Gpu:
    """One worker's GPU (or the CPU standing in for one)."""

    def __init__(
        self,
        agent: Agent,
        gpu: int | Sequence[int] | None,
        memory_mb: int,
        on: bool,
        view: Callable[[], work.GpuNow],
        on_hold: Callable[[], None],
    ) -> None:
        self.agent = agent
        # the GPUs (NVML indices) this worker owns: one, a set, or none (the CPU)
        self.indices = as_indices(gpu)
        self.index = self.indices[0] if self.indices else None
        self.memory_mb = memory_mb
        # whether this worker runs models (owns this GPU): if not, nothing is published
        self.on = on
        self.view = view
        self.on_hold = on_hold
        self.gpu_id = gpu_id(host_token(), self.indices) if self.indices else agent.agent_id
        # the GPU ids whose controls hold this worker: its own, and each card's of a set
        self.control_ids = (self.gpu_id,) + (
            tuple(gpu_id(host_token(), (i,)) for i in self.indices) if len(self.indices) > 1 else ()
        )
        self.device: Device | None = None
        # '' until the first report: a report with no previous state says the worker (re)started
        self.state = ""
        self.since = time.time()
        # set on stop: the last state this worker reports
        self.override = ""
        self._outbox: list[tuple[GpuState, bool]] = []
        # this GPU's control keys by (GPU id, source ('thermal', 'operator')); a set's cards' too
        self.controls: dict[tuple[str, str], GpuControl] = {}
        self._mem: Memory | None = None
        self._flush_lock = asyncio.Lock()
        self._changed = asyncio.Event()

    async def open(self) -> None:
        """Open the device and take a first reading (before the worker joins the mesh)."""
        self.device = await asyncio.to_thread(
            open_device, self.indices, self.memory_mb, self.agent.settings.simulated_gpus
        )
        await self.read_memory()

    async def follow(self) -> None:
        """Read this GPU's controls (a paused or cordoned GPU's worker must not claim work in its
        first moments either), report the state, then follow both."""
        await self._load_controls()
        self.on_hold()
        self.publish(force=True)
        self.agent.spawn(self._publisher(), "gpu-state")
        for gid in self.control_ids:
            self.agent.spawn(self._control_loop(gid), f"gpu-control-{gid}")

    async def offline(self) -> None:
        """Report the GPU offline, the last state this worker reports (bounded)."""
        self.override = gs.OFFLINE
        self.publish(force=True)
        await asyncio.wait_for(self._flush(), timeout=5)

    def close(self) -> None:
        if self.device is not None:
            self.device.close()

    @property
    def label(self) -> str:
        """The GPUs as a person reads them: '2', '0+3' (a set), '' for the CPU."""
        return gpu_label(self.indices)

    @property
    def kind(self) -> str:
        """The device models load on: 'cuda', or 'cpu'."""
        return self.device.kind if self.device is not None else "cpu"

    # controls ---------------------------------------------------------------------------
    def hold_reason(self) -> str:
        """Why this GPU takes no work now ('' when it does); a set's card's control names the card."""
        return work.hold_reason(
            c if gid == self.gpu_id else msgspec.structs.replace(c, reason=f"{gid}: {c.reason}".rstrip(": "))
            for (gid, _), c in sorted(self.controls.items())
        )

    async def _load_controls(self) -> None:
        kv = await self.agent.bus.gpu_control_kv()
        for gid in self.control_ids:
            for source in ("thermal", "operator"):
                try:
                    entry = await kv.get(self.agent.names.gpu_control_key(gid, source))
                    value = decode(entry.value or b"")
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    continue
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.warning("ignoring an unreadable %s control value for %s", source, gid)
                    continue
                control = work.control_for(value, gid, source)
                if control is not None:
                    self.controls[gid, source] = control

    async def _control_loop(self, gid: str) -> None:
        """Follow one GPU's keys in the control bucket (this one's, or a card's of its set):
        pause, resume, cordon."""
        kv = await self.agent.bus.gpu_control_kv()
        while True:
            try:
                watcher = await kv.watch(f"{gid}.*")
                async for entry in watcher:
                    if entry is None:
                        continue  # the end of the initial values
                    source = entry.key.rsplit(".", 1)[-1]
                    try:
                        value = decode(entry.value) if entry.value else None
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("ignoring an unreadable control value for %s", entry.key)
                        continue
                    before = self.hold_reason()
                    control = work.control_for(value, gid, source)
                    if control is not None:
                        self.controls[gid, source] = control
                    else:
                        self.controls.pop((gid, source), None)
                    after = self.hold_reason()
                    if after != before:
                        log.info("%s: %s", self.gpu_id, f"holding: {after}" if after else "taking work again")
                        self.on_hold()
                        self.publish(force=True)
            except TRANSIENT as exc:
                log.warning("watching the GPU's control keys failed (%s); again in 1s", exc)
                await asyncio.sleep(1.0)

    # memory -----------------------------------------------------------------------------
    def memory(self) -> Memory | None:
        """The device's memory as last read. A GPU is read through NVML in a thread, never on the
        event loop: a driver call that waits on a CUDA initialisation in another thread must not
        stop this worker's heartbeats."""
        if self.device is None:
            return None
        if self.device.kind == "cpu" or self._mem is None:
            return self.device.memory(self.view().mesh_used_mb)
        return self._mem

    async def read_memory(self, mesh_used_mb: int | None = None) -> None:
        if self.device is not None and self.device.kind != "cpu":
            used = self.view().mesh_used_mb if mesh_used_mb is None else mesh_used_mb
            self._mem = await asyncio.to_thread(self.device.memory, used)

    async def free_mb(self) -> int:
        await self.read_memory()
        mem = self.memory()
        assert mem is not None
        return mem.total_mb - mem.used_mb

    async def cards_free_mb(self) -> tuple[int, ...]:
        """Each card's free memory now (one value for a single GPU or the CPU), read in a thread."""
        if self.device is None:
            return ()
        cards = await asyncio.to_thread(self.device.card_memory, self.view().mesh_used_mb)
        return tuple(max(0, m.total_mb - m.used_mb) for m in cards)

    # the state --------------------------------------------------------------------------
    def publish(self, force: bool = False, error: str = "", rid: str = "", refresh: bool = False) -> None:
        """Queue the GPU's state for publishing, if it changed or is asked for."""
        if not self.on:
            return
        now = self.view()
        hold = self.hold_reason()
        state = work.gpu_state(now, hold, self.override)
        how = work.gpu_report(state, self.state, force, error, rid, refresh)
        if how == work.SILENT:
            return
        at = time.time()
        device = self.device
        mem = self.memory()
        settings = self.agent.settings
        ev = GpuState(
            gpu=self.gpu_id,
            worker=self.agent.agent_id,
            host=self.agent.host,
            state=state,
            at=at,
            previous=self.state,
            took_s=round(at - self.since, 3),
            index=self.index if self.index is not None else -1,
            indices=self.indices,
            name=device.name if device is not None else "",
            device=device.kind if device is not None else "cpu",
            llm=now.llm,
            script_models=now.script_models,
            vram_total_mb=mem.total_mb if mem else 0,
            vram_used_mb=mem.used_mb if mem else 0,
            vram_reserved_mb=now.reserved_mb,
            llm_slots=settings.llm_slots,
            script_slots=settings.script_slots,
            running=now.running,
            rid=rid,
            error=error,
            hold=hold,
            fetching=now.fetching,
            progress=now.progress,
        )
        if state != self.state:
            self.since = at
        self.state = state
        # a change (or an answer to the brain) is an event; a fresh reading only updates KV
        self._outbox.append((ev, how == work.EVENT))
        self._changed.set()

    async def _flush(self) -> None:
        async with self._flush_lock:
            while self._outbox:
                ev, event = self._outbox[0]
                if event:
                    await self.agent.bus.emit(ev)
                kv = await self.agent.bus.gpus_kv()
                await kv.put(self.gpu_id, encode(ev))
                self._outbox.pop(0)

    async def _publisher(self) -> None:
        """Publish GPU states in order, riding out a server restart; refresh the reading now and then."""
        while True:
            try:
                # not wait_for: on Python 3.11 it swallows a cancel that lands as the event is set
                # (stop() sets it with the last state), and this loop would never end
                async with asyncio.timeout(self.agent.settings.agent_refresh_s):
                    await self._changed.wait()
            except TimeoutError:
                await self.read_memory()
                self.publish(refresh=True)
            self._changed.clear()
            try:
                await self._flush()
            except TRANSIENT as exc:
                if not self.agent.bus.store.full:  # (the bus said that once)
                    log.warning("publishing the GPU state failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                self._changed.set()
