"""The brain's state machine and escalation: which tasks go to Claude, what the request carries,
and what an answer (a result, follow-up tasks, a failure) does. No server needed."""

from __future__ import annotations

from typing import Any

from mesh.events import (
    EscalationAnswered,
    EscalationFailed,
    EscalationPolicy,
    EscalationRequest,
    EscalationWaiting,
    PlanFinished,
    TaskEscalated,
    TaskFailed,
    TaskFollowups,
    TaskReleased,
    TaskRetrying,
)
from mesh.machine import Policy, replay
from mesh.records import ESCALATING, FAILED, PENDING, SUCCEEDED
from tests.test_machine import Driver, of_task, plan, reload, snapshot, statuses, task

AUTO = EscalationPolicy(auto=True)


def requests(d: Driver) -> list[EscalationRequest]:
    return [r for step in d.steps for r in step.escalations]


def answer(d: Driver, req: EscalationRequest, **kw: Any) -> None:
    d.feed(
        EscalationAnswered(
            rid=req.rid,
            plan_id=req.plan_id,
            task_id=req.task_id,
            attempt=req.attempt,
            at=d.now,
            model="claude-test",
            **kw,
        )
    )


def assert_replays(d: Driver) -> None:
    assert snapshot(replay(d.events)) == snapshot(d.state)
    assert snapshot(reload(d.state, 60.0)) == snapshot(d.state)


def test_an_external_task_goes_to_claude_and_its_answer_is_its_result() -> None:
    d = Driver()
    d.submit(plan(task("ask", cls="external"), task("after", "ask"), task("local", requires_external=True)))
    assert statuses(d.state) == {"ask": ESCALATING, "after": PENDING, "local": ESCALATING}
    assert [w.task_id for w in d.work] == []  # never on the work queue
    ask, local = requests(d)
    assert (ask.why, local.why) == ("external", "requires_external")
    assert ask.rid == "p1.ask.1" and ask.attempt == 1 and ask.task.id == "ask" and ask.attempts == ()
    (escalated,) = [e for e in of_task(d.events, "ask") if isinstance(e, TaskEscalated)]
    assert escalated.rid == ask.rid
    answer(d, ask, result="42")
    assert statuses(d.state)["ask"] == SUCCEEDED
    assert [w.task_id for w in d.work] == ["after"]
    d.run_task("after")
    answer(d, local, result="done")
    assert [e.status for e in d.events if isinstance(e, PlanFinished)] == ["succeeded"]
    assert_replays(d)


def test_waiting_and_stale_answers_change_nothing() -> None:
    d = Driver()
    d.submit(plan(task("ask", cls="external")))
    (req,) = requests(d)
    step = d.feed(
        EscalationWaiting(
            rid=req.rid, plan_id="p1", task_id="ask", attempt=1, at=d.now, retry_at=d.now + 5, reason="429"
        )
    )
    assert not step.events and "waits on escalation: 429" in step.ignored
    stale = d.feed(
        EscalationAnswered(rid="p1.ask.7", plan_id="p1", task_id="ask", attempt=7, at=d.now, model="m")
    )
    assert not stale.events and "stale answer" in stale.ignored
    assert statuses(d.state) == {"ask": ESCALATING}


def test_a_task_failing_locally_twice_escalates_with_its_attempts() -> None:
    d = Driver()
    d.submit(plan(task("flaky", retries=5), task("next", "flaky"), escalation=AUTO))
    d.run_task("flaky", ok=False, error="boom 1", rc=3)
    d.tick(at=d.now + 60)
    d.run_task("flaky", ok=False, error="boom 2", rc=4)
    (req,) = requests(d)
    assert req.why == "local_failures" and req.attempt == 3
    assert [(a.attempt, a.rc, a.error) for a in req.attempts] == [(1, 3, "boom 1"), (2, 4, "boom 2")]
    assert statuses(d.state)["flaky"] == ESCALATING
    # the second failure is not retried: it is carried by the escalation itself
    kinds = [type(e) for e in of_task(d.events, "flaky")]
    assert kinds.count(TaskRetrying) == 1 and kinds[-1] is TaskEscalated
    assert d.state.tasks["p1.flaky"].error == "boom 2"
    answer(d, req, result="the fixed output")
    assert statuses(d.state) == {"flaky": SUCCEEDED, "next": "ready"}
    assert_replays(d)


def test_escalation_after_local_failures_needs_the_plan_to_allow_it() -> None:
    d = Driver()
    d.submit(plan(task("flaky", retries=1)))
    d.run_task("flaky", ok=False)
    d.tick(at=d.now + 60)
    d.run_task("flaky", ok=False)
    assert not requests(d) and statuses(d.state) == {"flaky": FAILED}


def test_a_task_with_fewer_attempts_than_n_escalates_before_failing_for_good() -> None:
    d = Driver(policy=Policy(release_window=4, escalate_after=3))
    d.submit(plan(task("once", retries=0), escalation=AUTO))
    d.run_task("once", ok=False, error="no")
    (req,) = requests(d)
    assert req.why == "local_failures" and len(req.attempts) == 1


