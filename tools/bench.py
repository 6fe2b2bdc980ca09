"""mesh's benchmark: an embedded nats-server and real agent processes, timed end to end.

    .venv/bin/python tools/bench.py                  # every scenario, table + JSON
    .venv/bin/python tools/bench.py --only throughput --tasks 2000
    .venv/bin/python tools/bench.py --models         # and the model benchmarks after them

Scenarios:
  throughput   a plan of N independent no-op tasks, submit -> plan final (tasks/s);
               again with a trivial shell body (`true`) to show the process-spawn cost
  chain        a chain of tasks: ms per hop from a task's end to its dependent's start
  submit       parse + validate + submit of an N-task plan
  recovery     a brain killed with 100,000 tasks known: restart -> first release, and its RSS
  scale        that 100,000-task plan run to the end
  replay       events/s through `mesh replay` over everything above
  export       events/s through `mesh export` over everything above (alone: over a
               no-op plan of its own and a tenth as many shell tasks with output)

--models then runs the model benchmarks, each its own tool and its own stacks:
  llm          tools/bench_llm.py --in-process: 64 short prompts through mesh with llm_slots 8,
               against the same decoder driven directly and against llm_slots 1
  embed        tools/bench_embed.py: 2,000 one-text embed tasks against one batched encode

File storage, every publish acknowledged; the server syncs every write to the disk
(`--durability always`, mesh's default) or every 2 minutes (`--durability lazy`).
Timings live here (and in docs/performance.md), never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nats.js.errors
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.base import run_loop  # noqa: E402
from agents.brain_commit import CHECKPOINT_KEY  # noqa: E402
from mesh import events  # noqa: E402
from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.history import read_history, replay  # noqa: E402
from mesh.bus.publish import Bus  # noqa: E402
from mesh.bus.read import read_bucket  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.ops.export import Options, export  # noqa: E402
from mesh.ops.up import Child, Stack  # noqa: E402
from mesh.plan import parse_plan  # noqa: E402
from mesh.records import decode_checkpoint  # noqa: E402

SCENARIOS = ("throughput", "chain", "submit", "recovery", "scale", "replay", "export")


def make_plan(n: int, body: str = "noop", chain: bool = False, title: str = "bench", cls: str = "cpu") -> str:
    """A plan of n tasks; body 'noop' makes no-op tasks, anything else is a shell body."""
    fence = "```noop" if body == "noop" else "```shell"
    text = "" if body == "noop" else body
    lines = [f"# {title}", "", "## Tasks", ""]
    for i in range(n):
        lines.append(f"### t{i}")
        lines.append("- retries: 0")
        if cls != "cpu":
            lines.append(f"- class: {cls}")
        if chain and i:
            lines.append(f"- depends_on: t{i - 1}")
        lines += [fence, text, "```", ""]
    return "\n".join(lines)


class PeakRss:
    """Samples the RSS of the stack's agent processes until stopped."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.peak: dict[str, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            for child in self.stack.children:
                rss = rss_of(child.proc)
                if rss is not None:
                    self.peak[child.name] = max(self.peak.get(child.name, 0), rss)

    def mb(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in sorted(self.peak.items())}


def rss_of(proc: Any) -> int | None:
    """A process's resident memory in bytes; None when there is none (not started, gone)."""
    if proc is None:
        return None
    try:
        rss: int = psutil.Process(proc.pid).memory_info().rss
    except psutil.Error:
        return None
    return rss


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU time (user + system) each process of the stack has used so far."""
    procs = [(c.name, c.proc.pid) for c in stack.children if c.proc is not None]
    if stack.server.proc is not None:
        procs.append(("server", stack.server.proc.pid))
    out = {}
    for name, pid in procs:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = t.user + t.system
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 2) for k in sorted(after) if k in before and after[k] > before[k]}


async def wait_final(bus: Bus, plan_id: str, timeout_s: float = 3600) -> str:
    # poll the plan record (cheap) rather than follow every event (a client's cost, not mesh's)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plan = await client.get_plan(bus, plan_id)
        if plan is not None and plan.final:
            return plan.status
        await asyncio.sleep(0.05)
    raise TimeoutError(f"plan {plan_id} not final after {timeout_s}s")


async def wait_agents(bus: Bus, expected: int, timeout_s: float = 120.0) -> None:
    """Until every agent of the stack has registered: the scenarios time a running mesh, not
    its start (the first plan otherwise shares the cores with the agents' imports)."""
    deadline = time.monotonic() + timeout_s
    kv = await bus.agents_kv()
    while time.monotonic() < deadline:
        if len(await read_bucket(kv)) >= expected:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"fewer than {expected} agents registered after {timeout_s}s")


