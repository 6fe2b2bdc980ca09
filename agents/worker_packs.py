"""One delivery of a packed work item (`mesh.packing`), answered task by task.

A packed item carries several tasks, and the worker checks, runs, reports and answers each as
if it were an item of its own: skipped (acknowledged), handed back (`nak`), dead-lettered
(`term`) or done (acknowledged once its report is stored). Each task answers through a `Part`;
the delivery itself is answered once every part has (`Shared`):

- every part acknowledged (or dead-lettered): acknowledged, and the item is done;
- a part handed back: handed back, so the item comes again, to this worker or another. The
  tasks that ran here are then known to the brain by their reports, and a redelivery is checked
  against each task's record (`mesh.work.still_wanted`): one that succeeded is skipped. When
  some part ran here, it comes back only after `ack_wait_s`, as the item of a worker that died
  would: the brain has folded those reports into the records by then unless it is that far
  behind (a task of the pack would then run again, as it would for a dead worker's item);
- only dead-lettered parts: dead-lettered (nothing is to run it again).
"""

from __future__ import annotations

from typing import Any

from nats.aio.msg import Msg as NatsMsg


class Shared:
    """The delivery of a packed item and what its parts answered so far."""

    def __init__(self, raw: NatsMsg, parts: int, after_run_s: float) -> None:
        self.raw = raw
        self.left = parts
        # how long a pack handed back after some of it ran waits before it is offered again
        self.after_run_s = after_run_s
        self.acked = 0
        self.termed = 0
        # the delays of the parts handed back (None: at once)
        self.naks: list[float | None] = []

    async def answered(self, how: str, delay: float | None = None) -> None:
        self.left -= 1
        if how == "ack":
            self.acked += 1
        elif how == "term":
            self.termed += 1
        else:
            self.naks.append(delay)
        if self.left > 0:
            return
        if self.naks:
            wait = max((d or 0.0) for d in self.naks)
            if self.acked:
                wait = max(wait, self.after_run_s)
            await self.raw.nak(delay=wait or None)
        elif self.termed and not self.acked:
            await self.raw.term()
        else:
            await self.raw.ack()


class Part:
    """One task's share of a packed item's delivery: answers as a delivery does (`ack`, `nak`,
    `term`, `in_progress`), once; its delivery's metadata, subject and bytes are the item's."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        raw = shared.raw
        self.metadata = raw.metadata
        self.subject = raw.subject
        self.data = raw.data
        self.headers: dict[str, Any] | None = raw.headers
        self.done = False

    async def _answer(self, how: str, delay: float | None = None) -> None:
        if self.done:
            return
        self.done = True
        await self.shared.answered(how, delay)

    async def ack(self) -> None:
        await self._answer("ack")

    async def nak(self, delay: float | None = None) -> None:
        await self._answer("nak", delay)

    async def term(self) -> None:
        await self._answer("term")

    async def in_progress(self) -> None:
        if not self.done:
            await self.shared.raw.in_progress()
