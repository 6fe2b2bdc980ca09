"""Typed statuses and failure reasons (`mesh.status`) on the wire: records and events built with
the typed names encode to exactly the bytes the bare strings gave, and those bytes decode to them.

The expected bytes below were written by the code before the names were typed (the same structs,
built with the bare strings "running", "timeout", ...).
"""

from __future__ import annotations

import msgspec
import pytest

from mesh import records
from mesh.events import (
    EscalationFailed,
    LocalAttempt,
    Msg,
    PlanFinished,
    RunFinished,
    TaskEscalated,
    TaskFailed,
    TaskRetrying,
    TaskSpec,
    decode,
    encode,
)
from mesh.records import PlanRecord, TaskRecord, decode_plan, decode_task, encode_record
from mesh.status import FailReason, PlanStatus, TaskStatus

SPEC = TaskSpec(id="a", body="echo a")

CASES: list[tuple[msgspec.Struct, bytes]] = [
    (
        TaskRecord(
            plan_id="p1",
            task_id="a",
            spec=SPEC,
            status=TaskStatus.RUNNING,
            reason=FailReason.TIMEOUT,
            attempts=(LocalAttempt(attempt=1, worker="w1", error="boom", rc=1, reason=FailReason.ERROR),),
            review_of=LocalAttempt(attempt=2, reason=FailReason.DEFINITION),
        ),
        (
            b'{"plan_id":"p1","task_id":"a","spec":{"id":"a","body":"echo a"},"index":0,'
            b'"status":"running","attempt":0,'
            b'"base_attempt":0,"deliveries":0,"worker":"","not_before":0.0,"waiting_since":0.0,'
            b'"released_at":0.0,"started_at":0.0,"finished_at":0.0,"duration_s":0.0,"rc":null,'
            b'"reason":"timeout","error":"","updated_at":0.0,"rid":"","escalated":"",'
            b'"followups":[],"attempts":[{"attempt":1,"worker":"w1","error":"boom","rc":1,'
            b'"reason":"error","output":""}],"review":"","review_model":"",'
            b'"review_of":{"attempt":2,"worker":"","error":"","rc":null,"reason":"definition",'
            b'"output":""},"reviews":0,"tier":0,"ttft_s":0.0,"continued":false}'
        ),
    ),
    (
        TaskRecord(plan_id="p1", task_id="b", spec=SPEC),
        (
            b'{"plan_id":"p1","task_id":"b","spec":{"id":"a","body":"echo a"},"index":0,'
            b'"status":"pending","attempt":0,'
            b'"base_attempt":0,"deliveries":0,"worker":"","not_before":0.0,"waiting_since":0.0,'
            b'"released_at":0.0,"started_at":0.0,"finished_at":0.0,"duration_s":0.0,"rc":null,'
            b'"reason":"","error":"","updated_at":0.0,"rid":"","escalated":"","followups":[],'
            b'"attempts":[],"review":"","review_model":"","review_of":null,"reviews":0,"tier":0,"ttft_s":0.0,'
            b'"continued":false}'
        ),
    ),
    (
        PlanRecord(
            plan_id="p1",
            title="t",
            status=PlanStatus.REJECTED,
            counts={TaskStatus.SUCCEEDED: 2, TaskStatus.FAILED: 1},
        ),
        (
            b'{"plan_id":"p1","title":"t","status":"rejected","source":"","workdir":"","by":"",'
            b'"submitted_at":0.0,"accepted_at":0.0,"finished_at":0.0,"total":0,'
            b'"counts":{"succeeded":2,"failed":1},"by_class":{},"env":{},"error":"","updated_at":0.0,'
            b'"escalation":{"auto":false,"after":0,"sensitive":false,"followups":true,'
            b'"review":false,"ladder":[]},"host":"","bundle":""}'
        ),
    ),
    (
        PlanRecord(plan_id="p2", title="t"),
        (
            b'{"plan_id":"p2","title":"t","status":"running","source":"","workdir":"","by":"",'
            b'"submitted_at":0.0,"accepted_at":0.0,"finished_at":0.0,"total":0,"counts":{},'
            b'"by_class":{},"env":{},"error":"","updated_at":0.0,"escalation":{"auto":false,"after":0,'
            b'"sensitive":false,"followups":true,"review":false,"ladder":[]},"host":"",'
            b'"bundle":""}'
        ),
    ),
    (
        PlanFinished(
            plan_id="p1",
            status=PlanStatus.CANCELLED,
            at=1.0,
            counts={TaskStatus.CANCELLED: 1, TaskStatus.SUCCEEDED: 1},
        ),
        (
            b'{"type":"plan.finished","plan_id":"p1","status":"cancelled","at":1.0,'
            b'"counts":{"cancelled":1,"succeeded":1}}'
        ),
    ),
    (
        TaskFailed(
            plan_id="p1",
            task_id="b",
            attempt=0,
            at=2.0,
            reason=FailReason.DEPENDENCY,
            error="dependency a failed",
        ),
        (
            b'{"type":"task.failed","plan_id":"p1","task_id":"b","attempt":0,"at":2.0,'
            b'"reason":"dependency","error":"dependency a failed","rc":null,"worker":"",'
            b'"duration_s":0.0,"started_at":0.0}'
        ),
    ),
    (
        TaskFailed(plan_id="p1", task_id="c", attempt=1, at=2.0),
        (
            b'{"type":"task.failed","plan_id":"p1","task_id":"c","attempt":1,"at":2.0,'
            b'"reason":"error","error":"","rc":null,"worker":"","duration_s":0.0,"started_at":0.0}'
        ),
    ),
    (
        TaskRetrying(
            plan_id="p1", task_id="a", attempt=1, at=3.0, retry_at=5.0, reason=FailReason.LOST, worker="w1"
        ),
        (
            b'{"type":"task.retrying","plan_id":"p1","task_id":"a","attempt":1,"at":3.0,'
            b'"retry_at":5.0,"reason":"lost","error":"","rc":null,"worker":"w1",'
            b'"duration_s":0.0,"started_at":0.0}'
        ),
    ),
    (
        RunFinished(
            plan_id="p1",
            task_id="a",
            attempt=1,
            worker="w1",
            at=4.0,
            ok=False,
            duration_s=0.5,
            reason=FailReason.DEFINITION,
        ),
        (
            b'{"type":"run.finished","plan_id":"p1","task_id":"a","attempt":1,"worker":"w1",'
            b'"at":4.0,"ok":false,"duration_s":0.5,"rc":null,"started_at":0.0,'
            b'"timed_out":false,"cancelled":false,"error":"","stdout_tail":"","stderr_tail":"",'
            b'"stdout_bytes":0,"stderr_bytes":0,"dead_letter":false,"reason":"definition",'
            b'"output":"","output_object":"","prompt":"","model":"","gpu":"","metrics":{},'
            b'"artifacts":[],"sensitive":false,"claim":"","parsed":false,"files":[],"output_sha256":"",'
            b'"then":"","then_claim":""}'
        ),
    ),
    (
        RunFinished(plan_id="p1", task_id="a", attempt=2, worker="w1", at=4.0, ok=True, duration_s=0.5),
        (
            b'{"type":"run.finished","plan_id":"p1","task_id":"a","attempt":2,"worker":"w1",'
            b'"at":4.0,"ok":true,"duration_s":0.5,"rc":null,"started_at":0.0,"timed_out":false,'
            b'"cancelled":false,"error":"","stdout_tail":"","stderr_tail":"","stdout_bytes":0,'
            b'"stderr_bytes":0,"dead_letter":false,"reason":"","output":"","output_object":"",'
            b'"prompt":"","model":"","gpu":"","metrics":{},"artifacts":[],"sensitive":false,'
            b'"claim":"","parsed":false,"files":[],"output_sha256":"","then":"","then_claim":""}'
        ),
    ),
    (
        EscalationFailed(
            rid="p1.x.1", plan_id="p1", task_id="x", attempt=1, at=5.0, reason=FailReason.BUDGET
        ),
        (
            b'{"type":"esc.failed","rid":"p1.x.1","plan_id":"p1","task_id":"x","attempt":1,'
            b'"at":5.0,"reason":"budget","error":"","tokens_in":0,"tokens_out":0,'
            b'"cost_usd":0.0}'
        ),
    ),
    (
        TaskEscalated(
            plan_id="p1",
            task_id="x",
            attempt=3,
            at=6.0,
            rid="p1.x.3",
            why="local_failures",
            after=LocalAttempt(attempt=2, reason=FailReason.TIMEOUT),
        ),
        (
            b'{"type":"task.escalated","plan_id":"p1","task_id":"x","attempt":3,"at":6.0,'
            b'"rid":"p1.x.3","why":"local_failures","after":{"attempt":2,"worker":"",'
            b'"error":"","rc":null,"reason":"timeout","output":""}}'
        ),
    ),
]


