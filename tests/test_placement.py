"""Hot and cold placement (`mesh.placement`) driven through the real state machine (`mesh.machine.apply`).

A small simulator (`Sim`) plays the GPU workers on a simulated clock, no NATS: it feeds
`Tick` and `Sweep` to `apply`, answers the `Step.resources` load and unload requests with
`GpuState` reports (refusing a load that does not fit its real free VRAM; each report carries
`previous` and `took_s` as a worker's does, and `Sim.restart` plays a worker restarting), and
runs the released work: a GPU holding a ready LLM takes that model's `llm` work, an idle GPU takes
`script` work. Every request the brain makes is checked as it is made (see `Sim.feed`); the
scenarios then check what was loaded where and when.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.events import (
    CancelPlan,
    GpuState,
    PlanAccepted,
    PlanRejected,
    PlanSpec,
    ResourceItem,
    ResourceRequested,
    RunFinished,
    RunStarted,
    SubmitPlan,
    TaskSpec,
    WorkItem,
)
from mesh.machine import Policy, State, Step, Sweep, Tick, apply
from mesh.placement import (
    BOOTING_LLM,
    FETCHING,
    HOLDS_LLM,
    IDLE,
    LLM_BUSY,
    LLM_READY,
    OFFLINE,
    PAUSED,
    SCRIPT_BUSY,
    GpuView,
    PlacementPolicy,
    observe,
    place,
)
from mesh.records import PlanRecord, TaskRecord
from mesh.settings import Settings

T0 = 1_000.0
MODELS: dict[str, tuple[str, int]] = {
    "big": ("llm", 5000),
    "small": ("llm", 800),
    "whisper": ("transcribe", 300),
    "minilm": ("embed", 300),
}
DEFAULTS = {"llm": "small", "transcribe": "whisper", "embed": "minilm"}
KEEP_ALIVE_S = 600.0
MIN_RESIDENCY_S = 300.0
LOAD_TIMEOUT_S = 900.0
YIELD_AFTER_S = 10.0
CPU_WORKER = "cpu1"


def make_policy(
    keep_alive_s: float = KEEP_ALIVE_S,
    min_residency_s: float = MIN_RESIDENCY_S,
    load_timeout_s: float = LOAD_TIMEOUT_S,
    yield_after_s: float = YIELD_AFTER_S,
    keep_warm: bool = True,
) -> Policy:
    return Policy(
        release_window=256,
        placement=PlacementPolicy(
            models=MODELS,
            keep_alive_s=keep_alive_s,
            keep_warm=keep_warm,
            min_residency_s=min_residency_s,
            load_timeout_s=load_timeout_s,
            yield_after_s=yield_after_s,
        ),
        default_models=DEFAULTS,
    )


def prompts(n: int, prefix: str = "q", model: str = "") -> list[TaskSpec]:
    return [
        TaskSpec(id=f"{prefix}{i}", body=f"say {i}", kind="prompt", cls="llm", model=model, retries=0)
        for i in range(n)
    ]


def scripts(n: int, prefix: str = "s") -> list[TaskSpec]:
    return [
        TaskSpec(id=f"{prefix}{i}", body="gpu-job", kind="shell", cls="script", retries=0) for i in range(n)
    ]


def need_mb(model: str) -> int:
    return MODELS[model][1]


# ------------------------------------------------------------------ the simulator


@dataclass
class SimGpu:
    """One GPU and its worker (one GPU per worker), as the simulator plays it."""

    gpu: str
    worker: str
    vram_total_mb: int = 8192
    load_s: dict[str, float] = field(default_factory=dict)
    default_load_s: float = 30.0
    # VRAM taken by something outside mesh that the worker's reports do not show yet:
    # a load that does not fit beside it is refused
    other_mb: int = 0
    # the worker never answers a resource item (a lost message, a hung load)
    mute: bool = False
    live: bool = True
    # the state last reported ('' before the first report: the worker just started)
    reported: str = ""
    # when the reported state began (a report's took_s is how long the previous state lasted)
    since: float = 0.0
    # how often its worker restarted (a load in flight dies with the old process)
    restarts: int = 0
    state: str = IDLE
    llm: str = ""
    task: WorkItem | None = None
    # a load asked while a script task runs, or an unload of the LLM while its task runs: as a
    # worker does, it takes no more work and carries it out once the task ends
    deferred: ResourceItem | None = None

    @property
    def used_mb(self) -> int:
        return need_mb(self.llm) if self.llm else 0

    @property
    def usable(self) -> bool:
        return self.live and self.state not in (PAUSED, OFFLINE)


@dataclass(frozen=True)
class Request:
    at: float
    gpu: str
    action: str
    model: str
    rid: str
    reason: str
    # the model's waiting work (brain's demand) when the request was made
    waiting: int = 0


@dataclass(frozen=True)
class Answer:
    at: float
    gpu: str
    what: str  # 'booting', 'ready', 'refused', 'unloaded', 'ignored', 'restarted'
    model: str


@dataclass(frozen=True)
class Run:
    start: float
    end: float
    gpu: str
    plan_id: str
    task_id: str
    cls: str
    model: str


class Sim:
    def __init__(
        self,
        gpus: list[SimGpu],
        policy: Policy | None = None,
        *,
        llm_s: float = 10.0,
        script_s: float = 10.0,
        dt: float = 1.0,
        sweep_s: float = 5.0,
        now: float = T0,
    ) -> None:
        self.gpus = {g.gpu: g for g in gpus}
        self.by_worker = {g.worker: g for g in gpus}
        assert len(self.by_worker) == len(self.gpus), "the simulator plays one GPU per worker"
        self.policy = policy or make_policy()
        self.pp = self.policy.placement
        self.state = State(aging_s=self.policy.aging_s)
        self.now = now
        self.llm_s, self.script_s, self.dt, self.sweep_s = llm_s, script_s, dt, sweep_s
        self.next_tick = now + dt
        self.next_sweep = now + sweep_s
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.llm_work: dict[str, deque[WorkItem]] = defaultdict(deque)
        self.script_work: deque[WorkItem] = deque()
        self.cpu_work: deque[WorkItem] = deque()
        self.inbox: deque[ResourceItem] = deque()
        self.requests: list[Request] = []
        self.answers: list[Answer] = []
        self.runs: list[Run] = []
        self.notes: list[tuple[float, str]] = []
        self.steps: list[Step] = []
        self.violations: list[str] = []
        # gpu -> (rid, asked at): a request the simulated worker has not answered yet
        self.outstanding: dict[str, tuple[str, float]] = {}
        # rid -> what it asked: the bus deduplicates on the rid, so two different requests
        # sharing one would lose the second
        self.rids: dict[str, tuple[str, str, str]] = {}
        self.sweep()
        for g in gpus:
            self.report(g)
        self.settle()

    # the brain ---------------------------------------------------------------
    def feed(self, msg: Any) -> Step:
        step = apply(self.state, msg, self.now, self.policy)
        self.steps.append(step)
        for item in step.work:
            if item.cls == "llm":
                self.llm_work[item.model].append(item)
            elif item.cls == "script":
                self.script_work.append(item)
            else:
                self.cpu_work.append(item)
        self.notes.extend((self.now, n) for n in step.notes)
        asked = {e.rid: e for e in step.events if isinstance(e, ResourceRequested)}
        assert sorted(asked) == sorted(i.rid for i in step.resources), "one gpu.requested event per item"
        seen: set[str] = set()
        for item in step.resources:
            g = self.by_worker[item.worker]
            assert asked[item.rid].gpu == g.gpu and asked[item.rid].action == item.action
            view = self.state.gpus[g.gpu]
            if g.gpu in seen:
                self.violations.append(f"{self.now}: two requests for {g.gpu} in one step")
            seen.add(g.gpu)
            if g.gpu in self.outstanding and self.now - self.outstanding[g.gpu][1] < self.pp.load_timeout_s:
                self.violations.append(
                    f"{self.now}: {item.action} {item.model} on {g.gpu} while "
                    f"{self.outstanding[g.gpu][0]} is unanswered"
                )
            if item.action == "load":
                if view.free_for_llm_mb < need_mb(item.model):
                    self.violations.append(
                        f"{self.now}: load {item.model} on {g.gpu} with {view.free_for_llm_mb} MB free"
                    )
                if not g.usable:
                    self.violations.append(f"{self.now}: load {item.model} on unusable {g.gpu} ({g.state})")
            what = (g.gpu, item.action, item.model)
            if self.rids.setdefault(item.rid, what) != what:
                self.violations.append(f"{self.now}: rid {item.rid} names {self.rids[item.rid]} and {what}")
            self.outstanding[g.gpu] = (item.rid, self.now)
            waiting = self.state.demand.get(f"llm:{item.model}", 0)
            self.requests.append(
                Request(self.now, g.gpu, item.action, item.model, item.rid, item.reason, waiting)
            )
            self.inbox.append(item)
        return step

    def submit(self, tasks: list[TaskSpec], plan_id: str = "p1") -> Step:
        step = self.feed(
            SubmitPlan(plan_id=plan_id, plan=PlanSpec(title=plan_id, tasks=tuple(tasks)), at=self.now)
        )
        self.settle()
        return step

    def sweep(self) -> None:
        live = frozenset(g.worker for g in self.gpus.values() if g.live) | {CPU_WORKER}
        self.feed(Sweep(live=live))

    # the workers -------------------------------------------------------------
    def report(self, g: SimGpu, rid: str = "", error: str = "") -> None:
        """Send the GPU's state as its worker does: `previous` is the state it last reported
        ('' on a (re)started worker's first report), `took_s` how long that state lasted."""
        previous, g.reported = g.reported, g.state
        if not previous:
            g.since = self.now
        took_s = self.now - g.since
        if g.state != previous:
            g.since = self.now
        self.feed(
            GpuState(
                gpu=g.gpu,
                worker=g.worker,
                host=f"host-{g.worker}",
                state=g.state,
                previous=previous,
                took_s=took_s,
                at=self.now,
                llm=g.llm,
                vram_total_mb=g.vram_total_mb,
                vram_used_mb=g.used_mb,
                llm_slots=1,
                script_slots=1,
                running=int(g.task is not None),
                rid=rid,
                error=error,
            )
        )

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (self.now + delay, self.seq, fn))

    def answer(self, g: SimGpu, what: str, model: str) -> None:
        self.answers.append(Answer(self.now, g.gpu, what, model))

    def handle(self, item: ResourceItem) -> None:
        g = self.by_worker[item.worker]
        if g.mute:
            self.answer(g, "ignored", item.model)
            return
        busy = SCRIPT_BUSY if item.action == "load" else LLM_BUSY
        if g.task is not None and g.state == busy and g.deferred is None:
            if item.action == "unload" and g.llm != item.model:
                self.violations.append(f"{self.now}: unload {item.model} on {g.gpu} holding {g.llm}")
                return
            g.deferred = item
            return
        if item.action == "load":
            if g.state != IDLE or g.llm:
                self.violations.append(f"{self.now}: load {item.model} on {g.gpu} in state {g.state}")
            free = g.vram_total_mb - g.used_mb - g.other_mb
            if g.state != IDLE or g.llm or need_mb(item.model) > free:
                self.outstanding.pop(g.gpu, None)
                self.answer(g, "refused", item.model)
                self.report(
                    g, rid=item.rid, error=f"{item.model} needs {need_mb(item.model)} MB, {free} free"
                )
                return
            g.state, g.llm = BOOTING_LLM, item.model
            self.answer(g, "booting", item.model)
            self.report(g, rid=item.rid)
            epoch = g.restarts
            self.later(g.load_s.get(item.model, g.default_load_s), lambda: self.loaded(g, item, epoch))
        else:
            if g.state != LLM_READY or g.llm != item.model:
                self.violations.append(f"{self.now}: unload {item.model} on {g.gpu} in state {g.state}")
                return
            g.state, g.llm = IDLE, ""
            self.outstanding.pop(g.gpu, None)
            self.answer(g, "unloaded", item.model)
            self.report(g, rid=item.rid)

    def loaded(self, g: SimGpu, item: ResourceItem, epoch: int) -> None:
        if g.restarts != epoch:
            return  # the process loading it is gone
        g.state = LLM_READY
        if self.outstanding.get(g.gpu, ("", 0.0))[0] == item.rid:
            del self.outstanding[g.gpu]
        self.answer(g, "ready", item.model)
        self.report(g, rid=item.rid)

    def restart(self, g: SimGpu) -> None:
        """The GPU's worker restarts: its model, and whatever was asked of the old process, are
        gone; its first report has no previous state."""
        assert g.task is None, "the simulator does not restart a worker mid-task"
        g.restarts += 1
        g.state, g.llm, g.reported = IDLE, "", ""
        self.outstanding.pop(g.gpu, None)
        self.inbox = deque(i for i in self.inbox if i.worker != g.worker)
        self.answer(g, "restarted", "")
        self.report(g)

    def settle(self) -> None:
        for _ in range(10_000):
            if not self.inbox:
                return
            self.handle(self.inbox.popleft())
        raise AssertionError(f"{self.now}: requests never stop coming: {self.requests[-5:]}")

    def start(self, g: SimGpu | None, item: WorkItem) -> None:
        worker = g.worker if g else CPU_WORKER
        step = self.feed(
            RunStarted(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=worker,
                at=self.now,
                claim=item.claim,
            )
        )
        assert not step.ignored, step.ignored
        began = self.now
        if g is None:
            duration = 1.0
        else:
            g.task = item
            g.state = LLM_BUSY if item.cls == "llm" else SCRIPT_BUSY
            self.report(g)
            duration = self.llm_s if item.cls == "llm" else self.script_s

        def finish() -> None:
            self.feed(
                RunFinished(
                    plan_id=item.plan_id,
                    task_id=item.task_id,
                    attempt=item.attempt,
                    worker=worker,
                    at=self.now,
                    ok=True,
                    duration_s=duration,
                    rc=0,
                    model=item.model,
                    gpu=g.gpu if g else "",
                    claim=item.claim,
                )
            )
            if g is not None:
                g.task = None
                g.state = LLM_READY if item.cls == "llm" else IDLE
                self.report(g)
                if g.deferred is not None:
                    deferred, g.deferred = g.deferred, None
                    self.handle(deferred)
            self.runs.append(
                Run(began, self.now, g.gpu if g else "", item.plan_id, item.task_id, item.cls, item.model)
            )

        self.later(duration, finish)

    def assign(self) -> None:
        """Give ready work to free GPUs until none takes any more."""
        while True:
            self.settle()
            while self.cpu_work:
                self.start(None, self.cpu_work.popleft())
            for g in sorted(self.gpus.values(), key=lambda g: g.gpu):
                if not g.usable or g.task is not None or g.gpu in self.outstanding:
                    continue
                if g.state == LLM_READY and self.llm_work[g.llm]:
                    self.start(g, self.llm_work[g.llm].popleft())
                    break
                if g.state == IDLE and not g.llm and self.script_work:
                    self.start(g, self.script_work.popleft())
                    break
            else:
                return

    # the clock ---------------------------------------------------------------
    def advance(self, until: float) -> None:
        """Move to the next timer or tick (no later than `until`) and do what is due."""
        t = min(self.timers[0][0] if self.timers else math.inf, self.next_tick, until)
        self.now = max(t, self.now)
        while self.timers and self.timers[0][0] <= self.now:
            heapq.heappop(self.timers)[2]()
            self.settle()
        if self.now >= self.next_tick:
            if self.now >= self.next_sweep:
                self.sweep()
                self.next_sweep += self.sweep_s
            self.feed(Tick())
            self.next_tick += self.dt
        self.assign()

    def run_until(self, t: float) -> None:
        while self.now < t:
            self.advance(t)
        self.advance(t)

    def run_for(self, s: float) -> None:
        self.run_until(self.now + s)

    def run_while(self, busy: Callable[[], bool], limit_s: float = 20_000.0) -> None:
        end = self.now + limit_s
        while busy():
            assert self.now < end, "the simulation did not settle"
            self.advance(end)

    def finish(self, plan_id: str = "p1", limit_s: float = 20_000.0) -> None:
        self.run_while(lambda: not self.plan(plan_id).final, limit_s)

    # reading the run ---------------------------------------------------------
    def plan(self, plan_id: str = "p1") -> PlanRecord:
        return self.state.plans[plan_id]

    def loads(self, gpu: str | None = None, since: float = -math.inf) -> list[Request]:
        return [
            r for r in self.requests if r.action == "load" and (gpu is None or r.gpu == gpu) and r.at >= since
        ]

    def unloads(self, gpu: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.action == "unload" and (gpu is None or r.gpu == gpu)]

    def holding(self) -> dict[str, str]:
        return {g.gpu: g.llm for g in self.gpus.values() if g.llm}

    def check(self) -> None:
        """What must hold in any run: no violation seen, and every unload one the policy allows:
        the model had been resident min_residency_s, or unused keep_alive_s, or it had no waiting
        work and had been unused max(yield_after_s, yield_factor * its load's time)."""
        assert self.violations == []
        booting: dict[str, float] = {}
        load_s: dict[str, float] = {}
        ready: dict[str, float] = {}
        last_used: dict[str, float] = {}
        events = sorted(
            [
                (a.at, 0, n, a.gpu, a.what, 0)
                for n, a in enumerate(self.answers)
                if a.what in ("booting", "ready")
            ]
            + [(r.end, 1, 0, r.gpu, "used", 0) for r in self.runs if r.cls == "llm"]
            + [(r.at, 2, 0, r.gpu, "unload", r.waiting) for r in self.unloads()]
        )
        for at, _, _, gpu, what, waiting in events:
            if what == "booting":
                booting[gpu] = at
            elif what == "ready":
                load_s[gpu] = at - booting[gpu]
                ready[gpu] = last_used[gpu] = at
            elif what == "used":
                last_used[gpu] = at
            else:
                held = at - ready[gpu]
                idle = at - last_used[gpu]
                yield_after = max(self.pp.yield_after_s, self.pp.yield_factor * load_s[gpu])
                assert (
                    held >= self.pp.min_residency_s
                    or idle >= self.pp.keep_alive_s
                    or (waiting == 0 and idle >= yield_after)
                ), (
                    f"{gpu} unloaded at {at} after {held}s resident, {idle}s unused, with {waiting} "
                    f"task(s) of its model waiting (its load took {load_s[gpu]}s)"
                )


