"""The web console's JSON API: what each page reads and the actions it takes, through the same
functions the `mesh` command uses.

Reads come from the `Hub`'s memory where it follows the state (plans, GPUs, hosts, agents, alerts,
a plan's task view), and from the history for what is read on demand (a task's events and
outcomes, dead letters, costs). Actions (submit, cancel, retry, pause, resume, cordon) are the
CLI's own calls in `mesh.bus.client`; `agents/web.py` lets only an operator's same-origin POST
reach them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import nats.js.errors
from aiohttp import web

from agents.web_hub import Hub, PlanView, age, plan_row
from mesh import events
from mesh.bus import client, history
from mesh.bus.outputs import OutputError, attempt_outcomes, outcome_text, task_outcome
from mesh.bus.report import plan_report
from mesh.consoleview import OPERATOR, window, withhold
from mesh.errors import MeshError, NotFound, NothingToDo, PlanError
from mesh.names import check_token
from mesh.plan import PlanLimits, parse_plan
from mesh.records import UNREADABLE, PlanRecord, decode_task
from mesh.settings import Settings

log = logging.getLogger(__name__)

PAGE_MAX = 500
EVENTS_MAX = 500
DAG_MAX = 4000
DEAD_MAX = 200
GPU_ACTIONS = {
    "pause": (True, None),
    "resume": (False, None),
    "cordon": (True, True),
    "uncordon": (False, False),
}
_to_builtins = msgspec.to_builtins


HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
# the role (`mesh.consoleview`) the request's token grants, set by the guard in agents/web.py
ROLE = "mesh_role"


def _hub(request: web.Request) -> Hub:
    return request.app[HUB]


def _settings(request: web.Request) -> Settings:
    return request.app[SETTINGS]


def _int(request: web.Request, name: str, default: int, low: int = 0, high: int = 10**9) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} is a whole number") from None
    return min(max(value, low), high)


def _token(value: str, what: str) -> str:
    try:
        return check_token(value, what)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # (RecursionError: nested deeper than a plan needs)
        raise web.HTTPBadRequest(text="the body is a JSON object") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body is a JSON object")
    return data


# ------------------------------------------------------------------ plans


async def plans(request: web.Request) -> web.Response:
    """The plans, newest first: `status` (running, succeeded, ..., or `final`), `q` (in the id or
    title), `offset` and `limit`."""
    hub = _hub(request)
    status = request.query.get("status", "")
    q = request.query.get("q", "").lower()
    offset = _int(request, "offset", 0)
    limit = _int(request, "limit", 50, 1, PAGE_MAX)
    chosen = [
        p
        for p in hub.plans.values()
        if (not status or str(p.status) == status or (status == "final" and p.final))
        and (not q or q in p.plan_id.lower() or q in p.title.lower())
    ]
    chosen.sort(key=lambda p: p.accepted_at, reverse=True)
    now = time.time()
    return web.json_response(
        {
            "total": len(chosen),
            "offset": offset,
            "plans": [plan_row(p, now) for p in chosen[offset : offset + limit]],
        }
    )


async def _plan_record(request: web.Request) -> PlanRecord:
    hub = _hub(request)
    plan_id = _token(request.match_info["plan"], "plan id")
    found = hub.plans.get(plan_id) or await client.get_plan(hub.bus, plan_id)
    if found is None:
        raise web.HTTPNotFound(text=f"no plan {plan_id!r}")
    return found


async def _view(request: web.Request) -> PlanView:
    record = await _plan_record(request)
    return await _hub(request).view(record.plan_id)


async def plan(request: web.Request) -> web.Response:
    record = await _plan_record(request)
    view = await _hub(request).view(record.plan_id)
    return web.json_response(
        {
            "plan": {**plan_row(record, time.time()), "source": record.source, "workdir": record.workdir},
            "layers": len(view.lay.rows),
            "width": view.lay.width,
            "tasks": len(view.ids),
        }
    )


async def tasks(request: web.Request) -> web.Response:
    """A page of a plan's tasks in plan order (`status` filters, `q` in the id)."""
    view = await _view(request)
    status = request.query.get("status", "")
    q = request.query.get("q", "")
    offset = _int(request, "offset", 0)
    limit = _int(request, "limit", 100, 1, PAGE_MAX)
    if status or q:
        chosen = [
            i
            for i in range(len(view.ids))
            if (not status or view.status[i] == status) and (not q or q in view.ids[i])
        ]
        page, total = chosen[offset : offset + limit], len(chosen)
    else:
        page, total = list(range(offset, min(offset + limit, len(view.ids)))), len(view.ids)
    return web.json_response({"total": total, "offset": offset, "tasks": [view.row(i) for i in page]})


