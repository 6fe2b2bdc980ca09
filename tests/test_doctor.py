"""`mesh doctor` against a real server: healthy, drifted, a missing model, a skewed host, no server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.bus.connect import connect
from mesh.host.config import load_settings
from mesh.ops import doctor
from mesh.ops.embedded import EmbeddedServer
from mesh.records import AgentRecord, encode_record
from tests.conftest import FAST_ENV, ROOT


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        **FAST_ENV,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "MESH_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "300",
    }


def run_mesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def findings(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def failures(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in found if f["level"] == "fail"]


def with_server(env: dict[str, str], server: EmbeddedServer) -> dict[str, str]:
    return {**env, "MESH_NATS_URL": server.url}


async def js_api(server: EmbeddedServer, subject: str, payload: dict[str, Any] | None = None) -> Any:
    """A raw JetStream API request, as an operator's `nats` CLI would make it."""
    bus = await connect(load_settings(environ={"MESH_NATS_URL": server.url}), "test-raw")
    try:
        data = json.dumps(payload).encode() if payload is not None else b""
        reply = await bus.nc.request(f"$JS.API.{subject}", data, timeout=5)
        return json.loads(reply.data)
    finally:
        await bus.close()


def test_a_healthy_setup_passes(nats_server: EmbeddedServer, env: dict[str, str]) -> None:
    env = with_server(env, nats_server)
    assert run_mesh("init", env=env).returncode == 0
    result = run_mesh("doctor", "--quick", "--json", env=env)
    found = findings(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not failures(found)
    checks = {f["check"]: f for f in found}
    assert checks["server"]["level"] == "ok" and "nats-server 2." in checks["server"]["message"]
    assert "account limits" in checks["jetstream"]["message"]
    for name in ("stream MESH_EVENTS", "stream MESH_WORK", "stream MESH_CMD", "bucket mesh-tasks"):
        assert checks[name]["level"] == "ok", checks[name]
    assert checks["clock"]["message"].startswith("this host's clock is")
    assert {"gpus", "disk", "units"} <= set(checks)


async def test_a_drifted_stream_is_reported_with_its_field_and_mesh_init_fixes_it(
    nats_server: EmbeddedServer, env: dict[str, str]
) -> None:
    env = with_server(env, nats_server)
    assert run_mesh("init", env=env).returncode == 0
    info = await js_api(nats_server, "STREAM.INFO.MESH_EVENTS")
    config = {**info["config"], "max_age": 86_400 * 1_000_000_000}
    updated = await js_api(nats_server, "STREAM.UPDATE.MESH_EVENTS", config)
    assert "error" not in updated, updated

    result = run_mesh("doctor", "--quick", "--json", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    [drifted] = [f for f in failures(findings(result)) if f["check"] == "stream MESH_EVENTS"]
    assert drifted["message"] == "max_age is 1d, mesh expects 90d"
    assert "`mesh init`" in drifted["fix"]

    assert run_mesh("init", env=env).returncode == 0
    again = run_mesh("doctor", "--quick", "--json", env=env)
    assert again.returncode == 0, again.stdout
    assert not failures(findings(again))


async def test_a_drifted_bucket_names_the_setting_and_the_stream_to_edit(
    nats_server: EmbeddedServer, env: dict[str, str]
) -> None:
    env = with_server(env, nats_server)
    assert run_mesh("init", env=env).returncode == 0
    info = await js_api(nats_server, "STREAM.INFO.KV_mesh-tasks")
    config = {**info["config"], "max_msgs_per_subject": 5}
    assert "error" not in await js_api(nats_server, "STREAM.UPDATE.KV_mesh-tasks", config)

    result = run_mesh("doctor", "--quick", "--json", env=env)
    assert result.returncode == 1
    [drifted] = [f for f in failures(findings(result)) if f["check"] == "bucket mesh-tasks"]
    assert drifted["message"] == "history is 5, mesh expects 1"
    assert "nats stream edit KV_mesh-tasks --max-msgs-per-subject 1" in drifted["fix"]


def test_a_missing_model_file_is_reported(
    nats_server: EmbeddedServer, env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text('[models.ghost]\nkind = "llm"\npath = "/nonexistent/ghost.gguf"\nvram_mb = 100\n')
    env = {**with_server(env, nats_server), "MESH_CONFIG": str(config)}
    assert run_mesh("init", env=env).returncode == 0
    result = run_mesh("doctor", "--json", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    [ghost] = [f for f in findings(result) if f["check"] == "model ghost"]
    assert ghost["level"] == "fail"
    assert "/nonexistent/ghost.gguf does not exist" in ghost["message"]
    assert "[models.ghost]" in ghost["fix"]
    # pushed to the models bucket, it is there for a worker to fetch
    pushed = tmp_path / "ghost.gguf"
    pushed.write_bytes(b"GGUF" * 1000)
    assert run_mesh("models", "push", "ghost", str(pushed), env=env).returncode == 0
    [ghost] = [f for f in findings(run_mesh("doctor", "--json", env=env)) if f["check"] == "model ghost"]
    assert ghost["level"] == "ok", ghost
    assert "in the models bucket (0 MB), fetched on first load" in ghost["message"]


async def test_another_hosts_clock_skew_is_reported(nats_server: EmbeddedServer, env: dict[str, str]) -> None:
    env = with_server(env, nats_server)
    bus = await connect(load_settings(environ={"MESH_NATS_URL": nats_server.url}), "test-skew")
    try:
        await bus.ensure_resources()
        now = time.time()
        # an agent on a host whose clock is 30 s behind: it writes its registration with that time
        record = AgentRecord(
            agent_id="worker-far-1", role="worker", host="far", pid=1, started_at=now - 40, seen_at=now - 30
        )
        await (await bus.agents_kv()).put("worker-far-1", encode_record(record))
    finally:
        await bus.close()
    result = run_mesh("doctor", "--quick", "--json", env=env)
    assert result.returncode == 1
    [far] = [f for f in failures(findings(result)) if "host far" in f["message"]]
    assert far["check"] == "clock"
    assert far["message"].startswith("host far's clock is 30.") and "behind the server's" in far["message"]
    assert "timedatectl set-ntp true" in far["fix"]


def test_a_dead_server_is_a_clear_failure_with_a_fix(env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "MESH_NATS_URL": f"nats://127.0.0.1:{port}"}
    result = run_mesh("doctor", "--quick", "--json", env=env)
    assert result.returncode == 1
    checks = {f["check"]: f for f in findings(result)}
    assert checks["server"]["level"] == "fail"
    assert f"cannot reach the NATS server at nats://127.0.0.1:{port}" in checks["server"]["message"]
    assert "systemctl start mesh-nats" in checks["server"]["fix"] and "mesh up" in checks["server"]["fix"]
    assert checks["jetstream"]["level"] == "skip"
    table = run_mesh("doctor", "--quick", env=env)
    assert table.returncode == 1 and "FAIL" in table.stdout and "1 failed" in table.stdout


# ---------------------------------------------------------------- units (systemd is faked: no PID 1 here)


def test_units_are_skipped_where_systemd_is_not_running(tmp_path: Path) -> None:
    [found] = doctor.check_units(booted=False)
    assert found.level == "skip" and "systemd is not running" in found.message


def test_units_failed_inactive_and_running(tmp_path: Path) -> None:
    system = tmp_path / "system"
    system.mkdir()
    for name in ("mesh.target", "mesh-brain.service", "mesh-worker@.service"):
        (system / name).write_text("")
    listing = (
        "mesh-brain.service loaded failed failed mesh: brain\n"
        "mesh-nats.service loaded active running mesh: NATS server\n"
        "mesh-worker@0.service loaded inactive dead mesh: worker for GPU 0\n"
        "mesh.target loaded active active mesh\n"
    )
    asked: list[list[str]] = []

    def runner(argv: list[str]) -> tuple[int, str]:
        asked.append(argv)
        if "is-enabled" in argv:
            return 0, "enabled\n"
        return 0, listing

    found = doctor.check_units(runner, system_dir=system, user_dir=tmp_path / "none", booted=True)
    by = {f.check: f for f in found}
    assert by["unit mesh-brain.service"].level == "fail"
    assert "journalctl -u mesh-brain.service -e" in by["unit mesh-brain.service"].fix
    assert by["unit mesh-nats.service"].level == "ok"
    assert by["unit mesh-worker@0.service"].level == "warn"
    assert "sudo systemctl start mesh-worker@0.service" in by["unit mesh-worker@0.service"].fix
    assert all("--user" not in argv for argv in asked), "only the system scope has units installed"


def test_no_units_installed_says_how_to_install(tmp_path: Path) -> None:
    found = doctor.check_units(lambda argv: (0, ""), system_dir=tmp_path, user_dir=tmp_path, booted=True)
    assert [f.level for f in found] == ["warn"]
    assert "mesh install-units --install" in found[0].fix


def test_server_times_parse_to_the_nanosecond() -> None:
    assert doctor.parse_time("2026-01-02T03:04:05.250000001Z") == pytest.approx(1767323045.250000001)
    assert doctor.parse_time("2026-01-02T03:04:05Z") == 1767323045.0


# ---------------------------------------------------------------- the server's store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_store_is_found_in_the_server_config_mesh_wrote(env: dict[str, str], tmp_path: Path) -> None:
    # as under `mesh up`: the server's config in the data dir
    server = EmbeddedServer(tmp_path / "data", port=-1)
    server.start()
    try:
        result = run_mesh("doctor", "--quick", "--json", env=with_server(env, server))
    finally:
        server.stop()
    [found] = [f for f in findings(result) if f["check"] == "store"]
    assert found["level"] == "ok", found
    conf = tmp_path / "data" / "nats-server.conf"
    assert found["message"].startswith(f"{tmp_path}/data/jetstream/jetstream (from {conf}): ")
    assert " free of " in found["message"]


def test_the_store_is_asked_of_the_servers_monitoring_port(env: dict[str, str], tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    text = (
        f"listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n"
        f'jetstream {{ store_dir: "{tmp_path / "elsewhere"}", max_file_store: 64MB }}\n'
    )
    server = EmbeddedServer(tmp_path / "nats", port=port, config_text=text)
    server.start()
    try:
        env = {**with_server(env, server), "MESH_NATS_MONITOR_URL": f"http://127.0.0.1:{http}"}
        result = run_mesh("doctor", "--quick", "--json", env=env)
    finally:
        server.stop()
    [found] = [f for f in findings(result) if f["check"] == "store"]
    assert found["level"] == "ok", found
    assert found["message"].startswith(
        f"{tmp_path}/elsewhere/jetstream (from the server's /varz at http://127.0.0.1:{http}): "
    )
    assert "JetStream holds 0 B of its 64.0 MiB limit" in found["message"]


def test_an_unknown_store_says_how_to_make_it_known(
    nats_server: EmbeddedServer, env: dict[str, str], tmp_path: Path
) -> None:
    result = run_mesh("doctor", "--quick", "--json", env=with_server(env, nats_server))
    [found] = [f for f in findings(result) if f["check"] == "store"]
    assert found["level"] == "warn", found
    assert "store directory is not known" in found["message"]
    assert str(tmp_path / "data" / "nats-server.conf") in found["message"]
    assert "nats_monitor_url" in found["fix"] and "http: 127.0.0.1:8222" in found["fix"]
    dead = {**with_server(env, nats_server), "MESH_NATS_MONITOR_URL": f"http://127.0.0.1:{free_port()}"}
    answer = run_mesh("doctor", "--quick", "--json", env=dead)
    [found] = [f for f in findings(answer) if f["check"] == "store"]
    assert found["level"] == "fail" and "nats_monitor_url does not answer" in found["message"], found
