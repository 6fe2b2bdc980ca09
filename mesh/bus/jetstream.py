"""The JetStream context mesh uses, and the errors worth trying again.

`DomainJetStream` sends KV writes through a JetStream domain's API and tells the store
watch of every write that fails; `TRANSIENT` is what a restarting or slow server raises.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from mesh.bus.store import StoreWatch
from mesh.names import KV_SUBJECTS
from mesh.settings import Settings

# what a server that is restarting, unreachable or slow raises: worth trying again
TRANSIENT = (nats.errors.Error, nats.js.errors.Error, TimeoutError)


class DomainJetStream(JetStreamContext):
    """A JetStream context for a named domain (`$JS.<domain>.API`), KV writes included.

    nats-py sends a bucket's writes to `$KV.<bucket>.<key>` whatever the domain. A server
    with a domain does not let `$KV.>` cross a leaf node link; it takes KV writes for its
    domain on `$JS.<domain>.API.$KV.>` and maps them to `$KV.>`. Reads already go through the
    domain's API (stream info, direct and message gets, consumers), and publishes to other
    streams' subjects cross as they are."""

    # told of every write that fails and of the next that goes through (`Bus` sets it)
    store: StoreWatch | None = None

    def _route(self, subject: str) -> str:
        if subject.startswith(KV_SUBJECTS) and self._prefix != api.DEFAULT_PREFIX:
            return f"{self._prefix}.{subject}"
        return subject

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> api.PubAck:
        """A publish to a stream (KV and object store writes too), waiting for its acknowledgement."""
        try:
            ack = await super().publish(
                self._route(subject),
                payload,
                timeout=timeout,
                stream=stream,
                headers=headers,
                msg_ttl=msg_ttl,
            )
        except TRANSIENT as exc:
            if self.store is not None:
                await self.store.failed(exc, (subject,))
            raise
        if self.store is not None and self.store.full:
            self.store.cleared(subject)
        return ack

    async def publish_async(
        self,
        subject: str,
        payload: bytes = b"",
        wait_stall: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> asyncio.Future[api.PubAck]:
        subject = self._route(subject)
        return await super().publish_async(
            subject, payload, wait_stall=wait_stall, stream=stream, headers=headers, msg_ttl=msg_ttl
        )


def jetstream(nc: Client, settings: Settings, timeout: float | None = None) -> JetStreamContext:
    """The JetStream context of these settings: the server's own domain, or `jetstream_domain`;
    its requests wait `timeout`, else `request_timeout_s`."""
    wait = settings.request_timeout_s if timeout is None else timeout
    return DomainJetStream(nc, domain=settings.jetstream_domain or None, timeout=wait)
