"""The brain's state machine, escalation and review: a task handed to Claude, its answer (a result,
or follow-up tasks checked like a plan's) or its failure taken, and a failed attempt's local review.

A task with an escalation ladder (`TaskSpec.escalate`) climbs it first: where it would fail for
good, or the criteria would hand it to Claude, it moves up one rung (`task.climbed`) to the next
local model, and reaches Claude only when that is the next rung.
"""

from __future__ import annotations

import msgspec

from mesh import review
from mesh.errors import PlanError
from mesh.events import (
    CLAUDE,
    EscalationAnswered,
    EscalationFailed,
    EscalationPolicy,
    EscalationRequest,
    LocalAttempt,
    PlanSpec,
    TaskClimbed,
    TaskEscalated,
    TaskFailed,
    TaskFollowups,
    TaskReviewed,
    TaskSpec,
)
from mesh.machine_admission import Admission
from mesh.machine_retry import NO_RETRY, Retries, _tries
from mesh.machine_state import State
from mesh.machine_step import MAX_ERROR_CHARS, escalation_why
from mesh.plan import parse_followups
from mesh.records import ESCALATING, TaskRecord
from mesh.status import FailReason

# the most follow-up tasks one answer may add
MAX_FOLLOWUPS = 100
# failures after which an escalation may follow (not a cancel, not a dependency)
ESCALATABLE = frozenset(
    {FailReason.ERROR, FailReason.TIMEOUT, FailReason.LOST, FailReason.DEAD_LETTER, FailReason.DEFINITION}
)


def next_rung(rec: TaskRecord) -> str:
    """The rung of its escalation ladder above the task's current one: an llm model, `claude`,
    or '' (the top: nothing above it). Above a task with no ladder is Claude, as always."""
    ladder = rec.spec.escalate
    if not ladder:
        return CLAUDE
    return ladder[rec.tier] if rec.tier < len(ladder) else ""


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


class Escalations(Retries, Admission):
    """Tasks handed to Claude, and failed attempts reviewed before they take their course."""

    # review -----------------------------------------------------------------
    def _review_model(self, rec: TaskRecord, reason: FailReason) -> str:
        """The model that reviews this failed attempt ('' : no review). Only a failure an
        escalation could follow is reviewed, and never a sensitive task (the review's answer
        would be withheld from the events, like all its output)."""
        plan = self.state.plans.get(rec.plan_id)
        if plan is None or not plan.escalation.review or reason not in ESCALATABLE or rec.spec.sensitive:
            return ""
        if not next_rung(rec):
            return ""  # the top of its ladder: a verdict could not take it anywhere
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
        if verdict == review.ESCALATE and next_rung(rec):
            self._climb_or_escalate(rec, "review", failed, duration_s)
            return
        self._take_course(rec, failed, then == "retry", duration_s)

    # the ladder -------------------------------------------------------------
    def _may_reach(self, rec: TaskRecord, rung: str) -> bool:
        """A local rung is always in reach; Claude is not for a sensitive task whose plan does
        not allow escalating sensitive tasks (it stays local)."""
        if rung != CLAUDE or not rec.spec.sensitive:
            return True
        plan = self.state.plans.get(rec.plan_id)
        return plan is not None and plan.escalation.sensitive

    def _take_course(self, rec: TaskRecord, failed: LocalAttempt, retry: bool, duration_s: float) -> None:
        """A failed local attempt takes its course: retried, else (its retries on this model
        spent) climbed to the next rung of the task's ladder, else failed for good. Without a
        ladder, exactly as before: retried or failed."""
        if not retry and rec.spec.escalate and failed.reason in ESCALATABLE:
            rung = next_rung(rec)
            if rung and self._may_reach(rec, rung):
                self._climb_or_escalate(rec, "local_failures", failed, duration_s)
                return
        self._retry_or_fail(rec, failed, retry, duration_s)

    def _climb_or_escalate(self, rec: TaskRecord, why: str, failed: LocalAttempt, duration_s: float) -> None:
        """Up one rung: to the ladder's next local model, or to Claude (the gateway) when that
        is next (or the task has no ladder)."""
        rung = next_rung(rec)
        if rung == CLAUDE:
            self.escalate(rec, why, failed)
            return
        self.emit(
            TaskClimbed(
                plan_id=rec.plan_id,
                task_id=rec.task_id,
                attempt=failed.attempt,
                at=self.now,
                tier=rec.tier + 1,
                model=rung,
                from_model=rec.tier_model,
                why=why,
                after=failed,
                duration_s=duration_s,
            )
        )

    # escalation -------------------------------------------------------------
    def escalate(self, rec: TaskRecord, why: str, after: LocalAttempt | None = None) -> None:
        """Hand a task to the gateway; a sensitive one only if its plan allows it."""
        plan = self.state.plans.get(rec.plan_id)
        policy = plan.escalation if plan is not None else EscalationPolicy()
        if rec.spec.sensitive and not policy.sensitive:
            self._escalation_failed(
                rec,
                FailReason.SENSITIVE,
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

    def _auto_escalates(self, rec: TaskRecord, reason: FailReason) -> bool:
        """A failed local attempt of a plan with automatic escalation: escalate after N failures,
        or before the task would fail for good with fewer."""
        plan = self.state.plans.get(rec.plan_id)
        if plan is None or not plan.escalation.auto or reason not in ESCALATABLE:
            return False
        rung = next_rung(rec)
        if not rung or not self._may_reach(rec, rung):
            return False  # it stays where it is: retried, then failed as usual
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
            self._escalation_failed(rec, FailReason.FOLLOWUPS, error)
            return
        # (a follow-up that depends on nothing waits from here: this event says so)
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

    def esc_failed(self, msg: EscalationFailed) -> None:
        rec = self._escalated(msg)
        if rec is not None:
            self._escalation_failed(rec, msg.reason, msg.error)

    def _escalation_failed(self, rec: TaskRecord, reason: FailReason, error: str) -> None:
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
        external = [s.id for s in specs if escalation_why(s) or CLAUDE in s.escalate]
        if external:
            return (), f"follow-up tasks run locally, but {', '.join(external[:10])} would be escalated again"
        specs = tuple(msgspec.structs.replace(s, env={**plan.env, **s.env}) for s in specs)
        resolved, error = self._resolve_models(PlanSpec(title=plan.title, tasks=specs))
        if error:
            return (), f"follow-up task {error}"
        return resolved.tasks, ""
