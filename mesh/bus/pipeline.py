"""Pipelined publishing: many publishes in flight, their acknowledgements matched back.

One reply subscription per connection; each batch learns its acks in the order it sent them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

import nats

log = logging.getLogger(__name__)


class _Ack(msgspec.Struct):
    """A JetStream publish acknowledgement, or its error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: dict[str, Any] | None = None
    # an atomic batch's commit: how many it stored (its last at `seq`)
    count: int = 0


_decode_ack = msgspec.json.Decoder(_Ack).decode


class AckBatch:
    """The acknowledgements of one pipelined batch, in the order its messages were sent."""

    def __init__(self, prefix: str, key: str, n: int) -> None:
        self.key = key
        self.prefix = f"{prefix}.{key}"
        self.acks: list[api.PubAck | None] = [None] * n
        self.missing = n
        # an atomic batch's indexes, by the index of its last message (whose acknowledgement
        # stands for all of them: they are stored one after another, ending at its sequence)
        self.groups: dict[int, list[int]] = {}
        self.done: asyncio.Future[list[api.PubAck]] = asyncio.get_running_loop().create_future()

    def group(self, indexes: list[int]) -> None:
        self.groups[indexes[-1]] = indexes

    def reply(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def take(self, i: int, msg: NatsMsg) -> None:
        if self.done.done() or not 0 <= i < len(self.acks) or self.acks[i] is not None:
            return
        if msg.headers and msg.headers.get("Status") == "503":
            self.done.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _decode_ack(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.done.set_exception(nats.js.errors.Error(f"unreadable publish acknowledgement: {exc}"))
            return
        if ack.error is not None:
            try:  # `from_error` raises the specific error it recognises, returns a generic one
                raise nats.js.errors.APIError.from_error(ack.error)
            except nats.js.errors.Error as exc:
                self.done.set_exception(exc)
            return
        group = self.groups.get(i)
        if group is None:
            self.acks[i] = api.PubAck(
                stream=ack.stream, seq=ack.seq, domain=ack.domain, duplicate=ack.duplicate
            )
            self.missing -= 1
        else:
            if ack.count != len(group):
                self.done.set_exception(
                    nats.js.errors.Error(f"an atomic batch of {len(group)} was stored as {ack.count}")
                )
                return
            first = ack.seq - len(group) + 1
            for n, j in enumerate(group):
                self.acks[j] = api.PubAck(stream=ack.stream, seq=first + n, domain=ack.domain)
            self.missing -= len(group)
        if not self.missing:
            self.done.set_result(self.acks)  # type: ignore[arg-type]


class AckCollector:
    """Routes the acknowledgements arriving on one reply subscription to their batches."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.batches: dict[str, AckBatch] = {}
        self.counter = itertools.count()

    def open(self, n: int) -> AckBatch:
        key = str(next(self.counter))
        batch = AckBatch(self.prefix, key, n)
        self.batches[key] = batch
        return batch

    def close(self, batch: AckBatch) -> None:
        self.batches.pop(batch.key, None)
        if not batch.done.done():
            batch.done.cancel()

    def take(self, msg: NatsMsg) -> None:
        """An acknowledgement to its batch: a sink (`MeshClient.subscribe_sink`), so that the
        acknowledgements arriving between a brain's inputs do not hand the rest of the socket's
        chunk, inputs and all, to nats-py's parser (`SinkParser`)."""
        key, _, index = msg.subject[len(self.prefix) + 1 :].partition(".")
        batch = self.batches.get(key)
        if batch is not None and index.isdigit():
            batch.take(int(index), msg)

    async def on_reply(self, msg: NatsMsg) -> None:
        """`take`, as a subscription's callback on another client than mesh's."""
        self.take(msg)
