"""`mesh.bus.files.fetch_file` against a real server: a good copy lands whole, a bad one never.

Damage is done to the store itself: chunks deleted from the object's stream (a truncated or
vanished transfer), a checksum that does not match, chunks that come back only after a stall.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.object_store import ObjectStore

import nats
from mesh.bus import files
from mesh.bus.files import CHUNK_BYTES, FileTransferError, fetch_file, put_file
from mesh.ops.embedded import EmbeddedServer

BUCKET = "test-files"
STREAM = f"OBJ_{BUCKET}"


@pytest.fixture
async def store(nats_server: EmbeddedServer) -> AsyncIterator[ObjectStore]:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=1)
    try:
        yield await nc.jetstream().create_object_store(BUCKET)
    finally:
        await nc.close()


def random_file(path: Path, size: int) -> tuple[str, int]:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), size


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def chunks_subject(store: ObjectStore, name: str) -> str:
    info = await store.get_info(name)
    return f"$O.{BUCKET}.C.{info.nuid}"


async def test_a_good_copy_lands_whole_with_its_mode(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    # several chunks, and a last one that is not full
    sha, size = random_file(src, 5 * CHUNK_BYTES + 1234)
    ref = await put_file(store, "artifacts/p/t/1/src.bin", str(src))
    assert (ref.sha256, ref.size) == (sha, size)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "out"
    got = await fetch_file(
        store,
        ref.object,
        str(out / "dir" / "copy.bin"),
        sha256=sha,
        size=size,
        mode=0o750,
        progress=lambda d, t: seen.append((d, t)),
    )
    copy = out / "dir" / "copy.bin"
    assert copy.read_bytes() == src.read_bytes()
    assert (got.size, got.tries) == (size, 1)
    assert copy.stat().st_mode & 0o777 == 0o750
    assert seen[-1] == (size, size)
    assert leftovers(out / "dir") == ["copy.bin"]
    # the fetch's own consumer went with it
    assert (await store._js.stream_info(STREAM)).state.consumer_count == 0


async def test_an_empty_file_is_fetched_too(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    sha, size = random_file(src, 0)
    await put_file(store, "empty", str(src))
    await fetch_file(store, "empty", str(tmp_path / "copy"), sha256=sha, size=size)
    assert (tmp_path / "copy").read_bytes() == b""


async def test_a_copy_that_differs_from_its_checksum_is_retried_then_refused(
    store: ObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src.bin"
    _, size = random_file(src, 3 * CHUNK_BYTES)
    await put_file(store, "obj", str(src))
    out = tmp_path / "out"
    with (
        caplog.at_level(logging.WARNING, logger="mesh.bus.files"),
        pytest.raises(FileTransferError, match="checksum differs"),
    ):
        await fetch_file(store, "obj", str(out / "copy.bin"), sha256="0" * 64, size=size, attempts=3)
    assert len([r for r in caplog.records if "try" in r.getMessage()]) == 3
    assert leftovers(out) == []


async def test_a_missing_object_is_said_at_once(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileTransferError, match="has no object nope"):
        await fetch_file(store, "nope", str(tmp_path / "out" / "copy"), sha256="0" * 64, size=1)
    assert leftovers(tmp_path / "out") == []


async def test_a_copy_of_another_size_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    sha, _ = random_file(src, 1000)
    await put_file(store, "obj", str(src))
    with pytest.raises(FileTransferError, match="1000 bytes, 2000 were expected"):
        await fetch_file(store, "obj", str(tmp_path / "out" / "copy"), sha256=sha, size=2000, attempts=2)
    assert leftovers(tmp_path / "out") == []


async def test_a_truncated_object_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    sha, size = random_file(src, 4 * CHUNK_BYTES)
    await put_file(store, "obj", str(src))
    # the store lost the object's last chunk
    js = store._js
    last = await js.get_last_msg(STREAM, await chunks_subject(store, "obj"))
    await js.delete_msg(STREAM, last.seq)
    with pytest.raises(FileTransferError, match=f"{3 * CHUNK_BYTES} bytes arrived, {size} were expected"):
        await fetch_file(store, "obj", str(tmp_path / "out" / "copy"), sha256=sha, size=size, attempts=2)
    assert leftovers(tmp_path / "out") == []


async def test_a_transfer_where_nothing_arrives_is_given_up(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    sha, size = random_file(src, 2 * CHUNK_BYTES)
    await put_file(store, "obj", str(src))
    await store._js.purge_stream(STREAM, subject=await chunks_subject(store, "obj"))
    with pytest.raises(FileTransferError, match=r"nothing arrived for 0\.3 s"):
        await fetch_file(
            store, "obj", str(tmp_path / "out" / "copy"), sha256=sha, size=size, attempts=2, stall_s=0.3
        )
    assert leftovers(tmp_path / "out") == []


class Restore(logging.Handler):
    """When a fetch says its try failed, put the object's chunks back (from another connection,
    before the next try starts)."""

    def __init__(self, url: str, subject: str, data: bytes) -> None:
        super().__init__(logging.WARNING)
        self.url, self.subject, self.data = url, subject, data
        self.restored = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.restored:
            return

        async def publish() -> None:
            nc = await nats.connect(self.url, max_reconnect_attempts=1)
            js = nc.jetstream()
            for at in range(0, len(self.data), CHUNK_BYTES):
                await js.publish(self.subject, self.data[at : at + CHUNK_BYTES], stream=STREAM)
            await nc.close()

        thread = threading.Thread(target=lambda: asyncio.run(publish()))
        thread.start()
        thread.join(60)
        self.restored += 1


async def test_a_stalled_transfer_is_tried_again(
    store: ObjectStore, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    sha, size = random_file(src, 3 * CHUNK_BYTES + 7)
    await put_file(store, "obj", str(src))
    subject = await chunks_subject(store, "obj")
    await store._js.purge_stream(STREAM, subject=subject)
    restore = Restore(nats_server.url, subject, src.read_bytes())
    logging.getLogger("mesh.bus.files").addHandler(restore)
    try:
        got = await fetch_file(
            store, "obj", str(tmp_path / "out" / "copy"), sha256=sha, size=size, attempts=2, stall_s=0.3
        )
    finally:
        logging.getLogger("mesh.bus.files").removeHandler(restore)
    assert restore.restored == 1
    assert got.tries == 2
    assert (tmp_path / "out" / "copy").read_bytes() == src.read_bytes()
    assert leftovers(tmp_path / "out") == ["copy"]


async def test_many_small_write_batches_land_in_order(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batches of one chunk, two of them ahead of the disk: the writer thread in order
    monkeypatch.setattr(files, "WRITE_BATCH_BYTES", CHUNK_BYTES)
    monkeypatch.setattr(files, "WRITE_AHEAD", 1)
    src = tmp_path / "src.bin"
    sha, size = random_file(src, 9 * CHUNK_BYTES + 3)
    await put_file(store, "obj", str(src))
    await fetch_file(store, "obj", str(tmp_path / "copy"), sha256=sha, size=size)
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()


async def test_an_object_of_one_chunk_comes_in_one_request(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "small"
    sha, size = random_file(src, 1000)
    await put_file(store, "small", str(src))
    await fetch_file(store, "small", str(tmp_path / "out" / "copy"), sha256=sha, size=size)
    assert (tmp_path / "out" / "copy").read_bytes() == src.read_bytes()
    # and without its chunk it is refused
    await store._js.purge_stream(STREAM, subject=await chunks_subject(store, "small"))
    with pytest.raises(FileTransferError, match="its chunk is missing"):
        await fetch_file(store, "small", str(tmp_path / "out" / "again"), sha256=sha, size=size, attempts=2)
    assert leftovers(tmp_path / "out") == ["copy"]


async def test_a_worker_may_fetch_what_the_cli_stored(tmp_path: Path) -> None:
    """With mesh's users and permissions: a worker's user reads the objects bucket only, and that
    is enough for a fetch (its own consumer, pulled and deleted; a one-chunk object's message)."""
    from mesh.bus.connect import connect
    from mesh.host.config import load_settings
    from tests.test_security import WORKER, Secure

    secure = Secure(tmp_path)
    secure.server.start()
    try:
        cli = await connect(load_settings(environ=secure.env("cli")), "test-cli", wait_s=10)
        worker = await connect(load_settings(environ=secure.env(WORKER)), WORKER, wait_s=10)
        try:
            await cli.ensure_resources()
            src = tmp_path / "src.bin"
            for size in (3 * CHUNK_BYTES + 5, 100):
                sha, _ = random_file(src, size)
                ref = await put_file(await cli.objects(), f"blobs/{sha}", str(src))
                dest = tmp_path / "out" / sha
                await fetch_file(await worker.objects(), ref.object, str(dest), sha256=sha, size=size)
                assert dest.read_bytes() == src.read_bytes()
        finally:
            await worker.close()
            await cli.close()
    finally:
        secure.server.stop()
