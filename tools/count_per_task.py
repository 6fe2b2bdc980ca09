"""What one task costs the NATS server: stored messages, server-side messages and API calls, disk syncs.

    .venv/bin/python tools/count_per_task.py                      # 2000 independent + 200 chained, both modes
    .venv/bin/python tools/count_per_task.py --tasks 500 --chain 100 --durability always --json out.json
    .venv/bin/python tools/count_per_task.py --body true --chain 0 --no-strace    # shell tasks

For each durability (`always`, `lazy`) a stack of its own (tools/bench.py's: an embedded
nats-server, a brain, the workers, the gateway), and on it a plan of N independent no-op tasks
and a chain of M, each counted from submit to the plan final and quiet:

  writes     per stream (events, work, commands, every KV bucket's `KV_*`, object stores): the
             stream's last sequence delta, i.e. the messages stored (a work item acknowledged
             is purged soon after, so `state.messages` would not show it)
  server     the server's `/varz` in_msgs/out_msgs (every message clients publish, every message it
             delivers, publish acks and pull requests included) and `/jsz` JetStream API calls
  syncs      the server process's fsync/fdatasync calls (strace -f -y attached for a second run of
             the same plan, so strace's overhead stays out of the timings), by file: message
             blocks or consumer state; and the bytes /proc/PID/io says it wrote
  cpu        each process's CPU seconds (tools/bench.py's cpu_s)

All per task. Counts do not depend on the machine's load; the timings and CPU seconds do.
The benchmark's own client (submit, polling the plan record) is in the server's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench

from agents.base import run_loop
from mesh.bus.connect import connect
from mesh.bus.history import read_history
from mesh.bus.publish import Bus
from mesh.events import type_of
from mesh.host.config import load_settings
from mesh.ops.embedded import server_config
from mesh.ops.up import Stack

SYSCALLS = ("fsync", "fdatasync", "write", "pwrite64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def monitored_stack(tmp: str, args: argparse.Namespace, durability: str, http_port: int) -> Stack:
    """tools/bench.py's stack, its server config with a monitoring port added (the tool's own
    config text: mesh's runtime config stays as it is)."""
    settings = dict(setting.split("=", 1) for setting in args.setting)
    env = {f"MESH_{name.upper()}": value for name, value in settings.items()}
    stack = bench.bench_stack(tmp, args.workers, args.slots, durability, env=env)
    base = server_config(-1, str(Path(tmp) / "jetstream"), durability=durability)
    stack.server.config_text = base + f"http: 127.0.0.1:{http_port}\n"
    return stack


