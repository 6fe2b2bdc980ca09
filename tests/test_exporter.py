"""The Prometheus exporter against a real mesh (nats-server, brain, worker, a watchdog with simulated
GPUs), scraped over HTTP; and the Grafana dashboard, whose queries must name what it serves."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.bus.route import route
from mesh.events import GpuState, RunFinished, encode
from mesh.host.telemetry import write_simulated
from tests.conftest import ROOT, Mesh
from tests.faults import until

pytestmark = pytest.mark.integration

HOST = "testhost"
DASHBOARD = ROOT / "tools" / "grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
        return text


async def scrape(port: int) -> Samples:
    text = await asyncio.to_thread(scrape_text, port)
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    want = set(labels.items())
    found = [v for (n, lab), v in samples.items() if n == metric and want <= lab]
    return sum(found) if found else None


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float = 30.0) -> Any:
    return await until(check, timeout_s, what)


def set_gpus(path: Path, temp: float) -> None:
    write_simulated(
        path,
        [
            {"name": "Sim GPU A", "temp_c": temp, "util_pct": 40, "mem_used_mb": 1000, "mem_total_mb": 24576},
            {"name": "Sim GPU B", "temp_c": 45, "util_pct": 0, "mem_used_mb": 0, "mem_total_mb": 12288},
        ],
    )


PLAN = """\
# exporter plan

## Tasks

### a
```shell
echo a
```

### b
- depends_on: a
```shell
sleep 0.2
```

