"""Reading history: every message up to the end, across batches cut by count and by bytes."""

from __future__ import annotations

import pytest

from mesh.bus.connect import connect
from mesh.bus.history import read_history
from mesh.bus.read import READ_BATCH, READ_BATCH_BYTES
from mesh.events import PlanTasks, TaskSpec, TaskWaiting
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer

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


async def _count(bus, s) -> int:  # type: ignore[no-untyped-def]
    return len([e async for e in read_history(bus, s.names.evt_all)])
