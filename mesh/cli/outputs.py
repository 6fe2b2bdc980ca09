"""`mesh output`: what a task produced, for its last attempt or any other, and a plan's outputs
in short (also the summary `mesh submit --wait` ends with).

The outcome of an attempt is the report the brain took for it (`mesh.bus.outputs`), never
another worker's. A sensitive task's output is withheld unless `--sensitive` asks for it; text
bound for a terminal has its control characters escaped (`mesh.textstream.printable`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mesh.bus import client
from mesh.bus.files import FileTransferError, fetch_file, safe_relpath
from mesh.bus.outputs import Outcome, OutputError, attempt_outcomes, outcome_text, task_outcome
from mesh.bus.publish import Bus
from mesh.cli import render
from mesh.cli.common import connected, err, fail, out, run, settings
from mesh.records import TaskRecord
from mesh.textstream import printable

# a preview line's width, and how many leaf tasks the summary of `submit --wait` names
PREVIEW_CHARS = 100
SUMMARY_TASKS = 10
# the embedding preview: rows and numbers per row shown
PREVIEW_ROWS = 3
PREVIEW_COLS = 6
# a vectors file bigger than this is not fetched for a preview
PREVIEW_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class Shown:
    """One attempt's outcome with what the command prints of it."""

    outcome: Outcome
    record: TaskRecord
    text: str
    # the output is withheld: the task is sensitive and `--sensitive` was not given
    withheld: bool

    @property
    def sensitive(self) -> bool:
        return self.outcome.sensitive or self.record.spec.sensitive

    @property
    def key(self) -> str:
        return f"{self.outcome.plan_id}.{self.outcome.task_id}"


def output(
    target: Annotated[str, typer.Argument(help="PLAN.TASK: one task's output; PLAN: every task's, in short")],
    attempt: Annotated[
        int, typer.Option("--attempt", "-a", help="this attempt's outcome (default: the last that ended)")
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object (a line per task for a plan)")
    ] = False,
    save: Annotated[
        Path | None,
        typer.Option("--save", help="write the attempt's artifacts and its output (TASK.output.txt) here"),
    ] = None,
    sensitive: Annotated[
        bool, typer.Option("--sensitive", help="show a sensitive task's output, which is withheld by default")
    ] = False,
) -> None:
    """A task's output: stdout, the model's answer, the transcript, the vectors' shape and a preview."""
    s = settings()
    plan_id, _, task_id = target.partition(".")

    async def go() -> int:
        async with connected(s) as bus:
            if await client.read_plan(bus, plan_id) is None:
                raise fail(f"no plan {plan_id!r}; `mesh status` lists the plans")
            if not task_id:
                if attempt or save is not None:
                    raise fail("--attempt and --save take one task: PLAN.TASK")
                return await _plan(bus, plan_id, as_json, sensitive)
            try:
                shown = await _shown(bus, plan_id, task_id, attempt, sensitive)
            except OutputError as exc:
                raise fail(str(exc)) from None
            code = 0
            if save is not None:
                code = await _save(bus, shown, save)
            if as_json:
                print(json.dumps(_as_json(shown), ensure_ascii=False))
            elif save is None:
                code = max(code, await _show(bus, shown))
            return code

    raise typer.Exit(run(go))


async def _shown(bus: Bus, plan_id: str, task_id: str, attempt: int, sensitive: bool) -> Shown:
    outcome = await task_outcome(bus, plan_id, task_id, attempt)
    record = await _record(bus, plan_id, task_id)
    withheld = (outcome.sensitive or record.spec.sensitive) and not sensitive
    text = "" if withheld else await outcome_text(bus, outcome)
    return Shown(outcome, record, text, withheld)


async def _record(bus: Bus, plan_id: str, task_id: str) -> TaskRecord:
    for rec in await client.plan_tasks(bus, plan_id):
        if rec.task_id == task_id:
            return rec
    raise OutputError(f"plan {plan_id!r} has no task {task_id!r}")


def _withheld_note(key: str) -> str:
    return f"the output of {key} is withheld: the task is sensitive. `mesh output {key} --sensitive` shows it"


# what followed a failed attempt, as its header says it
AFTER_FAILURE = {
    "retrying": "retried",
    "climbed": "climbed its ladder",
    "escalated": "escalated",
    "reviewing": "reviewed",
}


def _status(o: Outcome) -> str:
    after = AFTER_FAILURE.get(o.status)
    return f"failed ({after})" if after else o.status


def _header(shown: Shown, short: bool = False) -> str:
    """What the attempt was: `PLAN.TASK attempt N: status on worker, kind, time` (`── TASK #N: ...`
    in a plan's list of outputs, `short`)."""
    o, rec = shown.outcome, shown.record
    who = {"worker": f" on {o.worker}", "claude": " by Claude"}.get(o.source, "")
    took = render.seconds(o.report.duration_s) if o.report is not None else "-"
    files = len(o.report.files) if o.report is not None else 0
    now = f"; the task is {rec.status} now, at attempt {rec.attempt}" if rec.attempt != o.attempt else ""
    title = f"── {o.task_id} #{o.attempt}" if short else f"{shown.key} attempt {o.attempt}"
    return f"{title}: {_status(o)}{who}, {rec.spec.kind}, {took}{f', {files} file(s)' if files else ''}{now}"


