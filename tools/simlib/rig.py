"""The simulated rig: the real brain, the pure state machine `mesh.machine.apply` with its
placement (`mesh.placement`), and simulated GPU workers (`tools.simlib.worker`) on one clock, no NATS.

The brain is `apply` itself: every input (a submission, a worker's report, a `Tick` every
`tick_s`, a `Sweep` every `sweep_s` with the workers whose registration has not expired) goes
through it, and what it decides is carried out as the bus would carry it: work items wait on
their queue (`llm:<model>`, `script`) for a lane that may fetch them (the longest-waiting fetch
first), resource items on their worker's own queue; the items of attempts the brain gave up as
lost are deleted from the queues (as `agents/brain_commit.py` does), and an item whose worker
died unacknowledged is offered again, ahead of new work, `ack_wait_s` later.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections import deque
from collections.abc import Callable

from mesh import work
from mesh.events import (
    GpuState,
    Message,
    PlanSpec,
    ResourceItem,
    SubmitPlan,
    TaskFailed,
    TaskRedelivered,
    TaskRetrying,
    TaskSpec,
    TaskSucceeded,
    WorkItem,
)
from mesh.machine import Policy, State, Step, Sweep, Tick, apply
from mesh.placement import PlacementPolicy
from mesh.records import FINAL_STATES
from mesh.settings import Settings
from mesh.status import FailReason
from tools.simlib.worker import Hooks, Queued, SimWorker
from tools.simlib.workload import DURATION_ENV, Task, Workload

CLAIM_KEY = b"simulated-brain-claim-key"

BrainInput = Message | Tick | Sweep


def build_policy(w: Workload) -> Policy:
    """The brain's policy as `agents/brain.py` builds it from mesh's settings, with the models of
    the workload and its `[policy]` overrides."""
    s = Settings()
    placement = PlacementPolicy(
        models={m.name: (m.kind, m.vram_mb) for m in w.models.values()},
        keep_alive_s=s.keep_alive_s,
        min_residency_s=s.min_residency_s,
        load_timeout_s=s.load_timeout_s,
        yield_after_s=s.yield_after_s,
    )
    defaults: dict[str, str] = {}
    for m in sorted(w.models.values(), key=lambda m: m.name):
        defaults.setdefault(m.kind, m.name)
    policy = Policy(
        release_window=s.release_window,
        retry_base_s=s.retry_base_s,
        retry_max_s=s.retry_max_s,
        aging_s=s.aging_s,
        lost_after_s=2 * w.timing.ack_wait_s + w.timing.agent_ttl_s,
        default_models=defaults,
        placement=placement,
        claim_key=CLAIM_KEY,
    )
    brain_fields = {f.name for f in dataclasses.fields(Policy)} - {"placement", "default_models"}
    place_fields = {f.name for f in dataclasses.fields(PlacementPolicy)} - {"models"}
    for key, value in w.policy.items():
        if key in place_fields:
            policy = dataclasses.replace(
                policy, placement=dataclasses.replace(policy.placement, **{key: value})
            )
        elif key in brain_fields:
            policy = dataclasses.replace(policy, **{key: value})
        else:
            known = ", ".join(sorted(brain_fields | place_fields))
            raise ValueError(f"{w.name}: [policy] has no field {key!r}; fields: {known}")
    return policy


class Clock:
    """Simulated time: callbacks due at a time, run in the order they were set."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn))

    def after(self, dt: float, fn: Callable[[], None]) -> None:
        self.at(self.now + dt, fn)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop(self) -> Callable[[], None]:
        return heapq.heappop(self._heap)[2]


