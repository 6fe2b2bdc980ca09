"""How events and records look on a terminal (rich).

One line per event for `mesh tail` and `mesh submit --follow`; tables for `mesh status`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from mesh import events
from mesh.records import Damaged, PlanRecord, TaskRecord
from mesh.status import PlanStatus, TaskStatus

STYLE = {
    TaskStatus.SUCCEEDED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.CANCELLED: "yellow",
    PlanStatus.REJECTED: "red",
    TaskStatus.RUNNING: "cyan",
    TaskStatus.READY: "blue",
    TaskStatus.WAITING: "magenta",
    TaskStatus.PENDING: "dim",
    "retrying": "yellow",
    TaskStatus.ESCALATING: "bright_magenta",
    "damaged": "bold red",
}
DAMAGED = "damaged"


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}" if ts else "-"


def seconds(value: float) -> str:
    if value <= 0:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.1f}s"
    return f"{value / 60:.1f}m"


def event_line(subject: str, msg: events.Message | None) -> Text:
    """One line for `mesh tail` and `mesh submit --wait`."""
    if msg is None:
        return Text(f"?? {subject}: undecodable", style="red")
    tag = events.type_of(msg)
    kind = tag.rsplit(".", 1)[-1]
    at = getattr(msg, "at", 0.0)
    line = Text(f"{clock(at)} ", style="dim")
    line.append(f"{tag:<15}", style=STYLE.get(kind, "bold"))
    plan_id = getattr(msg, "plan_id", "")
    task_id = getattr(msg, "task_id", "")
    if task_id:
        line.append(f" {plan_id}.{task_id}")
    elif plan_id:
        line.append(f" {plan_id}")
    attempt = getattr(msg, "attempt", 0)
    if attempt:
        line.append(f" #{attempt}", style="dim")
    match msg:
        case events.TaskSucceeded():
            line.append(f" {seconds(msg.duration_s)}", style="dim")
            if msg.ttft_s:
                line.append(f" ttft {seconds(msg.ttft_s)}", style="dim")
        case events.RunFinished():
            line.append(f" {seconds(msg.duration_s)}", style="dim")
            if ttft := msg.metrics.get("ttft_s"):
                line.append(f" ttft {seconds(ttft)}", style="dim")
            if not msg.ok:
                line.append(f" {msg.error}", style="red")
        case events.TaskFailed():
            _why(line, msg)
        case events.TaskClimbed():
            line.append(
                f" {msg.from_model or '?'} -> {msg.model} (tier {msg.tier}, {msg.why})", style="yellow"
            )
            if msg.after is not None and msg.after.error.strip():
                line.append(f" {msg.after.error.strip().splitlines()[-1]}", style="red")
        case events.TaskRetrying():
            _why(line, msg)
            line.append(f" (retry in {seconds(msg.retry_at - msg.at)})", style="yellow")
        case events.PlanFinished():
            line.append(f" {msg.status}", style=STYLE.get(msg.status, ""))
        case events.PlanRejected():
            line.append(f" {msg.error}", style="red")
        case events.AgentStarted() | events.AgentStopped():
            line.append(f" {msg.agent_id}")
        case events.DeadLetter():
            line.append(f" from {msg.subject}: {msg.reason}", style="red")
        case events.GpuState():
            line.append(f" {msg.gpu} {msg.previous or 'start'} -> {msg.state} after {seconds(msg.took_s)}")
            if msg.llm:
                line.append(f" llm={msg.llm}", style="dim")
            if msg.vram_total_mb:
                line.append(f" {msg.vram_used_mb}/{msg.vram_total_mb} MB", style="dim")
            if msg.error:
                line.append(f" {msg.error}", style="red")
        case events.ResourceRequested():
            line.append(f" {msg.action} {msg.model} on {msg.gpu}: {msg.reason}")
        case events.GpuPower() if msg.source == "operator":
            asked = f"{msg.watts:g} W" if msg.watts > 0 else "the config's cap"
            line.append(f" {msg.gpu} asked {asked}" + (f" by {msg.by}" if msg.by else ""))
        case events.GpuPower():
            limit = f"{msg.limit_w:g} W" if msg.limit_w is not None else "?"
            line.append(f" {msg.gpu} limit {limit}: {msg.reason}")
            if msg.error:
                line.append(f" {msg.error}", style="red")
        case events.AlertRaised():
            line.append(f" {msg.severity} {msg.rule} {msg.target}: {msg.message}", style="red")
        case events.AlertResolved():
            line.append(f" {msg.rule} {msg.target}")
    return line


def text_line(line: str) -> Text:
    """A line of a task's streamed answer (`task| text`, from `mesh.textstream.TextView`): the
    task dim, the text as it is (a `Text` takes no markup from it)."""
    task, sep, text = line.partition("| ")
    out = Text(task + sep, style="dim cyan")
    out.append(text)
    return out


def _why(line: Text, msg: events.TaskFailed | events.TaskRetrying) -> None:
    """A failure's reason and the last line of its error, when it has either."""
    if msg.reason or msg.error:
        line.append(
            f" {msg.reason}: {msg.error.strip().splitlines()[-1] if msg.error.strip() else ''}", style="red"
        )


