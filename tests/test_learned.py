"""Learned figures (`mesh.learned`): the estimator, folding from events, replay, placement using
them, the brain keeping them across a restart, and `mesh models` showing them after real runs.

The unit tests feed `Learned` and the state machine directly (no NATS); the integration tests
run a real nats-server, brain and worker processes (the last one a CPU model worker standing in
for a GPU, loading the real Gemma 3 270M as tests/test_model_workers.py does).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest

from agents.brain_commit import CHECKPOINT_KEY
from mesh.bus.history import read_history
from mesh.errors import ConfigError
from mesh.events import (
    GpuState,
    Msg,
    PlanSpec,
    ResourceRequested,
    RunFinished,
    SubmitPlan,
    TaskSpec,
    TaskSucceeded,
)
from mesh.host.config import load_settings
from mesh.learned import DURATION, LOAD, MAX_KEYS, VRAM, Learned, by_class, by_kind, median
from mesh.machine import Policy, Tick, apply, evolve, replay
from mesh.models import builtin_models
from mesh.placement import BOOTING_LLM, IDLE, LLM_BUSY, LLM_READY, GpuView, PlacementPolicy, place
from mesh.records import Checkpoint, decode_checkpoint, encode_record
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.test_machine import Driver, reload

T0 = 1_000.0


def gpu_state(
    state: str,
    previous: str,
    *,
    gpu: str = "g0",
    llm: str = "",
    used: int = 0,
    took_s: float = 0.0,
    error: str = "",
    at: float = T0,
) -> GpuState:
    return GpuState(
        gpu=gpu,
        worker=f"w-{gpu}",
        host="h",
        state=state,
        at=at,
        previous=previous,
        took_s=took_s,
        llm=llm,
        vram_total_mb=8000,
        vram_used_mb=used,
        error=error,
    )


def load(
    learned: Learned, model: str, took_s: float, mb: int, *, gpu: str = "g0", base: int = 100
) -> list[GpuState]:
    """A worker's reports of one load of `model` on `gpu` (which had `base` MB used before it),
    folded into `learned`; returned too."""
    reports = [
        gpu_state(BOOTING_LLM, IDLE, gpu=gpu, llm="", used=base, took_s=5.0),
        gpu_state(LLM_READY, BOOTING_LLM, gpu=gpu, llm=model, used=base + mb, took_s=took_s),
    ]
    for r in reports:
        learned.observe(r)
    return reports


def succeeded(duration_s: float, worker: str = "w1") -> TaskSucceeded:
    return TaskSucceeded(plan_id="p", task_id="t", attempt=1, worker=worker, at=T0, duration_s=duration_s)


PROMPT = TaskSpec(id="t", body="hi", kind="prompt", cls="llm", model="m")


# ------------------------------------------------------------------ the estimator


def test_the_prior_is_answered_until_min_samples_then_the_median() -> None:
    learned = Learned(min_samples=3)
    assert learned.load_s("m", 42.0) == 42.0 and learned.vram_mb("m", 600) == 600
    load(learned, "m", 10.0, 700)
    load(learned, "m", 12.0, 720)
    assert learned.load_s("m", 42.0) == 42.0, "two loads are not enough"
    assert learned.vram_mb("m", 600) == 600
    assert learned.samples(LOAD, "m") == 2 and learned.samples(VRAM, "m") == 2
    fig = learned.figure(LOAD, "m")
    assert fig is not None and fig.samples == 2 and not fig.in_use
    load(learned, "m", 11.0, 710)
    assert learned.load_s("m", 42.0) == 11.0
    assert learned.vram_mb("m", 600) == 710
    fig = learned.figure(VRAM, "m")
    assert fig is not None and (fig.value, fig.samples, fig.in_use) == (710.0, 3, True)
    # another model still answers its prior
    assert learned.load_s("other", 7.0) == 7.0 and learned.figure(LOAD, "other") is None


def test_one_outlier_does_not_move_the_figure() -> None:
    learned = Learned(min_samples=3)
    for took in (10.0, 11.0, 600.0, 12.0, 10.5):  # one load from a cold disk
        load(learned, "m", took, 700)
    assert learned.load_s("m", 0.0) == 11.0
    assert 10.0 <= learned.load_s("m", 0.0) <= 12.0, "a mean would say 128.7"
    for d in (2.0, 2.2, 1.9, 2.1, 300.0):
        learned.observe(succeeded(d), PROMPT)
    assert learned.duration_s("m", 0.0) == 2.1
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5


def test_memory_is_bounded_per_key_and_in_keys() -> None:
    learned = Learned(min_samples=3, window=20)
    for i in range(1000):
        learned.observe(succeeded(float(i)), PROMPT)
    series = learned.duration["m"]
    assert len(series.samples) == 20 and series.n == 1000
    assert series.samples == [float(i) for i in range(980, 1000)], "the last 20, oldest first"
    assert learned.samples(DURATION, "m") == 1000
    # the figure follows the recent samples
    assert learned.duration_s("m", 0.0) == median(series.samples)
    # many models: at most MAX_KEYS per table, the least recently fed go first
    for i in range(MAX_KEYS + 50):
        spec = TaskSpec(id="t", body="x", kind="prompt", cls="llm", model=f"model{i}")
        learned.observe(succeeded(1.0), spec)
    assert len(learned.duration) <= MAX_KEYS
    assert f"model{MAX_KEYS + 49}" in learned.duration and "model0" not in learned.duration
    assert by_class("llm") in learned.duration and by_kind("prompt") in learned.duration, "fed every time"
    # GPUs booting: bounded too
    for i in range(MAX_KEYS + 10):
        learned.observe(gpu_state(BOOTING_LLM, IDLE, gpu=f"g{i}", used=1))
    assert len(learned.booting) <= MAX_KEYS
    # what the checkpoint carries does not grow with the samples fed
    one = Learned(window=20)
    for i in range(20):
        one.observe(succeeded(float(i)), PROMPT)
    size = len(msgspec.json.encode(one))
    for i in range(5000):
        one.observe(succeeded(float(i % 20)), PROMPT)
    assert len(msgspec.json.encode(one)) <= size + 40, "(only the counters have more digits)"


def test_tune_applies_the_settings_and_a_shorter_window_drops_old_samples() -> None:
    learned = Learned(min_samples=3, window=20)
    for d in range(10):
        learned.observe(succeeded(float(d)), PROMPT)
    learned.tune(min_samples=1, window=4)
    assert learned.duration["m"].samples == [6.0, 7.0, 8.0, 9.0]
    assert learned.duration_s("m", 0.0) == 7.5
    learned.tune(min_samples=5, window=2)
    assert learned.window == 5, "a window never holds fewer than min_samples"
    assert learned.duration_s("m", -1.0) == -1.0


def test_what_a_load_measures_and_what_is_not_a_load() -> None:
    learned = Learned(min_samples=1)
    # a refused load (booting -> idle with an error) and a failed one teach nothing
    learned.observe(gpu_state(BOOTING_LLM, IDLE, used=100))
    learned.observe(gpu_state(IDLE, BOOTING_LLM, used=100, took_s=3.0, error="load of m failed"))
    learned.observe(gpu_state(BOOTING_LLM, IDLE, used=100))
    learned.observe(gpu_state("offline", BOOTING_LLM, used=100, took_s=3.0))
    assert learned.fed == 0 and not learned.load and not learned.vram
    # a load whose start the brain never saw (it restarted meanwhile): its time, not its VRAM
    learned.observe(gpu_state(LLM_READY, BOOTING_LLM, llm="m", used=900, took_s=8.0))
    assert learned.load_s("m", 0.0) == 8.0 and learned.figure(VRAM, "m") is None
    # a whole load: time and VRAM (what was used after it minus what was used before)
    load(learned, "m", 9.0, 650, base=1200)
    assert learned.samples(LOAD, "m") == 2 and learned.vram_mb("m", 0) == 650
    # an LLM that was already up (busy -> ready) is no load
    learned.observe(gpu_state(LLM_READY, LLM_BUSY, llm="m", used=1850, took_s=30.0))
    assert learned.samples(LOAD, "m") == 2
    # a load straight into work (booting -> busy) counts
    learned.observe(gpu_state(BOOTING_LLM, IDLE, gpu="g1", used=0))
    learned.observe(gpu_state(LLM_BUSY, BOOTING_LLM, gpu="g1", llm="m", used=640, took_s=10.0))
    assert learned.samples(LOAD, "m") == 3 and learned.samples(VRAM, "m") == 2


def test_durations_by_model_class_and_kind_from_local_successes_only() -> None:
    learned = Learned(min_samples=1)
    learned.observe(succeeded(4.0), PROMPT)
    learned.observe(succeeded(3.0), TaskSpec(id="s", body="true", kind="shell", cls="cpu"))
    # Claude's answer (no worker) is no local run; without its task nothing is known
    learned.observe(succeeded(99.0, worker=""), PROMPT)
    learned.observe(succeeded(99.0))
    assert learned.duration_s("m", 0.0) == 4.0
    assert learned.duration_s(by_class("llm"), 0.0) == 4.0
    assert learned.duration_s(by_kind("prompt"), 0.0) == 4.0
    assert learned.duration_s(by_class("cpu"), 0.0) == 3.0
    assert learned.duration_s(by_kind("shell"), 0.0) == 3.0
    assert learned.keys(DURATION) == ["class:cpu", "class:llm", "kind:prompt", "kind:shell", "m"]


def test_it_round_trips_through_the_checkpoint_and_old_checkpoints_still_decode() -> None:
    learned = Learned(min_samples=2, window=5)
    load(learned, "m", 10.0, 700)
    learned.observe(succeeded(1.5), PROMPT)
    learned.observe(gpu_state(BOOTING_LLM, IDLE, gpu="g9", used=300))
    cp = decode_checkpoint(encode_record(Checkpoint(seq=7, at=T0, brain="b", learned=learned)))
    assert cp.learned == learned
    assert cp.learned is not None and cp.learned.booting == {"g9": 300}
    old = decode_checkpoint(b'{"seq":3,"at":1.0,"brain":"b"}')
    assert old.seq == 3 and old.learned is None


def test_the_settings_are_checked(tmp_path: Path) -> None:
    base = {"XDG_CONFIG_HOME": str(tmp_path)}
    s = load_settings(environ=base)
    assert (s.learn_min_samples, s.learn_window) == (3, 20)
    with pytest.raises(ConfigError, match="learn_window"):
        load_settings(environ={**base, "MESH_LEARN_MIN_SAMPLES": "5", "MESH_LEARN_WINDOW": "4"})
    with pytest.raises(ConfigError, match="learn_min_samples"):
        load_settings(environ={**base, "MESH_LEARN_MIN_SAMPLES": "0"})


# ------------------------------------------------------------------ the state machine

MODELS = {"m": ("llm", 600)}


def machine_policy() -> Policy:
    return Policy(
        release_window=64,
        default_models={"llm": "m"},
        placement=PlacementPolicy(models=MODELS, yield_after_s=1.0, min_residency_s=0.0),
    )


def prompt_plan(n: int, prefix: str = "q") -> PlanSpec:
    tasks = tuple(
        TaskSpec(id=f"{prefix}{i}", body=f"say {i}", kind="prompt", cls="llm", retries=0) for i in range(n)
    )
    return PlanSpec(title="prompts", tasks=tasks)


def run_the_machine() -> tuple[Driver, list[Msg]]:
    """A brain's state fed loads on two GPUs and prompt tasks; with the history as the brain
    sees it: each GPU report (an input it folds) and each event it decided, in order."""
    d = Driver(machine_policy())
    history: list[Msg] = []

    def feed(msg: Any) -> None:
        if isinstance(msg, GpuState):
            history.append(msg)
        history.extend(d.feed(msg).events)

    feed(SubmitPlan(plan_id="p1", plan=prompt_plan(6), at=d.now, by="tester"))
    for i, (gpu, took, used) in enumerate((("g0", 10.0, 650), ("g1", 14.0, 640), ("g0", 12.0, 660))):
        feed(gpu_state(BOOTING_LLM, IDLE, gpu=gpu, used=100, at=d.now))
        feed(gpu_state(LLM_READY, BOOTING_LLM, gpu=gpu, llm="m", used=100 + used, took_s=took, at=d.now))
        for task in (f"q{2 * i}", f"q{2 * i + 1}"):
            item = d.take(task)
            d.started(item)
            history.extend(d.steps[-1].events)
            report = RunFinished(
                plan_id="p1",
                task_id=task,
                attempt=item.attempt,
                worker="w1",
                at=0.0,
                ok=True,
                duration_s=1.0 + i,
                claim=item.claim,
            )
            history.extend(d.feed(report).events)
        feed(gpu_state(IDLE, LLM_READY, gpu=gpu, used=100, at=d.now))
    return d, history


def test_the_brain_folds_the_figures_and_replay_rebuilds_them() -> None:
    d, history = run_the_machine()
    learned = d.state.learned
    assert learned.samples(LOAD, "m") == 3 and learned.samples(VRAM, "m") == 3
    assert learned.samples(DURATION, "m") == 6
    assert learned.load_s("m", 0.0) == 12.0 and learned.vram_mb("m", 0) == 650
    assert learned.duration_s(by_class("llm"), 0.0) == 2.0
    # the same events folded into a fresh state give the same figures, every time
    assert replay(history).learned == learned
    assert replay(history).learned == replay(history).learned
    # the transitions alone (what `mesh replay` reads) give the durations
    transitions = [ev for ev in history if not isinstance(ev, GpuState)]
    alone = replay(transitions).learned.duration
    assert {k: (v.samples, v.n) for k, v in alone.items()} == {
        k: (v.samples, v.n) for k, v in learned.duration.items()
    }


def test_a_restored_state_folding_the_events_after_the_checkpoint_counts_each_once() -> None:
    d, history = run_the_machine()
    # a checkpoint taken half way: its figures, then what the history holds after it
    half = len(history) // 2
    before = replay(history[:half])
    saved = decode_checkpoint(encode_record(Checkpoint(seq=half, at=T0, learned=before.learned))).learned
    assert saved is not None
    # the records as KV holds them, the figures as the checkpoint holds them
    state = reload(before, aging_s=60.0)
    state.learned = saved
    for ev in history[half:]:
        evolve(state, ev)
    assert state.learned == d.state.learned


# ------------------------------------------------------------------ placement


def views(free_gpu_mb: int) -> dict[str, GpuView]:
    return {"g0": GpuView(gpu="g0", worker="w0", vram_total_mb=free_gpu_mb)}


def taught(model: str, mb: int, took_s: float = 10.0, n: int = 3) -> Learned:
    learned = Learned(min_samples=3)
    for _ in range(n):
        load(learned, model, took_s, mb)
    return learned


def test_placement_needs_the_learned_vram_once_learned() -> None:
    pp = PlacementPolicy(models={"m": ("llm", 600)})
    demand = {"llm:m": 4}
    # configured 600 MB, measured 1200 MB: a 1000 MB GPU cannot hold it
    big = taught("m", 1200)
    decision = place(views(1000), demand, T0, pp, learned=big)
    assert not decision.events, "never placed where the learned VRAM does not fit"
    assert decision.unplaceable == [("m", 1200, 1000)]
    # two loads measured are not enough yet: the configured figure decides
    decision = place(views(1000), demand, T0, pp, learned=taught("m", 1200, n=2))
    assert [(e.action, e.model) for e in decision.events] == [("load", "m")]
    # configured 1200 MB, measured 700 MB: the 1000 MB GPU holds it
    pp_big = PlacementPolicy(models={"m": ("llm", 1200)})
    assert place(views(1000), demand, T0, pp_big).unplaceable == [("m", 1200, 1000)]
    decision = place(views(1000), demand, T0, pp_big, learned=taught("m", 700))
    assert [(e.action, e.model) for e in decision.events] == [("load", "m")]


def test_placement_yields_after_one_learned_load_time() -> None:
    """A GPU loaded less than min_residency_s ago, whose model has no work, yields to waiting
    work once unused one load time: the learned one, not the GPU's last (a warm cache)."""
    pp = PlacementPolicy(models={"m": ("llm", 600), "n": ("llm", 600)}, yield_after_s=1.0)

    def ready(load_s: float, loaded_at: float = T0 - 100) -> dict[str, GpuView]:
        return {
            "g0": GpuView(
                gpu="g0",
                worker="w0",
                state=LLM_READY,
                llm="m",
                vram_total_mb=1000,
                vram_used_mb=600,
                loaded_at=loaded_at,
                last_used=T0 - 40,
                load_s=load_s,
            )
        }

    demand = {"llm:n": 3}
    assert pp.min_residency_s > 100, "loaded 100 s ago: not yet min_residency_s"
    # the GPU's last load took 5 s: unused for 40 s, it yields to model n
    assert [e.action for e in place(ready(5.0), demand, T0, pp).events] == ["unload"]
    # loads of m take 60 s as measured (the 5 s here was a warm cache): it waits 60 s (one load
    # time, placement_yield_factor 1)
    assert place(ready(5.0), demand, T0, pp, learned=taught("m", 600, took_s=60.0)).events == []
    # loaded min_residency_s ago, a GPU in another class's share beyond its model's share goes
    # at once (rule 4), the load time aside
    long_ago = ready(5.0, loaded_at=T0 - pp.min_residency_s)
    (unload,) = place(long_ago, demand, T0, pp, learned=taught("m", 600, took_s=60.0)).events
    assert unload.action == "unload" and "its share moved to n" in unload.reason


