"""Embed tasks batched: several one-text tasks of one model run as one encode call, and each
still gets its own vectors, file and result.

The grouping (`mesh.work.batch_groups`) is pure; the batch executor runs the real embedder
(all-MiniLM-L6-v2, sentence-transformers, on the CPU). The worker's side, end to end with a
real nats-server, brain and worker processes, is in `tests/test_embed_batch_mesh.py`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from mesh import work
from mesh.events import WorkItem
from mesh.host.executors import BATCH_EXECUTORS, RunContext, run_embed, run_embed_batch
from mesh.host.loaders import Loaded, load_model
from mesh.models import DEFAULT_MODELS, builtin_models
from mesh.settings import Settings, learn_problem

os.environ["HF_HUB_OFFLINE"] = "1"

TEXTS = [
    "A cat sits on the mat.",
    "The stock market fell sharply today, and analysts blamed the rate decision.",
    "Rain tomorrow.",
    "A kitten is resting on a rug near the fireplace while the family reads.",
    "Shares dropped steeply on the exchange.",
]


# ---------------------------------------------------------------- grouping (pure)


def embed_item(task_id: str, model: str = "all-minilm-l6-v2", kind: str = "embed") -> WorkItem:
    return WorkItem(plan_id="p", task_id=task_id, attempt=1, kind=kind, body="text: x", model=model)


def test_only_embed_items_get_a_batch_key_and_it_names_the_model() -> None:
    assert work.batch_key(embed_item("a")) == "embed:all-minilm-l6-v2"
    assert work.batch_key(embed_item("a", model="other")) == "embed:other"
    assert work.batch_key(embed_item("a", kind="transcribe")) == ""
    assert work.batch_key(embed_item("a", kind="shell", model="")) == ""
    assert set(BATCH_EXECUTORS) == set(work.BATCHED_KINDS)


def test_items_of_one_key_run_together_up_to_the_most_and_the_rest_alone() -> None:
    keys = ["e:a", "", "e:a", "e:b", "e:a", "", "e:b", "e:a"]
    assert work.batch_groups(keys, 3) == [[0, 2, 4], [1], [3, 6], [5], [7]]
    assert work.batch_groups(keys, 64) == [[0, 2, 4, 7], [1], [3, 6], [5]]
    # 1: every item alone, in fetch order
    assert work.batch_groups(keys, 1) == [[i] for i in range(len(keys))]
    assert work.batch_groups([], 8) == []
    # every index exactly once
    runs = work.batch_groups(keys * 5, 4)
    assert sorted(i for run in runs for i in run) == list(range(len(keys) * 5))
    assert all(len(run) <= 4 for run in runs)


def test_the_batch_settings_are_checked() -> None:
    assert learn_problem(Settings()) == ""
    assert "embed_batch_max" in learn_problem(Settings(embed_batch_max=0))
    assert "embed_batch_wait_s" in learn_problem(Settings(embed_batch_wait_s=-1.0))


# ---------------------------------------------------------------- the batch executor


@pytest.fixture(scope="module")
def embedder() -> Iterator[Loaded]:
    name = DEFAULT_MODELS["embed"]
    loaded = load_model(name, builtin_models()[name], "cpu")
    yield loaded
    loaded.close()


def items_for(texts: Sequence[str], tmp_path: Path) -> list[WorkItem]:
    return [
        WorkItem(
            plan_id="p",
            task_id=f"t{i}",
            attempt=1,
            kind="embed",
            body=f"text: {text}\n",
            model="all-minilm-l6-v2",
            workdir=str(tmp_path),
        )
        for i, text in enumerate(texts)
    ]


def ctx_for(model: Any) -> RunContext:
    """A worker's context: files without `save:` are kept in memory, for the object store."""
    return RunContext(model=model, kill_grace_s=10.0, files_in_memory=True)


