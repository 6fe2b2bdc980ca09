"""`mesh gpus --history`: each GPU's (and host's) last hours from the history stream, as sparklines.
The points are read by `mesh.bus.telhistory`; nothing here needs Prometheus.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from mesh.bus.history import parse_since
from mesh.bus.publish import Bus
from mesh.bus.telhistory import read_series
from mesh.telhistory import Series, sparkline

WIDTH = 40
# (reading, heading, unit, the scale's fixed bounds: None takes the series' own)
GPU_COLUMNS: tuple[tuple[str, str, str, tuple[float, float] | None], ...] = (
    ("util_pct", "util %", "%", (0.0, 100.0)),
    ("temp_c", "temp °C", "", None),
    ("mem_used_mb", "mem MiB", "", None),
    ("power_w", "power W", "", None),
)
HOST_COLUMNS: tuple[tuple[str, str, str, tuple[float, float] | None], ...] = (
    ("cpu_pct", "cpu %", "%", (0.0, 100.0)),
    ("ram_used_mb", "ram MiB", "", None),
    ("load1", "load", "", None),
)


async def history_view(
    bus: Bus, since: str, host: str = "*", gpu: int | None = None, with_hosts: bool = True
) -> tuple[float, list[Series], list[Series]]:
    """(since, GPU series, host series) over the window `since` (`3h`, `30m`, a time)."""
    start = parse_since(since, time.time())
    gpus = await read_series(bus, since=start, host=host, gpu=gpu, kind="gpu")
    hosts = await read_series(bus, since=start, host=host, kind="host") if with_hosts and gpu is None else []
    return start, gpus, hosts


def _n(value: float) -> str:
    """A reading as a table shows it: whole above 10, one decimal below (a load of 0.4)."""
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def series_rows(series: list[Series], columns: tuple[tuple[str, str, str, Any], ...]) -> list[dict[str, Any]]:
    """One JSON-ready row per series: its points' times and each reading's means."""
    rows = []
    for s in series:
        row: dict[str, Any] = {"key": s.key, "res_s": s.res_s, "at": [p.at for p in s.points]}
        for field, *_ in columns:
            row[field] = s.values(field)
        rows.append(row)
    return rows


def print_json(gpus: list[Series], hosts: list[Series]) -> None:
    for row in series_rows(gpus, GPU_COLUMNS) + series_rows(hosts, HOST_COLUMNS):
        print(msgspec.json.encode(row).decode())


def history_table(title: str, series: list[Series], columns: tuple[tuple[str, str, str, Any], ...]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("gpu / host")
    table.add_column("points", justify="right")
    for _, heading, _, _ in columns:
        table.add_column(heading)
    for s in series:
        cells = [s.key, f"{len(s.points)} × {s.res_s}s"]
        for field, _, unit, bounds in columns:
            summary = s.summary(field)
            if summary is None:
                cells.append("-")
                continue
            low, mean, peak = summary
            lo, hi = bounds if bounds is not None else (None, None)
            line = sparkline(s.values(field), WIDTH, lo, hi)
            cells.append(f"{line}\n[dim]min {_n(low)}  avg {_n(mean)}  max {_n(peak)}{unit}[/dim]")
        table.add_row(*cells)
    return table