def _encode(built: msgspec.Struct) -> bytes:
    return encode(built) if isinstance(built, Msg) else encode_record(built)


def _decode(built: msgspec.Struct, wire: bytes) -> msgspec.Struct:
    match built:
        case Msg():
            return decode(wire)
        case TaskRecord():
            return decode_task(wire)
        case _:
            return decode_plan(wire)


def _typed_fields(struct: msgspec.Struct) -> list[object]:
    """The values of a struct's status and reason fields, its attempts' included."""
    out: list[object] = []
    for name in ("status", "reason"):
        if hasattr(struct, name):
            out.append(getattr(struct, name))
    for name in ("attempts", "review_of", "after"):
        value = getattr(struct, name, None)
        for attempt in value if isinstance(value, tuple) else [value] if value is not None else []:
            out.append(attempt.reason)
    return out


@pytest.mark.parametrize(
    ("built", "wire"), CASES, ids=[f"{type(b).__name__}-{i}" for i, (b, _) in enumerate(CASES)]
)
def test_typed_names_encode_to_the_bytes_of_the_bare_strings(built: msgspec.Struct, wire: bytes) -> None:
    assert _encode(built) == wire


@pytest.mark.parametrize(
    ("built", "wire"), CASES, ids=[f"{type(b).__name__}-{i}" for i, (b, _) in enumerate(CASES)]
)
def test_the_bytes_of_the_bare_strings_decode_to_the_typed_names(built: msgspec.Struct, wire: bytes) -> None:
    decoded = _decode(built, wire)
    assert decoded == built
    # each status and reason comes back as its member, not a plain string equal to it
    typed = _typed_fields(decoded)
    assert typed and all(isinstance(v, TaskStatus | PlanStatus | FailReason) for v in typed)
    assert typed == _typed_fields(built)