def vectors(result: Any, name: str) -> Any:
    """The `.npy` the run kept in memory, read back."""
    assert result.artifacts == [] and list(result.artifact_data) == [name]
    return np.load(io.BytesIO(result.artifact_data[name]), allow_pickle=False)


@pytest.mark.models
async def test_a_batch_gives_each_task_the_vectors_of_its_own_text(embedder: Loaded, tmp_path: Path) -> None:
    items = items_for(TEXTS, tmp_path)
    results = await run_embed_batch(items, [ctx_for(embedder) for _ in items])
    alone = [await run_embed(i, ctx_for(embedder)) for i in items]
    assert [r.ok for r in results] == [True] * len(items), [r.error for r in results]
    for i, (batched, single) in enumerate(zip(results, alone, strict=True)):
        assert batched.output == f"1 vectors x 384 dims -> t{i}.npy"
        assert batched.metrics["batch"] == len(items) and single.metrics["batch"] == 1
        assert batched.metrics["vectors"] == 1 and batched.metrics["dim"] == 384
        # each task's share of the call, the whole call in batch_s
        assert batched.metrics["batch_s"] > 0
        assert batched.duration_s == pytest.approx(batched.metrics["batch_s"] / len(items))
        got, want = vectors(batched, f"t{i}.npy"), vectors(single, f"t{i}.npy")
        assert got.shape == want.shape == (1, 384)
        # the same vector as the text encoded alone (padding in a batch moves the last digits)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # and not another task's
    assert not np.allclose(vectors(results[0], "t0.npy"), vectors(alone[1], "t1.npy"), atol=1e-2)
    # nothing was written: not beside the plan, not anywhere under it
    assert not list(tmp_path.rglob("*.npy"))


@pytest.mark.models
async def test_a_bad_item_fails_alone_and_the_others_succeed(embedder: Loaded, tmp_path: Path) -> None:
    items = items_for(TEXTS[:3], tmp_path)
    items.insert(1, msgspec.structs.replace(items[0], task_id="bad", body="file: nowhere.txt\n"))
    results = await run_embed_batch(items, [ctx_for(embedder) for _ in items])
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].definition_error and "nowhere.txt does not exist" in results[1].error
    assert all(r.metrics["batch"] == 3 for r in (results[0], results[2], results[3]))
    assert not results[1].artifact_data and not results[1].artifacts


class OneAtATime:
    """The real embedder, refusing a call of more than one text: a batch call that fails."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.calls: list[int] = []

    def encode(self, texts: list[str], **kw: Any) -> Any:
        self.calls.append(len(texts))
        if len(texts) > 1:
            raise RuntimeError("out of memory for a batch")
        return self.handle.encode(texts, **kw)


@pytest.mark.models
async def test_a_batch_call_that_fails_runs_each_task_alone(embedder: Loaded, tmp_path: Path) -> None:
    picky = OneAtATime(embedder.handle)
    model = Loaded(embedder.name, embedder.spec, embedder.device, picky, 0.0)
    items = items_for(TEXTS[:4], tmp_path)
    results = await run_embed_batch(items, [ctx_for(model) for _ in items])
    assert [r.ok for r in results] == [True] * 4, [r.error for r in results]
    assert picky.calls == [4, 1, 1, 1, 1]
    assert all(r.metrics["batch"] == 1 for r in results)


@pytest.mark.models
async def test_an_item_cancelled_during_a_batch_reports_cancelled(embedder: Loaded, tmp_path: Path) -> None:
    items = items_for(TEXTS[:3], tmp_path)
    ctxs = [ctx_for(embedder) for _ in items]
    ctxs[2].cancel.set()
    results = await run_embed_batch(items, ctxs)
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].cancelled
    # every item cancelled: the call is not made
    ctxs = [ctx_for(embedder) for _ in items]
    for c in ctxs:
        c.cancel.set()
    results = await run_embed_batch(items, ctxs)
    assert all(r.cancelled and not r.ok for r in results)
