"""What lets the brain hold a million tasks: one copy of each task's key, one empty environment
for every task that sets none, specs sent without their defaults, and each plan's counts by
class (what `mesh top` and the exporter read instead of every task). Structural checks, no
timings: the figures are tools/bench_scale.py's."""

from __future__ import annotations

import msgspec

from mesh.events import PlanAccepted, PlanSpec, TaskReleased, TaskSpec, TaskSucceeded, TaskWaiting
from mesh.machine_state import State, compact_record, evolve
from mesh.records import decode_task, encode_record

PLAN = "scale-1205000000-abcd"


def accepted(n: int = 6) -> State:
    """A plan of n no-op tasks (every third of class script) accepted and waiting, its specs
    decoded from JSON as the brain reads them from the object store."""
    specs = tuple(
        TaskSpec(id=f"t{i}", body="", kind="noop", cls="script" if i % 3 == 0 else "cpu") for i in range(n)
    )
    plan = msgspec.json.decode(msgspec.json.encode(PlanSpec(title="s", tasks=specs)), type=PlanSpec)
    state = State()
    evolve(state, PlanAccepted(plan_id=PLAN, plan=plan, at=1.0))
    for spec in plan.tasks:
        evolve(state, TaskWaiting(plan_id=PLAN, task_id=spec.id, at=2.0))
    return state


def key_copies(state: State) -> set[int]:
    """The distinct string objects the state keeps for its tasks' keys."""
    ids = {id(k) for k in state.tasks}
    ids |= {id(k) for keys in state.plan_keys.values() for k in keys}
    ids |= {id(entry[2]) for heap in state.queue.values() for entry in heap}
    return ids


def test_a_task_key_is_kept_once_for_the_table_its_plan_and_the_queue() -> None:
    state = accepted()
    assert len(state.tasks) == 6
    assert len(key_copies(state)) == 6
    # and whoever else asks a record for its key (the brain's list of recent writes) gets it
    assert all(r.key is k for k, r in state.tasks.items())
    loaded = State.load(
        [decode_task(encode_record(r)) for r in state.tasks.values()], list(state.plans.values())
    )
    assert len(key_copies(loaded)) == 6


def test_tasks_without_an_environment_share_one_and_a_loaded_record_its_id() -> None:
    state = accepted()
    envs = {id(r.spec.env) for r in state.tasks.values()}
    assert len(envs) == 1
    loaded = State.load(
        [decode_task(encode_record(r)) for r in state.tasks.values()], list(state.plans.values())
    )
    assert len({id(r.spec.env) for r in loaded.tasks.values()}) == 1
    assert all(r.task_id is r.spec.id for r in loaded.tasks.values())


def test_a_spec_travels_without_its_defaults_and_a_full_one_still_decodes() -> None:
    spec = TaskSpec(id="t1", body="", kind="noop")
    assert msgspec.json.encode(spec) == b'{"id":"t1","body":"","kind":"noop"}'
    full = (
        b'{"id":"t1","body":"","kind":"noop","class":"cpu","depends_on":[],"priority":5,'
        b'"timeout_s":1800.0,"retries":3,"env":{},"sensitive":false,"line":0,"model":"",'
        b'"inputs":[],"max_tokens":0,"requires_external":false,"escalate":[],"schema":"","artifacts":[]}'
    )
    assert msgspec.json.decode(full, type=TaskSpec) == spec


def test_a_plan_counts_its_tasks_by_class_and_a_load_counts_them_again() -> None:
    state = accepted()
    for task in ("t0", "t1"):
        evolve(state, TaskReleased(plan_id=PLAN, task_id=task, attempt=1, at=3.0))
    evolve(state, TaskSucceeded(plan_id=PLAN, task_id="t1", attempt=1, worker="w", at=4.0))
    plan = state.plans[PLAN]
    assert plan.by_class == {"script": {"waiting": 1, "ready": 1}, "cpu": {"waiting": 3, "succeeded": 1}}
    assert plan.counts == {"waiting": 4, "ready": 1, "succeeded": 1}

    # a plan record written before the counts by class (or behind its tasks) gets them again
    old = msgspec.structs.replace(plan, by_class={})
    loaded = State.load([decode_task(encode_record(r)) for r in state.tasks.values()], [old])
    assert loaded.plans[PLAN].by_class == plan.by_class
    assert PLAN in loaded.dirty_plans