async def run_plan(bus: Bus, text: str, n: int, stack: Stack | None = None) -> dict[str, Any]:
    began = time.perf_counter()
    spec = parse_plan(text, source="bench.md")
    parsed = time.perf_counter()
    cpu_before = cpu_seconds(stack) if stack else {}
    plan_id = await client.submit(bus, spec)
    submitted = time.perf_counter()
    status = await wait_final(bus, plan_id)
    finished = time.perf_counter()
    result = {
        "plan_id": plan_id,
        "tasks": n,
        "status": status,
        "parse_s": round(parsed - began, 3),
        "submit_s": round(submitted - parsed, 3),
        "run_s": round(finished - submitted, 3),
        "tasks_per_s": round(n / (finished - submitted), 1),
    }
    if stack:
        # where the cores went: CPU seconds of each process from submit to plan final
        result["cpu_s"] = cpu_used(cpu_before, cpu_seconds(stack))
    return result


async def hops(bus: Bus, plan_id: str) -> dict[str, Any]:
    """ms from each task's end (worker's run.finished) to its dependent's start (the worker's
    run.started, or `started_at` in run.finished for a task too short to report its start),
    and the median of each part of a hop, from the events' own times (the worker's and the
    brain's clocks) and the server's storage times (one host: one clock):

      report         the worker's end -> its run.finished stored
      brain_pickup   stored -> the brain decides (task.succeeded's time)
      events         the brain decides -> the dependent's task.released stored
      to_start       released stored -> its record and work item written, fetched, started

    (the parts of the hops through the brain only: a dependent its worker continued on
    from the task before, `continued`, started before the brain heard of either)
    """
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    stored: dict[tuple[str, str], float] = {}
    decided: dict[str, float] = {}
    continued: set[str] = set()
    async for entry in read_history(bus, bus.names.plan_filter(plan_id)):
        m = entry.msg
        if isinstance(m, events.RunStarted):
            started.setdefault(m.task_id, m.at)
        elif isinstance(m, events.RunFinished):
            finished[m.task_id] = m.at
            stored[("finished", m.task_id)] = entry.at
            if m.started_at:
                started.setdefault(m.task_id, m.started_at)
        elif isinstance(m, events.TaskSucceeded):
            decided[m.task_id] = m.at
        elif isinstance(m, events.TaskReleased):
            stored[("released", m.task_id)] = entry.at
            if m.worker:
                continued.add(m.task_id)
    gaps: list[float] = []
    through_brain: list[float] = []
    parts: dict[str, list[float]] = {"report": [], "brain_pickup": [], "events": [], "to_start": []}
    for i in range(len(finished)):
        a, b = f"t{i}", f"t{i + 1}"
        if b not in started or a not in finished:
            continue
        gaps.append((started[b] - finished[a]) * 1000)
        if b not in continued:
            through_brain.append(gaps[-1])
        if b not in continued and a in decided and ("finished", a) in stored and ("released", b) in stored:
            parts["report"].append(stored[("finished", a)] - finished[a])
            parts["brain_pickup"].append(decided[a] - stored[("finished", a)])
            parts["events"].append(stored[("released", b)] - decided[a])
            parts["to_start"].append(started[b] - stored[("released", b)])
    gaps.sort()
    return {
        "hops": len(gaps),
        "continued": len(continued),
        "hop_p50_ms": round(statistics.median(gaps), 2),
        "hop_p99_ms": round(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))], 2),
        # the hops the brain decided (a continued dependent's are the worker's alone)
        "hop_brain_p50_ms": round(statistics.median(through_brain), 2) if through_brain else None,
        "hop_parts_p50_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in parts.items() if v},
    }


