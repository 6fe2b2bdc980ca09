"""A prompt's answer as it is generated: the chunk a worker publishes, and a reader's view of them.

Chunks travel on core NATS (`Names.text`, not stored): a reader that misses one sees a gap in
`seq`, and a new `attempt` starts the text over. The final output is still only `run.finished`'s.
Pure: bytes and chunks in, checked chunks and lines of text out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import msgspec

from mesh.events import Message, Msg, type_of
from mesh.names import Names


class TextChunk(Msg, frozen=True, tag="text.chunk"):
    """A piece of a task's answer, on `<p>.stream.<plan>.<task>.<worker>`.

    `seq` counts the chunks of one attempt from 0, so a reader sees what it missed (a chunk
    the worker dropped rather than wait on the server counts too). `final`: the attempt's
    generation ended (its text may be empty); its outcome comes in `run.finished`."""

    plan_id: str
    task_id: str
    attempt: int
    worker: str
    seq: int
    text: str
    at: float
    final: bool = False


# every type of the wire, so a chunk must say its type, and another message is told apart
TEXT_DECODER: msgspec.json.Decoder[TextChunk | Message] = msgspec.json.Decoder(TextChunk | Message)


def decode_chunk(names: Names, subject: str, data: bytes) -> tuple[TextChunk | None, str]:
    """A chunk read on `subject`, checked like any untrusted message: its type and shape, and
    that it belongs on that subject (its plan, task and worker are the subject's). On failure
    (None, why)."""
    try:
        chunk = TEXT_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        return None, f"invalid text chunk: {exc}"
    except msgspec.DecodeError as exc:
        return None, f"undecodable text chunk: {exc}"
    if not isinstance(chunk, TextChunk):
        return None, f"a {type_of(chunk)} message is no text chunk"
    try:
        expected = names.text(chunk.plan_id, chunk.task_id, chunk.worker)
    except ValueError as exc:
        return None, f"a text chunk that names no valid subject ({exc}) arrived on {subject}"
    if expected != subject:
        return None, f"a text chunk belongs on {expected}, not on {subject}"
    if chunk.seq < 0 or chunk.attempt < 1:
        return None, f"a text chunk with seq {chunk.seq} and attempt {chunk.attempt}"
    return chunk, ""


# control characters a terminal would act on (escape sequences above all), but the tab
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(line: str) -> str:
    """A line of untrusted text made safe for a terminal: each control character written as
    its escape (`\\x1b`), so a model's answer cannot move the cursor or recolour the screen."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


@dataclass
class _Attempt:
    attempt: int = 0
    worker: str = ""
    next_seq: int = 0
    line: str = ""
    ended: bool = False


@dataclass
class TextView:
    """Chunks of many tasks in, whole lines out, each prefixed by its task: what a terminal
    shows while several tasks stream at once. A gap (missed chunks) is marked `[…]`; a newer
    attempt (or the same one redelivered to another worker) starts over with a line saying
    so; a chunk of an older attempt, or one seen already, is dropped."""

    tasks: dict[str, _Attempt] = field(default_factory=dict)

    def take(self, chunk: TextChunk) -> list[str]:
        """The lines `chunk` completes, as `task| text` (a final chunk ends its last line)."""
        out: list[str] = []
        seen = self.tasks.get(chunk.task_id)
        if seen is None:
            seen = self.tasks[chunk.task_id] = _Attempt(attempt=chunk.attempt, worker=chunk.worker)
        # a newer attempt, or the same one delivered again to another worker: it starts over
        elif chunk.attempt > seen.attempt or (
            (chunk.attempt, chunk.seq) == (seen.attempt, 0) and chunk.worker != seen.worker
        ):
            if seen.line:
                out.append(self._prefixed(chunk.task_id, seen.line + " […]"))
            out.append(self._prefixed(chunk.task_id, f"[attempt {chunk.attempt}, on {chunk.worker}]"))
            seen = self.tasks[chunk.task_id] = _Attempt(attempt=chunk.attempt, worker=chunk.worker)
        elif (
            (chunk.attempt, chunk.worker) != (seen.attempt, seen.worker)
            or chunk.seq < seen.next_seq
            or seen.ended
        ):
            return out  # an older attempt's, the other worker's, or seen already
        if chunk.seq > seen.next_seq:
            seen.line += "[…]"
        seen.next_seq = chunk.seq + 1
        *whole, seen.line = (seen.line + chunk.text).split("\n")
        out += [self._prefixed(chunk.task_id, line) for line in whole]
        if chunk.final:
            out += self.end(chunk.task_id)
            seen.ended = True
        return out

    def end(self, task_id: str) -> list[str]:
        """The task's attempt is over (its `run.finished` came): the rest of its line, if any."""
        seen = self.tasks.get(task_id)
        if seen is None or not seen.line:
            return []
        line, seen.line = seen.line, ""
        return [self._prefixed(task_id, line)]

    @staticmethod
    def _prefixed(task_id: str, line: str) -> str:
        return f"{task_id}| {printable(line)}"
