"""Celery's side of the peers' benchmark: the app, its no-op task and its chain task.

Configured as Celery's "Optimizing" guide says for many short tasks: a large prefetch multiplier
(64: each prefork child reserves up to 64 messages, so the consumer seldom waits on Redis), results
ignored and no result backend (nothing here reads a result), JSON; the worker runs with
`-P prefork -c 2` and without gossip, mingle and heartbeat (broker chatter no scenario needs).
"""

from __future__ import annotations

from celery import Celery
from common import DONE, QUEUE, chain_step, client, redis_url

app = Celery("peers", broker=redis_url())
app.conf.update(
    task_ignore_result=True,
    result_backend=None,
    worker_prefetch_multiplier=64,
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="peers.noop")
def noop() -> None:
    client().incr(DONE)


@app.task(name="peers.link")
def link(i: int, n: int, prev_end: float) -> None:
    chain_step(i, n, prev_end, link.delay)
