"""The state machine's recovery paths: redelivery, dead letters, lost work, operator retries."""

from __future__ import annotations

import dataclasses

from mesh.claims import claim_of
from mesh.events import (
    AgentOffline,
    PlanFinished,
    PlanResumed,
    RetryTasks,
    TaskFailed,
    TaskRedelivered,
    TaskReleased,
    TaskReset,
    TaskRetrying,
    TaskWaiting,
)
from mesh.machine import Policy, Sweep, replay
from mesh.records import FAILED, PENDING, RUNNING, SUCCEEDED
from tests.test_machine import Driver, RunStarted, of_task, plan, snapshot, statuses, task


def policy(**kw: float) -> Policy:
    base = {
        "release_window": 8,
        "retry_base_s": 1.0,
        "retry_max_s": 4.0,
        "aging_s": 60.0,
        "lost_after_s": 10.0,
    }
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


# every policy here has the default (empty) claim key: the claim on attempt 1 of p1.a
CLAIM_A1 = claim_of(b"", "p1", "a", 1)


def assert_replays(d: Driver) -> None:
    assert snapshot(replay(d.events, aging_s=d.policy.aging_s)) == snapshot(d.state)


def test_redelivery_to_another_worker_is_a_transition() -> None:
    d = Driver(policy())
    d.submit(plan(task("a"), task("b", "a")))
    item = d.take("a")
    d.started(item, worker="w1")
    # the same attempt delivered again to w2 (w1 stopped heartbeating)
    step = d.feed(
        RunStarted(plan_id="p1", task_id="a", attempt=1, worker="w2", at=0.0, delivery=2, claim=CLAIM_A1)
    )
    assert [type(e) for e in step.events] == [TaskRedelivered]
    ev = step.events[0]
    assert isinstance(ev, TaskRedelivered) and ev.previous_worker == "w1" and ev.worker == "w2"
    rec = d.state.tasks["p1.a"]
    assert rec.status == RUNNING and rec.worker == "w2" and rec.attempt == 1 and rec.deliveries == 2
    # a repeat of that report, or a report of an older delivery, changes nothing
    again = d.feed(
        RunStarted(plan_id="p1", task_id="a", attempt=1, worker="w2", at=0.0, delivery=2, claim=CLAIM_A1)
    )
    assert again.events == [] and again.ignored
    d.finished(item, worker="w2")
    assert d.state.tasks["p1.a"].status == SUCCEEDED
    assert_replays(d)


def test_a_redelivery_of_a_task_whose_start_was_never_reported_is_a_redelivery() -> None:
    # the first worker died before its (held back) run.started went out: the brain never saw it
    d = Driver(policy())
    d.submit(plan(task("a")))
    item = d.take("a")
    step = d.feed(
        RunStarted(plan_id="p1", task_id="a", attempt=1, worker="w2", at=0.0, delivery=2, claim=CLAIM_A1)
    )
    assert [type(e) for e in step.events] == [TaskRedelivered]
    ev = step.events[0]
    assert isinstance(ev, TaskRedelivered) and (ev.previous_worker, ev.worker, ev.delivery) == ("", "w2", 2)
    rec = d.state.tasks["p1.a"]
    assert (rec.status, rec.worker, rec.deliveries) == (RUNNING, "w2", 2)
    d.finished(item, worker="w2")
    assert d.state.tasks["p1.a"].status == SUCCEEDED
    assert_replays(d)


def test_dead_letter_fails_at_once_and_cascades() -> None:
    d = Driver(policy())
    d.submit(plan(task("a", retries=5), task("b", "a")))
    item = d.take("a")
    d.started(item)
    step = d.finished(item, ok=False, dead_letter=True, error="delivered 6 times")
    assert [type(e) for e in step.events][:2] == [TaskFailed, TaskFailed]
    assert d.state.tasks["p1.a"].reason == "dead_letter", "no retry for a task that kills its workers"
    assert d.state.tasks["p1.b"].reason == "dependency"
    assert any(isinstance(e, PlanFinished) and e.status == FAILED for e in step.events)
    assert_replays(d)


