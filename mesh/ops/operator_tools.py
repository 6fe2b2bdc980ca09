"""The operator's read-only tools: each reads one part of the rig's state and says what it read.
The tools' names and schemas are mesh.operator's; here is what each does, on the asker's side.

A tool returns a `Looked`: its answer as compact JSON-ish text (cut to a bound, secrets
redacted, a sensitive task's error withheld as `mesh output` withholds its output) and a short
line naming what it looked at, which `mesh ask` prints as the answer's citations. Nothing here
writes: a tool reads KV, the history, the history stream, this host's logs, or runs
`mesh doctor`'s checks. A tool's failure is its answer (the model reads it), never a crash.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mesh import events
from mesh.bus import client
from mesh.bus.history import dead_letters, escalation_costs, parse_since, read_history
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.bus.read import read_bucket
from mesh.bus.telhistory import read_points
from mesh.errors import MeshError
from mesh.names import check_token
from mesh.operator import TOOL_NAMES, bounded, unknown_tool
from mesh.records import PlanRecord, TaskRecord, decode_agent
from mesh.redact import Redactor
from mesh.samples import GpuSample, HostSample, decode_sample
from mesh.settings import Settings
from mesh.telhistory import series_of, sparkline

DAY = "1d"


@dataclass(frozen=True)
class Looked:
    """A tool's answer and what it looked at."""

    text: str
    looked_at: str
    error: bool = False


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)


def _ago(at: float, now: float) -> str:
    if not at:
        return ""
    s = max(0.0, now - at)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def _since(args: dict[str, Any], now: float) -> tuple[float, str]:
    text = str(args.get("since") or DAY)
    return parse_since(text, now), text


