"""A chain continued on one worker (`mesh.machine_step.continuations`): what a released task's
work item carries, what the brain decides from a report that says the next task started, and
what becomes of a continued task whose worker stops or dies. No server needed."""

from __future__ import annotations

from typing import Any

import msgspec

from mesh.bus.route import route
from mesh.claims import claim_of
from mesh.events import RunStarted, TaskReleased, TaskStarted, TaskSucceeded, WorkItem
from mesh.machine import Policy, Reconcile, Sweep, apply, replay
from mesh.names import Names
from mesh.records import READY, RUNNING, SUCCEEDED, WAITING
from tests.test_machine import Driver, of_task, plan, snapshot, statuses, task

KEY = b"k" * 32


def driver(**kw: Any) -> Driver:
    return Driver(Policy(release_window=4, retry_base_s=2.0, aging_s=60.0, claim_key=KEY, **kw))


def chain(n: int, **kw: Any) -> list[Any]:
    return [task(f"t{i}", *((f"t{i - 1}",) if i else ()), **kw) for i in range(n)]


def links(item: WorkItem | None) -> list[str]:
    out = []
    while item is not None:
        out.append(item.task_id)
        item = item.then
    return out


def continue_(d: Driver, item: WorkItem, worker: str = "w1", **kw: Any) -> Any:
    """Report `item` succeeded on `worker`, which started its `then`."""
    assert item.then is not None
    return d.finished(item, worker=worker, then=item.then.task_id, then_claim=item.then.claim, **kw)


def test_a_released_task_carries_the_chain_after_it_up_to_the_depth() -> None:
    d = driver(continue_depth=3)
    d.submit(plan(*chain(6)))
    item = d.take("t0")
    assert links(item) == ["t0", "t1", "t2", "t3"]
    then = item.then
    assert then is not None
    # each the attempt it gets when it is released, with that attempt's claim
    assert then.attempt == 1 and then.claim == claim_of(KEY, "p1", "t1", 1)
    assert then.claim != item.claim


def test_what_does_not_continue() -> None:
    cases = {
        "off": ({"continue_depth": 0}, chain(2)),
        "a model task": ({}, [task("t0"), task("t1", "t0", kind="prompt", cls="llm")]),
        "another class": ({}, [task("t0"), task("t1", "t0", cls="script")]),
        "lower priority": ({}, [task("t0", priority=5), task("t1", "t0", priority=4)]),
        "a dependency still to run": ({}, [task("t0"), task("x", priority=1), task("t1", "t0", "x")]),
        "files from the one before": ({}, [task("t0", artifacts=("*.txt",)), task("t1", "t0")]),
        "escalated": ({}, [task("t0"), task("t1", "t0", requires_external=True)]),
    }
    for why, (kw, tasks) in cases.items():
        d = driver(**kw)
        d.submit(plan(*tasks))
        assert d.take("t0").then is None, why


def test_nothing_continues_while_other_work_of_the_class_waits() -> None:
    d = driver()
    # five heads, a window of four: one head waits while the first four are released
    d.submit(plan(*chain(2), task("a"), task("b"), task("c"), task("e")))
    assert all(item.then is None for item in d.work)


def test_a_report_that_says_its_dependent_started_releases_it_to_that_worker() -> None:
    d = driver()
    d.submit(plan(*chain(3)))
    item = d.take("t0")
    d.started(item)
    step = continue_(d, item)
    ends = [e for e in step.events if isinstance(e, TaskSucceeded)]
    assert [e.then for e in ends] == ["t1"]
    released = of_task(step.events, "t1")
    assert [type(e) for e in released] == [TaskReleased, TaskStarted]
    assert released[0].worker == "w1" and released[1].worker == "w1"
    assert not step.work  # nothing queued for it
    rec = d.state.tasks["p1.t1"]
    assert (rec.status, rec.worker, rec.attempt, rec.continued) == (RUNNING, "w1", 1, True)
    # its own end, with its own claim, as any run's
    assert item.then is not None
    step = continue_(d, item.then)
    assert d.state.tasks["p1.t1"].status == SUCCEEDED
    assert d.state.tasks["p1.t2"].status == RUNNING
    assert item.then.then is not None
    d.finished(item.then.then)
    assert statuses(d.state) == {"t0": SUCCEEDED, "t1": SUCCEEDED, "t2": SUCCEEDED}
    assert snapshot(replay(d.events)) == snapshot(d.state)


