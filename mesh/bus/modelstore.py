"""Model files in the models bucket: what `mesh models push` stores, and the record of what is
current for each model, which a worker whose host lacks the file fetches from (docs/multihost.md).

A model's file is the object `<model>/<file name>` (chunked and checksummed by the store, as
`mesh.bus.files` puts it); beside it the JSON object `<model>/current`, a `ModelRecord`, says
which object is current, with its size and SHA-256. The record is written after the file, so
a reader never finds a record whose object is not there yet; a worker checks what arrives
against the record, never against the object's own metadata alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js.object_store import ObjectStore

from mesh.bus.files import FileTransferError, Progress, has_object, put_bytes, put_file, sha256_file
from mesh.bus.publish import Bus

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
        raise FileTransferError(
            f"{path} is a directory: `mesh models push` stores one file (a GGUF); copy a model "
            "directory to each host and set models.<name>.path there"
        )
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
    await put_bytes(store, record_name(model), msgspec.json.encode(record))
    if current is not None and current.object != name:
        # the file it replaces (another name): nothing points at it any more
        with contextlib.suppress(nats.js.errors.NotFoundError, nats.errors.Error):
            await store.delete(current.object)
    return record, True
