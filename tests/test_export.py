"""`mesh export`: the event history as training data, against a real nats-server.

The first tests run real plans on real agents (a brain, a CPU worker, and a model worker with
the real Gemma 3 270M) and check the exported records field by field against the history the
agents wrote. The escalation join is checked with `esc.answered` / `esc.failed` events this
test publishes itself (real events on a real server, as the gateway publishes them), together
with the transitions around them, as are the orderings a live mesh rarely shows on cue: a
report that arrives after its attempt was cancelled, or after it was given up as lost.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mesh import events
from mesh.bus import Bus
from mesh.errors import ExportError
from mesh.events import (
    EscalationAnswered,
    EscalationFailed,
    Msg,
    PlanAccepted,
    PlanFinished,
    PlanSpec,
    RunFinished,
    TaskCancelled,
    TaskFailed,
    TaskReleased,
    TaskRetrying,
    TaskSpec,
    TaskStarted,
    TaskSucceeded,
)
from mesh.export import Options, export, parse_point
from mesh.history import read_history
from tests.conftest import Mesh

LLM = "gemma3-270m"
PLAN_TIMEOUT_S = 180.0


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def load_manifest(out: Path) -> dict[str, Any]:
    data = json.loads(out.with_suffix(".manifest.json").read_text())
    assert isinstance(data, dict)
    return data


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"one record per attempt: {ids}"
    return {r["id"]: r for r in records}


# ------------------------------------------------------------------ options


def test_window_points_and_bad_options_say_what_to_write(tmp_path: Path) -> None:
    assert parse_point("seq:1234", "--since").seq == 1234
    assert parse_point("2h", "--since", now=10_000.0).at == 10_000.0 - 7200
    assert parse_point("1700000000", "--until").at == 1_700_000_000.0
    for bad, says in [
        ("seq:", "seq:N"),
        ("seq:0", "seq:N"),
        ("seq:12x", "seq:N"),
        ("yesterday-ish", "seq:1234"),
    ]:
        with pytest.raises(ExportError, match=says):
            parse_point(bad, "--since")
    out = tmp_path / "x.jsonl"
    cases: list[tuple[Options, str]] = [
        (Options(out=out, fmt="csv"), "--format 'csv': use one of chat, raw"),
        (Options(out=out, cls="gpu"), "--class 'gpu': use one of cpu, script, llm, external"),
        (Options(out=out, status="done"), "--status 'done': use one of succeeded, failed, cancelled"),
        (Options(out=out, plan_id="a.b"), "--plan: plan id 'a.b'"),
        (Options(out=tmp_path), "is a directory"),
        (Options(out=tmp_path / "nope" / "x.jsonl"), "does not exist; create it first"),
        (
            Options(out=out, since=parse_point("seq:9", "s"), until=parse_point("seq:3", "u")),
            "--until seq:3 is before --since seq:9",
        ),
    ]
    for options, says in cases:
        with pytest.raises(ExportError, match=says.replace("(", r"\(").replace(")", r"\)")):
            options.check()
    assert Options(out=out).manifest_path == tmp_path / "x.manifest.json"


def test_parquet_without_pyarrow_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh.export import _ParquetSink

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ExportError, match=r"Parquet output needs pyarrow.*pip install pyarrow"):
        _ParquetSink(tmp_path / "x.parquet", "chat")


# ------------------------------------------------------------------ the join, event by event


async def publish(bus: Bus, *evs: Msg) -> None:
    """Publish events as their writers do: the escalation answers on their subjects (the
    gateway's), everything else routed as the brain and workers route it."""
    for ev in evs:
        tag = events.type_of(ev)
        if isinstance(ev, EscalationAnswered | EscalationFailed):
            kind = tag.split(".", 1)[1]
            subject = bus.names.esc_event(ev.plan_id, ev.task_id, kind)
            await bus.publish(subject, ev, f"esc:{ev.plan_id}.{ev.task_id}:{ev.attempt}:{kind}")
        else:
            await bus.emit(ev)


def hand_plan() -> PlanSpec:
    return PlanSpec(
        title="by hand",
        tasks=(
            TaskSpec(
                id="ext", body="Summarise the incident; page ops@example.org", kind="prompt", cls="external"
            ),
            TaskSpec(id="ext-broke", body="Plan the migration", kind="prompt", cls="external"),
            TaskSpec(id="cut", body="sleep 60"),
            TaskSpec(id="cut-quiet", body="sleep 61"),
            TaskSpec(id="lost", body="make"),
            TaskSpec(id="leak", body="cat ~/.netrc", sensitive=True),
            TaskSpec(id="open", body="sleep 1000"),
            TaskSpec(id="dep", body="true", depends_on=("ext-broke",)),
        ),
        source="hand.md",
    )


async def test_escalations_cancels_lost_attempts_and_leaks_are_joined_as_they_happened(
    mesh: Mesh, tmp_path: Path
) -> None:
    bus = await mesh.bus()
    p, t = "hand", time.time()
    answer = "Restart the database on 10.1.2.3, then tell ops@example.org."
    await publish(
        bus,
        PlanAccepted(plan_id=p, plan=hand_plan(), at=t),
        # Claude answers an external task
        TaskReleased(plan_id=p, task_id="ext", attempt=1, at=t),
        EscalationAnswered(
            rid="r1",
            plan_id=p,
            task_id="ext",
            attempt=1,
            at=t + 2.5,
            model="claude-test",
            result=answer,
            tokens_in=120,
            tokens_out=40,
            cost_usd=0.0012,
            duration_s=2.5,
            redacted={"email": 1},
            system="You advise the brain of a mesh.",
            prompt="Summarise the incident; page [REDACTED:email]",
        ),
        TaskSucceeded(plan_id=p, task_id="ext", attempt=1, worker="gateway", at=t + 2.6, rc=None),
        # and is not asked: the budget is spent
        TaskReleased(plan_id=p, task_id="ext-broke", attempt=1, at=t),
        EscalationFailed(
            rid="r2",
            plan_id=p,
            task_id="ext-broke",
            attempt=1,
            at=t + 1,
            reason="budget",
            error="budget spent",
        ),
        TaskFailed(
            plan_id=p, task_id="ext-broke", attempt=1, at=t + 1, reason="error", error="no answer: budget"
        ),
        TaskFailed(
            plan_id=p, task_id="dep", attempt=0, at=t + 1, reason="dependency", error="ext-broke failed"
        ),
        # cancelled while running: the worker's report follows the cancel (or never comes)
        TaskStarted(plan_id=p, task_id="cut", attempt=1, worker="w1", at=t),
        TaskStarted(plan_id=p, task_id="cut-quiet", attempt=1, worker="w1", at=t),
        TaskCancelled(plan_id=p, task_id="cut", attempt=1, at=t + 3, reason="cancelled by operator"),
        TaskCancelled(plan_id=p, task_id="cut-quiet", attempt=1, at=t + 3, reason="cancelled by operator"),
        RunFinished(
            plan_id=p,
            task_id="cut",
            attempt=1,
            worker="w1",
            at=t + 3.2,
            ok=False,
            duration_s=3.2,
            rc=-15,
            cancelled=True,
            error="cancelled; process group killed",
            stdout_tail="half",
            stdout_bytes=4,
        ),
        # given up as lost; its worker reports after all, after the retry began
        TaskStarted(plan_id=p, task_id="lost", attempt=1, worker="w1", at=t),
        TaskRetrying(
            plan_id=p, task_id="lost", attempt=1, at=t + 40, retry_at=t + 41, reason="lost", worker="w1"
        ),
        TaskStarted(plan_id=p, task_id="lost", attempt=2, worker="w2", at=t + 41),
        RunFinished(
            plan_id=p, task_id="lost", attempt=1, worker="w1", at=t + 42, ok=True, duration_s=42.0, rc=0
        ),
        RunFinished(
            plan_id=p,
            task_id="lost",
            attempt=2,
            worker="w2",
            at=t + 43,
            ok=True,
            duration_s=1.5,
            rc=0,
            stdout_tail="built\n",
        ),
        TaskSucceeded(plan_id=p, task_id="lost", attempt=2, worker="w2", at=t + 43, duration_s=1.5, rc=0),
        # a sensitive task whose report holds its output (a worker that broke the rule)
        TaskStarted(plan_id=p, task_id="leak", attempt=1, worker="w2", at=t),
        RunFinished(
            plan_id=p,
            task_id="leak",
            attempt=1,
            worker="w2",
            at=t + 1,
            ok=True,
            duration_s=0.5,
            rc=0,
            stdout_tail="machine x login me password hunter2",
            sensitive=True,
        ),
        TaskSucceeded(plan_id=p, task_id="leak", attempt=1, worker="w2", at=t + 1, duration_s=0.5, rc=0),
        # still running when the export reads
        TaskStarted(plan_id=p, task_id="open", attempt=1, worker="w2", at=t),
    )
    # another plan's events, left out by --plan
    other = PlanSpec(title="other", tasks=(TaskSpec(id="x", body="true"),))
    await publish(
        bus,
        PlanAccepted(plan_id="other", plan=other, at=t),
        TaskStarted(plan_id="other", task_id="x", attempt=1, worker="w1", at=t),
        RunFinished(
            plan_id="other", task_id="x", attempt=1, worker="w1", at=t, ok=True, duration_s=0.1, rc=0
        ),
        TaskSucceeded(plan_id="other", task_id="x", attempt=1, worker="w1", at=t, duration_s=0.1, rc=0),
        PlanFinished(plan_id="other", status="succeeded", at=t),
    )

    out = tmp_path / "hand.jsonl"
    manifest = await export(bus, Options(out=out, plan_id=p))
    records = by_id(load_jsonl(out))
    assert sorted(records) == [
        "hand.cut-quiet:1",
        "hand.cut:1",
        "hand.ext-broke:1",
        "hand.ext:1",
        "hand.leak:1",
        "hand.lost:1",
        "hand.lost:2",
    ]
    text = out.read_text()
    for secret in ("ops@example.org", "10.1.2.3", "hunter2"):
        assert secret not in text, secret

    ext = records["hand.ext:1"]
    redacted_answer = "Restart the database on [REDACTED:ip], then tell [REDACTED:email]."
    assert ext["messages"] == [
        {"role": "system", "content": "You advise the brain of a mesh."},
        {"role": "user", "content": "Summarise the incident; page [REDACTED:email]"},
        {"role": "assistant", "content": redacted_answer},
    ]
    assert ext["escalated"] is True
    assert ext["escalation"] == {
        "answered": True,
        "model": "claude-test",
        "result": redacted_answer,
        "followups": "",
        "reason": "",
        "error": "",
        "tokens_in": 120,
        "tokens_out": 40,
        "cost_usd": 0.0012,
        "duration_s": 2.5,
        "redacted": {"email": 1},
    }
    assert (ext["class"], ext["kind"], ext["outcome"], ext["worker"]) == (
        "external",
        "prompt",
        "succeeded",
        "gateway",
    )
    assert ext["duration_s"] == 2.5 and ext["rc"] is None and ext["started_at"] is None
    assert ext["body"] == "Summarise the incident; page [REDACTED:email]"
    # the body's e-mail, the answer's address and e-mail (the request's marker is not counted again)
    assert ext["redacted"] == {"email": 2, "ip": 1}

    broke = records["hand.ext-broke:1"]
    assert broke["escalated"] is True and broke["outcome"] == "failed" and broke["reason"] == "error"
    assert broke["escalation"]["answered"] is False and broke["escalation"]["reason"] == "budget"
    assert broke["escalation"]["error"] == "budget spent"
    assert broke["error"] == "no answer: budget" and broke["will_retry"] is False
    assert broke["messages"] == [], "no answer: nothing to learn a conversation from"

    cut = records["hand.cut:1"]
    assert (cut["outcome"], cut["reason"], cut["rc"], cut["duration_s"]) == (
        "cancelled",
        "cancelled",
        -15,
        3.2,
    )
    assert cut["error"] == "cancelled by operator\ncancelled; process group killed"
    assert cut["output"] == "half" and cut["started_at"] == t and cut["worker"] == "w1"
    quiet = records["hand.cut-quiet:1"]
    assert quiet["outcome"] == "cancelled" and quiet["duration_s"] is None and quiet["output"] == ""

    lost1, lost2 = records["hand.lost:1"], records["hand.lost:2"]
    assert (lost1["outcome"], lost1["reason"], lost1["will_retry"]) == ("failed", "lost", True)
    assert lost1["duration_s"] is None, "the late report is not this record's"
    assert (lost2["outcome"], lost2["worker"], lost2["output"], lost2["duration_s"]) == (
        "succeeded",
        "w2",
        "built\n",
        1.5,
    )
    assert lost2["finished_at"] == t + 43 and lost2["started_at"] == t + 41

    leak = records["hand.leak:1"]
    assert leak["sensitive"] is True
    assert {k: leak[k] for k in ("body", "output", "error", "stderr_tail", "artifacts")} == dict.fromkeys(
        ("body", "output", "error", "stderr_tail", "artifacts")
    )
    assert leak["messages"] == [] and leak["duration_s"] == 0.5 and leak["rc"] == 0

    assert manifest.records == 7
    assert manifest.counts == {
        "cpu": {"cancelled": 2, "failed": 1, "succeeded": 2},
        "external": {"failed": 1, "succeeded": 1},
    }
    assert manifest.never_ran == 1 and manifest.unfinished == 1 and manifest.late_reports == 1
    assert manifest.sensitive_leaks_in_history == 1 and manifest.sensitive_metadata_only == 1
    assert manifest.redacted == {"email": 2, "ip": 1}
    assert manifest.filters["plan"] == p
    assert load_manifest(out) == msgspec.to_builtins(manifest)

    # --until (a sequence) cuts the window: the lost task's second attempt is not final in it
    history = [e async for e in read_history(bus, bus.names.plan_filter(p))]
    retrying = next(e.seq for e in history if isinstance(e.msg, TaskRetrying))
    cut_out = tmp_path / "until.jsonl"
    early = await export(
        bus, Options(out=cut_out, plan_id=p, until=parse_point(f"seq:{retrying}", "--until"))
    )
    assert early.last_seq == retrying
    assert "hand.lost:1" in by_id(load_jsonl(cut_out)) and "hand.lost:2" not in by_id(load_jsonl(cut_out))

    # all plans: the other plan's attempt too
    everything = await export(bus, Options(out=tmp_path / "all.jsonl"))
    assert everything.records == 8 and everything.counts["cpu"]["succeeded"] == 3
