"""The web console over HTTP against a live mesh (nats-server, brain, worker, watchdog with a
simulated GPU, `mesh agent web`): every endpoint with real state, its actions carried out by the
agents, server-sent events delivering what is published on NATS, and its tokens and roles."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from agents.web import OPEN_PATHS, make_app
from agents.web_hub import Hub
from mesh.events import (
    AlertRaised,
    DeadLetter,
    GpuControl,
    GpuState,
    TaskSpec,
    TaskSucceeded,
    decode,
    encode,
)
from mesh.host.config import load_settings
from mesh.records import AgentRecord, TaskRecord, encode_record
from tests.conftest import ROOT, Mesh
from tests.faults import until
from tests.webconsole import GPU, Listener, get, post, simulate_gpu, start_console

pytestmark = pytest.mark.integration

PLAN = """\
# web diamond

## Variables

- WORD: hello

## Tasks

### seed

```shell
echo seed says {WORD}
```

### left
- depends_on: seed

```shell
echo left
```

### right
- depends_on: seed

```shell
echo right
```

### secret
- depends_on: left, right
- sensitive: true

```shell
echo the-secret-$((6*7))
```
"""

SLOW = """\
# web slow

## Tasks

### nap
- retries: 0

```shell
sleep 60
```
"""

BAD = """\
# broken

## Tasks

### a
- depends_on: nowhere

