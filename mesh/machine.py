"""The brain's core: a pure state machine, no I/O.

Two functions, event-sourced:

- `apply(state, msg, now, policy) -> Step` takes one input (a submission, a
  cancel, a worker's report, or a clock tick) and decides what happens: the
  transition events to publish and the work items to queue. Every decided
  event is folded into the state at once with `evolve`.
- `evolve(state, event)` folds one transition event into the state. It is the
  only code that changes task and plan records, and it reads nothing but the
  event, so folding the event history with it (`mesh replay`) rebuilds exactly
  the records the live brain wrote to KV.

`now` is passed in and retry jitter is derived from the task id and attempt, so
the same inputs always give the same outputs.
"""

from __future__ import annotations

import heapq
import sys
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from mesh import claims, review, validate
from mesh.errors import PlanError
from mesh.events import (
    MODEL_BODY_KINDS,
    AgentOffline,
    CancelPlan,
    EscalationAnswered,
    EscalationFailed,
    EscalationPolicy,
    EscalationRequest,
    EscalationWaiting,
    GpuState,
    LocalAttempt,
    Message,
    Msg,
    PlanAccepted,
    PlanArchived,
    PlanFinished,
    PlanRejected,
    PlanResumed,
    PlanSpec,
    PlanTasks,
    ResourceItem,
    RetryTasks,
    RunFinished,
    RunStarted,
    SubmitPlan,
    TaskCancelled,
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
    WorkItem,
    type_of,
)
from mesh.placement import SCRIPT, GpuView, PlacementPolicy, llm_demand_key, observe, place
from mesh.plan import parse_followups
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

MAX_ERROR_CHARS = 2000
# failures no retry can help
NO_RETRY = frozenset({"dead_letter", "definition"})
# a task in these states is work waiting for a GPU (what placement counts)
DEMAND_STATES = frozenset({WAITING, READY})
# a task keeps this many of its last local attempts (what an escalation carries to Claude)
KEEP_ATTEMPTS = 5
# the most follow-up tasks one answer may add
MAX_FOLLOWUPS = 100
# failures after which an escalation may follow (not a cancel, not a dependency)
ESCALATABLE = frozenset({"error", "timeout", "lost", "dead_letter", "definition"})


@dataclass(frozen=True)
class Policy:
    """The brain's tunables (from Settings)."""

    release_window: int = 256
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    aging_s: float = 60.0
    # a running attempt whose worker has been offline this long is given up as lost
    lost_after_s: float = 65.0
    # a plan's tasks are accepted in events of about this many bytes at most
    part_bytes: int = 256 * 1024
    # a plan final for this long is archived: dropped from KV and memory (0: never)
    archive_after_s: float = 7 * 86400.0
    # model kind -> the model a task of that kind gets when it names none
    default_models: dict[str, str] = field(default_factory=dict)
    # local failures after which a task of a plan with automatic escalation is escalated
    escalate_after: int = 2
    # the llm model that reviews failed attempts of plans with `review: true` ('' : the default
    # llm model)
    review_model: str = ""
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)
    # the secret that work items' claims are made with (`mesh.claims`; the brain's bucket)
    claim_key: bytes = b""


class Tick:
    """A clock input: release what is due. Not a wire message."""


class Reconcile:
    """A start-up input: decide again what follows from the state alone (after a crash cut a
    step short, a prefix of it may be in the history with the rest never decided). Not a
    wire message."""


@dataclass(frozen=True)
class Sweep:
    """A clock input with the agents registered now (from the agents bucket). Not a wire message."""

    live: frozenset[str]


@dataclass
class Step:
    """What one input decided."""

    events: list[Msg] = field(default_factory=list)
    work: list[WorkItem] = field(default_factory=list)
    ignored: str = ""
    # an input refused as forged or misdirected (a report without the attempt's claim, or from a
    # worker that does not hold the attempt): the brain dead-letters it with this reason
    refused: str = ""
    # what is wrong with a submission `mesh.validate` refuses (it is also a `plan.rejected`):
    # the brain records it as a dead letter too
    invalid: str = ""
    # model loads and unloads for one worker each (their `gpu.requested` events are in `events`)
    resources: list[ResourceItem] = field(default_factory=list)
    # requests for the gateway (published after the records, like work items)
    escalations: list[EscalationRequest] = field(default_factory=list)
    # things to tell the operator (e.g. a model no GPU can hold)
    notes: list[str] = field(default_factory=list)


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
    # agents seen registered, and since when each seen one has been gone
    agents_live: set[str] = field(default_factory=set)
    offline_since: dict[str, float] = field(default_factory=dict)
    dirty_tasks: set[str] = field(default_factory=set)
    dirty_plans: set[str] = field(default_factory=set)
    removed_tasks: set[str] = field(default_factory=set)
    removed_plans: set[str] = field(default_factory=set)
    aging_s: float = 60.0
    # GPUs as their workers report them, and the model work waiting (waiting or ready tasks)
    # by demand key ('llm:<model>', 'script')
    gpus: dict[str, GpuView] = field(default_factory=dict)
    demand: dict[str, int] = field(default_factory=dict)
    _seq: int = 0

    def _count_demand(self, rec: TaskRecord, delta: int) -> None:
        if rec.review:
            # a review in flight is llm work on the review model, whatever the task's own class
            self.demand[llm_demand_key(rec.review_model)] = (
                self.demand.get(llm_demand_key(rec.review_model), 0) + delta
            )
            return
        if rec.spec.requires_external:
            return  # Claude does it: no GPU needs its model
        cls = rec.spec.cls
        if cls == "llm":
            key = llm_demand_key(rec.spec.model)
        elif cls == SCRIPT:
            key = SCRIPT
        else:
            return
        self.demand[key] = self.demand.get(key, 0) + delta

    # ---------------------------------------------------------- indexes
    def _push(self, rec: TaskRecord) -> None:
        self._seq += 1
        if rec.not_before > 0:
            heapq.heappush(self.delayed, (rec.not_before, self._seq, rec.key))
            return
        vtime = rec.waiting_since - rec.spec.priority * self.aging_s
        heapq.heappush(self.queue.setdefault(rec.spec.cls, []), (vtime, self._seq, rec.key))

    def _index(self, rec: TaskRecord) -> None:
        key = rec.key
        self.plan_keys.setdefault(rec.plan_id, []).append(key)
        for dep in rec.spec.depends_on:
            self.dependents.setdefault(f"{rec.plan_id}.{dep}", []).append(key)
        for followup in rec.followups:
            # an escalated task waits on the follow-up tasks Claude proposed
            self.dependents.setdefault(f"{rec.plan_id}.{followup}", []).append(key)
        if rec.status in DEMAND_STATES:
            self._count_demand(rec, 1)
        if rec.status == WAITING:
            self._push(rec)
        elif rec.status in INFLIGHT_STATES:
            self.inflight[rec.spec.cls] = self.inflight.get(rec.spec.cls, 0) + 1

    @classmethod
    def load(cls, tasks: list[TaskRecord], plans: list[PlanRecord], aging_s: float = 60.0) -> State:
        """Rebuild a state (and its indexes) from records read back from KV."""
        state = cls(aging_s=aging_s)
        for plan in plans:
            state.plans[plan.plan_id] = plan
        ordered = sorted(tasks, key=lambda r: (r.plan_id, r.index))
        for rec in ordered:
            # a hundred thousand records repeat a few strings: keep one copy of each
            rec.plan_id = sys.intern(rec.plan_id)
            rec.status = sys.intern(rec.status)
            rec.worker = sys.intern(rec.worker)
            rec.reason = sys.intern(rec.reason)
            state.tasks[rec.key] = rec
        for rec in ordered:
            state._index(rec)
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
            if rec.status in DEMAND_STATES:
                self._count_demand(rec, -1)
            if rec.status in INFLIGHT_STATES:
                self.inflight[rec.spec.cls] = self.inflight.get(rec.spec.cls, 0) - 1
        self.plans.pop(plan_id, None)
        self.dirty_plans.discard(plan_id)

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


