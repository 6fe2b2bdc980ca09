"""A task's output, wherever its last success left it; and how each of its attempts ended.

A task that ran on a worker has its output in its `run.finished` report (or, too big or
sensitive for an event, in the object store under the report's `output_object`). A task Claude
answered has it in the gateway's `esc.answered` event (`result`; an answer of follow-up tasks
has no output of its own). Whichever of the two came last is the task's output. The files a
successful run saved (`RunFinished.files`) are its artifacts (`task_files`).

`attempt_outcomes` reads a task's (or a plan's) history for every attempt that ended, each with
the one report the brain took for it (`mesh output`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec
import nats.js.errors

from mesh import events
from mesh.bus.history import read_history
from mesh.bus.publish import Bus
from mesh.events import EscalationAnswered, FileRef, RunFinished, decode
from mesh.records import TaskRecord, decode_task


@dataclass(frozen=True)
class Output:
    text: str
    # the task was sensitive, or read a sensitive task's output
    sensitive: bool = False
    # the task has a schema: `text` is JSON valid against it
    parsed: bool = False


class OutputError(Exception):
    """A task has no output to take: it never finished, or its last completion failed."""


async def _task_record(bus: Bus, plan_id: str, task_id: str) -> TaskRecord:
    """The task's record; raises `OutputError` when it has none or it cannot be read."""
    try:
        entry = await (await bus.tasks_kv()).get(f"{plan_id}.{task_id}")
    except nats.js.errors.KeyNotFoundError:
        raise OutputError(f"plan {plan_id!r} has no task {task_id!r}") from None
    try:
        return decode_task(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise OutputError(f"the record of task {task_id!r} is unreadable: {exc}") from None


async def last_completion(bus: Bus, plan_id: str, task_id: str) -> RunFinished | EscalationAnswered:
    """The task's last completion the brain took: a worker's `run.finished` or Claude's
    `esc.answered`, whichever came last; raises `OutputError` when there is none.

    Only a report the brain took counts: the one from the worker its record names (the worker
    that held the attempt), never whatever report came last on the task's subjects."""
    names = bus.names
    rec = await _task_record(bus, plan_id, task_id)
    latest: tuple[int, RunFinished | EscalationAnswered] | None = None
    subjects = [names.esc_event(plan_id, task_id, "answered")]
    if rec.worker:
        subjects.insert(0, names.run_event(plan_id, task_id, "finished", rec.worker))
    for subject in subjects:
        try:
            raw = await bus.js.get_last_msg(names.events_stream, subject)
        except nats.js.errors.NotFoundError:
            continue
        try:
            ev = decode(raw.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        seq = raw.seq or 0
        match ev:
            case RunFinished() | EscalationAnswered() if latest is None or seq > latest[0]:
                latest = (seq, ev)
    if latest is None:
        raise OutputError(f"task {task_id!r} has no completion event ({subjects[0]})")
    return latest[1]


async def task_files(bus: Bus, plan_id: str, task_id: str) -> tuple[FileRef, ...]:
    """The artifacts of the task's last successful run (none for a task Claude answered);
    raises `OutputError` when its last completion is not a success."""
    match await last_completion(bus, plan_id, task_id):
        case RunFinished() as run:
            if not run.ok:
                raise OutputError(f"task {task_id!r}: its last completion event is not a success")
            return run.files
        case _:
            return ()


async def task_output(bus: Bus, plan_id: str, task_id: str) -> Output:
    """The output of the task's last completion; raises `OutputError` when there is none."""
    match await last_completion(bus, plan_id, task_id):
        case EscalationAnswered() as answered:
            return Output(answered.result)
        case RunFinished() as run:
            if not run.ok:
                raise OutputError(f"task {task_id!r}: its last completion event is not a success")
            if run.output_object:
                return Output(await stored_output(bus, run), run.sensitive, run.parsed)
            return Output(run.output or run.stdout_tail, run.sensitive, run.parsed)


# ------------------------------------------------------------------ every attempt's outcome


@dataclass(frozen=True)
class Outcome:
    """How one attempt of a task ended, from the report the brain took for it.

    `report` is the `run.finished` of the worker the brain's transition names for the attempt
    (the first that worker sent on the attempt before the transition): a report another worker
    sent, or one sent after the brain decided, is never it. `answer` is the gateway's answer to
    the escalation the attempt was. An attempt whose worker never reported (lost, cancelled
    before it ran) has neither, only `error`."""

    plan_id: str
    task_id: str
    attempt: int
    # the brain's word on it: succeeded, retrying, failed, cancelled, climbed, escalated,
    # reviewing, reviewed
    status: str
    ok: bool
    # the worker whose report counts ('' for an answer or an attempt no worker reported on)
    worker: str = ""
    error: str = ""
    report: RunFinished | None = None
    answer: EscalationAnswered | None = None
    # the stream sequence of the transition that ended the attempt
    seq: int = 0

    @property
    def source(self) -> str:
        """Who produced it: `worker`, `claude` (the gateway's answer) or `none`."""
        return "worker" if self.report is not None else "claude" if self.answer is not None else "none"

    @property
    def sensitive(self) -> bool:
        return self.report is not None and self.report.sensitive


@dataclass
class _Open:
    """What is known of an attempt while the history is read."""

    status: str = ""
    ok: bool = False
    worker: str = ""
    error: str = ""
    seq: int = 0
    rid: str = ""
    # the worker that took the attempt (`task.started`, `task.redelivered`): a cancelled
    # attempt's report comes from it, after the cancel
    runner: str = ""


def _closing(msg: events.Message) -> tuple[int, str, str, bool, str] | None:
    """(attempt, status, worker whose report it took, ok, error) for a transition that ends an
    attempt; None for any other message."""
    match msg:
        case events.TaskSucceeded():
            return msg.attempt, "succeeded", msg.worker, True, ""
        case events.TaskRetrying():
            return msg.attempt, "retrying", msg.worker, False, msg.error
        case events.TaskFailed():
            return msg.attempt, "failed", msg.worker, False, msg.error
        case events.TaskReviewed():
            return msg.attempt, "reviewed", msg.worker, not msg.error, msg.error
        case events.TaskClimbed() if msg.after is not None:
            return msg.after.attempt, "climbed", msg.after.worker, False, msg.after.error
        case events.TaskEscalated() if msg.after is not None:
            return msg.after.attempt, "escalated", msg.after.worker, False, msg.after.error
        case events.TaskReviewing():
            return msg.failed.attempt, "reviewing", msg.failed.worker, False, msg.failed.error
        case events.TaskCancelled() if msg.attempt > 0:
            return msg.attempt, "cancelled", "", False, msg.reason
    return None


async def attempt_outcomes(bus: Bus, plan_id: str, task_id: str = "") -> dict[str, list[Outcome]]:
    """Every ended attempt of a plan's tasks (or of one task), in attempt order, from the history.

    One read of the task's (or the plan's) transitions, worker reports and escalation answers."""
    names = bus.names
    task = task_id or "*"
    subjects = [
        names.task_event(plan_id, task, "*"),
        names.run_events(plan_id, task, "finished"),
        names.esc_event(plan_id, task, "answered"),
    ]
    attempts: dict[tuple[str, int], _Open] = {}
    reports: dict[tuple[str, int, str], list[tuple[int, RunFinished]]] = {}
    answers: dict[tuple[str, str], EscalationAnswered] = {}
    async for entry in read_history(bus, subjects, idle_timeout_s=5.0):
        msg = entry.msg
        match msg:
            case RunFinished():
                reports.setdefault((msg.task_id, msg.attempt, msg.worker), []).append((entry.seq, msg))
                continue
            case EscalationAnswered():
                answers.setdefault((msg.task_id, msg.rid), msg)
                continue
            case events.TaskStarted() | events.TaskRedelivered():
                attempts.setdefault((msg.task_id, msg.attempt), _Open()).runner = msg.worker
                continue
            case events.TaskEscalated():
                # the escalation is an attempt of its own, answered (or not) by the gateway
                esc = attempts.setdefault((msg.task_id, msg.attempt), _Open())
                esc.rid = msg.rid
        if msg is None:
            continue
        closing = _closing(msg)
        if closing is None:
            continue
        number, status, worker, ok, error = closing
        tid = getattr(msg, "task_id", "")
        a = attempts.setdefault((tid, number), _Open())
        if a.seq or number < 1:
            # the attempt had ended already (a task cancelled in its backoff, failed later by a
            # dependency), or the task never ran
            continue
        a.status, a.ok, a.worker, a.error, a.seq = status, ok, worker, error, entry.seq
    out: dict[str, list[Outcome]] = {}
    for (tid, number), a in sorted(attempts.items()):
        if not a.status:
            continue  # still running, or waiting on its escalation
        report = None
        if a.status == "cancelled":
            # its worker reports after the cancel, if it ran at all
            found = reports.get((tid, number, a.runner), [])
            report = found[0][1] if found else None
        elif a.worker:
            # (a review whose answer was neither verdict ran well and still failed as a review)
            taken = [
                r
                for s, r in reports.get((tid, number, a.worker), [])
                if s < a.seq and (r.ok == a.ok or a.status == "reviewed")
            ]
            report = taken[0] if taken else None
        answer = answers.get((tid, a.rid)) if a.rid and a.status == "succeeded" else None
        if answer is not None and answer.followups:
            answer = None
        out.setdefault(tid, []).append(
            Outcome(
                plan_id=plan_id,
                task_id=tid,
                attempt=number,
                status=a.status,
                ok=a.ok,
                worker=a.worker or (a.runner if report is not None else ""),
                error=a.error,
                report=report,
                answer=answer,
                seq=a.seq,
            )
        )
    return out


async def task_outcome(bus: Bus, plan_id: str, task_id: str, attempt: int = 0) -> Outcome:
    """The outcome of a task's attempt `attempt`, or of its last ended attempt (0); raises
    `OutputError` saying why there is none."""
    rec = await _task_record(bus, plan_id, task_id)
    ended = (await attempt_outcomes(bus, plan_id, task_id)).get(task_id, [])
    now = f"it is {rec.status} (attempt {rec.attempt})" if rec.attempt else f"it is {rec.status}"
    if attempt:
        for o in ended:
            if o.attempt == attempt:
                return o
        if attempt > rec.attempt or attempt < 1:
            made = f"attempts 1 to {rec.attempt}" if rec.attempt > 1 else f"{rec.attempt or 'no'} attempt"
            raise OutputError(f"task {plan_id}.{task_id} has no attempt {attempt}: it had {made}")
        if attempt == rec.attempt and not rec.final:
            raise OutputError(f"attempt {attempt} of {plan_id}.{task_id} has not ended: {now}")
        raise OutputError(f"the history holds no end of attempt {attempt} of {plan_id}.{task_id} (expired?)")
    if not ended:
        if not rec.attempt and rec.final:
            why = f" ({rec.reason})" if rec.reason else ""
            raise OutputError(f"task {plan_id}.{task_id} never ran: it is {rec.status}{why}")
        if rec.attempt and rec.final:
            raise OutputError(f"the history holds no end of {plan_id}.{task_id}'s attempts (expired?); {now}")
        raise OutputError(f"task {plan_id}.{task_id} has not completed an attempt yet: {now}")
    return ended[-1]


async def outcome_text(bus: Bus, outcome: Outcome) -> str:
    """The attempt's output in full: a worker's output (from the object store when it did not
    fit in its event; a shell task's stdout), or Claude's answer."""
    if outcome.answer is not None:
        return outcome.answer.result
    run = outcome.report
    if run is None:
        return ""
    if run.output_object:
        return await stored_output(bus, run)
    return run.output or run.stdout_tail


async def stored_output(bus: Bus, run: RunFinished) -> str:
    """The output a report left in the object store (`output_object`), checked against the
    checksum the report gives; raises `OutputError` when it is gone or is not what was sent."""
    what = f"the output of {run.plan_id}.{run.task_id} attempt {run.attempt}"
    try:
        obj = await (await bus.objects()).get(run.output_object)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        raise OutputError(f"{what} is no longer in the object store ({run.output_object})") from None
    data = obj.data or b""
    if run.output_sha256 and hashlib.sha256(data).hexdigest() != run.output_sha256:
        raise OutputError(
            f"{what} in the object store ({run.output_object}) is not what its worker reported: "
            "it was changed after the run (run the task again: `mesh retry`)"
        )
    return data.decode("utf-8", errors="replace")
