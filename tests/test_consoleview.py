"""The web console's pure decisions: the DAG's layered layout and its windows, the status each
task event stands for, where it may serve, and the role a token grants."""

from __future__ import annotations

import random

import msgspec
import pytest

from mesh import events
from mesh.consoleview import (
    OPERATOR,
    STATUS_OF_EVENT,
    VIEWER,
    bind_problem,
    host_allowed,
    is_loopback,
    layout,
    role_of,
    window,
    withhold,
)
from mesh.status import TaskStatus


def test_a_diamond_is_three_layers_with_every_edge_pointing_down() -> None:
    # seed -> left, right -> join; and a lone task
    deps = [[], [0], [0], [1, 2], []]
    lay = layout(deps)
    assert lay.layer == [0, 1, 1, 2, 0]
    assert lay.rows == [[0, 4], [1, 2], [3]]
    assert lay.width == 2
    for i, ds in enumerate(deps):
        assert all(lay.layer[d] < lay.layer[i] for d in ds)


def test_a_task_is_drawn_under_the_mean_of_its_dependencies() -> None:
    # layer 0: a b c ; layer 1: x (under c), y (under a): y comes first
    deps = [[], [], [], [2], [0]]
    lay = layout(deps)
    assert lay.rows[1] == [4, 3]
    assert lay.pos[4] == 0 and lay.pos[3] == 1


def test_unknown_dependencies_and_cycles_do_not_break_the_layout() -> None:
    lay = layout([[7, -1], [2], [1]])
    assert lay.layer[0] == 0
    assert lay.layer[1] == lay.layer[2] == 1  # the cycle, below the rest


def test_a_hundred_thousand_task_plan_is_laid_out_and_windowed() -> None:
    rnd = random.Random(7)
    n = 100_000
    deps = [[] if i < 100 else rnd.sample(range(max(0, i - 500), i), 2) for i in range(n)]
    lay = layout(deps)
    assert len(lay.layer) == n and sum(len(r) for r in lay.rows) == n
    for i in range(0, n, 997):
        assert all(lay.layer[d] < lay.layer[i] for d in deps[i])
    shown = window(lay, 3, 2, 5, 10)
    assert len(shown) == 20 and {lay.layer[i] for i in shown} == {3, 4}
    assert all(5 <= lay.pos[i] < 15 for i in shown)
    assert window(lay, len(lay.rows) + 5, 10, 0, 10) == []


def test_every_task_event_that_sets_a_status_is_mapped_to_a_real_one() -> None:
    tags = {
        t.__struct_config__.tag
        for t in events.__dict__.values()
        if isinstance(t, type) and hasattr(t, "__struct_config__")
    }
    for tag, status in STATUS_OF_EVENT.items():
        assert tag in tags, f"{tag} is no event"
        assert status in set(TaskStatus)
    assert STATUS_OF_EVENT["task.succeeded"] == "succeeded" and STATUS_OF_EVENT["task.started"] == "running"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("rig.local", False),
    ],
)
def test_loopback_is_this_machine_alone(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_off_loopback_needs_an_operator_token_and_tokens_must_be_secrets() -> None:
    strong, other = "s" * 32, "r" * 32
    assert bind_problem("127.0.0.1", "", "") == ""
    assert "web_token" in bind_problem("0.0.0.0", "", "")
    assert "web_token" in bind_problem("0.0.0.0", "", other)
    assert bind_problem("0.0.0.0", strong, other) == ""
    assert "too short" in bind_problem("0.0.0.0", "short", "")
    assert "the same" in bind_problem("0.0.0.0", strong, strong)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8470", True),
        ("localhost:8470", True),
        ("[::1]:8470", True),
        ("localhost", True),
        ("evil.example:8470", False),
        ("evil.example", False),
        ("", False),
        ("10.0.0.5:8470", False),
    ],
)
def test_with_no_tokens_only_this_machines_names_are_answered(host: str, allowed: bool) -> None:
    assert host_allowed(host, "", "") is allowed
    assert host_allowed(host, "o" * 32, "")  # a token decides instead


def test_the_role_a_token_grants() -> None:
    op, ro = "o" * 32, "v" * 32
    assert role_of("", "", "") == OPERATOR  # no tokens: loopback, everyone acts
    assert role_of(op, op, ro) == OPERATOR
    assert role_of(ro, op, ro) == VIEWER
    assert role_of("", op, ro) is None
    assert role_of("o" * 31, op, ro) is None
    assert role_of(ro, op, "") is None


def test_a_sensitive_tasks_events_and_record_show_nothing_it_saw_or_made() -> None:
    """What `mesh output` withholds of a sensitive task is withheld from the task page too:
    outputs, prompts, Claude's answer and follow-ups, a reviewer's answer, an escalation's
    inputs and its attempts' outputs, the task's environment; its facts stay."""
    spec = events.TaskSpec(id="t", body="echo {KEY}", env={"KEY": "hunter2"}, inputs=("dep",))
    shown = [
        events.RunFinished(
            plan_id="p",
            task_id="t",
            attempt=1,
            worker="w",
            ok=True,
            at=1.0,
            duration_s=2.0,
            output="s3cret",
            stdout_tail="s3cret",
            stderr_tail="s3cret",
            prompt="s3cret",
        ),
        events.EscalationAnswered(
            rid="r",
            plan_id="p",
            task_id="t",
            attempt=1,
            at=1.0,
            model="m",
            result="s3cret",
            followups="s3cret",
            prompt="s3cret",
            system="s3cret",
        ),
        events.TaskReviewed(plan_id="p", task_id="t", attempt=1, at=1.0, verdict="retry", answer="s3cret"),
        events.EscalationRequest(
            rid="r",
            plan_id="p",
            task_id="t",
            attempt=1,
            at=1.0,
            why="review",
            task=spec,
            attempts=(events.LocalAttempt(attempt=1, output="s3cret", error="exit 1"),),
            inputs={"dep": "s3cret"},
        ),
    ]
    for ev in shown:
        item = withhold(msgspec.to_builtins(ev))
        assert "s3cret" not in str(item) and "hunter2" not in str(item), item
        assert item["plan_id"] == "p" and item["attempt"] == 1
    request = withhold(msgspec.to_builtins(shown[-1]))
    assert request["attempts"][0]["error"] == "exit 1" and list(request["task"]["inputs"]) == ["dep"]
    assert request["task"]["env"] == {"KEY": "(withheld)"} and request["task"]["body"] == "echo {KEY}"
