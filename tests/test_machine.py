"""Unit tests for the brain's pure state machine (`mesh.machine`), no server needed.

A small `Driver` submits plans through `apply` and plays the worker: it takes the
released work items and answers them with `RunStarted`/`RunFinished` reports at
controlled clock values.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mesh.claims import claim_of
from mesh.events import (
    PACK_CLASSES,
    CancelPlan,
    Msg,
    PlanAccepted,
    PlanFinished,
    PlanRejected,
    PlanSpec,
    PlanTasks,
    RunFinished,
    RunStarted,
    SubmitPlan,
    TaskCancelled,
    TaskFailed,
    TaskFollowups,
    TaskReleased,
    TaskRetrying,
    TaskSpec,
    TaskStarted,
    TaskSucceeded,
    TaskWaiting,
    WorkItem,
    decode,
    encode,
)
from mesh.machine import (
    MAX_ERROR_CHARS,
    Policy,
    State,
    Step,
    Tick,
    apply,
    backoff_s,
    evolve,
    next_due,
    replay,
    validate_plan,
)
from mesh.records import (
    CANCELLED,
    FAILED,
    PENDING,
    PLAN_REJECTED,
    PLAN_RUNNING,
    READY,
    RUNNING,
    SUCCEEDED,
    WAITING,
    PlanRecord,
    TaskRecord,
)

T0 = 1_000.0
TASK_EVENTS = (TaskWaiting, TaskReleased, TaskStarted, TaskSucceeded, TaskRetrying, TaskFailed, TaskCancelled)


# ------------------------------------------------------------------ helpers


def task(tid: str, *deps: str, **kw: Any) -> TaskSpec:
    return TaskSpec(id=tid, body=f"echo {tid}", depends_on=tuple(deps), **kw)


def plan(*tasks: TaskSpec, title: str = "test plan", **kw: Any) -> PlanSpec:
    return PlanSpec(title=title, tasks=tuple(tasks), **kw)


def statuses(state: State, plan_id: str = "p1") -> dict[str, str]:
    return {rec.task_id: rec.status for rec in state.plan_tasks(plan_id)}


def snapshot(state: State) -> tuple[dict[str, Any], dict[str, Any]]:
    """The records of a state as plain data, for readable equality diffs."""
    tasks = {k: msgspec.to_builtins(v) for k, v in sorted(state.tasks.items())}
    plans = {k: msgspec.to_builtins(v) for k, v in sorted(state.plans.items())}
    return tasks, plans


def copy_records(state: State) -> tuple[list[TaskRecord], list[PlanRecord]]:
    """Deep copies of the records, as the brain reads them back from KV."""
    tasks = [msgspec.json.decode(msgspec.json.encode(r), type=TaskRecord) for r in state.tasks.values()]
    plans = [msgspec.json.decode(msgspec.json.encode(p), type=PlanRecord) for p in state.plans.values()]
    return tasks, plans


def reload(state: State, aging_s: float) -> State:
    tasks, plans = copy_records(state)
    return State.load(tasks, plans, aging_s=aging_s)


def of_task(events: Iterable[Msg], task_id: str, plan_id: str = "p1") -> list[Msg]:
    return [
        e for e in events if getattr(e, "task_id", None) == task_id and getattr(e, "plan_id", None) == plan_id
    ]


def kinds(events: Iterable[Msg]) -> list[type]:
    return [type(e) for e in events]


def one_per_transition(history: Iterable[Msg | None]) -> list[Msg]:
    """The same history with one event per transition, as a brain that stored every transition
    as an event of its own wrote it: an event that adds tasks is followed by a `task.waiting`
    for each that depends on nothing; a release that carries its waiting is a `task.waiting`,
    then the release without it; an end that carries its start is a `task.started`, then the
    end without it."""
    out: list[Msg] = []
    for ev in history:
        match ev:
            case None:
                continue
            case PlanAccepted() | PlanTasks() | TaskFollowups():
                out.append(ev)
                specs = ev.plan.tasks if isinstance(ev, PlanAccepted) else ev.tasks
                out.extend(
                    TaskWaiting(plan_id=ev.plan_id, task_id=t.id, at=ev.at) for t in specs if not t.depends_on
                )
            case TaskReleased() if ev.waited_at:
                out.append(TaskWaiting(plan_id=ev.plan_id, task_id=ev.task_id, at=ev.waited_at))
                out.append(msgspec.structs.replace(ev, waited_at=0.0))
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
                out.extend(one_per_transition([msgspec.structs.replace(ev, started_at=0.0)]))
            case TaskSucceeded() if ev.then:
                # the dependent it continued with: waiting now (its release to the worker and its
                # start are events of their own, next)
                out.append(msgspec.structs.replace(ev, then=""))
                out.append(TaskWaiting(plan_id=ev.plan_id, task_id=ev.then, at=ev.at))
            case _:
                out.append(ev)
    return out


def released_ids(events: Iterable[Msg]) -> list[str]:
    return [e.task_id for e in events if isinstance(e, TaskReleased)]


class Driver:
    """Feeds inputs to `apply` and plays the worker. Each input advances the clock by 1s unless
    `at` is given. Every step's events and work items are collected."""

    def __init__(self, policy: Policy | None = None, state: State | None = None, now: float = T0) -> None:
        self.policy = policy or Policy(release_window=4, retry_base_s=2.0, retry_max_s=30.0, aging_s=60.0)
        self.state = state if state is not None else State(aging_s=self.policy.aging_s)
        self.now = now
        self.events: list[Msg] = []
        self.work: list[WorkItem] = []
        self.steps: list[Step] = []

    # inputs ------------------------------------------------------------------
    def feed(self, msg: Any, at: float | None = None) -> Step:
        self.now = self.now + 1.0 if at is None else at
        step = apply(self.state, msg, self.now, self.policy)
        self.steps.append(step)
        self.events.extend(step.events)
        self.work.extend(step.work)
        return step

    def submit(self, spec: PlanSpec, plan_id: str = "p1", at: float | None = None) -> Step:
        return self.feed(SubmitPlan(plan_id=plan_id, plan=spec, at=self.now, by="tester"), at)

    def cancel(self, plan_id: str = "p1", reason: str = "stop it", at: float | None = None) -> Step:
        return self.feed(CancelPlan(plan_id=plan_id, at=self.now, reason=reason), at)

    def tick(self, at: float | None = None) -> Step:
        return self.feed(Tick(), at)

    # playing the worker ------------------------------------------------------
    def take(self, task_id: str, plan_id: str = "p1") -> WorkItem:
        for i, item in enumerate(self.work):
            if item.task_id == task_id and item.plan_id == plan_id:
                return self.work.pop(i)
        raise AssertionError(f"no work item for {plan_id}.{task_id}: {[w.task_id for w in self.work]}")

    def started(self, item: WorkItem, worker: str = "w1", at: float | None = None) -> Step:
        return self.feed(
            RunStarted(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=worker,
                at=0.0,
                claim=item.claim,
            ),
            at,
        )

    def finished(
        self,
        item: WorkItem,
        ok: bool = True,
        worker: str = "w1",
        at: float | None = None,
        **kw: Any,
    ) -> Step:
        kw.setdefault("rc", 0 if ok else 1)
        kw.setdefault("claim", item.claim)
        msg = RunFinished(
            plan_id=item.plan_id,
            task_id=item.task_id,
            attempt=item.attempt,
            worker=worker,
            at=0.0,
            ok=ok,
            duration_s=0.5,
            **kw,
        )
        return self.feed(msg, at)

    def run(self, item: WorkItem, ok: bool = True, **kw: Any) -> Step:
        """Start and finish one work item; returns the finishing step."""
        self.started(item)
        return self.finished(item, ok=ok, **kw)

    def run_task(self, task_id: str, ok: bool = True, plan_id: str = "p1", **kw: Any) -> Step:
        return self.run(self.take(task_id, plan_id), ok=ok, **kw)

    def drain(self, outcome: Callable[[WorkItem], bool] = lambda item: True, limit: int = 1_000_000) -> None:
        """Run work items in queue order, ticking past backoffs, until nothing is left to do."""
        for _ in range(limit):
            if self.work:
                item = self.work.pop(0)
                self.run(item, ok=outcome(item))
                continue
            due = next_due(self.state)
            if due is None:
                return
            self.tick(at=max(due, self.now))
        raise AssertionError("driver did not settle")


