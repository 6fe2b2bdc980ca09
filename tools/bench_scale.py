"""mesh's scale benchmark: one generated plan of N no-op tasks (a million by default) through a
real stack, with the brain killed (SIGKILL) mid-run and started again.

    .venv/bin/python tools/bench_scale.py                    # 1,000,000 tasks
    .venv/bin/python tools/bench_scale.py --tasks 100000 --json scale.json

What it measures:
  accept        submit -> the plan accepted (its record counts every task)
  brain RSS     sampled every 0.25 s all the way (psutil): peak per phase (acceptance, run
                before the kill, after the restart) and overall; the server's the same way
  restart       the brain killed once --kill-at of the tasks are final: its new process's start
                -> the first task.released it publishes, and how long it took to load
  run           submit -> plan final, tasks/s
  views         while the plan is in flight, every --probe-every seconds: `mesh status` (the plan
                list, read and rendered), one frame of `mesh top` (`run_top(once=True)`, in process)
                and a scrape of the exporter's /metrics
  replay        `mesh replay` run once the plan is final, as an operator runs it (a process of
                its own, against the stack's server): the events/s it reports over the whole
                history, and the CPU seconds it, the server and each agent used meanwhile
  replay_in_bench  the same replay's code (`mesh.bus.history.replay`) run again inside this
                benchmark's process, whose heap holds what the run left (the figure the earlier
                runs in docs/performance.md reported as `replay`)

The plan is generated as a `PlanSpec` (the parser's `plan_max_tasks` bounds what a plan file may
ask, not what the brain accepts), submitted through the object store as `mesh submit` sends any
plan too big for one message. The server syncs lazily by default here (`--durability lazy`):
this is a benchmark of size, not of the disk. Timings live here and in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.base import run_loop  # noqa: E402
from mesh import events  # noqa: E402
from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.history import read_history, replay  # noqa: E402
from mesh.bus.publish import Bus  # noqa: E402
from mesh.cli import render  # noqa: E402
from mesh.cli.top import run_top  # noqa: E402
from mesh.events import PlanSpec, TaskSpec  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.ops.embedded import agent_command  # noqa: E402
from mesh.ops.up import Child, Stack  # noqa: E402
from tools.bench import (  # noqa: E402
    bench_stack,
    cpu_seconds,
    cpu_used,
    kill_brain,
    rss_of,
    show,
    stack_options,
    wait_agents,
)


def generate(n: int, title: str = "scale") -> PlanSpec:
    """n independent no-op tasks, no retries."""
    return PlanSpec(
        title=title,
        source="generated",
        tasks=tuple(TaskSpec(id=f"t{i}", body="", kind="noop", retries=0) for i in range(n)),
    )


class Results(dict[str, Any]):
    """The results, each also printed (and flushed) as it is measured: a run cut short still
    says what it measured."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{time.strftime('%H:%M:%S')} {key}: {json.dumps(value)}", flush=True)


class PhaseRss:
    """Samples the brain's RSS (whichever process it is now) every 0.25 s, by phase, and the
    server's beside it (`server_peak`)."""

    def __init__(self, stack: Stack) -> None:
        self.brain = next(c for c in stack.children if c.name == "brain")
        self.server = stack.server
        self.phase = "start"
        self.peak: dict[str, int] = {}
        self.server_peak: dict[str, int] = {}
        self.samples = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.25):
            server = rss_of(self.server.proc)
            if server is not None:
                self.server_peak[self.phase] = max(self.server_peak.get(self.phase, 0), server)
            rss = rss_of(self.brain.proc)
            if rss is None:
                continue
            self.samples += 1
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)

    def mb(self, server: bool = False) -> dict[str, float]:
        peak = self.server_peak if server else self.peak
        out = {k: round(v / 2**20, 1) for k, v in peak.items()}
        out["overall"] = max(out.values(), default=0.0)
        return out


