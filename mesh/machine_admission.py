"""The brain's state machine, admission: a submitted plan accepted (each model task given its
model, the plan checked and cut into parts) or rejected, and a plan cancelled.
"""

from __future__ import annotations

import msgspec

from mesh import validate
from mesh.events import (
    CLAUDE,
    MODEL_BODY_KINDS,
    CancelPlan,
    PlanAccepted,
    PlanRejected,
    PlanSpec,
    PlanTasks,
    SubmitPlan,
    TaskCancelled,
    TaskSpec,
)
from mesh.machine_cascade import Cascade
from mesh.machine_step import escalation_why
from mesh.records import PLAN_REJECTED, PlanRecord


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


def _ladder_problem(spec: TaskSpec, model: str, registry: dict[str, tuple[str, int]]) -> str:
    """What is wrong with a task's escalation ladder on this mesh ('' : nothing): each local
    rung must be an llm model of the registry, other than the one the task starts on."""
    for rung in spec.escalate:
        if rung == CLAUDE or not validate.ID_RE.fullmatch(rung):
            continue  # (a name that cannot be a model's is the plan checks' to report)
        known = registry.get(rung)
        if known is None or known[0] != "llm":
            names = ", ".join(sorted(m for m, (k, _) in registry.items() if k == "llm")) or "none"
            what = "not in the model registry" if known is None else f"of kind {known[0]}"
            return (
                f"task {spec.id!r} (line {spec.line}) climbs to model {rung!r} (its escalate ladder), "
                f"which is {what}; a rung is an llm model ({names}) or 'claude', last; "
                "add the model under [models] in the config"
            )
        if rung == model:
            return (
                f"task {spec.id!r} (line {spec.line}) climbs to model {rung!r}, the model it runs on "
                "already; a ladder names bigger models than the task's own"
            )
    return ""


class Admission(Cascade):
    """Plans in: submitted (accepted or rejected) and cancelled."""

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
        # (a task that depends on nothing waits from here: the event that accepts it says so)
        for n, part in enumerate(parts[1:], start=1):
            self.emit(PlanTasks(plan_id=msg.plan_id, part=n, tasks=part, at=self.now))

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
            error = _ladder_problem(spec, model, registry)
            if error:
                return plan, error
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
        # the same parts as at acceptance: each model task given its model first
        plan_spec, _ = self._resolve_models(msg.plan)
        parts = split_tasks(plan_spec.tasks, self.policy.part_bytes)
        for n, part in enumerate(parts[1:], start=1):
            if any(f"{msg.plan_id}.{t.id}" not in self.state.tasks for t in part):
                self.emit(PlanTasks(plan_id=msg.plan_id, part=n, tasks=part, at=self.now))
        self.reconcile()

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
