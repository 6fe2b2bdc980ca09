"""The web console in a real browser: headless Chromium (Debian's `chromium`, driven by playwright,
never a downloaded browser) against a live mesh. It opens the console, submits a plan through the
page (after the page shows a broken one's problem and line), watches the DAG turn green, opens a
task's output, cancels a running plan, and pauses a simulated GPU.

With `MESH_SCREENSHOTS=DIR` it saves the main pages there (docs/img/ holds the ones the docs show).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.events import AlertRaised, DeadLetter
from mesh.host.telemetry import write_simulated
from tests.conftest import Mesh
from tests.webconsole import GPU, simulate_gpu, start_console

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WAIT_MS = 120_000

PLAN = """\
# browser diamond

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

### join
- depends_on: left, right

```shell
echo joined
```
"""

SLOW = """\
# browser slow

## Tasks

### nap
- retries: 0

```shell
sleep 120
```
"""

BAD = "# broken\n\n## Tasks\n\n### a\n- depends_on: nowhere\n\n```shell\necho a\n```\n"


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    playwright = pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: `make browser` installs Debian's")
    async with playwright.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


def shots(tmp: Path) -> Path:
    where = Path(os.environ.get("MESH_SCREENSHOTS") or tmp / "shots")
    where.mkdir(parents=True, exist_ok=True)
    return where


async def test_the_console_in_a_browser(mesh: Mesh, browser: object) -> None:
    playwright = pytest.importorskip("playwright.async_api")
    sim = mesh.tmp / "gpus.json"
    simulate_gpu(sim)
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.5"})
    mesh.brain()
    mesh.worker("w1", 2)
    mesh.start_agent("watchdog", "watchdog")
    mesh.worker("gpu", 1, "--gpu", "0", "--classes", "script")
    url = await start_console(mesh)
    out = shots(mesh.tmp)
    context = await browser.new_context(viewport={"width": 1280, "height": 860})  # type: ignore[attr-defined]
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept("from the browser test"))

    await page.goto(url)
    await page.wait_for_selector("#live.on")
    await page.wait_for_selector("text=no plans")

    # a broken plan: its problem, with its line, before anything is submitted
    await page.click("nav >> text=Submit")
    await page.fill("#plan-text", BAD)
    await page.wait_for_selector(".problems >> text=line 6")
    assert "nowhere" in await page.inner_text("#verdict")
    # the plan, with a variable set on the page
    await page.fill("#plan-text", PLAN)
    await page.wait_for_selector("#verdict >> text=4 tasks")
    await page.fill(".var-value", "browser")
    await page.screenshot(path=str(out / "console-submit.png"))
    await page.click("#submit")

    # its page: the DAG turns green as the tasks succeed
    await page.wait_for_selector("svg.dag g.node")
    # (a locator, not a script: the console's Content-Security-Policy forbids evaluating strings)
    await playwright.expect(page.locator("svg.dag g.n-succeeded")).to_have_count(4, timeout=WAIT_MS)
    await page.wait_for_selector("#plan-state >> text=succeeded")
    await page.screenshot(path=str(out / "console-plan.png"), full_page=True)

    # a task's output
    await page.click("svg.dag g[data-task='seed']")
    await page.click("#show-output")
    await page.wait_for_selector("#output-text")
    assert (await page.inner_text("#output-text")).strip() == "seed says browser"
    await page.screenshot(path=str(out / "console-task.png"), full_page=True)

    # a running plan, cancelled from its page
    await page.click("nav >> text=Submit")
    await page.fill("#plan-text", SLOW)
    await page.wait_for_selector("#verdict >> text=1 task")
    await page.click("#submit")
    await page.wait_for_selector("svg.dag g.n-running")
    await page.click("#cancel")
    await page.wait_for_selector("#plan-state >> text=cancelled")
    await page.wait_for_selector("svg.dag g.n-cancelled")

    # the plans list, live
    await page.click("nav >> text=Plans")
    await page.wait_for_selector("tr[data-plan] >> text=cancelled")
    await page.screenshot(path=str(out / "console-plans.png"))

    # the simulated GPU, paused from its card
    await page.click("nav >> text=GPUs")
    card = f"[data-gpu='{GPU}']"
    await page.wait_for_selector(f"{card} >> text=Simulated 8GB")
    await page.wait_for_selector("[data-host] svg.chart polyline")
    await page.click(f"{card} button[data-action='pause']")
    await page.wait_for_selector(f"{card} .st-paused")
    assert "from the browser test" in await page.inner_text(card)
    await page.screenshot(path=str(out / "console-gpus.png"), full_page=True)

    # the agents page, and the plans on a phone-sized screen
    await page.click("nav >> text=Agents")
    await page.wait_for_selector("text=watchdog")
    phone = await context.new_page()
    await phone.set_viewport_size({"width": 390, "height": 844})
    await phone.goto(url)
    await phone.wait_for_selector("tr[data-plan]")
    assert await phone.is_visible("#menu") and not await phone.is_visible("nav")
    await phone.screenshot(path=str(out / "console-phone.png"))
    assert not errors, errors
    assert "Traceback" not in mesh.log("web"), mesh.log("web")


# markup that runs a script if it ever reaches the page as HTML (each sets its own mark)
XSS = '<img src=x onerror="window.__pwned=1"></script><script>window.__pwned=2</script>'

HOSTILE = f"""\
# {XSS}

