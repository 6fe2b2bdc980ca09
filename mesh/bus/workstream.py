"""The work stream's acknowledged items removed in bulk, and an old install's work-queue stream
made a limits one.

With `sync_interval: always` the server syncs each stored message and each removal. A
work-queue stream removes every item when its worker acknowledges it: a second write and sync
per task. The work stream keeps limits retention instead, and the brain purges, about once a
second, what every consumer of a subject has acknowledged: one purge per consumer whose ack
floor moved, a few syncs, whatever the count of items (docs/performance.md).

An item is purged only under its own consumer's subject (a literal filter of a consumer of
mesh's: `workers-<class>`, `workers-llm-<model>`, `worker-<id>`), and only below the ack floor
of every consumer whose filter overlaps that subject: an item nobody consumes yet (an LLM model
no worker holds yet) is never purged, nor one a consumer has not acknowledged (in flight, handed
back, waiting to be delivered again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo, RetentionPolicy

from mesh.bus.resources import _stream_config, stream_definitions
from mesh.settings import Settings

log = logging.getLogger(__name__)

# the server's page of a consumer list
LIST_PAGE = 256
# the durable names of mesh's own work consumers (`mesh.names.Names`)
OWN_PREFIXES = ("workers-", "worker-")


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both filters (`*` one token, `>` the rest; '' all)."""
    ta, tb = (a or ">").split("."), (b or ">").split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and x != "*" and y != "*":
            return False
    return True


def filters_of(config: ConsumerConfig) -> list[str]:
    if config.filter_subjects:
        return list(config.filter_subjects)
    return [config.filter_subject or ""]


def literal(subject: str) -> bool:
    return bool(subject) and "*" not in subject.split(".") and ">" not in subject.split(".")


def purge_bounds(consumers: list[ConsumerInfo]) -> dict[str, int]:
    """Subject -> the first stream sequence that must stay: each of mesh's consumers' literal
    filter, bounded by the ack floor of every consumer that overlaps it (its own included)."""
    bounds: dict[str, int] = {}
    for info in consumers:
        name = info.config.durable_name or info.name or ""
        if not name.startswith(OWN_PREFIXES):
            continue
        for subject in filters_of(info.config):
            if not literal(subject):
                continue
            bound = None
            for other in consumers:
                if any(subjects_overlap(subject, f) for f in filters_of(other.config)):
                    floor = other.ack_floor.stream_seq if other.ack_floor else 0
                    bound = floor + 1 if bound is None else min(bound, floor + 1)
            if bound is not None:
                bounds[subject] = min(bound, bounds.get(subject, bound))
    return bounds


async def list_consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    out: list[ConsumerInfo] = []
    while True:
        page = await js.consumers_info(stream, offset=len(out))
        out += page
        if len(page) < LIST_PAGE:
            return out


@dataclass
class WorkPurger:
    """What the brain purged so far: subject -> the bound it last purged below."""

    js: JetStreamContext
    stream: str
    purged: dict[str, int] = field(default_factory=dict)

    async def purge(self, keep: dict[str, int] | None = None) -> dict[str, int]:
        """Purge every subject whose bound moved since the last time; the bounds read. `keep`:
        subject -> the first sequence to keep whatever the consumers acknowledged (the brain's
        oldest item whose task it has not seen end)."""
        bounds = purge_bounds(await list_consumers(self.js, self.stream))
        for subject, first in (keep or {}).items():
            if subject in bounds:
                bounds[subject] = min(bounds[subject], first)
        for subject, bound in bounds.items():
            if bound - 1 <= self.purged.get(subject, 0):
                continue
            await self.js.purge_stream(self.stream, seq=bound, subject=subject)
            self.purged[subject] = bound - 1
        for gone in set(self.purged) - set(bounds):
            del self.purged[gone]
        return bounds


async def work_retention(js: JetStreamContext, stream: str) -> str:
    info = await js.stream_info(stream)
    retention = info.config.retention
    return retention.value if isinstance(retention, RetentionPolicy) else str(retention)


async def make_limits(js: JetStreamContext, settings: Settings) -> bool:
    """Make an old install's work-queue work stream a limits one (the server cannot change a
    stream's retention to or from work queue in place): its consumers' configs are read, the
    stream deleted, created again and its consumers with it, under their names, so workers
    bound to them fetch from the new one. The items it held are gone: the brain calls this
    before it publishes the items of its `ready` tasks again (`republish_ready`); a task running
    meanwhile finishes and reports as before, its acknowledgement finding nothing to remove.
    True when it did; False when the stream is limits already, or this user may not delete it
    (it then stays a work queue, which removes each item on its ack, as before)."""
    stream = settings.names.work_stream
    if await work_retention(js, stream) != RetentionPolicy.WORK_QUEUE.value:
        return False
    # the durables (an ephemeral reader's consumer goes with the stream, as it would anyway)
    configs = [c.config for c in await list_consumers(js, stream) if c.config.durable_name]
    try:
        await js.delete_stream(stream)
    except nats.errors.Error as exc:  # refused, or (a permissions violation) never answered
        log.warning(
            "the work stream %s is a work queue and this user may not delete it (%s): it stays one, "
            "each item removed on its acknowledgement (a write per task); delete it while no plan "
            "runs for the brain to create it again",
            stream,
            exc,
        )
        return False
    definition = next(d for d in stream_definitions(settings) if d["name"] == stream)
    try:
        await js.add_stream(_stream_config(definition))
    except nats.js.errors.BadRequestError:
        await js.stream_info(stream)  # an agent starting meanwhile created it (as limits)
    for config in configs:
        config.name = config.durable_name
        await js.add_consumer(stream, config=config)
    log.warning(
        "made the work stream %s a limits stream (was a work queue): %d consumers created again; "
        "queued items are published again from the ready tasks",
        stream,
        len(configs),
    )
    return True


async def queued(js: JetStreamContext, stream: str) -> int:
    """Work items not acknowledged yet (waiting, or delivered and in flight): the stream's count
    of messages is no longer that, as acknowledged items stay until purged. Per consumer of
    mesh's its pending and unacknowledged; an item on a subject no consumer takes, stored."""
    consumers = [
        c
        for c in await list_consumers(js, stream)
        if (c.config.durable_name or c.name or "").startswith(OWN_PREFIXES)
    ]
    taken = {s for c in consumers for s in filters_of(c.config)}
    count = sum((c.num_pending or 0) + (c.num_ack_pending or 0) for c in consumers)
    info = await js.stream_info(stream, subjects_filter=">")
    for subject, stored in (info.state.subjects or {}).items():
        if not any(subjects_overlap(subject, f) for f in taken):
            count += stored
    return count
