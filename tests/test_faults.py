"""Fault injection: real agent processes and a real nats-server, killed with SIGKILL mid-run.

Each test kills something for real (a worker, the brain, the server), lets the
mesh recover by itself, then checks the outcome, the recorded history, and
that folding the history still gives back exactly what is in KV.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from mesh.events import (
    TaskRedelivered,
    TaskReleased,
    TaskRetrying,
    TaskSpec,
)
from mesh.history import replay as replay_history
from mesh.history import verify
from tests.conftest import Mesh
from tests.faults import (
    append_id,
    configure,
    kill_leftover_bodies,
    log_count,
    name_of,
    pid_of,
    plan,
    runs,
    task,
    until,
)

pytestmark = pytest.mark.integration


async def assert_history_matches_kv(mesh: Mesh) -> None:
    bus = await mesh.bus()
    result = await replay_history(bus)
    check = await verify(bus, result)
    assert check.tasks and check.plans
    assert not check.differences, "\n".join(str(d) for d in check.differences[:20])


# ------------------------------------------------------------------ 1. a worker dies mid-task


async def test_worker_killed_mid_task_is_redelivered_to_the_other_worker(mesh: Mesh, tmp_path: Path) -> None:
    configure(mesh, ack_wait_s=2)
    mesh.brain()
    mesh.worker("a", slots=1)
    mesh.worker("b", slots=1)
    marks = tmp_path / "marks"
    body = (
        f'echo "start $MESH_TASK_ID $MESH_ATTEMPT $PPID $(date +%s.%N)" >> {marks}; '
        f'sleep 3; echo "end $MESH_TASK_ID $MESH_ATTEMPT $PPID $(date +%s.%N)" >> {marks}'
    )
    plan_id = await mesh.submit(plan("Worker dies", [task("slow", body, retries=0)], tmp_path))
    try:
        rec = await mesh.wait_task(plan_id, "slow", "running")
        first = name_of(mesh, rec.worker)
        other = "b" if first == "a" else "a"
        await until(lambda: marks.exists() and "start" in marks.read_text(), 10, "the body to start")
        mesh._expected_dead.add(first)
        killed_at = time.time()
        mesh.kill(first)
        done = await mesh.wait_plan(plan_id, timeout_s=30)
        assert done.status == "succeeded"
        lines = [line.split() for line in marks.read_text().splitlines()]
        starts = [(int(ppid), float(at)) for kind, _tid, attempt, ppid, at in lines if kind == "start"]
        assert all(attempt == "1" for _, _, attempt, _, _ in lines), lines
        assert [ppid for ppid, _ in starts] == [mesh.procs[first].pid, mesh.procs[other].pid], starts
        assert starts[1][1] >= killed_at, "a second copy started while the first worker was alive"
        print(f"\nredelivered {starts[1][1] - killed_at:.2f}s after the kill (ack_wait 2s)")
        history = [m for _, m in await mesh.history((await mesh.bus()).names.plan_filter(plan_id))]
        redelivered = [m for m in history if isinstance(m, TaskRedelivered)]
        assert len(redelivered) == 1, redelivered
        ev = redelivered[0]
        assert name_of(mesh, ev.worker) == other and name_of(mesh, ev.previous_worker) == first
        assert ev.attempt == 1 and ev.delivery == 2
        assert not [m for m in history if isinstance(m, TaskRetrying)]
        rec = (await mesh.tasks(plan_id))["slow"]
        assert rec.attempt == 1 and rec.deliveries == 2 and name_of(mesh, rec.worker) == other
        assert pid_of(rec.worker) == mesh.procs[other].pid
        await assert_history_matches_kv(mesh)
    finally:
        kill_leftover_bodies(plan_id)


# ------------------------------------------------------------------ 2. the brain dies, again and again


def fan_out_plan(out: Path, gate: Path, rng: random.Random) -> list[TaskSpec]:
    """60 quick tasks: a root, 3 stages of 18 with 1-2 dependencies each, a gate and a fan-in.

    The gate holds the fan-in until the test opens it, so the plan cannot end early.
    """
    body = append_id(out)
    tasks = [task("root", body)]
    for s in range(3):
        for i in range(18):
            if s == 0:
                deps = ["root"]
            else:
                deps = [f"s{s - 1}-{j}" for j in sorted(rng.sample(range(18), rng.choice((1, 2))))]
            tasks.append(task(f"s{s}-{i}", f"sleep 0.{rng.randint(2, 6)}; {body}", *deps))
    wait = f"for _ in $(seq 1200); do [ -e {gate} ] && break; sleep 0.1; done; [ -e {gate} ] && {body}"
    tasks.append(task("gate", wait, "root"))
    tasks.append(task("join", body, "gate", *(f"s2-{i}" for i in range(18))))
    return tasks


async def test_brain_killed_at_random_points(mesh: Mesh, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    configure(mesh, lease_s=3)
    mesh.brain()
    mesh.worker("w1")
    mesh.worker("w2")
    out = tmp_path / "ran"
    gate = tmp_path / "gate"
    tasks = fan_out_plan(out, gate, rng)
    plan_id = await mesh.submit(plan("Brain dies", tasks, tmp_path))
    mesh._expected_dead.add("brain")
    began = time.monotonic()
    kills = 0
    for _ in range(4):
        await until(lambda: log_count(mesh, "brain", "took the brain lease") > kills, 30, "a brain to lead")
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        mesh.kill("brain")
        kills += 1
        mesh.brain()
    gate.touch()
    done = await mesh.wait_plan(plan_id, timeout_s=120)
    print(f"{kills} brain kills; plan final in {time.monotonic() - began:.1f}s")
    assert done.status == "succeeded"
    ran = runs(out)
    assert set(ran) == {t.id for t in tasks}
    assert [k for k, n in ran.items() if n > 1] == [], "workers never died: every body runs once"
    history = await mesh.history()
    released = Counter((m.task_id, m.attempt) for _, m in history if isinstance(m, TaskReleased))
    assert max(released.values()) == 1, [k for k, n in released.items() if n > 1]
    assert all(rec.attempt == 1 for rec in (await mesh.tasks(plan_id)).values())
    await assert_history_matches_kv(mesh)