```shell
echo a
```
"""


def _plan_done(plan_id: str, status: str) -> Any:
    def want(u: dict[str, Any]) -> bool:
        row = u["changes"].get(plan_id) if u["topic"] == "plans" else None
        return bool(row) and row["status"] == status

    return want


async def test_every_page_reads_real_state_and_the_actions_reach_the_agents(mesh: Mesh) -> None:
    sim = mesh.tmp / "gpus.json"
    simulate_gpu(sim)
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.3"})
    mesh.brain()
    mesh.worker("w1", 2)
    mesh.start_agent("watchdog", "watchdog")
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    url = await start_console(mesh)
    async with aiohttp.ClientSession(url) as http:
        # the page and its assets, served by mesh itself
        async with http.get("/") as r:
            page = await r.text()
            assert r.status == 200 and "/static/app.js" in page and 'data-hook="operator-chat"' in page
            assert "http://" not in page.replace("http://www.w3.org", "")  # nothing from elsewhere
        for name in ("app.js", "app.css", "dag.js", "charts.js"):
            async with http.get(f"/static/{name}") as r:
                assert r.status == 200 and len(await r.read()) > 500
        async with http.get("/static/..%2Fweb.py") as r:
            assert r.status == 404
        assert (await get(http, "/api/me"))["role"] == "operator"
        # with no token, a page whose name resolves here (DNS rebinding) gets nothing
        async with http.get("/api/plans", headers={"Host": f"evil.example:{url.split(':')[-1][:-1]}"}) as r:
            assert r.status == 421

        # a plan with a mistake: its problem and line, and nothing submitted
        status, bad = await post(http, "/api/validate", {"text": BAD})
        assert status == 422 and not bad["ok"]
        assert any(p["line"] == 6 and "nowhere" in p["message"] for p in bad["problems"]), bad
        status, bad = await post(http, "/api/submit", {"text": BAD})
        assert status == 422
        status, ok = await post(http, "/api/validate", {"text": PLAN, "variables": {"WORD": "world"}})
        assert status == 200 and ok["ok"] and ok["tasks"] == 4 and ok["variables"]["WORD"] == "world"

        # submitted through the console; its end arrives as a server-sent event
        async with Listener(http, "/api/events?topics=plans") as live:
            status, sent = await post(http, "/api/submit", {"text": PLAN, "variables": {"WORD": "world"}})
            assert status == 200 and sent["ok"], sent
            plan_id = sent["plan"]
            await live.wait(_plan_done(plan_id, "succeeded"), "the plan's success")
        listed = await get(http, "/api/plans?status=succeeded")
        assert [p["id"] for p in listed["plans"]] == [plan_id] and listed["plans"][0]["done"] == 4
        assert (await get(http, "/api/plans?status=running"))["total"] == 0
        assert (await get(http, "/api/plans?q=diamond"))["total"] == 1
        assert (await get(http, "/api/plans?q=nothing-like-it"))["total"] == 0

        one = await get(http, f"/api/plans/{plan_id}")
        assert one["plan"]["status"] == "succeeded" and one["layers"] == 3 and one["tasks"] == 4
        tasks = await get(http, f"/api/plans/{plan_id}/tasks?limit=2&offset=2")
        assert tasks["total"] == 4 and [t["id"] for t in tasks["tasks"]] == ["right", "secret"]
        assert {t["status"] for t in tasks["tasks"]} == {"succeeded"}
        dag = await get(http, f"/api/plans/{plan_id}/dag")
        where = {n["id"]: (n["layer"], n["i"]) for n in dag["nodes"]}
        assert {k: v[0] for k, v in where.items()} == {"seed": 0, "left": 1, "right": 1, "secret": 2}
        assert sorted(dag["edges"]) == sorted(
            [
                [where["seed"][1], where["left"][1]],
                [where["seed"][1], where["right"][1]],
                [where["left"][1], where["secret"][1]],
                [where["right"][1], where["secret"][1]],
            ]
        )
        small = await get(http, f"/api/plans/{plan_id}/dag?rows=1&row0=1")
        assert {n["id"] for n in small["nodes"]} == {"left", "right"} and small["outside"] == 2

        detail = await get(http, f"/api/plans/{plan_id}/tasks/seed")
        assert detail["record"]["status"] == "succeeded" and detail["record"]["worker"]
        assert detail["outcomes"][0]["ok"] and detail["outcomes"][0]["worker"] == detail["record"]["worker"]
        kinds = [e["event"]["type"] for e in detail["events"]]
        assert "task.succeeded" in kinds and "run.finished" in kinds, kinds
        out = await get(http, f"/api/plans/{plan_id}/tasks/seed/output")
        assert out["text"] == "seed says world\n" and not out["withheld"]
        # a sensitive task's output is withheld, as `mesh output` withholds it, until asked for
        secret = await get(http, f"/api/plans/{plan_id}/tasks/secret/output")
        assert secret["withheld"] and secret["text"] == ""
        secret_detail = await get(http, f"/api/plans/{plan_id}/tasks/secret")
        assert "the-secret-42" not in str(secret_detail)
        shown = await get(http, f"/api/plans/{plan_id}/tasks/secret/output?sensitive=1")
        assert shown["text"] == "the-secret-42\n"
        async with http.get(f"/api/plans/{plan_id}/tasks/nosuch") as r:
            assert r.status == 404
        async with http.get("/api/plans/no-such-plan") as r:
            assert r.status == 404

        # a running plan cancelled, then retried, from the console
        async with Listener(http, "/api/events?topics=plans") as live:
            status, sent = await post(http, "/api/submit", {"text": SLOW})
            slow = sent["plan"]
            await mesh.wait_task(slow, "nap", "running")
            status, _ = await post(http, f"/api/plans/{slow}/cancel")
            assert status == 200
            await live.wait(_plan_done(slow, "cancelled"), "the cancel")
            status, _ = await post(http, f"/api/plans/{slow}/retry", {"tasks": ["nap"]})
            assert status == 200
            await mesh.wait_task(slow, "nap", "running")
            await post(http, f"/api/plans/{slow}/cancel")
            await live.wait(_plan_done(slow, "cancelled"), "the second cancel")
        status, _ = await post(http, f"/api/plans/{slow}/retry", {"tasks": ["nosuch"]})
        assert status == 404

        # the GPU and the host, from the watchdog's telemetry and the worker's state
        async def gpu_seen() -> Any:
            data = await get(http, "/api/gpus")
            rows = [g for g in data["gpus"] if g["gpu"] == GPU and g["state"] and g["sample"]]
            return (rows, data["hosts"]) if rows and data["hosts"] and rows[0]["chart"] else None

        rows, hosts = await until(gpu_seen, 60, "the GPU and host on /api/gpus")
        assert rows[0]["sample"]["temp_c"] == 55 and rows[0]["sample"]["name"] == "Simulated 8GB"
        assert rows[0]["state"]["state"] in ("idle", "busy") and hosts[0]["ram_total_mb"] > 0
        async with Listener(http, "/api/events?topics=gpus,telemetry") as live:
            simulate_gpu(sim, 61)
            await live.wait(
                lambda u: (
                    u["topic"] == "telemetry" and any(p.get("temp") == 61 for p in u["changes"].values())
                ),
                "the new temperature",
            )
            status, done = await post(http, f"/api/gpus/{GPU}/control", {"action": "pause", "reason": "web"})
            assert status == 200 and done["control"]["paused"]
            await live.wait(lambda u: u["topic"] == "gpus" and GPU in u["changes"], "the GPU's pause")
        bus = await mesh.bus()
        entry = await (await bus.gpu_control_kv()).get(bus.names.gpu_control_key(GPU, "operator"))
        control = decode(entry.value or b"")
        assert isinstance(control, GpuControl) and control.paused and control.reason == "web"
        status, _ = await post(http, f"/api/gpus/{GPU}/control", {"action": "explode"})
        assert status == 400

        # alerts and dead letters published on NATS reach the page's event stream
        async with Listener(http, "/api/events?topics=alerts,dead") as live:
            await bus.emit(
                AlertRaised(
                    rule="gpu_hot", target=GPU, host="h", severity="warning", at=time.time(), value=91
                )
            )
            await live.wait(lambda u: u["topic"] == "alerts", "the alert")
            await bus.emit(
                DeadLetter(agent_id="auditor-x", subject="mesh.evt.x", reason="testing", at=time.time())
            )
            await live.wait(lambda u: u["topic"] == "dead", "the dead letter")
        alerts = (await get(http, "/api/alerts"))["alerts"]
        assert alerts[0]["rule"] == "gpu_hot" and alerts[0]["firing"]
        dead = await get(http, "/api/dead")
        assert dead["total"] >= 1 and any(d["reason"] == "testing" for d in dead["dead"])
        assert (await get(http, "/api/costs"))["rows"] == []
        assert (await get(http, "/api/costs?by=plan"))["by"] == "plan"
        roles = {a["role"] for a in (await get(http, "/api/agents"))["agents"]}
        assert {"brain", "worker", "watchdog", "web"} <= roles
    assert mesh.alive("web"), mesh.log("web")
    assert "Traceback" not in mesh.log("web"), mesh.log("web")


def _paths() -> list[tuple[str, str]]:
    """(method, path) of every route the console's app has, a concrete path for each."""
    settings = load_settings(environ={})
    app = make_app(Hub(SimpleNamespace(names=settings.names)), settings)  # type: ignore[arg-type]
    out = []
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or re.sub(r"\{[^}]+\}", "x", info.get("formatter", ""))
        for route in resource:
            if route.method != "HEAD":
                out.append((route.method, path))
    return out


