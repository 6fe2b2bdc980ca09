"""One item a worker took, from its delivery to its acknowledgement: check it is still wanted,
run it through its executor while telling JetStream it is alive, report it, acknowledge it.

For each work item: check the task record when the item is suspect (skip work the brain no
longer wants), report `run.started`, run the body while telling JetStream it is still in
progress (so it is never redelivered to a second worker while this one lives), report
`run.finished`, then acknowledge. A worker that dies stops sending progress, and the item is
redelivered once `ack_wait` lapses. Reports go out through the worker's outbox
(`agents/worker_reports.py`): those of runs that end together, in one write. A resource item
on the worker's own queue goes to its models. The decisions and the reports' contents are `mesh.work`'s.

Items a lane fetched together that can share one model call (embed tasks of one model) come
as a batch (`take_batch`): each is checked as if alone, they run as one call of the kind's
batch executor, and each is reported (its own `run.started`, `run.finished`, claim) and
acknowledged alone. A worker killed mid-batch leaves every item unacknowledged: all are
redelivered, and the brain's claims keep a stale report from counting twice.

An item may carry the dependent to run next (`WorkItem.then`): when it succeeds, the worker
starts that one at once in the same slot, with no delivery behind it (`Continued`), and says
so in the report (`run.finished`'s `then`); the brain releases it to this worker from that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, cast

import nats.js.errors
from nats.aio.msg import Msg as NatsMsg

from agents.base import Agent
from agents.worker_artifacts import Artifacts
from agents.worker_files import WorkDirs
from agents.worker_gpu import Gpu
from agents.worker_lanes import Lane
from agents.worker_models import Models
from agents.worker_packs import Part, Shared
from agents.worker_reports import Outbox, Report
from agents.worker_resources import ResourceUse, sample_once, sample_resources
from agents.worker_stream import TextStream
from mesh import work
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.outputs import OutputError, task_output
from mesh.bus.route import decode_checked
from mesh.events import MODEL_BODY_KINDS, FileRef, ResourceItem, RunFinished, RunStarted, WorkItem, type_of
from mesh.host.executors import BATCH_EXECUTORS, EXECUTORS, RunContext
from mesh.host.reaper import Reaper
from mesh.models import ModelError
from mesh.packing import members
from mesh.records import UNREADABLE, decode_task
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")

# the error of a packed task cancelled before its turn came
NOT_STARTED = "cancelled before it started"


class Continued:
    """What a continued item (`WorkItem.then`) stands on in place of a delivery: none, as the
    brain queued nothing. Nothing to acknowledge or keep alive, and nothing to hand back: a
    continued run stopped by its worker is reported (`cancelled`), and the brain queues it."""

    class metadata:  # (as a delivery's): the first
        num_delivered = 1

    async def ack(self) -> None:
        return None

    async def nak(self, delay: float | None = None) -> None:
        return None

    async def in_progress(self) -> None:
        return None


class Running:
    def __init__(self, item: WorkItem, raw: NatsMsg | Continued) -> None:
        self.item = item
        self.raw = raw
        self.ctx = RunContext()
        self.handed_back = False

    @property
    def continued(self) -> bool:
        return isinstance(self.raw, Continued)


class StartReport:
    """A `run.started` held back a moment; `settle` says whether it went out (or is going
    out: then it waits for it, so the start is stored before the end). A timer, not a task,
    until it is due: most short tasks end first, and cancelling a timer costs nothing."""

    def __init__(
        self, send: Callable[[RunStarted], Coroutine[Any, Any, None]], ev: RunStarted | None, after_s: float
    ) -> None:
        self.send = send
        self.ev = ev
        self.after_s = after_s
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        if self.ev is None:
            return  # (a continued run: the report of the run before says it started)
        if self.after_s <= 0:
            await self.send(self.ev)
        else:
            self.timer = asyncio.get_running_loop().call_later(self.after_s, self._due)

    def _due(self) -> None:
        assert self.ev is not None
        self.task = asyncio.get_running_loop().create_task(self.send(self.ev))

    async def settle(self) -> bool:
        if self.ev is None:
            return False
        if self.timer is None:
            return True  # sent at once
        if self.task is None:
            self.timer.cancel()
            return False
        await self.task
        return True


class Items:
    """What one worker runs now, and what it remembers of what it ran and what was cancelled."""

    def __init__(self, agent: Agent, gpu: Gpu, models: Models) -> None:
        self.agent = agent
        self.settings = agent.settings
        self.gpu = gpu
        self.models = models
        self.running: dict[str, Running] = {}
        # tasks recently cancelled (insertion-ordered, bounded): their queued items are not run
        self.cancelled: dict[str, None] = {}
        # task key -> attempt, of what finished here recently (bounded): never run twice here
        self.finished: dict[str, int] = {}
        # items waiting here for the workers to report after a server restart (`_settled`)
        self.settling: set[str] = set()
        # task records found unreadable (each said once)
        self.damaged_seen: set[str] = set()
        self.reaper: Reaper | None = None
        self.workdirs = WorkDirs(self.settings)
        # batches' reports going out (the next batch's model call waits for them)
        self.reporting: set[asyncio.Task[None]] = set()
        self.artifacts = Artifacts(agent)
        # every report goes out through it: those ready together in one write
        self.outbox = Outbox(self._send_reports)
        # the reports of runs that a continued run followed, going out beside it
        self.sending: set[asyncio.Task[None]] = set()

    def cancel(self, plan_id: str, task_id: str) -> None:
        """A task was cancelled: its queued items are not run, its running one is stopped."""
        key = work.item_key(plan_id, task_id)
        work.remember(self.cancelled, key, None)
        run = self.running.get(key)
        if run is not None:
            log.info("cancelling %s.%s", plan_id, task_id)
            run.ctx.cancel.set()

    def hand_back_all(self) -> None:
        """Stop what runs and hand it back to the queue (`nak`) so another worker runs it."""
        for run in self.running.values():
            run.handed_back = True
            run.ctx.cancel.set()

    # one delivery ---------------------------------------------------------------------------
    async def take(self, raw: NatsMsg, lane: Lane, free: Callable[[], None] | None = None) -> None:
        """One delivery of the lane. `free` gives the lane's slot back once a work item's result
        is in: its report and acknowledgement then overlap the lane's next fetch."""
        agent = self.agent
        msg, why = decode_checked(raw, agent.names)
        match msg:
            case ResourceItem() if lane.name == work.OWN:
                try:
                    await self.models.resource(msg)
                finally:
                    await raw.ack()
            case WorkItem():
                await self._work(msg, raw, lane, free)
            case _:
                reason = why or f"a worker does not take {type_of(msg)} messages"  # type: ignore[arg-type]
                await agent.bus.dead_letter(agent.agent_id, raw, reason)
                await raw.term()

    async def take_batch(self, raws: list[NatsMsg], lane: Lane, free: Callable[[], None]) -> None:
        """Items fetched together that can share one model call (`mesh.work.batch_groups`):
        each checked as if alone, then run as one batch, each reported and acknowledged alone.
        `free` gives the lane's slot back once the results are in (reporting needs none)."""

        async def items() -> AsyncIterator[tuple[WorkItem, NatsMsg]]:
            for raw in raws:
                msg, _ = decode_checked(raw, self.agent.names)
                if not isinstance(msg, WorkItem):
                    await self.take(raw, lane)  # (what is not a work item never gets a batch key)
                    continue
                yield msg, raw

        await self._run_admitted(items(), lambda runs: self._execute(runs, free))

    async def _run_admitted(
        self,
        deliveries: AsyncIterator[tuple[WorkItem, NatsMsg]],
        run: Callable[[list[Running]], Awaitable[object]],
    ) -> None:
        """Each item checked as if alone (`_admit`), then those to run handed to `run`
        together; none counts as running here any more once `run` returns or fails."""
        runs: list[Running] = []
        try:
            async for item, raw in deliveries:
                admitted = await self._admit(item, raw)
                if admitted is not None:
                    runs.append(admitted)
            if runs:
                await run(runs)
        finally:
            for admitted in runs:
                self.running.pop(work.item_key(admitted.item.plan_id, admitted.item.task_id), None)

    def batch_key(self, raw: NatsMsg) -> str:
        """The key under which a fetched item may run with others ('' alone: `mesh.work.batch_key`)."""
        msg, _ = decode_checked(raw, self.agent.names)
        return work.batch_key(msg) if isinstance(msg, WorkItem) else ""

    async def _work(
        self, msg: WorkItem, raw: NatsMsg, lane: Lane, free: Callable[[], None] | None = None
    ) -> None:
        """The item, and the dependents it carries, each run as the one before succeeds."""
        if msg.more:
            await self._work_pack(msg, raw, free)
            return
        run = await self._admit(msg, raw)
        while run is not None:
            key = work.item_key(run.item.plan_id, run.item.task_id)
            try:
                run = await self._execute([run], free, lane)
            finally:
                self.running.pop(key, None)

    async def _work_pack(self, msg: WorkItem, raw: NatsMsg, free: Callable[[], None] | None) -> None:
        """A packed item (`mesh.packing`): each of its tasks checked as if alone, then run one
        after another in this slot, each reported as it ends (`_run_pack`). Each answers its
        share of the delivery (`agents.worker_packs`)."""
        packed = members(msg)
        shared = Shared(raw, len(packed), self.settings.ack_wait_s)

        async def parts() -> AsyncIterator[tuple[WorkItem, NatsMsg]]:
            for item in packed:
                yield item, cast(NatsMsg, Part(shared))  # (a part answers as a delivery does)

        await self._run_admitted(parts(), lambda runs: self._run_pack(runs, free))

    async def _run_pack(self, runs: list[Running], free: Callable[[], None] | None) -> None:
        """The tasks of a packed item, one after another, each started, kept alive, timed and
        reported as if alone (one cancelled meanwhile does not start). Each report is queued as
        its run ends and goes out while the next runs (the outbox gathers them: one write for
        those ready together), so a worker killed mid-pack loses the report of no run that
        ended well before; `free` once the last is done, then until each is acknowledged."""
        acks: list[asyncio.Task[None]] = []
        for i, run in enumerate(runs, 1):
            if run.ctx.cancel.is_set():
                start, started_at = StartReport(self.emit, None, 0.0), time.time()
                result = RunResult(ok=False, duration_s=0.0, cancelled=True, error=NOT_STARTED)
            else:
                start, started_at, beat = await self._begin(run, place=f", {i} of a pack of {len(runs)}")
                try:
                    (result,) = await self._results([run])
                finally:
                    beat.cancel()
            said = await self._report_of(run, result, start, started_at)
            if said is None:
                continue  # handed back (the worker is stopping)
            acks.append(self._hand_report(run, *said))
        if free is not None:
            free()
        if acks:
            await asyncio.wait(acks)

    def _continuation(self, run: Running, result: RunResult, lane: Lane | None) -> WorkItem | None:
        """The item this worker goes on with after `run` (`mesh.work.continuation`), if any."""
        stopping = self.agent.stop_requested.is_set() or run.handed_back
        runs = lane is not None and lane.enabled and not lane.closed and not stopping
        then = work.continuation(run.item, result, self.cancelled, runs)
        if then is None:
            return None
        key = work.item_key(then.plan_id, then.task_id)
        if key in self.running or self.finished.get(key, 0) >= then.attempt:
            return None
        return then

    async def _admit(self, msg: WorkItem, raw: NatsMsg) -> Running | None:
        """The item, registered as running here, when it is to run; None when it was
        answered (acknowledged, handed back, dead-lettered) or is already running here."""
        key = work.item_key(msg.plan_id, msg.task_id)
        current = self.running.get(key)
        seen = work.repeat(msg, self.finished.get(key), current.item.attempt if current is not None else None)
        if seen == work.REPEAT_DONE:
            # ran here and reported already; delivered again because a server restart lost
            # the consumer's record of the first delivery or its acknowledgement
            log.info("%s attempt %d already ran here; acknowledging the repeat", key, msg.attempt)
            await raw.ack()
            return None
        if seen == work.REPEAT_RUNNING and current is not None:
            # the same attempt delivered again while this worker runs it (a server restart can
            # lose the consumer's record of the first delivery): keep running it once, and
            # acknowledge the newer delivery when it is done
            log.info(
                "%s attempt %d delivered again while running here; not starting it twice", key, msg.attempt
            )
            current.raw = raw
            return None
        meta = raw.metadata
        delivery = meta.num_delivered or 1
        now = time.time()
        stored_at = meta.timestamp.timestamp() if meta.timestamp else now - work.FRESH_S - 1
        back_at = self.agent.bus.reconnected_at
        if work.suspect(delivery, now - stored_at, key in self.cancelled, stored_at < back_at):
            restart, unsettled = work.after_restart(stored_at, back_at, now, self.settings.ack_wait_s)
            verdict = await self._still_wanted(msg, key, delivery, restart, unsettled)
            if verdict == work.SETTLE:
                verdict = await self._settled(msg, raw, key, delivery, back_at + work.SETTLE_S - now)
            action = work.verdict_action(verdict, delivery, self.settings.max_deliveries)
            if action == work.NAK_LATER:
                await raw.nak(delay=work.LATER_S)
                return None
            if action == work.ACK:
                await raw.ack()
                return None
        why = work.dead_letter_why(delivery, self.settings.max_deliveries)
        if why:
            await self._dead_letter(msg, raw, why)
            return None
        run = Running(msg, raw)
        self._context(run)
        self.running[key] = run
        return run

    def _context(self, run: Running) -> None:
        run.ctx.tail_bytes = self.settings.output_tail_bytes
        run.ctx.kill_grace_s = self.settings.kill_grace_s
        run.ctx.shell = self.settings.shell
        assert self.reaper is not None, "worker not started"
        run.ctx.on_start = self.reaper.watch
        run.ctx.on_end = self.reaper.forget
        run.ctx.env.update(self.reaper.env)

    async def _dead_letter(self, item: WorkItem, raw: NatsMsg, why: str) -> None:
        """Every worker that took this item died with it: stop the cycle, record it, fail the task."""
        log.error("dead-lettering %s.%s attempt %d: %s", item.plan_id, item.task_id, item.attempt, why)
        await self.agent.bus.dead_letter(self.agent.agent_id, raw, why)
        await self.emit(work.dead_letter_report(item, self.agent.agent_id, time.time(), why))
        await raw.term()

    async def emit(self, ev: Report) -> None:
        """Publish a report, riding out a server restart: a finished task is not run twice for
        it. It goes out with the reports ready beside it (`agents.worker_reports.Outbox`)."""
        await self.outbox.put((ev,))

    async def emit_many(self, evs: list[RunFinished]) -> None:
        """`emit` for many reports at once (a batch's), in order."""
        await self.outbox.put(evs)

    async def _send_reports(self, evs: list[Report]) -> None:
        """The outbox's write: one report alone, or many pipelined (`Bus.emit_many`: from
        `ATOMIC_MIN` on one atomic batch), riding out a restart alike: what the server stored
        already it drops when they come again (their ids)."""
        bus = self.agent.bus
        if len(evs) == 1:
            (ev,) = evs
            await self._riding_out(lambda: bus.emit(ev), type_of(ev))
        else:
            await self._riding_out(lambda: bus.emit_many(evs), f"{len(evs)} reports")

    async def _riding_out(self, send: Callable[[], Awaitable[object]], what: str) -> None:
        """`send` until the server takes it, waiting out a restart (0.2 s doubling to 5 s)."""
        delay = 0.2
        while True:
            try:
                await send()
                return
            except TRANSIENT as exc:
                if self.agent.stop_requested.is_set() and delay > 5:
                    raise
                if not self.agent.bus.store.full:  # (the bus said that once)
                    log.warning("publishing %s failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def reports_out(self) -> None:
        """Until the batches that ran here have their reports out (`_report_batch`)."""
        while pending := [t for t in self.reporting if not t.done()]:
            await asyncio.wait(pending)

    async def all_reports_out(self) -> None:
        """Until every report handed in is out, the batches' and the rest: before the bus closes."""
        await self.reports_out()
        while pending := [t for t in self.sending if not t.done()]:
            await asyncio.wait(pending)
        await self.outbox.drained()

    async def _settled(self, item: WorkItem, raw: NatsMsg, key: str, delivery: int, wait_s: float) -> str:
        """The verdict on an item stored before the connection came back, once the workers that
        may have taken it before a server restart have had time to report it (SETTLE). A second
        delivery of it meanwhile is acknowledged: this one decides."""
        if key in self.settling:
            log.info("%s attempt %d delivered again while it settles here", key, item.attempt)
            return work.WAIT
        log.info(
            "%s attempt %d was stored before the connection came back: looking at its record "
            "again in %.1fs, once any worker that took it before a server restart has reported it",
            key,
            item.attempt,
            wait_s,
        )
        self.settling.add(key)
        try:
            # kept from being delivered elsewhere meanwhile, as a running item is
            until = time.monotonic() + wait_s
            while (left := until - time.monotonic()) > 0:
                await asyncio.sleep(min(left, self.settings.heartbeat_s))
                with contextlib.suppress(*TRANSIENT):
                    await raw.in_progress()
            # (this delivery came around the restart: a redelivery is asked about)
            return await self._still_wanted(item, key, delivery, restart=True)
        finally:
            self.settling.discard(key)

    async def _still_wanted(
        self, item: WorkItem, key: str, delivery: int, restart: bool = False, unsettled: bool = False
    ) -> str:
        """The verdict on a suspect item (`mesh.work.still_wanted`), from its task's record and,
        where another worker runs the attempt, that worker's registration."""
        kv = await self.agent.bus.tasks_kv()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            log.warning("no record of %s (delivery %d): not written yet, or long archived", key, delivery)
            return work.LATER
        try:
            rec = decode_task(entry.value or b"")
        except UNREADABLE as exc:
            # the brain released this attempt; a record that cannot be read cannot say
            # otherwise (the brain rebuilds it from the history when it starts)
            if key not in self.damaged_seen:
                self.damaged_seen.add(key)
                log.warning("the record of %s is unreadable (%s); running the item as released", key, exc)
            return work.RUN
        verdict = work.still_wanted(
            item,
            rec,
            delivery,
            self.agent.agent_id,
            restart,
            unsettled,
            now=time.time(),
            ack_wait_s=self.settings.ack_wait_s,
        )
        if verdict == work.SKIP:
            log.info(
                "skipping %s attempt %d: task is %s at attempt %d", key, item.attempt, rec.status, rec.attempt
            )
        if verdict != work.ASK:
            return verdict
        agents = await self.agent.bus.agents_kv()
        try:
            await agents.get(rec.worker)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return work.owner_verdict(registered=False)  # its worker is gone: this one takes over
        log.info(
            "%s attempt %d is running on live worker %s; not running a second copy",
            key,
            item.attempt,
            rec.worker,
        )
        return work.owner_verdict(registered=True)

    # running it -----------------------------------------------------------------------------
    async def _execute(
        self, runs: list[Running], free: Callable[[], None] | None = None, lane: Lane | None = None
    ) -> Running | None:
        """Run one item, or a batch of items sharing one model call, and report each (`free`,
        when given, is called between the two); the run that continues it, when one does: it
        keeps the slot (`free` is then for it), and the report goes out beside it."""
        starts: list[tuple[StartReport, float]] = []
        beats = []
        for run in runs:
            start, started_at, beat = await self._begin(run, len(runs))
            starts.append((start, started_at))
            beats.append(beat)
        usage = ResourceUse()
        device = self.gpu.device
        sampler = (
            asyncio.get_running_loop().create_task(sample_resources(device, self.models.mesh_used_mb, usage))
            if device is not None and device.measured
            else None
        )
        try:
            results = await self._results(runs)
        finally:
            for beat in beats:
                beat.cancel()
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        if sampler is not None and device is not None:
            with contextlib.suppress(Exception):
                # the end of the task, too (and a short task's only)
                await sample_once(device, self.models.mesh_used_mb(), usage)
            if usage.samples:
                for result in results:
                    result.metrics.update(usage.metrics())
        then = self._continuation(runs[0], results[0], lane) if len(runs) == 1 else None
        if free is not None and then is None:
            free()
        if len(runs) > 1:
            reporting = asyncio.get_running_loop().create_task(self._report_batch(runs, results, starts))
            self.reporting.add(reporting)
            reporting.add_done_callback(self.reporting.discard)
            await reporting
            return None
        ((run, result, (start, started_at)),) = zip(runs, results, starts, strict=True)
        if then is None:
            await self._report(run, result, start, started_at)
            return None
        # the report made before the next run starts (its time is the end of this one), sent
        # while it runs
        said = await self._report_of(run, result, start, started_at, then)
        if said is None:  # handed back meanwhile (stopping): the next does not start either
            if free is not None:
                free()
            return None
        # queued now: before any report of the next run (the brain must hear of this first)
        self._hand_report(run, *said)
        # registered only now, once a report says it started (none could be queued before)
        nxt = Running(then, Continued())
        self._context(nxt)
        self.running[work.item_key(then.plan_id, then.task_id)] = nxt
        if self.agent.stop_requested.is_set():
            # the worker began to stop meanwhile: the next is handed back as it starts (reported
            # cancelled, and the brain queues it)
            nxt.handed_back = True
            nxt.ctx.cancel.set()
        return nxt

    async def _begin(
        self, run: Running, batch: int = 1, place: str = ""
    ) -> tuple[StartReport, float, asyncio.Task[None]]:
        """A run begun: its `run.started` under way (held back, `mesh.work.start_report_after`,
        for a run in a model batch of `batch`; none for a continued run: the report of the one
        before says it started), the start logged (`place`: where in its item it stands), and
        the task keeping its delivery alive. Returns the start report, when, and that task."""
        delivery = run.raw.metadata.num_delivered or 1
        started_at = time.time()
        start = StartReport(
            self.emit,
            None if run.continued else work.run_started(run.item, self.agent.agent_id, started_at, delivery),
            work.start_report_after(delivery, self.settings.start_report_after_s, batch),
        )
        await start.begin()
        log.info(
            "running %s attempt %d (delivery %d%s)",
            work.item_key(run.item.plan_id, run.item.task_id),
            run.item.attempt,
            delivery,
            place,
        )
        return start, started_at, asyncio.get_running_loop().create_task(self._heartbeat(run))

    async def _results(self, runs: list[Running]) -> list[RunResult]:
        """Each run's result: through its executor, or the batch's (one call for them all)."""
        kind = runs[0].item.kind
        batch = BATCH_EXECUTORS.get(kind) if len(runs) > 1 else None
        if batch is None:
            out = []
            for run in runs:
                executor = EXECUTORS.get(run.item.kind)
                if executor is None:
                    out.append(
                        RunResult(
                            ok=False, duration_s=0.0, error=f"this worker cannot run {run.item.kind!r} bodies"
                        )
                    )
                    continue
                # where it runs: its plan's directory, or a work directory with its files
                run.item, failed = await self.workdirs.place(self.agent.bus, run.item)
                failed = failed or await self._prepare(run.item, run.ctx)
                stream = None if failed else self._stream(run.item, run.ctx)
                try:
                    out.append(failed or await executor(run.item, run.ctx))
                finally:
                    if stream is not None:
                        await stream.close()  # the text before `run.finished`
            return out
        prepared: list[RunResult | None] = []
        for run in runs:
            # where it runs: its plan's directory, or a work directory with its files
            run.item, failed = await self.workdirs.place(self.agent.bus, run.item)
            prepared.append(failed or await self._prepare(run.item, run.ctx))
        todo = [i for i, failed in enumerate(prepared) if failed is None]
        # the model call waits for the reports of the batch before it: its executor runs in a
        # thread, and Python work here meanwhile (a batch's reports) holds the interpreter's
        # lock between the model's steps, which then wait for it (an encode of 64 texts took
        # 0.27 s with the reports beside it, 0.21 s without). Fetching and checking this batch
        # overlapped them
        await self.reports_out()
        log.info("running a batch of %d %s tasks (model %s)", len(todo), kind, runs[0].item.model)
        began = time.monotonic()
        done = await batch([runs[i].item for i in todo], [runs[i].ctx for i in todo])
        for i, result in zip(todo, done, strict=True):
            prepared[i] = result
        log.info(
            "ran a batch of %d %s tasks (model %s) in %.3fs",
            len(todo),
            kind,
            runs[0].item.model,
            time.monotonic() - began,
        )
        return [r for r in prepared if r is not None]

    async def _report(self, run: Running, result: RunResult, start: StartReport, started_at: float) -> None:
        """Report a run's end (or hand it back), then acknowledge its item."""
        said = await self._report_of(run, result, start, started_at)
        if said is not None:
            await self._send(run, *said)

    async def _report_of(
        self,
        run: Running,
        result: RunResult,
        start: StartReport,
        started_at: float,
        then: WorkItem | None = None,
    ) -> tuple[RunFinished, float] | None:
        """A run's `run.finished` (saying it continued with `then`) and its duration; None when
        it was handed back to the queue instead (a continued run is reported: none holds it)."""
        item = run.item
        await start.settle()
        if run.handed_back and not run.continued:
            log.info("handing %s back to the queue", work.item_key(item.plan_id, item.task_id))
            await run.raw.nak()
            return None
        files, result = await self.artifacts.keep(item, result)
        return await self._finished(run, result, started_at, files, then), result.duration_s

    async def _send(self, run: Running, report: RunFinished, duration_s: float) -> None:
        await self.emit(report)
        await self._acknowledge(run, report, duration_s)

    def _hand_report(self, run: Running, report: RunFinished, duration_s: float) -> asyncio.Task[None]:
        """`report` queued in the outbox now, in order, and its item acknowledged once it is
        stored, in the background (while this slot goes on); the task doing that."""
        stored = self.outbox.hand((report,))
        sending = asyncio.get_running_loop().create_task(self._acknowledged(run, stored, report, duration_s))
        self.sending.add(sending)
        sending.add_done_callback(self.sending.discard)
        return sending

    async def _acknowledged(
        self, run: Running, stored: asyncio.Future[None], report: RunFinished, duration_s: float
    ) -> None:
        """`_send` for a report already queued (`Outbox.hand`): once stored, acknowledged."""
        try:
            await stored
        except Exception as exc:  # (the write's error; the item is redelivered, as for `_send`)
            log.warning("the report of %s.%s failed: %s", report.plan_id, report.task_id, exc)
            return
        await self._acknowledge(run, report, duration_s)

    async def _report_batch(
        self, runs: list[Running], results: list[RunResult], starts: list[tuple[StartReport, float]]
    ) -> None:
        """`_report` for the runs of one batch, together: their files stored at once
        (`Artifacts.keep_many`), their `run.finished` reports handed to the outbox at once
        (one pipelined write, with any other reports queued beside them: from `ATOMIC_MIN` on
        one sync of the server's disk, not one a report), then each item acknowledged. The
        same reports, in the same order (each report before its acknowledgement), as one by one."""
        await asyncio.gather(*(start.settle() for start, _ in starts))
        keep: list[tuple[Running, RunResult, float]] = []
        for run, result, (_, started_at) in zip(runs, results, starts, strict=True):
            if run.handed_back:
                log.info("handing %s back to the queue", work.item_key(run.item.plan_id, run.item.task_id))
                with contextlib.suppress(*TRANSIENT):
                    await run.raw.nak()
                continue
            keep.append((run, result, started_at))
        if not keep:
            return
        kept = await self.artifacts.keep_many([(run.item, result) for run, result, _ in keep])
        reports = [
            await self._finished(run, result, started_at, files)
            for (run, _, started_at), (files, result) in zip(keep, kept, strict=True)
        ]
        await self.emit_many(reports)
        for (run, _, _), report, (_, result) in zip(keep, reports, kept, strict=True):
            await self._acknowledge(run, report, result.duration_s)

    async def _finished(
        self,
        run: Running,
        result: RunResult,
        started_at: float,
        files: tuple[FileRef, ...],
        then: WorkItem | None = None,
    ) -> RunFinished:
        """A run's `run.finished` report, its output kept where the event cannot carry it."""
        item = run.item
        sensitive = item.sensitive or run.ctx.sensitive
        output, output_object, output_sha256 = await self._keep_output(item, result, sensitive)
        return work.run_finished(
            item,
            result,
            worker=self.agent.agent_id,
            at=time.time(),
            started_at=started_at,
            sensitive=sensitive,
            output=output,
            output_object=output_object,
            output_sha256=output_sha256,
            prompt_limit=self.settings.output_event_bytes,
            gpu=self.gpu.gpu_id if self.gpu.on else "",
            files=files,
            then=then,
        )

    async def _acknowledge(self, run: Running, said: RunResult | RunFinished, duration_s: float) -> None:
        """Once its report is out: remember the attempt as finished, acknowledge its item, log it."""
        item = run.item
        key = work.item_key(item.plan_id, item.task_id)
        work.remember(self.finished, key, item.attempt)
        try:
            await run.raw.ack()
        except TRANSIENT as exc:
            # the report is out; a redelivery finds the task final and is skipped
            log.warning("could not acknowledge %s (%s)", key, exc)
        log.info(
            "%s %s in %.3fs%s",
            key,
            "succeeded" if said.ok else "failed",
            duration_s,
            "" if said.ok else f": {said.error}",
        )

    async def _prepare(self, item: WorkItem, ctx: RunContext) -> RunResult | None:
        """Give a model task its model and inputs, and any task its dependencies' artifacts; a
        result instead when that is impossible."""
        ctx.device = self.gpu.kind
        ctx.files_in_memory = True
        try:
            if item.inputs:
                ctx.inputs = await self._inputs(item, ctx)
            missing = work.model_missing(item, self.gpu.on, self.models.loaded_llm())
            if missing:
                return RunResult(ok=False, duration_s=0.0, error=missing)
            need = MODEL_BODY_KINDS.get(item.kind)
            if need == work.LLM:
                ctx.model = self.models.llm
            elif need is not None:
                ctx.model = await self.models.script_model(item.model)
            return await self.artifacts.fetch_inputs(item)
        except ModelError as exc:
            return RunResult(ok=False, duration_s=0.0, error=str(exc))
        except TRANSIENT as exc:
            return RunResult(ok=False, duration_s=0.0, error=f"could not read the task's inputs: {exc}")

    def _stream(self, item: WorkItem, ctx: RunContext) -> TextStream | None:
        """Publish an LLM's answer as it is generated, unless the task is sensitive (or read a
        sensitive task's output): what stays out of the history is not streamed either."""
        if not self.settings.stream_text or item.sensitive or ctx.sensitive:
            return None
        if MODEL_BODY_KINDS.get(item.kind) != work.LLM:
            return None
        agent = self.agent
        stream = TextStream(agent.bus.nc, agent.names, item, agent.agent_id, self.settings.stream_batch_s)
        ctx.on_text = stream.push
        return stream

    async def _keep_output(self, item: WorkItem, result: RunResult, sensitive: bool) -> tuple[str, str, str]:
        """The output for the completion event, or the object holding it when it does not fit
        (or the task is sensitive: its output is never in the history) and its SHA-256."""
        text = work.output_to_keep(result, sensitive)
        if not text:
            return "", "", ""
        limit = self.settings.output_event_bytes
        if work.output_in_event(text, sensitive, limit):
            return text, "", ""
        name = work.output_object_name(item)
        data = text.encode()
        try:
            await (await self.agent.bus.objects()).put(name, data)
        except TRANSIENT as exc:
            log.warning("could not store the output of %s.%s: %s", item.plan_id, item.task_id, exc)
            return work.output_cut(text, sensitive, limit), "", ""
        return "", name, hashlib.sha256(data).hexdigest()

    async def _inputs(self, item: WorkItem, ctx: RunContext) -> dict[str, str]:
        """The outputs of the dependencies the task takes, from their completion events (a
        worker's report, or Claude's answer for an escalated task)."""
        out: dict[str, str] = {}
        for dep in item.inputs:
            try:
                found = await task_output(self.agent.bus, item.plan_id, dep)
            except OutputError as exc:
                raise ModelError(f"input {exc}") from exc
            if found.sensitive:
                # what reads a secret is kept out of the history like the secret itself
                ctx.sensitive = True
            out[dep] = found.text
        return out

    async def _heartbeat(self, run: Running) -> None:
        interval = self.settings.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            try:
                await run.raw.in_progress()
            except TRANSIENT as exc:
                log.warning("progress heartbeat failed: %s", exc)
