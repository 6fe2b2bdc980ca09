"""Reading history: every message up to the end, across batches cut by count and by bytes; reading
a bucket while its keys are written again: every key, once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import AsyncIterator

import pytest
from nats.js import api

from mesh.bus.connect import connect
from mesh.bus.history import collector_paused, read_history
from mesh.bus.publish import Bus
from mesh.bus.read import READ_BATCH, READ_BATCH_BYTES, ReadBroken, iter_bucket, read_batches, read_stream
from mesh.events import PlanFinished, PlanTasks, RunFinished, TaskSpec, TaskWaiting
from mesh.host.config import load_settings
from mesh.names import Names
from mesh.ops.embedded import EmbeddedServer
from mesh.status import PlanStatus

pytestmark = pytest.mark.integration


async def test_history_reads_to_the_end_across_count_and_byte_limited_batches(
    nats_server: EmbeddedServer,
) -> None:
    s = load_settings(server=nats_server.url, environ={})
    bus = await connect(s, "test-read", wait_s=10)
    try:
        await bus.ensure_resources()
        assert await _count(bus, s) == 0, "an empty stream reads as nothing, at once"
        # more small events than one batch holds
        small = [TaskWaiting(plan_id="p", task_id=f"t{i}", at=float(i)) for i in range(READ_BATCH * 2 + 7)]
        await bus.emit_many(small)
        # big events whose batch hits max_bytes long before READ_BATCH messages
        spec = tuple(TaskSpec(id=f"x{i}", body="y" * 200) for i in range(1000))
        part_bytes = len(PlanTasks(plan_id="q", part=0, tasks=spec, at=0.0).__repr__())
        parts = READ_BATCH_BYTES // part_bytes + 20
        await bus.emit_many([PlanTasks(plan_id="q", part=n, tasks=spec, at=1.0) for n in range(parts)])
        seqs = [e.seq async for e in read_history(bus, s.names.evt_all)]
        assert len(seqs) == len(small) + parts
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "in order, none twice"
    finally:
        await bus.close()


async def test_a_bucket_read_while_its_keys_are_written_again_gives_every_key_once(
    nats_server: EmbeddedServer,
) -> None:
    """A bucket keeps one value per key: writing a key again removes the value a read has still
    to reach, and the server may say nothing is pending before it counts the new value. A read
    that ended there missed the key (a plan's 1,000 task records read as 999 just as its last
    records were written); one that read on gave a key read again twice."""
    s = load_settings(server=nats_server.url, environ={})
    writer = await connect(s, "test-writer", wait_s=10)
    reader = await connect(s, "test-reader", wait_s=10)
    try:
        await writer.ensure_resources()
        bucket = s.names.tasks_bucket
        keys = [f"p.t{i:04d}" for i in range(1000)]
        await writer.kv_put_many((bucket, k, b"0") for k in keys)
        await writer.kv_put_many([(bucket, "other.t0", b"0")])
        writing = True

        async def write_again() -> None:
            rng = random.Random(17)
            n = 0
            while writing:
                n += 1
                await writer.kv_put_many((bucket, k, str(n).encode()) for k in rng.sample(keys, 20))

        task = asyncio.get_running_loop().create_task(write_again())
        kv = await reader.tasks_kv()
        short, twice = [], []
        try:
            for _ in range(150):
                read = [key async for key, _ in iter_bucket(kv, "p.>")]
                if len(set(read)) != len(keys):
                    short.append(sorted(set(keys) - set(read)))
                if len(read) != len(set(read)):
                    twice.append(len(read) - len(set(read)))
        finally:
            writing = False
            await task
        assert not short, f"{len(short)} of 150 reads missed keys: {short[:3]}"
        assert not twice, f"{len(twice)} of 150 reads gave keys twice: {twice[:3]}"
        # a quiet bucket reads whole, and only under its filter
        assert sorted([key async for key, _ in iter_bucket(kv, "p.>")]) == keys
        assert [key async for key, _ in iter_bucket(kv, "other.>")] == ["other.t0"]
    finally:
        await writer.close()
        await reader.close()


def _mixed(n: int, plan: str = "p") -> list:  # type: ignore[type-arg]
    """Task transitions, a plan event every 7th, a worker's report every 3rd (not read)."""
    out: list = []  # type: ignore[type-arg]
    for i in range(n):
        out.append(TaskWaiting(plan_id=plan, task_id=f"t{i}", at=float(i)))
        if i % 7 == 0:
            out.append(PlanFinished(plan_id=plan, status=PlanStatus.SUCCEEDED, at=float(i)))
        if i % 3 == 0:
            out.append(
                RunFinished(
                    plan_id=plan, task_id=f"t{i}", attempt=1, worker="w", at=float(i), ok=True, duration_s=0.0
                )
            )
    return out