def check_history(events: list[Msg], window: int, pack_size: int = 1) -> None:
    """Walk an event history with an independent shadow model and check every transition is legal.
    Queued no-op tasks of a class that packs take the release window `pack_size` to one, by the
    packs they fill."""
    packed_now: set[tuple[str, str]] = set()
    packed_inflight: Counter[str] = Counter()
    status: dict[tuple[str, str], str] = {}
    attempts: Counter[tuple[str, str]] = Counter()
    successes: Counter[tuple[str, str]] = Counter()
    retry_at: dict[tuple[str, str], float] = {}
    inflight: Counter[str] = Counter()
    spec_of: dict[tuple[str, str], TaskSpec] = {}
    finished: Counter[str] = Counter()
    # tasks a success continued on its worker (`then`): their own release and start follow
    echoes: dict[tuple[str, str], list[type]] = {}
    continued: set[tuple[str, str]] = set()
    continued_by: dict[tuple[str, str], str] = {}
    for ev in events:
        if isinstance(ev, PlanAccepted | PlanTasks):
            for t in ev.plan.tasks if isinstance(ev, PlanAccepted) else ev.tasks:
                # a task that depends on nothing waits from its acceptance on
                status[(ev.plan_id, t.id)] = PENDING if t.depends_on else WAITING
                spec_of[(ev.plan_id, t.id)] = t
            continue
        if isinstance(ev, PlanFinished):
            finished[ev.plan_id] += 1
            own = {k: s for k, s in status.items() if k[0] == ev.plan_id}
            assert all(s in (SUCCEEDED, FAILED, CANCELLED) for s in own.values()), own
            assert ev.counts == dict(Counter(own.values()))
            continue
        if isinstance(ev, PlanRejected):
            continue
        assert isinstance(ev, TASK_EVENTS), ev
        key = (ev.plan_id, ev.task_id)
        spec = spec_of[key]
        old = status[key]
        deps_ok = all(status[(ev.plan_id, d)] == SUCCEEDED for d in spec.depends_on)
        assert finished[ev.plan_id] == 0, f"{ev} after its plan finished"
        if echoes.get(key):
            # the continued task's own release (to the worker) and start, folded already
            assert type(ev) is echoes[key].pop(0) and ev.attempt == attempts[key], ev
            assert getattr(ev, "worker", "") == continued_by[key], ev
            continue
        if isinstance(ev, TaskReleased) and old == RUNNING and key in continued:
            # a continued run its worker gave back or was lost with: the same attempt, queued
            assert ev.attempt == attempts[key] and not ev.worker, (ev, old)
            continued.discard(key)
            status[key] = READY
            continue
        if isinstance(ev, TaskWaiting):
            # (or, in a history of a brain that stored it, the waiting its acceptance stands for)
            first = old == WAITING and not spec.depends_on and attempts[key] == 0
            assert (old == PENDING or first) and deps_ok, (ev, old)
            new = WAITING
        elif isinstance(ev, TaskReleased):
            # (a release that carries its task's waiting comes right after the dependencies)
            assert old == (PENDING if ev.waited_at else WAITING) and deps_ok, (ev, old)
            assert ev.attempt == attempts[key] + 1
            assert ev.at >= retry_at.get(key, 0.0), "released before its retry_at"
            in_packs = packed_inflight[spec.cls]
            used = inflight[spec.cls] - in_packs + in_packs // pack_size
            assert used < window, "release window exceeded"
            attempts[key] = ev.attempt
            if spec.kind == "noop" and spec.cls in PACK_CLASSES and not ev.worker:
                packed_now.add(key)
                packed_inflight[spec.cls] += 1
            assert attempts[key] <= spec.retries + 1, "released more than retries+1 times"
            new = READY
        elif isinstance(ev, TaskStarted):
            assert old == READY and ev.attempt == attempts[key], (ev, old)
            new = RUNNING
        elif isinstance(ev, TaskSucceeded):
            assert old in (READY, RUNNING) and ev.attempt == attempts[key], (ev, old)
            successes[key] += 1
            new = SUCCEEDED
            if ev.then:
                # the dependent it continued with: pending, its last dependency this one
                nxt = (ev.plan_id, ev.then)
                assert status[nxt] == PENDING and ev.task_id in spec_of[nxt].depends_on, (ev, status[nxt])
                others = [d for d in spec_of[nxt].depends_on if d != ev.task_id]
                assert all(status[(ev.plan_id, d)] == SUCCEEDED for d in others), ev
                assert spec_of[nxt].cls == spec.cls, ev
                attempts[nxt] += 1
                assert attempts[nxt] <= spec_of[nxt].retries + 1
                status[nxt] = RUNNING
                inflight[spec.cls] += 1
                continued.add(nxt)
                continued_by[nxt] = ev.worker
                echoes[nxt] = [TaskReleased, TaskStarted]
        elif isinstance(ev, TaskRetrying):
            assert old in (READY, RUNNING) and ev.attempt == attempts[key] <= spec.retries, (ev, old)
            assert ev.retry_at > ev.at
            retry_at[key] = ev.retry_at
            new = WAITING
        elif isinstance(ev, TaskFailed):
            if ev.reason == "dependency":
                assert old == PENDING, (ev, old)
            else:
                assert old in (READY, RUNNING) and ev.attempt == attempts[key] == spec.retries + 1, (ev, old)
            new = FAILED
        else:
            assert old not in (SUCCEEDED, FAILED, CANCELLED), (ev, old)
            new = CANCELLED
        if old in (READY, RUNNING):
            inflight[spec.cls] -= 1
            if key in packed_now and new not in (READY, RUNNING):
                packed_now.discard(key)
                packed_inflight[spec.cls] -= 1
        if new in (READY, RUNNING):
            inflight[spec.cls] += 1
        status[key] = new
    assert all(n <= 1 for n in successes.values()), successes
    assert all(n <= 1 for n in finished.values()), finished
    assert set(finished) <= {k[0] for k in status}


def assert_replays(d: Driver, through_wire: bool = True) -> State:
    """Folding every event of the run gives exactly the live records."""
    history = [decode(encode(e)) for e in d.events] if through_wire else list(d.events)
    rebuilt = replay(history, aging_s=d.policy.aging_s)
    assert snapshot(rebuilt) == snapshot(d.state)
    assert rebuilt.tasks == d.state.tasks
    assert rebuilt.plans == d.state.plans
    return rebuilt


