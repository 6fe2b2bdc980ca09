"""Embed tasks batched by the worker, end to end: a real nats-server, a real brain and a real
CPU model worker (`--gpu none --classes script`) running the shipped embedder
(all-MiniLM-L6-v2). Many one-text embed tasks become a few encode calls; each task still gets
its own vectors, its own report and its own acknowledgement, and a worker killed mid-batch
loses nothing and completes nothing twice.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mesh.events import RunFinished, TaskSucceeded
from mesh.host.loaders import Loaded, load_model
from mesh.models import DEFAULT_MODELS, builtin_models
from tests.conftest import HANG_S, Mesh
from tests.faults import log_count, logged, until

pytestmark = [pytest.mark.integration, pytest.mark.models]

os.environ["HF_HUB_OFFLINE"] = "1"

PLAN_TIMEOUT_S = 300.0
WORDS = [
    "harbour",
    "lantern",
    "quiet",
    "meadow",
    "copper",
    "thunder",
    "orchard",
    "violin",
    "glacier",
    "ember",
    "saddle",
    "pepper",
    "marble",
    "canyon",
    "whistle",
    "feather",
    "compass",
    "velvet",
    "anchor",
    "pebble",
]


def text_of(i: int, words: int = 6) -> str:
    """A different sentence for every task."""
    picked = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)]
    return f"Task {i}: " + " ".join(picked) + "."


def embed_plan(out: Path, texts: list[str], bad: int | None = None) -> str:
    lines = ["# Many small embeddings", "", "## Tasks", ""]
    for i, text in enumerate(texts):
        body = "file: nowhere.txt" if i == bad else f"text: {text}"
        lines += [
            f"### e{i}",
            "- retries: 0",
            "- timeout: 5m",
            "",
            "```embed",
            body,
            f"save: {out}/e{i}.npy",
            "```",
            "",
        ]
    return "\n".join(lines)


def start(mesh: Mesh, name: str = "gpu") -> None:
    mesh.worker(name, 1, "--gpu", "none", "--classes", "script")


async def finishes(mesh: Mesh, plan_id: str) -> list[RunFinished]:
    names = (await mesh.bus()).names
    return [m for _, m in await mesh.history(names.run_events(plan_id)) if isinstance(m, RunFinished)]


@pytest.fixture(scope="module")
def embedder() -> Iterator[Loaded]:
    name = DEFAULT_MODELS["embed"]
    loaded = load_model(name, builtin_models()[name], "cpu")
    yield loaded
    loaded.close()


async def test_fifty_one_text_tasks_run_in_batches_each_with_its_own_vector(
    mesh: Mesh, tmp_path: Path, embedder: Loaded
) -> None:
    mesh.brain()
    start(mesh)
    texts = [text_of(i) for i in range(50)]
    plan_id = await mesh.submit_text(embed_plan(tmp_path, texts))
    plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    tasks = await mesh.tasks(plan_id)
    assert plan.status == "succeeded", {k: (t.status, t.error) for k, t in tasks.items()}
    assert all(t.status == "succeeded" and t.attempt == 1 for t in tasks.values())
    ends = await finishes(mesh, plan_id)
    # one report per task, each under its own claim
    assert sorted(e.task_id for e in ends) == sorted(f"e{i}" for i in range(50))
    assert len({e.claim for e in ends}) == 50
    sizes = Counter(int(e.metrics["batch"]) for e in ends)
    assert max(sizes) > 1, sizes
    assert log_count(mesh, "gpu", "running a batch of") >= 1, mesh.log("gpu")[-3000:]
    for i, text in enumerate(texts):
        got = np.load(tmp_path / f"e{i}.npy")
        alone = embedder.handle.encode(
            [text],
            normalize_embeddings=embedder.spec.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        assert got.shape == (1, 384)
        np.testing.assert_allclose(got, alone, atol=1e-5, err_msg=f"task e{i}")
    print(f"\nbatch sizes (tasks reporting each size): {dict(sizes)}")


async def test_a_bad_item_in_a_batch_fails_alone(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    start(mesh)
    plan_id = await mesh.submit_text(embed_plan(tmp_path, [text_of(i) for i in range(12)], bad=5))
    plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    assert plan.status == "failed"
    tasks = await mesh.tasks(plan_id)
    assert {k for k, t in tasks.items() if t.status != "succeeded"} == {"e5"}
    assert tasks["e5"].status == "failed" and "nowhere.txt does not exist" in tasks["e5"].error
    ends = {e.task_id: e for e in await finishes(mesh, plan_id)}
    assert not ends["e5"].ok and ends["e5"].reason == "definition"
    # the others ran in a batch, beside it or not, and each has its file
    assert max(int(e.metrics.get("batch", 0)) for e in ends.values()) > 1
    assert all((tmp_path / f"e{i}.npy").exists() for i in range(12) if i != 5)
    assert not (tmp_path / "e5.npy").exists()


async def test_a_worker_killed_mid_batch_loses_nothing_and_completes_nothing_twice(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.brain()
    start(mesh)
    # long texts (the model reads 256 tokens of each): a batch takes long enough to be killed in
    texts = [text_of(i, words=150) for i in range(64)]
    plan_id = await mesh.submit_text(embed_plan(tmp_path, texts))
    await until(logged(mesh, "gpu", "running a batch of"), HANG_S, "a batch to start")
    mesh._expected_dead.add("gpu")
    mesh.kill("gpu", signal.SIGKILL)
    killed_log = mesh.log("gpu")
    start(mesh, "gpu2")
    plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    tasks = await mesh.tasks(plan_id)
    assert plan.status == "succeeded", {k: (t.status, t.error) for k, t in tasks.items()}
    assert all(t.status == "succeeded" for t in tasks.values())
    history = [m for _, m in await mesh.history()]
    succeeded = Counter(m.task_id for m in history if isinstance(m, TaskSucceeded) and m.plan_id == plan_id)
    assert succeeded == Counter({f"e{i}": 1 for i in range(64)}), succeeded
    assert all((tmp_path / f"e{i}.npy").exists() for i in range(64))
    # the restarted worker ran what the killed one held (it was killed before its batch ended)
    done_before = killed_log.count(" succeeded in ")
    print(f"\ntasks the killed worker finished before the kill: {done_before}")
    assert log_count(mesh, "gpu2", "running a batch of") >= 1
