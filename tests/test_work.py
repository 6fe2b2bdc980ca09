"""A worker's decisions (`mesh.work`), without a server: what its lanes claim, what its GPU
reports, what a resource task asks, whether a suspect item runs, and what its reports say."""

from __future__ import annotations

import pytest

from mesh import placement as gs
from mesh import work
from mesh.events import GpuControl, ResourceItem, RunFinished, RunStarted, TaskSpec, WorkItem
from mesh.records import CANCELLED, FAILED, PENDING, READY, RUNNING, SUCCEEDED, TaskRecord
from mesh.work import RunResult

ITEM = WorkItem(plan_id="p", task_id="t", attempt=2, claim="c" * 32)


def record(status: str, attempt: int, worker: str = "") -> TaskRecord:
    return TaskRecord(
        plan_id="p",
        task_id="t",
        spec=TaskSpec(id="t", body="true"),
        status=status,
        attempt=attempt,
        worker=worker,
    )


def control(source: str = "operator", gpu: str = "h-gpu0", **kw: object) -> GpuControl:
    return GpuControl(gpu=gpu, source=source, at=1.0, **kw)  # type: ignore[arg-type]


# memory -----------------------------------------------------------------------------------


def test_a_memory_forgets_its_oldest_beyond_its_limit() -> None:
    memory: dict[str, int] = {}
    for i in range(5):
        work.remember(memory, f"k{i}", i, limit=3)
    assert list(memory) == ["k2", "k3", "k4"]
    work.remember(memory, "k2", 9, limit=3)  # known already: kept where it was
    assert memory == {"k2": 9, "k3": 3, "k4": 4}
    assert work.item_key("p", "t") == "p.t"


# claiming ---------------------------------------------------------------------------------


def test_which_classes_claim_from_shared_queues_and_how_many_at_once() -> None:
    assert not work.runs_models(["cpu"])
    assert work.runs_models(["cpu", "script"]) and work.runs_models(["llm"])
    # LLM work comes from a per-model queue while the GPU holds the model
    assert work.shared_lanes(["script", "llm", "cpu"]) == ("script", "cpu")
    assert work.lane_slots("script", slots=4, script_slots=1) == 1
    assert work.lane_slots("cpu", slots=4, script_slots=1) == 4


def test_a_control_applies_only_under_its_own_gpu_and_source() -> None:
    c = control(paused=True)
    assert work.control_for(c, "h-gpu0", "operator") is c
    assert work.control_for(c, "h-gpu0", "thermal") is None  # filed under another source's key
    assert work.control_for(c, "h-gpu1", "operator") is None  # another GPU's
    assert work.control_for(None, "h-gpu0", "operator") is None  # deleted
    assert work.control_for(ITEM, "h-gpu0", "operator") is None  # not a control


def test_a_gpu_holds_while_any_source_pauses_or_cordons_it() -> None:
    assert work.hold_reason([]) == ""
    assert work.hold_reason([control(), control("thermal")]) == ""  # resumed
    assert work.hold_reason([control("thermal", paused=True)]) == "thermal pause"
    both = [control(cordoned=True, reason="xid 79"), control("thermal", paused=True, reason="91 C")]
    assert work.hold_reason(both) == "operator cordon: xid 79; thermal pause: 91 C"


def test_which_lanes_claim() -> None:
    lanes = ["cpu", "script", "llm", work.OWN]
    assert work.lanes_enabled(lanes, held=False, llm_present=False) == {
        "cpu": True,
        "script": True,
        "llm": True,
    }
    # script work waits while an LLM is loaded or loading; the rest goes on
    assert work.lanes_enabled(lanes, held=False, llm_present=True) == {
        "cpu": True,
        "script": False,
        "llm": True,
    }
    # a held GPU claims nothing; its own queue (the brain's resource tasks) is never held
    assert work.lanes_enabled(lanes, held=True, llm_present=False) == {
        "cpu": False,
        "script": False,
        "llm": False,
    }


def test_a_lane_fetches_what_its_free_slots_take_and_runs_it_unless_held() -> None:
    assert work.room(slots=3, running=1, enabled=True) == 2
    assert work.room(slots=3, running=3, enabled=True) == 0
    assert work.room(slots=3, running=0, enabled=False) == 0
    assert work.runs_fetched("cpu", hold="")
    assert not work.runs_fetched("cpu", hold="operator pause")  # handed back for another GPU
    assert work.runs_fetched(work.OWN, hold="operator pause")


