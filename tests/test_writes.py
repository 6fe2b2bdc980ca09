"""Stored writes per task outside the history: the plan record is not rewritten in every brain
step of a running plan (`plan_record_s`), yet its end, and its counts soon after, are there."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import HANG_S, Mesh
from tests.faults import until

pytestmark = pytest.mark.integration


def chain(n: int, last: str = "```noop\n```") -> str:
    """A plan of n no-op tasks, each depending on the one before; `last` the last one's body."""
    lines = ["# chain", "", "## Tasks", ""]
    for i in range(n):
        lines += [f"### t{i}", "- retries: 0"]
        if i:
            lines.append(f"- depends_on: t{i - 1}")
        lines += [last if i == n - 1 else "```noop\n```", ""]
    return "\n".join(lines)


async def stored(mesh: Mesh, stream: str) -> int:
    """Messages ever stored in `stream` (its last sequence: a rewritten key counts each time)."""
    info = await (await mesh.bus()).js.stream_info(stream)
    return int(info.state.last_seq)


async def test_a_chain_writes_its_plan_record_far_less_than_once_per_task(mesh: Mesh) -> None:
    # held back longer than the chain can take: written at acceptance and at the end alone
    mesh.env["MESH_PLAN_RECORD_S"] = "600"
    mesh.brain()
    mesh.worker("w1")
    plans = f"KV_{mesh.settings.names.plans_bucket}"
    before = await stored(mesh, plans)
    plan_id = await mesh.submit_text(chain(50))
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    assert plan.counts == {"succeeded": 50}
    written = await stored(mesh, plans) - before
    # in every brain step (one per task in a chain) it was 51 or more
    assert written < 10, written
    # the final record came after its tasks' final records
    assert all(t.status == "succeeded" for t in (await mesh.tasks(plan_id)).values())


async def test_a_held_back_plan_record_is_written_without_further_steps(mesh: Mesh) -> None:
    """A running plan's counts reach KV after `plan_record_s` even when nothing else happens
    (the brain's tick writes them): here the first task's success while the second sleeps."""
    mesh.env["MESH_PLAN_RECORD_S"] = "0.5"
    mesh.brain()
    mesh.worker("w1")
    # the second task sleeps: the first's success is the last change before the end
    plan_id = await mesh.submit_text(chain(2, last="```shell\nsleep 600\n```"))

    async def first_done() -> bool:
        plan = await mesh.plan(plan_id)
        return plan is not None and plan.counts.get("succeeded") == 1

    await until(first_done, HANG_S, "the first task's success in the plan record")
    plan = await mesh.plan(plan_id)
    assert plan is not None and not plan.final
    assert plan.counts.get("running", 0) + plan.counts.get("ready", 0) == 1
    mesh.cli("cancel", plan_id)
    assert (await mesh.wait_plan(plan_id)).status == "cancelled"


async def test_a_brain_that_stops_writes_the_plan_records_it_held_back(mesh: Mesh) -> None:
    """Held back for longer than the test lasts, the plan record with the first task's success
    is written when the brain stops (SIGTERM), not left for the next brain to recount."""
    mesh.env["MESH_PLAN_RECORD_S"] = "600"
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(chain(2, last="```shell\nsleep 600\n```"))
    await mesh.wait_task(plan_id, "t1", "running")
    plan = await mesh.plan(plan_id)
    assert plan is not None and plan.counts.get("succeeded", 0) == 0, "held back while the brain runs"
    mesh.kill("brain", signal.SIGTERM)
    mesh._expected_dead.add("brain")
    plan = await mesh.plan(plan_id)
    assert plan is not None and plan.counts == {"succeeded": 1, "running": 1}, plan.counts
    mesh.brain("brain2")
    mesh.cli("cancel", plan_id)
    assert (await mesh.wait_plan(plan_id)).status == "cancelled"
