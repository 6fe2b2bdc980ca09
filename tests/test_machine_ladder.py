"""The brain's state machine and the escalation ladder: a prompt task that fails on its model
climbs to the bigger local models its ladder names, one rung at a time, and only then (when the
ladder says so) goes to Claude. No server needed."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.errors import PlanError
from mesh.events import (
    EscalationPolicy,
    EscalationRequest,
    PlanRejected,
    RetryTasks,
    TaskClimbed,
    TaskEscalated,
    TaskFailed,
    TaskRetrying,
    TaskSpec,
    decode,
    encode,
)
from mesh.machine import Policy, replay, work_item
from mesh.placement import PlacementPolicy
from mesh.plan import parse_plan
from mesh.records import ESCALATING, FAILED, READY, SUCCEEDED, TaskRecord, decode_task
from tests.test_machine import Driver, of_task, plan, reload, snapshot, statuses, task
from tests.test_machine_escalation import answer

REGISTRY = {"small": ("llm", 1000), "mid": ("llm", 4000), "big": ("llm", 9000), "vec": ("embed", 500)}


def prompt(tid: str, *deps: str, **kw: Any) -> TaskSpec:
    kw.setdefault("model", "small")
    return task(tid, *deps, kind="prompt", cls="llm", **kw)


def climbs(d: Driver, task_id: str, plan_id: str = "p1") -> list[TaskClimbed]:
    return [e for e in of_task(d.events, task_id, plan_id) if isinstance(e, TaskClimbed)]


def requests(d: Driver) -> list[EscalationRequest]:
    return [r for step in d.steps for r in step.escalations]


def fail(d: Driver, task_id: str, times: int, plan_id: str = "p1", **kw: Any) -> list[str]:
    """Fail the task's next `times` attempts, waiting out each backoff; the models they ran on."""
    models = []
    for n in range(times):
        item = d.take(task_id, plan_id)
        models.append(item.model)
        d.run(item, ok=False, error=kw.get("error", f"boom {n}"))
        d.tick(at=d.now + 600)
    return models


def assert_replays(d: Driver) -> None:
    """The history (through the wire) and the records read back both rebuild the live state."""
    wire = [decode(encode(e)) for e in d.events]
    assert snapshot(replay(wire)) == snapshot(d.state)
    assert snapshot(reload(d.state, 60.0)) == snapshot(d.state)


def test_a_task_that_spends_its_retries_climbs_to_the_next_model_with_an_event() -> None:
    d = Driver()
    d.submit(plan(prompt("ask", retries=1, escalate=("mid", "big"))))
    assert fail(d, "ask", 2) == ["small", "small"]  # its own model, retried once
    (climb,) = climbs(d, "ask")
    assert (climb.tier, climb.model, climb.from_model, climb.why) == (1, "mid", "small", "local_failures")
    assert climb.attempt == 2 and climb.after is not None and climb.after.error == "boom 1"
    rec = d.state.tasks["p1.ask"]
    assert (rec.tier, rec.tier_model, rec.status) == (1, "mid", READY)
    # the next attempt is on the bigger model, and placement sees the demand for it
    assert d.state.demand.get("llm:mid") == 1 and not d.state.demand.get("llm:small")
    # retries count afresh on each rung: two attempts on mid, then big
    assert fail(d, "ask", 2) == ["mid", "mid"]
    steps = [(c.tier, c.model, c.from_model) for c in climbs(d, "ask")]
    assert steps == [(1, "mid", "small"), (2, "big", "mid")]
    assert [e.attempt for e in of_task(d.events, "ask") if isinstance(e, TaskRetrying)] == [1, 3]
    item = d.take("ask")
    assert (item.model, item.attempt) == ("big", 5)
    # the failures of every rung are kept (what Claude would be shown)
    assert [a.attempt for a in d.state.tasks["p1.ask"].attempts] == [1, 2, 3, 4]
    assert_replays(d)


