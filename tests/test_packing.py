"""Packed work items (`mesh.packing`): which released tasks share one work item, what a worker
accepts as one, and how a packed delivery is answered task by task. No server needed."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from agents.worker_packs import Part, Shared
from mesh import work
from mesh.bus.route import misplaced, work_subject
from mesh.events import TaskSpec, TaskSucceeded, WorkItem
from mesh.machine_state import State
from mesh.names import Names
from mesh.packing import PACK_BYTES, members, pack
from tests.test_machine import Driver, plan

NAMES = Names()


def item(tid: str, **kw: Any) -> WorkItem:
    kw.setdefault("kind", "noop")
    return WorkItem(plan_id="p1", task_id=tid, attempt=1, **kw)


def ids(items: list[WorkItem]) -> list[list[str]]:
    return [[m.task_id for m in members(i)] for i in items]


def short_shell(state: State, runs: int = 3, took: float = 0.001) -> None:
    """The brain has seen `runs` shell runs of `took` seconds, and a cpu task still waits."""
    spec = TaskSpec(id="x", body="true")
    for _ in range(runs):
        state.learned.observe(
            TaskSucceeded(plan_id="p0", task_id="x", attempt=1, at=0.0, worker="w", duration_s=took), spec
        )
    state.queue["cpu"] = [(0.0, 1, "p0.waiting")]


def test_no_op_tasks_are_packed_by_class_in_order_up_to_the_size() -> None:
    items = [item(f"t{i}") for i in range(5)] + [
        item("s0", cls="script"),
        item("t5"),
        item("s1", cls="script"),
    ]
    packed = pack(items, State(), size=4, below_s=0.02)
    assert ids(packed) == [["t0", "t1", "t2", "t3"], ["t4", "t5"], ["s0", "s1"]]
    # the first item carries the others, each whole (its own attempt and claim)
    assert packed[0].more[0] == items[1]
    assert members(packed[0])[0] == items[0]


def test_what_is_not_packed() -> None:
    state = State()
    short_shell(state)
    lone = {
        "a model task": item("a", kind="prompt", cls="llm", model="m"),
        "an embedding": item("b", kind="embed", cls="script", model="e"),
        "a task with a continuation": item("c", then=item("c2")),
        "a task with inputs": item("d", kind="shell", inputs=("x",)),
        "a task taking files": item("e", kind="shell", after=("x",)),
        "a task keeping files": item("f", kind="shell", artifacts=("*.txt",)),
        "an external task": item("g", cls="external"),
    }
    for why, one in lone.items():
        packed = pack([one, item("n1"), item("n2")], state, size=16, below_s=0.02)
        assert ids(packed) == [[one.task_id], ["n1", "n2"]], why
    # size 1: an item each
    assert ids(pack([item("n1"), item("n2")], state, size=1, below_s=0.02)) == [["n1"], ["n2"]]
    # one packable item alone is its own item, unchanged
    assert pack([item("n1")], state, size=16, below_s=0.02) == [item("n1")]


def test_shell_tasks_are_packed_only_when_measured_short_and_more_wait() -> None:
    shells = [item(f"t{i}", kind="shell", body="true") for i in range(3)]
    state = State()
    # never measured: each its own item
    assert ids(pack(shells, state, 16, 0.02)) == [["t0"], ["t1"], ["t2"]]
    short_shell(state, took=0.5)
    assert ids(pack(shells, state, 16, 0.02)) == [["t0"], ["t1"], ["t2"]]  # too long
    state = State()
    short_shell(state, runs=2)
    assert ids(pack(shells, state, 16, 0.02)) == [["t0"], ["t1"], ["t2"]]  # too few samples
    state = State()
    short_shell(state)
    assert ids(pack(shells, state, 16, 0.02)) == [["t0", "t1", "t2"]]
    # nothing more of the class waits: each may have a slot of its own
    state.queue["cpu"] = []
    assert ids(pack(shells, state, 16, 0.02)) == [["t0"], ["t1"], ["t2"]]


def test_a_pack_carries_a_bounded_amount_of_body_text() -> None:
    state = State()
    short_shell(state)
    big = "true # " + "x" * (PACK_BYTES // 3)
    shells = [item(f"t{i}", kind="shell", body=big) for i in range(5)]
    assert ids(pack(shells, state, 16, 0.02)) == [["t0", "t1"], ["t2", "t3"], ["t4"]]


def test_the_brain_packs_what_one_commit_releases() -> None:
    """The released items of a step, as the brain's commit packs them: every task once, with
    its own attempt and claim."""
    d = Driver()
    d.submit(plan(*[TaskSpec(id=f"t{i}", body="", kind="noop") for i in range(4)]))
    packed = pack(d.work, d.state, 16, 0.02)
    assert ids(packed) == [["t0", "t1", "t2", "t3"]]
    assert [m.claim for m in members(packed[0])] == [w.claim for w in d.work]
    assert len({w.claim for w in d.work}) == 4


def test_a_worker_takes_only_a_pack_mesh_would_queue_on_its_subject() -> None:
    subject = work_subject(NAMES, "cpu", "")
    good = msgspec.structs.replace(item("t0"), more=(item("t1"), item("t2")))
    assert misplaced(NAMES, subject, good) == ""
    bad = {
        "another class": (item("t1", cls="script"), "belongs on"),
        "a pack in a pack": (msgspec.structs.replace(item("t1"), more=(item("t9"),)), "carries more"),
        "a continuation": (item("t1", then=item("t9")), "carries more"),
        "a task twice": (item("t0"), "twice"),
        "a kind never packed": (item("t1", kind="embed", cls="script", model="e"), "never packed"),
        "a class never packed": (item("t1", cls="llm", model="m"), "never packed"),
    }
    for why, (member, says) in bad.items():
        packed = msgspec.structs.replace(item("t0"), more=(member,))
        assert says in misplaced(NAMES, subject, packed), why
    head = msgspec.structs.replace(item("t0", then=item("t9")), more=(item("t1"),))
    assert "continuation" in misplaced(NAMES, subject, head)
    # a head of a kind that runs in model batches: refused, and never batched either
    script = work_subject(NAMES, "script", "")
    embed = msgspec.structs.replace(item("t0", kind="embed", cls="script", model="e"), more=(item("t1"),))
    assert "never packed" in misplaced(NAMES, script, embed)
    assert work.batch_key(embed) == ""


class Delivery:
    """A delivery's answers, as the server would get them."""

    class metadata:
        num_delivered = 1
        timestamp = None

    subject = "s"
    data = b"{}"
    headers = None

    def __init__(self) -> None:
        self.answers: list[tuple[str, float | None]] = []
        self.beats = 0

    async def ack(self) -> None:
        self.answers.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.answers.append(("nak", delay))

    async def term(self) -> None:
        self.answers.append(("term", None))

    async def in_progress(self) -> None:
        self.beats += 1


