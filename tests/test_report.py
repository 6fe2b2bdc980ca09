"""The plan report (`mesh.report`) on synthetic histories: each figure checked against the events
that make it."""

from __future__ import annotations

import msgspec

from mesh import events as ev
from mesh.events import LocalAttempt, PlanSpec, TaskSpec
from mesh.records import TaskRecord
from mesh.report import PlanReport, ReportBuilder, error_lines, key_line, plan_report
from mesh.status import FailReason, PlanStatus, TaskStatus

P = "p1"
T0 = 1000.0


def spec(tid: str, *deps: str, model: str = "", cls: str = "cpu") -> TaskSpec:
    return TaskSpec(id=tid, body="true", depends_on=deps, model=model, cls=cls)


def accepted(*tasks: TaskSpec) -> ev.PlanAccepted:
    return ev.PlanAccepted(plan_id=P, plan=PlanSpec(title="demo", tasks=tasks), at=T0, submitted_at=T0 - 1)


def ran(tid: str, start: float, took: float, attempt: int = 1, worker: str = "w1") -> list[ev.Message]:
    """A task's attempt that succeeded: started at T0 + start, ran `took` seconds."""
    return [
        ev.TaskStarted(plan_id=P, task_id=tid, attempt=attempt, worker=worker, at=T0 + start),
        ev.TaskSucceeded(
            plan_id=P, task_id=tid, attempt=attempt, worker=worker, at=T0 + start + took, duration_s=took
        ),
    ]


def history() -> list[ev.Message]:
    """a -> b -> c (a chain, 2 + 3 + 4 s); r retried once then succeeded (1 + 1 s, 5 s apart);
    d fails three times for good, e depends on d; x escalated to Claude and answered; l an LLM
    task on gpu0 (model gemma) which was loaded for it."""
    h: list[ev.Message] = [
        accepted(
            spec("a"),
            spec("b", "a"),
            spec("c", "b"),
            spec("r"),
            spec("d"),
            spec("e", "d"),
            spec("x", cls="external"),
            spec("l", model="gemma", cls="llm"),
        )
    ]
    h += ran("a", 0, 2)
    h += ran("b", 2, 3)
    h += ran("c", 5, 4)
    h += [
        ev.TaskStarted(plan_id=P, task_id="r", attempt=1, worker="w2", at=T0),
        ev.TaskRetrying(
            plan_id=P,
            task_id="r",
            attempt=1,
            at=T0 + 1,
            retry_at=T0 + 5,
            reason=FailReason.ERROR,
            error="exit code 1\nValueError: flaky",
            rc=1,
            worker="w2",
            duration_s=1.0,
        ),
    ]
    h += ran("r", 5, 1, attempt=2)
    for attempt in (1, 2, 3):
        at = T0 + attempt * 0.5
        h.append(ev.TaskStarted(plan_id=P, task_id="d", attempt=attempt, worker="w1", at=at))
        end = {"plan_id": P, "task_id": "d", "attempt": attempt, "worker": "w1", "at": at + 0.25}
        error = "exit code 2\nNo such file: data.csv"
        if attempt < 3:
            h.append(ev.TaskRetrying(**end, retry_at=at + 0.3, error=error, rc=2, duration_s=0.25))
        else:
            h.append(ev.TaskFailed(**end, error=error, rc=2, duration_s=0.25))
    h.append(
        ev.TaskFailed(
            plan_id=P,
            task_id="e",
            attempt=0,
            at=T0 + 2,
            reason=FailReason.DEPENDENCY,
            error="dependency d failed",
        )
    )
    h += [
        ev.TaskEscalated(plan_id=P, task_id="x", attempt=1, at=T0, rid="rid-x", why="external"),
        ev.EscalationWaiting(
            plan_id=P, task_id="x", attempt=1, at=T0 + 1, rid="rid-x", retry_at=T0 + 2, reason="429", tries=2
        ),
        ev.EscalationAnswered(
            plan_id=P,
            task_id="x",
            attempt=1,
            at=T0 + 3,
            rid="rid-x",
            model="claude-haiku-4-5",
            result="42",
            tokens_in=100,
            tokens_out=20,
            cost_usd=0.25,
            duration_s=1.5,
        ),
        ev.TaskSucceeded(plan_id=P, task_id="x", attempt=1, worker="", at=T0 + 3),
    ]
    h += ran("l", 1, 2.5, worker="wg")
    h.append(
        ev.RunFinished(
            plan_id=P,
            task_id="l",
            attempt=1,
            worker="wg",
            at=T0 + 3.5,
            ok=True,
            duration_s=2.5,
            model="gemma",
            gpu="gpu0",
        )
    )
    h.append(ev.PlanFinished(plan_id=P, status=PlanStatus.FAILED, at=T0 + 10))
    return h


