"""What a worker knows of its device: a GPU read through NVML, or the CPU standing in for one.

NVML (the `nvidia-ml-py` package, module `pynvml`) numbers GPUs by their
physical index whatever `CUDA_VISIBLE_DEVICES` says, so a worker started with
`--gpu 2` reads GPU 2 here while CUDA libraries see it as device 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger("mesh.host.gpu")
MB = 1024 * 1024


@dataclass
class Memory:
    total_mb: int
    used_mb: int


class Device:
    """The CPU: memory is what the config offers model kinds, used is what mesh loaded."""

    kind = "cpu"
    index = -1

    def __init__(self, memory_mb: int = 0) -> None:
        self.total_mb = memory_mb or int(psutil.virtual_memory().available // MB)
        self.name = "cpu"

    def memory(self, mesh_used_mb: int) -> Memory:
        return Memory(self.total_mb, mesh_used_mb)

    def utilization(self) -> float | None:
        """The GPU's utilisation now, percent; None where there is no GPU to read."""
        return None

    @property
    def measured(self) -> bool:
        """Whether readings come from a device (so per-task GPU resources mean something)."""
        return False

    def close(self) -> None:
        pass


class NvmlDevice(Device):
    """One NVIDIA GPU read through NVML. `memory_mb` > 0 caps what mesh may use of it."""

    kind = "cuda"

    def __init__(self, index: int, memory_mb: int = 0) -> None:
        import pynvml

        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuError(
                f"cannot read GPU {index} through NVML ({exc}): is the NVIDIA driver installed and "
                "loaded? Use --gpu none for a CPU worker"
            ) from exc
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            pynvml.nvmlShutdown()
            raise GpuError(f"there is no GPU {index}: NVML sees {count} GPU(s) (0..{count - 1})")
        self.index = index
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        info = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
        self.cap_mb = memory_mb
        self.total_mb = min(int(info.total // MB), memory_mb) if memory_mb else int(info.total // MB)

    def memory(self, mesh_used_mb: int) -> Memory:
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        except self._nvml.NVMLError as exc:
            log.warning("NVML memory reading of GPU %d failed: %s", self.index, exc)
            return Memory(self.total_mb, mesh_used_mb)
        used = int(info.used // MB)
        if self.cap_mb:
            # a cap is what mesh may use: count only what mesh holds, and what others hold beyond
            # the memory the cap leaves them
            others = max(0, used - mesh_used_mb - (int(info.total // MB) - self.cap_mb))
            used = mesh_used_mb + others
        return Memory(self.total_mb, used)

    def utilization(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except self._nvml.NVMLError:
            return None

    @property
    def measured(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


class SimulatedDevice(Device):
    """A GPU of a simulated set (the `simulated_gpus` file the watchdog reads too): its name and
    memory come from the file; models load on the CPU. Lets tests and demos run GPU workers, the
    watchdog and thermal control on a machine with no NVIDIA GPU: only NVML is simulated."""

    def __init__(self, index: int, path: str, memory_mb: int = 0) -> None:
        from mesh.host.telemetry import SimulatedSource, host_token

        self.source = SimulatedSource(path, host_token())
        self.index = index
        try:
            first = self.source.sample(index)
        except (IndexError, OSError, ValueError) as exc:
            raise GpuError(f"no simulated GPU {index} in {path}: {exc}") from exc
        self.name = first.name
        total = first.mem_total_mb or 0
        self.total_mb = min(total, memory_mb) if memory_mb else total

    def memory(self, mesh_used_mb: int) -> Memory:
        try:
            sample = self.source.sample(self.index)
        except (IndexError, OSError, ValueError):
            return Memory(self.total_mb, mesh_used_mb)
        return Memory(self.total_mb, max(sample.mem_used_mb or 0, mesh_used_mb))

    def utilization(self) -> float | None:
        try:
            return self.source.sample(self.index).util_pct
        except (IndexError, OSError, ValueError):
            return None

    @property
    def measured(self) -> bool:
        return True


class GpuError(Exception):
    """A GPU a worker was told to use that it cannot use; the message says what to do."""


def count_gpus() -> int:
    """NVIDIA GPUs NVML sees; 0 when there is no driver (or no nvidia-ml-py)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def open_device(gpu: int | None, memory_mb: int = 0, simulated: str = "") -> Device:
    if gpu is None:
        return Device(memory_mb)
    if simulated:
        return SimulatedDevice(gpu, simulated, memory_mb)
    return NvmlDevice(gpu, memory_mb)


def gpu_environment(gpu: int | None, library_path: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment a worker for `gpu` must start with (before any CUDA library loads)."""
    env = dict(environ)
    # a CPU worker's libraries must not grab a GPU: an empty list hides them all
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    if library_path and gpu is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if library_path not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([library_path, *parts])
    return env
