"""The brain's snapshot: every task and plan record as of one point of the history, in pages a
restarted brain reads in a few hundred large values instead of one KV value per task.

Pure: what to write and how to read it back; the brain writes it in its bucket (`agents.brain_
snapshot`) and `mesh.bus.snapshot` reads it.

A plan's tasks are cut into pages of `PAGE` records by their index (their place in the plan),
each page one value (msgpack, zlib-compressed; cut in chunks where it is bigger than a message
may be), and the plan records are one more page. A page is written again only when one of its
records changed since the last snapshot: a million-task plan runs through its tasks in order,
so a snapshot rewrites the few pages where the work is, not the million records.

Each page has two slots (`a`, `b`): a page is written into the slot the current head does not
point at, then the head (`HEAD_KEY`) is written naming the new slots. A brain cut off while
writing leaves the old head and the pages it names whole; every page is checked against the
head's SHA-256 when read, and a snapshot that fails any check is not used (the brain reads the
task records from KV instead, as it does without one).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from mesh.records import PlanRecord, TaskRecord

if TYPE_CHECKING:
    from mesh.machine_state import State

FORMAT = 1
# records a page
PAGE = 5000
# the head's key in the brain's bucket, and the prefix of the pages' keys
HEAD_KEY = "snapshot"
PAGE_PREFIX = "snap"
# the page of the plan records
PLANS = "plans"
SLOTS = ("a", "b")
# a snapshot waits until the records written since the last one are at least a fourth of the
# records it has to encode (the pages they changed): encoding costs at most four times the
# writes it follows, however scattered the changes are
COST_RATIO = 4
# zlib's fastest level: records repeat their field names and plan ids, and compress 10-40x
LEVEL = 1


class SnapshotError(Exception):
    """A snapshot that cannot be used; the message says why."""


class PageRef(msgspec.Struct, array_like=True, frozen=True):
    """One page as the head names it: its slot, its chunks there, its bytes' SHA-256, how many
    records it holds, and how many chunks each slot last held (purged when the page goes)."""

    name: str
    slot: str
    chunks: int
    sha256: str
    count: int
    held: tuple[int, int] = (0, 0)


class SnapshotHead(msgspec.Struct, kw_only=True):
    """A snapshot: every record as folded up to stream sequence `seq`, in `pages`."""

    format: int
    seq: int
    at: float
    brain: str = ""
    tasks: int = 0
    plans: int = 0
    pages: list[PageRef] = msgspec.field(default_factory=list)


class _TaskPage(msgspec.Struct, array_like=True):
    records: list[TaskRecord]


class _PlanPage(msgspec.Struct, array_like=True):
    records: list[PlanRecord]


_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(SnapshotHead)
_task_decoder = msgspec.msgpack.Decoder(_TaskPage)
_plan_decoder = msgspec.msgpack.Decoder(_PlanPage)


def encode_head(head: SnapshotHead) -> bytes:
    return zlib.compress(_encoder.encode(head), LEVEL)


def decode_head(data: bytes) -> SnapshotHead:
    """The head, or SnapshotError saying why it cannot be read."""
    try:
        head = _head_decoder.decode(zlib.decompress(data))
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"its head does not decode: {exc}") from None
    if head.format != FORMAT:
        raise SnapshotError(f"it is format {head.format}, this brain reads format {FORMAT}")
    return head


def chunk_key(name: str, slot: str, k: int) -> str:
    return f"{PAGE_PREFIX}.{name}.{slot}.{k}"


def page_name(plan_id: str, page: int) -> str:
    return f"{plan_id}.{page}"


def page_keys(ref: PageRef) -> list[str]:
    """Every key the page holds, in both slots."""
    return [chunk_key(ref.name, slot, k) for i, slot in enumerate(SLOTS) for k in range(ref.held[i])]


def decode_page(ref: PageRef, data: bytes) -> list[TaskRecord] | list[PlanRecord]:
    """A page's records from its joined chunks, checked against its reference."""
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise SnapshotError(f"page {ref.name} differs from its checksum")
    try:
        raw = zlib.decompress(data)
        records: list[TaskRecord] | list[PlanRecord] = (
            _plan_decoder.decode(raw).records if ref.name == PLANS else _task_decoder.decode(raw).records
        )
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"page {ref.name} does not decode: {exc}") from None
    if len(records) != ref.count:
        raise SnapshotError(f"page {ref.name} holds {len(records)} records, its head says {ref.count}")
    return records


@dataclass
class Built:
    """A snapshot ready to write: its values (chunks first, the head last) and the keys of
    pages no longer in it (purged once the head is written)."""

    head: SnapshotHead
    puts: list[tuple[str, bytes]]
    purges: list[str]
    encoded: int = 0  # records encoded (the rest were kept from the last snapshot)


