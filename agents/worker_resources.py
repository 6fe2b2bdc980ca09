"""What a task used of its GPU: readings taken while it ran, into its `run.finished` metrics.
The GPU's readings, so they include whatever else runs on it; read in a thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mesh.host.gpu import Device

log = logging.getLogger("mesh.worker")

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


async def sample_once(device: Device, mesh_used_mb: int, usage: ResourceUse) -> None:
    mem = await asyncio.to_thread(device.memory, mesh_used_mb)
    usage.add(mem.used_mb, await asyncio.to_thread(device.utilization))


async def sample_resources(device: Device, mesh_used_mb: Callable[[], int], usage: ResourceUse) -> None:
    """Read the GPU while a task runs: its peak memory and mean utilisation go into the
    task's completion event (the GPU's, so they include whatever else runs on it)."""
    while True:
        try:
            await sample_once(device, mesh_used_mb(), usage)
        except Exception as exc:  # a reading that fails must never fail the task
            log.debug("GPU reading failed: %r", exc)
        await asyncio.sleep(RESOURCE_SAMPLE_S)
