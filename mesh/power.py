"""GPU power caps as data: the config's `[gpus]` tables, the cap each GPU should have, the
card's allowed range, and whether a limit read back means the cap must be set again.

Pure: the watchdog (agents/watchdog_power.py) reads and sets limits through NVML
(mesh.host.telemetry) and asks these functions what to do. Watts throughout; NVML's
milliwatts stay in mesh.host.telemetry.

The config: `[gpus] power_limit_w = 140` caps every GPU of the host, `[gpus.N] power_limit_w =
120` one GPU (by its NVML index), over the one for all. An operator's `mesh gpu power N WATTS`
is kept in the control bucket and overrides both until `mesh gpu power N --config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# a limit read back within this of the cap is the cap (NVML rounds to the card's step)
TOLERANCE_W = 1.0


class PowerError(ValueError):
    """A power cap that cannot be: a bad config table, or watts outside the card's range."""


@dataclass(frozen=True)
class PowerCaps:
    """The caps the config asks for: one for every GPU (None: none), and per GPU index."""

    all_w: float | None = None
    per_gpu: Mapping[int, float] = field(default_factory=dict)

    def cap(self, index: int) -> float | None:
        """The configured cap of one GPU (None: leave its limit alone)."""
        return self.per_gpu.get(index, self.all_w)

    def __bool__(self) -> bool:
        return self.all_w is not None or bool(self.per_gpu)


def _watts(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PowerError(f"{where}: power_limit_w must be a number of watts, not {value!r}")
    if value <= 0:
        raise PowerError(f"{where}: power_limit_w must be above 0 W, not {value!r}")
    return float(value)


def parse_caps(table: Mapping[str, Any]) -> PowerCaps:
    """The `[gpus]` table of the config: `power_limit_w` for all, `N = {power_limit_w = W}` for
    GPU N. Raises PowerError naming the table that is wrong."""
    all_w: float | None = None
    per_gpu: dict[int, float] = {}
    for key, value in table.items():
        if key == "power_limit_w":
            all_w = _watts(value, "[gpus]")
            continue
        if not key.isdigit():
            raise PowerError(
                f"[gpus.{key}]: a GPU is named by its index (0, 1, ...); the one setting of "
                "[gpus] itself is power_limit_w"
            )
        if not isinstance(value, Mapping):
            raise PowerError(f"[gpus.{key}] must be a table (power_limit_w = WATTS), not {value!r}")
        unknown = sorted(set(value) - {"power_limit_w"})
        if unknown:
            raise PowerError(f"[gpus.{key}]: unknown setting(s) {', '.join(unknown)}; known: power_limit_w")
        if "power_limit_w" in value:
            per_gpu[int(key)] = _watts(value["power_limit_w"], f"[gpus.{key}]")
    return PowerCaps(all_w, per_gpu)


@dataclass(frozen=True)
class PowerRange:
    """What a card allows (NVML's constraints) and its default limit, in watts."""

    min_w: float
    max_w: float
    default_w: float

    def problem(self, watts: float) -> str:
        """Why `watts` cannot be this card's limit ('' when it can)."""
        if self.min_w - TOLERANCE_W / 2 <= watts <= self.max_w + TOLERANCE_W / 2:
            return ""
        return (
            f"{watts:g} W is outside this card's allowed power limits, {self.min_w:g}-{self.max_w:g} W "
            f"(its default is {self.default_w:g} W)"
        )


def wanted(caps: PowerCaps, override: float | None, index: int) -> float | None:
    """The limit GPU `index` should have: an operator's override, else the config's cap; None
    when neither asks for one (its limit is left as the driver has it)."""
    return override if override is not None else caps.cap(index)


def drifted(want: float | None, read_back: float | None) -> bool:
    """Whether the limit read back is not the cap set (a driver reset or another tool put the
    default back): set it again. No cap, or no reading, is no drift."""
    if want is None or read_back is None:
        return False
    return abs(read_back - want) > TOLERANCE_W


@dataclass(frozen=True)
class Applied:
    """What the watchdog last set on a GPU: the watts, and the device's generation then (a
    generation that moved on is a driver reset: the device came back with its default)."""

    watts: float
    generation: int


def to_set(
    want: float | None, applied: Applied | None, generation: int, read_back: float | None
) -> tuple[float | None, str]:
    """Whether a GPU's limit must be set now, to what, and why ((None, '') when not).

    The cap is set when it was never set or changed; set again after a driver reset (the
    device's handle was taken again, or the limit read back is not the cap). A cap taken away
    puts the card's default back (the caller knows it: `None` watts with a reason means that)."""
    if want is None:
        if applied is None:
            return None, ""
        return None, "no cap asked for any more: back to the card's default"
    if applied is None or abs(applied.watts - want) > TOLERANCE_W / 2:
        return want, f"the cap asked for is {want:g} W"
    if applied.generation != generation:
        return want, "the device was reset (its handle taken again): its cap is set again"
    if drifted(want, read_back):
        assert read_back is not None
        return want, (
            f"its limit read back {read_back:g} W, not the {want:g} W set (a driver reset, or "
            "another tool): set again"
        )
    return None, ""
