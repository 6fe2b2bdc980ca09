"""mesh's LLM benchmark: short prompts through mesh against the same prompts sent straight to the
same OpenAI-compatible server, at the same parallelism; or, with --in-process, to the same
model in process, through mesh's own parallel decoder.

    .venv/bin/python tools/bench_llm.py                    # llama_cpp.server, Gemma 3 270M
    .venv/bin/python tools/bench_llm.py --parallel 8 --base-url http://127.0.0.1:8080/v1
                                                           # a server of your own (llama-server
                                                           # --parallel 8, vLLM, Ollama, ...)
    .venv/bin/python tools/bench_llm.py --in-process --parallel 8
                                                           # Gemma 3 270M in process, decoded
                                                           # 8 at a time (mesh.host.llmbatch)

Three runs over the same N prompts (64 by default, `max_tokens` 64 each, temperature 0):
  direct    asyncio + httpx2, at most P requests in flight (P = --parallel)
  mesh      a plan of N prompt tasks on one model worker (`--gpu none --classes script,llm`)
            with `llm_slots` = P, the model registered as `backend = "openai"` at that server
  mesh-1    the same with `llm_slots` = 1
Each reports prompts/s and completion tokens/s (the server's `usage`), and the mesh runs their
ratio to the direct one. The mesh runs are timed from submit to plan final, after a one-task
plan has loaded (probed) the model. Without --base-url the tool starts
`python -m llama_cpp.server` on the shipped Gemma 3 270M (it decodes one request at a time:
llama-cpp-python's server has no parallel decoding, so P > 1 cannot gain there); give a
server that batches (llama-server `--parallel P`, vLLM) to measure what parallel slots gain.

With --in-process there is no server: `direct` is mesh's decoder (`mesh.host.llmbatch.Decoder`,
P sequences) on the shipped Gemma 3 270M loaded in this process, driven by P client threads
that each send the next prompt as soon as their last is answered (P in flight); `mesh` is a
worker with the same model in process and `llm_slots` = P, which decodes its tasks with that
decoder; `mesh-1` the same worker with `llm_slots` = 1, which runs one task at a time through
llama-cpp-python's `create_completion`.
Tokens are counted by the decoder (direct) and the workers' reports (mesh). --rounds repeats
the three, alternated, as the load of a shared machine moves.
Timings live here and in docs/gpus.md, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.base import run_loop  # noqa: E402
from mesh.bus import client  # noqa: E402
from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.history import read_history  # noqa: E402
from mesh.bus.read import read_bucket  # noqa: E402
from mesh.errors import MeshError  # noqa: E402
from mesh.events import RunFinished  # noqa: E402
from mesh.host.config import load_settings  # noqa: E402
from mesh.host.modelfiles import resolve_path  # noqa: E402
from mesh.host.openai_server import free_port  # noqa: E402
from mesh.models import builtin_models  # noqa: E402
from mesh.ops.up import Stack  # noqa: E402
from mesh.plan import parse_plan  # noqa: E402

MODEL = "bench-llm"


def prompts(n: int) -> list[str]:
    subjects = ("a lighthouse", "a river", "a mountain town", "an old library", "a night train", "a harbour")
    return [
        f"Story {i}. Here is a short description of {subjects[i % len(subjects)]} at dusk:" for i in range(n)
    ]


def start_server(port: int, threads: int) -> subprocess.Popen[bytes]:
    path = resolve_path("gemma3-270m", builtin_models()["gemma3-270m"])
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port)]
    argv += ["--n_ctx", "2048", "--interrupt_requests", "False"]
    if threads:
        argv += ["--n_threads", str(threads)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("llama_cpp.server exited while starting")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("llama_cpp.server did not answer within 120 s")


async def direct(
    base_url: str, texts: list[str], parallel: int, max_tokens: int, model: str
) -> dict[str, Any]:
    """The same prompts straight to the server, at most `parallel` in flight."""
    gate = asyncio.Semaphore(parallel)
    tokens: list[int] = []

    async def one(http: httpx2.AsyncClient, text: str) -> None:
        body: dict[str, Any] = {"prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
        if model:
            body["model"] = model
        async with gate:
            resp = await http.post(f"{base_url}/completions", json=body)
            resp.raise_for_status()
            tokens.append(int(resp.json()["usage"]["completion_tokens"]))

    async with httpx2.AsyncClient(timeout=httpx2.Timeout(10.0, read=None)) as http:
        await one(http, texts[0])  # the server's first answer (warm-up) before the clock starts
        tokens.clear()
        began = time.perf_counter()
        await asyncio.gather(*(one(http, t) for t in texts))
        took = time.perf_counter() - began
    return figures(len(texts), sum(tokens), took)


def direct_in_process(texts: list[str], parallel: int, max_tokens: int, threads: int) -> dict[str, Any]:
    """The same prompts to mesh's decoder on the model in this process: P clients, each sending
    its next prompt as soon as its last is answered (P in flight, as the HTTP client keeps)."""
    from mesh.host.llmbatch import Request
    from mesh.host.loaders import load_model

    spec = builtin_models()["gemma3-270m"]
    if threads:
        spec = msgspec.structs.replace(spec, threads=threads)
    loaded = load_model(MODEL, spec, "cpu", llm_slots=parallel)
    try:
        llm, decoder = loaded.handle, loaded.decoder

        def ask(text: str) -> Request:
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            return Request(tokens=tokens, max_tokens=max_tokens, temperature=0.0)

        decoder.submit(ask(texts[0])).result()  # warm-up, before the clock starts
        asked = [ask(t) for t in texts]
        outcomes: list[Any] = []
        left = iter(asked)
        gate = threading.Lock()

        def client() -> None:  # one of P clients: the next prompt as soon as one is answered
            while True:
                with gate:
                    req = next(left, None)
                if req is None:
                    return
                outcomes.append(decoder.submit(req).result())

        clients = [threading.Thread(target=client) for _ in range(parallel)]
        began = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        took = time.perf_counter() - began
        out = figures(len(texts), sum(o.tokens_out for o in outcomes), took)
        out["parallel_seen"] = max(o.parallel for o in outcomes)
        return out
    finally:
        loaded.close()


def figures(n: int, tokens: int, took: float) -> dict[str, Any]:
    return {
        "prompts": n,
        "tokens_out": tokens,
        "s": round(took, 2),
        "prompts_per_s": round(n / took, 3),
        "tokens_per_s": round(tokens / took, 1),
    }


def plan_text(texts: list[str], max_tokens: int) -> str:
    tasks = "".join(
        f"\n### p{i}\n- model: {MODEL}\n- max_tokens: {max_tokens}\n- timeout: 20m\n\n```prompt\n{t}\n```\n"
        for i, t in enumerate(texts)
    )
    return f"# bench llm\n\n## Tasks\n{tasks}"


async def mesh_run(url: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    settings = load_settings(environ={**os.environ, "MESH_NATS_URL": url})
    bus = await connect(settings, "bench-llm", wait_s=10)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(MeshError):  # the buckets come with the first agent
                if len(await read_bucket(await bus.agents_kv())) >= 2:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the brain and the worker did not register within 120 s")
            await asyncio.sleep(0.2)
        # the model's load (a probe of the server) before the clock starts
        warm = await client.submit(bus, parse_plan(plan_text(texts[:1], 4), source="warm.md"))
        if await wait_final(bus, warm) != "succeeded":
            raise SystemExit("the warm-up prompt failed: see the logs")
        began = time.perf_counter()
        plan_id = await client.submit(bus, parse_plan(plan_text(texts, max_tokens), source="bench.md"))
        status = await wait_final(bus, plan_id)
        took = time.perf_counter() - began
        tokens = 0
        async for entry in read_history(bus, bus.names.evt_all):
            msg = entry.msg
            if isinstance(msg, RunFinished) and msg.plan_id == plan_id and msg.ok:
                tokens += int(msg.metrics.get("tokens_out", 0))
        out = figures(len(texts), tokens, took)
        out["status"] = status
        return out
    finally:
        await bus.close()


async def wait_final(bus: Any, plan_id: str, timeout_s: float = 3600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plan = await client.get_plan(bus, plan_id)
        if plan is not None and plan.final:
            return str(plan.status)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"plan {plan_id} not final after {timeout_s}s")


def through_mesh(
    tmp: str, base_url: str, model: str, slots: int, texts: list[str], max_tokens: int, threads: int = 0
) -> dict[str, Any]:
    config = Path(tmp) / f"mesh-{slots}.toml"
    lines = [f"[models.{MODEL}]", 'kind = "llm"']
    if base_url:
        lines += ['backend = "openai"', f'base_url = "{base_url}"', f'model = "{model}"', "stream = false"]
    else:  # the shipped model in the worker's process
        path = resolve_path("gemma3-270m", builtin_models()["gemma3-270m"])
        lines += [f"path = {json.dumps(path)}", "n_ctx = 2048", "temperature = 0.0", f"threads = {threads}"]
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_LOG_LEVEL": "WARNING", "MESH_CONFIG": str(config), "MESH_LLM_SLOTS": str(slots)})
    data = Path(tmp) / f"slots-{slots}"
    stack = Stack(
        str(data),
        -1,
        0,
        1,
        log_dir=str(data / "logs"),
        env=env,
        auditor=False,
        watchdog=False,
        gateway=False,
        gpus=(None,),
        durability="lazy",
    )
    stack.start()
    try:
        return run_loop(mesh_run(stack.url, texts, max_tokens))
    finally:
        stack.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4, help="requests in flight, and mesh's llm_slots")
    ap.add_argument("--base-url", default="", help="a running server (else llama_cpp.server is started)")
    ap.add_argument("--model", default="", help="the server's model name ('' : the server's default)")
    ap.add_argument("--threads", type=int, default=0, help="llama_cpp.server's --n_threads (0: its default)")
    ap.add_argument("--in-process", action="store_true", help="no server: the model in process (see above)")
    ap.add_argument("--rounds", type=int, default=1, help="direct, mesh, mesh-1 this many times, alternated")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so that the stacks and the server started are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    texts = prompts(args.prompts)
    server = None
    base_url = args.base_url.rstrip("/")
    if not base_url and not args.in_process:
        port = free_port()
        server = start_server(port, args.threads)
        base_url = f"http://127.0.0.1:{port}/v1"
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "mesh": [], "mesh-1": []}
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-llm-") as tmp:
            for _ in range(args.rounds):
                if args.in_process:
                    one = direct_in_process(texts, args.parallel, args.max_tokens, args.threads)
                else:
                    one = run_loop(direct(base_url, texts, args.parallel, args.max_tokens, args.model))
                runs["direct"].append(one)
                print("direct", json.dumps(one), flush=True)
                for name, slots in (("mesh", args.parallel), ("mesh-1", 1)):
                    one = through_mesh(tmp, base_url, args.model, slots, texts, args.max_tokens, args.threads)
                    runs[name].append(one)
                    print(name, json.dumps(one), flush=True)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    results: dict[str, Any] = {}
    for name, done in runs.items():  # each run's best round; every round under "rounds"
        results[name] = max(done, key=lambda r: float(r["tokens_per_s"]))
    results["rounds"] = runs
    base = results["direct"]["tokens_per_s"] or 1.0
    results["mesh_over_direct"] = round(results["mesh"]["tokens_per_s"] / base, 3)
    results["mesh_over_mesh_1"] = round(
        results["mesh"]["tokens_per_s"] / (results["mesh-1"]["tokens_per_s"] or 1.0), 3
    )
    # each round against itself: the three ran one after the other, under the same load
    results["paired"] = [
        {
            "mesh_over_direct": round(m["tokens_per_s"] / (d["tokens_per_s"] or 1.0), 3),
            "mesh_over_mesh_1": round(m["tokens_per_s"] / (m1["tokens_per_s"] or 1.0), 3),
        }
        for d, m, m1 in zip(runs["direct"], runs["mesh"], runs["mesh-1"], strict=True)
    ]
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "server": "none: gemma3-270m in process (mesh.host.llmbatch)"
        if args.in_process
        else args.base_url or "llama_cpp.server (gemma3-270m)",
        "parallel": args.parallel,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