async def dag(request: web.Request) -> web.Response:
    """A window of a plan's DAG: `rows` layers from `row0`, `cols` tasks of each from `col0`;
    its nodes and the edges between them, and how many edges leave the window."""
    view = await _view(request)
    row0 = _int(request, "row0", 0)
    rows = _int(request, "rows", 30, 1, 400)
    col0 = _int(request, "col0", 0)
    cols = _int(request, "cols", 30, 1, 400)
    shown = window(view.lay, row0, rows, col0, cols)[:DAG_MAX]
    inside = set(shown)
    edges: list[tuple[int, int]] = []
    outside = 0
    for i in shown:
        for d in view.deps[i]:
            if d in inside:
                edges.append((d, i))
            else:
                outside += 1
    return web.json_response(
        {
            "layers": len(view.lay.rows),
            "width": view.lay.width,
            "nodes": [view.row(i) for i in shown],
            "edges": edges,
            "outside": outside,
        }
    )


async def task(request: web.Request) -> web.Response:
    """One task: its record (attempts, timings, worker), how each attempt ended, and its events."""
    record = await _plan_record(request)
    task_id = _token(request.match_info["task"], "task id")
    bus = _hub(request).bus
    try:
        entry = await (await bus.tasks_kv()).get(f"{record.plan_id}.{task_id}")
        rec = decode_task(entry.value or b"")
    except UNREADABLE as exc:
        raise web.HTTPInternalServerError(text=f"the record of {task_id} is unreadable: {exc}") from None
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        raise web.HTTPNotFound(text=f"plan {record.plan_id} has no task {task_id!r}") from None
    names = bus.names
    subjects = [
        names.task_event(record.plan_id, task_id, "*"),
        names.run_events(record.plan_id, task_id, "*"),
        names.esc_event(record.plan_id, task_id, "*"),
    ]
    ended = (await attempt_outcomes(bus, record.plan_id, task_id)).get(task_id, [])
    # a task that is sensitive, or whose attempt read a sensitive task's output, shows what
    # `mesh output` shows of it: what it saw and made withheld (`mesh.consoleview.withhold`)
    secret = rec.spec.sensitive or any(o.sensitive for o in ended)
    evs: list[dict[str, Any]] = []
    async for e in history.read_history(bus, subjects, idle_timeout_s=2.0):
        if e.msg is None:
            continue
        item = _to_builtins(e.msg)
        if secret or item.get("sensitive"):
            item = withhold(item)
        evs.append({"seq": e.seq, "subject": e.subject, "at": e.at, "event": item})
    return web.json_response(
        {
            "record": withhold(_to_builtins(rec)) if secret else _to_builtins(rec),
            "outcomes": [
                {
                    "attempt": o.attempt,
                    "status": o.status,
                    "ok": o.ok,
                    "worker": o.worker,
                    "error": o.error,
                    "gpu": o.report.gpu if o.report else "",
                    "duration_s": o.report.duration_s if o.report else 0.0,
                    "rc": o.report.rc if o.report else None,
                    "stderr_tail": "" if secret or o.sensitive or o.report is None else o.report.stderr_tail,
                }
                for o in ended
            ],
            "events": evs[-EVENTS_MAX:],
        }
    )


