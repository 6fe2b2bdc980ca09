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

This module is the agent and its loop; its parts are beside it: `brain_intake` (deciding a
batch of inputs), `brain_commit` (publishing what was decided: history, KV, work items),
`brain_recovery` (loading and catching up on start) and `brain_lease`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time

import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

from agents.brain_intake import BrainIntake
from agents.brain_lease import LEASE_KEY, BrainLease, LeaseLost, LeaseStalled
from agents.brain_recovery import BrainRecovery
from mesh import claims
from mesh.bus.history import collector_paused
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.pull import Fetcher, pull_subscribe, reset_consumer
from mesh.bus.read import fetch_some
from mesh.bus.workstream import WorkPurger, make_limits, work_retention
from mesh.errors import MeshError
from mesh.machine import Policy, Reconcile, State, Step, apply, next_due
from mesh.models import MODEL_KINDS
from mesh.placement import PlacementPolicy
from mesh.records import AgentRecord, Checkpoint
from mesh.settings import Settings
from mesh.snapshot import Snapshots

log = logging.getLogger("mesh.brain")

FETCH_BATCH = 256
BATCH_MAX = 512


EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: try again


class Brain(BrainIntake, BrainRecovery, BrainLease):
    role = "brain"

    def __init__(self, settings: Settings, agent_id: str | None = None) -> None:
        super().__init__(settings, agent_id)
        self.policy = Policy(
            release_window=settings.release_window,
            continue_depth=settings.continue_depth,
            pack_size=settings.pack_size,
            pack_below_s=settings.pack_below_s,
            retry_base_s=settings.retry_base_s,
            retry_max_s=settings.retry_max_s,
            aging_s=settings.aging_s,
            lost_after_s=settings.lost_after_s,
            requeue_after_s=settings.ack_wait_s,
            archive_after_s=settings.archive_after_days * 86400.0,
            default_models={k: settings.default_model(k) for k in MODEL_KINDS},
            escalate_after=settings.escalate_after,
            review_model=settings.review_model,
            placement=PlacementPolicy.of(
                settings, {name: (m.kind, m.vram_mb) for name, m in settings.model_registry().items()}
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
        self.snapshots = Snapshots()
        self.start_checkpoint: Checkpoint | None = None
        self.snapshot_seq = 0
        self.learned_fed = 0
        self._last_checkpoint = 0.0
        self._last_sweep = 0.0
        # (when, task keys, plan ids) of recent KV writes: a server killed right after
        # acknowledging them may not have stored them yet, so they are written again on reconnect
        self.recent_writes: collections.deque[tuple[float, list[str], list[str]]] = collections.deque()
        # stream sequence and subject of each released task's work item, while it may be queued
        self.work_seq: dict[str, tuple[int, str]] = {}
        self.work_packs: dict[int, list[int | bool]] = {}
        self.offline_written: dict[str, float] = {}
        self.done_items: collections.deque[tuple[int, str, float]] = collections.deque()
        self.purger: WorkPurger | None = None
        self.plan_written: dict[str, tuple[float, bytes]] = {}
        # released tasks whose `ready` record is held back (BrainCommit._hold_ready)
        self.held_ready: dict[str, tuple[int, float]] = {}

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
        await self._own_work_stream()
        if not await self._recover():
            return
        await self._take_back_inputs()
        js = self.bus.js
        # (through sinks: nats-py's fetch cost a fifth of the brain's CPU a task, mesh.bus.pull)
        self.cmd_sub = await pull_subscribe(
            js, durable=self.names.brain_cmd_consumer, stream=self.names.cmd_stream
        )
        self.runs_sub = await pull_subscribe(
            js, durable=self.names.brain_runs_consumer, stream=self.names.events_stream
        )
        self.esc_sub = await pull_subscribe(
            js, durable=self.names.brain_esc_consumer, stream=self.names.events_stream
        )

    async def _take_back_inputs(self) -> None:
        """What a brain before this one fetched and never acknowledged (it was killed, or froze
        and lost the lease) is delivered again now, not `brain_ack_wait_s` after it was fetched:
        each input consumer is reset to its ack floor. Nothing else acts on these consumers
        while this brain holds the lease, and it has fetched nothing yet. An input delivered
        again after its step was committed is decided again as after any crash between a
        commit and its acknowledgement (the machine takes a plan, a report or a command it has
        seen as it was)."""
        n = self.names
        inputs = (
            (n.cmd_stream, n.brain_cmd_consumer),
            (n.events_stream, n.brain_runs_consumer),
            (n.events_stream, n.brain_esc_consumer),
        )
        # at once: a request the server leaves unanswered costs its timeout once, not thrice
        whys = await asyncio.gather(*(reset_consumer(self.bus.js, s, d) for s, d in inputs))
        for (_, durable), why in zip(inputs, whys, strict=True):
            if why:
                log.info(
                    "could not reset %s (%s): inputs an earlier brain held come back after %.0fs",
                    durable,
                    why,
                    self.settings.brain_ack_wait_s,
                )

    async def _own_work_stream(self) -> None:
        """Make an old install's work-queue work stream a limits one before anything is
        queued (its items come back from the ready tasks: `republish_ready`), and purge what
        the workers acknowledged from then on; a stream that stays a work queue removes each
        item on its acknowledgement."""
        stream = self.names.work_stream
        await make_limits(self.bus.js, self.settings)
        if await work_retention(self.bus.js, stream) == api.RetentionPolicy.LIMITS.value:
            self.purger = WorkPurger(self.bus.js, stream)

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
                with collector_paused():  # a million records read and folded: no cycles among them
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

    # run ---------------------------------------------------------------------------
    async def run(self) -> None:
        if not self.leading or self.stop_requested.is_set():
            return
        self.spawn(self._fetch(self.cmd_sub, "commands"), "fetch-commands")
        self.spawn(self._fetch(self.runs_sub, "reports"), "fetch-reports")
        self.spawn(self._fetch(self.esc_sub, "escalation answers"), "fetch-escalations")
        if self.purger is not None:
            self.spawn(self._purge_loop(), "purge-work")
        await self._guarded(None)  # release whatever was waiting when the brain last stopped
        while not self.stop_requested.is_set():
            timeout = self.settings.tick_s
            due = next_due(self.state)
            if due is not None:
                timeout = min(timeout, max(0.0, due - time.time()))
            if self.state.dirty_plans:
                timeout = min(timeout, self.settings.plan_record_s)  # a plan record held back
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
                if self.snapshots.dirty and len(self.state.tasks) >= self.settings.snapshot_min_tasks:
                    await self._snapshot()  # the next brain starts from it
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

    async def _fetch(self, sub: Fetcher, what: str) -> None:
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
