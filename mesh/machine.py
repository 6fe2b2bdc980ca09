"""The brain's core, a pure state machine (no I/O): its entry points, and the worker reports
(started, finished, lost) it decides; each other kind of decision has its module `mesh.machine_*`.

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

The parts, each building on those before it: `machine_state` (State, evolve), `machine_step`
(Policy, Step, the base of the decisions), `machine_cascade` (completion and failure cascade),
`machine_admission` (plans submitted and cancelled), `machine_retry` (retries and backoff),
`machine_escalation` (escalation and review), `machine_release` (release and placement).
"""

from __future__ import annotations

from mesh import claims, review
from mesh.events import (
    AgentOffline,
    CancelPlan,
    EscalationAnswered,
    EscalationFailed,
    EscalationWaiting,
    GpuState,
    LocalAttempt,
    Message,
    Msg,
    PlanArchived,
    RetryTasks,
    RunFinished,
    RunStarted,
    SubmitPlan,
    TaskRedelivered,
    TaskReleased,
    TaskReviewing,
    TaskStarted,
    TaskSucceeded,
    type_of,
)
from mesh.machine_admission import validate_plan
from mesh.machine_escalation import escalation_request
from mesh.machine_release import Release
from mesh.machine_retry import NO_RETRY, _tries, backoff_s
from mesh.machine_state import State, evolve
from mesh.machine_step import MAX_ERROR_CHARS, Policy, Reconcile, Step, Sweep, Tick, waits_only_for, work_item
from mesh.placement import observe
from mesh.records import INFLIGHT_STATES, READY, RUNNING, TaskRecord
from mesh.status import FailReason

# what the rest of mesh imports from here (the entry points, and the parts it names)
__all__ = [
    "MAX_ERROR_CHARS",
    "Policy",
    "Reconcile",
    "State",
    "Step",
    "Sweep",
    "Tick",
    "apply",
    "backoff_s",
    "escalation_request",
    "evolve",
    "next_due",
    "replay",
    "validate_plan",
    "work_item",
]


