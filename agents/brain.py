"""The brain: turns submissions and worker reports into task transitions.

Wiring around `mesh.machine.apply`. For each input, in order:

1. decide (pure): transition events and work items;
2. publish the events to the history, in order, each acknowledged by the server;
3. write the changed task and plan records to KV;
4. put the released work items on the work stream;
5. acknowledge the input.

A crash anywhere in 2-5 leaves the input unacknowledged: it is delivered again.
On start the brain loads KV, then folds every transition published after its
last checkpoint (the stream sequence up to which KV is known to be written), so
it knows about events a crash kept out of KV; the redelivered input is then
recognised as already handled. Tasks left `ready` get their work item
published again (the work stream drops it if it was already there).

Only the holder of the lease acts. A second brain waits as a standby and takes
over when the lease expires; a brain that cannot renew its lease in time stops
acting at once and exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import time

import msgspec
import nats.errors
import nats.js.errors
import psutil
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from agents.base import Agent
from mesh import claims, validate
from mesh.bus.history import TRANSITIONS, read_history, replay
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.outputs import OutputError, task_output
from mesh.bus.read import fetch_some, iter_bucket, iter_revisions, read_bucket
from mesh.bus.route import decode_checked
from mesh.errors import MeshError
from mesh.events import (
    AgentOffline,
    CancelPlan,
    EscalationAnswered,
    EscalationFailed,
    EscalationRequest,
    EscalationWaiting,
    GpuState,
    Msg,
    PlanAccepted,
    PlanFinished,
    PlanRejected,
    PlanSpec,
    ResourceRequested,
    RetryTasks,
    RunFinished,
    RunStarted,
    SubmitPlan,
    TaskEscalated,
    TaskFailed,
    TaskRedelivered,
    TaskRetrying,
    TaskReviewed,
    TaskReviewing,
    TaskSucceeded,
    TaskWaiting,
    WorkItem,
    decode,
    type_of,
)
from mesh.machine import (
    Policy,
    Reconcile,
    State,
    Step,
    Sweep,
    Tick,
    apply,
    escalation_request,
    evolve,
    next_due,
    work_item,
)
from mesh.models import MODEL_KINDS
from mesh.placement import PlacementPolicy, observe
from mesh.records import (
    CANCELLED,
    ESCALATING,
    INFLIGHT_STATES,
    PENDING,
    READY,
    UNREADABLE,
    AgentRecord,
    Checkpoint,
    Damaged,
    Lease,
    PlanRecord,
    TaskRecord,
    damaged,
    decode_checkpoint,
    decode_lease,
    decode_plan,
    decode_task,
    encode_record,
)
from mesh.settings import Settings
from mesh.status import FailReason

log = logging.getLogger("mesh.brain")

FETCH_BATCH = 256
BATCH_MAX = 512
RECENT_WRITES_S = 30.0
LEASE_KEY = "lease"
CHECKPOINT_KEY = "checkpoint"
BRAIN_INPUTS = (
    SubmitPlan
    | CancelPlan
    | RetryTasks
    | RunStarted
    | RunFinished
    | GpuState
    | EscalationAnswered
    | EscalationFailed
    | EscalationWaiting
)
# a note for the operator (a model no GPU can hold, say) is logged at most this often
NOTE_EVERY_S = 600.0


EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: try again


class LeaseLost(Exception):
    """Another brain may be acting: this one must stop at once."""


class LeaseStalled(Exception):
    """The lease ran out because the server's store is full: no brain can write it, this one
    included. This one acts on nothing until it renews the lease at its own revision (which
    proves no other brain took it meanwhile)."""


class Brain(Agent):
    role = "brain"

    def __init__(self, settings: Settings, agent_id: str | None = None) -> None:
        super().__init__(settings, agent_id)
        self.policy = Policy(
            release_window=settings.release_window,
            retry_base_s=settings.retry_base_s,
            retry_max_s=settings.retry_max_s,
            aging_s=settings.aging_s,
            lost_after_s=settings.lost_after_s,
            archive_after_s=settings.archive_after_days * 86400.0,
            default_models={k: settings.default_model(k) for k in MODEL_KINDS},
            escalate_after=settings.escalate_after,
            review_model=settings.review_model,
            placement=PlacementPolicy(
                models={name: (m.kind, m.vram_mb) for name, m in settings.model_registry().items()},
                keep_alive_s=settings.keep_alive_s,
                min_residency_s=settings.min_residency_s,
                load_timeout_s=settings.load_timeout_s,
                yield_after_s=settings.yield_after_s,
            ),
        )
        self._noted: dict[str, float] = {}
        self.state = State(aging_s=settings.aging_s)
        self.inbox: asyncio.Queue[NatsMsg] = asyncio.Queue(maxsize=4 * FETCH_BATCH)
        # a decided step whose publishing was interrupted; finished before anything else
        self._outbox: Step | None = None
        self.lease_revision = 0
        self.lease_valid_until = 0.0  # monotonic
        self.lost_lease = False
        # the lease ran out while the store was full: not acting until renewed
        self._stalled = False
        self.leading = False
        self.last_seq = 0
        self.checkpoint_seq = 0
        self._last_checkpoint = 0.0
        self._last_sweep = 0.0
        # (when, task keys, plan ids) of recent KV writes: a server killed right after
        # acknowledging them may not have stored them yet, so they are written again on reconnect
        self.recent_writes: collections.deque[tuple[float, list[str], list[str]]] = collections.deque()
        # stream sequence of each released task's work item, while it may be queued
        self.work_seq: dict[str, int] = {}

    def record(self) -> AgentRecord:
        rec = super().record()
        if not self.leading and rec.state == "running":
            rec.state = "standby"
        return rec

    # start -----------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        await self.acquire_lease()
        if self.stop_requested.is_set():
            return
        self.leading = True
        await self.register()
        self.spawn(self._renew_loop(), "lease")
        # parts of a big plan's acceptance must each fit in one message
        self.policy = dataclasses.replace(
            self.policy,
            part_bytes=min(self.policy.part_bytes, self.bus.nc.max_payload // 4),
            claim_key=await self._claim_key(),
        )
        if not await self._recover():
            return
        js = self.bus.js
        self.cmd_sub = await js.pull_subscribe_bind(
            durable=self.names.brain_cmd_consumer, stream=self.names.cmd_stream
        )
        self.runs_sub = await js.pull_subscribe_bind(
            durable=self.names.brain_runs_consumer, stream=self.names.events_stream
        )
        self.esc_sub = await js.pull_subscribe_bind(
            durable=self.names.brain_esc_consumer, stream=self.names.events_stream
        )

    async def _claim_key(self) -> bytes:
        """The secret work items' claims are made with: made by the first brain, kept in the
        brain's bucket (which no worker may read), the same for every brain after it."""
        kv = await self.bus.brain_kv()
        try:
            await kv.create(claims.KEY_NAME, secrets.token_bytes(claims.KEY_BYTES))
            log.info("made a new claim key")
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # another brain made it first, or an earlier one did
        entry = await kv.get(claims.KEY_NAME)
        key = entry.value or b""
        if len(key) != claims.KEY_BYTES:
            raise MeshError(
                f"the claim key in bucket {self.names.brain_bucket} is {len(key)} bytes, not "
                f"{claims.KEY_BYTES}: delete it (`nats kv del {self.names.brain_bucket} {claims.KEY_NAME}`) "
                "and restart the brain; reports on tasks running now are then refused and those "
                "attempts are retried"
            )
        return key

    async def _recover(self) -> bool:
        """Load the state, catch up with the history, finish what a crash cut short. Server
        errors (a full store, a restart) are waited out and the whole of it done again; False
        when the brain must not act (its lease is lost, or it was asked to stop)."""
        delay = 0.2
        while not self.stop_requested.is_set():
            try:
                await self._check_lease()
                self._outbox = None
                await self.load_state()
                await self.catch_up()
                # a crash may have cut a step short: decide again what follows from the state alone
                await self._commit(apply(self.state, Reconcile(), time.time(), self.policy))
                await self.republish_ready()
                await self.republish_escalations()
                return True
            except LeaseLost as exc:
                log.error("%s; stopping without acting further", exc)
                return False
            except LeaseStalled:
                self._say_stalled()
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("server error while loading the state (%r); again in %.1fs", exc, delay)
            await self._sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    async def load_state(self) -> None:
        """Load the task and plan records. A value that does not decode is quarantined (a dead
        letter with its key and first bytes) and rebuilt from the history of its plan; the
        rebuilt record is written over it by `catch_up`."""
        began = time.monotonic()
        names = self.names
        tasks: list[TaskRecord] = []
        plans: list[PlanRecord] = []
        bad: list[tuple[Damaged, bytes]] = []
        # decoded as read: the raw values are never all held at once
        async for key, value, revision in iter_revisions(await self.bus.tasks_kv()):
            try:
                tasks.append(decode_task(value))
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
        self.state = State.load(tasks, plans, aging_s=self.settings.aging_s)
        # written over the damaged values by the catch-up that follows
        self.state.dirty_tasks.update(r.key for r in rebuilt_tasks)
        self.state.dirty_plans.update(p.plan_id for p in rebuilt_plans)
        # the GPUs as their workers last wrote them (their later changes arrive as events)
        async for key, value in iter_bucket(await self.bus.gpus_kv()):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                gpu = decode(value)
                # only a GPU's own state under its own key (each worker may write its GPU's key)
                if isinstance(gpu, GpuState) and gpu.gpu == key:
                    observe(self.state.gpus, gpu)
        log.info(
            "loaded %d tasks and %d plans from KV in %.3fs",
            len(self.state.tasks),
            len(self.state.plans),
            time.monotonic() - began,
        )

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
        """Fold the transitions published after the checkpoint, and write what they change."""
        kv = await self.bus.brain_kv()
        try:
            entry = await kv.get(CHECKPOINT_KEY)
            self.checkpoint_seq = decode_checkpoint(entry.value or b"").seq
        except nats.js.errors.KeyNotFoundError:
            # no brain has finished a step yet: the first one may have been cut short with its
            # events stored and only part of its records written, so fold the whole history
            self.checkpoint_seq = 0
        self.last_seq = self.checkpoint_seq
        folded = 0
        transitions = self.names.transition_filters()
        async for ev in read_history(self.bus, transitions, start_seq=self.checkpoint_seq + 1):
            self.last_seq = max(self.last_seq, ev.seq)
            if isinstance(ev.msg, TRANSITIONS):
                if isinstance(ev.msg, PlanAccepted) and ev.msg.plan_id in self.state.plans:
                    # accepted after the checkpoint: a crash may have cut the writing of its
                    # records short (the plan's written, some of its tasks not), and everything
                    # that happened to it is in the history from here on: build it from that
                    self.state.forget_plan(ev.msg.plan_id)
                evolve(self.state, ev.msg)
                folded += 1
        tasks, plans = self.state.take_dirty()
        await self._write_records(tasks, plans)
        if folded:
            log.info(
                "caught up %d transitions after checkpoint %d; repaired %d task and %d plan records",
                folded,
                self.checkpoint_seq,
                len(tasks),
                len(plans),
            )
        await self._checkpoint(force=True)

    async def republish_ready(self) -> None:
        ready = [r for r in self.state.tasks.values() if r.status == READY]
        await asyncio.gather(*(self.bus.emit(work_item(self.state, r, self.policy.claim_key)) for r in ready))
        if ready:
            log.info("re-published %d ready work items (duplicates are dropped by the server)", len(ready))

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

    # lease -----------------------------------------------------------------------
    async def acquire_lease(self) -> None:
        kv = await self.bus.brain_kv()
        waiting_logged = False
        while not self.stop_requested.is_set():
            now = time.time()
            lease = self._new_lease(now)
            began = time.monotonic()
            try:
                try:
                    entry = await kv.get(LEASE_KEY)
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    self.lease_revision = await kv.create(LEASE_KEY, encode_record(lease))
                else:
                    held = decode_lease(entry.value or b"")
                    if held.expires_at > now and held.holder != self.agent_id and not self._holder_dead(held):
                        if not waiting_logged:
                            log.info("standby: %s holds the brain lease; waiting to take over", held.holder)
                            waiting_logged = True
                        await self._sleep(min(1.0, self.settings.lease_s / 3))
                        continue
                    self.lease_revision = await kv.update(
                        LEASE_KEY, encode_record(lease), last=entry.revision
                    )
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                await self._sleep(0.2)  # another brain took it first
                continue
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("cannot reach the lease (%s); retrying", exc)
                await self._sleep(1.0)
                continue
            self.lease_valid_until = began + self.settings.lease_s - 1.0
            log.info("took the brain lease (revision %d)", self.lease_revision)
            return

    def _new_lease(self, now: float) -> Lease:
        return Lease(
            holder=self.agent_id,
            expires_at=now + self.settings.lease_s,
            acquired_at=now,
            host=self.host,
            pid=os.getpid(),
        )

    def _holder_dead(self, held: Lease) -> bool:
        """A holder on this host whose process is gone (a brain restarted after a crash) need not
        be waited out; one elsewhere can only be judged by its lease expiring."""
        if held.host != self.host or held.pid <= 0 or held.pid == os.getpid():
            return False
        try:
            proc = psutil.Process(held.pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE and "brain" in " ".join(proc.cmdline())
        except psutil.Error:
            alive = False
        if not alive:
            log.info(
                "the lease holder %s (pid %d on this host) is gone; taking over now", held.holder, held.pid
            )
        return not alive

    async def _renew_loop(self) -> None:
        kv = await self.bus.brain_kv()
        every = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(every)
            now = time.time()
            began = time.monotonic()
            lease = self._new_lease(now)
            try:
                self.lease_revision = await kv.update(
                    LEASE_KEY, encode_record(lease), last=self.lease_revision
                )
                self.lease_valid_until = began + self.settings.lease_s - 1.0
                if self._stalled:
                    self._stalled = False
                    log.warning("renewed the brain lease (no other brain took it); acting again")
            except nats.js.errors.KeyWrongLastSequenceError:
                log.error("lost the brain lease to another brain; stopping")
                self.lost_lease = True
                self.stop_requested.set()
                return
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("could not renew the brain lease (%s)", exc)

    async def _check_lease(self) -> None:
        expired = time.monotonic() > self.lease_valid_until
        # (a renewal that gets no answer takes longer than the lease: ask the store's disk)
        if not self.lost_lease and expired and (self._stalled or await self.bus.store.probe()):
            # nobody can write the lease: wait for this brain's renewal, which succeeds only if
            # no other brain took it meanwhile (the store may take other writes again first)
            raise LeaseStalled("the brain lease ran out while the server's store is full")
        if self.lost_lease or time.monotonic() > self.lease_valid_until:
            self.lost_lease = True
            self.stop_requested.set()
            raise LeaseLost("the brain lease could not be renewed in time")

    def _say_stalled(self) -> None:
        if not self._stalled:
            self._stalled = True
            log.warning(
                "the brain lease ran out while the server's store is full: acting on nothing until "
                "it is renewed (no other brain can take it meanwhile)"
            )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_requested.wait(), timeout=seconds)

    # run ---------------------------------------------------------------------------
    async def run(self) -> None:
        if not self.leading or self.stop_requested.is_set():
            return
        self.spawn(self._fetch(self.cmd_sub, "commands"), "fetch-commands")
        self.spawn(self._fetch(self.runs_sub, "reports"), "fetch-reports")
        self.spawn(self._fetch(self.esc_sub, "escalation answers"), "fetch-escalations")
        await self._guarded(None)  # release whatever was waiting when the brain last stopped
        while not self.stop_requested.is_set():
            timeout = self.settings.tick_s
            due = next_due(self.state)
            if due is not None:
                timeout = min(timeout, max(0.0, due - time.time()))
            try:
                raw = await asyncio.wait_for(self.inbox.get(), timeout=timeout)
            except TimeoutError:
                await self._guarded(None)
                continue
            # decide everything already fetched, then publish it all in one commit
            batch = [raw]
            while len(batch) < BATCH_MAX and not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            await self._guarded(batch)

    async def stop(self, reason: str = "stopped") -> None:
        if self.leading and not self.lost_lease and self._bus is not None:
            try:
                await self._checkpoint(force=True)
                kv = await self.bus.brain_kv()
                await kv.delete(LEASE_KEY, last=self.lease_revision)
                log.info("released the brain lease")
            except TRANSIENT as exc:
                log.warning("could not release the brain lease (%s); it expires by itself", exc)
        if self.lost_lease:
            # not a clean stop: exit non-zero so that systemd (Restart=on-failure) or `mesh up`
            # starts a brain again, which takes the lease back or stands by
            self.exit_code = EXIT_LEASE_LOST
        await super().stop("lease lost" if self.lost_lease else reason)

    async def _fetch(self, sub: JetStreamContext.PullSubscription, what: str) -> None:
        while not self.stop_requested.is_set():
            for m in await fetch_some(sub, FETCH_BATCH, what, store=self.bus.store):
                await self.inbox.put(m)

    async def _guarded(self, raw: list[NatsMsg] | None) -> None:
        """Handle a batch of inputs (or a clock tick); on a server error retry until it goes
        through or we stop."""
        delay = 0.1
        while True:
            try:
                await self._check_lease()
                await self.handle(raw)
                return
            except LeaseLost as exc:
                log.error("%s; stopping without acting further", exc)
                return
            except LeaseStalled:
                self._say_stalled()
            except TRANSIENT as exc:
                if self.stop_requested.is_set():
                    log.warning("stopping with an input unfinished (%s); it will be delivered again", exc)
                    return
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("server error while handling input (%s); retrying in %.1fs", exc, delay)
            if self.stop_requested.is_set():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def handle(self, batch: list[NatsMsg] | None) -> None:
        """Decide a batch of inputs one by one, then commit what they decided together.

        Inputs are acknowledged only after the commit, so a crash anywhere redelivers them.
        """
        if self._outbox is not None:
            await self._commit(self._outbox)
        now = time.time()
        if batch is None:
            if time.monotonic() - self._last_sweep >= self.settings.sweep_s:
                live = frozenset((await read_bucket(await self.bus.agents_kv())).keys())
                await self._commit(apply(self.state, Sweep(live), now, self.policy))
                self._last_sweep = time.monotonic()
            else:
                await self._commit(apply(self.state, Tick(), now, self.policy))
            return
        beat = asyncio.get_running_loop().create_task(self._keep_alive(batch))
        try:
            await self._handle_batch(batch, now)
        finally:
            beat.cancel()

    async def _keep_alive(self, batch: list[NatsMsg]) -> None:
        """While a long batch is decided and committed, keep its inputs from being redelivered."""
        every = self.settings.brain_ack_wait_s / 3
        while True:
            await asyncio.sleep(every)
            for raw in batch:
                with contextlib.suppress(*TRANSIENT):
                    await raw.in_progress()

    async def _handle_batch(self, batch: list[NatsMsg], now: float) -> None:
        combined = Step()
        good: list[NatsMsg] = []
        bad: list[tuple[NatsMsg, str]] = []
        letters: list[tuple[NatsMsg, str]] = []
        for raw in batch:
            msg, why = decode_checked(raw, self.names)
            if msg is None:
                bad.append((raw, why))
                continue
            if not isinstance(msg, BRAIN_INPUTS):
                bad.append((raw, f"the brain does not take {type_of(msg)} messages"))
                continue
            if isinstance(msg, SubmitPlan):
                bad_id = validate.plan_id_problem(msg.plan_id)
                if bad_id:
                    # nothing can be published about such a plan, not even its rejection
                    bad.append((raw, f"invalid submission: {bad_id}"))
                    continue
                if msg.object:
                    msg = await self._fetch_plan(msg)
            step = apply(self.state, msg, now, self.policy)
            if step.invalid:
                # rejected by the machine's checks (`mesh.validate`): a dead letter too
                letters.append((raw, f"invalid submission: {step.invalid}"))
            if isinstance(msg, EscalationWaiting):
                log.info(
                    "%s.%s waits on escalation (try %d, again in %.0fs): %s",
                    msg.plan_id,
                    msg.task_id,
                    msg.tries,
                    max(0.0, msg.retry_at - now),
                    msg.reason[:200],
                )
            elif step.ignored:
                log.debug("ignored %s: %s", type_of(msg), step.ignored)
            combined.events.extend(step.events)
            combined.work.extend(step.work)
            combined.escalations.extend(step.escalations)
            combined.resources.extend(step.resources)
            combined.notes.extend(step.notes)
            if step.refused:
                # nothing was decided on it (a step may still hold what the clock released)
                log.warning("refused %s: %s", type_of(msg), step.refused)
                bad.append((raw, step.refused))
            else:
                good.append(raw)
        await self._commit(combined)
        for raw, why in letters:
            await self.bus.dead_letter(self.agent_id, raw, why)
        for raw, why in bad:
            await self.bus.dead_letter(self.agent_id, raw, why)
            await raw.term()
        for raw in good:
            await raw.ack()

    async def _fetch_plan(self, msg: SubmitPlan) -> SubmitPlan:
        """A big plan's tasks come from the object store; a missing or broken one is rejected."""
        if msg.plan_id in self.state.plans:
            return msg  # already accepted: nothing to fetch, the machine ignores it
        store = await self.bus.objects()
        try:
            result = await store.get(msg.object)
            plan = msgspec.json.decode(result.data or b"", type=PlanSpec)
        except nats.js.errors.ObjectNotFoundError:
            error = f"the plan's body {msg.object!r} is not in the object store"
            return msgspec.structs.replace(
                msg, plan=msgspec.structs.replace(msg.plan, tasks=()), object=error
            )
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = f"the plan's body {msg.object!r} is unreadable: {exc}"
            return msgspec.structs.replace(
                msg, plan=msgspec.structs.replace(msg.plan, tasks=()), object=error
            )
        return msgspec.structs.replace(msg, plan=plan, object="")

    async def _commit(self, step: Step) -> None:
        """Publish a decided step: events, then records and work items together, each phase
        pipelined and fully acknowledged before the next. Neither KV nor the work queue ever
        runs ahead of the history: a crash after the events leaves records the next brain
        repairs from them. A record and its task's work item are written in the same round
        trip, so a worker may take an item before the record says `ready`: workers read the
        record only of an item that is not fresh, and take a record behind the item for one
        not yet written (`Worker._still_wanted`).

        Interrupted, the step stays in the outbox and is published again, whole, before
        anything else; the server drops what it already stored by `Nats-Msg-Id`.
        """
        self._outbox = step
        bus = self.bus
        if step.events:
            acks = await bus.emit_many(step.events)
            self.last_seq = max(self.last_seq, max(a.seq for a in acks))
            for ev in step.events:
                self._log_event(ev)
            step.events.clear()
        tasks, plans = self.state.take_dirty()
        try:
            acks = await self._write_records(tasks, plans, then=step.work)
        except BaseException:
            # records not written stay dirty so the retry writes them (the work items again too:
            # the server drops the ones it already stored)
            self.state.dirty_tasks.update(r.key for r in tasks)
            self.state.dirty_plans.update(p.plan_id for p in plans)
            raise
        if step.work:
            for item, ack in zip(step.work, acks, strict=True):
                self.work_seq[f"{item.plan_id}.{item.task_id}"] = ack.seq
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

    async def _forget_work(self, tasks: list[TaskRecord]) -> None:
        """Delete the queued work item of a task that no longer wants it (cancelled, reset or
        given up as lost), so no worker runs it; forget the items of finished tasks."""
        stale = []
        for rec in tasks:
            seq = self.work_seq.get(rec.key)
            if seq is None or rec.status in INFLIGHT_STATES:
                continue
            del self.work_seq[rec.key]
            if rec.status in (CANCELLED, PENDING) or rec.reason == FailReason.LOST:
                stale.append(seq)
        if stale:
            stream = self.names.work_stream
            results = await asyncio.gather(
                *(self.bus.js.delete_msg(stream, seq) for seq in stale), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, nats.js.errors.NotFoundError):
                    log.debug("could not delete a stale work item: %s", result)

    async def _write_records(
        self, tasks: list[TaskRecord], plans: list[PlanRecord], then: list[WorkItem] | None = None
    ) -> list[PubAck]:
        """Write changed records (and remove archived ones); `then`, work items, go out in the
        same pipeline as the last records: their acknowledgements are returned."""
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
        if not tasks and not plans:
            return await self.bus.emit_many(then or [])
        names = self.names
        # encoded as they are sent, a chunk at a time (a huge plan's records all encoded at once
        # were tens of MB the heap kept)
        puts = itertools.chain(
            ((names.tasks_bucket, r.key, encode_record(r)) for r in tasks),
            ((names.plans_bucket, p.plan_id, encode_record(p)) for p in plans),
        )
        acks = await self.bus.kv_put_many(puts, then or ())
        now = time.monotonic()
        self.recent_writes.append((now, [r.key for r in tasks], [p.plan_id for p in plans]))
        while self.recent_writes and self.recent_writes[0][0] < now - RECENT_WRITES_S:
            self.recent_writes.popleft()
        return acks

    async def on_reconnect(self) -> None:
        """A server restarted under us may have lost writes it had acknowledged but not yet
        stored: write the records of the last moments again (the next commit does it)."""
        for _, keys, plan_ids in self.recent_writes:
            self.state.dirty_tasks.update(k for k in keys if k in self.state.tasks)
            self.state.dirty_plans.update(p for p in plan_ids if p in self.state.plans)
        log.info("reconnected: writing %d recent records again", len(self.state.dirty_tasks))

    async def _checkpoint(self, force: bool = False) -> None:
        """Record that KV holds everything up to `last_seq` (called only with nothing unwritten)."""
        if self.last_seq <= self.checkpoint_seq and not force:
            return
        if not force and time.monotonic() - self._last_checkpoint < self.settings.checkpoint_s:
            return
        kv = await self.bus.brain_kv()
        cp = Checkpoint(seq=self.last_seq, at=time.time(), brain=self.agent_id)
        await kv.put(CHECKPOINT_KEY, encode_record(cp))
        self.checkpoint_seq = self.last_seq
        self._last_checkpoint = time.monotonic()

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