def test_failing_on_the_last_local_rung_goes_to_claude_when_the_ladder_says_so() -> None:
    d = Driver()
    d.submit(plan(prompt("ask", retries=0, escalate=("big", "claude")), task("after", "ask")))
    assert fail(d, "ask", 2) == ["small", "big"]
    (req,) = requests(d)
    assert req.why == "local_failures" and [a.attempt for a in req.attempts] == [1, 2]
    assert req.attempt == 3
    rec = d.state.tasks["p1.ask"]
    assert rec.status == ESCALATING and rec.answered_by == "claude" and rec.tier == 1
    kinds = [type(e) for e in of_task(d.events, "ask")]
    assert TaskFailed not in kinds and kinds.count(TaskClimbed) == 1 and kinds[-1] is TaskEscalated
    answer(d, req, result="from claude")
    assert statuses(d.state) == {"ask": SUCCEEDED, "after": READY}
    assert_replays(d)


def test_failing_on_the_last_rung_without_claude_fails_for_good() -> None:
    d = Driver()
    d.submit(plan(prompt("ask", retries=0, escalate=("mid", "big")), task("after", "ask")))
    assert fail(d, "ask", 3) == ["small", "mid", "big"]
    assert not requests(d)
    assert statuses(d.state) == {"ask": FAILED, "after": FAILED}
    (failed,) = [e for e in of_task(d.events, "ask") if isinstance(e, TaskFailed)]
    assert failed.attempt == 3 and failed.error == "boom 2"
    assert d.state.tasks["p1.ask"].tier_model == "big"
    assert_replays(d)


def test_a_task_that_succeeds_on_the_second_rung_releases_its_dependents() -> None:
    d = Driver()
    ask = prompt("ask", retries=0, escalate=("big", "claude"))
    d.submit(plan(ask, prompt("use", "ask", inputs=("ask",))))
    fail(d, "ask", 1)
    item = d.take("ask")
    assert item.model == "big"
    d.run(item, output="the big model's answer", model="big")
    rec = d.state.tasks["p1.ask"]
    assert (rec.status, rec.attempt, rec.tier_model, rec.answered_by) == (SUCCEEDED, 2, "big", "big")
    # the dependent runs on its own model, reading the output of the attempt that succeeded (2)
    (use,) = [w for w in d.work if w.task_id == "use"]
    assert use.model == "small" and use.inputs == ("ask",)
    assert not requests(d)
    # what was learned of the run is the big model's
    assert d.state.learned.duration.get("big") is not None and d.state.learned.duration.get("small") is None
    assert_replays(d)


def test_the_existing_criteria_climb_a_rung_instead_of_going_to_claude() -> None:
    # automatic escalation after one failure: up one rung each time, then Claude
    d = Driver()
    auto = EscalationPolicy(auto=True, after=1)
    d.submit(plan(prompt("ask", retries=5, escalate=("big", "claude")), escalation=auto))
    fail(d, "ask", 1)
    assert [(c.model, c.why) for c in climbs(d, "ask")] == [("big", "local_failures")]
    fail(d, "ask", 1)
    (req,) = requests(d)
    assert req.why == "local_failures"
    # a review that says ESCALATE climbs too
    r = Driver(policy=Policy(review_model="judge"))
    r.submit(plan(prompt("ask", retries=3, escalate=("big",)), escalation=EscalationPolicy(review=True)))
    fail(r, "ask", 1)
    r.run(r.take("ask"), stdout_tail="ESCALATE")
    assert [(c.model, c.why, c.attempt) for c in climbs(r, "ask")] == [("big", "review", 1)]
    rec = r.state.tasks["p1.ask"]
    assert (rec.tier, rec.reviews, rec.base_attempt, rec.status) == (1, 0, 2, READY)
    assert r.take("ask").model == "big"
    assert_replays(r)


def test_at_the_top_of_a_ladder_without_claude_the_criteria_leave_the_task_local() -> None:
    auto = EscalationPolicy(auto=True, after=1, review=True)
    d = Driver(policy=Policy(review_model="judge"))
    d.submit(plan(prompt("ask", retries=1, escalate=("big",)), escalation=auto))
    fail(d, "ask", 1)  # auto: up to big at once
    assert [c.model for c in climbs(d, "ask")] == ["big"]
    fail(d, "ask", 2)  # on big: no review (nowhere to go), retried, then failed
    assert not requests(d) and statuses(d.state) == {"ask": FAILED}
    assert all(e.model != "judge" for e in d.work)


