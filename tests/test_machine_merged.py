"""Transitions stored as fewer events (`mesh.machine_step.Decision._merged`): a task's start
carried by its end when one report says both. The history is shorter and replays to the same
records; a history written the older way (one event per transition) still replays the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from mesh.events import (
    Msg,
    RunFinished,
    TaskFailed,
    TaskRetrying,
    TaskStarted,
    TaskSucceeded,
    decode,
    encode,
)
from mesh.machine import Policy, next_due, replay
from tests.test_machine import T0, Driver, assert_replays, check_history, of_task, plan, snapshot, task


def one_per_transition(history: Iterable[Msg | None]) -> list[Msg]:
    """The same history with one event per transition, as a brain that stored every transition
    as an event of its own wrote it: an end that carries its start is a `task.started`, then
    the end without it."""
    out: list[Msg] = []
    for ev in history:
        match ev:
            case None:
                continue
            case TaskSucceeded() | TaskRetrying() | TaskFailed() if ev.started_at:
                out.append(
                    TaskStarted(
                        plan_id=ev.plan_id,
                        task_id=ev.task_id,
                        attempt=ev.attempt,
                        worker=ev.worker,
                        at=ev.started_at,
                    )
                )
                out.append(msgspec.structs.replace(ev, started_at=0.0))
            case _:
                out.append(ev)
    return out


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
    check_history(d.events, d.policy.release_window)
    assert_replays(d)


def test_a_history_with_separate_starts_replays_the_same() -> None:
    d = Driver(Policy(release_window=2, retry_base_s=1.0, retry_max_s=4.0))
    d.submit(plan(*(task(f"t{i}", retries=1) for i in range(6)), task("z", "t0", "t5")), at=T0)
    short_runs(d, fail=frozenset({"t3"}))
    old = one_per_transition(d.events)
    assert len(old) > len(d.events)
    assert any(isinstance(e, TaskStarted) for e in old)
    check_history(old, d.policy.release_window)
    wired = [decode(encode(e)) for e in old]
    assert snapshot(replay(wired, aging_s=d.policy.aging_s)) == snapshot(d.state)
    # and an old event (no `started_at` at all on the wire) still decodes, as a plain end
    end = next(e for e in d.events if isinstance(e, TaskSucceeded))
    raw = msgspec.json.decode(encode(end))
    assert raw.pop("started_at") == end.started_at > 0
    assert decode(msgspec.json.encode(raw)) == msgspec.structs.replace(end, started_at=0.0)
