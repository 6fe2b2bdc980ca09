"""The watchdog: the alert engine alone (pure), then a real watchdog process with simulated GPUs
against a real nats-server, a real local webhook, and `mesh gpus` run as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from mesh.alerts import AlertEngine, AlertRule, build_rules
from mesh.bus.read import read_bucket
from mesh.bus.route import route
from mesh.errors import ConfigError
from mesh.events import AlertRaised, AlertResolved, decode, encode
from mesh.host.alertsinks import Sinks, webhook_request
from mesh.host.config import load_settings
from mesh.host.telemetry import SimulatedSource, open_source, sample_host, write_simulated
from mesh.names import Names
from mesh.samples import GpuSample, HostSample, decode_sample, encode_sample
from tests.conftest import HANG_S, ROOT, Mesh
from tests.faults import until

HOST = "testhost"


def gpu(temp: float | None, index: int = 0) -> GpuSample:
    return GpuSample(host=HOST, index=index, name="g", at=0.0, temp_c=temp)


def host(free_pct: float) -> HostSample:
    return HostSample(
        host=HOST,
        at=0.0,
        cpu_pct=1.0,
        per_core=[1.0],
        load1=0.0,
        load5=0.0,
        load15=0.0,
        ram_used_mb=1,
        ram_total_mb=2,
        swap_used_mb=0,
        swap_total_mb=0,
        disk_path="/",
        disk_used_mb=1,
        disk_total_mb=2,
        disk_free_pct=free_pct,
    )


def kinds(changes: list[Any]) -> list[tuple[str, str]]:
    return [(c.kind, c.rule) for c in changes]


# ------------------------------------------------------------------ the engine (pure)


def test_temperature_thresholds_and_hysteresis() -> None:
    engine = AlertEngine(build_rules({}, hysteresis_c=5.0))
    assert engine.gpu(gpu(84.9), 0) == []
    assert kinds(engine.gpu(gpu(85), 1)) == [("raised", "gpu_temp_warn")]
    assert kinds(engine.gpu(gpu(90), 2)) == [("raised", "gpu_temp_critical")]
    # critical resolves only below 90 - 5; warn only below 85 - 5
    assert engine.gpu(gpu(86), 3) == []
    changes = engine.gpu(gpu(84), 4)
    assert kinds(changes) == [("resolved", "gpu_temp_critical")]
    assert changes[0].raised_at == 2 and changes[0].target == f"{HOST}-gpu0"
    assert engine.gpu(gpu(80), 5) == []
    assert kinds(engine.gpu(gpu(79.9), 6)) == [("resolved", "gpu_temp_warn")]
    assert engine.active == {}


def test_no_flapping_around_the_threshold() -> None:
    engine = AlertEngine(build_rules({}))
    changes = []
    for t in range(100):
        changes += engine.gpu(gpu(86 if t % 2 else 84), float(t))
    assert kinds(changes) == [("raised", "gpu_temp_warn")]
    # each GPU is its own target
    assert kinds(engine.gpu(gpu(88, index=1), 100)) == [("raised", "gpu_temp_warn")]
    assert len(engine.active) == 2


def test_for_s_needs_the_condition_to_hold() -> None:
    rules = build_rules({"gpu_temp_warn": {"for_s": 10}, "gpu_temp_critical": {"enabled": False}})
    assert "gpu_temp_critical" not in rules
    engine = AlertEngine(rules)
    assert engine.gpu(gpu(95), 0) == []
    assert engine.gpu(gpu(95), 9) == []
    assert engine.gpu(gpu(70), 9.5) == []  # interrupted: the clock starts again
    assert engine.gpu(gpu(95), 10) == []
    assert engine.gpu(gpu(95), 19) == []
    assert kinds(engine.gpu(gpu(95), 20)) == [("raised", "gpu_temp_warn")]


def test_missing_readings_change_nothing() -> None:
    engine = AlertEngine(build_rules({}))
    assert kinds(engine.gpu(gpu(99), 0)) == [("raised", "gpu_temp_warn"), ("raised", "gpu_temp_critical")]
    assert engine.gpu(gpu(None), 1) == []
    assert len(engine.active) == 2


def test_disk_free_below() -> None:
    engine = AlertEngine(build_rules({}))
    assert engine.host(host(5.0), 0) == []
    changes = engine.host(host(4.9), 1)
    assert kinds(changes) == [("raised", "disk_low")]
    assert changes[0].severity == "critical" and changes[0].target == HOST
    assert engine.host(host(5.9), 2) == []  # hysteresis 1 point
    assert kinds(engine.host(host(6.0), 3)) == [("resolved", "disk_low")]


def test_agent_heartbeat() -> None:
    engine = AlertEngine(build_rules({}))
    assert engine.agents({"w1": 100.0, "w2": 100.0}, HOST, 110) == []
    # w1 keeps refreshing; w2's key expired (missing): it keeps aging from its last heartbeat
    assert engine.agents({"w1": 125.0}, HOST, 125) == []
    changes = engine.agents({"w1": 129.0}, HOST, 130)
    assert kinds(changes) == [("raised", "agent_silent")]
    assert changes[0].target == "w2" and changes[0].value == 30
    assert engine.agents({"w1": 140.0}, HOST, 140) == []  # raised once
    assert kinds(engine.agents({"w1": 150.0, "w2": 150.0}, HOST, 150)) == [("resolved", "agent_silent")]
    # an agent that stopped cleanly is no longer watched; its alert (if any) resolves
    assert kinds(engine.agents({"w1": 180.0}, HOST, 181)) == [("raised", "agent_silent")]
    assert kinds(engine.forget_agent("w2", 182)) == [("resolved", "agent_silent")]
    assert engine.agents({"w1": 295.0}, HOST, 300) == []  # w2 is no longer watched


def test_rules_from_config() -> None:
    rules = build_rules(
        {"gpu_temp_warn": {"above": 80}, "gpu_hot_util": {"metric": "gpu_util_pct", "above": 99}}
    )
    assert rules["gpu_temp_warn"].above == 80 and rules["gpu_temp_warn"].hysteresis == 5
    assert rules["gpu_hot_util"] == AlertRule(metric="gpu_util_pct", above=99, hysteresis=0.0)
    for bad in (
        {"x": {"metric": "nope", "above": 1}},
        {"x": {"metric": "cpu_pct"}},
        {"x": {"metric": "cpu_pct", "above": 1, "below": 2}},
        {"gpu_temp_warn": {"severity": "loud"}},
        {"gpu_temp_warn": {"abov": 3}},
        {"a.b": {"metric": "cpu_pct", "above": 1}},
    ):
        with pytest.raises(ValueError):
            build_rules(bad)


def test_bad_rule_in_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[alerts.gpu_temp_warn]\nmetric = "nope"\n')
    with pytest.raises(ConfigError, match="unknown metric"):
        load_settings(config=cfg, environ={})
    cfg.write_text('alert_webhook_format = "irc"\n')
    with pytest.raises(ConfigError):
        load_settings(config=cfg, environ={})


def test_alert_events_route_and_decode() -> None:
    change = AlertEngine(build_rules({})).gpu(gpu(91), 5.0)[1]
    ev = change.event()
    assert isinstance(ev, AlertRaised) and ev.severity == "critical" and ev.value == 91
    subject, msg_id = route(Names("mesh"), ev)
    assert subject == "mesh.evt.alert.gpu_temp_critical.raised"
    assert msg_id == f"alert:gpu_temp_critical:{HOST}-gpu0:raised:5.0"
    assert decode(encode(ev)) == ev


def test_webhook_shapes() -> None:
    ev = AlertResolved(
        rule="gpu_temp_warn", target="h-gpu0", host="h", severity="warn", at=2.0, raised_at=1.0, message="m"
    )
    assert webhook_request("https://hooks.slack.com/x", "slack", ev) == (
        "https://hooks.slack.com/x",
        {"text": "m"},
    )
    assert webhook_request("https://discord.com/api/webhooks/1/t", "discord", ev)[1] == {"content": "m"}
    url, body = webhook_request("https://ntfy.sh/mesh-alerts", "ntfy", ev)
    assert url == "https://ntfy.sh/" and body["topic"] == "mesh-alerts" and body["message"] == "m"
    url, body = webhook_request("http://x/hook", "json", ev)
    assert body["type"] == "alert.resolved" and body["text"] == "m" and body["raised_at"] == 1.0


async def test_failing_webhook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    ev = AlertRaised(rule="disk_low", target="h", host="h", severity="critical", at=1.0, message="m")
    # a closed port: connection refused
    assert not await Sinks("http://127.0.0.1:9/hook", timeout_s=1.0).deliver(ev)
    assert not await Sinks("not a url").deliver(ev)
    said = [r.getMessage() for r in caplog.records]
    assert sum("to webhook failed (try 1 of 1)" in m for m in said) == 2
    assert sum("NOT delivered to webhook" in m for m in said) == 2, "no spool: said loudly"


# ------------------------------------------------------------------ readings


def test_host_readings_are_sane(tmp_path: Path) -> None:
    psutil.cpu_percent(percpu=True)
    time.sleep(0.1)
    s = sample_host(HOST, str(tmp_path / "not" / "yet"))
    assert 0 <= s.cpu_pct <= 100 and len(s.per_core) == psutil.cpu_count()
    assert all(0 <= p <= 100 for p in s.per_core)
    assert min(s.load1, s.load5, s.load15) >= 0
    assert 0 < s.ram_used_mb <= s.ram_total_mb
    assert 0 <= s.swap_used_mb <= max(s.swap_total_mb, 0) or s.swap_total_mb == 0
    assert 0 < s.disk_used_mb <= s.disk_total_mb and 0 <= s.disk_free_pct <= 100
    assert Path(s.disk_path).exists() and str(tmp_path).startswith(s.disk_path)
    assert all(-50 < t < 150 for t in s.temps.values())
    assert decode_sample(encode_sample(s)) == s


def test_simulated_source_rereads_its_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_simulated(path, [{"name": "A", "temp_c": 50}])
    src = SimulatedSource(path, HOST)
    assert src.count() == 1 and src.sample(0).temp_c == 50
    write_simulated(path, [{"name": "A", "temp_c": 70}, {"name": "B", "mem_used_mb": 10}])
    assert src.count() == 2 and src.sample(0).temp_c == 70 and src.sample(1).mem_used_mb == 10
    path.write_text("{not json")
    assert src.count() == 2  # the last good reading stays
    assert src.sample(1).gpu_id == f"{HOST}-gpu1"


def nvml_present() -> bool:
    return open_source(HOST) is not None


# ------------------------------------------------------------------ a watchdog process


class Hook:
    """A real local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


