"""`mesh export`: the event history as training data, against a real nats-server.

The last test runs real plans on real agents (a brain, a CPU worker, and a model worker with
the real Gemma 3 270M) and checks the exported records field by field against the history the
agents wrote. The escalation join is checked with `esc.answered` / `esc.failed` events a test
publishes itself (real events on a real server, as the gateway publishes them), together with
the transitions around them, as are the orderings a live mesh rarely shows on cue: a report
that arrives after its attempt was cancelled, or after it was given up as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mesh import events
from mesh.bus.history import read_history
from mesh.bus.publish import Bus
from mesh.errors import ExportError
from mesh.events import (
    EscalationAnswered,
    EscalationFailed,
    LocalAttempt,
    Msg,
    PlanAccepted,
    PlanFinished,
    PlanSpec,
    RunFinished,
    TaskCancelled,
    TaskClimbed,
    TaskFailed,
    TaskReleased,
    TaskRetrying,
    TaskSpec,
    TaskStarted,
    TaskSucceeded,
)
from mesh.host.executors import DATA_PREAMBLE
from mesh.ops.export import Options, export, parse_point
from mesh.redact import Redactor
from mesh.status import FailReason
from tests.conftest import ROOT, Mesh
from tests.faults import run_mesh, until
from tests.test_machine import one_per_transition

LLM = "gemma3-270m"
PLAN_TIMEOUT_S = 180.0


@contextlib.contextmanager
def _quiet_hub(tmp: Path) -> Iterator[None]:
    """`datasets` offline, with its caches under `tmp`, and its own warnings not raised as errors."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "afile").write_text("")
    cases: list[tuple[Options, str]] = [
        # the export replaces its output whole: a device or a pipe would be replaced
        (Options(out=fifo), f"{fifo} is not a regular file"),
        (Options(out=tmp_path / "afile" / "x.jsonl"), "afile is a file, not a directory"),
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
    from mesh.ops.export_sinks import ParquetSink

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ExportError, match=r"Parquet output needs pyarrow.*pip install pyarrow"):
        ParquetSink(tmp_path / "x.parquet", "chat")


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


@pytest.mark.integration
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
        # a sensitive task whose report holds its output (a worker that broke the rule); short:
        # its start came with its end, and its success carries it
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
        TaskSucceeded(
            plan_id=p, task_id="leak", attempt=1, worker="w2", at=t + 1, duration_s=0.5, rc=0, started_at=t
        ),
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
    assert (leak["started_at"], leak["worker"]) == (t, "w2"), "the brain's start, from the success"

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


@pytest.mark.integration
async def test_a_task_that_climbed_its_ladder_is_exported_rung_by_rung(mesh: Mesh, tmp_path: Path) -> None:
    bus = await mesh.bus()
    p, t = "climb", time.time()
    ask = TaskSpec(id="ask", body="Sum 2 and 2", kind="prompt", cls="llm", model="small", escalate=("big",))
    failed = LocalAttempt(attempt=1, worker="w1", error="no answer", rc=None, reason=FailReason.ERROR)
    await publish(
        bus,
        PlanAccepted(plan_id=p, plan=PlanSpec(title="ladder", tasks=(ask,)), at=t),
        TaskStarted(plan_id=p, task_id="ask", attempt=1, worker="w1", at=t),
        RunFinished(
            plan_id=p,
            task_id="ask",
            attempt=1,
            worker="w1",
            at=t + 1,
            ok=False,
            duration_s=1.0,
            error="no answer",
            model="small",
            prompt="Sum 2 and 2",
        ),
        TaskClimbed(
            plan_id=p,
            task_id="ask",
            attempt=1,
            at=t + 1,
            tier=1,
            model="big",
            from_model="small",
            why="local_failures",
            after=failed,
            duration_s=1.0,
        ),
        TaskStarted(plan_id=p, task_id="ask", attempt=2, worker="w2", at=t + 2),
        RunFinished(
            plan_id=p,
            task_id="ask",
            attempt=2,
            worker="w2",
            at=t + 3,
            ok=True,
            duration_s=1.0,
            output="4",
            model="big",
            prompt="Sum 2 and 2",
        ),
        TaskSucceeded(plan_id=p, task_id="ask", attempt=2, worker="w2", at=t + 3, duration_s=1.0),
    )
    out = tmp_path / "climb.jsonl"
    await export(bus, Options(out=out, plan_id=p, fmt="raw"))
    records = by_id(load_jsonl(out))
    first, second = records["climb.ask:1"], records["climb.ask:2"]
    # the attempt the task climbed after: failed on the small model, tried again (on the big one)
    assert (first["model"], first["outcome"], first["reason"], first["will_retry"]) == (
        "small",
        "failed",
        "error",
        True,
    )
    assert first["error"] == "no answer"
    # the final answer, and the model that produced it
    assert (second["model"], second["outcome"], second["response"]) == ("big", "succeeded", "4")


