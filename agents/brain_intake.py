"""The brain's inputs: a batch of submissions, commands, worker reports and escalation answers
(or a clock tick), each decided by `mesh.machine.apply`, committed together, then acknowledged.

An input that cannot be taken (undecodable, filed under the wrong subject, not one the brain
takes, refused by the machine) becomes a dead letter; a big plan's body is read from the
object store first.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time

import msgspec
import nats.js.errors
from nats.aio.msg import Msg as NatsMsg

from agents.brain_commit import BrainCommit
from mesh import validate
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.natsclient import MeshClient
from mesh.bus.read import read_bucket
from mesh.bus.route import decode_checked
from mesh.events import (
    CancelPlan,
    EscalationAnswered,
    EscalationFailed,
    EscalationWaiting,
    GpuState,
    PlanSpec,
    RetryTasks,
    RunFinished,
    RunStarted,
    SubmitPlan,
    type_of,
)
from mesh.host.memory import give_back
from mesh.machine import Policy, Step, Sweep, Tick, apply

log = logging.getLogger("mesh.brain")
# a step of at least this many events (a big plan accepted) hands its freed memory back
BIG_STEP = 10_000

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


class BrainIntake(BrainCommit):
    """Deciding and committing the brain's inputs (its fields are set by `Brain.__init__`)."""

    policy: Policy
    _last_sweep: float

    async def handle(self, batch: list[NatsMsg] | None) -> None:
        """Decide a batch of inputs one by one, then commit what they decided together.

        Inputs are acknowledged only after the commit, so a crash anywhere redelivers them.
        """
        if self._outbox is not None:
            await self._commit(self._outbox)
        now = time.time()
        if batch is None:
            if time.monotonic() - self._last_sweep >= self.settings.sweep_s:
                try:
                    live = frozenset((await read_bucket(await self.bus.agents_kv())).keys())
                except TRANSIENT as exc:
                    # no reading is no evidence: agents are judged gone only on a whole read
                    log.warning("reading the agents bucket failed (%r); sweeping later", exc)
                else:
                    await self._commit(apply(self.state, Sweep(live), now, self.policy))
                    self._last_sweep = time.monotonic()
                    return
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
            match msg:
                case SubmitPlan():
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
            match msg:
                case EscalationWaiting():
                    log.info(
                        "%s.%s waits on escalation (try %d, again in %.0fs): %s",
                        msg.plan_id,
                        msg.task_id,
                        msg.tries,
                        max(0.0, msg.retry_at - now),
                        msg.reason[:200],
                    )
                case _ if step.ignored:
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
        big = len(combined.events) >= BIG_STEP
        await self._commit(combined)
        if big:
            give_back()  # a big plan's acceptance: its events and their encodings are gone
        for raw, why in letters:
            await self.bus.dead_letter(self.agent_id, raw, why)
        for raw, why in bad:
            await self.bus.dead_letter(self.agent_id, raw, why)
            await raw.term()
        nc = self.bus.nc
        if isinstance(nc, MeshClient):
            await nc.ack_many(good)
        else:
            for raw in good:
                await raw.ack()

    async def _fetch_plan(self, msg: SubmitPlan) -> SubmitPlan:
        """A big plan's tasks come from the object store; a missing or broken one is rejected.
        Seen again, a plan already accepted whole needs nothing fetched (the machine ignores
        it); one whose acceptance a crash cut short (some `plan.tasks` parts never published)
        needs its tasks, for the machine to publish the missing parts."""
        known = self.state.plans.get(msg.plan_id)
        if known is not None and len(self.state.plan_keys.get(msg.plan_id, ())) >= known.total:
            return msg
        store = await self.bus.objects()
        try:
            # into a buffer, chunk by chunk: without `writeinto` the client joins the chunks with
            # `bytes +=`, which copies the whole so far for each chunk (a million-task plan's
            # 2,000 chunks: hundreds of GB copied, minutes of CPU)
            body = io.BytesIO()
            await store.get(msg.object, writeinto=body)
            plan = msgspec.json.decode(body.getbuffer(), type=PlanSpec)
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