def test_the_machine_places_by_what_it_learned() -> None:
    # a model configured at 600 MB that every load shows takes 900 MB: after three loads the
    # brain no longer asks an 800 MB GPU for it
    d = Driver(machine_policy())
    for _ in range(3):
        d.feed(gpu_state(BOOTING_LLM, IDLE, gpu="big", used=0))
        d.feed(gpu_state(LLM_READY, BOOTING_LLM, gpu="big", llm="m", used=900, took_s=5.0))
        d.feed(gpu_state(IDLE, LLM_READY, gpu="big", used=0))
    d.feed(gpu_state("offline", IDLE, gpu="big", used=0))
    d.feed(gpu_state(IDLE, "", gpu="small", used=0))
    d.state.gpus["small"].vram_total_mb = 800
    d.submit(prompt_plan(2))

    def loads(min_samples: int) -> list[str]:
        d.state.learned.tune(min_samples=min_samples, window=20)
        step = apply(d.state, Tick(), d.now + 1, d.policy)
        for view in d.state.gpus.values():
            view.pending = None
        return [e.gpu for e in step.events if isinstance(e, ResourceRequested) and e.action == "load"]

    assert loads(min_samples=4) == ["small"], "three loads seen, four needed: the configured 600 MB"
    assert loads(min_samples=3) == [], "the learned 900 MB does not fit 800 MB"