@dataclass
class Snapshots:
    """What the next snapshot has to write: the pages whose records changed since the last
    one (`touch`), and when it is worth writing (`due`)."""

    head: SnapshotHead | None = None
    dirty: set[str] = field(default_factory=set)
    # plans whose task indexes are not their places in the plan (records lost from KV): their
    # pages cannot be told from an index, so all of them are written every time
    unaligned: set[str] = field(default_factory=set)
    writes: int = 0
    refs: dict[str, PageRef] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head is not None:
            self.refs = {r.name: r for r in self.head.pages}

    def touch(self, tasks: Iterable[TaskRecord], plans: bool) -> None:
        n = 0
        for rec in tasks:
            self.dirty.add(page_name(rec.plan_id, rec.index // PAGE))
            n += 1
        if plans:
            self.dirty.add(PLANS)
        self.writes += n

    def touch_all(self, state: State) -> None:
        """Everything changed (a brain that read its records from KV trusts no snapshot)."""
        for plan_id, keys in state.plan_keys.items():
            self.dirty.update(page_name(plan_id, p) for p in range(_pages(len(keys))))
        self.dirty.add(PLANS)
        self.writes += len(state.tasks)

    def due(self, state: State, min_tasks: int, every: int) -> bool:
        """Whether a snapshot is worth writing now: the brain knows `min_tasks` records or more
        (fewer load from KV in moments), `every` records were written since the last one, and
        those writes are at least a `COST_RATIO`th of what the snapshot would encode."""
        if len(state.tasks) < min_tasks or not self.dirty or self.writes < every:
            return False
        return self.writes * COST_RATIO >= self._cost(state)

    def _cost(self, state: State) -> int:
        """The records a snapshot now would encode (about: a plan whose pages cannot be told
        apart counts whole)."""
        cost = 0
        for name in self.dirty:
            if name == PLANS:
                cost += len(state.plans)
                continue
            plan_id, _, page = name.rpartition(".")
            held = len(state.plan_keys.get(plan_id, ()))
            cost += held if plan_id in self.unaligned else max(0, min(PAGE, held - int(page) * PAGE))
        return cost

    def build(self, state: State, seq: int, at: float, brain: str, max_chunk: int) -> Built:
        """The snapshot of `state` (folded up to `seq`): the pages changed since the last one
        encoded into their other slots, the rest named as they are."""
        pages: list[PageRef] = []
        puts: list[tuple[str, bytes]] = []
        present: set[str] = set()
        encoded = 0
        for plan_id in sorted(state.plan_keys):
            keys = state.plan_keys[plan_id]
            whole = plan_id in self.unaligned or not _aligned(state, keys)
            if whole:
                self.unaligned.add(plan_id)
            for p in range(_pages(len(keys))):
                name = page_name(plan_id, p)
                present.add(name)
                old = self.refs.get(name)
                if old is not None and not whole and name not in self.dirty:
                    pages.append(old)
                    continue
                records = [state.tasks[k] for k in keys[p * PAGE : (p + 1) * PAGE]]
                encoded += len(records)
                ref, values = _page(name, old, _encoder.encode(_TaskPage(records)), len(records), max_chunk)
                pages.append(ref)
                puts.extend(values)
        plans = list(state.plans.values())
        old = self.refs.get(PLANS)
        if old is None or PLANS in self.dirty or len(plans) != old.count:
            ref, values = _page(PLANS, old, _encoder.encode(_PlanPage(plans)), len(plans), max_chunk)
            puts.extend(values)
        else:
            ref = old
        pages.append(ref)
        present.add(PLANS)
        purges = [k for name, gone in self.refs.items() if name not in present for k in page_keys(gone)]
        head = SnapshotHead(
            format=FORMAT, seq=seq, at=at, brain=brain, tasks=len(state.tasks), plans=len(plans), pages=pages
        )
        return Built(head=head, puts=puts, purges=purges, encoded=encoded)

    def written(self, built: Built) -> None:
        """The snapshot is stored: it is the one the next builds on."""
        self.head = built.head
        self.refs = {r.name: r for r in built.head.pages}
        self.dirty.clear()
        self.writes = 0


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE


def _aligned(state: State, keys: list[str]) -> bool:
    """Whether each task's index is its place in the plan (indexes only grow along the plan,
    so the first and last agreeing means all do)."""
    if not keys:
        return True
    tasks = state.tasks
    return tasks[keys[0]].index == 0 and tasks[keys[-1]].index == len(keys) - 1


def _page(
    name: str, old: PageRef | None, raw: bytes, count: int, max_chunk: int
) -> tuple[PageRef, list[tuple[str, bytes]]]:
    """A page written into the slot `old` does not use, cut into chunks of `max_chunk` bytes.
    Keys the slot held beyond the new chunks stay (never read) until the page goes: `held`
    counts the most each slot held."""
    data = zlib.compress(raw, LEVEL)
    slot_i = 1 if old is not None and old.slot == SLOTS[0] else 0
    slot = SLOTS[slot_i]
    chunks = list(_cut(data, max_chunk))
    held = list(old.held) if old is not None else [0, 0]
    values = [(chunk_key(name, slot, k), c) for k, c in enumerate(chunks)]
    held[slot_i] = max(held[slot_i], len(chunks))
    ref = PageRef(
        name=name,
        slot=slot,
        chunks=len(chunks),
        sha256=hashlib.sha256(data).hexdigest(),
        count=count,
        held=(held[0], held[1]),
    )
    return ref, values


def _cut(data: bytes, size: int) -> Iterator[bytes]:
    if not data:
        yield b""
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]