async def test_with_tokens_every_route_refuses_a_request_without_one(mesh: Mesh) -> None:
    operator, viewer = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    mesh.brain()
    url = await start_console(mesh, env={"MESH_WEB_TOKEN": operator, "MESH_WEB_READ_TOKEN": viewer})
    routes = _paths()
    assert len(routes) >= 20 and ("GET", "/api/events") in routes and ("POST", "/api/submit") in routes
    # (a cookie jar that keeps a cookie from an IP address: the console's on 127.0.0.1)
    async with aiohttp.ClientSession(url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for method, path in routes:
            if path in OPEN_PATHS:
                continue
            for token in ("", "wrong-" + operator):
                headers = {"X-Mesh-Action": "1", **({"Authorization": f"Bearer {token}"} if token else {})}
                async with http.request(method, path, headers=headers, allow_redirects=False) as r:
                    if r.status == 302:
                        assert (
                            method == "GET"
                            and not path.startswith("/api/")
                            and r.headers["Location"] == "/login"
                        )
                    else:
                        assert r.status == 401, f"{method} {path} without a valid token: {r.status}"
        as_viewer = {"Authorization": f"Bearer {viewer}"}
        as_operator = {"Authorization": f"Bearer {operator}"}
        assert (await get(http, "/api/me", headers=as_viewer))["role"] == "viewer"
        assert (await get(http, "/api/plans", headers=as_viewer))["total"] == 0
        # a viewer acts on nothing; an operator acts only with the header, from this origin
        for method, path in routes:
            if method == "POST" and path not in OPEN_PATHS and path != "/logout":
                status, _ = await post(http, path, {}, headers=as_viewer)
                assert status == 403, f"{path} as a viewer: {status}"
        async with http.post("/api/submit", json={"text": PLAN}, headers=as_operator) as r:
            assert r.status == 403, "an action without its header"
        status, _ = await post(
            http, "/api/submit", {"text": PLAN}, headers={**as_operator, "Origin": "http://evil.example"}
        )
        assert status == 403
        status, sent = await post(http, "/api/submit", {"text": PLAN}, headers=as_operator)
        assert status == 200 and sent["ok"]
        # nor may a viewer ask for a sensitive task's output, which an operator may
        output = f"/api/plans/{sent['plan']}/tasks/secret/output?sensitive=1"

        async def accepted() -> bool:
            async with http.get(f"/api/plans/{sent['plan']}", headers=as_viewer) as r:
                return r.status == 200

        await until(accepted, 60, "the plan accepted")
        async with http.get(output, headers=as_viewer) as r:
            assert r.status == 403 and "operator" in (await r.json())["error"]
        async with http.get(output, headers=as_operator) as r:
            assert r.status == 404, "not run yet: no worker"
        # the login form: a bad token is refused, a good one sets an HttpOnly cookie that works
        async with http.post("/login", data={"token": "nope"}, allow_redirects=False) as r:
            assert r.status == 401
        # (the one open route reads no more than a token's worth)
        async with http.post("/login", data={"token": "x" * 10_000}, allow_redirects=False) as r:
            assert r.status == 413
        async with http.post(
            "/login", data={"token": viewer}, headers={"X-Forwarded-Proto": "https"}, allow_redirects=False
        ) as r:
            assert r.status == 302 and "Secure" in r.headers["Set-Cookie"], "behind a TLS proxy"
        async with http.post("/login", data={"token": viewer}, allow_redirects=False) as r:
            assert r.status == 302
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        assert (await get(http, "/api/me"))["role"] == "viewer"
        status, _ = await post(http, "/logout")
        assert status == 200
        async with http.get("/api/me") as r:
            assert r.status == 401, "signed out"
        async with http.post(
            "/login", data={"token": viewer}, headers={"Origin": "http://evil.example"}, allow_redirects=False
        ) as r:
            assert r.status == 403


async def test_hostile_requests_are_refused_with_clear_json_and_every_answer_is_locked_down(
    mesh: Mesh,
) -> None:
    mesh.brain()
    url = await start_console(mesh, env={"MESH_PLAN_MAX_BYTES": "100000"})
    async with aiohttp.ClientSession(url) as http:
        # what every answer tells the browser: run our scripts only, frame nothing, sniff nothing
        async with http.get("/") as r:
            csp = r.headers["Content-Security-Policy"]
            directives = dict(d.strip().partition(" ")[::2] for d in csp.split(";"))
            assert directives["default-src"] == "'self'" and "script-src" not in directives, csp
            assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'", csp
            assert directives["object-src"] == "'none'" and directives["form-action"] == "'self'", csp
            assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "same-origin" and r.headers["Cache-Control"] == "no-store"

        async def refused(method: str, path: str, status: int, says: str = "", **kw: Any) -> None:
            headers = {"X-Mesh-Action": "1"} if method == "POST" else {}
            async with http.request(method, path, headers=headers, **kw) as r:
                assert r.status == status, f"{method} {path}: {r.status} {await r.text()}"
                assert r.content_type == "application/json", f"{method} {path}: {await r.text()}"
                error = (await r.json())["error"]
                assert says in error and "Traceback" not in error, error

        # ids are subject tokens; paging numbers are numbers; bodies are bounded JSON objects
        await refused("GET", "/api/plans/a.b", 400, "may hold only")
        await refused("GET", "/api/plans/a*/tasks", 400, "may hold only")
        await refused("GET", "/api/plans/%3Cimg%3E/dag", 400, "may hold only")
        await refused("POST", "/api/gpus/x.y/control", 400, "may hold only", json={"action": "pause"})
        await refused("GET", "/api/plans?offset=many", 400, "whole number")
        await refused("GET", "/api/plans/nope", 404, "no plan")
        await refused("GET", "/api/nothing-here", 404)
        await refused("POST", "/api/validate", 400, "JSON object", data=b"[" * 50_000)
        await refused("POST", "/api/validate", 400, "JSON object", json=["a list"])
        await refused("POST", "/api/submit", 413, "", data=b"{" + b" " * 200_000 + b"}")
        await refused("POST", "/api/plans/nope/retry", 404, "no plan", json={"tasks": "a"})
        await refused("GET", "/api/costs?by=anything", 400, "day or plan")
        assert len((await get(http, "/api/plans?limit=1000000000"))["plans"]) == 0

        # the buckets are believed only where a record names its own key: a GPU's state under
        # another GPU's key, or an agent's record under another's, is not shown
        bus = await mesh.bus()
        now = time.time()
        wrong = GpuState(gpu="h-gpu7", worker="w", host="h", state="idle", at=now)
        await (await bus.gpus_kv()).put("h-gpu8", encode(wrong))
        await (await bus.gpus_kv()).put("h-gpu7", encode(wrong))
        agent = AgentRecord(agent_id="liar", role="worker", host="h", pid=1, started_at=now, seen_at=now)
        await (await bus.agents_kv()).put("brain-x", encode_record(agent))
        await (await bus.agents_kv()).put("liar", encode_record(agent))

        async def shown() -> Any:
            gpus = {g["gpu"] for g in (await get(http, "/api/gpus"))["gpus"]}
            agents = {a["agent_id"] for a in (await get(http, "/api/agents"))["agents"]}
            return (gpus, agents) if "h-gpu7" in gpus and "liar" in agents else None

        gpus, agents = await until(shown, 30, "the records under their own keys")
        assert "h-gpu8" not in gpus and "brain-x" not in agents, (gpus, agents)
    assert "Traceback" not in mesh.log("web"), mesh.log("web")


def test_off_loopback_without_a_token_it_refuses_to_start(mesh: Mesh) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "agent", "web", "--host", "0.0.0.0", "--port", "0"],
        env=mesh.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "web_token" in done.stderr, done.stderr


