"""The console's operator chat and its charts' history: a question asked in the console goes
through the gateway to a fake Messages API that scripts a tool call, the tool reads real mesh
state, the answer streams back, and a follow-up continues the conversation; the charts open with
the history stream's points, and /api/history reads a window of it."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from mesh.bus.telhistory import publish_points
from mesh.host.telemetry import host_token
from mesh.telhistory import HistoryPoint
from tests.conftest import HANG_S, Mesh
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.faults import until
from tests.test_operator import start, tool_results
from tests.test_web_browser import WAIT_MS, browser, shots  # noqa: F401 (browser: a fixture)
from tests.webconsole import ACTION, get, simulate_gpu, start_console

pytestmark = pytest.mark.integration

PLAN = """\
# Chat

## Tasks

### hello

```shell
echo hello
```
"""


async def ask(http: aiohttp.ClientSession, question: str, conversation: str = "") -> list[dict[str, Any]]:
    """The steps the console streams for one question, as a page reads them."""
    steps: list[dict[str, Any]] = []
    async with http.post(
        "/api/ask", json={"question": question, "conversation": conversation}, headers=ACTION
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                steps.append(json.loads(line[len("data: ") :]))
    return steps


async def a_plan_run_and_the_console(mesh: Mesh, api: FakeAnthropic) -> tuple[str, str]:
    """The gateway on `api`, a brain and a worker, PLAN run to success, the console serving:
    (the plan's id, the console's URL)."""
    await start(mesh, api)
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(PLAN)
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    return plan_id, await start_console(mesh)


async def test_a_question_in_the_console_is_answered_from_real_state_and_followed_up(mesh: Mesh) -> None:
    with FakeAnthropic() as api:
        plan_id, url = await a_plan_run_and_the_console(mesh, api)
        async with aiohttp.ClientSession(url) as http:
            api.then(
                Reply(text="Looking.", tool_calls=[("plan_tasks", {"plan_id": plan_id})]),
                Reply(text=f"{plan_id} succeeded."),
            )
            steps = await ask(http, "how did my plan go?")
            assert [s["step"] for s in steps if s["step"] != "text"] == ["tool", "done"], steps
            assert "".join(s["text"] for s in steps if s["step"] == "text") == f"Looking.{plan_id} succeeded."
            done = steps[-1]
            assert done["conversation"] and "messages" not in done
            assert any(plan_id in seen for seen in done["looked_at"])
            # the tool the fake API called read the plan's real record
            (result,) = tool_results(api.requests()[1])
            rows = [json.loads(line) for line in result["content"].splitlines()[2:]]
            assert [(r["task"], r["status"]) for r in rows] == [("hello", "succeeded")]

            # a follow-up in the same conversation carries what was said before
            api.then(Reply(text="Nothing else ran."))
            steps = await ask(http, "anything else?", done["conversation"])
            assert steps[-1]["step"] == "done" and steps[-1]["conversation"] == done["conversation"]
            sent = api.requests()[-1].body["messages"]
            assert sent[0] == {"role": "user", "content": "how did my plan go?"}
            assert sent[-1] == {"role": "user", "content": "anything else?"} and len(sent) == 5

            # a question is an action: refused as a plain request (no action header) and when empty
            async with http.post("/api/ask", json={"question": "hi"}) as r:
                assert r.status == 403
            async with http.post("/api/ask", json={"question": " "}, headers=ACTION) as r:
                assert r.status == 400


async def test_a_question_with_no_gateway_fails_with_why(mesh: Mesh) -> None:
    url = await start_console(mesh)
    async with aiohttp.ClientSession(url) as http:
        steps = await ask(http, "is anyone there?")
    assert steps and steps[-1]["step"] == "failed", steps
    assert "gateway" in steps[-1]["error"]


async def test_charts_open_with_the_history_and_a_window_of_it_reads_back(mesh: Mesh) -> None:
    bus = await mesh.bus()
    fine = mesh.settings.history_fine_s
    host = host_token()
    start_at = (int(time.time()) // fine - 30) * fine
    points = [
        HistoryPoint(
            kind="gpu",
            host=host,
            index=0,
            res_s=fine,
            at=start_at + i * fine,
            samples=3,
            mean={"temp_c": 40.0 + i, "util_pct": 50.0, "power_w": 100.0},
            peak={"temp_c": 41.0 + i},
        )
        for i in range(10)
    ]
    points.append(
        HistoryPoint(
            kind="host",
            host=host,
            res_s=fine,
            at=start_at,
            samples=3,
            mean={"cpu_pct": 12.5, "disk_free_pct": 70.0},
        )
    )
    await publish_points(bus, points)
    sim = mesh.tmp / "gpus.json"
    simulate_gpu(sim)
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.3"})
    mesh.start_agent("watchdog", "watchdog")
    url = await start_console(mesh)
    async with aiohttp.ClientSession(url) as http:

        async def charted() -> dict[str, list[dict[str, Any]]] | None:
            listed = await get(http, "/api/gpus")
            charts = {g["sample"]["key"]: g["chart"] for g in listed["gpus"] if g["sample"]}
            charts.update({h["key"]: h["chart"] for h in listed["hosts"]})
            return charts if {f"{host}.gpu0", f"{host}.host"} <= set(charts) else None

        charts = await until(charted, HANG_S, "the watchdog's GPU and host in the console")
        # the GPU's chart opens with the stored points (made before the console started), then
        # goes on with the live samples (55 degrees)
        gpu = charts[f"{host}.gpu0"]
        assert [p["temp"] for p in gpu[:10]] == [40.0 + i for i in range(10)]
        assert gpu[0]["at"] == start_at + fine / 2 and gpu[-1]["temp"] == 55.0
        assert charts[f"{host}.host"][0]["cpu"] == 12.5
        window = await get(http, "/api/history", params={"key": f"{host}.gpu0", "since": "1h"})
        assert window["res_s"] == fine
        assert [p["temp"] for p in window["points"][:10]] == [40.0 + i for i in range(10)]
        async with http.get("/api/history", params={"key": "nothing"}) as r:
            assert r.status == 400


@pytest.mark.slow
async def test_the_operator_answers_in_the_browsers_chat_panel(mesh: Mesh, browser: object) -> None:  # noqa: F811
    """Headless Chromium: the chat panel shows for an operator, a question typed there is answered
    from the rig's state (a scripted tool call that reads the plan), and the answer says what it
    looked at."""
    with FakeAnthropic() as api:
        plan_id, url = await a_plan_run_and_the_console(mesh, api)
        api.then(
            Reply(text="Checking. ", tool_calls=[("plan_tasks", {"plan_id": plan_id})]),
            Reply(text=f"Your plan {plan_id} succeeded: hello ran once."),
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 860})  # type: ignore[attr-defined]
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url)
        await page.wait_for_selector("#chat:not([hidden])")
        await page.fill("#chat-input", "how did my plan go?")
        await page.press("#chat-input", "Enter")
        await page.wait_for_selector(f"#chat-log >> text=Your plan {plan_id} succeeded")
        log = await page.inner_text("#chat-log")
        assert "how did my plan go?" in log and "looked at:" in log and plan_id in log
        await page.screenshot(path=str(shots(mesh.tmp) / "console-chat.png"))
        assert not errors, errors
        await context.close()
