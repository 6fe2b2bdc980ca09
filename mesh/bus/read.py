"""Reading from the server: pull fetches, whole-stream reads, and KV bucket scans.

Reads never disturb a durable consumer: history reads use ordered, ephemeral consumers.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import copy
import json
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

import nats
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.natsclient import MeshClient, status_of
from mesh.bus.pull import Fetcher
from mesh.bus.refusals import Client as WatchedClient
from mesh.bus.resources import NS
from mesh.bus.store import StoreWatch
from mesh.names import kv_keys

log = logging.getLogger(__name__)


async def fetch_some(
    sub: Fetcher,
    batch: int,
    what: str,
    timeout_s: float = 1.0,
    store: StoreWatch | None = None,
) -> list[NatsMsg]:
    """Up to `batch` messages of a pull subscription: none when nothing came within
    `timeout_s`, or when the server could not be reached (logged, after a short pause; not
    while `store` is known full, which fails fetches too and was said once)."""
    try:
        return await sub.fetch(batch, timeout=timeout_s)
    except TimeoutError:
        # nothing came in time: nats-py's own TimeoutError, or a bare one where its first,
        # no-wait request was answered after the whole timeout (a busy server): not a failure
        return []
    except TRANSIENT as exc:
        if store is None or not store.full:
            log.warning("fetching %s failed (%r); retrying", what, exc)
        await asyncio.sleep(0.5)
        return []


def position(raw: NatsMsg) -> tuple[int, int, int]:
    """A JetStream message's stream sequence, the messages pending after it, and when it was
    stored (ns since the epoch), from its reply subject: `$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or with `<domain>.<account>`
    after `ACK` (the v2 form, 12 tokens). nats-py's `raw.metadata` reads the same, but builds
    a datetime and three dataclasses for it: a third of the cost of reading a long history."""
    tokens = (raw.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[8]), int(tokens[7])
    if len(tokens) >= 11 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[7]), int(tokens[10]), int(tokens[9])
    meta = raw.metadata  # not a JetStream message: nats-py says so (NotJSMessageError)
    stamp = int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else 0
    return meta.sequence.stream, meta.num_pending, stamp


READ_BATCH = 1000
# batches asked for ahead: the server sends the next while the reader takes in this one (with
# one, each waited for the other: a read took twice the reader's own time)
READ_AHEAD = 2


# a history read holds at most about this much of one batch in memory (`READ_AHEAD` of them)
READ_BATCH_BYTES = 32 * 1024 * 1024


class ReadBroken(nats.errors.Error):
    """A whole-stream read that stopped short of the end: nothing it gave may be taken for
    everything (an agents bucket read short would make live agents look gone)."""

    def __init__(self, stream: str, why: str) -> None:
        super().__init__()
        self.stream, self.why = stream, why

    def __str__(self) -> str:
        return (
            f"reading {self.stream} broke off ({self.why}), so what it read was not used. Try again; "
            "if it keeps failing, `mesh doctor` checks the server"
        )


# a read asks again this many times in a row after a request that ended short, then fails
READ_RETRIES = 5

# the server deletes a read's consumer once no pull request reached it for this long (a read
# that died leaves nothing behind for longer)
READ_IDLE_S = 60.0
# a read whose messages wait unread (a merge taking another subject's first, a slow caller)
# asks for nothing meanwhile: it reminds the server it is there this often
KEEP_ALIVE_S = 20.0

# statuses that end a pull request with nothing more to give: no messages, or its expiry
_ENDS = ("404", "408")


async def _left(js: JetStreamContext, stream: str, name: str) -> int:
    """What the read's consumer still has to deliver, by its own account."""
    info = await js.consumer_info(stream, name)
    return int(info.num_pending or 0)


# how many times a read's consumer is placed again to land on its stream's leader: the server
# picks one of the stream's servers at random, so on three it misses all 41 tries once in 17
# million reads (12 tries missed once in 200, and a CI run saw it)
PLACE_TRIES = 40


async def add_reader(js: JetStreamContext, stream: str, cfg: api.ConsumerConfig) -> api.ConsumerInfo:
    """An ephemeral read consumer, on the server that leads `stream` where the stream is
    replicated.

    A one-replica consumer of a replicated stream is put on any of the stream's servers and
    reads that server's copy, which may lag the leader's (a copy still catching up after a
    server of the cluster was lost). The leader's
    copy holds every acknowledged write, so a consumer placed elsewhere is deleted and created
    again (the server places it at random) until it lands on the leader; after `PLACE_TRIES`
    it reads where it is, and says so.
    """
    info = await js.add_consumer(stream, config=cfg)
    if info.cluster is None or not info.cluster.name:
        return info  # one server: its copy is the stream
    for _ in range(PLACE_TRIES):
        leader = (await js.stream_info(stream)).cluster
        if (
            leader is None
            or not leader.leader
            or info.cluster is None
            or info.cluster.leader == leader.leader
        ):
            return info
        with contextlib.suppress(*TRANSIENT):
            await js.delete_consumer(stream, info.name)
        info = await js.add_consumer(stream, config=cfg)
    where = info.cluster.leader if info.cluster else "?"
    log.warning("reading %s from %s, not its leader: what it answers may lag", stream, where)
    return info


async def read_stream(
    js: JetStreamContext,
    stream: str,
    subject: str | list[str],
    config: api.ConsumerConfig,
    idle_timeout_s: float = 5.0,
) -> AsyncIterator[NatsMsg]:
    """Messages of `stream` under `subject` (as `config` selects them), up to the current end,
    one at a time: `read_batches` unbatched."""
    batches = read_batches(js, stream, subject, config, idle_timeout_s)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for raw in batch:
                yield raw


def read_batches(
    js: JetStreamContext,
    stream: str,
    subject: str | list[str],
    config: api.ConsumerConfig,
    idle_timeout_s: float = 5.0,
) -> AsyncGenerator[list[NatsMsg], None]:
    """Messages of `stream` under `subject` (as `config` selects them), up to the current end,
    in stream order, in lists of what has arrived (at most two of the server's batches).

    An ephemeral pull consumer without acks: it never disturbs durable consumers, holds at
    most a batch or two in memory however long the stream (of each subject, when there are
    several), and knows from its own info, before anything is fetched, how much there is to
    read.

    Several subjects are read by one consumer each, merged by stream sequence and cut where the
    stream ended when the read began (`_merged`): a consumer with two filter subjects cost the
    server twice the CPU of one consumer per subject over the same history (docs/performance.md),
    and on two cores that came out of the reader's share.
    """
    subjects = [subject] if isinstance(subject, str) else list(subject)
    if len(subjects) == 1:
        return _read_one(js, stream, subjects[0], config, idle_timeout_s)
    return _merged(js, stream, subjects, config, idle_timeout_s)


async def _merged(
    js: JetStreamContext,
    stream: str,
    subjects: list[str],
    config: api.ConsumerConfig,
    idle_timeout_s: float,
) -> AsyncGenerator[list[NatsMsg], None]:
    """One read per subject, merged by stream sequence. Each stops at the stream's last
    sequence as of now, so what the merge gives is every match of a prefix of the stream (a
    read going on past where another ended would give a later event without the earlier ones
    of the other subjects). A message two subjects both match is given once.

    What each read gave is held until every read still going holds something: nothing a read
    gives later comes before what it holds. Then each run of one read's messages that comes
    before the others' is handed on whole, its end found by bisection (a sequence parsed a few
    times a run, not once a message)."""
    until = int((await js.stream_info(stream)).state.last_seq or 0)
    if not until:
        return
    readers = [_read_one(js, stream, s, config, idle_timeout_s, until) for s in subjects]
    held = [_Held() for _ in readers]
    live = set(range(len(readers)))
    async with contextlib.AsyncExitStack() as closing:
        for reader in readers:  # every one closed (its consumer deleted), whichever fails
            closing.push_async_callback(reader.aclose)
        while live:
            for i in sorted(live):
                if not held[i].left():
                    try:
                        held[i].put(await anext(readers[i]))
                    except StopAsyncIteration:
                        live.discard(i)
            limit = min((held[i].last() for i in live), default=None)
            top = until if limit is None else limit
            out: list[NatsMsg] = []
            while True:
                # the read holding the earliest message still to give, at or before the limit
                heads = sorted((h.head(), n) for n, h in enumerate(held) if h.left() and h.head() <= top)
                if not heads:
                    break
                first, n = heads[0]
                for other, m in heads[1:]:
                    if other == first:
                        held[m].at += 1  # the same message, matched by two subjects: given once
                after = [h.head() for m, h in enumerate(held) if m != n and h.left()]
                bound = min([*after, top + 1])
                out += held[n].take_before(bound)
            if out:
                yield out


class _Held:
    """What one read of a merge gave and the merge has not handed on yet."""

    __slots__ = ("at", "msgs")

    def __init__(self) -> None:
        self.msgs: list[NatsMsg] = []
        self.at = 0

    def put(self, batch: list[NatsMsg]) -> None:
        self.msgs, self.at = batch, 0

    def left(self) -> bool:
        return self.at < len(self.msgs)

    def head(self) -> int:
        return _seq(self.msgs[self.at])

    def last(self) -> int:
        return _seq(self.msgs[-1])

    def take_before(self, bound: int) -> list[NatsMsg]:
        end = bisect.bisect_left(self.msgs, bound, lo=self.at, key=_seq)
        out = self.msgs[self.at : end]
        self.at = end
        if end == len(self.msgs):
            self.put([])
        return out


def _seq(raw: NatsMsg) -> int:
    return position(raw)[0]


def _up_to(batch: list[NatsMsg], until: int) -> list[NatsMsg]:
    """The batch's messages up to stream sequence `until` (all of them where it is 0). In
    stream order, so what lies past the cut is the batch's tail: a few sequences looked at a
    list, not every one's."""
    if not until or not batch or _seq(batch[-1]) <= until:
        return batch
    return batch[: bisect.bisect_right(batch, until, key=_seq)]


def _may_be_last(reply: str) -> bool:
    """Whether a read's message may say that nothing is pending after it, from its reply subject
    alone: it ends in `.0` (the count is the last token), or it is the longer v2 form, whose
    last token is not the count. Only such a message's position is parsed to know: the reader
    of a history parses each one's anyway, and twice was half a microsecond an event more."""
    return reply.endswith(".0") or reply.count(".") > 8


async def _read_one(
    js: JetStreamContext,
    stream: str,
    subject: str,
    config: api.ConsumerConfig,
    idle_timeout_s: float,
    until: int = 0,
) -> AsyncGenerator[list[NatsMsg], None]:
    """`read_batches` of one subject, ending before the first message after stream sequence
    `until` where it is given.

    Batches are asked for with the consumer's `MSG.NEXT` request and arrive on one inbox
    subscription: nats-py's `fetch` waits for each message with its own `wait_for` and two
    tasks, which was most of the cost of reading history (replay, the brain's catch-up). On
    mesh's client the inbox is a sink (`MeshClient.subscribe_sink`), which puts each message
    in the read's deque as it is parsed; the sink goes with the subscription, in `finally`,
    also when the read is left before its end.
    """
    cfg = copy.copy(config)
    cfg.ack_policy = api.AckPolicy.NONE
    cfg.filter_subject = subject
    cfg.filter_subjects = None
    cfg.inactive_threshold = READ_IDLE_S
    cfg.mem_storage = True
    cfg.num_replicas = 1
    info = await add_reader(js, stream, cfg)
    name = info.name
    nc = js._nc
    arrived: collections.deque[NatsMsg] = collections.deque()
    wake = asyncio.Event()

    def land(msg: NatsMsg) -> None:
        arrived.append(msg)
        wake.set()

    async def on_msg(msg: NatsMsg) -> None:
        land(msg)

    inbox = nc.new_inbox()
    if isinstance(nc, MeshClient) and nc.read_sinks:
        # each message lands as it is parsed: no queue, task switch or coroutine per message
        sub = await nc.subscribe_sink(inbox, land)
    else:
        # no byte limit on the subscription (a batch is bounded by the request's max_bytes
        # instead): nats-py would drop what exceeds one as a slow consumer
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=4 * READ_BATCH, pending_bytes_limit=0)
    next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{name}"
    request = json.dumps(
        {"batch": READ_BATCH, "max_bytes": READ_BATCH_BYTES, "expires": int(idle_timeout_s * NS)}
    ).encode()
    keeper: asyncio.Future[None] | None = None
    try:
        if not info.num_pending:
            return
        for _ in range(READ_AHEAD):
            await nc.publish(next_subject, request, reply=inbox)
        keeper = asyncio.ensure_future(_keep_alive(nc, next_subject, inbox))
        in_batch = 0
        broken = 0
        while True:
            if not arrived:
                wake.clear()
                waiting = asyncio.wait_for(wake.wait(), timeout=idle_timeout_s + 1.0)
                try:
                    # a user refused the pull fails here, not as the stream's end after a wait
                    await (
                        nc.refusals.guard((next_subject,), waiting)
                        if isinstance(nc, WatchedClient)
                        else waiting
                    )
                except TimeoutError:
                    # not even the request's expiry came back
                    if await _left(js, stream, name):
                        raise ReadBroken(stream, f"nothing came for {idle_timeout_s + 1.0:.0f}s") from None
                    return
                continue
            batch: list[NatsMsg] = []
            asks = 0
            ended = False
            while arrived:
                raw = arrived.popleft()
                status = status_of(raw)
                if status:
                    description = (raw.headers or {}).get("Description", "")
                    if status == "409" and "Batch Completed" in description:
                        continue  # a full batch: the next one is already asked for
                    if status == "409" and "MaxBytes" in description:
                        # the batch reached max_bytes before READ_BATCH messages: ask for the next
                        in_batch = 0
                        asks += 1
                        continue
                    # the request ended without the message that says nothing follows it: the
                    # stream's end only if the consumer has nothing left; else the read broke
                    # off (503: the request reached no consumer, as just after one is made on
                    # another server of a cluster) and is asked again, a few times, before it
                    # fails
                    if status in _ENDS and not await _left(js, stream, name):
                        ended = True
                        break
                    broken += 1
                    if broken > READ_RETRIES:
                        kept = _up_to(batch, until)
                        if kept:
                            yield kept  # (what came before the break is the stream's, in order)
                        raise ReadBroken(stream, f"{status} {description}".rstrip())
                    await asyncio.sleep(0.05 * broken)
                    in_batch = 0
                    asks += 1
                    continue
                broken = 0  # a message came: the read goes on, however slowly
                batch.append(raw)
                if _may_be_last(raw.reply or "") and position(raw)[1] == 0:
                    ended = True  # nothing was pending after it
                    break
                in_batch += 1
                if in_batch == READ_BATCH:
                    in_batch = 0
                    asks += 1
            kept = _up_to(batch, until)
            if len(kept) < len(batch):
                batch, ended = kept, True  # the stream went on past the read's cut
            if not ended:
                # asked for before this list is handed on: the server sends while it is taken in
                for _ in range(asks):
                    await nc.publish(next_subject, request, reply=inbox)
            if batch:
                yield batch
            if ended:
                return
    finally:
        if keeper is not None:
            keeper.cancel()
        with contextlib.suppress(*TRANSIENT):
            await sub.unsubscribe()
            await js.delete_consumer(stream, name)


async def _keep_alive(nc: NatsClient, next_subject: str, inbox: str) -> None:
    """Keep a read's consumer from being deleted while its messages wait unread: the server
    deletes a pull consumer no request reached for its inactive threshold, and a read asks only
    once it has taken in what came. A merge of two subjects holds one of them as long as the
    other's events before its next take (a plan's 1,000 events can span a million of its
    tasks'), so every `KEEP_ALIVE_S` it sends a request that can take no message: at most one
    byte, which no message fits. The server counts it as a request, answers that the message
    exceeds it and drops it, the message staying where it was; the answer goes to a subject
    nobody listens on."""
    touch = json.dumps({"batch": 1, "max_bytes": 1, "expires": int(1 * NS)}).encode()
    while True:
        await asyncio.sleep(KEEP_ALIVE_S)
        with contextlib.suppress(*TRANSIENT):
            await nc.publish(next_subject, touch, reply=f"{inbox}.keep")


async def iter_bucket(kv: KeyValue, keys: str = ">") -> AsyncIterator[tuple[str, bytes]]:
    """Every live key of a bucket (matching `keys`) with its latest value, one at a time.

    (nats-py's own watcher can report the end before the first value arrives, returning an
    empty bucket; this reads the bucket's stream directly, a batch at a time.)
    """
    async for key, raw in _live_values(kv, keys):
        yield key, raw.data


async def iter_revisions(kv: KeyValue, keys: str = ">") -> AsyncIterator[tuple[str, bytes, int]]:
    """`iter_bucket` with each value's revision (its sequence in the bucket's stream)."""
    async for key, raw in _live_values(kv, keys):
        yield key, raw.data, position(raw)[0]


async def _live_values(kv: KeyValue, keys: str) -> AsyncIterator[tuple[str, NatsMsg]]:
    """Each live key under `keys` once, with a value it had during the read.

    A key written again while the read is under way can slip past it: the bucket keeps one
    value per key, so the write removes the value the read had still to reach, and the server
    may say nothing is pending before it counts the new value, which lies beyond. So the read
    does not end where the server says: it reads on from the last message it got, again and
    again, until a pass reads nothing or only keys it has given already (values written
    meanwhile; a bucket written without a pause would keep a read that waited for a pass with
    nothing going forever). A key read twice is given once, with its first value: the read is
    no snapshot.
    """
    bucket = kv._name
    prefix = kv_keys(bucket)
    stream, subject = f"KV_{bucket}", prefix + keys
    given: set[str] = set()
    last = 0
    config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
    while True:
        new = 0
        async for raw in read_stream(kv._js, stream, subject, config):
            last = max(last, position(raw)[0])
            # one copy of the key for the set and whoever keeps it (a task's record interns its
            # key: a million-key read kept a million copies besides)
            key = sys.intern(raw.subject[len(prefix) :])
            if key in given or kv_gone(raw):
                continue
            given.add(key)
            new += 1
            yield key, raw
        if not new:
            return
        # what was written meanwhile: nothing, unless a key moved past where the read ended
        after = api.DeliverPolicy.BY_START_SEQUENCE
        config = api.ConsumerConfig(deliver_policy=after, opt_start_seq=last + 1)


def kv_gone(raw: NatsMsg) -> bool:
    """A deleted or purged key's marker."""
    headers = raw.headers or {}
    return headers.get("KV-Operation") in _KV_GONE or bool(headers.get("Nats-Marker-Reason"))


_KV_GONE = {"DEL", "PURGE"}


async def value_of(kv: KeyValue, key: str) -> bytes | None:
    """A key's latest value; None when the bucket has no such key."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return entry.value or b""


async def read_bucket(kv: KeyValue, keys: str = ">") -> dict[str, bytes]:
    """Every live key of a bucket (matching `keys`) and its latest value."""
    return {key: value async for key, value in iter_bucket(kv, keys)}
