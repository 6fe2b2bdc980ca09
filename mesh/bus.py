"""The bus: one NATS connection, the JetStream resources mesh needs, and typed publishing.

Resource definitions are plain dicts in the JetStream API's own JSON form (the
form `nats stream add --config FILE` reads), built from `Settings` here and
nowhere else. `ensure_resources` creates or updates them idempotently; `mesh
init --write-config` renders the same dicts into `nats/`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import functools
import itertools
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

import nats
from mesh import events
from mesh.errors import MeshError, ServerUnavailable
from mesh.events import DeadLetter, Msg
from mesh.names import HEADER_MSG_ID, HEADER_TYPE, KV_SUBJECTS, Names, kv_keys, kv_subject
from mesh.settings import Settings
from mesh.store import StoreWatch

log = logging.getLogger(__name__)

NS = 1_000_000_000
DAY_S = 86_400.0
DEAD_PAYLOAD_BYTES = 2048
PUBLISH_TIMEOUT_S = 10.0
PIPELINE_CHUNK = 2000
# what a server that is restarting, unreachable or slow raises: worth trying again
TRANSIENT = (nats.errors.Error, nats.js.errors.Error, TimeoutError)


# ------------------------------------------------------------------ definitions


def stream_definitions(settings: Settings) -> list[dict[str, Any]]:
    """The streams, in JetStream API form (durations in nanoseconds)."""
    n = settings.names
    dup_ns = int(settings.duplicate_window_s * NS)
    return [
        {
            "name": n.events_stream,
            "description": "mesh: the append-only history of everything that happened",
            "subjects": [n.evt_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_age": int(settings.events_max_age_days * DAY_S * NS),
            "max_bytes": settings.events_max_bytes or -1,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            "num_replicas": settings.replicas,
        },
        {
            "name": n.work_stream,
            "description": "mesh: tasks released by the brain, waiting for a worker",
            "subjects": [n.work_all],
            "retention": "workqueue",
            "storage": "file",
            "discard": "new",
            "max_age": 0,
            # the brain keeps this queue short (release_window per class); this is a backstop
            "max_bytes": settings.work_max_bytes,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            "num_replicas": settings.replicas,
        },
        {
            "name": n.cmd_stream,
            "description": "mesh: plan submissions and operator commands for the brain",
            "subjects": [n.cmd_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_age": int(settings.cmd_max_age_days * DAY_S * NS),
            "max_bytes": -1,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            "num_replicas": settings.replicas,
        },
        {
            "name": n.esc_stream,
            "description": "mesh: escalation requests from the brain, for the gateway",
            "subjects": [n.esc_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_age": int(settings.cmd_max_age_days * DAY_S * NS),
            "max_bytes": -1,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            "num_replicas": settings.replicas,
        },
    ]


def bucket_definitions(settings: Settings) -> list[dict[str, Any]]:
    """The KV buckets; on a cluster (`replicas` > 1) each kept on that many servers."""
    buckets = _bucket_definitions(settings)
    if settings.replicas == 1:
        return buckets
    return [{**d, "replicas": settings.replicas} for d in buckets]


def _bucket_definitions(settings: Settings) -> list[dict[str, Any]]:
    """The KV buckets: current state (the event stream is the history)."""
    n = settings.names
    return [
        {
            "bucket": n.tasks_bucket,
            "description": "mesh: task id -> task record (written by the brain alone)",
            "history": settings.kv_history,
            "ttl": 0,
            "storage": "file",
            # workers read a task's record before running it: direct gets are the cheap path
            "allow_direct": True,
        },
        {
            "bucket": n.plans_bucket,
            "description": "mesh: plan id -> plan record (written by the brain alone)",
            "history": settings.kv_history,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.brain_bucket,
            "description": "mesh: the brain's checkpoint (last event folded into KV) and leadership lease",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.gpus_bucket,
            "description": "mesh: GPU id -> its latest gpu.state (written by that GPU's worker alone)",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.telemetry_bucket,
            "description": "mesh: <host>.gpu<N> / <host>.host -> latest telemetry (by that host's watchdog)",
            "history": 1,
            # a host whose watchdog stopped leaves no stale readings behind for long
            "ttl": int(settings.telemetry_ttl_s * NS),
            # rewritten every few seconds and worthless after a restart: memory, not disk
            "storage": "memory",
        },
        {
            "bucket": n.gpu_control_bucket,
            "description": "mesh: <gpu>.thermal / <gpu>.operator -> whether that GPU's worker may claim work",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.agents_bucket,
            "description": "mesh: agent id -> registration; a key vanishes when its agent stops refreshing",
            "history": 1,
            "ttl": int(settings.agent_ttl_s * NS),
            "storage": "file",
        },
        {
            "bucket": n.gateway_bucket,
            "description": "mesh: the gateway's spend per day and plan, and each escalation's final answer",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
    ]


def consumer_definitions(settings: Settings, classes: tuple[str, ...] = ("cpu",)) -> list[dict[str, Any]]:
    """Durable pull consumers: `stream` names where each lives."""
    n = settings.names
    ack_wait = int(settings.ack_wait_s * NS)
    out: list[dict[str, Any]] = [
        {
            "stream": n.cmd_stream,
            "config": {
                "durable_name": n.brain_cmd_consumer,
                "filter_subject": n.cmd_all,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(settings.brain_ack_wait_s * NS),
                "max_ack_pending": 1000,
            },
        },
        {
            "stream": n.events_stream,
            "config": {
                "durable_name": n.brain_runs_consumer,
                "filter_subjects": [n.runs_all, n.gpu_states_all],
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(settings.brain_ack_wait_s * NS),
                "max_ack_pending": 10000,
            },
        },
    ]
    out.append(
        {
            "stream": n.events_stream,
            "config": {
                "durable_name": n.brain_esc_consumer,
                "filter_subject": n.esc_events_all,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(settings.brain_ack_wait_s * NS),
                "max_ack_pending": 10000,
            },
        }
    )
    out.append(gateway_consumer_definition(settings))
    out.append(
        {
            "stream": n.events_stream,
            "config": {
                "durable_name": n.auditor_consumer,
                "filter_subjects": n.audited_subjects(),
                "ack_policy": "all",
                # an existing history is not audited again from its start
                "deliver_policy": "new",
                "ack_wait": 30 * NS,
                "max_ack_pending": 20000,
            },
        }
    )
    for cls in classes:
        if cls == "llm":
            continue  # LLM work is queued per model: see `llm_consumer_definition`
        out.append(
            {
                "stream": n.work_stream,
                "config": {
                    "durable_name": n.workers_consumer(cls),
                    "filter_subject": n.work(cls),
                    "ack_policy": "explicit",
                    "deliver_policy": "all",
                    "ack_wait": ack_wait,
                    "max_ack_pending": -1,
                },
            }
        )
    return out


def gateway_consumer_definition(settings: Settings) -> dict[str, Any]:
    """The gateway's consumer of escalation requests. A request is acknowledged only once it is
    answered or has failed for good; one waiting out a backoff is handed back with a delay
    (`nak`), so the server, not the gateway, holds pending retries across restarts."""
    n = settings.names
    return {
        "stream": n.esc_stream,
        "config": {
            "durable_name": n.gateway_consumer,
            "filter_subject": n.esc_all,
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "ack_wait": int(settings.gateway_ack_wait_s * NS),
            "max_deliver": -1,
            "max_ack_pending": 1000,
        },
    }


def llm_consumer_definition(settings: Settings, model: str) -> dict[str, Any]:
    """The consumer the workers holding `model` share (created by the first one to load it)."""
    n = settings.names
    return {
        "durable_name": n.llm_consumer(model),
        "filter_subject": n.work_llm(model),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": int(settings.ack_wait_s * NS),
        "max_ack_pending": -1,
    }


def own_consumer_definition(settings: Settings, worker: str) -> dict[str, Any]:
    """One worker's queue of resource tasks; forgotten by the server a day after its worker went."""
    n = settings.names
    return {
        "durable_name": n.own_consumer(worker),
        "filter_subject": n.work_to(worker),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": int(settings.ack_wait_s * NS),
        "max_ack_pending": -1,
        "inactive_threshold": int(DAY_S * NS),
    }


