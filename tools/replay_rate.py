"""How fast `mesh replay` folds a history: events/s over a synthetic one, each header parser in
turn, or each way a read takes its messages in turn.

    .venv/bin/python tools/replay_rate.py                       # 50,000 tasks, 3 rounds
    .venv/bin/python tools/replay_rate.py --tasks 200000 --rounds 5
    .venv/bin/python tools/replay_rate.py --compare sink --rounds 7
    .venv/bin/python tools/replay_rate.py --compare sink --profile
    .venv/bin/python tools/replay_rate.py --compare frames --rounds 7
    .venv/bin/python tools/replay_rate.py --compare stages --rounds 3
    .venv/bin/python tools/replay_rate.py --compare stages --tasks 200000 --reports
    .venv/bin/python tools/replay_rate.py --compare fold --rounds 7

The history is what a no-op plan leaves: a `plan.accepted` with its first part, `plan.tasks`
parts, and per task a `task.released` and a `task.succeeded` (published through mesh's own bus,
so with the same subjects and headers as the brain's); with `--reports`, each task's worker
report between them too, as a real history has (the server skips it for replay). It is
replayed with `mesh.bus.history.replay` over a connection that parses headers with nats-py's parser and one
with mesh's (`mesh.bus.natsclient`), alternated, on an embedded nats-server (lazy sync: this
measures reading, not the disk).

`--compare sink` replays with mesh's parser each round through a subscription's queue and
callback (nats-py's way, `MeshClient.read_sinks` off) and through a sink, and reads the same
transitions with `read_stream` alone (the raw read, nothing decoded), the order of the two
flipped every round. `--profile` then profiles one raw read through the sink (cProfile, the
functions that took the most time of their own). `--compare frames` needs no server: it feeds
20,000 frames like a read's straight into nats-py's protocol parser, through a queue and
through a sink in turn, then through a sink with mesh's parser (`SinkParser`), and times
nats-py's parser alone and the sink's message handling alone.

Two figures of this checkout alone, to compare commits (run each at both, alternated):
`--compare stages` times, each round, a raw read, the read decoded and checked
(`read_history`) and the replay, per event; `--compare fold` needs no server: it folds the
decoded history with `evolve` into a fresh state each round, in process CPU time (what a busy
machine's other work does not add to), the median per event.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.protocol.parser import Parser

# this checkout's mesh, not whichever one the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.bus.connect import connect  # noqa: E402
from mesh.bus.history import read_history, replay  # noqa: E402
from mesh.bus.natsclient import MeshClient, SinkParser, parse_header_lines, parse_headers  # noqa: E402
from mesh.bus.read import read_stream  # noqa: E402
from mesh.events import (  # noqa: E402
    Msg,
    PlanAccepted,
    PlanSpec,
    PlanTasks,
    RunFinished,
    TaskReleased,
    TaskSpec,
    TaskSucceeded,
    decode,
    encode,
)
from mesh.host.config import load_settings  # noqa: E402
from mesh.machine import State, evolve  # noqa: E402
from mesh.ops.embedded import EmbeddedServer  # noqa: E402

PLAN = "plan-0000000000-replay"
PART = 5000


def history(n: int, reports: bool = False) -> list[Msg]:
    specs = [TaskSpec(id=f"t{i}", body="") for i in range(n)]
    parts = [tuple(specs[i : i + PART]) for i in range(0, n, PART)]
    out: list[Msg] = [
        PlanAccepted(plan_id=PLAN, plan=PlanSpec(title="replay", tasks=parts[0]), at=1.0, total=n)
    ]
    out += [PlanTasks(plan_id=PLAN, part=k, tasks=p, at=1.0) for k, p in enumerate(parts[1:], 1)]
    for i in range(n):
        out.append(TaskReleased(plan_id=PLAN, task_id=f"t{i}", attempt=1, at=2.0))
        if reports:
            # the worker's report, which a real history holds between the two and replay skips
            out.append(
                RunFinished(
                    plan_id=PLAN,
                    task_id=f"t{i}",
                    attempt=1,
                    worker="w",
                    at=3.0,
                    ok=True,
                    duration_s=0.0,
                    rc=0,
                    started_at=2.5,
                )
            )
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


FRAME_HEADERS = (
    b"NATS/1.0\r\nMesh-Type: task.succeeded\r\nNats-Msg-Id: plan-0000000000-replay.t123.succeeded.1\r\n"
    b"Nats-Batch-Id: 8f3e2a1b9c\r\nNats-Batch-Sequence: 17\r\nNats-Batch-Commit: 1\r\n\r\n"
)
FRAME_DATA = b'{"type":"task.succeeded","plan_id":"plan-0000000000-replay","task_id":"t123","attempt":1}'
FRAMES = 20_000


def frames() -> list[bytes]:
    """What the server sends a read, cut as the socket would hand it over."""
    out = []
    for i in range(FRAMES):
        reply = f"$JS.ACK.MESH_EVENTS.r.1.{i}.{i}.1733400000000000000.{FRAMES - i}".encode()
        sizes = b"%d %d" % (len(FRAME_HEADERS), len(FRAME_HEADERS) + len(FRAME_DATA))
        out.append(
            b"HMSG _INBOX.r 1 " + reply + b" " + sizes + b"\r\n" + FRAME_HEADERS + FRAME_DATA + b"\r\n"
        )
    whole = b"".join(out)
    return [whole[i : i + 65536] for i in range(0, len(whole), 65536)]


async def through_client(chunks: list[bytes], sinks: bool, parser_class: type[Parser] = Parser) -> float:
    """Microseconds a frame through the parser and the client, to the read's list."""
    nc = MeshClient()
    got: list[NatsMsg] = []

    async def on_msg(msg: NatsMsg) -> None:
        got.append(msg)

    sub = Subscription(nc, 1, "_INBOX.r", cb=None if sinks else on_msg, pending_bytes_limit=0)
    sub._start(nc._error_cb)
    nc._subs[1] = sub
    if sinks:
        nc._sinks[1] = got.append
    parser = parser_class(nc)
    began = time.perf_counter()
    for chunk in chunks:
        await parser.parse(chunk)
        await asyncio.sleep(0)  # the socket's next read, where the subscription's task runs
    while len(got) < FRAMES:
        await asyncio.sleep(0)
    took = (time.perf_counter() - began) / FRAMES * 1e6
    nc._remove_sub(1)  # (never connected: nothing to tell a server)
    sub._stop_processing()
    return took


