"""`mesh report PLAN`: what happened in a plan, as text or JSON; and the shorter form `mesh submit
--wait` ends with. The figures are `mesh.report`'s, read by `mesh.bus.report`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import typer

from mesh.bus.report import plan_report
from mesh.cli.common import connected, out, run, settings
from mesh.report import TOP, FailureGroup, PlanReport


def report(
    plan: Annotated[str, typer.Argument(help="the plan id")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object, for tools")] = False,
    top: Annotated[int, typer.Option("--top", help="how many of each list to show", min=1)] = TOP,
) -> None:
    """What happened in a plan, from its history: tasks by outcome, the slowest tasks and the
    critical path, retries and why, escalations and their cost, GPU time and model loading per
    model, failures grouped by cause with their most common error lines."""
    s = settings()

    async def go() -> int:
        async with connected(s) as bus:
            found = await plan_report(bus, plan, top)
        if as_json:
            print(msgspec.json.encode(found).decode())
        else:
            for line in report_lines(found, top):
                out.print(line, highlight=False, markup=False, soft_wrap=True)
        return 0

    raise typer.Exit(run(go))


def secs(value: float) -> str:
    """A duration for a person: 0.42 s, 12.3 s, 4m05s, 2h03m."""
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        m, sec = divmod(round(value), 60)
        return f"{m}m{sec:02d}s"
    h, rest = divmod(round(value), 3600)
    return f"{h}h{rest // 60:02d}m"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def headline(r: PlanReport) -> str:
    took = f" in {secs(r.wall_s)}" if r.wall_s else ""
    title = f" ({r.title})" if r.title else ""
    return (
        f"plan {r.plan_id}{title}: {r.status or 'unknown'}{took}; {r.tasks} tasks: "
        f"{_counts(r.outcomes) or 'none'}; {r.attempts} attempts"
    )


def path_line(r: PlanReport) -> str:
    of = f" of {secs(r.wall_s)}" if r.wall_s else ""
    steps = " -> ".join(f"{s.task_id} {secs(s.span_s)}" for s in r.critical_path)
    return f"critical path {secs(r.critical_path_s)}{of}: {steps}"


def retries_line(r: PlanReport) -> str:
    extra = []
    if r.redeliveries:
        extra.append(f"{r.redeliveries} redelivered (a worker died)")
    if r.resets:
        extra.append(f"{r.resets} retried by an operator")
    why = f" ({_counts(r.retry_reasons)})" if r.retry_reasons else ""
    return f"retries: {r.retries}{why}" + "".join(f"; {e}" for e in extra)


def _failure(g: FailureGroup, top: int) -> list[str]:
    names = ", ".join(g.tasks[:top]) + (f" and {len(g.tasks) - top} more" if len(g.tasks) > top else "")
    head = f"  {g.cause}: {len(g.tasks)} task(s) ({names})"
    if g.attempts:
        head += f", {g.attempts} failed attempt(s), {g.final} for good"
    return [head] + [f"    {c.count}x {c.line}" for c in g.lines[:top]]


def report_lines(r: PlanReport, top: int = TOP) -> list[str]:
    """The whole report, a line each."""
    lines = [headline(r)]
    if not r.complete:
        lines.append("(the history no longer holds the plan's start: figures count what is left)")
    if r.critical_path:
        lines.append(path_line(r))
    if r.slowest:
        lines.append("slowest tasks (time their attempts ran):")
        for t in r.slowest[:top]:
            where = f" on {t.worker}" if t.worker else ""
            model = f" [{t.model}]" if t.model else ""
            lines.append(
                f"  {t.task_id}{model}: {secs(t.run_s)} in {t.attempts} attempt(s), "
                f"{secs(t.span_s)} from first start to end, {t.status}{where}"
            )
    lines.append(retries_line(r))
    for n in r.retry_notes[-top:]:
        on = f" on {n.worker}" if n.worker else ""
        lines.append(f"  {n.task_id} attempt {n.attempt}{on}: {n.reason}: {n.error or '(no error text)'}")
    if r.escalations or r.climbs or r.reviews:
        lines.append(
            f"escalations: {len(r.escalations)}, ${r.escalation_cost_usd:.4f} "
            f"({r.escalation_tokens_in} tokens in, {r.escalation_tokens_out} out)"
        )
        for e in r.escalations[-top:]:
            by = f" by {e.model}" if e.model else ""
            waits = f", {e.waits} wait(s)" if e.waits else ""
            lines.append(
                f"  {e.task_id} ({e.why}): {e.outcome}{by}, ${e.cost_usd:.4f}, {secs(e.duration_s)}{waits}"
            )
        for c in r.climbs[-top:]:
            lines.append(f"  {c.task_id} climbed {c.from_model or '?'} -> {c.to_model} ({c.why})")
        if r.reviews:
            lines.append(f"  local reviews: {_counts(r.reviews)}")
    if r.models:
        lines.append(f"GPU time: {secs(r.gpu_s)}, loading models {secs(r.load_s)}")
        for m in r.models[:top]:
            loads = f", {m.loads} load(s) {secs(m.load_s)}" if m.loads else ""
            lines.append(f"  {m.model}: {secs(m.gpu_s)} in {m.runs} run(s) on {', '.join(m.gpus)}{loads}")
    if r.failures:
        lines.append("failures by cause:")
        for g in r.failures:
            lines += _failure(g, top)
    return lines


def summary_lines(r: PlanReport) -> list[str]:
    """The short form `mesh submit --wait` ends with: the critical path, retries, cost, failures."""
    lines = []
    if r.critical_path:
        lines.append(path_line(r))
    if r.retries or r.redeliveries or r.resets:
        lines.append(retries_line(r))
    if r.escalations:
        lines.append(f"escalations: {len(r.escalations)}, ${r.escalation_cost_usd:.4f}")
    if r.models:
        lines.append(f"GPU time: {secs(r.gpu_s)}, loading models {secs(r.load_s)}")
    for g in r.failures:
        common = f"; most often: {g.lines[0].line}" if g.lines else ""
        tasks = ", ".join(g.tasks[:5]) + ("..." if len(g.tasks) > 5 else "")
        ran = f"{g.attempts} failed attempt(s) of " if g.attempts else ""
        lines.append(f"failures ({g.cause}): {ran}{tasks}, {g.final} task(s) failed for good{common}")
    if lines:
        lines.append(f"the whole report: `mesh report {r.plan_id}`")
    return lines