# ------------------------------------------------------------------ a real mesh


async def checkpointed(mesh: Mesh) -> Learned | None:
    kv = await (await mesh.bus()).brain_kv()
    try:
        entry = await kv.get(CHECKPOINT_KEY)
    except nats.js.errors.KeyNotFoundError:  # not written yet
        return None
    return decode_checkpoint(entry.value or b"").learned


def shell_plan(n: int, prefix: str) -> str:
    tasks = "".join(f"### {prefix}{i}\n\n```shell\nsleep 0.2\n```\n\n" for i in range(n))
    return f"# Work\n\n## Tasks\n\n{tasks}"


async def covers(mesh: Mesh, plan_id: str) -> Learned | None:
    """The checkpointed figures once the checkpoint covers the plan's end (None before)."""
    bus = await mesh.bus()
    ends = [e.seq async for e in read_history(bus, bus.names.plan_event(plan_id, "finished"))]
    kv = await bus.brain_kv()
    try:
        checkpoint = decode_checkpoint((await kv.get(CHECKPOINT_KEY)).value or b"")
    except nats.js.errors.KeyNotFoundError:
        return None
    return checkpoint.learned if ends and checkpoint.seq >= ends[-1] else None


@pytest.mark.integration
async def test_the_figures_survive_a_brain_killed_and_restarted(mesh: Mesh) -> None:
    mesh.env["MESH_LEASE_S"] = "2"  # the next brain takes over soon after
    mesh.brain("a")
    mesh.worker("w", 2)
    first = await mesh.submit_text(shell_plan(4, "a"))
    assert (await mesh.wait_plan(first)).status == "succeeded"
    learned = await until(lambda: covers(mesh, first), HANG_S, "a checkpoint after the first plan")
    assert isinstance(learned, Learned) and learned.samples(DURATION, by_class("cpu")) == 4
    # killed: nothing flushed on the way out
    mesh._expected_dead.add("a")
    mesh.kill("a")
    mesh.brain("b")
    second = await mesh.submit_text(shell_plan(3, "b"))
    assert (await mesh.wait_plan(second)).status == "succeeded"
    learned = await until(lambda: covers(mesh, second), HANG_S, "a checkpoint after the second plan")
    assert isinstance(learned, Learned)
    # every run counted once: the first brain's figures carried over, none counted twice
    assert learned.samples(DURATION, by_class("cpu")) == 7
    assert learned.samples(DURATION, by_kind("shell")) == 7
    # the samples are the runs' own durations (as their records say)
    tasks = {**(await mesh.tasks(first)), **(await mesh.tasks(second))}
    durations = sorted(t.duration_s for t in tasks.values())
    assert sorted(learned.duration[by_class("cpu")].samples) == pytest.approx(durations, abs=1e-3)
    # and a clean stop writes them too
    mesh.kill("b", signal.SIGTERM)
    after = await checkpointed(mesh)
    assert after is not None and after.samples(DURATION, by_class("cpu")) == 7
    # a brain started with learn_forget begins afresh
    mesh.env["MESH_LEARN_FORGET"] = "1"
    mesh.brain("c")

    async def forgotten() -> bool:
        learned = await checkpointed(mesh)
        return learned is not None and learned.samples(DURATION, by_class("cpu")) == 0

    await until(forgotten, HANG_S, "the figures forgotten")