### c
```shell
echo c
```
"""


def dashboard_metrics() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names |= set(re.findall(r"\bmesh_[a-z0-9_]+", target["expr"]))
    return names


def test_dashboard_shape() -> None:
    board = json.loads(DASHBOARD.read_text())
    for key in ("__inputs", "panels", "schemaVersion", "title", "uid"):
        assert key in board, key
    assert board["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    assert len(board["panels"]) >= 8
    for panel in board["panels"]:
        assert {"type", "title", "targets", "gridPos"} <= set(panel), panel.get("title")
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    assert "mesh_task_duration_seconds_bucket" in dashboard_metrics()


async def test_exporter_serves_telemetry_states_tasks_durations_and_alerts(mesh: Mesh) -> None:
    sim = mesh.tmp / "gpus.json"
    set_gpus(sim, 86)  # gpu_temp_warn fires at 85
    port = free_port()
    mesh.env.update(
        {
            "MESH_SIMULATED_GPUS": str(sim),
            "MESH_WATCHDOG_INTERVAL_S": "0.2",
            "MESH_DATA_DIR": str(mesh.tmp / "data"),
        }
    )
    mesh.start_agent("watchdog", "watchdog", "--host", HOST)
    mesh.brain()
    mesh.worker()
    mesh.start_agent("exporter", "exporter", "--port", str(port))

    async def serving() -> bool:
        if not mesh.alive("exporter"):
            raise AssertionError(mesh.log("exporter"))
        try:
            await scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    await wait_for("the exporter answering", serving)
    bus = await mesh.bus()
    gpu0 = f"{HOST}-gpu0"
    state = GpuState(gpu=gpu0, worker="w1", host=HOST, state="llm_ready", at=time.time(), index=0, running=1)
    await (await bus.gpus_kv()).put(gpu0, encode(state))

    plan_id = await mesh.submit_text(PLAN)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"

    async def settled() -> Samples | None:
        s = await scrape(port)
        ok = (
            value(s, "mesh_tasks", state="succeeded", **{"class": "cpu"}) == 3
            and value(s, "mesh_task_duration_seconds_count", **{"class": "cpu", "kind": "shell"}) == 3
            and value(s, "mesh_gpu_temperature_celsius", gpu=gpu0) == 86
            and value(s, "mesh_alert_firing", rule="gpu_temp_warn", target=gpu0) == 1
        )
        return s if ok else None

    s = await wait_for("the plan, the GPU and the alert in the metrics", settled)
    assert value(s, "mesh_gpu_temperature_celsius", host=HOST, gpu=f"{HOST}-gpu1") == 45
    assert value(s, "mesh_gpu_utilization_percent", gpu=gpu0) == 40
    assert value(s, "mesh_gpu_memory_used_bytes", gpu=gpu0) == 1000 * 1024 * 1024
    assert value(s, "mesh_gpu_memory_total_bytes", gpu=gpu0) == 24576 * 1024 * 1024
    assert value(s, "mesh_gpu_info", gpu=gpu0, name="Sim GPU A", index="0") == 1
    assert value(s, "mesh_host_memory_total_bytes", host=HOST)
    assert value(s, "mesh_gpu_state", gpu=gpu0, state="llm_ready") == 1
    assert value(s, "mesh_gpu_state", gpu=gpu0, state="idle") == 0
    assert value(s, "mesh_gpu_running_tasks", gpu=gpu0) == 1
    assert value(s, "mesh_tasks", state="waiting") == 0
    assert value(s, "mesh_tasks", state="failed", **{"class": "cpu"}) == 0
    assert value(s, "mesh_queue_depth", **{"class": "cpu"}) == 0
    assert value(s, "mesh_plans", state="succeeded") == 1
    assert value(s, "mesh_runs_total", outcome="ok") == 3
    assert value(s, "mesh_task_duration_seconds_sum") >= 0.2  # type: ignore[operator]
    assert value(s, "mesh_task_duration_seconds_bucket", le="+Inf") == 3
    assert value(s, "mesh_exporter_read_errors") == 0

    # a prompt task's throughput (the event a GPU worker would publish; no model runs here)
    run = RunFinished(
        plan_id=plan_id,
        task_id="p",
        attempt=1,
        worker="w1",
        at=time.time(),
        ok=True,
        duration_s=2.0,
        model="gemma",
        gpu=gpu0,
        metrics={"tokens_per_s": 42.0},
    )
    subject, msg_id = route(bus.names, run)
    await bus.publish(subject, run, msg_id)

    async def tokens() -> Samples | None:
        s = await scrape(port)
        return s if value(s, "mesh_prompt_tokens_per_second_count", model="gemma") == 1 else None

    s = await wait_for("tokens/s", tokens)
    assert value(s, "mesh_prompt_tokens_per_second_sum", model="gemma") == 42
    # a task the exporter has no record of is counted under class/kind "unknown"
    assert value(s, "mesh_task_duration_seconds_count", **{"class": "unknown"}) == 1

    # every metric the dashboard queries is served
    served = {name for name, _ in s}
    missing = dashboard_metrics() - served
    assert not missing, f"the dashboard queries metrics the exporter does not serve: {missing}"

    # the alert resolves
    set_gpus(sim, 79)

    async def resolved() -> bool:
        s = await scrape(port)
        return value(s, "mesh_alert_firing", rule="gpu_temp_warn", target=gpu0) == 0

    await wait_for("the alert resolved", resolved)
    assert mesh.alive("exporter"), mesh.log("exporter")

    # a clean stop: the HTTP server goes with it
    mesh.kill("exporter", signal.SIGTERM)
    assert mesh.procs["exporter"].returncode == 0, mesh.log("exporter")
    assert "Traceback" not in mesh.log("exporter"), mesh.log("exporter")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await scrape(port)


async def test_task_counts_come_from_the_plan_records(mesh: Mesh) -> None:
    """`mesh_tasks` adds up each plan record's counts by class and state: a plan record saying a
    million tasks wait, with none of their task records in the bucket, is counted whole (an
    exporter tallying every task record would count none, and keep a million entries)."""
    from mesh.records import PlanRecord, encode_record

    bus = await mesh.bus()
    big = PlanRecord(
        plan_id="big-1205000000-abcd",
        title="big",
        total=1_000_001,
        counts={"waiting": 1_000_000, "running": 1},
        by_class={"cpu": {"waiting": 1_000_000}, "llm": {"running": 1}},
    )
    await (await bus.plans_kv()).put(big.plan_id, encode_record(big))
    port = free_port()
    mesh.start_agent("exporter", "exporter", "--port", str(port))

    async def counted() -> Samples | None:
        if not mesh.alive("exporter"):
            raise AssertionError(mesh.log("exporter"))
        try:
            s = await scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return None
        return s if value(s, "mesh_tasks", state="waiting", **{"class": "cpu"}) else None

    s = await wait_for("the plan's tasks counted", counted)
    assert value(s, "mesh_tasks", state="waiting", **{"class": "cpu"}) == 1_000_000
    assert value(s, "mesh_tasks", state="running", **{"class": "llm"}) == 1
    assert value(s, "mesh_queue_depth", **{"class": "cpu"}) == 1_000_000
    assert value(s, "mesh_plans", state="running") == 1
