"""A released task's `ready` record is held back until the brain's next checkpoint
(agents/brain_commit.py `_hold_ready`): a short task's next record is written in its place, one
write fewer per task; a task left queued gets its `ready` record with the checkpoint; a brain
killed with records held leaves nothing behind that its successor does not repair."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agents.brain_commit import CHECKPOINT_KEY
from mesh.records import decode_checkpoint
from tests.conftest import Mesh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench import make_plan  # noqa: E402

CHAIN = 40


async def _task_writes(mesh: Mesh) -> int:
    bus = await mesh.bus()
    info = await bus.js.stream_info(f"KV_{bus.names.tasks_bucket}")
    return int(info.state.last_seq)


async def test_a_chain_writes_no_ready_records(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker(slots=2)
    await mesh.bus()
    before = await _task_writes(mesh)
    plan_id = await mesh.submit_text(make_plan(CHAIN, "noop", chain=True))
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    writes = await _task_writes(mesh) - before
    # every record written pending at acceptance and final at the end; `ready` only for the
    # first task (released in the acceptance step) and for any task still queued at a
    # checkpoint (a second apart: a few at most). Without holding them back: 3 per task.
    assert 2 * CHAIN <= writes < 2.5 * CHAIN, writes
    assert all(t.status == "succeeded" for t in (await mesh.tasks(plan_id)).values())
    done = mesh.run_cli("replay", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr


PLAN = """# held

## Tasks

### first
```noop
```

### second
- class: script
- depends_on: first
```noop
```
"""


async def test_a_queued_task_gets_its_ready_record_and_survives_a_brain_kill(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker("cpu-worker", 1)  # takes cpu tasks only: `second` stays queued
    plan_id = await mesh.submit_text(PLAN)
    # released after `first` succeeded, in a later step than the plan's acceptance: held, then
    # written with the next checkpoint
    rec = await mesh.wait_task(plan_id, "second", "ready")
    assert rec.attempt == 1
    mesh.kill("brain")
    mesh._expected_dead.add("brain")
    mesh.brain("brain2")
    mesh.worker("script-worker", 1, "--classes", "script")
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    tasks = await mesh.tasks(plan_id)
    assert tasks["second"].attempt == 1  # the queued item ran: no second release
    done = mesh.run_cli("replay", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr


async def test_a_brain_killed_with_ready_records_held_repairs_them(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker("cpu-worker", 1)
    bus = await mesh.bus()
    brain_kv = await bus.brain_kv()
    plan_id = await mesh.submit_text(PLAN)
    await mesh.wait_task(plan_id, "first", "succeeded")
    last = await bus.js.get_last_msg(
        bus.names.events_stream, bus.names.task_event(plan_id, "second", "released")
    )
    released_seq = last.seq
    # the first checkpoint written after the release: while `second`'s record is held back, it
    # must stay before the release, or a brain starting from it would never release `second`
    before = (await brain_kv.get(CHECKPOINT_KEY)).revision
    while (entry := await brain_kv.get(CHECKPOINT_KEY)).revision == before:
        await asyncio.sleep(0.05)
    checkpoint = decode_checkpoint(entry.value or b"")
    if (await mesh.raw_tasks())[f"{plan_id}.second"].status != "ready":
        assert checkpoint.seq < released_seq
    mesh.kill("brain")
    mesh._expected_dead.add("brain")
    mesh.brain("brain2")
    rec = await mesh.wait_task(plan_id, "second", "ready")
    assert rec.attempt == 1
    mesh.worker("script-worker", 1, "--classes", "script")
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    done = mesh.run_cli("replay", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
