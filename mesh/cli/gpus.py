"""The GPUs and models: pause, resume or cordon a GPU (`mesh gpu ...`), every GPU's state and
reading (gpus), the model registry and what the brain measured of each (models), the live view (top).

`models_list` is `mesh models` (mesh.cli.models): it also says where each model's file is.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
import typer

from mesh.bus import client
from mesh.bus.publish import Bus
from mesh.bus.read import read_bucket
from mesh.cli.common import command_group, connected, err, out, run, settings
from mesh.events import GpuState
from mesh.learned import DURATION, LOAD, VRAM, Learned

gpu_app = command_group(help="Pause, resume or cordon a GPU (its worker stops or starts claiming work).")


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
            known = sorted(await read_bucket(await bus.gpus_kv()))
            if gpu_id not in known:
                # (a GPU may be cordoned before its worker first runs: said, not refused)
                err.print(
                    f"note: no worker has reported a GPU {gpu_id!r} yet, so this holds only once one "
                    f"does; the GPUs known now: {', '.join(known) or 'none'} (`mesh gpus`)",
                    highlight=False,
                    markup=False,
                )
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


def models_list(offline: bool, as_json: bool) -> None:
    """`mesh models` (mesh.cli.models): the registry, where each model's file is and is loaded,
    and the figures the brain measured."""
    from mesh.bus.modelstore import ModelRecord, models_store, read_records
    from mesh.host.modelcache import cache_dir, cached_path, is_cached, is_cached_dir
    from mesh.host.modelfiles import resolve_path
    from mesh.models import ModelError

    s = settings()
    registry = s.model_registry()

    async def ask() -> tuple[dict[str, list[str]], Learned | None, dict[str, ModelRecord]]:
        async with connected(s) as bus:
            store = await models_store(bus)
            records = await read_records(store) if store is not None else {}
            return await client.models_loaded(bus), await _learned(bus), records

    where, learned, records = ({}, None, {}) if offline else run(ask)
    rows: list[dict[str, Any]] = []
    for name, spec in sorted(registry.items()):
        try:
            path, missing = resolve_path(name, spec), ""
        except ModelError as exc:
            path, missing = "", str(exc)
        if spec.backend == "openai" and not path:
            # a server's model: where it answers (a managed one's port is picked at its load)
            path, missing = (
                f"server {spec.base_url or '(managed: ' + ' '.join(spec.command[:3]) + ' ...)'}",
                "",
            )
        record = records.get(name)
        cached = ""
        if record is not None and not path:
            copy = cached_path(cache_dir(s), name, record.file)
            good = (
                is_cached_dir(copy, record.sha256)
                if record.files
                else is_cached(copy, record.size, record.sha256)
            )
            cached = copy if copy and good else ""
        rows.append(
            {
                "model": name,
                "kind": spec.kind,
                "vram_mb": spec.vram_mb,
                "default": s.default_model(spec.kind) == name,
                "file": path,
                "missing": missing if not (record or cached) else "",
                # the models bucket's copy (`mesh models push`), and this host's cached one
                "store": msgspec.to_builtins(record) if record is not None else None,
                "cached": cached,
                "where": _file_where(path, missing, record, cached),
                "backend": spec.backend,
                "loaded_on": sorted(where.get(name, [])),
                "learned": _model_figures(learned, name),
            }
        )
    durations = _class_figures(learned)
    if as_json:
        doc = {
            "models": rows,
            "durations": durations,
            "learn_min_samples": learned.min_samples if learned else s.learn_min_samples,
        }
        print(msgspec.json.encode(doc).decode())
        raise typer.Exit(0)
    out.print(_models_table(rows, offline))
    if durations:
        out.print(_durations_table(durations))
    if learned is not None:
        out.print(
            f"learned: the median of the last {learned.window} samples (how many were seen), used "
            f"in place of the configured figure from {learned.min_samples} on (dim: not yet)",
            highlight=False,
        )
    raise typer.Exit(0)


def _file_where(file: str, missing: str, record: Any, cached: str) -> str:
    """Where a model's file is, as `mesh models` says it."""
    if file:
        return file
    if cached:
        return f"cached at {cached}"
    if record is not None:
        return f"in the store ({record.size / 1e6:.0f} MB), fetched on first load"
    return f"missing: {missing}"


async def _learned(bus: Bus) -> Learned | None:
    """The figures the brain learned, as its last checkpoint wrote them (None: none yet)."""
    import nats.js.errors

    from agents.brain_commit import CHECKPOINT_KEY
    from mesh.records import decode_checkpoint

    try:
        entry = await (await bus.brain_kv()).get(CHECKPOINT_KEY)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
        return None
    try:
        return decode_checkpoint(entry.value or b"").learned
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _figure(learned: Learned, table: str, key: str) -> dict[str, Any] | None:
    found = learned.figure(table, key)
    return msgspec.to_builtins(found) if found is not None else None


def _model_figures(learned: Learned | None, model: str) -> dict[str, Any] | None:
    if learned is None:
        return None
    return {
        "load_s": _figure(learned, LOAD, model),
        "vram_mb": _figure(learned, VRAM, model),
        "duration_s": _figure(learned, DURATION, model),
    }


def _class_figures(learned: Learned | None) -> dict[str, Any]:
    """Task durations by class and by body kind (`class:llm`, `kind:prompt`)."""
    if learned is None:
        return {}
    keys = [k for k in learned.keys(DURATION) if k.startswith(("class:", "kind:"))]
    return {k: _figure(learned, DURATION, k) for k in keys}


