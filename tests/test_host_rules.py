"""The default host rules: a CPU busy for long, RAM running out, swap thrashing, a CPU governor
other than `performance` on a GPU host, XID errors (injected through the simulated GPU source)
and a stuck GPU. The engine is fed readings with their times: nothing waits for minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from agents.watchdog import busy_with_model
from mesh.alerts import AlertEngine, Change, build_rules
from mesh.bus.read import read_bucket
from mesh.events import AlertRaised, GpuState
from mesh.host.telemetry import SimulatedSource, cpu_governors, inject_xid, write_simulated
from mesh.samples import GpuSample, HostSample
from tests.conftest import Mesh
from tests.faults import until

HOST = "rig1"


def host(at: float, **kw: Any) -> HostSample:
    fields: dict[str, Any] = dict(
        host=HOST,
        at=at,
        cpu_pct=10.0,
        per_core=[10.0],
        load1=0.0,
        load5=0.0,
        load15=0.0,
        ram_used_mb=1000,
        ram_total_mb=16000,
        swap_used_mb=0,
        swap_total_mb=8000,
        disk_path="/",
        disk_used_mb=1,
        disk_total_mb=100,
        disk_free_pct=99.0,
    )
    fields.update(kw)
    return HostSample(**fields)


def gpu(util: float | None = 50.0, **kw: Any) -> GpuSample:
    return GpuSample(host=HOST, index=0, name="g", at=0.0, util_pct=util, **kw)


def engine(**overrides: dict[str, Any]) -> AlertEngine:
    return AlertEngine(build_rules(overrides), xid_window_s=3600.0)


def seen(changes: list[Change], rule: str) -> list[str]:
    return [c.kind for c in changes if c.rule == rule]


def test_cpu_high_only_when_sustained() -> None:
    e = engine()
    assert seen(e.host(host(0.0, cpu_pct=99.0), 0.0), "cpu_high") == []
    assert seen(e.host(host(300.0, cpu_pct=99.0), 300.0), "cpu_high") == []
    assert seen(e.host(host(600.0, cpu_pct=99.0), 600.0), "cpu_high") == ["raised"]
    assert seen(e.host(host(610.0, cpu_pct=90.0), 610.0), "cpu_high") == [], "within the hysteresis"
    assert seen(e.host(host(620.0, cpu_pct=50.0), 620.0), "cpu_high") == ["resolved"]
    # a short burst does not raise
    e = engine()
    e.host(host(0.0, cpu_pct=99.0), 0.0)
    e.host(host(500.0, cpu_pct=20.0), 500.0)
    assert seen(e.host(host(700.0, cpu_pct=99.0), 700.0), "cpu_high") == []


def test_ram_low() -> None:
    e = engine()
    assert seen(e.host(host(0.0, ram_used_mb=15500), 0.0), "ram_low") == []
    assert seen(e.host(host(60.0, ram_used_mb=15500), 60.0), "ram_low") == ["raised"]
    assert seen(e.host(host(70.0, ram_used_mb=14000), 70.0), "ram_low") == ["resolved"]


def test_swap_thrash_from_the_counters_of_consecutive_samples() -> None:
    e = engine()
    swapped = 0.0
    changes: list[Change] = []
    for t in range(0, 200, 10):  # 50 MB/s in and out
        swapped += 500.0
        changes += e.host(host(float(t), swap_in_mb=swapped, swap_out_mb=swapped), float(t))
    raised = [c for c in changes if c.rule == "swap_thrash"]
    assert [c.kind for c in raised] == ["raised"]
    assert raised[0].value == 100.0 and raised[0].at == 130.0, "first rate at 10 s, then 120 s"
    flat = e.host(host(210.0, swap_in_mb=swapped, swap_out_mb=swapped), 210.0)
    assert seen(flat, "swap_thrash") == ["resolved"]
    # swap in use but not moving is no thrash
    e = engine()
    for t in range(0, 400, 10):
        still = e.host(host(float(t), swap_used_mb=4000, swap_in_mb=10.0, swap_out_mb=10.0), float(t))
        assert seen(still, "swap_thrash") == []


def test_cpu_governor_only_on_a_gpu_host_and_only_where_readable() -> None:
    slow = host(0.0, cpu_governors={"powersave": 12, "performance": 4})
    assert seen(engine().host(slow, 0.0, gpu_host=False), "cpu_governor") == []
    assert seen(engine().host(host(0.0), 0.0, gpu_host=True), "cpu_governor") == [], "no cpufreq"
    e = engine()
    [raised] = [c for c in e.host(slow, 0.0, gpu_host=True) if c.rule == "cpu_governor"]
    assert raised.value == 12.0 and "governors: performance x4, powersave x12" in raised.message
    fixed = host(10.0, cpu_governors={"performance": 16})
    assert seen(e.host(fixed, 10.0, gpu_host=True), "cpu_governor") == ["resolved"]


def test_cpu_governors_read_from_sysfs(tmp_path: Path) -> None:
    for cpu, governor in enumerate(["performance", "powersave", "powersave"]):
        d = tmp_path / f"cpu{cpu}" / "cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_governor").write_text(governor + "\n")
    (tmp_path / "cpufreq").mkdir()  # not a CPU
    assert cpu_governors(tmp_path) == {"performance": 1, "powersave": 2}
    assert cpu_governors(tmp_path / "absent") == {}


def test_xid_errors_injected_through_the_simulated_source(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_simulated(path, [{"name": "A"}, {"name": "B"}])
    source = SimulatedSource(path, HOST)
    e = engine()
    first = source.sample(0)
    assert first.xid_errors is None and first.last_xid is None
    assert seen(e.gpu(first, 0.0), "gpu_xid") == []

    inject_xid(path, 0, 79)
    hit = source.sample(0)
    assert hit.xid_errors == 1 and hit.last_xid == 79
    assert source.sample(1).xid_errors is None, "only the GPU it was injected on"
    [raised] = [c for c in e.gpu(hit, 10.0) if c.rule == "gpu_xid"]
    assert raised.severity == "critical" and "last XID 79" in raised.message
    assert seen(e.gpu(source.sample(0), 1000.0), "gpu_xid") == [], "still within the window"
    assert seen(e.gpu(source.sample(0), 3610.0), "gpu_xid") == ["resolved"]

    inject_xid(path, 0, 13)
    again = source.sample(0)
    assert again.xid_errors == 2 and again.last_xid == 13
    assert seen(e.gpu(again, 4000.0), "gpu_xid") == ["raised"], "a new XID raises again"


def test_a_stuck_gpu_is_busy_at_0_percent_for_minutes() -> None:
    e = engine()
    assert seen(e.stuck(gpu(0.0), True, 0.0), "gpu_stuck") == []
    assert seen(e.stuck(gpu(0.0), True, 299.0), "gpu_stuck") == []
    [raised] = [c for c in e.stuck(gpu(0.0), True, 300.0) if c.rule == "gpu_stuck"]
    assert raised.target == f"{HOST}-gpu0" and raised.metric == "busy_gpu_util_pct"
    assert seen(e.stuck(gpu(0.0), True, 400.0), "gpu_stuck") == [], "raised once"
    assert seen(e.stuck(gpu(60.0), True, 410.0), "gpu_stuck") == ["resolved"]
    # a busy GPU that goes idle: the question is gone, the alert resolves
    e.stuck(gpu(0.0), True, 500.0)
    assert seen(e.stuck(gpu(0.0), True, 800.0), "gpu_stuck") == ["raised"]
    assert seen(e.stuck(gpu(0.0), False, 810.0), "gpu_stuck") == ["resolved"]
    # idle at 0% for an hour is not stuck; nor is a reading the card does not give
    assert seen(e.stuck(gpu(0.0), False, 4000.0), "gpu_stuck") == []
    assert seen(e.stuck(gpu(None), True, 5000.0), "gpu_stuck") == []
    # waiting restarts after a break
    e = engine()
    e.stuck(gpu(0.0), True, 0.0)
    e.stuck(gpu(0.0), False, 200.0)
    assert seen(e.stuck(gpu(0.0), True, 310.0), "gpu_stuck") == []


def test_what_counts_as_busy_with_a_model() -> None:
    base = GpuState(gpu="rig1-gpu0", worker="w", host=HOST, state="llm_busy", at=0.0, llm="gemma", running=1)
    assert busy_with_model(base)
    assert not busy_with_model(msgspec.structs.replace(base, running=0))
    script = msgspec.structs.replace(base, state="script_busy", llm="")
    assert not busy_with_model(script), "a script task without a model may use no GPU"
    assert busy_with_model(msgspec.structs.replace(script, script_models=("whisper",)))
    assert not busy_with_model(msgspec.structs.replace(base, state="idle"))


def test_thresholds_and_durations_are_configurable() -> None:
    e = engine(gpu_stuck={"for_s": 30.0}, cpu_high={"above": 80.0, "for_s": 0.0}, gpu_xid={"enabled": False})
    e.stuck(gpu(0.0), True, 0.0)
    assert seen(e.stuck(gpu(0.0), True, 30.0), "gpu_stuck") == ["raised"]
    assert seen(e.host(host(0.0, cpu_pct=85.0), 0.0), "cpu_high") == ["raised"]
    assert "gpu_xid" not in e.rules


@pytest.mark.integration
async def test_a_watchdog_raises_an_xid_injected_into_its_simulated_gpu(mesh: Mesh) -> None:
    sim = mesh.tmp / "gpus.json"
    write_simulated(sim, [{"name": "Sim GPU A", "temp_c": 50}])
    mesh.env.update(
        {
            "MESH_SIMULATED_GPUS": str(sim),
            "MESH_WATCHDOG_INTERVAL_S": "0.2",
            "MESH_DATA_DIR": str(mesh.tmp / "data"),
        }
    )
    mesh.start_agent("watchdog", "watchdog", "--host", HOST)
    bus = await mesh.bus()

    async def sampled() -> bool:
        if not mesh.alive("watchdog"):
            raise AssertionError(mesh.log("watchdog"))
        return f"{HOST}.gpu0" in await read_bucket(await bus.telemetry_kv())

    await until(sampled, 60.0, "the watchdog's first sample")
    inject_xid(sim, 0, 79)

    async def xid_alert() -> list[AlertRaised]:
        found = [
            m for _, m in await mesh.history(mesh.settings.names.alerts_all) if isinstance(m, AlertRaised)
        ]
        return [m for m in found if m.rule == "gpu_xid"]

    [alert] = await until(xid_alert, 60.0, "the gpu_xid alert")
    assert alert.target == f"{HOST}-gpu0" and alert.severity == "critical" and "last XID 79" in alert.message
