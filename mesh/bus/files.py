"""Files through the object store: a plan's bundle, a task's artifacts, model files.

Three kinds of file travel between hosts (docs/multihost.md), all in JetStream object stores
and all checked on arrival against a checksum that came from a trusted sender:

- a plan's **bundle**: the files under the plan's directory that it uses, each stored once
  under its SHA-256 (`blob_name`), deduplicated across plans; the list of them is a
  `BundleManifest`, itself a blob, whose checksum travels in the plan (`PlanSpec.bundle`);
- a task's **artifacts**: the files an attempt made, under `artifact_name`, listed with size and
  checksum in the attempt's `run.finished` (`RunFinished.files`);
- **model files**, in their own bucket (`Names.models_bucket`, no expiry), pushed by the CLI.

`put_file` streams a file in (the store chunks it); `fetch_file` streams one out into a
temporary file beside the destination, checks size and SHA-256 as it goes, and renames it into
place only when both match: a truncated or corrupted transfer is retried, never used.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.js.errors
from nats.js import api
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    ObjectStore,
)

from mesh.events import FileRef

log = logging.getLogger("mesh.bus.files")

MB = 1024 * 1024
# the store's chunks: bigger than the library's 128 KiB, fewer round trips per MB (each chunk is
# one acknowledged publish); well under the server's max_payload
CHUNK_BYTES = 512 * 1024
# read a file this much at a time when hashing it
READ_BYTES = 1024 * 1024
# a fetch that receives nothing for this long is given up (and retried)
STALL_S = 30.0
FETCH_ATTEMPTS = 3
# a fetch gathers this much before it writes to the disk (in a thread)
WRITE_BATCH_BYTES = 4 * MB
# and lets this many batches wait for the disk before it waits too
WRITE_AHEAD = 4
# a fetch asks for this much at a time
FETCH_BATCH_BYTES = 8 * MB
# what its subscription may hold unread before the client calls it a slow consumer
FETCH_PENDING_BYTES = 64 * MB

Progress = Callable[[int, int], None]


class FileTransferError(Exception):
    """A file could not be stored or fetched; the message says which and what to do."""


class BundleManifest(msgspec.Struct, frozen=True):
    """The files a plan brought with it, relative to its directory."""

    files: tuple[FileRef, ...] = ()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def blob_name(sha256: str) -> str:
    """A content-addressed object: the same bytes are stored once, whatever plan sent them."""
    return f"blobs/{sha256}"


def artifact_name(plan_id: str, task_id: str, attempt: int, path: str) -> str:
    """Where an attempt's artifact is kept."""
    return f"artifacts/{plan_id}/{task_id}/{attempt}/{path}"


def artifact_prefix(plan_id: str, task_id: str = "") -> str:
    """The names of a plan's (or one task's) artifacts start with this."""
    return f"artifacts/{plan_id}/{task_id + '/' if task_id else ''}"


def sha256_file(path: str) -> tuple[str, int]:
    """The file's SHA-256 (hex) and size, read in pieces (blocking: run it in a thread)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def safe_relpath(path: str) -> str:
    """`path` as a relative POSIX path that stays under its base; '' if it would leave it (an
    absolute path, '..', an empty name). Every path read from a message goes through this
    before it touches a disk."""
    if not path or "\x00" in path or "\\" in path:
        return ""
    norm = posixpath.normpath(path)
    if norm.startswith("/") or norm == "." or norm == ".." or norm.startswith("../"):
        return ""
    return norm


def _digest_hex(info: api.ObjectInfo) -> str:
    """The store's digest of an object ('SHA-256=<base64url>') as hex; '' if it has none."""
    digest = info.digest or ""
    if "=" not in digest:
        return ""
    try:
        return base64.urlsafe_b64decode(digest.split("=", 1)[1]).hex()
    except (ValueError, TypeError):
        return ""


class _Counted:
    """A file the store reads from, telling `progress(done, total)` as it goes."""

    def __init__(self, fh: Any, total: int, progress: Progress) -> None:
        self.fh = fh
        self.total = total
        self.done = 0
        self.progress = progress

    def readinto(self, buf: Any) -> int:
        n = int(self.fh.readinto(buf))
        self.done += n
        self.progress(self.done, self.total)
        return n