def test_an_agent_that_vanishes_is_marked_offline_and_its_work_lost_then_retried() -> None:
    d = Driver(policy(lost_after_s=10.0))
    d.submit(plan(task("a", retries=1), task("b")))
    d.feed(Sweep(frozenset({"w1", "w2"})))
    a = d.take("a")
    d.started(a, worker="w1")
    b = d.take("b")
    d.started(b, worker="w2")
    t0 = d.now
    step = d.feed(Sweep(frozenset({"w2"})), at=t0 + 1)
    offline = [e for e in step.events if isinstance(e, AgentOffline)]
    assert len(offline) == 1 and offline[0].agent_id == "w1" and offline[0].running == ("p1.a",)
    assert d.state.tasks["p1.a"].status == RUNNING, "JetStream may still redeliver it: wait"
    assert d.feed(Sweep(frozenset({"w2"})), at=t0 + 5).events == []
    step = d.feed(Sweep(frozenset({"w2"})), at=t0 + 12)
    retrying = [e for e in step.events if isinstance(e, TaskRetrying)]
    assert len(retrying) == 1 and retrying[0].reason == "lost" and "w1" in retrying[0].error
    assert d.state.tasks["p1.b"].status == RUNNING, "work of a live worker is untouched"
    # the old attempt's late report is stale; the retry runs as attempt 2
    assert d.finished(a, worker="w1").ignored
    d.tick(at=t0 + 30)
    a2 = d.take("a")
    assert a2.attempt == 2
    d.started(a2, worker="w2")
    d.finished(a2, worker="w2")
    d.finished(b, worker="w2")
    assert statuses(d.state) == {"a": SUCCEEDED, "b": SUCCEEDED}
    assert_replays(d)


def test_a_worker_no_sweep_saw_live_is_said_offline_once_with_its_task() -> None:
    """w1 registered, took a task and died between two sweeps: no sweep ever listed it live.
    The first sweep that misses it says it went offline (with the task it held), once, and its
    attempt is given up as lost after lost_after_s as for any other worker."""
    d = Driver(policy(lost_after_s=10.0))
    d.submit(plan(task("a", retries=1)))
    d.feed(Sweep(frozenset({"w2"})))
    d.started(d.take("a"), worker="w1")
    t0 = d.now
    step = d.feed(Sweep(frozenset({"w2"})), at=t0 + 1)
    offline = [e for e in step.events if isinstance(e, AgentOffline)]
    assert [(e.agent_id, e.running) for e in offline] == [("w1", ("p1.a",))]
    assert d.feed(Sweep(frozenset({"w2"})), at=t0 + 5).events == []
    step = d.feed(Sweep(frozenset({"w2"})), at=t0 + 12)
    assert not [e for e in step.events if isinstance(e, AgentOffline)], "said once"
    retrying = [e for e in step.events if isinstance(e, TaskRetrying)]
    assert len(retrying) == 1 and retrying[0].reason == "lost" and "w1" in retrying[0].error
    assert_replays(d)


def test_lost_work_past_its_retries_fails_with_reason_lost() -> None:
    d = Driver(policy(lost_after_s=5.0))
    d.submit(plan(task("a", retries=0)))
    d.feed(Sweep(frozenset({"w1"})))
    d.started(d.take("a"), worker="w1")
    d.feed(Sweep(frozenset()), at=d.now + 1)
    d.feed(Sweep(frozenset()), at=d.now + 10)
    rec = d.state.tasks["p1.a"]
    assert rec.status == FAILED and rec.reason == "lost"
    assert_replays(d)


