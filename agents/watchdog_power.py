"""The watchdog's power caps: each GPU of its host held at the cap the config (`[gpus]`) or an
operator (`mesh gpu power`) asks for, set through NVML at start and again after a driver reset.

Every round the watchdog hands it the GPUs it read; for each GPU with a cap it reads the limit
back (in a thread) and asks `mesh.power.to_set` whether to set it: the cap is new or changed,
the device's handle was taken again, or the limit read back is not the cap (a reset put the
default back). A cap outside the card's range is refused with the range, once per cap, never
tried again until the cap or the device changes. Each set (or refusal) is a `gpu.power` event.

An operator's cap is the GPU's `power` key in the control bucket (only the CLI may write it;
a value that is not a `gpu.power` of that GPU from an operator is ignored). It overrides the
config's until an operator's `watts = 0` gives the GPU back to the config. The watchdog
answers each with a `gpu.power` of the same `rid`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

import msgspec

from agents.base import Agent
from mesh.bus.jetstream import TRANSIENT
from mesh.events import GpuPower, decode
from mesh.host.telemetry import GpuSource, PowerSetError
from mesh.power import Applied, PowerCaps, PowerRange, to_set, wanted
from mesh.samples import GpuSample

log = logging.getLogger("mesh.watchdog.power")


class PowerControl:
    """The caps of one watchdog's GPUs; `caps` is replaced on a config reload."""

    def __init__(self, wd: Agent, host: str, source: Callable[[], GpuSource | None]) -> None:
        """`wd`: the watchdog (its bus, settings, tasks); `host`: its host token; `source()`: the
        GPUs it reads now (None: none)."""
        self.wd = wd
        self.host = host
        self.source = source
        self.caps: PowerCaps = wd.settings.power_caps()
        # GPU index -> the operator's cap (from the control bucket)
        self.overrides: dict[int, float] = {}
        self.applied: dict[int, Applied] = {}
        # GPU index -> (the watts, the generation) that could not be set: not tried again until
        # one of them changes
        self.refused: dict[int, tuple[float | None, int]] = {}
        self._lock = asyncio.Lock()
        self._key = re.compile(rf"^{re.escape(host)}-gpu(?P<index>[0-9]+)\.{wd.names.POWER_KEY}$")
        # GPU index -> why its limit could not be read (said once)
        self._unreadable: dict[int, str] = {}
        # the operator's request a GPU's next set answers
        self._rid: dict[int, str] = {}

    async def start(self) -> None:
        self.wd.spawn(self._watch(), "power")

    # the operator's caps -------------------------------------------------------------------
    async def _watch(self) -> None:
        """Follow the `power` keys of the control bucket (all of them: the bucket's watch takes
        one wildcard token; another host's keys are skipped)."""
        while True:
            try:
                kv = await self.wd.bus.gpu_control_kv()
                watcher = await kv.watch(f"*.{self.wd.names.POWER_KEY}")
                async for entry in watcher:
                    if entry is None:
                        continue  # the end of the initial values
                    await self._on_key(entry.key, entry.value)
            except TRANSIENT as exc:
                log.warning("watching the power caps failed (%s); again in 1s", exc)
                await asyncio.sleep(1.0)

    async def _on_key(self, key: str, value: bytes | None) -> None:
        found = self._key.match(key)
        if found is None:
            return
        index = int(found["index"])
        gpu = key.rsplit(".", 1)[0]
        if not value:
            self.overrides.pop(index, None)
        else:
            try:
                msg = decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("ignoring an unreadable power cap under %s", key)
                return
            if not isinstance(msg, GpuPower) or msg.gpu != gpu or msg.source != "operator":
                log.warning(
                    "ignoring %s under %s: not an operator's gpu.power of %s", type(msg).__name__, key, gpu
                )
                return
            if msg.watts > 0:
                self.overrides[index] = msg.watts
            else:
                self.overrides.pop(index, None)
            self._rid[index] = msg.rid
            self.refused.pop(index, None)
            log.info("%s: operator's power cap %s", gpu, f"{msg.watts:g} W" if msg.watts > 0 else "lifted")
        await self.enforce([index], answer=True)

    # each round ----------------------------------------------------------------------------
    def marked(self, samples: list[GpuSample]) -> list[GpuSample]:
        """The samples with the cap each GPU is held at (`power_cap_w`)."""
        return [
            msgspec.structs.replace(g, power_cap_w=self.applied[g.index].watts)
            if g.index in self.applied
            else g
            for g in samples
        ]

    async def enforce(self, indices: list[int], answer: bool = False) -> None:
        """Set the caps of these GPUs where they must be (one GPU at a time, in a thread each)."""
        source = self.source()
        if source is None:
            for index in indices if answer else ():
                why = "no GPU readable through NVML on this host: no power limit can be set"
                await self._emit(
                    GpuPower(
                        gpu=f"{self.host}-gpu{index}",
                        source="watchdog",
                        at=time.time(),
                        rid=self._rid.pop(index, ""),
                        error=why,
                        by=self.wd.agent_id,
                    )
                )
            return
        async with self._lock:
            for index in indices:
                want = wanted(self.caps, self.overrides.get(index), index)
                if want is None and index not in self.applied and not answer:
                    continue
                try:
                    ev = await asyncio.to_thread(self._enforce, source, index, want, answer)
                except Exception as exc:  # a driver that fails in a new way: said, not fatal
                    log.warning("GPU %d: power cap check failed: %r", index, exc)
                    continue
                if ev is not None:
                    await self._emit(ev)

    def _enforce(self, source: GpuSource, index: int, want: float | None, answer: bool) -> GpuPower | None:
        """One GPU (blocking: runs in a thread): the event to publish, if anything happened."""
        gpu = f"{self.host}-gpu{index}"
        rid = self._rid.pop(index, "") if answer else ""
        try:
            generation = source.generation(index)
            if not answer and self.refused.get(index) == (want, generation):
                return None
            read_back = source.power_limit(index)
        except PowerSetError as exc:
            # a GPU NVML lost (taken again at the next call) or one this host lacks: said once
            if self._unreadable.get(index) != str(exc):
                self._unreadable[index] = str(exc)
                log.warning("%s: %s", gpu, exc)
            if not answer:
                return None
            return GpuPower(
                gpu=gpu,
                source="watchdog",
                at=time.time(),
                watts=want or 0.0,
                rid=rid,
                error=str(exc),
                by=self.wd.agent_id,
            )
        self._unreadable.pop(index, None)
        watts, reason = to_set(want, self.applied.get(index), generation, read_back)
        if not reason and not answer:
            return None
        rng: PowerRange | None = None
        error = ""
        target: float | None = None
        try:
            rng = source.power_range(index)
            if not reason:  # nothing to set: the answer says what is
                reason = "already at the cap asked for" if want is not None else "no cap: the driver's limit"
            else:  # the cap, or (a cap taken away) the card's default
                target = watts if watts is not None else rng.default_w
            if target is not None:
                error = rng.problem(target)
                if not error:
                    source.set_power_limit(index, target)
                    read_back = source.power_limit(index)
        except PowerSetError as exc:
            error = str(exc)
        if error:
            self.refused[index] = (want, generation)
            if answer and want is not None and self.overrides.get(index) == want:
                # an operator's cap that cannot be: the config's stays in force
                del self.overrides[index]
                self.refused.pop(index, None)
                error += "; the GPU keeps the config's cap"
            log.error("%s: power cap not set: %s", gpu, error)
        elif target is not None:
            self.refused.pop(index, None)
            if want is None:
                self.applied.pop(index, None)
            else:
                self.applied[index] = Applied(want, source.generation(index))
            log.warning("%s: power limit set to %g W, reads back %s W (%s)", gpu, target, read_back, reason)
        return GpuPower(
            gpu=gpu,
            source="watchdog",
            at=time.time(),
            watts=want or 0.0,
            rid=rid,
            limit_w=read_back,
            min_w=rng.min_w if rng else None,
            max_w=rng.max_w if rng else None,
            default_w=rng.default_w if rng else None,
            error=error,
            reason=reason,
            by=self.wd.agent_id,
        )

    async def _emit(self, ev: GpuPower) -> None:
        try:
            await self.wd.bus.emit(ev)
        except TRANSIENT as exc:
            log.warning("publishing %s's power cap event failed: %r", ev.gpu, exc)