def kill_brain(stack: Stack) -> Child:
    brain = next(c for c in stack.children if c.name == "brain")
    assert brain.proc is not None
    brain.proc.send_signal(signal.SIGKILL)
    brain.proc.wait()
    return brain


async def scenario_recovery(stack: Stack, bus: Bus, n: int, results: dict[str, Any], run_scale: bool) -> None:
    """n tasks known to the brain, no worker running: kill the brain, time its restart."""
    spec = parse_plan(make_plan(n, title="recovery"), source="recovery.md")
    began = time.perf_counter()
    plan_id = await client.submit(bus, spec)
    while True:
        plan = await client.get_plan(bus, plan_id)
        if plan is not None and plan.counts.get("ready", 0) > 0:
            break
        await asyncio.sleep(0.1)
    accepted_s = time.perf_counter() - began
    # and until the brain's checkpoint covers the acceptance: a restart then loads 100,000
    # records and folds nothing (killed before it, the new brain folds all 100,340 transitions
    # again and rewrites every record: 6 s more on these cores)
    last = (await bus.js.stream_info(bus.names.events_stream)).state.last_seq
    brain_kv = await bus.brain_kv()
    while True:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await brain_kv.get(CHECKPOINT_KEY)
            if decode_checkpoint(entry.value or b"").seq >= last:
                break
        await asyncio.sleep(0.1)
    brain = next(c for c in stack.children if c.name == "brain")
    assert brain.proc is not None
    rss_known = psutil.Process(brain.proc.pid).memory_info().rss
    kill_brain(stack)
    t0 = time.time()
    brain.start(stack.env)
    probe = parse_plan(make_plan(1, title="probe", cls="script"), source="probe.md")
    probe_id = await client.submit(bus, probe)
    released = None
    while released is None:
        async for entry in read_history(bus, bus.names.plan_filter(probe_id)):
            if isinstance(entry.msg, events.TaskReleased):
                released = entry.msg.at
        await asyncio.sleep(0.05)
    results["recovery"] = {
        "tasks_known": n,
        "submit_to_accepted_s": round(accepted_s, 2),
        "restart_to_first_release_s": round(released - t0, 2),
        "brain_rss_mb_with_tasks_known": round(rss_known / 2**20, 1),
        "brain_rss_mb_after_restart": round(psutil.Process(brain.proc.pid).memory_info().rss / 2**20, 1)
        if brain.proc
        else 0.0,
    }
    await client.cancel(bus, probe_id)
    if not run_scale:
        await client.cancel(bus, plan_id)
        return
    for child in stack.children:
        if child.name.startswith("worker") and not child.alive():
            child.start(stack.env)
    t1 = time.perf_counter()
    status = await wait_final(bus, plan_id)
    took = time.perf_counter() - t1
    results["scale"] = {
        "tasks": n,
        "status": status,
        "run_s": round(took, 1),
        "tasks_per_s": round(n / took, 1),
    }


