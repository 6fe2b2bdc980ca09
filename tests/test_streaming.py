"""Streaming: an LLM's answer on its task's stream subject as it is generated, and its readers.

The pure parts first (the chunk's checks, a terminal's view of many tasks' chunks); then the
executor with the real Gemma 3 270M in process (the streamed pieces are the output, the same as
a completion that does not stream); then end to end on a real nats-server with a real brain and
model worker: the chunks come in order before `run.finished`, a sensitive task streams nothing,
the time to the first token reaches the record and `mesh status`, and `mesh tail` and
`mesh submit --wait` (run as processes) show the text while ignoring forged chunks.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg

from agents.worker_stream import TextStream
from mesh.events import PlanResumed, RunFinished, WorkItem, decode, encode
from mesh.host.executors import RunContext, build_prompt, run_prompt
from mesh.host.loaders import Loaded, load_model
from mesh.host.planfiles import load_plan
from mesh.models import DEFAULT_MODELS, builtin_models
from mesh.names import Names
from mesh.textstream import TextChunk, TextView, decode_chunk, printable
from tests.conftest import HANG_S, ROOT, Mesh
from tests.faults import until
from tests.test_model_workers import COUNTING, PLAN_TIMEOUT_S, all_succeeded, finished, start

N = Names()


def chunk(seq: int, text: str, *, task: str = "t", attempt: int = 1, final: bool = False) -> TextChunk:
    return TextChunk(
        plan_id="p", task_id=task, attempt=attempt, worker="w1", seq=seq, text=text, at=1.0, final=final
    )


# ------------------------------------------------------------------ the chunk and its reader


def test_a_chunk_is_taken_only_whole_of_its_type_and_on_its_own_subject() -> None:
    good = chunk(0, "hello")
    subject = N.text("p", "t", "w1")
    assert subject == "mesh.stream.p.t.w1"
    assert decode_chunk(N, subject, encode(good)) == (good, "")
    bad = {
        "not JSON": b"\xff{",
        "no type": encode(good).replace(b'"type":"text.chunk",', b""),
        "another type": encode(PlanResumed(plan_id="p", at=1.0)),
        "a field missing": encode(good).replace(b'"seq":0,', b""),
        "a field of the wrong type": encode(good).replace(b'"seq":0', b'"seq":"0"'),
    }
    for what, data in bad.items():
        taken, why = decode_chunk(N, subject, data)
        assert taken is None and why, what
    # another task's, another worker's, another plan's: not on this subject
    for other in (
        "mesh.stream.p.u.w1",
        "mesh.stream.p.t.w2",
        "mesh.stream.q.t.w1",
        "mesh.evt.run.p.t.text.w1",
    ):
        taken, why = decode_chunk(N, other, encode(good))
        assert taken is None and "belongs on mesh.stream.p.t.w1" in why
    # a task id that cannot be a subject token, a negative sequence
    taken, why = decode_chunk(N, subject, encode(chunk(0, "x", task="a.b")))
    assert taken is None and "no valid subject" in why
    taken, why = decode_chunk(N, subject, encode(chunk(-1, "x")))
    assert taken is None


def test_the_view_prints_whole_lines_per_task_and_marks_gaps_and_new_attempts() -> None:
    view = TextView()
    assert view.take(chunk(0, "one ")) == []
    assert view.take(chunk(0, "A1\nA", task="a")) == ["a| A1"]
    assert view.take(chunk(1, "two\nthree")) == ["t| one two"]
    assert view.take(chunk(1, "two\nthree")) == [], "a chunk seen already"
    # chunk 2 was missed: the gap is marked where it was
    assert view.take(chunk(3, " five\n")) == ["t| three[…] five"]
    assert view.take(chunk(4, "six", final=True)) == ["t| six"]
    assert view.take(chunk(5, "late")) == [], "after the final chunk"
    # a new attempt starts over, on its own line; the old attempt's text is not taken again
    assert view.take(chunk(0, "again\n", attempt=2)) == ["t| [attempt 2, on w1]", "t| again"]
    assert view.take(chunk(7, "old", attempt=1)) == []
    # the same attempt redelivered to another worker starts over too; the first worker's
    # late chunks are not mixed in
    moved = TextChunk(plan_id="p", task_id="m", attempt=1, worker="w2", seq=0, text="x\n", at=1.0)
    assert view.take(chunk(0, "from w1 ", task="m")) == []
    assert view.take(moved) == ["m| from w1  […]", "m| [attempt 1, on w2]", "m| x"]
    assert view.take(chunk(1, "late w1\n", task="m")) == []
    # the other task's line was held until its end
    assert view.end("a") == ["a| A"]
    assert view.end("a") == []
    # what a terminal would act on is written out, not sent
    assert view.take(chunk(1, "\x1b[2J\x07red\tok\r\n", attempt=2)) == ["t| \\x1b[2J\\x07red\tok\\x0d"]
    assert printable("plain text, [bold]markup[/bold] and all") == "plain text, [bold]markup[/bold] and all"


def test_the_example_plan_parses() -> None:
    plan = {t.id: t for t in load_plan(ROOT / "plans" / "examples" / "streaming.md").tasks}
    assert [t.kind for t in plan.values()] == ["prompt"] * 3
    assert plan["secret"].sensitive and not plan["story"].sensitive


# ------------------------------------------------------------------ the worker's publisher


def _item() -> WorkItem:
    return WorkItem(plan_id="p", task_id="t", attempt=2, kind="prompt", body="x")


async def test_without_a_server_the_text_is_dropped_and_the_task_never_waits() -> None:
    stream = TextStream(NatsClient(), N, _item(), "w1", batch_s=0.0)  # never connected
    pieces = [f"piece {i} " for i in range(50)]
    # from the model's thread, as the executor does
    await asyncio.to_thread(lambda: [stream.push(p) for p in pieces])
    await stream.close()
    assert stream.sent == 0 and stream.dropped >= 1
    assert stream.seq == stream.dropped, "each dropped chunk used its number: a reader sees the gap"
    stream.push("after the end")  # a model call that outlived its task: ignored, no error


@pytest.mark.integration
async def test_the_text_goes_out_in_batches_and_a_final_chunk_ends_it(mesh: Mesh) -> None:
    bus = await mesh.bus()
    got: list[TextChunk] = []

    async def take(raw: NatsMsg) -> None:
        chunk, why = decode_chunk(N, raw.subject, raw.data)
        assert chunk is not None, why
        got.append(chunk)

    await bus.nc.subscribe(N.text_of_plan("p"), cb=take)
    await bus.nc.flush()
    stream = TextStream(bus.nc, N, _item(), "w1", batch_s=0.2)
    pieces = [f"{i}, " for i in range(200)]
    await asyncio.to_thread(lambda: [stream.push(p) for p in pieces])
    await stream.close()
    await until(lambda: got and got[-1].final, HANG_S, "the final chunk")
    assert [c.seq for c in got] == list(range(len(got)))
    assert len(got) < len(pieces), "batched, not one message per piece"
    assert "".join(c.text for c in got) == "".join(pieces)
    assert {(c.plan_id, c.task_id, c.attempt, c.worker) for c in got} == {("p", "t", 2, "w1")}
    assert stream.dropped == 0


# ------------------------------------------------------------------ the executor, in process


@pytest.fixture(scope="module")
def llm() -> Iterator[Loaded]:
    name = DEFAULT_MODELS["llm"]
    loaded = load_model(name, builtin_models()[name], "cpu")
    yield loaded
    loaded.close()


@pytest.mark.models
@pytest.mark.parametrize(
    ("body", "max_tokens", "grammar"),
    [(COUNTING, 24, ""), ("Is the sky blue? Answer yes or no:", 8, 'root ::= "yes" | "no"')],
)
async def test_the_streamed_pieces_are_the_output_of_a_completion_that_does_not_stream(
    llm: Loaded, body: str, max_tokens: int, grammar: str
) -> None:
    from llama_cpp import LlamaGrammar

    pieces: list[str] = []
    ctx = RunContext(model=llm, kill_grace_s=10.0, on_text=pieces.append)
    item = WorkItem(
        plan_id="p", task_id="t", attempt=1, kind="prompt", body=body, max_tokens=max_tokens, grammar=grammar
    )
    result = await run_prompt(item, ctx)
    assert result.ok, result.error
    assert len(pieces) >= 1 and "".join(pieces) == result.output
    # the same prompt, not streamed: the same text and the same count of tokens (a stream
    # reports no usage, so the executor counts them itself)
    spec, handle = llm.spec, llm.handle
    tokens = handle.tokenize(build_prompt(body, {}).encode(), add_bos=True, special=False)
    handle.reset()
    whole = handle.create_completion(
        tokens,
        max_tokens=max_tokens,
        temperature=spec.temperature,
        seed=spec.seed,
        grammar=LlamaGrammar.from_string(grammar, verbose=False) if grammar else None,
    )
    assert result.output == whole["choices"][0]["text"]
    assert result.metrics["tokens_out"] == whole["usage"]["completion_tokens"]
    assert result.metrics["ttft_s"] > 0


# ------------------------------------------------------------------ end to end

STREAMED = f"""\
# Streamed

