"""GPU power caps and the watchdog's live config: the pure decisions (mesh.power), the simulated
GPUs' power limits, then a real watchdog process on simulated GPUs against a real nats-server:
caps set at start, set again after a simulated driver reset, `mesh gpu power` live, and a
config read again on SIGHUP (a broken one refused, the old one kept)."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from mesh.bus.read import read_bucket
from mesh.errors import ConfigError
from mesh.events import AlertRaised, AlertResolved, GpuControl, GpuPower, decode, encode
from mesh.host.config import load_settings
from mesh.host.telemetry import PowerSetError, SimulatedSource, write_simulated
from mesh.power import Applied, PowerCaps, PowerError, PowerRange, parse_caps, to_set, wanted
from mesh.samples import GpuSample, decode_sample
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.test_exporter import free_port, scrape, value

HOST = "powerhost"

# ---------------------------------------------------------------- the pure decisions


def test_caps_from_the_config_table() -> None:
    caps = parse_caps({"power_limit_w": 140, "1": {"power_limit_w": 120.5}})
    assert (caps.cap(0), caps.cap(1), caps.cap(7)) == (140.0, 120.5, 140.0)
    assert parse_caps({"2": {"power_limit_w": 90}}).cap(0) is None
    assert not parse_caps({})


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ({"power_limit_w": "lots"}, "must be a number of watts"),
        ({"power_limit_w": -5}, "above 0 W"),
        ({"x": {"power_limit_w": 100}}, "[gpus.x]: a GPU is named by its index"),
        ({"0": 140}, "[gpus.0] must be a table"),
        ({"0": {"power_limt_w": 140}}, "unknown setting(s) power_limt_w"),
    ],
)
def test_bad_caps_are_refused_naming_the_table(table: dict[str, Any], said: str) -> None:
    with pytest.raises(PowerError) as exc:
        parse_caps(table)
    assert said in str(exc.value)


def test_a_bad_cap_in_the_config_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[gpus.0]\npower_limit_w = "high"\n')
    with pytest.raises(ConfigError, match=r"\[gpus.0\]: power_limit_w must be a number"):
        load_settings(config=cfg, environ={})
    cfg.write_text("[gpus]\npower_limit_w = 140\n[gpus.1]\npower_limit_w = 120\n")
    assert load_settings(config=cfg, environ={}).power_caps() == PowerCaps(140.0, {1: 120.0})


def test_the_range_names_itself() -> None:
    rng = PowerRange(min_w=100, max_w=250, default_w=200)
    assert rng.problem(140) == "" and rng.problem(100) == "" and rng.problem(250) == ""
    assert rng.problem(400) == (
        "400 W is outside this card's allowed power limits, 100-250 W (its default is 200 W)"
    )
    assert "100-250 W" in rng.problem(60)


def test_what_to_set_and_why() -> None:
    assert wanted(PowerCaps(140.0, {1: 120.0}), None, 1) == 120.0
    assert wanted(PowerCaps(140.0), 180.0, 0) == 180.0
    assert to_set(None, None, 0, 200.0) == (None, "")
    assert to_set(140.0, None, 0, 200.0)[0] == 140.0  # never set
    assert to_set(140.0, Applied(140.0, 0), 0, 140.0) == (None, "")  # in force
    assert to_set(140.0, Applied(140.0, 0), 0, 140.4) == (None, "")  # the card's rounding
    watts, why = to_set(140.0, Applied(140.0, 0), 0, 200.0)
    assert watts == 140.0 and "read back 200 W" in why  # a reset put the default back
    watts, why = to_set(140.0, Applied(140.0, 0), 1, 140.0)
    assert watts == 140.0 and "reset" in why  # the handle was taken again
    assert to_set(130.0, Applied(140.0, 0), 0, 140.0)[0] == 130.0  # a new cap
    watts, why = to_set(None, Applied(140.0, 0), 0, 140.0)
    assert watts is None and "default" in why  # a cap taken away


def test_an_old_sample_without_a_cap_still_decodes() -> None:
    old = b'{"type":"tel.gpu","host":"h","index":0,"name":"n","at":1.0,"power_limit_w":200.0}'
    sample = decode_sample(old)
    assert isinstance(sample, GpuSample) and sample.power_cap_w is None


def test_a_power_event_round_trips_and_reads_in_mesh_tail() -> None:
    from mesh.cli.render import event_line

    ev = GpuPower(gpu="h-gpu0", source="watchdog", at=1.0, watts=140.0, rid="r", limit_w=140.0, reason="why")
    assert decode(encode(ev)) == ev
    assert "h-gpu0 limit 140 W: why" in event_line("s", ev).plain
    asked = GpuPower(gpu="h-gpu0", source="operator", at=1.0, watts=0.0, by="ops")
    assert "h-gpu0 asked the config's cap by ops" in event_line("s", asked).plain


def test_a_reload_applies_live_settings_and_keeps_the_rest(tmp_path: Path) -> None:
    from agents.watchdog_reload import live, merged

    old = load_settings(environ={"MESH_DATA_DIR": str(tmp_path / "a")})
    new = load_settings(
        environ={"MESH_DATA_DIR": str(tmp_path / "b"), "MESH_THERMAL_PAUSE_C": "70", "MESH_PREFIX": "other"}
    )
    kept, applied, waiting = merged(old, new)
    assert kept.thermal_pause_c == 70 and applied == ["thermal_pause_c"]
    assert (
        kept.data_dir == old.data_dir and kept.prefix == "mesh" and sorted(waiting) == ["data_dir", "prefix"]
    )
    assert live("alerts") and live("alert_webhook_url") and live("gpus") and live("health")
    assert not live("server_url") and not live("nats_password") and not live("simulated_gpus")


# ---------------------------------------------------------------- the simulated GPUs


def sim_gpus(resets: int = 0, temp: float = 50.0) -> list[dict[str, Any]]:
    return [
        {
            "name": "Sim A",
            "temp_c": temp,
            "power_limit_w": 200,
            "power_min_w": 100,
            "power_max_w": 250,
            "resets": resets,
        },
        {"name": "Sim B", "power_limit_w": 200, "power_min_w": 100, "power_max_w": 250},
    ]


def sets_of(sim: Path) -> list[dict[str, Any]]:
    path = sim.with_name(sim.name + ".sets.jsonl")
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_simulated_power_limits_and_a_driver_reset(tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    write_simulated(sim, sim_gpus())
    src = SimulatedSource(sim, "h")
    assert src.power_range(0) == PowerRange(min_w=100, max_w=250, default_w=200)
    assert src.power_limit(0) == 200 and src.generation(0) == 0
    src.set_power_limit(0, 140)
    assert src.power_limit(0) == 140 and src.sample(0).power_limit_w == 140
    with pytest.raises(PowerSetError, match="100-250 W"):
        src.set_power_limit(0, 400)
    assert src.power_limit(0) == 140
    assert [(s["index"], s["watts"]) for s in sets_of(sim)] == [(0, 140.0)]
    write_simulated(sim, sim_gpus(resets=1))  # a driver reset: the default is back
    assert src.power_limit(0) == 200 and src.generation(0) == 1


class FakeCard:
    """NVML's power calls over one card, on nvidia-ml-py's own errors and constants (no GPU here)."""

    def __init__(self) -> None:
        import pynvml

        self.real = pynvml
        self.NVMLError = pynvml.NVMLError
        self.limit_mw = 200_000
        self.handles = 0
        self.lost = False
        self.root = True
        self.sets: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)  # constants

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self.handles += 1
        self.lost = False
        return ("handle", self.handles)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return "Fake Card"

    def _check(self) -> None:
        if self.lost:
            raise self.NVMLError(self.real.NVML_ERROR_GPU_IS_LOST)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> tuple[int, int]:
        self._check()
        return 100_000, 250_000

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        self._check()
        return 200_000

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        self._check()
        return self.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, milliwatts: int) -> None:
        self._check()
        if not self.root:
            raise self.NVMLError(self.real.NVML_ERROR_NO_PERMISSION)
        self.sets.append(milliwatts)
        self.limit_mw = milliwatts


def test_nvml_power_calls_in_milliwatts_a_lost_handle_and_no_permission() -> None:
    from mesh.host.telemetry import NvmlSource

    card = FakeCard()
    src = NvmlSource.__new__(NvmlSource)
    src._nvml, src.host, src._events = card, "h", None
    src._handles, src._names, src._xid, src._by_uuid, src._generation = {}, {}, {}, {}, {}
    assert src.power_range(0) == PowerRange(min_w=100, max_w=250, default_w=200)
    src.set_power_limit(0, 140.5)
    assert card.sets == [140_500] and src.power_limit(0) == 140.5 and src.generation(0) == 0
    # the driver lost the GPU (a reset): the handle is dropped, the next call takes a new one
    card.lost, card.limit_mw = True, 200_000
    with pytest.raises(PowerSetError, match="cannot read its power limit"):
        src.power_limit(0)
    assert src.generation(0) == 1 and card.handles == 1
    assert src.power_limit(0) == 200 and card.handles == 2
    watts, why = to_set(140.5, Applied(140.5, 0), src.generation(0), src.power_limit(0))
    assert watts == 140.5 and "reset" in why
    card.root = False
    with pytest.raises(PowerSetError, match="needs root"):
        src.set_power_limit(0, 140)


# ---------------------------------------------------------------- a real watchdog


async def power_events(mesh: Mesh) -> list[GpuPower]:
    return [m for _, m in await mesh.history(mesh.settings.names.gpu_power_all) if isinstance(m, GpuPower)]


async def sample_of(mesh: Mesh, index: int) -> GpuSample | None:
    bus = await mesh.bus()
    try:
        raw = await read_bucket(await bus.telemetry_kv())
    except Exception:
        return None
    data = raw.get(f"{HOST}.gpu{index}")
    sample = decode_sample(data) if data else None
    return sample if isinstance(sample, GpuSample) else None


def start_watchdog(mesh: Mesh, sim: Path, config: Path) -> None:
    mesh.start_agent(
        "watchdog",
        "watchdog",
        "--host",
        HOST,
        env={
            "MESH_SIMULATED_GPUS": str(sim),
            "MESH_WATCHDOG_INTERVAL_S": "0.2",
            "MESH_DATA_DIR": str(mesh.tmp / "data"),
            "MESH_CONFIG": str(config),
        },
    )


async def wait_for(mesh: Mesh, what: str, check: Any) -> Any:
    async def alive_and(check_: Any = check) -> Any:
        assert mesh.alive("watchdog"), mesh.log("watchdog")
        value = check_()
        return await value if asyncio.iscoroutine(value) else value

    return await until(alive_and, HANG_S, what)


@pytest.mark.integration
async def test_caps_set_at_start_again_after_a_reset_and_live_from_the_cli(mesh: Mesh) -> None:
    sim = mesh.tmp / "gpus.json"
    write_simulated(sim, sim_gpus())
    config = mesh.tmp / "watchdog.toml"
    config.write_text("[gpus]\npower_limit_w = 140\n\n[gpus.1]\npower_limit_w = 120\n")
    start_watchdog(mesh, sim, config)

    # at start, each GPU its cap, seen in the telemetry `mesh gpus` reads
    await wait_for(
        mesh,
        "both caps set",
        lambda: {(s["index"], s["watts"]) for s in sets_of(sim)} >= {(0, 140), (1, 120)},
    )

    async def capped(index: int, watts: float) -> bool:
        s = await sample_of(mesh, index)
        return s is not None and s.power_limit_w == watts and s.power_cap_w == watts

    await wait_for(mesh, "GPU 0 at 140 W in telemetry", lambda: capped(0, 140))
    shown = await asyncio.to_thread(mesh.cli, "gpus")
    assert "/140 cap" in shown and "/120 cap" in shown
    # and in the exporter's metrics
    port = free_port()
    mesh.start_agent("exporter", "exporter", "--port", str(port))

    async def exported() -> bool:
        try:
            s = await scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return False
        return (
            value(s, "mesh_gpu_power_cap_watts", gpu=f"{HOST}-gpu0") == 140
            and value(s, "mesh_gpu_power_cap_watts", gpu=f"{HOST}-gpu1") == 120
        )

    await wait_for(mesh, "the caps in the exporter's metrics", exported)

    # a simulated driver reset puts the default back; the watchdog sets the cap again
    write_simulated(sim, sim_gpus(resets=1))
    await wait_for(
        mesh, "the cap set again after the reset", lambda: [s for s in sets_of(sim) if s["resets"] == 1]
    )
    assert [s["watts"] for s in sets_of(sim) if s["index"] == 0] == [140, 140]

    async def said_again() -> list[GpuPower]:
        return [e for e in await power_events(mesh) if e.gpu == f"{HOST}-gpu0" and "reset" in e.reason]

    again = await wait_for(mesh, "the watchdog's word on the reset", said_again)
    assert again[-1].limit_w == 140 and again[-1].source == "watchdog"

    # live, through the CLI: the watchdog answers with the limit read back
    said = await asyncio.to_thread(mesh.cli, "gpu", "power", f"{HOST}-gpu0", "180")
    assert f"{HOST}-gpu0: power limit 180 W" in said and "100-250 W" in said
    assert sets_of(sim)[-1]["watts"] == 180
    await wait_for(mesh, "GPU 0 at 180 W in telemetry", lambda: capped(0, 180))

    # outside the card's range: refused, naming the range
    done = await asyncio.to_thread(mesh.run_cli, "gpu", "power", f"{HOST}-gpu0", "400")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "400 W is outside this card's allowed power limits, 100-250 W" in done.stdout
    assert 400 not in [s["watts"] for s in sets_of(sim)]
    # a GPU this host does not have: answered with why
    done = await asyncio.to_thread(mesh.run_cli, "gpu", "power", f"{HOST}-gpu7", "150")
    assert done.returncode == 1 and "no simulated GPU 7" in done.stdout, done.stdout + done.stderr

    # the refused cap was dropped: the config's is set again
    await wait_for(mesh, "GPU 0 back at the config's 140 W", lambda: capped(0, 140))
    made = len(sets_of(sim))

    # back to the config's cap, which is in force already: nothing set, and said so
    said = await asyncio.to_thread(mesh.cli, "gpu", "power", f"{HOST}-gpu0", "--config")
    assert "power limit 140 W" in said and "already at the cap asked for" in said, said
    assert len(sets_of(sim)) == made, sets_of(sim)[made:]
    assert await capped(0, 140)

    # the operator's event and the watchdog's answers are in the history, under their GPU
    events = await power_events(mesh)
    assert {e.source for e in events} == {"operator", "watchdog"}
    asked = [e for e in events if e.source == "operator"]
    assert [e.watts for e in asked if e.gpu == f"{HOST}-gpu0"] == [180, 400, 0]
    answered = {e.rid for e in events if e.source == "watchdog" and e.rid}
    assert {e.rid for e in asked} <= answered


def hup(mesh: Mesh) -> None:
    """`systemctl reload mesh-watchdog` does this (its unit's ExecReload)."""
    mesh.procs["watchdog"].send_signal(signal.SIGHUP)


async def alerts(mesh: Mesh) -> list[AlertRaised | AlertResolved]:
    return [
        m
        for _, m in await mesh.history(mesh.settings.names.alerts_all)
        if isinstance(m, AlertRaised | AlertResolved)
    ]


async def thermal(mesh: Mesh) -> list[GpuControl]:
    return [
        m
        for _, m in await mesh.history(mesh.settings.names.gpu_controls_all)
        if isinstance(m, GpuControl) and m.source == "thermal"
    ]


@pytest.mark.integration
async def test_sighup_reloads_thresholds_and_caps_and_refuses_a_broken_config(mesh: Mesh) -> None:
    sim = mesh.tmp / "gpus.json"
    write_simulated(sim, sim_gpus(temp=70))
    config = mesh.tmp / "watchdog.toml"
    config.write_text("thermal_pause_c = 90.0\nthermal_resume_c = 85.0\n\n[gpus]\npower_limit_w = 140\n")
    start_watchdog(mesh, sim, config)
    await wait_for(mesh, "the cap set at start", lambda: [s for s in sets_of(sim) if s["watts"] == 140])
    assert await thermal(mesh) == []

    # a new threshold and cap, read on SIGHUP
    config.write_text("thermal_pause_c = 60.0\nthermal_resume_c = 50.0\n\n[gpus]\npower_limit_w = 130\n")
    hup(mesh)
    paused = await wait_for(mesh, "a thermal pause at the new threshold", lambda: thermal(mesh))
    assert paused[0].paused and paused[0].gpu == f"{HOST}-gpu0" and ">= 60 °C" in paused[0].reason
    await wait_for(
        mesh, "the new cap", lambda: {s["index"] for s in sets_of(sim) if s["watts"] == 130} == {0, 1}
    )
    assert "reload: config read again; applied" in mesh.log("watchdog")

    # a broken config: refused with its error, raised as an alert; the old one stays in force
    config.write_text('thermal_pause_c = 95.0\n\n[gpus]\npower_limit_w = "lots"\n')
    hup(mesh)

    async def refused() -> list[AlertRaised]:
        return [a for a in await alerts(mesh) if isinstance(a, AlertRaised) and a.rule == "config_reload"]

    alert = (await wait_for(mesh, "the config_reload alert", refused))[0]
    assert "power_limit_w must be a number of watts" in alert.message and alert.target == HOST
    assert "the old one stays in force" in mesh.log("watchdog")
    # still paused at 55 °C: the resume threshold in force is 50, not the default 80
    write_simulated(sim, sim_gpus(temp=55, resets=1))
    # and a driver reset gets the cap in force, 130, set again
    await wait_for(
        mesh, "the old cap set again after a reset", lambda: [s for s in sets_of(sim) if s["resets"] == 1]
    )
    assert {s["watts"] for s in sets_of(sim) if s["resets"] == 1} == {130}
    assert [c.paused for c in await thermal(mesh)] == [True]

    # fixed: loaded, and the alert resolves
    config.write_text("thermal_pause_c = 60.0\nthermal_resume_c = 58.0\n\n[gpus]\npower_limit_w = 130\n")
    hup(mesh)

    async def resolved() -> list[AlertResolved]:
        return [a for a in await alerts(mesh) if isinstance(a, AlertResolved) and a.rule == "config_reload"]

    await wait_for(mesh, "the config_reload alert resolved", resolved)

    async def resumed() -> list[GpuControl]:
        return [c for c in await thermal(mesh) if not c.paused]

    await wait_for(mesh, "resumed below the new resume threshold", resumed)

    # a cap taken out of the config: the cards' default limit back
    config.write_text("thermal_pause_c = 60.0\nthermal_resume_c = 58.0\n")
    hup(mesh)
    await wait_for(
        mesh,
        "the default limit back on both",
        lambda: {s["index"] for s in sets_of(sim) if s["watts"] == 200} == {0, 1},
    )

    async def uncapped() -> bool:
        s = await sample_of(mesh, 0)
        return s is not None and s.power_limit_w == 200 and s.power_cap_w is None

    await wait_for(mesh, "no cap in telemetry", uncapped)

    # a health check added live is probed (its port is closed: an alert), and removed live resolves
    port = free_port()
    config.write_text(
        "thermal_pause_c = 60.0\nthermal_resume_c = 58.0\n\n[health.gone]\n"
        f'url = "http://127.0.0.1:{port}/"\ninterval_s = 0.2\nretries = 1\ncommand = "true"\n'
    )
    hup(mesh)

    async def health(kind: type) -> list[Any]:
        return [
            a for a in await alerts(mesh) if isinstance(a, kind) and (a.rule, a.target) == ("health", "gone")
        ]

    await wait_for(mesh, "the new check's alert", lambda: health(AlertRaised))
    config.write_text("thermal_pause_c = 60.0\nthermal_resume_c = 58.0\n")
    hup(mesh)
    (gone,) = await wait_for(mesh, "the removed check's alert resolved", lambda: health(AlertResolved))
    assert "removed or changed" in gone.message


@pytest.mark.integration
async def test_sighup_to_an_agent_that_cannot_reload_is_said_and_harmless(mesh: Mesh) -> None:
    """Before, SIGHUP's default action killed any agent; now one without a reload says so."""
    mesh.start_agent("auditor", "auditor")
    bus = await mesh.bus()

    async def registered() -> bool:
        return any(k.startswith("auditor") for k in await read_bucket(await bus.agents_kv()))

    await until(registered, HANG_S, "the auditor registered")
    mesh.procs["auditor"].send_signal(signal.SIGHUP)
    await until(lambda: "does not read its config again" in mesh.log("auditor"), HANG_S, "the auditor's word")
    assert mesh.alive("auditor")


@pytest.mark.integration
async def test_a_cap_for_a_host_without_nvml_is_answered_with_why(mesh: Mesh) -> None:
    from mesh.host.telemetry import open_source

    if open_source(HOST) is not None:
        pytest.skip("NVML works here: this host has GPUs")
    mesh.start_agent("watchdog", "watchdog", "--host", HOST)
    await until(lambda: "watching the host only" in mesh.log("watchdog"), HANG_S, "the watchdog started")
    done = await asyncio.to_thread(mesh.run_cli, "gpu", "power", f"{HOST}-gpu0", "150")
    assert done.returncode == 1 and "no GPU readable through NVML" in done.stdout, done.stdout + done.stderr