async def compare_frames(rounds: int) -> None:
    chunks = frames()
    ways = {
        "queue": (False, Parser),
        "sink": (True, Parser),
        "sink, mesh's parser": (True, SinkParser),
    }
    took: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            took[name].append(await through_client(chunks, *ways[name]))
    for name, values in took.items():
        print(f"client, {name}: median {statistics.median(values):.2f} us a frame over {rounds} rounds")

    class Parsed(MeshClient):
        async def _process_msg(
            self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            pass

    parser = Parser(Parsed())
    alone = []
    for _ in range(rounds):
        began = time.perf_counter()
        for chunk in chunks:
            await parser.parse(chunk)
        alone.append((time.perf_counter() - began) / FRAMES * 1e6)
    print(f"the protocol parser alone: median {statistics.median(alone):.2f} us a frame")
    nc = MeshClient()
    sub = Subscription(nc, 1, "_INBOX.r")
    nc._subs[1], nc._sinks[1] = sub, (lambda msg: None)
    reply = b"$JS.ACK.MESH_EVENTS.r.1.5.5.1733400000000000000.5"
    handled = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(FRAMES):
            await nc._process_msg(1, b"_INBOX.r", reply, FRAME_DATA, FRAME_HEADERS)
        handled.append((time.perf_counter() - began) / FRAMES * 1e6)
    print(f"the sink's message handling alone: median {statistics.median(handled):.2f} us a frame")
    began = time.perf_counter()
    for _ in range(FRAMES):
        parse_headers(FRAME_HEADERS)
    print(f"the header block alone: {(time.perf_counter() - began) / FRAMES * 1e6:.2f} us")


async def stages(url: str, rounds: int) -> None:
    for r in range(rounds):
        raw, raw_s = await raw_read(url, sinks=True)
        bus = await connect(load_settings(server=url, environ={}), "replay-rate", wait_s=10)
        try:
            began = time.perf_counter()
            read = 0
            async for _ in read_history(bus, bus.names.transition_filters(None)):
                read += 1
            read_s = time.perf_counter() - began
        finally:
            await bus.close()
        events, replay_s = await one_path(url, sinks=True)
        print(
            f"round {r + 1}: raw read {raw / raw_s:,.0f}/s ({raw_s / raw * 1e6:.1f} us), "
            f"decoded and checked {read / read_s:,.0f}/s ({read_s / read * 1e6:.1f} us), "
            f"replay {events / replay_s:,.0f}/s ({replay_s / events * 1e6:.1f} us)"
        )


def fold(tasks: int, rounds: int) -> None:
    evs = [decode(encode(ev)) for ev in history(tasks)]
    took = []
    for _ in range(rounds):
        state = State()
        began = time.process_time()
        for ev in evs:
            evolve(state, ev)
        took.append(time.process_time() - began)
        assert len(state.tasks) == tasks
    each = statistics.median(took) / len(evs) * 1e6
    print(f"evolve: median {each:.2f} us of CPU an event over {rounds} rounds")


TASKS = 0


async def main(args: argparse.Namespace) -> None:
    global TASKS
    TASKS = args.tasks
    if args.compare == "frames":
        await compare_frames(args.rounds)
        return
    if args.compare == "fold":
        fold(args.tasks, args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="mesh-replay-") as tmp:
        server = EmbeddedServer(Path(tmp))
        server.start()
        try:
            bus = await connect(load_settings(server=server.url, environ={}), "replay-writer", wait_s=10)
            await bus.ensure_resources()
            await bus.emit_many(history(args.tasks, args.reports))
            await bus.close()
            if args.compare == "sink":
                await compare_sinks(server.url, args.rounds, args.profile)
                return
            if args.compare == "stages":
                await stages(server.url, args.rounds)
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
        choices=["parser", "sink", "frames", "stages", "fold"],
        default="parser",
        help="header parsers (nats-py's, mesh's), read paths (queue, sink), the client alone on "
        "frames, this checkout's read and replay per event, or evolve alone",
    )
    parser.add_argument(
        "--reports",
        action="store_true",
        help="put each task's worker report in the history too, as a real one has (replay skips it)",
    )
    parser.add_argument("--profile", action="store_true", help="with --compare sink: cProfile a raw read")
    asyncio.run(main(parser.parse_args()))