async def views(bus: Bus, metrics_url: str) -> dict[str, float]:
    """Seconds for `mesh status` (the plan list), one `mesh top` frame, one exporter scrape."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    plans, damaged = await client.read_plans(bus)
    Console(file=io.StringIO(), width=160).print(render.plans_table(plans, damaged))
    out["status_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    await run_top(bus, Console(file=io.StringIO(), width=160, height=50), once=True)
    out["top_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url, timeout=30).read())
        out["exporter_s"] = time.perf_counter() - t0
        out["exporter_bytes"] = float(len(body))
    except OSError:
        out["exporter_s"] = -1.0
    return out


async def first_release(
    bus: Bus, plan_id: str, after_seq: int, not_before: float, timeout_s: float = 600
) -> float:
    """The time (the event's own) of the first task.released of the plan after `after_seq`
    decided at `not_before` or later. (A release the killed brain had written to its socket can
    reach the stream after the kill, and after `after_seq` was read: one such release, decided
    0.17 s before the new brain started, once made the restart look negative.)"""
    subject = bus.names.task_event(plan_id, "*", "released")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async for entry in read_history(bus, subject, start_seq=after_seq + 1, idle_timeout_s=1.0):
            if isinstance(entry.msg, events.TaskReleased) and entry.msg.at >= not_before:
                return entry.msg.at
        await asyncio.sleep(0.05)
    raise TimeoutError("no release after the restart")


REPLAYED = re.compile(r"replayed (\d+) events .*? in ([\d.]+)s,\s+([\d,]+)\s+events/s", re.S)


async def replay_command(stack: Stack) -> dict[str, Any]:
    """`mesh replay` as an operator runs it, in a process of its own against the stack's server:
    the events and seconds it reports, and the CPU seconds it and the server used."""
    before = cpu_seconds(stack)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [sys.executable, "-m", "mesh", "--server", stack.url, "replay"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={**stack.env, "COLUMNS": "200"},  # its summary on one line
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = err.decode(errors="replace")
    found = REPLAYED.search(text)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"mesh replay exited {proc.returncode}: {text[-2000:]}")
    used = cpu_used(before, cpu_seconds(stack))
    spent = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    used["mesh replay, its start included"] = round(spent, 2)
    return {
        "events": int(found[1]),
        "seconds": float(found[2]),
        "events_per_s": int(found[3].replace(",", "")),
        "cpu_s": used,
    }


async def main_async(
    args: argparse.Namespace, stack: Stack, rss: PhaseRss, metrics_url: str
) -> dict[str, Any]:
    settings = load_settings(server=stack.url, environ={})
    bus = await connect(settings, "bench", wait_s=10)
    await bus.ensure_resources()
    await wait_agents(bus, len(stack.children))
    n = args.tasks
    results: dict[str, Any] = Results(tasks=n)
    probes: list[dict[str, float]] = []
    try:
        began = time.perf_counter()
        spec = generate(n)
        results["generate_s"] = round(time.perf_counter() - began, 1)
        rss.phase = "acceptance"
        t_submit = time.perf_counter()
        plan_id = await client.submit(bus, spec)
        results["submit_s"] = round(time.perf_counter() - t_submit, 1)
        del spec
        next_probe = time.monotonic() + args.probe_every
        accepted = False
        killed = False
        while True:
            plan = await client.get_plan(bus, plan_id)
            now = time.perf_counter()
            if plan is not None and not accepted and sum(plan.counts.values()) >= n:
                accepted = True
                results["submit_to_accepted_s"] = round(now - t_submit, 1)
                rss.phase = "run"
            if plan is not None and plan.final:
                break
            if plan is not None and accepted and not killed and plan.done >= args.kill_at * n:
                killed = True
                results["killed_at_done"] = plan.done
                brain = kill_brain(stack)
                # read once the brain is gone: a release it published after an earlier read
                # was taken for the new brain's first (a restart of -0.02 s)
                last = (await bus.js.stream_info(bus.names.events_stream)).state.last_seq
                rss.phase = "after_restart"
                t0 = time.time()
                brain.start(stack.env)
                released = await first_release(bus, plan_id, last, t0)
                results["restart_to_first_release_s"] = round(released - t0, 2)
            if time.monotonic() >= next_probe and accepted:
                probes.append({**(await views(bus, metrics_url)), "done": float(plan.done if plan else 0)})
                print(
                    f"{time.strftime('%H:%M:%S')} probe: {json.dumps(probes[-1])} "
                    f"rss: {rss.mb()} server: {rss.mb(server=True)}",
                    flush=True,
                )
                next_probe = time.monotonic() + args.probe_every
            await asyncio.sleep(0.2)
        took = time.perf_counter() - t_submit
        results["status"] = plan.status
        results["submit_to_final_s"] = round(took, 1)
        results["tasks_per_s"] = round(n / took, 1)
        rss.phase = "final"
        results["brain_rss_mb"] = rss.mb()
        results["server_rss_mb"] = rss.mb(server=True)
        results["rss_samples"] = rss.samples
        for key in ("status_s", "top_s", "exporter_s"):
            values = [p[key] for p in probes if p.get(key, -1) >= 0]
            if values:
                results[key] = {
                    "probes": len(values),
                    "median": round(statistics.median(values), 3),
                    "max": round(max(values), 3),
                }
        if not args.no_replay:
            results["replay"] = await replay_command(stack)
            before, reader = cpu_seconds(stack), time.process_time()
            r = await replay(bus)
            # who used the cores meanwhile: the replay's own process, the server, the agents
            used = cpu_used(before, cpu_seconds(stack))
            used["replay"] = round(time.process_time() - reader, 2)
            results["replay_in_bench"] = {
                "events": r.events,
                "seconds": round(r.seconds, 1),
                "events_per_s": round(r.events / r.seconds) if r.seconds else 0,
                "cpu_s": used,
            }
    finally:
        await bus.close()
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--kill-at", type=float, default=0.3, help="kill the brain once this share is final")
    ap.add_argument("--probe-every", type=float, default=15.0, help="seconds between status/top/exporter")
    ap.add_argument("--metrics-port", type=int, default=0, help="the exporter's port (0: a free one)")
    ap.add_argument("--no-replay", action="store_true")
    stack_options(ap)
    ap.set_defaults(durability="lazy")
    return ap


def main() -> int:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="mesh-bench-scale-") as tmp:
        stack = bench_stack(tmp, args.workers, args.slots, args.durability, gateway=False)
        stack.start()
        if not args.metrics_port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                args.metrics_port = s.getsockname()[1]
        env = {**stack.env, "MESH_METRICS_PORT": str(args.metrics_port)}
        exporter = Child(
            "exporter", agent_command("exporter", stack.url), Path(tmp) / "logs" / "exporter.log"
        )
        exporter.start(env)
        stack.children.append(exporter)
        rss = PhaseRss(stack)
        try:
            results = run_loop(main_async(args, stack, rss, f"http://127.0.0.1:{args.metrics_port}/metrics"))
        finally:
            rss.done.set()
            stack.stop()
    results["machine"] = {
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "slots": args.slots,
        "durability": args.durability,
    }
    show("mesh bench_scale", results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
