"""Models that travel: `mesh models push` stores a model file in the models bucket, and a worker
whose host lacks it fetches it once into its model cache, checked, before loading it.

A real nats-server throughout. The worker test runs a real brain and a real CPU model worker
(the shipped Gemma 3 270M), on a registry that names the model at a path that does not exist
on the worker's "host" (its own data dir, so its own model cache). The cache's own rules (one
fetch for concurrent loads, a copy reused while its sidecar holds, a damaged object never
kept) are tested on `ModelFiles` directly, without a worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from agents.worker_fetch import ModelFiles
from mesh.bus.files import put_bytes
from mesh.bus.modelstore import models_store, push_model, read_record
from mesh.host.config import load_settings
from mesh.host.modelcache import cached_path
from mesh.host.modelfiles import resolve_path
from mesh.models import ModelError, ModelSpec, builtin_models
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.test_model_workers import all_succeeded, finished, gpu_states, start

pytestmark = pytest.mark.integration

GEMMA = "gemma3-270m"
EMBED = "all-minilm-l6-v2"


def _sha(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _registry(tmp: Path, *names: str) -> Path:
    """A config that declares `names` as LLMs whose file is at a path this host lacks."""
    config = tmp / "mesh.toml"
    config.write_text(
        "".join(
            f'[models.{name}]\nkind = "llm"\npath = "{tmp}/nowhere/{name}.gguf"\nvram_mb = 600\n'
            'n_ctx = 512\nmax_tokens = 8\nchat_format = "gemma"\n\n'
            for name in names
        )
    )
    return config


def _files(mesh: Mesh, data: Path) -> ModelFiles:
    """A worker's model files, as a worker on a host whose data dir is `data` has them."""
    settings = load_settings(environ={**mesh.env, "MESH_MODEL_CACHE_DIR": str(data / "models")})

    class Agent:
        def __init__(self) -> None:
            self.settings = settings

        @property
        def bus(self) -> Any:
            return mesh._bus

    return ModelFiles(cast(Any, Agent()))


