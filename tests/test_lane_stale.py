"""An item a pull request delivered after its fetch had returned waits in the client; a lane
whose next fetch comes over half of `ack_wait_s` later lets it go (the server may have given it
to another worker by then), and the server offers it again with its delivery counted."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.js import api

import nats
from agents.base import Agent
from agents.worker_lanes import Lane, Lanes
from mesh.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

ACK_WAIT_S = 1.0
WAIT_S = 60.0


def _lanes() -> Lanes:
    agent = SimpleNamespace(settings=SimpleNamespace(ack_wait_s=ACK_WAIT_S))

    def unused(*_: Any) -> Any:
        raise AssertionError("not called here")

    return Lanes(cast(Agent, agent), take=unused, hold=lambda: "", on_change=lambda: None)


async def _late_delivery(nc: nats.NATS, sub: Any) -> None:
    """A pull request no fetch waits on, answered into the subscription's queue (which holds
    that answer alone: a status left there by an earlier fetch is taken out).

    A `no_wait` request the server reads before its consumer has seen the message just stored
    is answered with a status (no messages); that answer is taken out and the request sent
    again, until a message is what comes back."""
    queue = sub._sub._pending_queue
    deadline = time.monotonic() + WAIT_S
    while True:
        while not queue.empty():
            sub._sub._pending_size -= len(queue.get_nowait().data)
        await nc.publish(sub._nms, json.dumps({"batch": 1, "no_wait": True}).encode(), reply=sub._deliver)
        while queue.empty():
            assert time.monotonic() < deadline, "the server never answered the pull request"
            await asyncio.sleep(0.01)
        if any(m.data for m in queue._queue):
            break
    while not queue._queue[0].data:
        sub._sub._pending_size -= len(queue.get_nowait().data)
    assert queue.qsize() == 1


async def test_a_lane_lets_go_of_an_item_delivered_long_after_its_last_fetch(
    nats_server: EmbeddedServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="LANES", subjects=["lanes.>"])
        sub = await js.pull_subscribe(
            "lanes.>", durable="w", stream="LANES", config=api.ConsumerConfig(ack_wait=ACK_WAIT_S)
        )
        lanes, lane = _lanes(), Lane("cpu", sub, slots=1)

        # a fetch that returned a moment ago: what came since is current, and is kept
        await js.publish("lanes.work", b"first")
        await _late_delivery(nc, sub)
        lane.fetched_at = time.monotonic()
        lanes._drop_stale(lane)
        [kept] = await sub.fetch(1, timeout=WAIT_S)
        assert kept.data == b"first" and kept.metadata.num_delivered == 1
        await kept.ack()

        # the lane's slots stayed busy past half of ack_wait since its last fetch: let go
        await js.publish("lanes.work", b"second")
        await _late_delivery(nc, sub)
        lane.fetched_at = time.monotonic() - ACK_WAIT_S
        lanes._drop_stale(lane)
        assert sub._sub._pending_queue.empty() and sub._sub._pending_size == 0
        # ...and the server offers it again once its ack_wait is up, as a further delivery
        [again] = await sub.fetch(1, timeout=WAIT_S)
        assert again.data == b"second" and again.metadata.num_delivered == 2
        await again.ack()
    finally:
        await nc.close()
