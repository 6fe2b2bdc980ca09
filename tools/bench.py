"""End-to-end throughput benchmark: an embedded server and real agents run a plan of N tasks.

    .venv/bin/python tools/bench.py --tasks 1000 --workers 2 --slots 4 --body true

Prints a table and writes JSON (--json FILE). Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh import client  # noqa: E402
from mesh.bus import connect  # noqa: E402
from mesh.plan import parse_plan  # noqa: E402
from mesh.settings import load_settings  # noqa: E402
from mesh.up import Stack  # noqa: E402


def make_plan(n: int, body: str, chain: bool = False) -> str:
    """A plan of n tasks; body 'noop' makes no-op tasks, anything else is a shell body."""
    fence = "```noop" if body == "noop" else "```shell"
    lines = ["# bench", "", "## Tasks", ""]
    for i in range(n):
        lines.append(f"### t{i}")
        lines.append("- retries: 0")
        if chain and i:
            lines.append(f"- depends_on: t{i - 1}")
        lines += [fence, "" if body == "noop" else body, "```", ""]
    return "\n".join(lines)


class PeakRss:
    """Samples the RSS of the stack's agent processes until stopped."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.peak: dict[str, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.2):
            for child in self.stack.children:
                if child.proc is None:
                    continue
                try:
                    rss = psutil.Process(child.proc.pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak[child.name] = max(self.peak.get(child.name, 0), rss)


async def run_plan(url: str, text: str, n: int) -> dict[str, float]:
    settings = load_settings(server=url, environ={})
    began = time.perf_counter()
    spec = parse_plan(text, source="bench.md")
    parsed = time.perf_counter()
    bus = await connect(settings, "bench", wait_s=10)
    await bus.ensure_resources()
    plan_id = await client.submit(bus, spec)
    submitted = time.perf_counter()
    # poll the plan record (cheap) rather than follow every event (a client's cost, not mesh's)
    while True:
        plan = await client.get_plan(bus, plan_id)
        if plan is not None and plan.final:
            break
        await asyncio.sleep(0.05)
    finished = time.perf_counter()
    status = plan.status
    await bus.close()
    return {
        "tasks": n,
        "status": status,
        "parse_s": parsed - began,
        "submit_s": submitted - parsed,
        "run_s": finished - submitted,
        "tasks_per_s": n / (finished - submitted),
        "succeeded": (plan.counts.get("succeeded", 0) if plan else 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--body", default="noop", help="'noop', or the shell body of every task")
    ap.add_argument("--chain", action="store_true", help="each task depends on the previous one")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env["MESH_LOG_LEVEL"] = "WARNING"
        stack = Stack(tmp, -1, args.workers, args.slots, log_dir=str(Path(tmp) / "logs"), env=env)
        stack.start()
        rss = PeakRss(stack)
        rss.thread.start()
        try:
            result = asyncio.run(
                run_plan(stack.url, make_plan(args.tasks, args.body, args.chain), args.tasks)
            )
        finally:
            rss.done.set()
            stack.stop()
    result.update(
        {
            "workers": args.workers,
            "slots": args.slots,
            "body": args.body,
            "chain": args.chain,
            "cpus": os.cpu_count() or 0,
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in sorted(rss.peak.items())},
        }
    )
    table = Table(title="mesh bench", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
