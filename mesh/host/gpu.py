"""What a worker knows of its device: a GPU read through NVML, a set of GPUs, or the CPU standing in.

NVML (the `nvidia-ml-py` package, module `pynvml`) numbers GPUs by their
physical index whatever `CUDA_VISIBLE_DEVICES` says, so a worker started with
`--gpu 2` reads GPU 2 here while CUDA libraries see it as device 0.

A worker may own a set of GPUs (`--gpu 0,3`): one device whose memory is the
sum of its cards', for a model bigger than one card (llama.cpp splits it over
them). Its token in ids and unit names joins the indices with '_' (`0_3`): '.'
splits subjects, and '+' and ',' may not stand in a subject token or a unit name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
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
    def indices(self) -> tuple[int, ...]:
        """The GPUs (NVML indices) this device is: one, several for a set, none for the CPU."""
        return (self.index,) if self.index >= 0 else ()

    def card_memory(self, mesh_used_mb: int) -> list[Memory]:
        """Each card's memory, in the order of `indices` (one reading for a single device)."""
        return [self.memory(mesh_used_mb)]

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


class GpuSet(Device):
    """Several GPUs one worker owns as one device: its memory is the sum of the cards', its name
    lists them; a model loaded on it spreads over them. Each card is still read on its own."""

    def __init__(self, cards: Sequence[Device]) -> None:
        self.cards = list(cards)
        first = self.cards[0]
        self.kind = first.kind
        self.index = first.index
        self.name = " + ".join(c.name for c in self.cards)
        self.total_mb = sum(c.total_mb for c in self.cards)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.cards)

    def card_memory(self, mesh_used_mb: int) -> list[Memory]:
        # what mesh holds is spread over the cards as their sizes are (llama.cpp splits a model
        # by the cards' free memory, which is their size on cards mesh alone uses)
        shares = spread(mesh_used_mb, [c.total_mb for c in self.cards])
        return [c.memory(share) for c, share in zip(self.cards, shares, strict=True)]

    def memory(self, mesh_used_mb: int) -> Memory:
        cards = self.card_memory(mesh_used_mb)
        return Memory(sum(m.total_mb for m in cards), sum(m.used_mb for m in cards))

    def utilization(self) -> float | None:
        """The cards' mean utilisation (the ones that could be read)."""
        read = [u for u in (c.utilization() for c in self.cards) if u is not None]
        return sum(read) / len(read) if read else None

    @property
    def measured(self) -> bool:
        return all(c.measured for c in self.cards)

    def close(self) -> None:
        for card in self.cards:
            card.close()


def spread(total: int, weights: Sequence[int]) -> list[int]:
    """`total` in whole parts in proportion to `weights` (even where they are all 0)."""
    if not weights:
        return []
    whole = sum(weights)
    if whole <= 0:
        weights, whole = [1] * len(weights), len(weights)
    parts = [total * w // whole for w in weights]
    parts[0] += total - sum(parts)
    return parts


class GpuError(Exception):
    """A GPU a worker was told to use that it cannot use; the message says what to do."""


_INDEX = re.compile(r"[0-9]+")
# a set's indices: '0,3' on a worker's command line, '0+3' in `mesh up --gpus` (where ',' separates
# workers), '0_3' in its ids and unit names
_SET_SEPARATOR = re.compile(r"[,+_]")


def parse_gpus(text: str) -> tuple[int, ...]:
    """A worker's GPUs as written: 'none' or 'cpu' (the CPU: no GPU), an index ('2'), or a set
    ('0,3', '0+3' or '0_3'; the first is the main GPU). Raises GpuError saying what is wrong."""
    word = text.strip().lower()
    if word in ("none", "cpu", ""):
        return ()
    parts = [p.strip() for p in _SET_SEPARATOR.split(word)]
    if any(p in ("none", "cpu") for p in parts):
        raise GpuError(f"{text!r} names GPUs and the CPU: a worker owns GPUs or the CPU, not both")
    for part in parts:
        if not _INDEX.fullmatch(part):
            what = f"{text!r}" if len(parts) == 1 else f"{text!r}: {part!r}"
            raise GpuError(f"{what} is not a GPU index (NVML numbers them 0, 1, ...)")
    indices = tuple(int(p) for p in parts)
    for i, index in enumerate(indices):
        if index in indices[:i]:
            raise GpuError(f"{text!r} names GPU {index} twice")
    return indices


def as_indices(gpu: int | Sequence[int] | None) -> tuple[int, ...]:
    """A worker's GPUs as a tuple of indices, from an index, a set, or None (the CPU)."""
    if gpu is None:
        return ()
    if isinstance(gpu, int):
        return (gpu,)
    return tuple(gpu)


def gpu_token(indices: Sequence[int]) -> str:
    """The GPUs as one token of an id, a subject or a unit name: '2', or '0_3' for a set."""
    return "_".join(str(i) for i in indices)


def gpu_label(indices: Sequence[int]) -> str:
    """The GPUs as a person reads them: '2', or '0+3' for a set."""
    return "+".join(str(i) for i in indices)


def gpu_id(host: str, indices: Sequence[int]) -> str:
    """A GPU's (or a set's) id, as its worker files its state: `<host>-gpu<N>`, `<host>-gpu0_3`."""
    return f"{host}-gpu{gpu_token(indices)}"


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


def open_device(gpu: int | Sequence[int] | None, memory_mb: int = 0, simulated: str = "") -> Device:
    """The device of a worker's GPUs: the CPU (none), one GPU, or a set (`memory_mb` > 0 caps
    what mesh may use of each card, or of the CPU)."""
    indices = as_indices(gpu)
    if not indices:
        return Device(memory_mb)
    cards: list[Device] = []
    try:
        for index in indices:
            cards.append(
                SimulatedDevice(index, simulated, memory_mb) if simulated else NvmlDevice(index, memory_mb)
            )
    except GpuError:
        for card in cards:
            card.close()
        raise
    return cards[0] if len(cards) == 1 else GpuSet(cards)


def gpu_environment(
    gpu: int | Sequence[int] | None, library_path: str, environ: dict[str, str]
) -> dict[str, str]:
    """The environment a worker for `gpu` (an index, a set, or None) must start with (before any
    CUDA library loads). CUDA numbers what it lists from 0: a set's first GPU is cuda:0."""
    env = dict(environ)
    indices = as_indices(gpu)
    # a CPU worker's libraries must not grab a GPU: an empty list hides them all
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    if library_path and indices:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if library_path not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([library_path, *parts])
    return env
