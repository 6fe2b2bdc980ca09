"""Executors: a body kind -> an async function that runs one work item; shell and LLM bodies
here, transcription and embeddings in `mesh.host.media`, what they share in `mesh.host.runmodel`.

Every executor takes the item and a `RunContext` and returns a `RunResult`; it
never raises for a failure of the task itself (a non-zero exit, a timeout, a
cancel), only for a fault of its own. Heavy imports belong inside the executor
that needs them, so a worker only pays for the kinds it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from mesh.chat import chat_messages
from mesh.events import WorkItem
from mesh.host.media import run_embed as run_embed
from mesh.host.media import run_embed_batch as run_embed_batch
from mesh.host.media import run_transcribe as run_transcribe
from mesh.host.runmodel import RunContext as RunContext
from mesh.host.runmodel import TaskDefinitionError as TaskDefinitionError
from mesh.host.runmodel import no_text, run_model, stopped_as, supervise
from mesh.schemas import check_answer
from mesh.settings import SECRET_ENV
from mesh.untrusted import DATA_PREAMBLE as DATA_PREAMBLE  # the prompt's data preamble, for tests
from mesh.untrusted import data_section
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")


class Tail:
    """Keeps the last `limit` bytes of a stream and counts all of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buf += chunk
        if len(self.buf) > 2 * self.limit:
            del self.buf[: len(self.buf) - self.limit]

    def text(self) -> str:
        data = bytes(self.buf[-self.limit :]) if self.limit else b""
        prefix = "…" if self.total > len(data) else ""
        return prefix + data.decode("utf-8", errors="replace")