def _set_status(state: State, rec: TaskRecord, status: str, at: float) -> None:
    old = rec.status
    if old == status:
        # the record still changed (a redelivery keeps it running): it must be written
        rec.updated_at = at
        state.dirty_tasks.add(rec.key)
        return
    plan = state.plans.get(rec.plan_id)
    if plan is not None:
        plan.counts[old] = plan.counts.get(old, 0) - 1
        if plan.counts[old] <= 0:
            del plan.counts[old]
        plan.counts[status] = plan.counts.get(status, 0) + 1
        plan.updated_at = at
        state.dirty_plans.add(plan.plan_id)
    cls = rec.spec.cls
    if (old in DEMAND_STATES) != (status in DEMAND_STATES):
        state._count_demand(rec, 1 if status in DEMAND_STATES else -1)
    if old in INFLIGHT_STATES and status not in INFLIGHT_STATES:
        state.inflight[cls] = state.inflight.get(cls, 0) - 1
    elif status in INFLIGHT_STATES and old not in INFLIGHT_STATES:
        state.inflight[cls] = state.inflight.get(cls, 0) + 1
    rec.status = status
    rec.updated_at = at
    state.dirty_tasks.add(rec.key)


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
    )
    state.plans[ev.plan_id] = record
    state.dirty_plans.add(ev.plan_id)
    _add_tasks(state, record, plan.tasks, ev.at)


def _add_tasks(state: State, plan: PlanRecord, specs: tuple[TaskSpec, ...], at: float) -> None:
    if specs:
        plan.counts[PENDING] = plan.counts.get(PENDING, 0) + len(specs)
    for spec in specs:
        index = len(state.plan_keys.get(plan.plan_id, ()))
        rec = TaskRecord(plan_id=plan.plan_id, task_id=spec.id, spec=spec, index=index, updated_at=at)
        if rec.key in state.tasks:
            continue
        state.tasks[rec.key] = rec
        state.dirty_tasks.add(rec.key)
        state._index(rec)


