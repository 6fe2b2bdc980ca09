"""A plan's report: what happened, folded from its history, for `mesh report` and `submit --wait`.
Pure: a plan's events (and the GPU states of its time) in, a `PlanReport` out; no I/O.

What it says, and from which events:

- **outcomes**: each task's last status (the task records when given, else the transitions);
- **slowest tasks**: by the time their attempts ran (`duration_s` of each attempt's end);
- **critical path**: the chain through `depends_on` whose tasks' spans (first start to end,
  retries and their backoff included) add up longest; what held the plan up;
- **retries**: every `task.retrying`, with its reason and the line that says most of its error;
  redeliveries (a worker that died) and operator retries (`task.reset`) counted;
- **escalations**: each `task.escalated` with the gateway's answer or failure (model, tokens,
  USD), the ladder's climbs (`task.climbed`) and the local reviews' verdicts;
- **GPU time per model**: the workers' `run.finished` on a GPU, summed by model; **loading**:
  the `gpu.state` reports leaving `booting_llm`/`booting_script` (their `took_s`) on the GPUs the
  plan ran on, while it ran (a GPU shared with another plan meanwhile counts its loads here too);
- **failures by cause**: every failed attempt (retried or final) grouped by reason, with the
  tasks, how many failed for good, and the error lines seen most often.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import msgspec

from mesh import events
from mesh.events import GpuState, Message, TaskSpec
from mesh.records import PlanRecord, TaskRecord
from mesh.status import FailReason, PlanStatus, TaskStatus

# what the lists of a report hold at most (their totals are counted in full)
TOP = 10
# an error line longer than this is cut (a line is a key for counting)
LINE_CHARS = 200
_BOOTING = ("booting_llm", "booting_script")


class TaskTime(msgspec.Struct, frozen=True):
    task_id: str
    status: str
    attempts: int
    run_s: float
    span_s: float
    worker: str = ""
    model: str = ""


class PathStep(msgspec.Struct, frozen=True):
    task_id: str
    start_at: float
    end_at: float
    span_s: float
    run_s: float


class RetryNote(msgspec.Struct, frozen=True):
    task_id: str
    attempt: int
    reason: str
    worker: str = ""
    error: str = ""


class EscalationNote(msgspec.Struct, frozen=True):
    task_id: str
    attempt: int
    why: str
    # answered, followups, failed: <reason>, or waiting (no answer yet)
    outcome: str
    model: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    waits: int = 0


class ClimbNote(msgspec.Struct, frozen=True):
    task_id: str
    attempt: int
    from_model: str
    to_model: str
    why: str = ""


class ModelTime(msgspec.Struct, frozen=True):
    model: str
    runs: int
    gpu_s: float
    gpus: list[str]
    loads: int = 0
    load_s: float = 0.0


class LineCount(msgspec.Struct, frozen=True):
    line: str
    count: int


class FailureGroup(msgspec.Struct, frozen=True):
    cause: str
    attempts: int
    final: int
    tasks: list[str]
    lines: list[LineCount]


class PlanReport(msgspec.Struct, frozen=True):
    plan_id: str
    title: str
    status: str
    submitted_at: float
    accepted_at: float
    finished_at: float
    wall_s: float
    tasks: int
    outcomes: dict[str, int]
    attempts: int
    redeliveries: int
    resets: int
    slowest: list[TaskTime]
    critical_path: list[PathStep]
    critical_path_s: float
    retries: int
    retry_reasons: dict[str, int]
    retry_notes: list[RetryNote]
    escalations: list[EscalationNote]
    escalation_cost_usd: float
    escalation_tokens_in: int
    escalation_tokens_out: int
    climbs: list[ClimbNote]
    reviews: dict[str, int]
    models: list[ModelTime]
    gpu_s: float
    load_s: float
    failures: list[FailureGroup]
    # False when the history lacks the plan's acceptance (trimmed by the stream's age limit):
    # what it says of tasks comes from the records, and its figures count only what is left
    complete: bool = True


def error_lines(error: str) -> list[str]:
    """The distinct non-empty lines of an error text, each cut to `LINE_CHARS`."""
    seen: dict[str, None] = {}
    for raw in error.splitlines():
        line = raw.strip()
        if line:
            seen.setdefault(line[:LINE_CHARS], None)
    return list(seen)


def key_line(error: str) -> str:
    """The line that says most of an error: its last (the stderr's last words come after the
    worker's `exit code N`)."""
    lines = error_lines(error)
    return lines[-1] if lines else ""


@dataclass
class _Attempt:
    start_at: float = 0.0
    end_at: float = 0.0
    duration_s: float = 0.0
    worker: str = ""


@dataclass
class _Task:
    spec: TaskSpec | None = None
    status: str = TaskStatus.PENDING
    attempts: dict[int, _Attempt] = field(default_factory=dict)
    first_start: float = 0.0
    end_at: float = 0.0
    model: str = ""


@dataclass
class _Escalation:
    """An escalation as it is folded: an `EscalationNote` in the making (the same fields)."""

    task_id: str
    attempt: int
    why: str
    outcome: str = "waiting"
    model: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    waits: int = 0


class ReportBuilder:
    """Folds one plan's events, in stream order (`add`), and the GPU states of its time
    (`add_gpu`); `build` says what they amount to."""

    def __init__(self, plan_id: str) -> None:
        self.plan_id = plan_id
        self.title = ""
        self.status = ""
        self.submitted_at = 0.0
        self.accepted_at = 0.0
        self.finished_at = 0.0
        self.accepted = False
        self.tasks: dict[str, _Task] = {}
        self.redeliveries = 0
        self.resets = 0
        self.retry_notes: list[RetryNote] = []
        self.retry_reasons: collections.Counter[str] = collections.Counter()
        # every failed attempt: (task, attempt, reason, error, final)
        self.failed: list[tuple[str, int, str, str, bool]] = []
        self.escalations: dict[str, _Escalation] = {}
        self.climbs: list[ClimbNote] = []
        self.reviews: collections.Counter[str] = collections.Counter()
        # (model, gpu) -> [runs, seconds]
        self.runs: dict[tuple[str, str], list[float]] = {}
        # gpu -> [(at, model, took_s)] of the loads that finished
        self.loads: dict[str, list[tuple[float, str, float]]] = {}

    # folding ------------------------------------------------------------------------
    def _task(self, task_id: str) -> _Task:
        t = self.tasks.get(task_id)
        if t is None:
            t = self.tasks[task_id] = _Task()
        return t

    def _specs(self, specs: Iterable[TaskSpec]) -> None:
        for spec in specs:
            t = self._task(spec.id)
            t.spec = spec
            t.model = t.model or spec.model

    def _attempt(self, task_id: str, attempt: int) -> _Attempt:
        t = self._task(task_id)
        a = t.attempts.get(attempt)
        if a is None:
            a = t.attempts[attempt] = _Attempt()
        return a

    def _started(self, task_id: str, attempt: int, at: float, worker: str) -> None:
        if at <= 0:
            return
        a = self._attempt(task_id, attempt)
        a.start_at = a.start_at or at
        a.worker = worker or a.worker
        t = self.tasks[task_id]
        t.first_start = min(t.first_start, at) if t.first_start else at

    def _ended(self, task_id: str, attempt: int, at: float, began: float, took: float, worker: str) -> None:
        """An attempt ended at `at`, having run `took` seconds from `began` (0: its `task.started`
        said when, as the records have it; or, where none did, `at - took`)."""
        a = self._attempt(task_id, attempt)
        if began:
            self._started(task_id, attempt, began, worker)
        elif not a.start_at and took > 0:
            self._started(task_id, attempt, at - took, worker)
        a.end_at, a.duration_s = at, max(0.0, took)
        a.worker = worker or a.worker

    def _failed_attempt(self, task_id: str, attempt: int, reason: str, error: str, final: bool) -> None:
        self.failed.append((task_id, attempt, reason, error, final))

    def add(self, msg: Message) -> None:
        """One of the plan's events (plan, task, run and escalation events), in stream order."""
        match msg:
            case events.PlanAccepted() | events.PlanTasks() | events.TaskFollowups():
                self._plan_tasks(msg)
            case events.PlanResumed() | events.PlanFinished() | events.PlanRejected():
                self._plan_end(msg)
            case events.TaskStarted():
                self._started(msg.task_id, msg.attempt, msg.at, msg.worker)
                self._task(msg.task_id).status = TaskStatus.RUNNING
            case events.TaskRedelivered():
                self.redeliveries += 1
            case events.TaskReset():
                self.resets += 1
                self._task(msg.task_id).status = TaskStatus.WAITING
            case (
                events.TaskSucceeded() | events.TaskRetrying() | events.TaskFailed() | events.TaskCancelled()
            ):
                self._task_end(msg)
            case (
                events.TaskEscalated()
                | events.TaskClimbed()
                | events.TaskReviewing()
                | events.TaskReviewed()
                | events.EscalationAnswered()
                | events.EscalationFailed()
                | events.EscalationWaiting()
            ):
                self._escalation(msg)
            case events.RunFinished():
                if msg.gpu:
                    model = msg.model or self._task(msg.task_id).model or "(no model)"
                    row = self.runs.setdefault((model, msg.gpu), [0, 0.0])
                    row[0] += 1
                    row[1] += max(0.0, msg.duration_s)
            case _:
                pass

    def _plan_tasks(self, msg: events.PlanAccepted | events.PlanTasks | events.TaskFollowups) -> None:
        match msg:
            case events.PlanAccepted():
                self.accepted = True
                self.title = msg.plan.title
                self.accepted_at = msg.at
                self.submitted_at = msg.submitted_at or msg.at
                self.status = PlanStatus.RUNNING
                self._specs(msg.plan.tasks)
            case events.PlanTasks() | events.TaskFollowups():
                self._specs(msg.tasks)

    def _plan_end(self, msg: events.PlanResumed | events.PlanFinished | events.PlanRejected) -> None:
        match msg:
            case events.PlanResumed():
                self.status = PlanStatus.RUNNING
            case events.PlanFinished():
                self.status, self.finished_at = msg.status, msg.at
            case events.PlanRejected():
                self.status, self.finished_at = PlanStatus.REJECTED, msg.at
                self.title = self.title or msg.title

    def _task_end(
        self, msg: events.TaskSucceeded | events.TaskRetrying | events.TaskFailed | events.TaskCancelled
    ) -> None:
        t = self._task(msg.task_id)
        match msg:
            case events.TaskSucceeded():
                self._ended(msg.task_id, msg.attempt, msg.at, msg.started_at, msg.duration_s, msg.worker)
                t.status, t.end_at = TaskStatus.SUCCEEDED, msg.at
            case events.TaskRetrying():
                self._ended(msg.task_id, msg.attempt, msg.at, msg.started_at, msg.duration_s, msg.worker)
                t.status = TaskStatus.WAITING
                self.retry_reasons[msg.reason] += 1
                note = RetryNote(msg.task_id, msg.attempt, msg.reason, msg.worker, key_line(msg.error))
                self.retry_notes.append(note)
                self._failed_attempt(msg.task_id, msg.attempt, msg.reason, msg.error, False)
            case events.TaskFailed():
                if msg.reason != FailReason.DEPENDENCY and msg.attempt >= 1:
                    self._ended(msg.task_id, msg.attempt, msg.at, msg.started_at, msg.duration_s, msg.worker)
                t.status, t.end_at = TaskStatus.FAILED, msg.at
                self._failed_attempt(msg.task_id, msg.attempt, msg.reason, msg.error, True)
            case events.TaskCancelled():
                t.status, t.end_at = TaskStatus.CANCELLED, msg.at

    def _escalation(self, msg: Message) -> None:
        match msg:
            case events.TaskEscalated():
                # the escalation is an attempt of its own, begun as the gateway is asked
                self._started(msg.task_id, msg.attempt, msg.at, "")
                self._task(msg.task_id).status = TaskStatus.ESCALATING
                self.escalations[msg.rid] = _Escalation(msg.task_id, msg.attempt, msg.why)
                if msg.after is not None:
                    after = msg.after
                    self._failed_attempt(msg.task_id, after.attempt, after.reason, after.error, False)
            case events.TaskClimbed():
                if msg.after is not None:
                    after = msg.after
                    self._ended(msg.task_id, after.attempt, msg.at, 0.0, msg.duration_s, after.worker)
                    self._failed_attempt(msg.task_id, after.attempt, after.reason, after.error, False)
                self.climbs.append(ClimbNote(msg.task_id, msg.attempt, msg.from_model, msg.model, msg.why))
                self._task(msg.task_id).model = msg.model
            case events.TaskReviewing():
                failed = msg.failed
                self._ended(msg.task_id, failed.attempt, msg.at, 0.0, msg.duration_s, failed.worker)
            case events.TaskReviewed():
                self.reviews[msg.verdict or "neither"] += 1
            case events.EscalationAnswered():
                e = self.escalations.get(msg.rid)
                if e is not None:
                    e.outcome = "followups" if msg.followups else "answered"
                    e.model, e.tokens_in, e.tokens_out = msg.model, msg.tokens_in, msg.tokens_out
                    e.cost_usd, e.duration_s = msg.cost_usd, msg.duration_s
            case events.EscalationFailed():
                e = self.escalations.get(msg.rid)
                if e is not None:
                    e.outcome = f"failed: {msg.reason}"
                    e.tokens_in, e.tokens_out, e.cost_usd = msg.tokens_in, msg.tokens_out, msg.cost_usd
            case events.EscalationWaiting():
                e = self.escalations.get(msg.rid)
                if e is not None:
                    e.waits = max(e.waits, msg.tries)
            case _:
                pass

    def add_gpu(self, msg: GpuState) -> None:
        """A GPU's state report: a load that finished counts (`build` keeps those of the plan's
        GPUs and time)."""
        if msg.previous in _BOOTING and msg.state not in _BOOTING and msg.took_s > 0 and not msg.error:
            model = msg.llm if msg.previous == "booting_llm" else ",".join(msg.script_models)
            self.loads.setdefault(msg.gpu, []).append((msg.at, model or "(unknown)", msg.took_s))

    # building -----------------------------------------------------------------------
    def build(
        self, records: Iterable[TaskRecord] = (), plan: PlanRecord | None = None, top: int = TOP
    ) -> PlanReport:
        """The report. The task records (KV), when given, are the tasks' last word on their
        status; the plan record fills in what a trimmed history lacks."""
        for rec in records:
            t = self._task(rec.task_id)
            t.status = rec.status
            if t.spec is None:
                t.spec = rec.spec
                t.model = t.model or rec.spec.model
        title, status = self.title, self.status
        submitted, accepted, finished = self.submitted_at, self.accepted_at, self.finished_at
        if plan is not None:
            title = title or plan.title
            status = plan.status or status
            submitted = submitted or plan.submitted_at
            accepted = accepted or plan.accepted_at
            finished = finished or plan.finished_at
        begin = accepted or submitted
        wall = max(0.0, finished - begin) if finished and begin else 0.0

        spans = {tid: self._span(t) for tid, t in self.tasks.items()}
        runs = {tid: sum(a.duration_s for a in t.attempts.values()) for tid, t in self.tasks.items()}
        path = self._critical_path(spans)
        slowest = sorted(
            (tid for tid, t in self.tasks.items() if t.attempts),
            key=lambda tid: (-runs[tid], tid),
        )[:top]
        costs = list(self.escalations.values())
        models = self._models(accepted, finished)
        return PlanReport(
            plan_id=self.plan_id,
            title=title,
            status=str(status),
            submitted_at=submitted,
            accepted_at=accepted,
            finished_at=finished,
            wall_s=wall,
            tasks=len(self.tasks),
            outcomes=dict(sorted(collections.Counter(str(t.status) for t in self.tasks.values()).items())),
            attempts=sum(len(t.attempts) for t in self.tasks.values()),
            redeliveries=self.redeliveries,
            resets=self.resets,
            slowest=[self._time(tid, runs[tid], spans[tid]) for tid in slowest],
            critical_path=[
                PathStep(tid, self.tasks[tid].first_start, self.tasks[tid].end_at, spans[tid], runs[tid])
                for tid in path
            ],
            critical_path_s=sum(spans[tid] for tid in path),
            retries=sum(self.retry_reasons.values()),
            retry_reasons=dict(self.retry_reasons.most_common()),
            retry_notes=self.retry_notes[-top:],
            escalations=[EscalationNote(**asdict(e)) for e in costs[-top:]],
            escalation_cost_usd=sum(e.cost_usd for e in costs),
            escalation_tokens_in=sum(e.tokens_in for e in costs),
            escalation_tokens_out=sum(e.tokens_out for e in costs),
            climbs=self.climbs[-top:],
            reviews=dict(self.reviews.most_common()),
            models=models,
            gpu_s=sum(m.gpu_s for m in models),
            load_s=sum(m.load_s for m in models),
            failures=self._failures(top),
            complete=self.accepted,
        )

    def _span(self, t: _Task) -> float:
        if not t.first_start or not t.end_at or t.end_at < t.first_start:
            return 0.0
        return t.end_at - t.first_start

    def _time(self, tid: str, run_s: float, span_s: float) -> TaskTime:
        t = self.tasks[tid]
        last = t.attempts[max(t.attempts)] if t.attempts else _Attempt()
        return TaskTime(tid, str(t.status), len(t.attempts), run_s, span_s, last.worker, t.model)

    def _critical_path(self, spans: dict[str, float]) -> list[str]:
        """The dependency chain of the longest summed span (ties: the later end, then the id)."""
        deps = {
            tid: [d for d in (t.spec.depends_on if t.spec else ()) if d in self.tasks]
            for tid, t in self.tasks.items()
        }
        # Kahn's order, so a chain of any length needs no recursion
        waiting = {tid: len(ds) for tid, ds in deps.items()}
        dependents: dict[str, list[str]] = {}
        for tid, ds in deps.items():
            for d in ds:
                dependents.setdefault(d, []).append(tid)
        ready = collections.deque(sorted(tid for tid, n in waiting.items() if n == 0))
        best: dict[str, tuple[float, str]] = {}  # task -> (longest chain ending here, its previous)
        while ready:
            tid = ready.popleft()
            before = max(((best[d][0], self.tasks[d].end_at, d) for d in deps[tid]), default=None)
            best[tid] = (spans[tid] + (before[0] if before else 0.0), before[2] if before else "")
            for nxt in dependents.get(tid, ()):
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    ready.append(nxt)
        if not best or not any(spans.values()):
            return []
        end = max(best, key=lambda tid: (best[tid][0], self.tasks[tid].end_at, tid))
        path = [end]
        while best[path[-1]][1]:
            path.append(best[path[-1]][1])
        return path[::-1]

    def _models(self, accepted: float, finished: float) -> list[ModelTime]:
        by_model: dict[str, list[float]] = {}
        gpus: dict[str, set[str]] = {}
        for (model, gpu), (n, secs) in self.runs.items():
            row = by_model.setdefault(model, [0, 0.0, 0, 0.0])
            row[0] += n
            row[1] += secs
            gpus.setdefault(model, set()).add(gpu)
        used = {gpu for g in gpus.values() for gpu in g}
        for gpu, loads in self.loads.items():
            if gpu not in used:
                continue
            for at, model, took in loads:
                if at < accepted or (finished and at > finished):
                    continue
                row = by_model.setdefault(model, [0, 0.0, 0, 0.0])
                row[2] += 1
                row[3] += took
                gpus.setdefault(model, set()).add(gpu)
        return [
            ModelTime(model, int(n), secs, sorted(gpus.get(model, ())), int(loads), load_s)
            for model, (n, secs, loads, load_s) in sorted(by_model.items(), key=lambda kv: (-kv[1][1], kv[0]))
        ]

    def _failures(self, top: int) -> list[FailureGroup]:
        groups: dict[str, list[tuple[str, int, str, bool]]] = {}
        # the cause of each task's last failure for good; it counts where the task is failed still
        # (an operator's retry may have run it again since)
        ended: dict[str, str] = {}
        for tid, attempt, reason, error, final in self.failed:
            cause = str(reason) or "error"
            groups.setdefault(cause, []).append((tid, attempt, error, final))
            if final:
                ended[tid] = cause
        out = []
        for cause, items in groups.items():
            lines: collections.Counter[str] = collections.Counter()
            for _, _, error, _ in items:
                lines.update(error_lines(error))
            out.append(
                FailureGroup(
                    cause=cause,
                    # (a task failed by its dependency never ran: no attempt of its own failed)
                    attempts=0 if cause == FailReason.DEPENDENCY else len(items),
                    final=len(
                        {
                            tid
                            for tid, *_ in items
                            if ended.get(tid) == cause and self.tasks[tid].status == TaskStatus.FAILED
                        }
                    ),
                    tasks=sorted({tid for tid, *_ in items}),
                    lines=[
                        LineCount(line, n)
                        for line, n in sorted(lines.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
                    ],
                )
            )
        return sorted(out, key=lambda g: (-len(g.tasks), g.cause))


def plan_report(
    plan_id: str,
    history: Iterable[Message],
    gpu_states: Iterable[GpuState] = (),
    records: Iterable[TaskRecord] = (),
    plan: PlanRecord | None = None,
    top: int = TOP,
) -> PlanReport:
    """The report of a plan from its events, in order, the GPU states of its time, and its records."""
    builder = ReportBuilder(plan_id)
    for msg in history:
        builder.add(msg)
    for state in gpu_states:
        builder.add_gpu(state)
    return builder.build(records, plan, top)