## Tasks

### story
- max_tokens: 40

```prompt
{COUNTING}
```

### secret
- sensitive: true
- max_tokens: 12

```prompt
{COUNTING}
```
"""


@pytest.mark.integration
@pytest.mark.models
async def test_a_prompts_chunks_arrive_in_order_before_its_report_and_make_its_output(mesh: Mesh) -> None:
    # one chunk per piece of text (no batching): the most chunks, the most to keep in order
    await start(mesh, stream_batch_s=0)
    bus = await mesh.bus()
    names = bus.names
    # every text chunk of any plan, and every worker report: one connection sees both in the
    # order the worker sent them
    seen = await heard(bus.nc, names.text_all, names.run_events())
    plan_id = await mesh.submit_text(STREAMED, plan_id="streamed")
    await all_succeeded(mesh, plan_id)
    story = await finished(mesh, plan_id, "story")
    await until(lambda: _reports(seen, "story", RunFinished), HANG_S, "the report seen live")

    chunks = chunks_of(names, seen, "story")
    assert [c.seq for c in chunks] == list(range(len(chunks))), "in order, none missed"
    assert len(chunks) > 2
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    assert {(c.attempt, c.worker) for c in chunks} == {(1, story.worker)}
    assert "".join(c.text for c in chunks) == story.output and story.output.strip()
    # every chunk before the report that ends the attempt
    subjects = [s for s, _ in seen]
    report = subjects.index(names.run_event(plan_id, "story", "finished", story.worker))
    last_chunk = max(i for i, s in enumerate(subjects) if s == names.text(plan_id, "story", story.worker))
    assert last_chunk < report
    # a sensitive task streams nothing (its output stays out of the history, and off the wire)
    secret = await finished(mesh, plan_id, "secret")
    assert secret.ok and secret.sensitive
    assert not [s for s in subjects if s.startswith(names.text(plan_id, "secret", secret.worker))]

    # the time to the first token: in the report, the record, and `mesh status`
    ttft = story.metrics["ttft_s"]
    assert ttft > 0
    record = (await mesh.tasks(plan_id))["story"]
    assert record.ttft_s == ttft
    status = mesh.cli("status", plan_id)
    line = next(row for row in status.splitlines() if "story" in row)
    assert "ttft " in line, status
    assert (await mesh.tasks(plan_id))["secret"].ttft_s > 0, "kept, as a number says nothing secret"


async def heard(nc: NatsClient, *subjects: str) -> list[tuple[str, bytes]]:
    """Every message on `subjects` from now on, as (subject, data), in the order they come."""
    seen: list[tuple[str, bytes]] = []

    async def take(raw: NatsMsg) -> None:
        seen.append((raw.subject, raw.data))

    for subject in subjects:
        await nc.subscribe(subject, cb=take)
    await nc.flush()
    return seen


def chunks_of(names: Names, seen: list[tuple[str, bytes]], task: str) -> list[TextChunk]:
    """The text chunks of one task among what was heard."""
    return [c for s, d in seen if (c := decode_chunk(names, s, d)[0]) is not None and c.task_id == task]


def _reports(seen: list[tuple[str, bytes]], task: str, kind: type) -> bool:
    out = []
    for subject, data in seen:
        if ".evt.run." in subject:
            msg = decode(data)
            out.append(isinstance(msg, kind) and getattr(msg, "task_id", "") == task)
    return any(out)


@pytest.mark.integration
@pytest.mark.models
async def test_mesh_tail_and_submit_wait_show_the_text_as_it_comes_and_ignore_forged_chunks(
    mesh: Mesh, tmp_path: Path
) -> None:
    await start(mesh)
    bus = await mesh.bus()
    names = bus.names
    plan_id = "tailed"
    tail_out = tmp_path / "tail.out"
    with open(tail_out, "wb") as sink:
        tail = subprocess.Popen(
            [sys.executable, "-m", "mesh", "tail", plan_id],
            env={**mesh.env, "COLUMNS": "200"},
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        # ready once a chunk sent now comes out (a core subscription only sees what comes next)
        async def shows(text: str) -> bool:
            assert tail.poll() is None, tail_out.read_text()
            return text in tail_out.read_text()

        probe = names.text(plan_id, "probe", "w9")
        seq = 0

        async def probe_shows(text: str) -> bool:
            nonlocal seq
            ready = TextChunk(
                plan_id=plan_id,
                task_id="probe",
                attempt=1,
                worker="w9",
                seq=seq,
                text=text + "\n",
                at=time.time(),
            )
            seq += 1
            await bus.nc.publish(probe, encode(ready))
            await asyncio.sleep(0.2)
            return await shows(f"probe| {text}")

        await until(lambda: probe_shows("ready"), HANG_S, "mesh tail subscribed")
        # forged and broken chunks on the plan's subjects: none is shown, none stops it
        evil = TextChunk(
            plan_id=plan_id, task_id="evil", attempt=1, worker="w9", seq=0, text="FORGED-A\n", at=1.0
        )
        other = TextChunk(
            plan_id="other", task_id="probe", attempt=1, worker="w9", seq=50, text="FORGED-B\n", at=1.0
        )
        for subject, data in [
            (probe, b"FORGED-C not json\n"),
            (probe, encode(evil)),  # another task's chunk on the probe's subject
            (probe, encode(other)),  # another plan's
            (probe, encode(PlanResumed(plan_id=plan_id, at=1.0))),  # no chunk at all
            (probe, encode(evil).replace(b'"seq":0', b'"seq":"FORGED-D"')),
            (names.text(plan_id, "x", "w9"), b'{"type":"text.chunk","text":"FORGED-E"}'),
        ]:
            await bus.nc.publish(subject, data)
        await until(lambda: probe_shows("still here"), HANG_S, "mesh tail alive after the forged chunks")

        plan = tmp_path / "plan.md"
        plan.write_text(STREAMED)
        submit = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mesh", "submit", "--wait", "--id", plan_id, str(plan)],
            env={**mesh.env, "COLUMNS": "200"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=PLAN_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        assert submit.returncode == 0, submit.stderr
        story = await finished(mesh, plan_id, "story")
        assert story.output.strip()
        await until(lambda: shows("plan.finished"), HANG_S, "mesh tail saw the plan finish")
    finally:
        tail.terminate()
        tail.wait(30)
    shown = tail_out.read_text()

    assert "FORGED" not in shown, shown
    assert "evil|" not in shown
    assert "secret|" not in shown, "a sensitive task streams nothing"

    # the answer, line by line, as the model wrote it, in both
    def lines_of(text: str) -> list[str]:
        return [ln.removeprefix("story| ").rstrip() for ln in text.splitlines() if ln.startswith("story| ")]

    want = [ln.rstrip() for ln in story.output.split("\n")]
    if want and not want[-1]:
        want.pop()  # an answer ending in a newline has no last line to print
    assert lines_of(shown) == want, shown
    assert lines_of(submit.stderr) == want, submit.stderr
    # the text came before the report of the attempt that made it
    report = next(i for i, ln in enumerate(shown.splitlines()) if "run.finished" in ln and ".story " in ln)
    assert max(i for i, ln in enumerate(shown.splitlines()) if ln.startswith("story| ")) < report
