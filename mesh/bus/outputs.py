"""A task's output, wherever its last success left it.

A task that ran on a worker has its output in its `run.finished` report (or, too big or
sensitive for an event, in the object store under the report's `output_object`). A task Claude
answered has it in the gateway's `esc.answered` event (`result`; an answer of follow-up tasks
has no output of its own). Whichever of the two came last is the task's output. The files a
successful run saved (`RunFinished.files`) are its artifacts (`task_files`).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import nats.js.errors

from mesh.bus.publish import Bus
from mesh.events import EscalationAnswered, FileRef, RunFinished, decode
from mesh.records import decode_task


@dataclass(frozen=True)
class Output:
    text: str
    # the task was sensitive, or read a sensitive task's output
    sensitive: bool = False
    # the task has a schema: `text` is JSON valid against it
    parsed: bool = False


class OutputError(Exception):
    """A task has no output to take: it never finished, or its last completion failed."""


async def last_completion(bus: Bus, plan_id: str, task_id: str) -> RunFinished | EscalationAnswered:
    """The task's last completion the brain took: a worker's `run.finished` or Claude's
    `esc.answered`, whichever came last; raises `OutputError` when there is none.

    Only a report the brain took counts: the one from the worker its record names (the worker
    that held the attempt), never whatever report came last on the task's subjects."""
    names = bus.names
    try:
        entry = await (await bus.tasks_kv()).get(f"{plan_id}.{task_id}")
    except nats.js.errors.KeyNotFoundError:
        raise OutputError(f"task {task_id!r} of plan {plan_id!r} has no record") from None
    try:
        rec = decode_task(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise OutputError(f"the record of task {task_id!r} is unreadable: {exc}") from None
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
                obj = await (await bus.objects()).get(run.output_object)
                return Output((obj.data or b"").decode("utf-8", errors="replace"), run.sensitive, run.parsed)
            return Output(run.output or run.stdout_tail, run.sensitive, run.parsed)
