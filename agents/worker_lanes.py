"""A worker's lanes: the queues it claims work from, each a pull consumer with its own slots.
A lane fetches as slots free up and runs each item it fetched as its own task (`take`).

A lane with `batch_max` above 1 (the script lane: `embed_batch_max`) runs items that can share
one model call together (`take_batch`): once its fetch brought one, it fetches what else is
queued, waiting up to `batch_wait_s`, and groups them (`mesh.work.batch_groups`). A batch is
one run of the lane's slots; an item of that second fetch that cannot join a batch waits for a
slot here, its delivery kept alive (`in_progress`) meanwhile, and is handed back on stop.

Which lanes may claim is decided in `mesh.work` (`lanes_enabled`, `room`, `runs_fetched`): a
paused or cordoned GPU's worker claims nothing, and script work waits while an LLM is loaded
or loading. In burst mode a lane stops once its fetch comes back empty (or it may not claim)
while no lane of the worker runs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg as NatsMsg
from nats.js import JetStreamContext

from agents.base import Agent
from mesh import work
from mesh.bus.jetstream import TRANSIENT

log = logging.getLogger("mesh.worker")


class Lane:
    """One queue this worker takes work from, with its own number of slots."""

    def __init__(self, name: str, sub: JetStreamContext.PullSubscription, slots: int) -> None:
        self.name = name
        self.sub = sub
        self.slots = slots
        self.running = 0
        self.enabled = True
        self.closed = False
        self.changed = asyncio.Event()
        self.loop: asyncio.Task[Any] | None = None
        # a fetch is in flight: what it returns is run even if the lane was disabled meanwhile
        self.fetching = False
        # when the last fetch returned (monotonic; 0: none yet): see `Lanes._drop_stale`
        self.fetched_at = 0.0
        # items that can share a model call are fetched and run together, up to this many
        self.batch_max = 1
        self.batch_wait_s = 0.0
        # runs going at once: more than `slots` only when a batch's fetch brought items that
        # run alone (they wait here for a slot)
        self.permits = asyncio.Semaphore(slots)

    def wake(self) -> None:
        self.changed.set()

    async def until_idle(self) -> None:
        """Until the lane runs nothing, and no fetch in flight can still hand it work."""
        while self.running or self.fetching:
            self.changed.clear()
            await self.changed.wait()


# one item of a lane, and its slot's release: called once the result is in, before the report
Take = Callable[[NatsMsg, Lane, Callable[[], None]], Coroutine[Any, Any, None]]
# (the third argument gives the batch's slot back early: once its results are in, reporting
# them needs no slot, and the lane fetches the next batch meanwhile)
TakeBatch = Callable[[list[NatsMsg], Lane, Callable[[], None]], Coroutine[Any, Any, None]]
# the key under which a fetched item may run with others ('' alone): `mesh.work.batch_key`
BatchKey = Callable[[NatsMsg], str]


class Slot:
    """One run's hold on its lane: given back when the run ends, or earlier (`free`), once what
    is left of it needs no slot."""

    def __init__(self, lane: Lane, on_change: Callable[[], None]) -> None:
        self.lane = lane
        self.on_change = on_change
        self.permit = False  # it holds one of the lane's permits
        self.freed = False

    def free(self) -> None:
        if self.freed:
            return
        self.freed = True
        lane = self.lane
        if self.permit:
            lane.permits.release()
        lane.running -= 1
        lane.wake()
        self.on_change()


class Lanes:
    """The lanes of one worker, by name, and the tasks running what they fetched."""

    def __init__(
        self,
        agent: Agent,
        take: Take,
        hold: Callable[[], str],
        on_change: Callable[[], None],
        take_batch: TakeBatch | None = None,
        batch_key: BatchKey | None = None,
    ) -> None:
        self.agent = agent
        self.take = take
        self.take_batch = take_batch
        self.batch_key = batch_key
        self.hold = hold
        self.on_change = on_change
        self.by_name: dict[str, Lane] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        # stop each lane once the worker is idle (`Worker.run_burst`)
        self.burst = False

    def get(self, name: str) -> Lane | None:
        return self.by_name.get(name)

    def add(self, lane: Lane) -> None:
        self.by_name[lane.name] = lane

    def pop(self, name: str) -> Lane | None:
        return self.by_name.pop(name, None)

    def running(self, name: str) -> int:
        lane = self.by_name.get(name)
        return lane.running if lane is not None else 0

    def busy(self) -> bool:
        """Whether any lane runs something."""
        return any(lane.running for lane in self.by_name.values())

    def enable(self, held: bool, llm_present: bool) -> None:
        for name, enabled in work.lanes_enabled(self.by_name, held, llm_present).items():
            lane = self.by_name[name]
            if enabled != lane.enabled:
                lane.enabled = enabled
                lane.wake()

    def start(self, lane: Lane) -> None:
        lane.loop = asyncio.get_running_loop().create_task(self._loop(lane), name=f"lane-{lane.name}")

    def start_all(self) -> None:
        for lane in list(self.by_name.values()):
            self.start(lane)

    async def stop_loops(self) -> None:
        """Wake every lane (asked to stop) and wait, bounded, for their loops to end."""
        for lane in list(self.by_name.values()):
            lane.wake()
        loops = [lane.loop for lane in self.by_name.values() if lane.loop is not None]
        if loops:
            await asyncio.wait(loops, timeout=self.agent.settings.fetch_timeout_s + 5)

    async def until_loops_end(self) -> None:
        """Until every lane's loop has ended, lanes started meanwhile included (burst mode)."""
        while True:
            loops = [
                lane.loop for lane in self.by_name.values() if lane.loop is not None and not lane.loop.done()
            ]
            if not loops:
                return
            await asyncio.wait(loops)

    async def close(self, name: str) -> None:
        """Stop a lane and let go of its consumer: first its fetch in flight, which may still
        start a task, then that task."""
        lane = self.by_name.pop(name, None)
        if lane is None:
            return
        lane.closed = True
        lane.wake()
        if lane.loop is not None:
            await asyncio.wait({lane.loop}, timeout=self.agent.settings.fetch_timeout_s + 5)
        await lane.until_idle()
        with contextlib.suppress(*TRANSIENT):
            await lane.sub.unsubscribe()

    # the loop ----------------------------------------------------------------------------
    async def _loop(self, lane: Lane) -> None:
        stop = self.agent.stop_requested
        while not stop.is_set() and not lane.closed:
            free = work.room(lane.slots, lane.running, lane.enabled)
            if free <= 0:
                if self.burst and not lane.enabled and not self.busy():
                    return
                lane.changed.clear()
                await self._wait_any(self._changed(lane))
                continue
            self._drop_stale(lane)
            lane.fetching = True
            try:
                msgs = await lane.sub.fetch(free, timeout=self.agent.settings.fetch_timeout_s)
            except TimeoutError:  # nothing came in time (`mesh.bus.read.fetch_some` says how)
                if self.burst and not self.busy():
                    return
                continue
            except TRANSIENT as exc:
                if lane.closed:
                    return
                if not self.agent.bus.store.full:  # (a full store also fails fetches; said once)
                    log.warning("fetching %s work failed (%r); retrying", lane.name, exc)
                await self._wait_any(asyncio.sleep(0.5))
                continue
            finally:
                # (the fetched items are counted in `running` below, before anything else runs)
                lane.fetching = False
                lane.fetched_at = time.monotonic()
                lane.wake()
            if not work.runs_fetched(lane.name, self.hold()):
                # paused while this fetch was in flight: hand the work back for another GPU
                for raw in msgs:
                    with contextlib.suppress(*TRANSIENT):
                        await raw.nak()
                continue
            lane.fetching = True  # (until what it brought is counted in `running`)
            try:
                groups = await self._gather(lane, msgs)
            finally:
                lane.fetching = False
            for group in groups:
                lane.running += 1
                slot = Slot(lane, self.on_change)
                task = asyncio.get_running_loop().create_task(self._run(group, slot))
                self.tasks.add(task)
                task.add_done_callback(lambda t, sl=slot: self._slot_done(t, sl))  # type: ignore[misc]
            self.on_change()

    def _drop_stale(self, lane: Lane) -> None:
        """Let go of items delivered after the lane's last fetch had returned, when that was
        over half of `ack_wait_s` ago.

        A pull request can outlive the fetch that sent it (the server answers it late, after a
        restart say): what it delivers waits in the client, and nats-py's next fetch returns it
        first. If the lane's slots stayed busy meanwhile, that next fetch may come after
        `ack_wait_s`, when the server has already given the item to another worker, which is
        starting it now, and a record read here cannot tell. Not acknowledged, such an item is
        offered again by the server (at once, if its time is up), with its delivery counted."""
        if not lane.fetched_at or time.monotonic() - lane.fetched_at <= self.agent.settings.ack_wait_s / 2:
            return
        sub = lane.sub._sub
        queue = sub._pending_queue
        dropped = 0
        while not queue.empty():
            msg = queue.get_nowait()
            sub._pending_size -= len(msg.data)
            dropped += not JetStreamContext.is_status_msg(msg)
        if dropped:
            log.info(
                "let go of %d %s item(s) delivered after the last fetch ended; they are offered again",
                dropped,
                lane.name,
            )

    # batches -------------------------------------------------------------------------------
    async def _gather(self, lane: Lane, msgs: list[NatsMsg]) -> list[list[NatsMsg]]:
        """The runs to make of what a fetch brought: each item alone, or, where an item can
        share a model call, with what else is queued that can join it."""
        if lane.batch_max <= 1 or self.batch_key is None or self.take_batch is None:
            return [[m] for m in msgs]
        keys = [self.batch_key(m) for m in msgs]
        want = lane.batch_max - sum(1 for k in keys if k)
        if any(keys) and want > 0:
            more = await self._fetch_more(lane, want)
            msgs = msgs + more
            keys += [self.batch_key(m) for m in more]
        return [[msgs[i] for i in run] for run in work.batch_groups(keys, lane.batch_max)]

    async def _fetch_more(self, lane: Lane, want: int) -> list[NatsMsg]:
        """What is queued now, up to `want` items (waiting up to the lane's `batch_wait_s`
        for the first); none on a timeout or a failure (what the first fetch brought runs)."""
        try:
            # (a fetch's timeout must be above 0; a queued item comes back in well under 10 ms)
            more = await lane.sub.fetch(want, timeout=max(lane.batch_wait_s, 0.01))
        except TimeoutError:  # nothing queued in time (see `mesh.bus.read.fetch_some`)
            return []
        except TRANSIENT as exc:
            log.warning("fetching more %s work for a batch failed (%r)", lane.name, exc)
            return []
        if not work.runs_fetched(lane.name, self.hold()):
            for raw in more:
                with contextlib.suppress(*TRANSIENT):
                    await raw.nak()
            return []
        return more

    async def _run(self, group: list[NatsMsg], slot: Slot) -> None:
        """One run of the lane: an item alone, or a batch, once a slot is free."""
        lane = slot.lane
        try:
            if lane.permits.locked():
                # fetched to join a batch and could not: hold it alive here until a slot frees
                beat = asyncio.get_running_loop().create_task(self._hold_alive(group))
                try:
                    await lane.permits.acquire()
                finally:
                    beat.cancel()
                slot.permit = True
                if self.agent.stop_requested.is_set():
                    for raw in group:
                        with contextlib.suppress(*TRANSIENT):
                            await raw.nak()
                    return
            else:
                await lane.permits.acquire()
                slot.permit = True
            if len(group) == 1 or self.take_batch is None:  # (without take_batch, groups of one)
                await self.take(group[0], lane, slot.free)
            else:
                await self.take_batch(group, lane, slot.free)
        finally:
            slot.free()

    async def _hold_alive(self, group: list[NatsMsg]) -> None:
        while True:
            await asyncio.sleep(self.agent.settings.heartbeat_s)
            for raw in group:
                with contextlib.suppress(*TRANSIENT):
                    await raw.in_progress()

    async def _wait_any(self, aw: Any) -> None:
        waiter = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.agent.stop_requested.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()

    async def _changed(self, lane: Lane) -> None:
        """Until the lane changes; in burst mode at most a fetch's time, as the worker may go
        idle with no change to this lane."""
        if not self.burst:
            await lane.changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.changed.wait(), self.agent.settings.fetch_timeout_s)

    def _slot_done(self, task: asyncio.Task[Any], slot: Slot) -> None:
        self.tasks.discard(task)
        slot.free()  # (already, unless the task was cancelled before it began)
        if not task.cancelled() and task.exception() is not None:
            log.error("a slot failed: %r", task.exception(), exc_info=task.exception())
