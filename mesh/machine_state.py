"""The brain's state machine, its state: the task and plan records in memory with their indexes
(queues, demand, dependents), and `evolve`, which folds one transition event into them.

`evolve` is the only code that changes task and plan records, and it reads nothing but the
event, so folding the event history with it (`mesh replay`) rebuilds exactly the records the
live brain wrote to KV.
"""

from __future__ import annotations

import heapq
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mesh.events import (
    PACK_CLASSES,
    GpuState,
    LocalAttempt,
    Msg,
    PlanAccepted,
    PlanArchived,
    PlanFinished,
    PlanRejected,
    PlanResumed,
    PlanTasks,
    TaskCancelled,
    TaskClimbed,
    TaskEscalated,
    TaskFailed,
    TaskFollowups,
    TaskRedelivered,
    TaskReleased,
    TaskReset,
    TaskRetrying,
    TaskReviewed,
    TaskReviewing,
    TaskSpec,
    TaskStarted,
    TaskSucceeded,
    TaskWaiting,
)
from mesh.learned import Learned
from mesh.placement import SCRIPT, GpuView, Pressure, llm_demand_key
from mesh.records import (
    CANCELLED,
    ESCALATING,
    FAILED,
    INFLIGHT_STATES,
    PENDING,
    PLAN_REJECTED,
    PLAN_RUNNING,
    READY,
    RUNNING,
    SUCCEEDED,
    WAITING,
    PlanRecord,
    TaskRecord,
)
from mesh.status import FailReason, TaskStatus

# a task in these states is work waiting for a GPU (what placement counts)
DEMAND_STATES = frozenset({WAITING, READY})
# a task keeps this many of its last local attempts (what an escalation carries to Claude)
KEEP_ATTEMPTS = 5


_index_of = operator.attrgetter("index")
# a task record's times: many records share each (a step's), unlike their durations
_TIMES = ("not_before", "waiting_since", "released_at", "started_at", "finished_at", "updated_at")
_ZERO = 0.0


def task_key(rec: TaskRecord) -> str:
    """A record's key, the one copy everyone keeps (`TaskRecord.key` interns it)."""
    return rec.key


# the environment of every task that sets none: one empty dict, where each decoded spec had
# its own (64 bytes a task). Nothing changes a spec's environment (specs are frozen)
_NO_ENV: dict[str, str] = {}


def compact_record(rec: TaskRecord, floats: dict[float, float]) -> TaskRecord:
    """A decoded record made to share what a million records repeat (done again, it changes
    nothing): one copy of each plan id and worker (a status and a reason decode as their enum
    members, one copy already), the task's id once with its spec's, an empty environment, and
    its times from `floats` (each decoded value is a float of its own, 24 bytes, eight a record:
    the records one step wrote share their times, and every zero is one). Done as each record
    is read, the copies it drops are freed while the next records are decoded into them; done
    once all are read, they were freed among the records and the memory stayed in use."""
    if not floats:
        floats[_ZERO] = _ZERO  # every zero is the one zero
    rec.plan_id = sys.intern(rec.plan_id)
    rec.worker = sys.intern(rec.worker)
    if rec.task_id == rec.spec.id:
        rec.task_id = rec.spec.id
    rec.spec = compact_spec(rec.spec)
    for name in _TIMES:
        value = getattr(rec, name)
        setattr(rec, name, floats.setdefault(value, value))
    if rec.duration_s == 0.0:
        rec.duration_s = rec.ttft_s = _ZERO
    elif rec.ttft_s == 0.0:
        rec.ttft_s = _ZERO
    return rec


def packs(rec: TaskRecord) -> bool:
    """Whether the task's work item is packed whatever else is released with it: a no-op task
    of a class that packs, queued (not continued on a worker) and not under review. It counts
    against its class's release window a pack at a time (`Release.window_used`). A function of
    the record, so a replay, a brain's catch-up and a restarted brain count as the live one did."""
    spec = rec.spec
    return spec.kind == "noop" and spec.cls in PACK_CLASSES and not rec.continued and not rec.review


