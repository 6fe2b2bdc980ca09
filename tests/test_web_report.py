"""A plan's report in the web console: once the plan has ended its page shows what `mesh report`
says (outcomes, the critical path, retries, failures by cause), from the same fold of its history."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import Mesh
from tests.test_web_browser import WAIT_MS, browser, shots  # noqa: F401 (browser: a fixture)
from tests.webconsole import get, start_console

pytestmark = pytest.mark.integration

PLAN = """\
# Nightly report

## Tasks

### fetch

```shell
echo fetched
```

### crunch
- depends_on: fetch
- retries: 1

```shell
echo "crunch broke: disk quota" >&2
exit 3
```

### publish
- depends_on: crunch

```shell
echo never
```
"""


async def test_an_ended_plans_report_over_http_and_on_its_page(mesh: Mesh, browser: object) -> None:  # noqa: F811
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(PLAN)
    assert (await mesh.wait_plan(plan_id)).status == "failed"
    url = await start_console(mesh)
    async with aiohttp.ClientSession(url) as http:
        report = (await get(http, f"/api/plans/{plan_id}/report"))["report"]
        assert report["plan_id"] == plan_id and report["tasks"] == 3
        assert report["outcomes"] == {"succeeded": 1, "failed": 2}
        assert report["retries"] == 1 and report["attempts"] == 3
        assert [s["task_id"] for s in report["critical_path"]][:2] == ["fetch", "crunch"]
        (ran,) = [g for g in report["failures"] if "crunch" in g["tasks"] and g["attempts"]]
        assert ran["final"] == 1 and ran["lines"][0]["line"].endswith("crunch broke: disk quota")
        async with http.get("/api/plans/no-such-plan/report") as r:
            assert r.status == 404
    context = await browser.new_context(viewport={"width": 1280, "height": 860})  # type: ignore[attr-defined]
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{url}#/plan/{plan_id}")
    await page.wait_for_selector("#report pre >> text=critical path")
    text = await page.inner_text("#report pre")
    assert "3 task(s): 2 failed, 1 succeeded" in text and "crunch broke: disk quota" in text
    assert "retries: 1" in text
    await page.screenshot(path=str(shots(mesh.tmp) / "console-report.png"), full_page=True)
    assert not errors, errors
    await context.close()
