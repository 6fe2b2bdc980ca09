"""mesh's header parser gives what nats-py's own gives, for every header block."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from mesh.bus.connect import connect
from mesh.bus.natsclient import MeshClient, parse_header_lines
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
