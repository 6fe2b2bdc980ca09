"""Learned figures: load times, VRAM used and task durations measured from the history, which
replace the configured guesses once enough samples exist. Pure, no I/O; part of the brain's state.

What is measured, from the events the brain already folds:

- a model's **load time**: `took_s` of a `gpu.state` leaving `booting_llm` for `llm_ready` or
  `llm_busy` (how long the GPU was booting it);
- the **VRAM a load used**: `vram_used_mb` of that same report minus `vram_used_mb` of the
  GPU's report entering `booting_llm` (the worker reads the memory after closing its script
  models and before loading, and again after the load);
- a task's **duration**, from each `task.succeeded` a worker ran (not an answer of Claude),
  under its model's name and under `class:<cls>` and `kind:<kind>` (`by_class`, `by_kind`).

The estimator is the median of the last `window` samples of a key: robust to an outlier (a
load from a cold disk, a task that waited on a lock), and it follows a change (a new driver, a
new quantisation) within `window / 2` samples. Until a key has `min_samples` samples the
caller's prior (the configured figure) is answered unchanged. Memory is bounded: `window`
samples per key and at most `MAX_KEYS` keys per table (the least recently fed goes first).

Everything here is a function of the events folded, in order: replaying the history rebuilds
the same figures. The brain keeps one in its state and writes it with its checkpoint.
"""

from __future__ import annotations

import math

import msgspec

from mesh.events import GpuState, Msg, TaskSpec, TaskSucceeded

# GPU states, as the workers report them (`mesh.placement` names them too; that module imports
# this one)
_BOOTING_LLM = "booting_llm"
_LLM_UP = ("llm_ready", "llm_busy")

# the tables
LOAD = "load"
VRAM = "vram"
DURATION = "duration"
TABLES: tuple[str, ...] = (LOAD, VRAM, DURATION)

MAX_KEYS = 256
DEFAULT_MIN_SAMPLES = 3
DEFAULT_WINDOW = 20


def by_class(cls: str) -> str:
    """The duration key of a task class (`cpu`, `script`, `llm`)."""
    return f"class:{cls}"


def by_kind(kind: str) -> str:
    """The duration key of a body kind (`shell`, `prompt`, `transcribe`, `embed`, ...)."""
    return f"kind:{kind}"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


class Series(msgspec.Struct, kw_only=True):
    """One key's samples: the last `window`, oldest first."""

    samples: list[float] = msgspec.field(default_factory=list)
    # every sample ever taken (the window holds the last few of them)
    n: int = 0
    # the table's feed count when this key was last fed: the least recent goes when a table is full
    fed: int = 0


class Figure(msgspec.Struct, frozen=True, kw_only=True):
    """A learned figure as shown to an operator: the estimate, how many samples it rests on,
    and whether it is used in place of the prior yet."""

    value: float
    samples: int
    in_use: bool


