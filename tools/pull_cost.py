"""What fetching a durable consumer's messages costs the client: nats-py's pull subscription
against mesh's `Puller` (mesh/bus/pull.py), alternated, in process CPU time a message fetched
and acknowledged.

    .venv/bin/python tools/pull_cost.py                      # 40,000 messages, 6 rounds
    .venv/bin/python tools/pull_cost.py --messages 100000 --rounds 8 --batch 64

Each round publishes the messages (about the size of a worker's report) to a stream on an
embedded nats-server (lazy sync: this measures the client, not the disk), makes a durable
explicit-ack consumer, and fetches them `--batch` at a time until all came, acknowledging each
batch with `ack_many`, as the brain does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nats.js import api

# this checkout's mesh, not whichever one the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.natsclient import MeshClient  # noqa: E402
from mesh.bus.publish import Bus  # noqa: E402
from mesh.bus.pull import Fetcher, Puller  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.ops.embedded import EmbeddedServer  # noqa: E402

STREAM = "PULLCOST"
PAYLOAD = b'{"type":"run.finished","plan_id":"plan-0000000000-cost","task_id":"t12345","attempt":1,' * 2


async def fill(bus: Bus, n: int, tag: str) -> None:
    nc = bus.nc
    assert isinstance(nc, MeshClient)
    for at in range(0, n, 1000):
        await nc.publish_many(
            (f"cost.{i % 8}", PAYLOAD, "", {"Nats-Msg-Id": f"{tag}.{i}"})
            for i in range(at, min(n, at + 1000))
        )
    await nc.flush()


async def drain(bus: Bus, sub: Fetcher, n: int, batch: int) -> float:
    """CPU seconds a message to fetch and acknowledge `n` messages."""
    nc = bus.nc
    assert isinstance(nc, MeshClient)
    got = 0
    began = time.process_time()
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except TimeoutError:
            continue
        got += len(msgs)
        await nc.ack_many(msgs)
    return (time.process_time() - began) / n


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp), port=-1, durability="lazy")
        server.start()
        try:
            bus = await connect(load_settings(server=server.url, environ={}), "pull-cost", wait_s=30)
            try:
                await bus.js.add_stream(name=STREAM, subjects=["cost.>"])
                took: dict[str, list[float]] = {"nats-py": [], "Puller": []}
                for r in range(args.rounds):
                    await bus.js.purge_stream(STREAM)
                    name = f"c{r}"
                    config = api.ConsumerConfig(
                        durable_name=name, ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=-1
                    )
                    await bus.js.add_consumer(STREAM, config)
                    await fill(bus, args.messages, name)
                    way = ("nats-py", "Puller")[(r + (r // 2)) % 2]  # nats-py first, then each first in turn
                    sub: Fetcher
                    if way == "Puller":
                        sub = await Puller(bus.js, STREAM, name)._start()
                    else:
                        sub = await bus.js.pull_subscribe_bind(durable=name, stream=STREAM)
                    each = await drain(bus, sub, args.messages, args.batch)
                    took[way].append(each)
                    print(f"round {r + 1}: {way:8s} {each * 1e6:.2f} us of CPU a message", flush=True)
                    await bus.js.delete_consumer(STREAM, name)
                for way, values in took.items():
                    if values:
                        median = statistics.median(values) * 1e6
                        print(f"{way}: median {median:.2f} us a message over {len(values)} rounds")
            finally:
                await bus.close()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=256, help="messages a fetch asks for (the brain's: 256)")
    asyncio.run(main(parser.parse_args()))
