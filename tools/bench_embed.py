"""Embed tasks through mesh against a direct batched encode: texts per second, same texts, same machine.

    .venv/bin/python tools/bench_embed.py                    # 2,000 one-text tasks
    .venv/bin/python tools/bench_embed.py --save             # each also saving its own file
    .venv/bin/python tools/bench_embed.py --tasks 500 --batch-max 1   # batching off, to compare
    .venv/bin/python tools/bench_embed.py --executor-only   # the batch executor alone, no mesh

Direct: the shipped embedder (all-MiniLM-L6-v2) loaded in this process, one
`encode(texts, batch_size=<the model's batch_size>)` over all the texts, after a warm-up call.

Through mesh: an embedded nats-server, a brain and one CPU model worker (`--gpu none`, as
`mesh up --gpus none` starts it), the model loaded by a small warm-up plan first; then a plan
of N tasks, each one `text:` line, timed from the submission to the plan's end: each task's
vectors are a `.npy` kept in the object store (with `--save`, each body also says `save:` and
the worker writes that file too). The worker batches them (`embed_batch_max`,
`embed_batch_wait_s`). Every task must succeed; a sample of the vectors (from the object store)
is checked against the direct call's, and the batch sizes the worker reported (`run.finished`
metrics) are counted.

The two alternate (`--rounds`: direct, mesh, direct, mesh, ..., direct), as the load of a
shared machine moves: `ratio_best` is the best mesh run against the best direct run,
`ratio_paired` each mesh run against the faster direct run either side of it.

Timings live here and in docs/gpus.md ("Measured"), never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.base import run_loop  # noqa: E402
from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.history import read_history  # noqa: E402
from mesh.bus.publish import Bus  # noqa: E402
from mesh.bus.read import read_bucket  # noqa: E402
from mesh.events import RunFinished, WorkItem  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.host.executors import RunContext, run_embed_batch  # noqa: E402
from mesh.host.loaders import load_model  # noqa: E402
from mesh.models import DEFAULT_MODELS, builtin_models  # noqa: E402
from mesh.ops.up import Stack  # noqa: E402
from mesh.plan import parse_plan  # noqa: E402
from mesh.settings import Settings  # noqa: E402

WORDS = [
    "harbour",
    "lantern",
    "quiet",
    "meadow",
    "copper",
    "thunder",
    "orchard",
    "violin",
    "glacier",
    "ember",
    "saddle",
    "pepper",
    "marble",
    "canyon",
    "whistle",
    "feather",
    "compass",
    "velvet",
    "anchor",
    "pebble",
    "river",
    "signal",
    "window",
    "garden",
    "engine",
]


def texts_for(n: int) -> list[str]:
    """n different short sentences (8 to 15 words), the same for every run."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 11 + i // 25) % len(WORDS)] for k in range(8 + i % 8)]
        out.append(f"Note {i}: " + " ".join(words) + ".")
    return out


def embed_plan(texts: list[str], out: Path | None, title: str) -> str:
    """One embed task a text; each saving its own file under `out` where given."""
    lines = [f"# {title}", "", "## Tasks", ""]
    for i, text in enumerate(texts):
        lines += [f"### e{i}", "- retries: 0", "", "```embed", f"text: {text}"]
        if out is not None:
            lines.append(f"save: {out}/e{i}.npy")
        lines += ["```", ""]
    return "\n".join(lines)