# the GPU's state --------------------------------------------------------------------------


def test_a_gpus_state_follows_what_it_holds_and_runs() -> None:
    assert work.gpu_state(work.GpuNow(), hold="") == gs.IDLE
    assert work.gpu_state(work.GpuNow(script_running=1), hold="") == gs.SCRIPT_BUSY
    assert work.gpu_state(work.GpuNow(llm="m"), hold="") == gs.LLM_READY
    assert work.gpu_state(work.GpuNow(llm="m", llm_running=1, script_running=1), hold="") == gs.LLM_BUSY
    assert work.gpu_state(work.GpuNow(llm="m", booting=gs.BOOTING_SCRIPT), hold="") == gs.BOOTING_SCRIPT
    assert work.gpu_state(work.GpuNow(booting=gs.BOOTING_LLM), hold="x") == gs.PAUSED
    assert work.gpu_state(work.GpuNow(), hold="x", override=gs.OFFLINE) == gs.OFFLINE
    assert work.GpuNow(llm_mb=4000, reserved_mb=500).mesh_used_mb == 4500


def test_a_gpus_state_goes_out_on_a_change_or_when_asked() -> None:
    assert work.gpu_report(gs.IDLE, gs.IDLE) == work.SILENT
    assert work.gpu_report(gs.IDLE, gs.IDLE, refresh=True) == work.KV_ONLY  # a fresh reading
    assert work.gpu_report(gs.IDLE, "") == work.EVENT  # the first report: (re)started
    assert work.gpu_report(gs.LLM_READY, gs.BOOTING_LLM) == work.EVENT
    assert work.gpu_report(gs.IDLE, gs.IDLE, rid="r1") == work.EVENT  # an answer to the brain
    assert work.gpu_report(gs.IDLE, gs.IDLE, error="refused") == work.EVENT
    assert work.gpu_report(gs.IDLE, gs.IDLE, force=True, refresh=True) == work.EVENT


# models -----------------------------------------------------------------------------------


def resource(action: str = "load", model: str = "m", at: float = 1000.0) -> ResourceItem:
    return ResourceItem(rid="r", worker="w", action=action, model=model, at=at)  # type: ignore[arg-type]


def test_a_resource_task_asked_long_ago_is_stale() -> None:
    assert not work.stale(resource(at=1000.0), now=1000.0 + work.RESOURCE_STALE_S)
    assert work.stale(resource(at=1000.0), now=1000.1 + work.RESOURCE_STALE_S)


def test_what_a_resource_task_asks_of_a_gpu() -> None:
    assert work.resource_step(resource("unload"), loaded="m", kind="llm") == (work.UNLOAD, "")
    assert work.resource_step(resource("unload"), loaded="", kind=None) == (work.UNLOAD, "")
    assert work.resource_step(resource(), loaded="m", kind="llm") == (work.HAVE, "")
    assert work.resource_step(resource(), loaded="other", kind="llm") == (work.LOAD, "")
    assert work.resource_step(resource(), loaded="", kind="llm") == (work.LOAD, "")
    step, why = work.resource_step(resource(), loaded="", kind="embed")
    assert step == work.REFUSE and why == "load refused: 'm' is not an llm model here"
    assert work.resource_step(resource(), loaded="", kind=None)[0] == work.REFUSE  # not in the registry
    assert work.load_refusal("m", need_mb=4000, free_mb=4000) == ""
    assert work.load_refusal("m", need_mb=4001, free_mb=4000) == (
        "load of m refused: it needs 4001 MB and 4000 MB are free"
    )


def test_a_model_task_runs_only_where_its_model_can_be() -> None:
    prompt = WorkItem(plan_id="p", task_id="t", attempt=1, kind="prompt", model="m")
    embed = WorkItem(plan_id="p", task_id="t", attempt=1, kind="embed", model="e")
    assert work.model_missing(ITEM, runs_models=False, llm="") == ""  # a shell task
    assert work.model_missing(prompt, runs_models=True, llm="m") == ""
    assert (
        work.model_missing(prompt, runs_models=True, llm="") == "m is not loaded here (this GPU holds none)"
    )
    assert work.model_missing(prompt, runs_models=True, llm="x") == "m is not loaded here (this GPU holds x)"
    assert work.model_missing(embed, runs_models=True, llm="") == ""  # loaded on first use
    assert work.model_missing(embed, runs_models=False, llm="") == "this worker runs no models (embed)"