def test_a_redelivery_before_the_deadline_keeps_the_attempt() -> None:
    d = Driver(policy(lost_after_s=10.0))
    d.submit(plan(task("a")))
    d.feed(Sweep(frozenset({"w1", "w2"})))
    item = d.take("a")
    d.started(item, worker="w1")
    d.feed(Sweep(frozenset({"w2"})))
    d.feed(RunStarted(plan_id="p1", task_id="a", attempt=1, worker="w2", at=0.0, delivery=2, claim=CLAIM_A1))
    step = d.feed(Sweep(frozenset({"w2"})), at=d.now + 60)
    assert not [e for e in step.events if isinstance(e, TaskRetrying)], "w2 holds it now"
    d.finished(item, worker="w2")
    assert d.state.tasks["p1.a"].status == SUCCEEDED


def test_retry_resets_failed_work_and_its_dependents_with_a_fresh_budget() -> None:
    d = Driver(policy())
    d.submit(plan(task("a", retries=1), task("b", "a"), task("c")))
    d.drain(outcome=lambda item: item.task_id != "a")
    assert statuses(d.state) == {"a": FAILED, "b": FAILED, "c": SUCCEEDED}
    assert d.state.tasks["p1.a"].attempt == 2
    step = d.feed(RetryTasks(plan_id="p1", at=0.0, task_ids=("a",)))
    kinds = [type(e) for e in step.events]
    assert kinds[:3] == [PlanResumed, TaskReset, TaskReset]
    # a, its dependencies succeeded, waits and is released at once: one event
    assert TaskReleased in kinds and TaskWaiting not in kinds
    released = next(e for e in step.events if isinstance(e, TaskReleased))
    assert released.waited_at == d.now
    assert d.state.plans["p1"].status == "running"
    assert d.state.tasks["p1.b"].status == PENDING
    rec = d.state.tasks["p1.a"]
    assert rec.base_attempt == 2 and rec.reason == "" and rec.error == ""
    # a fresh budget: attempt 3 fails and is retried (retries=1), attempt 4 succeeds
    d.run_task("a", ok=False)
    assert d.state.tasks["p1.a"].status != FAILED
    d.drain()
    assert statuses(d.state) == {"a": SUCCEEDED, "b": SUCCEEDED, "c": SUCCEEDED}
    assert d.state.tasks["p1.a"].attempt == 4 and d.state.tasks["p1.c"].attempt == 1
    finished = [e for e in d.events if isinstance(e, PlanFinished)]
    assert [f.status for f in finished] == [FAILED, SUCCEEDED]
    assert_replays(d)


def test_retry_of_a_whole_plan_and_what_is_ignored() -> None:
    d = Driver(policy())
    d.submit(plan(task("a", retries=0), task("b", "a")))
    assert d.feed(RetryTasks(plan_id="p1", at=0.0)).ignored == "nothing to retry in p1"
    assert d.feed(RetryTasks(plan_id="nope", at=0.0)).ignored
    assert "no task zz" in d.feed(RetryTasks(plan_id="p1", at=0.0, task_ids=("zz",))).ignored
    d.drain(outcome=lambda item: False)
    assert statuses(d.state) == {"a": FAILED, "b": FAILED}
    d.feed(RetryTasks(plan_id="p1", at=0.0))
    d.drain()
    assert statuses(d.state) == {"a": SUCCEEDED, "b": SUCCEEDED}
    assert_replays(d)


def test_retry_after_cancel_runs_the_cancelled_work() -> None:
    d = Driver(policy())
    d.submit(plan(task("a"), task("b", "a")))
    d.cancel()
    assert d.state.plans["p1"].status == "cancelled"
    d.feed(RetryTasks(plan_id="p1", at=0.0))
    d.drain()
    assert statuses(d.state) == {"a": SUCCEEDED, "b": SUCCEEDED}
    assert of_task(d.events, "a")
    assert_replays(d)