DIAMOND = plan(task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c"), workdir="/srv/x")


# ------------------------------------------------------------------ 1. diamond


def test_diamond_runs_in_dependency_order() -> None:
    d = Driver()
    step = d.submit(DIAMOND)
    assert not step.ignored
    # (the acceptance stands for `a`'s waiting: it depends on nothing)
    assert kinds(step.events) == [PlanAccepted, TaskReleased]
    assert [w.task_id for w in step.work] == ["a"]
    item = step.work[0]
    assert (item.plan_id, item.attempt, item.cls, item.body) == ("p1", 1, "cpu", "echo a")
    assert item.workdir == "/srv/x"
    assert statuses(d.state) == {"a": READY, "b": PENDING, "c": PENDING, "d": PENDING}
    assert d.state.plans["p1"].counts == {READY: 1, PENDING: 3}

    a = d.take("a")
    step = d.started(a, worker="w7")
    assert kinds(step.events) == [TaskStarted] and step.work == []
    assert d.state.tasks["p1.a"].status == RUNNING and d.state.tasks["p1.a"].worker == "w7"

    step = d.finished(a, worker="w7")
    # b and c wait and are released in this step: each `task.released` carries the waiting
    assert kinds(step.events) == [TaskSucceeded, TaskReleased, TaskReleased]
    assert [getattr(e, "waited_at", None) for e in step.events[1:]] == [d.now, d.now]
    assert d.state.tasks["p1.b"].waiting_since == d.now
    assert sorted(w.task_id for w in step.work) == ["b", "c"]
    assert statuses(d.state) == {"a": SUCCEEDED, "b": READY, "c": READY, "d": PENDING}

    step = d.run_task("b")
    assert kinds(step.events) == [TaskSucceeded]
    assert step.work == [] and d.state.tasks["p1.d"].status == PENDING

    step = d.run_task("c")
    assert kinds(step.events) == [TaskSucceeded, TaskReleased]
    assert [w.task_id for w in step.work] == ["d"]

    step = d.run_task("d")
    assert kinds(step.events) == [TaskSucceeded, PlanFinished]
    fin = step.events[-1]
    assert isinstance(fin, PlanFinished)
    assert (fin.status, fin.counts, fin.at) == (SUCCEEDED, {SUCCEEDED: 4}, d.now)

    pl = d.state.plans["p1"]
    assert pl.status == SUCCEEDED and pl.final and pl.finished_at == d.now and pl.done == pl.total == 4
    assert all(rec.status == SUCCEEDED and rec.attempt == 1 for rec in d.state.plan_tasks("p1"))

    # every transition of every task is in the history, in order: some carried by another event
    for tid in "abcd":
        every = of_task(one_per_transition(d.events), tid)
        assert kinds(every) == [TaskWaiting, TaskReleased, TaskStarted, TaskSucceeded]
    for tid in "abcd":
        assert kinds(of_task(d.events, tid)) == [TaskReleased, TaskStarted, TaskSucceeded]
    pos = {(type(e), getattr(e, "task_id", "")): i for i, e in enumerate(d.events)}
    assert pos[(TaskReleased, "d")] > pos[(TaskSucceeded, "b")]
    assert pos[(TaskReleased, "d")] > pos[(TaskSucceeded, "c")]
    assert pos[(TaskReleased, "b")] > pos[(TaskSucceeded, "a")]
    assert released_ids(d.events) == ["a", "b", "c", "d"]
    check_history(d.events, d.policy.release_window, d.policy.pack_size)
    assert_replays(d)

    # nothing more happens once the plan is finished
    assert d.tick().events == []


def test_diamond_records_carry_report_details() -> None:
    d = Driver()
    d.submit(plan(task("a", env={"K": "V"}, timeout_s=12.0, sensitive=True, cls="script")), at=T0)
    item = d.take("a")
    assert (item.env, item.timeout_s, item.sensitive, item.cls) == ({"K": "V"}, 12.0, True, "script")
    d.started(item, worker="box-3", at=T0 + 5)
    d.finished(item, worker="box-3", at=T0 + 9, rc=0)
    rec = d.state.tasks["p1.a"]
    assert (rec.worker, rec.released_at, rec.started_at, rec.finished_at) == ("box-3", T0, T0 + 5, T0 + 9)
    assert (rec.duration_s, rec.rc, rec.reason, rec.error) == (0.5, 0, "", "")
    pl = d.state.plans["p1"]
    assert (pl.by, pl.submitted_at, pl.accepted_at, pl.title) == ("tester", T0, T0, "test plan")


def test_a_short_task_reports_its_start_with_its_end() -> None:
    # a worker holds `run.started` back; a task done sooner carries `started_at` in its one report
    d = Driver()
    d.submit(plan(task("a"), task("b", "a"), task("c", retries=1)), at=T0)
    a = d.take("a")
    step = d.finished(a, worker="w4", at=T0 + 2, started_at=T0 + 1.99)
    # both transitions in one event: the end, saying the attempt started with it
    assert kinds(step.events) == [TaskSucceeded, TaskReleased]
    done = step.events[0]
    assert isinstance(done, TaskSucceeded) and (done.started_at, done.worker) == (T0 + 2, "w4")
    assert [w.task_id for w in step.work] == ["b"]
    rec = d.state.tasks["p1.a"]
    assert (rec.status, rec.worker, rec.started_at, rec.finished_at) == (SUCCEEDED, "w4", T0 + 2, T0 + 2)
    assert rec.deliveries == 1
    # the same for a failure, which retries as any other
    c = d.take("c")
    step = d.finished(c, ok=False, worker="w4", started_at=d.now)
    assert kinds(step.events)[:1] == [TaskRetrying]
    retrying = step.events[0]
    assert isinstance(retrying, TaskRetrying) and retrying.started_at == d.now
    assert d.state.tasks["p1.c"].deliveries == 1
    # and one that fails for good
    due = next_due(d.state)
    assert due is not None
    d.tick(at=due)
    c = d.take("c")
    step = d.finished(c, ok=False, worker="w5", started_at=d.now)
    assert kinds(step.events)[:1] == [TaskFailed]
    failed = step.events[0]
    assert isinstance(failed, TaskFailed) and (failed.started_at, failed.worker) == (d.now, "w5")
    # the late report of a start already recorded is ignored
    assert_ignored(d.started(a, worker="w4"))
    check_history(d.events, d.policy.release_window, d.policy.pack_size)
    assert_replays(d)


def test_a_report_without_a_start_records_no_start() -> None:
    # a dead-lettered item never started: its failure is not a start
    d = Driver()
    d.submit(plan(task("a", retries=0)))
    a = d.take("a")
    step = d.finished(a, ok=False, dead_letter=True)
    assert kinds(step.events)[0] is TaskFailed
    assert d.state.tasks["p1.a"].reason == "dead_letter"
    assert_replays(d)


def test_take_dirty_returns_changed_records_once() -> None:
    d = Driver()
    d.submit(DIAMOND)
    tasks, plans = d.state.take_dirty()
    assert [t.task_id for t in tasks] == ["a", "b", "c", "d"] and [p.plan_id for p in plans] == ["p1"]
    assert d.state.take_dirty() == ([], [])
    d.started(d.take("a"))
    tasks, plans = d.state.take_dirty()
    assert [t.task_id for t in tasks] == ["a"] and [p.plan_id for p in plans] == ["p1"]


# ------------------------------------------------------------------ 2. priority and aging


def test_priority_orders_releases_within_a_class() -> None:
    d = Driver(Policy(release_window=1, aging_s=10.0))
    spec = plan(
        task("low", priority=1),
        task("mid", priority=5),
        task("high", priority=9),
        task("mid2", priority=5),
        task("top", priority=9),
    )
    d.submit(spec)
    order = []
    while d.work:
        assert len(d.work) == 1
        item = d.work[0]
        order.append(item.task_id)
        d.run_task(item.task_id)
    # highest priority first; equal priorities in submission order
    assert order == ["high", "top", "mid", "mid2", "low"]
    assert d.state.plans["p1"].status == SUCCEEDED


@pytest.mark.parametrize("gap", [30.0, 79.0, 81.0, 200.0])
def test_aging_lets_an_old_low_priority_task_overtake(gap: float) -> None:
    aging = 10.0
    d = Driver(Policy(release_window=1, aging_s=aging))
    d.submit(plan(task("hold", priority=9), task("old", priority=1)), plan_id="p1", at=T0)
    assert [w.task_id for w in d.work] == ["hold"]
    d.submit(plan(task("new", priority=9)), plan_id="p2", at=T0 + gap)
    assert [w.task_id for w in d.work] == ["hold"]

    # the rule: virtual time = waiting_since - priority * aging_s, smallest first
    vt_old = T0 - 1 * aging
    vt_new = (T0 + gap) - 9 * aging
    expected = ["old", "new"] if vt_old < vt_new else ["new", "old"]

    d.run(d.work.pop(0), ok=True)
    order = []
    while d.work:
        assert len(d.work) == 1
        item = d.work.pop(0)
        order.append(item.task_id)
        d.run(item)
    assert order == expected
    assert d.state.plans["p1"].status == d.state.plans["p2"].status == SUCCEEDED


def test_retried_task_ages_from_its_retry_time() -> None:
    d = Driver(Policy(release_window=1, aging_s=10.0, retry_base_s=4.0, retry_max_s=4.0))
    d.submit(plan(task("flaky", priority=5, retries=1), task("hold", priority=1)))
    d.run_task("flaky", ok=False)
    retry = d.state.tasks["p1.flaky"]
    assert retry.status == WAITING and retry.waiting_since == retry.not_before > d.now
    # while it backs off, the free slot goes to the lower-priority task
    assert [w.task_id for w in d.work] == ["hold"]
    d.tick(at=retry.not_before)
    assert [w.task_id for w in d.work] == ["hold"]
    d.run_task("hold")
    assert [(w.task_id, w.attempt) for w in d.work] == [("flaky", 2)]


# ------------------------------------------------------------------ 3. release window


def test_release_window_caps_ready_and_running_per_class() -> None:
    d = Driver(Policy(release_window=2))
    spec = plan(*(task(f"c{i}") for i in range(5)), *(task(f"s{i}", cls="script") for i in range(3)))
    step = d.submit(spec)
    assert [w.task_id for w in step.work] == ["c0", "c1", "s0", "s1"]
    assert statuses(d.state)["c2"] == WAITING and statuses(d.state)["s2"] == WAITING

    # starting does not free a slot: ready and running both count
    step = d.started(d.take("c0"))
    assert step.work == []
    # finishing a cpu task frees a cpu slot only
    step = d.finished(next(w for w in d.steps[0].work if w.task_id == "c0"))
    assert [w.task_id for w in step.work] == ["c2"]
    # a failing script task without retries frees a script slot
    step = d.run_task("s0", ok=True)
    assert [w.task_id for w in step.work] == ["s2"]

    def inflight(cls: str) -> int:
        return sum(1 for r in d.state.tasks.values() if r.spec.cls == cls and r.status in (READY, RUNNING))

    while d.work:
        assert inflight("cpu") <= 2 and inflight("script") <= 2
        d.run(d.work.pop(0))
    assert d.state.plans["p1"].status == SUCCEEDED
    check_history(d.events, 2, d.policy.pack_size)


def test_release_window_is_shared_between_plans() -> None:
    d = Driver(Policy(release_window=2))
    d.submit(plan(task("a"), task("b"), task("c")), plan_id="p1")
    d.submit(plan(task("x"), task("y", cls="script")), plan_id="p2")
    # the cpu class is full: only the script task of p2 goes out
    assert [(w.plan_id, w.task_id) for w in d.work] == [("p1", "a"), ("p1", "b"), ("p2", "y")]
    step = d.run_task("a")
    # c waited longer than x (same priority), so it goes first
    assert [(w.plan_id, w.task_id) for w in step.work] == [("p1", "c")]
    step = d.run_task("b")
    assert [(w.plan_id, w.task_id) for w in step.work] == [("p2", "x")]


# ------------------------------------------------------------------ 4. retries and failures


def test_backoff_is_exponential_capped_and_deterministic() -> None:
    policy = Policy(retry_base_s=2.0, retry_max_s=300.0)
    for attempt in range(1, 12):
        raw = min(300.0, 2.0 * 2 ** (attempt - 1))
        for key in ("p1.a", "p1.b", "other.task", "x" * 50):
            b = backoff_s(key, attempt, policy)
            assert raw * 0.5 <= b <= raw
            assert b == backoff_s(key, attempt, policy)
    # attempt 0 counts as the first
    assert backoff_s("p1.a", 0, policy) <= 2.0
    # the jitter really spreads: different keys give different delays
    assert len({backoff_s(f"p1.t{i}", 1, policy) for i in range(50)}) > 40
    # capped far out
    assert 150.0 <= backoff_s("p1.a", 60, policy) <= 300.0
    # a zero base means no wait
    assert backoff_s("p1.a", 3, Policy(retry_base_s=0.0)) == 0.0


def test_retries_wait_out_their_backoff_then_fail_dependents() -> None:
    policy = Policy(release_window=4, retry_base_s=4.0, retry_max_s=100.0, aging_s=60.0)
    d = Driver(policy)
    spec = plan(task("a", retries=2), task("b", "a"), task("c", "b"), task("x"), task("y", "x"))
    d.submit(spec)
    d.run_task("x")
    d.run_task("y")
    assert next_due(d.state) is None

    for attempt in (1, 2):
        item = d.take("a")
        assert item.attempt == attempt
        d.started(item)
        step = d.finished(item, ok=False, error=f"boom {attempt}", rc=3)
        assert kinds(step.events) == [TaskRetrying] and step.work == []
        ev = step.events[0]
        assert isinstance(ev, TaskRetrying)
        expected_at = d.now + backoff_s("p1.a", attempt, policy)
        assert ev.retry_at == expected_at > d.now
        assert (ev.attempt, ev.reason, ev.error) == (attempt, "error", f"boom {attempt}")
        assert (ev.rc, ev.worker) == (3, "w1")
        low, high = 4.0 * 2 ** (attempt - 1) * 0.5, 4.0 * 2 ** (attempt - 1)
        assert low <= ev.retry_at - d.now <= high
        rec = d.state.tasks["p1.a"]
        assert (rec.status, rec.attempt, rec.reason) == (WAITING, attempt, "error")
        assert rec.not_before == rec.waiting_since == ev.retry_at
        assert next_due(d.state) == ev.retry_at

        # a tick before retry_at changes nothing
        step = d.tick(at=ev.retry_at - 0.001)
        assert step.events == [] and step.work == [] and not step.ignored
        assert next_due(d.state) == ev.retry_at
        # at retry_at it goes out again with the next attempt
        step = d.tick(at=ev.retry_at)
        assert kinds(step.events) == [TaskReleased]
        assert [(w.task_id, w.attempt) for w in step.work] == [("a", attempt + 1)]
        assert next_due(d.state) is None

    item = d.take("a")
    assert item.attempt == 3
    d.started(item)
    step = d.finished(item, ok=False, error="exit 9", stderr_tail="last words\n", rc=9)
    assert kinds(step.events) == [TaskFailed, TaskFailed, TaskFailed, PlanFinished]
    failed = {e.task_id: e for e in step.events if isinstance(e, TaskFailed)}
    assert (failed["a"].reason, failed["a"].error, failed["a"].rc, failed["a"].attempt) == (
        "error",
        "exit 9\nlast words",
        9,
        3,
    )
    assert (failed["a"].worker, failed["a"].duration_s) == ("w1", 0.5)
    for dep in ("b", "c"):
        assert failed[dep].reason == "dependency"
        assert failed[dep].error == "dependency a failed"
    fin = step.events[-1]
    assert isinstance(fin, PlanFinished)
    assert fin.status == FAILED and fin.counts == {SUCCEEDED: 2, FAILED: 3}
    assert statuses(d.state) == {"a": FAILED, "b": FAILED, "c": FAILED, "x": SUCCEEDED, "y": SUCCEEDED}
    assert d.state.tasks["p1.b"].reason == "dependency" and d.state.tasks["p1.b"].attempt == 0
    assert d.state.plans["p1"].status == FAILED
    assert len(released_ids(of_task(d.events, "a"))) == 3
    check_history(d.events, 4, d.policy.pack_size)
    assert_replays(d)


def test_retry_then_success_unblocks_dependents() -> None:
    d = Driver(Policy(retry_base_s=1.0, retry_max_s=1.0))
    d.submit(plan(task("a", retries=1), task("b", "a")))
    d.run_task("a", ok=False)
    d.tick(at=next_due(d.state))
    step = d.run_task("a")
    assert kinds(step.events) == [TaskSucceeded, TaskReleased]
    rec = d.state.tasks["p1.a"]
    assert (rec.attempt, rec.reason, rec.error, rec.rc) == (2, "", "", 0)
    d.run_task("b")
    assert d.state.plans["p1"].status == SUCCEEDED
    assert_replays(d)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [({"timed_out": True}, "timeout"), ({"cancelled": True}, "cancelled"), ({}, "error")],
)
def test_failure_reasons(flags: dict[str, bool], reason: str) -> None:
    d = Driver(Policy(retry_base_s=1.0))
    d.submit(plan(task("a", retries=1), task("b", "a")))
    step = d.run_task("a", ok=False, **flags)
    ev = step.events[0]
    assert isinstance(ev, TaskRetrying) and ev.reason == reason
    d.tick(at=next_due(d.state))
    step = d.run_task("a", ok=False, **flags)
    assert kinds(step.events) == [TaskFailed, TaskFailed, PlanFinished]
    ev2 = step.events[0]
    assert isinstance(ev2, TaskFailed) and ev2.reason == reason
    assert d.state.tasks["p1.a"].reason == reason
    assert d.state.tasks["p1.b"].reason == "dependency"


