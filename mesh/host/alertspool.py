"""The spool of alerts no sink would take: one JSON line per alert and sink, kept on this host
until a later try delivers it (the watchdog's and `mesh health`'s), and listed by `mesh doctor`.

`<data_dir>/alerts/undelivered.jsonl`. The watchdog and `mesh health` may share it: every change
holds an exclusive lock on `undelivered.lock` beside it, and a rewrite is atomic (a temporary
file renamed over). A line that cannot be read is kept as it is, never dropped.

Beside the sinks, the event stream: an alert the server did not take is kept as sink `stream`
(`for_stream`) and published, oldest first, by whichever of the two next reaches the server
(`publish_spooled`); a watchdog killed while the server was away loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec

from mesh.events import AlertRaised, AlertResolved

log = logging.getLogger("mesh.host.alertspool")

Alert = AlertRaised | AlertResolved
# the spool's name for the event stream, beside the sinks
STREAM = "stream"


class Undelivered(msgspec.Struct, kw_only=True):
    """An alert a sink did not take: which sink, the last error, how often it was tried."""

    sink: str
    event: Alert
    error: str
    attempts: int
    first_at: float
    last_at: float

    @property
    def key(self) -> tuple[str, str, str, str, float]:
        kind = "raised" if isinstance(self.event, AlertRaised) else "resolved"
        return (self.sink, kind, self.event.rule, self.event.target, self.event.at)


_decoder = msgspec.json.Decoder(Undelivered)
_encoder = msgspec.json.Encoder()


def spool_path(data_dir: str) -> Path:
    return Path(data_dir) / "alerts" / "undelivered.jsonl"


class Spool:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _lines(self) -> list[bytes]:
        try:
            return [line for line in self.path.read_bytes().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def add(self, entry: Undelivered) -> None:
        """Keep one more (appended; the file and its directory are made as needed)."""
        with self._locked(), open(self.path, "ab") as f:
            f.write(_encoder.encode(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> tuple[list[Undelivered], int]:
        """What is kept, and how many lines could not be read."""
        entries, bad = [], 0
        for line in self._lines():
            try:
                entries.append(_decoder.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError):
                bad += 1
        return entries, bad

    def update(self, change: Callable[[Undelivered], Undelivered | None]) -> None:
        """Rewrite the spool with each entry passed through `change` (None drops it). Entries
        added meanwhile by another process are kept; unreadable lines are kept as they were."""
        with self._locked():
            out: list[bytes] = []
            for line in self._lines():
                try:
                    entry = _decoder.decode(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    out.append(line)
                    continue
                kept = change(entry)
                if kept is not None:
                    out.append(_encoder.encode(kept))
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(line + b"\n" for line in out))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


def for_stream(ev: Alert, error: str) -> Undelivered:
    """An alert the server did not take, kept for the event stream."""
    now = time.time()
    return Undelivered(sink=STREAM, event=ev, error=error[:500], attempts=1, first_at=now, last_at=now)


async def publish_spooled(
    spool: Spool, emit: Callable[[Alert], Awaitable[object]], failures: tuple[type[BaseException], ...]
) -> tuple[int, int]:
    """Publish (`emit`) the alerts kept for the stream, oldest first, stopping at the first of
    `failures` (the stream keeps the order): how many went, and how many are still kept. Each
    keeps its `Nats-Msg-Id`, so one stored twice (a race with another process) is dropped."""
    entries, _ = await asyncio.to_thread(spool.read)
    waiting = sorted((e for e in entries if e.sink == STREAM), key=lambda e: e.event.at)
    sent: set[tuple[str, str, str, str, float]] = set()
    for entry in waiting:
        try:
            await emit(entry.event)
        except failures as exc:
            log.warning("publishing a spooled alert failed (%r); kept", exc)
            break
        sent.add(entry.key)
    if sent:
        await asyncio.to_thread(spool.update, lambda e: None if e.key in sent else e)
    return len(sent), len(waiting) - len(sent)
