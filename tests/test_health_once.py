"""`mesh health`: one round of the configured health checks, for mesh-health.timer on hosts
without a watchdog. A real local HTTP server, a real agent registration, a real restart command."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.health import HealthCheck
from mesh.host.health import check_once
from mesh.ops.embedded import EmbeddedServer
from tests.conftest import FAST_ENV, ROOT


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_health(
    config: Path, url: str, data: Path | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`mesh health --json` with this config and server (and data dir, where its alerts are kept)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        **FAST_ENV,
        "MESH_CONFIG": str(config),
        "MESH_NATS_URL": url,
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "300",
    }
    if data is not None:
        env["MESH_DATA_DIR"] = str(data)
    return subprocess.run(
        [sys.executable, "-m", "mesh", "health", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


async def test_check_once_stops_at_the_first_healthy_probe() -> None:
    seen: list[int] = []

    async def probe(check: HealthCheck) -> tuple[bool, str]:
        seen.append(1)
        return len(seen) == 2, f"probe {len(seen)}"

    async def no_sleep(_: float) -> None:
        pass

    verdict = await check_once("x", HealthCheck(url="http://x/", retries=3, command="false"), probe, no_sleep)
    assert verdict.healthy and verdict.detail == "probe 2" and len(seen) == 2
    assert not verdict.restarted


def test_mesh_health_restarts_what_fails_and_passes_what_is_healthy(
    nats_server: EmbeddedServer, tmp_path: Path, http_url: str
) -> None:
    marker = tmp_path / "restarted"
    dead = f"http://127.0.0.1:{_closed_port()}/health"
    config = tmp_path / "watchdog.toml"
    config.write_text(
        f'[health.up]\nurl = "{http_url}"\ncommand = "touch {tmp_path}/wrongly-restarted"\n\n'
        f'[health.down]\nurl = "{dead}"\nretries = 2\ninterval_s = 0.1\ntimeout_s = 1\n'
        f'command = "touch {marker}"\n\n'
        '[health.gone-agent]\nagent = "worker-nowhere-1"\nretries = 1\n'
    )
    result = run_health(config, nats_server.url)
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = {v["name"]: v for v in map(json.loads, result.stdout.splitlines())}
    assert verdicts["up"]["healthy"] is True
    assert verdicts["down"]["healthy"] is False and verdicts["down"]["restarted"] is True
    assert "2 failed checks" in verdicts["down"]["detail"]
    assert verdicts["gone-agent"]["healthy"] is False
    assert "not registered" in verdicts["gone-agent"]["detail"]
    assert verdicts["gone-agent"]["restarted"] is False, "no unit or command: nothing to restart"
    assert marker.exists(), "the failing check's restart command ran"
    assert not (tmp_path / "wrongly-restarted").exists()


def test_mesh_health_all_healthy_exits_0(nats_server: EmbeddedServer, tmp_path: Path, http_url: str) -> None:
    config = tmp_path / "watchdog.toml"
    config.write_text(f'[health.up]\nurl = "{http_url}"\n')
    result = run_health(config, nats_server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["healthy"] is True
