"""Helpers for the fault-injection tests: plans built in code, polling, agent ids, history counts."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from mesh.events import Message, PlanSpec, TaskSpec
from mesh.host.config import load_settings
from tests.conftest import ROOT, Mesh


def configure(mesh: Mesh, **settings: object) -> None:
    """Set `MESH_<NAME>` for the agents started from now on, and for the test's own client.

    Must run before the test's client first connects: every client re-applies the
    consumer definitions (the work consumer's ack_wait among them), so the test's
    settings have to match the agents'.
    """
    assert mesh._bus is None, "configure before the first use of mesh.bus()"
    for name, value in settings.items():
        mesh.env[f"MESH_{name.upper()}"] = str(value)
    mesh.settings = load_settings(environ=mesh.env)


async def until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


def pid_of(agent_id: str) -> int:
    """`<role>-<host>-<pid>-<hex>` -> pid (the host part may hold dashes)."""
    return int(agent_id.rsplit("-", 2)[-2])


def name_of(mesh: Mesh, agent_id: str) -> str:
    """The test's name for the agent process behind `agent_id`."""
    pid = pid_of(agent_id)
    for name, proc in mesh.procs.items():
        if proc.pid == pid:
            return name
    raise AssertionError(f"no agent process of the test has pid {pid} ({agent_id})")


def log_count(mesh: Mesh, name: str, text: str) -> int:
    path = mesh.logs.get(name)
    if path is None or not path.exists():
        return 0
    return path.read_text(errors="replace").count(text)


def logged(mesh: Mesh, name: str, text: str, more_than: int = 0) -> Callable[[], bool]:
    """A predicate: `text` is in the log of `name` more than `more_than` times."""
    return lambda: log_count(mesh, name, text) > more_than


def task(task_id: str, body: str, *deps: str, **fields: Any) -> TaskSpec:
    return TaskSpec(id=task_id, body=body, depends_on=tuple(deps), **fields)


def plan(title: str, tasks: Iterable[TaskSpec], workdir: Path) -> PlanSpec:
    return PlanSpec(title=title, tasks=tuple(tasks), source="faults.md", workdir=str(workdir))


def append_id(path: Path) -> str:
    """A body that records one run of its task: `<task id> <attempt> <bash pid>`."""
    return f'echo "$MESH_TASK_ID $MESH_ATTEMPT $$" >> {path}'


def dag(stages: int, width: int, body: Callable[[str], str], rng: random.Random) -> list[TaskSpec]:
    """`stages` x `width` tasks; each depends on 1-2 random tasks of the previous stage."""
    out: list[TaskSpec] = []
    for s in range(stages):
        for i in range(width):
            tid = f"s{s:02d}-t{i:03d}"
            deps: tuple[str, ...] = ()
            if s:
                picks = rng.sample(range(width), rng.choice((1, 2)))
                deps = tuple(f"s{s - 1:02d}-t{j:03d}" for j in sorted(picks))
            out.append(task(tid, body(tid), *deps))
    return out


def runs(path: Path) -> Counter[str]:
    """How many times each task id was written to an `append_id` file."""
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def count_types(history: list[tuple[str, Message | None]], kind: type) -> int:
    return sum(isinstance(m, kind) for _, m in history)


def kill_leftover_bodies(plan_id: str) -> int:
    """SIGKILL the process groups of task bodies of `plan_id` still running (a SIGKILLed worker
    leaves the body it was running behind); return how many groups were killed."""
    killed = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("MESH_PLAN_ID") != plan_id:
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return killed


def run_mesh(mesh: Mesh, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `mesh` command with the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        env=mesh.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


async def restart_server(mesh: Mesh, down_s: float = 1.0) -> None:
    """SIGKILL the nats-server, leave it down `down_s`, start it again on the same port."""
    mesh.server.kill()
    await asyncio.sleep(down_s)
    with contextlib.suppress(Exception):
        await mesh.close()  # the test's own client; `mesh.bus()` makes a new one
    await asyncio.to_thread(mesh.server.start)