async def test_the_event_stream_is_asked_for_sensible_topics(mesh: Mesh) -> None:
    mesh.brain()
    url = await start_console(mesh)
    async with aiohttp.ClientSession(url) as http:
        for query in ("", "?topics=", "?topics=" + ",".join(f"t{i}" for i in range(20))):
            async with http.get(f"/api/events{query}") as r:
                assert r.status == 400
    await asyncio.sleep(0)


def _grid_plan(layers: int, columns: int) -> str:
    lines = ["# web grid", "", "## Tasks", ""]
    for layer in range(layers):
        for col in range(columns):
            lines += [f"### t{layer}_{col}", "- retries: 0"]
            if layer:
                lines.append(f"- depends_on: t{layer - 1}_{col}")
            lines += ["```noop", "```", ""]
    return "\n".join(lines)


@pytest.mark.slow
async def test_a_big_plan_is_paged_windowed_and_kept_current_from_its_events(mesh: Mesh) -> None:
    layers, columns = 50, 100
    mesh.brain()
    url = await start_console(mesh)
    plan_id = await mesh.submit_text(_grid_plan(layers, columns))
    async with aiohttp.ClientSession(url) as http:

        async def accepted() -> Any:
            async with http.get(f"/api/plans/{plan_id}") as r:
                return await r.json() if r.status == 200 else None

        one = await until(accepted, 120, "the plan accepted")
        assert one["tasks"] == layers * columns and one["layers"] == layers and one["width"] == columns
        # the console's view of the tasks is read now, with none run yet
        page = await get(http, f"/api/plans/{plan_id}/tasks?offset=250&limit=100")
        assert page["total"] == layers * columns and len(page["tasks"]) == 100
        assert page["tasks"][0]["id"] == "t2_50" and {t["status"] for t in page["tasks"]} <= {
            "pending",
            "waiting",
        }
        dag = await get(http, f"/api/plans/{plan_id}/dag?row0=10&rows=16&col0=20&cols=10")
        assert len(dag["nodes"]) == 160 and len(dag["edges"]) == 150 and dag["outside"] == 10
        assert {(n["layer"], n["pos"]) for n in dag["nodes"]} == {
            (r, c) for r in range(10, 26) for c in range(20, 30)
        }
        async with Listener(http, f"/api/events?topics=plan:{plan_id}") as live:
            mesh.worker("w1", 8)
            await live.wait(lambda u: "succeeded" in u["changes"].values(), "a task's success")
            done = await mesh.wait_plan(plan_id)
            assert done.status == "succeeded"
        # every task's success reached the view through the events: no task record was read again
        finished = await get(http, f"/api/plans/{plan_id}/tasks?status=succeeded&limit=1")
        assert finished["total"] == layers * columns
    assert "Traceback" not in mesh.log("web"), mesh.log("web")