async def wait_for(what: str, check: Any, timeout_s: float = 20.0) -> Any:
    return await until(check, timeout_s, what)


async def alerts(mesh: Mesh) -> list[AlertRaised | AlertResolved]:
    return [
        m
        for _, m in await mesh.history(mesh.settings.names.alerts_all)
        if isinstance(m, AlertRaised | AlertResolved)
    ]


def set_temp(path: Path, temp: float) -> None:
    write_simulated(
        path,
        [
            {"name": "Sim GPU A", "temp_c": temp, "util_pct": 40, "mem_used_mb": 1000, "mem_total_mb": 24576},
            {"name": "Sim GPU B", "temp_c": 45, "util_pct": 0, "mem_used_mb": 0, "mem_total_mb": 12288},
        ],
    )


async def test_watchdog_process_telemetry_alerts_webhook_and_mesh_gpus(mesh: Mesh, hook: Hook) -> None:
    sim = mesh.tmp / "gpus.json"
    set_temp(sim, 60)
    mesh.env.update(
        {
            "MESH_SIMULATED_GPUS": str(sim),
            "MESH_WATCHDOG_INTERVAL_S": "0.2",
            "MESH_ALERT_WEBHOOK_URL": hook.url,
            "MESH_DATA_DIR": str(mesh.tmp / "data"),
        }
    )
    mesh.start_agent("watchdog", "watchdog", "--host", HOST)
    bus = await mesh.bus()
    names = mesh.settings.names

    async def telemetry() -> dict[str, bytes]:
        if not mesh.alive("watchdog"):
            raise AssertionError(mesh.log("watchdog"))
        try:
            raw = await read_bucket(await bus.telemetry_kv())
        except Exception:
            return {}
        return raw if {f"{HOST}.gpu0", f"{HOST}.gpu1", f"{HOST}.host"} <= set(raw) else {}

    raw = await wait_for("telemetry in KV", telemetry)
    g0 = decode_sample(raw[f"{HOST}.gpu0"])
    assert isinstance(g0, GpuSample) and g0.name == "Sim GPU A" and g0.temp_c == 60 and g0.simulated
    h = decode_sample(raw[f"{HOST}.host"])
    assert isinstance(h, HostSample) and h.ram_total_mb > 0

    # live samples on core subjects
    got: list[bytes] = []

    async def on_sample(m: Any) -> None:
        got.append(m.data)

    sub = await bus.nc.subscribe(names.tel_gpu(HOST, 1), cb=on_sample)
    await wait_for("a live sample", lambda: asyncio.sleep(0, result=bool(got)))
    await sub.unsubscribe()
    assert decode_sample(got[0]).name == "Sim GPU B"  # type: ignore[union-attr]

    set_temp(sim, 86)

    async def raised() -> list[Any]:
        return [a for a in await alerts(mesh) if isinstance(a, AlertRaised)]

    first = (await wait_for("alert.raised", raised))[0]
    assert first.rule == "gpu_temp_warn" and first.target == f"{HOST}-gpu0" and first.value == 86

    # around the threshold: no flapping
    for temp in (84, 86, 84, 86, 84):
        set_temp(sim, temp)
        await asyncio.sleep(0.6)
    assert [(type(a).__name__, a.rule) for a in await alerts(mesh)] == [("AlertRaised", "gpu_temp_warn")]

    set_temp(sim, 79)

    async def resolved() -> list[Any]:
        return [a for a in await alerts(mesh) if isinstance(a, AlertResolved)]

    done = (await wait_for("alert.resolved", resolved))[0]
    assert done.rule == "gpu_temp_warn" and done.raised_at == first.at and done.value == 79

    # the webhook got both, as JSON
    await wait_for("webhook bodies", lambda: asyncio.sleep(0, result=len(hook.bodies) >= 2))
    assert [b["type"] for b in hook.bodies] == ["alert.raised", "alert.resolved"]
    assert hook.bodies[0]["target"] == f"{HOST}-gpu0" and "gpu_temp_warn" in hook.bodies[0]["text"]

    # mesh gpus, as a subprocess against the test server
    env = {**mesh.env, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "gpus"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "Sim GPU A" in proc.stdout and "Sim GPU B" in proc.stdout and HOST in proc.stdout
    assert "1000/24576" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "gpus", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["gpu"], r["name"], r["mem_total_mb"]) for r in rows] == [
        (f"{HOST}-gpu0", "Sim GPU A", 24576),
        (f"{HOST}-gpu1", "Sim GPU B", 12288),
    ]
    assert mesh.alive("watchdog")