def _write(text: str) -> None:
    """Output text to stdout: as it is into a file or a pipe, its control characters escaped
    for a terminal."""
    if sys.stdout.isatty():
        text = "\n".join(printable(line) for line in text.split("\n"))
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    sys.stdout.flush()


async def _show(bus: Bus, shown: Shown, short: bool = False) -> int:
    """One attempt on the terminal: what it was on stderr, the output itself on stdout."""
    o = shown.outcome
    err.print(Text(_header(shown, short), style="bold" if short else ""), highlight=False, soft_wrap=True)
    if shown.withheld:
        err.print(_withheld_note(shown.key), highlight=False, markup=False, soft_wrap=True)
        return 1
    if o.ok:
        _write(shown.text)
        if shown.record.spec.kind == "embed":
            _write("\n".join(await _vectors(bus, o)))
        return 0
    run_ = o.report
    parts = [f"error: {(run_.error if run_ is not None else '') or o.error or o.status}"]
    if run_ is not None:
        if run_.stderr_tail:
            parts.append("stderr:\n" + run_.stderr_tail.rstrip("\n"))
        if shown.text:
            parts.append("output:\n" + shown.text.rstrip("\n"))
    _write("\n".join(parts))
    return 0


def _as_json(shown: Shown) -> dict[str, Any]:
    o, rec, run_ = shown.outcome, shown.record, shown.outcome.report
    return {
        "plan": o.plan_id,
        "task": o.task_id,
        "attempt": o.attempt,
        "status": o.status,
        "worker": o.worker,
        "source": o.source,
        "ok": o.ok,
        "kind": rec.spec.kind,
        "output": None if shown.withheld else shown.text,
        "withheld": shown.withheld,
        "error": o.error,
        "stderr": None if shown.withheld or run_ is None else run_.stderr_tail,
        "rc": run_.rc if run_ is not None else None,
        "model": run_.model if run_ is not None else (o.answer.model if o.answer is not None else ""),
        "metrics": dict(run_.metrics) if run_ is not None else {},
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in (run_.files if run_ else ())],
        "artifacts": list(run_.artifacts) if run_ is not None else [],
        "sensitive": shown.sensitive,
        "parsed": run_.parsed if run_ is not None else False,
    }


# ------------------------------------------------------------------ embeddings


async def _vectors(bus: Bus, o: Outcome) -> list[str]:
    """An embedding's vectors in short: their shape, and a preview from its `.npy` file (the
    attempt's artifact in the object store, or the file itself when this host has it)."""
    run_ = o.report
    if run_ is None:
        return []
    rows, dim = int(run_.metrics.get("vectors", 0)), int(run_.metrics.get("dim", 0))
    lines = [f"vectors: {rows} x {dim}"] if rows else []
    try:
        import numpy as np
    except ImportError:
        return lines
    with tempfile.TemporaryDirectory(prefix="mesh-output-") as tmp:
        path = await _npy_file(bus, run_.files, run_.artifacts, tmp)
        if not path:
            return lines
        try:
            matrix = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return [*lines, f"(cannot read {os.path.basename(path)}: {exc})"]
    if matrix.ndim != 2:
        return [*lines, f"{os.path.basename(path)}: an array of shape {matrix.shape}, not a matrix"]
    norms = np.linalg.norm(matrix, axis=1)
    out_ = [
        f"vectors: {matrix.shape[0]} x {matrix.shape[1]} ({matrix.dtype}), norms "
        f"{float(norms.min()):.3f} to {float(norms.max()):.3f}"
    ]
    for i, row in enumerate(matrix[:PREVIEW_ROWS]):
        numbers = " ".join(f"{float(x):+.4f}" for x in row[:PREVIEW_COLS])
        out_.append(f"  [{i}] {numbers}{' ...' if matrix.shape[1] > PREVIEW_COLS else ''}")
    if matrix.shape[0] > PREVIEW_ROWS:
        out_.append(f"  ... {matrix.shape[0] - PREVIEW_ROWS} more")
    return out_


async def _npy_file(bus: Bus, files: Any, artifacts: tuple[str, ...], tmp: str) -> str:
    for ref in files:
        rel = safe_relpath(ref.path)
        if rel.endswith(".npy") and ref.object and ref.size <= PREVIEW_MAX_BYTES:
            dest = os.path.join(tmp, os.path.basename(rel))
            try:
                await fetch_file(await bus.objects(), ref.object, dest, sha256=ref.sha256, size=ref.size)
            except FileTransferError:
                continue
            return dest
    for path in artifacts:
        if path.endswith(".npy") and os.path.isfile(path) and os.path.getsize(path) <= PREVIEW_MAX_BYTES:
            return path
    return ""


# ------------------------------------------------------------------ --save


