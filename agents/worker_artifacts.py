"""A task's artifacts through the object store: an attempt's files stored under it once it ran,
its dependencies' files fetched into its working directory before it runs.

After a run, the files the executor says it wrote (`RunResult.artifacts`: a transcript's
segments, an embedding's `.npy`, where the body says `save:`), those it made in memory and wrote
nowhere (`RunResult.artifact_data`: the same without `save:`) and the files matching the task's
`- artifacts:` globs in its working directory are stored under `mesh.bus.files.artifact_name`
and listed, with size and SHA-256, in the attempt's `run.finished` (`RunFinished.files`). A
file's path there is relative to the working directory; a file saved outside it goes by its
base name, as does one made in memory. A successful attempt whose files add up to more than
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
    SmallFile,
    artifact_name,
    fetch_file,
    put_data,
    put_file,
    put_small_many,
    safe_relpath,
    sha256_file,
)
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.outputs import OutputError, task_files
from mesh.events import FileRef, WorkItem
from mesh.validate import artifact_glob_problem
from mesh.work import RunResult

log = logging.getLogger("mesh.worker")

# an attempt's artifacts this small are read whole with the others of its batch and stored
# from memory (an embedding's `.npy`), up to READ_BYTES_MAX an attempt; the rest are streamed
SMALL_BYTES = 256 * 1024
READ_BYTES_MAX = MB


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
    then the regular files the globs match under `base` (blocking: run it in a thread). A file
    that is a link to one outside `base`, or lies under a linked folder that leads out of it, is
    left out: the attempt's files are the ones in its directory, not what it points at."""
    found: dict[str, str] = {}
    root = os.path.realpath(base)

    def inside(full: str) -> bool:
        return os.path.isfile(full) and os.path.commonpath([root, os.path.realpath(full)]) == root

    for path in reported:
        full = os.path.join(base, path)
        if inside(full):
            found.setdefault(_relative(full, base), full)
    for pattern in globs:
        if artifact_glob_problem(pattern):
            log.warning("ignoring artifacts glob %r: %s", pattern, artifact_glob_problem(pattern))
            continue
        for match in sorted(glob.glob(pattern, root_dir=base, recursive=True)):
            rel = safe_relpath(match.replace(os.sep, "/"))
            full = os.path.join(base, match)
            if rel and inside(full):
                found.setdefault(rel, full)
    return found


def wants_keeping(item: WorkItem, result: RunResult) -> bool:
    """Whether the attempt may have files to store (a cancelled one's are not)."""
    return not result.cancelled and bool(item.artifacts or result.artifacts or result.artifact_data)


@dataclasses.dataclass
class Found:
    """An attempt's files as `scan` found them: relative path -> the file ('' for one made in
    memory), its size and permission bits, the contents of those small enough to be stored
    together (`data`), and of the bigger ones made in memory (`held`)."""

    files: dict[str, str] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    modes: dict[str, int] = dataclasses.field(default_factory=dict)
    data: dict[str, bytes] = dataclasses.field(default_factory=dict)
    held: dict[str, bytes] = dataclasses.field(default_factory=dict)
    error: str = ""


