"""Where a worker runs a task: the plan's own directory on the host it was submitted from, else
a per-plan work directory into which the plan's bundle is put first.

A worker whose host id (`mesh.host.config.host_id`) is the plan's `host`, and where the plan's
`workdir` exists, runs the task there as it always did. Any other runs it in
`<work_dir>/<plan_id>/` (`mesh.host.config.work_root`), made on first use and filled with the
plan's bundle (`mesh.bus.bundle.materialise`) once per plan and worker process: a lock per plan
keeps two tasks of one plan from fetching the same files at once, and what is in place is
remembered. A directory that cannot be made fails the attempt as a definition error; a bundle
that cannot be fetched fails it as a run may fail (it is retried). A plan with no host (from a
client that sends no bundle) runs in its `workdir` as before, which must then exist.

Each per-plan directory holds a marker file (`MARKER`); `sweep` removes the marked directories
no task used for `work_dir_keep_days` when a worker starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time

import msgspec

from mesh import work
from mesh.bus.bundle import materialise
from mesh.bus.files import FileTransferError
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.events import WorkItem
from mesh.host.config import host_id, work_root
from mesh.names import check_token
from mesh.settings import Settings
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")

# in every per-plan work directory: the sweep removes only what carries it
MARKER = ".mesh-work"
DAY_S = 86400.0


class WorkdirFailed(Exception):
    """The task's working directory cannot be had; `definition` when no retry can help."""

    def __init__(self, message: str, *, definition: bool) -> None:
        super().__init__(message)
        self.definition = definition


class WorkDirs:
    """A worker's per-plan work directories, and which bundles it has put in place."""

    def __init__(self, settings: Settings) -> None:
        self.host = host_id(settings)
        self.root = work_root(settings)
        self.keep_days = settings.work_dir_keep_days
        self.locks: dict[str, asyncio.Lock] = {}
        # plan id -> the bundle in place in its directory (bounded, oldest forgotten)
        self.ready: dict[str, str] = {}

    async def place(self, bus: Bus, item: WorkItem) -> tuple[WorkItem, RunResult | None]:
        """The item with the directory it runs in as its `workdir`, or a failed result."""
        try:
            workdir = await self.workdir_for(bus, item)
        except WorkdirFailed as exc:
            log.error("%s.%s attempt %d: %s", item.plan_id, item.task_id, item.attempt, exc)
            return item, RunResult(ok=False, duration_s=0.0, error=str(exc), definition_error=exc.definition)
        if workdir == item.workdir:
            return item, None
        return msgspec.structs.replace(item, workdir=workdir), None

    async def workdir_for(self, bus: Bus, item: WorkItem) -> str:
        """The directory the item runs in; raises `WorkdirFailed`."""
        if not item.host:
            return item.workdir  # no bundle was sent: the plan's directory or nothing
        if item.host == self.host and item.workdir and os.path.isdir(item.workdir):
            return item.workdir
        directory, fresh = self.make(item.plan_id)
        if fresh:  # (made again after a sweep: what was in place is gone)
            self.ready.pop(item.plan_id, None)
        if item.bundle:
            lock = self.locks.get(item.plan_id)
            if lock is None:
                lock = asyncio.Lock()
                work.remember(self.locks, item.plan_id, lock)
            async with lock:
                if self.ready.get(item.plan_id) != item.bundle:
                    await self._fill(bus, item, directory)
        return directory

    def make(self, plan_id: str) -> tuple[str, bool]:
        """The plan's work directory, made (with its marker) if need be, and marked as used now;
        and whether it was made now."""
        try:
            check_token(plan_id, "plan id")
        except ValueError as exc:
            raise WorkdirFailed(str(exc), definition=True) from None
        directory = os.path.join(self.root, plan_id)
        marker = os.path.join(directory, MARKER)
        fresh = not os.path.exists(marker)
        try:
            os.makedirs(directory, exist_ok=True)
            with open(marker, "a", encoding="utf-8"):
                pass
            os.utime(marker)
        except OSError as exc:
            raise WorkdirFailed(
                f"cannot make the task's work directory {directory}: {exc.strerror or exc}; give this "
                "worker a directory it may write (setting work_dir, env MESH_WORK_DIR)",
                definition=True,
            ) from None
        return directory, fresh

    async def _fill(self, bus: Bus, item: WorkItem, directory: str) -> None:
        began = time.monotonic()
        try:
            done = await materialise(await bus.objects(), item.bundle, directory)
        except FileTransferError as exc:
            raise WorkdirFailed(
                f"the plan's files could not be put in {directory}: {exc}", definition=False
            ) from None
        except TRANSIENT as exc:
            raise WorkdirFailed(
                f"the plan's files could not be fetched ({type(exc).__name__}: {exc}); it is tried again",
                definition=False,
            ) from None
        work.remember(self.ready, item.plan_id, item.bundle)
        log.info(
            "plan %s's files in %s: %d fetched (%.1f MB), %d already there, in %.2fs",
            item.plan_id,
            directory,
            done.fetched,
            done.fetched_bytes / (1024 * 1024),
            done.kept,
            time.monotonic() - began,
        )

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the per-plan work directories (those with a marker) no task used for
        `work_dir_keep_days`; the ones removed (blocking: run it in a thread)."""
        if self.keep_days <= 0 or not os.path.isdir(self.root):
            return []
        cutoff = (time.time() if now is None else now) - self.keep_days * DAY_S
        removed = []
        for entry in os.scandir(self.root):
            marker = os.path.join(entry.path, MARKER)
            try:
                if not entry.is_dir(follow_symlinks=False) or os.stat(marker).st_mtime > cutoff:
                    continue
            except OSError:
                continue  # no marker: not ours
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        if removed:
            log.info(
                "removed %d work directories unused for %g days under %s",
                len(removed),
                self.keep_days,
                self.root,
            )
        return removed