def fleet(n: int = 3, vram_mb: int = 8192, **kw: Any) -> list[SimGpu]:
    return [SimGpu(gpu=f"g{i}", worker=f"w{i}", vram_total_mb=vram_mb, **kw) for i in range(1, n + 1)]


def statuses(sim: Sim, plan_id: str = "p1") -> set[str]:
    return {r.status for r in sim.state.plan_tasks(plan_id)}


# ------------------------------------------------------------------ 1. spread over idle GPUs


@pytest.mark.parametrize(("n_tasks", "expected_gpus"), [(1, 1), (2, 2), (3, 3), (12, 3)])
def test_llm_work_spreads_over_idle_gpus_as_far_as_it_goes(n_tasks: int, expected_gpus: int) -> None:
    """The first GPU at once; each further idle GPU once the waiting work gives each GPU half a
    load time of work: at once for 12 tasks; for 2 or 3 once the first load showed that a load
    takes 30 s (the prior is 120 s), never more GPUs than tasks."""
    sim = Sim(fleet(3))
    assert sim.requests == []  # idle GPUs and no work: nothing to load
    sim.submit(prompts(n_tasks))
    sim.finish()

    loads = sim.loads()
    assert len(loads) == expected_gpus <= n_tasks
    assert len({r.gpu for r in loads}) == expected_gpus  # each GPU asked once
    assert {r.model for r in loads} == {"small"}  # the default llm model
    assert loads[0].at == T0 + sim.dt  # at once, on the first tick after the submission
    if n_tasks * sim.pp.task_s / expected_gpus >= sim.pp.grow_factor * sim.pp.load_s:
        assert all(r.at == T0 + sim.dt for r in loads)
    assert all(r.at <= T0 + sim.dt + 30.0 for r in loads)
    assert "task(s) waiting" in loads[0].reason
    assert sim.plan().status == "succeeded" and statuses(sim) == {"succeeded"}
    assert len(sim.runs) == n_tasks and {r.model for r in sim.runs} == {"small"}
    assert {r.gpu for r in sim.runs} <= {r.gpu for r in loads}
    assert sim.unloads() == []  # the models stay warm after the work (keep-alive)
    sim.check()


