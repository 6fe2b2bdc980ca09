"""Placement's arithmetic: how many GPUs each class of model work needs, now and over time, and
which GPUs are each class's share. Pure, no I/O; `mesh.placement` decides loads and unloads with it.

A *class* of work is one LLM model's tasks (`llm:<model>`) or all script work (`script`). For
each, the brain counts the tasks waiting (waiting or released) and running and those that
arrived, and is told how long a task and a load take (`Figures`: measured figures, else the
settings' priors). From these:

- `Work.need`: the GPUs its work keeps busy now: the tasks running, plus the waiting work
  spread over one load time (a GPU loaded now starts helping that much later), at most one
  GPU per waiting task, at most the GPUs it fits;
- `Pressure`, kept between decisions: that need's *level*, which rises within a minute
  (`RISE_S`) and falls within `memory_s` (about the most GPUs its work of the last while kept
  busy); and each class's arrivals: when the last came and the usual gap between them (tasks
  submitted together are one arrival), so a class whose work *stopped* (none waits or runs,
  none arrived for `STOP_GAPS` usual gaps) is told from one between bursts;
- `allocate`: each class's *share*, GPU by GPU: one for each class with work (the class that
  fits the fewest GPUs first), then one at a time to the class with the highest level per
  GPU it would have, none beyond its level, a class keeping a GPU it holds unless another's
  level per GPU is `1 + STICK` times its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mesh.learned import by_class

# the duration key of script work as a whole
SCRIPT_DURATION_KEY = by_class("script")
# GPUs of slack: a class keeps another GPU only once its need is this far above a whole number
SLACK = 0.25
# a class keeps a GPU it holds unless another's need per GPU is 1 + STICK times its own
STICK = 0.5
# the level rises with this time constant (seconds)
RISE_S = 60.0
# the weight of the newest gap in a class's usual gap between arrivals; the gaps seen before it
# is trusted; and how many usual gaps of quiet make a class with no work stopped
GAP_WEIGHT = 0.25
MIN_GAPS = 3
STOP_GAPS = 8.0


class Figures(Protocol):
    """Measured figures, by model (and `class:<cls>` for a class's tasks); `prior` until known.
    `mesh.learned.Learned` is one."""

    def duration_s(self, model_or_class: str, prior: float) -> float: ...

    def load_s(self, model: str, prior: float) -> float: ...

    def vram_mb(self, model: str, prior: int) -> int: ...


class Priors:
    """No measured figures: every answer is the prior."""

    def duration_s(self, model_or_class: str, prior: float) -> float:
        return prior

    def load_s(self, model: str, prior: float) -> float:
        return prior

    def vram_mb(self, model: str, prior: int) -> int:
        return prior


@dataclass
class Work:
    """One class of work as placement sees it."""

    key: str
    # the LLM model ('' for script work)
    model: str
    waiting: int
    running: int
    # expected seconds of one task, and of loading the model (0 for script work)
    task_s: float
    load_s: float
    # usable GPU views that could ever hold it
    fits: int
    # tasks one GPU runs at once
    slots: int = 1
    # GPUs holding (or loading) it now, not counting one whose unload is in flight; for script
    # work, the GPUs free of LLMs
    holders: int = 0
    need: float = 0.0
    # `need` over time (`Pressure`): rises within a minute, falls within memory_s
    level: float = 0.0
    # none of its work waits or runs, and none arrived for STOP_GAPS of its usual gaps
    stopped: bool = False

    @property
    def tasks(self) -> int:
        return self.waiting + self.running

    @property
    def name(self) -> str:
        return self.model or "script"

    def compute_need(self, horizon_s: float) -> float:
        """GPUs its work keeps busy now: running tasks, plus the waiting work spread over
        `horizon_s` (at most one GPU per waiting task), at most the GPUs it fits."""
        backlog = self.waiting * self.task_s / max(horizon_s, 1e-9)
        busy = (self.running + min(self.waiting, backlog)) / max(self.slots, 1)
        self.need = min(float(self.fits), busy)
        return self.need

    def backlog_s(self, gpus: int) -> float:
        """Seconds of waiting work each GPU would get if `gpus` held the model."""
        return self.waiting * self.task_s / max(gpus * self.slots, 1)

    def pays(self, factor: float) -> bool:
        """One more GPU would get at least `factor` load times of the waiting work (the first
        GPU always pays while work waits; never more GPUs than tasks)."""
        if self.waiting <= 0:
            return False
        if self.holders == 0:
            return True
        if self.holders * self.slots >= self.tasks:
            return False
        return self.backlog_s(self.holders + 1) >= factor * self.load_s

    def keeps(self) -> int:
        """GPUs its work of the last while keeps: its level, rounded up after SLACK (one while
        any of its work waits or runs)."""
        kept = math.ceil(max(self.level - SLACK, 0.0))
        return max(kept, 1 if self.tasks else 0)


@dataclass
class Pressure:
    """Each class's need and arrivals over time, and how long each GPU has been in its
    share: placement's memory between decisions (kept in the brain's state, empty after a
    restart)."""

    level: dict[str, float] = field(default_factory=dict)
    # arrivals: the count last seen, when the last came, the usual gap, the gaps seen
    arrived: dict[str, int] = field(default_factory=dict)
    last_arrival: dict[str, float] = field(default_factory=dict)
    gap: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, int] = field(default_factory=dict)
    # GPU id -> (the class whose share it is, since when it left another class's share)
    owners: dict[str, tuple[str, float]] = field(default_factory=dict)
    at: float | None = None

    def update(
        self, needs: Mapping[str, float], arrived: Mapping[str, int], now: float, memory_s: float
    ) -> None:
        """Fold in the needs and arrival counts seen at `now`."""
        dt = 0.0 if self.at is None else max(now - self.at, 0.0)
        for key in sorted(set(needs) | set(self.level)):
            _follow(self.level, key, needs.get(key, 0.0), dt, RISE_S, memory_s)
        for key in sorted(arrived):
            count = arrived[key]
            if count > self.arrived.get(key, 0):
                last = self.last_arrival.get(key)
                if last is not None:
                    gap = now - last
                    self.gap[key] = self.gap.get(key, gap) + GAP_WEIGHT * (gap - self.gap.get(key, gap))
                    self.gaps[key] = self.gaps.get(key, 0) + 1
                self.last_arrival[key] = now
            self.arrived[key] = count
        self.at = now

    def stopped(self, w: Work, now: float, at_least_s: float, unknown_s: float) -> bool:
        """None of its work waits or runs, and none arrived for at least `at_least_s` and
        STOP_GAPS of its usual gaps (`unknown_s` while fewer than MIN_GAPS gaps were seen)."""
        if w.tasks:
            return False
        quiet = now - self.last_arrival.get(w.key, -math.inf)
        usual = STOP_GAPS * self.gap[w.key] if self.gaps.get(w.key, 0) >= MIN_GAPS else unknown_s
        return quiet >= max(at_least_s, usual)

    def settle(self, owner: Mapping[str, str], now: float) -> dict[str, float]:
        """Note each GPU's share; how long it has been in it (a GPU that was in no share, or
        is new, counts as in it for ever)."""
        for gpu in sorted(owner):
            key = self.owners.get(gpu, ("", -math.inf))[0]
            if key != owner[gpu]:
                self.owners[gpu] = (owner[gpu], now if key else -math.inf)
        for gpu in [g for g in self.owners if g not in owner]:
            del self.owners[gpu]
        return {gpu: now - since for gpu, (_, since) in self.owners.items()}


def _follow(table: dict[str, float], key: str, x: float, dt: float, rise_s: float, fall_s: float) -> None:
    """Move `table[key]` towards `x` over `dt`: an exponential average with one time constant
    rising and another falling (a new key starts from zero; one back at zero is dropped)."""
    old = table.get(key, 0.0)
    tau = rise_s if x > old else fall_s
    new = x if tau <= 0 else old + (x - old) * (1.0 - math.exp(-dt / tau))
    if new < 1e-3 and x <= 0:
        table.pop(key, None)
    else:
        table[key] = new


def allocate(works: Sequence[Work], candidates: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Each class's share of the GPUs, as GPU id -> class key (see the module's docstring).
    `candidates`: the GPUs each class could have, by its key, the ones it would rather have
    first (those it holds, then the smallest that fit)."""
    owner: dict[str, str] = {}
    share = {w.key: 0 for w in works}

    def free(w: Work) -> str | None:
        return next((g for g in candidates.get(w.key, ()) if g not in owner), None)

    def give(w: Work) -> None:
        g = free(w)
        if g is not None:
            owner[g] = w.key
            share[w.key] += 1

    # one GPU for each class with work, then for each with recent work that has not stopped (a
    # GPU given away in a lull costs a load when that work comes back): no class with work
    # waits on one whose work is between bursts; where GPUs are fewer than classes with work,
    # those no GPU serves come first (they take turns, min_residency_s apart)
    order = sorted(works, key=lambda w: (not w.tasks, w.holders > 0, len(candidates.get(w.key, ())), w.key))
    for w in order:
        if w.tasks > 0 or (not w.stopped and w.level > SLACK):
            give(w)
    while True:
        best: tuple[float, str] | None = None
        chosen: Work | None = None
        for w in works:
            n = share[w.key]
            if w.stopped or n >= w.keeps() or free(w) is None:
                continue
            quotient = w.level / (n + 1) * ((1 + STICK) if n < w.holders else 1.0)
            if quotient <= 0:
                continue
            if best is None or (quotient, w.key) > best:
                best, chosen = (quotient, w.key), w
        if chosen is None:
            return owner
        give(chosen)