def monitor(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


async def snapshot(bus: Bus, stack: Stack, http_port: int) -> dict[str, Any]:
    """Every stream's last sequence and message count, the server's counters, CPU seconds, I/O."""
    streams = {}
    for info in await bus.js.streams_info():
        streams[info.config.name] = {"seq": info.state.last_seq, "msgs": info.state.messages}
    varz = monitor(http_port, "/varz")
    jsz = monitor(http_port, "/jsz")
    io: dict[str, int] = {}
    assert stack.server.proc is not None
    try:
        c = psutil.Process(stack.server.proc.pid).io_counters()
        io = {"write_bytes": c.write_bytes, "write_calls": c.write_count}
    except (psutil.Error, AttributeError):
        pass
    return {
        "streams": streams,
        "in_msgs": varz["in_msgs"],
        "out_msgs": varz["out_msgs"],
        "in_bytes": varz["in_bytes"],
        "out_bytes": varz["out_bytes"],
        "api": jsz.get("api", {}).get("total", 0),
        "io": io,
        "cpu": bench.cpu_seconds(stack),
    }


async def quiet(bus: Bus, stack: Stack, http_port: int, settle_s: float = 1.0) -> dict[str, Any]:
    """A snapshot once no stream has moved for settle_s: a plan's trailing writes counted too."""
    last = await snapshot(bus, stack, http_port)
    while True:
        await asyncio.sleep(settle_s)
        now = await snapshot(bus, stack, http_port)
        if now["streams"] == last["streams"]:
            return now
        last = now


def per_task(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    writes = {}
    for name, a in after["streams"].items():
        b = before["streams"].get(name, {"seq": 0, "msgs": 0})
        if a["seq"] != b["seq"]:
            writes[name] = round((a["seq"] - b["seq"]) / n, 3)
    out: dict[str, Any] = {
        "writes_per_task": dict(sorted(writes.items(), key=lambda kv: -kv[1])),
        "writes_total_per_task": round(sum(writes.values()), 2),
    }
    for key in ("in_msgs", "out_msgs", "api"):
        out[f"{key}_per_task"] = round((after[key] - before[key]) / n, 2)
    out["in_bytes_per_task"] = round((after["in_bytes"] - before["in_bytes"]) / n)
    if before["io"] and after["io"]:
        out["disk_write_bytes_per_task"] = round(
            (after["io"]["write_bytes"] - before["io"]["write_bytes"]) / n
        )
    out["cpu_ms_per_task"] = {
        k: round(v * 1000 / n, 3) for k, v in bench.cpu_used(before["cpu"], after["cpu"]).items()
    }
    return out


def start_strace(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    strace = shutil.which("strace")
    if strace is None:
        return None
    # -y: each call's file descriptor with its path, so the calls are told apart by file
    trace = "trace=" + ",".join(SYSCALLS)
    proc = subprocess.Popen(
        [strace, "-f", "-y", "-qq", "-s", "0", "-o", str(out), "-e", trace, "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached to every thread before the plan starts
    return proc


_CALL = re.compile(r"(\w+)\((\d+)<([^>]*)>")


def file_kind(path: str) -> str:
    """A store file's kind: `STREAM/msgs` (message blocks), `STREAM/obs` (consumer state), ..."""
    if "/streams/" not in path:
        return "socket" if path.startswith(("TCP", "UNIX", "socket")) else "other"
    parts = path.split("/streams/", 1)[1].split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def parse_strace(text: str) -> dict[str, dict[str, int]]:
    """Calls per syscall and kind of file (`file_kind`) in `strace -f -y` output."""
    calls: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = _CALL.search(line)
        if m is None or m.group(1) not in SYSCALLS:
            continue
        by_file = calls.setdefault(m.group(1), {})
        kind = file_kind(m.group(3))
        by_file[kind] = by_file.get(kind, 0) + 1
    return calls


def stop_strace(proc: subprocess.Popen[bytes], out: Path) -> dict[str, dict[str, int]]:
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    return parse_strace(out.read_text(errors="replace"))


async def count_plan(
    bus: Bus, stack: Stack, http_port: int, text: str, n: int, chain: bool, trace: bool, tmp: str
) -> dict[str, Any]:
    before = await quiet(bus, stack, http_port)
    r = await bench.run_plan(bus, text, n, stack)
    after = await quiet(bus, stack, http_port)
    result: dict[str, Any] = {
        "tasks": n,
        "status": r["status"],
        "tasks_per_s": r["tasks_per_s"],
        **per_task(before, after, n),
    }
    kinds: dict[str, int] = {}
    async for entry in read_history(bus, bus.names.plan_filter(r["plan_id"])):
        kind = type_of(entry.msg) if entry.msg is not None else "unreadable"
        kinds[kind] = kinds.get(kind, 0) + 1
    result["events_per_task"] = {k: round(v / n, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    if chain:
        h = await bench.hops(bus, r["plan_id"])
        result["hop_p50_ms"] = h["hop_p50_ms"]
    if trace:
        assert stack.server.proc is not None
        out = Path(tmp) / "strace.txt"
        proc = start_strace(stack.server.proc.pid, out)
        if proc is not None:
            try:
                r2 = await bench.run_plan(bus, text, n)
                await quiet(bus, stack, http_port)
            finally:
                calls = stop_strace(proc, out)
            result["syscalls_per_task"] = {k: round(sum(v.values()) / n, 2) for k, v in sorted(calls.items())}
            result["syscalls_per_task_by_file"] = {
                k: {f: round(c / n, 3) for f, c in sorted(v.items(), key=lambda fc: -fc[1])}
                for k, v in sorted(calls.items())
            }
            result["syscalls_status"] = r2["status"]
    return result


async def main_async(
    args: argparse.Namespace, stack: Stack, http_port: int, durability: str, tmp: str
) -> dict[str, Any]:
    settings = load_settings(server=stack.url, environ={})
    bus = await connect(settings, "count", wait_s=10)
    await bus.ensure_resources()
    await bench.wait_agents(bus, len(stack.children))
    await bench.run_plan(bus, bench.make_plan(20, "noop", title="warm-up"), 20)
    trace = not args.no_strace
    results: dict[str, Any] = {}
    try:
        if args.tasks:
            text = bench.make_plan(args.tasks, args.body)
            results["independent"] = await count_plan(
                bus, stack, http_port, text, args.tasks, False, trace, tmp
            )
        if args.chain:
            text = bench.make_plan(args.chain, args.body, chain=True, title="chain")
            results["chain"] = await count_plan(bus, stack, http_port, text, args.chain, True, trace, tmp)
    finally:
        await bus.close()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for durability in args.durability or ("always", "lazy"):
        with tempfile.TemporaryDirectory(prefix="mesh-count-") as tmp:
            port = free_port()
            stack = monitored_stack(tmp, args, durability, port)
            stack.start()
            try:
                results[durability] = run_loop(main_async(args, stack, port, durability, tmp))
            finally:
                stack.stop()
    results["machine"] = {
        "cpus": os.cpu_count(),
        "load_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "workers": args.workers,
        "slots": args.slots,
    }
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000, help="independent no-op tasks (0: none)")
    ap.add_argument("--chain", type=int, default=200, help="chained no-op tasks (0: none)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument(
        "--durability", action="append", choices=("always", "lazy"), help="repeatable; default: both"
    )
    ap.add_argument(
        "--body", default="noop", help="the tasks' body: noop (no process), or a shell command such as true"
    )
    ap.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a mesh setting for the agents (MESH_<NAME>), repeatable: start_report_after_s=0.1",
    )
    ap.add_argument("--no-strace", action="store_true", help="skip the second, strace-counted run")
    ap.add_argument("--json", help="write the results here too")
    return ap


def table(results: dict[str, Any]) -> Table:
    t = Table(title="per task", title_justify="left")
    t.add_column("durability / plan")
    t.add_column("tasks/s", justify="right")
    t.add_column("stored msgs", justify="right")
    t.add_column("by stream")
    t.add_column("in/out msgs", justify="right")
    t.add_column("JS API", justify="right")
    t.add_column("fsync+fdatasync", justify="right")
    t.add_column("disk bytes", justify="right")
    t.add_column("cpu ms")
    for durability, plans in results.items():
        if durability == "machine":
            continue
        for name, r in plans.items():
            sys_ = r.get("syscalls_per_task", {})
            syncs = round(sys_.get("fsync", 0) + sys_.get("fdatasync", 0), 2) if sys_ else "-"
            t.add_row(
                f"{durability} / {name} ({r['tasks']})",
                str(r["tasks_per_s"]),
                str(r["writes_total_per_task"]),
                " ".join(f"{k}={v}" for k, v in r["writes_per_task"].items())
                + "\nevents: "
                + " ".join(f"{k}={v}" for k, v in r["events_per_task"].items()),
                f"{r['in_msgs_per_task']}/{r['out_msgs_per_task']}",
                str(r["api_per_task"]),
                str(syncs),
                str(r.get("disk_write_bytes_per_task", "-")),
                " ".join(f"{k}={v}" for k, v in r["cpu_ms_per_task"].items()),
            )
    return t


def main() -> int:
    args = parser().parse_args()
    results = run(args)
    Console(width=240).print(table(results))
    Console(width=240).print(json.dumps(results["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
