"""Small files stored together (`mesh.bus.files.put_small_many`, a batch's artifacts): one
atomic batch on the object store's stream, read back by the library and by `fetch_file` as any
object; the same name stored again replaces the old chunk, leaving nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE

from mesh.bus.connect import connect
from mesh.bus.files import SmallFile, fetch_file, put_small_many, small_chunk_id
from mesh.bus.publish import ATOMIC_ID, Bus
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.integration


async def _bus(server: EmbeddedServer) -> Bus:
    bus = await connect(load_settings(server=server.url, environ={}), "test-small-objects", wait_s=10)
    await bus.ensure_resources()
    return bus


def _files(n: int, tag: str) -> list[SmallFile]:
    return [
        SmallFile(f"artifacts/p/t{i}/1/t{i}.npy", f"{tag} {i} ".encode() * (i + 1), f"t{i}.npy", 0o640)
        for i in range(n)
    ]


async def test_small_files_go_as_one_atomic_batch_and_read_back_as_objects(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    bus = await _bus(nats_server)
    try:
        store = await bus.objects()
        files = _files(12, "first")
        refs = await put_small_many(store, bus.publish_many, files)
        for f, ref in zip(files, refs, strict=True):
            assert (ref.path, ref.object, ref.mode) == (f.rel, f.name, 0o640)
            assert (ref.size, ref.sha256) == (len(f.data), hashlib.sha256(f.data).hexdigest())
            got = await store.get(f.name)
            assert got.data == f.data, "the library reads it as any object"
            assert got.info.digest and got.info.size == len(f.data)
            dest = tmp_path / f.rel
            await fetch_file(store, f.name, str(dest), sha256=ref.sha256, size=ref.size)
            assert dest.read_bytes() == f.data, "a dependent's fetch checks and places it"
        # every chunk and entry of them in one atomic batch
        stream = f"OBJ_{bus.names.objects_bucket}"
        info = await bus.js.stream_info(stream)
        assert info.state.messages == 2 * len(files)
        batches = set()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            stored = await bus.js.get_msg(stream, seq)
            batches.add((stored.headers or {}).get(ATOMIC_ID))
        assert len(batches) == 1 and None not in batches, batches
    finally:
        await bus.close()


async def test_storing_a_name_again_replaces_its_chunk_and_leaves_nothing_behind(
    nats_server: EmbeddedServer,
) -> None:
    bus = await _bus(nats_server)
    try:
        store = await bus.objects()
        stream = f"OBJ_{bus.names.objects_bucket}"
        await put_small_many(store, bus.publish_many, _files(9, "first"))
        again = _files(9, "second")  # the same attempt run again: the same names, new bytes
        await put_small_many(store, bus.publish_many, again)
        for f in again:
            assert (await store.get(f.name)).data == f.data
            subject = OBJ_CHUNKS_PRE_TEMPLATE.format(
                bucket=bus.names.objects_bucket, obj=small_chunk_id(f.name)
            )
            chunks = await bus.js.stream_info(stream, subjects_filter=subject)
            assert chunks.state.subjects == {subject: 1}, "the old chunk is rolled up"
        info = await bus.js.stream_info(stream)
        assert info.state.messages == 2 * len(again), "one chunk and one entry per name"
    finally:
        await bus.close()