def compact_spec(spec: TaskSpec) -> TaskSpec:
    """The spec, its empty environment shared with every other task's."""
    if not spec.env and spec.env is not _NO_ENV:
        msgspec.structs.force_setattr(spec, "env", _NO_ENV)
    return spec


@dataclass
class State:
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    plans: dict[str, PlanRecord] = field(default_factory=dict)
    dependents: dict[str, list[str]] = field(default_factory=dict)
    # plan id -> its task keys, in plan order
    plan_keys: dict[str, list[str]] = field(default_factory=dict)
    # class -> heap of (virtual time, seq, task key); stale entries are skipped on pop
    queue: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)
    # heap of (not_before, seq, task key): retries waiting out their backoff
    delayed: list[tuple[float, int, str]] = field(default_factory=list)
    inflight: dict[str, int] = field(default_factory=dict)
    # in-flight no-op tasks (always packed, `mesh.packing`: `packs`), and their count by class:
    # the release window counts them a pack at a time (`Release.window_used`)
    packed: set[str] = field(default_factory=set)
    packed_inflight: dict[str, int] = field(default_factory=dict)
    # agents seen registered, and since when each seen one has been gone
    agents_live: set[str] = field(default_factory=set)
    offline_since: dict[str, float] = field(default_factory=dict)
    dirty_tasks: set[str] = field(default_factory=set)
    dirty_plans: set[str] = field(default_factory=set)
    removed_tasks: set[str] = field(default_factory=set)
    removed_plans: set[str] = field(default_factory=set)
    aging_s: float = 60.0
    # GPUs as their workers report them, and the model work waiting (waiting or ready tasks)
    # and running, by demand key ('llm:<model>', 'script')
    gpus: dict[str, GpuView] = field(default_factory=dict)
    demand: dict[str, int] = field(default_factory=dict)
    # load times, VRAM used and task durations measured so far (`gpu.state`, `task.succeeded`)
    learned: Learned = field(default_factory=Learned)
    running: dict[str, int] = field(default_factory=dict)
    # tasks that became model work (waiting) so far, by demand key: placement tells work that
    # stopped from work between bursts by when they arrive
    arrived: dict[str, int] = field(default_factory=dict)
    # placement's memory between decisions (each class's need over time, arrivals, shares); not
    # in the records: a restarted brain starts it afresh
    pressure: Pressure = field(default_factory=Pressure)
    _seq: int = 0
    _vtime: float = 0.0

    def _count(self, rec: TaskRecord, delta: int) -> None:
        """Count (or uncount) a record as model work by its status: waiting or running."""
        if rec.status in DEMAND_STATES or rec.status == RUNNING:
            self._count_as(demand_key(rec), rec.status, delta)

    def _count_as(self, key: str, status: str, delta: int) -> None:
        """Count (or uncount) work of demand `key` ('' : none) in `status`."""
        if status in DEMAND_STATES:
            _add(self.demand, key, delta)
        elif status == RUNNING:
            _add(self.running, key, delta)

    # ---------------------------------------------------------- indexes
    def _push(
        self, rec: TaskRecord, key: str = "", push: Callable[[list[Any], Any], None] = heapq.heappush
    ) -> None:
        self._seq += 1
        if rec.not_before > 0:
            push(self.delayed, (rec.not_before, self._seq, key or task_key(rec)))
            return
        vtime = rec.waiting_since - rec.spec.priority * self.aging_s
        # tasks that became waiting together share their virtual time: one float for them all
        if vtime == self._vtime:
            vtime = self._vtime
        self._vtime = vtime
        push(self.queue.setdefault(rec.spec.cls, []), (vtime, self._seq, key or task_key(rec)))

    def _index(
        self, rec: TaskRecord, key: str = "", push: Callable[[list[Any], Any], None] = heapq.heappush
    ) -> None:
        """Index a record added to `tasks` under `key` (its key: computed when not given).
        `push`: how a waiting task goes into its queue (`State.load` appends, then heapifies)."""
        key = key or task_key(rec)
        self.plan_keys.setdefault(rec.plan_id, []).append(key)
        for dep in rec.spec.depends_on:
            self.dependents.setdefault(f"{rec.plan_id}.{dep}", []).append(key)
        for followup in rec.followups:
            # an escalated task waits on the follow-up tasks Claude proposed
            self.dependents.setdefault(f"{rec.plan_id}.{followup}", []).append(key)
        self._count(rec, 1)
        if rec.status == WAITING:
            self._push(rec, key, push)
        elif rec.status in INFLIGHT_STATES:
            self.inflight[rec.spec.cls] = self.inflight.get(rec.spec.cls, 0) + 1
            if packs(rec):
                self.pack(key, rec.spec.cls)

    @classmethod
    def load(
        cls, tasks: list[TaskRecord], plans: list[PlanRecord], aging_s: float = 60.0, compacted: bool = False
    ) -> State:
        """Rebuild a state (and its indexes) from records read back from KV.

        A plan's counts are counted again from its task records: the two buckets are stored
        independently, so a cut while a step's records were written can keep a plan record
        whose counts are ahead of (or behind) its tasks' records. Folding the step's events
        again then counted a task's success twice, and the plan finished with a task running.
        A plan whose counts change is marked for writing. `compacted`: every record was made
        compact as it was read (`compact_record`), so it is not done again.

        The queues are built whole (appended, then made heaps once): a heap push per waiting
        task was a sixth of loading a million records."""
        state = cls(aging_s=aging_s)
        for plan in plans:
            state.plans[plan.plan_id] = plan
        # by plan, then by index within each (a sort on (plan, index) built a tuple per record)
        by_plan: dict[str, list[TaskRecord]] = {}
        floats: dict[float, float] = {_ZERO: _ZERO}
        for rec in tasks:
            if not compacted:
                compact_record(rec, floats)
            by_plan.setdefault(rec.plan_id, []).append(rec)
        counts: dict[str, dict[str, int]] = {}
        by_class: dict[str, dict[str, dict[str, int]]] = {}
        for plan_id in sorted(by_plan):
            ordered = by_plan.pop(plan_id)
            ordered.sort(key=_index_of)
            of_plan = counts.setdefault(plan_id, {})
            classes = by_class.setdefault(plan_id, {})
            for rec in ordered:
                key = rec.key
                state.tasks[key] = rec
                _add(of_plan, rec.status, 1)
                _add(classes.setdefault(rec.spec.cls, {}), rec.status, 1)
                state._index(rec, key, list.append)
        for heap in state.queue.values():
            heapq.heapify(heap)
        heapq.heapify(state.delayed)
        for plan in state.plans.values():
            counted = counts.get(plan.plan_id, {})
            classes = by_class.get(plan.plan_id, {})
            if plan.status != PLAN_REJECTED and (plan.counts != counted or plan.by_class != classes):
                plan.counts = counted
                plan.by_class = classes
                state.dirty_plans.add(plan.plan_id)
        return state

    def forget_plan(self, plan_id: str) -> None:
        """Drop a plan and its tasks from memory (not from KV), indexes included, so that
        folding its history from its acceptance on builds it again whole. (Stale entries of
        its tasks in the queues are skipped when popped, as any stale entry is.)"""
        for key in self.plan_keys.pop(plan_id, ()):
            rec = self.tasks.pop(key, None)
            self.dependents.pop(key, None)
            self.dirty_tasks.discard(key)
            if rec is None:
                continue
            self._count(rec, -1)
            if rec.status in INFLIGHT_STATES:
                self.inflight[rec.spec.cls] = self.inflight.get(rec.spec.cls, 0) - 1
                self.unpack(key, rec.spec.cls)
        self.plans.pop(plan_id, None)
        self.dirty_plans.discard(plan_id)

    def pack(self, key: str, cls: str) -> None:
        """A no-op task is in flight (see `packs`)."""
        self.packed.add(key)
        self.packed_inflight[cls] = self.packed_inflight.get(cls, 0) + 1

    def unpack(self, key: str, cls: str) -> None:
        """A task counted by `pack` is no longer in flight."""
        if key in self.packed:
            self.packed.discard(key)
            self.packed_inflight[cls] -= 1

    def plan_tasks(self, plan_id: str) -> list[TaskRecord]:
        return [self.tasks[k] for k in self.plan_keys.get(plan_id, ())]

    def take_dirty(self) -> tuple[list[TaskRecord], list[PlanRecord]]:
        tasks = [self.tasks[k] for k in sorted(self.dirty_tasks) if k in self.tasks]
        plans = [self.plans[k] for k in sorted(self.dirty_plans) if k in self.plans]
        self.dirty_tasks.clear()
        self.dirty_plans.clear()
        return tasks, plans

    def take_removed(self) -> tuple[list[str], list[str]]:
        tasks, plans = sorted(self.removed_tasks), sorted(self.removed_plans)
        self.removed_tasks.clear()
        self.removed_plans.clear()
        return tasks, plans