def test_no_retries_fails_at_once_and_error_is_trimmed() -> None:
    d = Driver()
    d.submit(plan(task("a", retries=0)))
    long_error = "e" * (MAX_ERROR_CHARS + 500) + "END"
    step = d.run_task("a", ok=False, timed_out=True, error=long_error)
    assert kinds(step.events) == [TaskFailed, PlanFinished]
    ev = step.events[0]
    assert isinstance(ev, TaskFailed)
    assert ev.reason == "timeout" and len(ev.error) == MAX_ERROR_CHARS and ev.error.endswith("END")
    assert d.state.plans["p1"].status == FAILED


def test_error_adds_the_tail_of_stderr_else_stdout() -> None:
    d = Driver()
    d.submit(plan(*(task(t, retries=0) for t in "abcd")))
    d.run_task("a", ok=False, error="failed", stdout_tail="out", stderr_tail="  err\n")
    d.run_task("b", ok=False, error="failed", stdout_tail="out only\n")
    d.run_task("c", ok=False, error="no output", stdout_tail=" \n")
    d.run_task("d", ok=False, stderr_tail="err only")
    errors = {r.task_id: r.error for r in d.state.plan_tasks("p1")}
    assert errors["a"] == "failed\nerr"
    assert errors["b"] == "failed\nout only"
    assert errors["c"] == "no output"
    assert errors["d"].strip() == "err only"


