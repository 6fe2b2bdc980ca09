"""Executors: a body kind -> an async function that runs one work item.

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
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mesh.chat import chat_messages
from mesh.events import WorkItem
from mesh.schemas import check_answer
from mesh.untrusted import DATA_PREAMBLE as DATA_PREAMBLE  # the prompt's data preamble, for tests
from mesh.untrusted import data_section
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")


def _no_text(_chunk: str) -> None:
    """Where a model's text goes when nobody listens."""


@dataclass
class RunContext:
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    env: dict[str, str] = field(default_factory=dict)
    tail_bytes: int = 4096
    kill_grace_s: float = 5.0
    shell: str = "/bin/bash"
    # told the process group of a body when it starts, and again when it is gone
    on_start: Callable[[int], None] | None = None
    on_end: Callable[[int], None] | None = None
    # model kinds: the loaded model (a `mesh.host.loaders.Loaded`), the device it is on, and the
    # outputs of the dependencies named in the task's `inputs`, by task id
    model: Any = None
    device: str = "cpu"
    inputs: dict[str, str] = field(default_factory=dict)
    # set when an input came from a sensitive task: the run is then kept out of the history too
    sensitive: bool = False
    # where a model task's files go when its body names no `save:` path
    artifacts_dir: str = ""
    # set (from the model's thread) when a prompt's first token is sampled
    first_token: threading.Event = field(default_factory=threading.Event)
    # told each piece of an LLM's answer as it is generated (from the model's thread; the pieces
    # joined are the output). It must not block and never raises: the worker publishes the
    # pieces on the task's stream subject, or drops them
    on_text: Callable[[str], None] = _no_text


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
    env = dict(os.environ)
    env.update(ctx.env)
    env.update(item.env)
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
    cwd = item.workdir if item.workdir and os.path.isdir(item.workdir) else None
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


# ------------------------------------------------------------------ model kinds
#
# A model executor runs the library's blocking call in a thread, holding the model's lock (a
# handle serves one task at a time), and tells it to stop through a threading.Event when the
# task is cancelled or times out: the LLM checks it after every token, the transcriber after
# every segment, the embedder between chunks of texts.


class TaskDefinitionError(Exception):
    """The task can never run as defined (a prompt longer than the context, a missing file):
    retrying cannot help."""


async def _run_model(
    item: WorkItem, ctx: RunContext, kind: str, work: Callable[[Any, threading.Event], RunResult]
) -> RunResult:
    """Run `work(loaded, stop)` in a thread under the item's timeout and the context's cancel."""
    began = time.monotonic()
    loaded = ctx.model
    spec = getattr(loaded, "spec", None)
    if spec is None or getattr(spec, "kind", None) != kind or getattr(loaded, "handle", None) is None:
        what = f"a {spec.kind} model" if spec is not None else repr(loaded)
        return RunResult(
            ok=False,
            duration_s=0.0,
            error=f"a {item.kind} task needs a loaded {kind} model, and the worker gave it {what}",
        )
    if ctx.cancel.is_set():
        return RunResult(ok=False, duration_s=0.0, cancelled=True, error="cancelled before it started")
    stop = threading.Event()

    def guarded() -> RunResult:
        with loaded.lock:
            if stop.is_set():
                return RunResult(ok=False, duration_s=0.0, error="stopped before it started")
            return work(loaded, stop)

    job = asyncio.ensure_future(asyncio.to_thread(guarded))
    cancel = asyncio.ensure_future(ctx.cancel.wait())
    timeout = item.timeout_s if item.timeout_s > 0 else None
    stopped_for = ""
    try:
        done, _ = await asyncio.wait({job, cancel}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if job not in done:
            stopped_for = "cancelled" if cancel in done else "timed out"
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job), timeout=ctx.kill_grace_s)
    finally:
        # also when this coroutine is itself cancelled: the thread must not run on
        stop.set()
        cancel.cancel()
    if not job.done():
        # nobody waits for it any more: its outcome is read when it comes, so none goes unseen
        job.add_done_callback(lambda f: f.cancelled() or f.exception())
        result = RunResult(
            ok=False,
            duration_s=0.0,
            error=f"the model call did not stop within {ctx.kill_grace_s:g}s; it finishes in the "
            "background and holds the model until then",
        )
    elif (exc := job.exception()) is None:
        result = job.result()
    elif isinstance(exc, TaskDefinitionError):
        result = RunResult(ok=False, duration_s=0.0, definition_error=True, error=str(exc))
    else:
        result = RunResult(ok=False, duration_s=0.0, error=f"{type(exc).__name__}: {exc}")
    result.duration_s = time.monotonic() - began
    if stopped_for:
        result.ok = False
        result.timed_out = stopped_for == "timed out"
        result.cancelled = stopped_for == "cancelled"
        head = f"timed out after {item.timeout_s:g}s" if result.timed_out else "cancelled"
        result.error = f"{head}; {result.error}" if result.error else head
    return result


