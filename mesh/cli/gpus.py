"""The GPUs and models: pause, resume or cordon a GPU (`mesh gpu ...`), every GPU's state and
reading (gpus), the model registry and where each is loaded (models), the live view (top).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
import typer

from mesh.bus import client
from mesh.cli.common import connected, out, run, settings
from mesh.events import GpuState

gpu_app = typer.Typer(help="Pause, resume or cordon a GPU (its worker stops or starts claiming work).")


def _gpu_id(gpu: str) -> str:
    """A GPU id as the gpus bucket has it; a bare index (or a set, `0,3`) means this host's GPU."""
    from mesh.host.gpu import GpuError, gpu_id, parse_gpus

    try:
        indices = parse_gpus(gpu)
    except GpuError:
        return gpu
    if not indices:
        return gpu
    from mesh.host.telemetry import host_token

    return gpu_id(host_token(), indices)


def _control(gpu: str, paused: bool, cordoned: bool | None, reason: str) -> None:
    s = settings()
    gpu_id = _gpu_id(gpu)

    async def go() -> int:
        async with connected(s) as bus:
            control = await client.control_gpu(bus, gpu_id, paused=paused, cordoned=cordoned, reason=reason)
            state = "cordoned" if control.cordoned else "paused" if paused else "taking work"
            out.print(f"{gpu_id}: {state}" + (f" ({reason})" if reason else ""), highlight=False)
            return 0

    raise typer.Exit(run(go))


ReasonOpt = Annotated[str, typer.Option("--reason", help="why (shown in mesh gpus and the events)")]


@gpu_app.command("pause")
def gpu_pause(gpu: str, reason: ReasonOpt = "") -> None:
    """Stop GPU's worker claiming work (running tasks finish). GPU: an id from `mesh gpus`, or an
    index on this host (or a set, 0,3; pausing one GPU of a set holds the whole set)."""
    _control(gpu, True, None, reason)


@gpu_app.command("resume")
def gpu_resume(gpu: str, reason: ReasonOpt = "") -> None:
    """Lift an operator's pause (a cordon stays until `mesh gpu uncordon`)."""
    _control(gpu, False, None, reason)


@gpu_app.command("cordon")
def gpu_cordon(gpu: str, reason: ReasonOpt = "") -> None:
    """Mark a GPU not to be used (e.g. it reports XID errors) until `mesh gpu uncordon`."""
    _control(gpu, False, True, reason)


@gpu_app.command("uncordon")
def gpu_uncordon(gpu: str, reason: ReasonOpt = "") -> None:
    """Let a cordoned GPU take work again."""
    _control(gpu, False, False, reason)


def models(
    offline: Annotated[
        bool, typer.Option("--offline", help="list the registry without asking the server")
    ] = False,
) -> None:
    """The model registry (config \\[models] over the built-in models) and where each is loaded now."""
    from rich.table import Table

    from mesh.host.modelfiles import resolve_path
    from mesh.models import ModelError

    s = settings()
    registry = s.model_registry()

    async def loaded_where() -> dict[str, list[str]]:
        async with connected(s) as bus:
            return await client.models_loaded(bus)

    where = {} if offline else run(loaded_where)
    table = Table(title_justify="left")
    for col in ("model", "kind", "vram MB", "default", "file", "loaded on"):
        table.add_column(col)
    for name, spec in sorted(registry.items()):
        try:
            path = resolve_path(name, spec)
        except ModelError as exc:
            path = f"[red]missing[/red]: {exc}"
        table.add_row(
            name,
            spec.kind,
            str(spec.vram_mb),
            "yes" if s.default_model(spec.kind) == name else "",
            path,
            ", ".join(sorted(where.get(name, []))) or ("?" if offline else "-"),
        )
    out.print(table)
    raise typer.Exit(0)


def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per GPU")] = False,
) -> None:
    """Every GPU: its worker's state and model (gpus bucket) beside its watchdog's last reading."""
    s = settings()

    async def go() -> int:
        from mesh.cli.top import gpu_rows, read_gpus

        async with connected(s) as bus:
            view = await read_gpus(bus)
        rows = with_sets(gpu_rows(view), view.states)
        if as_json:
            for row in rows:
                print(msgspec.json.encode(row).decode())
        elif rows:
            out.print(_gpus_table(rows))
        else:
            out.print("no GPUs known: start a watchdog (`mesh agent watchdog`) or a GPU worker on each host")
        return 0

    raise typer.Exit(run(go))


def with_sets(rows: list[dict[str, Any]], states: dict[str, GpuState]) -> list[dict[str, Any]]:
    """The rows with each set of GPUs one worker owns named: the set's row gets `cards` (its GPUs'
    indices; its memory is their sum), each card's row (the watchdog's reading) the `set` it
    belongs to and that set's `set_cards`. A single GPU's row gets none of them."""
    from mesh.host.gpu import gpu_id

    member: dict[str, GpuState] = {}
    for state in states.values():
        if len(state.indices) > 1:
            for index in state.indices:
                member[gpu_id(state.host, (index,))] = state
    out = []
    for row in rows:
        st = states.get(row["gpu"])
        if st is not None and len(st.indices) > 1:
            row = {**row, "cards": list(st.indices)}
        elif row["gpu"] in member:
            owner = member[row["gpu"]]
            row = {**row, "set": owner.gpu, "set_cards": list(owner.indices)}
        out.append(row)
    return out


def _gpus_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from mesh.cli.top import num as _num

    table = Table(title_justify="left")
    for col in ("host", "gpu", "name", "state", "model", "temp °C", "util %", "VRAM MB", "power W", "seen"):
        table.add_column(col, justify="right" if col[0] in "tuVps" and col != "state" else "left")
    now = time.time()
    for r in rows:
        temp = _num(r["temp_c"])
        if r["temp_c"] is not None and r["temp_c"] >= 85:
            temp = f"[red]{temp}[/red]"
        power = _num(r["power_w"])
        if r["power_limit_w"]:
            power += f"/{r['power_limit_w']:.0f}"
        vram = f"{_num(r['mem_used_mb'])}/{_num(r['mem_total_mb'])}"
        seen = f"{now - r['sampled_at']:.0f}s ago" if r["sampled_at"] else "-"
        index = "+".join(map(str, r["cards"])) if r.get("cards") else str(r["index"])
        state = r["state"] or "-"
        if r.get("set"):
            state = f"in set {'+'.join(map(str, r['set_cards']))}"
        table.add_row(
            r["host"],
            index,
            r["name"],
            state,
            r["model"] or "-",
            temp + (" " + ",".join(r["throttle"]) if r["throttle"] else ""),
            _num(r["util_pct"]),
            vram,
            power,
            seen,
        )
    return table


def top(
    interval: Annotated[float, typer.Option("--interval", "-n", help="seconds between redraws")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
) -> None:
    """A live full-screen view: GPUs, queues, recent events and alerts firing (Ctrl-C quits)."""
    from mesh.cli.top import run_top

    s = settings()

    async def go() -> int:
        async with connected(s) as bus:
            return await run_top(bus, out, interval_s=max(0.1, interval), once=once)

    raise typer.Exit(run(go))
