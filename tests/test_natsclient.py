"""mesh's header parser gives what nats-py's own gives, for every header block; a sink subscription
gets every message, whole, and goes with its subscription (unsubscribed, or a read left midway)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

from mesh.bus.connect import connect
from mesh.bus.natsclient import MeshClient, SinkParser, parse_header_lines, parse_headers
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer

BLOCKS = [
    b"",
    b"\r\n",
    b"Mesh-Type: task.succeeded\r\nNats-Msg-Id: p.t1.succeeded.1\r\n\r\n",
    b"Nats-Batch-Id: abc\r\nNats-Batch-Sequence: 17\r\nNats-Batch-Commit: 1\r\n\r\n",
    b"A:B\r\nC:\tD\r\n  E  :  F  \r\n",
    b"no colon here\r\nX: y\r\n",
    b"two words: v\r\ntab\tname: v\r\n: empty name\r\n",
    b"\xff\xfe: bad name\r\nok: \xff bad value\r\n",
    b"K: a:b:c\r\nK: second wins\r\n",
    b"Nats-Marker-Reason: MaxAge\r\nKV-Operation: PURGE\r\n",
    b"sep\x1cname: v\r\nname\x0b: v\r\n",
]


@pytest.mark.parametrize("block", BLOCKS)
def test_the_parser_reads_each_block_as_nats_py_does(block: bytes) -> None:
    assert parse_header_lines(block) == Client._parse_header_lines(block)


_BYTES = st.sampled_from(
    [
        b"a",
        b"Z",
        b"-",
        b":",
        b" ",
        b"\t",
        b"\r\n",
        b"\r",
        b"\n",
        b"\x0b",
        b"\x0c",
        b"\x1f",
        b"\xff",
        b"\xc3\xa9",
        b"0",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_BYTES, max_size=40).map(b"".join))
def test_the_parser_agrees_with_nats_py_on_any_bytes(block: bytes) -> None:
    assert parse_header_lines(block) == Client._parse_header_lines(block)


def test_the_client_uses_it() -> None:
    assert MeshClient()._parse_header_lines is parse_header_lines


@pytest.mark.integration
async def test_headers_come_back_whole_through_a_real_server(nats_server: EmbeddedServer) -> None:
    bus = await connect(load_settings(server=nats_server.url, environ={}), "headers")
    try:
        assert isinstance(bus.nc, MeshClient)
        sub = await bus.nc.subscribe("h.test")
        sent = {"Mesh-Type": "task.succeeded", "Nats-Msg-Id": "p.t1:1", "X-Odd": " spaced  value "}
        await bus.nc.publish("h.test", b"{}", headers=sent)
        got = await sub.next_msg(timeout=10)
        assert got.headers == {k: v.strip() for k, v in sent.items()}
    finally:
        await bus.close()


def _nats_py_line(subject: str, payload: bytes, reply: str, headers: dict[str, str] | None) -> bytes:
    """The protocol line nats-py's `publish` puts in its buffer for one message."""

    async def go() -> bytes:
        client = Client()
        client._flush_queue = None  # (nothing to wake)
        client._status = Client.CONNECTED
        client._max_payload = 1 << 20
        await client.publish(subject, payload, reply=reply, headers=headers)
        return b"".join(client._pending)

    return asyncio.run(go())


def _mesh_line(subject: str, payload: bytes, reply: str, headers: dict[str, str] | None) -> bytes:
    async def go() -> bytes:
        client = MeshClient()
        client._flush_queue = None
        client._status = Client.CONNECTED
        client._max_payload = 1 << 20
        assert await client.publish_many([(subject, payload, reply, headers)]) == 1
        return b"".join(client._pending)

    return asyncio.run(go())


_HEADER_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_TOKEN = st.text(alphabet="abcXYZ-_.019!#$%&'*+^`|~", min_size=1, max_size=10)


