"""The brain: turns submissions and worker reports into task transitions.

Wiring around `mesh.machine.apply`. For each input, in order:

1. decide (pure): transition events and work items;
2. publish the events to the history, in order, each acknowledged by the server;
3. write the changed task and plan records to KV;
4. put the released work items on the work stream;
5. acknowledge the input.

A crash anywhere in 2-5 leaves the input unacknowledged: it is delivered again,
decided again against the records in KV, and the re-published facts are
de-duplicated by their `Nats-Msg-Id`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext

from mesh.agent import Agent
from mesh.bus import decode_or_none, read_bucket
from mesh.events import CancelPlan, RunFinished, RunStarted, SubmitPlan, type_of
from mesh.machine import Policy, State, Step, Tick, apply, next_due
from mesh.records import decode_plan, decode_task, encode_record
from mesh.settings import Settings

log = logging.getLogger("mesh.brain")

FETCH_BATCH = 256
TRANSIENT = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError)


class Brain(Agent):
    role = "brain"

    def __init__(self, settings: Settings, agent_id: str | None = None) -> None:
        super().__init__(settings, agent_id)
        self.policy = Policy(
            release_window=settings.release_window,
            retry_base_s=settings.retry_base_s,
            retry_max_s=settings.retry_max_s,
            aging_s=settings.aging_s,
        )
        self.state = State(aging_s=settings.aging_s)
        self.inbox: asyncio.Queue[NatsMsg] = asyncio.Queue(maxsize=4 * FETCH_BATCH)
        # a decided step whose publishing was interrupted; finished before anything else
        self._outbox: Step | None = None

    async def start(self) -> None:
        await super().start()
        await self.load_state()
        js = self.bus.js
        self.cmd_sub = await js.pull_subscribe_bind(
            durable=self.names.brain_cmd_consumer, stream=self.names.cmd_stream
        )
        self.runs_sub = await js.pull_subscribe_bind(
            durable=self.names.brain_runs_consumer, stream=self.names.events_stream
        )

    async def load_state(self) -> None:
        began = time.monotonic()
        tasks_raw = await read_bucket(await self.bus.tasks_kv())
        plans_raw = await read_bucket(await self.bus.plans_kv())
        tasks = [decode_task(v) for v in tasks_raw.values()]
        plans = [decode_plan(v) for v in plans_raw.values()]
        self.state = State.load(tasks, plans, aging_s=self.settings.aging_s)
        log.info(
            "loaded %d tasks and %d plans from KV in %.3fs",
            len(tasks),
            len(plans),
            time.monotonic() - began,
        )

    async def run(self) -> None:
        self.spawn(self._fetch(self.cmd_sub, "commands"), "fetch-commands")
        self.spawn(self._fetch(self.runs_sub, "reports"), "fetch-reports")
        # release whatever was waiting when the brain last stopped
        await self._commit(apply(self.state, Tick(), time.time(), self.policy))
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
            await self._guarded(raw)
            # take everything already fetched before checking the clock again
            while not self.inbox.empty():
                await self._guarded(self.inbox.get_nowait())

    async def _fetch(self, sub: JetStreamContext.PullSubscription, what: str) -> None:
        while not self.stop_requested.is_set():
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except TRANSIENT as exc:
                log.warning("fetching %s failed (%s); retrying", what, exc)
                await asyncio.sleep(0.5)
                continue
            for m in msgs:
                await self.inbox.put(m)

    async def _guarded(self, raw: NatsMsg | None) -> None:
        """Handle one input; on a server error retry it until it goes through or we stop."""
        delay = 0.1
        while True:
            try:
                await self.handle(raw)
                return
            except TRANSIENT as exc:
                if self.stop_requested.is_set():
                    log.warning("stopping with an input unfinished (%s); it will be delivered again", exc)
                    return
                log.warning("server error while handling input (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def handle(self, raw: NatsMsg | None) -> None:
        if self._outbox is not None:
            await self._commit(self._outbox)
        now = time.time()
        if raw is None:
            await self._commit(apply(self.state, Tick(), now, self.policy))
            return
        msg, why = decode_or_none(raw)
        if msg is None:
            await self.bus.dead_letter(self.agent_id, raw, why)
            await raw.term()
            return
        if not isinstance(msg, SubmitPlan | CancelPlan | RunStarted | RunFinished):
            await self.bus.dead_letter(self.agent_id, raw, f"the brain does not take {type_of(msg)} messages")
            await raw.term()
            return
        step = apply(self.state, msg, now, self.policy)
        if step.ignored:
            log.debug("ignored %s: %s", type_of(msg), step.ignored)
        await self._commit(step)
        await raw.ack()

    async def _commit(self, step: Step) -> None:
        """Publish a decided step. Interrupted, it stays in the outbox and is finished first."""
        self._outbox = step
        bus = self.bus
        done = 0
        try:
            for ev in step.events:
                await bus.emit(ev)
                self._log_event(ev)
                done += 1
        finally:
            del step.events[:done]
        tasks, plans = self.state.take_dirty()
        if tasks or plans:
            tasks_kv = await bus.tasks_kv()
            plans_kv = await bus.plans_kv()
            puts = [tasks_kv.put(r.key, encode_record(r)) for r in tasks]
            puts += [plans_kv.put(p.plan_id, encode_record(p)) for p in plans]
            try:
                await asyncio.gather(*puts)
            except BaseException:
                # records not written stay dirty so the retry writes them
                self.state.dirty_tasks.update(r.key for r in tasks)
                self.state.dirty_plans.update(p.plan_id for p in plans)
                raise
        if step.work:
            await asyncio.gather(*(bus.emit(w) for w in step.work))
            step.work.clear()
        self._outbox = None

    @staticmethod
    def _log_event(ev: msgspec.Struct) -> None:
        tag = type_of(ev)  # type: ignore[arg-type]
        plan_id = getattr(ev, "plan_id", "")
        task_id = getattr(ev, "task_id", "")
        if tag == "task.waiting":
            return
        detail = ""
        if tag in ("task.succeeded",):
            detail = f" in {getattr(ev, 'duration_s', 0.0):.3f}s"
        elif tag in ("task.failed", "task.retrying"):
            detail = f" ({getattr(ev, 'reason', '')}) {getattr(ev, 'error', '')[:120]!r}"
        elif tag == "plan.finished":
            detail = f" {getattr(ev, 'status', '')}"
        elif tag == "plan.rejected":
            detail = f" {getattr(ev, 'error', '')}"
        log.info("%s %s%s%s", tag, plan_id, f".{task_id}" if task_id else "", detail)