def test_gpus_reporting_one_by_one_each_get_a_load() -> None:
    """Work waits before any GPU is known: each GPU that reports in idle is put to work."""
    gpus = fleet(3)
    sim = Sim(gpus[:1])
    sim.submit(prompts(6))
    sim.run_for(1)
    assert [r.gpu for r in sim.loads()] == ["g1"]
    for g in gpus[1:]:
        sim.run_for(5)
        sim.gpus[g.gpu] = sim.by_worker[g.worker] = g
        sim.sweep()
        sim.report(g)
        sim.settle()
    sim.finish()
    assert sorted(r.gpu for r in sim.loads()) == ["g1", "g2", "g3"]
    assert sim.plan().status == "succeeded"
    sim.check()


# ------------------------------------------------------------------ 2. never where it does not fit


def test_a_model_no_gpu_can_hold_is_never_loaded_and_said_so() -> None:
    sim = Sim(fleet(2, vram_mb=4096))
    sim.submit(prompts(3, model="big"))
    sim.run_for(60)
    assert sim.requests == []
    assert sim.notes, "the operator is told"
    text = sim.notes[0][1]
    assert "big" in text and "5000" in text and "4096" in text
    assert sim.state.demand == {"llm:big": 3}
    assert statuses(sim) == {"ready"}  # released, waiting for a GPU that can hold it
    sim.check()


def test_a_mixed_fleet_loads_a_big_model_only_where_it_fits() -> None:
    gpus = [
        SimGpu(gpu="g1", worker="w1", vram_total_mb=4096),
        SimGpu(gpu="g2", worker="w2", vram_total_mb=8192),
        SimGpu(gpu="g3", worker="w3", vram_total_mb=4096),
    ]
    sim = Sim(gpus)
    sim.submit(prompts(6, model="big"))
    sim.finish()
    assert [r.gpu for r in sim.loads()] == ["g2"]
    assert {r.gpu for r in sim.runs} == {"g2"}
    assert sim.notes == []  # a GPU can hold it: nothing to tell
    assert sim.plan().status == "succeeded"
    sim.check()


def test_small_and_big_share_a_mixed_fleet() -> None:
    gpus = [
        SimGpu(gpu="g1", worker="w1", vram_total_mb=4096),
        SimGpu(gpu="g2", worker="w2", vram_total_mb=8192),
    ]
    sim = Sim(gpus)
    sim.submit(prompts(6, model="big", prefix="b") + prompts(6, model="small", prefix="s"))
    sim.finish()
    assert {(r.gpu, r.model) for r in sim.loads()} == {("g2", "big"), ("g1", "small")}
    assert {(r.gpu, r.model) for r in sim.runs} == {("g2", "big"), ("g1", "small")}
    sim.check()


# ------------------------------------------------------------------ 3. a refusal


def test_a_refused_load_is_not_asked_again_before_load_timeout() -> None:
    gpus = fleet(2)
    gpus[0].other_mb = 7800  # something outside mesh took g1's memory
    sim = Sim(gpus, llm_s=30.0)
    sim.submit(prompts(60))
    sim.run_for(1)
    refusals = [a for a in sim.answers if a.what == "refused"]
    assert [(a.gpu, a.model) for a in refusals] == [("g1", "small")]
    refused_at = refusals[0].at
    assert sim.state.gpus["g1"].refused == {"small": refused_at}
    assert sim.state.gpus["g1"].pending is None
    sim.run_for(100)
    gpus[0].other_mb = 0  # the other process exits; the brain cannot know before it asks again
    sim.finish()

    g1 = sim.loads("g1")
    assert len(g1) == 2
    assert g1[1].at - refused_at == pytest.approx(LOAD_TIMEOUT_S, abs=sim.dt)
    assert [r.gpu for r in sim.loads()].count("g2") == 1
    assert {r.gpu for r in sim.runs if r.start >= g1[1].at + 30} == {"g1", "g2"}
    assert sim.plan().status == "succeeded"
    sim.check()