@settings(max_examples=200)
@given(
    st.dictionaries(st.one_of(_TOKEN, st.just(" Padded "), st.just(" ")), _HEADER_TEXT, max_size=4)
    | st.none(),
    st.binary(max_size=40),
    st.sampled_from(["", "_INBOX.x.1"]),
)
def test_publish_many_writes_what_nats_py_writes(
    headers: dict[str, str] | None, payload: bytes, reply: str
) -> None:
    """Byte for byte the same protocol lines as nats-py's `publish`, header values with line
    breaks, padding and any text included."""
    assert _mesh_line("a.b.c", payload, reply, headers) == _nats_py_line("a.b.c", payload, reply, headers)


@pytest.mark.parametrize(
    ("subject", "reply", "headers", "error"),
    [
        ("a b", "", None, nats.errors.BadSubjectError),
        ("a\r\nPUB x 0", "", None, nats.errors.BadSubjectError),
        ("", "", None, nats.errors.BadSubjectError),
        ("a", "in box", None, nats.errors.BadSubjectError),
        ("a", "", {"bad name": "v"}, nats.errors.BadHeaderError),
        ("a", "", {"Bad:Name": "v"}, nats.errors.BadHeaderError),
    ],
)
def test_publish_many_refuses_what_nats_py_refuses(
    subject: str, reply: str, headers: dict[str, str] | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        _nats_py_line(subject, b"x", reply, headers)
    with pytest.raises(error):
        _mesh_line(subject, b"x", reply, headers)


@pytest.mark.integration
async def test_publish_many_through_a_real_server(nats_server: EmbeddedServer) -> None:
    bus = await connect(load_settings(server=nats_server.url, environ={}), "many")
    try:
        assert isinstance(bus.nc, MeshClient)
        sub = await bus.nc.subscribe("m.>")
        sent = [
            (f"m.{i}", f"payload {i}".encode(), "", {"Nats-Msg-Id": f"id-{i}"} if i % 2 else None)
            for i in range(50)
        ]
        assert await bus.nc.publish_many(sent) == 50
        for subject, payload, _, headers in sent:
            got = await sub.next_msg(timeout=10)
            assert (got.subject, got.data, got.headers) == (subject, payload, headers)
    finally:
        await bus.close()


# whole header blocks as the server sends them: status lines (alone, with a description, with
# headers after, as a heartbeat), plain headers, and odd forms
STATUS_BLOCKS = [
    b"NATS/1.0 404\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\n\r\n",
    b"NATS/1.0 409 Batch Completed\r\n\r\n",
    b"NATS/1.0 409 Message Size Exceeds MaxBytes\r\n\r\n",
    b"NATS/1.0 409 Batch Completed\r\nNats-Pending-Messages: 0\r\nNats-Pending-Bytes: 0\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
    b"NATS/1.0 100 FlowControl Request\r\n\r\n",
    b"NATS/1.0\r\nMesh-Type: task.succeeded\r\nNats-Msg-Id: p.t1.succeeded.1\r\n\r\n",
    b"NATS/1.0\r\nKV-Operation: DEL\r\n\r\n",
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0\r\n",
    b"NATS/1.0\r\nA:B\r\n  C  :  D  \r\ntwo words: x\r\n\r\n",
    b"NATS/1.0   404   \r\n\r\n",
    b"NATS/1.0 40\r\n\r\n",
    b"NATS/1.0 abc Not A Number\r\n\r\n",
    b"NATS/1.0 abc\r\n\r\n",
    b"NATS/1.0 abc\r\nX: y\r\n\r\n",
    b"NATS/1.0 404 No Messages",
    b"NATS/1.0 404",
    b"NATS/1.0 409 \r\n\r\n",
    b"NATS/1.0 409 x\r\n\r\nafter: blank\r\n\r\n",
    b"NATS/1.0 1:x\r\nA: b\r\n\r\n",
    b"NATS/1.0 4a:b\r\nX: y\r\n\r\n",
    b"NATS/1.0 404\r\nX: y\r\n\r\n",
    b"NATS/1.0 100 Idle:Heartbeat\r\nK: \xff v\r\n\r\n",
    b"NATS/1.0 200 \xc3\xa9t\xc3\xa9\r\n\r\n",
]


def _nats_py(block: bytes, client: Client) -> dict[str, str] | None:
    return asyncio.run(client._process_headers(block))  # type: ignore[no-any-return]


@pytest.mark.parametrize("block", STATUS_BLOCKS)
def test_a_whole_block_reads_as_nats_py_reads_it(block: bytes) -> None:
    """`parse_headers` (the sink's, synchronous) gives what nats-py's `_process_headers` gives,
    with nats-py's own line parser and with mesh's, in the same order of keys."""
    for client, lines in ((Client(), Client._parse_header_lines), (MeshClient(), parse_header_lines)):
        want = _nats_py(block, client)
        got = parse_headers(block, lines)
        assert got == want, block
        if want is not None:
            assert got is not None
            assert list(got.items()) == list(want.items()), block
            assert all(type(k) is str for k in got), "plain keys, whatever nats-py uses"


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"NATS/1.0", b"NATS/1.0 ", b"NATS/1.0\r\n", b"NATS/1.0 409", b"NATS/1.0 100 "]),
    st.lists(_BYTES | st.sampled_from([b"Status", b"409", b"Description"]), max_size=30).map(b"".join),
)
def test_a_whole_block_agrees_with_nats_py_on_any_bytes(head: bytes, rest: bytes) -> None:
    block = head + rest
    client = MeshClient()
    try:
        want = _nats_py(block, client)
    except UnicodeDecodeError:  # a status line that is not text fails both
        with pytest.raises(UnicodeDecodeError):
            parse_headers(block)
        return
    except IndexError:  # nats-py fails on `NATS/1.0` alone, which no server sends; this has none
        assert block == b"NATS/1.0" and parse_headers(block) is None
        return
    assert parse_headers(block) == want


