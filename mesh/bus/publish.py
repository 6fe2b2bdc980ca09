"""The bus: one connected client, its resources, and typed publishing of mesh's messages.

Every message goes to the subject `route` names, with its `Nats-Msg-Id` for deduplication.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

import nats
from mesh import events
from mesh.bus.jetstream import TRANSIENT, DomainJetStream, jetstream
from mesh.bus.natsclient import MeshClient, Outgoing
from mesh.bus.pipeline import AckCollector
from mesh.bus.refusals import Client as WatchedClient
from mesh.bus.resources import (
    DAY_S,
    _consumer_config,
    _kv_config,
    _stream_config,
    bucket_definitions,
    consumer_definitions,
    gateway_consumer_definition,
    stream_definitions,
)
from mesh.bus.route import origin_of, route
from mesh.bus.store import StoreWatch
from mesh.errors import MeshError
from mesh.events import DeadLetter, Msg
from mesh.names import HEADER_MSG_ID, HEADER_TYPE, KV_SUBJECTS, OBJECT_SUBJECTS, Names, kv_keys, kv_subject
from mesh.settings import Settings

log = logging.getLogger(__name__)


DEAD_PAYLOAD_BYTES = 2048


PUBLISH_TIMEOUT_S = 10.0


PIPELINE_CHUNK = 2000


# atomic batch publishing (`Bus._pipelined`): a stream gets its messages as one batch from this
# many on (the server syncs a batch about four times: the batch's own staging and the stream's
# block; below this the messages one by one cost no more), at most the server's limit a batch
ATOMIC_MIN = 8
ATOMIC_MAX = 1000
ATOMIC_ID = "Nats-Batch-Id"
ATOMIC_SEQ = "Nats-Batch-Sequence"
ATOMIC_COMMIT = "Nats-Batch-Commit"
# the server's refusals of a whole batch that the same messages one by one get past: atomic
# publishing disabled on the stream, a message it already has, too many batches in flight
ATOMIC_DISABLED = 10174
ATOMIC_REFUSED = frozenset({ATOMIC_DISABLED, 10201, 10210})
# "stream name already in use with a different configuration"
STREAM_NAME_IN_USE = 10058


class Bus:
    """A connected client: JetStream context, KV handles and publish helpers."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.js: JetStreamContext = jetstream(nc, settings)
        self.settings = settings
        self.names: Names = settings.names
        self._kv: dict[str, KeyValue] = {}
        self._objects: ObjectStore | None = None
        self._models: ObjectStore | None = None
        self._acks: AckCollector | None = None
        # streams known to take atomic batches, or not (`_allows_atomic`)
        self._atomic: dict[str, bool] = {}
        self.closing = False
        # when the connection last came back (wall clock, as the server's message times; 0:
        # never lost): a message stored before then may have been delivered before a server
        # restart that lost the record of it (`mesh.work.suspect`)
        self.reconnected_at = 0.0
        # says once when the server's store is full, and once when it takes writes again
        buckets = bucket_definitions(settings)
        memory = tuple(kv_keys(d["bucket"]) for d in buckets if d["storage"] == "memory")
        self.store = StoreWatch(settings, memory_subjects=memory)
        if isinstance(self.js, DomainJetStream):
            self.js.store = self.store

    # resources ----------------------------------------------------------------
    async def ensure_resources(self, classes: tuple[str, ...] = ("cpu",)) -> None:
        """Create or update every stream, bucket and consumer; safe to run any number of times."""
        for d in stream_definitions(self.settings):
            await self._ensure_stream(d)
        for d in bucket_definitions(self.settings):
            await self._ensure_bucket(d)
        for c in consumer_definitions(self.settings, classes):
            await self.js.add_consumer(c["stream"], config=_consumer_config(c["config"]))
        await self.objects()

    async def ensure_gateway_resources(self) -> None:
        """What the gateway uses, and nothing else (its credentials may allow no more): the
        event and escalation streams, the agents and gateway buckets, and its own consumer."""
        n = self.names
        for d in stream_definitions(self.settings):
            if d["name"] not in (n.events_stream, n.esc_stream):
                continue
            if self.settings.manage_resources:
                await self._ensure_stream(d)
            else:  # the brain or `mesh init` creates the streams; its own bucket it may create
                await self._wait_until_present(functools.partial(self._missing_stream, d["name"]), 3600.0)
        for d in bucket_definitions(self.settings):
            if d["bucket"] in (n.agents_bucket, n.gateway_bucket):
                await self._ensure_bucket(d)
        c = gateway_consumer_definition(self.settings)
        await self.js.add_consumer(c["stream"], config=_consumer_config(c["config"]))

    async def bind_resources(
        self, classes: tuple[str, ...] = ("cpu",), consumers: tuple[str, ...] = (), wait_s: float = 3600.0
    ) -> None:
        """Wait until every stream and bucket, and the durable `consumers` this process binds to,
        exist, creating none.

        For processes whose NATS user may not create them (`manage_resources = false`): the
        brain, or `mesh init`, creates them."""
        await self._wait_until_present(lambda: self._missing_resource(classes, consumers), wait_s)

    async def _wait_until_present(self, missing: Callable[[], Awaitable[str]], wait_s: float) -> None:
        """Poll `missing` (what does not exist yet, '' once all does) until all exists; for a
        process whose NATS user may not create what it uses."""
        deadline = time.monotonic() + wait_s
        for attempt in itertools.count():
            what = await missing()
            if not what:
                return
            if time.monotonic() >= deadline:
                raise MeshError(
                    f"{what} does not exist on the server, and this process may not create it "
                    "(manage_resources = false): start the brain, or run `mesh init` as the cli user"
                )
            if attempt % 30 == 0:
                log.warning("waiting for %s (the brain or `mesh init` creates it)", what)
            await asyncio.sleep(1.0)

    async def _missing_resource(self, classes: tuple[str, ...], consumers: tuple[str, ...]) -> str:
        # the escalation stream and the gateway's bucket are the brain's and the gateway's
        # alone: other roles may not even look at them
        n = self.names
        try:
            for d in stream_definitions(self.settings):
                if d["name"] != n.esc_stream:
                    await self.js.stream_info(d["name"])
            for d in bucket_definitions(self.settings):
                if d["bucket"] != n.gateway_bucket:
                    self._kv[d["bucket"]] = await self.js.key_value(d["bucket"])
            for c in consumer_definitions(self.settings, classes):
                if c["config"]["durable_name"] in consumers:
                    await self.js.consumer_info(c["stream"], c["config"]["durable_name"])
            self._objects = await self.js.object_store(self.names.objects_bucket)
        except nats.js.errors.NotFoundError as exc:
            return f"a stream, bucket or consumer ({exc.description or exc})"
        return ""

    async def prepare(self, classes: tuple[str, ...] = ("cpu",), consumers: tuple[str, ...] = ()) -> None:
        """`ensure_resources`, or `bind_resources` where this process may not create them."""
        if self.settings.manage_resources:
            await self.ensure_resources(classes)
        else:
            await self.bind_resources(classes, consumers)

    async def bind_consumer(self, config: dict[str, Any]) -> JetStreamContext.PullSubscription:
        """Create (or update) a durable pull consumer on the work stream and bind to it.

        Created under its name and filter (`CONSUMER.CREATE.<stream>.<name>.<filter>`): a
        server with per-role permissions lets a worker create exactly the consumers it owns."""
        named = {**config, "name": config["durable_name"]}
        await self.js.add_consumer(self.names.work_stream, config=_consumer_config(named))
        return await self.js.pull_subscribe_bind(
            durable=config["durable_name"], stream=self.names.work_stream
        )

    async def objects(self) -> ObjectStore:
        """The object store (created on first use), for payloads too big for a message. Its
        stream takes atomic batches (a batch's small artifacts in one write)."""
        if self._objects is None:
            self._objects = await self._object_store(
                self.names.objects_bucket,
                "mesh: payloads too big for one message",
                self.settings.events_max_age_days * DAY_S,
            )
            await self._allow_atomic(f"OBJ_{self.names.objects_bucket}")
        return self._objects

    async def _allow_atomic(self, stream: str) -> None:
        """Let `stream` take atomic batches where it does not yet, if this user may change it
        (one that may not publishes one message at a time, as before)."""
        if not self.settings.atomic_batches or self.settings.durability != "always":
            return
        try:
            info = await self.js.stream_info(stream)
            if not info.config.allow_atomic:
                info.config.allow_atomic = True
                await self.js.update_stream(info.config)
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("stream %s left without atomic batches: %s", stream, exc)

    async def models(self) -> ObjectStore:
        """The model files' object store (created on first use; nothing in it expires)."""
        if self._models is None:
            self._models = await self._object_store(
                self.names.models_bucket, "mesh: model files pushed with `mesh models push`", 0.0
            )
        return self._models

    async def _object_store(self, name: str, description: str, ttl: float) -> ObjectStore:
        """Bind to an object store, creating it (file storage, `ttl` seconds, 0: forever)."""
        try:
            return await self.js.object_store(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            store = await self.js.create_object_store(
                name,
                api.ObjectStoreConfig(
                    description=description,
                    storage=api.StorageType.FILE,
                    ttl=ttl or None,
                    replicas=self.settings.replicas,
                ),
            )
        except nats.js.errors.BadRequestError:
            # another agent starting at the same moment created it first, and may already have
            # changed it (`_allow_atomic`): the server refuses the same name with another
            # configuration, and there is a store to bind to
            return await self.js.object_store(name)
        log.info("created object store %s", name)
        return store

    async def _missing_stream(self, name: str) -> str:
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return f"stream {name}"
        return ""

    async def _ensure_stream(self, d: dict[str, Any]) -> None:
        config = _stream_config(d)
        try:
            info = await self.js.stream_info(d["name"])
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            log.info("created stream %s", d["name"])
            return
        if api.RetentionPolicy.WORK_QUEUE in (info.config.retention, config.retention):
            # the server changes no retention to or from work queue in place: an old install's
            # work queue stays one until the brain makes it anew (`mesh.bus.workstream`)
            config.retention = info.config.retention
        await self.js.update_stream(config)

    async def _ensure_bucket(self, d: dict[str, Any]) -> None:
        try:
            self._kv[d["bucket"]] = await self.js.key_value(d["bucket"])
        except nats.js.errors.BucketNotFoundError:
            try:
                self._kv[d["bucket"]] = await self.js.create_key_value(_kv_config(d))
                log.info("created bucket %s", d["bucket"])
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
                # made meanwhile by another process, which changed its stream's settings too
                # (`allow_atomic`, below): a creation with the bucket's bare settings is refused
                self._kv[d["bucket"]] = await self.js.key_value(d["bucket"])
        if d.get("allow_atomic"):
            # (a KV bucket's own settings cannot say it: its stream's can)
            info = await self.js.stream_info(f"KV_{d['bucket']}")
            if not info.config.allow_atomic:
                info.config.allow_atomic = True
                await self.js.update_stream(info.config)

    async def kv(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            try:
                self._kv[bucket] = await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError as exc:
                raise MeshError(
                    f"bucket {bucket} does not exist on the server; run `mesh init` or start an agent"
                ) from exc
        return self._kv[bucket]

    async def tasks_kv(self) -> KeyValue:
        return await self.kv(self.names.tasks_bucket)

    async def plans_kv(self) -> KeyValue:
        return await self.kv(self.names.plans_bucket)

    async def agents_kv(self) -> KeyValue:
        return await self.kv(self.names.agents_bucket)

    async def gpu_control_kv(self) -> KeyValue:
        return await self.kv(self.names.gpu_control_bucket)

    async def gpus_kv(self) -> KeyValue:
        return await self.kv(self.names.gpus_bucket)

    async def telemetry_kv(self) -> KeyValue:
        return await self.kv(self.names.telemetry_bucket)

    async def brain_kv(self) -> KeyValue:
        return await self.kv(self.names.brain_bucket)

    async def gateway_kv(self) -> KeyValue:
        return await self.kv(self.names.gateway_bucket)

    # publishing ------------------------------------------------------------------
    async def publish(self, subject: str, msg: Msg, msg_id: str) -> api.PubAck:
        """Publish to a stream and wait for the server's acknowledgement.

        `msg_id` names the fact: the server stores a fact re-published within the
        duplicate window once.
        """
        headers = {HEADER_TYPE: events.type_of(msg), HEADER_MSG_ID: msg_id}
        return await self.js.publish(subject, events.encode(msg), headers=headers)

    async def emit(self, ev: Msg) -> api.PubAck:
        """Publish an event or work item on its own subject, with its deterministic id."""
        subject, msg_id = route(self.names, ev)
        return await self.publish(subject, ev, msg_id)

    async def _pipelined(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[api.PubAck]:
        """Publish many messages without waiting between them; wait for every acknowledgement.

        The server stores a connection's messages to one stream in the order sent. The
        acknowledgements come to one subscription of this bus and complete one future for the
        whole batch (nats-py's `publish_async` makes a future, a semaphore wait, a random token
        and a done callback per message, and decodes each acknowledgement with `json`: about
        a fifth of the brain's time).

        Where `ATOMIC_MIN` or more go to one stream that allows it, they go as JetStream atomic
        batches: the server syncs such a batch to disk once, where it syncs every message
        published alone (`durability = "always"`; with "lazy" it syncs neither, except the
        batch's staging, so batches are not used). A batch holding a message the server
        already has (a step published again after an interruption) is refused whole; so is a
        batch to a stream that does not allow them: the same messages then go again one by one,
        and the server drops the ones it has by their `Nats-Msg-Id`.
        """
        if not items:
            return []
        groups = await self._atomic_groups(items)
        try:
            return await self._send(items, groups)
        except nats.js.errors.APIError as exc:
            if not groups or exc.err_code not in ATOMIC_REFUSED:
                raise
            if exc.err_code == ATOMIC_DISABLED:
                self._atomic.clear()  # asked again before the next batch
            log.debug("an atomic batch was refused (%s): publishing its messages one by one", exc)
            return await self._send(items, [])

    async def _send(
        self, items: list[tuple[str, bytes, dict[str, str]]], groups: list[list[int]]
    ) -> list[api.PubAck]:
        if self._acks is None:
            self._acks = AckCollector(self.nc.new_inbox())
            if isinstance(self.nc, MeshClient):
                await self.nc.subscribe_sink(f"{self._acks.prefix}.>", self._acks.take)
            else:
                await self.nc.subscribe(f"{self._acks.prefix}.>", cb=self._acks.on_reply)
        batch = self._acks.open(len(items))
        if isinstance(self.nc, MeshClient):
            self.nc.awaiting(batch.done)  # (failed if the connection is lost before it is answered)
        # an atomic batch's messages carry its id and their place; only its last asks for an
        # acknowledgement (it commits the batch, and its acknowledgement says for all of them)
        marks: dict[int, dict[str, str]] = {}
        for group in groups:
            batch_id = secrets.token_hex(11)
            for n, i in enumerate(group, 1):
                marks[i] = {ATOMIC_ID: batch_id, ATOMIC_SEQ: str(n)}
            marks[group[-1]][ATOMIC_COMMIT] = "1"
            batch.group(group)
        route = self.js._route if isinstance(self.js, DomainJetStream) else None
        subjects = [route(subject) if route else subject for subject, _, _ in items]

        def lines() -> Iterator[Outgoing]:
            for i, (subject, (_, data, headers)) in enumerate(zip(subjects, items, strict=True)):
                mark = marks.get(i)
                reply = batch.reply(i) if mark is None or ATOMIC_COMMIT in mark else ""
                yield subject, data, reply, {**headers, **mark} if mark else headers

        async def send() -> list[api.PubAck]:
            nc = self.nc
            if isinstance(nc, MeshClient):
                # the whole batch into the client's buffer at once (`MeshClient.publish_many`)
                await nc.publish_many(lines())
            else:
                for subject, data, reply, headers in lines():
                    # nothing here yields until the client's buffer is full: the batch goes
                    # out in as few writes as the buffer allows
                    await nc.publish(subject, data, reply=reply, headers=dict(headers) if headers else None)
            return await asyncio.wait_for(batch.done, timeout=PUBLISH_TIMEOUT_S)

        try:
            # a subject this user may not publish to fails the batch at once (`mesh.bus.refusals`)
            nc = self.nc
            acks = await (nc.refusals.guard(subjects, send()) if isinstance(nc, WatchedClient) else send())
        except TRANSIENT as exc:
            await self.store.failed(exc, (subject for subject, _, _ in items))
            raise
        finally:
            self._acks.close(batch)
        if self.store.full:
            for subject, _, _ in items:
                self.store.cleared(subject)
        return acks

    async def _atomic_groups(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[list[int]]:
        """The indexes of `items` to publish as atomic batches: per stream that allows them,
        where it has `ATOMIC_MIN` or more, in order, up to `ATOMIC_MAX` a batch."""
        s = self.settings
        if len(items) < ATOMIC_MIN or not s.atomic_batches or s.durability != "always":
            # (a server that syncs every couple of minutes syncs a batch still: no gain there)
            return []
        by_stream: dict[str, list[int]] = {}
        for i, (subject, _, _) in enumerate(items):
            stream = self._stream_of(subject)
            if stream:
                by_stream.setdefault(stream, []).append(i)
        groups = []
        for stream, indexes in by_stream.items():
            if len(indexes) < ATOMIC_MIN or not await self._allows_atomic(stream):
                continue
            groups += [indexes[i : i + ATOMIC_MAX] for i in range(0, len(indexes), ATOMIC_MAX)]
        return groups

    def _stream_of(self, subject: str) -> str:
        """The stream a subject mesh publishes in batches is stored in ('' : another)."""
        n = self.names
        if subject.startswith(KV_SUBJECTS):
            return f"KV_{subject[len(KV_SUBJECTS) :].split('.', 1)[0]}"
        if subject.startswith(OBJECT_SUBJECTS):
            return f"OBJ_{subject[len(OBJECT_SUBJECTS) :].split('.', 1)[0]}"
        if subject.startswith(n.evt_prefix):
            return n.events_stream
        if subject.startswith(n.work_prefix):
            return n.work_stream
        return ""

    async def _allows_atomic(self, stream: str) -> bool:
        """Whether `stream` takes atomic batches (its settings, read once)."""
        allowed = self._atomic.get(stream)
        if allowed is None:
            try:
                info = await self.js.stream_info(stream)
                allowed = bool(info.config.allow_atomic)
            except (nats.errors.Error, TimeoutError):
                # (a user that may not read the stream's settings: one by one, as always)
                allowed = False
            self._atomic[stream] = allowed
        return allowed

    def _encoded(self, evs: Sequence[Msg]) -> list[tuple[str, bytes, dict[str, str]]]:
        items: list[tuple[str, bytes, dict[str, str]]] = []
        for ev in evs:
            subject, msg_id = route(self.names, ev)
            items.append(
                (subject, events.encode(ev), {HEADER_TYPE: events.type_of(ev), HEADER_MSG_ID: msg_id})
            )
        return items

    async def publish_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[api.PubAck]:
        """Raw messages (subject, data, headers) pipelined, in order (`_pipelined`): an object
        store's chunks and entries written together (`mesh.bus.files.put_small_many`)."""
        acks: list[api.PubAck] = []
        for i in range(0, len(items), PIPELINE_CHUNK):
            acks += await self._pipelined(items[i : i + PIPELINE_CHUNK])
        return acks

    async def emit_many(self, evs: Sequence[Msg]) -> list[api.PubAck]:
        """`emit` for many events or work items, pipelined, in order. Encoded a chunk at a time:
        a 100,000-task plan's events encoded at once were 100 MB that the brain's heap kept."""
        acks: list[api.PubAck] = []
        for i in range(0, len(evs), PIPELINE_CHUNK):
            acks += await self._pipelined(self._encoded(evs[i : i + PIPELINE_CHUNK]))
        return acks

    async def kv_put_many(
        self, puts: Iterable[tuple[str, str, bytes]], then: Sequence[Msg] = ()
    ) -> list[api.PubAck]:
        """Write many KV keys (bucket, key, value), pipelined: a KV put is a publish to its stream.
        `puts` is consumed a chunk at a time, so a lazy one is encoded a chunk at a time too.

        `then` (work items, say) goes out ahead of the first chunk, in its pipeline: both cost
        one round trip, and where there are many chunks (a big plan's acceptance writes a record
        for each task) the work does not wait on the rest of them. Their acknowledgements are
        returned. Nothing orders them against the puts: they are different streams, which the
        server stores independently."""

        def kv(chunk: list[tuple[str, str, bytes]]) -> list[tuple[str, bytes, dict[str, str]]]:
            return [(kv_subject(bucket, key), value, {}) for bucket, key, value in chunk]

        rest = iter(puts)
        chunk = kv(list(itertools.islice(rest, PIPELINE_CHUNK)))
        acks: list[api.PubAck] = []
        if len(then) > PIPELINE_CHUNK:
            acks = await self.emit_many(then)
        elif then:
            items = self._encoded(then)
            acks = (await self._pipelined(items + chunk))[: len(items)]
            chunk = kv(list(itertools.islice(rest, PIPELINE_CHUNK)))
        while chunk:
            await self._pipelined(chunk)
            chunk = kv(list(itertools.islice(rest, PIPELINE_CHUNK)))
        return acks

    async def kv_purge_many(self, keys: list[tuple[str, str]]) -> None:
        """Remove many KV keys (bucket, key) with their history, pipelined."""
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        items = [(kv_subject(bucket, key), b"", dict(headers)) for bucket, key in keys]
        for i in range(0, len(items), PIPELINE_CHUNK):
            await self._pipelined(items[i : i + PIPELINE_CHUNK])

    async def dead_letter(self, agent_id: str, raw: NatsMsg, reason: str) -> None:
        """Record a message nobody can use, with a bounded copy of its bytes."""
        subject, data = raw.subject, raw.data
        log.warning("dead letter from %s (%d bytes): %s", subject, len(data), reason)
        letter = DeadLetter(
            agent_id=agent_id,
            subject=subject,
            reason=reason[:500],
            at=time.time(),
            size=len(data),
            payload=base64.b64encode(data[:DEAD_PAYLOAD_BYTES]).decode(),
        )
        await self.publish(self.names.dead_letter(agent_id), letter, f"dead:{origin_of(raw)}")

    async def dead_record(
        self, agent_id: str, bucket: str, key: str, data: bytes, revision: int, reason: str
    ) -> None:
        """Record a KV value nobody can read (a damaged task or plan record), with a bounded copy
        of its bytes. Named by its revision: recorded once however often it is found."""
        letter = DeadLetter(
            agent_id=agent_id,
            subject=kv_subject(bucket, key),
            reason=reason[:500],
            at=time.time(),
            size=len(data),
            payload=base64.b64encode(data[:DEAD_PAYLOAD_BYTES]).decode(),
            bucket=bucket,
            key=key,
        )
        await self.publish(self.names.dead_letter(agent_id), letter, f"dead:kv:{bucket}:{key}:{revision}")

    async def close(self) -> None:
        """Flush what we published and close. (Every publish mesh makes is already
        acknowledged, so there is nothing in flight to drain.)"""
        self.closing = True
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=2)
            except (TimeoutError, nats.errors.Error) as exc:
                log.debug("flush before close failed: %s", exc)
        if not self.nc.is_closed:
            await self.nc.close()
