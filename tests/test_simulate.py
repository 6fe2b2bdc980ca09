"""The placement simulator (`tools/simlib`, `tools/simulate.py`): its invariants on a tiny workload.

A tiny rig (three cards, two of them one worker's set) runs a mix of prompts on a small model, on
a model only the set can hold, transcriptions and long GPU shell jobs, while the lone card dies
in the middle of a job and comes back. Every task must end, no model may be placed where it
cannot fit, the dead card's job must be retried (redelivered or given up as lost and released
again) and the card must work again once back, the GPU time must add up, and a run must be the
same for the same seed, whatever Python's hash seed. Fast: no server, a few seconds in all.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh import machine_release, placement
from mesh.events import GpuState, ResourceItem, TaskRedelivered, TaskRetrying
from mesh.machine import Step
from mesh.placement import Decision
from mesh.records import SUCCEEDED
from mesh.status import FailReason
from tools.simlib import Report, parse, simulate, tasks_of
from tools.simlib.bounds import load_bound, makespan_bound
from tools.simlib.metrics import Meter
from tools.simlib.rig import Rig
from tools.simlib.workload import Workload, WorkloadError, load

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = sorted((ROOT / "tools" / "workloads").glob("*.toml"))

TINY: dict[str, Any] = {
    "run": {"duration_s": 600, "drain_s": 3600, "seed": 3},
    "gpus": [{"count": 3, "vram_mb": 4000, "name": "small card"}],
    "rig": {"sets": [[0, 2]]},
    "models": {
        "small": {"kind": "llm", "vram_mb": 3000, "load_s": 20},
        "big": {"kind": "llm", "vram_mb": 7000, "load_s": 30},
        "whisper": {"kind": "transcribe", "vram_mb": 500, "load_s": 2},
    },
    "kinds": {
        "prompt": {"body": "prompt", "model": "small", "duration_s": [5, 15]},
        "big": {"body": "prompt", "model": "big", "duration_s": [10, 20]},
        "transcribe": {"body": "transcribe", "model": "whisper", "duration_s": [5, 10]},
        "job": {"body": "shell", "duration_s": [150, 200]},
    },
    "phases": [{"duration_s": 600, "rate": 0.08, "mix": {"prompt": 0.5, "big": 0.2, "transcribe": 0.3}}],
    # long jobs at once: both GPU views take one at the start, so the lone card is busy when it dies
    "bursts": [{"at_s": 0, "kind": "job", "count": 4}],
    "failures": [{"unit": 1, "at_s": 100, "down_s": 120, "report_offline": False}],
}
SET_WORKER = "worker-sim-gpu0+2"
LONE_WORKER = "worker-sim-gpu1"


def tiny(**changes: Any) -> Workload:
    data = copy.deepcopy(TINY)
    for table, values in changes.items():
        data[table] = values
    return parse(data, "tiny")


def run(w: Workload, seed: int = 3) -> tuple[Report, Rig, list[Any]]:
    """Run a workload, keeping every event the brain decided and every GPU report it read."""
    todo = tasks_of(w, seed)
    rig = Rig(w, seed)
    meter = Meter(rig)
    seen: list[Any] = []

    def on_step(msg: Any, step: Step) -> None:
        if isinstance(msg, GpuState):
            seen.append(msg)
        seen.extend(step.events)

    rig.on_step = on_step
    end = rig.run(todo, meter.observe)
    return meter.report(todo, end), rig, seen


@pytest.fixture(scope="module")
def tiny_run() -> tuple[Report, Rig, list[Any]]:
    return run(tiny())


def test_the_units_of_a_set_are_one_view() -> None:
    w = tiny()
    assert [(u.cards, u.vram_mb) for u in w.units] == [((0, 2), 8000), ((1,), 4000)]
    assert [w.fits(u, "big") for u in w.units] == [True, False]


def test_every_task_ends(tiny_run: tuple[Report, Rig, list[Any]]) -> None:
    report, rig, _ = tiny_run
    assert report.tasks > 30
    assert report.never_served == 0
    assert report.served == report.tasks
    assert all(rig.state.tasks[k].status == SUCCEEDED for k in rig.tasks)
    assert report.violations == []


def test_no_model_is_placed_where_it_does_not_fit(tiny_run: tuple[Report, Rig, list[Any]]) -> None:
    report, rig, _ = tiny_run
    assert report.misplaced == 0
    units = {x.worker: x.unit for x in rig.workers}
    loads = [r for r in rig.requests if r.action == "load"]
    assert {r.model for r in loads} == {"small", "big"}
    assert all(rig.w.fits(units[r.worker], r.model) for r in loads)
    # the big model's prompts all ran on the set, the only view that holds it
    big = {t.key for t in rig.tasks.values() if t.kind == "big"}
    assert big and {w for (key, _, w) in rig.run_starts if key in big} == {SET_WORKER}


def test_a_gpu_that_dies_comes_back_and_its_lost_work_is_retried(
    tiny_run: tuple[Report, Rig, list[Any]],
) -> None:
    report, rig, seen = tiny_run
    failure = rig.w.failures[0]
    back = failure.at_s + failure.down_s
    # the job the lone card ran when it died was taken over (redelivered) or given up as lost
    # and released again, and it ended
    taken_over = [e for e in seen if isinstance(e, TaskRedelivered) and e.previous_worker == LONE_WORKER]
    given_up = [
        e
        for e in seen
        if isinstance(e, TaskRetrying) and e.reason == FailReason.LOST and e.worker == LONE_WORKER
    ]
    assert taken_over or given_up
    assert report.lost + report.redelivered >= 1
    for e in taken_over + given_up:
        assert rig.state.tasks[f"{e.plan_id}.{e.task_id}"].status == SUCCEEDED
    # nothing ran on it while it was down; it reported as a fresh worker when back, then worked
    assert not [t for (_, _, w), t in rig.run_starts.items() if w == LONE_WORKER and failure.at_s < t < back]
    fresh = [e for e in seen if isinstance(e, GpuState) and e.worker == LONE_WORKER and not e.previous]
    assert [e.at for e in fresh] == [0.0, back]
    assert [t for (_, _, w), t in rig.run_starts.items() if w == LONE_WORKER and t >= back]


def test_the_metrics_add_up(tiny_run: tuple[Report, Rig, list[Any]]) -> None:
    report, rig, _ = tiny_run
    down = rig.w.failures[0].down_s
    assert report.usable_gpu_s == pytest.approx(len(rig.workers) * report.end_s - down)
    for gpu, g in report.gpu_time.items():
        parts = g["loading_llm"] + g["loading_script"] + g["running"] + g["idle"]
        assert parts == pytest.approx(g["usable"]), gpu
        assert 0 <= g["idle_waiting"] <= g["idle"] + 1e-9
    assert report.loading + report.running + report.idle == pytest.approx(1.0)
    assert 0 <= report.idle_waiting_capped <= report.idle_waiting <= report.idle
    # every load the brain asked for either started or was refused; the model counts add up
    asked = sum(1 for r in rig.requests if r.action == "load")
    assert 0 < report.llm_loads <= asked
    assert sum(report.loads_by_model.values()) == report.llm_loads
    assert sum(w["n"] for w in report.waits.values()) == report.served
    assert all(w["p50"] <= w["p95"] for w in report.waits.values())
    assert report.makespan_s >= report.makespan_bound_s - 1e-9
    assert report.makespan_s == pytest.approx(max(rig.finished.values()))


def test_a_misplacement_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A placement that asks the lone small card for the big model is reported (and the worker
    refuses it): the check the shipped runs pass can fail."""
    real = placement.place
    forced: list[float] = []

    def careless(gpus: Any, demand: Any, now: float, policy: Any, **kw: Any) -> Decision:
        decision = real(gpus, demand, now, policy, **kw)
        view = gpus.get("sim-gpu1")
        if not forced and view is not None and view.usable and view.pending is None and not view.llm:
            forced.append(now)
            decision.items = [i for i in decision.items if i.worker != view.worker]
            decision.events = [e for e in decision.events if e.worker != view.worker]
            decision.items.append(
                ResourceItem(rid=f"forced-{now}", worker=view.worker, action="load", model="big", at=now)
            )
        return decision

    monkeypatch.setattr(machine_release, "place", careless)
    report, _, _ = run(tiny(failures=[]))
    assert forced
    assert report.misplaced == 1
    assert report.refusals >= 1
    assert any("the brain placed big" in v for v in report.violations)