# ------------------------------------------------------------------ evolve


def _set_status(state: State, rec: TaskRecord, status: TaskStatus, at: float, key: str = "") -> None:
    """The record's status moves from what it is to `status`, with every count that follows it
    (its plan's, by class, in flight, and, for model work, demand, running and arrivals). The
    hottest path of a replay and of a brain's catch-up: four moves a task. `key`: the record's
    (interned) key where the caller has it already."""
    old = rec.status
    rec.updated_at = at
    state.dirty_tasks.add(key or rec.key)
    if old == status:
        return  # the record still changed (a redelivery keeps it running): it must be written
    rec.status = status
    plan = state.plans.get(rec.plan_id)
    cls = rec.spec.cls
    if plan is not None:
        _move(plan.counts, old, status)
        by_class = plan.by_class.get(cls)
        if by_class is None:
            by_class = plan.by_class[cls] = {}
        _move(by_class, old, status)
        plan.updated_at = at
        state.dirty_plans.add(plan.plan_id)
    was_inflight, inflight = old in INFLIGHT_STATES, status in INFLIGHT_STATES
    if was_inflight != inflight:
        state.inflight[cls] = state.inflight.get(cls, 0) + (1 if inflight else -1)
        if inflight:
            if packs(rec):
                state.pack(key or rec.key, cls)
        elif state.packed:
            state.unpack(key or rec.key, cls)
    # model work is counted under its demand key, which a status does not change: found once
    key = demand_key(rec)
    if not key:
        return
    state._count_as(key, old, -1)
    state._count_as(key, status, 1)
    if status in DEMAND_STATES and old not in DEMAND_STATES:
        _add(state.arrived, key, 1)


