"""Parallel decoding in process (`llm_slots` above 1): the decoder alone, the executor on it, and a
model worker decoding several prompt tasks together, all on the real shipped model (Gemma 3
270M through llama-cpp-python, on the CPU) and, end to end, a real nats-server, brain and worker.

What is checked is what each request is owed whatever else shares its steps: its own answer,
cut where its own stop string, end of generation or max_tokens says, its text streamed whole and
in order, its own grammar held to, and its own stop (cancel, timeout, unload) ending it alone.
Greedy answers are not compared with one-at-a-time decoding: a batch's matrix products may round
differently from one sequence's, so the same prompt may continue otherwise after some tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import jsonschema
import msgspec
import pytest

from mesh.errors import ConfigError
from mesh.events import RunFinished, WorkItem
from mesh.host.executors import RunContext, run_chat, run_prompt
from mesh.host.llmbatch import Decoder, DecoderClosed, Outcome, Request, _Text
from mesh.host.loaders import Loaded, load_model
from mesh.models import builtin_models
from mesh.settings import settings_from
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.test_model_workers import PLAN_TIMEOUT_S, all_succeeded, finished, start
from tests.test_streaming import chunks_of, heard

LLM = "gemma3-270m"
SLOTS = 3
# counting never ends on its own: a greedy base model goes on until max_tokens
COUNTING = "Count from 1 to 1000: 1, 2, 3, 4, 5, 6,"
SHORT_ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 32}},
    "required": ["answer"],
}


# ------------------------------------------------------------------ the text of an answer (pure)


def test_the_text_is_cut_at_a_stop_string_and_its_start_is_held_back_until_it_is_not() -> None:
    sent: list[str] = []
    text = _Text(["<end>"], sent.append)
    assert not text.add(b"one <e")
    assert sent == ["one "], "what could open the stop string is held back"
    assert not text.add(b"x two")
    assert "".join(sent) == "one <ex two", "released once it is not the stop string"
    assert text.add(b" three<en") is False and text.add(b"d> four") is True
    assert text.finish() == "one <ex two three" and "".join(sent) == "one <ex two three"


def test_a_character_split_over_two_tokens_is_sent_whole() -> None:
    sent: list[str] = []
    text = _Text([], sent.append)
    snow = "é".encode()
    text.add(b"caf" + snow[:1])
    text.add(snow[1:] + b"!")
    assert sent == ["caf", "é!"] and text.finish() == "café!"


def test_llm_slots_and_the_queue_ahead_are_bounded() -> None:
    def settings(**values: int) -> object:
        return settings_from(
            values, {}, {}, file="mesh.toml", default_data_dir=lambda: "/tmp", is_file=lambda _: True
        )

    assert settings(llm_slots=256).llm_slots == 256  # type: ignore[attr-defined]
    for bad in (0, 257):
        with pytest.raises(ConfigError, match=f"llm_slots is {bad}: set 1 to 256"):
            settings(llm_slots=bad)
    assert settings().llm_queue_ahead == 2  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="llm_queue_ahead is -1: set 0 to 256"):
        settings(llm_queue_ahead=-1)


# ------------------------------------------------------------------ the decoder on the real model


@pytest.fixture(scope="module")
def llm() -> Iterator[Loaded]:
    loaded = load_model(LLM, builtin_models()[LLM], "cpu", llm_slots=SLOTS)
    yield loaded
    loaded.close()


def tokens(llm: Loaded, text: str) -> list[int]:
    return list(llm.handle.tokenize(text.encode(), add_bos=True, special=False))


def request(llm: Loaded, text: str, **kw: object) -> tuple[Request, list[str]]:
    pieces: list[str] = []
    fields: dict[str, object] = {"tokens": tokens(llm, text), "max_tokens": 12, "on_text": pieces.append}
    fields.update(kw)
    return Request(**fields), pieces  # type: ignore[arg-type]


@pytest.mark.models
def test_requests_submitted_together_decode_together_each_to_its_own_answer(llm: Loaded) -> None:
    decoder = llm.decoder
    assert isinstance(decoder, Decoder) and decoder.slots == SLOTS and decoder.n_ctx == 2048
    asked = [request(llm, f"Count from {n} to 1000: {n}, {n + 1}, {n + 2},") for n in (1, 200, 700)]
    outcomes = [f.result(timeout=HANG_S) for f in decoder.submit_many([r for r, _ in asked])]
    for (_, pieces), out in zip(asked, outcomes, strict=True):
        assert out.finish == "length" and out.tokens_out == 12
        assert out.parallel == SLOTS, "the three were decoded in the same steps"
        assert out.text.strip() and "".join(pieces) == out.text, "streamed whole, in order"
        assert out.submitted <= out.admitted <= out.first <= out.ended
    assert len({out.text for out in outcomes}) == 3, [out.text for out in outcomes]


@pytest.mark.models
def test_more_requests_than_slots_wait_for_one_and_all_end(llm: Loaded) -> None:
    asked = [request(llm, f"{COUNTING} ({i})", max_tokens=4)[0] for i in range(2 * SLOTS + 1)]
    outcomes = [f.result(timeout=HANG_S) for f in llm.decoder.submit_many(asked)]
    assert all(out.finish == "length" and out.tokens_out == 4 for out in outcomes)
    assert max(out.parallel for out in outcomes) == SLOTS
    # the last waited for a slot: it started after the first ended
    assert outcomes[-1].admitted >= min(out.ended for out in outcomes[:SLOTS])


@pytest.mark.models
def test_a_stop_string_ends_one_answer_and_never_reaches_its_text(llm: Loaded) -> None:
    stopped, pieces = request(llm, COUNTING, stop=[" 9"], max_tokens=40)
    beside, _ = request(llm, COUNTING, max_tokens=16)
    first, second = (f.result(timeout=HANG_S) for f in llm.decoder.submit_many([stopped, beside]))
    assert first.finish == "stop" and " 9" not in first.text and first.tokens_out < 40, first.text
    assert "".join(pieces) == first.text
    assert second.finish == "length" and second.tokens_out == 16


@pytest.mark.models
def test_a_halted_request_ends_at_the_next_step_and_the_others_go_on(llm: Loaded) -> None:
    seen = threading.Event()
    halted, _ = request(llm, COUNTING, max_tokens=1500, sampled=seen)
    beside, _ = request(llm, COUNTING, max_tokens=24)
    futures = llm.decoder.submit_many([halted, beside])
    assert seen.wait(HANG_S)
    halted.halt.set()
    first, second = (f.result(timeout=HANG_S) for f in futures)
    assert first.finish == "halted" and first.tokens_out < 1500
    assert second.finish == "length" and second.tokens_out == 24


@pytest.mark.models
def test_a_prompt_that_does_not_fit_a_sequence_is_refused_before_it_is_queued(llm: Loaded) -> None:
    with pytest.raises(ValueError, match="a sequence holds 2048"):
        llm.decoder.submit(Request(tokens=[2] * 2040, max_tokens=16))
    with pytest.raises(ValueError, match="no tokens"):
        llm.decoder.submit(Request(tokens=[], max_tokens=16))


def one_busy_one_waiting(llm: Loaded) -> tuple[Decoder, Future[Outcome], Future[Outcome]]:
    """A decoder of one sequence, decoding a long answer, and a request waiting for the sequence."""
    decoder = Decoder(llm.handle, 1, 512)
    seen = threading.Event()
    running = decoder.submit(request(llm, COUNTING, max_tokens=400, sampled=seen)[0])
    waiting = decoder.submit(request(llm, COUNTING, max_tokens=4)[0])
    assert seen.wait(HANG_S)
    return decoder, running, waiting


@pytest.mark.models
def test_closing_fails_what_runs_and_what_waits_and_refuses_more(llm: Loaded) -> None:
    decoder, running, waiting = one_busy_one_waiting(llm)
    decoder.close()
    decoder.close()  # twice is safe
    for future in (running, waiting):
        with pytest.raises(DecoderClosed, match="unloaded while the task ran"):
            future.result(timeout=HANG_S)
    with pytest.raises(DecoderClosed, match="decoder is closed"):
        decoder.submit(request(llm, COUNTING)[0])


@pytest.mark.models
def test_a_request_cancelled_while_it_waits_is_dropped_and_closing_still_works(llm: Loaded) -> None:
    decoder, running, given_up = one_busy_one_waiting(llm)
    assert given_up.cancel(), "still waiting for the one sequence"
    decoder.close()
    assert given_up.cancelled()
    with pytest.raises(DecoderClosed):
        running.result(timeout=HANG_S)


# ------------------------------------------------------------------ the executor on the decoder


def item(body: str, **kw: object) -> WorkItem:
    fields: dict[str, object] = {
        "plan_id": "p1",
        "task_id": "t1",
        "attempt": 1,
        "kind": "prompt",
        "body": body,
    }
    fields.update(kw)
    return WorkItem(**fields)  # type: ignore[arg-type]


@pytest.mark.models
async def test_prompt_tasks_run_together_through_the_executor(llm: Loaded) -> None:
    contexts = [RunContext(model=llm) for _ in range(SLOTS)]
    results = await asyncio.gather(
        *(run_prompt(item(f"{COUNTING} ({i})", max_tokens=8), ctx) for i, ctx in enumerate(contexts))
    )
    for result, ctx in zip(results, contexts, strict=True):
        assert result.ok, result.error
        assert result.metrics["tokens_out"] == 8 and result.metrics["slots"] == SLOTS
        assert 1 <= result.metrics["parallel"] <= SLOTS and result.metrics["queued_s"] >= 0
        assert result.metrics["ttft_s"] > 0 and ctx.first_token.is_set()
        assert result.prompt.startswith("Count from 1 to 1000")


@pytest.mark.models
async def test_a_schema_and_a_chat_are_held_to_on_the_decoder(llm: Loaded) -> None:
    schema = item(
        "Q: What is the capital of France? Answer as JSON.\nA:",
        schema=json.dumps(SHORT_ANSWER),
        max_tokens=48,
    )
    chat = item("user: What is the capital of Italy?", kind="chat", max_tokens=8)
    as_json, as_chat = await asyncio.gather(
        run_prompt(schema, RunContext(model=llm)), run_chat(chat, RunContext(model=llm))
    )
    assert as_json.ok and as_json.parsed, (as_json.error, as_json.output)
    jsonschema.validate(json.loads(as_json.output), SHORT_ANSWER)
    assert as_chat.ok and as_chat.metrics["slots"] == SLOTS and "<end_of_turn>" not in as_chat.output
    assert [m["role"] for m in json.loads(as_chat.prompt)] == ["user"]


@pytest.mark.models
async def test_a_cancelled_task_stops_its_own_decoding(llm: Loaded) -> None:
    ctx = RunContext(model=llm)
    job = asyncio.ensure_future(run_prompt(item(COUNTING, max_tokens=1500), ctx))
    assert await asyncio.to_thread(ctx.first_token.wait, HANG_S)
    ctx.cancel.set()
    result = await job
    assert result.cancelled and not result.ok
    assert result.error.startswith("cancelled; stopped after "), result.error


@pytest.mark.models
async def test_definition_errors_on_the_decoder(llm: Loaded) -> None:
    long = await run_prompt(item("word " * 3000, max_tokens=8), RunContext(model=llm))
    assert long.definition_error and "n_ctx 2048" in long.error
    plain = Loaded(
        name="plain",
        spec=msgspec.structs.replace(llm.spec, chat_format=""),
        device=llm.device,
        handle=llm.handle,
        load_s=0.0,
        lock=llm.lock,
        decoder=llm.decoder,
    )
    chat = await run_chat(item("user: hi", kind="chat"), RunContext(model=plain))
    assert chat.definition_error and "has no chat template" in chat.error


# ------------------------------------------------------------------ a worker with llm_slots


@pytest.mark.integration
@pytest.mark.models
async def test_a_worker_with_llm_slots_decodes_its_prompt_tasks_together(mesh: Mesh) -> None:
    await start(mesh, llm_slots=SLOTS, stream_batch_s=0)
    bus = await mesh.bus()
    names = bus.names
    chunks = await heard(bus.nc, names.text_all)
    tasks = "".join(
        f"\n### c{i}\n- model: {LLM}\n- max_tokens: 24\n\n```prompt\nCount from {i * 100} to 1000: "
        f"{i * 100}, {i * 100 + 1},\n```\n"
        for i in range(SLOTS + 1)
    )
    plan_id = await mesh.submit_text(f"# Counting\n\n## Tasks\n{tasks}")
    await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    await all_succeeded(mesh, plan_id)
    runs = [await finished(mesh, plan_id, f"c{i}") for i in range(SLOTS + 1)]
    for run in runs:
        assert isinstance(run, RunFinished) and run.ok and run.output.strip()
        assert run.metrics["slots"] == SLOTS and run.metrics["tokens_out"] == 24
    # released in one step and taken SLOTS at a time: some were decoded together
    assert max(run.metrics["parallel"] for run in runs) >= 2

    async def streamed() -> bool:
        got = chunks_of(names, chunks, "c0")
        return bool(got) and got[-1].final

    await until(streamed, HANG_S, "c0's text streamed to its end")
    text = chunks_of(names, chunks, "c0")
    assert "".join(c.text for c in text) == runs[0].output
