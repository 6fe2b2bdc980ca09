"""Fixtures: a real nats-server on a free port with a temporary store, and real agent processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mesh.bus import client
from mesh.bus.connect import connect
from mesh.bus.history import read_history
from mesh.bus.publish import Bus
from mesh.bus.read import read_bucket
from mesh.events import Message, PlanSpec
from mesh.host.config import load_settings
from mesh.host.planfiles import directory_glob
from mesh.ops.embedded import EmbeddedServer
from mesh.plan import parse_plan
from mesh.records import PlanRecord, TaskRecord, decode_plan, decode_task
from mesh.settings import Settings

if TYPE_CHECKING:
    from tests.hosts import OtherHost

ROOT = Path(__file__).resolve().parent.parent

# Settings the agent processes get through the environment: quick retries and
# heartbeats so the tests run in seconds.
FAST_ENV = {
    "MESH_RETRY_BASE_S": "0.1",
    "MESH_RETRY_MAX_S": "0.5",
    "MESH_ACK_WAIT_S": "5",
    "MESH_AGENT_REFRESH_S": "1",
    "MESH_TICK_S": "0.1",
    "MESH_FETCH_TIMEOUT_S": "0.5",
    "MESH_KILL_GRACE_S": "1",
    "MESH_LOG_LEVEL": "INFO",
}

# How long a wait for an event may last before the test calls it a hang. Waits end as soon as
# what they wait for happens, so this is no measure of speed: a small machine that is also busy
# with other work must never reach it.
HANG_S = 120.0


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    # a test's store is thrown away with it: syncing every write (mesh's default) would only
    # slow the suite down; tests/test_power_cut.py is where durability is tested
    server = EmbeddedServer(tmp_path / "nats", port=-1, durability="lazy")
    server.start()
    yield server
    server.stop()


class Mesh:
    """A test's handle on a running mesh: its server, agent processes and a client bus."""

    def __init__(self, server: EmbeddedServer, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
            **FAST_ENV,
            "MESH_NATS_URL": server.url,
            "XDG_CONFIG_HOME": str(tmp / "config"),
            # the agents' data dir (work dirs, model cache, spools) is the test's own too
            "XDG_DATA_HOME": str(tmp / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        self.settings: Settings = load_settings(environ=self.env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._bus: Bus | None = None
        self._expected_dead: set[str] = set()

    # agents -----------------------------------------------------------------
    def start_agent(
        self, name: str, role: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start an agent process (`env`: variables added to the mesh's, e.g. another host's)."""
        log_path = self.tmp / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log_path
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "agent", role, *args],
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        self.procs[name] = proc
        return proc

    def brain(self, name: str = "brain") -> subprocess.Popen[bytes]:
        return self.start_agent(name, "brain")

    def worker(self, name: str = "worker", slots: int = 2, *args: str) -> subprocess.Popen[bytes]:
        return self.start_agent(name, "worker", "--slots", str(slots), *args)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def run_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The `mesh` command on this mesh (wide, for tables), whatever its exit code."""
        return subprocess.run(
            [sys.executable, "-m", "mesh", *args],
            env={**self.env, "COLUMNS": "200"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def cli(self, *args: str, timeout: float = 120) -> str:
        """What the `mesh` command prints on this mesh; it must succeed."""
        done = self.run_cli(*args, timeout=timeout)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # client -------------------------------------------------------------------
    async def bus(self) -> Bus:
        if self._bus is None:
            self._bus = await connect(self.settings, "test-client", wait_s=10)
            await self._bus.ensure_resources()
        return self._bus

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()
            self._bus = None

    async def submit_text(self, text: str, plan_id: str | None = None, **variables: str) -> str:
        workdir = str(self.tmp)
        spec = parse_plan(
            text, source="test.md", variables=variables, workdir=workdir, glob=directory_glob(workdir)
        )
        return await self.submit(spec, plan_id)

    async def submit(self, spec: PlanSpec, plan_id: str | None = None) -> str:
        return await client.submit(await self.bus(), spec, plan_id)

    async def plan(self, plan_id: str) -> PlanRecord | None:
        return await client.get_plan(await self.bus(), plan_id)

    async def tasks(self, plan_id: str) -> dict[str, TaskRecord]:
        return {t.task_id: t for t in await client.plan_tasks(await self.bus(), plan_id)}

    async def wait_plan(self, plan_id: str, timeout_s: float = HANG_S) -> PlanRecord:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            plan = await self.plan(plan_id)
            if plan is not None and plan.final:
                return plan
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self._expected_dead:
                    raise AssertionError(f"agent {name} died:\n{self.log(name)[-3000:]}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"plan {plan_id} not final after {timeout_s}s: {await self.plan(plan_id)}")

    async def wait_task(
        self, plan_id: str, task_id: str, status: str, timeout_s: float = HANG_S
    ) -> TaskRecord:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tasks = await self.tasks(plan_id)
            if task_id in tasks and tasks[task_id].status == status:
                return tasks[task_id]
            await asyncio.sleep(0.05)
        raise AssertionError(f"task {plan_id}.{task_id} not {status} after {timeout_s}s")

    async def history(self, subject: str | None = None) -> list[tuple[str, Message | None]]:
        """Every event so far (optionally under a filter), in stream order."""
        bus = await self.bus()
        return [(e.subject, e.msg) async for e in read_history(bus, subject or bus.names.evt_all)]

    async def raw_tasks(self) -> dict[str, TaskRecord]:
        raw = await read_bucket(await (await self.bus()).tasks_kv())
        return {k: decode_task(v) for k, v in raw.items()}

    async def raw_plans(self) -> dict[str, PlanRecord]:
        raw = await read_bucket(await (await self.bus()).plans_kv())
        return {k: decode_plan(v) for k, v in raw.items()}


@pytest.fixture
async def mesh(nats_server: EmbeddedServer, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(nats_server, tmp_path)
    yield m
    await m.close()
    m.stop_all()


@pytest.fixture
async def two_hosts(tmp_path: Path) -> AsyncIterator[tuple[Mesh, OtherHost]]:
    """This host's mesh and another host sharing no directory with it (tests/hosts.py)."""
    from tests.hosts import two_hosts as make

    async with make(tmp_path) as pair:
        yield pair