def gpu_states() -> list[ev.GpuState]:
    base = {"worker": "wg", "host": "h", "device": "cuda"}
    return [
        ev.GpuState(gpu="gpu0", state="booting_llm", previous="idle", at=T0 + 0.2, **base),
        # the load the plan waited for: 0.8 s
        ev.GpuState(
            gpu="gpu0",
            state="llm_ready",
            previous="booting_llm",
            took_s=0.8,
            llm="gemma",
            at=T0 + 1,
            **base,
        ),
        # a load before the plan, and one on a GPU it never ran on: not counted
        ev.GpuState(
            gpu="gpu0",
            state="llm_ready",
            previous="booting_llm",
            took_s=9.0,
            llm="gemma",
            at=T0 - 50,
            **base,
        ),
        ev.GpuState(
            gpu="gpu1",
            state="llm_ready",
            previous="booting_llm",
            took_s=7.0,
            llm="gemma",
            at=T0 + 2,
            **base,
        ),
    ]


def report() -> PlanReport:
    return plan_report(P, history(), gpu_states())


def test_outcomes_attempts_and_times() -> None:
    r = report()
    assert (r.title, r.status, r.wall_s, r.submitted_at) == ("demo", "failed", 10.0, T0 - 1)
    assert r.tasks == 8
    assert r.outcomes == {"failed": 2, "succeeded": 6}
    # a, b, c, l, x: one each; r: two; d: three; e never ran
    assert r.attempts == 10
    assert r.complete


def test_slowest_tasks_by_the_time_their_attempts_ran() -> None:
    slowest = report().slowest
    assert [t.task_id for t in slowest[:4]] == ["c", "b", "l", "a"]
    c = slowest[0]
    assert (c.run_s, c.span_s, c.attempts, c.status, c.worker) == (4.0, 4.0, 1, "succeeded", "w1")
    r = next(t for t in slowest if t.task_id == "r")
    # two attempts of 1 s, from its first start to its end 6 s (its backoff included)
    assert (r.run_s, r.span_s, r.attempts) == (2.0, 6.0, 2)
    assert all(t.task_id != "e" for t in slowest), "a task that never ran took no time"


def test_critical_path_through_dependencies_by_actual_spans() -> None:
    r = report()
    assert [s.task_id for s in r.critical_path] == ["a", "b", "c"]
    assert r.critical_path_s == 9.0
    assert [(s.start_at - T0, s.end_at - T0) for s in r.critical_path] == [(0, 2), (2, 5), (5, 9)]


def test_a_longer_independent_task_is_the_critical_path() -> None:
    h = [
        accepted(spec("a"), spec("b", "a"), spec("slow")),
        *ran("a", 0, 1),
        *ran("b", 1, 1),
        *ran("slow", 0, 5),
    ]
    r = plan_report(P, h)
    assert [s.task_id for s in r.critical_path] == ["slow"] and r.critical_path_s == 5.0


def test_the_path_follows_the_dependency_that_took_longest() -> None:
    # join depends on quick (1 s) and long (4 s): the path goes through long
    h = [accepted(spec("quick"), spec("long"), spec("join", "quick", "long"))]
    h += ran("quick", 0, 1) + ran("long", 0, 4) + ran("join", 4, 1)
    assert [s.task_id for s in plan_report(P, h).critical_path] == ["long", "join"]


def test_a_long_chain_needs_no_recursion() -> None:
    n = 5000
    specs = [spec("t0")] + [spec(f"t{i}", f"t{i - 1}") for i in range(1, n)]
    h: list[ev.Message] = [accepted(*specs)]
    for i in range(n):
        h += ran(f"t{i}", i, 1)
    r = plan_report(P, h)
    assert len(r.critical_path) == n and r.critical_path_s == n


def test_retries_and_their_reasons() -> None:
    r = report()
    # r once, d twice (its third failure was final, not a retry)
    assert r.retries == 3 and r.retry_reasons == {"error": 3}
    notes = {(n.task_id, n.attempt): n for n in r.retry_notes}
    assert notes["r", 1].error == "ValueError: flaky" and notes["r", 1].worker == "w2"
    assert notes["d", 2].error == "No such file: data.csv"


def test_escalations_and_their_cost() -> None:
    r = report()
    (x,) = r.escalations
    assert (x.task_id, x.why, x.outcome, x.model) == ("x", "external", "answered", "claude-haiku-4-5")
    assert (x.tokens_in, x.tokens_out, x.cost_usd, x.waits) == (100, 20, 0.25, 2)
    assert (r.escalation_cost_usd, r.escalation_tokens_in, r.escalation_tokens_out) == (0.25, 100, 20)
    # its span runs from the request to the answer
    (x_time,) = [t for t in r.slowest if t.task_id == "x"]
    assert (x_time.span_s, x_time.attempts) == (3.0, 1)