def evolve(state: State, ev: Msg) -> None:
    """Fold one transition event into the state. Events that change nothing are ignored."""
    if isinstance(ev, PlanAccepted):
        if ev.plan_id not in state.plans:
            _accept(state, ev)
        return
    if isinstance(ev, PlanArchived):
        if ev.plan_id in state.plans:
            for key in state.plan_keys.pop(ev.plan_id, ()):
                state.tasks.pop(key, None)
                state.dependents.pop(key, None)
                state.dirty_tasks.discard(key)
                state.removed_tasks.add(key)
            del state.plans[ev.plan_id]
            state.dirty_plans.discard(ev.plan_id)
            state.removed_plans.add(ev.plan_id)
        return
    if isinstance(ev, PlanTasks):
        plan = state.plans.get(ev.plan_id)
        if plan is not None and not any(f"{ev.plan_id}.{t.id}" in state.tasks for t in ev.tasks[:1]):
            _add_tasks(state, plan, ev.tasks, ev.at)
            state.dirty_plans.add(ev.plan_id)
        return
    if isinstance(ev, PlanRejected):
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
        return
    if isinstance(ev, PlanFinished | PlanResumed):
        plan = state.plans.get(ev.plan_id)
        if plan is not None:
            plan.status = ev.status if isinstance(ev, PlanFinished) else PLAN_RUNNING
            plan.finished_at = ev.at if isinstance(ev, PlanFinished) else 0.0
            plan.updated_at = ev.at
            state.dirty_plans.add(ev.plan_id)
        return
    key = f"{getattr(ev, 'plan_id', '')}.{getattr(ev, 'task_id', '')}"
    rec = state.tasks.get(key)
    if rec is None:
        return
    if isinstance(ev, TaskWaiting):
        rec.waiting_since = ev.at
        rec.not_before = 0.0
        _set_status(state, rec, WAITING, ev.at)
        state._push(rec)
    elif isinstance(ev, TaskReleased):
        rec.attempt = ev.attempt
        rec.released_at = ev.at
        rec.worker = ""
        _set_status(state, rec, READY, ev.at)
    elif isinstance(ev, TaskStarted):
        rec.worker = ev.worker
        rec.started_at = ev.at
        rec.deliveries = 1
        _set_status(state, rec, RUNNING, ev.at)
    elif isinstance(ev, TaskRedelivered):
        rec.worker = ev.worker
        rec.started_at = ev.at
        rec.deliveries = ev.delivery
        _set_status(state, rec, RUNNING, ev.at)
    elif isinstance(ev, TaskReset):
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
        rec.reason = ""
        rec.error = ""
        rec.rc = None
        rec.not_before = 0.0
        rec.finished_at = 0.0
        rec.duration_s = 0.0
        rec.deliveries = 0
        _set_status(state, rec, PENDING, ev.at)
    elif isinstance(ev, TaskSucceeded):
        rec.worker = ev.worker
        rec.finished_at = ev.at
        rec.duration_s = ev.duration_s
        rec.rc = ev.rc
        rec.reason = ""
        rec.error = ""
        _set_status(state, rec, SUCCEEDED, ev.at)
    elif isinstance(ev, TaskEscalated):
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
    elif isinstance(ev, TaskReviewing):
        _rekey_demand(state, rec, lambda: _start_review(rec, ev))
        _set_status(state, rec, READY, ev.at)
    elif isinstance(ev, TaskReviewed):
        _rekey_demand(state, rec, lambda: _end_review(rec))
        rec.updated_at = ev.at
        state.dirty_tasks.add(rec.key)
    elif isinstance(ev, TaskFollowups):
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
    elif isinstance(ev, TaskRetrying):
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
    elif isinstance(ev, TaskFailed):
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
    elif isinstance(ev, TaskCancelled):
        rec.reason = "cancelled"
        rec.error = ev.reason
        rec.finished_at = ev.at
        _set_status(state, rec, CANCELLED, ev.at)


def _rekey_demand(state: State, rec: TaskRecord, change: Callable[[], None]) -> None:
    """Change what a record's demand is counted under (a review starting or ending) while it
    may be counted."""
    counted = rec.status in DEMAND_STATES
    if counted:
        state._count_demand(rec, -1)
    change()
    if counted:
        state._count_demand(rec, 1)


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


def _reviewed_attempts(rec: TaskRecord) -> list[LocalAttempt]:
    """The failed attempts a review reads: the last few before, and the one it reviews."""
    latest = [rec.review_of] if rec.review_of is not None else []
    return [*rec.attempts[-(KEEP_ATTEMPTS - len(latest)) :], *latest]


def _end_review(rec: TaskRecord) -> None:
    rec.review = ""
    rec.review_model = ""
    rec.review_of = None


def escalation_why(spec: TaskSpec) -> str:
    """Why a task goes to Claude rather than to a worker ('' : it runs locally)."""
    if spec.cls == "external":
        return "external"
    if spec.requires_external:
        return "requires_external"
    return ""


def escalation_request(state: State, rec: TaskRecord) -> EscalationRequest:
    """The request of an escalated task's current attempt (`inputs` are filled by the brain)."""
    plan = state.plans.get(rec.plan_id)
    policy = plan.escalation if plan is not None else EscalationPolicy()
    return EscalationRequest(
        rid=rec.rid,
        plan_id=rec.plan_id,
        task_id=rec.task_id,
        attempt=rec.attempt,
        at=rec.started_at,
        why=rec.escalated,
        task=rec.spec,
        attempts=tuple(rec.attempts),
        followups_allowed=policy.followups,
        sensitive_allowed=policy.sensitive,
    )


def _keep_attempt(rec: TaskRecord, ev: TaskRetrying | TaskFailed) -> None:
    """Remember a failed local attempt (the last few), for an escalation to carry."""
    attempt = LocalAttempt(attempt=ev.attempt, worker=ev.worker, error=ev.error, rc=ev.rc, reason=ev.reason)
    rec.attempts = (*rec.attempts[-(KEEP_ATTEMPTS - 1) :], attempt)


# ------------------------------------------------------------------ decide


def validate_plan(plan: PlanSpec) -> str:
    """What is wrong with a plan's tasks ('' when nothing): the checks of `mesh.validate`, the
    same the CLI runs before it sends a plan."""
    return "; ".join(validate.check_plan(plan))


PART_BYTES = 256 * 1024


def split_tasks(tasks: tuple[TaskSpec, ...], limit: int = PART_BYTES) -> list[tuple[TaskSpec, ...]]:
    """Cut a plan's tasks into parts of at most about `limit` encoded bytes (one event each)."""
    parts: list[tuple[TaskSpec, ...]] = []
    current: list[TaskSpec] = []
    size = 0
    for spec in tasks:
        n = len(_spec_encoder.encode(spec))
        if current and size + n > limit:
            parts.append(tuple(current))
            current, size = [], 0
        current.append(spec)
        size += n
    parts.append(tuple(current))
    return parts


_spec_encoder = msgspec.json.Encoder()