def test_failure_fails_every_transitive_dependent_once() -> None:
    d = Driver()
    # a -> b -> d, a -> c -> d, d -> e, and f independent of a
    spec = plan(
        task("a", retries=0),
        task("b", "a"),
        task("c", "a"),
        task("d", "b", "c"),
        task("e", "d"),
        task("f"),
    )
    d.submit(spec)
    step = d.run_task("a", ok=False)
    failed = [e.task_id for e in step.events if isinstance(e, TaskFailed)]
    assert sorted(failed) == ["a", "b", "c", "d", "e"] and len(failed) == 5
    assert d.state.plans["p1"].status == PLAN_RUNNING
    step = d.run_task("f")
    assert kinds(step.events) == [TaskSucceeded, PlanFinished]
    assert d.state.plans["p1"].status == FAILED
    check_history(d.events, d.policy.release_window, d.policy.pack_size)


# ------------------------------------------------------------------ 5. stale and duplicate reports


def assert_ignored(step: Step) -> None:
    assert step.ignored
    assert step.events == [] and step.work == []


def test_stale_and_duplicate_reports_are_ignored() -> None:
    d = Driver(Policy(retry_base_s=10.0, retry_max_s=10.0))
    d.submit(plan(task("a", retries=1), task("b", "a")))
    first = d.take("a")
    d.started(first)
    d.finished(first, ok=False)
    before = snapshot(d.state)

    # the first attempt's report comes again while the retry waits
    assert_ignored(d.finished(first, ok=True))
    assert_ignored(d.started(first))
    assert snapshot(d.state) == before

    d.tick(at=next_due(d.state))
    second = d.take("a")
    assert second.attempt == 2
    # an old attempt's reports do not touch the new attempt
    step = d.finished(first, ok=True)
    assert_ignored(step)
    assert "attempt 1" in step.ignored
    assert d.state.tasks["p1.a"].status == READY
    assert_ignored(d.started(first))
    assert d.state.tasks["p1.a"].status == READY

    d.started(second)
    # a second RunStarted for a running task is ignored
    assert_ignored(d.started(second))
    d.finished(second)
    assert d.state.tasks["p1.a"].status == SUCCEEDED
    # a second RunFinished (ok or not) for a task that already succeeded
    assert_ignored(d.finished(second, ok=True))
    assert_ignored(d.finished(second, ok=False))
    assert d.state.tasks["p1.a"].status == SUCCEEDED

    # reports for an attempt that was never released (a pending task is covered below)
    b = d.take("b")
    fake = msgspec.structs.replace(b, attempt=2)
    assert_ignored(d.started(fake))
    assert_ignored(d.finished(fake))
    d.run(b)
    assert d.state.plans["p1"].status == SUCCEEDED

    # reports for unknown tasks and plans
    ghost = WorkItem(plan_id="p1", task_id="ghost", attempt=1)
    step = d.started(ghost)
    assert_ignored(step)
    assert "unknown" in step.ignored
    assert_ignored(d.finished(ghost))
    nowhere = WorkItem(plan_id="nope", task_id="a", attempt=1)
    assert_ignored(d.started(nowhere))
    assert_ignored(d.finished(nowhere, ok=False))

    assert d.state.plans["p1"].status == SUCCEEDED
    assert sum(isinstance(e, PlanFinished) for e in d.events) == 1
    assert_replays(d)


