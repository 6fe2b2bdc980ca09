"""Telling a full store apart, and finding where the server keeps it (no server needed)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from mesh.bus.store import StoreWatch, full_error, locate, store_dir_of_config, stream_of
from mesh.host.config import load_settings

FULL = "the NATS server's store is full"


def api_error(code: int, err_code: int, description: str) -> nats.js.errors.APIError:
    """The error nats-py raises for a JetStream answer (what the server sends when full)."""
    try:
        nats.js.errors.APIError.from_error({"code": code, "err_code": err_code, "description": description})
    except nats.js.errors.APIError as exc:
        return exc
    raise AssertionError("from_error always raises")


def test_the_servers_answers_when_full() -> None:
    assert full_error(api_error(503, 10023, "insufficient resources")) == "insufficient resources"
    assert full_error(api_error(500, 10047, "insufficient storage resources available"))
    assert full_error(api_error(400, 10002, "resource limits exceeded for account"))
    assert full_error(api_error(500, 10051, "write /var/lib/x: no space left on device"))
    # not a full store: a stream's own limit, a CAS that lost, a timeout
    assert not full_error(api_error(400, 10054, "maximum bytes exceeded"))
    assert not full_error(api_error(400, 10071, "wrong last sequence: 4"))
    assert not full_error(nats.errors.TimeoutError())


def test_the_store_dir_of_a_server_config() -> None:
    assert store_dir_of_config('jetstream {\n  store_dir: "/var/lib/mesh/jetstream"\n}\n') == (
        "/var/lib/mesh/jetstream/jetstream"
    )
    assert store_dir_of_config("jetstream {store_dir=/data/js, max_file_store: 1G}") == "/data/js/jetstream"
    default = os.path.join(tempfile.gettempdir(), "nats", "jetstream")
    assert store_dir_of_config("jetstream: enabled\n") == default
    assert store_dir_of_config("listen: 127.0.0.1:4222\n") is None
    assert store_dir_of_config("jetstream: disabled\n") is None


def test_located_only_for_a_server_on_this_host(tmp_path: Path) -> None:
    (tmp_path / "nats-server.conf").write_text(f'jetstream {{ store_dir: "{tmp_path}/s" }}\n')
    here = load_settings(environ={"MESH_DATA_DIR": str(tmp_path), "MESH_NATS_URL": "nats://127.0.0.1:4222"})
    found = locate(here, environ={})
    assert found is not None and found.path == f"{tmp_path}/s/jetstream" and found.local
    assert found.source == str(tmp_path / "nats-server.conf")
    far = load_settings(environ={"MESH_DATA_DIR": str(tmp_path), "MESH_NATS_URL": "nats://rig.example:4222"})
    assert locate(far, environ={}) is None
    # the units' layout: next to the role's config file
    units = tmp_path / "etc"
    units.mkdir()
    (units / "nats-server.conf").write_text('jetstream { store_dir: "/srv/js" }\n')
    (units / "brain.toml").write_text("")
    found = locate(here, environ={"MESH_CONFIG": str(units / "brain.toml")})
    assert found is not None and found.path == "/srv/js/jetstream"


async def test_a_full_store_is_said_once_and_its_end_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "nats-server.conf").write_text(f'jetstream {{ store_dir: "{tmp_path}" }}\n')
    watch = StoreWatch(load_settings(environ={"MESH_DATA_DIR": str(tmp_path)}), environ={})
    refused = api_error(503, 10023, "insufficient resources")
    caplog.set_level(logging.INFO, logger="mesh.bus.store")
    for _ in range(3):
        assert await watch.failed(refused, ["mesh.evt.run.p.t.finished"])
        assert await watch.failed(refused, ["$KV.mesh-agents.w1"])
    assert watch.full
    assert not await watch.failed(api_error(400, 10071, "wrong last sequence: 4"))
    watch.cleared("mesh.evt.agent.w1.started")
    assert watch.full, "the agents bucket has not taken a write yet"
    watch.cleared("$KV.mesh-telemetry.h.gpu0")  # kept in memory: says nothing of the disk
    assert watch.full
    watch.cleared("$KV.mesh-agents.w1")
    assert not watch.full
    watch.cleared("$KV.mesh-agents.w1")
    said = [r.getMessage() for r in caplog.records]
    assert sum(FULL in m for m in said) == 1, said
    assert sum("takes writes again" in m for m in said) == 1, said
    line = next(m for m in said if FULL in m)
    assert f"MB free in {tmp_path}/jetstream" in line and "insufficient resources" in line, line


def test_a_streams_stand_in() -> None:
    assert stream_of("$KV.mesh-tasks.p1.t1") == "$KV.mesh-tasks"
    assert stream_of("mesh.evt.task.p1.t1.succeeded") == "mesh.evt"
