"""What every model executor shares: the run's context (`RunContext`), the definition error, the
thread a model's blocking call runs in under the task's timeout and cancel, and artifact paths.

Split from `mesh.host.executors` (shell and LLM bodies) and `mesh.host.media` (transcription and
embeddings), which both build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.events import WorkItem
from mesh.untrusted import DATA_PREAMBLE as DATA_PREAMBLE  # the prompt's data preamble, for tests
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")


def no_text(_chunk: str) -> None:
    """Where a model's text goes when nobody listens."""


@dataclass
class RunContext:
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    # the worker's additions to a body's environment (its reaper's mark), over the plan's
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
    # a model task's file that its body does not `save:` is kept in memory, for the object store
    # alone (a worker's run); else it is written beside the plan (`mesh.host.media.with_file`)
    files_in_memory: bool = False
    # set (from the model's thread) when a prompt's first token is sampled
    first_token: threading.Event = field(default_factory=threading.Event)
    # told each piece of an LLM's answer as it is generated (from the model's thread; the pieces
    # joined are the output). It must not block and never raises: the worker publishes the
    # pieces on the task's stream subject, or drops them
    on_text: Callable[[str], None] = no_text


# ------------------------------------------------------------------ model kinds
#
# A model executor runs the library's blocking call in a thread, holding the model's lock (a
# handle serves one task at a time), and tells it to stop through a threading.Event when the
# task is cancelled or times out: the LLM checks it after every token, the transcriber after
# every segment, the embedder between chunks of texts.


class TaskDefinitionError(Exception):
    """The task can never run as defined (a prompt longer than the context, a missing file):
    retrying cannot help."""


async def first_of(job: asyncio.Future[Any], cancel: asyncio.Event, timeout_s: float) -> str:
    """Wait for `job`, a cancel or the task's timeout (none when `timeout_s` is 0), whichever
    comes first: '' when the job ended, else 'cancelled' or 'timed out'. The job is left as it
    is; only the wait on the cancel is cleaned up."""
    watch = asyncio.ensure_future(cancel.wait())
    try:
        done, _ = await asyncio.wait(
            {job, watch}, timeout=timeout_s if timeout_s > 0 else None, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watch.cancel()
    if job in done:
        return ""
    return "cancelled" if watch in done else "timed out"


async def supervise(
    job: asyncio.Future[Any], stop: threading.Event, ctx: RunContext, timeout_s: float
) -> str:
    """Wait for a model's job under the task's timeout and cancel (`first_of`'s answer): on
    either, `stop` is set and the job given `ctx.kill_grace_s` to end. `stop` is set whatever
    happens (also when this coroutine is cancelled: the job must not run on). A job still
    running after that is left to end in the background, its outcome read when it comes, so
    none goes unseen."""
    try:
        stopped_for = await first_of(job, ctx.cancel, timeout_s)
        if stopped_for:
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job), timeout=ctx.kill_grace_s)
    finally:
        stop.set()
    if not job.done():
        job.add_done_callback(lambda f: f.cancelled() or f.exception())
    return stopped_for


async def run_model(
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
    stopped_for = await supervise(job, stop, ctx, item.timeout_s)
    if not job.done():
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
    return stopped_as(result, stopped_for, item.timeout_s)


def stopped_as(result: RunResult, stopped_for: str, timeout_s: float) -> RunResult:
    """A run stopped for its cancel or its timeout (`first_of`'s answer; '' when not) says so."""
    if stopped_for:
        result.ok = False
        result.timed_out = stopped_for == "timed out"
        result.cancelled = stopped_for == "cancelled"
        head = f"timed out after {timeout_s:g}s" if result.timed_out else "cancelled"
        result.error = f"{head}; {result.error}" if result.error else head
    return result


def local_path(item: WorkItem, path: str) -> str:
    """A path of the body: ~ expanded, relative ones relative to the plan's workdir."""
    path = os.path.expanduser(path.strip())
    if not os.path.isabs(path):
        path = os.path.join(item.workdir or os.getcwd(), path)
    return os.path.normpath(path)


def write_artifact(path: str, write: Callable[[str], None]) -> None:
    """Write a file whole or not at all (a reader never sees half of it)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
