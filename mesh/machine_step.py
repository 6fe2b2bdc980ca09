"""The brain's state machine, one step: the inputs that are not wire messages, what an input
decides (`Step`), the policy it decides by, and `Decision`, the base every decision builds on.

`Decision.emit` is how a decided event takes effect: folded into the state at once with
`evolve`, kept in the step, and, for an attempt released, turned into its work item. Two
transitions of one task decided in one step are kept as one event (`Decision._merged`).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

import msgspec

from mesh import claims, review
from mesh.events import (
    EscalationRequest,
    LocalAttempt,
    Msg,
    ResourceItem,
    TaskFailed,
    TaskReleased,
    TaskRetrying,
    TaskReviewing,
    TaskSpec,
    TaskStarted,
    TaskSucceeded,
    TaskWaiting,
    WorkItem,
)
from mesh.machine_state import KEEP_ATTEMPTS, State, evolve
from mesh.placement import PlacementPolicy
from mesh.records import PENDING, SUCCEEDED, TaskRecord

MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Policy:
    """The brain's tunables (from Settings)."""

    release_window: int = 256
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    aging_s: float = 60.0
    # a running attempt whose worker has been offline this long is given up as lost
    lost_after_s: float = 65.0
    # a continued attempt (no work item behind it) whose worker has been offline this long is
    # queued again (`ack_wait_s`: when a work item would have been delivered again)
    requeue_after_s: float = 30.0
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
    # how many dependents, one after another, a released shell task's work item carries for its
    # worker to start as soon as the task before succeeds (`continuations`; 0: none)
    continue_depth: int = 8
    # how many short tasks of one class a work item may carry (`mesh.packing`; 1: one each), and
    # how short a shell task's runs must be (its kind's learned median, seconds) to be packed
    pack_size: int = 16
    pack_below_s: float = 0.02


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
    # whether `work` was packed (`mesh.packing`): a step published again is never packed again,
    # so each item keeps the id it had
    packed: bool = False


def _reviewed_attempts(rec: TaskRecord) -> list[LocalAttempt]:
    """The failed attempts a review reads: the last few before, and the one it reviews."""
    latest = [rec.review_of] if rec.review_of is not None else []
    return [*rec.attempts[-(KEEP_ATTEMPTS - len(latest)) :], *latest]


def escalation_why(spec: TaskSpec) -> str:
    """Why a task goes to Claude rather than to a worker ('' : it runs locally)."""
    if spec.cls == "external":
        return "external"
    if spec.requires_external:
        return "requires_external"
    return ""


def work_item(
    state: State, rec: TaskRecord, claim_key: bytes, attempt: int = 0, then: WorkItem | None = None
) -> WorkItem:
    """The work item of a task's current attempt (a review's, while one is in flight), or of
    `attempt`, with the claim its worker proves the attempt with, and the continuation `then`."""
    plan = state.plans.get(rec.plan_id)
    attempt = attempt or rec.attempt
    claim = claims.claim_of(claim_key, rec.plan_id, rec.task_id, attempt)
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
            host=plan.host if plan else "",
            model=rec.review_model,
            max_tokens=review.MAX_TOKENS,
            grammar=review.GRAMMAR,
            claim=claim,
        )
    return WorkItem(
        plan_id=rec.plan_id,
        task_id=rec.task_id,
        attempt=attempt,
        cls=rec.spec.cls,
        kind=rec.spec.kind,
        body=rec.spec.body,
        timeout_s=rec.spec.timeout_s,
        env=rec.spec.env,
        workdir=plan.workdir if plan else "",
        sensitive=rec.spec.sensitive,
        model=rec.tier_model,
        inputs=rec.spec.inputs,
        max_tokens=rec.spec.max_tokens,
        schema=rec.spec.schema,
        claim=claim,
        host=plan.host if plan else "",
        bundle=plan.bundle if plan else "",
        after=tuple(d for d in rec.spec.depends_on if _may_keep_files(state, rec.plan_id, d)),
        artifacts=rec.spec.artifacts,
        then=then,
    )


# the classes and body kinds of the tasks that may continue on the worker of their dependency
CONTINUE_CLASSES = frozenset({"cpu", "script"})
CONTINUE_KINDS = frozenset({"shell", "noop"})
# the most body text a work item carries for its continuations (a chain of long scripts is
# queued a task at a time beyond it)
CONTINUE_BYTES = 16 * 1024


def continuations(state: State, rec: TaskRecord, depth: int) -> list[TaskRecord]:
    """The dependents that run after `rec`'s attempt on its worker, one after another, each
    started as the one before succeeds, rather than queued once the brain hears of it (the
    brain's round trip, a task's hop, is most of a short chain's time).

    A task continues when it is a shell (or no-op) task of the same class (cpu or script), no lower
    in priority, waiting for nothing else: the one before is its last dependency not succeeded,
    and it takes no input and no file from it (their outputs and artifacts reach it through
    the store, only after the report). And only while nothing else of the class waits to be
    released, so priority order holds: the chain gets the slot it had. The brain still
    decides each start, from the report of the task before (`run.finished`'s `then`)."""
    if depth <= 0 or rec.review or state.queue.get(rec.spec.cls) or not _chains(rec):
        return []
    out: list[TaskRecord] = []
    done = {rec.task_id}
    size = 0
    at = rec
    while len(out) < depth:
        nxt = _next_in_chain(state, at, done)
        if nxt is None:
            break
        size += len(nxt.spec.body)
        if size > CONTINUE_BYTES:
            break
        out.append(nxt)
        done.add(nxt.task_id)
        if not _chains(nxt):
            break
        at = nxt
    return out