async def test_a_plan_view_read_after_an_event_shows_what_the_event_said(mesh: Mesh) -> None:
    """The brain publishes a task's event, then writes its record: a view read from the tasks
    bucket between the two (a page opened just then) must still show what the event said."""
    bus = await mesh.bus()
    hub = Hub(bus)
    await hub.start()
    try:
        plan_id = "p-lag"
        for task_id, status in (("a", "running"), ("b", "running")):
            record = TaskRecord(
                plan_id=plan_id, task_id=task_id, spec=TaskSpec(id=task_id, body="true"), status=status
            )
            await (await bus.tasks_kv()).put(f"{plan_id}.{task_id}", encode_record(record))
        seen = hub.seen
        await bus.emit(TaskSucceeded(plan_id=plan_id, task_id="a", attempt=1, worker="w1", at=time.time()))
        await until(lambda: hub.seen > seen, 120, "the hub taking the event")
        # the record still says running; no view of the plan existed when the event came
        view = await hub.view(plan_id)
        assert view.row(view.where["a"])["status"] == "succeeded"
        assert view.row(view.where["a"])["worker"] == "w1"
        assert view.row(view.where["b"])["status"] == "running"
    finally:
        await hub.stop()


async def test_live_pages_beyond_the_bound_are_refused_until_one_closes(mesh: Mesh) -> None:
    """Each open event stream holds a queue and a share of every flush: past `web_max_streams`
    the console refuses one more with 503 and a clear reason, and takes it once one closes."""
    url = await start_console(mesh, env={"MESH_WEB_MAX_STREAMS": "2"})
    async with aiohttp.ClientSession(url) as http:
        async with (
            Listener(http, "/api/events?topics=plans"),
            Listener(http, "/api/events?topics=gpus"),
            http.get("/api/events?topics=plans") as refused,
        ):
            assert refused.status == 503
            assert "web_max_streams" in (await refused.json())["error"]
            assert refused.headers["Retry-After"] == "30"

        async def taken() -> bool:
            async with http.get("/api/events?topics=plans") as r:
                return r.status == 200

        # (the closed streams' sockets are found closed when the next one asks)
        assert await until(taken, 120, "a stream taken once the others closed")