def test_a_failed_escalation_and_a_ladder_climb() -> None:
    after = LocalAttempt(attempt=1, worker="w1", error="exit code 1\nbad json", reason=FailReason.ERROR)
    h: list[ev.Message] = [
        accepted(spec("q", model="small", cls="llm")),
        ev.TaskStarted(plan_id=P, task_id="q", attempt=1, worker="w1", at=T0),
        ev.TaskClimbed(
            plan_id=P,
            task_id="q",
            attempt=1,
            at=T0 + 2,
            tier=1,
            model="big",
            from_model="small",
            why="local_failures",
            after=after,
            duration_s=2.0,
        ),
        ev.TaskEscalated(plan_id=P, task_id="q", attempt=2, at=T0 + 3, rid="r2", why="local_failures"),
        ev.EscalationFailed(
            plan_id=P, task_id="q", attempt=2, at=T0 + 4, rid="r2", reason=FailReason.BUDGET, cost_usd=0.0
        ),
        ev.TaskFailed(
            plan_id=P, task_id="q", attempt=2, at=T0 + 4, reason=FailReason.BUDGET, error="over budget"
        ),
    ]
    r = plan_report(P, h)
    (climb,) = r.climbs
    assert (climb.from_model, climb.to_model, climb.why) == ("small", "big", "local_failures")
    (esc,) = r.escalations
    assert esc.outcome == "failed: budget"
    causes = {g.cause: g for g in r.failures}
    assert {c.line for c in causes["error"].lines} == {"exit code 1", "bad json"} and causes[
        "error"
    ].final == 0
    assert causes["budget"].final == 1 and causes["budget"].tasks == ["q"]


def test_gpu_time_per_model_and_loading_in_the_plans_time_on_its_gpus() -> None:
    r = report()
    (gemma,) = r.models
    assert (gemma.model, gemma.runs, gemma.gpu_s, gemma.gpus) == ("gemma", 1, 2.5, ["gpu0"])
    assert (gemma.loads, gemma.load_s) == (1, 0.8)
    assert (r.gpu_s, r.load_s) == (2.5, 0.8)


def test_failures_grouped_by_cause_with_the_most_common_lines() -> None:
    r = report()
    causes = {g.cause: g for g in r.failures}
    assert set(causes) == {"error", "dependency"}
    error = causes["error"]
    # r's one failed attempt and d's three; d failed for good
    assert (error.attempts, error.final, error.tasks) == (4, 1, ["d", "r"])
    assert [(c.line, c.count) for c in error.lines[:2]] == [("No such file: data.csv", 3), ("exit code 2", 3)]
    dep = causes["dependency"]
    assert (dep.attempts, dep.final, dep.tasks) == (0, 1, ["e"])
    assert [g.cause for g in r.failures] == ["error", "dependency"], "the cause of most tasks first"


def test_records_have_the_last_word_on_status() -> None:
    # the history was trimmed (no acceptance); the records say what the tasks are
    h: list[ev.Message] = [*ran("a", 0, 1)]
    records = [
        TaskRecord(plan_id=P, task_id="a", spec=spec("a"), status=TaskStatus.SUCCEEDED),
        TaskRecord(plan_id=P, task_id="b", spec=spec("b", "a"), status=TaskStatus.CANCELLED),
    ]
    r = plan_report(P, h, records=records)
    assert r.outcomes == {"cancelled": 1, "succeeded": 1} and not r.complete


def test_an_empty_history_is_an_empty_report() -> None:
    r = ReportBuilder(P).build()
    assert (r.tasks, r.attempts, r.critical_path, r.failures, r.models) == (0, 0, [], [], [])


def test_the_report_is_json_and_back() -> None:
    r = report()
    assert msgspec.json.decode(msgspec.json.encode(r), type=PlanReport) == r


def test_error_lines() -> None:
    assert error_lines("exit code 1\n\n  boom  \nboom\n") == ["exit code 1", "boom"]
    assert key_line("exit code 1\nTraceback\nValueError: x") == "ValueError: x"
    assert key_line("") == "" and len(error_lines("x" * 500)[0]) == 200


def test_a_failure_an_operator_retried_away_is_not_for_good() -> None:
    h: list[ev.Message] = [accepted(spec("g"))]
    h += [
        ev.TaskStarted(plan_id=P, task_id="g", attempt=1, worker="w1", at=T0),
        ev.TaskFailed(
            plan_id=P, task_id="g", attempt=1, worker="w1", at=T0 + 1, error="exit code 1", duration_s=1
        ),
        ev.PlanFinished(plan_id=P, status=PlanStatus.FAILED, at=T0 + 1),
        ev.TaskReset(plan_id=P, task_id="g", attempt=1, at=T0 + 5),
        ev.PlanResumed(plan_id=P, at=T0 + 5),
        *ran("g", 6, 1, attempt=2),
        ev.PlanFinished(plan_id=P, status=PlanStatus.SUCCEEDED, at=T0 + 7),
    ]
    r = plan_report(P, h)
    assert (r.status, r.outcomes, r.resets, r.attempts, r.wall_s) == (
        "succeeded",
        {"succeeded": 1},
        1,
        2,
        7.0,
    )
    (error,) = r.failures
    assert (error.cause, error.attempts, error.final, error.tasks) == ("error", 1, 0, ["g"])