def _stream_config(d: dict[str, Any]) -> api.StreamConfig:
    config: api.StreamConfig = api.StreamConfig.from_response(copy.deepcopy(d))
    return config


def _consumer_config(d: dict[str, Any]) -> api.ConsumerConfig:
    config: api.ConsumerConfig = api.ConsumerConfig.from_response(copy.deepcopy(d))
    return config


def _kv_config(d: dict[str, Any]) -> api.KeyValueConfig:
    return api.KeyValueConfig(
        bucket=d["bucket"],
        description=d.get("description"),
        history=d["history"],
        ttl=(d["ttl"] / NS) or None,
        storage=api.StorageType(d["storage"]),
        direct=d.get("allow_direct", False),
        replicas=d.get("replicas", 1),
    )


# ------------------------------------------------------------------ the bus


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


def jetstream(nc: Client, settings: Settings, timeout: float = 10.0) -> JetStreamContext:
    """The JetStream context of these settings: the server's own domain, or `jetstream_domain`."""
    return DomainJetStream(nc, domain=settings.jetstream_domain or None, timeout=timeout)


class _Ack(msgspec.Struct):
    """A JetStream publish acknowledgement, or its error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


class AckBatch:
    """The acknowledgements of one pipelined batch, in the order its messages were sent."""

    def __init__(self, prefix: str, key: str, n: int) -> None:
        self.key = key
        self.prefix = f"{prefix}.{key}"
        self.acks: list[api.PubAck | None] = [None] * n
        self.missing = n
        self.done: asyncio.Future[list[api.PubAck]] = asyncio.get_running_loop().create_future()

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
        self.acks[i] = api.PubAck(stream=ack.stream, seq=ack.seq, domain=ack.domain, duplicate=ack.duplicate)
        self.missing -= 1
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

    async def on_reply(self, msg: NatsMsg) -> None:
        key, _, index = msg.subject[len(self.prefix) + 1 :].partition(".")
        batch = self.batches.get(key)
        if batch is not None and index.isdigit():
            batch.take(int(index), msg)


class Bus:
    """A connected client: JetStream context, KV handles and publish helpers."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.js: JetStreamContext = jetstream(nc, settings)
        self.settings = settings
        self.names: Names = settings.names
        self._kv: dict[str, KeyValue] = {}
        self._objects: ObjectStore | None = None
        self._acks: AckCollector | None = None
        self.closing = False
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
        """The object store (created on first use), for payloads too big for a message."""
        if self._objects is None:
            name = self.names.objects_bucket
            try:
                self._objects = await self.js.object_store(name)
            except nats.js.errors.BucketNotFoundError:
                self._objects = await self.js.create_object_store(
                    name,
                    api.ObjectStoreConfig(
                        description="mesh: payloads too big for one message",
                        storage=api.StorageType.FILE,
                        ttl=self.settings.events_max_age_days * DAY_S,
                        replicas=self.settings.replicas,
                    ),
                )
                log.info("created object store %s", name)
        return self._objects

    async def _missing_stream(self, name: str) -> str:
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return f"stream {name}"
        return ""

    async def _ensure_stream(self, d: dict[str, Any]) -> None:
        config = _stream_config(d)
        try:
            await self.js.stream_info(d["name"])
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            log.info("created stream %s", d["name"])
            return
        await self.js.update_stream(config)

    async def _ensure_bucket(self, d: dict[str, Any]) -> None:
        try:
            self._kv[d["bucket"]] = await self.js.key_value(d["bucket"])
        except nats.js.errors.BucketNotFoundError:
            self._kv[d["bucket"]] = await self.js.create_key_value(_kv_config(d))
            log.info("created bucket %s", d["bucket"])

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
        """
        if not items:
            return []
        if self._acks is None:
            self._acks = AckCollector(self.nc.new_inbox())
            await self.nc.subscribe(f"{self._acks.prefix}.>", cb=self._acks.on_reply)
        batch = self._acks.open(len(items))
        route = self.js._route if isinstance(self.js, DomainJetStream) else None
        try:
            for i, (subject, data, headers) in enumerate(items):
                # nothing here yields until the client's buffer is full: the batch goes out
                # in as few writes as the buffer allows
                await self.nc.publish(
                    route(subject) if route else subject, data, reply=batch.reply(i), headers=headers
                )
            acks = await asyncio.wait_for(batch.done, timeout=PUBLISH_TIMEOUT_S)
        except TRANSIENT as exc:
            await self.store.failed(exc, (subject for subject, _, _ in items))
            raise
        finally:
            self._acks.close(batch)
        if self.store.full:
            for subject, _, _ in items:
                self.store.cleared(subject)
        return acks

    def _encoded(self, evs: Sequence[Msg]) -> list[tuple[str, bytes, dict[str, str]]]:
        items: list[tuple[str, bytes, dict[str, str]]] = []
        for ev in evs:
            subject, msg_id = route(self.names, ev)
            items.append(
                (subject, events.encode(ev), {HEADER_TYPE: events.type_of(ev), HEADER_MSG_ID: msg_id})
            )
        return items

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

        `then` (work items, say) goes out in the same pipeline as the last chunk, so both cost
        one round trip; their acknowledgements are returned. Nothing orders them against the
        puts: they are different streams, which the server stores independently."""

        def kv(chunk: list[tuple[str, str, bytes]]) -> list[tuple[str, bytes, dict[str, str]]]:
            return [(kv_subject(bucket, key), value, {}) for bucket, key, value in chunk]

        rest = iter(puts)
        chunk = list(itertools.islice(rest, PIPELINE_CHUNK))
        while following := list(itertools.islice(rest, PIPELINE_CHUNK)):
            await self._pipelined(kv(chunk))
            chunk = following
        last = kv(chunk)
        if len(then) > PIPELINE_CHUNK:
            await self._pipelined(last)
            return await self.emit_many(then)
        acks = await self._pipelined(last + self._encoded(then))
        return acks[len(last) :]

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


