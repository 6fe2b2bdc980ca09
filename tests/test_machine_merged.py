"""Transitions stored as fewer events: a task's start carried by its end when one report says
both, and its waiting by its release when one step decides both
(`mesh.machine_step.Decision._merged`); the waiting of a task that depends on nothing carried by
the event that adds it (`mesh.machine_state._add_tasks`). The history is shorter and
replays to the same records; a history written the older way (one event per transition) still
replays the same.
"""

from __future__ import annotations

import msgspec

from mesh.events import (
    PlanAccepted,
    PlanFinished,
    PlanTasks,
    RunFinished,
    TaskFailed,
    TaskReleased,
    TaskRetrying,
    TaskStarted,
    TaskSucceeded,
    TaskWaiting,
    decode,
    encode,
)
from mesh.machine import Policy, State, next_due, replay
from mesh.records import PENDING, READY, SUCCEEDED, WAITING
from tests.test_machine import (
    T0,
    Driver,
    assert_replays,
    check_history,
    kinds,
    of_task,
    one_per_transition,
    plan,
    released_ids,
    snapshot,
    task,
)


def short_runs(d: Driver, fail: frozenset[str] = frozenset()) -> None:
    """Run every work item as a task too short to report its start: one `run.finished` each."""
    for _ in range(10_000):
        if d.work:
            item = d.work.pop(0)
            d.feed(
                RunFinished(
                    plan_id=item.plan_id,
                    task_id=item.task_id,
                    attempt=item.attempt,
                    worker="w1",
                    at=0.0,
                    ok=item.task_id not in fail,
                    rc=1 if item.task_id in fail else 0,
                    duration_s=0.01,
                    started_at=d.now,
                    claim=item.claim,
                )
            )
            continue
        due = next_due(d.state)
        if due is None:
            return
        d.tick(at=max(due, d.now))
    raise AssertionError("did not settle")


def test_a_short_task_stores_no_start_of_its_own() -> None:
    d = Driver()
    d.submit(plan(task("a"), task("b", "a"), task("c", retries=1)), at=T0)
    short_runs(d, fail=frozenset({"c"}))
    assert not [e for e in d.events if isinstance(e, TaskStarted)]
    ends = [e for e in of_task(d.events, "c") if isinstance(e, TaskRetrying | TaskFailed)]
    assert [type(e) for e in ends] == [TaskRetrying, TaskFailed]
    assert all(e.started_at and e.worker == "w1" for e in ends)
    for tid in "abc":
        rec = d.state.tasks[f"p1.{tid}"]
        assert rec.deliveries == 1 and rec.worker == "w1" and rec.started_at > 0
    check_history(d.events, d.policy.release_window, d.policy.pack_size)
    assert_replays(d)


def test_a_history_with_separate_starts_replays_the_same() -> None:
    d = Driver(Policy(release_window=2, retry_base_s=1.0, retry_max_s=4.0))
    d.submit(plan(*(task(f"t{i}", retries=1) for i in range(6)), task("z", "t0", "t5")), at=T0)
    short_runs(d, fail=frozenset({"t3"}))
    old = one_per_transition(d.events)
    assert len(old) > len(d.events)
    assert any(isinstance(e, TaskStarted) for e in old)
    check_history(old, d.policy.release_window, d.policy.pack_size)
    wired = [decode(encode(e)) for e in old]
    assert snapshot(replay(wired, aging_s=d.policy.aging_s)) == snapshot(d.state)
    # and an old event (no `started_at` at all on the wire) still decodes, as a plain end
    end = next(e for e in d.events if isinstance(e, TaskSucceeded))
    raw = msgspec.json.decode(encode(end))
    assert raw.pop("started_at") == end.started_at > 0
    assert decode(msgspec.json.encode(raw)) == msgspec.structs.replace(end, started_at=0.0)


def queued(state: State) -> int:
    return sum(len(heap) for heap in state.queue.values())