# ------------------------------------------------------------------ real plans, real agents

NOTE_SECRET = "token=a4b5c6d7e8f9xyz"
ASK = "Mail alice@example.com, password: hunter2planted. Count: 1, 2, 3, 4, 5, 6,"
# the worker keeps outputs over this many bytes in the object store only: `count` says more
OUTPUT_EVENT_BYTES = 240

TRAINING = f"""\
# Training

## Tasks

### note

```shell
printf 'token=%s\\n' "$(echo zyx9f8e7d6c5b4a | rev)"
```

### story
- depends_on: note
- inputs: note
- max_tokens: 8

```prompt
Next line:
```

### ask
- max_tokens: 8

```prompt
{ASK}
```

### ask-again
- max_tokens: 8

```prompt
{ASK}
```

### count
- max_tokens: 300

```prompt
Count from 1 to 1000: 1, 2, 3, 4, 5, 6,
```

### boom
- retries: 1

```shell
echo "partial out"
echo "fatal: disk full" >&2
exit 3
```

### hush
- sensitive: true

```shell
printf 'hush-%s\\n' "$(echo terces | rev)"
```

### hush-llm
- sensitive: true
- max_tokens: 8

```prompt
List the vowels: a, e,
```
"""

LATER = "# Later\n\n## Tasks\n\n### later\n\n```shell\necho later\n```\n"


async def consumers(bus: Bus) -> dict[str, tuple[Any, ...]]:
    """The event stream's consumers and where each stands."""
    out = {}
    for info in await bus.js.consumers_info(bus.names.events_stream):
        out[info.name] = (
            info.delivered.stream_seq,
            info.ack_floor.stream_seq,
            info.num_ack_pending,
            info.num_pending,
            info.num_redelivered,
        )
    return out


async def agent_id(mesh: Mesh, name: str) -> str:
    from mesh.bus.read import read_bucket
    from mesh.records import decode_agent

    pid = mesh.procs[name].pid

    async def find() -> str:
        agents = await read_bucket(await (await mesh.bus()).agents_kv())
        return next((k for k, v in agents.items() if decode_agent(v).pid == pid), "")

    return str(await until(find, 30, f"agent {name} registered"))


def export_cli(mesh: Mesh, out: Path, *args: str) -> str:
    done = run_mesh(mesh, "export", "--out", str(out), *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", "the records go to the file"
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("exported "), "no progress bar off a terminal"
    return done.stderr


def export_on_a_terminal(mesh: Mesh, out: Path) -> str:
    """`mesh export` with a terminal for its stdout and stderr: what it draws there."""
    main, side = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "export", "--out", str(out)],
        env={**mesh.env, "COLUMNS": "120", "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=side,
        stderr=side,
        cwd=ROOT,
    )
    os.close(side)
    drawn = bytearray()
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closes when the command exits
            break
        if not chunk:
            break
        drawn += chunk
    os.close(main)
    assert proc.wait(60) == 0, drawn.decode(errors="replace")
    return drawn.decode(errors="replace")


