"""Pull the plug: the server's store on a filesystem that forgets what was not synced.

nats-server runs with its store on plugfs (tests/plugfs.py), an in-memory FUSE filesystem
that, on a power cut, drops every write not yet synced to its "disk". A power cut here is:
SIGKILL the server and every agent at once, then drop the unsynced data. Then everything
starts again on the same store, and the test checks that nothing the mesh had acknowledged
is missing:

- every event that was in the history (read back from the stream) is still there, at the
  same sequence, with the same bytes;
- every submission the client had an acknowledgement for is still in the command stream,
  and its plan runs to the end;
- every task whose record said `succeeded` still does;
- `mesh replay --verify` finds the history and KV in agreement.

With `durability = "always"` all of it holds at every cut point. With `"lazy"` the server
syncs every 2 minutes, so a cut within the first 2 minutes of the server's life loses
everything it acknowledged: the same checks must find the loss, or they could not find any.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.js import api

from agents.brain_commit import CHECKPOINT_KEY
from mesh.bus.read import read_stream
from mesh.ops.embedded import EmbeddedServer, server_config
from mesh.records import decode_checkpoint
from tests.conftest import Mesh
from tests.faults import configure, plan, run_mesh, task, until
from tests.plugfs import PlugFS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Acked:
    """What the mesh had acknowledged when the power went."""

    # plans whose submission the client had an acknowledgement for, and their sizes
    submissions: dict[str, int] = field(default_factory=dict)
    # stream sequence -> (subject, bytes) of every event read back from the history
    events: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    # plan records read back, and the plan.task keys whose record said succeeded
    plans: set[str] = field(default_factory=set)
    succeeded: set[str] = field(default_factory=set)


class Rig:
    """A server on plugfs, a brain and two workers, and the test's client (`mesh`)."""

    def __init__(self, tmp: Path, durability: str) -> None:
        self.fs = PlugFS(tmp / "disk", tmp / "logs" / "plugfs.log")
        port = free_port()
        text = server_config(port, str(self.fs.mountpoint / "store"), durability=durability)
        self.server = EmbeddedServer(tmp / "nats", port=port, config_text=text)
        self.mesh = Mesh(self.server, tmp)
        # quick redelivery of what the cut caught in flight, a quick brain takeover
        configure(self.mesh, ack_wait_s=2, lease_s=2, agent_ttl_s=3, durability=durability)
        self.generation = 0

    def start(self) -> None:
        self.fs.start()
        self.server.start()
        self.start_agents()

    def start_agents(self) -> None:
        self.generation += 1
        g = self.generation
        self.mesh.brain(f"brain-{g}")
        self.mesh.worker(f"w1-{g}", 4)
        self.mesh.worker(f"w2-{g}", 4)

    async def power_cut(self) -> dict[str, Any]:
        """SIGKILL the server and every agent at once, then lose what was not synced."""
        procs = [p for p in self.mesh.procs.values() if p.poll() is None]
        self.mesh._expected_dead.update(self.mesh.procs)
        if self.server.proc is not None:
            procs.append(self.server.proc)
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait(30)
        self.server.kill()
        cut = self.fs.cut()
        await self.mesh.close()
        return cut

    async def stop(self) -> None:
        await self.mesh.close()
        self.mesh.stop_all()
        self.server.stop()
        self.fs.stop()


@pytest.fixture
async def rig_of(tmp_path: Path) -> AsyncIterator[Callable[[str], Rig]]:
    missing = PlugFS.missing()
    if missing.startswith("no /dev/fuse"):
        pytest.skip(f"cannot mount a FUSE filesystem here: {missing}")
    assert not missing, missing
    made: list[Rig] = []

    def make(durability: str) -> Rig:
        rig = Rig(tmp_path, durability)
        made.append(rig)
        rig.start()
        return rig

    yield make
    for rig in made:
        await rig.stop()


# ------------------------------------------------------------------ what was acknowledged, what is left


async def read_events(mesh: Mesh) -> dict[int, tuple[str, bytes]]:
    bus = await mesh.bus()
    names = bus.names
    return {
        raw.metadata.sequence.stream: (raw.subject, raw.data)
        async for raw in read_stream(bus.js, names.events_stream, names.evt_all, api.ConsumerConfig())
    }


async def snapshot(mesh: Mesh, submissions: dict[str, int]) -> Acked:
    """Read back what is stored now: all of it was acknowledged."""
    return Acked(
        submissions=dict(submissions),
        events=await read_events(mesh),
        plans=set(await mesh.raw_plans()),
        succeeded={k for k, r in (await mesh.raw_tasks()).items() if r.status == "succeeded"},
    )


async def losses(mesh: Mesh, acked: Acked) -> list[str]:
    """What was acknowledged before the cut and is not there now (read before any agent runs)."""
    found: list[str] = []
    now = await read_events(mesh)
    missing = sorted(seq for seq, event in acked.events.items() if now.get(seq) != event)
    if missing:
        found.append(f"{len(missing)} of {len(acked.events)} events missing or changed (first: {missing[0]})")
    bus = await mesh.bus()
    submitted = set()
    async for raw in read_stream(bus.js, bus.names.cmd_stream, bus.names.submit, api.ConsumerConfig()):
        submitted.add((raw.headers or {}).get("Nats-Msg-Id", ""))
    found += [f"submission of {p} missing" for p in acked.submissions if p not in submitted]
    plans = await mesh.raw_plans()
    found += [f"plan record {p} missing" for p in sorted(acked.plans) if p not in plans]
    tasks = await mesh.raw_tasks()
    undone = sorted(k for k in acked.succeeded if k not in tasks or tasks[k].status != "succeeded")
    if undone:
        found.append(
            f"{len(undone)} of {len(acked.succeeded)} succeeded tasks no longer succeeded: {undone[:3]}"
        )
    return found


