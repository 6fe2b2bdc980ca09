"""A task's answer streamed as it is generated: the model's text, batched, on its task's
stream subject (core NATS: not stored, nobody acknowledges it).

The model's thread hands each piece over (`push`: it only schedules a call on the event loop,
so it never waits); a task on the loop publishes what gathered every `stream_batch_s`. A slow
or absent server never slows or fails the task: while the connection is down, or a publish
does not go out at once, the text is dropped and its chunk's number skipped, so a reader sees
the gap. The final output is `run.finished`'s, which goes out after the last chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client

from mesh.events import WorkItem, encode
from mesh.names import HEADER_TYPE, Names
from mesh.textstream import TextChunk

log = logging.getLogger("mesh.worker")

# text gathered beyond this while a publish waits is dropped (its chunk counted as missed)
MAX_PENDING_CHARS = 64 * 1024
# how long one publish may take before its chunk is given up
PUBLISH_S = 0.5
# how long the end of a task waits for its last chunks to go out
CLOSE_S = 1.0


class TextStream:
    """One attempt's text, from the model's thread to `<p>.stream.<plan>.<task>.<worker>`."""

    def __init__(self, nc: Client, names: Names, item: WorkItem, worker: str, batch_s: float) -> None:
        self.nc = nc
        self.item = item
        self.worker = worker
        self.subject = names.text(item.plan_id, item.task_id, worker)
        self.batch_s = max(0.0, batch_s)
        self.loop = asyncio.get_running_loop()
        self.pending: list[str] = []
        self.pending_chars = 0
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.closing = False
        self.wake = asyncio.Event()
        self.task = self.loop.create_task(self._run())

    def push(self, text: str) -> None:
        """Hand a piece of the answer over (from any thread; never blocks, never raises)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is left to tell
            self.loop.call_soon_threadsafe(self._take, text)

    def _take(self, text: str) -> None:
        if self.closing:
            return  # a model call that outlived its task: its text is not this attempt's
        if self.pending_chars + len(text) > MAX_PENDING_CHARS:
            self.pending.clear()
            self.pending_chars = 0
            self._skip()
        self.pending.append(text)
        self.pending_chars += len(text)
        self.wake.set()

    def _skip(self) -> None:
        """A chunk that will never go out: its number is used, so a reader sees the gap."""
        self.seq += 1
        self.dropped += 1

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            if not self.closing and self.batch_s:
                await asyncio.sleep(self.batch_s)  # gather a batch
            self.wake.clear()
            final = self.closing
            text = "".join(self.pending)
            self.pending.clear()
            self.pending_chars = 0
            if text or final:
                await self._send(text, final)
            if final:
                return

    async def _send(self, text: str, final: bool) -> None:
        item = self.item
        chunk = TextChunk(
            plan_id=item.plan_id,
            task_id=item.task_id,
            attempt=item.attempt,
            worker=self.worker,
            seq=self.seq,
            text=text,
            at=time.time(),
            final=final,
        )
        if not self.nc.is_connected:
            self._skip()  # never queued behind a reconnect, where the reports wait
            return
        try:
            await asyncio.wait_for(
                self.nc.publish(self.subject, encode(chunk), headers={HEADER_TYPE: "text.chunk"}),
                PUBLISH_S,
            )
        except Exception as exc:  # a stream's trouble is never the task's
            log.debug("dropped a text chunk of %s.%s: %s", item.plan_id, item.task_id, exc)
            self._skip()
            return
        self.seq += 1
        self.sent += 1

    async def close(self) -> None:
        """The attempt's generation is over: send what is left and the final chunk, waiting at
        most `CLOSE_S`. Never raises."""
        self.closing = True
        self.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), CLOSE_S)
        except Exception:
            self.task.cancel()
        if self.dropped:
            log.info(
                "%s.%s: streamed %d text chunks, dropped %d",
                self.item.plan_id,
                self.item.task_id,
                self.sent,
                self.dropped,
            )