## Tasks

### xss_out

```shell
printf '%s\\n' '{XSS}'
```

### xss_err
- retries: 0

```shell
printf '%s\\n' '{XSS}' >&2; exit 3
```
"""


async def test_text_from_the_mesh_reaches_the_page_as_text_never_as_markup(
    mesh: Mesh, browser: object
) -> None:
    """A plan's title, a task's output, its stderr and error, an alert, a dead letter and a GPU's
    name carrying markup are shown literally, and no script of theirs runs. The page is opened
    with its Content-Security-Policy bypassed, so it is the page's own handling of text that is
    tested, not the policy that would otherwise stop an injected script."""
    sim = mesh.tmp / "gpus.json"
    write_simulated(sim, [{"name": XSS, "temp_c": 50, "util_pct": 1, "mem_used_mb": 1, "mem_total_mb": 8}])
    mesh.env.update({"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.5"})
    mesh.brain()
    mesh.worker("w1", 2)
    mesh.start_agent("watchdog", "watchdog")
    url = await start_console(mesh)
    bus = await mesh.bus()
    await bus.emit(
        AlertRaised(rule="gpu_hot", target="g", host="h", severity="warning", at=time.time(), message=XSS)
    )
    await bus.emit(DeadLetter(agent_id="auditor-x", subject="mesh.evt.x", reason=XSS, at=time.time()))
    context = await browser.new_context(bypass_csp=True)  # type: ignore[attr-defined]
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())
    injected = page.locator("img, main script, #chat script")

    await page.goto(url + "#/submit")
    await page.fill("#plan-text", HOSTILE)
    await page.wait_for_selector("#verdict >> text=2 tasks")
    assert XSS in await page.inner_text("#verdict")
    await page.click("#submit")
    await page.wait_for_selector("#plan-state >> text=failed")
    plan_id = page.url.rsplit("/", 1)[-1]
    assert XSS in await page.inner_text("main h1")

    await page.click("svg.dag g[data-task='xss_out']")
    await page.click("#show-output")
    await page.wait_for_selector("#output-text")
    assert (await page.inner_text("#output-text")).strip() == XSS

    await page.goto(f"{url}#/plan/{plan_id}/task/xss_err")
    await page.wait_for_selector("#events")
    assert XSS in await page.inner_text("main")  # its stderr, as the attempt's log

    for where, selector in (
        ("plans", "tr[data-plan]"),
        ("alerts", "td >> text=gpu_hot"),
        ("dead", "td >> text=auditor-x"),
    ):
        await page.goto(f"{url}#/{where}")
        await page.wait_for_selector(selector)
        assert XSS in await page.inner_text("main"), where
    await page.goto(f"{url}#/gpus")
    await page.wait_for_selector("[data-gpu] h3")
    await page.wait_for_function("() => document.querySelector('#gpus').innerText.includes('onerror')")
    assert XSS in await page.inner_text("#gpus")

    assert await injected.count() == 0, await page.content()
    assert await page.evaluate("() => window.__pwned") is None
    assert not errors, errors


GATED = """\
# browser gated

## Variables

- GATE: nowhere

## Tasks

### gated
- retries: 0

```shell
while [ ! -e {GATE} ]; do sleep 0.1; done
```
"""


async def test_what_changed_before_the_page_was_listening_is_shown_when_it_listens(
    mesh: Mesh, browser: object
) -> None:
    """A page draws a plan, then opens its event stream: a task that ends between the two sends
    its update to no one. The page reads the plan again once its stream is open (and each time
    the stream opens again), so it never shows a state that has passed."""
    playwright = pytest.importorskip("playwright.async_api")
    mesh.brain()
    mesh.worker("w1", 1)
    url = await start_console(mesh)
    gate = mesh.tmp / "gate"
    plan_id = await mesh.submit_text(GATED, GATE=str(gate))
    await mesh.wait_task(plan_id, "gated", "running")
    context = await browser.new_context()  # type: ignore[attr-defined]
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    # the page's event stream is held back until the task has ended
    ended = asyncio.Event()
    held: list[str] = []

    async def hold(route: Any) -> None:
        held.append(route.request.url)
        await ended.wait()
        await route.continue_()

    await page.route(lambda u: "/api/events?" in u, hold)
    await page.goto(f"{url}#/plan/{plan_id}")
    await page.wait_for_selector("svg.dag g.n-running")
    assert held, "the page's event stream was not held back"
    gate.touch()
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    ended.set()
    await page.wait_for_selector("#live.on")
    await playwright.expect(page.locator("svg.dag g.n-succeeded")).to_have_count(1, timeout=WAIT_MS)
    await page.wait_for_selector("#plan-state >> text=succeeded")