async def put_file(
    store: ObjectStore,
    name: str,
    path: str,
    *,
    rel: str = "",
    description: str = "",
    progress: Progress | None = None,
) -> FileRef:
    """Store the file at `path` as object `name`; its `FileRef` (path `rel`) from what was sent.
    `progress(done, total)` is called as it goes (from the store's reader thread)."""
    try:
        st = os.stat(path)
        mode = st.st_mode & 0o777
        fh = open(path, "rb")  # noqa: SIM115 - handed to the store's reader thread
    except OSError as exc:
        raise FileTransferError(f"cannot read {path}: {exc.strerror or exc}") from None
    meta = api.ObjectMeta(
        name=name, description=description or None, options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES)
    )
    try:
        with fh:
            reader: Any = fh if progress is None else _Counted(fh, st.st_size, progress)
            info = await store.put(name, reader, meta=meta)
    except nats.js.errors.Error as exc:
        raise FileTransferError(f"storing {path} as {name} failed: {exc}") from exc
    return FileRef(
        path=rel or os.path.basename(path),
        size=int(info.size or 0),
        sha256=_digest_hex(info),
        object=name,
        mode=mode,
    )


async def put_data(store: ObjectStore, name: str, data: bytes, *, rel: str, mode: int = 0o644) -> FileRef:
    """Store a small file already read (`data`, at most a chunk or so) as object `name`; its
    `FileRef` (path `rel`). Unlike `put_file`, no reader thread: a batch's files, read together
    in one thread, go without a thread hop each. Its one chunk is the data's size: the library
    makes a buffer of the chunk size for every object (512 KiB for a 1.6 KB vector)."""
    try:
        info = await put_bytes(store, name, data, chunk=max(1, min(len(data), CHUNK_BYTES)))
    except nats.js.errors.Error as exc:
        raise FileTransferError(f"storing {rel} as {name} failed: {exc}") from exc
    return FileRef(path=rel, size=int(info.size or 0), sha256=_digest_hex(info), object=name, mode=mode)


@dataclass(frozen=True)
class SmallFile:
    """A small file read whole, to be stored as object `name` (`put_small_many`)."""

    name: str
    data: bytes
    rel: str
    mode: int = 0o644


async def put_small_many(
    store: ObjectStore,
    publish_many: Callable[[list[tuple[str, bytes, dict[str, str]]]], Awaitable[Any]],
    files: list[SmallFile],
) -> list[FileRef]:
    """Store many small files (one chunk each) in one pipelined write: every chunk and entry
    published together by `publish_many` (`Bus.publish_many`: one atomic batch where the
    store's stream takes them, so one sync of the server's disk for all, where `store.put`
    makes two acknowledged publishes and a lookup an object).

    The objects read as `store.put`'s do. An object's chunk goes on a subject named after the
    object (`small_chunk_id`), as a roll-up of that subject: storing the same name again (the
    same attempt run again) replaces the chunk with the entry, and leaves nothing behind,
    without a lookup first."""
    items: list[tuple[str, bytes, dict[str, str]]] = []
    refs: list[FileRef] = []
    rollup = {str(api.Header.ROLLUP.value): MSG_ROLLUP_SUBJECT}
    for f in files:
        nuid = small_chunk_id(f.name)
        digest = hashlib.sha256(f.data)
        info = api.ObjectInfo(
            name=f.name,
            bucket=store._name,
            nuid=nuid,
            size=len(f.data),
            chunks=1,
            mtime=datetime.datetime.now(datetime.UTC).isoformat(),
            digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(digest.digest()).decode()),
            options=api.ObjectMetaOptions(max_chunk_size=max(1, len(f.data))),
        )
        items.append((_chunks_subject(store, nuid), f.data, rollup))
        meta_subject = OBJ_META_PRE_TEMPLATE.format(
            bucket=store._name, obj=base64.urlsafe_b64encode(f.name.encode()).decode()
        )
        items.append((meta_subject, json.dumps(info.as_dict()).encode(), rollup))
        refs.append(
            FileRef(path=f.rel, size=len(f.data), sha256=digest.hexdigest(), object=f.name, mode=f.mode)
        )
    if items:
        try:
            await publish_many(items)
        except nats.js.errors.Error as exc:
            raise FileTransferError(f"storing {len(files)} files in the object store failed: {exc}") from exc
    return refs


def small_chunk_id(name: str) -> str:
    """The chunk subject's last token for a small object stored by `put_small_many`: from its
    name, so that storing the name again rolls the old chunk up."""
    return base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).decode().rstrip("=")


