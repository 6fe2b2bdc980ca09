"""What publishing a batch costs the client: CPU per message through nats-py's `publish`, one
call per message, and through `MeshClient.publish_many` (mesh's own protocol lines, handed to
the client's buffer at once), alternated, on an embedded nats-server.

    .venv/bin/python tools/publish_rate.py                  # batches of 500, 40 a round, 3 rounds
    .venv/bin/python tools/publish_rate.py --batch 100 --rounds 5

Each message is like a brain's event: a subject of a task transition, about 200 bytes of JSON,
a reply subject, and the `Mesh-Type` and `Nats-Msg-Id` headers. Nothing subscribes to them:
this measures the client alone (process CPU time, which other work on the machine does not
add to), each batch followed by a flush.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this checkout's mesh, not whichever one the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.natsclient import MeshClient, Outgoing  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.ops.embedded import EmbeddedServer  # noqa: E402

BODY = b'{"type":"task.succeeded","plan_id":"bench-1","task_id":"t%d","attempt":1,"at":1.5,"worker":"w"}'


def batch(n: int) -> list[Outgoing]:
    return [
        (
            f"mesh.evt.task.bench-1.t{i}.succeeded",
            (BODY % i) * 2,
            f"_INBOX.rate.{i}",
            {"Mesh-Type": "task.succeeded", "Nats-Msg-Id": f"bench-1.t{i}:1:succeeded"},
        )
        for i in range(n)
    ]


async def measure(url: str, size: int, batches: int, rounds: int) -> dict[str, list[float]]:
    bus = await connect(load_settings(server=url, environ={}), "publish-rate")
    nc = bus.nc
    assert isinstance(nc, MeshClient)
    msgs = batch(size)
    out: dict[str, list[float]] = {"publish": [], "publish_many": []}
    try:
        for r in range(rounds):
            order = ["publish", "publish_many"] if r % 2 == 0 else ["publish_many", "publish"]
            for way in order:
                began = time.process_time()
                for _ in range(batches):
                    if way == "publish":
                        for subject, data, reply, headers in msgs:
                            await nc.publish(subject, data, reply=reply, headers=dict(headers or {}))
                    else:
                        await nc.publish_many(msgs)
                    await nc.flush()
                out[way].append(1e6 * (time.process_time() - began) / (size * batches))
    finally:
        await bus.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=500, help="messages a batch (default 500)")
    ap.add_argument("--batches", type=int, default=40, help="batches a round (default 40)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each way once a round (default 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp), port=-1, durability="lazy")
        server.start()
        try:
            got = asyncio.run(measure(server.url, args.batch, args.batches, args.rounds))
        finally:
            server.stop()
    for way, each in got.items():
        runs = ", ".join(f"{v:.2f}" for v in each)
        print(f"{way:13s} median {statistics.median(each):.2f} µs of CPU a message ({runs})")


if __name__ == "__main__":
    main()
