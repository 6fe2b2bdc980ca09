"""The bounds a simulated run is measured against: the fewest model loads that keep up with the
workload (the load bound) and the shortest possible makespan, both from the tasks alone.

The work arrives in windows: each phase is one, from its start to its end; each burst is one,
from its arrival until the next burst of the same kind (or the end of the arrivals): a burst
that comes back every 20 minutes is work to keep up with over those 20 minutes. In a window,
each LLM model with tasks needs

    need = max(1, min(GPU views it fits on, its tasks,
                      ceil(its work / the window's length),    # GPUs it keeps busy
                      floor(its work / (3 x its load time))))  # a load pays for itself

GPUs holding it (the last term: a GPU is not worth loading for less than three load times of
work, the placement's own measure), and script work needs ceil(its work / length) GPUs (at most
the GPU views and its tasks). An epoch begins wherever a window does, and needs what all the
windows open then need, added up. Walking the epochs in time order, a model holding fewer GPUs
than the epoch needs is loaded onto the difference (the load bound counts these loads); then
each model keeps the GPUs it needs, and the GPUs no work of the epoch needs stay with what was
loaded there, the model needed again soonest first.

It is a bound on a placement that keeps every queue from growing within each window, not a
proof that fewer loads are impossible: it ignores which card is which (a model that fits only
the bigger views is counted against all of them), a GPU's death (the model it held is gone),
and queues that could absorb a rise in demand without a load.

The makespan bound is the latest of: the last task's arrival plus its duration; the first
arrival plus all the work spread over every GPU view; and, for each LLM model, its first
arrival plus its shortest load plus its work spread over the GPU views it fits on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tools.simlib.workload import Task, Workload


@dataclass
class Window:
    start_s: float
    length_s: float
    # llm model -> the work (seconds) and tasks arriving in the window; script work likewise
    llm_work: dict[str, float] = field(default_factory=dict)
    llm_tasks: dict[str, int] = field(default_factory=dict)
    script_work: float = 0.0
    script_tasks: int = 0

    def add(self, w: Workload, t: Task) -> None:
        kind = w.kinds[t.kind]
        if kind.cls == "llm":
            self.llm_work[kind.model] = self.llm_work.get(kind.model, 0.0) + t.duration_s
            self.llm_tasks[kind.model] = self.llm_tasks.get(kind.model, 0) + 1
        else:
            self.script_work += t.duration_s
            self.script_tasks += 1

    def open_at(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.length_s or t == self.start_s


def _ceil_rate(work: float, length_s: float, cap: int) -> int:
    """The GPUs `work` keeps busy over `length_s` (at most `cap`; all of them in no time)."""
    return min(cap, math.ceil(work / length_s)) if length_s > 0 else cap


def windows(w: Workload, tasks: list[Task]) -> list[Window]:
    """The windows the work arrives in: the phases, then the bursts (see the module's docstring)."""
    phases = [Window(p.start_s, p.end_s - p.start_s) for p in w.phases]
    bursts = []
    for n, b in enumerate(w.bursts):
        again = [x.at_s for x in w.bursts[n + 1 :] if x.kind == b.kind and x.at_s > b.at_s]
        end = min(again, default=w.duration_s)
        bursts.append(Window(b.at_s, max(end - b.at_s, b.spread_s)))
    for t in tasks:
        kind, n = t.origin
        (phases if kind == "phase" else bursts)[n].add(w, t)
    return phases + bursts


def epochs(w: Workload, tasks: list[Task]) -> list[tuple[Window, ...]]:
    """The epochs in time order, each as the windows open when it begins."""
    wins = windows(w, tasks)
    starts = sorted({x.start_s for x in wins})
    out = [tuple(x for x in wins if x.open_at(t)) for t in starts]
    return [e for e in out if e]


def needs(w: Workload, epoch: tuple[Window, ...]) -> tuple[dict[str, int], int]:
    """(GPUs each LLM model needs, GPUs script work needs) in one epoch."""
    n_units = len(w.units)
    llm: dict[str, int] = {}
    script = 0
    for e in epoch:
        for model, work in e.llm_work.items():
            fit = sum(1 for u in w.units if w.fits(u, model))
            keep_up = _ceil_rate(work, e.length_s, fit)
            paid = math.floor(work / (3 * w.models[model].load_s))
            need = max(1, min(fit, e.llm_tasks[model], keep_up, paid))
            llm[model] = min(fit, llm.get(model, 0) + need)
        if e.script_tasks:
            script = min(
                n_units, script + min(e.script_tasks, _ceil_rate(e.script_work, e.length_s, n_units))
            )
    return llm, script


def load_bound(w: Workload, tasks: list[Task]) -> dict[str, int]:
    """The load bound of each LLM model (see the module's docstring)."""
    sequence = [needs(w, epoch) for epoch in epochs(w, tasks)]
    resident: dict[str, int] = {}
    loads: dict[str, int] = {}
    for n, (need, script) in enumerate(sequence):
        for model, k in need.items():
            loads[model] = loads.get(model, 0) + max(0, k - resident.get(model, 0))
        spare = max(0, len(w.units) - sum(need.values()) - script)
        before = resident
        resident = dict(need)

        def next_need(model: str, after: int = n) -> int:
            for m, (later, _) in enumerate(sequence[after + 1 :], start=after + 1):
                if model in later:
                    return m
            return len(sequence)

        for model in sorted(before, key=lambda m: (next_need(m), m)):
            extra = before[model] - need.get(model, 0)
            keep = min(max(extra, 0), spare)
            resident[model] = resident.get(model, 0) + keep
            spare -= keep
    return loads


def makespan_bound(w: Workload, tasks: list[Task]) -> float:
    """The makespan bound (see the module's docstring)."""
    if not tasks:
        return 0.0
    first = min(t.at for t in tasks)
    bound = max(t.at + t.duration_s for t in tasks)
    bound = max(bound, first + sum(t.duration_s for t in tasks) / len(w.units))
    by_model: dict[str, list[Task]] = {}
    for t in tasks:
        kind = w.kinds[t.kind]
        if kind.cls == "llm":
            by_model.setdefault(kind.model, []).append(t)
    for model, mine in by_model.items():
        fit = sum(1 for u in w.units if w.fits(u, model))
        if fit == 0:
            continue
        shortest_load = w.models[model].load_s * (1 - w.load_jitter)
        work = sum(t.duration_s for t in mine)
        bound = max(bound, min(t.at for t in mine) + shortest_load + work / fit)
    return bound