def test_the_names_stand_for_the_strings_of_before() -> None:
    before = ("pending", "waiting", "ready", "running", "escalating", "succeeded", "failed", "cancelled")
    assert tuple(s.value for s in TaskStatus) == before
    assert before == records.TASK_STATES
    assert [s.value for s in PlanStatus] == ["running", "succeeded", "failed", "cancelled", "rejected"]
    assert {r.value for r in FailReason} == {
        "",
        "error",
        "timeout",
        "lost",
        "dead_letter",
        "definition",
        "dependency",
        "cancelled",
        "sensitive",
        "config",
        "unreachable",
        "refused",
        "budget",
        "followups",
    }
    # a member is its string: in text, as a key, in a comparison
    assert f"{TaskStatus.RUNNING}" == "running" and {"running": 1}[TaskStatus.RUNNING] == 1
    assert (records.PLAN_RUNNING, records.PLAN_REJECTED, records.ESCALATING) == (
        "running",
        "rejected",
        "escalating",
    )


def test_a_status_not_listed_does_not_decode() -> None:
    """The typed fields refuse a value no version of mesh writes (it was taken as any string)."""
    wire = CASES[0][1].replace(b'"status":"running"', b'"status":"paused"')
    with pytest.raises(msgspec.ValidationError, match="status"):
        decode_task(wire)