def _accept(state: State, ev: PlanAccepted) -> None:
    plan = ev.plan
    record = PlanRecord(
        plan_id=ev.plan_id,
        title=plan.title,
        source=plan.source,
        workdir=plan.workdir,
        by=ev.by,
        submitted_at=ev.submitted_at,
        accepted_at=ev.at,
        total=len(plan.tasks) if ev.total < 0 else ev.total,
        counts={},
        env=dict(plan.env),
        updated_at=ev.at,
        escalation=plan.escalation,
        host=plan.host,
        bundle=plan.bundle,
    )
    state.plans[ev.plan_id] = record
    state.dirty_plans.add(ev.plan_id)
    _add_tasks(state, record, plan.tasks, ev.at)


def _add_tasks(state: State, plan: PlanRecord, specs: tuple[TaskSpec, ...], at: float) -> int:
    """Add the tasks not known yet; how many were added. A task that depends on nothing waits
    from the moment it is added: the event that adds it (`plan.accepted`, `plan.tasks`,
    `task.followups`) stands for its `task.waiting`. The others are pending."""
    added = 0
    counts, by_class = plan.counts, plan.by_class
    for spec in specs:
        index = len(state.plan_keys.get(plan.plan_id, ()))
        rec = TaskRecord(plan_id=plan.plan_id, task_id=spec.id, spec=spec, index=index, updated_at=at)
        key = rec.key
        if key in state.tasks:
            continue
        rec.spec = compact_spec(spec)
        # (made waiting at once, not pending then moved: a fourth of what a replay folds per task)
        if not spec.depends_on:
            rec.status = WAITING
            rec.waiting_since = at
            _add(state.arrived, demand_key(rec), 1)
            plan.updated_at = at
        state.tasks[key] = rec
        state.dirty_tasks.add(key)
        status = rec.status
        of_class = by_class.get(spec.cls)
        if of_class is None:
            of_class = by_class[spec.cls] = {}
        of_class[status] = of_class.get(status, 0) + 1
        counts[status] = counts.get(status, 0) + 1
        state._index(rec, key)  # (counted as demand, queued if waiting)
        added += 1
    return added