class Direct:
    """The embedder loaded in this process: the direct batched encode mesh is measured against."""

    def __init__(self) -> None:
        name = DEFAULT_MODELS["embed"]
        self.spec = builtin_models()[name]
        self.loaded = load_model(name, self.spec, "cpu")
        self.encode(["warm-up"] * 64)

    def encode(self, texts: list[str]) -> Any:
        return self.loaded.handle.encode(
            texts,
            batch_size=self.spec.batch_size,
            normalize_embeddings=self.spec.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def timed(self, texts: list[str]) -> tuple[float, Any]:
        began = time.perf_counter()
        matrix = self.encode(texts)
        return time.perf_counter() - began, matrix


async def wait_agents(bus: Any, expected: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    kv = await bus.agents_kv()
    while time.monotonic() < deadline:
        if len(await read_bucket(kv)) >= expected:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"fewer than {expected} agents registered after {timeout_s}s")


async def wait_final(bus: Any, plan_id: str, timeout_s: float = 3600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plan = await client.get_plan(bus, plan_id)
        if plan is not None and plan.final:
            return plan.status
        await asyncio.sleep(0.05)
    raise TimeoutError(f"plan {plan_id} not final after {timeout_s}s")


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU time (user + system) each process of the stack has used so far."""
    procs = [(c.name, c.proc.pid) for c in stack.children if c.proc is not None]
    if stack.server.proc is not None:
        procs.append(("server", stack.server.proc.pid))
    out = {}
    for name, pid in procs:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
    return out


async def one_plan(
    bus: Bus, stack: Stack, texts: list[str], out: Path | None, title: str, sample: range = range(0)
) -> dict[str, Any]:
    """A plan of one-text embed tasks, timed from its submission to its end; with the vectors
    of the tasks in `sample` as the object store holds them, and as saved under `out`."""
    spec = parse_plan(embed_plan(texts, out, title), source="bench.md")
    cpu_before = cpu_seconds(stack)
    began = time.perf_counter()
    plan_id = await client.submit(bus, spec)
    status = await wait_final(bus, plan_id)
    took = time.perf_counter() - began
    cpu_after = cpu_seconds(stack)
    sizes: Counter[int] = Counter()
    failed = 0
    encode_s = 0.0
    wanted = {f"e{i}": i for i in sample}
    stored: dict[int, Any] = {}
    saved: dict[int, Any] = {}
    async for entry in read_history(bus, bus.names.run_events(plan_id)):
        if isinstance(entry.msg, RunFinished):
            i = wanted.get(entry.msg.task_id)
            if i is not None and entry.msg.ok:
                ref = next(f for f in entry.msg.files if f.path.endswith(f"e{i}.npy"))
                obj = await (await bus.objects()).get(ref.object)
                stored[i] = np.load(io.BytesIO(obj.data or b""), allow_pickle=False)[0]
                if out is not None:
                    saved[i] = np.load(out / f"e{i}.npy")[0]
            size = int(entry.msg.metrics.get("batch", 0))
            sizes[size] += 1
            # each task of a batch reports the batch's encode time
            encode_s += entry.msg.metrics.get("embed_s", 0.0) / max(size, 1)
            failed += not entry.msg.ok
    return {
        "status": status,
        "seconds": round(took, 3),
        "failed": failed,
        # where the cores went from the submission to the plan's end (CPU seconds per process)
        "cpu_s": {k: round(cpu_after[k] - cpu_before[k], 2) for k in sorted(cpu_after) if k in cpu_before},
        # the worker's time inside encode calls, of `seconds`
        "encode_s": round(encode_s, 3),
        "batch_sizes": dict(sorted(sizes.items())),
        "stored": stored,
        "saved": saved,
    }


async def rounds(stack: Stack, direct: Direct, texts: list[str], out: Path | None, n: int) -> dict[str, Any]:
    """Direct, then mesh, n times over, then direct once more: the machine's load moves, and
    each mesh run has a direct run beside it."""
    settings = load_settings(server=stack.url, environ={})
    bus = await connect(settings, "bench", wait_s=10)
    direct_s: list[float] = []
    meshes: list[dict[str, Any]] = []
    sample = range(0, len(texts), max(1, len(texts) // 50))
    try:
        await bus.ensure_resources()
        await wait_agents(bus, len(stack.children))
        # warm-up, untimed: the worker loads the model (as the direct run's load is untimed)
        warm = await one_plan(bus, stack, texts[:16], out and out / "warm", "warm-up")
        if warm["status"] != "succeeded":
            raise RuntimeError("the warm-up plan failed")
        for r in range(n):
            took, vectors = await asyncio.to_thread(direct.timed, texts)
            direct_s.append(round(took, 3))
            run_out = out and out / f"run{r}"
            meshes.append(await one_plan(bus, stack, texts, run_out, f"bench embed {r}", sample))
        took, _ = await asyncio.to_thread(direct.timed, texts)
        direct_s.append(round(took, 3))
    finally:
        await bus.close()
    # a sample of each run's vectors (stored, and saved where asked) against the direct ones
    worst = 0.0
    for m in meshes:
        got = [*m.pop("stored").items(), *m.pop("saved").items()]
        if len(got) < len(sample) * (1 + (out is not None)):
            worst = float("inf")  # a sampled task's vectors missing
        for i, row in got:
            worst = max(worst, float(np.abs(row - vectors[i]).max()))
    return {"direct_s": direct_s, "mesh": meshes, "max_abs_diff_vs_direct": worst}


async def executor_only(direct: Direct, texts: list[str], batch: int, rounds: int) -> dict[str, Any]:
    """The batch executor alone (`run_embed_batch`, no server, no agents) in calls of `batch`
    tasks, alternating with the direct call: what the encode costs in calls of that size."""
    name = DEFAULT_MODELS["embed"]
    direct_s: list[float] = []
    batched_s: list[float] = []
    items = [
        WorkItem(plan_id="p", task_id=f"e{i}", attempt=1, kind="embed", body=f"text: {t}\n", model=name)
        for i, t in enumerate(texts)
    ]
    for _ in range(rounds):
        took, _ = await asyncio.to_thread(direct.timed, texts)
        direct_s.append(round(took, 3))
        began = time.perf_counter()
        for at in range(0, len(items), batch):
            part = items[at : at + batch]
            # as a worker runs them: each task's vectors kept in memory, for the object store
            ctxs = [RunContext(model=direct.loaded, files_in_memory=True) for _ in part]
            results = await run_embed_batch(part, ctxs)
            if not all(r.ok for r in results):
                raise RuntimeError(next(r.error for r in results if not r.ok))
        batched_s.append(round(time.perf_counter() - began, 3))
    paired = [d / b for d, b in zip(direct_s, batched_s, strict=True)]
    return {
        "tasks": len(texts),
        "batch": batch,
        "direct_s": direct_s,
        "executor_s": batched_s,
        "ratio_paired": [round(p, 3) for p in paired],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000, help="one-text embed tasks (and texts)")
    ap.add_argument("--rounds", type=int, default=2, help="mesh runs, each after a direct run")
    ap.add_argument("--batch-max", type=int, help="the worker's embed_batch_max (default: the setting's)")
    ap.add_argument("--batch-wait", type=float, help="the worker's embed_batch_wait_s")
    ap.add_argument("--script-slots", type=int, help="the worker's script_slots")
    ap.add_argument(
        "--durability",
        choices=("always", "lazy"),
        default="always",
        help="the server's sync: every write (always, mesh's default) or every 2 minutes (lazy)",
    )
    ap.add_argument(
        "--executor-only",
        action="store_true",
        help="the batch executor in this process against the direct call, no server or agents",
    )
    ap.add_argument(
        "--save", action="store_true", help="each task also saves its vectors to a file of its own (`save:`)"
    )
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = texts_for(args.tasks)

    direct = Direct()
    if args.executor_only:
        batch = args.batch_max or Settings().embed_batch_max
        alone = run_loop(executor_only(direct, texts, batch, args.rounds))
        print(json.dumps(alone, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="mesh-bench-embed-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env["MESH_LOG_LEVEL"] = "WARNING"
        for name, value in (
            ("EMBED_BATCH_MAX", args.batch_max),
            ("EMBED_BATCH_WAIT_S", args.batch_wait),
            ("SCRIPT_SLOTS", args.script_slots),
        ):
            if value is not None:
                env[f"MESH_{name}"] = str(value)
        stack = Stack(
            tmp,
            -1,
            0,
            1,
            log_dir=str(Path(tmp) / "logs"),
            env=env,
            auditor=False,
            watchdog=False,
            gateway=False,
            gpus=(None,),
            durability=args.durability,
        )
        stack.start()
        try:
            out = Path(tmp) / "out" if args.save else None
            got = run_loop(rounds(stack, direct, texts, out, args.rounds))
        finally:
            stack.stop()
    n = args.tasks
    direct_s, meshes = got["direct_s"], got["mesh"]
    mesh_s = [m["seconds"] for m in meshes]
    # each mesh run against the faster of the direct runs either side of it
    paired = [(n / mesh_s[r]) / (n / min(direct_s[r], direct_s[r + 1])) for r in range(len(meshes))]
    results = {
        "tasks": n,
        "direct_s": direct_s,
        "mesh_s": mesh_s,
        "direct_texts_per_s": round(n / min(direct_s), 1),
        "mesh_texts_per_s": round(n / min(mesh_s), 1),
        # the best mesh run against the best direct run
        "ratio_best": round(min(direct_s) / min(mesh_s), 3),
        "ratio_paired": [round(p, 3) for p in paired],
        "mesh_runs": meshes,
        "max_abs_diff_vs_direct": got["max_abs_diff_vs_direct"],
        "settings": {
            "batch_max": args.batch_max,
            "batch_wait": args.batch_wait,
            "script_slots": args.script_slots,
            "durability": args.durability,
            "save": args.save,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(),
        },
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    ok = all(m["status"] == "succeeded" and not m["failed"] for m in meshes)
    ok = ok and got["max_abs_diff_vs_direct"] < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