async def test_watchdog_alerts_on_a_silent_agent_not_a_stopped_one(mesh: Mesh) -> None:
    cfg = mesh.tmp / "config" / "mesh" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    # (6 s: an agent that refreshes every second and is merely slow on a busy machine is not
    # silent; the killed one is, whatever the load)
    cfg.write_text("[alerts.agent_silent]\nabove = 6\n")
    mesh.env.update({"MESH_WATCHDOG_INTERVAL_S": "0.2", "MESH_DATA_DIR": str(mesh.tmp / "data")})
    mesh.start_agent("watchdog", "watchdog", "--host", HOST)
    mesh.start_agent("killed", "auditor")
    mesh.start_agent("stopped", "auditor")
    bus = await mesh.bus()

    async def registered() -> bool:
        raw = await read_bucket(await bus.agents_kv())
        return len(raw) == 3

    await wait_for("three agents registered", registered)
    await asyncio.sleep(1.5)  # the watchdog has seen them both
    mesh.kill("stopped", signal.SIGTERM)
    mesh.kill("killed", signal.SIGKILL)

    async def raised() -> list[Any]:
        return [a for a in await alerts(mesh) if isinstance(a, AlertRaised)]

    found = await wait_for("agent_silent", raised)
    await asyncio.sleep(2)
    found = await raised()
    killed_pid = mesh.procs["killed"].pid
    # one alert, for the killed agent (its id carries its pid), none for the stopped one
    said = [(a.rule, a.target) for a in found]
    assert len(found) == 1 and found[0].rule == "agent_silent", said
    assert f"-{killed_pid}-" in found[0].target, (killed_pid, said)