async def _pump(stream: asyncio.StreamReader | None, tail: Tail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        tail.feed(chunk)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _kill_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the whole process group, then SIGKILL it if it outlives the grace period."""
    _signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), timeout=grace_s)
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()


def task_env(item: WorkItem, ctx: RunContext) -> dict[str, str]:
    """The environment of a task's process: the worker's, less its secrets (the bus's password,
    the API key: a task is the plan's code, not the worker's), then the plan's and task's `env`,
    the worker's own marks and the task's ids."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.update(item.env)
    env.update(ctx.env)  # the worker's own (its reaper's mark) over the plan's
    env.update(
        {
            "MESH_PLAN_ID": item.plan_id,
            "MESH_TASK_ID": item.task_id,
            "MESH_ATTEMPT": str(item.attempt),
        }
    )
    return env


async def run_shell(item: WorkItem, ctx: RunContext) -> RunResult:
    """Run a shell body in its own process group, with the task's timeout."""
    began = time.monotonic()
    if item.workdir and not os.path.isdir(item.workdir):
        # never the worker's own directory in its place: the body would run among other files
        return RunResult(
            ok=False,
            duration_s=0.0,
            definition_error=True,
            error=f"the task's working directory {item.workdir} does not exist on this host: submit "
            "the plan with `mesh submit` (its files then travel with it), or make the directory",
        )
    cwd = item.workdir or None
    try:
        proc = await asyncio.create_subprocess_exec(
            ctx.shell,
            "-c",
            item.body,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=task_env(item, ctx),
            start_new_session=True,
        )
    except OSError as exc:
        return RunResult(
            ok=False, duration_s=time.monotonic() - began, error=f"could not start {ctx.shell}: {exc}"
        )
    if ctx.on_start is not None:
        ctx.on_start(proc.pid)
    try:
        return await _supervise(proc, item, ctx, began)
    finally:
        if ctx.on_end is not None:
            ctx.on_end(proc.pid)


async def _supervise(
    proc: asyncio.subprocess.Process, item: WorkItem, ctx: RunContext, began: float
) -> RunResult:
    out, err = Tail(ctx.tail_bytes), Tail(ctx.tail_bytes)
    pumps = asyncio.gather(_pump(proc.stdout, out), _pump(proc.stderr, err))
    waiter = asyncio.ensure_future(proc.wait())
    cancelled = asyncio.ensure_future(ctx.cancel.wait())
    timeout = item.timeout_s if item.timeout_s > 0 else None
    done, _ = await asyncio.wait({waiter, cancelled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    timed_out = not done
    was_cancelled = cancelled in done and waiter not in done
    if waiter not in done:
        await _kill_group(proc, ctx.kill_grace_s)
    else:
        # the body is done: whatever it left running in its group goes too
        _signal_group(proc.pid, signal.SIGKILL)
    cancelled.cancel()
    try:
        await asyncio.wait_for(pumps, timeout=ctx.kill_grace_s)
    except TimeoutError:
        pumps.cancel()
    rc = proc.returncode
    duration = time.monotonic() - began
    error = ""
    if timed_out:
        error = f"timed out after {item.timeout_s:g}s; process group killed"
    elif was_cancelled:
        error = "cancelled; process group killed"
    elif rc != 0:
        error = f"exit code {rc}"
    return RunResult(
        ok=rc == 0 and not timed_out and not was_cancelled,
        duration_s=duration,
        rc=rc,
        timed_out=timed_out,
        cancelled=was_cancelled,
        error=error,
        stdout_tail=out.text(),
        stderr_tail=err.text(),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
    )


async def run_noop(item: WorkItem, ctx: RunContext) -> RunResult:
    """Does nothing and succeeds: a join point in a plan, and the orchestration benchmark's task."""
    return RunResult(ok=True, duration_s=0.0, rc=0)


# prompt -----------------------------------------------------------------------


# '<' starting anything a reader could take for a data tag (<data, </data, < / DATA ...)
def build_prompt(body: str, inputs: Mapping[str, str], order: Sequence[str] = ()) -> str:
    """The body (the trusted instruction), then each input as an untrusted <data> block.

    Inputs come in `order` (the task's `inputs`), then any others in the mapping's order."""
    instruction = body.strip()
    if not inputs:
        return instruction
    return "\n\n".join([instruction, data_section(inputs, order)]) + "\n"


def _prompt_work(
    item: WorkItem,
    inputs: Mapping[str, str],
    loaded: Any,
    stop: threading.Event,
    first_token: threading.Event | None = None,
    on_text: Callable[[str], None] = no_text,
) -> RunResult:
    from llama_cpp import StoppingCriteriaList

    llm, spec = loaded.handle, loaded.spec
    prompt, tokens, stop_at = _prompt_tokens(item, inputs, loaded)
    max_tokens = item.max_tokens or spec.max_tokens
    n_ctx = int(llm.n_ctx())
    _check_room(tokens, max_tokens, n_ctx, loaded.name)
    grammar = _grammar(item)
    llm.reset()  # a fresh context: nothing of an earlier task's prompt is reused
    sampled: list[float] = []

    def stopping(_ids: Any, _logits: Any) -> bool:
        # called after each sampled token (and once more at the end): the first call is the
        # first token's time; True stops the generation there
        if not sampled:
            sampled.append(time.monotonic())
            if first_token is not None:
                first_token.set()
        return stop.is_set()

    began = time.monotonic()
    pieces: list[str] = []
    finish = ""
    for chunk in llm.create_completion(
        tokens,
        max_tokens=max_tokens,
        temperature=spec.temperature,
        seed=spec.seed,
        stopping_criteria=StoppingCriteriaList([stopping]),
        grammar=grammar,
        stop=stop_at or None,
        stream=True,
    ):
        choice = chunk["choices"][0]
        if text := choice.get("text"):
            pieces.append(text)
            on_text(text)
        finish = choice.get("finish_reason") or finish
    ended = time.monotonic()
    # a stream reports no usage: each token was fed back to the model before the next was
    # sampled, but for the one the answer ended on at max_tokens
    tokens_out = int(llm.n_tokens) - len(tokens) + (1 if finish == "length" else 0)
    first = sampled[0] if sampled else ended
    metrics = _answer_metrics(len(tokens), tokens_out, began, first, ended, n_ctx)
    return _answer("".join(pieces), prompt, metrics, stop.is_set())


def _answer_metrics(
    tokens_in: int, tokens_out: int, began: float, first: float, ended: float, n_ctx: int
) -> dict[str, float]:
    gen_s = ended - first
    return {
        "tokens_in": float(tokens_in),
        "tokens_out": float(tokens_out),
        "ttft_s": first - began,
        "gen_s": gen_s,
        # decoding speed: the tokens after the first over the time after the first
        "tokens_per_s": (tokens_out - 1) / gen_s if tokens_out > 1 and gen_s > 0 else 0.0,
        "n_ctx": float(n_ctx),
    }


def _answer(output: str, prompt: str, metrics: dict[str, float], stopped: bool) -> RunResult:
    return RunResult(
        ok=not stopped,
        duration_s=0.0,
        output=output,
        prompt=prompt,
        metrics=metrics,
        error=f"stopped after {metrics['tokens_out']:g} tokens" if stopped else "",
    )


def _check_room(tokens: Sequence[int], max_tokens: int, n_ctx: int, name: str) -> None:
    if len(tokens) + max_tokens > n_ctx:
        raise TaskDefinitionError(
            f"prompt is {len(tokens)} tokens and max_tokens {max_tokens}; the model {name} has "
            f"n_ctx {n_ctx}: shorten the prompt or raise n_ctx"
        )


async def _decoded(item: WorkItem, ctx: RunContext) -> RunResult:
    """A prompt or chat task answered by the loaded model's decoder (`llm_slots` above 1): decoded
    together with the other tasks of the model in flight, under the task's timeout and cancel
    as a model call in a thread is (`run_model`)."""
    from mesh.host.llmbatch import DecoderClosed, Request

    loaded, began = ctx.model, time.monotonic()
    if ctx.cancel.is_set():
        return RunResult(ok=False, duration_s=0.0, cancelled=True, error="cancelled before it started")
    decoder, spec = loaded.decoder, loaded.spec
    max_tokens = item.max_tokens or spec.max_tokens
    try:
        prompt, tokens, stop_at = await asyncio.to_thread(_prompt_tokens, item, dict(ctx.inputs), loaded)
        _check_room(tokens, max_tokens, decoder.n_ctx, loaded.name)
        req = Request(
            tokens=tokens,
            max_tokens=max_tokens,
            temperature=spec.temperature,
            seed=spec.seed,
            stop=stop_at,
            grammar=_grammar(item),
            on_text=ctx.on_text,
            sampled=ctx.first_token,
        )
        job = asyncio.wrap_future(decoder.submit(req))
    except (TaskDefinitionError, ValueError) as exc:  # ValueError: a grammar llama.cpp cannot parse
        return RunResult(ok=False, duration_s=time.monotonic() - began, definition_error=True, error=str(exc))
    except DecoderClosed as exc:
        return RunResult(ok=False, duration_s=time.monotonic() - began, error=str(exc))
    stopped_for = await supervise(job, req.halt, ctx, item.timeout_s)  # halted: ends at the next step
    if not job.done():
        result = RunResult(
            ok=False, duration_s=0.0, error=f"the decoder did not stop it within {ctx.kill_grace_s:g}s"
        )
    elif (failed := job.exception()) is not None:
        result = RunResult(ok=False, duration_s=0.0, error=f"{type(failed).__name__}: {failed}")
    else:
        out = job.result()
        metrics = _answer_metrics(len(tokens), out.tokens_out, began, out.first, out.ended, decoder.n_ctx)
        # decoded with others: the most in one step while it ran, of how many slots; and how
        # long it waited for a slot
        metrics.update(parallel=float(out.parallel), slots=float(decoder.slots))
        metrics["queued_s"] = out.admitted - out.submitted
        result = _answer(out.text, prompt, metrics, out.finish == "halted")
    result.duration_s = time.monotonic() - began
    return checked_answer(item, stopped_as(result, stopped_for, item.timeout_s), max_tokens)


def _prompt_tokens(
    item: WorkItem, inputs: Mapping[str, str], loaded: Any
) -> tuple[str, list[int], list[str]]:
    """The prompt as recorded, its tokens, and the strings that end the answer: a prompt body
    and its inputs as one text; a chat body's turns through the model's chat template."""
    if item.kind == "chat":
        return _chat_tokens(item, inputs, loaded)
    prompt = build_prompt(item.body, inputs, item.inputs)
    if not prompt:
        raise TaskDefinitionError("the prompt is empty: write the instruction in the task's body")
    # special=False: text in the prompt (an input above all) can never become a control token
    tokens: list[int] = loaded.handle.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    return prompt, tokens, []


def _chat_tokens(item: WorkItem, inputs: Mapping[str, str], loaded: Any) -> tuple[str, list[int], list[str]]:
    """A chat body's messages (the inputs as data in the last user turn), rendered with the
    model's chat template; the prompt recorded is the messages, as JSON (what export reads)."""
    from mesh.host.chatrender import render_chat

    try:
        messages = chat_messages(item.body, inputs, item.inputs)
        rendered = render_chat(loaded, messages)
    except ValueError as exc:  # a body that is not turns; a model that cannot render them
        raise TaskDefinitionError(str(exc)) from None
    return json.dumps(messages, ensure_ascii=False), rendered.tokens, rendered.stop


def _grammar(item: WorkItem) -> Any:
    """The grammar the answer is held to: a review's (its one word), the task's JSON schema's,
    or None (free text)."""
    from llama_cpp import LlamaGrammar

    if item.grammar:
        return LlamaGrammar.from_string(item.grammar, verbose=False)
    if not item.schema:
        return None
    try:
        return LlamaGrammar.from_json_schema(item.schema, verbose=False)
    except Exception as exc:
        raise TaskDefinitionError(
            f"the schema cannot be turned into a grammar for the model ({type(exc).__name__}: {exc}); "
            "keep to what llama.cpp's JSON-schema grammars take (types, properties, required, "
            "items, enum, const, anyOf, string lengths and patterns)"
        ) from None


def checked_answer(item: WorkItem, result: RunResult, max_tokens: int = 0) -> RunResult:
    """A schema task's answer checked against its schema: valid, its output is the JSON (compact)
    and `parsed` is set; not, the attempt fails with the validation error (and is retried)."""
    if not item.schema or not result.ok:
        return result
    value, why = check_answer(result.output, item.schema)
    if why:
        if max_tokens and result.metrics.get("tokens_out", 0) >= max_tokens:
            why += f" (the answer stopped at max_tokens {max_tokens}: raise max_tokens)"
        result.ok, result.error = False, why
        result.error_withheld = (
            "the answer is not valid JSON against the schema (what was wrong is withheld: the task is "
            "sensitive, and the complaint would quote its answer)"
        )
        return result
    result.output = json.dumps(value, ensure_ascii=False)
    result.parsed = True
    return result


async def run_prompt(item: WorkItem, ctx: RunContext) -> RunResult:
    """Complete the body's prompt (with the task's inputs as data) with the loaded LLM."""
    if getattr(getattr(ctx.model, "spec", None), "backend", "") == "openai":
        # an OpenAI-compatible server answers instead of a model in this process
        from mesh.host.openai_backend import run_openai_prompt

        if item.kind == "chat":
            try:
                messages = chat_messages(item.body, ctx.inputs, item.inputs)
            except ValueError as exc:
                return RunResult(ok=False, duration_s=0.0, definition_error=True, error=str(exc))
            result = await run_openai_prompt(item, ctx, json.dumps(messages, ensure_ascii=False), messages)
        else:
            result = await run_openai_prompt(item, ctx, build_prompt(item.body, ctx.inputs, item.inputs))
        return checked_answer(item, result, item.max_tokens or ctx.model.spec.max_tokens)
    if getattr(ctx.model, "decoder", None) is not None and ctx.model.spec.kind == "llm":
        return await _decoded(item, ctx)  # decoded together with the model's other tasks
    inputs = dict(ctx.inputs)

    def work(loaded: Any, stop: threading.Event) -> RunResult:
        result = _prompt_work(item, inputs, loaded, stop, ctx.first_token, ctx.on_text)
        return checked_answer(item, result, item.max_tokens or loaded.spec.max_tokens)

    return await run_model(item, ctx, "llm", work)


async def run_chat(item: WorkItem, ctx: RunContext) -> RunResult:
    """Answer the body's chat turns with the loaded LLM, rendered with the model's own chat
    template (the task's inputs as data in the last user turn)."""
    return await run_prompt(item, ctx)


Executor = Callable[[WorkItem, RunContext], Awaitable[RunResult]]

EXECUTORS: dict[str, Executor] = {
    "shell": run_shell,
    "noop": run_noop,
    "prompt": run_prompt,
    "chat": run_chat,
    "transcribe": run_transcribe,
    "embed": run_embed,
}

BatchExecutor = Callable[[Sequence[WorkItem], Sequence[RunContext]], Awaitable[list[RunResult]]]

# the kinds whose items may run together (`mesh.work.BATCHED_KINDS`): one result per item
BATCH_EXECUTORS: dict[str, BatchExecutor] = {
    "embed": run_embed_batch,
}
