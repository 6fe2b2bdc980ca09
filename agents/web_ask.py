"""The web console's operator chat and chart history: questions to the operator (`mesh ask`),
streamed to the page, and the telemetry history behind the GPU and host charts.

The operator's loop lives with the operator tooling (`mesh.ops.operator`), above the agents: the
command that starts the console (`mesh agent web`) hands it in as an `Asker`, so this module only
streams its steps. A question is an action (an operator token, a same-origin POST: it spends the
gateway's budget); its conversation is kept here, by an id the page sends back, for a follow-up.
The charts open with the history stream's fine points (`mesh.bus.telhistory`), so a console
started a minute ago still shows the last hour.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from agents.web_api import HUB
from agents.web_hub import RING, Hub
from mesh.bus.history import parse_since
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.bus.telhistory import read_points
from mesh.errors import MeshError
from mesh.telhistory import HistoryPoint

log = logging.getLogger(__name__)

# (bus, question, the conversation so far or None) -> the operator's steps as JSON-ready dicts
# (`mesh.ops.operator.ask_steps`): text, tool, done (with `messages`), failed
Asker = Callable[[Bus, str, list[dict[str, Any]] | None], AsyncIterator[dict[str, Any]]]

ASKER: web.AppKey[Asker] = web.AppKey("asker")
CONVERSATIONS: web.AppKey[OrderedDict[str, tuple[float, list[dict[str, Any]]]]] = web.AppKey(
    "conversations", OrderedDict
)

QUESTION_MAX = 2000
# conversations kept for a follow-up: the most recent, each for at most this long
KEEP = 50
KEEP_S = 3600.0
HISTORY_POINTS_MAX = 5000

# a history point's means under the names a chart plots (`web_hub.chart_point`)
_GPU = {
    "temp_c": "temp",
    "util_pct": "util",
    "mem_used_mb": "mem",
    "mem_total_mb": "mem_total",
    "power_w": "power",
}
_HOST = {"cpu_pct": "cpu", "ram_used_mb": "ram", "ram_total_mb": "ram_total", "disk_free_pct": "disk_free"}


def chart_point(point: HistoryPoint) -> dict[str, Any]:
    """A history point as the figures a chart plots, at the middle of its bucket."""
    names = _GPU if point.kind == "gpu" else _HOST
    return {"at": point.at + point.res_s / 2, **{names[k]: v for k, v in point.mean.items() if k in names}}


async def seed_rings(hub: Hub, bus: Bus) -> int:
    """Fill each chart's ring with the history's finest points from before the console started
    (older than its first live sample), so charts open with the last hour. How many were added."""
    now = time.time()
    fine = bus.settings.history_fine_s
    added = 0
    for kind in ("gpu", "host"):
        try:
            _, points = await read_points(bus, since=now - RING * fine, kind=kind, res_s=fine)
        except (*TRANSIENT, MeshError) as exc:
            log.warning("reading the %s history for the charts failed: %s", kind, exc)
            continue
        by_key: dict[str, list[dict[str, Any]]] = {}
        for p in points:
            by_key.setdefault(p.key, []).append(chart_point(p))
        for key, old in by_key.items():
            ring = hub.rings.setdefault(key, deque(maxlen=RING))
            first = ring[0]["at"] if ring else float("inf")
            older = [p for p in old if p["at"] < first][-(RING - len(ring)) :] if len(ring) < RING else []
            ring.extendleft(reversed(older))
            added += len(older)
    return added


async def history(request: web.Request) -> web.Response:
    """A GPU's or host's history: `?key=<host>.gpu<N>|<host>.host&since=24h` (default 1h), at
    the finest resolution that still reaches back that far."""
    key = request.query.get("key", "")
    host, sep, what = key.rpartition(".")
    if not sep or not host or not (what == "host" or (what.startswith("gpu") and what[3:].isdigit())):
        raise web.HTTPBadRequest(text="name a GPU or a host: ?key=HOST.gpuN or ?key=HOST.host")
    try:
        since = parse_since(request.query.get("since", "1h"))
    except MeshError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    bus = request.app[HUB].bus
    kind = "host" if what == "host" else "gpu"
    gpu = None if kind == "host" else int(what[3:])
    res_s, points = await read_points(bus, since=since, host=host, gpu=gpu, kind=kind)
    rows = [chart_point(p) for p in points][-HISTORY_POINTS_MAX:]
    return web.json_response({"key": key, "res_s": res_s, "points": rows})


async def ask(request: web.Request) -> web.StreamResponse:
    """A question to the operator: `{"question": ..., "conversation": ID or ""}`; the answer
    streams back as server-sent events, one per step (`step`: text, tool, done, failed), the
    `done` step naming the conversation to follow up in."""
    asker = request.app.get(ASKER)
    if asker is None:
        raise web.HTTPNotImplemented(text="this console was started without the operator")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='send JSON: {"question": ...}') from None
    question = body.get("question") if isinstance(body, dict) else None
    if not isinstance(question, str) or not question.strip() or len(question) > QUESTION_MAX:
        raise web.HTTPBadRequest(text=f"a question is 1 to {QUESTION_MAX} characters")
    conversations = request.app[CONVERSATIONS]
    _forget_old(conversations)
    cid = body.get("conversation") or ""
    earlier = conversations.get(cid, (0.0, None))[1] if isinstance(cid, str) else None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    try:
        async for step in asker(request.app[HUB].bus, question.strip(), earlier):
            if step.get("step") == "done":
                messages = step.pop("messages", None)
                if isinstance(messages, list):
                    cid = cid if cid in conversations else secrets.token_urlsafe(12)
                    conversations[cid] = (time.monotonic(), messages)
                    conversations.move_to_end(cid)
                step["conversation"] = cid
            await response.write(b"data: " + json.dumps(step).encode() + b"\n\n")
    except (*TRANSIENT, MeshError) as exc:
        failed = {"step": "failed", "reason": "error", "error": str(exc)}
        await response.write(b"data: " + json.dumps(failed).encode() + b"\n\n")
    except ConnectionResetError:
        pass
    return response


def _forget_old(conversations: OrderedDict[str, tuple[float, list[dict[str, Any]]]]) -> None:
    now = time.monotonic()
    for cid in [c for c, (at, _) in conversations.items() if now - at > KEEP_S]:
        del conversations[cid]
    while len(conversations) > KEEP:
        conversations.popitem(last=False)


def routes() -> list[web.RouteDef]:
    return [web.get("/api/history", history), web.post("/api/ask", ask)]


def install(app: web.Application, asker: Asker | None) -> None:
    """The chat's and the history's routes on the console's app, with the operator to ask."""
    if asker is not None:
        app[ASKER] = asker
    app[CONVERSATIONS] = OrderedDict()
    app.router.add_routes(routes())
