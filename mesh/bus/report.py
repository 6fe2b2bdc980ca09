"""A plan's report read from the server: its events and the GPU states of its time (history), its
records (KV), folded by `mesh.report`. What `mesh report` and `mesh submit --wait` show.
"""

from __future__ import annotations

import contextlib

from mesh import events
from mesh.bus.client import read_plan, read_tasks
from mesh.bus.history import read_history
from mesh.bus.publish import Bus
from mesh.errors import NotFound
from mesh.names import check_token
from mesh.records import PlanRecord
from mesh.report import TOP, PlanReport, ReportBuilder

# the history is read from a little before the plan's submission (clocks of other hosts)
MARGIN_S = 60.0


async def fold_plan_events(bus: Bus, builder: ReportBuilder, since: float | None = None) -> int:
    """Every event of the plan (plan, task, run and escalation events) into `builder`, in stream
    order, from `since` (a UNIX time; None: the stream's start). How many there were."""
    n = 0
    async for entry in read_history(bus, bus.names.plan_filter(builder.plan_id), since=since):
        if entry.msg is not None:
            builder.add(entry.msg)
            n += 1
    return n


async def fold_gpu_loads(bus: Bus, builder: ReportBuilder, since: float, until: float) -> None:
    """The GPU states reported between `since` and `until` (0: up to now) into `builder`."""
    if since <= 0:
        return
    # closed on the break, so its consumer goes at once (`read_history` is an async generator)
    states = read_history(bus, bus.names.gpu_states_all, since=since - MARGIN_S)
    async with contextlib.aclosing(states) as found:
        async for entry in found:
            if until and entry.at > until + MARGIN_S:
                break
            match entry.msg:
                case events.GpuState() as state:
                    builder.add_gpu(state)
                case _:
                    pass


async def finish_report(bus: Bus, builder: ReportBuilder, top: int = TOP) -> PlanReport:
    """The report of what `builder` holds of the plan's events, with the GPU loads of its time
    and its records (the records the last word on each task's status)."""
    found = await read_plan(bus, builder.plan_id)
    plan = found if isinstance(found, PlanRecord) else None
    records, _ = await read_tasks(bus, builder.plan_id)
    since = builder.accepted_at or (plan.accepted_at if plan else 0.0)
    until = builder.finished_at or (plan.finished_at if plan else 0.0)
    await fold_gpu_loads(bus, builder, since, until)
    return builder.build(records, plan, top)


async def plan_report(bus: Bus, plan_id: str, top: int = TOP) -> PlanReport:
    """A plan's report from the server; `NotFound` when neither its record nor its history is there."""
    check_token(plan_id, "plan id")
    found = await read_plan(bus, plan_id)
    submitted = found.submitted_at if isinstance(found, PlanRecord) else 0.0
    builder = ReportBuilder(plan_id)
    seen = await fold_plan_events(bus, builder, since=submitted - MARGIN_S if submitted else None)
    if found is None and not seen:
        raise NotFound(f"no plan {plan_id!r} in the records or the history; `mesh status` lists the plans")
    return await finish_report(bus, builder, top)