async def test_host_only_without_nvml_logs_once(mesh: Mesh) -> None:
    if nvml_present():
        pytest.skip("NVML works on this host")
    mesh.env.update({"MESH_WATCHDOG_INTERVAL_S": "0.1", "MESH_DATA_DIR": str(mesh.tmp / "data")})
    mesh.start_agent("watchdog", "watchdog", "--host", HOST)
    bus = await mesh.bus()

    async def host_sample() -> bool:
        try:
            raw = await read_bucket(await bus.telemetry_kv())
        except Exception:
            return False
        return f"{HOST}.host" in raw

    await wait_for("host telemetry", host_sample)
    await asyncio.sleep(1.0)  # several rounds
    assert mesh.alive("watchdog")
    log = mesh.log("watchdog")
    assert log.count("watching the host only") == 1, log
    raw = await read_bucket(await bus.telemetry_kv())
    assert set(raw) == {f"{HOST}.host"}
    mesh.kill("watchdog", signal.SIGTERM)
    assert mesh.procs["watchdog"].returncode == 0
    assert "Traceback" not in mesh.log("watchdog")


def test_no_nvml_here_gives_no_source() -> None:
    if os.environ.get("MESH_EXPECT_GPU"):
        pytest.skip("a GPU host")
    if nvml_present():
        pytest.skip("NVML works on this host")
    assert open_source(HOST) is None


