"""`mesh top`: the frame built from a hand-made snapshot (pure), then `mesh top --once` as a
subprocess against a real server, brain and worker."""

from __future__ import annotations

import subprocess
import sys
import time

from rich.console import Console

from mesh.bus import client
from mesh.cli.top import EventFold, GpuView, Snapshot, build, count_tasks
from mesh.events import AlertRaised, AlertResolved, GpuState, RunStarted, TaskStarted, TaskSucceeded
from mesh.samples import GpuSample, encode_sample
from tests.conftest import ROOT, Mesh
from tests.faults import until

HOLD = "thermal pause: 90 °C >= 87 °C; resumes below 80 °C"


def snapshot() -> Snapshot:
    states = {
        "rig1-gpu0": GpuState(
            gpu="rig1-gpu0", worker="w-gpu0", host="rig1", state="paused", at=1.0, index=0, hold=HOLD
        ),
        "rig1-gpu1": GpuState(
            gpu="rig1-gpu1",
            worker="w-gpu1",
            host="rig1",
            state="llm_busy",
            at=1.0,
            index=1,
            llm="gemma3-270m",
            running=1,
        ),
    }
    samples = {
        "rig1-gpu0": GpuSample(
            host="rig1",
            index=0,
            name="Sim A",
            at=1.0,
            temp_c=91,
            util_pct=3,
            mem_used_mb=512,
            mem_total_mb=24576,
        ),
        "rig1-gpu1": GpuSample(
            host="rig1",
            index=1,
            name="Sim B",
            at=1.0,
            temp_c=64,
            util_pct=97,
            mem_used_mb=9000,
            mem_total_mb=12288,
        ),
    }
    now = time.time()
    recent = [
        (
            "mesh.evt.run.p1.draft.started.w",
            RunStarted(plan_id="p1", task_id="draft", attempt=1, worker="w", at=now),
        ),
        (
            "mesh.evt.task.p1.draft.started",
            TaskStarted(plan_id="p1", task_id="draft", attempt=1, worker="w", at=now),
        ),
        (
            "mesh.evt.task.p1.fetch.succeeded",
            TaskSucceeded(plan_id="p1", task_id="fetch", attempt=1, worker="w", at=now, duration_s=1.5),
        ),
    ]
    alert = AlertRaised(
        rule="gpu_temp_critical",
        target="rig1-gpu0",
        host="rig1",
        severity="critical",
        at=now,
        message="CRITICAL gpu_temp_critical on rig1-gpu0: gpu_temp_c 91°C (threshold 90°C)",
    )
    return Snapshot(
        at=now,
        gpus=GpuView(states=states, samples=samples),
        queue={"llm": {"waiting": 7, "ready": 2, "running": 1}, "cpu": {"pending": 4, "ready": 3}},
        running={"w-gpu1": ["p1.draft"]},
        recent=recent,
        alerts=[alert],
    )


def test_frame_shows_gpus_queues_events_and_alerts() -> None:
    console = Console(record=True, width=160)
    console.print(build(snapshot()))
    text = console.export_text()
    for expected in (
        "rig1-gpu0",
        "rig1-gpu1",
        "paused",
        HOLD,
        "llm_busy",
        "gemma3-270m",
        "91",
        "64",
        "512/24576",
        "9000/12288",
        "p1.draft",  # what rig1-gpu1's worker runs
        "task.succeeded  p1.fetch",
        "gpu_temp_critical rig1-gpu0",
        "alerts firing: 1",
        "12 queued, 1 running",
    ):
        assert expected in text, (expected, text)
    llm = next(line for line in text.splitlines() if line.startswith("│ llm "))
    assert llm.split()[1:6] == ["llm", "0", "7", "2", "1"]
    cpu = next(line for line in text.splitlines() if line.startswith("│ cpu "))
    assert cpu.split()[1:6] == ["cpu", "4", "0", "3", "0"]


def test_full_screen_layout_fits_its_height() -> None:
    console = Console(record=True, width=160, height=40)
    console.print(build(snapshot(), height=40))
    text = console.export_text()
    assert len(text.splitlines()) == 40
    assert HOLD in text and "gemma3-270m" in text and "p1.fetch" in text and "gpu_temp_critical" in text


def test_fold_keeps_the_last_events_and_the_alerts_still_firing() -> None:
    fold = EventFold(keep=3)
    raised = {
        rule: AlertRaised(rule=rule, target="h-gpu0", host="h", severity="warn", at=float(i))
        for i, rule in enumerate(("gpu_temp_warn", "gpu_temp_critical"))
    }
    for alert in raised.values():
        fold.add(f"mesh.evt.alert.{alert.rule}.raised", alert)
    fold.add(
        "mesh.evt.alert.gpu_temp_critical.resolved",
        AlertResolved(rule="gpu_temp_critical", target="h-gpu0", host="h", severity="warn", at=3.0),
    )
    for i in range(5):
        fold.add(
            f"mesh.evt.task.p.t{i}.started",
            TaskStarted(plan_id="p", task_id=f"t{i}", attempt=1, worker="w", at=i),
        )
    assert fold.alerts() == [raised["gpu_temp_warn"]]
    assert [subject.split(".")[4] for subject, _ in fold.recent] == ["t2", "t3", "t4"]