def test_an_acceptance_stands_for_the_waiting_of_tasks_that_depend_on_nothing() -> None:
    # a plan cut into several parts, more tasks than the release window
    d = Driver(Policy(release_window=2, part_bytes=1024))
    spec = plan(*(task(f"t{i:02d}") for i in range(30)), task("join", *(f"t{i:02d}" for i in range(30))))
    step = d.submit(spec, at=T0)
    assert PlanTasks in kinds(step.events)
    assert TaskWaiting not in kinds(step.events)
    assert kinds(step.events)[-2:] == [TaskReleased, TaskReleased]
    waiting = [r for r in d.state.plan_tasks("p1") if r.status == WAITING]
    assert len(waiting) == 28 and {(r.waiting_since, r.updated_at, r.not_before) for r in waiting} == {
        (T0, T0, 0.0)
    }
    assert d.state.tasks["p1.join"].status == PENDING
    assert d.state.plans["p1"].counts == {READY: 2, WAITING: 28, PENDING: 1}
    assert queued(d.state) == 28, "each waiting task is queued once"
    # the same records from the history, and from the history of a brain that stored each
    # task's waiting (folded after the acceptance that now stands for it: a fold that changes
    # nothing, and queues nothing twice)
    new, old = replay(d.events, aging_s=60.0), replay(one_per_transition(d.events), aging_s=60.0)
    assert snapshot(new) == snapshot(old) == snapshot(d.state)
    assert queued(new) == queued(old) == 30
    d.drain()
    assert d.state.plans["p1"].status == SUCCEEDED
    check_history(d.events, d.policy.release_window, d.policy.pack_size)
    assert_replays(d)
    assert snapshot(replay(one_per_transition(d.events), aging_s=60.0)) == snapshot(d.state)
    # the tasks were released in plan order, as they were queued
    assert [e.task_id for e in d.events if isinstance(e, TaskReleased)][:30] == [
        f"t{i:02d}" for i in range(30)
    ]


def test_a_brain_on_an_older_history_goes_on_the_same() -> None:
    """A brain that replays a history written with a `task.waiting` per task, then decides on:
    the same releases, the same records, as from the history written now."""
    spec = plan(*(task(f"t{i}") for i in range(8)))
    d = Driver(Policy(release_window=3))
    d.submit(spec, at=T0)
    a, b = (
        Driver(Policy(release_window=3), state=replay(h, aging_s=60.0), now=d.now)
        for h in (d.events, one_per_transition(d.events))
    )
    for x in (a, b):
        x.work = list(d.work)
        x.drain()
    assert snapshot(a.state) == snapshot(b.state)
    assert [type(e) for e in a.events] == [type(e) for e in b.events]
    assert released_ids(a.events) == released_ids(b.events) == [f"t{i}" for i in range(3, 8)]


def test_a_chained_no_op_task_stores_two_transition_events() -> None:
    """Each task of a chain: released (carrying its waiting: woken and released by its parent's
    report), then succeeded (carrying its start). With the worker's `run.finished`, three
    stored events a task; before, five."""
    n = 12
    d = Driver(Policy(release_window=4))
    d.submit(plan(task("t0"), *(task(f"t{i}", f"t{i - 1}") for i in range(1, n))), at=T0)
    short_runs(d)
    assert d.state.plans["p1"].status == SUCCEEDED
    assert kinds(d.events) == [PlanAccepted] + [TaskReleased, TaskSucceeded] * n + [PlanFinished]
    released = [e for e in d.events if isinstance(e, TaskReleased)]
    assert released[0].waited_at == 0.0, "t0 waits from its acceptance"
    assert all(e.waited_at == e.at for e in released[1:])
    for i in range(1, n):
        rec = d.state.tasks[f"p1.t{i}"]
        assert rec.waiting_since == rec.released_at == d.state.tasks[f"p1.t{i - 1}"].finished_at
    check_history(d.events, d.policy.release_window, d.policy.pack_size)
    assert_replays(d)
    every = one_per_transition(d.events)
    assert len(every) == 2 + 4 * n
    check_history(every, d.policy.release_window, d.policy.pack_size)
    assert snapshot(replay([decode(encode(e)) for e in every], aging_s=60.0)) == snapshot(d.state)


def test_a_task_woken_but_not_released_in_the_same_step_keeps_its_waiting() -> None:
    # one slot: the dependent woken by `a` waits behind `x`, which waited longer
    d = Driver(Policy(release_window=1))
    d.submit(plan(task("a"), task("x"), task("b", "a")), at=T0)
    step = d.finished(d.take("a"), started_at=1.0)
    assert kinds(step.events) == [TaskSucceeded, TaskWaiting, TaskReleased]
    assert [getattr(e, "task_id", "") for e in step.events] == ["a", "b", "x"]
    assert isinstance(step.events[2], TaskReleased) and step.events[2].waited_at == 0.0
    d.run_task("x")
    later = of_task(d.events, "b")
    assert kinds(later) == [TaskWaiting, TaskReleased]
    assert isinstance(later[1], TaskReleased) and later[1].waited_at == 0.0
    short_runs(d)
    check_history(d.events, d.policy.release_window, d.policy.pack_size)
    assert_replays(d)


def test_a_release_that_carries_its_waiting_decodes_and_replays_without_the_waiting_on_the_wire() -> None:
    """An older reader sees `waited_at` as a field it does not know; an older event (without the
    field) decodes as a release that carries nothing."""
    ev = TaskReleased(plan_id="p1", task_id="b", attempt=1, at=5.0, waited_at=5.0)
    raw = msgspec.json.decode(encode(ev))
    assert raw["waited_at"] == 5.0 and raw["type"] == "task.released"
    raw.pop("waited_at")
    assert decode(msgspec.json.encode(raw)) == msgspec.structs.replace(ev, waited_at=0.0)
