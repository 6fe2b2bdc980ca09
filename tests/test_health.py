"""Health checks and restarts: the pure tracker, then a watchdog process checking a real local
HTTP server that goes down and is brought back by the configured restart command."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.events import AlertRaised, AlertResolved
from mesh.health import HealthCheck, Tracker
from mesh.host.health import probe_http
from tests.conftest import Mesh
from tests.faults import until

# ---------------------------------------------------------------- pure


def test_a_check_fails_retries_times_before_it_raises_and_restarts() -> None:
    t = Tracker("llama", HealthCheck(url="http://x/health", retries=3, command="true", start_grace_s=30))
    assert t.observe(False, 0.0) == []
    assert t.observe(False, 10.0) == []
    assert t.observe(False, 20.0) == ["raise", "restart"]
    assert t.next_probe == 50.0, "a restart gets its grace period"
    assert t.observe(True, 50.0) == ["resolve"]
    assert t.observe(True, 60.0) == []


def test_a_flaky_success_resets_the_count() -> None:
    t = Tracker("x", HealthCheck(url="http://x/", retries=2))
    assert t.observe(False, 0.0) == []
    assert t.observe(True, 1.0) == []
    assert t.observe(False, 2.0) == []
    assert t.observe(False, 3.0) == ["raise"], "no restart configured: only the alert"


def test_a_restart_loop_raises_instead_of_restarting_until_the_window_passes() -> None:
    check = HealthCheck(url="http://x/", retries=1, command="true", restart_max=3, restart_window_s=100)
    t = Tracker("x", check)
    actions = [t.observe(False, float(at)) for at in (0, 1, 2, 3, 4, 5)]
    assert actions[0] == ["raise", "restart"]
    assert actions[1] == ["restart"] and actions[2] == ["restart"]
    assert actions[3] == ["loop"], "a fourth restart within the window is a loop"
    assert actions[4] == [] and actions[5] == [], "the loop alert is raised once, nothing restarts"
    assert t.observe(False, 100.5) == ["restart"], "the window has passed"


def test_a_check_needs_exactly_one_target() -> None:
    assert HealthCheck().problem()
    assert HealthCheck(url="http://a/", agent="b").problem()
    assert HealthCheck(url="ftp://a/").problem()
    assert not HealthCheck(agent="worker-x-gpu0").problem()
    assert HealthCheck(agent="w", unit="mesh-worker@0.service", user=True).restart_argv() == [
        "systemctl",
        "--user",
        "restart",
        "mesh-worker@0.service",
    ]


# ---------------------------------------------------------------- real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int, root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.integration
async def test_a_stopped_http_server_is_alerted_restarted_by_command_and_resolved(
    mesh: Mesh, tmp_path: Path
) -> None:
    port = free_port()
    root = tmp_path / "www"
    root.mkdir()
    (root / "health").write_text("ok\n")
    url = f"http://127.0.0.1:{port}/health"
    server = serve(port, root)
    restarted = tmp_path / "restarted"
    pidfile = tmp_path / "server.pid"
    # the restart command brings the server back (detached) and notes that it ran
    command = (
        f"bash -c 'echo restart >> {restarted}; "
        f"setsid {sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {root} "
        f"> /dev/null 2>&1 & echo $! > {pidfile}'"
    )
    config = Path(mesh.env["XDG_CONFIG_HOME"]) / "mesh" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[health.web]\nurl = "{url}"\ninterval_s = 0.3\ntimeout_s = 1\nretries = 2\n'
        f'start_grace_s = 1\ncommand = "{command.replace(chr(34), chr(92) + chr(34))}"\n'
    )
    try:
        await until(lambda: asyncio.to_thread(lambda: probe_http(url, 1)[0]), 10, "the server")
        mesh.start_agent("watchdog", "watchdog")
        await asyncio.sleep(1.5)
        assert not restarted.exists(), "a healthy server is left alone"

        server.terminate()
        server.wait(10)

        async def resolved() -> bool:
            history = await mesh.history((await mesh.bus()).names.alerts_all)
            return any(isinstance(m, AlertResolved) and m.target == "web" for _, m in history)

        await until(resolved, 30, "the alert to resolve after the restart")
        history = [m for _, m in await mesh.history((await mesh.bus()).names.alerts_all)]
        raised = [m for m in history if isinstance(m, AlertRaised) and m.target == "web"]
        assert [m.rule for m in raised] == ["health"]
        assert url in raised[0].message
        assert restarted.read_text().splitlines() == ["restart"], "restarted once"
        assert probe_http(url, 1)[0]
    finally:
        # the watchdog first: stopped after the server, it could bring the server back once more
        if "watchdog" in mesh.procs:
            mesh.kill("watchdog", signal.SIGTERM)
        if server.poll() is None:
            server.kill()
        if pidfile.exists():
            subprocess.run(["kill", pidfile.read_text().strip()], check=False)


@pytest.mark.integration
async def test_a_target_that_never_comes_back_raises_a_restart_loop(mesh: Mesh, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
    restarted = tmp_path / "restarted"
    config = Path(mesh.env["XDG_CONFIG_HOME"]) / "mesh" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[health.dead]\nurl = "{url}"\ninterval_s = 0.2\ntimeout_s = 0.5\nretries = 1\nstart_grace_s = 0.2\n'
        f"restart_max = 2\nrestart_window_s = 600\ncommand = \"bash -c 'echo x >> {restarted}'\"\n"
    )
    mesh.start_agent("watchdog", "watchdog")

    async def looping() -> bool:
        history = await mesh.history((await mesh.bus()).names.alerts_all)
        return any(isinstance(m, AlertRaised) and m.rule == "restart_loop" for _, m in history)

    try:
        await until(looping, 60, "the restart-loop alert")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nwatchdog log:\n{mesh.log('watchdog')[-3000:]}") from None
    await asyncio.sleep(1.5)
    assert restarted.read_text().splitlines() == ["x", "x"], "two restarts, then no more"
    history = [m for _, m in await mesh.history((await mesh.bus()).names.alerts_all)]
    loop = [m for m in history if isinstance(m, AlertRaised) and m.rule == "restart_loop"]
    assert len(loop) == 1 and loop[0].severity == "critical"