def _shown(figure: dict[str, Any] | None, digits: int = 1) -> str:
    if figure is None:
        return "-"
    value = f"{figure['value']:.{digits}f} ({figure['samples']})"
    return value if figure["in_use"] else f"[dim]{value}[/dim]"


def _models_table(rows: list[dict[str, Any]], offline: bool) -> Any:
    from rich.table import Table

    table = Table(title_justify="left")
    columns = ("model", "kind", "vram MB", "learned MB", "load s", "task s", "default", "file", "loaded on")
    for col in columns:
        table.add_column(col, justify="right" if col in columns[2:6] else "left")
    for r in rows:
        figures = r["learned"] or {}
        table.add_row(
            r["model"],
            r["kind"],
            str(r["vram_mb"]),
            _shown(figures.get("vram_mb"), 0),
            _shown(figures.get("load_s")),
            _shown(figures.get("duration_s"), 2),
            "yes" if r["default"] else "",
            r["where"] if not r["where"].startswith("missing: ") else f"[red]{r['where']}[/red]",
            ", ".join(r["loaded_on"]) or ("?" if offline else "-"),
        )
    return table


def _durations_table(durations: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="task durations by class and body kind", title_justify="left")
    table.add_column("tasks")
    table.add_column("typical s (samples)", justify="right")
    for key, figure in durations.items():
        table.add_row(key, _shown(figure, 2))
    return table


def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per GPU")] = False,
    history: Annotated[
        bool, typer.Option("--history", help="each GPU's and host's readings over the last hours")
    ] = False,
    since: Annotated[str, typer.Option("--since", help="with --history: how far back (30m, 3h, 2d)")] = "3h",
) -> None:
    """Every GPU: its worker's state and model (gpus bucket) beside its watchdog's last reading.
    With --history: each one's utilisation, temperature, memory and power over the window, from
    the history stream (docs/watchdog.md#history)."""
    s = settings()
    if history:
        raise typer.Exit(run(lambda: _history(s, since, as_json)))

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


async def _history(s: Any, since: str, as_json: bool) -> int:
    from mesh.cli.gpuhistory import GPU_COLUMNS, HOST_COLUMNS, history_table, history_view, print_json

    async with connected(s) as bus:
        start, gpu_series, host_series = await history_view(bus, since)
    if as_json:
        print_json(gpu_series, host_series)
        return 0
    if not gpu_series and not host_series:
        out.print(f"no telemetry history since {since} ago: is a watchdog running (`mesh agent watchdog`)?")
        return 0
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(start))
    if gpu_series:
        out.print(history_table(f"GPUs since {when}", gpu_series, GPU_COLUMNS))
    if host_series:
        out.print(history_table(f"hosts since {when}", host_series, HOST_COLUMNS))
    return 0


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
        if r.get("power_cap_w"):
            power += " cap"
        vram = f"{_num(r['mem_used_mb'])}/{_num(r['mem_total_mb'])}"
        seen = f"{now - r['sampled_at']:.0f}s ago" if r["sampled_at"] else "-"
        index = "+".join(map(str, r["cards"])) if r.get("cards") else str(r["index"])
        state = r["state"] or "-"
        if r.get("progress") is not None:
            state += f" {r['progress']:.0%}"
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


@gpu_app.command("power")
def gpu_power(
    gpu: str,
    watts: Annotated[
        float | None, typer.Argument(help="the cap in watts, within the card's allowed range")
    ] = None,
    config: Annotated[
        bool, typer.Option("--config", help="lift the operator's cap: back to the config's cap (or none)")
    ] = False,
    reason: ReasonOpt = "",
    wait: Annotated[
        float, typer.Option("--wait", min=0, help="seconds to wait for the watchdog's answer")
    ] = 10.0,
) -> None:
    """Cap a GPU's power now: its host's watchdog sets the limit through NVML, keeps it over a
    driver reset, and answers with the limit read back or why it cannot be (outside the card's
    range, no permission). GPU: an index on this host or an id from `mesh gpus` (one card, not a
    set). The cap lasts until `mesh gpu power GPU --config`, over restarts."""
    from mesh.cli.common import fail

    if (watts is None) == (not config):
        raise fail("give WATTS, or --config to go back to the config's cap")
    if watts is not None and watts <= 0:
        raise fail(f"WATTS must be above 0, not {watts:g}")
    gpu_id = _gpu_id(gpu)
    if "_" in gpu_id.rsplit("-gpu", 1)[-1] or "-gpu" not in gpu_id:
        raise fail(
            f"{gpu}: name one card (an index or an id such as rig-gpu0); a set's cards are capped one by one"
        )
    s = settings()

    async def go() -> int:
        async with connected(s) as bus:
            answer = await client.set_gpu_power(bus, gpu_id, watts or 0.0, reason=reason, wait_s=wait)
        asked = f"{watts:g} W" if watts is not None else "the config's cap"
        if answer is None:
            out.print(
                f"{gpu_id}: {asked} stored; no watchdog answered within {wait:g}s: the host's watchdog "
                "sets it when it runs",
                highlight=False,
            )
            return 0
        allowed = f"{answer.min_w:g}-{answer.max_w:g} W" if answer.min_w is not None and answer.max_w else "?"
        if answer.error:
            out.print(f"{gpu_id}: {asked} refused: {answer.error}", highlight=False, markup=False)
            return 1
        limit = f"{answer.limit_w:g} W" if answer.limit_w is not None else "unknown"
        out.print(
            f"{gpu_id}: power limit {limit} (asked {asked}; {answer.reason}; the card allows {allowed})",
            highlight=False,
            markup=False,
        )
        return 0

    raise typer.Exit(run(go))
