"""One scenario on one peer, from the client's side: enqueue, wait for the tasks' own reports, time.

    python tools/peers/drive.py celery|dramatiq|arq throughput|chain N     (prints one JSON object)

run.py starts Redis and the peer's workers, then this in a process of its own (each peer's client
library configured from PEERS_REDIS_URL, nothing shared between peers). Both scenarios first run
20 no-op tasks untimed, as tools/bench.py does, so every worker is consuming before the clock
starts. throughput: N no-op tasks, from the first enqueue to the counter reaching N (the enqueues
are part of the time: mesh's figure includes its submit too). chain: task i enqueues task i+1 as
its last act; a hop is the successor's start minus its predecessor's end.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from common import CHAIN_DONE, DONE, HOPS, QUEUE, client

POLL_S = 0.05


def wait_for(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout_s}s")
        time.sleep(POLL_S)


def enqueuers(peer: str) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """(send n no-op tasks, start a chain of n) for one peer."""
    if peer == "celery":
        import tasks_celery

        def noops(n: int) -> None:
            for _ in range(n):
                tasks_celery.noop.delay()

        def chain_c(n: int) -> None:
            tasks_celery.link.delay(0, n, 0.0)

        return noops, chain_c
    if peer == "dramatiq":
        import tasks_dramatiq

        def noops_d(n: int) -> None:
            for _ in range(n):
                tasks_dramatiq.noop.send()

        def chain_d(n: int) -> None:
            tasks_dramatiq.link.send(0, n, 0.0)

        return noops_d, chain_d
    if peer == "arq":
        from arq import create_pool
        from tasks_arq import WorkerSettings

        async def arq_noops(n: int) -> None:
            pool = await create_pool(WorkerSettings.redis_settings)
            for _ in range(n):
                await pool.enqueue_job("noop", _queue_name=QUEUE)
            await pool.aclose()

        async def arq_chain(n: int) -> None:
            pool = await create_pool(WorkerSettings.redis_settings)
            await pool.enqueue_job("link", 0, n, 0.0, _queue_name=QUEUE)
            await pool.aclose()

        return (lambda n: asyncio.run(arq_noops(n))), (lambda n: asyncio.run(arq_chain(n)))
    raise SystemExit(f"unknown peer {peer!r}")


def throughput(send: Callable[[int], None], n: int, timeout_s: float = 3600) -> dict[str, Any]:
    r = client()
    r.delete(DONE)
    began = time.perf_counter()
    send(n)
    sent = time.perf_counter()
    wait_for(lambda: int(r.get(DONE) or 0) >= n, timeout_s)
    took = time.perf_counter() - began
    return {
        "tasks": n,
        "submit_s": round(sent - began, 3),
        "total_s": round(took, 3),
        "tasks_per_s": round(n / took, 1),
    }


def chain(start: Callable[[int], None], n: int) -> dict[str, Any]:
    r = client()
    r.delete(HOPS, CHAIN_DONE)
    began = time.perf_counter()
    start(n)
    wait_for(lambda: bool(r.exists(CHAIN_DONE)), 3600)
    took = time.perf_counter() - began
    gaps = sorted(float(x) * 1000 for x in r.lrange(HOPS, 0, -1))
    return {
        "tasks": n,
        "total_s": round(took, 3),
        "hops": len(gaps),
        "hop_p50_ms": round(statistics.median(gaps), 2),
        "hop_p99_ms": round(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))], 2),
    }


def main() -> int:
    peer, scenario, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    noops, start_chain = enqueuers(peer)
    throughput(noops, 20, timeout_s=120)  # untimed: every worker up and consuming
    result = throughput(noops, n) if scenario == "throughput" else chain(start_chain, n)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
