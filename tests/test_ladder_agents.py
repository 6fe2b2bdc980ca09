"""The escalation ladder on real agents: a real brain, a model worker running the real Gemma 3
270M on the CPU, and a gateway talking to the fake Anthropic API of `tests/fake_anthropic.py`.

The registry holds the shipped GGUF under two names with different context windows: `narrow`
(n_ctx 256) and `wide` (n_ctx 1024). A prompt too long for `narrow` fails there as a definition
error (no retry helps), climbs to `wide` and is answered there; one too long for both climbs to
`wide`, fails again, and goes to Claude, the ladder's last rung.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.bus.outputs import attempt_outcomes, task_output
from mesh.events import EscalationAnswered, RunFinished, TaskClimbed, TaskEscalated
from mesh.models import builtin_models
from tests.conftest import Mesh
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.faults import run_mesh
from tests.test_gateway import start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.models]

PLAN_TIMEOUT_S = 240.0
# about 400 tokens: over narrow's window, within wide's
LONG = "Count from 1 to 500: " + ", ".join(str(n) for n in range(1, 100)) + ","
# about 1400 tokens: over both
LONGER = "Count from 1 to 500: " + ", ".join(str(n) for n in range(1, 300)) + ","

PLAN = f"""\
# Ladder

## Tasks

### ask
- model: narrow
- retries: 1
- escalate: wide, claude
- max_tokens: 4

```prompt
{LONG}
```

### use
- depends_on: ask
- inputs: ask
- model: wide
- max_tokens: 2

```prompt
Repeat:
```

### hard
- model: narrow
- retries: 0
- escalate: wide, claude
- max_tokens: 4

```prompt
{LONGER}
```
"""


async def test_a_prompt_climbs_to_the_wider_model_and_one_too_long_for_both_goes_to_claude(
    mesh: Mesh, tmp_path: Path
) -> None:
    gemma = builtin_models()["gemma3-270m"]
    config = tmp_path / "mesh.toml"
    config.write_text(
        "".join(
            f'[models.{name}]\nkind = "llm"\nsource = "{gemma.source}"\nvram_mb = 600\nn_ctx = {n_ctx}\n'
            "max_tokens = 4\n\n"
            for name, n_ctx in (("narrow", 256), ("wide", 1024))
        )
    )
    mesh.env["MESH_CONFIG"] = str(config)
    with FakeAnthropic() as api:
        api.then(Reply(result="500"))
        start_gateway(mesh, api)
        mesh.brain()
        mesh.worker("gpu", 1, "--gpu", "none", "--classes", "script,llm")
        plan_id = await mesh.submit_text(PLAN)
        plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
        assert plan.status == "succeeded", await mesh.tasks(plan_id)
        history = [m for _, m in await mesh.history((await mesh.bus()).names.plan_filter(plan_id)) if m]

        def of(task_id: str, kind: type) -> list:  # type: ignore[type-arg]
            return [m for m in history if isinstance(m, kind) and getattr(m, "task_id", "") == task_id]

        # ask: a definition error on narrow (no retry helps, its retry is not spent), then wide
        (climb,) = of("ask", TaskClimbed)
        assert (climb.tier, climb.model, climb.from_model, climb.why) == (
            1,
            "wide",
            "narrow",
            "local_failures",
        )
        assert climb.after is not None and climb.after.reason == "definition"
        assert "n_ctx 256" in climb.after.error
        runs = {r.attempt: r for r in of("ask", RunFinished)}
        assert (runs[1].ok, runs[1].model) == (False, "narrow")
        assert (runs[2].ok, runs[2].model) == (True, "wide") and runs[2].output
        assert not of("ask", TaskEscalated)
        # its dependent read the answer of the rung that gave it
        answer = (await task_output(await mesh.bus(), plan_id, "ask")).text
        assert answer == runs[2].output
        (use,) = of("use", RunFinished)
        assert use.ok and f'<data from="ask">\n{answer.strip()}\n</data>' in use.prompt

        # hard: narrow, wide, then Claude; costs only there
        assert [(c.model, c.from_model) for c in of("hard", TaskClimbed)] == [("wide", "narrow")]
        assert [(r.model, r.ok) for r in of("hard", RunFinished)] == [("narrow", False), ("wide", False)]
        (escalated,) = of("hard", TaskEscalated)
        assert escalated.why == "local_failures" and escalated.attempt == 3
        (answered,) = of("hard", EscalationAnswered)
        (seen,) = api.requests()
        assert "n_ctx 1024" in seen.user and "n_ctx 256" in seen.user  # the failures of both rungs
        assert (await task_output(await mesh.bus(), plan_id, "hard")).text == "500"
        # each attempt's outcome, as `mesh output --attempt N` shows it: the two rungs' failures
        # (the report of each), then Claude's answer
        ended = (await attempt_outcomes(await mesh.bus(), plan_id, "hard"))["hard"]
        assert [(o.attempt, o.status, o.ok, o.source) for o in ended] == [
            (1, "climbed", False, "worker"),
            (2, "escalated", False, "worker"),
            (3, "succeeded", True, "claude"),
        ]
        assert [o.report.model for o in ended[:2] if o.report] == ["narrow", "wide"]
        shown = mesh.cli("output", f"{plan_id}.hard", "--attempt", "2")
        assert "n_ctx 1024" in shown, shown
        assert mesh.cli("output", f"{plan_id}.hard") == "500\n"

        tasks = await mesh.tasks(plan_id)
        assert (tasks["ask"].tier, tasks["ask"].answered_by) == (1, "wide")
        assert (tasks["hard"].tier, tasks["hard"].answered_by) == (1, "claude")
        status = mesh.cli("status", plan_id)
        assert "wide (tier 2/3)" in status and "claude (tier 3/3)" in status

        # the export names the model of each attempt; only Claude's answer cost anything
        out = mesh.tmp / "ladder.jsonl"
        result = run_mesh(mesh, "export", "--plan", plan_id, "--out", str(out))
        assert result.returncode == 0, result.stderr
        records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert (records[f"{plan_id}.ask:1"]["model"], records[f"{plan_id}.ask:1"]["will_retry"]) == (
            "narrow",
            True,
        )
        assert records[f"{plan_id}.ask:2"]["model"] == "wide"
        assert records[f"{plan_id}.hard:3"]["model"] == answered.model
        assert [r["escalation"] is not None for r in records.values()].count(True) == 1

        verify = run_mesh(mesh, "replay", "--verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
