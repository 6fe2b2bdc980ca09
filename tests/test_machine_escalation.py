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
    TaskReviewed,
    TaskReviewing,
)
from mesh.machine import Policy, replay, work_item
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
        "### ask-g\n- foreach: F in *\n```shell\ncat {F}\n```\n": "glob '*' of task 'ask-g' is refused",
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


# ---------------------------------------------------------------- the local review

REVIEW = EscalationPolicy(review=True)


def reviewing(d: Driver, task_id: str) -> list[TaskReviewing]:
    return [e for e in of_task(d.events, task_id) if isinstance(e, TaskReviewing)]


def reviewed(d: Driver, task_id: str) -> list[TaskReviewed]:
    return [e for e in of_task(d.events, task_id) if isinstance(e, TaskReviewed)]


def test_a_review_that_says_escalate_hands_the_task_to_claude() -> None:
    d = Driver(policy=Policy(review_model="judge"))
    d.submit(plan(task("build", retries=3), task("next", "build"), escalation=REVIEW))
    d.run_task("build", ok=False, error="make: *** no rule to make target 'all'", rc=2)
    (started,) = reviewing(d, "build")
    assert (started.attempt, started.model, started.then) == (2, "judge", "retry")
    assert (started.failed.attempt, started.failed.rc) == (1, 2)
    rec = d.state.tasks["p1.build"]
    assert rec.status == "ready" and rec.attempt == 2 and rec.review == "retry"
    # the review is llm work on the review model, with the task and its error as data
    item = d.take("build")
    assert (item.cls, item.kind, item.model, item.attempt) == ("llm", "prompt", "judge", 2)
    assert item.grammar == 'root ::= "ESCALATE" | "RETRY"' and item.max_tokens > 0
    assert '<data from="task build (cpu, shell)">' in item.body and "no rule to make target" in item.body
    assert d.state.demand.get("llm:judge") == 1
    d.run(item, stdout_tail="ESCALATE")
    (done,) = reviewed(d, "build")
    assert (done.verdict, done.answer, done.worker) == ("escalate", "ESCALATE", "w1")
    (req,) = requests(d)
    assert req.why == "review" and req.attempt == 3 and [a.attempt for a in req.attempts] == [1]
    assert "no rule to make target" in req.attempts[0].error
    assert statuses(d.state) == {"build": ESCALATING, "next": PENDING}
    assert not any(isinstance(e, TaskRetrying) for e in d.events)
    assert d.state.demand.get("llm:judge", 0) == 0
    answer(d, req, result="built")
    assert statuses(d.state) == {"build": SUCCEEDED, "next": "ready"}
    assert_replays(d)


def test_a_review_that_says_retry_or_fails_or_answers_garbage_lets_the_failure_take_its_course() -> None:
    d = Driver(policy=Policy(review_model="judge"))
    d.submit(plan(task("flaky", retries=2), task("next", "flaky"), escalation=REVIEW))
    d.run_task("flaky", ok=False, error="boom 1")
    d.run(d.take("flaky"), stdout_tail="RETRY")  # the review, attempt 2
    (retrying,) = [e for e in of_task(d.events, "flaky") if isinstance(e, TaskRetrying)]
    assert retrying.attempt == 1 and retrying.error == "boom 1" and retrying.worker == "w1"
    d.tick(at=d.now + 60)
    item = d.take("flaky")
    assert (item.attempt, item.cls, item.grammar) == (3, "cpu", "")  # the task itself again
    d.run(item, ok=False, error="boom 3")
    # reviews are not tries: with 2 retries, the second failure is still retried
    assert reviewing(d, "flaky")[-1].then == "retry"
    d.run(d.take("flaky"), stdout_tail="maybe later")  # an answer that is neither word
    assert reviewed(d, "flaky")[-1].verdict == "" and "neither" in reviewed(d, "flaky")[-1].error
    assert [e.attempt for e in of_task(d.events, "flaky") if isinstance(e, TaskRetrying)] == [1, 3]
    d.tick(at=d.now + 600)
    d.run_task("flaky", ok=False, error="boom 5")
    assert reviewing(d, "flaky")[-1].then == "fail"
    d.run(d.take("flaky"), ok=False, error="model crashed")  # the review itself fails
    assert reviewed(d, "flaky")[-1].verdict == "" and "review failed" in reviewed(d, "flaky")[-1].error
    (failed,) = [e for e in of_task(d.events, "flaky") if isinstance(e, TaskFailed)]
    assert failed.attempt == 5 and failed.reason == "error" and failed.error == "boom 5"
    assert statuses(d.state) == {"flaky": FAILED, "next": FAILED}
    rec = d.state.tasks["p1.flaky"]
    assert [a.attempt for a in rec.attempts] == [1, 3, 5] and rec.reviews == 3 and not requests(d)
    assert_replays(d)


def test_a_review_in_flight_survives_a_restart() -> None:
    d = Driver(policy=Policy(review_model="judge"))
    d.submit(plan(task("build", retries=0), escalation=REVIEW))
    d.run_task("build", ok=False, error="boom")
    (item,) = d.work
    restored = Driver(state=reload(d.state, 60.0), now=d.now, policy=Policy(review_model="judge"))
    rec = restored.state.tasks["p1.build"]
    # what a restarted brain publishes again for a ready task: the same review item
    assert work_item(restored.state, rec, restored.policy.claim_key) == item
    assert restored.state.demand.get("llm:judge") == 1
    restored.run(item, stdout_tail="RETRY")
    assert reviewed(restored, "build")[0].verdict == "retry"
    assert statuses(restored.state) == {"build": FAILED}  # no retries left: failed for good
    d.events.extend(restored.events)
    assert snapshot(replay(d.events)) == snapshot(restored.state)


def test_no_review_without_the_plan_asking_for_a_sensitive_task_or_before_automatic_escalation() -> None:
    d = Driver(policy=Policy(review_model="judge"))
    d.submit(plan(task("plain", retries=0)))
    d.run_task("plain", ok=False)
    d.submit(plan(task("secret", retries=0, sensitive=True), escalation=REVIEW), plan_id="p2")
    d.run_task("secret", ok=False, plan_id="p2")
    assert not reviewing(d, "plain") and not reviewing(d, "secret")
    assert statuses(d.state) == {"plain": FAILED} and statuses(d.state, "p2") == {"secret": FAILED}
    # with automatic escalation too, the N-th failure escalates as before: no review first
    both = EscalationPolicy(review=True, auto=True, after=1)
    d.submit(plan(task("auto", retries=3), escalation=both), plan_id="p3")
    d.run_task("auto", ok=False, plan_id="p3")
    assert not reviewing(d, "auto") and requests(d)[-1].why == "local_failures"
    # no model to review with: the failure takes its course
    bare = Driver()
    bare.submit(plan(task("x", retries=0), escalation=REVIEW))
    bare.run_task("x", ok=False)
    assert not reviewing(bare, "x") and statuses(bare.state) == {"x": FAILED}