def work_item(state: State, rec: TaskRecord, claim_key: bytes) -> WorkItem:
    """The work item of a task's current attempt (a review's, while one is in flight), with the
    claim its worker proves the attempt with."""
    plan = state.plans.get(rec.plan_id)
    claim = claims.claim_of(claim_key, rec.plan_id, rec.task_id, rec.attempt)
    if rec.review:
        return WorkItem(
            plan_id=rec.plan_id,
            task_id=rec.task_id,
            attempt=rec.attempt,
            cls="llm",
            kind="prompt",
            body=review.prompt(rec.spec, _reviewed_attempts(rec)),
            timeout_s=min(rec.spec.timeout_s, review.TIMEOUT_S),
            workdir=plan.workdir if plan else "",
            model=rec.review_model,
            max_tokens=review.MAX_TOKENS,
            grammar=review.GRAMMAR,
            claim=claim,
        )
    return WorkItem(
        plan_id=rec.plan_id,
        task_id=rec.task_id,
        attempt=rec.attempt,
        cls=rec.spec.cls,
        kind=rec.spec.kind,
        body=rec.spec.body,
        timeout_s=rec.spec.timeout_s,
        env=rec.spec.env,
        workdir=plan.workdir if plan else "",
        sensitive=rec.spec.sensitive,
        model=rec.spec.model,
        inputs=rec.spec.inputs,
        max_tokens=rec.spec.max_tokens,
        claim=claim,
    )


def _tries(rec: TaskRecord) -> int:
    """The task's own attempts since its last reset (reviews are not tries of the task)."""
    return rec.attempt - rec.base_attempt - rec.reviews


def backoff_s(key: str, attempt: int, policy: Policy) -> float:
    """Exponential backoff with deterministic 'equal jitter': half fixed, half spread."""
    delay = min(policy.retry_max_s, policy.retry_base_s * 2.0 ** max(attempt - 1, 0))
    spread = zlib.crc32(f"{key}:{attempt}".encode()) / 0xFFFFFFFF
    return delay * (0.5 + 0.5 * spread)