def test_every_decided_fact_has_its_own_message_id() -> None:
    """The server drops a publish whose Nats-Msg-Id it has seen: two different facts must never
    share one, or the history silently loses one of them."""
    from mesh.bus.route import route
    from mesh.names import Names

    d = Driver(policy(part_bytes=2048))
    d.submit(
        plan(*(task(f"t{i}", retries=1) for i in range(60)), task("join", *(f"t{i}" for i in range(60))))
    )
    d.drain(outcome=lambda item: item.task_id != "t3")
    d.feed(RetryTasks(plan_id="p1", at=0.0, task_ids=("t3",)))
    d.cancel()
    d.feed(RetryTasks(plan_id="p1", at=0.0))
    d.drain()
    ids = [route(Names(), ev)[1] for ev in d.events]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, sorted(dupes)[:5]
    assert_replays(d)


def test_finished_plans_are_archived_after_the_retention_period() -> None:
    from mesh.events import PlanArchived

    d = Driver(policy(archive_after_s=100.0))
    d.submit(plan(task("a"), task("b", "a")))
    d.submit(plan(task("x", retries=0)), plan_id="p2")
    d.drain(outcome=lambda item: item.plan_id == "p1")
    d.submit(plan(task("slow")), plan_id="p3")  # still running when the others are archived
    finished = d.state.plans["p1"].finished_at
    assert not [e for e in d.feed(Sweep(frozenset()), at=finished + 50).events if isinstance(e, PlanArchived)]
    step = d.feed(Sweep(frozenset()), at=finished + 101)
    archived = sorted(e.plan_id for e in step.events if isinstance(e, PlanArchived))
    assert archived == ["p1", "p2"]
    assert set(d.state.plans) == {"p3"} and set(d.state.tasks) == {"p3.slow"}
    assert d.state.take_removed() == (["p1.a", "p1.b", "p2.x"], ["p1", "p2"])
    assert d.feed(RetryTasks(plan_id="p1", at=0.0)).ignored, "an archived plan is gone from the state"
    d.drain()
    assert_replays(d)


def test_every_task_and_plan_event_is_a_transition_that_replay_and_catch_up_read() -> None:
    """Catch-up and replay fold exactly TRANSITION_TYPES; a task or plan event left out of it
    would be lost from KV after a crash and from every replay."""
    import typing

    from mesh import events

    tags = {t.__struct_config__.tag: t for t in typing.get_args(events.Message)}
    published = {t for tag, t in tags.items() if tag.split(".")[0] in ("task", "plan")}
    assert published == set(events.TRANSITION_TYPES)


def test_a_step_cut_short_is_completed_by_reconcile() -> None:
    """A brain published only the first event of a step, then died. The next brain folds that
    prefix (so the redelivered input is stale) and must still decide the rest."""
    from mesh.machine import Reconcile

    d = Driver(policy())
    d.submit(plan(task("first", retries=0), task("second", "first"), task("third", "second")))
    item = d.take("first")
    d.started(item)
    step = d.finished(item)
    assert [type(e).__name__ for e in step.events][:2] == ["TaskSucceeded", "TaskReleased"]
    # what reached the history before the crash: everything before, and the step's first event
    prefix = d.events[: len(d.events) - len(step.events) + 1]
    after = Driver(policy(), state=replay(prefix, aging_s=60.0), now=d.now)
    assert after.finished(item).ignored, "the redelivered report is stale now"
    after.feed(Reconcile())
    assert after.state.tasks["p1.second"].status != PENDING
    after.drain()
    assert statuses(after.state) == {"first": SUCCEEDED, "second": SUCCEEDED, "third": SUCCEEDED}
    assert after.state.plans["p1"].status == SUCCEEDED


def test_reconcile_cascades_a_failure_and_finishes_a_plan_left_running() -> None:
    from mesh.machine import Reconcile

    d = Driver(policy())
    d.submit(plan(task("a", retries=0), task("b", "a"), task("c")))
    d.run_task("c")
    item = d.take("a")
    d.started(item)
    step = d.finished(item, ok=False)
    prefix = d.events[: len(d.events) - len(step.events) + 1]  # only a's failure made it
    after = Driver(policy(), state=replay(prefix, aging_s=60.0), now=d.now)
    assert after.state.tasks["p1.b"].status == PENDING and after.state.plans["p1"].status == "running"
    after.feed(Reconcile())
    assert after.state.tasks["p1.b"].reason == "dependency"
    assert after.state.plans["p1"].status == FAILED


