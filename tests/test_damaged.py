"""Damaged records: a value in the tasks or plans bucket that does not decode.

Readers (`mesh status`, `mesh top`, `mesh replay --verify`) show it as damaged and carry on;
the brain, on start, sets it aside as a dead letter and writes the record the history gives
over it, or leaves it out when the history no longer holds it.
"""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import msgspec
import pytest
from rich.console import Console

from mesh.bus.history import dead_letters, replay
from mesh.cli.render import tasks_table
from mesh.cli.top import Snapshot, build
from mesh.records import Damaged, PlanRecord, TaskRecord, decode_plan, decode_task
from tests.conftest import Mesh
from tests.faults import log_count, logged, plan, run_mesh, task, until

NOT_JSON = b"\x00\xff{not a record"
WRONG_SHAPE = b'{"plan_id": 5, "title": ["no"]}'


def test_views_show_a_damaged_record() -> None:
    bad_plan = Damaged(bucket="mesh-plans", key="p1", size=9, error="JSON is malformed")
    bad_task = Damaged(bucket="mesh-tasks", key="p1.t2", size=4, error="Expected `object`")
    console = Console(width=160, record=True, color_system=None)
    console.print(tasks_table(bad_plan, [], damaged=[bad_task]))
    console.print(build(Snapshot(at=time.time(), damaged=[bad_plan, bad_task])))
    text = console.export_text()
    assert "p1 — plan record damaged: unreadable record (9 bytes): JSON is malformed" in text
    assert "t2" in text and "Expected `object`" in text
    assert "2 damaged records" in text
    assert "damaged mesh-plans p1" in text and "damaged mesh-tasks p1.t2" in text


@pytest.mark.integration
async def test_brain_quarantines_and_rebuilds_damaged_records(mesh: Mesh, tmp_path: Path) -> None:
    mesh.env["COLUMNS"] = "200"  # the CLI's tables, unwrapped
    mesh.brain()
    mesh.worker("w", slots=2)
    spec = plan("Damage", [task("a", "true"), task("b", "echo b", "a"), task("c", "echo c", "a")], tmp_path)
    plan_id = await mesh.submit(spec)
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    mesh._expected_dead.add("brain")
    mesh.kill("brain", sig=signal.SIGTERM)
    bus = await mesh.bus()
    names = bus.names
    tasks_kv, plans_kv = await bus.tasks_kv(), await bus.plans_kv()
    before_b = decode_task((await tasks_kv.get(f"{plan_id}.b")).value or b"")
    await tasks_kv.put(f"{plan_id}.b", NOT_JSON)
    await plans_kv.put(plan_id, WRONG_SHAPE)
    # a plan and a task no history has ever had: they cannot be rebuilt
    await plans_kv.put("ghost-0000", NOT_JSON)
    await tasks_kv.put("ghost-0000.t1", NOT_JSON)

    # readers show the damage and keep going
    listing = run_mesh(mesh, "status", "--json")
    assert listing.returncode == 0, listing.stderr
    assert '"damaged"' in listing.stdout and plan_id in listing.stdout
    shown = run_mesh(mesh, "status", plan_id)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr + shown.stdout
    assert "plan record damaged" in shown.stdout and "damaged" in shown.stdout
    assert "record(s) cannot be read" in shown.stderr
    top = run_mesh(mesh, "top", "--once")
    assert top.returncode == 0, top.stderr
    assert "damaged records" in top.stdout
    verify = run_mesh(mesh, "replay", "--verify")
    assert verify.returncode == 1 and "Traceback" not in verify.stderr + verify.stdout
    assert "a damaged record" in verify.stdout

    # the brain comes back up, quarantines each, and rebuilds what the history holds
    mesh.brain("brain2")
    await until(logged(mesh, "brain2", "took the brain lease"), 30, "the new brain to lead")
    await until(logged(mesh, "brain2", "rebuilt from the history", more_than=1), 30, "the rebuilds")
    await until(logged(mesh, "brain2", "left out"), 30, "the key with no history")
    replayed = (await replay(bus, plan_id=plan_id)).state

    async def restored() -> tuple[TaskRecord, PlanRecord] | None:
        try:
            rec = decode_task((await tasks_kv.get(f"{plan_id}.b")).value or b"")
            pl = decode_plan((await plans_kv.get(plan_id)).value or b"")
        except msgspec.DecodeError:
            return None
        return rec, pl

    rec, pl = await until(restored, 30, "the records written back")
    assert rec == replayed.tasks[f"{plan_id}.b"] == before_b
    assert pl == replayed.plans[plan_id]
    assert pl.status == "succeeded" and pl.counts.get("succeeded") == 3

    letters = {d.key: d for d in await dead_letters(bus) if d.bucket}
    assert set(letters) == {f"{plan_id}.b", plan_id, "ghost-0000", "ghost-0000.t1"}, letters
    assert letters[f"{plan_id}.b"].bucket == names.tasks_bucket
    assert letters[plan_id].bucket == names.plans_bucket
    assert base64.b64decode(letters[f"{plan_id}.b"].payload) == NOT_JSON
    assert letters[plan_id].size == len(WRONG_SHAPE)
    assert "rebuilt from the history" in letters[plan_id].reason
    assert "left out" in letters["ghost-0000"].reason and "left out" in letters["ghost-0000.t1"].reason
    # said once per damaged key
    assert log_count(mesh, "brain2", "unreadable task record") == 2
    assert log_count(mesh, "brain2", "unreadable plan record") == 2

    # what could not be rebuilt is still shown as damaged; the brain works on
    listing = run_mesh(mesh, "status")
    assert listing.returncode == 0, listing.stderr
    assert "ghost-0000" in listing.stdout and "damaged" in listing.stdout
    ghost = run_mesh(mesh, "status", "ghost-0000")
    assert ghost.returncode == 0, ghost.stderr
    assert "plan record damaged" in ghost.stdout and "t1" in ghost.stdout
    top = run_mesh(mesh, "top", "--once")
    assert top.returncode == 0, top.stderr
    assert "2 damaged records" in top.stdout
    again = await mesh.submit(plan("After", [task("x", "true")], tmp_path))
    assert (await mesh.wait_plan(again)).status == "succeeded"
    assert mesh.alive("brain2")
