"""mesh's header parser gives what nats-py's own gives, for every header block; a sink subscription
gets every message, whole, and goes with its subscription (unsubscribed, or a read left midway)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from mesh.bus.connect import connect
from mesh.bus.natsclient import MeshClient, parse_header_lines, parse_headers
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