def test_a_refusal_and_the_next_request_in_the_same_instant_get_different_rids() -> None:
    """g1 refuses big, and small is asked of it at the same clock value (the brain decides a
    batch of inputs at one `now`): the two requests must not share a rid, which the bus
    deduplicates on."""
    gpus = fleet(1)
    gpus[0].other_mb = 7800
    sim = Sim(gpus)
    sim.submit(prompts(2, model="big", prefix="b") + prompts(2))
    sim.run_for(1)
    assert [(r.model, r.at) for r in sim.loads()] == [("big", T0 + 1), ("small", T0 + 1)]
    assert len({r.rid for r in sim.requests}) == 2
    assert sim.state.gpus["g1"].refused == {"big": T0 + 1, "small": T0 + 1}
    sim.check()


def test_an_unrelated_error_does_not_clear_a_pending_request() -> None:
    """A stale error (another request's rid) leaves the pending request alone."""
    gpus = fleet(1, mute=True)
    sim = Sim(gpus)
    sim.submit(prompts(2))
    sim.run_for(1)
    (req,) = sim.loads()
    sim.report(gpus[0], rid="g1-load-1", error="stale")
    assert sim.state.gpus["g1"].pending is not None
    assert sim.state.gpus["g1"].refused == {}
    sim.report(gpus[0], rid=req.rid, error="CUDA out of memory")
    assert sim.state.gpus["g1"].pending is None
    assert sim.state.gpus["g1"].refused == {"small": sim.now}


@pytest.mark.parametrize("state", [IDLE, FETCHING])
def test_a_fetching_gpu_is_a_load_under_way_never_idle_or_free(state: str) -> None:
    """A GPU fetching a model's file (a brain that restarted knows of no request it made) is
    neither asked to load another model nor counted free for script work; an idle one is."""
    gpus: dict[str, GpuView] = {}
    at = T0
    for now, previous in ((IDLE, ""), (state, IDLE)):
        at += 1
        observe(
            gpus,
            GpuState(
                gpu="g1",
                worker="w1",
                host="h",
                state=now,
                previous=previous,
                at=at,
                vram_total_mb=8192,
                fetching="big" if now == FETCHING else "",
            ),
        )
    view = gpus["g1"]
    assert view.usable and view.free == (state == IDLE)
    decision = place(gpus, {"llm:small": 4}, at + 1, make_policy().placement)
    loads = [(i.worker, i.model) for i in decision.items]
    assert loads == ([] if state == FETCHING else [("w1", "small")])


# ------------------------------------------------------------------ 4. the queue shifts


def test_queue_shifting_llm_script_llm_does_not_thrash() -> None:
    sim = Sim(fleet(3, default_load_s=60.0), make_policy(keep_warm=False), llm_s=20.0, script_s=20.0)
    sim.submit(prompts(60), plan_id="llm1")
    sim.run_until(T0 + 100)
    assert len(sim.loads()) == 3 and sim.unloads() == []
    ready_at = max(a.at for a in sim.answers if a.what == "ready")
    sim.submit(scripts(60), plan_id="scripts")
    sim.finish("scripts")
    sim.finish("llm1")

    unloads = sim.unloads()
    script_runs = [r for r in sim.runs if r.cls == "script"]
    # the LLM's work still waited: the GPUs held it min_residency_s before any went to script work
    assert unloads and unloads[0].at >= ready_at + MIN_RESIDENCY_S
    assert "other work waits" in unloads[0].reason and unloads[0].waiting > 0
    assert min(r.start for r in script_runs) >= unloads[0].at
    # the LLM kept a GPU while its work waited
    first = [r for r in sim.runs if r.plan_id == "llm1"]
    assert len(first) == 60 and len(script_runs) == 60
    assert sim.plan("llm1").status == sim.plan("scripts").status == "succeeded"

    # every GPU goes cold once nothing used it for keep_alive_s (keep_warm off); then LLM work
    # returns: it loads where script work does not keep a GPU for its recent work (the script
    # work came ten minutes ago: one GPU stays free for it a while longer)
    sim.run_for(KEEP_ALIVE_S + 10)
    assert sim.holding() == {}
    back = sim.now
    sim.submit(prompts(30, prefix="r"), plan_id="llm2")
    sim.finish("llm2")
    assert 2 <= len(sim.loads(since=back)) <= 3
    assert sim.plan("llm2").status == "succeeded"

    # no thrashing: at most one load per GPU and phase of LLM work, none undone before the
    # policy allows (check()); none while the script work ran
    assert len(sim.loads()) <= 6, sim.loads()
    assert all(len(sim.loads(g)) <= 2 for g in sim.gpus)
    assert len(sim.unloads()) == 3
    sim.check()


def test_script_work_waits_min_residency_while_the_llm_still_has_work() -> None:
    """All three GPUs hold the LLM, and its work keeps them busy long after: script work arriving
    at once waits min_residency_s since the loads (a GPU beyond the LLM's share goes then, not
    after yield_after_s, and not later than the task running on it)."""
    sim = Sim(fleet(3, default_load_s=10.0), llm_s=5.0, script_s=5.0)
    sim.submit(prompts(300), plan_id="llm")
    sim.run_until(T0 + 20)
    ready_at = max(a.at for a in sim.answers if a.what == "ready")
    sim.submit(scripts(100), plan_id="scripts")
    sim.run_until(ready_at + MIN_RESIDENCY_S - 1)
    assert sim.unloads() == []
    assert not [r for r in sim.runs if r.cls == "script"]
    assert sim.state.demand["llm:small"] > 0
    sim.run_until(ready_at + MIN_RESIDENCY_S + sim.llm_s + sim.dt)
    first = sim.unloads()[0]
    assert ready_at + MIN_RESIDENCY_S <= first.at <= ready_at + MIN_RESIDENCY_S + sim.llm_s
    assert first.waiting > 0 and "other work waits" in first.reason
    assert min(r.start for r in sim.runs if r.cls == "script") >= first.at
    sim.finish("scripts")
    sim.finish("llm")
    sim.check()


def test_place_keeps_an_llm_that_still_has_work_for_min_residency_however_long_unused() -> None:
    """g1 holds small beyond its share (g2 holds it too; one task waits, script work waits) and
    sat unused far longer than yield_after_s and its load time: with work of its own still
    waiting, it keeps the GPU until min_residency_s since its load. Without such work it would go."""
    pp = make_policy().placement
    loaded_at = T0

    def views() -> dict[str, GpuView]:
        ready = GpuView(
            gpu="g1",
            worker="w1",
            state=LLM_READY,
            llm="small",
            vram_total_mb=8192,
            vram_used_mb=800,
            loaded_at=loaded_at,
            last_used=loaded_at,
            load_s=30.0,
        )
        busy = GpuView(
            gpu="g2",
            worker="w2",
            state=LLM_BUSY,
            llm="small",
            vram_total_mb=8192,
            vram_used_mb=800,
            loaded_at=loaded_at,
            last_used=loaded_at + MIN_RESIDENCY_S,
            load_s=30.0,
        )
        return {"g1": ready, "g2": busy}

    demand = {"llm:small": 1, "script": 5}
    assert place(views(), demand, loaded_at + MIN_RESIDENCY_S - 1, pp).events == []
    (unload,) = place(views(), demand, loaded_at + MIN_RESIDENCY_S, pp).events
    assert (unload.gpu, unload.action, unload.model) == ("g1", "unload", "small")
    assert "other work waits" in unload.reason
    # the same GPU, its model's work done: it goes once unused a load time
    assert place(views(), {"script": 5}, loaded_at + 30.0 - 1, pp).events == []
    (unload,) = place(views(), {"script": 5}, loaded_at + 30.0, pp).events
    assert (unload.gpu, unload.action) == ("g1", "unload") and "no small work waiting" in unload.reason


