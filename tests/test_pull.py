"""`mesh.bus.pull.Puller` fetches a durable consumer's messages as nats-py's `fetch` does: what is
there at once, a batch at most outstanding, a TimeoutError when nothing comes, the server's
refusals raised as nats-py raises them, and it goes on after a reconnect."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import nats.js.errors
import pytest
from nats.js import api

from mesh.bus.connect import connect
from mesh.bus.natsclient import MeshClient
from mesh.bus.pull import Puller, knows_reset, pull_subscribe
from mesh.bus.read import fetch_some
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

STREAM, SUBJECTS = "PULLTEST", ["pt.>"]
WAIT_S = 60.0


async def _setup(nats_server: EmbeddedServer, durable: str = "d"):  # type: ignore[no-untyped-def]
    bus = await connect(load_settings(server=nats_server.url, environ={}), "pull", wait_s=10)
    await bus.js.add_stream(name=STREAM, subjects=SUBJECTS)
    await bus.js.add_consumer(
        STREAM, api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30)
    )
    return bus


async def _fetch_all(puller: Puller, n: int, batch: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        msgs = await asyncio.wait_for(puller.fetch(batch, timeout=1.0), WAIT_S)
        assert len(msgs) <= batch
        got += [m.data for m in msgs]
        for m in msgs:
            await m.ack()
    return got


async def test_it_fetches_what_is_there_and_what_comes_in_order(nats_server: EmbeddedServer) -> None:
    bus = await _setup(nats_server)
    try:
        assert isinstance(bus.nc, MeshClient)
        puller = await pull_subscribe(bus.js, durable="d", stream=STREAM)
        assert isinstance(puller, Puller)
        for i in range(300):
            await bus.js.publish(f"pt.{i % 3}", b"%d" % i)
        assert await _fetch_all(puller, 300, 64) == [b"%d" % i for i in range(300)]

        async def later() -> None:
            await asyncio.sleep(0.2)
            await bus.js.publish("pt.x", b"late")

        task = asyncio.ensure_future(later())
        assert [m.data for m in await puller.fetch(10, timeout=WAIT_S)] == [b"late"]
        await task
        info = await bus.js.consumer_info(STREAM, "d")
        assert info.num_pending == 0 and info.num_ack_pending == 1  # (the last one is not acked yet)
        await puller.unsubscribe()
    finally:
        await bus.close()


async def test_nothing_there_is_a_timeout_and_fetch_some_gives_nothing(nats_server: EmbeddedServer) -> None:
    bus = await _setup(nats_server)
    try:
        puller = await pull_subscribe(bus.js, durable="d", stream=STREAM)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await puller.fetch(5, timeout=0.3)
        assert time.monotonic() - began >= 0.3
        assert await fetch_some(puller, 5, "test", timeout_s=0.2) == []
        # what comes after a timeout is still fetched
        await bus.js.publish("pt.a", b"after")
        assert [m.data for m in await puller.fetch(5, timeout=WAIT_S)] == [b"after"]
    finally:
        await bus.close()


async def test_no_more_than_a_batch_is_asked_for_while_nobody_fetches(nats_server: EmbeddedServer) -> None:
    bus = await _setup(nats_server)
    try:
        puller = await pull_subscribe(bus.js, durable="d", stream=STREAM)
        for i in range(100):
            await bus.js.publish("pt.a", b"%d" % i)
        first = await puller.fetch(10, timeout=WAIT_S)
        assert 1 <= len(first) <= 10
        await asyncio.sleep(0.5)  # (nothing more may be delivered meanwhile)
        info = await bus.js.consumer_info(STREAM, "d")
        assert info.num_ack_pending <= 10, "the server delivered more than one batch"
        assert info.num_pending >= 90
        for m in first:
            await m.ack()
        rest: list[bytes] = []
        while len(rest) < 100 - len(first):
            msgs = await puller.fetch(10, timeout=WAIT_S)
            rest += [m.data for m in msgs]
            for m in msgs:
                await m.ack()
            # what was delivered and not acknowledged: at most what one request asked for
            assert (await bus.js.consumer_info(STREAM, "d")).num_ack_pending <= 10
        assert [m.data for m in first] + rest == [b"%d" % i for i in range(100)]
    finally:
        await bus.close()


async def test_an_unacked_message_comes_again_after_its_ack_wait(nats_server: EmbeddedServer) -> None:
    bus = await connect(load_settings(server=nats_server.url, environ={}), "pull", wait_s=10)
    try:
        await bus.js.add_stream(name=STREAM, subjects=SUBJECTS)
        await bus.js.add_consumer(
            STREAM, api.ConsumerConfig(durable_name="d", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=0.5)
        )
        puller = await pull_subscribe(bus.js, durable="d", stream=STREAM)
        await bus.js.publish("pt.a", b"once")
        first = await puller.fetch(1, timeout=WAIT_S)
        again = await puller.fetch(1, timeout=WAIT_S)
        assert [m.data for m in first] == [m.data for m in again] == [b"once"]
        assert again[0].metadata.num_delivered == 2
    finally:
        await bus.close()


async def test_a_missing_consumer_is_an_error_as_with_nats_py(nats_server: EmbeddedServer) -> None:
    bus = await _setup(nats_server)
    try:
        puller = await pull_subscribe(bus.js, durable="nobody", stream=STREAM)
        with pytest.raises(nats.js.errors.Error):
            await puller.fetch(5, timeout=5.0)
        theirs = await bus.js.pull_subscribe_bind(durable="nobody", stream=STREAM)
        with pytest.raises(nats.js.errors.Error):
            await theirs.fetch(5, timeout=5.0)
    finally:
        await bus.close()


async def test_it_goes_on_after_the_server_comes_back(nats_server: EmbeddedServer) -> None:
    bus = await _setup(nats_server)
    try:
        nc = bus.nc
        puller = await pull_subscribe(bus.js, durable="d", stream=STREAM)
        with pytest.raises(TimeoutError):
            await puller.fetch(5, timeout=0.2)  # a request open when the server goes
        nats_server.stop()
        while nc.is_connected:
            await asyncio.sleep(0.01)
        nats_server.start()
        while not (nc.is_connected and nc.stats["reconnects"] >= 1):
            await asyncio.sleep(0.01)
        await bus.js.publish("pt.a", b"back")

        async def fetched() -> list[bytes]:
            while True:
                try:
                    return [m.data for m in await puller.fetch(5, timeout=1.0)]
                except (TimeoutError, nats.js.errors.Error):
                    pass  # (the server may refuse a request while its JetStream starts again)

        assert await asyncio.wait_for(fetched(), WAIT_S) == [b"back"]
    finally:
        await bus.close()


async def test_a_request_still_open_is_not_asked_again(nats_server: EmbeddedServer) -> None:
    """A fetch that finds nothing while the last request still has messages to give waits on
    that request rather than asking for a batch more."""
    bus = await _setup(nats_server)
    try:
        puller = await pull_subscribe(bus.js, durable="d", stream=STREAM)
        for i in range(3):
            await bus.js.publish("pt.a", b"%d" % i)
        first: list[bytes] = []
        while len(first) < 3:  # its request stays open for 7 more
            first += [m.data for m in await puller.fetch(10, timeout=WAIT_S)]
        waiting = asyncio.ensure_future(puller.fetch(10, timeout=WAIT_S))
        while not puller._wake._waiters:  # (the fetch waits on the open request)
            await asyncio.sleep(0.01)
        assert (await bus.js.consumer_info(STREAM, "d")).num_waiting == 1
        for i in range(3, 100):
            await bus.js.publish("pt.a", b"%d" % i)
        later = [m.data for m in await waiting]
        assert later and later == [b"%d" % i for i in range(3, 3 + len(later))]
        info = await bus.js.consumer_info(STREAM, "d")
        assert info.num_ack_pending == 10 and info.num_waiting == 0
    finally:
        await bus.close()


def test_the_benchmark_runs_both_ways() -> None:
    """tools/pull_cost.py end to end on a few messages; its figures belong to docs/performance.md."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "tools" / "pull_cost.py"), "--messages", "300", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    for way in ("nats-py", "Puller"):
        line = rf"^{way}: median [0-9.]+ us a message over 1 rounds$"
        assert re.search(line, done.stdout, re.M), done.stdout


def test_a_server_before_2_14_is_not_asked_for_a_reset() -> None:
    assert knows_reset("2.15.1") and knows_reset("2.14.0") and knows_reset("3.0.0")
    assert knows_reset("2.14.0-RC.1") and knows_reset("2.16.0-dev+abc")
    assert not knows_reset("2.13.9") and not knows_reset("2.10.22") and not knows_reset("0.0.0-unknown")
    assert knows_reset("not a version")  # the request then says
