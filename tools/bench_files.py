"""Files through the object store: bundles, artifacts and a big plan's store, timed (a model's
file: tools/bench_models.py).

    .venv/bin/python tools/bench_files.py                      # everything, table + --json
    .venv/bin/python tools/bench_files.py --only artifacts --sizes 200

Scenarios (an embedded nats-server of its own, file storage, one host: "another host" is
another directory, reached over the loopback):
  bundle     N files of S bytes stored as content-addressed blobs (`put_blob`): cold (each
             hashed and sent), warm (all already there: hashed, found, nothing sent); then each
             fetched into another directory (`fetch_file`); MB/s
  artifacts  one file of each size (MB) stored (`put_file`) and fetched (`fetch_file`); MB/s
  plan       a plan of N shell tasks with small outputs, then one whose tasks each keep a small
             file (`- artifacts:`), run by a real brain and workers: the time, and what the
             store holds afterwards (the objects bucket, the events stream, the store
             directory on disk)

Timings live here (and in docs/performance.md), never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402

from agents.base import run_loop  # noqa: E402
from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.files import (  # noqa: E402
    blob_name,
    fetch_file,
    put_blob,
    put_file,
    sha256_file,
)
from mesh.bus.publish import Bus  # noqa: E402
from mesh.bus.read import read_bucket  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.ops.embedded import EmbeddedServer  # noqa: E402
from mesh.plan import parse_plan  # noqa: E402

SCENARIOS = ("bundle", "artifacts", "plan")
MB = 2**20


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / MB / seconds, 1) if seconds > 0 else 0.0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def scenario_bundle(bus: Bus, tmp: Path, n: int, size_kb: int) -> dict[str, Any]:
    src = tmp / "bundle-src"
    src.mkdir()
    for i in range(n):
        (src / f"f{i:05d}.bin").write_bytes(os.urandom(size_kb * 1024))
    paths = sorted(src.iterdir())
    total = n * size_kb * 1024
    store = await bus.objects()

    async def put_all() -> tuple[float, int, list[tuple[str, int]]]:
        began = time.perf_counter()
        sent = 0
        refs = []
        for p in paths:
            sha, sz = await asyncio.to_thread(sha256_file, str(p))
            sent += await put_blob(store, str(p), sha)
            refs.append((sha, sz))
        return time.perf_counter() - began, sent, refs

    cold_s, cold_sent, refs = await put_all()
    warm_s, warm_sent, _ = await put_all()
    dest = tmp / "bundle-dest"
    began = time.perf_counter()
    for p, (sha, sz) in zip(paths, refs, strict=True):
        await fetch_file(store, blob_name(sha), str(dest / p.name), sha256=sha, size=sz)
    fetch_s = time.perf_counter() - began
    drop(src)
    drop(dest)
    return {
        "files": n,
        "file_kb": size_kb,
        "total_mb": round(total / MB, 1),
        "cold_put_s": round(cold_s, 2),
        "cold_put_mb_s": mbps(total, cold_s),
        "cold_sent": cold_sent,
        "warm_put_s": round(warm_s, 2),
        "warm_put_mb_s": mbps(total, warm_s),
        "warm_sent": warm_sent,
        "fetch_s": round(fetch_s, 2),
        "fetch_mb_s": mbps(total, fetch_s),
        "files_per_s_fetch": round(n / fetch_s, 1) if fetch_s else 0.0,
    }


async def move_file(bus: Bus, src: Path, name: str, tmp: Path) -> dict[str, Any]:
    """Put `src` into the store and fetch it into another directory."""
    store = await bus.objects()
    size = src.stat().st_size
    began = time.perf_counter()
    ref = await put_file(store, name, str(src))
    put_s = time.perf_counter() - began
    dest = tmp / "elsewhere" / src.name
    began = time.perf_counter()
    await fetch_file(store, name, str(dest), sha256=ref.sha256, size=ref.size)
    fetch_s = time.perf_counter() - began
    drop(dest.parent)
    await store.delete(name)
    return {
        "mb": round(size / MB, 1),
        "put_s": round(put_s, 2),
        "put_mb_s": mbps(size, put_s),
        "fetch_s": round(fetch_s, 2),
        "fetch_mb_s": mbps(size, fetch_s),
        "total_s": round(put_s + fetch_s, 2),
    }


async def scenario_artifacts(bus: Bus, tmp: Path, sizes: list[int]) -> dict[str, Any]:
    out = {}
    for mb in sizes:
        src = tmp / f"artifact-{mb}mb.bin"
        with open(src, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(MB))
        out[f"{mb}MB"] = await move_file(bus, src, f"artifacts/bench/t/1/{src.name}", tmp)
        src.unlink()
    return out


def plan_text(n: int, artifacts: bool) -> str:
    lines = ["# files bench", "", "## Tasks", ""]
    for i in range(n):
        lines.append(f"### t{i}")
        lines.append("- retries: 0")
        if artifacts:
            lines.append(f"- artifacts: out-{i}.txt")
            body = f'echo "task {i} made this" > out-{i}.txt; echo "task {i} done"'
        else:
            body = f'echo "task {i} done"'
        lines += ["```shell", body, "```", ""]
    return "\n".join(lines)


async def store_sizes(bus: Bus, store_dir: Path) -> dict[str, int]:
    objects = await bus.js.stream_info(f"OBJ_{bus.names.objects_bucket}")
    events = await bus.js.stream_info(bus.names.events_stream)
    return {
        "objects_bytes": int(objects.state.bytes),
        "objects_msgs": int(objects.state.messages),
        "events_bytes": int(events.state.bytes),
        "store_dir_bytes": dir_bytes(store_dir),
    }


async def run_plan(bus: Bus, store_dir: Path, n: int, artifacts: bool, workdir: Path) -> dict[str, Any]:
    await bus.objects()
    before = await store_sizes(bus, store_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = parse_plan(plan_text(n, artifacts), source="files-bench.md", workdir=str(workdir))
    began = time.perf_counter()
    plan_id = await client.submit(bus, spec)
    while True:
        plan = await client.get_plan(bus, plan_id)
        if plan is not None and plan.final:
            break
        await asyncio.sleep(0.2)
    took = time.perf_counter() - began
    after = await store_sizes(bus, store_dir)
    delta = {k: after[k] - before[k] for k in after}
    return {
        "tasks": n,
        "artifacts": artifacts,
        "status": plan.status,
        "run_s": round(took, 1),
        "tasks_per_s": round(n / took, 1),
        "objects_mb": round(delta["objects_bytes"] / MB, 2),
        "objects_msgs": delta["objects_msgs"],
        "events_mb": round(delta["events_bytes"] / MB, 2),
        "store_dir_mb": round(delta["store_dir_bytes"] / MB, 2),
        "store_dir_bytes_per_task": round(delta["store_dir_bytes"] / n),
    }


async def scenario_plan(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    stack = bench.bench_stack(
        str(tmp / "plan-server"),
        args.workers,
        args.slots,
        args.durability,
        env={"XDG_DATA_HOME": str(tmp / "data")},
        gateway=False,
    )
    stack.start()
    out: dict[str, Any] = {}
    try:
        bus = await connect(load_settings(server=stack.url, environ={}), "bench-files", wait_s=10)
        try:
            await bus.ensure_resources()
            agents = await bus.agents_kv()
            while len(await read_bucket(agents)) < len(stack.children):
                await asyncio.sleep(0.2)
            store_dir = tmp / "plan-server" / "jetstream"
            out["outputs_only"] = await run_plan(bus, store_dir, args.tasks, False, tmp / "plan-a")
            out["with_artifacts"] = await run_plan(bus, store_dir, args.tasks, True, tmp / "plan-b")
            out["store_total_mb"] = round(dir_bytes(store_dir) / MB, 1)
        finally:
            await bus.close()
    finally:
        stack.stop()
    return out


async def files_scenarios(args: argparse.Namespace, tmp: Path, only: set[str]) -> dict[str, Any]:
    server = EmbeddedServer(tmp / "server", port=-1, durability=args.durability)
    server.start()
    results: dict[str, Any] = {}
    try:
        bus = await connect(load_settings(server=server.url, environ={}), "bench-files", wait_s=10)
        try:
            await bus.ensure_resources()
            if "bundle" in only:
                results["bundle"] = await scenario_bundle(bus, tmp, args.files, args.file_kb)
            if "artifacts" in only:
                results["artifacts"] = await scenario_artifacts(bus, tmp, args.sizes)
        finally:
            await bus.close()
    finally:
        server.stop()
    return results


async def main_async(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    only = set(args.only or SCENARIOS)
    results = await files_scenarios(args, tmp, only) if only - {"plan"} else {}
    if "plan" in only:
        results["plan"] = await scenario_plan(args, tmp)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=500, help="files in the bundle")
    ap.add_argument("--file-kb", type=int, default=64, help="size of each bundle file, KiB")
    ap.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 10, 100],
        help="artifact sizes, MB, comma-separated",
    )
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks in the plan scenario")
    ap.add_argument("--only", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    bench.stack_options(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mesh-bench-files-") as tmp:
        results = run_loop(main_async(args, Path(tmp)))
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "durability": args.durability,
    }
    bench.show("mesh files bench", results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