# whether an item is still wanted ------------------------------------------------------------


def test_a_repeated_delivery_of_an_attempt_here_is_not_run_twice() -> None:
    assert work.repeat(ITEM, finished_attempt=None, running_attempt=None) == ""
    assert work.repeat(ITEM, finished_attempt=2, running_attempt=None) == work.REPEAT_DONE
    assert work.repeat(ITEM, finished_attempt=1, running_attempt=2) == work.REPEAT_RUNNING
    assert work.repeat(ITEM, finished_attempt=1, running_attempt=1) == ""  # an earlier attempt's


def test_an_item_fresh_off_the_queue_is_not_checked() -> None:
    assert not work.suspect(delivery=1, queued_s=work.FRESH_S, cancelled=False)
    assert work.suspect(delivery=2, queued_s=0.0, cancelled=False)
    assert work.suspect(delivery=1, queued_s=work.FRESH_S + 0.1, cancelled=False)
    assert work.suspect(delivery=1, queued_s=0.0, cancelled=True)
    # stored before this worker's connection came back: a server restart may have lost the
    # record of its delivery to another worker
    assert work.suspect(delivery=1, queued_s=0.0, cancelled=False, before_reconnect=True)


def test_a_suspect_item_against_its_tasks_record() -> None:
    def verdict(rec: TaskRecord | None, delivery: int = 2) -> str:
        return work.still_wanted(ITEM, rec, delivery, me="w1")

    assert verdict(None) == work.LATER  # not written yet
    assert verdict(record(PENDING, 1)) == work.RUN  # the release of attempt 2 not written yet
    assert verdict(record(READY, 2)) == work.RUN
    assert verdict(record(READY, 3)) == work.SKIP  # the brain moved past this attempt
    for final in (SUCCEEDED, FAILED, CANCELLED):
        assert verdict(record(final, 2)) == work.SKIP
    # running elsewhere: a redelivery takes over; a first delivery asks whether that worker lives
    assert verdict(record(RUNNING, 2, "w2"), delivery=2) == work.RUN
    assert verdict(record(RUNNING, 2, "w2"), delivery=1) == work.ASK
    assert verdict(record(RUNNING, 2, "w1"), delivery=1) == work.RUN  # this worker's own
    assert verdict(record(RUNNING, 2, ""), delivery=1) == work.RUN
    assert work.owner_verdict(registered=True) == work.WAIT
    assert work.owner_verdict(registered=False) == work.RUN


def test_an_item_from_before_a_server_restart_waits_for_the_workers_reports() -> None:
    """An item stored before the connection came back, that the record does not settle, is
    looked at again once any worker that took it before can have reported it; and a
    redelivery that came of the server being away says nothing of the worker running it."""

    def verdict(rec: TaskRecord | None, delivery: int = 1) -> str:
        return work.still_wanted(ITEM, rec, delivery, me="w1", restart=True, unsettled=True)

    assert verdict(record(READY, 2)) == work.SETTLE  # released; whether it started is unknown
    assert verdict(record(PENDING, 1)) == work.SETTLE  # the release's record held back
    assert verdict(record(READY, 2), delivery=2) == work.SETTLE
    # what the record does settle, it settles as before
    assert verdict(None) == work.LATER
    assert verdict(record(SUCCEEDED, 2)) == work.SKIP
    assert verdict(record(READY, 3)) == work.SKIP
    assert verdict(record(RUNNING, 2, "w2")) == work.ASK
    # no worker could keep its delivery alive while the server was away: asked, not taken over
    assert verdict(record(RUNNING, 2, "w2"), delivery=2) == work.ASK
    # settled: the record decides, and a redelivery from around the restart is still asked about
    settled = work.still_wanted(ITEM, record(READY, 2), 2, me="w1", restart=True)
    assert settled == work.RUN
    assert work.still_wanted(ITEM, record(RUNNING, 2, "w2"), 2, me="w1", restart=True) == work.ASK


