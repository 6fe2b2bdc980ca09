"""Reading and writing the brain's snapshot (`mesh.snapshot`) in the brain's bucket.

A read takes the head, then every page value in one pass over the bucket's `snap.` keys, and
decodes each page as soon as its chunks are in: what it holds at once is the compressed pages
and the records decoded so far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import nats.js.errors
from nats.js.kv import KeyValue

from mesh.bus.publish import Bus
from mesh.bus.read import iter_bucket, value_of
from mesh.records import PlanRecord, TaskRecord
from mesh.snapshot import (
    HEAD_KEY,
    PAGE_PREFIX,
    PLANS,
    Built,
    SnapshotError,
    SnapshotHead,
    chunk_key,
    decode_head,
    decode_page,
    encode_head,
)

# the most a snapshot's write has in flight at once
WRITE_BYTES = 8 * 1024 * 1024


async def read_head(kv: KeyValue) -> SnapshotHead | None:
    """The snapshot's head; None when there is none. SnapshotError when it cannot be read."""
    value = await value_of(kv, HEAD_KEY)
    return None if value is None else decode_head(value)


async def read_pages(
    kv: KeyValue, head: SnapshotHead, take: Callable[[TaskRecord], TaskRecord] = lambda r: r
) -> tuple[list[TaskRecord], list[PlanRecord]]:
    """Every record the snapshot holds, each task record through `take` as it is decoded (the
    brain makes it compact there). SnapshotError when a page is missing, cut short or does not
    match its checksum."""
    wanted: dict[str, tuple[int, int]] = {}  # chunk key -> (page number in the head, chunk number)
    for i, ref in enumerate(head.pages):
        for k in range(ref.chunks):
            wanted[chunk_key(ref.name, ref.slot, k)] = (i, k)
    parts: dict[int, dict[int, bytes]] = {}
    tasks: list[TaskRecord] = []
    plans: list[PlanRecord] = []
    done: set[int] = set()
    async for key, value in iter_bucket(kv, f"{PAGE_PREFIX}.>"):
        where = wanted.get(key)
        if where is None:
            continue  # the other slot, or a chunk beyond a page's count
        i, k = where
        got = parts.setdefault(i, {})
        got[k] = value
        ref = head.pages[i]
        if len(got) < ref.chunks:
            continue
        records = decode_page(ref, b"".join(got[n] for n in range(ref.chunks)))
        del parts[i]
        done.add(i)
        if ref.name == PLANS:
            plans.extend(r for r in records if isinstance(r, PlanRecord))
        else:
            tasks.extend(take(r) for r in records if isinstance(r, TaskRecord))
    if len(done) != len(head.pages):
        missing = [ref.name for i, ref in enumerate(head.pages) if i not in done]
        raise SnapshotError(
            f"{len(missing)} of its {len(head.pages)} pages are missing or short (first: {missing[0]})"
        )
    return tasks, plans


async def write(bus: Bus, kv: KeyValue, built: Built) -> None:
    """Store a built snapshot: its pages (pipelined), then its head, then purge the keys of
    pages it no longer has. The head is written only once every page it names is stored."""
    bucket = kv._name
    group: list[tuple[str, str, bytes]] = []
    size = 0
    for key, value in built.puts:
        group.append((bucket, key, value))
        size += len(value)
        if size >= WRITE_BYTES:
            await bus.kv_put_many(group)
            group, size = [], 0
    if group:
        await bus.kv_put_many(group)
    await kv.put(HEAD_KEY, encode_head(built.head))
    if built.purges:
        await bus.kv_purge_many([(bucket, key) for key in built.purges])


async def forget(bus: Bus, kv: KeyValue, keys: Sequence[str]) -> None:
    """Remove the snapshot's head (and `keys`, its pages): a brain that stops snapshotting
    leaves nothing a later brain could take for current."""
    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
        await kv.purge(HEAD_KEY)
    if keys:
        await bus.kv_purge_many([(kv._name, key) for key in keys])
