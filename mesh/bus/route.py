"""Where a message belongs: its subject and deduplication id, and the check a consumer makes.

`route` names the subject of any message; `decode_checked` refuses one read elsewhere.
"""

from __future__ import annotations

import logging
import uuid

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg

import nats
from mesh import events
from mesh.events import Msg
from mesh.names import Names
from mesh.status import FailReason

log = logging.getLogger(__name__)


# Facts that an operator's retry can make happen again for the same attempt: their
# id also names the moment. (After a crash the brain does not decide these again:
# it folds what it had published before deciding anything; see agents/brain.py.)
_REPEATABLE = frozenset({"task.waiting", "task.cancelled", "task.reset", "plan.finished", "plan.resumed"})


def route(names: Names, ev: Msg) -> tuple[str, str]:
    """The subject of an event or work item and its `Nats-Msg-Id`.

    The id names the fact, so a fact re-published after a crash is stored once.
    """
    tag = events.type_of(ev)
    kind = tag.rsplit(".", 1)[-1]
    plan_id = getattr(ev, "plan_id", "")
    task_id = getattr(ev, "task_id", "")
    attempt = getattr(ev, "attempt", 0)
    at = getattr(ev, "at", 0.0)
    repeatable = tag in _REPEATABLE or (
        tag == "task.failed" and getattr(ev, "reason", "") == FailReason.DEPENDENCY
    )
    moment = f":{at!r}" if repeatable else ""
    if tag == "task.redelivered":
        delivery = getattr(ev, "delivery", 0)
        return names.task_event(plan_id, task_id, kind), f"{plan_id}.{task_id}:{attempt}:{kind}:{delivery}"
    worker: str = getattr(ev, "worker", "")
    if tag == "task.started" or (tag == "task.released" and worker):
        # the worker names the fact too: an attempt continued on a worker (released to it and
        # started there) that is lost with it is queued again, released and started anew. (Its
        # full type: `run.started`'s id is `<task>:<attempt>:started:<worker>`, and one stream
        # keeps both)
        return names.task_event(plan_id, task_id, kind), f"{plan_id}.{task_id}:{attempt}:{tag}:{worker}"
    if tag.startswith("task."):
        return names.task_event(plan_id, task_id, kind), f"{plan_id}.{task_id}:{attempt}:{kind}{moment}"
    if tag.startswith("run."):
        return names.run_event(
            plan_id, task_id, kind, worker
        ), f"{plan_id}.{task_id}:{attempt}:{kind}:{worker}"
    if tag == "plan.tasks":
        return names.plan_event(plan_id, kind), f"{plan_id}:{kind}:{getattr(ev, 'part', 0)}"
    if tag.startswith("plan."):
        return names.plan_event(plan_id, kind), f"{plan_id}:{kind}{moment}"
    if tag.startswith("agent."):
        agent_id = getattr(ev, "agent_id", "")
        return names.agent_event(agent_id, kind), f"{agent_id}:{kind}:{at!r}"
    if tag == "work":
        return work_subject(names, getattr(ev, "cls", "cpu"), getattr(ev, "model", "")), (
            f"{plan_id}.{task_id}:{attempt}:work"
        )
    if tag == "resource":
        rid = getattr(ev, "rid", "")
        return names.work_to(getattr(ev, "worker", "")), f"resource:{rid}"
    if tag.startswith("gpu."):
        gpu = getattr(ev, "gpu", "")
        if tag == "gpu.requested":
            return names.gpu_event(gpu, kind), f"{gpu}:requested:{getattr(ev, 'rid', '')}"
        if tag == "gpu.power":
            source = getattr(ev, "source", "")
            return names.gpu_event(gpu, kind), f"{gpu}:power:{source}:{getattr(ev, 'rid', '')}:{at!r}"
        if tag == "gpu.control":
            return names.gpu_event(gpu, kind), f"{gpu}:control:{getattr(ev, 'source', '')}:{at!r}"
        return names.gpu_event(gpu, kind), f"{gpu}:{kind}:{getattr(ev, 'state', '')}:{at!r}"
    if tag == "cmd.submit":
        return names.submit, plan_id
    if tag == "cmd.cancel":
        return names.cancel(plan_id), f"{plan_id}:cancel:{at}"
    if tag == "cmd.retry":
        return names.retry(plan_id), f"{plan_id}:retry:{at}"
    if tag == "dead.letter":
        return names.dead_letter(getattr(ev, "agent_id", "")), ""
    if tag == "esc.request":
        return names.escalation(plan_id, task_id), f"esc:{getattr(ev, 'rid', '')}"
    if tag.startswith("esc."):
        rid = getattr(ev, "rid", "")
        tries = f":{getattr(ev, 'tries', 0)}" if tag == "esc.waiting" else ""
        return names.esc_event(plan_id, task_id, kind), f"esc:{rid}:{kind}{tries}"
    if tag.startswith("alert."):
        rule, target = getattr(ev, "rule", ""), getattr(ev, "target", "")
        return names.alert_event(rule, kind), f"alert:{rule}:{target}:{kind}:{at!r}"
    raise ValueError(f"no route for {tag}")