def test_place_drains_a_busy_gpu_whose_share_moved_to_waiting_work() -> None:
    """Both GPUs run small's tasks and script work waits, so one of them is script work's share.
    Once loaded min_residency_s that GPU is asked to unload while its task runs (its worker takes
    no more of small's tasks and unloads after it), whether small's own work waits or not: a GPU
    its model keeps busy is never found idle. Not before min_residency_s, and not without other
    work waiting."""
    pp = make_policy().placement

    def views() -> dict[str, GpuView]:
        return {
            g: GpuView(
                gpu=g,
                worker=f"w{g[1]}",
                state=LLM_BUSY,
                llm="small",
                vram_total_mb=8192,
                vram_used_mb=800,
                loaded_at=T0,
                last_used=T0,
                load_s=30.0,
            )
            for g in ("g1", "g2")
        }

    running = {"llm:small": 2}
    for demand in ({"script": 5}, {"script": 5, "llm:small": 3}):
        assert place(views(), demand, T0 + MIN_RESIDENCY_S - 1, pp, running=running).events == []
        (unload,) = place(views(), demand, T0 + MIN_RESIDENCY_S, pp, running=running).events
        assert (unload.action, unload.model) == ("unload", "small"), unload
        assert "its share moved to script" in unload.reason and "after the task it runs" in unload.reason
    assert place(views(), {"llm:small": 3}, T0 + 10 * MIN_RESIDENCY_S, pp, running=running).events == []


def test_place_loads_a_gpu_of_the_llms_share_that_runs_short_script_work() -> None:
    """The only GPU runs a script task while small's prompts wait: it is small's share (work no
    GPU serves comes first), and it is asked to load small at once (its worker takes no more
    script work and loads after the task), since a GPU script work keeps busy is never found
    idle. Not when script tasks take longer than small's load: then it waits to be idle."""
    pp = make_policy().placement

    def views() -> dict[str, GpuView]:
        busy = GpuView(gpu="g1", worker="w1", state=SCRIPT_BUSY, vram_total_mb=8192, vram_used_mb=0)
        return {"g1": busy}

    demand, running = {"llm:small": 3}, {"script": 1}
    (load,) = place(views(), demand, T0, pp, running=running).events
    assert (load.gpu, load.action, load.model) == ("g1", "load", "small")
    slow_scripts = dataclasses.replace(pp, task_s=pp.load_s + 1)
    assert place(views(), demand, T0, slow_scripts, running=running).events == []


def test_a_drained_gpu_runs_no_more_of_its_models_tasks_and_goes_after_the_one_running() -> None:
    """End to end on the simulated fleet: two GPUs kept busy by small's prompts, then script work
    arrives. The GPU asked to unload while busy starts no more prompts, unloads when its task
    ends, and runs script work next."""
    sim = Sim(fleet(2, default_load_s=10.0), llm_s=7.0, script_s=5.0)
    sim.submit(prompts(400), plan_id="llm")
    sim.run_until(T0 + 30)
    sim.submit(scripts(40), plan_id="scripts")
    sim.run_while(lambda: not [r for r in sim.unloads() if "after the task it runs" in r.reason])
    drain = next(r for r in sim.unloads() if "after the task it runs" in r.reason)
    sim.finish("scripts")
    after = [r for r in sim.runs if r.gpu == drain.gpu and r.start >= drain.at]
    assert after and after[0].cls == "script", after[:3]
    unloaded = next(
        a.at for a in sim.answers if a.what == "unloaded" and a.gpu == drain.gpu and a.at >= drain.at
    )
    ran = [r for r in sim.runs if r.gpu == drain.gpu and r.start < drain.at <= r.end]
    assert len(ran) == 1 and unloaded == ran[0].end, "it went when the task it ran ended"
    sim.finish("llm")
    sim.check()


def load_times(sim: Sim) -> list[float]:
    """How long each load took (its worker's booting answer to its ready answer)."""
    booting: dict[str, float] = {}
    took: list[float] = []
    for a in sim.answers:
        if a.what == "booting":
            booting[a.gpu] = a.at
        elif a.what == "ready":
            took.append(a.at - booting.pop(a.gpu))
    return took


@pytest.mark.parametrize(("load_s", "yield_s"), [(2.0, YIELD_AFTER_S), (60.0, 60.0)])
def test_with_no_llm_work_left_script_work_gets_the_gpu_once_the_model_sat_unused(
    load_s: float, yield_s: float
) -> None:
    """Script work waits behind the LLM's last tasks on the only GPU. Once the LLM's work is
    done, the model goes after yield_after_s unused, or its load time if that is longer (about
    as long as loading it again costs); not before, and long before min_residency_s."""
    sim = Sim(fleet(1, default_load_s=load_s))
    sim.submit(prompts(3) + scripts(3))
    sim.run_while(lambda: len([r for r in sim.runs if r.cls == "llm"]) < 3)
    assert load_times(sim) == [load_s]
    assert sim.state.gpus["g1"].load_s == load_s  # the brain learned the load time from took_s
    last_used = max(r.end for r in sim.runs)
    sim.run_until(last_used + yield_s - 1)
    assert sim.unloads() == []
    assert not [r for r in sim.runs if r.cls == "script"]
    sim.run_until(last_used + yield_s + sim.dt)
    (unload,) = sim.unloads()
    assert last_used + yield_s <= unload.at <= last_used + yield_s + sim.dt
    assert unload.waiting == 0 and "no small work waiting" in unload.reason
    held = unload.at - next(a.at for a in sim.answers if a.what == "ready")
    assert held < MIN_RESIDENCY_S
    sim.finish()
    assert min(r.start for r in sim.runs if r.cls == "script") == unload.at  # at once
    assert len(sim.loads()) == 1
    sim.check()


def test_an_idle_model_makes_room_for_another_once_unused_a_load_time() -> None:
    """small's work is done and big's waits for the only GPU: small goes once unused its load
    time (30 s, longer than yield_after_s), long before min_residency_s."""
    sim = Sim(fleet(1, default_load_s=30.0))
    sim.submit(prompts(1))
    sim.run_for(60)
    (run,) = sim.runs
    assert sim.state.gpus["g1"].load_s == 30.0
    sim.submit(prompts(5, model="big", prefix="b"), plan_id="p2")
    sim.run_until(run.end + 30.0 - 1)
    assert sim.unloads() == []
    sim.finish("p2")
    (unload,) = sim.unloads()
    assert unload.model == "small" and run.end + 30.0 <= unload.at <= run.end + 30.0 + sim.dt
    assert unload.waiting == 0 and "5 big task(s) waiting" in unload.reason
    assert [r.model for r in sim.loads()] == ["small", "big"]
    sim.check()


@pytest.mark.parametrize("load_s", [5.0, 60.0, 150.0])
def test_alternating_llm_and_script_work_spends_at_most_half_the_time_loading(load_s: float) -> None:
    """Work alternates on one GPU, each LLM task with a script task queued behind it, so the
    model is unloaded for the script and loaded again for the next LLM task, forty times over.
    However long a load takes, the GPU spends at most half the time loading: the model waits a
    load time unused before it goes (a rent-or-buy rule: never more than twice the cost of
    the best choice made knowing the future)."""
    sim = Sim(fleet(1, default_load_s=load_s), llm_s=5.0, script_s=5.0)
    began = sim.now
    for k in range(40):
        sim.submit(prompts(1, prefix=f"q{k}") + scripts(1, prefix=f"s{k}"), plan_id=f"p{k}")
        sim.finish(f"p{k}")
        assert sim.plan(f"p{k}").status == "succeeded"
    took = load_times(sim)
    assert len(took) == len(sim.loads()) == len(sim.unloads()) == 40  # it really alternated
    assert all(t == load_s for t in took)
    assert sum(took) <= (sim.now - began) / 2
    sim.check()


