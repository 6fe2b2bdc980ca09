"""How a worker reports a run, and how the brain's commit reaches workers.

A first delivery's `run.started` is held back `start_report_after_s`: a task that
ends sooner reports its start in `run.finished` (`started_at`), and the brain
records both transitions from that one report. The brain writes task records and
work items in one round trip, so a worker can meet an item whose record is not
written yet: it looks again later instead of dropping the item.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from mesh import events, work
from mesh.bus.publish import ATOMIC_ID, ATOMIC_MIN, PIPELINE_CHUNK
from mesh.bus.workstream import queued
from mesh.events import RunFinished, RunStarted, TaskSpec, TaskStarted, TaskSucceeded, WorkItem
from mesh.machine import replay
from mesh.names import kv_subject
from mesh.records import (
    PENDING,
    READY,
    RUNNING,
    SUCCEEDED,
    AgentRecord,
    TaskRecord,
    decode_task,
    encode_record,
)
from tests.conftest import Mesh
from tests.test_machine import one_per_transition

pytestmark = pytest.mark.integration

PLAN = """# Reports

## Tasks

### quick
```noop
```

### slow
```shell
sleep 4
```

### after
- depends_on: quick, slow
```noop
```
"""


def by_task(history: list[events.Message | None], kind: type) -> dict[str, list[events.Message]]:
    out: dict[str, list[events.Message]] = {}
    for m in history:
        if isinstance(m, kind):
            out.setdefault(m.task_id, []).append(m)  # type: ignore[attr-defined]
    return out


async def run_plan(mesh: Mesh) -> list[events.Message | None]:
    """Run PLAN on a brain and one worker; its history."""
    mesh.brain()
    mesh.worker("w1", slots=2)
    plan_id = await mesh.submit_text(PLAN)
    assert (await mesh.wait_plan(plan_id)).status == SUCCEEDED
    bus = await mesh.bus()
    return [m for _, m in await mesh.history(bus.names.plan_filter(plan_id))]


async def test_a_short_task_reports_its_start_with_its_end(mesh: Mesh) -> None:
    # held back 1.5 s here, not the default's 20 ms: a no-op on a busy machine outlasted 20 ms
    # (and reported its start on its own); the four-second task still outlasts the hold
    mesh.env["MESH_START_REPORT_AFTER_S"] = "1.5"
    msgs = await run_plan(mesh)
    started = by_task(msgs, RunStarted)
    finished = by_task(msgs, RunFinished)
    # the no-op tasks ended before their start was due: one report each, carrying the start
    assert "quick" not in started and "after" not in started
    for task in ("quick", "after"):
        (fin,) = finished[task]
        assert isinstance(fin, RunFinished)
        assert 0 < fin.started_at <= fin.at
    # the four-second task reported its start while it ran, and its end says the same start
    (start,) = started["slow"]
    (fin,) = finished["slow"]
    assert isinstance(start, RunStarted) and isinstance(fin, RunFinished)
    assert fin.started_at == start.at and fin.at - start.at >= 4
    assert msgs.index(start) < msgs.index(fin)
    # every task still has its start transition, before its success: the slow one's an event
    # of its own, the quick ones' carried by their success; and the history folds into
    # exactly what KV holds
    for task in ("quick", "slow", "after"):
        kinds = [type(m) for m in msgs if getattr(m, "task_id", None) == task]
        expanded = [type(m) for m in one_per_transition(msgs) if getattr(m, "task_id", None) == task]
        assert expanded.index(TaskStarted) < expanded.index(TaskSucceeded), (task, expanded)
        assert (TaskStarted in kinds) == (task == "slow"), (task, kinds)
    state = replay([m for m in msgs if m is not None])
    kv = await mesh.raw_tasks()
    for key, rec in state.tasks.items():
        assert kv[key] == rec
        assert rec.worker and rec.started_at > 0


async def test_start_reports_can_go_out_at_once(mesh: Mesh) -> None:
    mesh.env["MESH_START_REPORT_AFTER_S"] = "0"
    msgs = await run_plan(mesh)
    started = by_task(msgs, RunStarted)
    assert sorted(started) == ["after", "quick", "slow"]
    for task, (fin,) in by_task(msgs, RunFinished).items():
        assert isinstance(fin, RunFinished)
        assert fin.started_at == started[task][0].at  # type: ignore[attr-defined]


async def test_records_and_work_items_go_out_in_one_round_trip(mesh: Mesh) -> None:
    bus = await mesh.bus()
    names = bus.names
    recs = [
        TaskRecord(plan_id="p9", task_id=f"t{i}", spec=TaskSpec(id=f"t{i}", body="true"), status=READY)
        for i in range(3)
    ]
    items = [WorkItem(plan_id="p9", task_id=f"t{i}", attempt=1) for i in range(3)]
    acks = await bus.kv_put_many(((names.tasks_bucket, r.key, encode_record(r)) for r in recs), items)
    assert [a.stream for a in acks] == [names.work_stream] * 3
    assert len({a.seq for a in acks}) == 3
    kv = await bus.tasks_kv()
    for r in recs:
        entry = await kv.get(r.key)
        assert decode_task(entry.value or b"").status == READY
    # nothing to write but work: the items alone; and nothing at all
    more = await bus.kv_put_many([], [WorkItem(plan_id="p9", task_id="t9", attempt=1)])
    assert len(more) == 1 and more[0].seq > max(a.seq for a in acks)
    assert await bus.kv_put_many([]) == []


async def test_work_items_do_not_wait_on_the_records_of_a_big_step(mesh: Mesh) -> None:
    """A big plan's acceptance writes a record for every task, a pipeline chunk at a time; the
    work items of the tasks it releases go out ahead of the first chunk, so workers start on
    them while the rest of the records are written."""
    bus = await mesh.bus()
    names = bus.names
    n = 2 * PIPELINE_CHUNK + 1
    recs = [
        TaskRecord(plan_id="p8", task_id=f"t{i}", spec=TaskSpec(id=f"t{i}", body="true"), status=PENDING)
        for i in range(n)
    ]
    items = [WorkItem(plan_id="p8", task_id=f"t{i}", attempt=1) for i in range(3)]
    heard: list[str] = []  # what the server passed on, in the order this connection sent it

    async def hear(raw: Any) -> None:
        if raw.subject.startswith(names.work_prefix):
            heard.append("item")
        elif raw.subject.startswith(kv_subject(names.tasks_bucket, "p8.")):
            heard.append("record")

    sub = await bus.nc.subscribe(">", cb=hear)
    await bus.nc.flush()
    acks = await bus.kv_put_many(((names.tasks_bucket, r.key, encode_record(r)) for r in recs), items)
    assert [a.stream for a in acks] == [names.work_stream] * 3
    for item, ack in zip(items, acks, strict=True):
        assert events.decode((await bus.js.get_msg(names.work_stream, ack.seq)).data or b"") == item
    deadline = time.monotonic() + 30
    while len(heard) < n + len(items):
        assert time.monotonic() < deadline, len(heard)
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert heard[: len(items)] == ["item"] * len(items), heard[:10]
    kv = await bus.tasks_kv()
    assert decode_task((await kv.get(f"p8.t{n - 1}")).value or b"").status == PENDING


async def test_an_item_met_before_its_record_is_run_once_the_record_is_there(
    mesh: Mesh, tmp_path: Path
) -> None:
    """A brain that died between writing a work item and its task record (they go out together)
    leaves the item queued with no record: a worker must not drop it."""
    bus = await mesh.bus()
    names = bus.names
    out = tmp_path / "ran"
    spec = TaskSpec(id="late", body=f"echo ran >> {out}")
    item = WorkItem(plan_id="p8", task_id="late", attempt=1, body=spec.body, workdir=str(tmp_path))
    await bus.emit(item)
    await asyncio.sleep(2.5)  # queued past FRESH_S: the worker checks the record first
    mesh.worker("w1")
    log_deadline = time.monotonic() + 30
    while "no record of p8.late" not in mesh.log("w1"):
        assert time.monotonic() < log_deadline, mesh.log("w1")
        await asyncio.sleep(0.1)
    assert not out.exists()
    # the record arrives (the next brain repairs it from the history): the item runs, once
    rec = TaskRecord(plan_id="p8", task_id="late", spec=spec, status=READY, attempt=1)
    await (await bus.tasks_kv()).put(rec.key, encode_record(rec))
    while not out.exists():
        assert time.monotonic() < log_deadline, mesh.log("w1")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert out.read_text() == "ran\n"
    reports = [m for _, m in await mesh.history(names.run_events("p8", "late"))]
    # offered again (a redelivery), so its start was reported at once
    assert [type(m) for m in reports] == [RunStarted, RunFinished]
    assert isinstance(reports[0], RunStarted) and reports[0].delivery >= 2


async def test_a_burst_worker_runs_what_is_queued_and_returns_when_idle(mesh: Mesh, tmp_path: Path) -> None:
    """`Worker.run_burst`: a worker in this process claims everything queued for it, runs it in
    its slots, reports it, and returns once nothing is left."""
    from agents.worker import Worker

    bus = await mesh.bus()
    items = [
        WorkItem(
            plan_id="p5", task_id=f"t{i}", attempt=1, body=f"sleep 0.{i % 3}; echo {i}", workdir=str(tmp_path)
        )
        for i in range(5)
    ]
    await bus.emit_many(items)
    worker = Worker(mesh.settings, agent_id="w-burst", slots=2)
    await worker.run_burst()
    assert worker.stop_requested.is_set() and not worker.running_keys()
    done = [m for _, m in await mesh.history(bus.names.plan_filter("p5")) if isinstance(m, RunFinished)]
    assert sorted((m.task_id, m.ok, m.stdout_tail) for m in done) == [
        (f"t{i}", True, f"{i}\n") for i in range(5)
    ]
    assert all(m.worker == "w-burst" for m in done)
    # every item was acknowledged: none is queued (the brain purges them; there is none here)
    assert await queued(bus.js, bus.names.work_stream) == 0


async def test_a_record_behind_its_item_runs_it_and_a_record_past_it_skips_it(mesh: Mesh) -> None:
    """The worker's check of a suspect item against its task's record, on a real bucket: a
    burst-mode worker takes items that sat in the queue past `FRESH_S`."""
    from agents.worker import Worker

    bus = await mesh.bus()
    kv = await bus.tasks_kv()
    # task -> its record's (status, attempt, worker); None: no record (yet)
    records: dict[str, tuple[str, int, str] | None] = {
        "none": None,  # not written yet: offered again later
        "behind": (PENDING, 1, ""),  # the release of attempt 2 not written yet: runs
        "ready": (READY, 2, ""),  # runs
        "past": (READY, 3, ""),  # the brain moved past this attempt: skipped
        "done": (SUCCEEDED, 2, ""),  # skipped
        "live": (RUNNING, 2, "w-live"),  # a live worker runs this attempt: no second copy
        "gone": (RUNNING, 2, "w-gone"),  # its worker is gone: this one takes over
    }
    for task, rec in records.items():
        if rec is not None:
            status, attempt, owner = rec
            spec = TaskSpec(id=task, body="")
            record = TaskRecord(
                plan_id="p7", task_id=task, spec=spec, status=status, attempt=attempt, worker=owner
            )
            await kv.put(record.key, encode_record(record))
    now = time.time()
    live = AgentRecord(agent_id="w-live", role="worker", host="h", pid=1, started_at=now, seen_at=now)
    await (await bus.agents_kv()).put("w-live", encode_record(live))
    await bus.emit_many([WorkItem(plan_id="p7", task_id=task, attempt=2, kind="noop") for task in records])
    await asyncio.sleep(work.FRESH_S + 0.5)  # queued past FRESH_S: each is checked first

    async def ran() -> set[str]:
        history = await mesh.history(bus.names.plan_filter("p7"))
        return {m.task_id for _, m in history if isinstance(m, RunFinished)}

    await Worker(mesh.settings, agent_id="w-check").run_burst()
    assert await ran() == {"behind", "ready", "gone"}
    # only the item with no record is still queued, offered again after LATER_S
    assert await queued(bus.js, bus.names.work_stream) == 1
    # its record arrives (the next brain repairs it from the history): the item runs
    rec = TaskRecord(plan_id="p7", task_id="none", spec=TaskSpec(id="none", body=""), status=READY, attempt=2)
    await kv.put(rec.key, encode_record(rec))
    await asyncio.sleep(work.LATER_S + 0.5)
    await Worker(mesh.settings, agent_id="w-check").run_burst()
    assert await ran() == {"behind", "ready", "gone", "none"}
    assert await queued(bus.js, bus.names.work_stream) == 0


async def test_a_pipelined_batch_returns_acks_in_order_and_raises_what_the_server_refuses(mesh: Mesh) -> None:
    bus = await mesh.bus()
    names = bus.names
    work = [WorkItem(plan_id="p6", task_id=f"t{i}", attempt=1) for i in range(50)]
    acks = await bus.emit_many(work)
    assert [a.seq for a in acks] == sorted(a.seq for a in acks) and len({a.seq for a in acks}) == 50
    # the same facts again: stored once, acknowledged as duplicates at the same sequences
    again = await bus.emit_many(work)
    assert [a.seq for a in again] == [a.seq for a in acks] and all(a.duplicate for a in again)
    # a write the stream refuses fails the batch with the server's error
    bad = [(names.work("cpu"), b"x", {"Nats-Expected-Last-Sequence": "1"})]
    with pytest.raises(nats.js.errors.APIError):
        await bus._pipelined(bad)
    # a subject no stream takes: nobody answers
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await bus._pipelined([("nowhere.at.all", b"x", {})])
    # and the bus still works afterwards
    assert len(await bus.emit_many(work[:1])) == 1


async def stored_reports(mesh: Mesh, plan_id: str) -> list[tuple[events.Message | None, str | None]]:
    """Every stored report on a plan's tasks, in stream order, with its atomic batch's id."""
    bus = await mesh.bus()
    stream = bus.names.events_stream
    state = (await bus.js.stream_info(stream)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1):
        stored = await bus.js.get_msg(stream, seq)
        if (stored.subject or "").startswith(bus.names.run_events(plan_id).removesuffix("*.*.*")):
            out.append((events.decode(stored.data or b""), (stored.headers or {}).get(ATOMIC_ID)))
    return out


async def test_reports_handed_in_together_go_out_in_one_write_in_order_each_stored_once(mesh: Mesh) -> None:
    """A worker's outbox (`agents/worker_reports.py`): reports handed in while none is going out,
    or while one is, go out together, with `ATOMIC_MIN` or more as one atomic batch, in the order
    handed in (a task's start before its end); a lone report goes alone; reports sent again (a
    write a server restart cut short) are stored once."""
    from agents.worker import Worker

    worker = Worker(mesh.settings, agent_id="w-out", slots=2)
    await worker.start()
    try:
        items, outbox = worker.items, worker.items.outbox
        n = 2 * ATOMIC_MIN
        started = [
            RunStarted(plan_id="p4", task_id=f"t{i}", attempt=1, worker="w-out", at=1.0) for i in range(n)
        ]
        finished = [
            RunFinished(
                plan_id="p4", task_id=f"t{i}", attempt=1, worker="w-out", at=2.0, ok=True, duration_s=1.0
            )
            for i in range(n)
        ]
        # each task's start, then its end, handed in by as many runs ending at once
        await asyncio.gather(*(items.emit(ev) for pair in zip(started, finished, strict=True) for ev in pair))
        assert (outbox.writes, outbox.sent) == (1, 2 * n)
        stored = await stored_reports(mesh, "p4")
        assert [m for m, _ in stored] == [ev for pair in zip(started, finished, strict=True) for ev in pair]
        assert len({batch for _, batch in stored}) == 1 and stored[0][1], "one atomic batch"

        # one report alone goes at once, alone
        lone = RunFinished(
            plan_id="p4", task_id="lone", attempt=1, worker="w-out", at=3.0, ok=True, duration_s=0
        )
        await items.emit(lone)
        assert (outbox.writes, outbox.sent) == (2, 2 * n + 1)
        assert (await stored_reports(mesh, "p4"))[-1] == (lone, None)

        # the same reports again, and a batch's beside them: each stored once
        await asyncio.gather(items.emit_many(finished), *(items.emit(ev) for ev in started), items.emit(lone))
        assert len(await stored_reports(mesh, "p4")) == 2 * n + 1
    finally:
        await worker.stop()


async def test_a_busy_worker_reports_every_run_once_each_before_its_acknowledgement(mesh: Mesh) -> None:
    """Many short runs in many slots end together and their reports go out together: every one
    is stored once, and the worker acknowledges no item before its report is out (seen on the
    wire: one subscription hears the worker's reports and acknowledgements in the order sent)."""
    from agents.worker import Worker

    bus = await mesh.bus()
    names = bus.names
    n = 60
    items = [WorkItem(plan_id="p3", task_id=f"t{i}", attempt=1, kind="noop") for i in range(n)]
    acks = await bus.emit_many(items)
    task_of_seq = {ack.seq: item.task_id for item, ack in zip(items, acks, strict=True)}
    heard: list[tuple[str, str]] = []  # (what, task) in the order the server passed them on

    async def hear(raw: Any) -> None:
        if raw.subject.startswith(f"$JS.ACK.{names.work_stream}."):
            # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
            heard.append(("ack", task_of_seq[int(raw.subject.split(".")[5])]))
        elif raw.subject.startswith(names.run_events("p3").removesuffix("*.*.*")):
            msg = events.decode(raw.data)
            if isinstance(msg, RunFinished):
                heard.append(("report", msg.task_id))

    sub = await bus.nc.subscribe(">", cb=hear)
    await bus.nc.flush()
    worker = Worker(mesh.settings, agent_id="w-busy", slots=16)
    await worker.run_burst()
    outbox = worker.items.outbox
    assert outbox.sent == n and 1 <= outbox.writes <= n
    stored = [m for m, _ in await stored_reports(mesh, "p3")]
    assert sorted(m.task_id for m in stored if isinstance(m, RunFinished)) == sorted(i.task_id for i in items)
    assert await queued(bus.js, names.work_stream) == 0
    deadline = time.monotonic() + 10
    while sum(what == "ack" for what, _ in heard) < n:
        assert time.monotonic() < deadline, heard
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    for item in items:
        told = heard.index(("report", item.task_id))
        assert told < heard.index(("ack", item.task_id)), item.task_id


async def test_a_stopping_worker_sends_the_reports_handed_in_before_it_closes(mesh: Mesh) -> None:
    """A report whose waiter is gone (its run cancelled) is still sent, by the time the worker
    has stopped (`Worker.stop` empties the outbox before it closes the connection)."""
    from agents.worker import Worker

    worker = Worker(mesh.settings, agent_id="w-stop", slots=2)
    await worker.start()
    reports = [
        RunFinished(plan_id="p2", task_id=f"t{i}", attempt=1, worker="w-stop", at=1.0, ok=True, duration_s=0)
        for i in range(3)
    ]
    waiting = [asyncio.ensure_future(worker.items.emit(ev)) for ev in reports]
    await asyncio.sleep(0)  # (a turn of the loop: each is handed in)
    waiting[1].cancel()
    await worker.stop()
    await waiting[0]
    await waiting[2]
    assert [m for m, _ in await stored_reports(mesh, "p2")] == reports