class _Decider:
    def __init__(self, state: State, now: float, policy: Policy) -> None:
        self.state = state
        self.now = now
        self.policy = policy
        self.step = Step()
        self.touched_plans: set[str] = set()

    def emit(self, ev: Msg) -> None:
        evolve(self.state, ev)
        self.step.events.append(ev)
        plan_id = getattr(ev, "plan_id", None)
        if isinstance(plan_id, str):
            self.touched_plans.add(plan_id)
        if isinstance(ev, TaskReleased | TaskReviewing):
            rec = self.state.tasks[f"{ev.plan_id}.{ev.task_id}"]
            self.step.work.append(work_item(self.state, rec, self.policy.claim_key))

    # inputs --------------------------------------------------------------
    def submit(self, msg: SubmitPlan) -> None:
        known = self.state.plans.get(msg.plan_id)
        if known is not None:
            self._complete_acceptance(msg, known)
            return
        plan_spec, error = self._resolve_models(msg.plan)
        self.step.invalid = validate_plan(plan_spec)
        error = error or self.step.invalid
        msg = msgspec.structs.replace(msg, plan=plan_spec)
        if msg.object:
            error = f"the plan's tasks could not be read from the object store ({msg.object})"
        if error:
            self.emit(
                PlanRejected(
                    plan_id=msg.plan_id,
                    at=self.now,
                    error=error,
                    title=msg.plan.title,
                    source=msg.plan.source,
                )
            )
            return
        parts = split_tasks(msg.plan.tasks, self.policy.part_bytes)
        first = msgspec.structs.replace(msg.plan, tasks=parts[0])
        self.emit(
            PlanAccepted(
                plan_id=msg.plan_id,
                plan=first,
                at=self.now,
                submitted_at=msg.at,
                by=msg.by,
                total=len(msg.plan.tasks),
            )
        )
        for n, part in enumerate(parts[1:], start=1):
            self.emit(PlanTasks(plan_id=msg.plan_id, part=n, tasks=part, at=self.now))
        for spec in msg.plan.tasks:
            if not spec.depends_on:
                self.emit(TaskWaiting(plan_id=msg.plan_id, task_id=spec.id, at=self.now))

    def _resolve_models(self, plan: PlanSpec) -> tuple[PlanSpec, str]:
        """Give each model task the default model of its kind when it names none (a repair the
        accepted plan records); an unknown model, or one of the wrong kind, rejects the plan."""
        registry = self.policy.placement.models
        if not registry:
            return plan, ""
        tasks: list[TaskSpec] = []
        changed = False
        for spec in plan.tasks:
            need = MODEL_BODY_KINDS.get(spec.kind)
            if need is None or escalation_why(spec):
                tasks.append(spec)  # runs no local model (Claude answers an escalated prompt)
                continue
            model = spec.model or self.policy.default_models.get(need, "")
            known = registry.get(model)
            if known is None:
                names = ", ".join(sorted(m for m, (k, _) in registry.items() if k == need)) or "none"
                return plan, (
                    f"task {spec.id!r} (line {spec.line}) needs {need} model {model!r}, which is not in the "
                    f"model registry ({need} models: {names}); add it under [models] in the config"
                )
            if known[0] != need:
                return (
                    plan,
                    f"task {spec.id!r}: model {model!r} is a {known[0]} model; "
                    f"a {spec.kind} body needs a {need} model",
                )
            if model != spec.model:
                spec = msgspec.structs.replace(spec, model=model)
                changed = True
            tasks.append(spec)
        return (msgspec.structs.replace(plan, tasks=tuple(tasks)) if changed else plan), ""

    def _complete_acceptance(self, msg: SubmitPlan, plan: PlanRecord) -> None:
        """A submission seen again: if a crash cut its acceptance short (some `plan.tasks` parts
        never published), publish the missing parts; otherwise there is nothing to do."""
        have = len(self.state.plan_keys.get(msg.plan_id, ()))
        if plan.status == PLAN_REJECTED or have >= plan.total or not msg.plan.tasks or msg.object:
            self.step.ignored = f"plan {msg.plan_id} already known"
            return
        parts = split_tasks(msg.plan.tasks, self.policy.part_bytes)
        for n, part in enumerate(parts[1:], start=1):
            if f"{msg.plan_id}.{part[0].id}" not in self.state.tasks:
                self.emit(PlanTasks(plan_id=msg.plan_id, part=n, tasks=part, at=self.now))
        self.reconcile()

    def reconcile(self) -> None:
        """What follows from the state alone: waiting tasks whose dependencies all succeeded,
        dependency failures not yet cascaded, plans whose tasks are all final."""
        state = self.state
        for plan in sorted(state.plans.values(), key=lambda p: p.plan_id):
            if plan.status != PLAN_RUNNING:
                continue
            self.touched_plans.add(plan.plan_id)
            changed = True
            while changed:  # a dependency may come later in the plan than its dependent
                changed = False
                for rec in state.plan_tasks(plan.plan_id):
                    if rec.status == ESCALATING and rec.followups:
                        changed = self._followups_settled(rec) or changed
                        continue
                    if rec.status != PENDING:
                        continue
                    deps = [state.tasks.get(f"{rec.plan_id}.{d}") for d in rec.spec.depends_on]
                    if any(d is None for d in deps):
                        continue  # the rest of the plan is still to come
                    failed = next((d for d in deps if d is not None and d.status == FAILED), None)
                    if failed is not None:
                        self._fail_by_dependency(rec, failed)
                        changed = True
                    elif all(d is not None and d.status == SUCCEEDED for d in deps):
                        self.emit(TaskWaiting(plan_id=rec.plan_id, task_id=rec.task_id, at=self.now))

    def cancel(self, msg: CancelPlan) -> None:
        plan = self.state.plans.get(msg.plan_id)
        if plan is None or plan.final:
            self.step.ignored = f"plan {msg.plan_id} is {'unknown' if plan is None else plan.status}"
            return
        for rec in self.state.plan_tasks(msg.plan_id):
            if not rec.final:
                self.emit(
                    TaskCancelled(
                        plan_id=rec.plan_id,
                        task_id=rec.task_id,
                        at=self.now,
                        attempt=rec.attempt,
                        reason=msg.reason,
                    )
                )

    def _forged(self, rec: TaskRecord, msg: RunStarted | RunFinished) -> bool:
        """Refuse a report on the current attempt that its sender cannot have made: one without
        the claim of the attempt's work item (the worker never received it), or a `run.finished`
        from a worker other than the one running the attempt."""
        if not claims.holds(self.policy.claim_key, msg.claim, msg.plan_id, msg.task_id, msg.attempt):
            self.step.refused = (
                f"{type_of(msg)} from {msg.worker} for {rec.key} attempt {msg.attempt} without the "
                "attempt's claim: that worker was never handed the attempt"
            )
            return True
        # (a dead letter comes from the worker of the delivery past `max_deliveries`, which runs
        # nothing and so never reported a start: its claim shows it was handed the attempt)
        if (
            isinstance(msg, RunFinished)
            and rec.status == RUNNING
            and msg.worker != rec.worker
            and not msg.dead_letter
        ):
            self.step.refused = (
                f"run.finished from {msg.worker} for {rec.key} attempt {msg.attempt}, which {rec.worker} runs"
            )
            return True
        return False

    def run_started(self, msg: RunStarted) -> None:
        rec = self.state.tasks.get(f"{msg.plan_id}.{msg.task_id}")
        if (
            rec is not None
            and rec.attempt == msg.attempt
            and rec.status in INFLIGHT_STATES
            and self._forged(rec, msg)
        ):
            return
        if (
            rec is not None
            and rec.attempt == msg.attempt
            and (
                (rec.status == RUNNING and msg.worker != rec.worker and msg.delivery > rec.deliveries)
                # the worker of an earlier delivery died before reporting its start (a first
                # delivery reports it only after `start_report_after_s`): still a redelivery
                or (rec.status == READY and msg.delivery > 1)
            )
        ):
            self.emit(
                TaskRedelivered(
                    plan_id=msg.plan_id,
                    task_id=msg.task_id,
                    attempt=msg.attempt,
                    worker=msg.worker,
                    at=self.now,
                    previous_worker=rec.worker,
                    delivery=msg.delivery,
                )
            )
            return
        if rec is None or rec.status != READY or rec.attempt != msg.attempt:
            self.step.ignored = self._stale(rec, msg.attempt)
            return
        self._started(msg)

    def _started(self, msg: RunStarted | RunFinished) -> None:
        self.emit(
            TaskStarted(
                plan_id=msg.plan_id, task_id=msg.task_id, attempt=msg.attempt, worker=msg.worker, at=self.now
            )
        )

    def run_finished(self, msg: RunFinished) -> None:
        rec = self.state.tasks.get(f"{msg.plan_id}.{msg.task_id}")
        if rec is None or rec.status not in INFLIGHT_STATES or rec.attempt != msg.attempt:
            self.step.ignored = self._stale(rec, msg.attempt)
            return
        if self._forged(rec, msg):
            return
        if rec.status == READY and msg.started_at:
            # a short task reports its start with its end: both transitions, from this report
            self._started(msg)
        if rec.review and msg.ok:
            answer = (msg.output or msg.stdout_tail).strip()
            verdict = review.verdict(answer)
            error = "" if verdict else f"the review answered {answer[:200]!r}, neither ESCALATE nor RETRY"
            self._reviewed(rec, verdict, answer[:200], error, msg.worker)
            return
        if msg.ok:
            self.emit(
                TaskSucceeded(
                    plan_id=msg.plan_id,
                    task_id=msg.task_id,
                    attempt=msg.attempt,
                    worker=msg.worker,
                    at=self.now,
                    duration_s=msg.duration_s,
                    rc=msg.rc,
                )
            )
            self._wake_dependents(rec)
            return
        if msg.dead_letter:
            reason = "dead_letter"
        elif msg.reason == "definition":
            reason = "definition"
        elif msg.timed_out:
            reason = "timeout"
        else:
            reason = "cancelled" if msg.cancelled else "error"
        snippet = (msg.stderr_tail or msg.stdout_tail).strip()
        error = "\n".join(p for p in (msg.error, snippet) if p)
        self._attempt_failed(rec, reason, error[-MAX_ERROR_CHARS:], msg.rc, msg.worker, msg.duration_s)

    def retry(self, msg: RetryTasks) -> None:
        state = self.state
        plan = state.plans.get(msg.plan_id)
        if plan is None or plan.status == PLAN_REJECTED:
            self.step.ignored = f"plan {msg.plan_id} is {'unknown' if plan is None else plan.status}"
            return
        records = state.plan_tasks(msg.plan_id)
        if msg.task_ids:
            unknown = [t for t in msg.task_ids if f"{msg.plan_id}.{t}" not in state.tasks]
            if unknown:
                self.step.ignored = f"plan {msg.plan_id} has no task {', '.join(unknown)}"
                return
            todo = deque(f"{msg.plan_id}.{t}" for t in msg.task_ids)
            chosen: set[str] = set()
            while todo:
                key = todo.popleft()
                if key in chosen:
                    continue
                chosen.add(key)
                todo.extend(state.dependents.get(key, ()))
            targets = [r for r in records if r.key in chosen and r.status in (FAILED, CANCELLED)]
        else:
            targets = [r for r in records if r.status in (FAILED, CANCELLED)]
        if not targets:
            self.step.ignored = f"nothing to retry in {msg.plan_id}"
            return
        if plan.final:
            self.emit(PlanResumed(plan_id=msg.plan_id, at=self.now))
        for rec in targets:
            self.emit(TaskReset(plan_id=rec.plan_id, task_id=rec.task_id, attempt=rec.attempt, at=self.now))
        for rec in targets:
            deps = (state.tasks[f"{rec.plan_id}.{d}"] for d in rec.spec.depends_on)
            if all(d.status == SUCCEEDED for d in deps):
                self.emit(TaskWaiting(plan_id=rec.plan_id, task_id=rec.task_id, at=self.now))

    def sweep(self, msg: Sweep) -> None:
        """Mark agents that stopped heartbeating offline; give up attempts nobody holds;
        archive plans final for longer than the retention period."""
        state = self.state
        if self.policy.archive_after_s > 0:
            horizon = self.now - self.policy.archive_after_s
            for plan in sorted(state.plans.values(), key=lambda p: p.plan_id):
                if plan.final and plan.finished_at and plan.finished_at <= horizon:
                    self.emit(PlanArchived(plan_id=plan.plan_id, at=self.now))
        for agent in sorted(state.agents_live - msg.live):
            running = tuple(
                sorted(r.key for r in state.tasks.values() if r.worker == agent and r.status == RUNNING)
            )
            self.step.events.append(AgentOffline(agent_id=agent, at=self.now, running=running))
        state.agents_live = set(msg.live)
        for view in state.gpus.values():
            view.live = view.worker in msg.live and view.state != "offline"
        holders = {r.worker for r in state.tasks.values() if r.status == RUNNING}
        for worker in holders - msg.live:
            state.offline_since.setdefault(worker, self.now)
        for worker in list(state.offline_since):
            if worker in msg.live or worker not in holders:
                del state.offline_since[worker]
        for worker, since in sorted(state.offline_since.items()):
            if self.now - since < self.policy.lost_after_s:
                continue
            for rec in sorted(
                (r for r in state.tasks.values() if r.worker == worker and r.status == RUNNING),
                key=lambda r: r.key,
            ):
                self._attempt_failed(
                    rec,
                    "lost",
                    f"worker {worker} went offline and nobody took the task over",
                    None,
                    worker,
                    0.0,
                )

    def _attempt_failed(
        self, rec: TaskRecord, reason: str, error: str, rc: int | None, worker: str, duration_s: float
    ) -> None:
        if rec.review:
            # the review itself failed (an error, a timeout, its worker lost): no verdict
            self._reviewed(rec, "", "", f"the review failed ({reason}): {error}"[-MAX_ERROR_CHARS:], worker)
            return
        failed = LocalAttempt(attempt=rec.attempt, worker=worker, error=error, rc=rc, reason=reason)
        if self._auto_escalates(rec, reason):
            self.escalate(rec, "local_failures", failed)
            return
        retry = reason not in NO_RETRY and _tries(rec) <= rec.spec.retries
        model = self._review_model(rec, reason)
        if model:
            self.emit(
                TaskReviewing(
                    plan_id=rec.plan_id,
                    task_id=rec.task_id,
                    attempt=rec.attempt + 1,
                    at=self.now,
                    model=model,
                    failed=failed,
                    then="retry" if retry else "fail",
                    duration_s=duration_s,
                )
            )
            return
        self._retry_or_fail(rec, failed, retry, duration_s)

    def _retry_or_fail(self, rec: TaskRecord, failed: LocalAttempt, retry: bool, duration_s: float) -> None:
        """A failed local attempt takes its course: retried after a backoff, or failed for good."""
        if retry:
            self.emit(
                TaskRetrying(
                    plan_id=rec.plan_id,
                    task_id=rec.task_id,
                    attempt=failed.attempt,
                    at=self.now,
                    retry_at=self.now + backoff_s(rec.key, failed.attempt, self.policy),
                    reason=failed.reason,
                    error=failed.error,
                    rc=failed.rc,
                    worker=failed.worker,
                    duration_s=duration_s,
                )
            )
            return
        self.emit(
            TaskFailed(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=failed.attempt,
                at=self.now,
                reason=failed.reason,
                error=failed.error,
                rc=failed.rc,
                worker=failed.worker,
                duration_s=duration_s,
            )
        )
        self._fail_dependents(rec)

    # review -----------------------------------------------------------------
    def _review_model(self, rec: TaskRecord, reason: str) -> str:
        """The model that reviews this failed attempt ('' : no review). Only a failure an
        escalation could follow is reviewed, and never a sensitive task (the review's answer
        would be withheld from the events, like all its output)."""
        plan = self.state.plans.get(rec.plan_id)
        if plan is None or not plan.escalation.review or reason not in ESCALATABLE or rec.spec.sensitive:
            return ""
        model = self.policy.review_model or self.policy.default_models.get("llm", "")
        known = self.policy.placement.models
        if not model or (known and known.get(model, ("", 0))[0] != "llm"):
            return ""
        return model

    def _reviewed(self, rec: TaskRecord, verdict: str, answer: str, error: str, worker: str) -> None:
        """A review is over: escalate on its word, else let the reviewed failure take its course
        (retried or failed, as it would have been without the review)."""
        failed = rec.review_of or LocalAttempt(attempt=rec.attempt, reason=rec.reason, error=rec.error)
        then, duration_s = rec.review, rec.duration_s
        self.emit(
            TaskReviewed(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=rec.attempt,
                at=self.now,
                verdict=verdict,
                answer=answer,
                error=error,
                worker=worker,
            )
        )
        if verdict == review.ESCALATE:
            self.escalate(rec, "review", failed)
            return
        self._retry_or_fail(rec, failed, then == "retry", duration_s)

    # escalation -------------------------------------------------------------
    def escalate(self, rec: TaskRecord, why: str, after: LocalAttempt | None = None) -> None:
        """Hand a task to the gateway; a sensitive one only if its plan allows it."""
        plan = self.state.plans.get(rec.plan_id)
        policy = plan.escalation if plan is not None else EscalationPolicy()
        if rec.spec.sensitive and not policy.sensitive:
            self._escalation_failed(
                rec,
                "sensitive",
                "the task is sensitive and its plan does not allow escalating sensitive tasks: "
                "add '- sensitive: true' under the plan's '## Escalation', or let it run locally",
            )
            return
        attempt = rec.attempt + 1
        self.emit(
            TaskEscalated(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=attempt,
                at=self.now,
                rid=f"{rec.plan_id}.{rec.task_id}.{attempt}",
                why=why,
                after=after,
            )
        )
        self.step.escalations.append(escalation_request(self.state, rec))

    def _auto_escalates(self, rec: TaskRecord, reason: str) -> bool:
        """A failed local attempt of a plan with automatic escalation: escalate after N failures,
        or before the task would fail for good with fewer."""
        plan = self.state.plans.get(rec.plan_id)
        if plan is None or not plan.escalation.auto or reason not in ESCALATABLE:
            return False
        if rec.spec.sensitive and not plan.escalation.sensitive:
            return False  # it stays local: retried, then failed as usual
        failures = _tries(rec)
        last = reason in NO_RETRY or failures > rec.spec.retries
        return failures >= (plan.escalation.after or self.policy.escalate_after) or last

    def _escalated(self, msg: EscalationAnswered | EscalationFailed) -> TaskRecord | None:
        """The task an answer is for, if it still waits on it."""
        rec = self.state.tasks.get(f"{msg.plan_id}.{msg.task_id}")
        if rec is None or rec.status != ESCALATING or rec.rid != msg.rid or rec.followups:
            what = "unknown" if rec is None else f"{rec.status}, request {rec.rid or 'none'}"
            self.step.ignored = f"stale answer {msg.rid} for {msg.plan_id}.{msg.task_id} ({what})"
            return None
        return rec

    def esc_answered(self, msg: EscalationAnswered) -> None:
        rec = self._escalated(msg)
        if rec is None:
            return
        if not msg.followups:
            self._escalation_succeeded(rec)
            return
        tasks, error = self._followup_tasks(rec, msg.followups)
        if error:
            self._escalation_failed(rec, "followups", error)
            return
        self.emit(
            TaskFollowups(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=rec.attempt,
                at=self.now,
                tasks=tasks,
                rid=msg.rid,
            )
        )
        for spec in tasks:
            if not spec.depends_on:
                self.emit(TaskWaiting(plan_id=rec.plan_id, task_id=spec.id, at=self.now))

    def esc_failed(self, msg: EscalationFailed) -> None:
        rec = self._escalated(msg)
        if rec is not None:
            self._escalation_failed(rec, msg.reason, msg.error)

    def _escalation_failed(self, rec: TaskRecord, reason: str, error: str) -> None:
        self.emit(
            TaskFailed(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=rec.attempt,
                at=self.now,
                reason=reason,
                error=error[-MAX_ERROR_CHARS:],
            )
        )
        self._fail_dependents(rec)

    def _followup_tasks(self, rec: TaskRecord, text: str) -> tuple[tuple[TaskSpec, ...], str]:
        """Claude's follow-up tasks, checked as a plan's tasks are (and then some): (tasks, '') or
        ((), what is wrong)."""
        plan = self.state.plans[rec.plan_id]
        if not plan.escalation.followups:
            return (), "Claude answered with follow-up tasks, which the plan does not allow"
        try:
            specs = parse_followups(text, source=f"follow-ups of {rec.key}")
        except PlanError as exc:
            return (), f"Claude's follow-up tasks are not valid: {exc}"
        if len(specs) > MAX_FOLLOWUPS:
            return (), f"Claude proposed {len(specs)} follow-up tasks; at most {MAX_FOLLOWUPS} are taken"
        taken = [s.id for s in specs if f"{rec.plan_id}.{s.id}" in self.state.tasks]
        if taken:
            return (), f"follow-up task ids already in the plan: {', '.join(taken[:10])}"
        external = [s.id for s in specs if escalation_why(s)]
        if external:
            return (), f"follow-up tasks run locally, but {', '.join(external[:10])} would be escalated again"
        specs = tuple(msgspec.structs.replace(s, env={**plan.env, **s.env}) for s in specs)
        resolved, error = self._resolve_models(PlanSpec(title=plan.title, tasks=specs))
        if error:
            return (), f"follow-up task {error}"
        return resolved.tasks, ""

    def _followups_settled(self, rec: TaskRecord) -> bool:
        """An escalated task whose follow-up tasks all succeeded succeeds; one whose follow-up
        failed fails. True when it did either."""
        tasks = self.state.tasks
        followups = [tasks.get(f"{rec.plan_id}.{f}") for f in rec.followups]
        failed = next((f for f in followups if f is not None and f.status in (FAILED, CANCELLED)), None)
        if failed is not None:
            self._fail_by_dependency(rec, failed)
            return True
        if not all(f is not None and f.status == SUCCEEDED for f in followups):
            return False
        self._escalation_succeeded(rec)
        return True

    def _escalation_succeeded(self, rec: TaskRecord) -> None:
        """An escalated task is done: answered with a result, or its follow-ups all succeeded."""
        self.emit(
            TaskSucceeded(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=rec.attempt,
                worker="",
                at=self.now,
                duration_s=max(0.0, self.now - rec.started_at),
                rc=None,
            )
        )
        self._wake_dependents(rec)

    # helpers ----------------------------------------------------------------
    @staticmethod
    def _stale(rec: TaskRecord | None, attempt: int) -> str:
        if rec is None:
            return "report for an unknown task"
        return f"stale report for {rec.key} attempt {attempt} (task is {rec.status}, attempt {rec.attempt})"

    def _wake_dependents(self, rec: TaskRecord) -> None:
        tasks = self.state.tasks
        for child_key in self.state.dependents.get(rec.key, ()):
            child = tasks[child_key]
            if child.status == ESCALATING and child.followups:
                self._followups_settled(child)
                continue
            if child.status != PENDING:
                continue
            if all(tasks[f"{child.plan_id}.{d}"].status == SUCCEEDED for d in child.spec.depends_on):
                self.emit(TaskWaiting(plan_id=child.plan_id, task_id=child.task_id, at=self.now))

    def _fail_by_dependency(self, rec: TaskRecord, failed: TaskRecord) -> None:
        self.emit(
            TaskFailed(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=rec.attempt,
                at=self.now,
                reason="dependency",
                error=f"dependency {failed.task_id} failed",
            )
        )

    def _fail_dependents(self, rec: TaskRecord) -> None:
        todo = deque(self.state.dependents.get(rec.key, ()))
        while todo:
            child = self.state.tasks[todo.popleft()]
            if child.final:
                continue
            self._fail_by_dependency(child, rec)
            todo.extend(self.state.dependents.get(child.key, ()))

    def release(self) -> None:
        state = self.state
        while state.delayed and state.delayed[0][0] <= self.now:
            _, _, key = heapq.heappop(state.delayed)
            rec = state.tasks.get(key)
            if rec is not None and rec.status == WAITING and rec.not_before <= self.now:
                state._seq += 1
                vtime = rec.waiting_since - rec.spec.priority * state.aging_s
                heapq.heappush(state.queue.setdefault(rec.spec.cls, []), (vtime, state._seq, key))
        for cls, heap in state.queue.items():
            while heap and state.inflight.get(cls, 0) < self.policy.release_window:
                _, _, key = heapq.heappop(heap)
                rec = state.tasks.get(key)
                if rec is None or rec.status != WAITING or rec.not_before > self.now:
                    continue
                why = escalation_why(rec.spec)
                if why:
                    self.escalate(rec, why)
                    continue
                self.emit(
                    TaskReleased(
                        plan_id=rec.plan_id, task_id=rec.task_id, attempt=rec.attempt + 1, at=self.now
                    )
                )

    def place(self) -> None:
        decision = place(self.state.gpus, self.state.demand, self.now, self.policy.placement)
        self.step.events.extend(decision.events)
        self.step.resources.extend(decision.items)
        for model, need, largest in decision.unplaceable:
            self.step.notes.append(
                f"model {model} needs {need} MB of VRAM and the largest GPU known has {largest} MB: "
                "its tasks wait until a GPU that can hold it joins (or lower vram_mb / use a smaller model)"
            )

    def finish_plans(self) -> None:
        for plan_id in sorted(self.touched_plans):
            plan = self.state.plans.get(plan_id)
            if plan is None or plan.status != PLAN_RUNNING or plan.done < plan.total:
                continue
            counts = dict(plan.counts)
            if counts.get(CANCELLED):
                status = CANCELLED
            elif counts.get(FAILED):
                status = FAILED
            else:
                status = SUCCEEDED
            self.emit(PlanFinished(plan_id=plan_id, status=status, at=self.now, counts=counts))