@pytest.mark.parametrize("hung", [True, False], ids=["unanswered", "booting"])
def test_a_worker_restart_clears_a_pending_load_and_the_gpu_is_asked_again_at_once(hung: bool) -> None:
    """g1 took a load and never answered (a lost item, a hung load), or was still booting the
    model, when its worker restarted. The new process's first report (no previous state) tells
    the brain the request died with the old one: the load is asked again at once, not after
    load_timeout_s. A report from the same process leaves the request pending."""
    gpus = fleet(1, mute=hung, default_load_s=120.0)
    sim = Sim(gpus)
    sim.submit(prompts(3))
    sim.run_for(60)
    (first,) = sim.loads()
    assert sim.state.gpus["g1"].pending is not None
    sim.report(gpus[0])  # a fresh reading from the old process
    sim.settle()
    assert sim.state.gpus["g1"].pending is not None and len(sim.loads()) == 1
    gpus[0].mute = False
    restarted = sim.now
    sim.restart(gpus[0])
    sim.settle()
    (_, second) = sim.loads()
    assert second.at == restarted and second.rid != first.rid
    assert sim.state.gpus["g1"].pending is not None and sim.state.gpus["g1"].pending[2] == second.rid
    sim.finish()
    assert sim.plan().status == "succeeded"
    assert len(sim.loads()) == 2 and load_times(sim) == [120.0]
    assert min(r.start for r in sim.runs) == restarted + 120.0
    sim.check()


def test_work_that_cannot_fit_a_gpu_does_not_push_its_model_out() -> None:
    """A 4 GB GPU holding `small` is no use to `big` (5000 MB), however long big's work waits on
    the 8 GB GPU: small stays warm for its keep-alive, not just its minimum residency, so a
    trickle of small work finds it loaded (it was unloaded and loaded again for each task)."""
    gpus = [
        SimGpu(gpu="g1", worker="w1", vram_total_mb=4096),
        SimGpu(gpu="g2", worker="w2", vram_total_mb=8192),
    ]
    sim = Sim(gpus, llm_s=30.0)
    sim.submit(prompts(100, model="big", prefix="b"), plan_id="big")
    for k in range(5):
        sim.submit(prompts(1, prefix=f"s{k}"), plan_id=f"s{k}")
        sim.run_for(MIN_RESIDENCY_S + 150)
        assert sim.plan(f"s{k}").status == "succeeded"
    assert [(r.gpu, r.model) for r in sim.loads()] == [("g2", "big"), ("g1", "small")]
    assert sim.unloads() == []
    sim.check()


def test_a_model_over_its_share_keeps_gpus_the_short_model_cannot_use() -> None:
    """small drops below its share while big is short of GPUs, but big fits only g3:
    unloading small from a 4 GB GPU would leave that GPU idle and small's work slower."""
    gpus = [
        SimGpu(gpu="g1", worker="w1", vram_total_mb=4096),
        SimGpu(gpu="g2", worker="w2", vram_total_mb=4096),
        SimGpu(gpu="g3", worker="w3", vram_total_mb=8192),
    ]
    sim = Sim(gpus, llm_s=30.0)
    sim.submit(prompts(40, model="big", prefix="b") + prompts(40, prefix="s"))
    sim.finish()
    assert sorted((r.gpu, r.model) for r in sim.loads()) == [("g1", "small"), ("g2", "small"), ("g3", "big")]
    small_done = max(r.end for r in sim.runs if r.model == "small")
    assert small_done > T0 + MIN_RESIDENCY_S + 100  # small was over its share for a while
    assert all(r.at >= small_done + KEEP_ALIVE_S for r in sim.unloads())
    assert {r.gpu for r in sim.runs if r.model == "small" and r.start > T0 + 400} == {"g1", "g2"}
    sim.check()


def test_work_no_gpu_can_hold_does_not_push_other_models_out() -> None:
    sim = Sim(fleet(1, vram_mb=4096), make_policy(keep_warm=False))
    sim.submit(prompts(3, model="big", prefix="b"), plan_id="big")
    sim.submit(prompts(1), plan_id="small")
    sim.finish("small")
    last_used = max(r.end for r in sim.runs)
    sim.run_until(last_used + KEEP_ALIVE_S - 1)
    assert sim.unloads() == []
    sim.run_for(10)
    (unload,) = sim.unloads()
    assert "keep_alive" in unload.reason
    assert [r.model for r in sim.loads()] == ["small"]
    sim.check()


# ------------------------------------------------------------------ 5. keep-alive


def test_an_unused_model_is_unloaded_after_keep_alive_not_before() -> None:
    sim = Sim(fleet(1), make_policy(keep_warm=False))
    sim.submit(prompts(3))
    sim.finish()
    last_used = max(r.end for r in sim.runs)
    sim.run_until(last_used + KEEP_ALIVE_S - 1)
    assert sim.unloads() == [] and sim.holding() == {"g1": "small"}
    sim.run_until(last_used + KEEP_ALIVE_S + 10)
    (unload,) = sim.unloads()
    assert last_used + KEEP_ALIVE_S <= unload.at <= last_used + KEEP_ALIVE_S + sim.dt
    assert unload.model == "small" and "keep_alive" in unload.reason
    assert sim.holding() == {}
    sim.run_for(KEEP_ALIVE_S * 2)
    assert len(sim.requests) == 2  # one load, one unload: nothing more without work
    sim.check()


def test_use_restarts_the_keep_alive_clock() -> None:
    sim = Sim(fleet(1), make_policy(keep_warm=False))
    sim.submit(prompts(1))
    sim.finish()
    sim.run_for(KEEP_ALIVE_S - 100)
    sim.submit(prompts(1, prefix="again"), plan_id="p2")
    sim.finish("p2")
    last_used = max(r.end for r in sim.runs)
    sim.run_until(last_used + KEEP_ALIVE_S - 1)
    assert sim.unloads() == [] and len(sim.loads()) == 1  # the warm model served the second plan
    sim.run_for(10)
    assert len(sim.unloads()) == 1
    sim.check()


# ------------------------------------------------------------------ 6. a request never answered


def test_a_request_never_answered_is_given_up_after_load_timeout_and_decided_again() -> None:
    gpus = fleet(1, mute=True)
    sim = Sim(gpus)
    sim.submit(prompts(3))
    sim.run_for(1)
    (first,) = sim.loads()
    sim.run_until(first.at + LOAD_TIMEOUT_S - 1)
    assert len(sim.loads()) == 1
    assert sim.state.gpus["g1"].pending is not None
    gpus[0].mute = False
    sim.run_until(first.at + LOAD_TIMEOUT_S + sim.dt)
    assert len(sim.loads()) == 2
    second = sim.loads()[1]
    assert second.at - first.at == pytest.approx(LOAD_TIMEOUT_S, abs=sim.dt)
    assert second.rid != first.rid
    sim.finish()
    assert sim.plan().status == "succeeded"
    sim.check()


def test_an_unanswered_request_on_one_gpu_does_not_block_the_others() -> None:
    gpus = fleet(2)
    gpus[0].mute = True
    sim = Sim(gpus)
    sim.submit(prompts(4))
    sim.finish()
    assert sorted(r.gpu for r in sim.loads()) == ["g1", "g2"]
    assert {r.gpu for r in sim.runs} == {"g2"}
    sim.check()


# ------------------------------------------------------------------ 7. paused and offline GPUs


def test_paused_offline_and_unregistered_gpus_get_no_loads() -> None:
    gpus = fleet(4)
    sim = Sim(gpus)
    gpus[0].state = PAUSED
    sim.report(gpus[0])
    gpus[1].live = False  # its worker's registration expired
    sim.sweep()
    gpus[2].state = OFFLINE
    sim.report(gpus[2])
    sim.submit(prompts(60))
    sim.run_for(120)
    assert {r.gpu for r in sim.requests} == {"g4"}
    assert {r.gpu for r in sim.runs} == {"g4"}

    gpus[0].state = IDLE  # resumed
    sim.report(gpus[0])
    sim.settle()
    assert {r.gpu for r in sim.loads()} == {"g1", "g4"}
    gpus[1].live = True  # registered again
    sim.run_for(sim.sweep_s + 1)
    assert {r.gpu for r in sim.loads()} == {"g1", "g2", "g4"}
    sim.finish()
    assert not sim.loads("g3")
    sim.check()


