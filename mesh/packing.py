"""Packed work items: several short tasks released together, in one work item.

A released task's work item is a message stored on the server, delivered, kept alive and
acknowledged: for a task that runs in microseconds (a no-op, a `true`), that is most of what
the task costs the server and its worker. So the brain packs the items of one commit that are
short and alike into one (`WorkItem.more`): the first task's item carries the others, and the
worker that takes it runs them one after another in the slot it took, each its own attempt,
claim and report, whatever the outcome of the one before. Nothing else changes: each task's
release is its own event, its record and its report are its own, and a redelivered item's
tasks are each checked against their record as any item is (`mesh.work.still_wanted`).

Only when it cannot hold work back: a packed task waits for the ones before it in its item,
so tasks are packed only where running them one after another costs nothing worth counting
(a no-op body, or a kind whose runs the brain measured at `pack_below_s` or less: its learned
median), and a shell task only while more of its class wait beyond the release window (every
slot has work, and the tasks packed would have queued anyway). Never a task that reads or
keeps files, has a continuation, is a review or runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from mesh.events import PACK_CLASSES, PACK_KINDS, WorkItem
from mesh.learned import by_kind
from mesh.machine_state import State

# the most body text one packed item carries
PACK_BYTES = 32 * 1024


def packable(item: WorkItem, state: State, below_s: float) -> bool:
    """Whether `item` may share a work item with others of its class (see the module)."""
    if (
        item.kind not in PACK_KINDS
        or item.cls not in PACK_CLASSES
        or item.then is not None
        or item.more
        or item.model
        or item.inputs
        or item.after
        or item.artifacts
    ):
        return False
    if item.kind == "noop":
        return True
    if not state.queue.get(item.cls):
        return False  # (nothing waits: each of these may have a slot of its own)
    return state.learned.duration_s(by_kind(item.kind), float("inf")) <= below_s


def pack(items: Sequence[WorkItem], state: State, size: int, below_s: float) -> list[WorkItem]:
    """`items` with the packable ones of each class gathered `size` to an item (in their order:
    the first of each pack carries the rest in `more`), the others as they are. `size` <= 1:
    none packed. A pack alone is its one item."""
    if size <= 1 or len(items) < 2:
        return list(items)
    out: list[WorkItem | list[WorkItem]] = []
    open_packs: dict[str, tuple[list[WorkItem], list[int]]] = {}
    for item in items:
        if not packable(item, state, below_s):
            out.append(item)
            continue
        found = open_packs.get(item.cls)
        if found is not None:
            members, body = found
            if len(members) < size and body[0] + len(item.body) <= PACK_BYTES:
                members.append(item)
                body[0] += len(item.body)
                continue
        members = [item]
        open_packs[item.cls] = (members, [len(item.body)])
        out.append(members)
    return [
        entry
        if isinstance(entry, WorkItem)
        else entry[0]
        if len(entry) == 1
        else msgspec.structs.replace(entry[0], more=tuple(entry[1:]))
        for entry in out
    ]


def members(item: WorkItem) -> tuple[WorkItem, ...]:
    """The tasks an item carries: itself (without `more`) and each packed with it, in order."""
    if not item.more:
        return (item,)
    return (msgspec.structs.replace(item, more=()), *item.more)