def _wait(state: State, rec: TaskRecord, at: float, push: bool = True) -> None:
    """The task waits for a release slot, since `at` (`task.waiting`, or an event that stands
    for it). Folding it again changes nothing: a history written before the acceptance stood for
    it has both, and an event that carries it is folded after the `task.waiting` it replaced."""
    if rec.status == WAITING and rec.waiting_since == at and rec.not_before == 0.0:
        rec.updated_at = at
        state.dirty_tasks.add(rec.key)
        return
    rec.waiting_since = at
    rec.not_before = 0.0
    _set_status(state, rec, WAITING, at)
    if push:
        state._push(rec)


def _move(counts: dict[str, int], old: str, new: str) -> None:
    """One task counted under `new` instead of `old` (a count at 0 is dropped)."""
    counts[old] = counts.get(old, 0) - 1
    if counts[old] <= 0:
        del counts[old]
    counts[new] = counts.get(new, 0) + 1


# the events `evolve` folds that are not about one task
_NOT_A_TASKS = frozenset(
    {GpuState, PlanAccepted, PlanArchived, PlanTasks, PlanRejected, PlanFinished, PlanResumed}
)


def evolve(state: State, ev: Msg) -> None:
    """Fold one transition event into the state. Events that change nothing are ignored."""
    if type(ev) in _NOT_A_TASKS:
        _fold_other(state, ev)
    else:
        _fold_task(state, ev)


def _fold_other(state: State, ev: Msg) -> None:
    match ev:
        case GpuState():
            # not a transition: the brain folds a GPU's reports for the learned figures alone
            state.learned.observe(ev)
        case PlanAccepted():
            if ev.plan_id not in state.plans:
                _accept(state, ev)
        case PlanArchived():
            if ev.plan_id in state.plans:
                for key in state.plan_keys.pop(ev.plan_id, ()):
                    state.tasks.pop(key, None)
                    state.dependents.pop(key, None)
                    state.dirty_tasks.discard(key)
                    state.removed_tasks.add(key)
                del state.plans[ev.plan_id]
                state.dirty_plans.discard(ev.plan_id)
                state.removed_plans.add(ev.plan_id)
        case PlanTasks():
            # task by task: a part folded again after a cut kept only some of its task records
            # adds the rest (a part whose first task was known used to be skipped whole)
            plan = state.plans.get(ev.plan_id)
            if plan is not None and _add_tasks(state, plan, ev.tasks, ev.at):
                state.dirty_plans.add(ev.plan_id)
        case PlanRejected():
            if ev.plan_id not in state.plans:
                state.plans[ev.plan_id] = PlanRecord(
                    plan_id=ev.plan_id,
                    title=ev.title,
                    source=ev.source,
                    status=PLAN_REJECTED,
                    error=ev.error,
                    accepted_at=ev.at,
                    finished_at=ev.at,
                    updated_at=ev.at,
                )
                state.dirty_plans.add(ev.plan_id)
        case PlanFinished() | PlanResumed():
            plan = state.plans.get(ev.plan_id)
            if plan is not None:
                plan.status = ev.status if isinstance(ev, PlanFinished) else PLAN_RUNNING
                plan.finished_at = ev.at if isinstance(ev, PlanFinished) else 0.0
                plan.updated_at = ev.at
                state.dirty_plans.add(ev.plan_id)


