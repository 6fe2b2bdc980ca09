"""A worker's reports on their way to the server: those ready at about the same time go together.

Every report (`run.started`, `run.finished`, a dead-lettered item's) is handed to the `Outbox`,
and whoever hands it in waits until the server has stored it; only then is its item
acknowledged. One write is in flight at a time. The first report finds none and goes at once:
nothing waits on a timer, so a chain's lone report is not slowed. Reports handed in while a
write is in flight go out together in the next one (`Bus.emit_many`), the moment it is done:
from `ATOMIC_MIN` reports on, one JetStream atomic batch, one sync of the server's disk where
each report alone costs one (`durability = "always"`). The slower the server's disk, the more
gather behind a write, and the fewer syncs each costs.

Reports are stored in the order they were handed in: a task's `run.started` (awaited before its
`run.finished` is handed in, `StartReport.settle`) is never overtaken. Each keeps its own
subject, message id and JSON; a write that a server restart interrupts is made again whole,
and the server drops by message id what it had already stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from mesh.events import RunFinished, RunStarted

Report = RunStarted | RunFinished


class Outbox:
    """Reports queued behind the write in flight, sent together by one flusher task."""

    def __init__(self, send: Callable[[list[Report]], Awaitable[None]]) -> None:
        # `send` writes the reports in order and returns once the server stored all of them
        self._send = send
        self._queue: list[tuple[Sequence[Report], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # writes made and reports sent: how well reports gather (the tests read them)
        self.writes = 0
        self.sent = 0

    async def put(self, reports: Sequence[Report]) -> None:
        """Until `reports` are stored (raises what their write raised). Cancelling the wait
        leaves them queued: they go out all the same."""
        if reports:
            await self.hand(reports)

    def hand(self, reports: Sequence[Report]) -> asyncio.Future[None]:
        """`reports` queued now, in the order of the calls (`put` queues them only once it
        runs); the future is done when they are stored."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((reports, done))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="worker-reports")
        return done

    async def drained(self) -> None:
        """Until every report handed in is out (or its write failed): before the bus closes."""
        while (flusher := self._flusher) is not None:
            # (a failed write raised to its waiters; the flusher itself goes on to the next)
            await asyncio.wait({flusher})

    async def _flush(self) -> None:
        try:
            while self._queue:
                taken, self._queue = self._queue, []
                reports = [r for reports, _ in taken for r in reports]
                try:
                    await self._send(reports)
                except Exception as exc:
                    for _, done in taken:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                except BaseException:
                    for _, done in taken + self._queue:
                        done.cancel()
                    self._queue = []
                    raise
                self.writes += 1
                self.sent += len(reports)
                for _, done in taken:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._flusher = None
