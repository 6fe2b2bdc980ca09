"""The brain's snapshot: pages written where records changed, read back whole, and a restarted
brain that loads it (or, when it is damaged, reads KV instead) with nothing lost or run twice."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import msgspec
import pytest

from mesh.bus.snapshot import read_head
from mesh.events import TaskSpec
from mesh.machine_state import State
from mesh.records import PlanRecord, TaskRecord
from mesh.snapshot import (
    PAGE,
    PLANS,
    SnapshotError,
    Snapshots,
    chunk_key,
    decode_head,
    decode_page,
    encode_head,
    page_keys,
)
from tests.conftest import HANG_S, Mesh
from tests.faults import append_id, configure, logged, plan, runs, task, until
from tests.test_faults import assert_history_matches_kv


def _state(*plans: tuple[str, int]) -> State:
    tasks, records = [], []
    for plan_id, n in plans:
        records.append(PlanRecord(plan_id=plan_id, title=plan_id, status="running", total=n))
        for i in range(n):
            tid = f"t{i}"
            tasks.append(
                TaskRecord(plan_id=plan_id, task_id=tid, spec=TaskSpec(id=tid, body=f"echo {i}"), index=i)
            )
    return State.load(tasks, records)


def _joined(built_puts: list[tuple[str, bytes]], ref_name: str, slot: str, chunks: int) -> bytes:
    values = dict(built_puts)
    return b"".join(values[chunk_key(ref_name, slot, k)] for k in range(chunks))


def test_a_first_snapshot_holds_every_record_and_reads_back_equal() -> None:
    state = _state(("plan-a", 2 * PAGE + 7), ("plan-b", 3))
    snaps = Snapshots()
    snaps.touch_all(state)
    built = snaps.build(state, seq=42, at=1.0, brain="b1", max_chunk=64 * 1024)
    head = decode_head(encode_head(built.head))
    assert head.seq == 42 and head.tasks == 2 * PAGE + 10 and head.plans == 2
    assert [r.name for r in head.pages] == ["plan-a.0", "plan-a.1", "plan-a.2", "plan-b.0", PLANS]
    assert built.encoded == 2 * PAGE + 10
    read: list[TaskRecord] = []
    for ref in head.pages[:-1]:
        records = decode_page(ref, _joined(built.puts, ref.name, ref.slot, ref.chunks))
        read.extend(r for r in records if isinstance(r, TaskRecord))
    assert read == [state.tasks[k] for p in ("plan-a", "plan-b") for k in state.plan_keys[p]]
    plans = decode_page(
        head.pages[-1], _joined(built.puts, PLANS, head.pages[-1].slot, head.pages[-1].chunks)
    )
    assert plans == list(state.plans.values())


def test_a_page_too_big_for_one_message_is_cut_in_chunks() -> None:
    state = _state(("plan-a", 300))
    snaps = Snapshots()
    snaps.touch_all(state)
    built = snaps.build(state, seq=1, at=1.0, brain="b1", max_chunk=100)
    ref = built.head.pages[0]
    assert ref.chunks > 3
    assert all(len(v) <= 100 for _, v in built.puts)
    assert len(decode_page(ref, _joined(built.puts, ref.name, ref.slot, ref.chunks))) == 300


def test_a_later_snapshot_writes_only_the_pages_that_changed_into_their_other_slot() -> None:
    state = _state(("plan-a", 3 * PAGE))
    snaps = Snapshots()
    snaps.touch_all(state)
    first = snaps.build(state, seq=10, at=1.0, brain="b1", max_chunk=1 << 20)
    snaps.written(first)
    assert not snaps.dirty and snaps.writes == 0
    rec = state.tasks[state.plan_keys["plan-a"][PAGE + 5]]
    rec.status = "succeeded"
    snaps.touch([rec], plans=False)
    second = snaps.build(state, seq=20, at=2.0, brain="b1", max_chunk=1 << 20)
    assert second.encoded == PAGE  # page 1 alone
    assert {k for k, _ in second.puts} == {chunk_key("plan-a.1", "b", 0)}
    old = {r.name: r for r in first.head.pages}
    new = {r.name: r for r in second.head.pages}
    assert new["plan-a.0"] == old["plan-a.0"] and new["plan-a.2"] == old["plan-a.2"]
    assert new["plan-a.1"].slot == "b" and old["plan-a.1"].slot == "a"
    page = decode_page(new["plan-a.1"], _joined(second.puts, "plan-a.1", "b", 1))
    assert isinstance(page[5], TaskRecord) and page[5].status == "succeeded"
    snaps.written(second)
    # a third write of the same page goes back to slot a: the head before it names b
    snaps.touch([rec], plans=False)
    third = snaps.build(state, seq=30, at=3.0, brain="b1", max_chunk=1 << 20)
    assert {k for k, _ in third.puts} == {chunk_key("plan-a.1", "a", 0)}


def test_pages_of_a_plan_that_is_gone_are_purged_from_both_slots() -> None:
    state = _state(("plan-a", 10), ("plan-b", 10))
    snaps = Snapshots()
    snaps.touch_all(state)
    snaps.written(snaps.build(state, seq=1, at=1.0, brain="b1", max_chunk=1 << 20))
    rec = state.tasks[state.plan_keys["plan-b"][0]]
    snaps.touch([rec], plans=False)
    snaps.written(snaps.build(state, seq=2, at=1.0, brain="b1", max_chunk=1 << 20))  # plan-b.0 in both slots
    state.forget_plan("plan-b")
    snaps.touch([], plans=True)
    built = snaps.build(state, seq=3, at=1.0, brain="b1", max_chunk=1 << 20)
    assert sorted(built.purges) == [chunk_key("plan-b.0", "a", 0), chunk_key("plan-b.0", "b", 0)]
    assert "plan-b.0" not in {r.name for r in built.head.pages}


def test_a_plan_whose_indexes_are_not_its_places_is_written_whole_every_time() -> None:
    state = _state(("plan-a", 20))
    # a record lost from KV: the indexes after it no longer match their places
    key = state.plan_keys["plan-a"][3]
    keys = state.plan_keys["plan-a"]
    keys.remove(key)
    del state.tasks[key]
    snaps = Snapshots()
    snaps.touch_all(state)
    snaps.written(snaps.build(state, seq=1, at=1.0, brain="b1", max_chunk=1 << 20))
    snaps.touch([], plans=True)  # nothing of plan-a touched
    built = snaps.build(state, seq=2, at=1.0, brain="b1", max_chunk=1 << 20)
    assert built.encoded == 19


def test_a_snapshot_is_due_once_its_writes_pay_for_it() -> None:
    state = _state(("plan-a", 4 * PAGE))
    snaps = Snapshots()
    snaps.touch_all(state)
    snaps.written(snaps.build(state, seq=1, at=1.0, brain="b1", max_chunk=1 << 20))
    recs = [state.tasks[k] for k in state.plan_keys["plan-a"]]
    snaps.touch(recs[:10], plans=False)
    assert not snaps.due(state, min_tasks=0, every=100)  # too few writes
    snaps.touch(recs[10:1000], plans=False)
    assert not snaps.due(state, min_tasks=0, every=100)  # 1,000 writes, a page of 5,000 to encode
    snaps.touch(recs[1000 : PAGE // 4], plans=False)
    assert snaps.due(state, min_tasks=0, every=100)  # a fourth of what it encodes
    assert not snaps.due(state, min_tasks=len(state.tasks) + 1, every=100)  # too small a state
    # with a write on each of the other pages, all four are to be encoded
    snaps.touch([recs[PAGE], recs[2 * PAGE], recs[3 * PAGE], recs[3 * PAGE + 1]], plans=False)
    assert not snaps.due(state, min_tasks=0, every=100)


def test_a_damaged_page_or_head_is_refused() -> None:
    state = _state(("plan-a", 50))
    snaps = Snapshots()
    snaps.touch_all(state)
    built = snaps.build(state, seq=1, at=1.0, brain="b1", max_chunk=1 << 20)
    ref = built.head.pages[0]
    data = _joined(built.puts, ref.name, ref.slot, ref.chunks)
    with pytest.raises(SnapshotError, match="checksum"):
        decode_page(ref, data[:-1] + bytes([data[-1] ^ 1]))
    # bytes that match the checksum but are not a page (a head naming the wrong bytes)
    other = zlib.compress(b"not a page")
    forged = msgspec.structs.replace(ref, sha256=hashlib.sha256(other).hexdigest())
    with pytest.raises(SnapshotError, match="does not decode"):
        decode_page(forged, other)
    with pytest.raises(SnapshotError, match="head does not decode"):
        decode_head(b"garbage")
    assert page_keys(ref) == [chunk_key(ref.name, "a", 0)]


# ------------------------------------------------------------------ a brain restarted on it


def _gated_plan(out: Path, gate: Path, quick: int, held: int) -> list[TaskSpec]:
    wait = f"while [ ! -e {gate} ]; do sleep 0.05; done; "
    tasks = [task(f"q{i:03d}", append_id(out)) for i in range(quick)]
    tasks += [task(f"h{i:03d}", wait + append_id(out)) for i in range(held)]
    tasks.append(task("last", append_id(out), *(f"h{i:03d}" for i in range(held))))
    return tasks


async def _restart_on(mesh: Mesh, tmp_path: Path, damage: bool) -> tuple[str, str, list[TaskSpec]]:
    """A plan half done when its brain is killed (after it wrote a snapshot), then a second
    brain, on the snapshot as it is or with one of its pages damaged."""
    configure(mesh, lease_s=3, snapshot_min_tasks=0, snapshot_writes=10)
    mesh.brain("a")
    mesh.worker("w1", slots=4)
    out, gate = tmp_path / "ran", tmp_path / "gate"
    tasks = _gated_plan(out, gate, quick=40, held=8)
    plan_id = await mesh.submit(plan("Snapshot", tasks, tmp_path))
    try:
        await until(lambda: len(runs(out)) >= 40, HANG_S, "the quick tasks to run")
        await until(logged(mesh, "a", "wrote a snapshot at"), HANG_S, "a snapshot")
        mesh._expected_dead.add("a")
        mesh.kill("a")
        kv = await (await mesh.bus()).brain_kv()
        head = await read_head(kv)
        assert head is not None and head.tasks == len(tasks)
        if damage:
            ref = head.pages[0]
            await kv.put(chunk_key(ref.name, ref.slot, 0), b"damaged")
        mesh.brain("b")
        await until(logged(mesh, "b", "took the brain lease"), HANG_S, "brain b to lead")
        gate.touch()
        done = await mesh.wait_plan(plan_id)
        assert done.status == "succeeded"
    finally:
        gate.touch()
    assert runs(out) == {t.id: 1 for t in tasks}, "every task ran once"
    await assert_history_matches_kv(mesh)
    return plan_id, mesh.log("b"), tasks


@pytest.mark.integration
async def test_a_brain_killed_mid_plan_restarts_from_its_snapshot(mesh: Mesh, tmp_path: Path) -> None:
    _, log, _ = await _restart_on(mesh, tmp_path, damage=False)
    assert "from the snapshot at" in log, log[-3000:]


@pytest.mark.integration
async def test_a_damaged_snapshot_is_not_used_and_the_records_come_from_kv(
    mesh: Mesh, tmp_path: Path
) -> None:
    _, log, tasks = await _restart_on(mesh, tmp_path, damage=True)
    assert "cannot be used: page" in log and "from KV" in log, log[-3000:]
    # and the brain that read KV wrote a whole snapshot again, which reads back whole
    await until(logged(mesh, "b", "wrote a snapshot at"), HANG_S, "a new snapshot")
    kv = await (await mesh.bus()).brain_kv()
    head = await read_head(kv)
    assert head is not None and head.tasks == len(tasks)