def _fold_task(state: State, ev: Msg) -> None:
    # (interned as `TaskRecord.key` is: the moves of the two commonest events are marked dirty
    # under it, made once for the event rather than once a move)
    key = sys.intern(f"{getattr(ev, 'plan_id', '')}.{getattr(ev, 'task_id', '')}")
    rec = state.tasks.get(key)
    if rec is None:
        return
    match ev:
        # the transition an event carries, decided in the same step: folded first
        case TaskReleased() if ev.waited_at:
            _wait(state, rec, ev.waited_at, push=False)  # (released at once: nothing to queue)
        case TaskSucceeded() | TaskRetrying() | TaskFailed() if ev.started_at:
            _start(state, rec, ev.worker, ev.started_at, key)
    match ev:
        case TaskWaiting():
            _wait(state, rec, ev.at)
        case TaskReleased():
            rec.attempt = ev.attempt
            rec.released_at = ev.at
            rec.worker = ""
            rec.continued = bool(ev.worker)
            _set_status(state, rec, READY, ev.at, key)
        case TaskStarted():
            _start(state, rec, ev.worker, ev.at)
        case TaskRedelivered():
            rec.worker = ev.worker
            rec.started_at = ev.at
            rec.deliveries = ev.delivery
            _set_status(state, rec, RUNNING, ev.at)
        case TaskReset():
            _rekey_demand(state, rec, lambda: setattr(rec, "tier", 0))
            rec.base_attempt = ev.attempt
            rec.rid = ""
            rec.escalated = ""
            rec.followups = ()
            rec.attempts = ()
            rec.review = ""
            rec.review_model = ""
            rec.review_of = None
            rec.reviews = 0
            rec.worker = ""
            rec.reason = FailReason.NONE
            rec.error = ""
            rec.rc = None
            rec.not_before = 0.0
            rec.finished_at = 0.0
            rec.duration_s = 0.0
            rec.ttft_s = 0.0
            rec.deliveries = 0
            _set_status(state, rec, PENDING, ev.at)
        case TaskSucceeded():
            spec = rec.spec
            if rec.tier:  # its duration is the climbed-to model's
                spec = msgspec.structs.replace(spec, model=rec.tier_model)
            state.learned.observe(ev, spec)
            rec.worker = ev.worker
            rec.finished_at = ev.at
            rec.duration_s = ev.duration_s
            rec.ttft_s = ev.ttft_s
            rec.rc = ev.rc
            rec.reason = FailReason.NONE
            rec.error = ""
            _set_status(state, rec, SUCCEEDED, ev.at, key)
            if ev.then:
                _continue(state, state.tasks.get(f"{rec.plan_id}.{ev.then}"), ev.worker, ev.at)
        case TaskEscalated():
            if ev.after is not None:
                rec.attempts = (*rec.attempts[-(KEEP_ATTEMPTS - 1) :], ev.after)
                rec.reason = ev.after.reason
                rec.error = ev.after.error
                rec.rc = ev.after.rc
            rec.attempt = ev.attempt
            rec.rid = ev.rid
            rec.escalated = ev.why
            rec.worker = ""
            rec.released_at = ev.at
            rec.started_at = ev.at
            rec.not_before = 0.0
            _set_status(state, rec, ESCALATING, ev.at)
        case TaskClimbed():
            if ev.after is not None:
                rec.attempts = (*rec.attempts[-(KEEP_ATTEMPTS - 1) :], ev.after)
                rec.reason = ev.after.reason
                rec.error = ev.after.error
                rec.rc = ev.after.rc
                rec.worker = ev.after.worker
            rec.duration_s = ev.duration_s
            _rekey_demand(state, rec, lambda: _climb(rec, ev))
            rec.waiting_since = ev.at
            rec.not_before = 0.0
            _set_status(state, rec, WAITING, ev.at)
            state._push(rec)
        case TaskReviewing():
            _rekey_demand(state, rec, lambda: _start_review(rec, ev))
            _set_status(state, rec, READY, ev.at)
        case TaskReviewed():
            _rekey_demand(state, rec, lambda: _end_review(rec))
            rec.updated_at = ev.at
            state.dirty_tasks.add(rec.key)
        case TaskFollowups():
            plan = state.plans.get(ev.plan_id)
            if plan is None or rec.followups or rec.status != ESCALATING:
                return
            plan.total += len(ev.tasks)
            _add_tasks(state, plan, ev.tasks, ev.at)
            rec.followups = tuple(t.id for t in ev.tasks)
            for followup in rec.followups:
                state.dependents.setdefault(f"{rec.plan_id}.{followup}", []).append(rec.key)
            rec.updated_at = ev.at
            state.dirty_tasks.add(rec.key)
            state.dirty_plans.add(plan.plan_id)
        case TaskRetrying():
            _keep_attempt(rec, ev)
            rec.rc = ev.rc
            rec.reason = ev.reason
            rec.error = ev.error
            rec.worker = ev.worker
            rec.duration_s = ev.duration_s
            rec.not_before = ev.retry_at
            rec.waiting_since = ev.retry_at
            _set_status(state, rec, WAITING, ev.at)
            state._push(rec)
        case TaskFailed():
            if ev.worker:
                _keep_attempt(rec, ev)
            rec.rc = ev.rc
            rec.reason = ev.reason
            rec.error = ev.error
            if ev.worker:
                rec.worker = ev.worker
                rec.duration_s = ev.duration_s
            rec.finished_at = ev.at
            _set_status(state, rec, FAILED, ev.at)
        case TaskCancelled():
            rec.reason = FailReason.CANCELLED
            rec.error = ev.reason
            rec.finished_at = ev.at
            _set_status(state, rec, CANCELLED, ev.at)


