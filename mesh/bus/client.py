"""What the CLI (and tests, and scripts) do against a running mesh: submit, cancel, read, follow,
see the agents, GPUs and models, and pause or cordon a GPU."""

from __future__ import annotations

import contextlib
import getpass
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

from mesh import events, validate
from mesh.bus.publish import Bus
from mesh.bus.read import read_bucket
from mesh.bus.route import decode_or_none
from mesh.errors import MeshError, NotFound, NothingToDo, PlanError, Problem
from mesh.events import (
    CancelPlan,
    GpuControl,
    GpuPower,
    GpuState,
    PlanFinished,
    PlanRejected,
    PlanSpec,
    RetryTasks,
    SubmitPlan,
)
from mesh.names import check_token
from mesh.records import (
    CANCELLED,
    FAILED,
    UNREADABLE,
    AgentRecord,
    Damaged,
    PlanRecord,
    TaskRecord,
    damaged,
    decode_agent,
    decode_plan,
    decode_task,
)
from mesh.textstream import TextChunk, decode_chunk

log = logging.getLogger(__name__)


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
    every submission (`mesh.validate`) before anything is sent. An id a plan already has is
    refused (the brain would take the submission for that plan's, seen again, and run nothing)."""
    taken = plan_id is not None
    plan_id = plan_id or new_plan_id(plan.title)
    msg = SubmitPlan(plan_id=plan_id, plan=plan, at=time.time(), by=by or _user())
    problems = validate.check_submission(msg)
    if problems:
        raise PlanError(plan.source or plan_id, [Problem(0, p) for p in problems])
    if taken and await read_plan(bus, plan_id) is not None:
        raise _taken(plan_id)
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
    ack = await bus.publish(bus.names.submit, msg, msg_id=plan_id)
    if ack.duplicate:  # (submitted within the server's duplicate window, not yet accepted)
        raise _taken(plan_id)
    return plan_id


def _taken(plan_id: str) -> MeshError:
    return MeshError(
        f"a plan with id {plan_id!r} was submitted before (`mesh status {plan_id}` shows it), so "
        "this one would not run: choose another --id, or leave --id out for a new one "
        f"(`mesh retry {plan_id}` runs that plan's failed work again)"
    )


async def cancel(bus: Bus, plan_id: str, reason: str = "cancelled by operator") -> None:
    # a damaged record still names a plan the brain knows
    record = await read_plan(bus, plan_id)
    if record is None:
        raise NotFound(f"no plan {plan_id!r}; `mesh status` lists the plans")
    if isinstance(record, PlanRecord) and record.final:
        raise NothingToDo(f"plan {plan_id} is {record.status} already: there is nothing to cancel")
    at = time.time()
    await bus.publish(
        bus.names.cancel(plan_id), CancelPlan(plan_id=plan_id, at=at, reason=reason), f"{plan_id}:cancel:{at}"
    )


async def retry(bus: Bus, plan_id: str, task_ids: tuple[str, ...] = ()) -> int:
    """Ask the brain to run failed or cancelled work of a plan again.

    Returns the event stream's next sequence at the time of asking: follow from
    there to see what the retry does.
    """
    record = await read_plan(bus, plan_id)
    if record is None:
        raise NotFound(f"no plan {plan_id!r}; `mesh status` lists the plans")
    # a final plan's record counts every task (a running one's may lag `plan_record_s`)
    if (
        isinstance(record, PlanRecord)
        and record.final
        and not (record.counts.get(FAILED, 0) or record.counts.get(CANCELLED, 0))
    ):
        raise NothingToDo(
            f"plan {plan_id} is {record.status}, and none of its tasks failed or was cancelled: "
            "there is nothing to retry"
        )
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
    """A plan's record; `Damaged` when its value does not decode, None when there is none. An id
    that cannot be one is `BadName`."""
    check_token(plan_id, "plan id")
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


async def plan_events(
    bus: Bus, plan_id: str, start_seq: int | None = None
) -> AsyncIterator[tuple[str, events.Message]]:
    """A plan's events from its history (from the start, or from a stream sequence) as they
    come, each that decodes, until the one that ends the plan (`plan.finished` or
    `plan.rejected`), which is the last yielded."""
    async for subject, _, msg in follow(
        bus, bus.names.plan_filter(plan_id), from_start=True, start_seq=start_seq
    ):
        if msg is None:
            continue
        yield subject, msg
        match msg:
            case PlanFinished() | PlanRejected():
                return


@contextlib.asynccontextmanager
async def watching_text(bus: Bus, plan_id: str, on_chunk: Callable[[TextChunk], None]) -> AsyncIterator[None]:
    """While inside, `on_chunk` is told each chunk of text a plan's tasks stream as they are
    generated (core NATS: only what comes while subscribed). What arrives is untrusted: a
    chunk that does not decode, or does not belong on the subject it came on, is ignored."""
    names = bus.names

    async def take(raw: NatsMsg) -> None:
        chunk, why = decode_chunk(names, raw.subject, raw.data)
        if chunk is None:
            log.debug("ignored on %s: %s", raw.subject, why)
            return
        on_chunk(chunk)

    sub = await bus.nc.subscribe(names.text_of_plan(plan_id), cb=take)
    try:
        yield
    finally:
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await sub.unsubscribe()


async def control_gpu(
    bus: Bus, gpu: str, *, paused: bool, cordoned: bool | None, reason: str = ""
) -> GpuControl:
    """An operator's pause or cordon of a GPU (an id as the gpus bucket has it): the event, and
    the GPU's operator key in the control bucket, which its worker reads. `cordoned` None keeps
    the cordon as it is. Creates the bucket if no agent has yet."""
    # a GPU may be cordoned before any agent has run (and created the bucket)
    await bus.ensure_resources()
    kv = await bus.gpu_control_kv()
    key = bus.names.gpu_control_key(gpu, "operator")
    was = False
    try:
        entry = await kv.get(key)
        old = events.decode(entry.value or b"")
        was = isinstance(old, GpuControl) and old.cordoned
    except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        pass
    control = GpuControl(
        gpu=gpu,
        source="operator",
        at=time.time(),
        paused=paused,
        cordoned=was if cordoned is None else cordoned,
        reason=reason,
        by=_user(),
    )
    await bus.emit(control)
    await kv.put(key, events.encode(control))
    return control


async def models_loaded(bus: Bus) -> dict[str, list[str]]:
    """Where each model is loaded now, from the gpus bucket: model name -> `<gpu> (<state>)`
    of each GPU that is not offline."""
    raw = await read_bucket(await bus.gpus_kv())
    where: dict[str, list[str]] = {}
    for value in raw.values():
        try:
            gpu = events.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if not isinstance(gpu, GpuState) or gpu.state == "offline":
            continue
        place = f"{gpu.gpu} ({gpu.state})"
        for name in {gpu.llm, *gpu.script_models} - {""}:
            where.setdefault(name, []).append(place)
    return where


async def read_agents(bus: Bus) -> list[AgentRecord]:
    """The agents registered now (the agents bucket), by id."""
    raw = await read_bucket(await bus.agents_kv())
    return sorted((decode_agent(v) for v in raw.values()), key=lambda a: a.agent_id)


async def agent_registered(bus: Bus, agent_id: str) -> tuple[bool, str]:
    """Whether an agent is registered (it heartbeats into the agents bucket), and what that says."""
    try:
        entry = await (await bus.agents_kv()).get(agent_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return False, f"agent {agent_id} is not registered (no heartbeat)"
    except MeshError as exc:  # no agents bucket: no agent ever ran against this server
        return False, f"agent {agent_id} is not registered ({exc})"
    return bool(entry.value), "registered"


async def set_gpu_power(
    bus: Bus, gpu: str, watts: float, reason: str = "", wait_s: float = 10.0
) -> GpuPower | None:
    """An operator's power cap for one GPU (`watts`; 0 gives the GPU back to its config's cap):
    the `gpu.power` event, and the GPU's `power` key in the control bucket, which its host's
    watchdog follows. Returns the watchdog's answer (the limit it set, or why it could not),
    or None when none came within `wait_s` (the cap stays stored: the watchdog sets it when it
    runs)."""
    await bus.ensure_resources()
    rid = secrets.token_hex(8)
    ask = GpuPower(
        gpu=gpu, source="operator", at=time.time(), watts=watts, rid=rid, reason=reason, by=_user()
    )
    # following before asking: the answer cannot come before the subscription
    sub = await bus.js.subscribe(
        bus.names.gpu_event(gpu, "power"),
        stream=bus.names.events_stream,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW),
    )
    try:
        await bus.emit(ask)
        await (await bus.gpu_control_kv()).put(
            bus.names.gpu_control_key(gpu, bus.names.POWER_KEY), events.encode(ask)
        )
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            msg, _ = decode_or_none(raw)
            if isinstance(msg, GpuPower) and msg.source == "watchdog" and msg.rid == rid and msg.gpu == gpu:
                return msg
        return None
    finally:
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await sub.unsubscribe()
