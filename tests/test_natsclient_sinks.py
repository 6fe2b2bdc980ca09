"""A sink subscription (`MeshClient.subscribe_sink`) gets each message whole, counted as nats-py counts
it, goes with its subscription (unsubscribed, or a read left midway), and lives through a reconnect."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext, api

import nats
from mesh.bus.connect import connect
from mesh.bus.natsclient import MeshClient, SinkMsg, status_of
from mesh.bus.read import READ_BATCH, read_stream
from mesh.events import TaskWaiting
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

WAIT_S = 60.0


async def _until(what, timeout_s: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not what():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


async def test_a_sink_gets_each_message_whole_until_it_is_unsubscribed(nats_server: EmbeddedServer) -> None:
    bus = await connect(load_settings(server=nats_server.url, environ={}), "sinks")
    try:
        nc = bus.nc
        assert isinstance(nc, MeshClient)
        got: list[NatsMsg] = []
        sub = await nc.subscribe_sink("sink.test", got.append)
        before = nc.stats["in_msgs"]
        await nc.publish("sink.test", b"one", headers={"Mesh-Type": "x", "K": " v "})
        await nc.publish("sink.test", b"two", reply="r.1")
        await _until(lambda: len(got) == 2)
        assert [(m.subject, m.data, m.reply, m.headers) for m in got] == [
            ("sink.test", b"one", "", {"Mesh-Type": "x", "K": "v"}),
            ("sink.test", b"two", "r.1", None),
        ]
        assert nc.stats["in_msgs"] - before == 2 and sub._received == 2
        assert got[0]._client is nc and got[0].sid == sub._id

        await sub.unsubscribe()
        assert sub._id not in nc._sinks, "the sink goes with its subscription"
        # a message after the unsubscribe reaches nobody: shown by one published behind it
        after: list[NatsMsg] = []
        await nc.subscribe_sink("sink.after", after.append)
        await nc.publish("sink.test", b"three")
        await nc.publish("sink.after", b"marker")
        await _until(lambda: len(after) == 1)
        assert len(got) == 2
    finally:
        await bus.close()


async def test_a_sink_that_raises_reports_to_the_error_callback_and_the_connection_goes_on(
    nats_server: EmbeddedServer,
) -> None:
    bus = await connect(load_settings(server=nats_server.url, environ={}), "sinks")
    try:
        nc = bus.nc
        assert isinstance(nc, MeshClient)
        errors: list[Exception] = []
        nc._error_cb = lambda e: _append(errors, e)  # type: ignore[method-assign]

        def bad(msg: NatsMsg) -> None:
            raise ValueError(msg.data.decode())

        await nc.subscribe_sink("sink.bad", bad)
        got: list[NatsMsg] = []
        await nc.subscribe_sink("sink.good", got.append)
        await nc.publish("sink.bad", b"boom")
        await nc.publish("sink.good", b"fine")
        await _until(lambda: len(got) == 1)
        assert [str(e) for e in errors] == ["boom"] and nc.is_connected
    finally:
        await bus.close()


async def _append(errors: list[Exception], exc: Exception) -> None:
    errors.append(exc)


async def test_a_sink_lives_through_a_reconnect(nats_server: EmbeddedServer) -> None:
    """nats-py sends its subscriptions again, by their ids, once it is back: the sink's with them."""
    bus = await connect(load_settings(server=nats_server.url, environ={}), "sinks")
    try:
        nc = bus.nc
        assert isinstance(nc, MeshClient)
        got: list[NatsMsg] = []
        await nc.subscribe_sink("sink.test", got.append)
        nats_server.stop()
        await _until(lambda: not nc.is_connected)
        nats_server.start()
        await _until(lambda: nc.is_connected and nc.stats["reconnects"] >= 1)
        await nc.publish("sink.test", b"after")
        await _until(lambda: len(got) == 1)
        assert got[0].data == b"after"
    finally:
        await bus.close()


