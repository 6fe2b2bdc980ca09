"""A task's artifacts through the object store: an attempt's files stored under it once it ran,
its dependencies' files fetched into its working directory before it runs.

After a run, the files the executor says it wrote (`RunResult.artifacts`: a transcript's
segments, an embedding's `.npy`) and the files matching the task's `- artifacts:` globs in its
working directory are stored under `mesh.bus.files.artifact_name` and listed, with size and
SHA-256, in the attempt's `run.finished` (`RunFinished.files`). A file's path there is relative
to the working directory; a file saved outside it (the default home of a `save:`, under the
worker's data dir) goes by its base name. A successful attempt whose files add up to more than
`artifact_max_mb` fails as a definition error (running it again makes the same files); one whose
files cannot be stored fails and is retried. A failed attempt's files are stored too, as far as
they can be (for a look at what it left), and never fail it further.

Before a task runs, each dependency's last successful run names its files; every one missing from
the working directory, or differing there in size or checksum, is fetched into it. A file that
cannot be fetched fails the attempt, which is retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import logging
import os

from agents.base import Agent
from mesh.bus.files import (
    MB,
    FileTransferError,
    artifact_name,
    fetch_file,
    put_file,
    safe_relpath,
    sha256_file,
)
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.outputs import OutputError, task_files
from mesh.events import FileRef, WorkItem
from mesh.validate import artifact_glob_problem
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")


def run_dir(item: WorkItem) -> str:
    """The directory the item ran (or runs) in: its working directory where that exists, else
    the worker's own (as the executors decide)."""
    return item.workdir if item.workdir and os.path.isdir(item.workdir) else os.getcwd()


def _relative(path: str, base: str) -> str:
    """`path` relative to `base` when it lies under it, else its base name."""
    real, root = os.path.realpath(path), os.path.realpath(base)
    if os.path.commonpath([real, root]) == root:
        rel = safe_relpath(os.path.relpath(real, root).replace(os.sep, "/"))
        if rel:
            return rel
    return os.path.basename(path)


def artifact_files(base: str, globs: tuple[str, ...], reported: list[str]) -> dict[str, str]:
    """The attempt's files: relative path -> the file. First the ones the executor reported,
    then the regular files the globs match under `base` (blocking: run it in a thread)."""
    found: dict[str, str] = {}
    for path in reported:
        full = os.path.join(base, path)
        if os.path.isfile(full):
            found.setdefault(_relative(full, base), full)
    for pattern in globs:
        if artifact_glob_problem(pattern):
            log.warning("ignoring artifacts glob %r: %s", pattern, artifact_glob_problem(pattern))
            continue
        for match in sorted(glob.glob(pattern, root_dir=base, recursive=True)):
            rel = safe_relpath(match.replace(os.sep, "/"))
            full = os.path.join(base, match)
            if rel and os.path.isfile(full):
                found.setdefault(rel, full)
    return found


def _same(dest: str, ref: FileRef) -> bool:
    """Whether `dest` already holds the file (size, then SHA-256) (blocking)."""
    try:
        if not os.path.isfile(dest) or os.path.getsize(dest) != ref.size:
            return False
        return sha256_file(dest)[0] == ref.sha256
    except OSError:
        return False


def _failed(result: RunResult, error: str, definition: bool = False) -> RunResult:
    return dataclasses.replace(result, ok=False, error=error, definition_error=definition)


class Artifacts:
    """One worker's side of artifacts: storing an attempt's, fetching its dependencies'."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def keep(self, item: WorkItem, result: RunResult) -> tuple[tuple[FileRef, ...], RunResult]:
        """Store the attempt's files; their refs, and the result (failed when a successful
        attempt's files are too big or could not be stored)."""
        if result.cancelled or not (item.artifacts or result.artifacts):
            return (), result
        base = run_dir(item)
        try:
            found = await asyncio.to_thread(artifact_files, base, item.artifacts, result.artifacts)
            sizes = {rel: os.path.getsize(path) for rel, path in found.items()}
        except OSError as exc:
            return (), self._lost(result, f"could not read the task's artifacts: {exc}")
        if not found:
            return (), result
        key = f"{item.plan_id}.{item.task_id}"
        total, limit = sum(sizes.values()), self.agent.settings.artifact_max_mb
        if total > limit * MB:
            why = (
                f"the task's artifacts add up to {total / MB:.1f} MB ({len(found)} files), more than "
                f"artifact_max_mb={limit}: save fewer or smaller files, or raise the limit"
            )
            if not result.ok:
                log.warning("%s attempt %d: not storing its artifacts: %s", key, item.attempt, why)
                return (), result
            return (), _failed(result, why, definition=True)
        refs: list[FileRef] = []
        try:
            store = await self.agent.bus.objects()
            for rel, path in found.items():
                name = artifact_name(item.plan_id, item.task_id, item.attempt, rel)
                refs.append(await put_file(store, name, path, rel=rel))
        except (FileTransferError, *TRANSIENT) as exc:
            why = f"could not store the task's artifacts in the object store: {exc}"
            return tuple(refs), self._lost(result, why)
        log.info("%s attempt %d: stored %d artifacts (%d bytes)", key, item.attempt, len(refs), total)
        return tuple(refs), result

    @staticmethod
    def _lost(result: RunResult, why: str) -> RunResult:
        """A successful attempt whose files were not kept fails (and is retried); a failed one
        stays as it failed."""
        if result.ok:
            return _failed(result, why)
        log.warning("%s", why)
        return result

    async def fetch_inputs(self, item: WorkItem) -> RunResult | None:
        """Fetch the files the task's dependencies saved into its working directory, those not
        there already; a failed result when one cannot be had."""
        if not item.after:
            return None
        base = run_dir(item)
        store = None
        fetched = size = 0
        for dep in item.after:
            try:
                refs = await task_files(self.agent.bus, item.plan_id, dep)
            except OutputError as exc:
                log.warning("%s.%s: no artifacts of %s to fetch: %s", item.plan_id, item.task_id, dep, exc)
                continue
            except TRANSIENT as exc:
                return self._unfetched(f"could not read which files dependency {dep!r} saved: {exc}")
            for ref in refs:
                rel = safe_relpath(ref.path)
                if not rel or not ref.object:
                    return self._unfetched(
                        f"dependency {dep!r} names an artifact {ref.path!r} that cannot be placed under "
                        "the working directory"
                    )
                dest = os.path.join(base, rel)
                if await asyncio.to_thread(_same, dest, ref):
                    continue
                try:
                    store = store or await self.agent.bus.objects()
                    await fetch_file(store, ref.object, dest, sha256=ref.sha256, size=ref.size, mode=ref.mode)
                except (FileTransferError, *TRANSIENT) as exc:
                    return self._unfetched(f"could not fetch {rel}, an artifact of dependency {dep!r}: {exc}")
                fetched += 1
                size += ref.size
        if fetched:
            log.info(
                "%s.%s: fetched %d artifacts of its dependencies (%d bytes) into %s",
                item.plan_id,
                item.task_id,
                fetched,
                size,
                base,
            )
        return None

    @staticmethod
    def _unfetched(why: str) -> RunResult:
        return RunResult(ok=False, duration_s=0.0, error=why)
