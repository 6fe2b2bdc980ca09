"""This host's cache of model files fetched from the models bucket: where a model's file goes,
whether the copy there is the one wanted, and one fetch at a time per model on this host.

A cached file has a sidecar, `<file>.mesh.json`, with the size, modification time and SHA-256
it had when it arrived checked (a model directory, each of its files' size and mtime): a copy
whose size and mtime still match the sidecar is taken at its word (a 5 GB file is not hashed
again on every load); one that differs is fetched again. Different processes on one host (a
worker per GPU) share the cache: a lock file per model makes the second wait for the first's
fetch, then find the file there.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator

from mesh.settings import Settings

SIDECAR = ".mesh.json"
LOCK_POLL_S = 0.2


def cache_dir(settings: Settings) -> str:
    """Where fetched model files are kept: `model_cache_dir`, or `<data_dir>/models`."""
    return os.path.expanduser(settings.model_cache_dir or os.path.join(settings.data_dir, "models"))


def cached_path(root: str, model: str, file: str) -> str:
    """Where `model`'s file `file` is kept in the cache at `root` ('' for a name that would
    leave it: model names are subject tokens, the file name is only its last part)."""
    base = os.path.basename(file)
    if not base or base in (".", "..") or "/" in model or model in ("", ".", ".."):
        return ""
    return os.path.join(root, model, base)


def _sidecar(path: str) -> str:
    return path + SIDECAR


def is_cached(path: str, size: int, sha256: str) -> bool:
    """Whether `path` holds the file of that size and SHA-256, as its sidecar says (and its
    size and mtime have not changed since)."""
    try:
        st = os.stat(path)
        with open(_sidecar(path), encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(side, dict):
        return False
    return bool(
        st.st_size == size
        and side.get("size") == size
        and side.get("mtime_ns") == st.st_mtime_ns
        and side.get("sha256") == sha256
    )


def mark_cached(path: str, sha256: str) -> None:
    """Write the sidecar of a file just fetched and checked."""
    st = os.stat(path)
    side = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    tmp = _sidecar(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(side, f)
    os.replace(tmp, _sidecar(path))


def is_cached_dir(path: str, sha256: str) -> bool:
    """Whether the directory `path` holds the model directory whose list has that SHA-256, as
    its sidecar says (each file's size and mtime unchanged since)."""
    try:
        with open(_sidecar(path), encoding="utf-8") as f:
            side = json.load(f)
        if not isinstance(side, dict) or side.get("sha256") != sha256:
            return False
        files = side.get("files")
        if not isinstance(files, dict) or not files:
            return False
        for rel, (size, mtime_ns) in files.items():
            st = os.stat(os.path.join(path, rel))
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                return False
    except (OSError, ValueError, TypeError):
        return False
    return True


def mark_cached_dir(path: str, sha256: str, rels: list[str]) -> None:
    """Write the sidecar of a model directory just fetched and checked."""
    files = {}
    for rel in rels:
        st = os.stat(os.path.join(path, rel))
        files[rel] = [st.st_size, st.st_mtime_ns]
    tmp = _sidecar(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"sha256": sha256, "files": files}, f)
    os.replace(tmp, _sidecar(path))


@contextlib.asynccontextmanager
async def fetch_lock(root: str, model: str) -> AsyncIterator[None]:
    """Hold the cache's lock of `model` (other processes on this host wait; a cancel while
    waiting is honoured)."""
    directory = os.path.join(root, model)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # (releases the lock)
