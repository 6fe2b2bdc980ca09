"""A lease renewal whose reply was lost with the connection may have been stored: the brain
finds the lease past its revision but still its own, and goes on from there; a lease another
brain wrote is lost."""

from __future__ import annotations

import time

import pytest

from agents.brain import Brain
from agents.brain_lease import LEASE_KEY
from mesh.bus.connect import connect
from mesh.records import decode_lease, encode_record
from tests.conftest import Mesh

pytestmark = pytest.mark.integration


async def test_a_renewal_stored_without_its_reply_is_taken_up_and_another_brains_is_not(mesh: Mesh) -> None:
    await mesh.bus()  # (the buckets)
    brain = Brain(mesh.settings, agent_id="brain-renewal")
    brain._bus = await connect(mesh.settings, brain.agent_id, wait_s=10)
    try:
        await brain.acquire_lease()
        kv = await brain.bus.brain_kv()
        taken = brain.lease_revision

        # this brain's renewal, stored, its reply lost: the brain still holds `taken`
        renewal = brain._new_lease(time.time())
        stored = await kv.update(LEASE_KEY, encode_record(renewal), last=taken)
        assert await brain._stored_after_all(kv)
        assert brain.lease_revision == stored
        assert brain.lease_valid_until > time.monotonic()

        # another brain's lease is another brain's
        entry = await kv.get(LEASE_KEY)
        other = decode_lease(entry.value or b"")
        other.holder = "brain-other"
        await kv.update(LEASE_KEY, encode_record(other), last=stored)
        assert not await brain._stored_after_all(kv)
        assert brain.lease_revision == stored
    finally:
        await brain.bus.close()