def test_a_redelivery_of_a_run_started_moments_ago_is_not_a_takeover() -> None:
    """JetStream redelivers an item `ack_wait_s` after it last heard of its delivery: a run that
    started elsewhere less than half of that ago is not what it gave up on (an earlier copy of
    the item waited in a client past `ack_wait_s`, and was run once taken)."""
    rec = record(RUNNING, 2, "w2")
    rec.started_at = 100.0

    def verdict(now: float) -> str:
        return work.still_wanted(ITEM, rec, 2, me="w1", now=now, ack_wait_s=30.0)

    assert verdict(now=100.5) == work.ASK
    assert verdict(now=114.9) == work.ASK
    assert verdict(now=115.1) == work.RUN  # a silence of a worker that started it: taken over
    assert verdict(now=131.0) == work.RUN


def test_the_window_after_a_reconnection() -> None:
    back, ack_wait = 100.0, 30.0
    # stored after the reconnection, or never disconnected: nothing to suspect
    assert work.after_restart(101.0, back, 101.5, ack_wait) == (False, False)
    assert work.after_restart(50.0, 0.0, 101.0, ack_wait) == (False, False)
    # stored before it: unsettled for SETTLE_S, a redelivery asked about for ack_wait_s
    assert work.after_restart(99.0, back, back + work.SETTLE_S - 0.1, ack_wait) == (True, True)
    assert work.after_restart(99.0, back, back + work.SETTLE_S, ack_wait) == (True, False)
    assert work.after_restart(99.0, back, back + ack_wait, ack_wait) == (False, False)


def test_what_becomes_of_a_checked_delivery() -> None:
    assert work.verdict_action(work.RUN, delivery=1, max_deliveries=5) == work.RUN
    assert work.verdict_action(work.LATER, delivery=4, max_deliveries=5) == work.NAK_LATER
    assert work.verdict_action(work.LATER, delivery=5, max_deliveries=5) == work.ACK  # given up
    assert work.verdict_action(work.SKIP, delivery=1, max_deliveries=5) == work.ACK
    assert work.verdict_action(work.WAIT, delivery=1, max_deliveries=5) == work.ACK
    assert work.dead_letter_why(5, 5) == ""
    assert work.dead_letter_why(6, 5) == (
        "delivered 6 times (more than max_deliveries=5); every worker that took it stopped heartbeating"
    )


# reports ----------------------------------------------------------------------------------


def test_a_first_deliverys_start_report_waits_a_redeliverys_goes_at_once() -> None:
    assert work.start_report_after(1, 0.02) == 0.02
    assert work.start_report_after(2, 0.02) == 0.0
    # in a batch, each task's share of the one call is what counts as short
    assert work.start_report_after(1, 0.02, 64) == pytest.approx(1.28)
    assert work.start_report_after(2, 0.02, 64) == 0.0
    ev = work.run_started(ITEM, "w1", at=5.0, delivery=3)
    assert ev == RunStarted(
        plan_id="p", task_id="t", attempt=2, worker="w1", at=5.0, delivery=3, claim=ITEM.claim
    )


def finished(item: WorkItem, result: RunResult, sensitive: bool = False, **kw: object) -> RunFinished:
    args: dict[str, object] = {
        "worker": "w1",
        "at": 9.0,
        "started_at": 8.0,
        "sensitive": sensitive,
        "output": "",
        "output_object": "",
        "prompt_limit": 4,
        "gpu": "",
        **kw,
    }
    return work.run_finished(item, result, **args)  # type: ignore[arg-type]


def test_a_run_finished_says_what_the_run_did() -> None:
    result = RunResult(
        ok=False,
        duration_s=1.5,
        rc=2,
        timed_out=True,
        error="boom",
        stdout_tail="out",
        stderr_tail="err",
        stdout_bytes=3,
        stderr_bytes=3,
        definition_error=True,
        prompt="a long prompt",
        metrics={"tokens_out": 3.0},
        artifacts=["a.txt"],
    )
    ev = finished(ITEM, result, output="o", output_object="", gpu="h-gpu0")
    assert (ev.plan_id, ev.task_id, ev.attempt, ev.worker, ev.claim) == ("p", "t", 2, "w1", ITEM.claim)
    assert (ev.at, ev.started_at, ev.ok, ev.duration_s, ev.rc, ev.timed_out) == (
        9.0,
        8.0,
        False,
        1.5,
        2,
        True,
    )
    assert (ev.error, ev.stdout_tail, ev.stderr_tail, ev.output, ev.gpu) == (
        "boom",
        "out",
        "err",
        "o",
        "h-gpu0",
    )
    assert ev.reason == "definition" and ev.prompt == "a lo"  # cut to the event's limit
    assert ev.metrics == {"tokens_out": 3.0} and ev.artifacts == ("a.txt",)
    assert ev.model == "" and not ev.sensitive and not ev.dead_letter  # a shell task names no model
    prompt = WorkItem(plan_id="p", task_id="t", attempt=1, kind="prompt", model="m")
    assert finished(prompt, RunResult(ok=True, duration_s=0.1)).model == "m"