def test_a_dependent_said_without_its_claim_is_queued_as_usual() -> None:
    d = driver()
    d.submit(plan(*chain(2)))
    item = d.take("t0")
    step = d.finished(item, then="t1", then_claim=claim_of(KEY, "p1", "t1", 2))
    assert d.state.tasks["p1.t0"].status == SUCCEEDED  # its own end stands
    assert [w.task_id for w in step.work] == ["t1"]
    assert d.state.tasks["p1.t1"].status == READY and not d.state.tasks["p1.t1"].continued
    assert any("without that attempt's claim" in n for n in step.notes)


def test_a_dependent_cancelled_meanwhile_is_not_released() -> None:
    d = driver()
    d.submit(plan(*chain(2)))
    item = d.take("t0")
    d.started(item)
    d.cancel()
    step = continue_(d, item)
    assert step.ignored  # the cancelled attempt's report is stale
    assert not of_task(step.events, "t1")


def test_a_continued_task_whose_worker_died_is_queued_again() -> None:
    d = driver()
    d.submit(plan(*chain(2)))
    d.feed(Sweep(live=frozenset({"w1"})))
    item = d.take("t0")
    continue_(d, item)
    assert item.then is not None
    # not at the first sweep that finds its registration gone (it can be missing a moment while
    # its worker runs on), but `requeue_after_s` (ack_wait_s) later, as a redelivery would be
    assert not d.feed(Sweep(live=frozenset())).work
    step = d.feed(Sweep(live=frozenset()), at=d.now + d.policy.requeue_after_s)
    # the same attempt (and claim), queued for any worker: not a failure, not a retry spent
    assert [(w.task_id, w.attempt, w.claim) for w in step.work] == [("t1", 1, item.then.claim)]
    rec = d.state.tasks["p1.t1"]
    assert (rec.status, rec.attempt, rec.continued) == (READY, 1, False)
    again = d.take("t1")
    d.started(again, worker="w2")
    d.finished(again, worker="w2")
    assert statuses(d.state) == {"t0": SUCCEEDED, "t1": SUCCEEDED}


def test_a_continued_task_handed_back_by_its_stopping_worker_is_queued_again() -> None:
    d = driver()
    d.submit(plan(*chain(2)))
    item = d.take("t0")
    continue_(d, item)
    assert item.then is not None
    step = d.finished(item.then, ok=False, cancelled=True, rc=None)
    assert [(w.task_id, w.attempt) for w in step.work] == [("t1", 1)]
    assert d.state.tasks["p1.t1"].status == READY


def test_a_history_cut_after_the_success_leaves_the_dependent_running_where_it_is() -> None:
    d = driver()
    d.submit(plan(*chain(2)))
    item = d.take("t0")
    step = continue_(d, item)
    cut = len(d.events) - len(step.events) + 1  # up to the success of t0, not t1's own events
    assert isinstance(d.events[cut - 1], TaskSucceeded)
    state = replay(d.events[:cut])
    rec = state.tasks["p1.t1"]
    assert (rec.status, rec.worker, rec.continued) == (RUNNING, "w1", True)
    again = apply(state, Reconcile(), d.now + 1, d.policy)
    assert not again.work  # not queued a second time


def test_a_later_report_of_the_task_before_changes_nothing() -> None:
    d = driver()
    d.submit(plan(*chain(2)))
    item = d.take("t0")
    continue_(d, item)
    before = snapshot(d.state)
    step = continue_(d, item)
    assert step.ignored and not step.events
    assert snapshot(d.state) == before
    assert msgspec.structs.asdict(d.state.tasks["p1.t1"])["status"] == RUNNING
    assert d.state.tasks["p1.t0"].status != WAITING


def test_the_facts_of_a_continued_attempt_and_its_requeue_have_ids_of_their_own() -> None:
    """The server drops a message whose `Nats-Msg-Id` it has seen: every fact of an attempt
    continued on w1, queued again and run on w2 must have an id no other fact shares."""
    d = driver()
    d.submit(plan(*chain(2)))
    d.feed(Sweep(live=frozenset({"w1"})))
    item = d.take("t0")
    d.started(item)
    continue_(d, item)
    d.feed(Sweep(live=frozenset()))
    d.feed(Sweep(live=frozenset()), at=d.now + d.policy.requeue_after_s)
    again = d.take("t1")
    d.started(again, worker="w2")
    d.finished(again, worker="w2")
    reports = [RunStarted(plan_id="p1", task_id="t1", attempt=1, worker=w, at=0.0) for w in ("w1", "w2")]
    ids = [route(Names(), ev)[1] for ev in [*d.events, *reports]]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert [type(e) for e in of_task(d.events, "t1")].count(TaskReleased) == 2