def test_a_gpu_paused_while_holding_a_model_is_left_alone() -> None:
    gpus = fleet(1)
    sim = Sim(gpus)
    sim.submit(prompts(1))
    sim.finish()
    gpus[0].state = PAUSED  # the operator paused the worker; it keeps the model loaded
    sim.report(gpus[0])
    sim.run_for(KEEP_ALIVE_S * 2)
    assert sim.unloads() == []
    sim.check()


# ------------------------------------------------------------------ 8. demand accounting


def test_demand_counts_waiting_and_ready_model_work_and_returns_to_zero() -> None:
    tasks = [
        *prompts(3),  # no model: the default
        *prompts(2, prefix="b", model="big"),
        *scripts(2),
        TaskSpec(id="t0", body="hello", kind="transcribe", cls="script"),
        TaskSpec(id="cpu", body="true"),
        TaskSpec(id="after", body="say", kind="prompt", cls="llm", depends_on=("q0",)),
    ]
    sim = Sim([])
    step = sim.submit(tasks)
    (accepted,) = [e for e in step.events if isinstance(e, PlanAccepted)]
    models = {t.id: t.model for t in accepted.plan.tasks}
    assert models == {
        "q0": "small",
        "q1": "small",
        "q2": "small",
        "b0": "big",
        "b1": "big",
        "s0": "",
        "s1": "",
        "t0": "whisper",
        "cpu": "",
        "after": "small",
    }
    work = {w.task_id: w.model for w in step.work}
    assert work["q0"] == "small" and work["b0"] == "big" and work["t0"] == "whisper"
    # 'after' is pending (not work yet), 'cpu' runs no model
    assert sim.state.demand == {"llm:small": 3, "llm:big": 2, "script": 3}

    # the demand survives a restart from the records
    copied_tasks = [
        msgspec.json.decode(msgspec.json.encode(r), type=TaskRecord) for r in sim.state.tasks.values()
    ]
    copied_plans = [
        msgspec.json.decode(msgspec.json.encode(p), type=PlanRecord) for p in sim.state.plans.values()
    ]
    assert State.load(copied_tasks, copied_plans).demand == sim.state.demand

    gpus = fleet(2)
    for g in gpus:
        sim.gpus[g.gpu] = sim.by_worker[g.worker] = g
    sim.sweep()
    for g in gpus:
        sim.report(g)
    seen: list[dict[str, int]] = []
    sim.run_while(lambda: seen.append(dict(sim.state.demand)) or not sim.plan().final)
    assert sim.plan().status == "succeeded"
    assert {k: v for k, v in sim.state.demand.items() if v} == {}
    assert all(v >= 0 for d in seen for v in d.values())
    assert any(d.get("llm:small") == 1 for d in seen)  # 'after' counted once it waited
    sim.check()


def test_demand_follows_cancel_and_retry() -> None:
    sim = Sim([])
    sim.submit([*prompts(2), *scripts(1)])
    assert sim.state.demand == {"llm:small": 2, "script": 1}
    # a running task is no longer waiting work
    item = sim.llm_work["small"].popleft()
    sim.feed(
        RunStarted(plan_id="p1", task_id=item.task_id, attempt=1, worker="w1", at=sim.now, claim=item.claim)
    )
    assert sim.state.demand == {"llm:small": 1, "script": 1}
    sim.feed(CancelPlan(plan_id="p1", at=sim.now))
    assert {k: v for k, v in sim.state.demand.items() if v} == {}

    retried = Sim([])
    retried.submit([TaskSpec(id="q", body="say", kind="prompt", cls="llm", retries=2)])
    item = retried.llm_work["small"].popleft()
    retried.feed(
        RunStarted(plan_id="p1", task_id="q", attempt=1, worker="w1", at=retried.now, claim=item.claim)
    )
    assert retried.state.demand == {"llm:small": 0}
    retried.feed(
        RunFinished(
            plan_id="p1",
            task_id="q",
            attempt=1,
            worker="w1",
            at=retried.now,
            ok=False,
            duration_s=1.0,
            claim=item.claim,
        )
    )
    assert retried.state.demand == {"llm:small": 1}


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        (TaskSpec(id="x", body="say", kind="prompt", cls="llm", model="huge"), ["'huge'", "small", "big"]),
        (
            TaskSpec(id="x", body="say", kind="prompt", cls="llm", model="whisper"),
            ["'whisper'", "transcribe"],
        ),
        (TaskSpec(id="x", body="a.wav", kind="transcribe", cls="script", model="small"), ["'small'", "llm"]),
    ],
)
def test_an_unknown_or_wrong_kind_model_rejects_the_plan(spec: TaskSpec, needles: list[str]) -> None:
    sim = Sim(fleet(1))
    step = sim.submit([*prompts(2), spec])
    (rejected,) = [e for e in step.events if isinstance(e, PlanRejected)]
    for needle in needles:
        assert needle in rejected.error
    assert sim.plan().status == "rejected"
    assert {k: v for k, v in sim.state.demand.items() if v} == {}
    assert step.work == [] and sim.requests == []


def test_without_a_registry_models_are_left_as_written() -> None:
    policy = Policy(release_window=256)
    state = State()
    step = apply(
        state, SubmitPlan(plan_id="p1", plan=PlanSpec(title="t", tasks=tuple(prompts(1))), at=T0), T0, policy
    )
    (accepted,) = [e for e in step.events if isinstance(e, PlanAccepted)]
    assert accepted.plan.tasks[0].model == ""


# ------------------------------------------------------------------ properties


GPU_SIZES = (2048, 4096, 6144, 8192, 24576)