def scan(item: WorkItem, result: RunResult) -> Found:
    """The attempt's files: those made in memory first, then those on disk (`artifact_files`);
    their sizes and modes, and the contents of the small ones, up to `READ_BYTES_MAX` in all:
    those are stored together, the others one by one, from memory or streamed from the disk
    (blocking: run it in a thread). A file that cannot be read is `error`."""
    out = Found()
    read = 0
    for name, data in result.artifact_data.items():
        rel = safe_relpath(name) or os.path.basename(name)
        if not rel or rel in out.files:
            continue
        out.files[rel], out.sizes[rel], out.modes[rel] = "", len(data), 0o644
        if len(data) <= SMALL_BYTES and read + len(data) <= READ_BYTES_MAX:
            out.data[rel] = data
            read += len(data)
        else:
            out.held[rel] = data
    try:
        for rel, path in artifact_files(run_dir(item), item.artifacts, result.artifacts).items():
            out.files.setdefault(rel, path)
        for rel, path in out.files.items():
            if not path:  # (made in memory)
                continue
            st = os.stat(path)
            out.sizes[rel] = st.st_size
            out.modes[rel] = st.st_mode & 0o777
            if st.st_size <= SMALL_BYTES and read + st.st_size <= READ_BYTES_MAX:
                with open(path, "rb") as fh:
                    out.data[rel] = fh.read()
                read += len(out.data[rel])
    except OSError as exc:
        out.error = str(exc)
    return out


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
        if not wants_keeping(item, result):
            return (), result
        found = await asyncio.to_thread(scan, item, result)
        return self._refused(item, result, found) or await self._store(item, result, found)

    async def keep_many(
        self, runs: list[tuple[WorkItem, RunResult]]
    ) -> list[tuple[tuple[FileRef, ...], RunResult]]:
        """`keep` for the runs of one batch: their files looked for and read in one thread,
        the small ones of every run stored in one write (`put_small_many`: a batch of 64
        embeddings is 64 small files, and one write syncs the server's disk once, where each
        object stored alone syncs it twice), the others streamed as `keep` does."""
        todo = [i for i, (item, result) in enumerate(runs) if wants_keeping(item, result)]
        found = await asyncio.to_thread(lambda: [scan(*runs[i]) for i in todo])
        out: list[tuple[tuple[FileRef, ...], RunResult]] = [((), result) for _, result in runs]
        storing: list[tuple[int, Found]] = []
        for i, f in zip(todo, found, strict=True):
            item, result = runs[i]
            refused = self._refused(item, result, f)
            if refused is not None:
                out[i] = refused
                continue
            storing.append((i, f))
        if not storing:
            return out
        small = [
            SmallFile(
                artifact_name(runs[i][0].plan_id, runs[i][0].task_id, runs[i][0].attempt, rel),
                data,
                rel,
                f.modes[rel],
            )
            for i, f in storing
            for rel, data in f.data.items()
        ]
        try:
            stored = await put_small_many(await self.agent.bus.objects(), self.agent.bus.publish_many, small)
        except (FileTransferError, *TRANSIENT) as exc:
            why = f"could not store the task's artifacts in the object store: {exc}"
            for i, _ in storing:
                out[i] = ((), self._lost(runs[i][1], why))
            return out
        by_name = {ref.object: ref for ref in stored}
        for i, f in storing:
            item, result = runs[i]
            out[i] = await self._store(item, result, f, by_name)
        return out

    def _refused(
        self, item: WorkItem, result: RunResult, found: Found
    ) -> tuple[tuple[FileRef, ...], RunResult] | None:
        """The outcome of an attempt whose files are not to be stored (none, unreadable, too
        big); None when they are."""
        if found.error:
            return (), self._lost(result, f"could not read the task's artifacts: {found.error}")
        if not found.files:
            return (), result
        total, limit = sum(found.sizes.values()), self.agent.settings.artifact_max_mb
        if total > limit * MB:
            why = (
                f"the task's artifacts add up to {total / MB:.1f} MB ({len(found.files)} files), more than "
                f"artifact_max_mb={limit}: save fewer or smaller files, or raise the limit"
            )
            if not result.ok:
                log.warning(
                    "%s.%s attempt %d: not storing its artifacts: %s",
                    item.plan_id,
                    item.task_id,
                    item.attempt,
                    why,
                )
                return (), result
            return (), _failed(result, why, definition=True)
        return None

    async def _store(
        self, item: WorkItem, result: RunResult, found: Found, stored: dict[str, FileRef] | None = None
    ) -> tuple[tuple[FileRef, ...], RunResult]:
        """Store the attempt's files (those in `stored` are already; `_refused` said none is to be
        refused); their refs, in order."""
        stored = stored or {}
        refs: list[FileRef] = []
        try:
            store = await self.agent.bus.objects()
            for rel, path in found.files.items():
                name = artifact_name(item.plan_id, item.task_id, item.attempt, rel)
                data = found.data.get(rel, found.held.get(rel))
                if name in stored:
                    refs.append(stored[name])
                elif data is None:
                    refs.append(await put_file(store, name, path, rel=rel))
                else:
                    refs.append(await put_data(store, name, data, rel=rel, mode=found.modes[rel]))
        except (FileTransferError, *TRANSIENT) as exc:
            why = f"could not store the task's artifacts in the object store: {exc}"
            return tuple(refs), self._lost(result, why)
        log.info(
            "%s.%s attempt %d: stored %d artifacts (%d bytes)",
            item.plan_id,
            item.task_id,
            item.attempt,
            len(refs),
            sum(found.sizes.values()),
        )
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