def test_a_run_is_the_same_for_a_seed(tiny_run: tuple[Report, Rig, list[Any]]) -> None:
    again, _, _ = run(tiny())
    assert again.as_dict() == tiny_run[0].as_dict()
    other, _, _ = run(tiny(), seed=4)
    assert other.as_dict() != tiny_run[0].as_dict()


def test_the_command_is_deterministic_whatever_the_hash_seed(tmp_path: Path) -> None:
    """String hashing differs between processes: nothing may depend on a set's order."""
    workload = tmp_path / "tiny.toml"
    workload.write_text(_toml(TINY))
    outputs = []
    for hash_seed in ("1", "3"):
        out = tmp_path / f"run{hash_seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cmd = [sys.executable, str(ROOT / "tools" / "simulate.py"), str(workload), "--seeds", "2"]
        done = subprocess.run(
            [*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        data = json.loads(out.read_text())
        data.pop("command")
        outputs.append(data)
    assert outputs[0] == outputs[1]
    assert outputs[0]["workloads"]["tiny"]["summary"]["never_served"]["mean"] == 0


def test_the_load_bound() -> None:
    """LLM-only (ceil(3.5) = 4 GPUs), script-only (4 GPUs: the LLM keeps the fifth), LLM again
    (3 more loads): 7. Two models in alternating bursts, each needing 2 GPUs to keep up: 4."""
    shift = load(ROOT / "tools" / "workloads" / "phase_shift.toml")
    assert load_bound(shift, tasks_of(shift, 1)) == {"qwen-7b": 7}
    w = tiny(
        phases=[],
        failures=[],
        bursts=[{"at_s": 600 * n, "kind": ("prompt", "big")[n % 2], "count": 40} for n in range(6)],
        kinds={
            "prompt": {"body": "prompt", "model": "small", "duration_s": [30, 30]},
            "big": {"body": "prompt", "model": "small", "duration_s": [30, 30]},
        },
        models={"small": {"kind": "llm", "vram_mb": 3000, "load_s": 100}},
        gpus=[{"count": 5, "vram_mb": 4000}],
        rig={},
        run={"duration_s": 4200},
    )
    # 40 x 30 s every 1200 s: one GPU keeps up with each kind; both kinds are one model, and
    # from the second burst on the two kinds' windows overlap: 2 GPUs, 2 loads in all
    assert load_bound(w, tasks_of(w, 1)) == {"small": 2}
    assert makespan_bound(w, tasks_of(w, 1)) >= 3000 + 30


def test_the_shipped_workloads_read() -> None:
    assert {p.stem for p in WORKLOADS} >= {
        "steady",
        "phase_shift",
        "two_models",
        "big_model",
        "gpu_dies",
        "burst_500",
        "mostly_idle",
    }
    for path in WORKLOADS:
        w = load(path)
        assert w.units and (w.phases or w.bursts)
        assert tasks_of(w, 1)


def test_a_bad_workload_says_what_is_wrong() -> None:
    with pytest.raises(WorkloadError, match=r"kind prompt .* needs a llm model"):
        tiny(kinds={"prompt": {"body": "prompt", "model": "whisper"}})
    with pytest.raises(WorkloadError, match="a failure names unit 7"):
        tiny(failures=[{"unit": 7, "at_s": 1, "down_s": 1}])
    with pytest.raises(WorkloadError, match="unknown table"):
        parse({**TINY, "gpu": []}, "typo")


def test_simulate_runs_one_seed() -> None:
    report, _ = simulate(tiny(failures=[]), 5)
    assert report.seed == 5 and report.never_served == 0 and not math.isnan(report.loads_ratio)


def _toml(data: dict[str, Any]) -> str:
    """The tiny workload as a TOML file (tables of scalars and arrays only)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines: list[str] = []
    for table, body in data.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{table}]]")
                lines += [f"{k} = {value(v)}" for k, v in entry.items()]
        elif table in ("models", "kinds"):
            for name, entry in body.items():
                lines.append(f"[{table}.{name}]")
                lines += [f"{k} = {value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{table}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"
