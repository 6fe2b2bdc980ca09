"""A worker that owns a set of GPUs (`--gpu 0,1`): one device with the cards' memory summed, placed
as one GPU, an LLM split over the cards; the controls of any card hold the set.

The pure parts first (parsing, ids, units, the device over a simulated file, the loader's
options, placement, permissions, the `mesh gpus` rows), then real agents on a real server with
two simulated 6 GB cards (`MESH_SIMULATED_GPUS`: only NVML is simulated; the LLM, Gemma 3 270M,
loads on the CPU). No test here runs on CUDA.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.bus.read import read_bucket
from mesh.cli.gpus import with_sets
from mesh.errors import ConfigError
from mesh.events import GpuState, ResourceRequested, decode
from mesh.host.config import load_settings
from mesh.host.gpu import GpuError, GpuSet, gpu_environment, gpu_id, open_device, parse_gpus
from mesh.host.loaders import llm_options, split_by_free
from mesh.host.telemetry import host_token, write_simulated
from mesh.models import ModelError, ModelSpec, builtin_models
from mesh.names import Names, check_token
from mesh.ops import units
from mesh.ops.bootstrap import model_workers
from mesh.ops.security import users
from mesh.placement import GpuView, PlacementPolicy, place
from mesh.records import decode_agent
from mesh.settings import settings_from
from tests.conftest import HANG_S, ROOT, Mesh
from tests.faults import until

HOST = host_token()
SET = f"{HOST}-gpu0_1"
CARD = {i: f"{HOST}-gpu{i}" for i in (0, 1)}
CARD_MB = 6144


# ------------------------------------------------------------------ naming a set


def test_a_gpu_set_is_written_as_a_comma_list_and_named_with_underscores() -> None:
    assert parse_gpus("0,3") == parse_gpus("0+3") == parse_gpus(" 0_3 ") == (0, 3)
    assert parse_gpus("3,0") == (3, 0), "the order is kept: the first is the main GPU"
    assert parse_gpus("2") == (2,)
    assert parse_gpus("none") == parse_gpus("cpu") == ()
    for text, said in (
        ("0,0", "names GPU 0 twice"),
        ("1,0,1", "names GPU 1 twice"),
        ("0,x", "'x' is not a GPU index"),
        ("-1", "'-1' is not a GPU index"),
        ("0,,3", "'' is not a GPU index"),
        ("0,none", "a worker owns GPUs or the CPU, not both"),
        ("cpu+1", "a worker owns GPUs or the CPU, not both"),
    ):
        with pytest.raises(GpuError, match=said):
            parse_gpus(text)

    # the set's id is a valid subject token and KV key ('+' and '.' are not)
    gid = gpu_id("rig", (0, 3))
    assert gid == "rig-gpu0_3"
    names = Names()
    assert check_token(gid, "gpu id") and check_token(f"worker-{gid}", "worker id")
    assert names.gpu_control_key(gid, "thermal") == "rig-gpu0_3.thermal"
    assert names.gpu_event(gid, "state") == "mesh.evt.gpu.rig-gpu0_3.state"
    for bad in ("rig-gpu0+3", "rig-gpu0.3", "rig-gpu0,3"):
        with pytest.raises(ValueError):
            check_token(bad, "gpu id")

    # CUDA sees the set's cards, the first as cuda:0; a CPU worker sees none
    assert gpu_environment((0, 3), "", {})["CUDA_VISIBLE_DEVICES"] == "0,3"
    assert gpu_environment(2, "", {})["CUDA_VISIBLE_DEVICES"] == "2"
    assert gpu_environment(None, "", {"CUDA_VISIBLE_DEVICES": "1"})["CUDA_VISIBLE_DEVICES"] == ""


def test_mesh_up_and_the_units_take_sets_joined_by_plus(tmp_path: Path) -> None:
    from mesh.errors import ConfigError

    assert model_workers("0+3,1,2,4,cpu") == ((0, 3), 1, 2, 4, None)
    assert model_workers("0,1") == (0, 1) and model_workers("cpu") == (None,)
    with pytest.raises(ConfigError, match="GPU 3 is in 0\\+3 and in 3: a GPU belongs to one worker"):
        model_workers("0+3,3")
    with pytest.raises(ConfigError, match="names GPU 0 twice"):
        model_workers("0+0")
    with pytest.raises(ConfigError, match="write auto, cpu, off, or GPU indices"):
        model_workers("0+x")

    layout = units.Layout(gpus=("0+3", "1", "cpu"))
    layout.check()
    assert layout.worker_instances == ("0_3", "1", "cpu")
    assert "mesh-worker@0_3.service mesh-worker@1.service mesh-worker@cpu.service" in units.enable_command(
        layout
    )
    for gpus, said in ((("0+3", "3"), "GPU 3 is in 0\\+3 and in 3"), (("0,x",), "not a GPU index")):
        with pytest.raises(units.UnitError, match=said):
            units.Layout(gpus=gpus).check()


def test_a_set_s_unit_instance_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    from tests.test_units import VENV, verify

    layout = units.Layout(venv=VENV, data_dir=str(tmp_path / "data"), gpus=("0+3",))
    files = units.rendered(layout, load_settings(environ={}))
    out = tmp_path / "units"
    units.write_units(files, out)
    shutil.copy(out / "mesh-worker@.service", out / "mesh-worker@0_3.service")
    verify(out, ["mesh-worker@0_3.service"], False, tmp_path)


def test_a_set_worker_may_publish_under_its_set_s_gpu_id() -> None:
    settings = load_settings(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    worker = next(u for u in users(settings, ["worker-t-gpu0_1"]) if u.name == "worker-t-gpu0_1")
    allowed = worker.permissions.publish
    assert "mesh.evt.gpu.t-gpu0_1.state" in allowed
    assert "$KV.mesh-gpus.t-gpu0_1" in allowed


# ------------------------------------------------------------------ the device


def two_cards(path: Path, used: tuple[int, int] = (0, 0), temps: tuple[float, float] = (50, 50)) -> None:
    write_simulated(
        path,
        [
            {"name": f"Sim 6GB #{i}", "mem_total_mb": CARD_MB, "mem_used_mb": used[i], "temp_c": temps[i]}
            for i in (0, 1)
        ],
    )


def test_a_set_s_memory_is_the_sum_of_its_cards_read_each_on_its_own(tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    two_cards(sim, used=(500, 1500))
    device = open_device((0, 1), simulated=str(sim))
    assert isinstance(device, GpuSet)
    assert device.indices == (0, 1) and device.index == 0
    assert device.name == "Sim 6GB #0 + Sim 6GB #1"
    assert device.total_mb == 2 * CARD_MB
    mem = device.memory(0)
    assert (mem.total_mb, mem.used_mb) == (2 * CARD_MB, 2000)
    # what mesh holds is spread over the cards by their size
    cards = device.card_memory(8000)
    assert [(m.total_mb, m.used_mb) for m in cards] == [(CARD_MB, 4000), (CARD_MB, 4000)]
    assert device.memory(8000).used_mb == 8000
    # one GPU stays one device
    single = open_device(1, simulated=str(sim))
    assert not isinstance(single, GpuSet) and single.indices == (1,)
    assert open_device(None, memory_mb=100).indices == ()
    with pytest.raises(GpuError, match="no simulated GPU 5"):
        open_device((0, 5), simulated=str(sim))


# ------------------------------------------------------------------ the loader's options


def test_an_llm_on_a_set_is_split_by_the_cards_free_memory_with_the_first_card_main() -> None:
    spec = ModelSpec(kind="llm", path="/m.gguf", vram_mb=11000)
    options = llm_options("qwen-14b", spec, "cuda", (5800, 5900))
    assert options["tensor_split"] == [0.4957, 0.5043]
    assert options["main_gpu"] == 0 and options["n_gpu_layers"] == -1
    assert split_by_free((6000, 2000)) == [0.75, 0.25]
    assert split_by_free((0, 0)) == [0.5, 0.5]
    # the spec's own split wins, one share per card
    own = ModelSpec(kind="llm", path="/m.gguf", tensor_split=[0.6, 0.4])
    assert llm_options("own", own, "cuda", (5800, 5900))["tensor_split"] == [0.6, 0.4]
    with pytest.raises(ModelError, match="tensor_split has 2 share\\(s\\) and this worker owns 3 GPUs"):
        llm_options("own", own, "cuda", (5800, 5900, 6000))
    # one GPU (or the CPU): no split, as before
    single = llm_options("qwen-7b", spec, "cuda", ())
    assert single["tensor_split"] is None and "main_gpu" not in single
    assert llm_options("qwen-7b", spec, "cpu", ())["n_gpu_layers"] == 0
    # a set standing in on the CPU computes the same split (llama.cpp ignores it there)
    on_cpu = llm_options("qwen-14b", spec, "cpu", (CARD_MB, CARD_MB))
    assert on_cpu["tensor_split"] == [0.5, 0.5] and on_cpu["n_gpu_layers"] == 0


# ------------------------------------------------------------------ placement


def test_a_model_bigger_than_any_card_is_placed_on_a_set_that_holds_it() -> None:
    policy = PlacementPolicy(models={"qwen-14b": ("llm", 11000)})
    views = {
        f"rig-gpu{i}": GpuView(gpu=f"rig-gpu{i}", worker=f"worker-rig-gpu{i}", vram_total_mb=CARD_MB)
        for i in (1, 2, 4)
    }
    alone = place(dict(views), {"llm:qwen-14b": 3}, 100.0, policy)
    assert alone.items == [] and alone.unplaceable == [("qwen-14b", 11000, CARD_MB)]
    views["rig-gpu0_3"] = GpuView(
        gpu="rig-gpu0_3", worker="worker-rig-gpu0_3", vram_total_mb=2 * CARD_MB, vram_used_mb=400
    )
    decision = place(views, {"llm:qwen-14b": 3}, 100.0, policy)
    assert [(i.worker, i.action, i.model) for i in decision.items] == [
        ("worker-rig-gpu0_3", "load", "qwen-14b")
    ]
    assert decision.unplaceable == []


# ------------------------------------------------------------------ `mesh gpus`


def test_mesh_gpus_shows_a_set_as_one_row_naming_its_cards() -> None:
    from mesh.cli.gpus import _gpus_table
    from mesh.cli.top import GpuView as Buckets
    from mesh.cli.top import gpu_rows
    from mesh.samples import GpuSample

    state = GpuState(
        gpu="rig-gpu0_3",
        worker="worker-rig-gpu0_3",
        host="rig",
        state="llm_ready",
        at=1.0,
        index=0,
        indices=(0, 3),
        name="GTX 1060 6GB + GTX 1060 6GB",
        device="cuda",
        llm="qwen-14b",
        vram_total_mb=12288,
        vram_used_mb=11400,
    )
    view = Buckets(
        states={state.gpu: state},
        samples={
            f"rig-gpu{i}": GpuSample(host="rig", index=i, name="GTX 1060 6GB", at=1.0, mem_total_mb=6144)
            for i in (0, 1, 3)
        },
    )
    rows = {r["gpu"]: r for r in with_sets(gpu_rows(view), view.states)}
    assert rows["rig-gpu0_3"]["cards"] == [0, 3]
    assert rows["rig-gpu0_3"]["mem_total_mb"] == 12288 and rows["rig-gpu0_3"]["model"] == "qwen-14b"
    assert rows["rig-gpu0"]["set"] == rows["rig-gpu3"]["set"] == "rig-gpu0_3"
    assert "set" not in rows["rig-gpu1"] and "cards" not in rows["rig-gpu1"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(_gpus_table(list(rows.values())))
    text = console.export_text()
    assert "0+3" in text and "in set 0+3" in text and "qwen-14b" in text


# ------------------------------------------------------------------ real agents


async def set_state(mesh: Mesh) -> GpuState | None:
    raw = await read_bucket(await (await mesh.bus()).gpus_kv())
    msg = decode(raw[SET]) if SET in raw else None
    return msg if isinstance(msg, GpuState) else None


async def until_set(mesh: Mesh, want: str) -> GpuState:
    async def seen() -> GpuState | None:
        st = await set_state(mesh)
        return st if st is not None and st.state == want else None

    found = await until(seen, HANG_S, f"{SET} {want}")
    assert isinstance(found, GpuState)
    return found


SCRIPT_PLAN = (
    "# held\n\n## Tasks\n\n### work\n- class: script\n\n```shell\necho ran on $CUDA_VISIBLE_DEVICES\n```\n"
)


@pytest.mark.integration
async def test_a_pause_or_cordon_of_any_card_holds_the_whole_set(mesh: Mesh, tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    two_cards(sim)
    mesh.env.update(
        {
            "MESH_SIMULATED_GPUS": str(sim),
            "MESH_WATCHDOG_INTERVAL_S": "0.3",
            "MESH_THERMAL_PAUSE_C": "87",
            "MESH_THERMAL_RESUME_C": "80",
        }
    )
    mesh.brain()
    mesh.start_agent("watchdog", "watchdog")
    # started as its unit starts it: CUDA_VISIBLE_DEVICES is the instance, 0_1
    mesh.env["CUDA_VISIBLE_DEVICES"] = "0_1"
    worker = mesh.worker("gpu", 1, "--gpu", "0_1", "--classes", "script")
    del mesh.env["CUDA_VISIBLE_DEVICES"]
    idle = await until_set(mesh, "idle")
    # the worker replaced it before CUDA could read it: its process runs with the list
    started_with = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=0,1" in started_with
    assert idle.indices == (0, 1) and idle.index == 0
    assert idle.vram_total_mb == 2 * CARD_MB and idle.name == "Sim 6GB #0 + Sim 6GB #1"
    assert idle.worker == f"worker-{SET}"

    # the watchdog reads each card on its own: the second card hot pauses the set
    two_cards(sim, temps=(50, 92))
    paused = await until_set(mesh, "paused")
    assert f"thermal pause: {CARD[1]}" in paused.hold and "92" in paused.hold, paused.hold
    plan_id = await mesh.submit_text(SCRIPT_PLAN)
    await asyncio.sleep(2.0)
    assert (await mesh.tasks(plan_id))["work"].status == "ready", "a held set claims no work"
    two_cards(sim)
    assert (await mesh.wait_plan(plan_id, HANG_S)).status == "succeeded"
    await until_set(mesh, "idle")
    done = [
        m for _, m in await mesh.history((await mesh.bus()).names.run_events(plan_id, "work", "finished"))
    ]
    assert "ran on 0,1" in done[-1].stdout_tail, "the task sees both cards"  # type: ignore[union-attr]

    # an operator's pause of one card (by its index) holds the set; a cordon of the set too
    mesh.cli("gpu", "pause", "0", "--reason", "fan noise")
    assert f"operator pause: {CARD[0]}: fan noise" in (await until_set(mesh, "paused")).hold
    mesh.cli("gpu", "resume", "0")
    await until_set(mesh, "idle")
    assert "cordoned" in mesh.cli("gpu", "cordon", "0,1", "--reason", "XID 79")
    assert (await until_set(mesh, "paused")).hold == "operator cordon: XID 79"
    mesh.cli("gpu", "uncordon", SET)
    await until_set(mesh, "idle")

    # `mesh gpus`: the set as one row naming its cards, each card's reading beside it
    async def sampled() -> bool:
        raw = await read_bucket(await (await mesh.bus()).telemetry_kv(), "*.*")
        return all(f"{HOST}.gpu{i}" in raw for i in (0, 1))

    await until(sampled, HANG_S, "both cards sampled")
    rows = {r["gpu"]: r for r in map(json.loads, mesh.cli("gpus", "--json").splitlines())}
    assert rows[SET]["cards"] == [0, 1] and rows[SET]["mem_total_mb"] == 2 * CARD_MB
    assert rows[CARD[0]]["set"] == rows[CARD[1]]["set"] == SET
    assert rows[CARD[1]]["mem_total_mb"] == CARD_MB
    table = mesh.cli("gpus")
    assert "0+1" in table and "in set 0+1" in table


@pytest.mark.integration
@pytest.mark.models
async def test_a_model_bigger_than_one_card_loads_over_a_set_and_answers(mesh: Mesh, tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    two_cards(sim)
    gemma = builtin_models()["gemma3-270m"]
    config = tmp_path / "mesh.toml"
    # the small model, said to need more than one 6 GB card: only the set can hold it
    config.write_text(
        f'[models.big]\nkind = "llm"\nsource = "{gemma.source}"\nvram_mb = 8000\nn_ctx = 2048\n'
        "max_tokens = 8\n"
    )
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_CONFIG": str(config), "MESH_KEEP_ALIVE_S": "60"})
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "0,1")
    idle = await until_set(mesh, "idle")
    assert idle.vram_total_mb == 2 * CARD_MB and idle.indices == (0, 1)

    async def registered() -> bool:
        agents = await read_bucket(await (await mesh.bus()).agents_kv())
        return f"worker-{SET}" in agents and decode_agent(agents[f"worker-{SET}"]).role == "worker"

    await until(registered, HANG_S, "the set's worker registered")
    plan_id = await mesh.submit_text(
        "# Big\n\n## Tasks\n\n### ask\n- model: big\n\n```prompt\nCount from 1 to 10: 1, 2, 3,\n```\n"
    )
    plan = await mesh.wait_plan(plan_id, timeout_s=180)
    tasks = await mesh.tasks(plan_id)
    assert plan.status == "succeeded", {t: (r.status, r.error[-300:]) for t, r in tasks.items()}
    assert tasks["ask"].worker == f"worker-{SET}"
    events = [m for _, m in await mesh.history((await mesh.bus()).names.gpu_event(SET, "requested"))]
    assert [(e.action, e.model) for e in events if isinstance(e, ResourceRequested)][:1] == [("load", "big")]
    held = await set_state(mesh)
    assert held is not None and held.llm == "big" and held.vram_total_mb == 2 * CARD_MB
    # the worker split the model over the two cards by their free memory, the first the main GPU
    log = mesh.log("gpu")
    assert "loaded big" in log and "over GPUs 0+1" in log, log[-2000:]
    assert "tensor_split 0.5, 0.5; main GPU 0" in log, log[-2000:]


@pytest.mark.parametrize(
    ("gpu", "said"),
    [
        ("0,0", "--gpu '0,0' names GPU 0 twice"),
        ("0,x", "--gpu '0,x': 'x' is not a GPU index"),
        ("0,none", "--gpu '0,none' names GPUs and the CPU"),
    ],
)
def test_a_bad_gpu_set_is_a_clear_error_before_anything_starts(gpu: str, said: str, tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        "XDG_CONFIG_HOME": str(tmp_path),
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "agent", "worker", "--gpu", gpu],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_llm_generates_on_half_the_cores_and_reads_its_prompt_on_all_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # llama.cpp's threads wait for each other at every token: on all the cores, generating
    # collapses as soon as anything else runs on one (docs/gpus.md, "CPU threads")
    def threads(spec: ModelSpec) -> tuple[int, int]:
        options = llm_options("m", spec, "cpu", ())
        return options["n_threads"], options["n_threads_batch"]

    default = ModelSpec(kind="llm", path="/m.gguf")
    for cores, expected in ((16, (8, 16)), (2, (1, 2)), (1, (1, 1)), (None, (1, 1))):
        monkeypatch.setattr("mesh.host.loaders.os.cpu_count", lambda cores=cores: cores)
        assert threads(default) == expected, cores
    assert threads(ModelSpec(kind="llm", path="/m.gguf", threads=3, threads_batch=5)) == (3, 5)


def test_a_negative_thread_count_is_a_config_error_naming_the_model() -> None:
    for field in ("threads", "threads_batch"):
        said = rf"\[models\.m\]: {field} is -1: set a number of CPU threads, or 0 for the default"
        with pytest.raises(ConfigError, match=said):
            settings_from(
                {"models": {"m": {"kind": "llm", "path": "/m.gguf", field: -1}}},
                {},
                {},
                file="mesh.toml",
                default_data_dir=lambda: "/tmp",
                is_file=lambda _: True,
            )