@st.composite
def gpu_views(draw: st.DrawFn, now: float) -> dict[str, GpuView]:
    views: dict[str, GpuView] = {}
    for i in range(draw(st.integers(0, 5))):
        total = draw(st.sampled_from(GPU_SIZES))
        state = draw(
            st.sampled_from([IDLE, IDLE, IDLE, BOOTING_LLM, LLM_READY, LLM_BUSY, SCRIPT_BUSY, PAUSED])
        )
        llm = draw(st.sampled_from(["small", "big"])) if state in HOLDS_LLM else ""
        used = draw(st.integers(0, total))
        reserved = draw(st.integers(0, used))
        pending = None
        if draw(st.booleans()):
            action = draw(st.sampled_from(["load", "unload"]))
            pending = (
                action,
                draw(st.sampled_from(["small", "big"])),
                f"r{i}",
                now - draw(st.floats(0, 2000)),
            )
        loaded_at = now - draw(st.floats(0, 2000))
        views[f"g{i}"] = GpuView(
            gpu=f"g{i}",
            worker=f"w{i}",
            state=state,
            llm=llm,
            vram_total_mb=total,
            vram_used_mb=used,
            vram_reserved_mb=reserved,
            llm_slots=draw(st.integers(1, 3)),
            live=draw(st.booleans()) or draw(st.booleans()),
            loaded_at=loaded_at,
            last_used=loaded_at + draw(st.floats(0, 100)),
            pending=pending,
            refused={
                m: now - draw(st.floats(0, 2000)) for m in draw(st.sets(st.sampled_from(["small", "big"])))
            },
        )
    return views


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    demand=st.fixed_dictionaries(
        {},
        optional={
            "llm:small": st.integers(0, 20),
            "llm:big": st.integers(0, 20),
            "llm:unknown": st.integers(0, 5),
            "script": st.integers(0, 20),
        },
    ),
)
def test_place_never_loads_where_it_cannot_and_asks_each_gpu_once(
    data: st.DataObject, demand: dict[str, int]
) -> None:
    pp = make_policy().placement
    now = T0 + 5000
    views = data.draw(gpu_views(now))
    before = {g: (v.pending, dict(v.refused), v.free_for_llm_mb) for g, v in views.items()}

    def live(v: GpuView) -> bool:
        return v.pending is not None and now - v.pending[3] < pp.load_timeout_s

    def holds(v: GpuView, m: str) -> bool:
        """As placement counts holders: a GPU whose unload is in flight no longer holds its
        model, one asked to load a model holds it."""
        if live(v):
            return v.pending is not None and v.pending[:2] == ("load", m)
        return v.llm == m and v.state in HOLDS_LLM

    holders_before = {m: sum(1 for v in views.values() if v.usable and holds(v, m)) for m in ("small", "big")}
    decision = place(views, demand, now, pp)

    assert [i.rid for i in decision.items] == [e.rid for e in decision.events]
    asked = [e.gpu for e in decision.events]
    assert len(asked) == len(set(asked)), "two requests for one GPU"
    for ev in decision.events:
        view = views[ev.gpu]
        pending, refused, free = before[ev.gpu]
        assert view.usable
        assert pending is None or now - pending[3] >= pp.load_timeout_s, "asked while a request is pending"
        assert view.pending is not None and view.pending[2] == ev.rid
        if ev.action == "load":
            assert not view.llm
            if view.state == SCRIPT_BUSY:
                # loads once its script task ends (its worker checks the memory then)
                assert view.vram_total_mb >= need_mb(ev.model), f"load {ev.model} on {ev.gpu}"
            else:
                assert free >= need_mb(ev.model), f"load {ev.model} on {ev.gpu} with {free} MB free"
                assert view.state == IDLE
            assert ev.model not in refused or now - refused[ev.model] >= pp.load_timeout_s
            assert demand.get(f"llm:{ev.model}", 0) > 0
        else:
            assert view.state in (LLM_READY, LLM_BUSY) and view.llm == ev.model
            if view.state == LLM_BUSY:
                # drained: only a GPU loaded long enough, once its share went to other work
                assert now - view.loaded_at >= pp.min_residency_s and "after the task it runs" in ev.reason
    for m in ("small", "big"):
        new = sum(1 for e in decision.events if e.action == "load" and e.model == m)
        if new:
            assert holders_before[m] + new <= demand[f"llm:{m}"], "more GPUs than waiting tasks"
    for _model, need, largest in decision.unplaceable:
        assert need > largest


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(GPU_SIZES), min_size=1, max_size=4),
    others=st.lists(st.sampled_from([0, 0, 0, 1000, 7000]), min_size=4, max_size=4),
    arrivals=st.lists(
        st.tuples(st.integers(0, 600), st.sampled_from(["small", "big", "script"]), st.integers(1, 12)),
        min_size=1,
        max_size=5,
    ),
)
def test_random_fleets_and_demands_run_clean(
    sizes: list[int], others: list[int], arrivals: list[tuple[int, str, int]]
) -> None:
    gpus = [
        SimGpu(gpu=f"g{i}", worker=f"w{i}", vram_total_mb=size, other_mb=others[i], default_load_s=20.0)
        for i, size in enumerate(sizes)
    ]
    sim = Sim(gpus, make_policy(keep_alive_s=400, min_residency_s=200, load_timeout_s=300))
    for n, (at, what, count) in enumerate(sorted(arrivals)):
        sim.run_until(T0 + at)
        tasks = scripts(count) if what == "script" else prompts(count, model=what)
        sim.submit(tasks, plan_id=f"p{n}")
    # every plan whose work some GPU can really run finishes (a refusal is asked again after
    # load_timeout_s); the others wait, and nothing is ever asked of a GPU that it cannot do
    servable = [
        f"p{n}"
        for n, (_, what, _) in enumerate(sorted(arrivals))
        if what == "script" or any(g.vram_total_mb - g.other_mb >= need_mb(what) for g in gpus)
    ]
    sim.run_while(lambda: not all(sim.plan(p).final for p in servable), limit_s=10_000)
    sim.run_for(1000)
    sim.check()
    assert all(sim.plan(p).status == "succeeded" for p in servable)


def test_the_policy_defaults_are_the_settings_defaults() -> None:
    """A PlacementPolicy built without settings (the simulator's, a test's) decides as the brain
    does with mesh's default settings."""
    models = {"small": ("llm", 800)}
    assert PlacementPolicy(models=models) == PlacementPolicy.of(Settings(), models)


def test_a_gpu_whose_unload_is_in_flight_no_longer_holds_its_model() -> None:
    """Three GPUs hold qwen: g1 is busy with an unload asked of it (it waits for its task to
    end), g2 and g3 are ready and were loaded long ago. One qwen task and ten script tasks wait.
    g1 counts as leaving qwen (and as free for script work soon): qwen keeps a GPU for its task,
    and no more than one other GPU is asked to go. (Counting g1 as still holding qwen made the
    brain unload g2 and g3 both, leaving qwen on no GPU while its task waited.)"""
    pp = PlacementPolicy(models={"qwen": ("llm", 5000)})
    now = T0 + 10_000

    def view(gpu: str, state: str, pending: tuple[str, str, str, float] | None = None) -> GpuView:
        return GpuView(
            gpu=gpu,
            worker=f"w-{gpu}",
            state=state,
            llm="qwen",
            vram_total_mb=8192,
            vram_used_mb=5000,
            loaded_at=T0,
            last_used=T0,
            load_times={"qwen": 60.0},
            pending=pending,
        )

    views = {
        "g1": view("g1", LLM_BUSY, ("unload", "qwen", "g1-unload-qwen", now - 5)),
        "g2": view("g2", LLM_READY),
        "g3": view("g3", LLM_READY),
    }
    decision = place(views, {"llm:qwen": 1, "script": 10}, now, pp)
    unloads = [e for e in decision.events if e.action == "unload"]
    assert len(unloads) <= 1 and {e.gpu for e in unloads} <= {"g2", "g3"}
    keep = [v for v in views.values() if v.holds("qwen")]
    assert keep and all(v.pending is None for v in keep), "qwen must keep a GPU for its waiting task"


def test_a_load_item_says_the_vram_it_was_placed_by() -> None:
    policy = PlacementPolicy(models={"qwen": ("llm", 5600)})
    gpus = {"g0": GpuView(gpu="g0", worker="w0", vram_total_mb=8192)}
    decision = place(gpus, {"llm:qwen": 1}, 0.0, policy)
    assert [(i.action, i.model, i.vram_mb) for i in decision.items] == [("load", "qwen", 5600)]


@pytest.mark.parametrize("lend_factor", [1.0, 1000.0], ids=["lends", "never-pays"])
def test_an_idle_models_gpus_are_lent_to_another_models_burst_when_it_pays(lend_factor: float) -> None:
    """small ran a burst on all three GPUs and has no work left; then 60 big prompts arrive
    (600 s of work against 30 s loads). big gets its own share at once; the GPUs still in
    small's share go to big too once unused a load time, because the burst gives each of them
    far more than the loan costs (big's load now, small's when its work is back). With a lend
    factor no burst can pay, small keeps them (its work may come back) and big runs on its share."""
    base = make_policy()
    pp = dataclasses.replace(base.placement, lend_factor=lend_factor)
    sim = Sim(fleet(3, default_load_s=30.0), dataclasses.replace(base, placement=pp))
    sim.submit(prompts(30))
    sim.finish()
    assert set(sim.holding().values()) == {"small"} and len(sim.holding()) == 3
    done = sim.now
    sim.submit(prompts(60, model="big", prefix="b"), plan_id="p2")
    sim.run_for(300)
    big = sorted(g for g, m in sim.holding().items() if m == "big")
    lent = [r for r in sim.unloads() if r.at >= done and "lent" in r.reason]
    if lend_factor == 1.0:
        assert len(big) == 3, sim.holding()
        assert lent and all(r.model == "small" and r.at - done >= 30.0 for r in lent), lent
    else:
        assert 1 <= len(big) < 3 and not lent, (sim.holding(), lent)
    sim.finish("p2")
    assert sim.plan("p2").status == "succeeded"
    sim.check()