def _artifact_path(item: WorkItem, artifacts_dir: str, name: str) -> str:
    """Default home of a task's file: `<artifacts_dir>/<plan>/<name>` (under the worker's data dir),
    so no output lands beside the plan file unless the body says `save:`."""
    if not artifacts_dir:  # run outside a worker: beside the plan, as a relative `save:` would be
        return _local_path(item, name)
    return os.path.join(artifacts_dir, item.plan_id, name)


def _local_path(item: WorkItem, path: str) -> str:
    """A path of the body: ~ expanded, relative ones relative to the plan's workdir."""
    path = os.path.expanduser(path.strip())
    if not os.path.isabs(path):
        path = os.path.join(item.workdir or os.getcwd(), path)
    return os.path.normpath(path)


def _write_artifact(path: str, write: Callable[[str], None]) -> None:
    """Write a file whole or not at all (a reader never sees half of it)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
    on_text: Callable[[str], None] = _no_text,
) -> RunResult:
    from llama_cpp import StoppingCriteriaList

    llm, spec = loaded.handle, loaded.spec
    prompt, tokens, stop_at = _prompt_tokens(item, inputs, loaded)
    max_tokens = item.max_tokens or spec.max_tokens
    n_ctx = int(llm.n_ctx())
    if len(tokens) + max_tokens > n_ctx:
        raise TaskDefinitionError(
            f"prompt is {len(tokens)} tokens and max_tokens {max_tokens}; the model {loaded.name} has "
            f"n_ctx {n_ctx}: shorten the prompt or raise n_ctx"
        )
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
    gen_s = ended - first
    metrics = {
        "tokens_in": float(len(tokens)),
        "tokens_out": float(tokens_out),
        "ttft_s": first - began,
        "gen_s": gen_s,
        # decoding speed: the tokens after the first over the time after the first
        "tokens_per_s": (tokens_out - 1) / gen_s if tokens_out > 1 and gen_s > 0 else 0.0,
        "n_ctx": float(n_ctx),
    }
    stopped = stop.is_set()
    return RunResult(
        ok=not stopped,
        duration_s=0.0,
        output="".join(pieces),
        prompt=prompt,
        metrics=metrics,
        error=f"stopped after {tokens_out} tokens" if stopped else "",
    )


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
    inputs = dict(ctx.inputs)

    def work(loaded: Any, stop: threading.Event) -> RunResult:
        result = _prompt_work(item, inputs, loaded, stop, ctx.first_token, ctx.on_text)
        return checked_answer(item, result, item.max_tokens or loaded.spec.max_tokens)

    return await _run_model(item, ctx, "llm", work)


async def run_chat(item: WorkItem, ctx: RunContext) -> RunResult:
    """Answer the body's chat turns with the loaded LLM, rendered with the model's own chat
    template (the task's inputs as data in the last user turn)."""
    return await run_prompt(item, ctx)


# transcribe -------------------------------------------------------------------


def _body_lines(body: str) -> list[str]:
    return [line.strip() for line in body.splitlines() if line.strip()]


def _key_value(line: str) -> tuple[str, str]:
    key, sep, value = line.partition(":")
    return (key.strip().lower(), value.strip()) if sep else ("", line)


def _transcribe_work(
    item: WorkItem, loaded: Any, stop: threading.Event, artifacts_dir: str = ""
) -> RunResult:
    audio = save = ""
    for line in _body_lines(item.body):
        key, value = _key_value(line)
        if key == "save" and value:
            save = _local_path(item, value)
        elif audio:
            continue
        elif key in ("file", "audio") and value:
            audio = _local_path(item, value)
        else:
            audio = _local_path(item, line)
    if not audio:
        raise TaskDefinitionError("the body names no audio file: write its path on the first line")
    if not os.path.isfile(audio):
        raise TaskDefinitionError(
            f"audio file {audio} does not exist (relative paths are relative to the plan's workdir, "
            f"{item.workdir or os.getcwd()})"
        )
    save = save or _artifact_path(item, artifacts_dir, f"{item.task_id}.segments.json")
    spec = loaded.spec
    began = time.monotonic()
    try:
        pieces, info = loaded.handle.transcribe(
            audio, beam_size=spec.beam_size, language=spec.language or None
        )
    except Exception as exc:
        raise RuntimeError(f"cannot read {audio} as audio: {type(exc).__name__}: {exc}") from exc
    segments: list[dict[str, Any]] = []
    for seg in pieces:  # decoding happens as this iterates: one segment at a time
        segments.append({"start": round(seg.start, 3), "end": round(seg.end, 3), "text": seg.text.strip()})
        if stop.is_set():
            break
    took = time.monotonic() - began
    text = " ".join(s["text"] for s in segments if s["text"])
    audio_s = float(info.duration)
    metrics = {
        "segments": float(len(segments)),
        "audio_s": audio_s,
        "transcribe_s": took,
        # processing time over audio time: below 1 is faster than real time
        "realtime_factor": took / audio_s if audio_s > 0 else 0.0,
    }
    if stop.is_set():
        return RunResult(
            ok=False,
            duration_s=0.0,
            output=text,
            metrics=metrics,
            error=f"stopped after {len(segments)} segments",
        )
    doc = {"audio": audio, "language": info.language, "duration_s": audio_s, "segments": segments}

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, ensure_ascii=False, indent=1)

    _write_artifact(save, write)
    return RunResult(ok=True, duration_s=0.0, output=text, metrics=metrics, artifacts=[save])