def _continue(state: State, rec: TaskRecord | None, worker: str, at: float) -> None:
    """A dependent continued on the worker of the task that succeeded (`TaskSucceeded.then`):
    waiting, released to that worker (its next attempt, no work item queued) and started."""
    if rec is None or rec.status not in (PENDING, WAITING):
        return
    _wait(state, rec, at, push=False)
    rec.attempt += 1
    rec.released_at = at
    rec.continued = True
    _set_status(state, rec, READY, at)
    _start(state, rec, worker, at)


def _start(state: State, rec: TaskRecord, worker: str, at: float, key: str = "") -> None:
    """A worker started the task's attempt (`task.started`, or the `started_at` of its end)."""
    rec.worker = worker
    rec.started_at = at
    rec.deliveries = 1
    _set_status(state, rec, RUNNING, at, key)


def _rekey_demand(state: State, rec: TaskRecord, change: Callable[[], None]) -> None:
    """Change what a record's work is counted under (a review starting or ending) while it
    may be counted (waiting or running)."""
    state._count(rec, -1)
    change()
    state._count(rec, 1)


def demand_key(rec: TaskRecord) -> str:
    """The demand key a task's work counts under ('' : none, no GPU model needed)."""
    if rec.review:
        # a review in flight is llm work on the review model, whatever the task's own class
        return llm_demand_key(rec.review_model)
    if rec.spec.requires_external:
        return ""  # Claude does it: no GPU needs its model
    cls = rec.spec.cls
    if cls == "llm":
        return llm_demand_key(rec.tier_model)
    if cls == SCRIPT:
        return SCRIPT
    return ""


def _add(table: dict[str, int], key: str, delta: int) -> None:
    if key:
        table[key] = table.get(key, 0) + delta


def _start_review(rec: TaskRecord, ev: TaskReviewing) -> None:
    rec.attempt = ev.attempt
    rec.review = ev.then
    rec.review_model = ev.model
    rec.review_of = ev.failed
    rec.reviews += 1
    rec.reason = ev.failed.reason
    rec.error = ev.failed.error
    rec.rc = ev.failed.rc
    rec.duration_s = ev.duration_s
    rec.worker = ""
    rec.released_at = ev.at


def _climb(rec: TaskRecord, ev: TaskClimbed) -> None:
    """On the ladder's next rung, the task's tries count afresh (reviews among them)."""
    rec.tier = ev.tier
    rec.base_attempt = rec.attempt
    rec.reviews = 0


def _end_review(rec: TaskRecord) -> None:
    rec.review = ""
    rec.review_model = ""
    rec.review_of = None


def _keep_attempt(rec: TaskRecord, ev: TaskRetrying | TaskFailed) -> None:
    """Remember a failed local attempt (the last few), for an escalation to carry."""
    attempt = LocalAttempt(attempt=ev.attempt, worker=ev.worker, error=ev.error, rc=ev.rc, reason=ev.reason)
    rec.attempts = (*rec.attempts[-(KEEP_ATTEMPTS - 1) :], attempt)