def _chains(rec: TaskRecord) -> bool:
    """Whether a task can be one a dependent continues after (see `continuations`)."""
    spec = rec.spec
    return spec.kind in CONTINUE_KINDS and spec.cls in CONTINUE_CLASSES and not spec.artifacts


def _next_in_chain(state: State, rec: TaskRecord, done: set[str]) -> TaskRecord | None:
    """The first dependent of `rec` (in plan order) that may continue after it, given that the
    tasks in `done` will have succeeded by then."""
    for key in state.dependents.get(rec.key, ()):
        child = state.tasks[key]
        spec = child.spec
        if (
            spec.kind in CONTINUE_KINDS
            and spec.cls == rec.spec.cls
            and spec.priority >= rec.spec.priority
            and not spec.requires_external
            and not spec.inputs
            and waits_only_for(state, child, done)
        ):
            return child
    return None


def waits_only_for(state: State, rec: TaskRecord, done: Container[str]) -> bool:
    """Whether `rec` is pending and each of its dependencies not in `done` has succeeded."""
    tasks = state.tasks
    return rec.status == PENDING and all(
        d in done or tasks[f"{rec.plan_id}.{d}"].status == SUCCEEDED for d in rec.spec.depends_on
    )


def continued_item(state: State, rec: TaskRecord, policy: Policy) -> WorkItem | None:
    """The work items of `continuations`, nested, each the `then` of the one before (each of
    the attempt it gets when it is released: its next)."""
    then: WorkItem | None = None
    for child in reversed(continuations(state, rec, policy.continue_depth)):
        then = work_item(state, child, policy.claim_key, attempt=child.attempt + 1, then=then)
    return then


# the body kinds whose executors save a file (`save:`, or its default): an artifact of the task
FILE_KINDS = frozenset({"transcribe", "embed"})


def _may_keep_files(state: State, plan_id: str, task_id: str) -> bool:
    """Whether a dependency may have artifacts for its dependents to fetch: it declares some, or
    its body saves a file (one the brain does not know is kept, to be safe). The others are left
    out of a work item's `after`, so its worker asks nothing about them."""
    dep = state.tasks.get(f"{plan_id}.{task_id}")
    return dep is None or bool(dep.spec.artifacts) or dep.spec.kind in FILE_KINDS


class Decision:
    """The base of the decisions: the input's state, time and policy, and the step so far."""

    def __init__(self, state: State, now: float, policy: Policy) -> None:
        self.state = state
        self.now = now
        self.policy = policy
        self.step = Step()
        self.touched_plans: set[str] = set()
        # by task: where in `step.events` its last event is, while that event may still be
        # merged with the task's next one
        self._mergeable: dict[str, int] = {}

    def emit(self, ev: Msg) -> None:
        ev, slot = self._merged(ev)
        evolve(self.state, ev)
        if slot is None:
            self.step.events.append(ev)
        else:
            self.step.events[slot] = ev
        plan_id = getattr(ev, "plan_id", None)
        if isinstance(plan_id, str):
            self.touched_plans.add(plan_id)
        match ev:
            case TaskReleased() if not ev.worker:  # (one with a worker is running there already)
                rec = self.state.tasks[f"{ev.plan_id}.{ev.task_id}"]
                then = continued_item(self.state, rec, self.policy)
                self.step.work.append(work_item(self.state, rec, self.policy.claim_key, then=then))
            case TaskReviewing():
                rec = self.state.tasks[f"{ev.plan_id}.{ev.task_id}"]
                self.step.work.append(work_item(self.state, rec, self.policy.claim_key))

    def _merged(self, ev: Msg) -> tuple[Msg, int | None]:
        """The event to keep for `ev`, and where. A task's two transitions decided in one step,
        one right after the other, are kept as the second event alone, in the first's place,
        carrying the first: a `task.waiting` then the `task.released` of the task (a dependent
        woken and released by one report: `waited_at`), a `task.started` then the attempt's end
        (both from one `run.finished`: `started_at`). Its fold does both (`evolve`), so the
        history is one event shorter, and one disk write with a server that syncs each message."""
        key = f"{getattr(ev, 'plan_id', '')}.{getattr(ev, 'task_id', '')}"
        slot = self._mergeable.pop(key, None)
        if slot is not None:
            before = self.step.events[slot]
            match ev:
                case TaskReleased() if isinstance(before, TaskWaiting):
                    return msgspec.structs.replace(ev, waited_at=before.at), slot
                case TaskSucceeded() | TaskRetrying() | TaskFailed() if isinstance(
                    before, TaskStarted
                ) and _same_run(before, ev):
                    return msgspec.structs.replace(ev, started_at=before.at), slot
        if isinstance(ev, TaskWaiting | TaskStarted):
            self._mergeable[key] = len(self.step.events)
        return ev, None


def _same_run(start: TaskStarted, end: TaskSucceeded | TaskRetrying | TaskFailed) -> bool:
    """Whether `end` ends the run `start` began: the same attempt, the same worker."""
    return (start.attempt, start.worker) == (end.attempt, end.worker)