async def run_transcribe(item: WorkItem, ctx: RunContext) -> RunResult:
    """Transcribe the audio file the body names; the segments go to a JSON file."""
    return await _run_model(
        item, ctx, "transcribe", lambda m, stop: _transcribe_work(item, m, stop, ctx.artifacts_dir)
    )


# embed ------------------------------------------------------------------------

EMBED_KEYS = ("file", "text", "input", "save")


def _embed_texts(item: WorkItem, inputs: Mapping[str, str], artifacts_dir: str = "") -> tuple[list[str], str]:
    """The texts the body names, in order, and where the vectors go."""
    texts: list[str] = []
    save = ""
    for line in _body_lines(item.body):
        key, value = _key_value(line)
        if key == "text":
            texts.append(value)
        elif key == "file":
            path = _local_path(item, value)
            try:
                with open(path, encoding="utf-8") as fh:
                    texts.extend(t.strip() for t in fh if t.strip())
            except FileNotFoundError:
                raise TaskDefinitionError(
                    f"file {path} does not exist (relative paths are relative to the plan's "
                    f"workdir, {item.workdir or os.getcwd()})"
                ) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise RuntimeError(f"cannot read {path}: {exc}") from exc
        elif key == "input":
            if value not in inputs:
                raise TaskDefinitionError(
                    f"input: {value} is not an input of this task; name it in the task's inputs "
                    f"(it has: {', '.join(inputs) or 'none'})"
                )
            texts.extend(t.strip() for t in inputs[value].splitlines() if t.strip())
        elif key == "save" and value:
            save = _local_path(item, value)
        else:
            raise TaskDefinitionError(
                f"cannot read the body line {line!r}: each line is one of "
                + ", ".join(f"'{k}: ...'" for k in EMBED_KEYS)
            )
    if not texts:
        raise TaskDefinitionError(
            "nothing to embed: the body needs at least one non-empty 'text:', 'file:' or 'input:' text"
        )
    save = save or _artifact_path(item, artifacts_dir, f"{item.task_id}.npy")
    if not save.endswith(".npy"):
        save += ".npy"
    return texts, save