async def test_a_cached_model_is_fetched_once_reused_and_a_damaged_one_never_kept(
    mesh: Mesh, tmp_path: Path
) -> None:
    bus = await mesh.bus()
    store = await models_store(bus, create=True)
    assert store is not None
    original = tmp_path / "tiny.gguf"
    original.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    record, sent = await push_model(store, "tiny", str(original), host="a")
    assert sent and record.sha256 == _sha(original)
    # the same bytes again: nothing sent
    again, sent = await push_model(store, "tiny", str(original), host="a")
    assert not sent and again == record

    spec = ModelSpec(kind="llm", path=str(tmp_path / "nowhere" / "tiny.gguf"))
    # two processes of one host load it at once (each its own ModelFiles, one cache): one fetch
    data = tmp_path / "host-b"
    fetches: list[float] = []
    first, second = _files(mesh, data), _files(mesh, data)
    got = await asyncio.gather(
        first.ready("tiny", spec, fetches.append), second.ready("tiny", spec, fetches.append)
    )
    assert got[0].path == got[1].path == cached_path(first.root, "tiny", "tiny.gguf")
    assert fetches.count(0.0) == 1, fetches
    assert _sha(got[0].path) == record.sha256
    assert got[0].source == ""
    # a later load reuses the copy (its sidecar holds); a copy changed since is fetched again
    fetches.clear()
    assert (await first.ready("tiny", spec, fetches.append)).path == got[0].path
    assert fetches == []
    with open(got[0].path, "r+b") as f:
        f.write(b"X")
    await first.ready("tiny", spec, fetches.append)
    assert fetches.count(0.0) == 1 and _sha(got[0].path) == record.sha256

    # the object replaced behind the record's back (same size, other bytes): never kept
    await put_bytes(store, record.object, os.urandom(record.size))
    other = _files(mesh, tmp_path / "host-c")
    with pytest.raises(ModelError, match=r"checksum differs from the one recorded.*nothing was kept"):
        await other.ready("tiny", spec, fetches.append)
    left = os.listdir(os.path.dirname(cached_path(other.root, "tiny", "tiny.gguf")))
    assert [f for f in left if f != ".lock"] == [], left
    # ...nor one cut short
    await put_bytes(store, record.object, os.urandom(record.size // 2))
    with pytest.raises(ModelError, match=f"{record.size // 2} bytes, {record.size} were expected"):
        await other.ready("tiny", spec, fetches.append)
    # a model nobody pushed: what to do
    with pytest.raises(ModelError, match=r"nor is it in the models bucket.*mesh models push ghost"):
        await other.ready("ghost", spec, fetches.append)


@pytest.mark.models
async def test_a_pushed_model_is_fetched_and_loaded_on_a_host_that_lacked_it(
    mesh: Mesh, tmp_path: Path
) -> None:
    gemma = resolve_path(GEMMA, builtin_models()[GEMMA])
    config = _registry(tmp_path, "remote", "damaged")
    # and the embedding model, a directory
    embed = resolve_path(EMBED, builtin_models()[EMBED])
    config.write_text(
        config.read_text() + f'[models.far-embed]\nkind = "embed"\npath = "{tmp_path}/nowhere/minilm"\n'
    )
    mesh.env["MESH_CONFIG"] = str(config)
    # the worker's host: its own data dir, hence its own model cache
    mesh.env["XDG_DATA_HOME"] = str(tmp_path / "host-b")
    await mesh.bus()  # (the streams and buckets)
    rows = {r["model"]: r for r in json.loads(mesh.cli("models", "--json"))["models"]}
    assert rows["remote"]["store"] is None and rows["remote"]["where"].startswith("missing: ")

    pushed = mesh.cli("models", "push", "remote", gemma)
    assert "pushed remote: remote/" in pushed
    assert "nothing sent" in mesh.cli("models", "push", "remote", gemma)
    rows = {r["model"]: r for r in json.loads(mesh.cli("models", "--json"))["models"]}
    size = os.path.getsize(gemma)
    assert rows["remote"]["store"]["size"] == size
    assert rows["remote"]["where"] == f"in the store ({size / 1e6:.0f} MB), fetched on first load"

    # a model whose object was replaced behind its record's back: fetched, found wrong, never loaded
    small = tmp_path / "small.gguf"
    small.write_bytes(os.urandom(1024 * 1024))
    refused = mesh.run_cli("models", "push", "damaged", str(small))  # not even a GGUF: refused
    assert refused.returncode == 2 and "is not a GGUF file" in refused.stderr
    small.write_bytes(b"GGUF" + os.urandom(1024 * 1024))
    mesh.cli("models", "push", "damaged", str(small))
    store = await models_store(await mesh.bus())
    assert store is not None
    record = await read_record(store, "damaged")
    assert record is not None
    await put_bytes(store, record.object, os.urandom(record.size))

    gpu = await start(mesh)
    await mesh.submit_text("# bad\n\n## Tasks\n\n### ask\n- model: damaged\n\n```prompt\nHello\n```\n")

    async def refused() -> str:
        return next((s.error for s in await gpu_states(mesh, gpu) if "damaged" in s.error), "")

    error = str(await until(refused, HANG_S, "the load of the damaged model refused"))
    assert "checksum differs from the one recorded" in error and "nothing was kept" in error, error
    assert not os.path.exists(tmp_path / "host-b" / "mesh" / "models" / "damaged" / "small.gguf")

    # a directory model, pushed and fetched file by file, then loaded by its library
    assert "pushed far-embed: model/ (" in mesh.cli("models", "push", "far-embed", embed)
    vec_id = await mesh.submit_text(
        "# vec\n\n## Tasks\n\n### vec\n- model: far-embed\n\n"
        f"```embed\ntext: The capital of France is Paris.\nsave: {tmp_path}/v.npy\n```\n"
    )
    await all_succeeded(mesh, vec_id)
    assert np.load(tmp_path / "v.npy").shape == (1, 384)
    assert any(s.fetching == "far-embed" for s in await gpu_states(mesh, gpu))
    rows = {r["model"]: r for r in json.loads(mesh.cli("models", "--json"))["models"]}
    assert rows["far-embed"]["cached"] == str(tmp_path / "host-b" / "mesh" / "models" / "far-embed" / "model")

    plan_id = await mesh.submit_text(
        "# far\n\n## Tasks\n\n### ask\n- model: remote\n\n```prompt\nThe capital of France is\n```\n"
    )
    await all_succeeded(mesh, plan_id)
    assert (await finished(mesh, plan_id, "ask")).output
    states = await gpu_states(mesh, gpu)
    at = next((i for i, s in enumerate(states) if s.state == "fetching" and s.fetching == "remote"), -1)
    assert at >= 0, [(s.state, s.fetching) for s in states]
    # fetched, then loaded: the brain's request answered in both (the same rid)
    assert [s.state for s in states[at : at + 2]] == ["fetching", "booting_llm"]
    assert states[at].rid and states[at].rid == states[at + 1].rid
    cached = tmp_path / "host-b" / "mesh" / "models" / "remote" / os.path.basename(gemma)
    assert _sha(cached) == _sha(gemma)
    rows = {r["model"]: r for r in json.loads(mesh.cli("models", "--json"))["models"]}
    assert rows["remote"]["cached"] == str(cached)
    assert rows["remote"]["where"] == f"cached at {cached}"
    assert "cached at" in mesh.cli("models")


async def test_a_model_directory_travels_file_by_file(mesh: Mesh, tmp_path: Path) -> None:
    """A model that is a directory (the transcription and embedding models): pushed file by
    file, fetched whole into the cache or not at all."""
    bus = await mesh.bus()
    store = await models_store(bus, create=True)
    assert store is not None
    model = tmp_path / "pushed" / "minilm"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "config.json").write_text('{"dim": 384}')
    (model / "1_Pooling" / "config.json").write_text('{"mean": true}')
    (model / "model.safetensors").write_bytes(os.urandom(2 * 1024 * 1024))
    record, sent = await push_model(store, "minilm", str(model))
    assert sent and record.file == "minilm" and len(record.files) == 3
    assert {f.path for f in record.files} == {"config.json", "1_Pooling/config.json", "model.safetensors"}
    assert (await push_model(store, "minilm", str(model)))[1] is False

    spec = ModelSpec(kind="embed", path=str(tmp_path / "nowhere" / "minilm"))
    files = _files(mesh, tmp_path / "host-b")
    fetches: list[float] = []
    got = await files.ready("minilm", spec, fetches.append)
    assert got.path == cached_path(files.root, "minilm", "minilm") and fetches.count(0.0) == 1
    for f in record.files:
        assert _sha(Path(got.path) / f.path) == _sha(model / f.path)
    fetches.clear()
    await files.ready("minilm", spec, fetches.append)
    assert fetches == []

    # one file changes: the push sends it, the next load fetches the directory again
    (model / "config.json").write_text('{"dim": 768}')
    record, sent = await push_model(store, "minilm", str(model))
    assert sent
    await files.ready("minilm", spec, fetches.append)
    assert fetches.count(0.0) == 1 and (Path(got.path) / "config.json").read_text() == '{"dim": 768}'

    # one file's object damaged: the directory is never put in place, nothing is left
    big = next(f for f in record.files if f.path == "model.safetensors")
    await put_bytes(store, big.object, os.urandom(big.size))
    other = _files(mesh, tmp_path / "host-c")
    with pytest.raises(ModelError, match="checksum differs from the one recorded"):
        await other.ready("minilm", spec, fetches.append)
    assert sorted(os.listdir(os.path.join(other.root, "minilm"))) == [".lock"]