def apply(state: State, msg: Message | Tick | Sweep | Reconcile, now: float, policy: Policy) -> Step:
    """Decide what one input means; fold the decided events into `state`."""
    d = _Decider(state, now, policy)
    match msg:
        case SubmitPlan():
            d.submit(msg)
        case CancelPlan():
            d.cancel(msg)
        case RunStarted():
            d.run_started(msg)
        case RunFinished():
            d.run_finished(msg)
        case RetryTasks():
            d.retry(msg)
        case Sweep():
            d.sweep(msg)
        case Reconcile():
            d.reconcile()
        case GpuState():
            observe(state.gpus, msg)
        case EscalationAnswered():
            d.esc_answered(msg)
        case EscalationFailed():
            d.esc_failed(msg)
        case EscalationWaiting():
            d.step.ignored = f"{msg.plan_id}.{msg.task_id} waits on escalation: {msg.reason}"
        case Tick():
            pass
        case _:
            d.step.ignored = f"the brain does not take {type(msg).__name__} messages"
    d.release()
    d.finish_plans()
    match msg:
        case Tick() | Sweep() | GpuState():
            d.place()
    return d.step


def next_due(state: State) -> float | None:
    """When the next delayed retry becomes due (for the brain's timer)."""
    return float(state.delayed[0][0]) if state.delayed else None


def replay(history: list[Msg], aging_s: float = 60.0) -> State:
    """Fold a sequence of events into a fresh state (non-transition events are ignored)."""
    state = State(aging_s=aging_s)
    for ev in history:
        evolve(state, ev)
    return state