# ---------------------------------------------------------------- rules over the mesh's state


def test_mesh_rules_queue_failures_and_idle_vram() -> None:
    engine = AlertEngine(build_rules({}))
    assert engine.mesh({"queue_depth": 5000.0}, "queue", "h", 0.0) == [], "deep, but not for 5 minutes yet"
    raised = engine.mesh({"queue_depth": 5000.0}, "queue", "h", 300.0)
    assert [(c.rule, c.kind) for c in raised] == [("queue_deep", "raised")]
    assert [(c.rule, c.kind) for c in engine.mesh({"queue_depth": 10.0}, "queue", "h", 301.0)] == [
        ("queue_deep", "resolved")
    ]
    assert engine.mesh({"class_failures": 2.0}, "class-cpu", "h", 0.0) == []
    assert [c.rule for c in engine.mesh({"class_failures": 3.0}, "class-cpu", "h", 1.0)] == ["task_failures"]
    assert engine.mesh({"idle_gpu_mem_mb": 3000.0}, "h-gpu0", "h", 0.0) == []
    assert [c.rule for c in engine.mesh({"idle_gpu_mem_mb": 3000.0}, "h-gpu0", "h", 300.0)] == ["idle_vram"]


@pytest.mark.integration
async def test_watchdog_alerts_on_deep_queues_failing_classes_and_memory_held_by_an_idle_gpu(
    mesh: Mesh, tmp_path: Path
) -> None:
    from mesh.host.telemetry import host_token

    sim = tmp_path / "gpus.json"
    write_simulated(sim, [{"name": "S", "temp_c": 50, "mem_total_mb": 8192, "mem_used_mb": 3000}])
    config = Path(mesh.env["XDG_CONFIG_HOME"]) / "mesh" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[alerts.queue_deep]\nabove = 3\nfor_s = 0\n\n[alerts.idle_vram]\nfor_s = 0\n")
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.3"})
    mesh.brain()
    mesh.worker("cpu", 2)
    # three failed attempts of a cpu task; four script tasks held back: the GPU is cordoned
    # before its worker starts (so it is never idle while this part of the test runs)
    subprocess.run(
        [sys.executable, "-m", "mesh", "gpu", "cordon", f"{host_token()}-gpu0"],
        env=mesh.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    mesh.start_agent("watchdog", "watchdog")
    text = "# t\n\n## Tasks\n\n### bad\n- retries: 2\n\n```shell\nexit 3\n```\n" + "".join(
        f"\n### s{i}\n- class: script\n\n```shell\ntrue\n```\n" for i in range(4)
    )
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "bad", "failed", 30)

    async def rules() -> set[tuple[str, str]]:
        history = await mesh.history((await mesh.bus()).names.alerts_all)
        return {(m.rule, m.target) for _, m in history if isinstance(m, AlertRaised)}

    deadline = time.monotonic() + 30
    want = {("task_failures", "class-cpu"), ("queue_deep", "queue")}
    while time.monotonic() < deadline and not want <= await rules():
        await asyncio.sleep(0.3)
    assert want <= await rules()
    # the GPU is cordoned, not idle: its memory is not "held by an idle GPU"
    assert ("idle_vram", f"{host_token()}-gpu0") not in await rules()
    subprocess.run(
        [sys.executable, "-m", "mesh", "gpu", "uncordon", f"{host_token()}-gpu0"],
        env=mesh.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    await mesh.wait_plan(plan_id, 30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ("idle_vram", f"{host_token()}-gpu0") not in await rules():
        await asyncio.sleep(0.3)
    assert ("idle_vram", f"{host_token()}-gpu0") in await rules(), "idle, with 3000 MB in use"


def test_every_nvml_call_mesh_makes_exists_in_the_installed_nvidia_ml_py() -> None:
    """NVML runs only where there is an NVIDIA GPU; this at least catches a misspelt or removed call."""
    import re

    import pynvml

    used: set[str] = set()
    for rel in ("mesh/host/telemetry.py", "mesh/host/gpu.py", "tools/gpu_check.py"):
        used |= set(re.findall(r"\b(nvml[A-Z][A-Za-z]+|NVML_[A-Z_]+)\b", (ROOT / rel).read_text()))
    assert {"nvmlInit", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature"} <= used
    assert sorted(n for n in used if not hasattr(pynvml, n)) == []


async def test_alerts_flushed_from_two_places_at_once_are_each_published_once_in_order(mesh: Mesh) -> None:
    """The watchdog flushes its unsent alerts after each tick and after each health check, and a
    health check runs beside the tick: two flushes at once must neither publish an alert twice nor
    drop one (nor fail on an empty queue)."""
    from agents.watchdog import Watchdog

    bus = await mesh.bus()
    watchdog = Watchdog(mesh.settings, host="flushhost")
    await watchdog.start()
    sent = [
        AlertRaised(
            rule="gpu_hot",
            target=f"flushhost-gpu{i}",
            host="flushhost",
            severity="warn",
            at=1000.0 + i,
            metric="gpu_temp_c",
            value=90.0,
            threshold=85.0,
            message=f"alert {i}",
        )
        for i in range(30)
    ]
    watchdog.unsent.extend(sent)
    try:
        await asyncio.gather(*(watchdog.flush_alerts() for _ in range(3)))
    finally:
        await watchdog.stop()
    assert watchdog.unsent == []
    stored = [m for _, m in await mesh.history(bus.names.alerts_all) if isinstance(m, AlertRaised)]
    assert [m.message for m in stored if m.host == "flushhost"] == [f"alert {i}" for i in range(30)]


async def test_memory_held_on_an_idle_set_is_raised_for_its_card(mesh: Mesh, tmp_path: Path) -> None:
    """A worker owning a set of cards reports one GPU state for the set; the watchdog samples each
    card. Memory held on a card of an idle set is raised under that card's id, as for a lone card."""
    from mesh.host.telemetry import host_token

    sim = tmp_path / "gpus.json"
    write_simulated(
        sim,
        [
            {"name": "S0", "temp_c": 50, "mem_total_mb": 6144, "mem_used_mb": 0},
            {"name": "S1", "temp_c": 50, "mem_total_mb": 6144, "mem_used_mb": 3000},
        ],
    )
    config = Path(mesh.env["XDG_CONFIG_HOME"]) / "mesh" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[alerts.idle_vram]\nfor_s = 0\n")
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.3"})
    mesh.worker("set", 1, "--gpu", "0,1", "--classes", "script")
    mesh.start_agent("watchdog", "watchdog")
    card = f"{host_token()}-gpu1"

    async def raised() -> bool:
        history = await mesh.history((await mesh.bus()).names.alerts_all)
        return any(
            isinstance(m, AlertRaised) and (m.rule, m.target) == ("idle_vram", card) for _, m in history
        )

    await until(raised, HANG_S, f"the idle_vram alert for {card}, a card of an idle set")
