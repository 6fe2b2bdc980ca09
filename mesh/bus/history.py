"""Reading the event history back: replay into state, verify against KV, list dead letters.

Reads use an ordered, ephemeral consumer: they never disturb the agents'
durable consumers, and they stop at the end of what the stream held when
they began.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field

import msgspec
import nats.js.errors
from nats.js import api

from mesh import events
from mesh.bus.publish import Bus
from mesh.bus.read import position, read_batches, read_bucket
from mesh.bus.route import decode_checked
from mesh.errors import MeshError
from mesh.machine import State, evolve
from mesh.records import ESCALATING, UNREADABLE, PlanRecord, TaskRecord, decode_plan, decode_task


@dataclass(slots=True)
class Entry:
    seq: int
    subject: str
    at: float
    msg: events.Message | None
    data: bytes


async def read_history(
    bus: Bus,
    subject: str | list[str],
    *,
    since: float | None = None,
    start_seq: int | None = None,
    idle_timeout_s: float = 5.0,
) -> AsyncGenerator[Entry, None]:
    """Every event under `subject` (from `since`, a UNIX time, or from stream sequence
    `start_seq`), in stream order, up to the current end."""
    batches = history_batches(bus, subject, since=since, start_seq=start_seq, idle_timeout_s=idle_timeout_s)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for entry in batch:
                yield entry


async def history_batches(
    bus: Bus,
    subject: str | list[str],
    *,
    since: float | None = None,
    start_seq: int | None = None,
    idle_timeout_s: float = 5.0,
) -> AsyncGenerator[list[Entry], None]:
    """`read_history` a list at a time (what has arrived): for readers of a whole history
    (a brain's catch-up), which step once per list rather than once per event."""
    names = bus.names
    config = _from(since, start_seq)
    batches = read_batches(bus.js, names.events_stream, subject, config, idle_timeout_s)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            out = []
            for raw in batch:
                seq, _, stored_ns = position(raw)
                # a message on a subject it does not belong on is history nobody may fold (None)
                msg, _ = decode_checked(raw, names)
                out.append(Entry(seq, raw.subject, stored_ns / 1e9, msg, raw.data))
            yield out


async def message_batches(
    bus: Bus, subject: str | list[str], *, since: float | None = None
) -> AsyncGenerator[tuple[int, int, list[events.Message | None]], None]:
    """`history_batches` for a reader that folds each message and needs nothing else of it (a
    replay): a list's messages, decoded and checked (None where one cannot be folded), with the
    stream sequences of its first and last. Each message's position and its `Entry` were a
    microsecond of the reader's 14 an event (docs/performance.md)."""
    names = bus.names
    batches = read_batches(bus.js, names.events_stream, subject, _from(since, None))
    async with contextlib.aclosing(batches):
        async for batch in batches:
            msgs = [decode_checked(raw, names)[0] for raw in batch]
            yield position(batch[0])[0], position(batch[-1])[0], msgs


def _from(since: float | None, start_seq: int | None) -> api.ConsumerConfig:
    """A history read's consumer: from stream sequence `start_seq`, else from the UNIX time
    `since`, else from the start."""
    config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    if start_seq is not None:
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(1, start_seq)
    elif since is not None:
        config.deliver_policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.datetime.fromtimestamp(since, tz=datetime.UTC)
    return config


TRANSITIONS = events.TRANSITION_TYPES


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for a bulk fold (a replay, a brain's catch-up), on again
    after. Folding builds millions of objects that form no cycles (records, keys, queue
    entries; the decoded events and messages are freed by their counts), and each full pass
    of the collector walks the growing tables: a tenth of a million-task replay's time
    (tools/replay_rate.py, docs/performance.md)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_since(text: str, now: float | None = None) -> float:
    """`90s`, `30m`, `2h`, `7d` ago, a UNIX time, or an ISO date/time (local time if no zone)."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        try:
            return now - float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError as exc:
        raise MeshError(
            f"cannot read the time {text!r}: use an age like 30m, 2h or 7d, or a date like 2026-11-22T08:00"
        ) from exc
    return moment.timestamp()


@dataclass
class Replay:
    state: State
    events: int = 0
    transitions: int = 0
    undecodable: int = 0
    seconds: float = 0.0
    first_seq: int = 0
    last_seq: int = 0


async def replay(bus: Bus, *, plan_id: str | None = None, since: float | None = None) -> Replay:
    """Fold the history with the brain's own `evolve` into a fresh state.

    With `since`, plans accepted before that time are not in the result (their
    later events are folded into nothing).
    """
    # transitions only: the workers' reports and the rest are history, not state
    subject = bus.names.transition_filters(plan_id)
    result = Replay(State(aging_s=bus.settings.aging_s))
    began = time.perf_counter()
    with collector_paused():
        batches = message_batches(bus, subject, since=since)
        async with contextlib.aclosing(batches):
            async for first, last, batch in batches:
                result.events += len(batch)
                result.first_seq = result.first_seq or first
                result.last_seq = last
                for msg in batch:
                    if msg is None:
                        result.undecodable += 1
                        continue
                    if isinstance(msg, TRANSITIONS):
                        result.transitions += 1
                    evolve(result.state, msg)
    result.state.dirty_tasks.clear()
    result.state.dirty_plans.clear()
    result.seconds = time.perf_counter() - began
    return result


@dataclass
class Difference:
    key: str
    field: str
    kv: object
    replayed: object

    def __str__(self) -> str:
        return f"{self.key}: {self.field}: KV has {self.kv!r}, the history gives {self.replayed!r}"


@dataclass
class Verification:
    plans: int = 0
    tasks: int = 0
    differences: list[Difference] = field(default_factory=list)


def _compare(key: str, kv: msgspec.Struct | None, replayed: msgspec.Struct | None) -> list[Difference]:
    if kv is None or replayed is None:
        return [
            Difference(key, "record", "present" if kv else "missing", "present" if replayed else "missing")
        ]
    a, b = msgspec.to_builtins(kv), msgspec.to_builtins(replayed)
    assert isinstance(a, dict) and isinstance(b, dict)
    return [
        Difference(key, name, a.get(name), b.get(name))
        for name in sorted(a | b)
        if a.get(name) != b.get(name)
    ]


async def verify(
    bus: Bus, result: Replay, *, plan_id: str | None = None, since: float | None = None
) -> Verification:
    """Compare replayed records with KV, for the plans the replay covers; list every difference."""
    kv_plans: dict[str, PlanRecord] = {}
    kv_tasks: dict[str, TaskRecord] = {}
    bad: dict[str, str] = {}
    for k, v in (await read_bucket(await bus.plans_kv(), plan_id or ">")).items():
        try:
            kv_plans[k] = decode_plan(v)
        except UNREADABLE as exc:
            bad[k] = f"a damaged record ({exc})"
    for k, v in (await read_bucket(await bus.tasks_kv(), f"{plan_id}.>" if plan_id else ">")).items():
        try:
            kv_tasks[k] = decode_task(v)
        except UNREADABLE as exc:
            bad[k] = f"a damaged record ({exc})"
    if since is not None:
        kv_plans = {k: p for k, p in kv_plans.items() if p.accepted_at >= since}
        kv_tasks = {k: t for k, t in kv_tasks.items() if t.plan_id in kv_plans}
    out = Verification()
    for key, what in sorted(bad.items()):
        replayed = result.state.plans.get(key) or result.state.tasks.get(key)
        out.differences.append(Difference(key, "record", what, "present" if replayed else "missing"))
    replayed_plans: dict[str, PlanRecord] = result.state.plans
    replayed_tasks: dict[str, TaskRecord] = result.state.tasks
    for pid in sorted(set(kv_plans) | set(replayed_plans)):
        out.plans += 1
        if pid not in bad:
            out.differences += _compare(pid, kv_plans.get(pid), replayed_plans.get(pid))
    for key in sorted(set(kv_tasks) | set(replayed_tasks)):
        out.tasks += 1
        if key not in bad:
            out.differences += _compare(key, kv_tasks.get(key), replayed_tasks.get(key))
    return out


async def dead_letters(bus: Bus, since: float | None = None) -> list[events.DeadLetter]:
    out = []
    async for entry in read_history(bus, bus.names.dead_all, since=since):
        match entry.msg:
            case events.DeadLetter() as dead:
                out.append(dead)
    return out


# escalation ------------------------------------------------------------------------


async def escalation_costs(
    bus: Bus, by: str = "day", since: float | None = None
) -> list[tuple[str, int, int, int, int, float]]:
    """Escalation spend from the history of `esc.answered` and `esc.failed` events, grouped by
    UTC day or by plan: (key, answered, failed, tokens in, tokens out, USD), sorted by key."""
    if by not in ("day", "plan"):
        raise MeshError(f"costs by {by!r}: group by 'day' or 'plan'")
    names = bus.names
    subjects = [names.esc_events_of("answered"), names.esc_events_of("failed")]
    sums: dict[str, list[float]] = {}
    async for entry in read_history(bus, subjects, since=since):
        msg = entry.msg
        match msg:
            case events.EscalationAnswered():
                column = 0
            case events.EscalationFailed():
                column = 1
            case _:
                continue
        key = msg.plan_id if by == "plan" else time.strftime("%Y-%m-%d", time.gmtime(msg.at))
        row = sums.setdefault(key, [0, 0, 0, 0, 0.0])
        row[column] += 1
        row[2] += msg.tokens_in
        row[3] += msg.tokens_out
        row[4] += msg.cost_usd
    return [(k, int(a), int(f), int(i), int(o), usd) for k, (a, f, i, o, usd) in sorted(sums.items())]


async def escalation_waits(bus: Bus, tasks: list[TaskRecord]) -> dict[str, str]:
    """For each task waiting on Claude, what the gateway last said about it (task id -> text)."""
    names = bus.names
    notes: dict[str, str] = {}
    for rec in tasks:
        if rec.status != ESCALATING or rec.followups:
            continue
        subject = names.esc_event(rec.plan_id, rec.task_id, "waiting")
        try:
            raw = await bus.js.get_last_msg(names.events_stream, subject)
            msg = events.decode(raw.data or b"")
        except (nats.js.errors.NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        match msg:
            case events.EscalationWaiting() if msg.rid == rec.rid:
                again = time.strftime("%H:%M:%S", time.localtime(msg.retry_at))
                notes[rec.task_id] = (
                    f"waiting on escalation (try {msg.tries}, again at {again}): {msg.reason}"
                )
    return notes
