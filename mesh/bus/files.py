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
import contextlib
import hashlib
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.js.errors
from nats.js import api
from nats.js.object_store import ObjectStore

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


async def put_bytes(store: ObjectStore, name: str, data: bytes) -> api.ObjectInfo:
    """Store `data` as object `name`."""
    meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
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
    """Where the store's reader writes a fetched object: the temporary file, hashed as it goes."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()
        self.written = 0
        self.last = time.monotonic()

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.hash.update(data)
        self.written += len(data)
        self.last = time.monotonic()
        return len(data)


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
                why = await _receive(store, name, sink, size, progress, stall_s)
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


async def _receive(
    store: ObjectStore, name: str, sink: _Sink, size: int, progress: Progress | None, stall_s: float
) -> str:
    """Stream the object into `sink`; '' when it all arrived, else why not."""
    get = asyncio.ensure_future(store.get(name, writeinto=sink))  # type: ignore[arg-type]
    try:
        while True:
            done, _ = await asyncio.wait({get}, timeout=min(1.0, stall_s))
            if progress is not None:
                progress(sink.written, size)
            if done:
                break
            if time.monotonic() - sink.last > stall_s:
                return f"nothing arrived for {stall_s:.0f} s"
        get.result()
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        raise FileTransferError(f"the store has no object {name}") from None
    except nats.js.errors.DigestMismatchError:
        return "the store's own checksum does not match what arrived"
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if not get.done():
            get.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await get
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
