"""The web console (`mesh agent web`): plans, their DAGs, GPUs and hosts, alerts, dead letters,
costs and agents in a browser, live over server-sent events fed from NATS by one `Hub`.

It is an agent like the others (it registers, heartbeats and stops cleanly) running an aiohttp
server on its own event loop beside nats-py. What it shows is read through the functions the CLI
uses (`mesh.bus.client`, `mesh.bus.history`, `mesh.bus.outputs`); its pages are hand-written HTML,
CSS and JavaScript shipped with mesh (`agents/web_static/`), with nothing fetched from elsewhere.

Who may do what (docs/console.md):

- it serves on 127.0.0.1 unless `web_host` says otherwise, and off loopback it refuses to start
  without an operator token (`web_token`); `web_read_token` sees everything and acts on nothing;
- a request shows its token as `Authorization: Bearer TOKEN`, or the HttpOnly cookie the login
  form (`/login`, the one route open to all) sets;
- with no token set, a request must name this machine (`Host: 127.0.0.1:8470`, `localhost`): a
  site whose name was made to resolve to 127.0.0.1 (DNS rebinding) is refused;
- an action is a POST carrying the header `X-Mesh-Action` (which no cross-site form or plain
  cross-site request can send) from the same origin, by an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from agents.base import Agent
from agents.web_api import HUB, ROLE, SETTINGS, routes
from agents.web_ask import Asker, install, seed_rings
from agents.web_hub import Hub
from mesh.consoleview import OPERATOR, bind_problem, host_allowed, role_of
from mesh.errors import ConfigError
from mesh.settings import Settings

log = logging.getLogger(__name__)

COOKIE = "mesh_console"
ACTION_HEADER = "X-Mesh-Action"
# the one route open without a token: the login form and what it posts
OPEN_PATHS = frozenset({"/login"})
# a server-sent event stream says something at least this often, so a proxy keeps it open
KEEPALIVE_S = 15.0
# the sign-in form's body: a token and its name
LOGIN_MAX_BYTES = 4096
STATIC = ("index.html", "app.js", "app.css", "dag.js", "charts.js", "chat.js")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def static_file(name: str) -> bytes:
    return (resources.files("agents") / "web_static" / name).read_bytes()


def _presented(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer ") :].strip()
    return request.cookies.get(COOKIE, "")


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a request came from (Origin, else Referer): it must be this
    console. A client that names none (curl, a script with the token) is not a browser's
    cross-site request."""
    origin = request.headers.get("Origin") or ""
    if not origin:
        referer = request.headers.get("Referer") or ""
        if not referer:
            return True
        parts = referer.split("/", 3)
        origin = "/".join(parts[:3])
    return origin in {
        f"{request.scheme}://{request.host}",
        f"http://{request.host}",
        f"https://{request.host}",
    }


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An API call that fails says why as JSON (`{"error": ...}`), never as a page or a stack
    trace; what went wrong inside is logged here, and the caller told no more than that."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        kept = {name: exc.headers[name] for name in ("Retry-After",) if name in exc.headers}
        return web.json_response({"error": exc.text or exc.reason}, status=exc.status, headers=kept)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "the console failed to answer: its log says why"}, status=500)


