"""Starting the embedded server: one per store (a second on a store in use is refused, saying
which process holds it, before it touches anything there), and a start that fails says why."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from mesh.errors import MeshError
from mesh.ops.embedded import LOCK_NAME, EmbeddedServer

pytestmark = pytest.mark.integration


def blocks(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_ino for p in store.rglob("*.blk")}


def test_a_second_server_on_a_store_in_use_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    first = EmbeddedServer(tmp_path / "data", port=-1, durability="lazy")
    first.start()
    try:
        assert first.proc is not None
        config = first.config_path.read_text()
        before = blocks(tmp_path / "data" / "jetstream")
        second = EmbeddedServer(tmp_path / "data", port=-1, durability="always")
        with pytest.raises(MeshError) as caught:
            second.start()
        said = str(caught.value)
        assert f"pid {first.proc.pid}" in said and "already runs on the store" in said
        assert f"kill {first.proc.pid}" in said and "--data-dir" in said
        assert second.proc is None, "no second server was started"
        assert first.config_path.read_text() == config, "its config was not rewritten"
        assert blocks(tmp_path / "data" / "jetstream") == before, "its block files are the same files"
        assert first.running()
    finally:
        first.stop()
    # the lock lasts as long as the server that holds it: stopped, the store is free again
    again = EmbeddedServer(tmp_path / "data", port=-1, durability="lazy")
    again.start()
    try:
        assert again.proc is not None
        assert (tmp_path / "data" / LOCK_NAME).read_text().strip() == str(again.proc.pid)
    finally:
        again.stop()


def test_the_server_holds_the_lock_itself_not_whoever_started_it(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "data", port=-1, durability="lazy")
    server.start()
    try:
        assert server.proc is not None
        lock = str(tmp_path / "data" / LOCK_NAME)
        held_by = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _holds(int(pid), lock)]
        assert held_by == [server.proc.pid], "only the server has the lock file open"
    finally:
        server.stop()


def _holds(pid: int, path: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_a_port_in_use_is_said_as_such_not_as_a_slow_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedServer(tmp_path / "data", port=port, durability="lazy")
        with pytest.raises(MeshError) as caught:
            server.start()
    said = str(caught.value)
    assert said.startswith("nats-server exited with status"), said
    assert f"port {port} on 127.0.0.1 is in use by another program" in said and "--port" in said
    assert server.proc is None
    # and nothing holds the store: the next start on it is not refused
    server.port = -1
    server.start()
    server.stop()


def test_a_data_dir_that_cannot_be_one_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    server = EmbeddedServer(tmp_path / "a-file" / "data", port=-1, durability="lazy")
    with pytest.raises(MeshError) as caught:
        server.start()
    said = str(caught.value)
    assert f"cannot use {tmp_path / 'a-file' / 'data'} as the server's data dir" in said
    assert "--data-dir" in said and server.proc is None


STARTER = r"""
import sys, time
from mesh.ops.embedded import EmbeddedServer

server = EmbeddedServer(sys.argv[1], port=-1, durability="lazy")
server.start()
print(server.proc.pid, flush=True)
time.sleep(300)
"""


def test_a_server_whose_starter_died_still_shuts_down_cleanly(tmp_path: Path) -> None:
    """Its log is a file, not a pipe to the dead starter: on SIGTERM it logs its shutdown to the
    end (through a pipe it died of SIGPIPE at the first line of it)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import HANG_S, ROOT

    data = tmp_path / "data"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(data)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert starter.stdout is not None
    with starter.stdout:
        pid = int(starter.stdout.readline())
    server = psutil.Process(pid)
    try:
        starter.kill()
        starter.wait()
        assert server.is_running()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + HANG_S
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the server did not stop"
            time.sleep(0.05)
        log = (data / "logs" / "nats-server.log").read_text()
        assert "Server is ready" in log and "Server Exiting" in log, log[-2000:]
    finally:
        with contextlib.suppress(psutil.Error):
            server.kill()