def test_a_sensitive_task_never_climbs_to_claude_unless_its_plan_allows_it() -> None:
    d = Driver()
    d.submit(plan(prompt("secret", retries=0, sensitive=True, escalate=("big", "claude"))))
    assert fail(d, "secret", 2) == ["small", "big"]  # local rungs are fine
    assert not requests(d) and statuses(d.state) == {"secret": FAILED}
    allowed = EscalationPolicy(sensitive=True)
    secret = prompt("secret", retries=0, sensitive=True, escalate=("claude",))
    d.submit(plan(secret, escalation=allowed), "p2")
    fail(d, "secret", 1, plan_id="p2")
    assert [r.task_id for r in requests(d)] == ["secret"]


def test_a_brain_restarted_mid_ladder_keeps_the_rung() -> None:
    d = Driver()
    d.submit(plan(prompt("ask", retries=0, escalate=("mid", "big"))))
    fail(d, "ask", 1)
    (item,) = d.work
    assert item.model == "mid"
    # an old record, without the field, still decodes: on its own model
    old = decode_task(b'{"plan_id":"p","task_id":"t","spec":{"id":"t","body":"x"}}')
    assert (old.tier, old.tier_model, old.spec.escalate) == (0, "", ())
    for state in (reload(d.state, 60.0), replay([decode(encode(e)) for e in d.events])):
        restored = Driver(state=state, now=d.now)
        rec = restored.state.tasks["p1.ask"]
        assert (rec.tier, rec.tier_model) == (1, "mid")
        # what a restarted brain publishes again for the ready attempt: the same item
        assert work_item(restored.state, rec, restored.policy.claim_key) == item
        assert restored.state.demand.get("llm:mid") == 1
        restored.work = [item]
        assert fail(restored, "ask", 2) == ["mid", "big"]
        assert statuses(restored.state) == {"ask": FAILED}


def test_an_operators_retry_starts_the_task_on_its_own_model_again() -> None:
    d = Driver()
    d.submit(plan(prompt("ask", retries=0, escalate=("big",))))
    fail(d, "ask", 2)
    assert statuses(d.state) == {"ask": FAILED}
    d.feed(RetryTasks(plan_id="p1", at=d.now))
    rec = d.state.tasks["p1.ask"]
    assert (rec.tier, rec.status) == (0, READY)
    assert d.take("ask").model == "small" and d.state.demand.get("llm:small") == 1
    assert not d.state.demand.get("llm:big")
    assert_replays(d)


# ---------------------------------------------------------------- the ladder at submission


def registry_driver() -> Driver:
    return Driver(
        policy=Policy(
            release_window=4,
            default_models={"llm": "small", "embed": "vec"},
            placement=PlacementPolicy(models=REGISTRY),
        )
    )


def rejection(d: Driver, spec: TaskSpec) -> str:
    step = d.submit(plan(spec), plan_id=f"p{len(d.steps)}")
    rejected = [e for e in step.events if isinstance(e, PlanRejected)]
    return rejected[0].error if rejected else ""


@pytest.mark.parametrize(
    ("ladder", "needle"),
    [
        (("qwen-14b",), "climbs to model 'qwen-14b'"),
        (("vec",), "which is of kind embed"),
        (("small",), "the model it runs on already"),
        (("claude", "big"), "before the end of its escalation ladder"),
        (("big", "big"), "names 'big' twice"),
        (("no good",), "letters, digits"),
    ],
)
def test_a_ladder_naming_an_unknown_model_or_claude_not_last_is_rejected(
    ladder: tuple[str, ...], needle: str
) -> None:
    d = registry_driver()
    error = rejection(d, TaskSpec(id="ask", body="q", kind="prompt", cls="llm", escalate=ladder))
    assert needle in error, error
    assert not d.work


def test_a_good_ladder_is_accepted_and_local_rungs_need_a_local_prompt() -> None:
    d = registry_driver()
    good = TaskSpec(id="ask", body="q", kind="prompt", cls="llm", escalate=("big", "claude"))
    assert rejection(d, good) == ""
    assert rejection(d, task("sh", escalate=("claude",))) == ""  # Claude alone: any task
    assert "climbs to local models" in rejection(d, task("sh", escalate=("big",)))
    ext = TaskSpec(id="x", body="q", kind="prompt", cls="external", escalate=("big",))
    assert "climbs to local models" in rejection(d, ext)