async def fetch_some(
    sub: JetStreamContext.PullSubscription,
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
    except nats.errors.TimeoutError:
        return []
    except TRANSIENT as exc:
        if store is None or not store.full:
            log.warning("fetching %s failed (%r); retrying", what, exc)
        await asyncio.sleep(0.5)
        return []


READ_BATCH = 1000
# a history read holds at most about this much of one batch in memory
READ_BATCH_BYTES = 32 * 1024 * 1024


async def read_stream(
    js: JetStreamContext,
    stream: str,
    subject: str | list[str],
    config: api.ConsumerConfig,
    idle_timeout_s: float = 5.0,
) -> AsyncIterator[NatsMsg]:
    """Messages of `stream` under `subject` (as `config` selects them), up to the current end.

    An ephemeral pull consumer without acks: it never disturbs durable consumers, holds at
    most a batch or two in memory however long the stream, and knows from its own info, before
    anything is fetched, how much there is to read.

    Batches are asked for with the consumer's `MSG.NEXT` request and arrive on one inbox
    subscription: nats-py's `fetch` waits for each message with its own `wait_for` and two
    tasks, which was most of the cost of reading history (replay, the brain's catch-up).
    """
    subjects = [subject] if isinstance(subject, str) else subject
    cfg = copy.copy(config)
    cfg.ack_policy = api.AckPolicy.NONE
    if len(subjects) == 1:
        cfg.filter_subject = subjects[0]
    else:
        cfg.filter_subjects = subjects
    cfg.inactive_threshold = 60.0
    cfg.mem_storage = True
    cfg.num_replicas = 1
    info = await js.add_consumer(stream, config=cfg)
    name = info.name
    nc = js._nc
    arrived: collections.deque[NatsMsg] = collections.deque()
    wake = asyncio.Event()

    async def on_msg(msg: NatsMsg) -> None:
        arrived.append(msg)
        wake.set()

    inbox = nc.new_inbox()
    # no byte limit on the subscription (a batch is bounded by the request's max_bytes instead):
    # nats-py would drop what exceeds one as a slow consumer
    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=4 * READ_BATCH, pending_bytes_limit=0)
    next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{name}"
    request = json.dumps(
        {"batch": READ_BATCH, "max_bytes": READ_BATCH_BYTES, "expires": int(idle_timeout_s * NS)}
    ).encode()
    try:
        if not info.num_pending:
            return
        await nc.publish(next_subject, request, reply=inbox)
        in_batch = 0
        while True:
            if not arrived:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=idle_timeout_s + 1.0)
                except TimeoutError:
                    return
                continue
            raw = arrived.popleft()
            status = raw.headers.get("Status") if raw.headers else None
            if status:
                description = (raw.headers or {}).get("Description", "")
                if status == "409" and "Batch Completed" in description:
                    continue  # a full batch: the next one is already asked for
                if status == "409" and "MaxBytes" in description:
                    # the batch reached max_bytes before READ_BATCH messages: ask for the next
                    in_batch = 0
                    await nc.publish(next_subject, request, reply=inbox)
                    continue
                # the request expired with nothing more, or the consumer has no more: the
                # stream's end, as far as this read goes
                return
            yield raw
            if raw.metadata.num_pending == 0:
                return
            in_batch += 1
            if in_batch == READ_BATCH:
                in_batch = 0
                await nc.publish(next_subject, request, reply=inbox)
    finally:
        with contextlib.suppress(*TRANSIENT):
            await sub.unsubscribe()
            await js.delete_consumer(stream, name)


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
        yield key, raw.data, raw.metadata.sequence.stream