def test_sensitive_tasks_are_not_escalated_unless_the_plan_allows_it() -> None:
    d = Driver()
    d.submit(plan(task("secret", cls="external", sensitive=True), task("after", "secret")))
    assert not requests(d)
    assert statuses(d.state) == {"secret": FAILED, "after": FAILED}
    (failed,) = [e for e in of_task(d.events, "secret") if isinstance(e, TaskFailed)]
    assert failed.reason == "sensitive" and "'## Escalation'" in failed.error
    # failing locally, it stays local: retried and failed as usual
    d.submit(plan(task("local", sensitive=True, retries=2), escalation=AUTO), plan_id="p2")
    for _ in range(3):
        d.run_task("local", ok=False, plan_id="p2")
        d.tick(at=d.now + 60)
    assert not requests(d) and statuses(d.state, "p2") == {"local": FAILED}
    allowed = EscalationPolicy(sensitive=True)
    d.submit(plan(task("ok", cls="external", sensitive=True), escalation=allowed), plan_id="p3")
    (req,) = requests(d)
    assert req.task_id == "ok" and req.sensitive_allowed


FOLLOWUPS = """\
### ask-prep
```shell
echo prep
```

### ask-fix
- depends_on: ask-prep
- retries: 0

```shell
echo fix
```
"""


def test_followup_tasks_are_validated_added_and_run_then_the_task_succeeds() -> None:
    d = Driver()
    d.submit(plan(task("ask", cls="external"), task("after", "ask"), escalation=EscalationPolicy()))
    (req,) = requests(d)
    answer(d, req, followups=FOLLOWUPS)
    (added,) = [e for e in d.events if isinstance(e, TaskFollowups)]
    assert [t.id for t in added.tasks] == ["ask-prep", "ask-fix"]
    assert d.state.plans["p1"].total == 4
    assert statuses(d.state)["ask"] == ESCALATING
    assert [w.task_id for w in d.work] == ["ask-prep"]
    restored = Driver(state=reload(d.state, 60.0), now=d.now)  # a restarted brain goes on
    restored.work = list(d.work)
    restored.run_task("ask-prep")
    restored.run_task("ask-fix")
    assert statuses(restored.state)["ask"] == SUCCEEDED
    restored.run_task("after")
    assert [e.status for e in restored.events if isinstance(e, PlanFinished)] == ["succeeded"]
    d.events.extend(restored.events)
    assert snapshot(replay(d.events)) == snapshot(restored.state)


def test_a_failing_followup_fails_the_escalated_task() -> None:
    d = Driver()
    d.submit(plan(task("ask", cls="external"), task("after", "ask")))
    answer(d, requests(d)[0], followups=FOLLOWUPS)
    d.run_task("ask-prep")
    d.run_task("ask-fix", ok=False)
    assert statuses(d.state) == {"ask": FAILED, "after": FAILED, "ask-prep": SUCCEEDED, "ask-fix": FAILED}
    assert [e.status for e in d.events if isinstance(e, PlanFinished)] == ["failed"]
    assert_replays(d)


def test_invalid_followups_fail_the_task_saying_why() -> None:
    cases = {
        "### ask-x\n- depends_on: nowhere\n```shell\necho\n```\n": "unknown task 'nowhere'",
        "### ask\n```shell\necho\n```\n": "already in the plan: ask",
        "### ask-y\n- class: external\n```shell\necho\n```\n": "would be escalated again",
        "just prose, no tasks": "no tasks",
    }
    for n, (text, why) in enumerate(cases.items()):
        d = Driver()
        d.submit(plan(task("ask", cls="external")), plan_id=f"p{n}")
        answer(d, requests(d)[0], followups=text)
        (failed,) = [e for e in d.events if isinstance(e, TaskFailed)]
        assert failed.reason == "followups" and why in failed.error, failed.error
    d = Driver()
    d.submit(plan(task("ask", cls="external"), escalation=EscalationPolicy(followups=False)))
    (req,) = requests(d)
    assert not req.followups_allowed
    answer(d, req, followups=FOLLOWUPS)
    assert "does not allow" in next(e for e in d.events if isinstance(e, TaskFailed)).error


def test_a_failed_escalation_fails_the_task_and_its_dependents() -> None:
    d = Driver()
    d.submit(plan(task("ask", cls="external"), task("after", "ask")))
    (req,) = requests(d)
    d.feed(
        EscalationFailed(
            rid=req.rid, plan_id="p1", task_id="ask", attempt=1, at=d.now, reason="budget", error="over"
        )
    )
    assert statuses(d.state) == {"ask": FAILED, "after": FAILED}
    assert d.state.tasks["p1.ask"].reason == "budget"
    assert_replays(d)


def test_no_work_item_is_ever_made_for_an_escalated_task() -> None:
    d = Driver()
    d.submit(plan(*(task(f"e{i}", cls="external") for i in range(10)), escalation=AUTO))
    assert not any(isinstance(e, TaskReleased) for e in d.events)
    assert d.work == []
    assert len(requests(d)) == 10
