"""The watchdog's telemetry history: its samples averaged per tier and stored (docs/watchdog.md#history).
Wiring around `mesh.telhistory.Rollup` and `mesh.bus.telhistory.publish_points`.

Points that could not be stored (the server away, its store full) wait for the next round, at
most `MAX_WAITING` of them, oldest dropped first: history is worth keeping, not worth holding a
host's memory for.
"""

from __future__ import annotations

import logging
from collections import deque

from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.bus.telhistory import history_tiers, publish_points
from mesh.samples import GpuSample, HostSample
from mesh.telhistory import HistoryPoint, Rollup

log = logging.getLogger("mesh.watchdog")

MAX_WAITING = 10_000


class HistoryRecorder:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.rollup = Rollup(t.res_s for t in history_tiers(bus.settings))
        self.waiting: deque[HistoryPoint] = deque(maxlen=MAX_WAITING)
        self._failing = False

    async def record(self, samples: list[GpuSample | HostSample]) -> None:
        """Add one round's samples; store the buckets they closed, and any left from before."""
        for sample in samples:
            self.waiting.extend(self.rollup.add(sample))
        await self.store()

    async def store(self) -> None:
        while self.waiting:
            try:
                await publish_points(self.bus, [self.waiting[0]])
            except TRANSIENT as exc:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "storing telemetry history failed (%r); %d point(s) wait", exc, len(self.waiting)
                    )
                return
            self.waiting.popleft()
            if self._failing:
                self._failing = False
                log.info("telemetry history stored again")

    async def close(self) -> None:
        """Store the buckets still open (a partial last bucket beats none)."""
        self.waiting.extend(self.rollup.flush())
        await self.store()
