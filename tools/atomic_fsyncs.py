"""How many disk syncs a JetStream atomic batch costs against the same messages published one by
one, on a nats-server with `sync_interval: always` (mesh's `durability = "always"`).

    .venv/bin/python tools/atomic_fsyncs.py                 # 400 messages, batches of 4, 10, 50, 400
    .venv/bin/python tools/atomic_fsyncs.py --messages 1000 --batch 100

An embedded nats-server (the one mesh runs), two streams (one with `allow_atomic`), and strace
attached to the server while each kind of publish runs: fsync/fdatasync calls and writes on the
streams' files, per message. Needs strace (apt install strace) and the right to attach to a child
process. The seconds include strace's overhead: compare them only with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

# this checkout's mesh, not whichever one the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.ops.embedded import EmbeddedServer  # noqa: E402


def _count(trace: Path) -> tuple[int, int]:
    """(syncs, writes) on stream files in an strace log."""
    syncs = writes = 0
    for line in trace.read_text().splitlines():
        if "/streams/" not in line:
            continue
        if "fsync(" in line or "fdatasync(" in line:
            syncs += 1
        elif "pwrite64(" in line or "write(" in line:
            writes += 1
    return syncs, writes


async def _publish(nc: Any, prefix: str, n: int, batch: int) -> None:
    """n messages: one by one, pipelined (batch 0), or as atomic batches of `batch`."""
    if not batch:
        await asyncio.gather(*(nc.request(f"{prefix}.{i}", b"x" * 200, timeout=30) for i in range(n)))
        return
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        batch_id = secrets.token_hex(11)
        for k in range(size):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(k + 1)}
            last = k == size - 1
            if last:
                headers["Nats-Batch-Commit"] = "1"
            await nc.publish(
                f"{prefix}.{start + k}", b"x" * 200, reply=inbox if last else "", headers=headers
            )
        ack = json.loads((await sub.next_msg(timeout=30)).data)
        if "error" in ack:
            raise SystemExit(f"the server refused a batch: {ack['error']}")
    await sub.unsubscribe()


async def main(messages: int, batches: list[int]) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="mesh-atomic-"))
    server = EmbeddedServer(tmp / "nats", port=-1, durability="always")
    server.start()
    assert server.proc is not None
    nc = await nats.connect(server.url)
    rows = []
    try:
        for size in [0, *batches]:
            name = f"S{size}"
            config = {"name": name, "subjects": [f"s{size}.>"], "storage": "file", "allow_atomic": bool(size)}
            reply = await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(), timeout=10)
            if b'"error"' in reply.data:
                raise SystemExit(f"could not create stream {name}: {reply.data.decode()}")
            trace = tmp / f"{name}.strace"
            strace = subprocess.Popen(
                [
                    "strace",
                    "-f",
                    "-y",
                    "-e",
                    "trace=fsync,fdatasync,pwrite64,write",
                    "-p",
                    str(server.proc.pid),
                ],
                stderr=open(trace, "w"),  # noqa: SIM115 - closed with the process
            )
            await asyncio.sleep(1.0)  # strace attached to every thread
            began = time.perf_counter()
            await _publish(nc, f"s{size}", messages, size)
            took = time.perf_counter() - began
            await asyncio.sleep(0.5)
            strace.terminate()
            strace.wait()
            syncs, writes = _count(trace)
            rows.append(
                {
                    "publish": f"atomic batches of {size}" if size else "one by one (pipelined)",
                    "messages": messages,
                    "syncs_per_msg": round(syncs / messages, 3),
                    "writes_per_msg": round(writes / messages, 3),
                    "seconds_under_strace": round(took, 3),
                }
            )
    finally:
        await nc.close()
        server.stop()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument(
        "--batch", type=int, action="append", help="atomic batch size (repeatable; default 4, 10, 50, 400)"
    )
    args = ap.parse_args()
    for row in asyncio.run(main(args.messages, args.batch or [4, 10, 50, 400])):
        print(json.dumps(row))