async def put_bytes(store: ObjectStore, name: str, data: bytes, chunk: int = CHUNK_BYTES) -> api.ObjectInfo:
    """Store `data` as object `name`, in chunks of `chunk` bytes."""
    meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=chunk))
    return await store.put(name, data, meta=meta)


async def has_object(store: ObjectStore, name: str, sha256: str = "") -> bool:
    """Whether the store holds `name` (with that checksum, when one is given)."""
    try:
        info = await store.get_info(name)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        return False
    return not sha256 or _digest_hex(info) == sha256


async def put_blob(store: ObjectStore, path: str, sha256: str) -> bool:
    """Store a file under its checksum unless the store has it already; True if it was sent."""
    name = blob_name(sha256)
    if await has_object(store, name, sha256):
        return False
    ref = await put_file(store, name, path)
    if ref.sha256 != sha256:
        raise FileTransferError(f"{path} changed while it was being stored: submit again")
    return True


class _Sink:
    """Where a fetched object goes: the temporary file, hashed as it goes. Chunks are gathered in
    memory and written (and hashed) a batch at a time by a thread of the sink's own, in order,
    while the next batch arrives: the event loop never waits on the disk, and waits for the
    thread only when `WRITE_AHEAD` batches are still unwritten."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()
        self.written = 0
        # bytes received, and when the last chunk came
        self.received = 0
        self.last = time.monotonic()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.writing: collections.deque[asyncio.Future[None]] = collections.deque()
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fetch")

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.hash.update(data)
        self.written += len(data)
        return len(data)

    def _write_all(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    async def take(self, data: bytes) -> None:
        self.received += len(data)
        self.last = time.monotonic()
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= WRITE_BATCH_BYTES:
            self._send()
            while len(self.writing) > WRITE_AHEAD:
                await self.writing.popleft()

    def _send(self) -> None:
        chunks, self.pending, self.pending_bytes = self.pending, [], 0
        if chunks:
            loop = asyncio.get_running_loop()
            self.writing.append(loop.run_in_executor(self.thread, self._write_all, chunks))

    async def flush(self) -> None:
        """Until everything received is written."""
        self._send()
        while self.writing:
            await self.writing.popleft()

    async def close(self) -> None:
        """Wait for the thread (its writes may fail: they are no longer wanted) and end it."""
        for fut in self.writing:
            with contextlib.suppress(Exception):
                await fut
        self.writing.clear()
        self.thread.shutdown(wait=False)


@dataclass
class Fetched:
    path: str
    size: int
    took_s: float
    tries: int


async def fetch_file(
    store: ObjectStore,
    name: str,
    dest: str,
    *,
    sha256: str,
    size: int,
    mode: int = 0o644,
    progress: Progress | None = None,
    attempts: int = FETCH_ATTEMPTS,
    stall_s: float = STALL_S,
) -> Fetched:
    """Fetch object `name` into `dest`, which appears only once its size and SHA-256 match.

    The bytes go to a temporary file beside `dest`; a transfer that stops for `stall_s`, comes
    out short or differs from the checksum is thrown away and tried again, `attempts` times in
    all. `progress(done, total)` is called as it goes."""
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise FileTransferError(f"cannot make {directory}: {exc.strerror or exc}") from None
    started = time.monotonic()
    why = ""
    for attempt in range(1, attempts + 1):
        tmp = os.path.join(directory, f".{os.path.basename(dest)}.part-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as fh:
                sink = _Sink(fh)
                try:
                    why = await _receive(store, name, sink, size, progress, stall_s)
                finally:
                    await sink.close()
                if not why and sink.written != size:
                    why = f"{sink.written} bytes arrived, {size} were expected"
                if not why and sink.hash.hexdigest() != sha256:
                    why = "its checksum differs from the one recorded"
                if not why:
                    fh.flush()
                    os.fsync(fh.fileno())
            if not why:
                os.chmod(tmp, mode & 0o777)
                os.replace(tmp, dest)
                return Fetched(dest, size, time.monotonic() - started, attempt)
        except OSError as exc:
            raise FileTransferError(f"cannot write {dest}: {exc.strerror or exc}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.warning("fetching %s into %s, try %d of %d: %s", name, dest, attempt, attempts, why)
    raise FileTransferError(f"fetching {name} failed {attempts} times (last: {why}); nothing was kept")


def _chunks_subject(store: ObjectStore, nuid: str) -> str:
    """Where the store keeps an object's chunks (the object store's own layout)."""
    return OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=store._name, obj=nuid)


async def _receive(
    store: ObjectStore, name: str, sink: _Sink, size: int, progress: Progress | None, stall_s: float
) -> str:
    """Stream the object into `sink`; '' when it all arrived, else why not.

    The chunks are pulled a batch at a time through a consumer of their own (the library's
    `get` hands every chunk to a thread one at a time, a fifth of the speed): the next batch is
    asked for only once the last one is taken, so a slow disk slows the sender rather than
    filling memory; every chunk's count of those still to come is checked, so a lost one is
    noticed at once."""
    try:
        info = await store.get_info(name)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        raise FileTransferError(f"the store has no object {name}") from None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if not info.nuid or info.is_link():
        raise FileTransferError(f"the store's entry {name} is not an object that can be fetched")
    stored = int(info.size or 0)
    if stored != size:
        return f"the store's copy is {stored} bytes, {size} were expected"
    if not stored:
        return ""
    chunk = int(info.options.max_chunk_size or 0) if info.options else 0
    batch = max(1, FETCH_BATCH_BYTES // max(chunk, 1)) if chunk else 16
    js = store._js
    stream = store._stream
    if stored <= chunk:
        return await _receive_one(store, info.nuid, sink, size)
    consumer = ""
    sub = None
    try:
        created = await js._jsm.add_consumer(
            stream,
            config=api.ConsumerConfig(
                filter_subject=_chunks_subject(store, info.nuid),
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.NONE,
                mem_storage=True,
                # the server drops it by itself if this process goes away mid-transfer
                inactive_threshold=max(stall_s, 1.0) * 2,
            ),
        )
        consumer = created.name
        sub = await js.pull_subscribe_bind(
            stream=stream, name=consumer, pending_bytes_limit=max(FETCH_PENDING_BYTES, 2 * FETCH_BATCH_BYTES)
        )
        left = -1
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=min(1.0, stall_s))
            except TimeoutError:
                msgs = []
            for msg in msgs:
                pending = msg.metadata.num_pending
                if left >= 0 and pending != left - 1:
                    return f"a chunk went missing on the way ({left - pending - 1} of them)"
                left = pending
                await sink.take(msg.data)
                if sink.received > size:
                    return f"more than the {size} bytes expected arrived"
            if progress is not None:
                progress(sink.received, size)
            if left == 0:
                break
            if not msgs and time.monotonic() - sink.last > stall_s:
                return f"nothing arrived for {stall_s:g} s"
        await sink.flush()
        if sink.received != size:
            return f"{sink.received} bytes arrived, {size} were expected"
        return ""
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await sub.unsubscribe()
        if consumer:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await js._jsm.delete_consumer(stream, consumer)


async def _receive_one(store: ObjectStore, nuid: str, sink: _Sink, size: int) -> str:
    """An object of one chunk (most of a bundle's files): one request, no consumer."""
    try:
        msg = await store._js.get_last_msg(store._stream, _chunks_subject(store, nuid))
    except nats.js.errors.NotFoundError:
        return "its chunk is missing from the store"
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await sink.take(msg.data or b"")
    await sink.flush()
    if sink.received != size:
        return f"{sink.received} bytes arrived, {size} were expected"
    return ""


async def read_manifest(store: ObjectStore, sha256: str) -> BundleManifest:
    """A plan's bundle manifest, checked against the checksum the plan names."""
    try:
        obj = await store.get(blob_name(sha256))
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        raise FileTransferError(
            f"the plan's bundle manifest {sha256[:12]} is not in the object store (expired, or "
            "removed): submit the plan again"
        ) from None
    data = obj.data or b""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise FileTransferError(f"the plan's bundle manifest {sha256[:12]} is damaged: submit the plan again")
    try:
        return msgspec.json.decode(data, type=BundleManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FileTransferError(f"the plan's bundle manifest {sha256[:12]} is unreadable: {exc}") from None


async def write_manifest(store: ObjectStore, manifest: BundleManifest) -> str:
    """Store a bundle manifest as a blob; its checksum."""
    data = msgspec.json.encode(manifest)
    sha = hashlib.sha256(data).hexdigest()
    if not await has_object(store, blob_name(sha), sha):
        await put_bytes(store, blob_name(sha), data)
    return sha