def test_reports_for_a_pending_task_are_ignored() -> None:
    d = Driver()
    d.submit(plan(task("a"), task("b", "a")))
    b = WorkItem(plan_id="p1", task_id="b", attempt=1)
    assert_ignored(d.started(b))
    assert_ignored(d.finished(b))
    assert d.state.tasks["p1.b"].status == PENDING


def test_duplicate_submit_is_ignored() -> None:
    d = Driver()
    d.submit(DIAMOND)
    before = snapshot(d.state)
    step = d.submit(plan(task("other")))
    assert_ignored(step)
    assert "already known" in step.ignored
    assert snapshot(d.state) == before
    # also once it has finished
    d.drain()
    assert d.state.plans["p1"].status == SUCCEEDED
    assert_ignored(d.submit(DIAMOND))


def test_messages_the_brain_does_not_take_are_ignored() -> None:
    d = Driver()
    step = d.feed(WorkItem(plan_id="p1", task_id="a", attempt=1))
    assert_ignored(step)
    assert "WorkItem" in step.ignored
    step = d.tick()
    assert step.events == [] and step.work == [] and not step.ignored
    assert next_due(d.state) is None


# ------------------------------------------------------------------ 6. cancel


def test_cancel_cancels_every_unfinished_task() -> None:
    d = Driver(Policy(release_window=2, retry_base_s=5.0, retry_max_s=5.0))
    spec = plan(
        task("e"), task("a"), task("b"), task("c"), task("d", "a"), task("r", retries=1, cls="script")
    )
    d.submit(spec)
    d.run_task("e")
    d.run_task("r", ok=False)  # r now waits out a backoff
    a = d.take("a")
    d.started(a)
    assert statuses(d.state) == {
        "e": SUCCEEDED,
        "a": RUNNING,
        "b": READY,
        "c": WAITING,
        "d": PENDING,
        "r": WAITING,
    }
    due = next_due(d.state)
    assert due is not None

    step = d.cancel(reason="operator said so")
    assert not step.ignored and step.work == []
    cancelled = [e for e in step.events if isinstance(e, TaskCancelled)]
    assert [e.task_id for e in cancelled] == ["a", "b", "c", "d", "r"]
    assert {e.task_id: e.attempt for e in cancelled} == {"a": 1, "b": 1, "c": 0, "d": 0, "r": 1}
    assert all(e.reason == "operator said so" for e in cancelled)
    assert kinds(step.events)[-1] is PlanFinished
    fin = step.events[-1]
    assert isinstance(fin, PlanFinished)
    assert fin.status == CANCELLED and fin.counts == {SUCCEEDED: 1, CANCELLED: 5}
    assert d.state.plans["p1"].status == CANCELLED
    for tid in "abcdr":
        rec = d.state.tasks[f"p1.{tid}"]
        assert (rec.status, rec.reason, rec.error) == (CANCELLED, "cancelled", "operator said so")
    assert d.state.tasks["p1.e"].status == SUCCEEDED

    # late reports for cancelled tasks change nothing
    assert_ignored(d.finished(a, ok=True))
    assert_ignored(d.finished(a, ok=False))
    assert_ignored(d.started(d.take("b")))
    # the cancelled retry never comes back
    step = d.tick(at=due + 1)
    assert step.events == [] and step.work == []

    # cancelling again, a finished plan, or an unknown plan is ignored
    assert_ignored(d.cancel())
    assert_ignored(d.cancel(plan_id="nope"))
    assert sum(isinstance(e, PlanFinished) for e in d.events) == 1
    check_history(d.events, 2, d.policy.pack_size)
    assert_replays(d)


def test_cancel_of_finished_or_rejected_plan_is_ignored() -> None:
    d = Driver()
    d.submit(plan(task("a")))
    d.drain()
    step = d.cancel()
    assert_ignored(step)
    assert SUCCEEDED in step.ignored
    d.submit(plan(), plan_id="bad")
    step = d.cancel(plan_id="bad")
    assert_ignored(step)
    assert PLAN_REJECTED in step.ignored


def test_cancel_frees_slots_for_other_plans() -> None:
    d = Driver(Policy(release_window=1))
    d.submit(plan(task("a")), plan_id="p1")
    d.submit(plan(task("x")), plan_id="p2")
    assert [w.task_id for w in d.work] == ["a"]
    step = d.cancel(plan_id="p1")
    assert [(w.plan_id, w.task_id) for w in step.work] == [("p2", "x")]
    assert d.state.plans["p1"].status == CANCELLED
    assert d.state.plans["p2"].status == PLAN_RUNNING
    d.run_task("x", plan_id="p2")
    assert d.state.plans["p2"].status == SUCCEEDED
    assert_replays(d)


# ------------------------------------------------------------------ 7. rejected plans


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (plan(task("a", "c"), task("b", "a"), task("c", "b")), "dependency cycle among a, b, c"),
        (plan(task("a", "a")), "dependency cycle among a"),
        (plan(task("ok"), task("a", "b"), task("b", "a"), task("z", "ok")), "dependency cycle among a, b"),
        (plan(task("a"), task("b", "nope")), "task 'b' depends on unknown task 'nope'"),
        (plan(task("a"), task("b"), task("a")), "duplicate task id 'a'"),
        (plan(), "plan has no tasks"),
    ],
)
def test_invalid_plans_are_rejected(spec: PlanSpec, needle: str) -> None:
    assert needle in validate_plan(spec)
    d = Driver()
    step = d.submit(msgspec.structs.replace(spec, source="plans/x.md"), plan_id="bad")
    assert not step.ignored and step.work == []
    assert kinds(step.events) == [PlanRejected]
    ev = step.events[0]
    assert isinstance(ev, PlanRejected)
    assert (ev.plan_id, ev.title, ev.source, ev.at) == ("bad", "test plan", "plans/x.md", d.now)
    assert needle in ev.error
    assert d.state.tasks == {}
    pl = d.state.plans["bad"]
    assert pl.status == PLAN_REJECTED and pl.final and needle in pl.error
    assert (pl.total, pl.counts, pl.finished_at) == (0, {}, d.now)
    assert next_due(d.state) is None
    # the id stays taken
    assert_ignored(d.submit(plan(task("a")), plan_id="bad"))
    assert_replays(d)