async def output(request: web.Request) -> web.Response:
    """A task's output, by `mesh output`'s rules: a sensitive task's is withheld unless an
    operator asks for it (`sensitive=1`)."""
    record = await _plan_record(request)
    task_id = _token(request.match_info["task"], "task id")
    bus = _hub(request).bus
    attempt = _int(request, "attempt", 0)
    want_sensitive = request.query.get("sensitive") == "1"
    if want_sensitive and request[ROLE] != OPERATOR:
        raise web.HTTPForbidden(text="a sensitive output is shown to an operator token only")
    try:
        outcome = await task_outcome(bus, record.plan_id, task_id, attempt)
        entry = await (await bus.tasks_kv()).get(f"{record.plan_id}.{task_id}")
        rec = decode_task(entry.value or b"")
        withheld = (outcome.sensitive or rec.spec.sensitive) and not want_sensitive
        text = "" if withheld else await outcome_text(bus, outcome)
    except (OutputError, nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError) as exc:
        return web.json_response(
            {"error": str(exc) or f"plan {record.plan_id} has no task {task_id!r}"}, status=404
        )
    except UNREADABLE as exc:
        raise web.HTTPInternalServerError(text=f"the record of {task_id} is unreadable: {exc}") from None
    return web.json_response(
        {
            "attempt": outcome.attempt,
            "status": outcome.status,
            "worker": outcome.worker,
            "withheld": withheld,
            "text": text,
            "stderr": "" if withheld or outcome.report is None else outcome.report.stderr_tail,
        }
    )


async def cancel(request: web.Request) -> web.Response:
    record = await _plan_record(request)
    try:
        await client.cancel(_hub(request).bus, record.plan_id, "cancelled in the web console")
    except NotFound as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except NothingToDo as exc:  # (a finished plan: nothing to cancel)
        raise web.HTTPConflict(text=str(exc)) from None
    return web.json_response({"ok": True, "plan": record.plan_id})


async def retry(request: web.Request) -> web.Response:
    record = await _plan_record(request)
    body = await _body(request)
    ids = body.get("tasks") or []
    if not isinstance(ids, list) or not all(isinstance(t, str) for t in ids):
        raise web.HTTPBadRequest(text="tasks is a list of task ids")
    try:
        await client.retry(_hub(request).bus, record.plan_id, tuple(_token(t, "task id") for t in ids))
    except NotFound as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except NothingToDo as exc:  # (a finished plan none of whose tasks failed or was cancelled)
        raise web.HTTPConflict(text=str(exc)) from None
    return web.json_response({"ok": True, "plan": record.plan_id})


# ------------------------------------------------------------------ submitting


def _parse(request: web.Request, body: dict[str, Any]) -> events.PlanSpec:
    """The plan in the body (`text`, `variables`), parsed as `mesh submit` parses a file, within
    the settings' limits. A foreach over a glob is refused: the server's files are not the
    browser's."""
    s = _settings(request)
    text = body.get("text")
    variables = body.get("variables") or {}
    if not isinstance(text, str) or not text.strip():
        raise web.HTTPBadRequest(text="text is the plan's markdown")
    if not isinstance(variables, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
    ):
        raise web.HTTPBadRequest(text="variables maps names to strings")
    name = body.get("name")
    source = name if isinstance(name, str) and name else "console.md"
    limits = PlanLimits(
        max_expansions=s.plan_max_expansions, max_tasks=s.plan_max_tasks, max_bytes=s.plan_max_bytes
    )
    return parse_plan(text, source=source[:200], variables=variables, limits=limits)


def _problems(exc: PlanError) -> web.Response:
    return web.json_response(
        {
            "ok": False,
            "problems": [{"line": p.line, "message": p.message, "hint": p.hint} for p in exc.problems],
        },
        status=422,
    )