async def _live_values(kv: KeyValue, keys: str) -> AsyncIterator[tuple[str, NatsMsg]]:
    bucket = kv._name
    prefix = kv_keys(bucket)
    config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
    async for raw in read_stream(kv._js, f"KV_{bucket}", prefix + keys, config):
        headers = raw.headers or {}
        if headers.get("KV-Operation") in _KV_GONE or headers.get("Nats-Marker-Reason"):
            continue
        yield raw.subject[len(prefix) :], raw


_KV_GONE = {"DEL", "PURGE"}


async def read_bucket(kv: KeyValue, keys: str = ">") -> dict[str, bytes]:
    """Every live key of a bucket (matching `keys`) and its latest value."""
    return {key: value async for key, value in iter_bucket(kv, keys)}


# Facts that an operator's retry can make happen again for the same attempt: their
# id also names the moment. (After a crash the brain does not decide these again:
# it folds what it had published before deciding anything; see agents/brain.py.)
_REPEATABLE = frozenset({"task.waiting", "task.cancelled", "task.reset", "plan.finished", "plan.resumed"})


def route(names: Names, ev: Msg) -> tuple[str, str]:
    """The subject of an event or work item and its `Nats-Msg-Id`.

    The id names the fact, so a fact re-published after a crash is stored once.
    """
    tag = events.type_of(ev)
    kind = tag.rsplit(".", 1)[-1]
    plan_id = getattr(ev, "plan_id", "")
    task_id = getattr(ev, "task_id", "")
    attempt = getattr(ev, "attempt", 0)
    at = getattr(ev, "at", 0.0)
    repeatable = tag in _REPEATABLE or (tag == "task.failed" and getattr(ev, "reason", "") == "dependency")
    moment = f":{at!r}" if repeatable else ""
    if tag == "task.redelivered":
        delivery = getattr(ev, "delivery", 0)
        return names.task_event(plan_id, task_id, kind), f"{plan_id}.{task_id}:{attempt}:{kind}:{delivery}"
    if tag.startswith("task."):
        return names.task_event(plan_id, task_id, kind), f"{plan_id}.{task_id}:{attempt}:{kind}{moment}"
    if tag.startswith("run."):
        worker = getattr(ev, "worker", "")
        return names.run_event(
            plan_id, task_id, kind, worker
        ), f"{plan_id}.{task_id}:{attempt}:{kind}:{worker}"
    if tag == "plan.tasks":
        return names.plan_event(plan_id, kind), f"{plan_id}:{kind}:{getattr(ev, 'part', 0)}"
    if tag.startswith("plan."):
        return names.plan_event(plan_id, kind), f"{plan_id}:{kind}{moment}"
    if tag.startswith("agent."):
        agent_id = getattr(ev, "agent_id", "")
        return names.agent_event(agent_id, kind), f"{agent_id}:{kind}:{at!r}"
    if tag == "work":
        cls = getattr(ev, "cls", "cpu")
        model = getattr(ev, "model", "")
        subject = names.work_llm(model) if cls == "llm" and model else names.work(cls)
        return subject, f"{plan_id}.{task_id}:{attempt}:work"
    if tag == "resource":
        rid = getattr(ev, "rid", "")
        return names.work_to(getattr(ev, "worker", "")), f"resource:{rid}"
    if tag.startswith("gpu."):
        gpu = getattr(ev, "gpu", "")
        if tag == "gpu.requested":
            return names.gpu_event(gpu, kind), f"{gpu}:requested:{getattr(ev, 'rid', '')}"
        if tag == "gpu.control":
            return names.gpu_event(gpu, kind), f"{gpu}:control:{getattr(ev, 'source', '')}:{at!r}"
        return names.gpu_event(gpu, kind), f"{gpu}:{kind}:{getattr(ev, 'state', '')}:{at!r}"
    if tag == "cmd.submit":
        return names.submit, plan_id
    if tag == "cmd.cancel":
        return names.cancel(plan_id), f"{plan_id}:cancel:{at}"
    if tag == "cmd.retry":
        return names.retry(plan_id), f"{plan_id}:retry:{at}"
    if tag == "dead.letter":
        return names.dead_letter(getattr(ev, "agent_id", "")), ""
    if tag == "esc.request":
        return names.escalation(plan_id, task_id), f"esc:{getattr(ev, 'rid', '')}"
    if tag.startswith("esc."):
        rid = getattr(ev, "rid", "")
        tries = f":{getattr(ev, 'tries', 0)}" if tag == "esc.waiting" else ""
        return names.esc_event(plan_id, task_id, kind), f"esc:{rid}:{kind}{tries}"
    if tag.startswith("alert."):
        rule, target = getattr(ev, "rule", ""), getattr(ev, "target", "")
        return names.alert_event(rule, kind), f"alert:{rule}:{target}:{kind}:{at!r}"
    raise ValueError(f"no route for {tag}")