LLM = "gemma3-270m"


@pytest.mark.integration
@pytest.mark.models
async def test_mesh_models_shows_what_a_real_run_measured(mesh: Mesh) -> None:
    mesh.env["MESH_LEARN_MIN_SAMPLES"] = "1"
    mesh.env["MESH_KEEP_ALIVE_S"] = "600"
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "none", "--classes", "script,llm")
    text = "# Ask\n\n## Tasks\n\n### ask\n- max_tokens: 4\n\n```prompt\nCount: 1, 2, 3,\n```\n"
    plan_id = await mesh.submit_text(text)
    assert (await mesh.wait_plan(plan_id, timeout_s=180)).status == "succeeded"

    async def measured() -> Learned | None:
        learned = await checkpointed(mesh)
        ok = learned is not None and learned.samples(DURATION, LLM) and learned.samples(LOAD, LLM)
        return learned if ok else None

    learned = await until(measured, HANG_S, "the load and the run in the checkpoint")
    assert isinstance(learned, Learned)
    ready = [
        m
        for _, m in await mesh.history()
        if isinstance(m, GpuState) and m.previous == BOOTING_LLM and m.state == LLM_READY
    ]
    assert len(ready) == 1
    task = (await mesh.tasks(plan_id))["ask"]

    doc = json.loads(mesh.cli("models", "--json"))
    assert doc["learn_min_samples"] == 1
    row = next(r for r in doc["models"] if r["model"] == LLM)
    assert row["vram_mb"] == builtin_models()[LLM].vram_mb
    figures = row["learned"]
    assert figures["load_s"] == {
        "value": pytest.approx(ready[0].took_s, abs=1e-3),
        "samples": 1,
        "in_use": True,
    }
    # the CPU stands in for the GPU: the memory a load takes there is what the registry says
    assert figures["vram_mb"] == {"value": builtin_models()[LLM].vram_mb, "samples": 1, "in_use": True}
    assert figures["duration_s"]["samples"] == 1
    assert figures["duration_s"]["value"] == pytest.approx(task.duration_s, abs=1e-3)
    assert doc["durations"]["class:llm"]["samples"] == 1
    assert doc["durations"]["kind:prompt"]["samples"] == 1
    # a model never loaded has none
    other = next(r for r in doc["models"] if r["model"] == "whisper-tiny-en")
    assert other["learned"] == {"load_s": None, "vram_mb": None, "duration_s": None}

    table = mesh.cli("models")
    line = next(line for line in table.splitlines() if LLM in line)
    assert f"{ready[0].took_s:.1f} (1)" in line and "600 (1)" in line, table
    assert "class:llm" in table and "kind:prompt" in table
    # offline: the registry alone
    doc = json.loads(mesh.cli("models", "--json", "--offline"))
    assert all(r["learned"] is None for r in doc["models"]) and doc["durations"] == {}