class Learned(msgspec.Struct, kw_only=True):
    """Per-model (and per class and kind) running estimates, folded from events."""

    min_samples: int = DEFAULT_MIN_SAMPLES
    window: int = DEFAULT_WINDOW
    load: dict[str, Series] = msgspec.field(default_factory=dict)
    vram: dict[str, Series] = msgspec.field(default_factory=dict)
    duration: dict[str, Series] = msgspec.field(default_factory=dict)
    # GPU id -> VRAM used when its current LLM load began
    booting: dict[str, int] = msgspec.field(default_factory=dict)
    # samples taken in all (it moves whenever a figure may have changed)
    fed: int = 0

    # ------------------------------------------------------------------ settings
    def tune(self, min_samples: int, window: int) -> None:
        """Apply the settings (`learn_min_samples`, `learn_window`); a shorter window drops the
        oldest samples at once."""
        self.min_samples = max(1, min_samples)
        self.window = max(self.min_samples, window)
        for table in (self.load, self.vram, self.duration):
            for series in table.values():
                del series.samples[: -self.window]

    # ------------------------------------------------------------------ folding
    def observe(self, msg: Msg, spec: TaskSpec | None = None) -> None:
        """Fold one event: a `gpu.state` (load time and VRAM of a finished load), or a
        `task.succeeded` with its task's `spec` (a duration). Anything else changes nothing."""
        match msg:
            case GpuState():
                self._gpu_state(msg)
            case TaskSucceeded():
                if spec is None or not msg.worker or msg.duration_s < 0:
                    return  # Claude's answer, not a run: it says nothing of local work
                if spec.model:
                    self._add(self.duration, spec.model, msg.duration_s)
                self._add(self.duration, by_class(spec.cls), msg.duration_s)
                self._add(self.duration, by_kind(spec.kind), msg.duration_s)

    def _gpu_state(self, ev: GpuState) -> None:
        if ev.state == _BOOTING_LLM:
            if ev.previous != _BOOTING_LLM:
                self.booting.pop(ev.gpu, None)  # (re-inserted last: the dict keeps its age order)
                self.booting[ev.gpu] = ev.vram_used_mb
                while len(self.booting) > MAX_KEYS:
                    del self.booting[next(iter(self.booting))]
            return
        before = self.booting.pop(ev.gpu, None)
        if ev.previous != _BOOTING_LLM or ev.state not in _LLM_UP or not ev.llm or ev.error:
            return  # not a load that finished (a refusal, a failure, an offline worker)
        if ev.took_s > 0:
            self._add(self.load, ev.llm, ev.took_s)
        if before is not None and ev.vram_used_mb > before:
            self._add(self.vram, ev.llm, float(ev.vram_used_mb - before))

    def _add(self, table: dict[str, Series], key: str, value: float) -> None:
        self.fed += 1
        series = table.get(key)
        if series is None:
            if len(table) >= MAX_KEYS:
                del table[min(table, key=lambda k: (table[k].fed, k))]
            series = table[key] = Series()
        samples = series.samples
        samples.append(round(value, 3))
        if len(samples) > self.window:
            del samples[: -self.window]
        series.n += 1
        series.fed = self.fed

    # ------------------------------------------------------------------ reading
    def _estimate(self, table: dict[str, Series], key: str) -> float | None:
        series = table.get(key)
        if series is None or len(series.samples) < self.min_samples:
            return None
        return median(series.samples)

    def load_s(self, model: str, prior: float) -> float:
        """How long loading `model` takes, seconds (`prior` until enough loads were seen)."""
        found = self._estimate(self.load, model)
        return prior if found is None else found

    def vram_mb(self, model: str, prior: int) -> int:
        """The VRAM `model` takes once loaded, MB, rounded up (`prior` until enough loads)."""
        found = self._estimate(self.vram, model)
        return prior if found is None else math.ceil(found)

    def duration_s(self, model_or_class: str, prior: float) -> float:
        """How long a task runs, seconds: of a model (its name), a class (`by_class`) or a body
        kind (`by_kind`); `prior` until enough successful runs were seen."""
        found = self._estimate(self.duration, model_or_class)
        return prior if found is None else found

    def samples(self, table: str, key: str) -> int:
        """Samples taken in all for `key` in `table` (LOAD, VRAM or DURATION)."""
        series = self._table(table).get(key)
        return series.n if series is not None else 0

    def figure(self, table: str, key: str) -> Figure | None:
        """The estimate of `key` in `table` with its samples, used or not yet (None: no sample)."""
        series = self._table(table).get(key)
        if series is None or not series.samples:
            return None
        return Figure(
            value=median(series.samples),
            samples=series.n,
            in_use=len(series.samples) >= self.min_samples,
        )

    def keys(self, table: str) -> list[str]:
        return sorted(self._table(table))

    def _table(self, table: str) -> dict[str, Series]:
        match table:
            case "load":
                return self.load
            case "vram":
                return self.vram
            case "duration":
                return self.duration
        raise ValueError(f"no table {table!r}: {', '.join(TABLES)}")
