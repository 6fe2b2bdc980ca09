"""The brain's state machine, retries: a failed attempt retried after a deterministic backoff or
failed for good, and an operator's retry of failed or cancelled tasks.
"""

from __future__ import annotations

import zlib
from collections import deque

from mesh.events import (
    LocalAttempt,
    PlanResumed,
    RetryTasks,
    TaskFailed,
    TaskReset,
    TaskRetrying,
    TaskWaiting,
)
from mesh.machine_cascade import Cascade
from mesh.machine_step import Policy
from mesh.records import CANCELLED, FAILED, PLAN_REJECTED, SUCCEEDED, TaskRecord
from mesh.status import FailReason

# failures no retry can help
NO_RETRY = frozenset({FailReason.DEAD_LETTER, FailReason.DEFINITION})


def _tries(rec: TaskRecord) -> int:
    """The task's own attempts since its last reset (reviews are not tries of the task)."""
    return rec.attempt - rec.base_attempt - rec.reviews


def backoff_s(key: str, attempt: int, policy: Policy) -> float:
    """Exponential backoff with deterministic 'equal jitter': half fixed, half spread."""
    delay = min(policy.retry_max_s, policy.retry_base_s * 2.0 ** max(attempt - 1, 0))
    spread = zlib.crc32(f"{key}:{attempt}".encode()) / 0xFFFFFFFF
    return delay * (0.5 + 0.5 * spread)


class Retries(Cascade):
    """Attempts again: a failed attempt's course, and an operator's retry."""

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