async def main_async(args: argparse.Namespace, stack: Stack, rss: PeakRss) -> dict[str, Any]:
    settings = load_settings(server=stack.url, environ={})
    bus = await connect(settings, "bench", wait_s=10)
    await bus.ensure_resources()
    await wait_agents(bus, len(stack.children))
    # and a small plan through them, untimed: every agent is in its run loop before the clock starts
    await run_plan(bus, make_plan(20, "noop", title="warm-up"), 20)
    results: dict[str, Any] = {}
    only = set(args.only or SCENARIOS)
    try:
        if "throughput" in only:
            results["throughput_noop"] = await run_plan(bus, make_plan(args.tasks, "noop"), args.tasks, stack)
            if not getattr(args, "no_shell", False):
                results["throughput_shell"] = await run_plan(
                    bus, make_plan(args.tasks, "true"), args.tasks, stack
                )
        if "chain" in only:
            r = await run_plan(bus, make_plan(args.chain, "noop", chain=True), args.chain)
            results["chain"] = {**r, **(await hops(bus, r["plan_id"]))}
        if "submit" in only:
            text = make_plan(args.tasks)
            began = time.perf_counter()
            spec = parse_plan(text, source="bench.md")
            parsed = time.perf_counter()
            plan_id = await client.submit(bus, spec)
            results["submit"] = {
                "tasks": args.tasks,
                "parse_validate_s": round(parsed - began, 3),
                "submit_s": round(time.perf_counter() - parsed, 3),
                "total_s": round(time.perf_counter() - began, 3),
            }
            await wait_final(bus, plan_id)
        results["peak_rss_mb"] = rss.mb()
        if "recovery" in only or "scale" in only:
            for child in stack.children:
                if child.name.startswith("worker"):
                    child.terminate()
                    child.wait(60)
            await scenario_recovery(stack, bus, args.big, results, "scale" in only)
            results["peak_rss_mb_with_big_plan"] = rss.mb()
        if "replay" in only:
            r = await replay(bus)
            results["replay"] = {
                "events": r.events,
                "seconds": round(r.seconds, 2),
                "events_per_s": round(r.events / r.seconds, 0) if r.seconds else 0,
            }
        if "export" in only:
            if only == {"export"}:
                results["export_history"] = await run_plan(bus, make_plan(args.tasks, "noop"), args.tasks)
                # and a tenth as many shell tasks with 1.6 KB of output each: text to redact
                n = max(1, args.tasks // 10)
                body = "seq -f 'line %g of the build log, nothing secret in it' 1 30"
                results["export_history_shell"] = await run_plan(bus, make_plan(n, body, title="logs"), n)
            results["export"] = await scenario_export(bus)
    finally:
        await bus.close()
    return results


async def scenario_export(bus: Bus) -> dict[str, Any]:
    """`mesh export` of the whole history: events read (after the server's subject filter), the
    events of the stream the window spans, and the records written, per second."""
    with tempfile.TemporaryDirectory(prefix="mesh-bench-export-") as tmp:
        out = Path(tmp) / "history.jsonl"
        m = await export(bus, Options(out=out))
        size = out.stat().st_size
    window = m.last_seq - m.first_seq + 1 if m.records else 0
    return {
        "records": m.records,
        "events_read": m.events_read,
        "window_events": window,
        "seconds": m.seconds,
        "events_read_per_s": m.events_per_s,
        "window_events_per_s": round(window / m.seconds, 0) if m.seconds else 0,
        "records_per_s": round(m.records / m.seconds, 0) if m.seconds else 0,
        "jsonl_mb": round(size / 2**20, 1),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks in the throughput and submit plans")
    ap.add_argument("--chain", type=int, default=500, help="tasks in the chain")
    ap.add_argument(
        "--big", type=int, default=100_000, help="tasks known to the brain for recovery and scale"
    )
    ap.add_argument("--only", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    stack_options(ap)
    ap.add_argument("--no-shell", action="store_true", help="throughput: the no-op plan only")
    ap.add_argument(
        "--models",
        action="store_true",
        help="then the model benchmarks, each in a process of its own (see MODEL_BENCHES)",
    )
    return ap


# the model benchmarks `--models` runs after the scenarios: each tool starts its own stacks and
# compares mesh with the same model driven directly (docs/gpus.md, "Parallel decoding" and
# "Batched embeddings")
MODEL_BENCHES = {
    "llm": ["bench_llm.py", "--in-process", "--prompts", "64", "--max-tokens", "64", "--parallel", "8"],
    "embed": ["bench_embed.py", "--tasks", "2000"],
}


def model_benches() -> dict[str, Any]:
    """Each model benchmark's JSON results, or what it printed last when it failed."""
    out: dict[str, Any] = {}
    for name, argv in MODEL_BENCHES.items():
        with tempfile.TemporaryDirectory(prefix="mesh-bench-models-") as tmp:
            path = Path(tmp) / "results.json"
            tool = Path(__file__).resolve().parent / argv[0]
            done = subprocess.run(
                [sys.executable, str(tool), *argv[1:], "--json", str(path)], capture_output=True, text=True
            )
            if done.returncode == 0 and path.exists():
                out[name] = json.loads(path.read_text())
            else:
                out[name] = {"failed": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}
    return out


def stack_options(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark's stack takes: workers, slots, durability, --json."""
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument(
        "--durability",
        choices=("always", "lazy"),
        default="always",
        help="the server's sync: every write (always) or every 2 minutes (lazy)",
    )
    ap.add_argument(
        "--continue-depth",
        type=int,
        default=None,
        help="the brain's continue_depth (default: mesh's, 8; 0: every dependent queued by the brain)",
    )
    ap.add_argument(
        "--release-window",
        type=int,
        default=None,
        help="the brain's release_window (default: mesh's, 256)",
    )
    ap.add_argument(
        "--pack-size",
        type=int,
        default=None,
        help="the brain's pack_size (default: mesh's, 16; 1: a work item for each task)",
    )


def depth_env(args: argparse.Namespace) -> dict[str, str]:
    """The agents' environment for `--continue-depth`, `--pack-size` and `--release-window` (none:
    mesh's defaults)."""
    env = {}
    depth = getattr(args, "continue_depth", None)
    if depth is not None:
        env["MESH_CONTINUE_DEPTH"] = str(depth)
    size = getattr(args, "pack_size", None)
    if size is not None:
        env["MESH_PACK_SIZE"] = str(size)
    window = getattr(args, "release_window", None)
    if window is not None:
        env["MESH_RELEASE_WINDOW"] = str(window)
    return env


def bench_stack(
    tmp: str, workers: int, slots: int, durability: str, env: dict[str, str] | None = None, **kw: Any
) -> Stack:
    """A stack for a benchmark in `tmp` (not started): this environment without its MESH_
    settings, quiet logs, no auditor or watchdog (each reads every transition again, on these
    same cores), `env` and `kw` (Stack's options) added."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    base["MESH_LOG_LEVEL"] = "WARNING"
    return Stack(
        tmp,
        -1,
        workers,
        slots,
        log_dir=str(Path(tmp) / "logs"),
        env={**base, **(env or {})},
        auditor=False,
        watchdog=False,
        durability=durability,
        **kw,
    )


def show(title: str, results: dict[str, Any], json_path: str | None) -> None:
    """A benchmark's results as one table (a row per scenario), and as JSON to `json_path`."""
    table = Table(title=title, title_justify="left")
    table.add_column("scenario")
    table.add_column("result")
    for key, value in results.items():
        table.add_row(key, json.dumps(value))
    Console(width=200).print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The scenarios args names, on a stack of their own (started and stopped here), and the machine."""
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        stack = bench_stack(tmp, args.workers, args.slots, args.durability, env=depth_env(args))
        stack.start()
        rss = PeakRss(stack)
        try:
            results = run_loop(main_async(args, stack, rss))
        finally:
            rss.done.set()
            stack.stop()
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "workers": args.workers,
        "slots": args.slots,
        "durability": args.durability,
        "continue_depth": args.continue_depth,
        "pack_size": args.pack_size,
        "release_window": args.release_window,
    }
    return results


def main() -> int:
    args = parser().parse_args()
    results = run(args)
    if args.models:
        results.update(model_benches())
    show("mesh bench", results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
