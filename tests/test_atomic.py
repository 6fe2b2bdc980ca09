"""Atomic batches (mesh/bus/publish.py `Bus._pipelined`): many messages to one stream go as one
JetStream atomic batch, each acknowledged with its own sequence; a batch the server refuses (a
message it already has, a stream that does not allow them) goes again one by one."""

from __future__ import annotations

import json

import nats.js.errors
import pytest

from mesh import events
from mesh.bus.connect import connect
from mesh.bus.publish import ATOMIC_ID, ATOMIC_MIN, Bus
from mesh.events import TaskWaiting, WorkItem
from mesh.host.config import load_settings
from mesh.names import kv_subject
from mesh.ops.embedded import EmbeddedServer
from mesh.settings import Settings

pytestmark = pytest.mark.integration


async def _bus(server: EmbeddedServer, **env: str) -> tuple[Bus, Settings]:
    s = load_settings(server=server.url, environ=env)
    bus = await connect(s, "test-atomic", wait_s=10)
    await bus.ensure_resources()
    return bus, s


def _waiting(n: int, plan: str = "p") -> list[events.Msg]:
    return [TaskWaiting(plan_id=plan, task_id=f"t{i}", at=float(i)) for i in range(n)]


async def test_many_events_go_as_one_atomic_batch_each_acknowledged_with_its_sequence(
    nats_server: EmbeddedServer,
) -> None:
    bus, s = await _bus(nats_server)
    try:
        evs = _waiting(3 * ATOMIC_MIN)
        acks = await bus.emit_many(evs)
        seqs = [a.seq for a in acks]
        assert seqs == list(range(seqs[0], seqs[0] + len(evs))), seqs
        batch_ids = set()
        for ev, seq in zip(evs, seqs, strict=True):
            stored = await bus.js.get_msg(s.names.events_stream, seq)
            assert events.decode(stored.data or b"") == ev, "each acknowledgement names its own message"
            batch_ids.add((stored.headers or {}).get(ATOMIC_ID))
        assert len(batch_ids) == 1 and None not in batch_ids, "stored as one atomic batch"

        # the same events again (a step published again after an interruption): the batch is
        # refused as holding messages the stream has; one by one they are dropped as duplicates
        again = await bus.emit_many(evs)
        assert [a.seq for a in again] == seqs
        assert all(a.duplicate for a in again)
        info = await bus.js.stream_info(s.names.events_stream)
        assert info.state.messages == len(evs)
    finally:
        await bus.close()


async def test_records_and_work_items_of_one_call_go_as_a_batch_per_stream(
    nats_server: EmbeddedServer,
) -> None:
    bus, s = await _bus(nats_server)
    try:
        info = await bus.js.stream_info(f"KV_{s.names.tasks_bucket}")
        assert info.config.allow_atomic, "ensure_resources lets the task bucket take atomic batches"
        n = 2 * ATOMIC_MIN
        puts = [(s.names.tasks_bucket, f"p.t{i}", json.dumps({"i": i}).encode()) for i in range(n)]
        items = [WorkItem(plan_id="p", task_id=f"t{i}", attempt=1) for i in range(n)]
        acks = await bus.kv_put_many(puts, then=items)
        assert len(acks) == n
        assert [a.stream for a in acks] == [s.names.work_stream] * n
        for item, ack in zip(items, acks, strict=True):
            stored = await bus.js.get_msg(s.names.work_stream, ack.seq)
            assert events.decode(stored.data or b"") == item
            assert (stored.headers or {}).get(ATOMIC_ID)
        kv = await bus.tasks_kv()
        last = await bus.js.get_last_msg(
            f"KV_{s.names.tasks_bucket}", kv_subject(s.names.tasks_bucket, f"p.t{n - 1}")
        )
        assert (last.headers or {}).get(ATOMIC_ID)
        assert json.loads((await kv.get(f"p.t{n - 1}")).value or b"") == {"i": n - 1}
    finally:
        await bus.close()


async def test_a_stream_that_refuses_atomic_batches_gets_the_messages_one_by_one(
    nats_server: EmbeddedServer,
) -> None:
    bus, s = await _bus(nats_server)
    try:
        info = await bus.js.stream_info(s.names.events_stream)
        info.config.allow_atomic = False
        await bus.js.update_stream(info.config)
        # this bus read the stream's settings before: the server's refusal is what it learns from
        bus._atomic[s.names.events_stream] = True
        evs = _waiting(2 * ATOMIC_MIN, plan="q")
        acks = await bus.emit_many(evs)
        assert len({a.seq for a in acks}) == len(evs)
        stored = await bus.js.get_msg(s.names.events_stream, acks[0].seq)
        assert ATOMIC_ID not in (stored.headers or {})
        # and it asks again before the next batch
        more = _waiting(2 * ATOMIC_MIN, plan="r")
        await bus.emit_many(more)
        assert bus._atomic[s.names.events_stream] is False
    finally:
        await bus.close()


@pytest.mark.parametrize(
    "env",
    [{"MESH_ATOMIC_BATCHES": "false"}, {"MESH_DURABILITY": "lazy"}],
    ids=["turned-off", "lazy-durability"],
)
async def test_atomic_batches_are_not_used_when_off_or_with_lazy_durability(
    nats_server: EmbeddedServer, env: dict[str, str]
) -> None:
    bus, s = await _bus(nats_server, **env)
    try:
        acks = await bus.emit_many(_waiting(2 * ATOMIC_MIN))
        stored = await bus.js.get_msg(s.names.events_stream, acks[-1].seq)
        assert ATOMIC_ID not in (stored.headers or {})
    finally:
        await bus.close()


async def test_two_agents_starting_together_both_get_the_object_store(nats_server: EmbeddedServer) -> None:
    """One agent creates the object store and lets it take atomic batches while another,
    which found none a moment before, creates it too: the server refuses that name with
    another configuration, and the second binds to the first one's store."""
    first, s = await _bus(nats_server)
    second = await connect(s, "test-atomic-2", wait_s=10)
    try:
        name = s.names.objects_bucket
        store = f"OBJ_{name}"
        await first.objects()
        assert (await first.js.stream_info(store)).config.allow_atomic
        looked = second.js.object_store

        async def not_yet(bucket: str) -> object:  # (what it saw before the first one created it)
            second.js.object_store = looked  # type: ignore[method-assign]
            raise nats.js.errors.BucketNotFoundError

        second.js.object_store = not_yet  # type: ignore[method-assign]
        objects = await second.objects()
        await objects.put("x", b"payload")
        assert (await (await first.objects()).get("x")).data == b"payload"
    finally:
        await first.close()
        await second.close()
