"""Telemetry history: samples averaged into 10 s and 1 min points (pure), stored in the history
stream with a bounded age and read back (real nats-server), and a real watchdog with simulated
GPUs feeding `mesh gpus --history`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest

from agents.watchdog_history import HistoryRecorder
from mesh.bus.connect import connect
from mesh.bus.resources import history_stream_definition
from mesh.bus.telhistory import read_points, read_series
from mesh.host.telemetry import write_simulated
from mesh.samples import GpuSample, HostSample
from mesh.telhistory import HistoryPoint, Rollup, Tier, encode_point, pick_tier, series_of, sparkline, tiers
from tests.conftest import HANG_S, Mesh
from tests.faults import until

HOST = "histhost"


def gpu(at: float, index: int = 0, util: float | None = 50.0, temp: float = 60.0) -> GpuSample:
    return GpuSample(
        host=HOST,
        index=index,
        name="g",
        at=at,
        util_pct=util,
        temp_c=temp,
        mem_used_mb=1000,
        mem_total_mb=8000,
    )


def host(at: float, cpu: float = 10.0) -> HostSample:
    return HostSample(
        host=HOST,
        at=at,
        cpu_pct=cpu,
        per_core=[cpu],
        load1=1.0,
        load5=1.0,
        load15=1.0,
        ram_used_mb=100,
        ram_total_mb=200,
        swap_used_mb=0,
        swap_total_mb=0,
        disk_path="/",
        disk_used_mb=1,
        disk_total_mb=2,
        disk_free_pct=50.0,
    )


# ------------------------------------------------------------------ pure


def test_samples_are_averaged_per_bucket_with_their_peaks() -> None:
    rollup = Rollup([10, 60])
    closed = []
    # every 2 s for two minutes; util alternates 0 / 100, temp climbs one degree a sample
    for i in range(60):
        closed += rollup.add(gpu(1000.0 + 2 * i, util=100.0 * (i % 2), temp=40.0 + i))
    fine = [p for p in closed if p.res_s == 10]
    coarse = [p for p in closed if p.res_s == 60]
    # 1000..1118: buckets 1000, 1010, ..., 1100 closed (1110 still open); 960 and 1020 closed at 60 s
    assert [p.at for p in fine] == [1000.0 + 10 * k for k in range(11)]
    assert all(p.samples == 5 for p in fine)
    first = fine[0]
    assert first.mean["util_pct"] == 40.0  # 0, 100, 0, 100, 0
    assert first.peak["util_pct"] == 100.0
    assert first.mean["temp_c"] == 42.0 and first.peak["temp_c"] == 44.0
    assert [p.at for p in coarse] == [960.0, 1020.0]
    assert coarse[0].samples == 10 and coarse[1].samples == 30
    # what is still open comes out on flush
    rest = rollup.flush()
    assert sorted((p.res_s, p.at) for p in rest) == [(10, 1110.0), (60, 1080.0)]
    assert all(p.partial and p.msg_id.endswith(":partial") for p in rest)
    assert rollup.flush() == []


def test_a_reading_some_samples_lack_is_averaged_over_those_that_have_it() -> None:
    rollup = Rollup([10])
    rollup.add(gpu(0.0, util=None))
    rollup.add(gpu(2.0, util=80.0))
    (point,) = rollup.add(gpu(10.0))
    assert point.samples == 2 and point.mean["util_pct"] == 80.0
    assert point.key == f"{HOST}.gpu0" and point.msg_id == f"{HOST}.gpu0:10:0"


def test_a_clock_stepping_back_does_not_reopen_a_closed_bucket() -> None:
    rollup = Rollup([10])
    rollup.add(gpu(100.0))
    assert rollup.add(gpu(95.0)) == []
    (point,) = rollup.add(gpu(110.0))
    assert point.at == 100.0 and point.samples == 1


def test_tiers_and_which_one_a_window_reads() -> None:
    ts = tiers(10, 24, 60, 168)
    assert ts == (Tier(10, 86400.0), Tier(60, 604800.0))
    assert tiers(0, 24, 60, 0) == ()
    assert pick_tier(ts, since=1000 - 3 * 3600, now=1000) == Tier(10, 86400.0)
    assert pick_tier(ts, since=1000 - 3 * 86400, now=1000) == Tier(60, 604800.0)
    assert pick_tier(ts, since=1000 - 30 * 86400, now=1000) == Tier(60, 604800.0)
    assert pick_tier((), since=0, now=1) is None


def test_sparkline() -> None:
    assert sparkline([0.0, 50.0, 100.0], 3, 0.0, 100.0) == "▁▅█"
    assert sparkline([None, 1.0], 2) == " ▁"
    assert len(sparkline([float(i) for i in range(1000)], 40)) == 40
    assert sparkline([], 10) == ""


# ------------------------------------------------------------------ on a real server


async def test_history_is_stored_downsampled_and_read_back(mesh: Mesh) -> None:
    bus = await mesh.bus()
    recorder = HistoryRecorder(bus)
    now = time.time()
    start = (now // 60) * 60 - 1800  # half an hour ago, on a minute
    for i in range(900):  # every 2 s: two GPUs and the host
        at = start + 2 * i
        await recorder.record([gpu(at, 0, util=float(i % 2) * 100), gpu(at, 1, util=20.0), host(at)])
    assert not recorder.waiting
    res, points = await read_points(bus, since=start, kind="gpu", host=HOST)
    assert res == 10
    by_gpu = series_of(points)
    assert [s.key for s in by_gpu] == [f"{HOST}.gpu0", f"{HOST}.gpu1"]
    # 1800 s in 10 s buckets; the last one is still open
    assert [len(s.points) for s in by_gpu] == [179, 179]
    assert {p.mean["util_pct"] for p in by_gpu[1].points} == {20.0}
    assert {p.samples for p in by_gpu[0].points} == {5}
    assert {p.peak["util_pct"] for p in by_gpu[0].points} == {100.0}
    # one GPU, at 1 min
    res, coarse = await read_points(bus, since=start, kind="gpu", host=HOST, gpu=1, res_s=60)
    assert res == 60 and len(coarse) == 29 and {p.samples for p in coarse} == {30}
    # the host's series
    (host_series,) = await read_series(bus, since=start, kind="host", host=HOST)
    assert host_series.key == f"{HOST}.host" and {p.mean["cpu_pct"] for p in host_series.points} == {10.0}
    # a narrower window reads fewer points
    _, recent = await read_points(bus, since=start + 1500, kind="gpu", host=HOST, gpu=0)
    assert 29 <= len(recent) <= 31
    # publishing a bucket again (a retried round) stores it once
    info = await bus.js.stream_info(bus.names.history_stream)
    again = [p for p in points[:4]]
    from mesh.bus.telhistory import publish_points

    await publish_points(bus, again)
    assert (await bus.js.stream_info(bus.names.history_stream)).state.messages == info.state.messages


async def test_a_bucket_a_restart_cut_in_two_reads_as_one(mesh: Mesh) -> None:
    """A watchdog stopping mid-bucket stores it as it stands; started again within the bucket it
    stores the bucket again at its end: a reader sees one point, the one of more samples."""
    bus = await mesh.bus()
    start = (time.time() // 60) * 60 - 300
    first = HistoryRecorder(bus)
    for i in range(2):  # 2 samples into the bucket at start + 10
        await first.record([gpu(start + 10 + 2 * i, util=10.0)])
    await first.close()
    second = HistoryRecorder(bus)
    for i in range(2, 5):  # 3 more in the same bucket, then the next bucket's first
        await second.record([gpu(start + 10 + 2 * i, util=40.0)])
    await second.record([gpu(start + 20, util=0.0)])
    _, points = await read_points(bus, since=start, host=HOST, res_s=10)
    (point,) = [p for p in points if p.at == start + 10]
    assert point.samples == 3 and point.mean["util_pct"] == 40.0 and not point.partial


async def test_a_point_on_another_gpus_subject_is_left_out(mesh: Mesh) -> None:
    """A point names its host and GPU; one published on another's subject (a forgery, or a bug)
    is not read as that other GPU's history."""
    bus = await mesh.bus()
    start = (time.time() // 60) * 60 - 300
    good = HistoryPoint(kind="gpu", host=HOST, index=0, res_s=10, at=start, samples=1, mean={"util_pct": 5.0})
    forged = HistoryPoint(kind="gpu", host="elsewhere", index=3, res_s=10, at=start + 10, samples=1)
    await bus.js.publish(bus.names.hist_gpu(10, HOST, 0), encode_point(good))
    await bus.js.publish(bus.names.hist_gpu(10, HOST, 0), encode_point(forged))
    _, points = await read_points(bus, since=start, host=HOST, res_s=10)
    assert points == [good]


async def test_history_is_bounded_by_age(mesh: Mesh) -> None:
    """Each point carries its tier's retention as its TTL: a 1 s tier's points go, the stream's
    own limits are set, and the 1 min tier's stay."""
    short = msgspec.structs.replace(mesh.settings, history_fine_s=10, history_fine_keep_h=1 / 3600)
    d = history_stream_definition(short)
    assert d["allow_msg_ttl"] and d["max_age"] > 0 and d["max_bytes"] > 0
    bus = await connect(short, "hist-test", wait_s=10)
    try:
        await bus.ensure_resources()
        info = await bus.js.stream_info(bus.names.history_stream)
        assert info.config.allow_msg_ttl and info.config.max_bytes == short.history_max_bytes
        recorder = HistoryRecorder(bus)
        start = (time.time() // 60) * 60 - 600
        for i in range(300):
            await recorder.record([gpu(start + 2 * i)])
        n = bus.names

        async def count(res: int) -> int:
            info = await bus.js.stream_info(n.history_stream, subjects_filter=n.hist_gpu(res, HOST, 0))
            return sum((info.state.subjects or {}).values())

        assert await count(60) == 9

        async def fine_gone() -> bool:
            return await count(10) == 0

        await until(fine_gone, HANG_S, "the 10 s points to expire after their 1 s TTL")
        assert await count(60) == 9
    finally:
        await bus.close()


@pytest.mark.integration
async def test_a_watchdog_stores_history_and_mesh_gpus_shows_it(mesh: Mesh, tmp_path: Path) -> None:
    from mesh.host.telemetry import host_token

    sim = tmp_path / "gpus.json"
    write_simulated(
        sim,
        [
            {"name": "H0", "temp_c": 61, "util_pct": 70, "mem_total_mb": 8192, "mem_used_mb": 2048},
            {"name": "H1", "temp_c": 45, "util_pct": 0, "mem_total_mb": 8192, "mem_used_mb": 0},
        ],
    )
    mesh.env.update(
        {"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.2", "MESH_HISTORY_FINE_S": "1"}
    )
    bus = await mesh.bus()
    began = time.time()
    mesh.start_agent("watchdog", "watchdog")
    me = host_token()

    async def stored() -> bool:
        # (the test's own settings know 10 s as the finest tier: the watchdog's is 1 s)
        _, points = await read_points(bus, since=began, host=me, kind="gpu", res_s=1)
        return {p.index for p in points} == {0, 1} and len(points) >= 4

    await until(stored, HANG_S, "the watchdog's 1 s history points of both simulated GPUs")
    _, points = await read_points(bus, since=began, host=me, kind="gpu", gpu=0, res_s=1)
    assert {p.mean["temp_c"] for p in points} == {61.0}
    assert {p.res_s for p in points} == {1}
    # (the CLI runs with the watchdog's settings: its finest tier, 1 s)
    text = mesh.cli("gpus", "--history", "--since", "10m")
    assert f"{me}.gpu0" in text and f"{me}.gpu1" in text and "temp" in text and f"{me}.host" in text
    rows = [
        json.loads(line) for line in mesh.cli("gpus", "--history", "--since", "10m", "--json").splitlines()
    ]
    row = next(r for r in rows if r["key"] == f"{me}.gpu0")
    assert set(row["temp_c"]) == {61.0} and len(row["at"]) == len(row["temp_c"])
