"""The web console's benchmark: first paint and event-to-screen latency with a 10,000-task plan
running, and the console server's CPU while 1 and then 5 browsers watch it.

    .venv/bin/python tools/bench_console.py                # 10,000 tasks, 5 browsers
    .venv/bin/python tools/bench_console.py --tasks 2000 --browsers 3

An embedded nats-server, a brain and the console (`mesh up`'s Stack, no watchdog or gateway); the
plan is 100 chains of `sleep` tasks (layers x columns), so it runs for minutes. Headless Chromium
(Debian's, through playwright) opens the plan's page:

- first paint: from `goto` to the DAG's window and the first page of tasks drawn (and the browser's
  own first-contentful-paint), once before the workers start and once with the plan running;
- latency: a MutationObserver in the page notes when each node of the DAG window changes colour;
  the same transitions are read from the event stream with their `at` (the brain's clock, this
  machine's): screen time minus event time, for every transition seen in the window;
- CPU: the console process's CPU time over a window with 1 browser, then with N.

Timings live here and in docs/performance.md, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.consoleview import STATUS_OF_EVENT  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.ops.embedded import agent_command  # noqa: E402
from mesh.ops.up import Child, Stack  # noqa: E402
from mesh.plan import PlanLimits, parse_plan  # noqa: E402

OBSERVE = """() => {
  window.__seen = [];
  const svg = document.querySelector('svg.dag');
  new MutationObserver((ms) => {
    const now = Date.now();
    for (const m of ms) {
      const g = m.target;
      const c = (g.getAttribute && g.getAttribute('class')) || '';
      const st = c.startsWith('node n-') ? c.slice(7) : '';
      if (st) window.__seen.push([g.getAttribute('data-task'), st, now]);
    }
  }).observe(svg, { attributes: true, subtree: true, attributeFilter: ['class'] });
}"""


def make_plan(layers: int, columns: int, body: str) -> str:
    lines = ["# console bench", "", "## Tasks", ""]
    for layer in range(layers):
        for col in range(columns):
            lines.append(f"### t{layer}_{col}")
            lines.append("- retries: 0")
            if layer:
                lines.append(f"- depends_on: t{layer - 1}_{col}")
            lines += ["```shell", body, "```", ""]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def first_paint(context: Any, url: str) -> dict[str, float]:
    page = await context.new_page()
    began = time.perf_counter()
    await page.goto(url)
    await page.wait_for_selector("svg.dag g.node", timeout=120_000)
    await page.wait_for_selector("#tasks tbody tr", timeout=120_000)
    drawn = time.perf_counter() - began
    fcp = await page.evaluate(
        "() => (performance.getEntriesByName('first-contentful-paint')[0] || {startTime: 0}).startTime"
    )
    return {"drawn_ms": round(drawn * 1000, 1), "fcp_ms": round(float(fcp), 1), "page": page}  # type: ignore[dict-item]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--browsers", type=int, default=5)
    ap.add_argument("--window-s", type=float, default=20.0, help="each measuring window")
    ap.add_argument("--body", default="sleep 0.2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()
    from playwright.async_api import async_playwright

    columns = 100
    layers = max(1, args.tasks // columns)
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-console-"))
    web_port = free_port()
    stack = Stack(
        str(tmp / "data"),
        -1,
        0,
        args.slots,
        log_dir=str(tmp / "logs"),
        auditor=False,
        watchdog=False,
        gateway=False,
        durability="lazy",
        web_port=web_port,
    )
    stack.env.update({"MESH_LOG_LEVEL": "WARNING"})
    stack.start()
    out: dict[str, Any] = {"tasks": layers * columns, "layers": layers, "columns": columns, "body": args.body}
    try:
        settings = load_settings(server=stack.url, environ={**os.environ, "MESH_NATS_URL": stack.url})
        bus = await connect(settings, "bench-console", wait_s=30)
        await bus.ensure_resources()
        url = f"http://127.0.0.1:{web_port}/"
        web = next(c for c in stack.children if c.name == "web")
        assert web.proc is not None
        spec = parse_plan(
            make_plan(layers, columns, args.body), source="bench.md", limits=PlanLimits(max_tasks=10**6)
        )
        plan_id = await client.submit(bus, spec)
        while (await client.get_plan(bus, plan_id)) is None:
            await asyncio.sleep(0.1)
        page_url = f"{url}#/plan/{plan_id}"
        # the transitions, as the brain published them
        sent: dict[tuple[str, str], float] = {}

        async def follow() -> None:
            async for _, _, msg in client.follow(bus, bus.names.plan_filter(plan_id)):
                tag = type(msg).__struct_config__.tag if msg is not None else ""
                status = STATUS_OF_EVENT.get(str(tag))
                if status and hasattr(msg, "task_id"):
                    sent.setdefault((msg.task_id, status), msg.at)

        follower = asyncio.get_running_loop().create_task(follow())
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            contexts = [
                await browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900})
                for _ in range(args.browsers)
            ]
            idle = await first_paint(contexts[0], page_url)
            watcher = idle.pop("page")
            out["first_paint_before_workers"] = idle
            await watcher.evaluate(OBSERVE)
            for i in range(args.workers):
                child = Child(
                    f"worker-{i + 1}",
                    agent_command("worker", stack.url, "--slots", str(args.slots)),
                    tmp / "logs" / f"worker-{i + 1}.log",
                )
                stack.add(child)
            # one browser watching, the plan running
            await asyncio.sleep(3.0)
            c0, t0 = cpu_s(web.proc.pid), time.monotonic()
            await asyncio.sleep(args.window_s)
            out["web_cpu_pct_1_browser"] = round(
                100 * (cpu_s(web.proc.pid) - c0) / (time.monotonic() - t0), 1
            )
            running = []
            for ctx in contexts[1:]:
                paint = await first_paint(ctx, page_url)
                paint.pop("page")
                running.append(paint)
            out["first_paint_running"] = running
            c0, t0 = cpu_s(web.proc.pid), time.monotonic()
            await asyncio.sleep(args.window_s)
            out[f"web_cpu_pct_{args.browsers}_browsers"] = round(
                100 * (cpu_s(web.proc.pid) - c0) / (time.monotonic() - t0), 1
            )
            seen = await watcher.evaluate("() => window.__seen")
            lat = []
            for task, status, at_ms in seen:
                at = sent.get((task, status))
                if at is not None:
                    lat.append(at_ms / 1000 - at)
            lat.sort()
            out["latency_samples"] = len(lat)
            if lat:
                out["latency_ms"] = {
                    "median": round(statistics.median(lat) * 1000, 1),
                    "p95": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 1),
                    "max": round(lat[-1] * 1000, 1),
                }
            plan = await client.get_plan(bus, plan_id)
            out["plan_done_at_end"] = f"{plan.done if plan else '?'}/{layers * columns}"
            out["web_rss_mb"] = round(psutil.Process(web.proc.pid).memory_info().rss / 2**20, 1)
            await browser.close()
        follower.cancel()
        await bus.close()
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out["machine"] = f"{os.cpu_count()} CPUs, {round(psutil.virtual_memory().total / 2**30)} GB"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