# ------------------------------------------------------------------ cut points


async def checkpoint(mesh: Mesh) -> int:
    """The stream sequence the brain's last checkpoint covers (0: none yet)."""
    kv = await (await mesh.bus()).brain_kv()
    try:
        entry = await kv.get(CHECKPOINT_KEY)
    except nats.js.errors.KeyNotFoundError:
        return 0
    return decode_checkpoint(entry.value or b"").seq


async def submit(mesh: Mesh, title: str, n: int, body: str = "") -> str:
    """A plan of `n` independent tasks: no-ops, or shell tasks running `body`."""
    kind = "shell" if body else "noop"
    return await mesh.submit(plan(title, [task(f"t{i:04d}", body, kind=kind) for i in range(n)], mesh.tmp))


async def after_a_finished_plan(mesh: Mesh) -> Acked:
    plan_id = await submit(mesh, "finished", 40)
    assert (await mesh.wait_plan(plan_id, timeout_s=60)).status == "succeeded"
    return await snapshot(mesh, {plan_id: 40})


async def mid_run(mesh: Mesh) -> Acked:
    plan_id = await submit(mesh, "running", 200, "sleep 0.1")

    async def forty_done() -> bool:
        return sum(t.status == "succeeded" for t in (await mesh.tasks(plan_id)).values()) >= 40

    await until(forty_done, 60, "40 tasks to succeed")
    return await snapshot(mesh, {plan_id: 200})


async def mid_submission(mesh: Mesh) -> Acked:
    """Cut the moment the client has its acknowledgement of a 1,000-task plan: the brain is
    fetching or accepting it."""
    acked = await snapshot(mesh, {})
    acked.submissions[await submit(mesh, "submitted", 1000)] = 1000
    return acked


async def mid_acceptance(mesh: Mesh) -> Acked:
    """Cut the moment the plan record of a 1,000-task plan is readable: its acceptance's events
    are stored, its task records and work items are being written."""
    acked = await snapshot(mesh, {})
    plan_id = await submit(mesh, "accepting", 1000)
    await until(lambda: mesh.plan(plan_id), 60, "the plan record", interval_s=0.005)
    acked.submissions[plan_id] = 1000
    acked.plans.add(plan_id)
    return acked


async def mid_acceptance_after_another_plan(mesh: Mesh) -> Acked:
    """The same, once a small plan has run: the brain has a checkpoint from before the cut
    plan's acceptance (above, on a fresh mesh, it has none)."""
    warm = await submit(mesh, "warm-up", 10)
    assert (await mesh.wait_plan(warm, timeout_s=60)).status == "succeeded"
    await until(lambda: checkpoint(mesh), 30, "the brain's checkpoint")
    return await mid_acceptance(mesh)


CUT_POINTS: dict[str, Callable[[Mesh], Awaitable[Acked]]] = {
    "after a finished plan": after_a_finished_plan,
    "mid-run": mid_run,
    "mid-submission of 1,000 tasks": mid_submission,
    "mid-acceptance of 1,000 tasks, the first plan": mid_acceptance,
    "mid-acceptance of 1,000 tasks after another plan": mid_acceptance_after_another_plan,
}


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("point", list(CUT_POINTS))
async def test_power_cut_loses_nothing_acknowledged_with_durability_always(
    rig_of: Callable[[str], Rig], point: str
) -> None:
    rig = rig_of("always")
    mesh = rig.mesh
    await mesh.bus()
    acked = await CUT_POINTS[point](mesh)
    cut = await rig.power_cut()
    print(
        f"\n{point}: acknowledged {len(acked.events)} events, {len(acked.succeeded)} succeeded tasks, "
        f"{len(acked.submissions)} submissions; the cut dropped {cut['last_cut']}; "
        f"{cut['fsync']} fsyncs and {cut['sync_writes']} O_SYNC writes before it"
    )
    rig.server.start()
    assert await losses(mesh, acked) == []
    restarted = time.monotonic()
    rig.start_agents()
    for plan_id, size in acked.submissions.items():
        done = await mesh.wait_plan(plan_id, timeout_s=120)
        assert done.status == "succeeded", done
        tasks = await mesh.tasks(plan_id)
        assert len(tasks) == size and all(t.status == "succeeded" for t in tasks.values())
    print(f"every plan final {time.monotonic() - restarted:.1f}s after the restart")
    assert await losses(mesh, acked) == []
    verify = run_mesh(mesh, "replay", "--verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "exception" not in rig.fs.log_path.read_text().lower(), "plugfs failed an operation"


async def test_power_cut_with_durability_lazy_loses_what_was_acknowledged(
    rig_of: Callable[[str], Rig],
) -> None:
    """The same cut with the server syncing every 2 minutes (nats-server's default): a cut
    within 2 minutes of its start loses what it acknowledged, and the checks above see it."""
    rig = rig_of("lazy")
    mesh = rig.mesh
    await mesh.bus()
    acked = await mid_run(mesh)
    cut = await rig.power_cut()
    rig.server.start()
    found = await losses(mesh, acked)
    print(f"\nlazy: the cut dropped {cut['last_cut']}; the checks found: {found}")
    assert cut["fsync"] == 0 and cut["last_cut"]["bytes_lost"] > 0
    assert any("events missing" in f for f in found)
    assert any("submission of" in f for f in found)
    assert any("no longer succeeded" in f for f in found)
