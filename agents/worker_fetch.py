"""A model's file for a worker to load: on this host (its `path` or `source`), or fetched once
from the models bucket into this host's model cache when the host lacks it.

`ModelFiles.ready` answers the spec to load: unchanged when the file is here, else with `path`
set to the cached copy, fetched first if the cache has no good copy (checked by size and
SHA-256 against the bucket's record; a bad transfer is retried and never kept). While it
fetches, the caller's `on_progress` hears how far it got (the GPU's `fetching` state).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors

from agents.base import Agent
from mesh.bus.files import FileTransferError, fetch_file, safe_relpath
from mesh.bus.modelstore import ModelRecord, models_store, read_record
from mesh.host.modelcache import (
    cache_dir,
    cached_path,
    fetch_lock,
    is_cached,
    is_cached_dir,
    mark_cached,
    mark_cached_dir,
)
from mesh.host.modelfiles import resolve_path
from mesh.models import ModelError, ModelSpec

log = logging.getLogger("mesh.worker")

# how often the progress of a fetch is told (seconds)
PROGRESS_EVERY_S = 1.0


class ModelFiles:
    """Where the models a worker loads come from."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.root = cache_dir(agent.settings)
        # one fetch per model in this process (the cache's lock covers the other processes)
        self._locks: dict[str, asyncio.Lock] = {}

    async def ready(
        self,
        name: str,
        spec: ModelSpec,
        on_fetch: Callable[[float], None],
    ) -> ModelSpec:
        """The spec to load `name` from. `on_fetch(progress)` is called when a fetch starts
        (0.0), as it goes, and when it ended well (1.0). Raises ModelError."""
        if spec.backend == "openai" and not any("{model_path}" in arg for arg in spec.command):
            return spec  # a server's model: no file here
        try:
            await asyncio.to_thread(resolve_path, name, spec)
            return spec
        except ModelError as missing:
            record = await self._record(name, missing)
            if record is None:
                raise ModelError(
                    f"{missing}; nor is it in the models bucket (`mesh models push {name} FILE` stores it)"
                ) from None
        try:
            path = await self._cached(name, record, on_fetch)
        except (FileTransferError, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise ModelError(f"model {name!r}: fetching it from the models bucket failed: {exc}") from None
        return msgspec.structs.replace(spec, path=path, source="")

    async def _record(self, name: str, missing: ModelError) -> ModelRecord | None:
        try:
            store = await models_store(self.agent.bus)
            return None if store is None else await read_record(store, name)
        except (FileTransferError, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise ModelError(f"{missing}; and the models bucket cannot be read: {exc}") from None

    async def _cached(self, name: str, record: ModelRecord, on_fetch: Callable[[float], None]) -> str:
        """The cached copy of the record's file, fetched unless a good copy is there."""
        path = cached_path(self.root, name, record.file)
        if not path:
            raise ModelError(f"model {name!r}: the models bucket names a file {record.file!r} it cannot keep")
        if self._have(path, record):
            return path
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                async with fetch_lock(self.root, name):
                    if self._have(path, record):
                        return path  # another worker of this host fetched it meanwhile
                    if record.files:
                        await self._fetch_dir(name, record, path, on_fetch)
                    else:
                        await self._fetch(name, record, path, on_fetch)
            except OSError as exc:
                raise ModelError(f"model {name!r}: cannot use the model cache {self.root}: {exc}") from None
        return path

    @staticmethod
    def _have(path: str, record: ModelRecord) -> bool:
        if record.files:
            return is_cached_dir(path, record.sha256)
        return is_cached(path, record.size, record.sha256)

    async def _fetch_dir(
        self, name: str, record: ModelRecord, path: str, on_fetch: Callable[[float], None]
    ) -> None:
        """Fetch a model directory into a temporary one beside `path`, file by file (each
        checked), and put it in place only when every file arrived."""
        store = await models_store(self.agent.bus)
        if store is None:
            raise ModelError(f"model {name!r}: the models bucket is gone")
        rels = [safe_relpath(f.path) for f in record.files]
        if not all(rels):
            raise ModelError(f"model {name!r}: the models bucket's record names a path outside its directory")
        log.info(
            "fetching %s (%d files, %.1f MB) from the models bucket into %s",
            name,
            len(rels),
            record.size / 1e6,
            path,
        )
        on_fetch(0.0)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part-{secrets.token_hex(4)}")
        began, done, told = time.monotonic(), 0, [0.0]

        def progress(got: int, _total: int) -> None:
            now = time.monotonic()
            if now - told[0] >= PROGRESS_EVERY_S and record.size:
                told[0] = now
                on_fetch(min(1.0, (done + got) / record.size))

        try:
            for ref, rel in zip(record.files, rels, strict=True):
                await fetch_file(
                    store,
                    ref.object,
                    os.path.join(tmp, rel),
                    sha256=ref.sha256,
                    size=ref.size,
                    mode=ref.mode or 0o644,
                    progress=progress,
                )
                done += ref.size
            await asyncio.to_thread(_replace_dir, tmp, path)
        except FileTransferError as exc:
            raise ModelError(f"model {name!r}: {exc}") from None
        finally:
            if os.path.exists(tmp):
                await asyncio.to_thread(shutil.rmtree, tmp, True)
        on_fetch(1.0)
        await asyncio.to_thread(mark_cached_dir, path, record.sha256, rels)
        took = time.monotonic() - began
        log.info("fetched %s in %.1fs (%.1f MB/s)", name, took, record.size / 1e6 / max(took, 1e-6))

    async def _fetch(
        self, name: str, record: ModelRecord, path: str, on_fetch: Callable[[float], None]
    ) -> None:
        store = await models_store(self.agent.bus)
        if store is None:
            raise ModelError(f"model {name!r}: the models bucket is gone")
        log.info("fetching %s (%.1f MB) from the models bucket into %s", name, record.size / 1e6, path)
        on_fetch(0.0)
        told = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - told[0] >= PROGRESS_EVERY_S and total:
                told[0] = now
                on_fetch(min(1.0, done / total))

        try:
            got = await fetch_file(
                store, record.object, path, sha256=record.sha256, size=record.size, progress=progress
            )
        except FileTransferError as exc:
            raise ModelError(f"model {name!r}: {exc}") from None
        on_fetch(1.0)
        await asyncio.to_thread(mark_cached, path, record.sha256)
        log.info(
            "fetched %s in %.1fs (%.1f MB/s, tries: %d)",
            name,
            got.took_s,
            record.size / 1e6 / max(got.took_s, 1e-6),
            got.tries,
        )


def _replace_dir(tmp: str, path: str) -> None:
    """Put the fetched directory `tmp` at `path`, instead of what was there."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)
    os.replace(tmp, path)
