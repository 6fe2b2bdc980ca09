"""systemd units: rendered from the code, checked by systemd-analyze, installed by `mesh install-units`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.host.config import load_settings
from mesh.ops import units
from tests.conftest import ROOT

# `make setup` installs Debian's systemd package where systemd-analyze is missing: never skipped
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
VENV = sys.prefix


def run_mesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "400",
    }


def verify(directory: Path, names: list[str], user: bool, tmp_path: Path) -> None:
    """systemd-analyze verify on each unit; any complaint about one of ours fails."""
    run_dir = tmp_path / "runtime"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run_dir), "SYSTEMD_LOG_COLOR": "0"}
    argv = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", *(str(directory / n) for n in names)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=directory)
    said = done.stdout + done.stderr
    ours = [line for line in said.splitlines() if str(directory) in line or "mesh" in line]
    assert done.returncode == 0 and not ours, f"{' '.join(argv)} exited {done.returncode}:\n{said}"


def test_systemd_dir_matches_the_code() -> None:
    files = units.rendered(units.Layout(), load_settings(environ={}))
    fix = "run `mesh install-units --out systemd --venv /opt/mesh/.venv`"
    for name, text in files.items():
        path = ROOT / "systemd" / name
        assert path.exists(), f"systemd/{name} is missing: {fix}"
        assert path.read_text() == text, f"systemd/{name} drifted from the code: {fix}"
    stale = {p.name for p in (ROOT / "systemd").iterdir()} - set(files) - {"README.md"}
    assert not stale, f"systemd/ has files the code no longer renders: {sorted(stale)}"


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    layout = dataclasses.replace(
        units.Layout(user=user, venv=VENV, data_dir=str(tmp_path / "data")), writable=(str(tmp_path),)
    )
    files = units.rendered(layout, load_settings(environ={}))
    out = tmp_path / "units"
    units.write_units(files, out)
    names = units.unit_names(files)
    assert {"mesh.target", "mesh-nats.service", "mesh-brain.service", "mesh-worker@.service"} <= set(names)
    assert {"mesh-watchdog.service", "mesh-gateway.service", "mesh-health.timer"} <= set(names)
    # a template is checked through its instances: a GPU worker and a CPU worker
    shutil.copy(out / "mesh-worker@.service", out / "mesh-worker@0.service")
    shutil.copy(out / "mesh-worker@.service", out / "mesh-worker@cpu.service")
    names = [n for n in names if n != "mesh-worker@.service"] + [
        "mesh-worker@0.service",
        "mesh-worker@cpu.service",
    ]
    verify(out, names, user, tmp_path)


def test_verify_would_catch_a_unit_whose_program_is_missing(tmp_path: Path) -> None:
    layout = units.Layout(venv=str(tmp_path / "no-venv"), data_dir=str(tmp_path / "data"))
    files = units.rendered(layout, load_settings(environ={}))
    units.write_units(files, tmp_path)
    with pytest.raises(AssertionError, match="is not executable"):
        verify(tmp_path, ["mesh-brain.service"], False, tmp_path)


def test_worker_stop_timeout_outlasts_its_drain_and_the_tasks_kill_grace() -> None:
    settings = load_settings(environ={"MESH_KILL_GRACE_S": "7"})
    layout = units.Layout(drain_s=120)
    text = units.rendered(layout, settings)["mesh-worker@.service"]
    assert "--gpu %i --drain-timeout 120" in text
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in text
    assert f"TimeoutStopSec={120 + 7 + units.AGENT_STOP_S:.0f}" in text
    assert units.worker_stop_s(layout, settings) > 120 + 7
    brain = units.rendered(layout, settings)["mesh-brain.service"]
    assert f"TimeoutStopSec={units.AGENT_STOP_S:.0f}" in brain
    assert "Environment=MESH_CONFIG=/etc/mesh/brain.toml" in brain


def test_gpu_units_keep_the_nvidia_devices_and_the_rest_do_not() -> None:
    files = units.rendered(units.Layout(), load_settings(environ={}))
    for name in ("mesh-worker@.service", "mesh-watchdog.service"):
        assert "PrivateDevices" not in files[name] and "DeviceAllow" not in files[name], name
    for name in ("mesh-brain.service", "mesh-nats.service", "mesh-gateway.service"):
        assert "PrivateDevices=yes" in files[name], name


def test_user_units_want_default_target_and_run_as_their_user(tmp_path: Path) -> None:
    layout = units.Layout(user=True, venv=VENV, data_dir="/home/a/.local/share/mesh")
    files = units.rendered(layout, load_settings(environ={}))
    assert "WantedBy=default.target" in files["mesh.target"]
    assert not any("User=" in text for text in files.values())
    assert units.POLKIT_RULES not in files
    assert "ReadWritePaths=/home/a/.local/share/mesh %h" in files["mesh-worker@.service"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"venv": "opt/mesh"}, "not an absolute path"),
        ({"data_dir": "/var/lib/my mesh"}, "has a space"),
        ({"gpus": ("0", "x")}, "neither a GPU index nor 'cpu'"),
        ({"service_user": "Mesh User"}, "not a valid user name"),
    ],
)
def test_bad_layouts_are_refused_with_what_to_change(change: dict[str, object], message: str) -> None:
    layout = dataclasses.replace(units.Layout(), **change)  # type: ignore[arg-type]
    with pytest.raises(units.UnitError, match=message):
        units.rendered(layout, load_settings(environ={}))


def test_a_percent_in_a_path_is_escaped(tmp_path: Path) -> None:
    layout = units.Layout(venv="/opt/mesh%1/.venv")
    text = units.rendered(layout, load_settings(environ={}))["mesh-brain.service"]
    assert "ExecStart=/opt/mesh%%1/.venv/bin/mesh agent brain" in text


def test_install_units_needs_a_destination(env: dict[str, str]) -> None:
    result = run_mesh("install-units", env=env)
    assert result.returncode == 2
    assert "--out DIR" in result.stderr and "--install" in result.stderr


def test_install_units_out_writes_the_units(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_mesh("install-units", "--out", str(out), "--venv", "/srv/mesh/venv", env=env)
    assert result.returncode == 0, result.stderr
    brain = (out / "mesh-brain.service").read_text()
    assert "ExecStart=/srv/mesh/venv/bin/mesh agent brain" in brain
    assert (out / "mesh-worker@.service").exists() and (out / units.POLKIT_RULES).exists()


def test_install_units_user_install_writes_units_and_configs(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "etc-mesh"
    config.mkdir()
    (config / "brain.toml").write_text('server_url = "nats://kept:4222"\n')
    result = run_mesh(
        "install-units", "--user", "--install", "--config-dir", str(config), "--gpus", "0,1", env=env
    )
    assert result.returncode == 0, result.stderr
    unit_dir = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    assert (unit_dir / "mesh-worker@.service").exists()
    assert f"ExecStart={VENV}/bin/mesh agent watchdog" in (unit_dir / "mesh-watchdog.service").read_text()
    # an existing config is the operator's: kept; missing ones are written
    assert (config / "brain.toml").read_text() == 'server_url = "nats://kept:4222"\n'
    assert 'server_url = "nats://127.0.0.1:4222"' in (config / "worker.toml").read_text()
    assert "jetstream" in (config / "nats-server.conf").read_text()
    assert (Path(env["XDG_DATA_HOME"]) / "mesh").is_dir()
    assert "systemctl --user enable --now mesh.target" in result.stdout
    assert "mesh-worker@0.service mesh-worker@1.service" in result.stdout


def test_install_units_refuses_a_venv_without_mesh(env: dict[str, str], tmp_path: Path) -> None:
    result = run_mesh("install-units", "--user", "--install", "--venv", str(tmp_path), env=env)
    assert result.returncode == 2
    assert f"{tmp_path}/bin/mesh does not exist" in result.stderr
    assert "--venv" in result.stderr
