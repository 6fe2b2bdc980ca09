"""A durable pull consumer's messages through a sink: what the brain, the gateway and the auditor
fetch their inputs with.

nats-py's `fetch` waits for each message of a batch with `next_msg`: a `wait_for`, a task and a
queue get a message (`tools/pull_cost.py`: 36–52 µs of the client's CPU a message fetched and
acknowledged, against 5–9 µs through a `Puller`, docs/performance.md). The brain fetches a
worker's report for every task it runs, so that was a fifth of its CPU a task.

A `Puller` keeps one pull request open on its consumer at a time, for up to `batch` messages
and lasting `timeout`; its messages land in a deque as the connection's reader parses them
(`MeshClient.subscribe_sink`), and `fetch` hands over what has landed. Each request has a reply
subject of its own under the puller's inbox, so the status that ends one (404: nothing more, 408:
its time is up, 409: the server's limits) is never taken for the end of another. A request the
server never answered (sent just before a reconnect) counts as ended once its time and
`GRACE_S` have passed. Statuses nats-py's `fetch` raises on (503: no such consumer, and the like)
raise the same `APIError` here.

At most `batch` messages are asked for and not yet handed over, as with `fetch`: a new request
goes out only when the last one has ended, so a caller that stops fetching stops the flow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from mesh.bus.natsclient import MeshClient, status_of
from mesh.bus.resources import NS

# how long past its own expiry a request the server never answered is still waited for
GRACE_S = 1.0
# the shortest expiry a request is given (the server takes one under a millisecond as none)
MIN_EXPIRES_NS = 1_000_000
# statuses that end a request without an error (nats-py's `fetch` skips the same three)
_ENDED = ("404", "408", "409")
_HEARTBEAT = "100"


class Fetcher(Protocol):
    """What a consumer's messages are fetched through: a `Puller`, or nats-py's pull
    subscription."""

    async def fetch(self, batch: int = 1, timeout: float | None = 5.0) -> list[NatsMsg]: ...


class Puller:
    """`fetch` for one durable pull consumer, through a sink (see the module's text). Made with
    `pull_subscribe`; `unsubscribe` when done."""

    def __init__(self, js: JetStreamContext, stream: str, durable: str) -> None:
        self._nc: MeshClient = js._nc  # type: ignore[assignment]
        self._next = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = self._nc.new_inbox()
        self._arrived: collections.deque[NatsMsg] = collections.deque()
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        # the request open now: its number, messages still to come, when it is taken as ended
        self._open = 0
        self._left = 0
        self._until = 0.0
        self._count = 0

    async def _start(self) -> Puller:
        self._sub = await self._nc.subscribe_sink(f"{self._inbox}.*", self._land)
        return self

    def _land(self, msg: NatsMsg) -> None:
        self._arrived.append(msg)
        self._wake.set()

    async def fetch(self, batch: int = 1, timeout: float | None = 5.0) -> list[NatsMsg]:
        """Up to `batch` messages: those already here, else the first to come within `timeout`
        seconds with whatever came with them. Raises `TimeoutError` when none came, as
        nats-py's `fetch` does."""
        deadline = time.monotonic() + (5.0 if timeout is None else max(0.0, timeout))
        asked = False
        while True:
            self._wake.clear()
            got = self._take(batch)
            if got:
                return got
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            if self._open and now >= self._until:
                self._open = 0  # never answered: lost with a connection
            if not self._open and not asked:
                # (a request this call made that ended with nothing is not made again at once: a
                # server refusing requests, 409, would be asked without a pause)
                await self._ask(batch, deadline - now)
                asked = True
                continue
            until = min(deadline, self._until) if self._open else deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(until - now, 0.0))

    async def _ask(self, batch: int, expires_s: float) -> None:
        self._count += 1
        self._open, self._left = self._count, batch
        self._until = time.monotonic() + expires_s + GRACE_S
        request = json.dumps({"batch": batch, "expires": max(int(expires_s * NS), MIN_EXPIRES_NS)}).encode()
        await self._nc.publish(self._next, request, reply=f"{self._inbox}.{self._open}")

    def _take(self, batch: int) -> list[NatsMsg]:
        """What has landed, up to `batch` messages; statuses noted and dropped. A message
        comes under its stream subject, so it counts against the one request open; a status
        comes to its request's own reply subject."""
        out: list[NatsMsg] = []
        arrived = self._arrived
        while arrived and len(out) < batch:
            msg = arrived.popleft()
            status = status_of(msg)
            if status is None:
                out.append(msg)
                self._left -= 1
                if self._open and self._left <= 0:
                    self._open = 0  # all it asked for came
                continue
            if status == _HEARTBEAT:
                continue
            if self._open and msg.subject == f"{self._inbox}.{self._open}":
                self._open = 0
            if status in _ENDED:
                continue
            if out:  # what came before it is handed over; the error comes with the next fetch
                arrived.appendleft(msg)
                return out
            raise nats.js.errors.APIError.from_msg(msg)
        return out

    async def unsubscribe(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None


# the first nats-server that knows `$JS.API.CONSUMER.RESET`
RESET_SINCE = (2, 14)


def knows_reset(version: str) -> bool:
    """Whether a server of this version (its INFO's `version`: `2.15.1`, `2.14.0-RC.1`) knows
    the consumer reset. An unreadable version is taken as knowing it: the request then says."""
    parts = version.split("-", 1)[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= RESET_SINCE
    except (IndexError, ValueError):
        return True


async def reset_consumer(js: JetStreamContext, stream: str, durable: str, timeout_s: float = 5.0) -> str:
    """Reset a durable consumer to its ack floor (`$JS.API.CONSUMER.RESET`, nats-server 2.14 and
    later): what it delivered and nobody acknowledged (its fetcher died) is delivered again at
    once, not once its ack wait lapses; delivery counts start again at 1, and a message
    acknowledged above the floor is delivered again too. '' when it was reset, else why not (an
    older server does not know the request, and is not asked: it would leave it unanswered; a
    user may not be allowed it)."""
    version = js._nc.connected_server_version._server_version
    if not knows_reset(version):
        return f"nats-server {version} has no consumer reset (since {RESET_SINCE[0]}.{RESET_SINCE[1]})"
    try:
        # (nats-py's JetStream API call: the domain's prefix, no responders, the answer's error)
        await js._api_request(f"{js._prefix}.CONSUMER.RESET.{stream}.{durable}", b"{}", timeout=timeout_s)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError, ValueError) as exc:
        return repr(exc)
    return ""


async def pull_subscribe(js: JetStreamContext, *, durable: str, stream: str) -> Fetcher:
    """A fetcher for the durable pull consumer `durable` of `stream`: a `Puller` on mesh's client,
    nats-py's own pull subscription on another (both `fetch(batch, timeout=)`)."""
    if isinstance(js._nc, MeshClient) and js._nc.read_sinks:
        return await Puller(js, stream, durable)._start()
    return await js.pull_subscribe_bind(durable=durable, stream=stream)