async def test_a_read_ended_or_left_midway_drops_its_sink(nats_server: EmbeddedServer) -> None:
    s = load_settings(server=nats_server.url, environ={})
    bus = await connect(s, "sinks", wait_s=10)
    try:
        nc = bus.nc
        assert isinstance(nc, MeshClient)
        await bus.ensure_resources()
        await bus.emit_many(
            [TaskWaiting(plan_id="p", task_id=f"t{i}", at=float(i)) for i in range(READ_BATCH + 5)]
        )
        # the bus's own: the acknowledgements of its pipelined publishes
        before = dict(nc._sinks)
        assert len(before) == 1

        def read():  # type: ignore[no-untyped-def]
            return read_stream(bus.js, s.names.events_stream, s.names.evt_all, api.ConsumerConfig())

        assert len([raw async for raw in read()]) == READ_BATCH + 5
        assert nc._sinks == before, "a read to its end leaves no sink"

        reading = read()
        async for _raw in reading:
            assert len(nc._sinks) == len(before) + 1, "the read is a sink's"
            break
        await reading.aclose()  # what `async for` leaving early does, sooner or later
        assert nc._sinks == before, "a read left midway leaves no sink"
        assert not [c for c in await bus.js.consumers_info(s.names.events_stream) if c.config.mem_storage]
    finally:
        await bus.close()


async def test_a_read_on_nats_py_s_own_client_gives_what_a_sink_gives(nats_server: EmbeddedServer) -> None:
    """`read_stream` on a client without sinks reads through a subscription's callback: the
    same messages, headers and all."""
    s = load_settings(server=nats_server.url, environ={})
    bus = await connect(s, "sinks", wait_s=10)
    plain = await nats.connect(nats_server.url)
    try:
        await bus.ensure_resources()
        await bus.emit_many(
            [TaskWaiting(plan_id="p", task_id=f"t{i}", at=float(i)) for i in range(READ_BATCH + 5)]
        )

        async def read(js: JetStreamContext) -> list[tuple[str, bytes, dict[str, str] | None]]:
            config = api.ConsumerConfig()
            stream = read_stream(js, s.names.events_stream, s.names.evt_all, config)
            return [(m.subject, m.data, m.headers) async for m in stream]

        through_sink = await read(bus.js)
        assert len(through_sink) == READ_BATCH + 5 and all(
            h and h.get("Mesh-Type") for _, _, h in through_sink
        )
        assert await read(plain.jetstream()) == through_sink
    finally:
        await plain.close()
        await bus.close()


async def test_a_sink_message_parses_its_headers_only_when_read_and_tells_a_status_by_its_first_line(
    nats_server: EmbeddedServer,
) -> None:
    """A history read asks each message whether it is a status (the end of a batch): a sink's
    message answers from its header block's first line, so a header named `Status` in a
    message is not taken for one, and the headers of the others are parsed only if read."""
    bus = await connect(load_settings(server=nats_server.url, environ={}), "sinks")
    try:
        nc = bus.nc
        assert isinstance(nc, MeshClient)
        got: list[NatsMsg] = []
        inbox = nc.new_inbox()
        await nc.subscribe_sink(inbox, got.append)
        await nc.publish(inbox, b"one", headers={"Status": "404", "Description": "forged"})
        await nc.publish(inbox, b"bare")  # no header block at all
        await bus.ensure_resources()
        stream = bus.names.events_stream
        info = await bus.js.add_consumer(stream, config=api.ConsumerConfig(filter_subject="nothing.here"))
        # a pull on a consumer with nothing to give: the server answers with a 404 status
        request = b'{"batch": 1, "no_wait": true}'
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}", request, reply=inbox)
        await _until(lambda: len(got) == 3)
        forged, bare, status = got
        assert status_of(bare) is None and bare.headers is None
        assert isinstance(forged, SinkMsg) and isinstance(status, SinkMsg)
        assert status_of(forged) is None
        assert "_headers" not in forged.__dict__, "not parsed to say it is no status"
        assert forged.headers == {"Status": "404", "Description": "forged"}
        assert status_of(status) == "404"
        assert status.headers is not None and status.headers["Status"] == "404"
    finally:
        await bus.close()
