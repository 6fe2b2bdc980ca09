"""A plan's bundle through the object store: its files stored once each under their checksum,
listed in a manifest, and put back in a directory on the host that runs its tasks.

`send_bundle` (at submit) hashes each file, stores it as a blob unless the store holds those
bytes already (`mesh.bus.files.put_blob`: the same file is stored once whatever plan sends it;
a copy old enough to expire soon is stored afresh), and stores the `BundleManifest` (path,
size, SHA-256, mode of each); the manifest's checksum is what the plan carries
(`PlanSpec.bundle`). `materialise` (on a worker) reads the manifest back, checks each path
(`safe_relpath`), keeps a file already there with the same size and checksum, and fetches the
others (`fetch_file`: checked, retried, never a bad copy left in place).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.js.errors
from nats.js.object_store import ObjectStore

from mesh.bus.files import (
    BundleManifest,
    FileTransferError,
    blob_name,
    fetch_file,
    put_blob,
    put_bytes,
    put_file,
    read_manifest,
    safe_relpath,
    sha256_file,
    write_manifest,
)
from mesh.events import FileRef

# files hashed and sent (or fetched) at once
PARALLEL = 4


@dataclass(frozen=True)
class SentBundle:
    """What `send_bundle` did: the manifest's checksum ('' : no files), the files and bytes in
    the bundle, how many of them the store held already, and how long it took."""

    sha256: str = ""
    files: int = 0
    size: int = 0
    already: int = 0
    took_s: float = 0.0


@dataclass(frozen=True)
class Materialised:
    """What `materialise` did: files fetched (and their bytes), files already in place."""

    fetched: int = 0
    fetched_bytes: int = 0
    kept: int = 0


def _file_ref(rel: str, path: str) -> FileRef:
    """The file's ref, from its bytes now (blocking: run it in a thread)."""
    try:
        mode = os.stat(path).st_mode & 0o777
        sha, size = sha256_file(path)
    except OSError as exc:
        raise FileTransferError(f"cannot read {path}: {exc.strerror or exc}") from None
    return FileRef(path=rel, size=size, sha256=sha, mode=mode)


async def _stored_since(store: ObjectStore, name: str) -> float | None:
    """How many seconds ago the store took object `name` (None: it has none; 0 : unknown)."""
    try:
        info = await store.get_info(name)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        return None
    try:
        return max(0.0, time.time() - datetime.fromisoformat(info.mtime or "").timestamp())
    except ValueError:
        return 0.0


async def send_bundle(
    store: ObjectStore, files: Sequence[tuple[str, str]], *, refresh_after_s: float = float("inf")
) -> SentBundle:
    """Store `files` ((relative path, path on this host) pairs) and their manifest. A file the
    store took more than `refresh_after_s` ago is stored again: the store's copies expire (its
    TTL), and the plan's tasks may run long after it is submitted."""
    if not files:
        return SentBundle()
    began = time.monotonic()
    gate = asyncio.Semaphore(PARALLEL)

    async def one(rel: str, path: str) -> tuple[FileRef, bool]:
        async with gate:
            ref = await asyncio.to_thread(_file_ref, rel, path)
            since = await _stored_since(store, blob_name(ref.sha256))
            if since is None or since <= refresh_after_s:
                return ref, await put_blob(store, path, ref.sha256)
            stored = await put_file(store, blob_name(ref.sha256), path)
            if stored.sha256 != ref.sha256:
                raise FileTransferError(f"{path} changed while it was being stored: submit again")
            return ref, True

    results = await asyncio.gather(*(one(rel, path) for rel, path in files), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    done = [r for r in results if not isinstance(r, BaseException)]
    refs = tuple(sorted((ref for ref, _ in done), key=lambda r: r.path))
    manifest = BundleManifest(files=refs)
    data = msgspec.json.encode(manifest)
    since = await _stored_since(store, blob_name(hashlib.sha256(data).hexdigest()))
    if since is not None and since > refresh_after_s:
        await put_bytes(store, blob_name(hashlib.sha256(data).hexdigest()), data)
    sha = await write_manifest(store, manifest)
    return SentBundle(
        sha256=sha,
        files=len(refs),
        size=sum(r.size for r in refs),
        already=sum(1 for _, sent in done if not sent),
        took_s=time.monotonic() - began,
    )


def _in_place(dest: str, ref: FileRef) -> bool:
    """Whether `dest` holds the file already (same size and checksum); its mode made right."""
    try:
        st = os.stat(dest)
        if st.st_size != ref.size or sha256_file(dest)[0] != ref.sha256:
            return False
        if st.st_mode & 0o777 != ref.mode & 0o777:
            os.chmod(dest, ref.mode & 0o777)
    except OSError:
        return False
    return True


async def materialise(store: ObjectStore, sha256: str, directory: str) -> Materialised:
    """Put the files of the bundle whose manifest is `sha256` under `directory` (which exists).
    Raises `FileTransferError` saying which file could not be had and what to do."""
    manifest = await read_manifest(store, sha256)
    real = os.path.realpath(directory)
    gate = asyncio.Semaphore(PARALLEL)

    async def one(ref: FileRef) -> tuple[int, int]:
        rel = safe_relpath(ref.path)
        if not rel:
            raise FileTransferError(f"the plan's bundle names a path outside its directory ({ref.path!r})")
        dest = os.path.join(directory, rel)
        # a link a task left in the way must not send the file elsewhere
        parent = os.path.realpath(os.path.dirname(dest))
        if parent != real and not parent.startswith(real + os.sep):
            raise FileTransferError(f"{os.path.dirname(dest)} leads out of the work directory {directory}")
        async with gate:
            if await asyncio.to_thread(_in_place, dest, ref):
                return 0, 0
            try:
                await fetch_file(
                    store, blob_name(ref.sha256), dest, sha256=ref.sha256, size=ref.size, mode=ref.mode
                )
            except FileTransferError as exc:
                raise FileTransferError(f"the plan's file {rel} could not be fetched: {exc}") from None
            return 1, ref.size

    results = await asyncio.gather(*(one(ref) for ref in manifest.files), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    done = [r for r in results if not isinstance(r, BaseException)]
    fetched = sum(n for n, _ in done)
    return Materialised(fetched=fetched, fetched_bytes=sum(b for _, b in done), kept=len(done) - fetched)