def test_a_sensitive_run_finished_leaves_out_what_the_run_saw() -> None:
    result = RunResult(ok=True, duration_s=0.1, stdout_tail="secret", stderr_tail="secret", prompt="secret")
    ev = finished(ITEM, result, sensitive=True, output_object="outputs/p/t/2")
    assert (ev.stdout_tail, ev.stderr_tail, ev.prompt, ev.output) == ("", "", "", "")
    assert ev.sensitive and ev.output_object == "outputs/p/t/2"


def test_a_sensitive_answer_is_not_quoted_by_its_schema_error() -> None:
    """A schema's complaint names the answer's values: a sensitive run reports it without them."""
    from mesh.host.executors import checked_answer

    item = WorkItem(
        plan_id="p",
        task_id="t",
        attempt=1,
        kind="prompt",
        schema='{"properties": {"n": {"type": "integer"}}}',
    )
    answer = '{"n": "AKIA-hunter2-password"}'
    result = checked_answer(item, RunResult(ok=True, duration_s=0.1, output=answer))
    assert not result.ok and "hunter2" in result.error  # for a task that is not sensitive: all of it
    hidden = finished(item, result, sensitive=True)
    assert "hunter2" not in hidden.error and "schema" in hidden.error and "withheld" in hidden.error
    assert finished(item, result).error == result.error
    # an error that quotes nothing is reported as it is
    plain = finished(item, RunResult(ok=False, duration_s=0.1, error="timed out after 3s"), sensitive=True)
    assert plain.error == "timed out after 3s"


def test_an_output_goes_in_the_event_when_it_fits_and_is_not_sensitive() -> None:
    assert work.output_in_event("abcd", sensitive=False, limit=4)
    assert not work.output_in_event("abcde", sensitive=False, limit=4)
    assert not work.output_in_event("é" * 3, sensitive=False, limit=4)  # bytes, not characters
    assert not work.output_in_event("a", sensitive=True, limit=4)
    assert work.output_object_name(ITEM) == "outputs/p/t/2"
    assert work.output_cut("abcdef", sensitive=False, limit=4) == "abcd"
    assert work.output_cut("abcdef", sensitive=True, limit=4) == ""


def test_a_sensitive_shell_tasks_stdout_is_kept_as_its_output() -> None:
    shell = RunResult(ok=True, duration_s=0.1, stdout_tail="hush\n")
    # its report carries no tails: its stdout is its output (bound for the store only)
    assert work.output_to_keep(shell, sensitive=True) == "hush\n"
    # any other task's stdout is in its report already, and a model's output is its own
    assert work.output_to_keep(shell, sensitive=False) == ""
    model = RunResult(ok=True, duration_s=0.1, output="answer", stdout_tail="log")
    assert work.output_to_keep(model, sensitive=True) == "answer"


def test_a_dead_letter_fails_its_task_with_why() -> None:
    ev = work.dead_letter_report(ITEM, "w1", at=7.0, why="delivered 6 times")
    assert ev == RunFinished(
        plan_id="p",
        task_id="t",
        attempt=2,
        worker="w1",
        at=7.0,
        ok=False,
        duration_s=0.0,
        error="delivered 6 times",
        dead_letter=True,
        claim=ITEM.claim,
    )
    assert ev.started_at == 0.0  # it never started


def test_a_load_needs_what_the_brain_placed_it_for() -> None:
    """The brain places by the VRAM it learned a model takes; the worker checks free memory against
    that figure, not its registry's guess (else it refuses loads the brain rightly asked for)."""
    learned = ResourceItem(rid="r", worker="w", action="load", model="m", at=0.0, vram_mb=3000)
    old_brain = ResourceItem(rid="r", worker="w", action="load", model="m", at=0.0)
    assert work.load_need_mb(learned, registry_mb=5600) == 3000
    assert work.load_need_mb(old_brain, registry_mb=5600) == 5600
    free = 4000
    assert work.load_refusal("m", work.load_need_mb(learned, 5600), free) == ""
    assert work.load_refusal("m", work.load_need_mb(old_brain, 5600), free) != ""