def test_a_messages_position_is_read_from_its_reply_subject_as_nats_py_reads_it() -> None:
    """`position` reads what nats-py's `metadata` reads (sequence, pending, storage time), from
    the reply subject's tokens, in both its forms, without building a datetime per message."""
    from nats.aio.msg import Msg as NatsMsg

    from mesh.bus.read import position

    replies = (
        "$JS.ACK.MESH_EVENTS.c1.1.4711.12.1733390000123456789.99",
        "$JS.ACK.hub.ACCHASH.MESH_EVENTS.c1.1.4711.12.1733390000123456789.99.rnd",
        "$JS.ACK.hub.ACCHASH.MESH_EVENTS.c1.1.4711.12.1733390000123456789.0",
    )
    for reply in replies:
        raw = NatsMsg(_client=None, subject="mesh.evt.x", reply=reply, data=b"")  # type: ignore[arg-type]
        meta = raw.metadata
        assert meta.timestamp is not None
        seq, pending, stored_ns = position(raw)
        assert (seq, pending) == (meta.sequence.stream, meta.num_pending)
        assert abs(stored_ns / 1e9 - meta.timestamp.timestamp()) < 1e-6


def test_a_read_parses_a_position_only_where_nothing_may_be_pending_after_it() -> None:
    """A read looks for the message after which nothing is pending by its reply's tail alone
    (`_may_be_last`): every reply whose count is 0 passes, in both forms, and a v1 reply with a
    count that merely ends in 0 is no end."""
    from nats.aio.msg import Msg as NatsMsg

    from mesh.bus.read import _may_be_last, position

    v1 = "$JS.ACK.MESH_EVENTS.c1.1.4711.12.1733390000123456789.{}"
    v2 = "$JS.ACK.hub.ACCHASH.MESH_EVENTS.c1.1.4711.12.1733390000123456789.{}"
    for pending in (0, 1, 10, 100, 205):
        for reply in (v1.format(pending), v2.format(pending), v2.format(pending) + ".rnd0"):
            raw = NatsMsg(_client=None, subject="mesh.evt.x", reply=reply, data=b"")  # type: ignore[arg-type]
            if position(raw)[1] == 0:
                assert _may_be_last(reply), reply
        assert _may_be_last(v1.format(pending)) == (pending == 0)


def test_loaded_records_share_their_times_and_zeros() -> None:
    """Each float a record decodes to is an object of its own; a load keeps one per value for
    the times (the records one step wrote share them) and one zero."""
    state = accepted(9)
    loaded = State.load(
        [decode_task(encode_record(r)) for r in state.tasks.values()], list(state.plans.values())
    )
    records = list(loaded.tasks.values())
    assert len({id(r.updated_at) for r in records}) == len({r.updated_at for r in records}) == 1
    zeros = {id(getattr(r, name)) for r in records for name in ("released_at", "duration_s", "ttft_s")}
    assert len(zeros) == 1


def test_a_record_made_compact_as_it_is_read_shares_what_a_load_would_and_a_load_keeps_it() -> None:
    """The brain makes each record compact as it reads it (agents/brain_recovery.py): the copies
    a record drops are then freed while the next ones are decoded (tools/load_rss.py measures
    what that saves). The same sharing as `State.load`'s, and `State.load` changes none of it."""
    state = accepted(9)
    floats: dict[float, float] = {}
    records = [compact_record(decode_task(encode_record(r)), floats) for r in state.tasks.values()]
    assert len({id(r.plan_id) for r in records}) == 1
    assert all(r.task_id is r.spec.id for r in records)
    assert len({id(r.spec.env) for r in records}) == 1
    assert len({id(r.updated_at) for r in records}) == 1
    before = [(id(r.plan_id), id(r.spec), id(r.updated_at), id(r.released_at)) for r in records]
    loaded = State.load(records, list(state.plans.values()))
    after = [(id(r.plan_id), id(r.spec), id(r.updated_at), id(r.released_at)) for r in records]
    assert after == before
    assert len(loaded.tasks) == len(records)


def test_the_brain_can_hand_freed_memory_back_on_glibc() -> None:
    import platform

    from mesh.host.memory import give_back

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert give_back() is True
    else:
        assert give_back() in (True, False)
