"""What the CLI (and tests, and scripts) do against a running mesh: submit, cancel, read, follow."""

from __future__ import annotations

import contextlib
import getpass
import re
import secrets
import time
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from mesh import events, validate
from mesh.bus.publish import Bus
from mesh.bus.read import read_bucket
from mesh.bus.route import decode_or_none
from mesh.errors import NotFound, PlanError, Problem
from mesh.events import CancelPlan, PlanSpec, RetryTasks, SubmitPlan
from mesh.names import check_token
from mesh.records import UNREADABLE, Damaged, PlanRecord, TaskRecord, damaged, decode_plan, decode_task


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


_SLUG = re.compile(r"[^a-z0-9]+")


def new_plan_id(title: str) -> str:
    """`<slug of the title>-<time><random>`: readable, unique, safe as a subject token."""
    slug = _SLUG.sub("-", title.lower()).strip("-")[:24].strip("-") or "plan"
    stamp = time.strftime("%m%d%H%M%S", time.gmtime())
    return f"{slug}-{stamp}-{secrets.token_hex(2)}"


async def submit(bus: Bus, plan: PlanSpec, plan_id: str | None = None, by: str = "") -> str:
    """Submit a parsed plan; returns its id. The plan passes the same checks the brain makes of
    every submission (`mesh.validate`) before anything is sent."""
    plan_id = plan_id or new_plan_id(plan.title)
    msg = SubmitPlan(plan_id=plan_id, plan=plan, at=time.time(), by=by or _user())
    problems = validate.check_submission(msg)
    if problems:
        raise PlanError(plan.source or plan_id, [Problem(0, p) for p in problems])
    data = events.encode(msg)
    if len(data) > bus.nc.max_payload - 4096:
        # too big for one message: the plan goes to the object store, the submission names it
        store = await bus.objects()
        name = f"plans/{plan_id}.json"
        chunk = min(128 * 1024, bus.nc.max_payload // 2)
        meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=chunk))
        await store.put(name, msgspec.json.encode(plan), meta=meta)
        head = msgspec.structs.replace(plan, tasks=())
        msg = SubmitPlan(plan_id=plan_id, plan=head, at=msg.at, by=msg.by, object=name)
    await bus.publish(bus.names.submit, msg, msg_id=plan_id)
    return plan_id


async def cancel(bus: Bus, plan_id: str, reason: str = "cancelled by operator") -> None:
    # a damaged record still names a plan the brain knows
    if await read_plan(bus, plan_id) is None:
        raise NotFound(f"no plan {plan_id!r}; `mesh status` lists the plans")
    at = time.time()
    await bus.publish(
        bus.names.cancel(plan_id), CancelPlan(plan_id=plan_id, at=at, reason=reason), f"{plan_id}:cancel:{at}"
    )


async def retry(bus: Bus, plan_id: str, task_ids: tuple[str, ...] = ()) -> int:
    """Ask the brain to run failed or cancelled work of a plan again.

    Returns the event stream's next sequence at the time of asking: follow from
    there to see what the retry does.
    """
    if await read_plan(bus, plan_id) is None:
        raise NotFound(f"no plan {plan_id!r}; `mesh status` lists the plans")
    kv = await bus.tasks_kv()
    unknown = []
    for task_id in task_ids:
        try:
            await kv.get(f"{plan_id}.{check_token(task_id, 'task id')}")
        except nats.js.errors.KeyNotFoundError:
            unknown.append(task_id)
    if unknown:
        raise NotFound(f"plan {plan_id} has no task {', '.join(unknown)}; `mesh status {plan_id}` lists them")
    info = await bus.js.stream_info(bus.names.events_stream)
    at = time.time()
    await bus.publish(
        bus.names.retry(plan_id),
        RetryTasks(plan_id=plan_id, at=at, task_ids=task_ids),
        f"{plan_id}:retry:{at}",
    )
    return int(info.state.last_seq) + 1


async def read_plan(bus: Bus, plan_id: str) -> PlanRecord | Damaged | None:
    """A plan's record; `Damaged` when its value does not decode, None when there is none."""
    kv = await bus.plans_kv()
    try:
        entry = await kv.get(plan_id)
    except nats.js.errors.KeyNotFoundError:
        return None
    data = entry.value or b""
    try:
        return decode_plan(data)
    except UNREADABLE as exc:
        return damaged(bus.names.plans_bucket, plan_id, data, exc, entry.revision or 0)


async def get_plan(bus: Bus, plan_id: str) -> PlanRecord | None:
    """A plan's record, or None when there is none or it is unreadable (`read_plan` tells)."""
    found = await read_plan(bus, plan_id)
    return found if isinstance(found, PlanRecord) else None


async def read_plans(bus: Bus) -> tuple[list[PlanRecord], list[Damaged]]:
    """Every plan record, by acceptance; and the values of the plans bucket that do not decode."""
    plans: list[PlanRecord] = []
    bad: list[Damaged] = []
    for key, value in (await read_bucket(await bus.plans_kv())).items():
        try:
            plans.append(decode_plan(value))
        except UNREADABLE as exc:
            bad.append(damaged(bus.names.plans_bucket, key, value, exc))
    return sorted(plans, key=lambda p: p.accepted_at), sorted(bad, key=lambda d: d.key)


async def list_plans(bus: Bus) -> list[PlanRecord]:
    """Every readable plan record (`read_plans` also returns the damaged ones)."""
    return (await read_plans(bus))[0]


async def read_tasks(bus: Bus, plan_id: str) -> tuple[list[TaskRecord], list[Damaged]]:
    """A plan's task records in plan order; and its values of the tasks bucket that do not decode."""
    check_token(plan_id, "plan id")
    records: list[TaskRecord] = []
    bad: list[Damaged] = []
    for key, value in (await read_bucket(await bus.tasks_kv(), f"{plan_id}.>")).items():
        try:
            records.append(decode_task(value))
        except UNREADABLE as exc:
            bad.append(damaged(bus.names.tasks_bucket, key, value, exc))
    return sorted(records, key=lambda r: r.index), sorted(bad, key=lambda d: d.key)


async def plan_tasks(bus: Bus, plan_id: str) -> list[TaskRecord]:
    """A plan's readable task records (`read_tasks` also returns the damaged ones)."""
    return (await read_tasks(bus, plan_id))[0]


async def follow(
    bus: Bus,
    subject: str,
    *,
    from_start: bool = False,
    start_seq: int | None = None,
    idle_timeout_s: float | None = None,
) -> AsyncIterator[tuple[str, bytes, events.Message | None]]:
    """Yield (subject, raw bytes, decoded message or None) from the event stream, in order:
    from the start, from a stream sequence, or only what comes next.

    An ordered, ephemeral consumer: following never disturbs the agents' durable consumers.
    """
    config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL if from_start else api.DeliverPolicy.NEW)
    if start_seq is not None:
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(1, start_seq)
    sub = await bus.js.subscribe(
        subject, stream=bus.names.events_stream, ordered_consumer=True, config=config
    )
    try:
        while True:
            try:
                raw = await sub.next_msg(timeout=idle_timeout_s)
            except nats.errors.TimeoutError:
                return
            msg, _ = decode_or_none(raw)
            yield raw.subject, raw.data, msg
    finally:
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await sub.unsubscribe()