@pytest.mark.integration
@pytest.mark.models
async def test_real_plans_export_field_by_field_safely_and_without_moving_any_consumer(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.env["MESH_OUTPUT_EVENT_BYTES"] = str(OUTPUT_EVENT_BYTES)
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "none", "--classes", "script,llm")
    mesh.worker("cpu", 2)
    gpu, cpu = await agent_id(mesh, "gpu"), await agent_id(mesh, "cpu")
    bus = await mesh.bus()
    names = bus.names

    plan_id = await mesh.submit_text(TRAINING)
    plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    tasks = await mesh.tasks(plan_id)
    detail = {t.task_id: (t.status, t.error[-200:]) for t in tasks.values()}
    assert plan.status == "failed", detail
    assert {k: t.status for k, t in tasks.items() if t.status != "succeeded"} == {"boom": "failed"}, detail
    boundary = (await bus.js.stream_info(names.events_stream)).state.last_seq + 1
    between = time.time()
    await asyncio.sleep(0.05)
    later_id = await mesh.submit_text(LATER)
    assert (await mesh.wait_plan(later_id)).status == "succeeded"
    mesh.stop_all()  # a quiet stream: the consumers' positions only move if export moves them

    history = [e async for e in read_history(bus, names.evt_all)]
    assert not any(b"hush-secret" in e.data for e in history), "a sensitive output is never in an event"
    specs = {
        t.id: t
        for e in history
        if isinstance(e.msg, PlanAccepted) and e.msg.plan_id == plan_id
        for t in e.msg.plan.tasks
    }
    reports = {
        (m.task_id, m.attempt): m
        for m in (e.msg for e in history)
        if isinstance(m, RunFinished) and m.plan_id == plan_id
    }
    # what the checks below rest on: the prompt whole in its event, count's output only in the store
    story_run, count_run = reports[("story", 1)], reports[("count", 1)]
    assert story_run.prompt.endswith("</data>\n") and DATA_PREAMBLE in story_run.prompt
    assert count_run.output == "" and count_run.output_object == f"outputs/{plan_id}/count/1"
    stored = await (await bus.objects()).get(count_run.output_object)
    count_output = (stored.data or b"").decode()
    assert len(count_output.encode()) > OUTPUT_EVENT_BYTES
    assert reports[("hush-llm", 1)].output_object, "a sensitive output is kept in the store only"

    before = await consumers(bus)
    assert {names.brain_runs_consumer, names.auditor_consumer} <= set(before)
    out = tmp_path / "all.jsonl"
    said = export_cli(mesh, out)
    assert "exported 9 records" in said and "1 duplicates dropped" in said, said
    assert await consumers(bus) == before, "exporting moved no consumer and left none behind"

    text = out.read_text()
    for secret in ("a4b5c6d7e8f9xyz", "hunter2planted", "alice@example.com", "hush-secret"):
        assert secret not in text, secret
    records = by_id(load_jsonl(out))
    key = f"{plan_id}.{{}}:{{}}".format
    assert sorted(records) == sorted(
        [key(t, 1) for t in ("note", "story", "count", "boom", "hush", "hush-llm")]
        + [key("boom", 2), f"{later_id}.later:1"]
        + [key("ask", 1) if key("ask", 1) in records else key("ask-again", 1)]
    ), "ask and ask-again asked the same and heard the same: one record"
    for r in records.values():
        assert r["plan"] + "." + r["task"] + ":" + str(r["attempt"]) == r["id"]
        run = reports.get((r["task"], r["attempt"])) if r["plan"] == plan_id else None
        if run is not None:
            assert r["finished_at"] >= run.at and r["duration_s"] == run.duration_s and r["rc"] == run.rc

    # a prompt task: what the model saw (the input wrapped as data) and said, and its numbers
    story = records[key("story", 1)]
    redactor = Redactor()
    seen_prompt, counted = redactor.text(story_run.prompt)
    assert counted == {"token": 1}
    assert story["messages"] == [
        {"role": "user", "content": seen_prompt},
        {"role": "assistant", "content": redactor.text(story_run.output)[0]},
    ]
    assert '<data from="note">\ntoken=[REDACTED:token]\n</data>' in story["messages"][0]["content"]
    assert story["body"] == specs["story"].body == "Next line:"
    assert (story["class"], story["kind"], story["model"], story["outcome"], story["reason"]) == (
        "llm",
        "prompt",
        LLM,
        "succeeded",
        "",
    )
    assert (story["worker"], story["gpu"], story["sensitive"], story["escalated"]) == (gpu, gpu, False, False)
    assert story["escalation"] is None and story["will_retry"] is False
    for field in ("tokens_in", "tokens_out"):
        assert story[field] == int(story_run.metrics[field]) and story[field] > 0
    for field in ("tokens_per_s", "ttft_s"):
        assert story[field] == story_run.metrics[field]
    assert story["metrics"] == story_run.metrics
    assert story["started_at"] == next(
        m.at
        for m in one_per_transition(e.msg for e in history)
        if isinstance(m, TaskStarted) and m.task_id == "story"
    )
    assert story["redacted"].get("token", 0) >= 1

    # the planted secrets of a prompt body: gone from the body and from what the model saw
    ask = records.get(key("ask", 1)) or records[key("ask-again", 1)]
    masked = "Mail [REDACTED:email], password: [REDACTED:password] Count: 1, 2, 3, 4, 5, 6,"
    assert ask["body"] == masked and ask["messages"][0] == {"role": "user", "content": masked}
    assert ask["redacted"] == {"email": 2, "password": 2}, "in the body and in the prompt"

    # an output kept in the object store is fetched into the record
    count = records[key("count", 1)]
    assert count["output"] == count_output == count["messages"][1]["content"]
    assert count["tokens_out"] == int(count_run.metrics["tokens_out"])

    # a failing task: both attempts, with the return code, the error snippet and the output
    boom1, boom2 = records[key("boom", 1)], records[key("boom", 2)]
    for r in (boom1, boom2):
        assert (r["class"], r["kind"], r["model"], r["outcome"], r["reason"], r["rc"]) == (
            "cpu",
            "shell",
            "",
            "failed",
            "error",
            3,
        )
        assert r["error"] == "exit code 3\nfatal: disk full"
        assert r["stderr_tail"] == "fatal: disk full\n" and r["output"] == "partial out\n"
        assert (r["stdout_bytes"], r["stderr_bytes"]) == (12, 17)
        assert r["body"] == specs["boom"].body == 'echo "partial out"\necho "fatal: disk full" >&2\nexit 3\n'
        assert r["worker"] == cpu and r["gpu"] == "" and r["messages"] == []
        assert r["tokens_in"] is None and r["tokens_per_s"] is None
    assert (boom1["will_retry"], boom2["will_retry"]) == (True, False)

    # sensitive tasks: metadata only
    for name in ("hush", "hush-llm"):
        r = records[key(name, 1)]
        assert r["sensitive"] is True and r["outcome"] == "succeeded" and r["duration_s"] > 0
        for field in ("body", "output", "error", "stderr_tail", "artifacts"):
            assert r[field] is None, (name, field)
        assert r["messages"] == [] and r["redacted"] == {}
    assert records[key("hush-llm", 1)]["tokens_out"] == int(reports[("hush-llm", 1)].metrics["tokens_out"])
    assert records[key("hush", 1)]["rc"] == 0 and records[key("hush", 1)]["worker"] == cpu

    manifest = load_manifest(out)
    assert manifest["records"] == 9
    assert manifest["counts"] == {"cpu": {"failed": 2, "succeeded": 3}, "llm": {"succeeded": 4}}
    assert manifest["duplicates_dropped"] == 1 and manifest["sensitive_metadata_only"] == 2
    assert manifest["sensitive_leaks_in_history"] == 0 and manifest["unfinished"] == 0
    assert manifest["outputs_fetched"] == 1, "count's output, and never the sensitive one's"
    assert manifest["redacted"]["email"] == 2 and manifest["redacted"]["password"] == 2
    assert manifest["redacted"]["token"] >= 2, "the note's output and the story's prompt"
    per_record = Counter[str]()
    for r in records.values():
        per_record.update(r["redacted"])
    assert manifest["redacted"] == dict(per_record)
    accepted = next(e.seq for e in history if isinstance(e.msg, PlanAccepted) and e.msg.plan_id == plan_id)
    finished = next(e.seq for e in history if isinstance(e.msg, PlanFinished) and e.msg.plan_id == later_id)
    assert (manifest["first_seq"], manifest["last_seq"]) == (accepted, finished)
    assert manifest["filters"] == {"since": None, "until": None, "plan": None, "class": None, "status": None}

    # on a terminal, a progress bar to the last sequence, and the same file
    drawn = export_on_a_terminal(mesh, tmp_path / "tty.jsonl")
    last = (await bus.js.stream_info(names.events_stream)).state.last_seq
    assert f"100% seq {last:,} of {last:,}" in drawn and "exported 9 records" in drawn, drawn
    assert (tmp_path / "tty.jsonl").read_text() == text

    # windows: from a sequence, from a time, up to a sequence
    since = tmp_path / "since.jsonl"
    export_cli(mesh, since, "--since", f"seq:{boundary}")
    assert [r["id"] for r in load_jsonl(since)] == [f"{later_id}.later:1"]
    assert load_manifest(since)["first_seq"] >= boundary
    timed = tmp_path / "timed.jsonl"
    export_cli(mesh, timed, "--since", str(between))
    assert [r["id"] for r in load_jsonl(timed)] == [f"{later_id}.later:1"]
    upto = tmp_path / "upto.jsonl"
    export_cli(mesh, upto, "--until", f"seq:{boundary - 1}")
    assert sorted(r["id"] for r in load_jsonl(upto)) == sorted(set(records) - {f"{later_id}.later:1"})
    # a window that starts after the plan was accepted still has its tasks' specs
    inside = tmp_path / "inside.jsonl"
    export_cli(mesh, inside, "--since", f"seq:{accepted + 1}", "--plan", plan_id)
    assert load_jsonl(inside) == [r for r in load_jsonl(out) if r["plan"] == plan_id]

    # filters and the raw form
    raw = tmp_path / "raw.jsonl"
    export_cli(mesh, raw, "--class", "llm", "--status", "succeeded", "--format", "raw")
    rows = by_id(load_jsonl(raw))
    assert sorted(rows) == sorted(k for k, r in records.items() if r["class"] == "llm")
    assert (rows[key("story", 1)]["system"], rows[key("story", 1)]["prompt"]) == ("", seen_prompt)
    assert rows[key("story", 1)]["response"] == story["messages"][1]["content"]
    assert all("messages" not in r for r in rows.values())
    failed = tmp_path / "failed.jsonl"
    export_cli(mesh, failed, "--status", "failed")
    assert sorted(r["id"] for r in load_jsonl(failed)) == [key("boom", 1), key("boom", 2)]
    assert load_manifest(failed)["filtered_out"] == 8, "ask-again too: filters come before duplicates"

    # it loads as it is with the common tools
    import pandas as pd
    import pyarrow.parquet as pq

    frame = pd.read_json(out, lines=True)
    assert len(frame) == 9 and {"class", "messages", "outcome", "duration_s"} <= set(frame.columns)
    assert frame.set_index("id").loc[key("boom", 2), "rc"] == 3
    parquet = tmp_path / "all.parquet"
    export_cli(mesh, parquet)
    table = pq.read_table(parquet).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in load_jsonl(out)]
    story_row = next(r for r in table if r["id"] == key("story", 1))
    assert story_row["messages"] == story["messages"] and story_row["class"] == "llm"
    assert dict(story_row["metrics"]) == story["metrics"]
    with _quiet_hub(tmp_path):
        import datasets

        dataset = datasets.load_dataset(
            "json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf")
        )
    assert dataset.num_rows == 9 and dataset[1]["id"] == load_jsonl(out)[1]["id"]