def test_valid_plans_pass_validation() -> None:
    assert validate_plan(DIAMOND) == ""
    assert validate_plan(plan(task("a"))) == ""
    # a dependency named twice is not a cycle
    assert validate_plan(plan(task("a"), task("b", "a", "a"))) == ""
    d = Driver()
    d.submit(plan(task("a"), task("b", "a", "a")))
    d.drain()
    assert d.state.plans["p1"].status == SUCCEEDED
    assert len(released_ids(d.events)) == 2


# ------------------------------------------------------------------ 8. replay and restart


def scenario_diamond(d: Driver) -> None:
    d.submit(DIAMOND)
    d.drain()


def scenario_retries(d: Driver) -> None:
    d.submit(plan(task("a", retries=2), task("b", "a", retries=1), task("c", "b"), task("z", retries=0)))
    d.drain(lambda w: not ((w.task_id == "a" and w.attempt < 3) or (w.task_id == "b" and w.attempt == 1)))


def scenario_failure(d: Driver) -> None:
    d.submit(plan(task("a", retries=1), task("b", "a"), task("c", "b"), task("x"), task("y", "x", "c")))
    d.drain(lambda w: w.task_id != "a")


def scenario_timeout(d: Driver) -> None:
    d.submit(plan(task("a", retries=1), task("b", "a")))
    d.run_task("a", ok=False, timed_out=True)
    d.tick(at=next_due(d.state))
    d.run_task("a", ok=False, timed_out=True)


def scenario_cancel(d: Driver) -> None:
    d.submit(plan(task("a"), task("b", retries=2), task("c", "a"), task("d", "c")))
    d.run_task("a")
    d.run_task("b", ok=False)
    d.started(d.take("c"))
    d.cancel()
    d.drain()


def scenario_many_plans(d: Driver) -> None:
    d.submit(DIAMOND, plan_id="p1")
    d.submit(plan(task("a", retries=1), task("b", "a")), plan_id="p2")
    d.submit(plan(task("a", "a")), plan_id="p3")
    d.submit(plan(task("q", priority=1), task("r", priority=9, cls="script")), plan_id="p4")
    d.run_task("a", plan_id="p2", ok=False)
    d.cancel(plan_id="p4")
    d.drain()


def scenario_stale(d: Driver) -> None:
    d.submit(plan(task("a", retries=1), task("b", "a")))
    first = d.take("a")
    d.run(first, ok=False)
    d.finished(first)
    d.tick(at=next_due(d.state))
    second = d.take("a")
    d.finished(first)
    d.run(second)
    d.finished(second, ok=False)
    d.submit(plan(task("a")))
    d.drain()


SCENARIOS: dict[str, Callable[[Driver], None]] = {
    "diamond": scenario_diamond,
    "retries": scenario_retries,
    "failure": scenario_failure,
    "timeout": scenario_timeout,
    "cancel": scenario_cancel,
    "many_plans": scenario_many_plans,
    "stale": scenario_stale,
}
SMALL = Policy(release_window=2, retry_base_s=3.0, retry_max_s=20.0, aging_s=7.0)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_replay_rebuilds_the_live_records(name: str) -> None:
    d = Driver(SMALL)
    SCENARIOS[name](d)
    assert all(p.final for p in d.state.plans.values())
    rebuilt = assert_replays(d)
    assert_replays(d, through_wire=False)
    assert statuses(rebuilt) == statuses(d.state)
    check_history(d.events, SMALL.release_window, d.policy.pack_size)
    # replaying twice is idempotent for acceptance events
    for ev in d.events:
        if isinstance(ev, PlanAccepted | PlanRejected):
            evolve(rebuilt, ev)
    assert snapshot(rebuilt) == snapshot(d.state)


def test_replay_of_a_prefix_matches_the_state_at_that_point() -> None:
    d = Driver(SMALL)
    d.submit(plan(task("a", retries=1), task("b", "a"), task("c")))
    snapshots = []
    d.run_task("c")
    snapshots.append((len(d.events), snapshot(d.state)))
    d.run_task("a", ok=False)
    snapshots.append((len(d.events), snapshot(d.state)))
    d.drain()
    snapshots.append((len(d.events), snapshot(d.state)))
    for n, snap in snapshots:
        assert snapshot(replay(d.events[:n])) == snap


def test_evolve_ignores_events_it_cannot_place() -> None:
    state = State()
    evolve(state, TaskReleased(plan_id="p", task_id="t", attempt=1, at=1.0))
    evolve(state, PlanFinished(plan_id="p", status=SUCCEEDED, at=1.0))
    evolve(state, RunStarted(plan_id="p", task_id="t", attempt=1, worker="w", at=1.0))
    assert state.tasks == {} and state.plans == {}


def restart_pair(scenario_head: Callable[[Driver], None]) -> tuple[Driver, Driver]:
    """Run a scenario half way, then give a second driver a state loaded from copies of the records."""
    live = Driver(SMALL)
    scenario_head(live)
    restarted = Driver(SMALL, state=reload(live.state, SMALL.aging_s), now=live.now)
    restarted.work = list(live.work)
    restarted.events = list(live.events)
    assert snapshot(restarted.state) == snapshot(live.state)
    # a retry whose backoff is over but which still waits for a slot sits in the live ready queue;
    # loaded from its record it is due at once (one harmless early tick), otherwise the timers agree
    due = next_due(restarted.state)
    assert due == next_due(live.state) or (due is not None and due <= live.now)
    return live, restarted


def head_fan(d: Driver) -> None:
    d.submit(
        plan(
            task("root"),
            *(task(f"m{i}", "root", priority=1 + i % 4, retries=1) for i in range(6)),
            task("join", *(f"m{i}" for i in range(6))),
            task("side", cls="script", retries=2),
        )
    )
    d.run_task("root")
    d.run_task("m3", ok=False)
    d.run_task("side", ok=False)
    running = d.take("m2")
    d.started(running)
    d.work.append(running)  # its report comes after the restart


def head_two_plans(d: Driver) -> None:
    d.submit(plan(task("a"), task("b", "a"), task("c", "a", retries=1, cls="script")), plan_id="p1")
    d.submit(plan(task("x", priority=9), task("y", "x")), plan_id="p2")
    d.run_task("a")
    d.run_task("c", ok=False)


def head_submitted_only(d: Driver) -> None:
    d.submit(DIAMOND)


@pytest.mark.parametrize("head", [head_fan, head_two_plans, head_submitted_only])
@pytest.mark.parametrize("cancel", [False, True])
def test_restart_from_records_continues_identically(head: Callable[[Driver], None], cancel: bool) -> None:
    live, restarted = restart_pair(head)
    mark = len(live.events)

    def outcome(w: WorkItem) -> bool:
        return not (w.attempt == 1 and w.task_id in ("m3", "y", "side", "b"))

    timers = []
    for d in (live, restarted):
        # both see exactly the same inputs after the "restart"
        d.tick()
        timers.append(next_due(d.state))
        if cancel:
            d.run(d.work.pop(0))
            d.cancel(plan_id="p1")
        d.drain(outcome)

    assert timers[0] == timers[1]
    assert live.events[mark:] == restarted.events[mark:]
    assert live.now == restarted.now
    assert snapshot(restarted.state) == snapshot(live.state)
    assert all(p.final for p in live.state.plans.values())
    assert_replays(restarted)
    assert_replays(live)