def origin_of(raw: NatsMsg) -> str:
    """`<stream>:<sequence>` of a JetStream message: a stable name for it."""
    try:
        meta = raw.metadata
    except nats.errors.NotJSMessageError:
        return f"core:{uuid.uuid4().hex}"
    return f"{meta.stream}:{meta.sequence.stream}"


def decode_or_none(raw: NatsMsg) -> tuple[events.Message | None, str]:
    """Decode a NATS message; on failure return (None, why)."""
    try:
        return events.decode(raw.data), ""
    except msgspec.ValidationError as exc:
        return None, f"invalid message: {exc}"
    except msgspec.DecodeError as exc:
        return None, f"undecodable message: {exc}"


def misplaced(names: Names, subject: str, msg: Msg) -> str:
    """Why `msg` does not belong on `subject` ('' when it does).

    A message belongs only on the subject mesh itself would publish it to (`route`): its type,
    and the plan, task, worker, GPU or agent it speaks of, are all in that subject. So the
    server's per-subject permissions decide who may say what: a worker, whose user may publish
    run reports under its own name only, cannot pass a submission off as a report, nor report
    in another worker's name.
    """
    try:
        expected, _ = route(names, msg)
    except ValueError as exc:  # a plan or task id that cannot be a subject token
        return f"a {events.type_of(msg)} message that names no valid subject ({exc}) arrived on {subject}"
    if expected != subject:
        return f"a {events.type_of(msg)} message belongs on {expected}, not on {subject}"
    return ""