def plans_table(plans: list[PlanRecord], damaged: Sequence[Damaged] = ()) -> Table:
    """Plans; a damaged record (a value that does not decode) is a row of its own."""
    table = Table(title="plans", title_justify="left")
    for col in ("plan", "title", "status", "done", "failed", "running", "accepted", "took"):
        table.add_column(col)
    for d in damaged:
        table.add_row(d.key, d.describe()[:80], Text(DAMAGED, style=STYLE[DAMAGED]), "?", "?", "?", "-", "-")
    for p in plans:
        took = (p.finished_at or time.time()) - p.accepted_at if p.accepted_at else 0.0
        table.add_row(
            p.plan_id,
            p.title,
            Text(p.status, style=STYLE.get(p.status, "")),
            f"{p.done}/{p.total}",
            str(p.counts.get(TaskStatus.FAILED, 0)),
            str(p.counts.get(TaskStatus.RUNNING, 0)),
            clock(p.accepted_at),
            seconds(took),
        )
    return table


def tasks_table(
    plan: PlanRecord | Damaged,
    tasks: list[TaskRecord],
    notes: dict[str, str] | None = None,
    damaged: Sequence[Damaged] = (),
) -> Table:
    """A plan's tasks; `notes` (task id -> text) override the detail column. A damaged plan
    record is said in the title, damaged task records are rows of their own."""
    if isinstance(plan, Damaged):
        title = f"{plan.key} — plan record {DAMAGED}: {plan.describe()}"
    else:
        title = f"{plan.plan_id} — {plan.title} — {plan.status}"
        if plan.error:
            title += f": {plan.error}"
    table = Table(title=title, title_justify="left")
    for col in ("task", "class", "prio", "status", "attempt", "model", "worker", "took", "detail"):
        table.add_column(col)
    for d in damaged:
        table.add_row(
            d.task_id, "?", "?", Text(DAMAGED, style=STYLE[DAMAGED]), "?", "", "", "-", d.describe()[:100]
        )
    for t in tasks:
        detail = ""
        if t.status in (TaskStatus.FAILED, TaskStatus.WAITING) and (t.reason or t.error):
            last = t.error.strip().splitlines()[-1] if t.error.strip() else ""
            detail = f"{t.reason}: {last}"[:80]
        if t.status == TaskStatus.SUCCEEDED and t.ttft_s:
            detail = f"ttft {seconds(t.ttft_s)}"
        if t.status == TaskStatus.ESCALATING:
            detail = f"{len(t.followups)} follow-up tasks" if t.followups else f"asked Claude ({t.escalated})"
        if notes and t.task_id in notes:
            detail = notes[t.task_id][:100]
        table.add_row(
            t.task_id,
            t.spec.cls,
            str(t.spec.priority),
            Text(t.status, style=STYLE.get(t.status, "")),
            str(t.attempt),
            model_cell(t),
            t.worker,
            seconds(t.duration_s),
            detail,
        )
    return table


def model_cell(t: TaskRecord) -> str:
    """The model a task is on (or ended on), with its rung when it has an escalation ladder:
    `qwen-14b (tier 2/3)`; `claude` once escalated."""
    who = t.answered_by
    ladder = t.spec.escalate
    if not ladder:
        return who
    tier = len(ladder) + 1 if t.escalated and ladder[-1] == events.CLAUDE else t.tier + 1
    return f"{who} (tier {tier}/{len(ladder) + 1})"


def dead_table(letters: list[events.DeadLetter]) -> Table:
    table = Table(title="dead letters", title_justify="left")
    for col in ("when", "agent", "subject", "bytes", "reason"):
        table.add_column(col)
    for d in letters:
        table.add_row(clock(d.at), d.agent_id, d.subject, str(d.size), d.reason[:120])
    return table


def costs_table(rows: list[tuple[str, int, int, int, int, float]], by: str) -> Table:
    """Escalation spend: (key, answered, failed, tokens in, tokens out, USD) per day or plan."""
    table = Table(title=f"escalation costs by {by}", title_justify="left")
    for col in (by, "answered", "failed", "tokens in", "tokens out", "cost USD"):
        table.add_column(col, justify="left" if col == by else "right")
    total = [0, 0, 0, 0, 0.0]
    for key, answered, failed, tokens_in, tokens_out, usd in rows:
        table.add_row(key, str(answered), str(failed), f"{tokens_in:,}", f"{tokens_out:,}", f"{usd:.4f}")
        for i, v in enumerate((answered, failed, tokens_in, tokens_out, usd)):
            total[i] += v
    if len(rows) > 1:
        table.add_row(
            "total",
            str(total[0]),
            str(total[1]),
            f"{int(total[2]):,}",
            f"{int(total[3]):,}",
            f"{total[4]:.4f}",
            style="bold",
        )
    return table