async def _save(bus: Bus, shown: Shown, directory: Path) -> int:
    """Write the attempt's output and artifacts under `directory`; 1 when something was not
    written."""
    o = shown.outcome
    if shown.withheld:
        err.print(_withheld_note(shown.key) + " (and --save writes it)", highlight=False, markup=False)
        return 1
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot make {directory}: {exc.strerror or exc}") from None
    code = 0
    written: list[str] = []
    files = o.report.files if o.report is not None else ()
    store = await bus.objects() if files else None
    for ref in files:
        rel = safe_relpath(ref.path)
        if not rel or not ref.object:
            err.print(f"skipped an artifact with an unsafe path: {ref.path!r}", highlight=False, markup=False)
            code = 1
            continue
        assert store is not None
        try:
            await fetch_file(
                store, ref.object, str(directory / rel), sha256=ref.sha256, size=ref.size, mode=ref.mode
            )
        except FileTransferError as exc:
            err.print(f"{rel}: {exc}", highlight=False, markup=False)
            code = 1
            continue
        written.append(rel)
    name = f"{o.task_id}.output.txt"
    try:
        (directory / name).write_text(shown.text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {directory / name}: {exc.strerror or exc}") from None
    written.append(name)
    err.print(
        f"{shown.key} attempt {o.attempt}: wrote {len(written)} file(s) to {directory}: {', '.join(written)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return code


# ------------------------------------------------------------------ a plan's outputs


def preview(text: str, width: int = PREVIEW_CHARS) -> str:
    """The first non-empty line of an output, cut to `width`."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = printable(line)
    return line if len(line) <= width else line[: width - 1] + "…"


async def _plan(bus: Bus, plan_id: str, as_json: bool, sensitive: bool) -> int:
    records = await client.plan_tasks(bus, plan_id)
    ended = await attempt_outcomes(bus, plan_id)
    table = Table("task", "status", "attempt", "output", "files", box=None, show_edge=False)
    for rec in records:
        last = ended.get(rec.task_id, [])
        o = last[-1] if last else None
        secret = rec.spec.sensitive or (o is not None and o.sensitive)
        withheld = secret and not sensitive
        text = note = ""
        if o is not None and not withheld:
            try:
                text = await outcome_text(bus, o)
            except OutputError as exc:
                note = str(exc)
        if as_json:
            if o is None:
                print(json.dumps({"plan": plan_id, "task": rec.task_id, "status": rec.status, "attempt": 0}))
            else:
                print(json.dumps(_as_json(Shown(o, rec, text, withheld)), ensure_ascii=False))
            continue
        files = len(o.report.files) if o is not None and o.report is not None else 0
        if o is None:
            shown = ""
        elif withheld:
            shown = "(withheld: sensitive)"
        else:
            shown = preview(note or (text if o.ok else o.error or text))
        style = render.STYLE.get(rec.status, "")
        table.add_row(
            rec.task_id,
            Text(str(rec.status), style=style),
            str(o.attempt if o is not None else "-"),
            Text(shown, style="" if o is None or o.ok else "red"),
            str(files or ""),
        )
    if not as_json:
        out.print(table)
        out.print(f"one task's output in full: `mesh output {plan_id}.TASK`", highlight=False, markup=False)
    return 0


async def summary_lines(bus: Bus, plan_id: str) -> list[str]:
    """The plan's final outputs in short: the first line of each leaf task's (one nothing
    depends on) last attempt, when it succeeded; a sensitive one withheld.

    From the history, which the brain writes before the task records: a plan followed to its
    `plan.finished` may still have records that say otherwise."""
    records = await client.plan_tasks(bus, plan_id)
    needed = {dep for rec in records for dep in rec.spec.depends_on}
    ended = await attempt_outcomes(bus, plan_id)
    leaves = [
        (rec, ended[rec.task_id][-1])
        for rec in records
        if rec.task_id not in needed and ended.get(rec.task_id) and ended[rec.task_id][-1].ok
    ]
    if not leaves:
        return []
    lines = [f"outputs (`mesh output {plan_id}.TASK` shows one in full):"]
    width = max(len(rec.task_id) for rec, _ in leaves[:SUMMARY_TASKS])
    for rec, o in leaves[:SUMMARY_TASKS]:
        if rec.spec.sensitive or o.sensitive:
            shown = "(withheld: sensitive)"
        else:
            try:
                shown = preview(await outcome_text(bus, o)) or "(no output)"
            except OutputError as exc:
                shown = str(exc)
        lines.append(f"  {rec.task_id:<{width}}  {shown}")
    if len(leaves) > SUMMARY_TASKS:
        lines.append(f"  … and {len(leaves) - SUMMARY_TASKS} more: `mesh output {plan_id}`")
    return lines


async def show_all(bus: Bus, plan_id: str) -> None:
    """Every task's output in full, in plan order (what `mesh up --submit --outputs` ends with)."""
    for rec in await client.plan_tasks(bus, plan_id):
        try:
            shown = await _shown(bus, plan_id, rec.task_id, 0, False)
        except OutputError as exc:
            err.print(f"── {rec.task_id}: {exc}", highlight=False, markup=False, soft_wrap=True)
            continue
        await _show(bus, shown, short=True)
