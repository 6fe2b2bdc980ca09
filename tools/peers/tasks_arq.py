"""arq's side of the peers' benchmark: its worker settings, no-op job and chain job.

arq runs one asyncio process per `arq` command, so the benchmark starts two (one per core) with
its default `max_jobs` (10 at a time each). Results are not kept (`keep_result = 0`: nothing here
reads one), retries off, and its per-job INFO log off (WARNING). arq has no blocking fetch: a
worker polls its queue every `poll_delay` (0.5 s by default, which alone would make every chain
hop wait up to half a second); the benchmark polls every 5 ms (PEERS_ARQ_POLL_DELAY), a few
hundred cheap ZRANGEBYSCOREs a second per worker when idle.
"""

from __future__ import annotations

import os
import time
from typing import Any

from arq.connections import RedisSettings
from common import CHAIN_DONE, DONE, HOPS, QUEUE, redis_url

POLL_ENV = "PEERS_ARQ_POLL_DELAY"


async def noop(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(DONE)


async def link(ctx: dict[str, Any], i: int, n: int, prev_end: float) -> None:
    start = time.time()
    redis = ctx["redis"]
    if prev_end:
        await redis.rpush(HOPS, start - prev_end)
    end = time.time()
    if i + 1 < n:
        await redis.enqueue_job("link", i + 1, n, end, _queue_name=QUEUE)
    else:
        await redis.set(CHAIN_DONE, 1)


class WorkerSettings:
    functions = [noop, link]  # noqa: RUF012
    redis_settings = RedisSettings.from_dsn(redis_url())
    queue_name = QUEUE
    keep_result = 0
    max_tries = 1
    max_jobs = 10
    poll_delay = float(os.environ.get(POLL_ENV, "0.005"))


LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"arq": {"level": "WARNING"}},
}