LADDER_PLAN = """\
# ladder

## Escalation
- ladder: {ladder}

## Tasks

### ask
- model: small

```prompt
What is 2 + 2?
```

### own
- escalate: big

```prompt
What is 3 + 3?
```

### shell

```shell
echo hi
```
"""


def test_the_plan_parser_reads_a_task_ladder_and_the_plans_default() -> None:
    spec = parse_plan(LADDER_PLAN.format(ladder="mid, big, claude"))
    ladders = {t.id: t.escalate for t in spec.tasks}
    assert ladders == {"ask": ("mid", "big", "claude"), "own": ("big",), "shell": ()}
    assert spec.escalation.ladder == ("mid", "big", "claude")
    with pytest.raises(PlanError) as exc:
        parse_plan(LADDER_PLAN.format(ladder="claude, big"))
    assert "<plan>:4:" in str(exc.value) and "last rung" in str(exc.value)
    bad = LADDER_PLAN.format(ladder="big").replace("```shell", "- escalate: big\n\n```shell")
    with pytest.raises(PlanError) as exc:
        parse_plan(bad)
    assert "climbs to local models" in str(exc.value)


def test_a_record_says_who_answered() -> None:
    spec = TaskSpec(id="t", body="q", model="small", escalate=("big",))
    rec = TaskRecord(plan_id="p", task_id="t", spec=spec)
    assert (rec.tier_model, rec.answered_by) == ("small", "small")
    rec.tier = 1
    assert rec.tier_model == "big"
    rec.escalated = "local_failures"
    assert rec.answered_by == "claude"


def test_mesh_status_shows_the_rung_a_task_is_on_or_ended_on() -> None:
    from rich.console import Console

    from mesh.cli.render import model_cell, tasks_table

    d = Driver()
    d.submit(plan(prompt("ask", retries=0, escalate=("big", "claude")), prompt("plain", retries=0)))
    assert model_cell(d.state.tasks["p1.ask"]) == "small (tier 1/3)"
    fail(d, "ask", 1)
    assert model_cell(d.state.tasks["p1.ask"]) == "big (tier 2/3)"
    fail(d, "ask", 1)
    assert model_cell(d.state.tasks["p1.ask"]) == "claude (tier 3/3)"
    assert model_cell(d.state.tasks["p1.plain"]) == "small"  # no ladder: the model alone
    console = Console(width=200, record=True)
    console.print(tasks_table(d.state.plans["p1"], d.state.plan_tasks("p1")))
    text = console.export_text()
    assert "model" in text and "claude (tier 3/3)" in text


def test_a_climb_is_the_brains_to_say_on_its_own_task_subject() -> None:
    from mesh.bus.route import misplaced, route
    from mesh.names import Names

    names = Names()
    climb = TaskClimbed(plan_id="p1", task_id="ask", attempt=2, at=1.0, tier=1, model="big")
    subject, msg_id = route(names, climb)
    assert subject == names.task_event("p1", "ask", "climbed") and msg_id == "p1.ask:2:climbed"
    assert subject.startswith(names.task_events_all[:-1])  # where only the brain may publish
    assert misplaced(names, subject, climb) == ""
    # said on another task's subject, or as a worker's report, it is refused
    assert "belongs on" in misplaced(names, names.task_event("p1", "other", "climbed"), climb)
    assert "belongs on" in misplaced(names, names.run_event("p1", "ask", "climbed", "w1"), climb)
    # and the brain takes none as an input
    d = Driver()
    assert "does not take" in d.feed(climb).ignored


def test_the_ladder_example_parses_with_its_ladders() -> None:
    from pathlib import Path

    from mesh.host.planfiles import load_plan

    example = load_plan(Path(__file__).parent.parent / "plans" / "examples" / "ladder.md")
    ladders = {t.id: (t.model, t.escalate) for t in example.tasks}
    assert ladders == {
        "notes": ("", ()),
        "triage": ("qwen-7b", ("qwen-14b", "claude")),
        "summary": ("qwen-7b", ("qwen-14b",)),
        "report": ("qwen-7b", ("qwen-14b",)),
    }
