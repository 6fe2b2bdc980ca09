"""What loading task records costs the brain's memory: N no-op records decoded from bytes in
memory, decoded as read from a real KV bucket (as they are, or each made compact as it is read:
`mesh.machine_state.compact_record`), and built the way an acceptance builds them (shared
strings), each in a fresh process, RSS by psutil after a gc.

    .venv/bin/python tools/load_rss.py                  # 200,000 records
    .venv/bin/python tools/load_rss.py --records 50000

An embedded nats-server (lazy: this measures memory, not the disk) holds the bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

# this checkout's mesh, not whichever one the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.read import iter_revisions  # noqa: E402
from mesh.events import TaskSpec  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.machine_state import State, compact_record  # noqa: E402
from mesh.ops.embedded import EmbeddedServer  # noqa: E402
from mesh.records import TaskRecord, decode_task, encode_record  # noqa: E402

PLAN = "plan-0000000000-load"


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _record(i: int) -> TaskRecord:
    return TaskRecord(plan_id=PLAN, task_id=f"t{i}", spec=TaskSpec(id=f"t{i}", body=""))


async def _write(url: str, n: int) -> None:
    s = load_settings(server=url, environ={})
    bus = await connect(s, "load-rss", wait_s=10)
    await bus.ensure_resources()
    await bus.kv_put_many((s.names.tasks_bucket, f"{PLAN}.t{i}", encode_record(_record(i))) for i in range(n))
    await bus.close()


async def _read(url: str, compact: bool) -> list[TaskRecord]:
    s = load_settings(server=url, environ={})
    bus = await connect(s, "load-rss", wait_s=10)
    floats: dict[float, float] = {}
    out = [
        compact_record(decode_task(value), floats) if compact else decode_task(value)
        async for _, value, _ in iter_revisions(await bus.tasks_kv())
    ]
    await bus.close()
    return out


def measure(how: str, n: int, url: str) -> dict[str, float]:
    """One way of loading n records, in this process: MB of RSS it added."""
    if how == "memory":
        encoded = [encode_record(_record(i)) for i in range(n)]
        base = _rss_mb()
        records = [decode_task(v) for v in encoded]
    elif how in ("kv", "kv-compact"):
        base = _rss_mb()
        records = asyncio.run(_read(url, compact=how == "kv-compact"))
    else:  # built as an acceptance builds them: one string per plan, the task id shared with its spec
        base = _rss_mb()
        records = []
        for i in range(n):
            task_id = sys.intern(f"t{i}")
            records.append(TaskRecord(plan_id=PLAN, task_id=task_id, spec=TaskSpec(id=task_id, body="")))
    loaded = _rss_mb() - base
    state = State.load(records, [])
    after_load = _rss_mb() - base
    assert len(state.tasks) == n
    return {
        "records": n,
        "mb": round(loaded, 1),
        "bytes_each": round(loaded * 2**20 / n),
        "mb_after_state_load": round(after_load, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--one", choices=("memory", "kv", "kv-compact", "built"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.records, args.url or "")))
        return
    server = EmbeddedServer(
        Path(tempfile.mkdtemp(prefix="mesh-load-rss-")) / "nats", port=-1, durability="lazy"
    )
    server.start()
    try:
        asyncio.run(_write(server.url, args.records))
        for how in ("memory", "kv", "kv-compact", "built"):
            done = subprocess.run(
                [sys.executable, __file__, "--one", how, "--records", str(args.records), "--url", server.url],
                capture_output=True,
                text=True,
                check=True,
            )
            print(json.dumps({"load": how, **json.loads(done.stdout)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
