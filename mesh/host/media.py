"""Transcription and embedding executors: faster-whisper and sentence-transformers bodies, one
task at a time or, for embeddings, several tasks of one model as one encode call.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from mesh.events import WorkItem
from mesh.host.runmodel import (
    RunContext,
    TaskDefinitionError,
    local_path,
    run_model,
    write_artifact,
)
from mesh.untrusted import DATA_PREAMBLE as DATA_PREAMBLE  # the prompt's data preamble, for tests
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")


# transcribe -------------------------------------------------------------------


def _body_lines(body: str) -> list[str]:
    return [line.strip() for line in body.splitlines() if line.strip()]


def _key_value(line: str) -> tuple[str, str]:
    key, sep, value = line.partition(":")
    return (key.strip().lower(), value.strip()) if sep else ("", line)


def _transcribe_work(
    item: WorkItem, loaded: Any, stop: threading.Event, in_memory: bool = False
) -> RunResult:
    audio = save = ""
    for line in _body_lines(item.body):
        key, value = _key_value(line)
        if key == "save" and value:
            save = local_path(item, value)
        elif audio:
            continue
        elif key in ("file", "audio") and value:
            audio = local_path(item, value)
        else:
            audio = local_path(item, line)
    if not audio:
        raise TaskDefinitionError("the body names no audio file: write its path on the first line")
    if not os.path.isfile(audio):
        raise TaskDefinitionError(
            f"audio file {audio} does not exist (relative paths are relative to the plan's workdir, "
            f"{item.workdir or os.getcwd()})"
        )
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
    data = json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
    done = RunResult(ok=True, duration_s=0.0, output=text, metrics=metrics)
    return with_file(done, item, save, f"{item.task_id}.segments.json", data, in_memory)


async def run_transcribe(item: WorkItem, ctx: RunContext) -> RunResult:
    """Transcribe the audio file the body names; the segments go to a JSON file."""
    return await run_model(
        item, ctx, "transcribe", lambda m, stop: _transcribe_work(item, m, stop, ctx.files_in_memory)
    )


# embed ------------------------------------------------------------------------

EMBED_KEYS = ("file", "text", "input", "save")


def _embed_texts(item: WorkItem, inputs: Mapping[str, str]) -> tuple[list[str], str]:
    """The texts the body names, in order, and where the vectors go ('' where it names none)."""
    texts: list[str] = []
    save = ""
    for line in _body_lines(item.body):
        key, value = _key_value(line)
        if key == "text":
            texts.append(value)
        elif key == "file":
            path = local_path(item, value)
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
            save = local_path(item, value)
        else:
            raise TaskDefinitionError(
                f"cannot read the body line {line!r}: each line is one of "
                + ", ".join(f"'{k}: ...'" for k in EMBED_KEYS)
            )
    if not texts:
        raise TaskDefinitionError(
            "nothing to embed: the body needs at least one non-empty 'text:', 'file:' or 'input:' text"
        )
    if save and not save.endswith(".npy"):
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


def _embedded(
    item: WorkItem, matrix: Any, save: str, in_memory: bool, took: float, batch: int = 1
) -> RunResult:
    """One task's result, with its vectors (`with_file`)."""
    rows, dim = matrix.shape
    done = RunResult(
        ok=True,
        duration_s=0.0,
        metrics={"vectors": float(rows), "dim": float(dim), "embed_s": took, "batch": float(batch)},
    )
    name = f"{item.task_id}.npy"
    done = with_file(done, item, save, name, _npy_bytes(matrix), in_memory)
    done.output = f"{rows} vectors x {dim} dims -> {done.artifacts[-1] if done.artifacts else name}"
    return done


def _embed_work(
    item: WorkItem, inputs: Mapping[str, str], loaded: Any, stop: threading.Event, in_memory: bool = False
) -> RunResult:
    texts, save = _embed_texts(item, inputs)
    began = time.monotonic()
    matrix, stopped = _encode(texts, loaded, stop)
    if matrix is None:
        return RunResult(ok=False, duration_s=0.0, error=stopped)
    return _embedded(item, matrix, save, in_memory, time.monotonic() - began)


def _npy_bytes(matrix: Any) -> bytes:
    """The matrix as a `.npy` file's bytes. Made in memory and written in one call: `np.save`
    to a file writes its header and rows in several small writes, which a batch of 128
    one-row files paid 128 times (0.28 s against 0.09 s for 2,000 files, on a quiet disk)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, matrix)
    return buf.getvalue()


def with_file(
    result: RunResult, item: WorkItem, save: str, name: str, data: bytes, in_memory: bool
) -> RunResult:
    """The result with the task's file: written whole to `save` where the body names it; else,
    in a worker (`in_memory`), kept in memory as `name` for the object store alone
    (`RunResult.artifact_data`); else (run outside one) written beside the plan, as a relative
    `save:` would be.

    In a worker such a file goes nowhere on its disk: nothing would ever remove it there, and
    none has to be made, which costs about 0.5 ms of CPU a file on a disk the server is syncing
    (`durability = always`) against 0.05 ms on a quiet one: a batch of 128 one-text
    embeddings spent 66 ms making its files beside 440 ms of encoding."""
    if not save and in_memory:
        result.artifact_data[name] = data
        return result
    path = save or local_path(item, name)
    write_artifact(path, lambda tmp: _write_bytes(tmp, data))
    result.artifacts.append(path)
    return result


def _write_bytes(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # (as open() makes it)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


async def run_embed(item: WorkItem, ctx: RunContext) -> RunResult:
    """Embed the texts the body names into an (N x dim) float32 .npy matrix."""
    inputs = dict(ctx.inputs)
    return await run_model(
        item, ctx, "embed", lambda m, stop: _embed_work(item, inputs, m, stop, ctx.files_in_memory)
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
            texts, save = _embed_texts(item, ctx.inputs)
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
            out[i] = _embedded(items[i], part, save, ctxs[i].files_in_memory, took, len(jobs))
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
        batch = await run_model(
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
