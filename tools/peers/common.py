"""What the peers' tasks and their driver share: the Redis they use and the keys they count in.

Every peer's task reports the same way, so completion is detected the same way for all three: a
no-op task increments one counter (`DONE`) as its only work, and the driver polls that counter
every 50 ms (as tools/bench.py polls mesh's plan record); a chain task pushes its start minus its
predecessor's end (`HOPS`, seconds, one clock: one host) and the chain's last task sets `CHAIN_DONE`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

URL_ENV = "PEERS_REDIS_URL"
DONE = "peers:done"
HOPS = "peers:hops"
CHAIN_DONE = "peers:chain-done"
QUEUE = "peers"

_client: Any = None


def redis_url() -> str:
    return os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0")


def client() -> Any:
    """A synchronous Redis client of this process, made on first use (after a prefork's fork)."""
    global _client
    if _client is None:
        import redis

        _client = redis.Redis.from_url(redis_url())
    return _client


def chain_step(i: int, n: int, prev_end: float, send: Callable[[int, int, float], object]) -> None:
    """One task of the chain (a synchronous peer's): its hop recorded, then its successor sent
    (`send(i + 1, n, its end)`, the peer's enqueue) as its last act, or the chain said done."""
    start = time.time()
    if prev_end:
        client().rpush(HOPS, start - prev_end)
    end = time.time()
    if i + 1 < n:
        send(i + 1, n, end)
    else:
        client().set(CHAIN_DONE, 1)