def test_restart_keeps_the_release_window_and_retry_timer() -> None:
    d = Driver(Policy(release_window=1, retry_base_s=8.0, retry_max_s=8.0))
    d.submit(plan(task("a", retries=1), task("b"), task("c", "a")))
    d.run_task("a", ok=False)
    assert [w.task_id for w in d.work] == ["b"]
    due = next_due(d.state)
    assert due is not None

    state = reload(d.state, d.policy.aging_s)
    assert next_due(state) == due
    # b still holds the only slot and a's backoff still runs
    step = apply(state, Tick(), due - 0.5, d.policy)
    assert step.events == []
    step = apply(state, Tick(), due + 0.5, d.policy)
    assert step.events == []
    step = apply(
        state,
        RunFinished(
            plan_id="p1",
            task_id="b",
            attempt=1,
            worker="w",
            at=0,
            ok=True,
            duration_s=1,
            claim=claim_of(d.policy.claim_key, "p1", "b", 1),
        ),
        due + 1,
        d.policy,
    )
    assert [(w.task_id, w.attempt) for w in step.work] == [("a", 2)]


# ------------------------------------------------------------------ 9. property: random DAGs


@st.composite
def random_plans(draw: st.DrawFn) -> PlanSpec:
    n = draw(st.integers(1, 30))
    tasks = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=min(i, 4), unique=True)) if i else []
        tasks.append(
            TaskSpec(
                id=f"t{i}",
                body="true",
                depends_on=tuple(f"t{j}" for j in deps),
                priority=draw(st.integers(1, 10)),
                retries=draw(st.integers(0, 2)),
                cls=draw(st.sampled_from(["cpu", "script"])),
            )
        )
    return PlanSpec(title="random", tasks=tuple(tasks))


@settings(max_examples=100, deadline=None)
@given(
    spec=random_plans(),
    outcomes=st.lists(st.booleans(), max_size=120),
    window=st.integers(1, 4),
    rnd=st.randoms(use_true_random=False),
    restart_after=st.one_of(st.none(), st.integers(0, 40)),
    cancel_after=st.one_of(st.none(), st.integers(0, 60)),
)
def test_random_plans_always_finish_consistently(
    spec: PlanSpec,
    outcomes: list[bool],
    window: int,
    rnd: random.Random,
    restart_after: int | None,
    cancel_after: int | None,
) -> None:
    policy = Policy(release_window=window, retry_base_s=1.0, retry_max_s=8.0, aging_s=5.0)
    d = Driver(policy)
    d.submit(spec)
    results = iter(outcomes)
    runs = 0
    # items the worker continued with (their `then`), running on it with nothing queued
    held: list[WorkItem] = []
    for _ in range(10_000):
        if restart_after is not None and runs == restart_after:
            d.state = reload(d.state, policy.aging_s)
            restart_after = None
        if cancel_after is not None and runs == cancel_after:
            d.cancel()
            cancel_after = None
        due = next_due(d.state)
        if (d.work or held) and (due is None or rnd.random() < 0.8):
            i = rnd.randrange(len(d.work) + len(held))
            went_on = i >= len(d.work)
            item = held.pop(i - len(d.work)) if went_on else d.work.pop(i)
            reported = rnd.random()
            if reported < 0.8 and not went_on:
                d.started(item)
            ok = next(results, True)
            if went_on and rnd.random() < 0.1:
                d.finished(item, ok=False, cancelled=True, rc=None)  # its stopping worker gave it back
                runs += 1
                continue
            # 10 %: a short task's start comes with its end; 10 %: a start report was lost
            short = {"started_at": d.now} if reported >= 0.9 and not went_on else {}
            # 70 %: the worker goes on with the dependent the item carries
            then = item.then if ok and rnd.random() < 0.7 else None
            said = {"then": then.task_id, "then_claim": then.claim} if then is not None else {}
            d.finished(item, ok=ok, timed_out=not ok and rnd.random() < 0.3, **short, **said)
            if then is not None:
                held.append(then)
            if rnd.random() < 0.1:
                assert_ignored(d.finished(item, ok=not ok, at=d.now))  # a duplicate report
            runs += 1
        elif due is not None:
            d.tick(at=max(due, d.now) + rnd.choice([0.0, 0.5]))
        else:
            break
    else:
        raise AssertionError("did not settle")

    pl = d.state.plans["p1"]
    assert pl.final and pl.status in (SUCCEEDED, FAILED, CANCELLED)
    event(f"plan {pl.status}")
    event(f"retried: {any(isinstance(e, TaskRetrying) for e in d.events)}")
    event(f"continued: {any(isinstance(e, TaskReleased) and e.worker for e in d.events)}")
    recs = d.state.plan_tasks("p1")
    assert len(recs) == len(spec.tasks)
    assert all(r.final for r in recs)
    if pl.status == SUCCEEDED:
        assert all(r.status == SUCCEEDED for r in recs)
    elif pl.status == FAILED:
        assert any(r.status == FAILED for r in recs) and not any(r.status == CANCELLED for r in recs)
    else:
        assert any(r.status == CANCELLED for r in recs)
    assert pl.counts == dict(Counter(r.status for r in recs))

    check_history(d.events, window, d.policy.pack_size)
    # (a continued attempt queued again is released twice, to its worker and then to the queue)
    attempts = {(e.task_id, e.attempt) for e in d.events if isinstance(e, TaskReleased)}
    releases = Counter(t for t, _ in attempts)
    successes = Counter(e.task_id for e in d.events if isinstance(e, TaskSucceeded))
    for t in spec.tasks:
        assert releases[t.id] <= t.retries + 1
        assert successes[t.id] <= 1
    # a task that failed on its own ran out of attempts
    for r in recs:
        if r.status == FAILED and r.reason != "dependency":
            assert r.attempt == r.spec.retries + 1
    assert sum(isinstance(e, PlanFinished) for e in d.events) == 1
    assert_replays(d)


# ------------------------------------------------------------------ 10. scale


def run_big(spec: PlanSpec) -> Driver:
    d = Driver(Policy(release_window=256))
    d.submit(spec)
    d.drain()
    return d


@pytest.mark.parametrize("shape", ["chain", "fan"])
def test_ten_thousand_tasks(shape: str) -> None:
    n = 10_000
    if shape == "chain":
        tasks = [task("t0"), *(task(f"t{i}", f"t{i - 1}") for i in range(1, n))]
    else:
        tasks = [task("root"), *(task(f"t{i}", "root", priority=1 + i % 10) for i in range(1, n))]
    d = run_big(plan(*tasks))  # how fast: `tools/bench.py` (timings live there, not in tests)
    pl = d.state.plans["p1"]
    assert pl.status == SUCCEEDED and pl.counts == {SUCCEEDED: n}
    assert sum(isinstance(e, TaskReleased) for e in d.events) == n
    assert_replays(d, through_wire=False)


def test_a_work_item_names_the_dependencies_that_may_have_artifacts() -> None:
    """A dependency that declares artifacts or whose body saves a file is in `after`; a plain
    shell task is not, so the worker asks nothing about it."""
    d = Driver()
    d.submit(
        plan(
            task("kept", artifacts=("out/*",)),
            TaskSpec(id="vectors", kind="embed", cls="script", body="text: hi"),
            task("plain"),
            task("use", "kept", "vectors", "plain"),
        )
    )
    for tid in ("kept", "vectors", "plain"):
        d.run_task(tid)
    use = d.take("use")
    assert use.after == ("kept", "vectors")