def _int(args: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(args.get(name, default))
    except (TypeError, ValueError):
        value = default
    return max(low, min(high, value))


class Tools:
    """The tools over one connection; `call` runs one by name."""

    def __init__(self, bus: Bus, settings: Settings, log_dir: str | Path | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.redactor = Redactor(settings.redact)
        self.log_dir = Path(log_dir) if log_dir else Path(settings.data_dir) / "logs"
        self.table: dict[str, Callable[[dict[str, Any]], Awaitable[Looked]]] = {
            "list_plans": self.list_plans,
            "plan_tasks": self.plan_tasks,
            "plan_events": self.plan_events,
            "gpus": self.gpus,
            "telemetry_history": self.telemetry_history,
            "alerts": self.alerts,
            "dead_letters": self.dead_letters,
            "doctor": self.doctor,
            "costs": self.costs,
            "agents": self.agents,
            "agent_logs": self.agent_logs,
        }
        assert tuple(self.table) == TOOL_NAMES

    async def call(self, name: str, args: Any) -> Looked:
        """Run tool `name`; its answer bounded and redacted. An unknown tool, bad arguments or a
        failed read is an error answer the model can read."""
        tool = self.table.get(name)
        if tool is None:
            return Looked(unknown_tool(name), f"{name}: no such tool", error=True)
        if not isinstance(args, dict):
            args = {}
        try:
            looked = await tool(args)
        except (MeshError, ValueError, *TRANSIENT) as exc:
            looked = Looked(f"{name} failed: {exc}", f"{name}: failed", error=True)
        text, _ = self.redactor.text(bounded(looked.text))
        return Looked(text, looked.looked_at, looked.error)

    # plans and tasks ------------------------------------------------------------------------
    async def list_plans(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        plans, damaged = await client.read_plans(self.bus)
        status = str(args.get("status") or "")
        limit = _int(args, "limit", 20, 1, 200)
        chosen = [p for p in plans if not status or p.status == status]
        chosen.sort(key=lambda p: p.submitted_at, reverse=True)
        rows = [_plan_row(p, now) for p in chosen[:limit]]
        head = f"{len(chosen)} plan(s){f' {status}' if status else ''} of {len(plans)}"
        if damaged:
            head += f"; {len(damaged)} unreadable plan record(s): {', '.join(d.key for d in damaged[:10])}"
        return Looked(
            head + "\n" + "\n".join(_json(r) for r in rows),
            f"list_plans: {len(rows)} plan record(s){f' ({status})' if status else ''}",
        )

    async def plan_tasks(self, args: dict[str, Any]) -> Looked:
        plan_id = check_token(str(args.get("plan_id") or ""), "plan id")
        now = time.time()
        plan = await client.get_plan(self.bus, plan_id)
        if plan is None:
            return Looked(
                f"no plan {plan_id!r} in the plans bucket", f"plan_tasks: plan {plan_id} (none)", True
            )
        tasks, damaged = await client.read_tasks(self.bus, plan_id)
        status = str(args.get("status") or "")
        chosen = [t for t in tasks if not status or t.status == status]
        rows = [_task_row(t, now) for t in sorted(chosen, key=lambda t: t.index)]
        head = f"plan {plan_id}: {_json(_plan_row(plan, now))}\n{len(chosen)} task(s)"
        if damaged:
            head += f"; unreadable task records: {', '.join(d.key for d in damaged[:10])}"
        return Looked(
            head + "\n" + "\n".join(_json(r) for r in rows),
            f"plan_tasks: plan {plan_id}, {len(rows)} task record(s){f' ({status})' if status else ''}",
        )

    async def plan_events(self, args: dict[str, Any]) -> Looked:
        plan_id = check_token(str(args.get("plan_id") or ""), "plan id")
        limit = _int(args, "limit", 60, 1, 500)
        rows: list[str] = []
        total = 0
        async for entry in read_history(self.bus, self.bus.names.plan_filter(plan_id), idle_timeout_s=2.0):
            total += 1
            rows.append(_event_line(entry.subject, entry.at, entry.msg))
            if len(rows) > limit:
                rows.pop(0)
        if not total:
            return Looked(
                f"no events of plan {plan_id!r} in the history", f"plan_events: plan {plan_id} (none)", True
            )
        head = f"plan {plan_id}: {total} event(s), the last {len(rows)}:"
        return Looked(
            head + "\n" + "\n".join(rows), f"plan_events: plan {plan_id}, {len(rows)} of {total} event(s)"
        )

    # GPUs, telemetry, alerts -----------------------------------------------------------------
    async def gpus(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        states = await _bucket(self.bus, self.bus.names.gpus_bucket)
        samples = await _bucket(self.bus, self.bus.names.telemetry_bucket)
        controls = await _bucket(self.bus, self.bus.names.gpu_control_bucket)
        rows: dict[str, dict[str, Any]] = {}
        for value in states.values():
            try:
                st = events.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(st, events.GpuState):
                rows[st.gpu] = {
                    "gpu": st.gpu,
                    "worker": st.worker,
                    "state": st.state,
                    "since": _ago(st.at, now),
                    "llm": st.llm,
                    "running": st.running,
                    "vram_used_mb": st.vram_used_mb,
                    "vram_total_mb": st.vram_total_mb,
                    "hold": st.hold,
                    "error": st.error[:200],
                }
        hosts = []
        for value in samples.values():
            try:
                sample = decode_sample(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(sample, GpuSample):
                row = rows.setdefault(sample.gpu_id, {"gpu": sample.gpu_id, "state": "no worker"})
                row["reading"] = {
                    "name": sample.name,
                    "at": _ago(sample.at, now),
                    "temp_c": sample.temp_c,
                    "util_pct": sample.util_pct,
                    "mem_used_mb": sample.mem_used_mb,
                    "mem_total_mb": sample.mem_total_mb,
                    "power_w": sample.power_w,
                    "throttle": sample.throttle_reasons,
                }
            elif isinstance(sample, HostSample):
                hosts.append(
                    {
                        "host": sample.host,
                        "cpu_pct": sample.cpu_pct,
                        "load1": sample.load1,
                        "ram_used_mb": sample.ram_used_mb,
                        "ram_total_mb": sample.ram_total_mb,
                        "disk_free_pct": sample.disk_free_pct,
                    }
                )
        for key, value in controls.items():
            try:
                control = events.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(control, events.GpuControl) and (control.paused or control.cordoned):
                row = rows.setdefault(control.gpu, {"gpu": control.gpu})
                row.setdefault("controls", []).append(
                    {
                        "by": key.rsplit(".", 1)[-1],
                        "paused": control.paused,
                        "cordoned": control.cordoned,
                        "reason": control.reason,
                    }
                )
        lines = [_json(rows[k]) for k in sorted(rows)] + [_json(h) for h in hosts]
        if not lines:
            return Looked(
                "no GPU known: no GPU worker registered a state and no watchdog a reading", "gpus: none"
            )
        return Looked("\n".join(lines), f"gpus: {len(rows)} GPU(s), {len(hosts)} host reading(s)")

    async def telemetry_history(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        since, since_text = _since(args, now)
        host = str(args.get("host") or "*")
        if host != "*":
            check_token(host, "host")
        kind = "host" if args.get("kind") == "host" else "gpu"
        gpu = args.get("gpu")
        index = int(gpu) if isinstance(gpu, int | str) and str(gpu).isdigit() else None
        res, points = await read_points(self.bus, since=since, host=host, gpu=index, kind=kind, now=now)
        series = series_of(points)
        if not series:
            return Looked(
                f"no {kind} telemetry history since {since_text} ago{f' on {host}' if host != '*' else ''}",
                f"telemetry_history: {kind} {host} since {since_text} (none)",
            )
        lines = [
            f"{kind} readings since {since_text} ago, {res}s points; per reading: min of means, mean, "
            "max peak, and its course (oldest to newest)"
        ]
        for s in series:
            fields = sorted({f for p in s.points for f in p.mean})
            summary: dict[str, Any] = {
                "key": s.key,
                "points": len(s.points),
                "first": _ago(s.points[0].at, now),
                "last": _ago(s.points[-1].at, now),
            }
            for field in fields:
                stat = s.summary(field)
                if stat is not None:
                    summary[field] = {
                        "min": round(stat[0], 1),
                        "mean": round(stat[1], 1),
                        "max": round(stat[2], 1),
                        "course": sparkline(s.values(field), 24),
                    }
            lines.append(_json(summary))
        return Looked(
            "\n".join(lines),
            f"telemetry_history: {len(series)} {kind} series since {since_text}, {res}s points",
        )

    async def alerts(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        since, since_text = _since(args, now)
        rows: list[str] = []
        holding: dict[tuple[str, str], dict[str, Any]] = {}
        async for entry in read_history(self.bus, self.bus.names.alerts_all, since=since, idle_timeout_s=2.0):
            msg = entry.msg
            if isinstance(msg, events.AlertRaised):
                row = {
                    "raised": msg.rule,
                    "target": msg.target,
                    "host": msg.host,
                    "severity": msg.severity,
                    "at": _ago(msg.at, now),
                    "message": msg.message[:300],
                }
                holding[(msg.rule, msg.target)] = row
                rows.append(_json(row))
            elif isinstance(msg, events.AlertResolved):
                holding.pop((msg.rule, msg.target), None)
                rows.append(
                    _json(
                        {
                            "resolved": msg.rule,
                            "target": msg.target,
                            "at": _ago(msg.at, now),
                            "message": msg.message[:200],
                        }
                    )
                )
        rows = rows[-100:]
        head = (
            f"{len(holding)} alert(s) still holding since {since_text} ago: "
            f"{_json([f'{r}:{t}' for r, t in holding])}\nthe last {len(rows)} raised/resolved:"
        )
        return Looked(head + "\n" + "\n".join(rows), f"alerts: {len(rows)} alert event(s) since {since_text}")

    async def dead_letters(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        since, since_text = _since(args, now)
        letters = await dead_letters(self.bus, since)
        rows = [
            _json({"by": d.agent_id, "at": _ago(d.at, now), "subject": d.subject, "reason": d.reason[:300]})
            for d in letters[-100:]
        ]
        return Looked(
            f"{len(letters)} dead letter(s) since {since_text} ago"
            + ("\n" + "\n".join(rows) if rows else ""),
            f"dead_letters: {len(letters)} since {since_text}",
        )

    async def doctor(self, args: dict[str, Any]) -> Looked:
        from mesh.ops.doctor import diagnose

        findings = await diagnose(self.settings, quick=True)
        rows = [
            _json({"check": f.check, "level": f.level, "message": f.message, "fix": f.fix})
            for f in findings
            if f.level != "ok"
        ]
        ok = sum(1 for f in findings if f.level == "ok")
        head = f"{len(findings)} check(s): {ok} ok, the others:" if rows else f"all {ok} check(s) ok"
        return Looked(head + ("\n" + "\n".join(rows) if rows else ""), f"doctor: {len(findings)} finding(s)")

    async def costs(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        since, since_text = _since(args, now)
        lines = []
        for by in ("day", "plan"):
            rows = await escalation_costs(self.bus, by, since)
            for key, answered, failed, tin, tout, usd in rows[-50:]:
                lines.append(
                    _json(
                        {
                            by: key,
                            "answered": answered,
                            "failed": failed,
                            "tokens_in": tin,
                            "tokens_out": tout,
                            "usd": round(usd, 4),
                        }
                    )
                )
        s = self.settings
        head = (
            f"escalation spend since {since_text} ago (budget ${s.gateway_budget_day_usd:.2f}/day, "
            f"${s.gateway_budget_plan_usd:.2f}/plan)"
        )
        return Looked(
            head + ("\n" + "\n".join(lines) if lines else "\nno escalations"),
            f"costs: escalations since {since_text}",
        )

    async def agents(self, args: dict[str, Any]) -> Looked:
        now = time.time()
        raw = await _bucket(self.bus, self.bus.names.agents_bucket)
        rows = []
        for agent_id, value in sorted(raw.items()):
            try:
                rec = decode_agent(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                rows.append(_json({"agent": agent_id, "error": "unreadable registration"}))
                continue
            rows.append(
                _json(
                    {
                        "agent": rec.agent_id,
                        "role": rec.role,
                        "host": rec.host,
                        "state": rec.state,
                        "seen": _ago(rec.seen_at, now),
                        "up": _ago(rec.started_at, now),
                        "classes": rec.classes,
                        "running": rec.running[:10],
                    }
                )
            )
        return Looked(
            f"{len(rows)} agent(s) registered\n" + "\n".join(rows), f"agents: {len(rows)} registration(s)"
        )

    async def agent_logs(self, args: dict[str, Any]) -> Looked:
        agent = check_token(str(args.get("agent") or ""), "agent")
        lines = _int(args, "lines", 80, 1, 400)
        path = self.log_dir / f"{agent}.log"
        if path.is_file():
            return Looked(_tail(path, lines), f"agent_logs: {path.name}, last {lines} line(s)")
        unit = agent if agent.startswith("mesh-") else f"mesh-{agent}"
        journal = _journal(unit, lines)
        if journal:
            return Looked(journal, f"agent_logs: journal of {unit}, last {lines} line(s)")
        known = sorted(p.stem for p in self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []
        return Looked(
            f"no log of {agent!r} on this host: not in {self.log_dir} (logs there: "
            f"{', '.join(known) or 'none'}) and no journal of unit {unit}",
            f"agent_logs: {agent} (none)",
            error=True,
        )


async def _bucket(bus: Bus, name: str) -> dict[str, bytes]:
    try:
        return await read_bucket(await bus.kv(name))
    except MeshError:
        return {}


def _plan_row(p: PlanRecord, now: float) -> dict[str, Any]:
    return {
        "plan": p.plan_id,
        "title": p.title[:120],
        "status": p.status,
        "tasks": p.total,
        "counts": p.counts,
        "submitted": _ago(p.submitted_at, now),
        "finished": _ago(p.finished_at, now),
        "by": p.by,
        "error": p.error[:300],
    }


def _task_row(t: TaskRecord, now: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "task": t.task_id,
        "status": t.status,
        "attempt": t.attempt,
        "class": t.spec.cls,
        "kind": t.spec.kind,
    }
    if t.spec.model:
        row["model"] = t.spec.model
    if t.worker:
        row["worker"] = t.worker
    if t.started_at:
        row["started"] = _ago(t.started_at, now)
    if t.finished_at:
        row["finished"] = _ago(t.finished_at, now)
    if t.duration_s:
        row["duration_s"] = round(t.duration_s, 2)
    if t.reason:
        row["reason"] = t.reason
    if t.rc is not None:
        row["rc"] = t.rc
    if t.error:
        # as `mesh output` withholds a sensitive task's output
        row["error"] = "[withheld: the task is sensitive]" if t.spec.sensitive else t.error[-400:]
    return row


def _event_line(subject: str, at: float, msg: events.Message | None) -> str:
    when = time.strftime("%H:%M:%S", time.gmtime(at))
    if msg is None:
        return f"{when} {subject} (unreadable)"
    out: dict[str, Any] = {"at": when, "type": events.type_of(msg)}
    for field in ("task_id", "attempt", "worker", "reason", "rc", "duration_s", "model", "why"):
        value = getattr(msg, field, None)
        if value not in (None, "", 0, 0.0):
            out[field] = value
    error = getattr(msg, "error", "")
    if isinstance(error, str) and error:
        out["error"] = error[-200:]
    return _json(out)


def _tail(path: Path, lines: int) -> str:
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        data = f.read().decode(errors="replace")
    return "\n".join(data.splitlines()[-lines:])


def _journal(unit: str, lines: int) -> str:
    try:
        done = subprocess.run(
            ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-iso"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = done.stdout.strip()
    if done.returncode != 0 or not text or text.startswith("-- No entries --"):
        return ""
    return text
