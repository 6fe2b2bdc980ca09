"""Model files in the models bucket: what `mesh models push` stores, and the record of what is
current for each model, which a worker whose host lacks the file fetches from (docs/multihost.md).

A model's file is the object `<model>/<file name>` (chunked and checksummed by the store, as
`mesh.bus.files` puts it; a model directory, each of its files under `<model>/<directory>/`);
beside it the JSON object `<model>/current`, a `ModelRecord`, says which is current, with
sizes and SHA-256s. The record is written after the file, so
a reader never finds a record whose object is not there yet; a worker checks what arrives
against the record, never against the object's own metadata alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js.object_store import ObjectStore

from mesh.bus.files import FileTransferError, Progress, has_object, put_bytes, put_file, sha256_file
from mesh.bus.publish import Bus
from mesh.events import FileRef

RECORD = "current"


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What is current for a model in the models bucket."""

    model: str
    # the object holding the file, the file's name as pushed, its size and SHA-256 (hex)
    object: str
    file: str
    size: int
    sha256: str
    pushed_at: float = 0.0
    # the host it was pushed from
    host: str = ""
    # a model that is a directory (a transcription or embedding model): its files, paths
    # relative to it, each its own object `<model>/<directory>/<path>`; then `file` is the
    # directory's name, `object` is empty, `size` their sum and `sha256` the list's
    # (`manifest_sha256`)
    files: tuple[FileRef, ...] = ()

    @property
    def objects(self) -> tuple[str, ...]:
        """The objects that hold this record's bytes."""
        return tuple(f.object for f in self.files) if self.files else (self.object,)


def manifest_sha256(files: tuple[FileRef, ...]) -> str:
    """A directory's identity: the SHA-256 of its files' list (paths, sizes, checksums) as JSON."""
    return hashlib.sha256(msgspec.json.encode(files)).hexdigest()


def _hash_dir(path: str) -> list[tuple[str, str, str, int, int]]:
    """Every regular file under `path`: (relative path, path, SHA-256, size, mode), sorted."""
    out = []
    for top, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(top, name)
            if not os.path.isfile(full):
                continue
            sha, size = sha256_file(full)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            out.append((rel, full, sha, size, os.stat(full).st_mode & 0o777))
    return out


def record_name(model: str) -> str:
    return f"{model}/{RECORD}"


def object_name(model: str, file: str) -> str:
    return f"{model}/{file}"


async def models_store(bus: Bus, create: bool = False) -> ObjectStore | None:
    """The models bucket; None when there is none yet and `create` is false (a worker may only
    read it: creating it is the CLI's)."""
    if create:
        return await bus.models()
    try:
        return await bus.js.object_store(bus.names.models_bucket)
    except nats.js.errors.BucketNotFoundError:
        return None


async def read_record(store: ObjectStore, model: str) -> ModelRecord | None:
    """The model's record; None when the model was never pushed. A record that does not decode
    is an error (it would otherwise look like a model never pushed)."""
    try:
        obj = await store.get(record_name(model))
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
        return None
    try:
        return msgspec.json.decode(obj.data or b"", type=ModelRecord)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FileTransferError(f"the models bucket's record of {model!r} is unreadable: {exc}") from None


async def read_records(store: ObjectStore) -> dict[str, ModelRecord]:
    """Every model's record, by model."""
    try:
        infos = await store.list()
    except nats.js.errors.NotFoundError:
        return {}
    out: dict[str, ModelRecord] = {}
    for info in infos:
        model, _, last = info.name.rpartition("/")
        if last != RECORD or not model or info.deleted:
            continue
        record = await read_record(store, model)
        if record is not None:
            out[model] = record
    return out


async def push_model(
    store: ObjectStore,
    model: str,
    path: str,
    *,
    host: str = "",
    progress: Progress | None = None,
    hashed: tuple[str, int] | None = None,
) -> tuple[ModelRecord, bool]:
    """Store the model file at `path` for `model` and make it current; the record, and whether
    any bytes were sent (not when the store holds these bytes as the model's current file
    already). `hashed`: the file's (SHA-256, size), when the caller read it already."""
    if os.path.isdir(path):
        return await _push_dir(store, model, path, host=host, progress=progress)
    if not os.path.isfile(path):
        raise FileTransferError(f"{path} is not a file")
    if hashed is None:
        hashed = await asyncio.to_thread(sha256_file, path)
    sha, size = hashed
    file = os.path.basename(path)
    name = object_name(model, file)
    current = await read_record(store, model)
    if (
        current is not None
        and current.sha256 == sha
        and current.size == size
        and await has_object(store, current.object, sha)
    ):
        return current, False
    ref = await put_file(store, name, path, description=f"model {model}", progress=progress)
    if ref.sha256 != sha or ref.size != size:
        raise FileTransferError(f"{path} changed while it was being stored: push it again")
    record = ModelRecord(
        model=model, object=name, file=file, size=size, sha256=sha, pushed_at=time.time(), host=host
    )
    await _make_current(store, record, current)
    return record, True


async def _make_current(store: ObjectStore, record: ModelRecord, current: ModelRecord | None) -> None:
    """Write the record; then remove what only the record it replaces pointed at."""
    await put_bytes(store, record_name(record.model), msgspec.json.encode(record))
    if current is None:
        return
    for name in set(current.objects) - set(record.objects):
        with contextlib.suppress(nats.js.errors.NotFoundError, nats.errors.Error):
            await store.delete(name)


async def _push_dir(
    store: ObjectStore, model: str, path: str, *, host: str, progress: Progress | None
) -> tuple[ModelRecord, bool]:
    """Store a model directory file by file (a file the store holds already is not sent)."""
    entries = await asyncio.to_thread(_hash_dir, path)
    if not entries:
        raise FileTransferError(f"{path} holds no files")
    base = os.path.basename(os.path.normpath(path))
    refs = tuple(
        FileRef(path=rel, size=size, sha256=sha, object=object_name(model, f"{base}/{rel}"), mode=mode)
        for rel, _, sha, size, mode in entries
    )
    sha = manifest_sha256(refs)
    total = sum(r.size for r in refs)
    current = await read_record(store, model)
    if (
        current is not None
        and current.sha256 == sha
        and current.file == base
        and all([await has_object(store, f.object, f.sha256) for f in current.files])
    ):
        return current, False
    done = 0
    for ref, (_, full, *_) in zip(refs, entries, strict=True):
        if not await has_object(store, ref.object, ref.sha256):
            before = done
            told = None if progress is None else (lambda d, _t, b=before: progress(b + d, total))
            sent = await put_file(
                store, ref.object, full, rel=ref.path, description=f"model {model}", progress=told
            )
            if sent.sha256 != ref.sha256:
                raise FileTransferError(f"{full} changed while it was being stored: push it again")
        done += ref.size
        if progress is not None:
            progress(done, total)
    record = ModelRecord(
        model=model,
        object="",
        file=base,
        size=total,
        sha256=sha,
        pushed_at=time.time(),
        host=host,
        files=refs,
    )
    await _make_current(store, record, current)
    return record, True