@pytest.mark.integration
async def test_ack_many_acknowledges_each_message(nats_server: EmbeddedServer) -> None:
    bus = await connect(load_settings(server=nats_server.url, environ={}), "acks")
    try:
        assert isinstance(bus.nc, MeshClient)
        js = bus.nc.jetstream()
        await js.add_stream(name="ACKS", subjects=["acks.>"])
        for i in range(6):
            await js.publish(f"acks.{i}", b"x")
        sub = await js.pull_subscribe("acks.>", durable="reader")
        msgs = await sub.fetch(6, timeout=10)
        await bus.nc.ack_many(msgs[:4])
        await bus.nc.flush()
        info = await js.consumer_info("ACKS", "reader")
        assert (info.ack_floor.stream_seq, info.num_ack_pending) == (4, 2)
        with pytest.raises(nats.errors.Error):
            await bus.nc.ack_many(msgs[:1])  # (each once, as Msg.ack)
    finally:
        await bus.close()


# --- the protocol parser: sink messages taken in a loop of their own, everything else as before


class _Recorder(MeshClient):
    """A client that notes what its parser hands it, in order: messages (through a sink or not),
    PINGs, PONGs, INFOs and errors."""

    def __init__(self, sinks: tuple[int, ...]) -> None:
        super().__init__()
        self.seen: list[tuple[object, ...]] = []
        for sid in (1, 2, 3):
            self._subs[sid] = Subscription(self, sid, f"s{sid}")
        for sid in sinks:
            self._sinks[sid] = lambda msg: self.seen.append(
                ("msg", msg._sid, msg.subject, msg.reply, msg.data, msg._block or None)
            )

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if sid in self._sinks:
            await super()._process_msg(sid, subject, reply, data, headers)
        else:
            self.seen.append(("msg", sid, subject.decode(), reply.decode(), data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, object], initial_connection: bool = False) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err_msg: str) -> None:
        self.seen.append(("err", err_msg))


