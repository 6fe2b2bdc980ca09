"""What one simulated run measured: each GPU's time by what it did, the loads, the tasks' waits,
the makespan, and the bounds they compare with (`tools.simlib.bounds`), as one `Report`.

GPU time is integrated exactly between the simulation's events, over the time each GPU view was
usable (its worker alive), from 0 to the run's end (the last task's end, or the horizon):

- loading: loading an LLM (`booting_llm`) or a script model (`booting_script`);
- running: running a task (and not loading);
- idle: neither; and idle while work waits, when some task it could run after a load waits:
  the brain's count of waiting and released tasks (`State.demand`) holds script work, or work
  for an LLM that fits the view's VRAM. A second, stricter count caps the GPUs counted at once
  at the waiting tasks not already waiting on a load in progress (one GPU loading a model for
  one waiting task leaves no other GPU counted idle for that task).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh import placement as gs
from mesh.placement import SCRIPT, llm_demand_key
from tools.simlib.bounds import load_bound, makespan_bound
from tools.simlib.rig import Rig
from tools.simlib.worker import Hooks, SimWorker
from tools.simlib.workload import Task, Workload, tasks_of


@dataclass
class GpuTime:
    usable: float = 0.0
    loading_llm: float = 0.0
    loading_script: float = 0.0
    running: float = 0.0
    idle: float = 0.0
    idle_waiting: float = 0.0


@dataclass
class Report:
    workload: str
    seed: int
    tasks: int
    served: int
    never_served: int
    end_s: float
    usable_gpu_s: float
    # shares of the usable GPU time
    idle_waiting: float
    idle_waiting_capped: float
    loading: float
    running: float
    idle: float
    llm_loads: int
    load_bound: int
    script_loads: int
    quick_reloads: int
    misplaced: int
    refusals: int
    lost: int
    redelivered: int
    # worker reports the brain ignored as stale; deliveries a worker skipped as no longer wanted
    ignored_reports: int
    skipped_items: int
    makespan_s: float
    makespan_bound_s: float
    # kind -> {"n", "p50", "p95"} (seconds from arrival to the start of the run that served it)
    waits: dict[str, dict[str, float]] = field(default_factory=dict)
    loads_by_model: dict[str, int] = field(default_factory=dict)
    bound_by_model: dict[str, int] = field(default_factory=dict)
    gpu_time: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def loads_ratio(self) -> float:
        return self.llm_loads / self.load_bound if self.load_bound else math.nan

    @property
    def makespan_ratio(self) -> float:
        return self.makespan_s / self.makespan_bound_s if self.makespan_bound_s else math.nan

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["loads_ratio"] = self.loads_ratio
        out["makespan_ratio"] = self.makespan_ratio
        return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks; nan when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Meter:
    """Watches a rig as it runs (its hooks, and `observe` before each move of the clock)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        w = rig.w
        self.last = 0.0
        self.capped = 0.0
        self.time = {x.gpu_id: GpuTime() for x in rig.workers}
        script_fits = all(
            w.fits(x.unit, m.name) for x in rig.workers for m in w.models.values() if m.kind != "llm"
        )
        # the demand keys each GPU view could serve after a load
        self.serves = {
            x.gpu_id: frozenset(
                [
                    llm_demand_key(m.name)
                    for m in w.models.values()
                    if m.kind == "llm" and w.fits(x.unit, m.name)
                ]
                + ([SCRIPT] if script_fits else [])
            )
            for x in rig.workers
        }
        self.llm_loads: list[tuple[float, str, str]] = []
        self.script_loads: list[tuple[float, str, str]] = []
        self.quick_reloads: list[tuple[float, str, str]] = []
        self.unloaded_at: dict[tuple[str, str], float] = {}
        rig.hooks = Hooks(
            load_started=self._load_started, unloaded=self._unloaded, script_load=self._script_load
        )

    def _load_started(self, x: SimWorker, model: str, took: float) -> None:
        now = self.rig.clock.now
        self.llm_loads.append((now, x.gpu_id, model))
        gone = self.unloaded_at.get((x.gpu_id, model))
        if gone is not None and now - gone < 3 * self.rig.w.models[model].load_s:
            self.quick_reloads.append((now, x.gpu_id, model))

    def _unloaded(self, x: SimWorker, model: str) -> None:
        self.unloaded_at[(x.gpu_id, model)] = self.rig.clock.now

    def _script_load(self, x: SimWorker, model: str) -> None:
        self.script_loads.append((self.rig.clock.now, x.gpu_id, model))

    def observe(self, t: float) -> None:
        """Add the time from the last observation to `t`, as each GPU spent it."""
        dt = t - self.last
        if dt <= 0:
            return
        demand = {k: n for k, n in self.rig.state.demand.items() if n > 0}
        eligible = 0
        reach: set[str] = set()
        loading = 0
        for x in self.rig.workers:
            if not x.alive:
                continue
            g = self.time[x.gpu_id]
            g.usable += dt
            if x.booting == gs.BOOTING_LLM:
                g.loading_llm += dt
                loading += 1
            elif x.booting:
                g.loading_script += dt
            elif x.runs:
                g.running += dt
            else:
                g.idle += dt
                could = self.serves[x.gpu_id].intersection(demand)
                if could:
                    g.idle_waiting += dt
                    eligible += 1
                    reach |= could
        if eligible:
            uncovered = max(0, sum(demand[k] for k in reach) - loading)
            self.capped += min(eligible, uncovered) * dt
        self.last = t

    def report(self, tasks: list[Task], end_s: float) -> Report:
        rig, w = self.rig, self.rig.w
        total = GpuTime()
        for g in self.time.values():
            for name in asdict(total):
                setattr(total, name, getattr(total, name) + getattr(g, name))
        usable = total.usable or math.nan
        waits: dict[str, list[float]] = {k: [] for k in sorted({t.kind for t in tasks})}
        served = 0
        for t in tasks:
            start = rig.served_start.get(t.key)
            rec = rig.state.tasks.get(t.key)
            if start is not None and rec is not None and rec.status == "succeeded":
                served += 1
                waits[t.kind].append(start - t.at)
        loads_by_model: dict[str, int] = {}
        for _, _, model in self.llm_loads:
            loads_by_model[model] = loads_by_model.get(model, 0) + 1
        bound = load_bound(w, tasks)
        misplaced = [v for v in rig.violations if "the brain placed" in v]
        last_end = max(rig.finished.values(), default=0.0)
        return Report(
            workload=w.name,
            seed=rig.seed,
            tasks=len(tasks),
            served=served,
            never_served=len(tasks) - served,
            end_s=end_s,
            usable_gpu_s=total.usable,
            idle_waiting=total.idle_waiting / usable,
            idle_waiting_capped=self.capped / usable,
            loading=(total.loading_llm + total.loading_script) / usable,
            running=total.running / usable,
            idle=total.idle / usable,
            llm_loads=len(self.llm_loads),
            load_bound=sum(bound.values()),
            script_loads=len(self.script_loads),
            quick_reloads=len(self.quick_reloads),
            misplaced=len(misplaced),
            refusals=rig.refusals,
            lost=rig.lost,
            redelivered=rig.redelivered,
            ignored_reports=rig.ignored,
            skipped_items=rig.skipped,
            makespan_s=last_end if served == len(tasks) else end_s,
            makespan_bound_s=makespan_bound(w, tasks),
            waits={
                k: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)} for k, v in waits.items()
            },
            loads_by_model=loads_by_model,
            bound_by_model=bound,
            gpu_time={gpu: asdict(g) for gpu, g in self.time.items()},
            notes=sorted(rig.notes),
            violations=list(rig.violations),
        )


def simulate(w: Workload, seed: int, tasks: list[Task] | None = None) -> tuple[Report, Rig]:
    """Run a workload for one seed through the real brain; its report, and the rig as it ended."""
    todo = tasks_of(w, seed) if tasks is None else tasks
    rig = Rig(w, seed)
    meter = Meter(rig)
    end = rig.run(todo, meter.observe)
    return meter.report(todo, end), rig
