"""`mesh report` and the `submit --wait` summary on a real mesh: a chain, a task retried once, a
task that fails for good and its dependent; the report's figures checked against the history
and the records of what happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh import events
from tests.conftest import Mesh

pytestmark = pytest.mark.integration

PLAN = """# report demo

## Tasks

### a
- timeout: 60s

```shell
sleep 1; echo a
```

### b
- depends_on: a
- timeout: 60s

```shell
sleep 1; echo b
```

### c
- depends_on: b
- timeout: 60s

```shell
sleep 1; echo c
```

### flaky
- retries: 2
- timeout: 60s

```shell
if [ ! -e flaky.marker ]; then
  touch flaky.marker
  echo "flaky: the first attempt fails" >&2
  exit 1
fi
echo "second attempt"
```

### broken
- retries: 1
- timeout: 60s

```shell
echo "broken: no such input" >&2
exit 3
```

### after-broken
- depends_on: broken
- timeout: 60s

```shell
echo never
```
"""


async def test_the_report_says_what_happened(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1", 4)
    plan_file = tmp_path / "plan.md"
    plan_file.write_text(PLAN)
    waited = mesh.run_cli("submit", "--wait", "--id", "rep1", str(plan_file), timeout=300)
    assert waited.returncode == 1, waited.stderr  # the plan failed, on purpose
    said = waited.stderr
    # the --wait summary, after the outputs
    assert "critical path" in said and "a " in said and "-> b " in said and "-> c " in said, said
    assert "retries: 2 (2 error)" in said, said
    assert "failures (error): 3 failed attempt(s) of broken, flaky, 1 task(s) failed for good" in said, said
    assert "failures (dependency): after-broken, 1 task(s) failed for good" in said, said
    assert "mesh report rep1" in said, said

    r = json.loads(mesh.cli("report", "rep1", "--json"))
    records = await mesh.tasks("rep1")
    history = [msg for _, msg in await mesh.history((await mesh.bus()).names.plan_filter("rep1"))]

    # tasks by outcome: as the records say
    assert r["status"] == "failed" and r["tasks"] == 6
    assert r["outcomes"] == {"failed": 2, "succeeded": 4}
    assert {t for t, rec in records.items() if rec.status == "failed"} == {"broken", "after-broken"}
    # attempts: a, b, c one each, flaky two, broken two; after-broken never ran
    assert r["attempts"] == 7 == sum(rec.attempt for rec in records.values())

    # retries and their reasons: one task.retrying each of flaky and broken
    retrying = [m for m in history if isinstance(m, events.TaskRetrying)]
    assert r["retries"] == len(retrying) == 2 and r["retry_reasons"] == {"error": 2}
    notes = {n["task_id"]: n for n in r["retry_notes"]}
    assert notes["flaky"]["error"] == "flaky: the first attempt fails"
    assert notes["broken"]["error"] == "broken: no such input"

    # the slowest tasks and the critical path: the chain, by the records' own times
    assert [t["task_id"] for t in r["slowest"][:3]] == sorted(
        ("a", "b", "c"), key=lambda t: -records[t].duration_s
    )
    for t in r["slowest"][:3]:
        assert t["run_s"] == pytest.approx(records[t["task_id"]].duration_s, abs=1e-6)
    assert [s["task_id"] for s in r["critical_path"]] == ["a", "b", "c"]
    for step in r["critical_path"]:
        rec = records[step["task_id"]]
        assert step["span_s"] == pytest.approx(rec.finished_at - rec.started_at, abs=1e-3)
        assert step["start_at"] == pytest.approx(rec.started_at, abs=1e-3)
    assert r["critical_path_s"] == pytest.approx(sum(s["span_s"] for s in r["critical_path"]))
    assert 0 < r["critical_path_s"] <= r["wall_s"]

    # failures by cause, with the lines that said it most
    causes = {g["cause"]: g for g in r["failures"]}
    error = causes["error"]
    assert error["tasks"] == ["broken", "flaky"] and error["attempts"] == 3 and error["final"] == 1
    lines = {c["line"]: c["count"] for c in error["lines"]}
    assert lines["broken: no such input"] == 2 and lines["exit code 3"] == 2
    assert lines["flaky: the first attempt fails"] == 1
    assert causes["dependency"]["tasks"] == ["after-broken"] and causes["dependency"]["attempts"] == 0

    # nothing escalated, no model ran on a GPU
    assert r["escalations"] == [] and r["escalation_cost_usd"] == 0 and r["models"] == []

    # and the text report says the same
    text = mesh.cli("report", "rep1")
    assert "plan rep1 (report demo): failed" in text and "4 succeeded, 2 failed; 7 attempts" in text
    assert "failures by cause:" in text and "2x broken: no such input" in text


async def test_report_of_an_unknown_plan_is_a_clear_error(mesh: Mesh) -> None:
    await mesh.bus()  # (the streams exist)
    done = mesh.run_cli("report", "nope")
    assert done.returncode == 2 and "no plan 'nope'" in done.stderr, done.stderr
