"""Chat and JSON-schema tasks end to end: a real nats-server, brain and model worker running the
shipped Gemma 3 270M on the CPU (a CPU worker with `--gpu none --classes script,llm` stands in
for a GPU), the example plans as submitted from their files, and `mesh export` reading back what
they did.

What only the whole mesh shows: a schema file read at submit travels in the plan; a dependent
gets the JSON its dependency answered; an answer that does not parse is retried like a failed
command, and a chat on a model with no template is failed at once, unretried; exported chat
records carry the turns as written, not one user message.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from mesh.bus.outputs import task_output
from mesh.events import RunFinished
from mesh.host.planfiles import load_plan
from mesh.models import builtin_models
from mesh.status import FailReason
from tests.conftest import Mesh
from tests.test_model_workers import PLAN_TIMEOUT_S, finished, start

pytestmark = [pytest.mark.integration, pytest.mark.models]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "plans" / "examples"
ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}

FAILING = f"""# Answers that cannot be had

## Tasks

### cut
- schema: {json.dumps(ANSWER)}
- max_tokens: 4
- retries: 1
- timeout: 5m

```chat
user: What is the capital of France? Answer in JSON.
```

### plain
- model: plain
- retries: 3
- timeout: 5m

```chat
user: What is the capital of France?
```
"""


async def test_chat_and_schema_examples_run_and_export_their_turns(mesh: Mesh, tmp_path: Path) -> None:
    # a second registry entry for the same GGUF, with no chat_format: it has no chat template
    config = tmp_path / "mesh.toml"
    source = builtin_models()["gemma3-270m"].source
    config.write_text(f'[models.plain]\nkind = "llm"\nsource = "{source}"\nvram_mb = 600\n')
    mesh.env["MESH_CONFIG"] = str(config)
    await start(mesh)
    mesh.worker("cpu", 1)  # the example's shell task

    chat_id = await mesh.submit(load_plan(EXAMPLES / "chat.md", {"OUT": str(tmp_path / "chat")}))
    schema_id = await mesh.submit(load_plan(EXAMPLES / "schema.md"))
    for plan_id in (chat_id, schema_id):
        plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
        tasks = await mesh.tasks(plan_id)
        assert plan.status == "succeeded", {t.task_id: (t.status, t.error[-300:]) for t in tasks.values()}

    # chat: a real answer; the input in the last user turn, as data
    ask, about = await finished(mesh, chat_id, "ask"), await finished(mesh, chat_id, "about")
    assert any(c.isalpha() for c in ask.output) and not ask.parsed
    turns = json.loads(about.prompt)
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert '<data from="write">\nThe night train left Lisbon' in turns[-1]["content"]

    # schema: the file's schema, held to and checked; the dependent reads the JSON
    schema = json.loads((EXAMPLES / "answer.schema.json").read_text())
    capital, inline = await finished(mesh, schema_id, "capital"), await finished(mesh, schema_id, "inline")
    assert capital.parsed and inline.parsed
    jsonschema.validate(json.loads(capital.output), schema)
    assert set(json.loads(inline.output)) == {"answer"}
    given = await task_output(await mesh.bus(), schema_id, "capital")
    assert given.parsed and given.text == capital.output
    report = await finished(mesh, schema_id, "report")
    assert f'<data from="capital">\n{capital.output}\n</data>' in report.prompt
    assert not report.parsed

    # an answer that does not parse is a failed attempt, retried; no template fails at once
    failing_id = await mesh.submit_text(FAILING)
    plan = await mesh.wait_plan(failing_id, timeout_s=PLAN_TIMEOUT_S)
    tasks = await mesh.tasks(failing_id)
    assert plan.status == "failed"
    cut, plain = tasks["cut"], tasks["plain"]
    assert (cut.status, cut.attempt, cut.reason) == ("failed", 2, FailReason.ERROR), cut
    assert cut.error.startswith("the answer is not JSON") and "max_tokens 4" in cut.error
    assert (plain.status, plain.attempt, plain.reason) == ("failed", 1, FailReason.DEFINITION), plain
    assert "model 'plain' has no chat template" in plain.error
    last: RunFinished = await finished(mesh, failing_id, "cut")
    assert not last.ok and not last.parsed

    # export: a chat task's record is its turns, then its answer
    out = tmp_path / "export.jsonl"
    mesh.cli("export", "--out", str(out), "--plan", chat_id)
    records = {r["task"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["ask"]["messages"] == [
        {"role": "system", "content": "You answer with the name of one city."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": ask.output},
    ]
    assert records["about"]["messages"][:-1] == turns
    raw = tmp_path / "raw.jsonl"
    mesh.cli("export", "--out", str(raw), "--plan", chat_id, "--format", "raw")
    ask_raw = next(r for r in map(json.loads, raw.read_text().splitlines()) if r["task"] == "ask")
    assert ask_raw["system"] == "You answer with the name of one city."
    assert (
        ask_raw["prompt"]
        == "user: What is the capital of Italy?\n\nassistant: Rome.\n\nuser: What is the capital of France?"
    )
    assert ask_raw["response"] == ask.output
