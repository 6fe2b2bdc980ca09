"""What the watchdog reads: each GPU (through NVML, or a simulated set) and the host (psutil).

The samples it makes (`GpuSample`, `HostSample`) and their JSON form are in `mesh.samples`.

Devices sit behind `GpuSource` (`count`, `sample`, `close`): `NvmlSource` reads NVIDIA GPUs
through NVML, guarding every optional reading so a query the card or driver does not support
gives None rather than an error; `SimulatedSource` reads a JSON file (setting
`simulated_gpus`, env `MESH_SIMULATED_GPUS`) again at every sample, so a test or a demo can
drive a running watchdog's temperatures, loads and memory from outside.

The sources also read and set power limits (`power_range`, `power_limit`, `set_power_limit`,
in watts; NVML's milliwatts stay here) and say when a device came back from a reset
(`generation`); a simulated GPU's `resets` counter stands in for a driver reset, and its sets
are recorded in `<file>.sets.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec
import psutil

from mesh.power import PowerRange
from mesh.samples import GpuSample, HostSample, throttle_names

log = logging.getLogger("mesh.host.telemetry")
MB = 1024 * 1024


def host_token(name: str | None = None) -> str:
    """The host as one subject token: the short hostname, anything odd replaced by '-'.

    The same token a GPU worker puts in its GPU id (`<host>-gpu<N>`)."""
    host = (name if name is not None else socket.gethostname()).split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in host) or "host"


# ---------------------------------------------------------------- GPU sources


class GpuSource(Protocol):
    def count(self) -> int: ...

    def sample(self, index: int) -> GpuSample: ...

    def close(self) -> None: ...

    # power caps (mesh.power decides; these read and set, in watts)
    def power_range(self, index: int) -> PowerRange: ...

    def power_limit(self, index: int) -> float | None: ...

    def set_power_limit(self, index: int, watts: float) -> None: ...

    def generation(self, index: int) -> int: ...


class PowerSetError(Exception):
    """A power limit the driver would not set or read; the message says why and what to do."""


class NvmlSource:
    """NVIDIA GPUs through NVML. Construct with `open_source()`; raises NVMLError without a driver."""

    def __init__(self, host: str) -> None:
        import pynvml

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        self.host = host
        self._handles: dict[int, Any] = {}
        self._generation: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._xid: dict[int, int] = {}
        self._last_xid: dict[int, int] = {}
        self._by_uuid: dict[Any, int] = {}
        self._events: Any = None
        try:
            self._events = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            log.info("NVML events unavailable (%s): XID errors are not counted", exc)

    def count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            nvml = self._nvml
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = handle
            name = self._read(lambda: nvml.nvmlDeviceGetName(handle))
            self._names[index] = name.decode() if isinstance(name, bytes) else str(name or f"gpu{index}")
            if self._events is not None:
                try:
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
                    self._xid[index] = 0
                    uuid = self._read(lambda: nvml.nvmlDeviceGetUUID(handle))
                    if uuid is not None:
                        self._by_uuid[uuid] = index
                except nvml.NVMLError as exc:
                    log.info("GPU %d: XID events unavailable (%s)", index, exc)
        return self._handles[index]

    def _read(self, fn: Any) -> Any:
        """One optional reading: None where the device or driver does not support it."""
        try:
            return fn()
        except self._nvml.NVMLError:
            return None

    def _drain_xids(self) -> None:
        if self._events is None or not self._xid:
            return
        nvml = self._nvml
        for _ in range(1000):
            try:
                data = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing waiting
                return
            uuid = self._read(lambda d=data: nvml.nvmlDeviceGetUUID(d.device))
            index = self._by_uuid.get(uuid) if uuid is not None else None
            if index is not None and index in self._xid:
                self._xid[index] += 1
                code = getattr(data, "eventData", None)
                if isinstance(code, int):
                    self._last_xid[index] = code
                log.warning("GPU %d: XID %s", index, getattr(data, "eventData", "?"))

    def sample(self, index: int) -> GpuSample:
        nvml = self._nvml
        h = self._handle(index)
        self._drain_xids()
        util = self._read(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        mem = self._read(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        temp = self._read(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        power = self._read(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        limit = self._read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
        sm = self._read(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
        memclk = self._read(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM))
        reasons = self._read(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(h))
        if reasons is None:
            reasons = self._read(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h))
        ecc = self._read(
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            )
        )
        return GpuSample(
            host=self.host,
            index=index,
            name=self._names.get(index, f"gpu{index}"),
            at=time.time(),
            util_pct=float(util.gpu) if util is not None else None,
            mem_used_mb=int(mem.used // MB) if mem is not None else None,
            mem_total_mb=int(mem.total // MB) if mem is not None else None,
            temp_c=float(temp) if temp is not None else None,
            power_w=power / 1000.0 if power is not None else None,
            power_limit_w=limit / 1000.0 if limit is not None else None,
            sm_clock_mhz=int(sm) if sm is not None else None,
            mem_clock_mhz=int(memclk) if memclk is not None else None,
            throttle_reasons=throttle_names(int(reasons)) if reasons is not None else [],
            xid_errors=self._xid.get(index),
            ecc_errors=int(ecc) if ecc is not None else None,
            last_xid=self._last_xid.get(index),
        )

    # power caps --------------------------------------------------------------------------
    def _power(self, index: int, what: str, fn: Any) -> Any:
        """One power call on GPU `index`; a lost device handle is dropped (the next call gets a
        new one, and `generation` says so: its limits are the driver's defaults again)."""
        nvml = self._nvml
        try:
            return fn(self._handle(index))
        except nvml.NVMLError as exc:
            lost = (
                getattr(nvml, "NVML_ERROR_GPU_IS_LOST", -1),
                getattr(nvml, "NVML_ERROR_UNINITIALIZED", -1),
            )
            if getattr(exc, "value", None) in lost:
                self._handles.pop(index, None)
                self._generation[index] = self._generation.get(index, 0) + 1
            if getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_NO_PERMISSION", -1):
                raise PowerSetError(
                    f"GPU {index}: NVML refused to {what} ({exc}): setting a power limit needs root "
                    "(run the watchdog as root, see docs/gpus.md)"
                ) from exc
            raise PowerSetError(f"GPU {index}: cannot {what} through NVML: {exc}") from exc

    def power_range(self, index: int) -> PowerRange:
        nvml = self._nvml
        lo, hi = self._power(
            index, "read its power limits", nvml.nvmlDeviceGetPowerManagementLimitConstraints
        )
        default = self._power(
            index, "read its default power limit", nvml.nvmlDeviceGetPowerManagementDefaultLimit
        )
        return PowerRange(min_w=lo / 1000.0, max_w=hi / 1000.0, default_w=default / 1000.0)

    def power_limit(self, index: int) -> float | None:
        nvml = self._nvml
        return (
            float(self._power(index, "read its power limit", nvml.nvmlDeviceGetPowerManagementLimit)) / 1000.0
        )

    def set_power_limit(self, index: int, watts: float) -> None:
        nvml = self._nvml
        milliwatts = round(watts * 1000)
        self._power(
            index,
            f"set its power limit to {watts:g} W",
            lambda h: nvml.nvmlDeviceSetPowerManagementLimit(h, milliwatts),
        )

    def generation(self, index: int) -> int:
        """How many times GPU `index`'s handle was lost and taken again (a driver reset)."""
        return self._generation.get(index, 0)

    def close(self) -> None:
        nvml = self._nvml
        if self._events is not None:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlEventSetFree(self._events)
            self._events = None
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


class SimGpu(msgspec.Struct, kw_only=True):
    """One simulated GPU as its JSON file describes it."""

    name: str = "Simulated GPU"
    util_pct: float = 0.0
    mem_used_mb: int = 0
    mem_total_mb: int = 24576
    temp_c: float = 40.0
    power_w: float = 50.0
    power_limit_w: float = 300.0
    sm_clock_mhz: int = 1500
    mem_clock_mhz: int = 9000
    throttle_reasons: list[str] = msgspec.field(default_factory=list)
    xid_errors: int | None = None
    ecc_errors: int | None = None
    # XID events injected, oldest first (`inject_xid`): counted in the sample's xid_errors, the
    # last one its last_xid
    xids: list[int] = msgspec.field(default_factory=list)
    # power caps: the range a limit may be set in (max 0: the default), the default limit
    # (0: power_limit_w), and a driver reset counter (raise it: a limit set is lost, the
    # default is back, and `generation` changes, as after a real reset)
    power_min_w: float = 100.0
    power_max_w: float = 0.0
    power_default_w: float = 0.0
    resets: int = 0


class SimFile(msgspec.Struct):
    gpus: list[SimGpu]


_sim_decoder: msgspec.json.Decoder[SimFile | list[SimGpu]] = msgspec.json.Decoder(SimFile | list[SimGpu])


class SimulatedSource:
    """GPUs described by a JSON file, read again at every sample.

    The file holds `{"gpus": [{"name": ..., "temp_c": 70, "util_pct": 50, "mem_used_mb": 1000,
    "mem_total_mb": 24576, ...}, ...]}` (or just the list); a missing field takes the default
    of `SimGpu`. A file that cannot be read (mid-write, say) keeps the last good reading: write
    it to a temporary name and rename it over.
    """

    def __init__(self, path: str | os.PathLike[str], host: str) -> None:
        self.path = Path(path)
        self.host = host
        self._gpus: list[SimGpu] = []
        self._mtime: float | None = None
        self._warned = False
        # GPU index -> (its `resets` when set, the limit set in watts)
        self._set: dict[int, tuple[int, float]] = {}
        self._load()

    def _load(self) -> list[SimGpu]:
        try:
            stat = self.path.stat()
            if self._mtime is not None and stat.st_mtime == self._mtime and self._gpus:
                return self._gpus
            decoded: Any = _sim_decoder.decode(self.path.read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not self._warned:
                log.warning("simulated GPUs: cannot read %s (%s); keeping the last reading", self.path, exc)
                self._warned = True
            return self._gpus
        self._warned = False
        self._mtime = stat.st_mtime
        self._gpus = list(decoded.gpus if isinstance(decoded, SimFile) else decoded)
        return self._gpus

    def count(self) -> int:
        return len(self._load())

    def sample(self, index: int) -> GpuSample:
        gpus = self._load()
        if not 0 <= index < len(gpus):
            raise IndexError(f"no simulated GPU {index} (the file lists {len(gpus)})")
        g = gpus[index]
        return GpuSample(
            host=self.host,
            index=index,
            name=g.name,
            at=time.time(),
            util_pct=g.util_pct,
            mem_used_mb=g.mem_used_mb,
            mem_total_mb=g.mem_total_mb,
            temp_c=g.temp_c,
            power_w=g.power_w,
            power_limit_w=self.power_limit(index),
            sm_clock_mhz=g.sm_clock_mhz,
            mem_clock_mhz=g.mem_clock_mhz,
            throttle_reasons=list(g.throttle_reasons),
            xid_errors=(g.xid_errors or 0) + len(g.xids) if g.xids else g.xid_errors,
            ecc_errors=g.ecc_errors,
            simulated=True,
            last_xid=g.xids[-1] if g.xids else None,
        )

    # power caps: a limit set lasts until the GPU's `resets` changes; every set is recorded,
    # one JSON line each, in `<file>.sets.jsonl` (what a test reads to see what was set)
    def _gpu(self, index: int) -> SimGpu:
        gpus = self._load()
        if not 0 <= index < len(gpus):
            raise PowerSetError(f"no simulated GPU {index} (the file lists {len(gpus)})")
        g = gpus[index]
        if index in self._set and self._set[index][0] != g.resets:
            del self._set[index]  # a driver reset: the default is back
        return g

    def power_range(self, index: int) -> PowerRange:
        g = self._gpu(index)
        default = g.power_default_w or g.power_limit_w
        return PowerRange(min_w=g.power_min_w, max_w=g.power_max_w or default, default_w=default)

    def power_limit(self, index: int) -> float | None:
        g = self._gpu(index)
        return self._set[index][1] if index in self._set else g.power_limit_w

    def set_power_limit(self, index: int, watts: float) -> None:
        g = self._gpu(index)
        problem = self.power_range(index).problem(watts)
        if problem:  # NVML answers NVML_ERROR_INVALID_ARGUMENT
            raise PowerSetError(f"GPU {index}: cannot set its power limit to {watts:g} W: {problem}")
        self._set[index] = (g.resets, float(watts))
        with open(self.sets_path, "a", encoding="utf-8") as f:
            f.write(
                json.dumps({"index": index, "watts": float(watts), "resets": g.resets, "at": time.time()})
                + "\n"
            )

    def generation(self, index: int) -> int:
        return self._gpu(index).resets

    @property
    def sets_path(self) -> Path:
        return self.path.with_name(self.path.name + ".sets.jsonl")

    def close(self) -> None:
        pass


def write_simulated(path: str | os.PathLike[str], gpus: list[dict[str, Any]]) -> None:
    """Write a simulated GPU file atomically (what tests and demos use to drive a watchdog)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"gpus": gpus}))
    os.replace(tmp, target)


def inject_xid(path: str | os.PathLike[str], index: int, code: int) -> None:
    """An XID event on simulated GPU `index`, as NVML would report it (tests, demos)."""
    data = json.loads(Path(path).read_text())
    gpus = data["gpus"] if isinstance(data, dict) else data
    gpus[index].setdefault("xids", []).append(code)
    write_simulated(path, gpus)


def open_source(host: str, simulated: str = "") -> GpuSource | None:
    """The host's GPUs: the simulated set when `simulated` names a file, else NVML; None when
    NVML cannot start (no NVIDIA driver, no nvidia-ml-py): the watchdog then reads the host only."""
    if simulated:
        return SimulatedSource(simulated, host)
    try:
        import pynvml
    except ImportError:
        log.debug("nvidia-ml-py is not installed")
        return None
    try:
        return NvmlSource(host)
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return None


# ---------------------------------------------------------------- the host


def _temps() -> dict[str, float]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return {}
    out: dict[str, float] = {}
    for name, readings in (sensors or {}).items():
        values = [r.current for r in readings if r.current is not None]
        if values:
            out[name] = float(max(values))
    return out


CPUFREQ = "/sys/devices/system/cpu"


def cpu_governors(root: str | os.PathLike[str] = CPUFREQ) -> dict[str, int]:
    """Each CPU frequency governor in use -> how many CPUs use it; {} where cpufreq is absent."""
    out: dict[str, int] = {}
    for path in sorted(Path(root).glob("cpu[0-9]*/cpufreq/scaling_governor")):
        try:
            governor = path.read_text().strip()
        except OSError:
            continue
        if governor:
            out[governor] = out.get(governor, 0) + 1
    return out


def sample_host(host: str, disk_path: str, cpufreq_root: str | os.PathLike[str] = CPUFREQ) -> HostSample:
    """The host now. CPU percentages are since the previous call (the first call's are since
    import, so call once at start and discard, as the watchdog does)."""
    per_core = [float(p) for p in psutil.cpu_percent(percpu=True)]
    cpu = sum(per_core) / len(per_core) if per_core else 0.0
    load1, load5, load15 = os.getloadavg()
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    path = Path(disk_path)
    # the data directory may not exist yet: its nearest existing parent is on the same filesystem
    while not path.exists() and path != path.parent:
        path = path.parent
    du = psutil.disk_usage(str(path))
    return HostSample(
        host=host,
        at=time.time(),
        cpu_pct=cpu,
        per_core=per_core,
        load1=load1,
        load5=load5,
        load15=load15,
        ram_used_mb=int((vm.total - vm.available) // MB),
        ram_total_mb=int(vm.total // MB),
        swap_used_mb=int(sw.used // MB),
        swap_total_mb=int(sw.total // MB),
        disk_path=str(path),
        disk_used_mb=int(du.used // MB),
        disk_total_mb=int(du.total // MB),
        disk_free_pct=100.0 * du.free / du.total if du.total else 100.0,
        temps=_temps(),
        swap_in_mb=sw.sin / MB if sw.sin is not None else None,
        swap_out_mb=sw.sout / MB if sw.sout is not None else None,
        cpu_governors=cpu_governors(cpufreq_root),
    )
