"""Placement's promises over random rigs and workloads (hypothesis), driven through the simulator:
the real brain (`mesh.machine.apply` and `mesh.placement`) and simulated GPU workers, no NATS.

Each example draws a small rig (one to four GPU views of 4, 6 or 12 GB, two cards of them
sometimes one worker's set), three models (a small LLM, one that only 12 GB holds, a
transcription model) with random load times, and a random workload (a steady phase or two of
random mixes and rates, and a few bursts), then runs it until every task ended. Then:

- **never where it does not fit**: no load was asked of a GPU view smaller than the model, and no
  worker ever held more than its memory (the simulated worker refuses a load that does not fit);
- **no flapping within the residency**: a GPU that loaded a model is asked to unload it less
  than `min_residency_s` after the load only when, at that moment, none of that model's tasks
  waited, other work that the GPU could run waited, and the GPU had sat unused for at least
  `max(yield_after_s, yield_factor x the model's load time)`. (That is the whole guarantee: a
  model with work waiting keeps a GPU at least `min_residency_s`; one with none waiting may
  lose it after about one load time of disuse, to waiting work only);
- **everything served**: every task whose model some GPU view can hold ran and succeeded (no
  class of work is starved by another, nor by a model no GPU can hold).

Fast: a few seconds in all (`max_examples` small, short workloads).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.events import GpuState, ResourceRequested
from mesh.machine import Step
from mesh.placement import LLM_BUSY, LLM_READY
from mesh.records import SUCCEEDED
from tools.simlib import parse, tasks_of
from tools.simlib.metrics import Meter
from tools.simlib.rig import Rig

KINDS = ["prompt", "big", "transcribe", "job"]


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    cards = draw(st.lists(st.sampled_from([4096, 6144, 12288]), min_size=1, max_size=4))
    sets = [[0, 1]] if len(cards) >= 3 and draw(st.booleans()) else []
    duration = draw(st.sampled_from([600, 1200]))
    phases = []
    left = duration
    while left > 0:
        length = min(left, draw(st.sampled_from([300, 600, 900])))
        mix = {k: draw(st.integers(0, 3)) for k in KINDS}
        if not any(mix.values()):
            mix["prompt"] = 1
        phases.append({"duration_s": length, "rate": draw(st.sampled_from([0.01, 0.03, 0.08])), "mix": mix})
        left -= length
    bursts = [
        {"at_s": draw(st.integers(0, duration - 1)), "kind": draw(st.sampled_from(KINDS)), "count": n}
        for n in draw(st.lists(st.integers(1, 25), max_size=3))
    ]
    return {
        "run": {"duration_s": duration, "drain_s": 2 * 3600, "seed": 1},
        "gpus": [{"count": 1, "vram_mb": mb, "name": f"{mb // 1024} GB"} for mb in cards],
        "rig": {"sets": sets},
        "models": {
            "small": {"kind": "llm", "vram_mb": 3500, "load_s": draw(st.sampled_from([5, 30, 120]))},
            "big": {"kind": "llm", "vram_mb": 11000, "load_s": draw(st.sampled_from([10, 150]))},
            "whisper": {"kind": "transcribe", "vram_mb": 800, "load_s": 3},
        },
        "kinds": {
            "prompt": {"body": "prompt", "model": "small", "duration_s": [5, 60]},
            "big": {"body": "prompt", "model": "big", "duration_s": [20, 90]},
            "transcribe": {"body": "transcribe", "model": "whisper", "duration_s": [5, 30]},
            "job": {"body": "shell", "duration_s": [5, 40]},
        },
        "phases": phases,
        "bursts": bursts,
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=workloads(), seed=st.integers(1, 1000))
def test_random_workloads_keep_placements_promises(data: dict[str, Any], seed: int) -> None:
    w = parse(data, "random")
    tasks = tasks_of(w, seed)
    rig = Rig(w, seed)
    pp = rig.policy.placement
    meter = Meter(rig)
    # GPU id -> (model, loaded at) as the brain saw the load finish; the views at each request
    loaded: dict[str, tuple[str, float]] = {}
    early: list[str] = []

    def on_step(msg: Any, step: Step) -> None:
        if isinstance(msg, GpuState) and msg.state in (LLM_READY, LLM_BUSY) and msg.llm:
            if loaded.get(msg.gpu, ("", 0.0))[0] != msg.llm:
                loaded[msg.gpu] = (msg.llm, msg.at)
        elif isinstance(msg, GpuState) and not msg.llm:
            loaded.pop(msg.gpu, None)
        for ev in step.events:
            if not isinstance(ev, ResourceRequested) or ev.action != "unload":
                continue
            model, at = loaded.get(ev.gpu, (ev.model, -1e9))
            if ev.at - at >= pp.min_residency_s:
                continue
            view = rig.state.gpus[ev.gpu]
            demand = rig.state.demand
            others = demand.get("script", 0) > 0 or any(
                n > 0 and k != f"llm:{model}" and w.models[k[4:]].vram_mb <= view.vram_total_mb
                for k, n in demand.items()
                if k.startswith("llm:")
            )
            # the model's load time as the brain takes it: the learned figure once enough loads
            # were seen, else the mean of its last load on each GPU, else the prior
            seen = [v.load_times[model] for v in rig.state.gpus.values() if model in v.load_times]
            load_s = rig.state.learned.load_s(model, sum(seen) / len(seen) if seen else pp.load_s)
            unused = ev.at - view.last_used
            if (
                demand.get(f"llm:{model}", 0) > 0
                or not others
                or unused < max(pp.yield_after_s, pp.yield_factor * load_s) - 1e-6
            ):
                held = ev.at - at
                early.append(f"{ev.at:.1f} {ev.gpu} unload {model} {held:.0f}s after loading: {ev.reason}")

    rig.on_step = on_step
    end = rig.run(tasks, meter.observe)
    report = meter.report(tasks, end)

    # never where it does not fit (nor beyond a worker's memory)
    assert report.misplaced == 0, report.violations
    assert report.violations == []
    # no flapping within the residency
    assert early == []
    # everything a GPU view can hold is served
    fits = {m for m in w.models if any(w.fits(u, m) for u in w.units)}
    for t in tasks:
        model = w.kinds[t.kind].model
        if not model or model in fits:
            assert t.key in rig.tasks and rig.state.tasks[t.key].status == SUCCEEDED, (t, report.never_served)