def subject_of(names: Names, ev: Msg) -> str:
    """The subject of an event or work item: `route`'s without its id. A task's transition (most
    of any history, checked by every reader of it) is named here as `route` names it, without
    making the id; the rest by `route`."""
    tag = events.type_of(ev)
    if tag.startswith("task."):
        kind = tag[5:]
        return names.task_event(getattr(ev, "plan_id", ""), getattr(ev, "task_id", ""), kind)
    return route(names, ev)[0]


def work_subject(names: Names, cls: str, model: str) -> str:
    """Where a work item of class `cls` (and `model`, for an LLM task) is queued."""
    return names.work_llm(model) if cls == "llm" and model else names.work(cls)


def origin_of(raw: NatsMsg) -> str:
    """`<stream>:<sequence>` of a JetStream message: a stable name for it."""
    try:
        meta = raw.metadata
    except nats.errors.NotJSMessageError:
        return f"core:{uuid.uuid4().hex}"
    return f"{meta.stream}:{meta.sequence.stream}"


def decode_or_none(raw: NatsMsg) -> tuple[events.Message | None, str]:
    """Decode a NATS message; on failure return (None, why)."""
    try:
        return events.decode(raw.data), ""
    except msgspec.ValidationError as exc:
        return None, f"invalid message: {exc}"
    except msgspec.DecodeError as exc:
        return None, f"undecodable message: {exc}"


def misplaced(names: Names, subject: str, msg: Msg) -> str:
    """Why `msg` does not belong on `subject` ('' when it does).

    A message belongs only on the subject mesh itself would publish it to (`route`): its type,
    and the plan, task, worker, GPU or agent it speaks of, are all in that subject. So the
    server's per-subject permissions decide who may say what: a worker, whose user may publish
    run reports under its own name only, cannot pass a submission off as a report, nor report
    in another worker's name.
    """
    try:
        expected = subject_of(names, msg)
    except ValueError as exc:  # a plan or task id that cannot be a subject token
        return f"a {events.type_of(msg)} message that names no valid subject ({exc}) arrived on {subject}"
    if expected != subject:
        return f"a {events.type_of(msg)} message belongs on {expected}, not on {subject}"
    if isinstance(msg, events.WorkItem) and msg.more:
        return _pack_misplaced(names, subject, msg)
    return ""


def _pack_misplaced(names: Names, subject: str, item: events.WorkItem) -> str:
    """Why a packed work item (`mesh.packing`) is not one mesh would queue on `subject`: each
    task it carries belongs there too, once, and carries nothing more itself."""
    seen = {(item.plan_id, item.task_id)}
    if item.then is not None:
        return f"a packed work item on {subject} carries a continuation"
    for member in (item, *item.more):
        if member.kind not in events.PACK_KINDS or member.cls not in events.PACK_CLASSES:
            what = f"{member.cls} {member.kind}"
            return f"a packed work item on {subject} holds a {what} task, which is never packed"
    for member in item.more:
        if member.more or member.then is not None:
            return f"a task packed in the work item of {item.plan_id}.{item.task_id} carries more tasks"
        key = (member.plan_id, member.task_id)
        if key in seen:
            packed = f"{member.plan_id}.{member.task_id}"
            return f"the work item of {item.plan_id}.{item.task_id} packs {packed} twice"
        seen.add(key)
        try:
            expected = subject_of(names, member)
        except ValueError as exc:
            return f"a task packed in a work item names no valid subject ({exc})"
        if expected != subject:
            return f"a task packed in a work item on {subject} belongs on {expected}"
    return ""


def decode_checked(raw: NatsMsg, names: Names) -> tuple[events.Message | None, str]:
    """Decode a message read from a stream or subscription and check that it belongs on the
    subject it came on (`misplaced`); on either failure return (None, why)."""
    msg, why = decode_or_none(raw)
    if msg is None:
        return None, why
    why = misplaced(names, raw.subject, msg)
    return (None, why) if why else (msg, "")