def guard(settings: Settings) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not host_allowed(request.host, settings.web_token, settings.web_read_token):
            raise web.HTTPMisdirectedRequest(
                text="with no token set, the console answers to this machine's names only"
            )
        if request.path in OPEN_PATHS:
            return await handler(request)
        role = role_of(_presented(request), settings.web_token, settings.web_read_token)
        if role is None:
            if request.method == "GET" and not request.path.startswith("/api/"):
                raise web.HTTPFound("/login")
            raise web.HTTPUnauthorized(text="a token is needed: Authorization: Bearer TOKEN, or /login")
        if request.method not in ("GET", "HEAD"):
            if request.method != "POST" or not request.headers.get(ACTION_HEADER):
                raise web.HTTPForbidden(text=f"actions are POSTs with the header {ACTION_HEADER}")
            if not _same_origin(request):
                raise web.HTTPForbidden(text="an action from another site is refused")
            if role != OPERATOR and request.path != "/logout":
                raise web.HTTPForbidden(text="this token may look, not act: an operator token acts")
        request[ROLE] = role
        return await handler(request)

    return middleware


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>mesh: sign in</title>
<style>body{font:16px system-ui,sans-serif;background:#111827;color:#e5e7eb;display:flex;
justify-content:center;padding-top:15vh}form{background:#1f2937;padding:2em;border-radius:8px;
max-width:22em;width:90%}input,button{font:inherit;width:100%;box-sizing:border-box;margin:.4em 0;
padding:.5em}p.err{color:#f87171}</style></head><body><form method="post" action="/login">
<h1>mesh console</h1>{error}<label>Token <input name="token" type="password" autocomplete="off"
autofocus></label><button type="submit">Sign in</button></form></body></html>"""


async def login_form(request: web.Request) -> web.Response:
    return web.Response(text=LOGIN_PAGE.replace("{error}", ""), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    if not _same_origin(request):
        raise web.HTTPForbidden(text="a sign-in from another site is refused")
    # the one route open to all reads a token's worth, not the plan-sized body the others may
    if request.content_length is None or request.content_length > LOGIN_MAX_BYTES:
        raise web.HTTPRequestEntityTooLarge(LOGIN_MAX_BYTES, request.content_length or 0)
    form = await request.post()
    token = str(form.get("token", ""))
    if not token or role_of(token, settings.web_token, settings.web_read_token) is None:
        page = LOGIN_PAGE.replace("{error}", '<p class="err">That token is not valid.</p>')
        return web.Response(text=page, content_type="text/html", status=401)
    response = web.HTTPFound("/")
    # Secure when the browser came over TLS, to this server or to a TLS proxy in front of it
    tls = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="Strict", secure=tls, path="/", max_age=30 * 86400
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.json_response({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


async def index(request: web.Request) -> web.Response:
    return web.Response(body=static_file("index.html"), content_type="text/html", charset="utf-8")


_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    kind = _TYPES[name[name.rindex(".") :]]
    return web.Response(body=static_file(name), content_type=kind, charset="utf-8")


async def me(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({"role": request[ROLE], "signed_in": bool(s.web_token or s.web_read_token)})


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `topics` (comma-separated: plans, gpus, telemetry, agents, alerts,
    dead, costs, plan:ID) as they change, one batch per topic per flush."""
    hub = request.app[HUB]
    topics = {t for t in request.query.get("topics", "").split(",") if t}
    if not topics or len(topics) > 16 or any(len(t) > 200 for t in topics):
        raise web.HTTPBadRequest(text="name 1 to 16 topics: ?topics=plans,gpus,plan:ID")
    most = request.app[SETTINGS].web_max_streams
    if len(hub.clients) >= most:
        hub.prune()
    if len(hub.clients) >= most:
        # each open stream holds a queue and a share of every flush: a bound, not a slow death
        raise web.HTTPServiceUnavailable(
            text=f"the console already serves {most} live pages (web_max_streams): close one, or raise "
            "web_max_streams in mesh.toml and restart the console",
            headers={"Retry-After": "30"},
        )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    transport = request.transport
    client = hub.attach(topics, lambda: transport is not None and not transport.is_closing())
    try:
        await response.write(b"event: hello\ndata: {}\n\n")
        while True:
            try:
                item = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if item is None:  # cut off: the page reconnects and reloads what it shows
                await response.write(b"event: resync\ndata: {}\n\n")
                break
            topic, data = item
            await response.write(
                b"event: update\ndata: "
                + json.dumps({"topic": topic}).encode()[:-1]
                + b', "changes": '
                + data
                + b"}\n\n"
            )
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.detach(client)
    return response


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """What every answer says to the browser: keep nothing, frame nothing, run only our scripts."""
    h = response.headers
    h.setdefault("Cache-Control", "no-store")
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    )


def make_app(hub: Hub, settings: Settings, asker: Asker | None = None) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, guard(settings)], client_max_size=settings.plan_max_bytes + 65536
    )
    app.on_response_prepare.append(_headers)
    app[HUB] = hub
    app[SETTINGS] = settings
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/events", stream)
    app.router.add_routes(routes())
    # the operator's chat (with `asker`) and the charts' history (agents/web_ask.py)
    install(app, asker)
    return app


class Web(Agent):
    role = "web"

    def __init__(self, settings: Settings, agent_id: str | None = None, asker: Asker | None = None) -> None:
        problem = bind_problem(settings.web_host, settings.web_token, settings.web_read_token)
        if problem:
            raise ConfigError(problem)
        super().__init__(settings, agent_id)
        self.hub: Hub | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        # the operator the chat asks (`mesh agent web` hands in `mesh.ops.operator.ask_steps`)
        self.asker = asker

    async def start(self) -> None:
        await super().start()
        self.hub = Hub(self.bus)
        await self.hub.start()
        await seed_rings(self.hub, self.bus)
        app = make_app(self.hub, self.settings, self.asker)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.web_host, self.settings.web_port)
        await site.start()
        port = self.settings.web_port
        server = getattr(site, "_server", None)
        with contextlib.suppress(AttributeError, IndexError, TypeError):
            port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        host = self.settings.web_host
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        # the line `mesh up` and the tests read the URL from
        log.info("console serving on %s", self.url)

    async def run(self) -> None:
        await self.stop_requested.wait()

    async def on_reconnect(self) -> None:
        if self.hub is not None:
            self.spawn(self.hub.subscribe(), "resubscribe")

    async def stop(self, reason: str = "stopped") -> None:
        if self.hub is not None:
            await self.hub.stop()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await super().stop(reason)
