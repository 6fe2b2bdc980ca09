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
from mesh.machine import Policy, replay
from mesh.machine_state import State, packs
from mesh.names import Names
from mesh.packing import PACK_BYTES, members, pack
from tests.test_machine import Driver, check_history, plan, reload, statuses

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


def noops(n: int, prefix: str = "t") -> list[TaskSpec]:
    return [TaskSpec(id=f"{prefix}{i}", body="", kind="noop") for i in range(n)]


def test_the_release_window_counts_no_op_tasks_a_pack_at_a_time() -> None:
    """A window of 2 holds 2 items: 2 packs of 4 no-op tasks, or 2 shell tasks never measured.
    Counted one by one, 2 no-op tasks filled it and the second worker slot had nothing queued."""
    d = Driver(Policy(release_window=2, pack_size=4))
    d.submit(plan(*noops(20)))
    assert [w.task_id for w in d.work] == [f"t{i}" for i in range(8)]
    d2 = Driver(Policy(release_window=2, pack_size=4))
    d2.submit(plan(*[TaskSpec(id=f"s{i}", body="true") for i in range(6)]))
    assert [w.task_id for w in d2.work] == ["s0", "s1"]
    # a shell task measured short still counts one: it is packed only while more wait beyond
    # the window, and it is (the two released are one pack)
    d4 = Driver(Policy(release_window=2, pack_size=4))
    short_shell(d4.state)
    d4.submit(plan(*[TaskSpec(id=f"s{i}", body="true") for i in range(6)]))
    assert [w.task_id for w in d4.work] == ["s0", "s1"] and not d4.state.packed
    assert ids(pack(d4.work, d4.state, 4, 0.02)) == [["s0", "s1"]]
    # pack_size 1: one task, one item, as before packing
    d3 = Driver(Policy(release_window=2, pack_size=1))
    d3.submit(plan(*noops(6)))
    assert len(d3.work) == 2


def test_a_pack_that_ends_frees_its_place_in_the_window() -> None:
    d = Driver(Policy(release_window=2, pack_size=4))
    d.submit(plan(*noops(20)))
    assert d.state.packed == {f"p1.t{i}" for i in range(8)} and d.state.packed_inflight == {"cpu": 8}
    # each task that ends lets one more out: two packs' worth stay in flight
    for n, tid in enumerate(("t0", "t1", "t2", "t3")):
        d.run_task(tid)
        assert d.work[-1].task_id == f"t{8 + n}"
        assert d.state.packed_inflight == {"cpu": 8} and d.state.inflight == {"cpu": 8}
    d.drain()
    assert set(statuses(d.state).values()) == {"succeeded"}
    assert not d.state.packed and d.state.packed_inflight == {"cpu": 0}
    assert d.state.inflight == {"cpu": 0}
    check_history(d.events, 2, 4)


def test_a_restarted_brain_and_a_replay_count_the_no_op_tasks_in_flight_as_the_brain_did() -> None:
    """Which tasks count a pack at a time follows from their records (`packs`): a brain loading
    KV, or folding the history, counts as the one before it."""
    d = Driver(Policy(release_window=2, pack_size=4))
    d.submit(plan(TaskSpec(id="s", body="true"), *noops(20)))
    # the shell task takes one of the 2, the first 4 no-op tasks the other
    assert [w.task_id for w in d.work] == ["s", "t0", "t1", "t2", "t3"]
    assert len(d.state.packed) == 4 and d.state.inflight == {"cpu": 5}
    again = Driver(d.policy, state=reload(d.state, 60.0), now=d.now)
    assert again.state.packed == d.state.packed and again.state.packed_inflight == {"cpu": 4}
    assert replay(list(d.events), aging_s=60.0).packed == d.state.packed
    again.run(d.take("s"))  # the shell task's place: a pack's worth more
    assert [w.task_id for w in again.work] == ["t4", "t5", "t6", "t7"]
    # a continued task runs on its worker (no work item, no pack): it counts one
    rec = again.state.tasks["p1.t9"]
    assert not packs(msgspec.structs.replace(rec, continued=True)) and packs(rec)


def test_a_forgotten_plan_leaves_no_packed_task_counted() -> None:
    d = Driver(Policy(release_window=2, pack_size=4))
    d.submit(plan(*noops(20)))
    assert d.state.packed_inflight == {"cpu": 8}
    d.state.forget_plan("p1")
    assert not d.state.packed and d.state.packed_inflight == {"cpu": 0}
