"""Records kept in KV: the current state of each task and plan.

The brain alone writes them. They are derived entirely from the brain's
transition events (see `mesh.machine.evolve`), which is what lets `mesh replay`
rebuild them from history.
"""

from __future__ import annotations

import sys

import msgspec

from mesh.events import CLAUDE, EscalationPolicy, LocalAttempt, TaskSpec
from mesh.learned import Learned
from mesh.status import FailReason, PlanStatus, TaskStatus

# Task states (`mesh.status.TaskStatus`), by their short names.
PENDING = TaskStatus.PENDING
WAITING = TaskStatus.WAITING
READY = TaskStatus.READY
RUNNING = TaskStatus.RUNNING
SUCCEEDED = TaskStatus.SUCCEEDED
FAILED = TaskStatus.FAILED
CANCELLED = TaskStatus.CANCELLED
ESCALATING = TaskStatus.ESCALATING

TASK_STATES = tuple(TaskStatus)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
INFLIGHT_STATES = frozenset({READY, RUNNING})

# Plan states (`mesh.status.PlanStatus`).
PLAN_RUNNING = PlanStatus.RUNNING
PLAN_REJECTED = PlanStatus.REJECTED
PLAN_FINAL_STATES = frozenset({PlanStatus.SUCCEEDED, PlanStatus.FAILED, PlanStatus.CANCELLED, PLAN_REJECTED})


class TaskRecord(msgspec.Struct, kw_only=True, gc=False):
    plan_id: str
    task_id: str
    spec: TaskSpec
    # position in its plan (file order, foreach expansions in item order)
    index: int = 0
    status: TaskStatus = PENDING
    attempt: int = 0
    # attempts before the last operator retry: the retry budget counts from here
    base_attempt: int = 0
    deliveries: int = 0
    worker: str = ""
    not_before: float = 0.0
    waiting_since: float = 0.0
    released_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    duration_s: float = 0.0
    rc: int | None = None
    reason: FailReason = FailReason.NONE
    error: str = ""
    updated_at: float = 0.0
    # escalation: the request out (its rid, and why), the follow-up tasks Claude proposed, and
    # the last local attempts (what the request carries)
    rid: str = ""
    escalated: str = ""
    # tuples: an empty one is shared, where an empty list would cost every record 56 bytes
    followups: tuple[str, ...] = ()
    attempts: tuple[LocalAttempt, ...] = ()
    # a review in flight: what follows unless it escalates ('retry', 'fail'; '' : none), its
    # model, and the failed attempt it reviews; `reviews` since the last reset (attempts that
    # were reviews, not tries of the task)
    review: str = ""
    review_model: str = ""
    review_of: LocalAttempt | None = None
    reviews: int = 0
    # the rung of its escalation ladder the task is on (0 : its own model; n : the n-th model of
    # `spec.escalate`); an operator's retry starts it on its own model again
    tier: int = 0
    # an LLM task's time to its first token, in its succeeded attempt (0: none, or no LLM)
    ttft_s: float = 0.0
    # the attempt was released to the worker of its dependency, which started it at once: no
    # work item of it is queued, so one lost with its worker is released again (`Sweep`)
    continued: bool = False

    @property
    def key(self) -> str:
        """`<plan>.<task>`, one copy for all who keep it (interned): the brain keeps a task's
        key in its tasks table, its plan's list, its queue, its dirty set and the list of
        recent writes; a copy each was 77 bytes a task five times over for a million tasks."""
        return sys.intern(f"{self.plan_id}.{self.task_id}")

    @property
    def tier_model(self) -> str:
        """The model the task runs on now: its own, or that of the ladder's rung it climbed to."""
        if 0 < self.tier <= len(self.spec.escalate):
            return self.spec.escalate[self.tier - 1]
        return self.spec.model

    @property
    def answered_by(self) -> str:
        """Who answers (or answered) the task: `claude` once escalated, else its tier's model
        ('' for a task that runs no model)."""
        return CLAUDE if self.escalated else self.tier_model

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES


class PlanRecord(msgspec.Struct, kw_only=True):
    plan_id: str
    title: str
    status: PlanStatus = PLAN_RUNNING
    source: str = ""
    workdir: str = ""
    by: str = ""
    submitted_at: float = 0.0
    accepted_at: float = 0.0
    finished_at: float = 0.0
    # how many tasks the plan has; the tasks themselves are the keys `<plan>.*` of the tasks bucket
    total: int = 0
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    # the same counts by the tasks' class: class -> status -> tasks, so that a view of the queues
    # (`mesh top`, the exporter) reads the plan records, never every task's (empty in a record
    # written before it existed: such a plan's tasks are read instead)
    by_class: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    error: str = ""
    updated_at: float = 0.0
    escalation: EscalationPolicy = msgspec.field(default_factory=EscalationPolicy)
    # where it was submitted from and the files it brought (`PlanSpec.host`, `PlanSpec.bundle`)
    host: str = ""
    bundle: str = ""

    @property
    def final(self) -> bool:
        return self.status in PLAN_FINAL_STATES

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINAL_STATES)


_task_decoder = msgspec.json.Decoder(TaskRecord)
_plan_decoder = msgspec.json.Decoder(PlanRecord)
_encoder = msgspec.json.Encoder()


def encode_record(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


def decode_task(data: bytes) -> TaskRecord:
    return _task_decoder.decode(data)


def decode_plan(data: bytes) -> PlanRecord:
    return _plan_decoder.decode(data)


class Damaged(msgspec.Struct, frozen=True, kw_only=True):
    """A value of the tasks or plans bucket that does not decode as its record.

    Readers show it as damaged instead of failing; the brain quarantines it on start (a dead
    letter with its first bytes) and writes the record the history gives over it."""

    bucket: str
    key: str
    size: int
    error: str
    # stream sequence of the value (its KV revision); 0 when not known
    revision: int = 0

    @property
    def plan_id(self) -> str:
        """The plan the key belongs to: a plan key is the plan id, a task key `<plan>.<task>`."""
        return self.key.partition(".")[0]

    @property
    def task_id(self) -> str:
        return self.key.partition(".")[2]

    def describe(self) -> str:
        return f"unreadable record ({self.size} bytes): {self.error}"


def damaged(bucket: str, key: str, data: bytes, exc: Exception, revision: int = 0) -> Damaged:
    return Damaged(bucket=bucket, key=key, size=len(data), error=str(exc)[:300], revision=revision)


UNREADABLE = (msgspec.DecodeError, msgspec.ValidationError)


class AgentRecord(msgspec.Struct, kw_only=True):
    """An agent's registration in the agents bucket, refreshed while it lives."""

    agent_id: str
    role: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    classes: list[str] = msgspec.field(default_factory=list)
    slots: int = 0
    running: list[str] = msgspec.field(default_factory=list)
    state: str = "running"


_agent_decoder = msgspec.json.Decoder(AgentRecord)


def decode_agent(data: bytes) -> AgentRecord:
    return _agent_decoder.decode(data)


class Checkpoint(msgspec.Struct, kw_only=True):
    """Every event up to stream sequence `seq` is folded into the task and plan records in KV
    (and into `learned`, the brain's measured figures, written with it)."""

    seq: int
    at: float
    brain: str = ""
    learned: Learned | None = None
    # worker -> since when (wall clock) the brain has missed it while it held running tasks:
    # kept so that a brain restarting more often than `lost_after_s` still gives up their
    # attempts in the end (each new brain would otherwise start the wait again)
    offline_since: dict[str, float] = msgspec.field(default_factory=dict)


class Lease(msgspec.Struct, kw_only=True):
    """Who may act as the brain, until when (wall clock); taken and renewed by compare-and-swap."""

    holder: str
    expires_at: float
    acquired_at: float = 0.0
    host: str = ""
    pid: int = 0


_checkpoint_decoder = msgspec.json.Decoder(Checkpoint)
_lease_decoder = msgspec.json.Decoder(Lease)


def decode_checkpoint(data: bytes) -> Checkpoint:
    return _checkpoint_decoder.decode(data)


def decode_lease(data: bytes) -> Lease:
    return _lease_decoder.decode(data)