async def validate_plan(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        spec = _parse(request, body)
    except PlanError as exc:
        return _problems(exc)
    return web.json_response(
        {
            "ok": True,
            "title": spec.title,
            "tasks": len(spec.tasks),
            "variables": spec.variables,
        }
    )


async def submit(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        spec = _parse(request, body)
        plan_id = await client.submit(_hub(request).bus, spec, by="web")
    except PlanError as exc:
        return _problems(exc)
    return web.json_response({"ok": True, "plan": plan_id, "tasks": len(spec.tasks)})


# ------------------------------------------------------------------ GPUs, hosts, the rest


async def gpus(request: web.Request) -> web.Response:
    """Each GPU's state (the gpus bucket), its latest sample and recent chart points; the hosts'."""
    from mesh.samples import GpuSample

    hub = _hub(request)
    samples: dict[str, Any] = {}
    hosts = []
    for key, sample in sorted(hub.samples.items()):
        if isinstance(sample, GpuSample):
            samples[sample.gpu_id] = {"key": key, **_to_builtins(sample)}
        else:
            hosts.append({"key": key, **_to_builtins(sample), "chart": list(hub.rings.get(key, ()))})
    rows = []
    for gpu_id, state in sorted(hub.gpus.items()):
        sample = samples.pop(gpu_id, None)
        key = sample["key"] if sample else ""
        rows.append(
            {
                "gpu": gpu_id,
                "state": _to_builtins(state),
                "sample": sample,
                "chart": list(hub.rings.get(key, ())),
            }
        )
    for gpu_id, sample in sorted(samples.items()):  # seen by a watchdog, no worker owns it
        rows.append(
            {"gpu": gpu_id, "state": None, "sample": sample, "chart": list(hub.rings.get(sample["key"], ()))}
        )
    return web.json_response({"gpus": rows, "hosts": hosts})


async def gpu_control(request: web.Request) -> web.Response:
    gpu = _token(request.match_info["gpu"], "GPU id")
    body = await _body(request)
    action = body.get("action")
    if action not in GPU_ACTIONS:
        raise web.HTTPBadRequest(text=f"action is one of {', '.join(GPU_ACTIONS)}")
    reason = str(body.get("reason") or "")[:200]
    paused, cordoned = GPU_ACTIONS[action]
    try:
        done = await client.control_gpu(
            _hub(request).bus, gpu, paused=paused, cordoned=cordoned, reason=reason
        )
    except MeshError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return web.json_response({"ok": True, "control": _to_builtins(done)})


async def alerts(request: web.Request) -> web.Response:
    hub = _hub(request)
    rows = sorted(hub.alerts.values(), key=lambda a: a.at, reverse=True)
    return web.json_response(
        {"alerts": [{**_to_builtins(a), "firing": isinstance(a, events.AlertRaised)} for a in rows]}
    )


async def dead(request: web.Request) -> web.Response:
    """The dead letters (`mesh dead`), newest first, the last `DEAD_MAX`."""
    letters = await history.dead_letters(_hub(request).bus)
    return web.json_response(
        {"total": len(letters), "dead": [_to_builtins(d) for d in reversed(letters[-DEAD_MAX:])]}
    )


async def costs(request: web.Request) -> web.Response:
    """Escalation spend (`mesh costs`) by UTC day or by plan."""
    by = request.query.get("by", "day")
    if by not in ("day", "plan"):
        raise web.HTTPBadRequest(text="by is day or plan")
    rows = await history.escalation_costs(_hub(request).bus, by)
    return web.json_response(
        {
            "by": by,
            "rows": [
                {"key": k, "answered": a, "failed": f, "tokens_in": i, "tokens_out": o, "usd": usd}
                for k, a, f, i, o, usd in rows
            ],
        }
    )


async def agents(request: web.Request) -> web.Response:
    """The agents registered now (`mesh agents`)."""
    hub = _hub(request)
    now = time.time()
    return web.json_response(
        {
            "agents": [
                {**_to_builtins(a), "seen_s": age(a.seen_at, now), "up_s": age(a.started_at, now)}
                for a in sorted(hub.agents.values(), key=lambda a: a.agent_id)
            ]
        }
    )


async def report(request: web.Request) -> web.Response:
    """What happened in a plan (`mesh report PLAN --json`): outcomes, the critical path, the
    slowest tasks, retries and their reasons, escalations and their cost, GPU time and loading
    per model, failures by cause. Read from the history, so asked for once a plan has ended."""
    record = await _plan_record(request)
    found = await plan_report(_hub(request).bus, record.plan_id)
    return web.json_response({"report": _to_builtins(found)})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/plans/{plan}/report", report),
        web.get("/api/plans", plans),
        web.get("/api/plans/{plan}", plan),
        web.get("/api/plans/{plan}/tasks", tasks),
        web.get("/api/plans/{plan}/dag", dag),
        web.get("/api/plans/{plan}/tasks/{task}", task),
        web.get("/api/plans/{plan}/tasks/{task}/output", output),
        web.post("/api/plans/{plan}/cancel", cancel),
        web.post("/api/plans/{plan}/retry", retry),
        web.post("/api/validate", validate_plan),
        web.post("/api/submit", submit),
        web.get("/api/gpus", gpus),
        web.post("/api/gpus/{gpu}/control", gpu_control),
        web.get("/api/alerts", alerts),
        web.get("/api/dead", dead),
        web.get("/api/costs", costs),
        web.get("/api/agents", agents),
    ]