_PIECES = [b"a", b"{}", b"\r\n", b" ", b"MSG 1 2\r\n", b"\x00", b"\xff", b"x" * 40_000]
_PAYLOADS = st.lists(st.sampled_from(_PIECES), max_size=6).map(b"".join)
_BLOCKS = [b"NATS/1.0\r\nMesh-Type: x\r\n\r\n", b"NATS/1.0 409 Batch Completed\r\n\r\n", b"NATS/1.0\r\n\r\n"]
_SUBJECTS = st.sampled_from(["a", "_INBOX.r", "$JS.ACK.S.c.1.5.5.1733400000000000000.0", "x.y.z"])


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["msg", "hmsg", "hmsg", "ping", "pong", "ok", "info", "err"]))
    if kind in ("msg", "hmsg"):
        sid = draw(st.sampled_from([1, 2, 3]))
        subject = draw(_SUBJECTS).encode()
        reply = draw(st.one_of(st.just(b""), _SUBJECTS.map(str.encode)))
        payload = draw(_PAYLOADS)
        head = b"%s %d %s" % (subject, sid, reply) if reply else b"%s %d" % (subject, sid)
        if kind == "msg":
            return b"MSG %s %d\r\n%s\r\n" % (head, len(payload), payload)
        block = draw(st.sampled_from(_BLOCKS))
        return b"HMSG %s %d %d\r\n%s%s\r\n" % (head, len(block), len(block) + len(payload), block, payload)
    return {
        "ping": b"PING\r\n",
        "pong": b"PONG\r\n",
        "ok": b"+OK\r\n",
        "info": b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        "err": b"-ERR 'Permissions Violation for Subscription to x'\r\n",
    }[kind]


async def _parse_all(parser: Parser, stream: bytes, cuts: list[int]) -> None:
    at = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        await parser.parse(stream[at:cut])
        at = cut


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_frame(), min_size=1, max_size=25),
    st.lists(st.integers(min_value=0, max_value=200_000), max_size=40),
    st.sampled_from([(1,), (1, 2), (1, 2, 3), ()]),
)
def test_the_protocol_parser_hands_over_what_nats_py_s_does_however_the_socket_cuts_it(
    frames: list[bytes], cuts: list[int], sinks: tuple[int, ...]
) -> None:
    stream = b"".join(frames)

    async def run() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        theirs, ours = _Recorder(()), _Recorder(sinks)
        await _parse_all(Parser(theirs), stream, cuts)
        await _parse_all(ours._ps, stream, cuts)
        assert isinstance(ours._ps, SinkParser)
        return theirs.seen, ours.seen

    theirs, ours = asyncio.run(run())
    assert ours == theirs
    assert len([s for s in ours if s[0] == "msg"]) == sum(f.startswith((b"MSG", b"HMSG")) for f in frames)


def test_the_protocol_parser_refuses_what_nats_py_s_refuses() -> None:
    async def run(parser: Parser) -> None:
        await parser.parse(b"HMSG _INBOX.r 1 bad 12\r\nNATS/1.0\r\n\r\n\r\n")

    with pytest.raises(nats.errors.ProtocolError):
        asyncio.run(run(Parser(_Recorder((1,)))))
    with pytest.raises(nats.errors.ProtocolError):
        asyncio.run(run(_Recorder((1,))._ps))


def test_a_sink_s_message_of_many_chunks_is_gathered_and_handed_over_once() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    block = b"NATS/1.0\r\nMesh-Type: x\r\n\r\n"
    frame = b"HMSG s1 1 r %d %d\r\n%s%s\r\nPING\r\n" % (len(block), len(block) + len(payload), block, payload)

    async def run() -> _Recorder:
        client = _Recorder((1,))
        for at in range(0, len(frame), 32768):
            await client._ps.parse(frame[at : at + 32768])
        return client

    client = asyncio.run(run())
    assert client.seen == [("msg", 1, "s1", "r", payload, block), ("ping",)]
    assert not client._ps.buf