def test_a_submission_whose_acceptance_was_cut_short_is_completed_when_seen_again() -> None:
    from mesh.events import SubmitPlan

    spec = plan(*(task(f"t{i}") for i in range(40)), task("join", *(f"t{i}" for i in range(40))))
    d = Driver(policy(part_bytes=256))
    step = d.submit(spec)
    parts = sum(1 for e in step.events if type(e).__name__ == "PlanTasks")
    assert parts >= 3
    prefix = step.events[:2]  # plan.accepted and one part, then the crash
    after = Driver(policy(part_bytes=256), state=replay(prefix, aging_s=60.0), now=d.now)
    assert len(after.state.plan_tasks("p1")) < 41
    after.feed(SubmitPlan(plan_id="p1", plan=spec, at=0.0, by="tester"))
    assert len(after.state.plan_tasks("p1")) == 41
    after.drain()
    assert after.state.plans["p1"].status == SUCCEEDED
    assert_replays_prefix = replay(prefix + after.events, aging_s=60.0)
    assert snapshot(assert_replays_prefix) == snapshot(after.state)


def test_the_parts_a_cut_acceptance_is_completed_with_give_model_tasks_their_model() -> None:
    """Completing a cut acceptance cuts the plan into the parts it was accepted in, each model
    task given its kind's default model as at acceptance; the parts published again named no
    model, the tasks in them waited on a model no GPU would load, and a part cut otherwise
    than before was skipped whole."""
    from mesh.events import SubmitPlan, TaskSpec
    from mesh.placement import PlacementPolicy

    def models_policy() -> Policy:
        models = PlacementPolicy(models={"m": ("llm", 600)})
        return dataclasses.replace(policy(part_bytes=256), default_models={"llm": "m"}, placement=models)

    tasks = [TaskSpec(id=f"q{i:02d}", body=f"say {i}", kind="prompt", cls="llm") for i in range(30)]
    spec = plan(*tasks)
    d = Driver(models_policy())
    step = d.submit(spec)
    assert sum(1 for e in step.events if type(e).__name__ == "PlanTasks") >= 3
    prefix = step.events[:2]  # plan.accepted and one part, then the crash
    after = Driver(models_policy(), state=replay(prefix, aging_s=60.0), now=d.now)
    after.feed(SubmitPlan(plan_id="p1", plan=spec, at=0.0, by="tester"))
    assert {r.spec.model for r in after.state.plan_tasks("p1")} == {"m"}
    assert snapshot(replay(prefix + after.events, aging_s=60.0)) == snapshot(after.state)
    whole = replay([e for e in step.events if type(e).__name__ in ("PlanAccepted", "PlanTasks")])
    assert {k: r.spec for k, r in after.state.tasks.items()} == {k: r.spec for k, r in whole.tasks.items()}


def test_a_part_folded_again_adds_the_tasks_a_cut_kept_out_of_kv() -> None:
    """A `plan.tasks` part after the checkpoint (published when a cut acceptance was completed)
    whose records a second cut kept only partly, its first task's among them: caught up, the
    part was skipped whole because its first task was known, and seen again the submission
    republished only parts whose first task was unknown; the rest of the part was lost for
    good, the plan never finished."""
    from mesh.events import PlanTasks
    from mesh.machine import State, evolve
    from tests.test_machine import copy_records

    d = Driver(policy(part_bytes=256))
    step = d.submit(plan(*(task(f"t{i:02d}") for i in range(40))))
    part = next(e for e in step.events if isinstance(e, PlanTasks))
    full = replay(d.events, aging_s=60.0)
    tasks, plans = copy_records(full)
    accepted = {r.task_id for r in tasks} - {
        t.id for e in step.events if isinstance(e, PlanTasks) for t in e.tasks
    }
    kept = [r for r in tasks if r.task_id in accepted or r.task_id == part.tasks[0].id]
    state = State.load(kept, plans, aging_s=60.0)
    for ev in d.events[1:]:  # a checkpoint from just after the plan's acceptance
        evolve(state, ev)
    assert snapshot(state) == snapshot(full)


