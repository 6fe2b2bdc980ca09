"""Training data from the event history: `mesh export`.

The history is read once, in stream order, by an ephemeral consumer that starts where the
window starts (by time or by stream sequence, on the server) and is filtered on the server
to the events an attempt is made of (`Names.export_filters`). Exporting never touches the
agents' durable consumers.

Each task attempt becomes one record when its final transition arrives (`task.succeeded`,
`task.retrying`, `task.failed`, `task.cancelled`), joined with what came before it: the task's
spec (`plan.accepted` / `plan.tasks`), the worker's report (`run.finished`, its output fetched
from the object store when it did not fit in the event) and the gateway's answer
(`esc.answered` / `esc.failed`). A chat task's record carries its real turns (system, user,
assistant, as the model was given them, then its answer), not its body as one user message.
Only open attempts and the specs of unfinished plans are held
in memory; a plan's specs are read back from the server when an attempt of a plan accepted
before the window (or already finished) needs them.

Safe by construction: every text goes through the gateway's own `Redactor`; an attempt of a
`sensitive` task (or one that read a sensitive task's output) is exported as metadata only,
and its output object is never fetched; identical prompt/response pairs are written once.
A manifest beside the output says what was read, written, dropped and redacted.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import msgspec
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import api
from nats.js.object_store import ObjectStore

from mesh import events
from mesh.bus.history import parse_since
from mesh.bus.publish import Bus
from mesh.bus.read import read_stream
from mesh.chat import read_turns, written
from mesh.errors import ExportError, MeshError
from mesh.events import (
    EscalationAnswered,
    EscalationFailed,
    PlanAccepted,
    PlanFinished,
    PlanTasks,
    RunFinished,
    TaskCancelled,
    TaskClimbed,
    TaskFailed,
    TaskRedelivered,
    TaskRetrying,
    TaskSpec,
    TaskStarted,
    TaskSucceeded,
)
from mesh.names import check_token
from mesh.ops.export_sinks import ChatMessage, Escalation, JsonlSink, Manifest, ParquetSink, Record, Sink
from mesh.redact import Redactor
from mesh.status import FailReason, TaskStatus

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("chat", "raw")
OUTCOMES: tuple[str, ...] = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
# the worker's report of an attempt cancelled while it ran follows the cancel: it is waited
# for this long (in stream time) before the record is written without it
REPORT_GRACE_S = 60.0
# attempts recently written, remembered so that a late report of one (an attempt given up as
# lost whose worker reports after all) is recognised instead of opening a new attempt
RECENT_CLOSED = 65_536
PROGRESS_EVERY = 2_000

# (an attempt after which the task climbed its escalation ladder closes with the climb)
Closing = TaskSucceeded | TaskRetrying | TaskFailed | TaskCancelled | TaskClimbed
Key = tuple[str, str, int]


# ------------------------------------------------------------------ the window and options


@dataclass(frozen=True)
class Point:
    """One end of the window: a UNIX time or a stream sequence."""

    at: float | None = None
    seq: int | None = None

    def __str__(self) -> str:
        return f"seq:{self.seq}" if self.seq is not None else iso(self.at or 0.0)


def parse_point(text: str, what: str, now: float | None = None) -> Point:
    """`seq:1234`, an age (`90s`, `30m`, `2h`, `7d` ago), a UNIX time or an ISO date/time."""
    word = text.strip()
    if word.lower().startswith("seq:"):
        digits = word[4:].strip()
        if not digits.isdigit() or int(digits) < 1:
            raise ExportError(
                f"{what} {text!r}: a stream sequence is seq:N with N a whole number from 1, e.g. seq:1234"
            )
        return Point(seq=int(digits))
    try:
        return Point(at=parse_since(word, now))
    except MeshError as exc:
        raise ExportError(f"{what}: {exc}; or a stream sequence like seq:1234") from None


@dataclass(frozen=True)
class Options:
    out: Path
    since: Point | None = None
    until: Point | None = None
    plan_id: str | None = None
    cls: str | None = None
    status: str | None = None
    fmt: str = "chat"

    @property
    def parquet(self) -> bool:
        return self.out.suffix.lower() == ".parquet"

    @property
    def manifest_path(self) -> Path:
        """`FILE.manifest.json` beside `FILE.jsonl` (or `FILE.parquet`)."""
        return self.out.with_suffix(".manifest.json")

    def check(self) -> None:
        """Raise an `ExportError` that says what to change for an option mesh cannot use."""
        if self.fmt not in FORMATS:
            raise ExportError(f"--format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        if self.cls is not None and self.cls not in events.TASK_CLASSES:
            raise ExportError(f"--class {self.cls!r}: use one of {', '.join(events.TASK_CLASSES)}")
        if self.status is not None and self.status not in OUTCOMES:
            raise ExportError(f"--status {self.status!r}: use one of {', '.join(OUTCOMES)}")
        if self.plan_id is not None:
            try:
                check_token(self.plan_id, "plan id")
            except ValueError as exc:
                raise ExportError(f"--plan: {exc}") from None
        if self.out.is_dir():
            raise ExportError(f"--out {self.out} is a directory: name a file, e.g. {self.out}/history.jsonl")
        for path in (self.out, self.manifest_path):
            if path.exists() and not path.is_file():
                # (the export replaces its output whole: a device or a pipe would be replaced)
                raise ExportError(f"--out {self.out}: {path} is not a regular file; name a file")
        if self.out.parent.exists() and not self.out.parent.is_dir():
            raise ExportError(f"--out {self.out}: {self.out.parent} is a file, not a directory")
        if not self.out.parent.is_dir():
            raise ExportError(
                f"--out {self.out}: the directory {self.out.parent} does not exist; create it first"
            )
        if self.manifest_path == self.out:
            raise ExportError(
                f"--out {self.out}: name the output FILE.jsonl (the manifest is FILE.manifest.json)"
            )
        s, u = self.since, self.until
        if s is not None and u is not None:
            if s.seq is not None and u.seq is not None and u.seq < s.seq:
                raise ExportError(f"--until {u} is before --since {s}: swap them")
            if s.at is not None and u.at is not None and u.at < s.at:
                raise ExportError(f"--until {u} is before --since {s}: swap them")


def iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat(timespec="milliseconds")


def _unwritable(path: Path, exc: OSError) -> ExportError:
    return ExportError(
        f"could not write {path}: {exc.strerror or exc}; nothing was kept there. Free space on its "
        "disk, or name another file with --out"
    )


# ------------------------------------------------------------------ the join


class Attempt:
    __slots__ = (
        "answered",
        "attempt",
        "close",
        "esc_failed",
        "plan_id",
        "run",
        "seq",
        "spec",
        "started_at",
        "task_id",
        "worker",
    )

    def __init__(self, plan_id: str, task_id: str, attempt: int) -> None:
        self.plan_id = plan_id
        self.task_id = task_id
        self.attempt = attempt
        self.started_at: float | None = None
        self.worker = ""
        self.run: RunFinished | None = None
        self.answered: EscalationAnswered | None = None
        self.esc_failed: EscalationFailed | None = None
        self.close: Closing | None = None
        self.seq = 0
        self.spec: TaskSpec | None = None


# told (stream sequence reached, first sequence of the window, last one) as the export reads
Progress = Callable[[int, int, int], None]


class Exporter:
    """One export: read the window, join, redact, write. `run()` returns the manifest."""

    def __init__(self, bus: Bus, options: Options, progress: Progress | None = None) -> None:
        options.check()
        self.bus = bus
        self.names = bus.names
        self.opts = options
        self.progress = progress
        self.redactor = Redactor(bus.settings.redact)
        self.specs: dict[str, dict[str, TaskSpec]] = {}
        self.open: dict[Key, Attempt] = {}
        # cancelled while running: the report is still to come
        self.awaiting: dict[Key, Attempt] = {}
        self.recent: dict[Key, None] = {}
        self.seen: set[bytes] = set()
        self.redacted: Counter[str] = Counter()
        self.counts: dict[str, Counter[str]] = {}
        self.store: ObjectStore | None = None
        self.store_missing = False
        self.encoder = msgspec.json.Encoder()
        self.m = Manifest(
            output=str(options.out),
            format="parquet" if options.parquet else options.fmt,
            created_at=iso(time.time()),
            filters={
                "since": str(options.since) if options.since else None,
                "until": str(options.until) if options.until else None,
                "plan": options.plan_id,
                "class": options.cls,
                "status": options.status,
            },
            stream=self.names.events_stream,
        )
        self.sink: Sink | None = None

    # reading -----------------------------------------------------------------------
    def _config(self) -> api.ConsumerConfig:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        since = self.opts.since
        if since is not None and since.seq is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = since.seq
        elif since is not None and since.at is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.datetime.fromtimestamp(since.at, tz=datetime.UTC)
        return config

    async def run(self) -> Manifest:
        began = time.perf_counter()
        stream = self.names.events_stream
        try:
            info = await self.bus.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise ExportError(
                f"the stream {stream} does not exist on {self.bus.settings.url}: nothing was ever "
                "recorded there (is --server right?)"
            ) from None
        end = info.state.last_seq
        until = self.opts.until
        if until is not None and until.seq is not None:
            end = min(end, until.seq)
        until_at = until.at if until is not None else None
        tmp = self.opts.out.with_name(f".{self.opts.out.name}.tmp{os.getpid()}")
        try:
            self.sink = ParquetSink(tmp, self.opts.fmt) if self.opts.parquet else JsonlSink(tmp)
        except OSError as exc:
            raise _unwritable(self.opts.out, exc) from None
        m = self.m
        first = last = 0
        first_at = last_at = 0.0
        try:
            filters = self.names.export_filters(self.opts.plan_id)
            reader = cast(
                AsyncGenerator[NatsMsg, None], read_stream(self.bus.js, stream, filters, self._config())
            )
            async with contextlib.aclosing(reader) as entries:
                async for raw in entries:
                    meta = raw.metadata
                    seq = meta.sequence.stream
                    at = meta.timestamp.timestamp() if meta.timestamp else 0.0
                    if seq > end or (until_at is not None and at > until_at):
                        break
                    if not first:
                        first, first_at = seq, at
                    last, last_at = seq, at
                    m.events_read += 1
                    try:
                        msg = events.DECODER.decode(raw.data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        m.undecodable += 1
                        continue
                    if self.awaiting:
                        await self._flush_awaiting(at - REPORT_GRACE_S)
                    await self._fold(msg, seq)
                    if self.progress is not None and m.events_read % PROGRESS_EVERY == 0:
                        self.progress(seq, first, max(seq, end))
            await self._flush_awaiting(None)
            m.unfinished = len(self.open)
            self.sink.close()
            os.replace(tmp, self.opts.out)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                self.sink.abort()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _unwritable(self.opts.out, exc) from None
            raise
        if first:
            m.first_seq, m.last_seq, m.first_at, m.last_at = first, last, iso(first_at), iso(last_at)
        if self.progress is not None and first:
            self.progress(max(last, end), first, max(last, end))
        m.counts = {cls: dict(sorted(c.items())) for cls, c in sorted(self.counts.items())}
        m.redacted = dict(sorted(self.redacted.items()))
        m.seconds = round(time.perf_counter() - began, 3)
        m.events_per_s = round(m.events_read / m.seconds, 1) if m.seconds else 0.0
        manifest = self.opts.manifest_path
        written = manifest.with_name(f".{manifest.name}.tmp{os.getpid()}")
        try:
            written.write_bytes(msgspec.json.format(msgspec.json.encode(m)) + b"\n")
            os.replace(written, manifest)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(written)
            raise _unwritable(manifest, exc) from None
        return m

    async def _fold(self, msg: events.Message, seq: int) -> None:
        match msg:
            case RunFinished():
                key = (msg.plan_id, msg.task_id, msg.attempt)
                parked = self.awaiting.pop(key, None)
                if parked is not None:
                    parked.run = msg
                    await self._write(parked)
                elif key in self.recent:
                    self.m.late_reports += 1
                else:
                    self._attempt(key).run = msg
            case TaskSucceeded() | TaskRetrying() | TaskFailed() | TaskCancelled() | TaskClimbed():
                if not isinstance(msg, TaskCancelled | TaskClimbed) and msg.started_at:
                    # started with the report that ended it: the end stands for `task.started`
                    a = self._attempt((msg.plan_id, msg.task_id, msg.attempt))
                    a.started_at, a.worker = msg.started_at, msg.worker
                await self._close(msg, seq)
            case TaskStarted():
                a = self._attempt((msg.plan_id, msg.task_id, msg.attempt))
                a.started_at, a.worker = msg.at, msg.worker
            case TaskRedelivered():
                self._attempt((msg.plan_id, msg.task_id, msg.attempt)).worker = msg.worker
            case PlanAccepted():
                self.specs[msg.plan_id] = {t.id: t for t in msg.plan.tasks}
            case PlanTasks():
                self.specs.setdefault(msg.plan_id, {}).update((t.id, t) for t in msg.tasks)
            case PlanFinished():
                # every attempt of the plan is closed (and holds its spec): a resumed plan's specs
                # are read back when they are needed
                self.specs.pop(msg.plan_id, None)
            case EscalationAnswered():
                self._attempt((msg.plan_id, msg.task_id, msg.attempt)).answered = msg
            case EscalationFailed():
                self._attempt((msg.plan_id, msg.task_id, msg.attempt)).esc_failed = msg

    def _attempt(self, key: Key) -> Attempt:
        a = self.open.get(key)
        if a is None:
            a = self.open[key] = Attempt(*key)
        return a

    async def _close(self, msg: Closing, seq: int) -> None:
        key = (msg.plan_id, msg.task_id, msg.attempt)
        a = self.open.pop(key, None)
        if a is None:
            never = isinstance(msg, TaskCancelled) or (
                isinstance(msg, TaskFailed) and msg.reason == FailReason.DEPENDENCY
            )
            if never or msg.attempt < 1:
                # cancelled before it ran (or again, in its backoff), or failed by a dependency
                self.m.never_ran += 1
                return
            a = Attempt(*key)  # it began before the window
        a.close, a.seq = msg, seq
        a.spec = await self._spec(msg.plan_id, msg.task_id)
        if isinstance(msg, TaskCancelled) and a.run is None and a.started_at is not None:
            self.awaiting[key] = a
            return
        await self._write(a)

    async def _flush_awaiting(self, before: float | None) -> None:
        """Write the cancelled attempts whose report has not come (all, or those closed before
        `before`)."""
        while self.awaiting:
            key, a = next(iter(self.awaiting.items()))
            if before is not None and a.close is not None and a.close.at > before:
                return
            del self.awaiting[key]
            await self._write(a)

    async def _spec(self, plan_id: str, task_id: str) -> TaskSpec | None:
        tasks = self.specs.get(plan_id)
        if tasks is None:
            tasks = self.specs[plan_id] = await self._load_plan(plan_id)
        return tasks.get(task_id)

    async def _load_plan(self, plan_id: str) -> dict[str, TaskSpec]:
        """A plan's task specs, read back from its `plan.accepted` and `plan.tasks` events
        (for a plan accepted before the window, or finished and then resumed)."""
        subjects = [self.names.plan_event(plan_id, "accepted"), self.names.plan_event(plan_id, "tasks")]
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        out: dict[str, TaskSpec] = {}
        async for raw in read_stream(self.bus.js, self.names.events_stream, subjects, config):
            try:
                msg = events.DECODER.decode(raw.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            match msg:
                case PlanAccepted():
                    out.update((t.id, t) for t in msg.plan.tasks)
                case PlanTasks():
                    out.update((t.id, t) for t in msg.tasks)
        if not out:
            log.warning(
                "plan %s: no plan.accepted event left in the history; its records lack the spec", plan_id
            )
        return out

    async def _fetch(self, name: str, sha256: str) -> str | None:
        """A big output from the object store; None when it is gone, or is not the one its
        worker reported (its checksum differs: the object was written again since)."""
        if self.store is None and not self.store_missing:
            try:
                self.store = await self.bus.js.object_store(self.names.objects_bucket)
            except nats.js.errors.NotFoundError:
                self.store_missing = True
        if self.store is None:
            return None
        try:
            obj = await self.store.get(name)
        except nats.js.errors.NotFoundError:
            return None
        data = obj.data or b""
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            log.warning("the stored output %s differs from the one its worker reported: left out", name)
            return None
        return data.decode("utf-8", errors="replace")

    # writing -----------------------------------------------------------------------
    async def _write(self, a: Attempt) -> None:
        recent = self.recent
        recent[(a.plan_id, a.task_id, a.attempt)] = None
        if len(recent) > RECENT_CLOSED:
            del recent[next(iter(recent))]
        m = self.m
        close, run, spec, answered, failed = a.close, a.run, a.spec, a.answered, a.esc_failed
        assert close is not None
        cls = spec.cls if spec is not None else ""
        kind = spec.kind if spec is not None else ""
        match close:
            case TaskSucceeded():
                outcome, reason = TaskStatus.SUCCEEDED, FailReason.NONE
            case TaskCancelled():
                outcome, reason = TaskStatus.CANCELLED, FailReason.CANCELLED
            case TaskClimbed():
                outcome = TaskStatus.FAILED
                reason = close.after.reason if close.after is not None else FailReason.ERROR
            case _:
                outcome, reason = TaskStatus.FAILED, close.reason
        if (self.opts.cls is not None and cls != self.opts.cls) or (
            self.opts.status is not None and outcome != self.opts.status
        ):
            m.filtered_out += 1
            return
        sensitive = bool((spec is not None and spec.sensitive) or (run is not None and run.sensitive))
        if sensitive and (
            (run is not None and (run.prompt or run.output or run.stdout_tail or run.stderr_tail))
            or (answered is not None and (answered.prompt or answered.result or answered.followups))
        ):
            m.sensitive_leaks_in_history += 1
            log.warning(
                "%s.%s attempt %d is sensitive but its history holds what it saw or made; "
                "it is exported as metadata only",
                a.plan_id,
                a.task_id,
                a.attempt,
            )
        counts: Counter[str] = Counter()
        red = self._redact
        metrics = dict(run.metrics) if run is not None else {}

        # texts: none of them for a sensitive attempt
        body = output = error = stderr = None
        artifacts: list[str] | None = None
        system = prompt = response = answer = followups = None
        turns: list[ChatMessage] = []
        if not sensitive:
            body = red(spec.body, counts) if spec is not None else ""
            text = ""
            if run is not None:
                text = run.output or run.stdout_tail
                if run.output_object:
                    fetched = await self._fetch(run.output_object, run.output_sha256)
                    if fetched is None:
                        m.outputs_missing += 1
                    else:
                        m.outputs_fetched += 1
                        text = fetched
            output = red(text, counts)
            error = red(_error(close, run), counts)
            stderr = red(run.stderr_tail, counts) if run is not None else ""
            artifacts = [red(p, counts) for p in run.artifacts] if run is not None else []
            if answered is not None:
                system = red(answered.system, counts)
                prompt = red(answered.prompt, counts)
                answer, followups = red(answered.result, counts), red(answered.followups, counts)
                response = answer or followups
            elif kind == "prompt":
                system = ""
                prompt = red(run.prompt, counts) if run is not None else ""
                response = output
            elif kind == "chat" and spec is not None:
                turns = [
                    ChatMessage(m.role, red(m.content, counts))
                    for m in _chat_turns(run.prompt if run is not None else "", spec.body)
                ]
                system = next((m.content for m in turns if m.role == "system"), "")
                prompt = written(
                    [{"role": m.role, "content": m.content} for m in turns if m.role != "system"]
                )
                response = output
        chat = prompt is not None and (prompt != "" or response != "")
        if chat and response:
            digest = hashlib.blake2b(f"{system}\x00{prompt}\x00{response}".encode(), digest_size=16).digest()
            if digest in self.seen:
                m.duplicates_dropped += 1
                return
            self.seen.add(digest)

        escalation = None
        if answered is not None:
            escalation = Escalation(
                answered=True,
                model=answered.model,
                result=answer,
                followups=followups,
                tokens_in=answered.tokens_in,
                tokens_out=answered.tokens_out,
                cost_usd=answered.cost_usd,
                duration_s=answered.duration_s,
                redacted=dict(answered.redacted),
            )
        elif failed is not None:
            escalation = Escalation(
                answered=False,
                reason=failed.reason,
                error=None if sensitive else red(failed.error, counts),
                tokens_in=failed.tokens_in,
                tokens_out=failed.tokens_out,
                cost_usd=failed.cost_usd,
            )

        duration: float | None = None
        if run is not None:
            duration = run.duration_s
        elif isinstance(close, TaskRetrying | TaskFailed | TaskSucceeded | TaskClimbed) and close.duration_s:
            duration = close.duration_s
        elif answered is not None:
            duration = answered.duration_s
        started = a.started_at
        if started is None and run is not None:
            started = run.at - run.duration_s
        rc = run.rc if run is not None else getattr(close, "rc", None)
        worker = (run.worker if run is not None else "") or getattr(close, "worker", "") or a.worker
        record = Record(
            id=f"{a.plan_id}.{a.task_id}:{a.attempt}",
            plan=a.plan_id,
            task=a.task_id,
            attempt=a.attempt,
            cls=cls,
            kind=kind,
            # who produced the answer: the run's model (a ladder's rung), or Claude's
            model=(
                answered.model
                if answered is not None
                else run.model
                if run is not None and run.model
                else spec.model
                if spec is not None
                else ""
            ),
            outcome=outcome,
            reason=reason,
            # tried again: after a backoff, or on the next rung of its ladder
            will_retry=isinstance(close, TaskRetrying | TaskClimbed),
            sensitive=sensitive,
            escalated=answered is not None or failed is not None,
            worker=worker,
            gpu=run.gpu if run is not None else "",
            started_at=started,
            finished_at=close.at,
            duration_s=duration,
            rc=rc,
            tokens_in=_int(metrics.get("tokens_in")),
            tokens_out=_int(metrics.get("tokens_out")),
            tokens_per_s=metrics.get("tokens_per_s"),
            ttft_s=metrics.get("ttft_s"),
            gpu_mem_peak_mb=metrics.get("gpu_mem_peak_mb"),
            gpu_util_mean_pct=metrics.get("gpu_util_mean_pct"),
            metrics=metrics,
            body=body,
            output=output,
            error=error,
            stderr_tail=stderr,
            stdout_bytes=run.stdout_bytes if run is not None else 0,
            stderr_bytes=run.stderr_bytes if run is not None else 0,
            artifacts=artifacts,
            escalation=escalation,
            redacted=dict(sorted(counts.items())),
            seq=a.seq,
        )
        if self.opts.fmt == "chat":
            if turns:
                record.messages = [*turns, ChatMessage("assistant", response or "")]
            else:
                record.messages = _messages(system, prompt, response) if chat else []
        else:
            record.system, record.prompt, record.response = system, prompt, response
        assert self.sink is not None
        self.sink.write(record, self.encoder)
        m.records += 1
        m.sensitive_metadata_only += sensitive
        self.redacted.update(counts)
        self.counts.setdefault(cls or "unknown", Counter())[outcome] += 1

    def _redact(self, text: str, counts: Counter[str]) -> str:
        return self.redactor.text(text, counts)[0] if text else text


def _error(close: Closing, run: RunFinished | None) -> str:
    match close:
        case TaskRetrying() | TaskFailed() if close.error:
            return close.error  # the brain's snippet: the error, then the end of stderr (or stdout)
        case TaskClimbed() if close.after is not None and close.after.error:
            return close.after.error
        case TaskCancelled():
            parts = [close.reason, run.error if run is not None else ""]
            return "\n".join(p for p in parts if p)
        case _:
            return run.error if run is not None else ""


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _chat_turns(recorded: str, body: str) -> list[ChatMessage]:
    """The turns a chat task's model was given: the messages its run recorded (as JSON, the
    inputs in the last user turn), else, when the record holds none, the body's turns."""
    try:
        messages = msgspec.json.decode(recorded.encode("utf-8"), type=list[ChatMessage])
    except (msgspec.DecodeError, msgspec.ValidationError):
        messages = []
    return messages or [ChatMessage(t.role, t.text) for t in read_turns(body)[0]]


def _messages(system: str | None, prompt: str | None, response: str | None) -> list[ChatMessage]:
    out = [ChatMessage("system", system)] if system else []
    out.append(ChatMessage("user", prompt or ""))
    out.append(ChatMessage("assistant", response or ""))
    return out


async def export(bus: Bus, options: Options, progress: Progress | None = None) -> Manifest:
    """Export the window of the history that `options` selects; see the module's docstring."""
    return await Exporter(bus, options, progress).run()


__all__ = [
    "FORMATS",
    "OUTCOMES",
    "Escalation",
    "Exporter",
    "Manifest",
    "Options",
    "Point",
    "Record",
    "export",
    "parse_point",
]