AFTER_RUN_S = 30.0


@pytest.mark.parametrize(
    ("parts", "answer"),
    [
        (["ack", "ack", "ack"], ("ack", None)),
        # one handed back after others ran: again only once the brain surely has their reports
        # (as a dead worker's item: `ack_wait_s`)
        (["ack", "nak", "ack"], ("nak", AFTER_RUN_S)),
        # all handed back (a stopping worker ran none): again at once
        (["nak", "nak", "nak"], ("nak", None)),
        (["term", "term", "term"], ("term", None)),
        (["ack", "term", "ack"], ("ack", None)),
    ],
)
def test_a_packed_delivery_is_answered_once_every_part_has(parts: list[str], answer: tuple[str, Any]) -> None:
    async def go() -> list[tuple[str, float | None]]:
        raw = Delivery()
        shared = Shared(raw, len(parts), AFTER_RUN_S)  # type: ignore[arg-type]
        each = [Part(shared) for _ in parts]
        for part, how in zip(each, parts, strict=True):
            assert not raw.answers
            await getattr(part, how)()
            await part.ack()  # (a part answers once)
            await part.in_progress()  # (and keeps nothing alive once it has)
        assert raw.beats == 0
        return raw.answers

    assert asyncio.run(go()) == [answer]


def test_a_part_keeps_the_delivery_alive_while_it_runs() -> None:
    async def go() -> int:
        raw = Delivery()
        part = Part(Shared(raw, 2, AFTER_RUN_S))  # type: ignore[arg-type]
        await part.in_progress()
        return raw.beats

    assert asyncio.run(go()) == 1