def test_a_transition_that_keeps_the_status_still_marks_the_record_for_writing() -> None:
    """task.redelivered keeps a task running but changes its record: unless it is written to KV,
    a brain restarted later loads the record without it (seen under chaos)."""
    d = Driver(policy())
    d.submit(plan(task("a")))
    item = d.take("a")
    d.started(item, worker="w1")
    d.state.take_dirty()
    d.feed(RunStarted(plan_id="p1", task_id="a", attempt=1, worker="w2", at=0.0, delivery=2, claim=CLAIM_A1))
    written, _ = d.state.take_dirty()
    assert [r.key for r in written] == ["p1.a"] and written[0].deliveries == 2


# ------------------------------------------------------------------ claims: who may report


def test_a_report_without_the_attempts_claim_is_refused_and_changes_nothing() -> None:
    d = Driver(Policy(claim_key=b"k" * 32))
    d.submit(plan(task("a"), task("b", "a")))
    item = d.take("a")
    assert item.claim == claim_of(b"k" * 32, "p1", "a", 1)
    before = snapshot(d.state)
    for claim in ("", "0" * 32, claim_of(b"other key", "p1", "a", 1), claim_of(b"k" * 32, "p1", "a", 2)):
        step = d.finished(item, worker="w9", claim=claim, started_at=1.0)
        assert step.events == [] and "without the attempt's claim" in step.refused, step
        step = d.feed(RunStarted(plan_id="p1", task_id="a", attempt=1, worker="w9", at=0.0, claim=claim))
        assert step.events == [] and step.refused
    assert snapshot(d.state) == before
    # the worker that was handed the item reports with its claim, and is taken
    d.started(item, worker="w1")
    assert d.state.tasks["p1.a"].status == RUNNING
    assert_replays(d)


def test_only_the_worker_running_an_attempt_may_finish_it() -> None:
    d = Driver(policy())
    d.submit(plan(task("a"), task("b", "a")))
    item = d.take("a")
    d.started(item, worker="w1")
    # even with the claim (say, a worker that took an earlier delivery and was replaced)
    step = d.finished(item, worker="w2")
    assert step.events == [] and "which w1 runs" in step.refused
    assert d.state.tasks["p1.a"].status == RUNNING
    d.finished(item, worker="w1")
    assert d.state.tasks["p1.a"].status == SUCCEEDED
    assert_replays(d)


def test_a_stale_report_is_ignored_not_refused() -> None:
    # a report on an attempt that is over is not a forgery: it came late
    d = Driver(policy())
    d.submit(plan(task("a", retries=1)))
    item = d.take("a")
    d.run(item, ok=False)
    step = d.finished(item, worker="w1")
    assert step.ignored and not step.refused


def test_a_dead_letter_from_the_worker_of_the_last_delivery_is_taken() -> None:
    # w1 ran the attempt and died; the delivery past max_deliveries went to w3, which runs nothing
    d = Driver(policy())
    d.submit(plan(task("a"), task("b", "a")))
    item = d.take("a")
    d.started(item, worker="w1")
    step = d.finished(item, ok=False, worker="w3", dead_letter=True, error="delivered 3 times")
    assert not step.refused and d.state.tasks["p1.a"].reason == "dead_letter"
    assert_replays(d)


