"""A request in flight when the connection is lost fails soon after the reconnect (`LostReply`),
where nats-py would let it wait out its whole timeout while everything queued behind it waits
too; a request sent while disconnected still gets its answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg as NatsMsg

from mesh.bus.connect import connect
from mesh.bus.natsclient import LostReply, MeshClient
from mesh.bus.publish import Bus
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer
from tests.faults import until

pytestmark = pytest.mark.integration

WAIT_S = 60.0
# a request's own timeout here: far beyond anything the test waits for
NEVER_S = 3600.0


@contextlib.asynccontextmanager
async def _connected(server: EmbeddedServer) -> AsyncIterator[tuple[Bus, MeshClient]]:
    bus = await connect(load_settings(server=server.url, environ={}), "lost")
    try:
        assert isinstance(bus.nc, MeshClient)
        yield bus, bus.nc
    finally:
        await bus.close()


async def test_a_request_in_flight_when_the_server_dies_fails_after_the_reconnect(
    nats_server: EmbeddedServer,
) -> None:
    async with _connected(nats_server) as (_, nc):
        heard: list[NatsMsg] = []

        async def never_answers(msg: NatsMsg) -> None:
            heard.append(msg)

        await nc.subscribe("lost.q", cb=never_answers)
        request = asyncio.ensure_future(nc.request("lost.q", b"?", timeout=NEVER_S))
        other = asyncio.get_running_loop().create_future()
        nc.awaiting(other)  # as a pipelined batch's acknowledgements are awaited
        await until(lambda: heard, WAIT_S, "the request at the responder")  # the request reached the server
        nats_server.kill()
        await until(lambda: not nc.is_connected, WAIT_S, "the disconnection")
        nats_server.start()
        with pytest.raises(LostReply):
            await asyncio.wait_for(request, WAIT_S)
        with pytest.raises(LostReply):
            await asyncio.wait_for(other, WAIT_S)
        assert not nc._resp_map and not nc._awaited


async def test_a_request_sent_while_disconnected_is_answered_after_the_reconnect(
    nats_server: EmbeddedServer,
) -> None:
    async with _connected(nats_server) as (bus, nc):

        async def answers(msg: NatsMsg) -> None:
            await msg.respond(b"!" + msg.data)

        await nc.subscribe("lost.q", cb=answers)
        assert (await nc.request("lost.q", b"1", timeout=WAIT_S)).data == b"!1"
        nats_server.kill()
        await until(lambda: not nc.is_connected, WAIT_S, "the disconnection")
        # buffered by the client, sent once it is connected again
        request = asyncio.ensure_future(nc.request("lost.q", b"2", timeout=NEVER_S))
        await until(lambda: nc._resp_map, WAIT_S, "the request buffered")
        nats_server.start()
        reply = await asyncio.wait_for(request, WAIT_S)
        assert reply.data == b"!2"
        assert bus.reconnected_at > 0
