"""Packed work items on a real server (`mesh.packing`): short tasks released together travel in
one work item, each still run, reported and recorded once, and nothing is lost or run twice
when the worker running a pack is killed in the middle of it, or stops."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mesh.events import TaskSucceeded
from mesh.machine import replay
from tests.conftest import HANG_S, Mesh
from tests.faults import kill_leftover_bodies, until

pytestmark = pytest.mark.integration


def flat_plan(n: int, fence: str, body: str = "", title: str = "flat") -> str:
    lines = [f"# {title}", "", "## Tasks", ""]
    for i in range(n):
        lines += [f"### t{i}", "- retries: 0", f"```{fence}", body.replace("{I}", str(i)), "```", ""]
    return "\n".join(lines)


async def work_items(mesh: Mesh) -> int:
    """Work items stored so far (the work stream's last sequence: a purged item still counts)."""
    bus = await mesh.bus()
    info = await bus.js.stream_info(bus.names.work_stream)
    return info.state.last_seq


async def succeeded(mesh: Mesh, plan_id: str) -> list[str]:
    """The tasks of `plan_id` with a `task.succeeded` in the history, in its order."""
    history = await mesh.history()
    return [m.task_id for _, m in history if isinstance(m, TaskSucceeded) and m.plan_id == plan_id]


async def test_no_op_tasks_released_together_share_work_items(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker("w1", 4)
    plan_id = await mesh.submit_text(flat_plan(100, "noop"))
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("brain")[-3000:]
    # a work item carries up to 16 of them: the first release step alone packs 100 into 7
    assert await work_items(mesh) < 100
    done = await succeeded(mesh, plan_id)
    assert sorted(done) == sorted(f"t{i}" for i in range(100))  # each once
    history = [m for _, m in await mesh.history()]
    state = replay([m for m in history if m is not None])
    for task_id, rec in (await mesh.tasks(plan_id)).items():
        assert state.tasks[f"{plan_id}.{task_id}"].status == rec.status == "succeeded"


async def packed_with_a_hang(mesh: Mesh, tmp_path: Path, worker: list[str]) -> tuple[str, Path]:
    """A brain that packs shell tasks (any measured length, 8 released at a time) and a worker
    (`worker`: its name and arguments); a plan of 20 tasks, each appending its name to the file
    returned, whose t3 hangs in its first run. Returns once t3 hangs and the brain has the
    successes of t0-t2, which ran before it in the same pack."""
    mesh.start_agent("brain", "brain", env={"MESH_RELEASE_WINDOW": "8", "MESH_PACK_BELOW_S": "600"})
    mesh.worker(*worker)
    # the brain measures shell runs first: it packs only what it knows to be short
    warm = await mesh.submit_text(flat_plan(3, "shell", "true", title="warm"))
    assert (await mesh.wait_plan(warm)).status == "succeeded"
    before = await work_items(mesh)
    runs = tmp_path / "runs"
    mark = tmp_path / "t3-began"
    text = flat_plan(20, "shell", f"echo t{{I}} >> {runs}")
    hang = f"if [ ! -e {mark} ]; then touch {mark}; sleep 600; fi; echo t3 >> {runs}"
    text = text.replace(f"echo t3 >> {runs}", hang)
    plan_id = await mesh.submit_text(text)
    await until(mark.exists, HANG_S, "t3's first run to begin")
    # t0-t7 were released in one step, as one item (each success since released one more)
    assert runs.read_text().split() == ["t0", "t1", "t2"]
    assert f"running {plan_id}.t3 attempt 1 (delivery 1, 4 of a pack of 8)" in mesh.log(worker[0])
    assert await work_items(mesh) <= before + 1 + 3

    async def first_three() -> bool:
        return {"t0", "t1", "t2"} <= set(await succeeded(mesh, plan_id))

    await until(first_three, HANG_S, "the successes of t0-t2")
    return plan_id, runs


async def rerun_the_rest(mesh: Mesh, plan_id: str, runs: Path) -> None:
    """Another worker takes the pack again: the plan succeeds, every body having run to its end
    once, the tasks that ran before the hang skipped; one success each, replay equal to KV."""
    mesh.worker("w2", 2)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("brain")[-3000:]
    assert sorted(runs.read_text().split()) == sorted(f"t{i}" for i in range(20))
    assert f"skipping {plan_id}.t0 attempt 1: task is succeeded" in mesh.log("w2")
    done = await succeeded(mesh, plan_id)
    assert sorted(done) == sorted(f"t{i}" for i in range(20))
    history = [m for _, m in await mesh.history()]
    state = replay([m for m in history if m is not None])
    for task_id, rec in (await mesh.tasks(plan_id)).items():
        assert state.tasks[f"{plan_id}.{task_id}"].status == rec.status


@pytest.mark.slow
async def test_a_worker_killed_in_the_middle_of_a_pack_loses_nothing_and_runs_nothing_twice(
    mesh: Mesh, tmp_path: Path
) -> None:
    plan_id, runs = await packed_with_a_hang(mesh, tmp_path, ["w1", "1"])
    mesh.kill("w1")
    mesh._expected_dead.add("w1")
    kill_leftover_bodies(plan_id)
    await rerun_the_rest(mesh, plan_id, runs)


async def test_a_stopping_worker_hands_the_rest_of_its_pack_back(mesh: Mesh, tmp_path: Path) -> None:
    plan_id, runs = await packed_with_a_hang(mesh, tmp_path, ["w1", "1", "--drain-timeout", "1"])
    mesh.kill("w1", signal.SIGTERM)  # it waits a second for t3, then stops it and hands the pack back
    mesh._expected_dead.add("w1")
    await rerun_the_rest(mesh, plan_id, runs)


async def test_a_restarted_brain_queues_no_packed_task_a_second_time(mesh: Mesh, tmp_path: Path) -> None:
    """A brain starting queues again the item of each ready task the work stream holds none
    for: a task packed into another's item has no item of its own, and must not get one."""
    env = {"MESH_RELEASE_WINDOW": "8", "MESH_PACK_BELOW_S": "600"}
    mesh.start_agent("brain", "brain", env=env)
    mesh.worker("w1", 1)
    warm = await mesh.submit_text(flat_plan(3, "shell", "true", title="warm"))
    assert (await mesh.wait_plan(warm)).status == "succeeded"
    mesh.kill("w1", signal.SIGTERM)
    mesh._expected_dead.add("w1")
    before = await work_items(mesh)
    runs = tmp_path / "runs"
    plan_id = await mesh.submit_text(flat_plan(20, "shell", f"echo t{{I}} >> {runs}"))

    async def packed() -> bool:
        return await work_items(mesh) > before

    await until(packed, HANG_S, "the first 8 tasks' pack")
    assert await work_items(mesh) == before + 1
    mesh.kill("brain", signal.SIGTERM)
    mesh._expected_dead.add("brain")
    mesh.start_agent("brain2", "brain", env=env)
    await until(lambda: "ready tasks:" in mesh.log("brain2"), HANG_S, "the new brain's recovery")
    assert "8 ready tasks: 8 with a work item queued, 0 queued again" in mesh.log("brain2")
    assert await work_items(mesh) == before + 1
    mesh.worker("w2", 1)
    mesh.worker("w3", 1)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("brain2")[-3000:]
    assert sorted(runs.read_text().split()) == sorted(f"t{i}" for i in range(20))  # each once