@contextlib.asynccontextmanager
async def _bus(server: EmbeddedServer, history: list) -> AsyncIterator[tuple[Bus, Names]]:  # type: ignore[type-arg]
    """A connection to `server` whose event stream holds `history`."""
    s = load_settings(server=server.url, environ={})
    bus = await connect(s, "test-read", wait_s=10)
    try:
        await bus.ensure_resources()
        await bus.emit_many(history)
        yield bus, s.names
    finally:
        await bus.close()


async def test_several_subjects_read_as_one_in_stream_order_each_message_once(
    nats_server: EmbeddedServer,
) -> None:
    """A read of several subjects is one read per subject merged by sequence: it gives what
    one read of them all would, in stream order, across batches, a message two subjects
    match once, and a subject nothing matches changes nothing."""
    async with _bus(nats_server, []) as (bus, n):
        assert [e async for e in read_history(bus, n.transition_filters())] == [], "an empty stream"
        await bus.emit_many(_mixed(READ_BATCH * 2 + 11))
        every = [e async for e in read_history(bus, n.evt_all)]
        wanted = [
            e.seq for e in every if e.subject.startswith((f"{n.prefix}.evt.task.", f"{n.prefix}.evt.plan."))
        ]
        assert len(wanted) == READ_BATCH * 2 + 11 + (READ_BATCH * 2 + 11 + 6) // 7
        assert len(every) > len(wanted), "the reports are there, and not read"
        for subjects in (
            n.transition_filters(),
            [*n.transition_filters(), f"{n.prefix}.evt.task.p.>", f"{n.prefix}.evt.plan.*.finished"],
            [*n.transition_filters(), f"{n.prefix}.evt.alert.>"],
        ):
            seqs = [e.seq async for e in read_history(bus, subjects)]
            assert seqs == wanted, subjects
            got = [
                raw.subject
                async for raw in read_stream(bus.js, n.events_stream, subjects, api.ConsumerConfig())
            ]
            assert got == [e.subject for e in every if e.seq in set(wanted)]
        # from a sequence on, as a brain's catch-up reads
        middle = wanted[len(wanted) // 2]
        later = [e.seq async for e in read_history(bus, n.transition_filters(), start_seq=middle)]
        assert later == [q for q in wanted if q >= middle]


async def test_a_read_of_several_subjects_ends_where_the_stream_ended_when_it_began(
    nats_server: EmbeddedServer,
) -> None:
    """Events published while the read goes on are not in it, of any subject: what it gives is
    a prefix of the stream (a read of one subject going on past the end of another's would
    give a task's later event without its plan's)."""
    async with _bus(nats_server, _mixed(READ_BATCH * 3)) as (bus, n):
        end = (await bus.js.stream_info(n.events_stream)).state.last_seq
        seqs: list[int] = []
        batches = read_batches(bus.js, n.events_stream, n.transition_filters(), api.ConsumerConfig())
        async with contextlib.aclosing(batches):
            async for batch in batches:
                if not seqs:
                    await bus.emit_many(_mixed(READ_BATCH, plan="q"))
                seqs += [raw.metadata.sequence.stream for raw in batch]
        assert seqs and max(seqs) <= end
        assert len(seqs) == READ_BATCH * 3 + (READ_BATCH * 3 + 6) // 7
        assert seqs == sorted(set(seqs))


async def test_a_merged_read_left_early_leaves_no_consumer_behind(nats_server: EmbeddedServer) -> None:
    async with _bus(nats_server, _mixed(READ_BATCH * 3)) as (bus, n):
        entries = read_history(bus, n.transition_filters())
        async with contextlib.aclosing(entries):
            async for _entry in entries:
                readers = [c for c in await bus.js.consumers_info(n.events_stream) if c.config.mem_storage]
                assert len(readers) == 2, "one consumer per subject"
                break
        assert not [c for c in await bus.js.consumers_info(n.events_stream) if c.config.mem_storage]


async def test_a_read_whose_messages_wait_unread_keeps_its_consumer(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server deletes a pull consumer no request reached for its inactive threshold. A
    read asks again only once it has taken in what came, so a slow caller, or a merge holding
    one subject while it gives another's events, left its consumer unasked that long: the
    read broke off. The read reminds the server it is there, with requests that take nothing."""
    import mesh.bus.read as read

    monkeypatch.setattr(read, "READ_IDLE_S", 1.0)
    monkeypatch.setattr(read, "KEEP_ALIVE_S", 0.2)
    async with _bus(nats_server, _mixed(READ_BATCH * 5)) as (bus, n):
        every = [e async for e in read_history(bus, n.evt_all)]
        tasks = [e.seq for e in every if ".evt.task." in e.subject]
        transitions = [e.seq for e in every if ".evt.run." not in e.subject]
        assert len(transitions) > len(tasks) > READ_BATCH * 3
        for subjects, wanted in ((n.task_events_all, tasks), (n.transition_filters(), transitions)):
            seqs: list[int] = []
            batches = read_batches(bus.js, n.events_stream, subjects, api.ConsumerConfig())
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    if not seqs:
                        await asyncio.sleep(4.0)  # four times the threshold, nothing asked
                    seqs += [raw.metadata.sequence.stream for raw in batch]
            assert seqs == wanted
        assert not [c for c in await bus.js.consumers_info(n.events_stream) if c.config.mem_storage]


async def _count(bus, s) -> int:  # type: ignore[no-untyped-def]
    return len([e async for e in read_history(bus, s.names.evt_all)])


async def test_a_read_that_breaks_off_fails_instead_of_ending_short(nats_server: EmbeddedServer) -> None:
    """A pull request that ends without the message that says nothing follows it (its consumer
    deleted, or the request reaching no consumer: a 503, as just after a consumer is made on
    another server of a cluster) is not the stream's end. Taken for one, a read of the agents
    bucket came back empty and the brain declared every live agent gone."""
    s = load_settings(server=nats_server.url, environ={})
    bus = await connect(s, "test-read", wait_s=10)
    try:
        await bus.ensure_resources()
        await bus.emit_many(
            [TaskWaiting(plan_id="p", task_id=f"t{i}", at=float(i)) for i in range(READ_BATCH * 3)]
        )
        got = 0
        with pytest.raises(ReadBroken):
            async for _raw in read_stream(
                bus.js, s.names.events_stream, s.names.evt_all, api.ConsumerConfig(), idle_timeout_s=2.0
            ):
                if got == 0:
                    (reader,) = [
                        c.name
                        for c in await bus.js.consumers_info(s.names.events_stream)
                        if c.config.mem_storage
                    ]
                    await bus.js.delete_consumer(s.names.events_stream, reader)
                got += 1
        assert got < READ_BATCH * 3
    finally:
        await bus.close()


def test_the_collector_is_paused_for_a_fold_and_on_again_after_it_whatever_happens() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a fold that fails")
    assert gc.isenabled(), "on again after a failure"
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled(), "left off where it was off"
    finally:
        gc.enable()
