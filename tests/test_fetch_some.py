"""`mesh.bus.read.fetch_some`: a fetch that finds nothing in time is quiet; one that fails says so.

nats-py's `fetch` ends an empty wait in two ways: its own `TimeoutError`, or a bare one when the
answer to its first, no-wait request came only after the whole timeout (a busy server). A brain
on a busy machine logged the second as a failure every few seconds ("fetching commands failed
(TimeoutError())") while nothing was wrong. The real server gives the first; a stand-in
subscription gives the second, which a loaded server gives only by chance.
"""

from __future__ import annotations

import logging

import pytest
from nats.js import api

import nats
from mesh.bus.read import fetch_some
from mesh.ops.embedded import EmbeddedServer


class Raises:
    """A pull subscription whose fetch raises `exc` (what nats-py raises on the paths named)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    async def fetch(self, batch: int, timeout: float) -> list[object]:
        self.calls += 1
        raise self.exc


@pytest.mark.integration
async def test_an_empty_consumer_gives_nothing_and_says_nothing(
    nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="QUIET", subjects=["quiet.>"])
        config = api.ConsumerConfig(durable_name="q", ack_policy=api.AckPolicy.EXPLICIT)
        await js.add_consumer("QUIET", config)
        sub = await js.pull_subscribe_bind(durable="q", stream="QUIET")
        with caplog.at_level(logging.DEBUG, logger="mesh"):
            assert await fetch_some(sub, 10, "quiet things", timeout_s=0.05) == []
        assert "failed" not in caplog.text
        await js.publish("quiet.one", b"1")
        got = await fetch_some(sub, 10, "quiet things", timeout_s=5)
        assert [m.data for m in got] == [b"1"]
    finally:
        await nc.close()


async def test_a_bare_timeout_is_an_empty_fetch_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    sub = Raises(TimeoutError())
    with caplog.at_level(logging.DEBUG, logger="mesh"):
        assert await fetch_some(sub, 10, "commands") == []  # type: ignore[arg-type]
    assert sub.calls == 1
    assert "failed" not in caplog.text


async def test_a_fetch_the_server_refuses_is_said(caplog: pytest.LogCaptureFixture) -> None:
    sub = Raises(nats.errors.ConnectionClosedError())
    with caplog.at_level(logging.WARNING, logger="mesh"):
        assert await fetch_some(sub, 10, "commands") == []  # type: ignore[arg-type]
    assert "fetching commands failed (ConnectionClosedError" in caplog.text
