"""Keeping a view current: the ordered push consumers an agent follows streams and buckets
with (the exporter's metrics, the web console's hub), taken down together.

Each follow is an ordered, ephemeral consumer: it never disturbs a durable one, and after a
reconnect the agent takes them all down and follows again from the buckets' latest values.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import api

from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.names import kv_subject

log = logging.getLogger(__name__)

Callback = Callable[[NatsMsg], Awaitable[None]]


class Follows:
    """The subscriptions one view keeps, on one connection."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subs: list[Subscription] = []

    async def stream(self, subject: str, stream: str, cb: Callback, policy: api.DeliverPolicy) -> None:
        """Follow `subject` of `stream` from where `policy` says (all, new, ...)."""
        self.subs.append(
            await self.bus.js.subscribe(
                subject, stream=stream, cb=cb, ordered_consumer=True, deliver_policy=policy
            )
        )

    async def bucket(self, bucket: str, cb: Callback) -> None:
        """Follow every key of a KV bucket, from its latest value."""
        await self.stream(kv_subject(bucket, ">"), f"KV_{bucket}", cb, api.DeliverPolicy.LAST_PER_SUBJECT)

    async def close(self) -> None:
        """Take every follow down (one that fails to say goodbye is gone with its server)."""
        subs, self.subs = self.subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except TRANSIENT as exc:
                log.debug("unsubscribe failed: %s", exc)
