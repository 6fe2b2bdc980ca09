"""Telemetry history as data: samples averaged into fixed time buckets, one series per resolution.
Pure: the watchdog feeds samples in and publishes the points out (mesh.bus.telhistory stores them).

A *tier* is a resolution and how long its points are kept (10 s for a day, 1 min for a week by
default). Each tier averages the raw samples on its own, over buckets aligned to its resolution
(`at` of a point is its bucket's start), so a restarted watchdog continues the same buckets.
A point holds the mean of each reading over its bucket, the peak of each, and how many samples
it took; `Series` gathers the points read back, and `sparkline` draws one reading of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from mesh.samples import GpuSample, HostSample

# what a point keeps of each sample kind (the readings worth charting)
GPU_FIELDS = ("util_pct", "mem_used_mb", "mem_total_mb", "temp_c", "power_w", "power_limit_w", "sm_clock_mhz")
HOST_FIELDS = ("cpu_pct", "load1", "ram_used_mb", "ram_total_mb", "swap_used_mb", "disk_free_pct")

SPARK = "▁▂▃▄▅▆▇█"


class HistoryPoint(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="tel.point"):
    """One bucket of one GPU's (`kind` "gpu", `index` >= 0) or host's (`index` -1) readings."""

    kind: str
    host: str
    index: int = -1
    res_s: int
    at: float
    samples: int
    mean: dict[str, float] = msgspec.field(default_factory=dict)
    peak: dict[str, float] = msgspec.field(default_factory=dict)
    # published before its bucket closed (a watchdog stopping): a watchdog started again within
    # the bucket publishes it again, whole or not, and a reader keeps the one of more samples
    partial: bool = False

    @property
    def key(self) -> str:
        """`<host>.gpu<N>` or `<host>.host`, as in the telemetry bucket."""
        return f"{self.host}.gpu{self.index}" if self.kind == "gpu" else f"{self.host}.host"

    @property
    def msg_id(self) -> str:
        """Names the bucket: a point published again (a retried publish) is stored once."""
        return f"{self.key}:{self.res_s}:{int(self.at)}" + (":partial" if self.partial else "")


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(HistoryPoint)


def encode_point(point: HistoryPoint) -> bytes:
    return _encoder.encode(point)


def decode_point(data: bytes) -> HistoryPoint:
    """Raises ValueError (msgspec's errors) on anything that is not a point."""
    return _decoder.decode(data)


@dataclass(frozen=True)
class Tier:
    res_s: int
    keep_s: float


def tiers(fine_s: int, fine_keep_h: float, coarse_s: int, coarse_keep_h: float) -> tuple[Tier, ...]:
    """The configured tiers, finest first; one with no resolution or no retention is left out."""
    out = {
        Tier(int(r), k * 3600.0)
        for r, k in ((fine_s, fine_keep_h), (coarse_s, coarse_keep_h))
        if r > 0 and k > 0
    }
    return tuple(sorted(out, key=lambda t: t.res_s))


def pick_tier(available: Sequence[Tier], since: float, now: float) -> Tier | None:
    """The finest tier that still holds `since`; the longest-kept one when none does."""
    if not available:
        return None
    for tier in available:
        if now - since <= tier.keep_s:
            return tier
    return max(available, key=lambda t: t.keep_s)


@dataclass
class _Bucket:
    at: float
    count: int
    sums: dict[str, float]
    counts: dict[str, int]
    peaks: dict[str, float]


def _readings(sample: GpuSample | HostSample) -> dict[str, float]:
    fields = GPU_FIELDS if isinstance(sample, GpuSample) else HOST_FIELDS
    out: dict[str, float] = {}
    for name in fields:
        value = getattr(sample, name)
        if value is not None and math.isfinite(float(value)):
            out[name] = float(value)
    return out


class Rollup:
    """Averages samples into each tier's buckets; `add` returns the buckets a sample closed."""

    def __init__(self, resolutions: Iterable[int]) -> None:
        self.resolutions = tuple(sorted({int(r) for r in resolutions if r > 0}))
        # (kind, host, index, res) -> the bucket being filled
        self.open: dict[tuple[str, str, int, int], _Bucket] = {}

    def add(self, sample: GpuSample | HostSample) -> list[HistoryPoint]:
        kind, index = ("gpu", sample.index) if isinstance(sample, GpuSample) else ("host", -1)
        values = _readings(sample)
        closed: list[HistoryPoint] = []
        for res in self.resolutions:
            at = math.floor(sample.at / res) * res
            key = (kind, sample.host, index, res)
            bucket = self.open.get(key)
            if bucket is not None and at != bucket.at:
                if at < bucket.at:
                    continue  # a clock stepped back: the sample belongs to a bucket already closed
                closed.append(_point(key, bucket))
                bucket = None
            if bucket is None:
                bucket = self.open[key] = _Bucket(at, 0, {}, {}, {})
            bucket.count += 1
            for name, value in values.items():
                bucket.sums[name] = bucket.sums.get(name, 0.0) + value
                bucket.counts[name] = bucket.counts.get(name, 0) + 1
                bucket.peaks[name] = max(bucket.peaks.get(name, value), value)
        return closed

    def flush(self) -> list[HistoryPoint]:
        """Every bucket still open, as it stands (on stop)."""
        out = [_point(key, bucket, partial=True) for key, bucket in self.open.items() if bucket.count]
        self.open.clear()
        return out


def _point(key: tuple[str, str, int, int], bucket: _Bucket, partial: bool = False) -> HistoryPoint:
    kind, host, index, res = key
    # a reading some samples lacked is averaged over the samples that had it
    return HistoryPoint(
        kind=kind,
        host=host,
        index=index,
        res_s=res,
        at=bucket.at,
        samples=bucket.count,
        mean={k: round(v / bucket.counts[k], 3) for k, v in bucket.sums.items()},
        peak={k: round(v, 3) for k, v in bucket.peaks.items()},
        partial=partial,
    )


@dataclass
class Series:
    """One GPU's or host's points over a window, oldest first."""

    key: str
    res_s: int
    points: list[HistoryPoint]

    def values(self, field: str) -> list[float | None]:
        return [p.mean.get(field) for p in self.points]

    def summary(self, field: str) -> tuple[float, float, float] | None:
        """(min of the means, mean, max of the peaks) of one reading, or None without any."""
        means = [v for v in self.values(field) if v is not None]
        if not means:
            return None
        peaks = [p.peak.get(field, p.mean.get(field, 0.0)) for p in self.points if field in p.mean]
        return min(means), sum(means) / len(means), max(peaks)


def one_per_bucket(points: Iterable[HistoryPoint]) -> list[HistoryPoint]:
    """Where a bucket was stored twice (a partial point, then the bucket again after a restart),
    the point of more samples; in time order."""
    best: dict[tuple[str, int, float], HistoryPoint] = {}
    for p in points:
        key = (p.key, p.res_s, p.at)
        if key not in best or p.samples > best[key].samples:
            best[key] = p
    return sorted(best.values(), key=lambda p: (p.at, p.key))


def series_of(points: Iterable[HistoryPoint]) -> list[Series]:
    """Points grouped by GPU or host, each series in time order, series sorted by key."""
    groups: dict[str, list[HistoryPoint]] = {}
    res: dict[str, int] = {}
    for p in one_per_bucket(points):
        groups.setdefault(p.key, []).append(p)
        res[p.key] = p.res_s
    return [Series(k, res[k], sorted(groups[k], key=lambda p: p.at)) for k in sorted(groups)]


def sparkline(
    values: Sequence[float | None], width: int, lo: float | None = None, hi: float | None = None
) -> str:
    """`values` squeezed into `width` cells (each the mean of its share), drawn with block
    characters between `lo` and `hi` (their own range when not given); a gap is a space."""
    if not values or width <= 0:
        return ""
    cells: list[float | None] = []
    n = len(values)
    for i in range(min(width, n)):
        share = [v for v in values[i * n // min(width, n) : (i + 1) * n // min(width, n)] if v is not None]
        cells.append(sum(share) / len(share) if share else None)
    present = [c for c in cells if c is not None]
    if not present:
        return " " * len(cells)
    low = min(present) if lo is None else lo
    high = max(present) if hi is None else hi
    span = high - low
    out = []
    for c in cells:
        if c is None:
            out.append(" ")
        elif span <= 0:
            out.append(SPARK[0])
        else:
            level = int((min(max(c, low), high) - low) / span * (len(SPARK) - 1) + 0.5)
            out.append(SPARK[level])
    return "".join(out)