def test_count_tasks_by_class_and_worker() -> None:
    from mesh.events import TaskSpec
    from mesh.records import TaskRecord

    def rec(task: str, cls: str, status: str, worker: str = "") -> TaskRecord:
        spec = TaskSpec(id=task, body="true", cls=cls)  # type: ignore[arg-type]
        return TaskRecord(plan_id="p", task_id=task, spec=spec, status=status, worker=worker)

    queue, running = count_tasks(
        [
            rec("a", "cpu", "waiting"),
            rec("b", "cpu", "ready"),
            rec("c", "cpu", "running", "w1"),
            rec("d", "llm", "running", "w2"),
            rec("e", "llm", "succeeded", "w2"),
        ]
    )
    assert queue == {"cpu": {"waiting": 1, "ready": 1, "running": 1}, "llm": {"running": 1}}
    assert running == {"w1": ["p.c"], "w2": ["p.d"]}


PLAN = """# Top

## Tasks

### quick
```shell
echo hi
```

### slow
- depends_on: quick
```shell
sleep 30
```
"""


async def test_mesh_top_once_against_a_running_mesh(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker("w1")
    bus = await mesh.bus()
    plan_id = await mesh.submit_text(PLAN)
    await mesh.wait_task(plan_id, "quick", "succeeded")
    slow = await mesh.wait_task(plan_id, "slow", "running")

    # a GPU as its watchdog and its worker would file it (the test host has none to offer)
    sample = GpuSample(
        host="toptest",
        index=0,
        name="Sim GPU Z",
        at=time.time(),
        temp_c=77,
        util_pct=55,
        mem_used_mb=1234,
        mem_total_mb=24576,
        simulated=True,
    )
    await (await bus.telemetry_kv()).put("toptest.gpu0", encode_sample(sample))
    state = GpuState(
        gpu="toptest-gpu0",
        worker=slow.worker,
        host="toptest",
        state="script_busy",
        at=time.time(),
        index=0,
        running=1,
    )
    from mesh.events import encode

    await (await bus.gpus_kv()).put("toptest-gpu0", encode(state))

    # which task a worker runs comes from its registration, refreshed every second here
    async def registered() -> bool:
        return any(f"{plan_id}.slow" in a.running for a in await client.read_agents(bus))

    await until(registered, 15, "the worker's registration listing the slow task")
    await bus.emit(
        AlertRaised(
            rule="gpu_temp_warn",
            target="toptest-gpu0",
            host="toptest",
            severity="warn",
            at=time.time(),
            value=77,
        )
    )

    env = {**mesh.env, "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "top", "--once"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    gpu_line = next(
        (line for line in text.splitlines() if "toptest-gpu0" in line and "Sim GPU Z" in line), ""
    )
    assert gpu_line, text
    for expected in ("script_busy", "77", "55", "1234/24576", f"{plan_id}.slow"):
        assert expected in gpu_line, (expected, text)
    assert f"task.succeeded  {plan_id}.quick" in text, text
    assert f"task.started    {plan_id}.slow" in text, text
    assert "alerts firing: 1" in text and "gpu_temp_warn toptest-gpu0" in text, text
    assert "0 queued, 1 running" in text, text


def test_a_fetching_gpu_shows_the_model_and_how_much_arrived() -> None:
    snap = snapshot()
    snap.gpus.states["rig1-gpu1"] = GpuState(
        gpu="rig1-gpu1", worker="w", host="rig1", state="fetching", at=0.0, fetching="big-llm", progress=0.42
    )
    console = Console(record=True, width=160)
    console.print(build(snap))
    assert "fetching big-llm 42%" in console.export_text()


async def test_queues_come_from_the_plan_records_not_from_every_task(mesh: Mesh) -> None:
    """`mesh top` draws its queues from each plan record's counts by class: a plan record saying
    a million tasks wait, with none of their task records in the bucket, shows them all (a
    frame that read every task record would show none). Its running tasks come from the
    workers' registrations."""
    from mesh.cli.top import read_tasks
    from mesh.records import AgentRecord, PlanRecord, encode_record

    bus = await mesh.bus()
    big = PlanRecord(
        plan_id="big-1205000000-abcd",
        title="big",
        total=1_000_003,
        counts={"waiting": 1_000_000, "running": 2, "succeeded": 1},
        by_class={"cpu": {"waiting": 1_000_000, "running": 1, "succeeded": 1}, "llm": {"running": 1}},
    )
    done = PlanRecord(
        plan_id="done-1205000000-abcd", title="done", status="succeeded", by_class={"cpu": {"ready": 5}}
    )
    for plan in (big, done):
        await (await bus.plans_kv()).put(plan.plan_id, encode_record(plan))
    worker = AgentRecord(
        agent_id="w9", role="worker", host="h", pid=1, started_at=0, seen_at=0, running=[f"{big.plan_id}.t7"]
    )
    await (await bus.agents_kv()).put("w9", encode_record(worker))
    queue, running, damaged = await read_tasks(bus)
    assert queue == {"cpu": {"waiting": 1_000_000, "running": 1}, "llm": {"running": 1}}
    assert running == {"w9": [f"{big.plan_id}.t7"]}
    assert damaged == []