def decode_checked(raw: NatsMsg, names: Names) -> tuple[events.Message | None, str]:
    """Decode a message read from a stream or subscription and check that it belongs on the
    subject it came on (`misplaced`); on either failure return (None, why)."""
    msg, why = decode_or_none(raw)
    if msg is None:
        return None, why
    why = misplaced(names, raw.subject, msg)
    return (None, why) if why else (msg, "")


async def connect(
    settings: Settings,
    name: str,
    *,
    wait_s: float = 0.0,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Bus:
    """Connect to the server. With `wait_s` > 0 keep trying that long (agents starting early).

    With `nats_user` it authenticates, and its replies come to an inbox only that user may
    read; with a `tls://` URL or a CA file it speaks TLS. `server_url` may list several
    servers of a cluster, comma-separated: it fails over between them."""
    url = settings.url
    options = connect_options(settings)
    deadline = time.monotonic() + wait_s
    attempt = 0
    holder: list[Bus] = []

    async def error(exc: Exception) -> None:
        # before the first connection, failures are reported once, below
        if holder:
            log.warning("nats: %s", exc)

    async def disconnected() -> None:
        if not (holder and holder[0].closing):
            log.warning("disconnected from %s; reconnecting", url)

    async def reconnected() -> None:
        log.info("reconnected to %s", url)
        if holder:
            holder[0].store.reconnected()
        if on_reconnect is not None:
            await on_reconnect()

    connect_kwargs: dict[str, Any] = dict(
        servers=settings.urls,
        name=name,
        **options,
        connect_timeout=2,
        # fail fast on the first connection (we retry it here, visibly)...
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        allow_reconnect=False,
        error_cb=error,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
    )
    while True:
        attempt += 1
        nc = Client()
        try:
            await nc.connect(**connect_kwargs)
            # ...and once connected, reconnect forever through server restarts
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            bus = Bus(nc, settings)
            holder.append(bus)
            return bus
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # (bounded: closing a connection whose TLS handshake failed can wait forever)
            with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                await asyncio.wait_for(nc.close(), timeout=2.0)
            if _refused(exc):
                raise ServerUnavailable(
                    f"the NATS server at {url} refused the credentials of user "
                    f"{settings.nats_user or '(none)'!r} ({exc}). Check nats_user and nats_password "
                    "(the config file `mesh init --secure` wrote for this role)."
                ) from exc
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise ServerUnavailable(
                    f"the NATS server at {url} has a certificate this client does not trust ({exc}). "
                    "Set nats_tls_ca to the CA file that signed it (docs/security.md#tls)."
                ) from exc
            if time.monotonic() >= deadline:
                raise ServerUnavailable(
                    f"cannot reach the NATS server at {url} ({exc.__class__.__name__}: {exc}). "
                    "Start one with `mesh up`, or point mesh at yours with --server or MESH_NATS_URL"
                    + (
                        "; if it asks clients for certificates, set nats_tls_cert and nats_tls_key."
                        if settings.nats_tls_ca or url.startswith("tls://")
                        else "."
                    )
                ) from exc
            if attempt == 1 or attempt % 10 == 0:
                log.warning("waiting for the NATS server at %s: %s", url, exc)
            await asyncio.sleep(1.0)


def _refused(exc: BaseException) -> bool:
    return "authorization violation" in str(exc).lower() or "authentication" in str(exc).lower()


def connect_options(settings: Settings) -> dict[str, Any]:
    """The credential and TLS options of `nats.connect` these settings ask for."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        from mesh.security import inbox_prefix

        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
        options["inbox_prefix"] = inbox_prefix(settings.nats_user)
    tls_wanted = any(u.startswith("tls://") for u in settings.urls) or settings.nats_tls_ca
    if tls_wanted:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.nats_tls_ca or None)
        if settings.nats_tls_cert:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        options["tls"] = context
    return options
