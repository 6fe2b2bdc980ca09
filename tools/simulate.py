"""Simulate GPU placement: workloads (TOML) run through mesh's real brain on simulated GPUs, no NATS;
a table of what each did (mean ± standard deviation over the seeds), and the runs as JSON.

    .venv/bin/python tools/simulate.py tools/workloads/*.toml --seeds 5 --json sim.json
    .venv/bin/python tools/simulate.py tools/workloads/steady.toml --seed 7 --per-seed
    .venv/bin/python tools/simulate.py tools/workloads/steady.toml --policy keep_alive_s=300

The simulator is `tools/simlib` (`simulate` runs one workload for one seed); what each column
means and how its bound is computed is in docs/gpus.md ("Simulating placement"). A run is a
pure function of its workload, seed and policy: the same command prints the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.simlib import Report, WorkloadError, load, simulate  # noqa: E402

# (key in the JSON, column, how it reads from a report, how a value prints)
Column = tuple[str, str, Callable[[Report], float], Callable[[float], str]]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _ratio(x: float) -> str:
    return f"{x:.2f}"


COLUMNS: list[Column] = [
    ("idle_waiting", "idle, work waits %", lambda r: r.idle_waiting, _pct),
    ("idle_waiting_capped", "capped %", lambda r: r.idle_waiting_capped, _pct),
    ("loading", "loading %", lambda r: r.loading, _pct),
    ("llm_loads", "LLM loads", lambda r: r.llm_loads, _num),
    ("load_bound", "bound", lambda r: r.load_bound, _num),
    ("loads_ratio", "loads/bound", lambda r: r.loads_ratio, _ratio),
    ("quick_reloads", "quick reloads", lambda r: r.quick_reloads, _num),
    ("misplaced", "misplaced", lambda r: r.misplaced, _num),
    ("makespan_ratio", "makespan/bound", lambda r: r.makespan_ratio, _ratio),
    ("never_served", "never served", lambda r: r.never_served, _num),
]


def spread(values: list[float], show: Callable[[float], str]) -> str:
    """'mean ± sd' over the seeds ('mean' alone for one seed)."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return show(xs[0])
    return f"{show(statistics.fmean(xs))} ± {show(statistics.stdev(xs))}"


def summary(reports: list[Report]) -> dict[str, Any]:
    """Mean and standard deviation of each column over the seeds, and of each kind's waits."""
    out: dict[str, Any] = {}
    for key, _, get, _ in COLUMNS:
        xs = [get(r) for r in reports]
        out[key] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    waits: dict[str, dict[str, float]] = {}
    for kind in sorted({k for r in reports for k in r.waits}):
        for q in ("p50", "p95"):
            xs = [r.waits[kind][q] for r in reports if kind in r.waits and not math.isnan(r.waits[kind][q])]
            if xs:
                waits.setdefault(kind, {})[q] = statistics.fmean(xs)
    out["waits"] = waits
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("workloads", nargs="+", help="workload files (tools/workloads/*.toml)")
    ap.add_argument("--seed", type=int, default=None, help="the first seed (default: each workload's)")
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="write every run's report here")
    ap.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Policy or PlacementPolicy field for every workload (repeatable)",
    )
    ap.add_argument("--per-seed", action="store_true", help="a row per seed as well")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown instead")
    args = ap.parse_args(argv)
    console = Console()
    overrides: dict[str, float] = {}
    for item in args.policy:
        key, _, value = item.partition("=")
        try:
            overrides[key] = float(value)
        except ValueError:
            console.print(f"[red]--policy {escape(item)}: want FIELD=NUMBER[/]")
            return 2
    runs: dict[str, list[Report]] = {}
    began = time.monotonic()
    for path in args.workloads:
        try:
            w = load(path)
        except WorkloadError as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            return 2
        if overrides:
            w = dataclasses.replace(w, policy={**w.policy, **overrides})
        first = w.seed if args.seed is None else args.seed
        for seed in range(first, first + args.seeds):
            try:
                report, _ = simulate(w, seed)
            except ValueError as exc:
                console.print(f"[red]{escape(str(exc))}[/]")
                return 2
            runs.setdefault(w.name, []).append(report)
    took = time.monotonic() - began
    if args.markdown:
        print(_markdown(_table(runs, args.per_seed)))
        print()
        print(_markdown(_waits(runs)))
    else:
        console.print(_table(runs, args.per_seed))
        console.print(_waits(runs))
    for name, reports in runs.items():
        for r in reports:
            for v in r.violations:
                console.print(f"[red]{name} seed {r.seed}: {escape(v)}[/]")
            for note in r.notes:
                console.print(f"[yellow]{name} seed {r.seed}: {escape(note)}[/]")
    console.print(f"{sum(len(v) for v in runs.values())} run(s) in {took:.1f}s")
    if args.json is not None:
        data = {
            "command": " ".join(["tools/simulate.py", *(argv if argv is not None else sys.argv[1:])]),
            "workloads": {
                name: {"summary": summary(reports), "runs": [r.as_dict() for r in reports]}
                for name, reports in runs.items()
            },
        }
        args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
    bad = any(r.violations for reports in runs.values() for r in reports)
    return 1 if bad else 0


def _table(runs: dict[str, list[Report]], per_seed: bool) -> Table:
    seeds = {len(v) for v in runs.values()}
    table = Table(title=f"Placement over {'/'.join(map(str, sorted(seeds)))} seed(s): mean ± sd")
    table.add_column("workload")
    for _, header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, reports in runs.items():
        table.add_row(name, *(spread([get(r) for r in reports], show) for _, _, get, show in COLUMNS))
        if per_seed and len(reports) > 1:
            for r in reports:
                table.add_row(f"  seed {r.seed}", *(show(get(r)) for _, _, get, show in COLUMNS), style="dim")
    return table


def _markdown(table: Table) -> str:
    """A rich table as a markdown table (for docs)."""
    heads = [str(c.header) for c in table.columns]
    cells = [[str(x) for x in c.cells] for c in table.columns]
    lines = [f"| {' | '.join(heads)} |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += [f"| {' | '.join(row)} |" for row in zip(*cells, strict=True)]
    return "\n".join(lines)


def _waits(runs: dict[str, list[Report]]) -> Table:
    table = Table(title="Task waits, arrival to start (s): mean over the seeds of each seed's p50 and p95")
    for col in ("workload", "kind", "tasks", "p50", "p95"):
        table.add_column(col, justify="left" if col in ("workload", "kind") else "right")
    for name, reports in runs.items():
        for kind in sorted({k for r in reports for k in r.waits}):
            rows = [r.waits[kind] for r in reports if kind in r.waits]
            table.add_row(
                name,
                kind,
                spread([w["n"] for w in rows], _num),
                spread([w["p50"] for w in rows], _num),
                spread([w["p95"] for w in rows], _num),
            )
    return table


if __name__ == "__main__":
    sys.exit(main())