class Rig:
    """The brain (`apply`) and its simulated workers, on one clock."""

    def __init__(self, w: Workload, seed: int, hooks: Hooks | None = None) -> None:
        self.w = w
        self.seed = seed
        self.clock = Clock()
        self.policy = build_policy(w)
        self.state = State(aging_s=self.policy.aging_s)
        self.hooks = hooks or Hooks()
        self.rng = random.Random(f"{w.name}:{seed}:loads")
        self.workers = [SimWorker(self, n, u) for n, u in enumerate(w.units)]
        self.by_worker = {x.worker: x for x in self.workers}
        self.queues: dict[str, deque[Queued]] = {}
        self.inbox: deque[BrainInput] = deque()
        self.pumping = False
        self.violations: list[str] = []
        self.notes: dict[str, float] = {}
        # loads the workers refused; deliveries skipped as no longer wanted; attempts taken over
        # by redelivery and given up as lost; worker reports the brain ignored (stale)
        self.refusals = 0
        self.skipped = 0
        self.redelivered = 0
        self.lost = 0
        self.ignored = 0
        self.requests: list[ResourceItem] = []
        # (task key, attempt) of work items the brain deleted from the queues
        self.forgotten: set[tuple[str, int]] = set()
        # (task key, attempt, worker) -> when that run started
        self.run_starts: dict[tuple[str, int, str], float] = {}
        self.tasks: dict[str, Task] = {}
        self.finished: dict[str, float] = {}
        self.served_start: dict[str, float] = {}
        self.submitted = 0
        self.arrivals_left = 0
        self.last_sweep = -1e9
        self.on_step: Callable[[BrainInput, Step], None] = lambda msg, step: None

    # the brain --------------------------------------------------------------------------
    def send(self, msg: BrainInput) -> None:
        """An input for the brain (decided when the rig next pumps, at this same time)."""
        self.inbox.append(msg)

    def pump(self) -> None:
        """Decide every input queued, hand out the work it released, until nothing moves."""
        if self.pumping:
            return
        self.pumping = True
        try:
            while True:
                while self.inbox:
                    self._apply(self.inbox.popleft())
                if not self._dispatch():
                    break
        finally:
            self.pumping = False

    def _apply(self, msg: BrainInput) -> None:
        now = self.clock.now
        step = apply(self.state, msg, now, self.policy)
        if step.refused:
            self.violations.append(f"{now:.1f}: the brain refused a report: {step.refused}")
        if step.ignored and not isinstance(msg, GpuState):
            self.ignored += 1
        for item in step.work:
            name = f"llm:{item.model}" if item.cls == "llm" else item.cls
            self.queues.setdefault(name, deque()).append(Queued(item, 1, now))
        for res in step.resources:
            self.requests.append(res)
            target = self.by_worker[res.worker]
            if res.action == "load" and not self.w.fits(target.unit, res.model):
                self.violations.append(
                    f"{now:.1f}: the brain placed {res.model} ({self.w.models[res.model].vram_mb} MB) on "
                    f"{target.gpu_id} ({target.vram_total_mb} MB)"
                )
            target.own.append(res)
        for ev in step.events:
            match ev:
                case TaskRetrying() | TaskFailed() if ev.reason == FailReason.LOST:
                    self.lost += 1
                    self._forget(f"{ev.plan_id}.{ev.task_id}", ev.attempt)
                    if isinstance(ev, TaskFailed):
                        self.finished[f"{ev.plan_id}.{ev.task_id}"] = now
                case TaskRedelivered():
                    self.redelivered += 1
                case TaskSucceeded():
                    key = f"{ev.plan_id}.{ev.task_id}"
                    self.finished[key] = now
                    start = self.run_starts.get((key, ev.attempt, ev.worker))
                    if start is not None:
                        self.served_start[key] = start
                case TaskFailed():
                    self.finished[f"{ev.plan_id}.{ev.task_id}"] = now
        for note in step.notes:
            self.notes.setdefault(note, now)
        self.on_step(msg, step)

    def _forget(self, key: str, attempt: int) -> None:
        """`BrainCommit._forget_work`: the queued item of an attempt given up as lost is deleted."""
        for q in self.queues.values():
            for queued in [x for x in q if work.item_key(x.item.plan_id, x.item.task_id) == key]:
                if queued.item.attempt <= attempt:
                    q.remove(queued)
        self.forgotten.add((key, attempt))

    # the bus ------------------------------------------------------------------------------
    def _due(self, name: str) -> Queued | None:
        for q in self.queues.get(name, ()):
            if q.not_before <= self.clock.now:
                return q
        return None

    def _dispatch(self) -> bool:
        """Hand work to the lanes that may fetch, the longest-waiting fetch first."""
        moved = False
        for x in self.workers:
            if x.alive and not x.lock and x.own:
                x.resource(x.own.popleft())
                moved = True
        while True:
            best: tuple[float, int, str, str] | None = None
            for x in self.workers:
                for lane, name in x.lanes():
                    if self._due(name) is None:
                        continue
                    cand = (x.free_since[lane], x.index, lane, name)
                    if best is None or cand < best:
                        best = cand
            if best is None:
                return moved
            _, index, lane, name = best
            q = self._due(name)
            assert q is not None
            self.queues[name].remove(q)
            self.workers[index].take(q, lane)
            moved = True

    def requeue(self, q: Queued, delay: float) -> None:
        q.not_before = self.clock.now + delay
        q.delivery += 1
        name = f"llm:{q.item.model}" if q.item.cls == "llm" else q.item.cls
        self.queues.setdefault(name, deque()).append(q)
        self.clock.after(delay, lambda: None)  # the rig pumps after every callback

    def redeliver_later(self, item: WorkItem, delivery: int) -> None:
        """A delivery never acknowledged: offered again (ahead of new work) after ack_wait_s,
        unless the brain deleted it meanwhile."""
        key = work.item_key(item.plan_id, item.task_id)

        def again() -> None:
            if (key, item.attempt) in self.forgotten:
                return
            rec = self.state.tasks.get(key)
            if rec is not None and rec.status in FINAL_STATES:
                return  # acknowledged by whoever finished it: JetStream has nothing to redeliver
            name = f"llm:{item.model}" if item.cls == "llm" else item.cls
            # (a redelivery is checked against the task's record whatever its age: delivery > 1)
            self.queues.setdefault(name, deque()).appendleft(Queued(item, delivery + 1, 0.0))

        self.clock.after(self.w.timing.ack_wait_s, again)

    def registered(self) -> frozenset[str]:
        """The workers whose registration has not expired."""
        now, ttl = self.clock.now, self.w.timing.agent_ttl_s
        return frozenset(
            x.worker for x in self.workers if x.alive or (x.gone_at is not None and now - x.gone_at < ttl)
        )

    def load_time(self, model: str) -> float:
        jitter = self.w.load_jitter
        return self.w.models[model].load_s * self.rng.uniform(1 - jitter, 1 + jitter)

    def check_memory(self, x: SimWorker) -> None:
        if x.used_mb() > x.vram_total_mb:
            self.violations.append(
                f"{self.clock.now:.1f}: {x.gpu_id} holds {x.used_mb()} MB of {x.vram_total_mb} MB"
            )

    # the run ------------------------------------------------------------------------------
    def submit(self, tasks: list[Task]) -> None:
        specs = tuple(self._spec(t) for t in tasks)
        plan_id = tasks[0].plan_id
        for t in tasks:
            self.tasks[t.key] = t
        self.submitted += len(tasks)
        self.arrivals_left -= 1
        self.send(SubmitPlan(plan_id=plan_id, plan=PlanSpec(title=plan_id, tasks=specs), at=self.clock.now))

    def _spec(self, t: Task) -> TaskSpec:
        k = self.w.kinds[t.kind]
        return TaskSpec(
            id=t.task_id,
            body=f"{k.body} {t.kind}",
            kind=k.body,  # type: ignore[arg-type]
            cls=k.cls,  # type: ignore[arg-type]
            model=k.model,
            retries=k.retries,
            env={DURATION_ENV: f"{t.duration_s:.3f}"},
        )

    def tick(self) -> None:
        """The brain's clock: a sweep when one is due (with the registered workers), else a tick."""
        t = self.w.timing
        if self.clock.now - self.last_sweep >= t.sweep_s:
            self.last_sweep = self.clock.now
            self.send(Sweep(live=self.registered()))
        else:
            self.send(Tick())
        self.clock.after(t.tick_s, self.tick)

    def done(self) -> bool:
        return self.arrivals_left == 0 and len(self.finished) >= self.submitted

    def run(self, tasks: list[Task], observe: Callable[[float], None] = lambda t: None) -> float:
        """Run the workload's tasks to their end (or the horizon); return the time it stopped.
        `observe(t)` is called before the clock moves to `t`."""
        plans: dict[str, list[Task]] = {}
        for t in tasks:
            plans.setdefault(t.plan_id, []).append(t)
        self.arrivals_left = len(plans)
        for group in plans.values():
            self.clock.at(group[0].at, lambda g=group: self.submit(g))  # type: ignore[misc]
        for f in self.w.failures:
            x = self.workers[f.unit]
            self.clock.at(f.at_s, lambda x=x, f=f: x.die(f.report_offline))  # type: ignore[misc]
            self.clock.at(f.at_s + f.down_s, x.revive)
        for x in self.workers:
            x.publish(force=True)
        self.tick()
        self.pump()
        horizon = self.w.duration_s + self.w.drain_s
        while not self.done():
            due = self.clock.next_time()
            if due is None or due > horizon:
                observe(horizon)
                self.clock.now = horizon
                return horizon
            observe(due)
            self.clock.now = due
            self.clock.pop()()
            self.pump()
        return self.clock.now


__all__ = ["Clock", "Rig", "build_policy"]
