"""Thermal control and an operator's pause/cordon, through real agents and a real server.

Only NVML is simulated: the watchdog and a `--gpu 0` worker both read the same simulated GPU
file (`MESH_SIMULATED_GPUS`), whose temperature the test sets. The watchdog pauses the GPU at
or above thermal_pause_c and resumes it below thermal_resume_c; the worker then stops (and
starts again) claiming work, and says so in its GPU state.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from mesh.bus.read import read_bucket
from mesh.events import GpuControl, GpuState, decode
from mesh.host.telemetry import host_token, write_simulated
from tests.conftest import Mesh

pytestmark = pytest.mark.integration

GPU = f"{host_token()}-gpu0"


def heat(path: Path, temp_c: float) -> None:
    write_simulated(path, [{"name": "Simulated 8GB", "temp_c": temp_c, "mem_total_mb": 8192}])


async def gpu_state(mesh: Mesh) -> GpuState | None:
    raw = await read_bucket(await (await mesh.bus()).gpus_kv())
    value = raw.get(GPU)
    msg = decode(value) if value else None
    return msg if isinstance(msg, GpuState) else None


async def until_state(mesh: Mesh, want: str, timeout_s: float = 20.0) -> GpuState:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await gpu_state(mesh)
        if last is not None and last.state == want:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{GPU} not {want} after {timeout_s}s (last: {last})")


async def controls(mesh: Mesh) -> list[GpuControl]:
    bus = await mesh.bus()
    return [
        m for _, m in await mesh.history(bus.names.gpu_event(GPU, "control")) if isinstance(m, GpuControl)
    ]


SCRIPT_PLAN = """# hot

## Tasks

### work
- class: script

```shell
echo ran on $CUDA_VISIBLE_DEVICES
```
"""


async def test_a_hot_gpu_is_paused_and_resumed_by_the_watchdog_with_hysteresis(
    mesh: Mesh, tmp_path: Path
) -> None:
    sim = tmp_path / "gpus.json"
    heat(sim, 60)
    mesh.env.update(
        {
            "MESH_SIMULATED_GPUS": str(sim),
            "MESH_WATCHDOG_INTERVAL_S": "0.3",
            "MESH_THERMAL_PAUSE_C": "87",
            "MESH_THERMAL_RESUME_C": "80",
        }
    )
    mesh.brain()
    mesh.start_agent("watchdog", "watchdog")
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    await until_state(mesh, "idle")

    heat(sim, 90)
    paused = await until_state(mesh, "paused")
    assert "thermal pause" in paused.hold and "90" in paused.hold
    plan_id = await mesh.submit_text(SCRIPT_PLAN)
    await asyncio.sleep(2.0)
    assert (await mesh.tasks(plan_id))["work"].status == "ready", "a paused GPU claims no work"

    # between the thresholds: still paused (no flapping)
    heat(sim, 84)
    await asyncio.sleep(1.5)
    assert (await gpu_state(mesh)).state == "paused"  # type: ignore[union-attr]
    assert (await mesh.tasks(plan_id))["work"].status == "ready"

    heat(sim, 75)
    done = await mesh.wait_plan(plan_id, 30)
    assert done.status == "succeeded"
    history = await controls(mesh)
    assert [(c.source, c.paused) for c in history] == [("thermal", True), ("thermal", False)]
    assert "90" in history[0].reason and "75" in history[1].reason


async def test_an_operator_pause_and_cordon_hold_a_gpu_until_lifted(mesh: Mesh, tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    heat(sim, 50)
    mesh.env["MESH_SIMULATED_GPUS"] = str(sim)
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    await until_state(mesh, "idle")

    cordon = mesh.run_cli("gpu", "cordon", GPU, "--reason", "XID 79")
    assert cordon.returncode == 0 and "cordoned" in cordon.stdout and "note:" not in cordon.stderr
    # a GPU no worker has reported (a typo, or one whose worker has not run yet): held, and said
    typo = mesh.run_cli("gpu", "cordon", "gpu-typo")
    assert typo.returncode == 0 and "no worker has reported a GPU 'gpu-typo'" in typo.stderr
    assert GPU in typo.stderr  # the GPUs there are
    held = await until_state(mesh, "paused")
    assert "operator cordon: XID 79" in held.hold
    plan_id = await mesh.submit_text(SCRIPT_PLAN)
    # resume lifts a pause, not a cordon
    mesh.cli("gpu", "resume", "0")
    await asyncio.sleep(2.0)
    assert (await gpu_state(mesh)).state == "paused"  # type: ignore[union-attr]
    assert (await mesh.tasks(plan_id))["work"].status == "ready"

    assert "taking work" in mesh.cli("gpu", "uncordon", "0")
    assert (await mesh.wait_plan(plan_id, 30)).status == "succeeded"

    mesh.cli("gpu", "pause", GPU, "--reason", "maintenance")
    assert "operator pause: maintenance" in (await until_state(mesh, "paused")).hold
    mesh.cli("gpu", "resume", GPU)
    await until_state(mesh, "idle")
    history = await controls(mesh)
    assert [(c.paused, c.cordoned) for c in history] == [
        (False, True),
        (False, True),
        (False, False),
        (True, False),
        (False, False),
    ]
    assert all(c.source == "operator" and c.by == (os.environ.get("USER") or c.by) for c in history)


async def test_a_task_on_a_gpu_records_its_peak_memory_and_mean_utilisation(
    mesh: Mesh, tmp_path: Path
) -> None:
    sim = tmp_path / "gpus.json"
    write_simulated(
        sim,
        [{"name": "Simulated 8GB", "temp_c": 50, "mem_total_mb": 8192, "mem_used_mb": 3000, "util_pct": 40}],
    )
    mesh.env["MESH_SIMULATED_GPUS"] = str(sim)
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    await until_state(mesh, "idle")
    gate = tmp_path / "gate"
    plan_id = await mesh.submit_text(
        "# busy\n\n## Tasks\n\n### work\n- class: script\n\n```shell\n"
        f"while [ ! -e {gate} ]; do sleep 0.05; done\n```\n"
    )
    await mesh.wait_task(plan_id, "work", "running")
    await asyncio.sleep(1.2)  # readings at 3000 MB and 40 %
    write_simulated(
        sim,
        [{"name": "Simulated 8GB", "temp_c": 50, "mem_total_mb": 8192, "mem_used_mb": 5000, "util_pct": 100}],
    )
    await asyncio.sleep(1.2)  # and at 5000 MB and 100 %
    gate.touch()
    assert (await mesh.wait_plan(plan_id, 30)).status == "succeeded"
    bus = await mesh.bus()
    done = [m for _, m in await mesh.history(bus.names.run_events(plan_id, "work", "finished"))]
    metrics = done[0].metrics  # type: ignore[union-attr]
    assert metrics["gpu_mem_peak_mb"] == 5000
    assert 40 < metrics["gpu_util_mean_pct"] < 100, metrics
    assert metrics["gpu_samples"] >= 4


async def test_a_gpu_can_be_cordoned_before_any_agent_ran(mesh: Mesh, tmp_path: Path) -> None:
    # a bare server: no agent has created a bucket yet
    assert "cordoned" in mesh.cli("gpu", "cordon", GPU, "--reason", "XID 79")
    sim = tmp_path / "gpus.json"
    heat(sim, 50)
    mesh.env["MESH_SIMULATED_GPUS"] = str(sim)
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    assert "operator cordon: XID 79" in (await until_state(mesh, "paused")).hold
