"""The brain's recovery on start: load the task and plan records (its snapshot, or KV), fold the
transitions published after them, write what changed after the checkpoint.

The records come from the brain's snapshot (`mesh.snapshot`) where one is usable, else from KV,
where damaged values are rebuilt from the history.

Then publish again what a crash may have cut short: the work items of tasks left `ready` (the
work stream drops duplicates) and the escalation requests missing from the escalation stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import nats.js.errors
from nats.js import api
from nats.js.kv import KeyValue

from agents.brain_commit import CHECKPOINT_KEY, BrainCommit
from mesh.bus.history import TRANSITIONS, history_batches, replay
from mesh.bus.read import iter_bucket, iter_revisions, read_stream, value_of
from mesh.bus.route import decode_checked
from mesh.bus.snapshot import forget as forget_snapshot
from mesh.bus.snapshot import read_head, read_pages
from mesh.events import EscalationRequest, GpuState, PlanAccepted, WorkItem, decode
from mesh.host.memory import give_back
from mesh.learned import Learned
from mesh.machine import Policy, State, escalation_request, evolve, work_item
from mesh.machine_state import compact_record
from mesh.packing import members
from mesh.placement import observe
from mesh.records import (
    ESCALATING,
    INFLIGHT_STATES,
    READY,
    UNREADABLE,
    Checkpoint,
    Damaged,
    PlanRecord,
    TaskRecord,
    damaged,
    decode_checkpoint,
    decode_plan,
    decode_task,
)
from mesh.snapshot import PAGE_PREFIX, SnapshotError, SnapshotHead, Snapshots

log = logging.getLogger("mesh.brain")


class BrainRecovery(BrainCommit):
    """Rebuilding the brain's state after a restart (its fields are set by `Brain.__init__`)."""

    policy: Policy
    # the checkpoint found at the start, and the sequence of the snapshot loaded (0: none)
    start_checkpoint: Checkpoint | None
    snapshot_seq: int

    async def load_state(self) -> None:
        """Load the task and plan records: from the snapshot where it is usable
        (`_load_snapshot`), else from KV. A KV value that does not decode is quarantined (a
        dead letter with its key and first bytes) and rebuilt from the history of its plan; the
        rebuilt record is written over it by `catch_up`."""
        began = time.monotonic()
        kv = await self.bus.brain_kv()
        self.start_checkpoint = await self._read_checkpoint(kv)
        self.snapshot_seq = 0
        head, why = await self._usable_snapshot(kv, self.start_checkpoint)
        if head is not None and await self._load_snapshot(kv, head):
            source = f"the snapshot at {head.seq}"
        else:
            if why:
                log.info("reading the records from KV: the snapshot %s", why)
            await self._load_kv()
            source = "KV"
            # nothing in a snapshot this brain did not load is taken for current: every page is
            # written again (into the slots the old head does not name)
            self.snapshots = Snapshots(head=head)
            self.snapshots.touch_all(self.state)
        # the GPUs as their workers last wrote them (their later changes arrive as events)
        async for key, value in iter_bucket(await self.bus.gpus_kv()):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                gpu = decode(value)
                # only a GPU's own state under its own key (each worker may write its GPU's key)
                if isinstance(gpu, GpuState) and gpu.gpu == key:
                    observe(self.state.gpus, gpu)
        give_back()  # what the read held for a moment, among the records that stay
        log.info(
            "loaded %d tasks and %d plans from %s in %.3fs",
            len(self.state.tasks),
            len(self.state.plans),
            source,
            time.monotonic() - began,
        )

    async def _read_checkpoint(self, kv: KeyValue) -> Checkpoint | None:
        value = await value_of(kv, CHECKPOINT_KEY)
        return None if value is None else decode_checkpoint(value)

    async def _usable_snapshot(
        self, kv: KeyValue, checkpoint: Checkpoint | None
    ) -> tuple[SnapshotHead | None, str]:
        """The snapshot's head, and why it is not to be loaded ('' : it is). One that cannot be
        read is removed with its pages. It is loaded only where the history after it is whole
        and KV is at least as far (a checkpoint at or after it), and where the transitions to
        fold after it are not more than its records and `snapshot_writes` (beyond that, reading
        KV is the quicker way)."""
        try:
            head = await read_head(kv)
        except SnapshotError as exc:
            log.warning("the brain's snapshot cannot be read (%s): removing it", exc)
            keys = [key async for key, _ in iter_bucket(kv, f"{PAGE_PREFIX}.>")]
            await forget_snapshot(self.bus, kv, keys)
            return None, ""
        if head is None:
            return None, ""
        if checkpoint is None or checkpoint.seq < head.seq:
            return head, f"at {head.seq} is ahead of the checkpoint"
        info = await self.bus.js.stream_info(self.names.events_stream)
        first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
        if head.seq > last:
            return head, f"at {head.seq} is ahead of the history (which ends at {last})"
        if first > head.seq + 1:
            return head, f"at {head.seq} is older than the history's first event ({first})"
        if checkpoint.seq - head.seq > head.tasks + self.settings.snapshot_writes:
            return head, f"at {head.seq} is too far behind the checkpoint at {checkpoint.seq}"
        return head, ""

    async def _load_snapshot(self, kv: KeyValue, head: SnapshotHead) -> bool:
        """The state from the snapshot; False (and nothing changed) when a page is missing or
        damaged."""
        floats: dict[float, float] = {}
        try:
            tasks, plans = await read_pages(kv, head, lambda r: compact_record(r, floats))
        except SnapshotError as exc:
            log.warning("the brain's snapshot at %d cannot be used: %s", head.seq, exc)
            return False
        self.state = State.load(tasks, plans, aging_s=self.settings.aging_s, compacted=True)
        self.held_ready.clear()
        self.snapshot_seq = head.seq
        self.snapshots = Snapshots(head=head)
        del tasks, plans
        return True

    async def _load_kv(self) -> None:
        names = self.names
        tasks: list[TaskRecord] = []
        plans: list[PlanRecord] = []
        bad: list[tuple[Damaged, bytes]] = []
        # decoded and made compact as read: the raw values are never all held at once, and what
        # a record drops is freed while the next ones are decoded (`compact_record`)
        floats: dict[float, float] = {}
        async for key, value, revision in iter_revisions(await self.bus.tasks_kv()):
            try:
                tasks.append(compact_record(decode_task(value), floats))
            except UNREADABLE as exc:
                bad.append((damaged(names.tasks_bucket, key, value, exc, revision), value))
        async for key, value, revision in iter_revisions(await self.bus.plans_kv()):
            try:
                plans.append(decode_plan(value))
            except UNREADABLE as exc:
                bad.append((damaged(names.plans_bucket, key, value, exc, revision), value))
        rebuilt_tasks, rebuilt_plans = await self._rebuild(bad) if bad else ([], [])
        tasks.extend(rebuilt_tasks)
        plans.extend(rebuilt_plans)
        self.state = State.load(tasks, plans, aging_s=self.settings.aging_s, compacted=True)
        # held-back records of the state this replaces: the catch-up folds their releases again
        self.held_ready.clear()
        # written over the damaged values by the catch-up that follows
        self.state.dirty_tasks.update(r.key for r in rebuilt_tasks)
        self.state.dirty_plans.update(p.plan_id for p in rebuilt_plans)
        del tasks, plans, bad

    async def _rebuild(self, bad: list[tuple[Damaged, bytes]]) -> tuple[list[TaskRecord], list[PlanRecord]]:
        """The records of damaged values, from the history of their plans (what `mesh replay`
        folds). Each damaged value becomes a dead letter, saying whether it could be rebuilt;
        one the history no longer holds (aged out, or its plan archived) is left out."""
        tasks: list[TaskRecord] = []
        plans: list[PlanRecord] = []
        by_plan: dict[str, list[tuple[Damaged, bytes]]] = {}
        for entry in bad:
            by_plan.setdefault(entry[0].plan_id, []).append(entry)
        for plan_id, entries in sorted(by_plan.items()):
            try:
                found = (await replay(self.bus, plan_id=plan_id)).state
            except ValueError:  # a key that names no plan id: nothing in the history is its
                found = State(aging_s=self.settings.aging_s)
            for d, value in entries:
                what = "task" if d.bucket == self.names.tasks_bucket else "plan"
                record: TaskRecord | PlanRecord | None = (
                    found.tasks.get(d.key) if what == "task" else found.plans.get(d.key)
                )
                if record is None:
                    outcome = "the history no longer holds it (aged out, or its plan archived): left out"
                elif isinstance(record, TaskRecord):
                    tasks.append(record)
                    outcome = f"rebuilt from the history ({record.status}, attempt {record.attempt})"
                else:
                    plans.append(record)
                    outcome = f"rebuilt from the history ({record.status})"
                reason = f"unreadable {what} record {d.key} in {d.bucket}: {d.error}; {outcome}"
                log.warning("%s", reason)
                await self.bus.dead_record(self.agent_id, d.bucket, d.key, value, d.revision, reason)
        return tasks, plans

    async def catch_up(self) -> None:
        """Fold the transitions published after the records loaded, and write what they change
        after the checkpoint. Loaded from a snapshot older than the checkpoint, the transitions
        up to the checkpoint are folded first: KV holds what they did, so nothing of them is
        written (the snapshot's pages they changed are marked for the next one), and the
        learned figures they fed are the checkpoint's already (they feed a scratch copy)."""
        checkpoint = self.start_checkpoint
        if checkpoint is not None:
            self.checkpoint_seq = checkpoint.seq
            # the learned figures as of the checkpoint: the transitions after it add the rest
            if checkpoint.learned is not None and not self.settings.learn_forget:
                self.state.learned = checkpoint.learned
            # the workers missed as of the checkpoint: their wait goes on, it does not start
            # again (the first sweep drops those back, or holding nothing)
            self.state.offline_since = dict(checkpoint.offline_since)
            self.offline_written = dict(checkpoint.offline_since)
        else:
            # no brain has finished a step yet: the first one may have been cut short with its
            # events stored and only part of its records written, so fold the whole history
            self.checkpoint_seq = 0
        self.state.learned.tune(self.settings.learn_min_samples, self.settings.learn_window)
        learned = self.state.learned
        start = self.snapshot_seq or self.checkpoint_seq
        settled = start >= self.checkpoint_seq
        if not settled:
            self.state.learned = Learned()
        self.last_seq = start
        folded = 0
        transitions = self.names.transition_filters()
        batches = history_batches(self.bus, transitions, start_seq=start + 1)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for ev in batch:
                    if not settled and ev.seq > self.checkpoint_seq:
                        self._settle(learned)
                        settled = True
                    msg = ev.msg
                    if isinstance(msg, TRANSITIONS):
                        if settled and isinstance(msg, PlanAccepted) and msg.plan_id in self.state.plans:
                            # accepted after the checkpoint: a crash may have cut the writing of
                            # its records short (the plan's written, some of its tasks not), and
                            # everything that happened to it is in the history from here on:
                            # build it from that
                            self.state.forget_plan(msg.plan_id)
                        evolve(self.state, msg)
                        folded += 1
                self.last_seq = max(self.last_seq, batch[-1].seq)
        if not settled:
            self._settle(learned)
        self.last_seq = max(self.last_seq, self.checkpoint_seq)
        tasks, plans = self.state.take_dirty()
        self.snapshots.touch(tasks, bool(plans))
        await self._write_records(tasks, plans)
        if folded:
            log.info(
                "caught up %d transitions after %s %d; repaired %d task and %d plan records",
                folded,
                "snapshot" if self.snapshot_seq else "checkpoint",
                start,
                len(tasks),
                len(plans),
            )
        await self._checkpoint(force=True)

    def _settle(self, learned: Learned) -> None:
        """Folded from the snapshot up to the checkpoint: KV holds all of it already."""
        tasks, plans = self.state.take_dirty()
        self.snapshots.touch(tasks, bool(plans))
        self.state.take_removed()
        self.state.learned = learned

    async def republish_ready(self) -> None:
        """Queue again the work item of each ready task the work stream holds none for (a crash
        may have come between its release and its item). A task packed into another's item
        (`mesh.packing`) has no item under its own id: what the stream holds is read first, so
        such a task is not queued a second time beside its pack. An item published again
        anyway is dropped by the server by its id."""
        queued = await self._queued_attempts()
        # (what the stream holds is what there is: a start done again after a server error
        # counts it afresh)
        self.work_seq.clear()
        self.work_packs.clear()
        every: list[TaskRecord] = []
        ready: list[TaskRecord] = []
        for rec in self.state.tasks.values():
            if rec.status not in INFLIGHT_STATES:
                continue
            if rec.status == READY:
                every.append(rec)
            found = queued.get((rec.key, rec.attempt))
            if found is None:
                if rec.status == READY:
                    ready.append(rec)
                continue
            # known as if this brain had queued it: kept from the purge until its task ends,
            # deleted when none of its tasks wants it (`_forget_work`)
            seq, subject, packed = found
            self.work_seq[rec.key] = (seq, subject)
            if packed:
                entry = self.work_packs.setdefault(seq, [0, True])
                entry[0] = int(entry[0]) + 1
        await asyncio.gather(*(self.bus.emit(work_item(self.state, r, self.policy.claim_key)) for r in ready))
        log.info(
            "%d ready tasks: %d with a work item queued, %d queued again (the server drops duplicates)",
            len(every),
            len(every) - len(ready),
            len(ready),
        )

    async def _queued_attempts(self) -> dict[tuple[str, int], tuple[int, str, bool]]:
        """(task key, attempt) -> (stream sequence, subject, whether packed) of every task a
        work item still in the work stream carries (one acknowledged and not yet purged
        included: its task ran, and its report is for the brain to decide)."""
        out: dict[tuple[str, int], tuple[int, str, bool]] = {}
        names = self.names
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        async for raw in read_stream(
            self.bus.js, names.work_stream, names.work_all, config, idle_timeout_s=2.0
        ):
            msg, _ = decode_checked(raw, names)
            if isinstance(msg, WorkItem):
                where = (raw.metadata.sequence.stream, raw.subject, bool(msg.more))
                out.update(((f"{m.plan_id}.{m.task_id}", m.attempt), where) for m in members(msg))
        return out

    async def republish_escalations(self) -> None:
        """Publish again the request of every task waiting on Claude whose request is not in the
        escalation stream (a crash came between its `task.escalated` and the request)."""
        names = self.names
        missing: list[EscalationRequest] = []
        for rec in self.state.tasks.values():
            if rec.status != ESCALATING or rec.followups:
                continue
            try:
                raw = await self.bus.js.get_last_msg(
                    names.esc_stream, names.escalation(rec.plan_id, rec.task_id)
                )
                last = decode(raw.data or b"")
                if isinstance(last, EscalationRequest) and last.rid == rec.rid:
                    continue
            except nats.js.errors.NotFoundError:
                pass
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
            missing.append(escalation_request(self.state, rec))
        if missing:
            await self._publish_escalations(missing)
            log.info("published %d escalation requests a crash had cut short", len(missing))
