"""Publishing what the brain decided: the events to the history, then the task and plan records
to KV together with the work items, then resource and escalation requests and the checkpoint.

Neither KV nor the work queue ever runs ahead of the history. A step whose publishing was cut
short stays in the outbox and is published again, whole, before anything else. A running plan's
record waits `plan_record_s` when only its counts changed; the work items the workers
acknowledged are purged in bulk, about once a second (`mesh.bus.workstream`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time

import msgspec
import nats.js.errors
from nats.js.api import PubAck

from agents.base import Agent
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.outputs import OutputError, task_output
from mesh.bus.retention import forget_plans
from mesh.bus.route import work_subject
from mesh.bus.snapshot import write as write_snapshot
from mesh.bus.workstream import WorkPurger
from mesh.events import (
    AgentOffline,
    EscalationRequest,
    Msg,
    PlanArchived,
    PlanFinished,
    PlanRejected,
    ResourceRequested,
    TaskClimbed,
    TaskEscalated,
    TaskFailed,
    TaskRedelivered,
    TaskReleased,
    TaskRetrying,
    TaskReviewed,
    TaskReviewing,
    TaskSucceeded,
    TaskWaiting,
    WorkItem,
    type_of,
)
from mesh.machine import State, Step
from mesh.machine_step import Policy
from mesh.packing import members, pack
from mesh.records import (
    CANCELLED,
    INFLIGHT_STATES,
    PENDING,
    READY,
    Checkpoint,
    PlanRecord,
    TaskRecord,
    encode_record,
)
from mesh.snapshot import Snapshots
from mesh.status import FailReason

log = logging.getLogger("mesh.brain")

RECENT_WRITES_S = 30.0
# a released task's `ready` record held back longer than this is written (`_hold_ready`)
HELD_MAX_S = 5.0
CHECKPOINT_KEY = "checkpoint"
# a note for the operator (a model no GPU can hold, say) is logged at most this often
NOTE_EVERY_S = 600.0


class BrainCommit(Agent):
    """Writing decided steps out (its fields are set by `Brain.__init__`)."""

    state: State
    # a decided step whose publishing was interrupted; finished before anything else
    _outbox: Step | None
    last_seq: int
    checkpoint_seq: int
    # the learned figures' feed count the last checkpoint wrote
    learned_fed: int
    _last_checkpoint: float
    _noted: dict[str, float]
    # (when, task keys, plan ids) of recent KV writes: a server killed right after
    # acknowledging them may not have stored them yet, so they are written again on reconnect
    recent_writes: collections.deque[tuple[float, list[str], list[str]]]
    policy: Policy
    # the workers missed while holding running tasks, as the last checkpoint wrote them
    offline_written: dict[str, float]
    # stream sequence and subject of each released task's work item (its own, or the pack it
    # shares), until the brain has seen the task end
    work_seq: dict[str, tuple[int, str]]
    # a packed work item's sequence -> [its tasks still wanting it, whether all that left did
    # not want it run]: the item is deleted only when none of its tasks wants it
    work_packs: dict[int, list[int | bool]]
    # work items of tasks done, not yet purged: (sequence, subject, when the task was done)
    done_items: collections.deque[tuple[int, str, float]]
    # purges what the work consumers acknowledged (None: the stream is an old work queue)
    purger: WorkPurger | None
    # plan id -> (when its record was last written, that record less its counts): a running
    # plan whose counts alone changed is written again only `plan_record_s` later
    plan_written: dict[str, tuple[float, bytes]]
    # released tasks whose `ready` record is held back (`_hold_ready`): the stream sequence of
    # the release, and since when (monotonic)
    held_ready: dict[str, tuple[int, float]]
    # the pages of records changed since the last snapshot, and when the next is due
    snapshots: Snapshots

    async def _commit(self, step: Step) -> None:
        """Publish a decided step: events, then records and work items together, each phase
        pipelined and fully acknowledged before the next. Neither KV nor the work queue ever
        runs ahead of the history: a crash after the events leaves records the next brain
        repairs from them. The work items go out ahead of the records, in the pipeline of their
        first chunk (a big plan's acceptance writes thousands of records; its first tasks start
        meanwhile), so a worker may take an item before the record says `ready`: workers read
        the record only of an item that is not fresh, and take a record behind the item for one
        not yet written (`mesh.work.still_wanted`).

        Interrupted, the step stays in the outbox and is published again, whole, before
        anything else; the server drops what it already stored by `Nats-Msg-Id`.
        """
        self._outbox = step
        bus = self.bus
        if not step.packed:  # (once: a step published again keeps its items and their ids)
            policy = self.policy
            step.work[:] = pack(step.work, self.state, policy.pack_size, policy.pack_below_s)
            step.packed = True
        archived: list[str] = []
        released: dict[str, int] = {}
        if step.events:
            acks = await bus.emit_many(step.events)
            self.last_seq = max(self.last_seq, max(a.seq for a in acks))
            # a released task's first event in this step (its `task.waiting` may come before)
            first: dict[str, int] = {}
            for ev, ack in zip(step.events, acks, strict=True):
                task_id = getattr(ev, "task_id", "")
                if task_id:
                    key = f"{getattr(ev, 'plan_id', '')}.{task_id}"
                    first.setdefault(key, ack.seq)
                    if isinstance(ev, TaskReleased):
                        released[key] = first[key]
            for ev in step.events:
                self._log_event(ev)
            archived = [ev.plan_id for ev in step.events if isinstance(ev, PlanArchived)]
            step.events.clear()
        tasks, plans = self.state.take_dirty()
        self.snapshots.touch(tasks, bool(plans))
        tasks = self._hold_ready(tasks, released)
        plans = self._plans_due(plans)
        try:
            acks = await self._write_records(tasks, plans, then=step.work)
        except BaseException:
            # records not written stay dirty so the retry writes them (the work items again too:
            # the server drops the ones it already stored)
            self.state.dirty_tasks.update(r.key for r in tasks)
            self.state.dirty_plans.update(p.plan_id for p in plans)
            raise
        self._plans_written(plans)
        if step.work:
            for item, ack in zip(step.work, acks, strict=True):
                queued = (ack.seq, work_subject(self.names, item.cls, item.model))
                for member in members(item):
                    key = f"{member.plan_id}.{member.task_id}"
                    before = self.work_seq.get(key)
                    if before is not None and before[0] != ack.seq:
                        # (its new item replaces one it shared: that one no longer waits on it)
                        self._left_pack(before, unwanted=False)
                    self.work_seq[key] = queued
                if item.more:
                    self.work_packs[ack.seq] = [1 + len(item.more), True]
            step.work.clear()
        if step.resources:
            await bus.emit_many(step.resources)
            step.resources.clear()
        if step.escalations:
            await self._publish_escalations(step.escalations)
            step.escalations.clear()
        now = time.time()
        for note in step.notes:
            if now - self._noted.get(note, 0.0) >= NOTE_EVERY_S:
                self._noted[note] = now
                log.warning("%s", note)
        step.notes.clear()
        self._outbox = None
        await self._forget_work(tasks)
        await self._checkpoint()
        if self.snapshots.due(self.state, self.settings.snapshot_min_tasks, self.settings.snapshot_writes):
            await self._snapshot()
        if archived:
            self.spawn(self._forget_objects(archived), "forget-objects")

    def _hold_ready(self, tasks: list[TaskRecord], released: dict[str, int]) -> list[TaskRecord]:
        """The records to write now. A task released after its plan's acceptance step (its
        record is in KV already: `waiting`, `pending` or `retrying`) keeps its `ready` record
        back: most tasks start and end soon after, and their next record is written in its
        place. One write (and, with `durability = "always"`, one fsync) fewer per task.
        `released`: for each task released in this step, the stream sequence of its first event
        in the step (what its record would have said since it was last written starts there).

        Nothing relies on the `ready` record: a worker takes a record behind its item's attempt
        as one not yet caught up (`mesh.work.still_wanted`), and the checkpoint stays before the
        release of every held record (`_checkpoint_seq`), so a brain starting after a crash
        folds those releases again. A record held longer than `HELD_MAX_S` is written with the
        next checkpoint: `mesh status` shows a queued task `waiting` until then. A task released
        in its plan's acceptance step has no record yet: it is written at once."""
        held = self.held_ready
        out = []
        plans = self.state.plans
        now = time.monotonic()
        for rec in tasks:
            if rec.status == READY:
                plan = plans.get(rec.plan_id)
                seq = released.get(rec.key) or (held[rec.key][0] if rec.key in held else 0)
                if seq and plan is not None and rec.released_at > plan.accepted_at:
                    if rec.key not in held:
                        held[rec.key] = (seq, now)
                    continue
            held.pop(rec.key, None)
            out.append(rec)
        return out

    async def _write_held(self, older_than: float = 0.0) -> None:
        """Write the `ready` records held back longer than `older_than` seconds."""
        if not self.held_ready:
            return
        horizon = time.monotonic() - older_than
        keys = sorted(k for k, (_, since) in self.held_ready.items() if since <= horizon)
        if not keys:
            return
        taken = {k: self.held_ready.pop(k) for k in keys}
        tasks = self.state.tasks
        try:
            await self._write_records([tasks[k] for k in keys if k in tasks], [])
        except BaseException:
            self.held_ready.update(taken)
            raise

    def _checkpoint_seq(self) -> int:
        """How far KV holds everything: up to `last_seq`, or to just before the first unwritten
        event of the oldest `ready` record still held back."""
        if not self.held_ready:
            return self.last_seq
        return min(self.last_seq, min(seq for seq, _ in self.held_ready.values()) - 1)

    async def _forget_objects(self, plan_ids: list[str]) -> None:
        """Delete archived plans' artifacts and outputs from the object store, in the background;
        what fails is logged (the store's age limit removes it in the end)."""
        try:
            await forget_plans(self.bus, plan_ids)
        except Exception as exc:
            log.warning("could not delete the objects of archived plans %s: %r", ", ".join(plan_ids), exc)

    async def _forget_work(self, tasks: list[TaskRecord]) -> None:
        """Delete the queued work item of a task that no longer wants it (cancelled, reset or
        given up as lost), so no worker runs it; forget the items of finished tasks."""
        stale = []
        now = time.monotonic()
        for rec in tasks:
            queued = self.work_seq.get(rec.key)
            if queued is None or rec.status in INFLIGHT_STATES:
                continue
            del self.work_seq[rec.key]
            unwanted = rec.status in (CANCELLED, PENDING) or rec.reason == FailReason.LOST
            gone = self._left_pack(queued, unwanted, now)
            if gone:
                stale.append(queued[0])
        if stale:
            stream = self.names.work_stream
            results = await asyncio.gather(
                *(self.bus.js.delete_msg(stream, seq) for seq in stale), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, nats.js.errors.NotFoundError):
                    log.debug("could not delete a stale work item: %s", result)

    def _left_pack(self, queued: tuple[int, str], unwanted: bool, now: float | None = None) -> bool:
        """A task no longer waits on the item `queued` (sequence, subject): its own, or a pack
        it shared (`mesh.packing`), which goes once none of its tasks waits on it. True when the
        item is to be deleted (no task of it wanted it run: a worker skips a cancelled task of a
        pack it takes); otherwise a done item is noted for the purge."""
        seq, subject = queued
        packed = self.work_packs.get(seq)
        if packed is not None:
            packed[0] = int(packed[0]) - 1
            packed[1] = bool(packed[1]) and unwanted
            if packed[0] > 0:
                return False
            del self.work_packs[seq]
            unwanted = bool(packed[1])
        if unwanted:
            return True
        if self.purger is not None:
            self.done_items.append((seq, subject, time.monotonic() if now is None else now))
        return False

    async def _purge_loop(self) -> None:
        """Every `work_purge_s`, purge the work items every consumer acknowledged
        (`mesh.bus.workstream`): one purge per consumer whose ack floor moved, not one removal
        per item. A floor held back by one long task leaves the done items above it stored: a
        done task's item still there `work_stuck_s` after is deleted alone, as a work queue
        would have on its acknowledgement."""
        assert self.purger is not None
        while not self.stop_requested.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), timeout=self.settings.work_purge_s)
                return
            try:
                bounds = await self.purger.purge(self._unfinished_items())
                await self._delete_stuck(bounds)
            except TRANSIENT as exc:
                log.debug("purging acknowledged work items failed: %r", exc)
            except nats.js.errors.Error as exc:
                log.warning("purging acknowledged work items failed: %r", exc)

    def _unfinished_items(self) -> dict[str, int]:
        """Subject -> the oldest work item queued for a task whose end the brain has not seen.
        Kept from the purge even once acknowledged: a task's report may be stored and not yet
        decided when the brain stops, and the next brain, which queues again the ready tasks
        the stream holds no item for (`republish_ready`), must find it. (A lone item queued
        again is dropped by the server by its id; a task packed into another's item has none.)"""
        keep: dict[str, int] = {}
        for seq, subject in self.work_seq.values():
            if seq < keep.get(subject, seq + 1):
                keep[subject] = seq
        return keep

    async def _delete_stuck(self, bounds: dict[str, int]) -> None:
        done = self.done_items
        keep: collections.deque[tuple[int, str, float]] = collections.deque()
        stuck = []
        old = time.monotonic() - self.settings.work_stuck_s
        while done:
            seq, subject, at = done.popleft()
            if seq < bounds.get(subject, 0):
                continue  # purged
            if at < old:
                stuck.append(seq)
            else:
                keep.append((seq, subject, at))
        done.extend(keep)
        if stuck:
            stream = self.names.work_stream
            results = await asyncio.gather(
                *(self.bus.js.delete_msg(stream, seq) for seq in stuck), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if any(not isinstance(r, nats.js.errors.NotFoundError) for r in failed):
                log.debug("could not delete some done work items: %s", failed[0])

    async def _write_records(
        self, tasks: list[TaskRecord], plans: list[PlanRecord], then: list[WorkItem] | None = None
    ) -> list[PubAck]:
        """Write changed records (and remove archived ones); `then`, work items, go out ahead
        of the records, in the pipeline of their first chunk: their acknowledgements are
        returned."""
        gone_tasks, gone_plans = self.state.take_removed()
        if gone_tasks or gone_plans:
            names = self.names
            purge = [(names.tasks_bucket, k) for k in gone_tasks] + [
                (names.plans_bucket, p) for p in gone_plans
            ]
            try:
                await self.bus.kv_purge_many(purge)
            except BaseException:
                self.state.removed_tasks.update(gone_tasks)
                self.state.removed_plans.update(gone_plans)
                raise
            for key in gone_tasks:
                self.work_seq.pop(key, None)
            for plan_id in gone_plans:
                self.plan_written.pop(plan_id, None)
        if not tasks and not plans:
            return await self.bus.emit_many(then or [])
        names = self.names
        # a final plan record goes out only once its tasks' records are stored: the buckets are
        # stored independently, and a reader that sees the plan final reads its tasks final
        final = [p for p in plans if p.final] if tasks else []
        # encoded as they are sent, a chunk at a time (a huge plan's records all encoded at once
        # were tens of MB the heap kept)
        puts = itertools.chain(
            ((names.tasks_bucket, r.key, encode_record(r)) for r in tasks),
            ((names.plans_bucket, p.plan_id, encode_record(p)) for p in plans if not final or not p.final),
        )
        acks = await self.bus.kv_put_many(puts, then or ())
        if final:
            await self.bus.kv_put_many((names.plans_bucket, p.plan_id, encode_record(p)) for p in final)
        now = time.monotonic()
        self.recent_writes.append((now, [r.key for r in tasks], [p.plan_id for p in plans]))
        while self.recent_writes and self.recent_writes[0][0] < now - RECENT_WRITES_S:
            self.recent_writes.popleft()
        return acks

    def _plans_due(self, plans: list[PlanRecord]) -> list[PlanRecord]:
        """The plan records to write now. A running plan whose record differs from the one last
        written only in its counts waits until `plan_record_s` after that write (it stays dirty:
        a later commit, or the brain's tick, writes it): in a chain every brain step changes
        them. Counts are all a deferred record lacks, and `State.load` counts them again from
        the task records, so the checkpoint may pass the events that changed them."""
        every = self.settings.plan_record_s
        if every <= 0:
            return plans
        now = time.monotonic()
        due = []
        for plan in plans:
            last = self.plan_written.get(plan.plan_id)
            if (
                last is not None
                and not plan.final
                and now - last[0] < every
                and _without_counts(plan) == last[1]
            ):
                self.state.dirty_plans.add(plan.plan_id)
            else:
                due.append(plan)
        return due

    def _plans_written(self, plans: list[PlanRecord]) -> None:
        if self.settings.plan_record_s <= 0:
            return
        now = time.monotonic()
        for plan in plans:
            if plan.final:
                self.plan_written.pop(plan.plan_id, None)
            else:
                self.plan_written[plan.plan_id] = (now, _without_counts(plan))

    async def _publish_escalations(self, requests: list[EscalationRequest]) -> None:
        """Requests with their inputs (the outputs of the dependencies the task takes)."""
        filled = []
        for req in requests:
            inputs: dict[str, str] = {}
            for dep in req.task.inputs:
                try:
                    found = await task_output(self.bus, req.plan_id, dep)
                except OutputError as exc:
                    inputs[dep] = f"[no output: {exc}]"
                    continue
                if found.sensitive and not req.sensitive_allowed:
                    inputs[dep] = "[withheld: the output of a sensitive task]"
                else:
                    inputs[dep] = found.text
            filled.append(msgspec.structs.replace(req, inputs=inputs) if inputs else req)
        await self.bus.emit_many(filled)

    async def on_reconnect(self) -> None:
        """A server restarted under us may have lost writes it had acknowledged but not yet
        stored: write the records of the last moments again (the next commit does it)."""
        for _, keys, plan_ids in self.recent_writes:
            self.state.dirty_tasks.update(k for k in keys if k in self.state.tasks)
            self.state.dirty_plans.update(p for p in plan_ids if p in self.state.plans)
        log.info("reconnected: writing %d recent records again", len(self.state.dirty_tasks))

    async def _checkpoint(self, force: bool = False) -> None:
        """Record how far KV holds everything (`_checkpoint_seq`; called only with nothing
        unwritten but the held `ready` records), with the learned figures folded so far (a GPU's
        report may change them alone). Held records older than `HELD_MAX_S` are written first;
        `force` writes them all, and the plan records held back."""
        learned = self.state.learned
        if not force and time.monotonic() - self._last_checkpoint < self.settings.checkpoint_s:
            return
        await self._write_held(0.0 if force else HELD_MAX_S)
        if force and self._outbox is None and self.state.dirty_plans:
            # a brain stopping (or done recovering) leaves no plan record held back (`_plans_due`):
            # everything they count is in the history already
            plans = [self.state.plans[p] for p in sorted(self.state.dirty_plans) if p in self.state.plans]
            self.state.dirty_plans.clear()
            await self._write_records([], plans)
        seq = self._checkpoint_seq()
        offline = dict(self.state.offline_since)
        same = (
            seq <= self.checkpoint_seq and learned.fed == self.learned_fed and offline == self.offline_written
        )
        if same and not force:
            return
        kv = await self.bus.brain_kv()
        cp = Checkpoint(seq=seq, at=time.time(), brain=self.agent_id, learned=learned, offline_since=offline)
        await kv.put(CHECKPOINT_KEY, encode_record(cp))
        self.checkpoint_seq = seq
        self.learned_fed = learned.fed
        self.offline_written = offline
        self._last_checkpoint = time.monotonic()

    async def _snapshot(self) -> None:
        """Write the snapshot of every record (`mesh.snapshot`): first everything held back, so
        that KV and the snapshot both stand at `last_seq`, then the pages changed since the
        last one. A snapshot that fails is logged and left for the next commit: the records in
        KV and the history stay whole without it."""
        began = time.monotonic()
        try:
            await self._checkpoint(force=True)
            if self._checkpoint_seq() != self.last_seq:
                return  # (a held record failed to be written: the next commit tries again)
            kv = await self.bus.brain_kv()
            built = self.snapshots.build(
                self.state, self.last_seq, time.time(), self.agent_id, self.bus.nc.max_payload // 2
            )
            await write_snapshot(self.bus, kv, built)
        except Exception as exc:  # whatever it was, the step it follows is committed
            log.warning("could not write the snapshot (%r); trying again after the next commit", exc)
            return
        self.snapshots.written(built)
        log.info(
            "wrote a snapshot at %d: %d tasks, %d of them in %d changed values, in %.3fs",
            built.head.seq,
            built.head.tasks,
            built.encoded,
            len(built.puts),
            time.monotonic() - began,
        )

    @staticmethod
    def _log_event(ev: Msg) -> None:
        tag = type_of(ev)
        plan_id = getattr(ev, "plan_id", "")
        task_id = getattr(ev, "task_id", "")
        match ev:
            case TaskWaiting():
                return
            case TaskSucceeded():
                detail = f" in {ev.duration_s:.3f}s"
            case TaskFailed() | TaskRetrying():
                detail = f" ({ev.reason}) {ev.error[:120]!r}"
            case TaskEscalated():
                detail = f" ({ev.why}) as {ev.rid}"
            case TaskReviewing():
                detail = f" attempt {ev.attempt} on {ev.model} (else {ev.then})"
            case TaskClimbed():
                detail = f" from {ev.from_model} to {ev.model}, tier {ev.tier} ({ev.why})"
            case TaskReviewed():
                said = ev.answer or ev.error[:120]
                detail = f" {ev.verdict or 'no verdict'}: {said!r}"
            case TaskRedelivered():
                detail = f" to {ev.worker} (delivery {ev.delivery})"
            case PlanFinished():
                detail = f" {ev.status}"
            case PlanRejected():
                detail = f" {ev.error}"
            case ResourceRequested():
                detail = f"{ev.action} {ev.model} on {ev.gpu}: {ev.reason}"
            case AgentOffline():
                detail = f" {ev.agent_id} (running {len(ev.running)})"
            case _:
                detail = ""
        log.info("%s %s%s%s", tag, plan_id, f".{task_id}" if task_id else "", detail)


def _without_counts(plan: PlanRecord) -> bytes:
    """A plan record less what changes with every step of it (its counts, by class too, and
    when they changed)."""
    return encode_record(msgspec.structs.replace(plan, counts={}, by_class={}, updated_at=0.0))