def _encode(texts: Sequence[str], loaded: Any, stop: threading.Event) -> tuple[Any, str]:
    """The texts' vectors as one float32 matrix, in chunks (a cancel or a timeout is seen
    between them); (None, why) when stopped."""
    import numpy as np

    spec = loaded.spec
    batch = max(1, spec.batch_size)
    chunk = batch * 8
    parts = []
    for start in range(0, len(texts), chunk):
        if stop.is_set():
            return None, f"stopped after {start} of {len(texts)} texts"
        parts.append(
            loaded.handle.encode(
                list(texts[start : start + chunk]),
                batch_size=batch,
                normalize_embeddings=spec.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        )
    return np.concatenate(parts).astype(np.float32, copy=False), ""


def _embedded(matrix: Any, save: str, took: float, batch: int = 1) -> RunResult:
    """Write one task's vectors, and its result."""
    _write_artifact(save, lambda tmp: _save_npy(tmp, matrix))
    rows, dim = matrix.shape
    return RunResult(
        ok=True,
        duration_s=0.0,
        output=f"{rows} vectors x {dim} dims -> {save}",
        metrics={"vectors": float(rows), "dim": float(dim), "embed_s": took, "batch": float(batch)},
        artifacts=[save],
    )


def _embed_work(
    item: WorkItem, inputs: Mapping[str, str], loaded: Any, stop: threading.Event, artifacts_dir: str = ""
) -> RunResult:
    texts, save = _embed_texts(item, inputs, artifacts_dir)
    began = time.monotonic()
    matrix, stopped = _encode(texts, loaded, stop)
    if matrix is None:
        return RunResult(ok=False, duration_s=0.0, error=stopped)
    return _embedded(matrix, save, time.monotonic() - began)


def _save_npy(path: str, matrix: Any) -> None:
    import numpy as np

    with open(path, "wb") as fh:  # a file object: np.save would add '.npy' to the temporary name
        np.save(fh, matrix)


async def run_embed(item: WorkItem, ctx: RunContext) -> RunResult:
    """Embed the texts the body names into an (N x dim) float32 .npy matrix."""
    inputs = dict(ctx.inputs)
    return await _run_model(
        item, ctx, "embed", lambda m, stop: _embed_work(item, inputs, m, stop, ctx.artifacts_dir)
    )


# A batch: several embed tasks of one model fetched together run as one encode call (the worker
# groups them: `mesh.work.batch_groups`), and each still gets its own vectors file and result.


def _embed_batch_work(
    items: Sequence[WorkItem],
    ctxs: Sequence[RunContext],
    loaded: Any,
    stop: threading.Event,
    out: list[RunResult | None],
) -> RunResult:
    """Every task's texts in one encode call, each task's rows to its own file; a task whose
    body cannot be read, or whose file cannot be written, fails alone in `out`."""
    jobs: list[tuple[int, list[str], str]] = []
    for i, (item, ctx) in enumerate(zip(items, ctxs, strict=True)):
        try:
            texts, save = _embed_texts(item, ctx.inputs, ctx.artifacts_dir)
        except TaskDefinitionError as exc:
            out[i] = RunResult(ok=False, duration_s=0.0, definition_error=True, error=str(exc))
            continue
        except RuntimeError as exc:
            out[i] = RunResult(ok=False, duration_s=0.0, error=f"{type(exc).__name__}: {exc}")
            continue
        jobs.append((i, texts, save))
    if not jobs:
        return RunResult(ok=True, duration_s=0.0)
    began = time.monotonic()
    matrix, stopped = _encode([t for _, texts, _ in jobs for t in texts], loaded, stop)
    if matrix is None:
        return RunResult(ok=False, duration_s=0.0, error=stopped)
    took = time.monotonic() - began
    row = 0
    for i, texts, save in jobs:
        part = matrix[row : row + len(texts)]
        row += len(texts)
        try:
            out[i] = _embedded(part, save, took, len(jobs))
        except OSError as exc:
            out[i] = RunResult(ok=False, duration_s=0.0, error=f"{type(exc).__name__}: {exc}")
    return RunResult(ok=True, duration_s=0.0)


async def _all_set(events: Sequence[asyncio.Event], into: asyncio.Event) -> None:
    await asyncio.gather(*(e.wait() for e in events))
    into.set()


async def run_embed_batch(items: Sequence[WorkItem], ctxs: Sequence[RunContext]) -> list[RunResult]:
    """Embed several tasks in one encode call; one result per item, in order.

    The batch runs under the shortest timeout of its items and stops only when every item is
    cancelled; an item cancelled while the others ran reports cancelled. When the batch call
    fails or is stopped, each item without a result runs alone (`run_embed`), so one bad text
    fails its own task only. A task's `duration_s` is its share of the call (`batch_s`)."""
    if not items:
        return []
    first = ctxs[0]
    if len(items) == 1 or any(c.model is not first.model for c in ctxs):
        return [await run_embed(item, ctx) for item, ctx in zip(items, ctxs, strict=True)]
    out: list[RunResult | None] = [None] * len(items)
    timeouts = [i.timeout_s for i in items if i.timeout_s > 0]
    lead = msgspec.structs.replace(items[0], timeout_s=min(timeouts) if timeouts else 0.0)
    joint = RunContext(model=first.model, kill_grace_s=first.kill_grace_s)
    watch = asyncio.ensure_future(_all_set([c.cancel for c in ctxs], joint.cancel))
    try:
        batch = await _run_model(
            lead, joint, "embed", lambda m, stop: _embed_batch_work(items, ctxs, m, stop, out)
        )
    finally:
        watch.cancel()
    if not batch.ok:
        log.warning(
            "an embed batch of %d tasks did not run through (%s); running each alone", len(items), batch.error
        )
    results: list[RunResult] = []
    for item, ctx, got in zip(items, ctxs, out, strict=True):
        if got is None:
            results.append(await run_embed(item, ctx))
            continue
        if got.ok and ctx.cancel.is_set():
            got = RunResult(ok=False, duration_s=0.0, cancelled=True, error="cancelled")
        # each task's share of the call: the shares add up to the time the model was busy,
        # which is what a task's duration is learned for (placement); the whole in `batch_s`
        got.duration_s = batch.duration_s / len(items)
        got.metrics["batch_s"] = batch.duration_s
        results.append(got)
    return results


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
