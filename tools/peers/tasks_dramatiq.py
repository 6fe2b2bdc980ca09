"""Dramatiq's side of the peers' benchmark: the Redis broker, its no-op actor and its chain actor.

Dramatiq's defaults are its recommended setup: `--processes 2` (one per core) with its default 8
threads each, and the default middleware, without the Results middleware (no result backend:
nothing here reads a result); retries off as for every task of the benchmark. Each worker
prefetches `dramatiq_queue_prefetch` messages (64, set by run.py, as Celery's multiplier) instead
of its default twice the threads, so it fetches from Redis in big batches.
"""

from __future__ import annotations

import dramatiq
from common import DONE, QUEUE, chain_step, client, redis_url
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=redis_url())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop() -> None:
    client().incr(DONE)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def link(i: int, n: int, prev_end: float) -> None:
    chain_step(i, n, prev_end, link.send)
