"""How fast `mesh replay` folds a history: events/s over a synthetic one, each header parser in
turn, or each way a read takes its messages in turn.

    .venv/bin/python tools/replay_rate.py                       # 50,000 tasks, 3 rounds
    .venv/bin/python tools/replay_rate.py --tasks 200000 --rounds 5
    .venv/bin/python tools/replay_rate.py --compare sink --rounds 7
    .venv/bin/python tools/replay_rate.py --compare sink --profile

The history is what a no-op plan leaves: a `plan.accepted` with its first part, `plan.tasks`
parts, and per task a `task.released` and a `task.succeeded` (published through mesh's own bus,
so with the same subjects and headers as the brain's). It is replayed with
`mesh.bus.history.replay` over a connection that parses headers with nats-py's parser and one
with mesh's (`mesh.bus.natsclient`), alternated, on an embedded nats-server (lazy sync: this
measures reading, not the disk).

`--compare sink` replays with mesh's parser each round through a subscription's queue and
callback (nats-py's way, `MeshClient.read_sinks` off) and through a sink, and reads the same
transitions with `read_stream` alone (the raw read, nothing decoded), the order of the two
flipped every round. `--profile` then profiles one raw read through the sink (cProfile, the
functions that took the most time of their own).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client
from nats.js import api

from mesh.bus.connect import connect
from mesh.bus.history import replay
from mesh.bus.natsclient import MeshClient, parse_header_lines
from mesh.bus.read import read_stream
from mesh.events import Msg, PlanAccepted, PlanSpec, PlanTasks, TaskReleased, TaskSpec, TaskSucceeded
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer

PLAN = "plan-0000000000-replay"
PART = 5000


def history(n: int) -> list[Msg]:
    specs = [TaskSpec(id=f"t{i}", body="") for i in range(n)]
    parts = [tuple(specs[i : i + PART]) for i in range(0, n, PART)]
    out: list[Msg] = [
        PlanAccepted(plan_id=PLAN, plan=PlanSpec(title="replay", tasks=parts[0]), at=1.0, total=n)
    ]
    out += [PlanTasks(plan_id=PLAN, part=k, tasks=p, at=1.0) for k, p in enumerate(parts[1:], 1)]
    for i in range(n):
        out.append(TaskReleased(plan_id=PLAN, task_id=f"t{i}", attempt=1, at=2.0))
        out.append(
            TaskSucceeded(plan_id=PLAN, task_id=f"t{i}", attempt=1, worker="w", at=3.0, started_at=2.5)
        )
    return out


async def one(url: str, parser: Callable[[bytes], dict[str, str]]) -> tuple[int, float]:
    # the parser every mesh connection's client uses, for this round
    MeshClient._parse_header_lines = staticmethod(parser)  # type: ignore[method-assign,assignment]
    bus = await connect(load_settings(server=url, environ={}), "replay-rate", wait_s=10)
    try:
        began = time.perf_counter()
        result = await replay(bus)
        seconds = time.perf_counter() - began
        assert len(result.state.tasks) == TASKS, len(result.state.tasks)
        return result.events, seconds
    finally:
        await bus.close()
        MeshClient._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign,assignment]


async def raw_read(url: str, sinks: bool, profile: cProfile.Profile | None = None) -> tuple[int, float]:
    """`read_stream` alone over the transitions `replay` reads, through a sink or a queue."""
    MeshClient.read_sinks = sinks
    bus = await connect(load_settings(server=url, environ={}), "replay-rate", wait_s=10)
    try:
        subject = bus.names.transition_filters(None)
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        n = 0
        began = time.perf_counter()
        if profile:
            profile.enable()
        async for _raw in read_stream(bus.js, bus.names.events_stream, subject, config):
            n += 1
        if profile:
            profile.disable()
        return n, time.perf_counter() - began
    finally:
        await bus.close()
        MeshClient.read_sinks = True


async def one_path(url: str, sinks: bool) -> tuple[int, float]:
    MeshClient.read_sinks = sinks
    try:
        return await one(url, parse_header_lines)
    finally:
        MeshClient.read_sinks = True


async def compare_sinks(url: str, rounds: int, profile: bool) -> None:
    """Queue against sink, replay and raw read, alternated (the order flips every round)."""
    rates: dict[str, list[float]] = {}
    for r in range(rounds):
        paths = [("queue", False), ("sink", True)]
        if r % 2:
            paths.reverse()
        for what, run in (("replay", one_path), ("raw read", raw_read)):
            for name, sinks in paths:
                events, seconds = await run(url, sinks)
                rate = events / seconds
                rates.setdefault(f"{what} {name}", []).append(rate)
                took = f"{events:,} in {seconds:.2f}s: {rate:,.0f}/s ({seconds / events * 1e6:.1f} us each)"
                print(f"round {r + 1} {what:8s} {name:5s} {took}")
    for key, values in rates.items():
        median = statistics.median(values)
        print(f"{key:14s} median {median:,.0f}/s ({1e6 / median:.1f} us each) over {len(values)} rounds")
    if profile:
        prof = cProfile.Profile()
        events, seconds = await raw_read(url, True, prof)
        print(f"profiled raw read through the sink: {events:,} in {seconds:.2f}s")
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


TASKS = 0


async def main(args: argparse.Namespace) -> None:
    global TASKS
    TASKS = args.tasks
    with tempfile.TemporaryDirectory(prefix="mesh-replay-") as tmp:
        server = EmbeddedServer(Path(tmp))
        server.start()
        try:
            bus = await connect(load_settings(server=server.url, environ={}), "replay-writer", wait_s=10)
            await bus.ensure_resources()
            await bus.emit_many(history(args.tasks))
            await bus.close()
            if args.compare == "sink":
                await compare_sinks(server.url, args.rounds, args.profile)
                return
            rates: dict[str, list[float]] = {"nats-py": [], "mesh": []}
            for r in range(args.rounds):
                for name, parser in (("nats-py", Client._parse_header_lines), ("mesh", parse_header_lines)):
                    events, seconds = await one(server.url, parser)
                    rates[name].append(events / seconds)
                    rate = events / seconds
                    print(f"round {r + 1} {name:8s} {events:,} events in {seconds:.2f}s: {rate:,.0f}/s")
            for name, values in rates.items():
                print(f"{name:8s} median {statistics.median(values):,.0f} events/s over {len(values)} rounds")
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compare",
        choices=["parser", "sink"],
        default="parser",
        help="header parsers (nats-py's, mesh's) or read paths (queue, sink)",
    )
    parser.add_argument("--profile", action="store_true", help="with --compare sink: cProfile a raw read")
    asyncio.run(main(parser.parse_args()))
