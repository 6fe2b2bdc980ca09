"""A chain runs on: a worker starts a task's dependent as the task succeeds (`WorkItem.then`),
the brain releases it to that worker from the report, and nothing is lost or run twice when
the worker dies in the middle of one, or stops."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mesh.events import (
    RunFinished,
    RunStarted,
    TaskFailed,
    TaskReleased,
    TaskRetrying,
    TaskStarted,
    TaskSucceeded,
)
from mesh.machine import replay
from tests.conftest import HANG_S, Mesh
from tests.faults import kill_leftover_bodies, until

pytestmark = pytest.mark.integration


def chain_plan(n: int, body: str, title: str = "chain") -> str:
    lines = [f"# {title}", "", "## Tasks", ""]
    for i in range(n):
        lines.append(f"### t{i}")
        lines.append("- retries: 0")
        if i:
            lines.append(f"- depends_on: t{i - 1}")
        lines += ["```shell", body.replace("{I}", str(i)), "```", ""]
    return "\n".join(lines)


async def test_a_chain_continues_on_the_worker_that_ran_the_task_before(mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "order"
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(chain_plan(12, f"echo {{I}} >> {out}"))
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("brain")
    assert out.read_text().split() == [str(i) for i in range(12)]
    history = [m for _, m in await mesh.history()]
    released = [m for m in history if isinstance(m, TaskReleased) and m.plan_id == plan_id]
    continued = [m for m in released if m.worker]
    # every task but the first of each stretch of `continue_depth` (8) continued
    assert {m.task_id for m in continued} == {f"t{i}" for i in range(1, 12)} - {"t9"}
    assert len({m.worker for m in continued}) == 1
    # each continued task's start is an event of its own, right after its release
    started = {m.task_id for m in history if isinstance(m, TaskStarted) and m.plan_id == plan_id}
    assert {m.task_id for m in continued} <= started
    # its worker sent no run.started for it: the report of the task before said it
    assert not {m.task_id for m in history if isinstance(m, RunStarted)} & {m.task_id for m in continued}
    saying = {m.then for m in history if isinstance(m, RunFinished) and m.then}
    assert saying == {m.task_id for m in continued}
    # one success each, and replay gives what the brain wrote
    succeeded = [m.task_id for m in history if isinstance(m, TaskSucceeded) and m.plan_id == plan_id]
    assert sorted(succeeded) == sorted(f"t{i}" for i in range(12))
    state = replay([m for m in history if m is not None])
    tasks = await mesh.tasks(plan_id)
    for key, rec in tasks.items():
        assert state.tasks[f"{plan_id}.{key}"].status == rec.status == "succeeded"


async def continued_t1(mesh: Mesh, tmp_path: Path, n: int) -> tuple[str, Path, str]:
    """A chain of `n` tasks whose t1 hangs in its first run (continued on the only worker, from
    t0) and ends at once in the next; each task appends its name to the returned file. Returns
    once t1 runs, continued: the plan, that file, and t1's worker."""
    runs = tmp_path / "runs"
    mark = tmp_path / "t1-began"
    bodies = {1: f"if [ ! -e {mark} ]; then touch {mark}; sleep 600; fi; echo t1 >> {runs}"}
    text = chain_plan(n, "{I}")
    for i in range(n):
        text = text.replace(f"```shell\n{i}\n```", f"```shell\n{bodies.get(i, f'echo t{i} >> {runs}')}\n```")
    plan_id = await mesh.submit_text(text)
    await until(mark.exists, HANG_S, "t1's first run to begin")
    t1 = await mesh.wait_task(plan_id, "t1", "running")
    assert t1.continued
    return plan_id, runs, t1.worker


async def rerun_elsewhere(mesh: Mesh, plan_id: str, runs: Path, n: int, worker: str) -> list[object]:
    """Start another worker; the plan succeeds, each task having run to its end once, t1
    released to `worker` and then queued again (the same attempt); the history is returned."""
    mesh.worker("w2")
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("brain")[-3000:]
    assert runs.read_text().split() == [f"t{i}" for i in range(n)]
    history = [m for _, m in await mesh.history()]
    releases = [(m.attempt, m.worker) for m in history if isinstance(m, TaskReleased) and m.task_id == "t1"]
    assert releases == [(1, worker), (1, "")]
    assert [m.task_id for m in history if isinstance(m, TaskSucceeded)] == [f"t{i}" for i in range(n)]
    assert not [m for m in history if isinstance(m, TaskFailed | TaskRetrying)]
    state = replay([m for m in history if m is not None])
    for task_id, rec in (await mesh.tasks(plan_id)).items():
        assert state.tasks[f"{plan_id}.{task_id}"].status == rec.status
    return history


@pytest.mark.slow
async def test_a_continued_task_whose_worker_is_killed_runs_again_elsewhere_once(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.brain()
    mesh.worker("w1")
    plan_id, runs, worker = await continued_t1(mesh, tmp_path, 3)
    mesh.kill("w1")
    mesh._expected_dead.add("w1")
    kill_leftover_bodies(plan_id)  # (should w1 have left its body behind)
    # queued again once w1's registration is gone, and run on w2
    await rerun_elsewhere(mesh, plan_id, runs, 3, worker)


async def test_a_continued_task_its_stopping_worker_gives_back_runs_again_elsewhere(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.brain()
    mesh.worker("w1", 2, "--drain-timeout", "1")
    plan_id, runs, worker = await continued_t1(mesh, tmp_path, 2)
    mesh.kill("w1", signal.SIGTERM)  # it waits a second for t1, then stops it and gives it back
    mesh._expected_dead.add("w1")
    # queued again (from the report of the stopped run, or its worker's registration gone)
    await mesh.wait_task(plan_id, "t1", "ready", timeout_s=HANG_S)
    await rerun_elsewhere(mesh, plan_id, runs, 2, worker)