def test_a_plan_accepted_after_the_checkpoint_is_built_again_from_the_history() -> None:
    """The brain's catch-up, when KV holds a plan's record but only some of its task records (a
    crash cut their writing short; the plans bucket is another stream, stored independently):
    the plan is forgotten and folded again from its acceptance on, and it is whole."""
    from mesh.events import PlanAccepted
    from mesh.machine import State, evolve
    from tests.test_machine import copy_records

    d = Driver(policy())
    d.submit(plan(*(task(f"t{i}") for i in range(20))))
    d.run_task("t0")
    d.run_task("t1")
    full = replay(d.events, aging_s=60.0)

    def catch_up(forget: bool) -> State:
        tasks, plans = copy_records(full)
        kept = [r for r in tasks if r.task_id in ("t0", "t5", "t9")]
        state = State.load(kept, plans, aging_s=60.0)
        for ev in d.events:  # every event after a checkpoint from before the acceptance
            if forget and isinstance(ev, PlanAccepted) and ev.plan_id in state.plans:
                state.forget_plan(ev.plan_id)
            evolve(state, ev)
        return state

    assert len(catch_up(forget=False).plan_tasks("p1")) == 3, "without forgetting, the rest stays lost"
    state = catch_up(forget=True)
    assert snapshot(state) == snapshot(full)
    after = Driver(policy(), state=state, now=d.now)
    after.work = list(d.work)
    after.drain()
    assert after.state.plans["p1"].status == SUCCEEDED
    assert statuses(after.state) == {f"t{i}": SUCCEEDED for i in range(20)}


def test_a_plan_record_stored_ahead_of_its_task_records_cannot_finish_the_plan_early() -> None:
    """A cut while a step's records were being written can leave the plan's record counting a
    task succeeded while that task's own record (in the other bucket, stored independently)
    still says running. Caught up from the checkpoint, the task's success was counted twice:
    the plan looked done and was called succeeded with another of its tasks still running."""
    from mesh.machine import Reconcile, State, evolve
    from tests.test_machine import copy_records

    d = Driver(policy())
    d.submit(plan(task("a"), task("b")))
    a, b = d.take("a"), d.take("b")
    d.started(a)
    d.started(b, worker="w2")
    checkpoint = len(d.events)
    tasks, _ = copy_records(replay(d.events, aging_s=60.0))  # a's record: still running
    d.finished(a)
    _, plans = copy_records(replay(d.events, aging_s=60.0))  # the plan's: a succeeded
    state = State.load(tasks, plans, aging_s=60.0)
    for ev in d.events[checkpoint:]:
        evolve(state, ev)
    assert snapshot(state) == snapshot(replay(d.events, aging_s=60.0))
    after = Driver(policy(), state=state, now=d.now)
    step = after.feed(Reconcile())
    assert not [e for e in step.events if isinstance(e, PlanFinished)]
    assert after.state.plans["p1"].status == "running"
    after.finished(b, worker="w2")
    assert statuses(after.state) == {"a": SUCCEEDED, "b": SUCCEEDED}
    assert after.state.plans["p1"].status == SUCCEEDED


def test_a_plan_is_never_finished_while_its_task_set_is_incomplete() -> None:
    """Whatever its counts say, a plan with fewer task records than its total, or with a task
    not final, is not finished."""
    from mesh.machine import Reconcile, evolve

    d = Driver(policy())
    d.submit(plan(task("a"), task("b")))
    d.run_task("a")
    d.run_task("b")
    assert d.state.plans["p1"].status == SUCCEEDED
    for broken in ("missing", "running"):
        d2 = Driver(policy())
        d2.submit(plan(task("a"), task("b")))
        d2.run_task("a")
        if broken == "missing":
            d2.state.forget_plan("p1")
            for ev in d2.events:  # b's record never made it: the plan's counts claim it did
                evolve(d2.state, ev)
            d2.state.tasks.pop("p1.b")
            d2.state.plan_keys["p1"].remove("p1.b")
        d2.state.plans["p1"].counts = {SUCCEEDED: 2}
        step = d2.feed(Reconcile())
        assert not [e for e in step.events if isinstance(e, PlanFinished)], broken
        assert d2.state.plans["p1"].status == "running", broken