class _Decider(Release):
    """Every decision, and the worker reports: started, finished, or lost with their worker."""

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
            # (stored as one event: the end, with `started_at`; `Decision._merged`)
            self._started(msg)
        if rec.review and msg.ok:
            answer = (msg.output or msg.stdout_tail).strip()
            verdict = review.verdict(answer)
            error = "" if verdict else f"the review answered {answer[:200]!r}, neither ESCALATE nor RETRY"
            self._reviewed(rec, verdict, answer[:200], error, msg.worker)
            return
        if msg.ok:
            then = self._continues(rec, msg) if msg.then else None
            self.emit(
                TaskSucceeded(
                    plan_id=msg.plan_id,
                    task_id=msg.task_id,
                    attempt=msg.attempt,
                    worker=msg.worker,
                    at=self.now,
                    duration_s=msg.duration_s,
                    rc=msg.rc,
                    ttft_s=msg.metrics.get("ttft_s", 0.0),
                    then=then.task_id if then is not None else "",
                )
            )
            self._wake_dependents(rec)
            if then is not None:
                # (the success folded them already: these say so to whoever reads the history)
                for ev in (
                    TaskReleased(
                        plan_id=then.plan_id,
                        task_id=then.task_id,
                        attempt=then.attempt,
                        at=self.now,
                        worker=msg.worker,
                    ),
                    TaskStarted(
                        plan_id=then.plan_id,
                        task_id=then.task_id,
                        attempt=then.attempt,
                        worker=msg.worker,
                        at=self.now,
                    ),
                ):
                    self.emit(ev)
            return
        if rec.continued and msg.cancelled and rec.status == RUNNING:
            # a continued run its worker stopped, handing it back (it is stopping; a cancel
            # of the task makes its report stale): queued now, the same attempt, as its
            # delivery would have been
            self._queue_again(rec)
            return
        if msg.dead_letter:
            reason = FailReason.DEAD_LETTER
        elif msg.reason == FailReason.DEFINITION:
            reason = FailReason.DEFINITION
        elif msg.timed_out:
            reason = FailReason.TIMEOUT
        else:
            reason = FailReason.CANCELLED if msg.cancelled else FailReason.ERROR
        snippet = (msg.stderr_tail or msg.stdout_tail).strip()
        error = "\n".join(p for p in (msg.error, snippet) if p)
        self._attempt_failed(rec, reason, error[-MAX_ERROR_CHARS:], msg.rc, msg.worker, msg.duration_s)

    def _continues(self, rec: TaskRecord, msg: RunFinished) -> TaskRecord | None:
        """The dependent `msg.then` that the worker of `rec` started as `rec` succeeded (the
        `then` of its work item, `mesh.machine_step.continuations`), when it is to run there:
        released to that worker and started, with no work item queued (`TaskSucceeded.then`).
        Not when it no longer waits for `rec` alone (cancelled meanwhile: the worker hears of
        that and stops it, and its report is stale), nor without the claim of the attempt it
        would be (a worker never handed that item): then it is queued as usual."""
        child = self.state.tasks.get(f"{msg.plan_id}.{msg.then}")
        if (
            child is None
            or rec.task_id not in child.spec.depends_on
            or not waits_only_for(self.state, child, (rec.task_id,))
        ):
            return None
        attempt = child.attempt + 1
        if not claims.holds(self.policy.claim_key, msg.then_claim, child.plan_id, child.task_id, attempt):
            # (its own end stands: the report holds the claim of its attempt)
            self.step.notes.append(
                f"run.finished from {msg.worker} for {rec.key} says it started {child.key} attempt "
                f"{attempt} without that attempt's claim (that worker was never handed it): "
                f"{child.key} is queued as usual"
            )
            return None
        return child

    def _queue_again(self, rec: TaskRecord) -> None:
        """A continued attempt its worker no longer runs, queued for any worker: the same attempt
        (and claim), as a redelivery of its item would have been; none was queued."""
        self.emit(TaskReleased(plan_id=rec.plan_id, task_id=rec.task_id, attempt=rec.attempt, at=self.now))

    def sweep(self, msg: Sweep) -> None:
        """Mark agents that stopped heartbeating offline; give up attempts nobody holds;
        archive plans final for longer than the retention period."""
        state = self.state
        if self.policy.archive_after_s > 0:
            horizon = self.now - self.policy.archive_after_s
            for plan in sorted(state.plans.values(), key=lambda p: p.plan_id):
                if plan.final and plan.finished_at and plan.finished_at <= horizon:
                    self.emit(PlanArchived(plan_id=plan.plan_id, at=self.now))
        holders = {r.worker for r in state.tasks.values() if r.status == RUNNING}
        # gone since the last sweep; and a worker holding a task that no sweep ever saw live (it
        # registered, took a task and died between two sweeps), said once, as it is first missed
        unseen = holders - msg.live - state.agents_live - set(state.offline_since)
        for agent in sorted((state.agents_live - msg.live) | unseen):
            running = tuple(
                sorted(r.key for r in state.tasks.values() if r.worker == agent and r.status == RUNNING)
            )
            self.step.events.append(AgentOffline(agent_id=agent, at=self.now, running=running))
        state.agents_live = set(msg.live)
        for view in state.gpus.values():
            view.live = view.worker in msg.live and view.state != "offline"
        for worker in holders - msg.live:
            state.offline_since.setdefault(worker, self.now)
        for worker in list(state.offline_since):
            if worker in msg.live or worker not in holders:
                del state.offline_since[worker]
        for worker, since in sorted(state.offline_since.items()):
            waited = self.now - since
            if waited < min(self.policy.requeue_after_s, self.policy.lost_after_s):
                continue
            held = sorted(
                (r for r in state.tasks.values() if r.worker == worker and r.status == RUNNING),
                key=lambda r: r.key,
            )
            for rec in held:
                if rec.continued and waited >= self.policy.requeue_after_s:
                    # no work item queued, none to be delivered again: the same attempt queued
                    # now, as its redelivery would have been after `ack_wait_s` of silence. (Not
                    # at the first sweep without it: a registration can be missing a moment, as
                    # after a server restart lost its latest write, while its worker runs on)
                    self._queue_again(rec)
            if waited < self.policy.lost_after_s:
                continue
            for rec in held:
                if rec.continued:
                    continue
                self._attempt_failed(
                    rec,
                    FailReason.LOST,
                    f"worker {worker} went offline and nobody took the task over",
                    None,
                    worker,
                    0.0,
                )

    def _attempt_failed(
        self, rec: TaskRecord, reason: FailReason, error: str, rc: int | None, worker: str, duration_s: float
    ) -> None:
        if rec.review:
            # the review itself failed (an error, a timeout, its worker lost): no verdict
            self._reviewed(rec, "", "", f"the review failed ({reason}): {error}"[-MAX_ERROR_CHARS:], worker)
            return
        failed = LocalAttempt(attempt=rec.attempt, worker=worker, error=error, rc=rc, reason=reason)
        if self._auto_escalates(rec, reason):
            self._climb_or_escalate(rec, "local_failures", failed, duration_s)
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
        self._take_course(rec, failed, retry, duration_s)

    @staticmethod
    def _stale(rec: TaskRecord | None, attempt: int) -> str:
        if rec is None:
            return "report for an unknown task"
        return f"stale report for {rec.key} attempt {attempt} (task is {rec.status}, attempt {rec.attempt})"


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
            evolve(state, msg)  # the learned load time and VRAM
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
