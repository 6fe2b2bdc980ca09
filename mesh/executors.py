"""Executors: a body kind -> an async function that runs one work item.

Every executor takes the item and a `RunContext` and returns a `RunResult`; it
never raises for a failure of the task itself (a non-zero exit, a timeout, a
cancel), only for a fault of its own. Heavy imports belong inside the executor
that needs them, so a worker only pays for the kinds it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.events import WorkItem


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
    # model kinds: the loaded model (a `mesh.loaders.Loaded`), the device it is on, and the
    # outputs of the dependencies named in the task's `inputs`, by task id
    model: Any = None
    device: str = "cpu"
    inputs: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    ok: bool
    duration_s: float
    rc: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    error: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    # the task can never run as defined: the brain fails it without retrying
    definition_error: bool = False
    # what the task produced (the response, the transcript, a summary of the vectors)
    output: str = ""
    prompt: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)


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


Executor = Callable[[WorkItem, RunContext], Awaitable[RunResult]]

EXECUTORS: dict[str, Executor] = {"shell": run_shell, "noop": run_noop}
