"""A model file through the models bucket: `mesh models push` and a worker's fetch, in MB/s,
with the shipped Gemma 3 270M GGUF (or any file) on an embedded nats-server of this machine.

    .venv/bin/python tools/bench_models.py                    # the shipped GGUF, synced store
    .venv/bin/python tools/bench_models.py --durability lazy  # the store synced on an interval
    .venv/bin/python tools/bench_models.py --file big.gguf --fetches 3

Push: `mesh.bus.modelstore.push_model` (hash the file, then send it in chunks); then the same
push again, which sends nothing. Fetch: `mesh.bus.files.fetch_file` into a fresh directory
each time (receive, hash as it arrives, fsync, rename), as a worker fills its model cache.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# this checkout's mesh, not whichever one the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.files import fetch_file  # noqa: E402
from mesh.bus.modelstore import models_store, push_model  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.host.modelfiles import resolve_path  # noqa: E402
from mesh.models import builtin_models  # noqa: E402
from mesh.ops.embedded import EmbeddedServer  # noqa: E402


async def measure(url: str, tmp: str, path: str, fetches: int) -> None:
    settings = load_settings(environ={"MESH_NATS_URL": url, "XDG_CONFIG_HOME": os.path.join(tmp, "cfg")})
    bus = await connect(settings, "bench-models")
    try:
        store = await models_store(bus, create=True)
        assert store is not None
        mb = os.path.getsize(path) / 1e6
        began = time.monotonic()
        record, sent = await push_model(store, "bench", path)
        took = time.monotonic() - began
        print(f"file {os.path.basename(path)}: {mb:.1f} MB")
        print(f"push (hash, send): {took:.2f} s, {mb / took:.1f} MB/s")
        began = time.monotonic()
        _, again = await push_model(store, "bench", path)
        print(f"push of the same bytes again: {time.monotonic() - began:.2f} s, sent: {again}")
        assert sent and not again
        for i in range(fetches):
            dest = os.path.join(tmp, f"cache{i}", record.file)
            began = time.monotonic()
            got = await fetch_file(store, record.object, dest, sha256=record.sha256, size=record.size)
            took = time.monotonic() - began
            rate = mb / took
            print(f"fetch {i + 1} (receive, hash, sync): {took:.2f} s, {rate:.1f} MB/s, tries {got.tries}")
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="", help="the file to push (default: the shipped 270M GGUF)")
    parser.add_argument("--durability", default="always", choices=("always", "lazy"))
    parser.add_argument("--fetches", type=int, default=2)
    args = parser.parse_args()
    path = args.file or resolve_path("gemma3-270m", builtin_models()["gemma3-270m"])
    tmp = tempfile.mkdtemp(prefix="bench-models-")
    server = EmbeddedServer(os.path.join(tmp, "nats"), port=-1, durability=args.durability)
    server.start()
    try:
        print(f"store durability: {args.durability}")
        asyncio.run(measure(server.url, tmp, path, args.fetches))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
