"""The watchdog's readings as data: one GPU's sample, the host's, and their JSON form.
Pure structs (and NVML's throttle-reason bits by name); reading the devices is mesh.host.telemetry.

Samples are plain msgspec Structs, JSON on the wire like every mesh message, but they are not
events: the watchdog publishes them as core NATS messages (nothing stores them) and keeps only
the latest of each in the telemetry bucket. So they are not members of `mesh.events.Message`;
`decode_sample` reads them.
"""

from __future__ import annotations

import msgspec


class GpuSample(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="tel.gpu"):
    """One reading of one GPU. A reading the device does not offer is None."""

    host: str
    index: int
    name: str
    at: float
    util_pct: float | None = None
    mem_used_mb: int | None = None
    mem_total_mb: int | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    # the power cap this host's watchdog holds the GPU at (`[gpus]`, `mesh gpu power`); None: none
    power_cap_w: float | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    # why the clocks are held down now (names such as 'sw_thermal', 'hw_slowdown'; 'gpu_idle' omitted)
    throttle_reasons: list[str] = msgspec.field(default_factory=list)
    # critical XID events seen since the watchdog started; uncorrected ECC errors (volatile)
    xid_errors: int | None = None
    ecc_errors: int | None = None
    simulated: bool = False
    # the code of the last XID event seen (79: fallen off the bus, 13: graphics engine exception, ...)
    last_xid: int | None = None

    @property
    def gpu_id(self) -> str:
        """The id its worker uses in the gpus bucket and `gpu.*` events."""
        return f"{self.host}-gpu{self.index}"

    @property
    def mem_used_pct(self) -> float | None:
        if self.mem_used_mb is None or not self.mem_total_mb:
            return None
        return 100.0 * self.mem_used_mb / self.mem_total_mb


class HostSample(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="tel.host"):
    """One reading of the host. `disk_*` is the filesystem of the data directory."""

    host: str
    at: float
    cpu_pct: float
    per_core: list[float]
    load1: float
    load5: float
    load15: float
    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int
    swap_total_mb: int
    disk_path: str
    disk_used_mb: int
    disk_total_mb: int
    disk_free_pct: float
    # sensor name -> hottest current reading (only where psutil sees sensors)
    temps: dict[str, float] = msgspec.field(default_factory=dict)
    # swapped in and out since boot, MB (None where the system does not say)
    swap_in_mb: float | None = None
    swap_out_mb: float | None = None
    # CPU frequency governor -> how many CPUs use it (empty where cpufreq is absent)
    cpu_governors: dict[str, int] = msgspec.field(default_factory=dict)


Sample = GpuSample | HostSample
_decoder: msgspec.json.Decoder[Sample] = msgspec.json.Decoder(Sample)
_encoder = msgspec.json.Encoder()


def encode_sample(sample: Sample) -> bytes:
    return _encoder.encode(sample)


def decode_sample(data: bytes) -> Sample:
    return _decoder.decode(data)


# NVML's clock event (throttle) reason bits, by the names samples carry
_THROTTLE_BITS: dict[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
    "display_clocks": 0x100,
}


def throttle_names(mask: int) -> list[str]:
    """The reasons in an NVML clock event mask, idle left out (an idle card is not throttled)."""
    return [name for name, bit in _THROTTLE_BITS.items() if mask & bit and name != "gpu_idle"]
