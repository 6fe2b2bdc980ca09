"""A full store: the server cannot keep what the agents write.

Two ways it fills, both with a real server and real agent processes:

- JetStream's own limit (`max_file_store`): the server answers every write "insufficient
  resources"; freed by deleting a filler stream;
- the disk itself (a small tmpfs, as root): the server does not answer writes at all, and keeps
  refusing them after room is made until it restarts; freed by deleting a filler file, then
  restarting the server.

Each time the agents stay up, say once that the store is full (and where, with the room left),
wait, say once that it takes writes again, and finish the plan with nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.js.errors
import pytest

from mesh.bus.history import replay, verify
from mesh.ops.embedded import EmbeddedServer
from mesh.records import SUCCEEDED
from tests.conftest import Mesh
from tests.faults import configure, log_count, logged, plan, run_mesh, task, until

pytestmark = pytest.mark.integration

FULL = "the NATS server's store is full ("
AGAIN = "the NATS server's store takes writes again"
FILLER = "FILLER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_conf(port: int, store: Path, limit: str) -> str:
    return (
        f"server_name: full\nlisten: 127.0.0.1:{port}\nmax_payload: 8MB\n"
        f'jetstream {{\n  store_dir: "{store}"\n  max_file_store: {limit}\n}}\n'
    )


@contextlib.asynccontextmanager
async def mesh_on(server: EmbeddedServer, tmp: Path) -> AsyncIterator[Mesh]:
    server.start()
    m = Mesh(server, tmp)
    # agents find the server's config (and so its store) in their data dir, as under `mesh up`;
    # no stream reserves more than the small store has
    configure(
        m, data_dir=server.data_dir, events_max_bytes=0, work_max_bytes=-1, history_max_bytes=0, lease_s=3
    )
    try:
        yield m
    finally:
        await m.close()
        m.stop_all()
        server.stop()


WAITING_PLAN = "while [ ! -e {go} ]; do sleep 0.05; done; echo a"


async def start_plan(mesh: Mesh, tmp: Path) -> tuple[str, Path, Path]:
    """A brain, a worker and a plan whose first task runs until the file `go` appears."""
    mesh.brain()
    mesh.worker("w", slots=1)
    go, marks = tmp / "go", tmp / "marks"
    spec = plan(
        "Full store",
        [
            task("a", f'echo "a $MESH_ATTEMPT" >> {marks}; ' + WAITING_PLAN.format(go=go)),
            task("b", f'echo "b $MESH_ATTEMPT" >> {marks}', "a"),
        ],
        tmp,
    )
    plan_id = await mesh.submit(spec)
    await mesh.wait_task(plan_id, "a", "running")
    return plan_id, go, marks


async def finish_and_check(mesh: Mesh, plan_id: str, marks: Path) -> None:
    done = await mesh.wait_plan(plan_id, timeout_s=90)
    assert done.status == SUCCEEDED, done
    # (a write sent before the server came back is answered by its timeout first)
    for name in ("brain", "w"):
        await until(logged(mesh, name, AGAIN), 60, f"{name} to say the store takes writes again")
    assert sorted(marks.read_text().split("\n")[:-1]) == ["a 1", "b 1"], "each task ran once"
    for name in ("brain", "w"):
        assert mesh.alive(name), mesh.log(name)[-3000:]
        text = mesh.log(name)
        assert "Traceback" not in text, text[-3000:]
    bus = await mesh.bus()
    check = await verify(bus, await replay(bus))
    assert not check.differences, "\n".join(map(str, check.differences[:10]))


async def test_jetstream_limit_reached_agents_wait_and_carry_on(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "nats" / "store"
    server = EmbeddedServer(tmp_path / "nats", port=port, config_text=server_conf(port, store, "8MB"))
    async with mesh_on(server, tmp_path) as mesh:
        plan_id, go, marks = await start_plan(mesh, tmp_path)
        bus = await mesh.bus()
        await bus.js.add_stream(name=FILLER, subjects=["filler.>"], storage="file")
        chunk = os.urandom(256 * 1024)
        with pytest.raises(nats.js.errors.APIError) as refused:
            for _ in range(100):
                await bus.js.publish("filler.x", chunk)
        assert refused.value.err_code == 10023, refused.value
        # a person submitting meanwhile is told what is wrong
        (tmp_path / "more.md").write_text("# More\n\n## Tasks\n\n### x\n```shell\ntrue\n```\n")
        refused_cli = run_mesh(mesh, "submit", str(tmp_path / "more.md"))
        assert refused_cli.returncode == 2 and "Traceback" not in refused_cli.stderr, refused_cli.stderr
        assert "the NATS server's store is full (it says: insufficient resources)" in refused_cli.stderr
        go.touch()  # the task ends; its report cannot be stored
        await until(logged(mesh, "w", FULL), 30, "the worker to say the store is full")
        await until(logged(mesh, "brain", FULL), 30, "the brain to say the store is full")
        # its lease runs out (lease_s 3) and nobody can write it: the brain waits, it does not exit
        await until(logged(mesh, "brain", "lease ran out while the server's store is full"), 30, "a stall")
        assert (await mesh.tasks(plan_id))["a"].status == "running"

        await bus.js.delete_stream(FILLER)
        await finish_and_check(mesh, plan_id, marks)
        for name in ("brain", "w"):
            assert log_count(mesh, name, FULL) == 1, mesh.log(name)[-3000:]
            assert log_count(mesh, name, AGAIN) == 1, mesh.log(name)[-3000:]
        line = next(x for x in mesh.log("w").splitlines() if FULL in x)
        assert f"MB free in {store}/jetstream" in line and "insufficient resources" in line, line
        assert log_count(mesh, "brain", "renewed the brain lease (no other brain took it)") == 1


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB filesystem of its own (tmpfs; needs root and mount)."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)],
            check=True,
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here ({exc}): the full-disk test needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=20)


def fill(path: Path) -> None:
    """Write zeros to `path` until its filesystem has no room left."""
    block = bytes(64 * 1024)
    with open(path, "wb") as out:
        while True:
            try:
                out.write(block)
                out.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return


@pytest.mark.slow
async def test_disk_full_agents_wait_and_carry_on_after_a_server_restart(tmp_path: Path, tmpfs: Path) -> None:
    port = free_port()
    store = tmpfs / "store"
    # JetStream's limit above the disk's size: the disk itself fills, as when something else
    # on the server's host takes the space
    server = EmbeddedServer(tmp_path / "nats", port=port, config_text=server_conf(port, store, "1G"))
    async with mesh_on(server, tmp_path) as mesh:
        plan_id, go, marks = await start_plan(mesh, tmp_path)
        filler = tmpfs / "filler"
        with contextlib.suppress(OSError):
            await asyncio.to_thread(fill, filler)
        go.touch()
        await until(logged(mesh, "w", FULL), 60, "the worker to say the store is full")
        await until(logged(mesh, "brain", FULL), 60, "the brain to say the store is full")
        line = next(x for x in mesh.log("w").splitlines() if FULL in x)
        assert f"MB free in {store}/jetstream" in line, line
        # `mesh doctor` finds the store and says it has no room
        report = run_mesh(mesh, "doctor", "--quick", "--json")
        [found] = [f for f in map(json.loads, report.stdout.splitlines()) if f["check"] == "store"]
        assert found["level"] == "fail" and found["message"].startswith(f"{store}/jetstream"), found
        assert "free space there" in found["fix"], found

        filler.unlink()
        # room again, but the server keeps refusing the streams it failed to write: the agents
        # say so once, and a restart of the server (what an operator does) lets them go on
        stuck = "but the server still does not answer writes"
        await until(lambda: log_count(mesh, "w", stuck) or log_count(mesh, "brain", stuck), 60, "the hint")
        server.stop()
        await mesh.close()
        server.start()
        await finish_and_check(mesh, plan_id, marks)
        for name in ("brain", "w"):
            assert log_count(mesh, name, FULL) == 1, mesh.log(name)[-3000:]
            assert log_count(mesh, name, stuck) <= 1, mesh.log(name)[-3000:]
            assert log_count(mesh, name, AGAIN) == 1, mesh.log(name)[-3000:]
