"""The brain's state machine, completion and failure cascade: a task's dependents woken when it
succeeds or failed when it fails for good, escalated tasks settled by their follow-ups, plans finished.
"""

from __future__ import annotations

from collections import deque

from mesh.events import PlanFinished, TaskFailed, TaskSucceeded, TaskWaiting
from mesh.machine_step import Decision
from mesh.records import CANCELLED, ESCALATING, FAILED, PENDING, PLAN_RUNNING, SUCCEEDED, TaskRecord
from mesh.status import FailReason, PlanStatus


class Cascade(Decision):
    """What follows from tasks that are final: dependents, follow-ups, plans."""

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
                reason=FailReason.DEPENDENCY,
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

    def finish_plans(self) -> None:
        for plan_id in sorted(self.touched_plans):
            plan = self.state.plans.get(plan_id)
            if plan is None or plan.status != PLAN_RUNNING or plan.done < plan.total:
                continue
            # the counts say done; the task records decide: a plan is finished only with all of
            # its tasks known and final
            tasks = self.state.plan_tasks(plan_id)
            if len(tasks) < plan.total or not all(t.final for t in tasks):
                continue
            counts: dict[str, int] = {}
            for t in tasks:
                counts[t.status] = counts.get(t.status, 0) + 1
            if counts.get(CANCELLED):
                status = PlanStatus.CANCELLED
            elif counts.get(FAILED):
                status = PlanStatus.FAILED
            else:
                status = PlanStatus.SUCCEEDED
            self.emit(PlanFinished(plan_id=plan_id, status=status, at=self.now, counts=counts))
