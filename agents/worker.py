"""A worker: claims work items of its classes and runs them, `slots` at a time.

For each item: check the task record (skip work the brain no longer wants),
report `run.started`, run the body while telling JetStream it is still in
progress (so it is never redelivered to a second worker while this one lives),
report `run.finished`, then acknowledge. A worker that dies stops sending
progress, and the item is redelivered once `ack_wait` lapses.

On stop it takes no new work, lets running tasks finish for up to
`drain_timeout_s` while still registered, then kills what is left and hands it
back (`nak`) so another worker runs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext

from mesh.agent import Agent
from mesh.bus import decode_or_none
from mesh.events import RunFinished, RunStarted, TaskCancelled, WorkItem, type_of
from mesh.executors import EXECUTORS, RunContext, RunResult
from mesh.reaper import Reaper
from mesh.records import INFLIGHT_STATES, RUNNING, decode_task
from mesh.settings import Settings

log = logging.getLogger("mesh.worker")

TRANSIENT = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError)
CANCELLED_MEMORY = 100_000
FRESH_S = 2.0


class Running:
    def __init__(self, item: WorkItem, raw: NatsMsg) -> None:
        self.item = item
        self.raw = raw
        self.ctx = RunContext()
        self.handed_back = False


class Worker(Agent):
    role = "worker"

    def __init__(
        self,
        settings: Settings,
        agent_id: str | None = None,
        classes: tuple[str, ...] = ("cpu",),
        slots: int | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(settings, agent_id)
        self.classes = list(classes)
        self.slots = slots or settings.slots
        self.drain_timeout_s = drain_timeout_s
        self.running: dict[str, Running] = {}
        self._slot_tasks: set[asyncio.Task[Any]] = set()
        self._freed = asyncio.Event()
        self.subs: list[JetStreamContext.PullSubscription] = []
        # tasks recently cancelled (insertion-ordered, bounded): their queued items are not run
        self.cancelled: dict[str, None] = {}
        # task key -> attempt, of what finished here recently (bounded): never run twice here
        self.finished: dict[str, int] = {}

    def running_keys(self) -> list[str]:
        return sorted(self.running)

    async def start(self) -> None:
        self.reaper = Reaper()
        await super().start()
        for cls in self.classes:
            self.subs.append(
                await self.bus.js.pull_subscribe_bind(
                    durable=self.names.workers_consumer(cls), stream=self.names.work_stream
                )
            )
        self._cancel_sub = await self.bus.nc.subscribe(self.names.task_cancelled_all, cb=self._on_cancel)

    async def _on_cancel(self, raw: NatsMsg) -> None:
        msg, _ = decode_or_none(raw)
        if not isinstance(msg, TaskCancelled):
            return  # the brain dead-letters bad messages; a core subscriber only listens
        key = f"{msg.plan_id}.{msg.task_id}"
        self.cancelled[key] = None
        while len(self.cancelled) > CANCELLED_MEMORY:
            del self.cancelled[next(iter(self.cancelled))]
        run = self.running.get(key)
        if run is not None:
            log.info("cancelling %s.%s", msg.plan_id, msg.task_id)
            run.ctx.cancel.set()

    # the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        turn = 0
        while not self.stop_requested.is_set():
            free = self.slots - len(self._slot_tasks)
            if free <= 0:
                self._freed.clear()
                await self._wait_any(self._freed.wait())
                continue
            sub = self.subs[turn % len(self.subs)]
            turn += 1
            try:
                msgs = await sub.fetch(free, timeout=self.settings.fetch_timeout_s)
            except nats.errors.TimeoutError:
                continue
            except TRANSIENT as exc:
                log.warning("fetching work failed (%r); retrying", exc)
                await self._wait_any(asyncio.sleep(0.5))
                continue
            for raw in msgs:
                task = asyncio.get_running_loop().create_task(self._take(raw))
                self._slot_tasks.add(task)
                task.add_done_callback(self._slot_done)
        await self._drain()

    async def _wait_any(self, aw: Any) -> None:
        waiter = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()

    def _slot_done(self, task: asyncio.Task[Any]) -> None:
        self._slot_tasks.discard(task)
        self._freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("a slot failed: %r", task.exception(), exc_info=task.exception())

    async def stop(self, reason: str = "stopped") -> None:
        await super().stop(reason)
        reaper = getattr(self, "reaper", None)
        if reaper is not None:
            reaper.close()

    async def _drain(self) -> None:
        if not self._slot_tasks:
            return
        log.info(
            "stopping: waiting up to %.0fs for %d running task(s)", self.drain_timeout_s, len(self.running)
        )
        _, pending = await asyncio.wait(set(self._slot_tasks), timeout=self.drain_timeout_s)
        if pending:
            for run in self.running.values():
                run.handed_back = True
                run.ctx.cancel.set()
            await asyncio.wait(pending)

    # one item --------------------------------------------------------------------------
    async def _take(self, raw: NatsMsg) -> None:
        msg, why = decode_or_none(raw)
        if not isinstance(msg, WorkItem):
            reason = why or f"a worker does not take {type_of(msg)} messages"  # type: ignore[arg-type]
            await self.bus.dead_letter(self.agent_id, raw, reason)
            await raw.term()
            return
        key = f"{msg.plan_id}.{msg.task_id}"
        if self.finished.get(key) == msg.attempt:
            # ran here and reported already; delivered again because a server restart lost
            # the consumer's record of the first delivery or its acknowledgement
            log.info("%s attempt %d already ran here; acknowledging the repeat", key, msg.attempt)
            await raw.ack()
            return
        current = self.running.get(key)
        if current is not None and current.item.attempt == msg.attempt:
            # the same attempt delivered again while this worker runs it (a server restart can
            # lose the consumer's record of the first delivery): keep running it once, and
            # acknowledge the newer delivery when it is done
            log.info(
                "%s attempt %d delivered again while running here; not starting it twice", key, msg.attempt
            )
            current.raw = raw
            return
        meta = raw.metadata
        delivery = meta.num_delivered or 1
        queued_s = time.time() - meta.timestamp.timestamp() if meta.timestamp else FRESH_S + 1
        # An item taken fresh off the queue is current: the brain deletes the queued item of a
        # task it cancels, resets or gives up. One redelivered, one that sat in the queue (the
        # brain may have restarted since), or one of a task seen cancelled is checked first.
        suspect = delivery > 1 or queued_s > FRESH_S or key in self.cancelled
        if suspect:
            verdict = await self._still_wanted(msg, key, delivery)
            if verdict != "run":
                # skip: the task no longer wants this attempt. held: a live worker runs it, so
                # no second copy beside it; should that worker die, the brain gives the
                # attempt up as lost and releases a new one
                await raw.ack()
                return
        if delivery > self.settings.max_deliveries:
            await self._dead_letter(msg, raw, delivery)
            return
        run = Running(msg, raw)
        run.ctx.tail_bytes = self.settings.output_tail_bytes
        run.ctx.kill_grace_s = self.settings.kill_grace_s
        run.ctx.shell = self.settings.shell
        run.ctx.on_start = self.reaper.watch
        run.ctx.on_end = self.reaper.forget
        self.running[key] = run
        try:
            await self._execute(run, key)
        finally:
            self.running.pop(key, None)

    async def _dead_letter(self, item: WorkItem, raw: NatsMsg, delivery: int) -> None:
        """Every worker that took this item died with it: stop the cycle, record it, fail the task."""
        why = (
            f"delivered {delivery} times (more than max_deliveries={self.settings.max_deliveries}); "
            "every worker that took it stopped heartbeating"
        )
        log.error("dead-lettering %s.%s attempt %d: %s", item.plan_id, item.task_id, item.attempt, why)
        await self.bus.dead_letter(self.agent_id, raw, why)
        await self._emit(
            RunFinished(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=self.agent_id,
                at=time.time(),
                ok=False,
                duration_s=0.0,
                error=why,
                dead_letter=True,
            )
        )
        await raw.term()

    async def _emit(self, ev: RunStarted | RunFinished) -> None:
        """Publish a report, riding out a server restart: a finished task is not run twice for it."""
        delay = 0.2
        while True:
            try:
                await self.bus.emit(ev)
                return
            except TRANSIENT as exc:
                if self.stop_requested.is_set() and delay > 5:
                    raise
                log.warning("publishing %s failed (%s); retrying in %.1fs", type_of(ev), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _still_wanted(self, item: WorkItem, key: str, delivery: int) -> str:
        """'run', 'skip' (the task no longer wants this attempt) or 'held' (another live worker
        runs this very attempt).

        A redelivery (delivery > 1) of a running attempt means JetStream stopped hearing from
        its worker: this one takes over. A first delivery of an attempt already running
        elsewhere happens when a server restart lost the consumer's record of the first one:
        if that worker is still registered, it still runs it."""
        kv = await self.bus.tasks_kv()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            log.warning("skipping %s: no such task", key)
            return "skip"
        rec = decode_task(entry.value or b"")
        if rec.status not in INFLIGHT_STATES or rec.attempt != item.attempt:
            log.info(
                "skipping %s attempt %d: task is %s at attempt %d", key, item.attempt, rec.status, rec.attempt
            )
            return "skip"
        if delivery == 1 and rec.status == RUNNING and rec.worker and rec.worker != self.agent_id:
            agents = await self.bus.agents_kv()
            try:
                await agents.get(rec.worker)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return "run"  # its worker is gone: this is the redelivery that takes over
            log.info(
                "%s attempt %d is running on live worker %s; not running a second copy",
                key,
                item.attempt,
                rec.worker,
            )
            return "wait"
        return "run"

    async def _execute(self, run: Running, key: str) -> None:
        item, raw = run.item, run.raw
        delivery = raw.metadata.num_delivered or 1
        await self._emit(
            RunStarted(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=self.agent_id,
                at=time.time(),
                delivery=delivery,
            )
        )
        log.info("running %s attempt %d (delivery %d)", key, item.attempt, delivery)
        beat = asyncio.get_running_loop().create_task(self._heartbeat(run))
        try:
            executor = EXECUTORS.get(item.kind)
            if executor is None:
                result = RunResult(
                    ok=False, duration_s=0.0, error=f"this worker cannot run {item.kind!r} bodies"
                )
            else:
                result = await executor(item, run.ctx)
        finally:
            beat.cancel()
        if run.handed_back:
            log.info("handing %s back to the queue", key)
            await run.raw.nak()
            return
        await self._emit(
            RunFinished(
                plan_id=item.plan_id,
                task_id=item.task_id,
                attempt=item.attempt,
                worker=self.agent_id,
                at=time.time(),
                ok=result.ok,
                duration_s=result.duration_s,
                rc=result.rc,
                timed_out=result.timed_out,
                cancelled=result.cancelled,
                error=result.error,
                stdout_tail="" if item.sensitive else result.stdout_tail,
                stderr_tail="" if item.sensitive else result.stderr_tail,
                stdout_bytes=result.stdout_bytes,
                stderr_bytes=result.stderr_bytes,
            )
        )
        self.finished[key] = item.attempt
        while len(self.finished) > CANCELLED_MEMORY:
            del self.finished[next(iter(self.finished))]
        try:
            await run.raw.ack()
        except TRANSIENT as exc:
            # the report is out; a redelivery finds the task final and is skipped
            log.warning("could not acknowledge %s (%s)", key, exc)
        log.info(
            "%s %s in %.3fs%s",
            key,
            "succeeded" if result.ok else "failed",
            result.duration_s,
            "" if result.ok else f": {result.error}",
        )

    async def _heartbeat(self, run: Running) -> None:
        interval = self.settings.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            try:
                await run.raw.in_progress()
            except TRANSIENT as exc:
                log.warning("progress heartbeat failed: %s", exc)
