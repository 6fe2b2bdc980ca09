"""The operator (`mesh ask`): its tools read real mesh state, its turns go through the gateway to a
fake Messages API that scripts tool calls, and what it cannot see it says it cannot see."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mesh.operator import (
    TOOL_NAMES,
    TOOL_RESULT_MAX_CHARS,
    AskTurn,
    bounded,
    conversation_problem,
    decode_ask,
    encode_ask,
    unknown_tool,
)
from mesh.ops.operator import Done, Failed, Text, ToolCall, ask, from_openai, to_openai
from tests.conftest import HANG_S, Mesh
from tests.fake_anthropic import FakeAnthropic, Reply, Seen
from tests.faults import configure, until

SECRET = "sk-ant-api03-" + "Qx9" * 12

PLAN = f"""\
# Nightly

## Tasks

### fetch

```shell
echo fetched
```

### crunch
- depends_on: fetch
- retries: 0

```shell
echo "crunch broke, key {SECRET}" >&2
exit 3
```

### report
- depends_on: crunch

```shell
echo never
```
"""


# ------------------------------------------------------------------ pure


def test_a_tool_answer_is_bounded_and_says_so() -> None:
    assert bounded("short") == "short"
    cut = bounded("x" * 50_000)
    assert len(cut) <= TOOL_RESULT_MAX_CHARS and "more characters left out" in cut


def test_an_unknown_tool_is_answered_with_the_tools_there_are() -> None:
    text = unknown_tool("restart_gpu")
    assert "restart_gpu" in text and all(name in text for name in TOOL_NAMES)


def test_the_gateway_checks_a_conversation() -> None:
    ok = [
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "gpus", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "none"}]},
    ]
    assert conversation_problem(ok) == ""
    assert "empty" in conversation_problem([])
    assert "assistant" in conversation_problem([ok[0], ok[0]])
    # an asker cannot slip in its own instructions as another kind of block
    bad = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
    assert "image" in conversation_problem(bad)
    assert "characters" in conversation_problem([{"role": "user", "content": "x" * 200_000}])
    turn = AskTurn(asker="cli", qid="q1", at=1.0, messages=ok)
    assert decode_ask(encode_ask(turn)) == turn


def test_a_conversation_in_the_chat_completions_shape_and_back() -> None:
    convo = [
        {"role": "user", "content": "why?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "looking"},
                {"type": "tool_use", "id": "t1", "name": "gpus", "input": {"a": 1}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "none"}]},
    ]
    assert to_openai(convo) == [
        {"role": "user", "content": "why?"},
        {
            "role": "assistant",
            "content": "looking",
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "gpus", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "none"},
    ]
    blocks = from_openai(
        {"content": "hi", "tool_calls": [{"id": "c", "function": {"name": "agents", "arguments": "{}"}}]}
    )
    assert blocks == [
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "c", "name": "agents", "input": {}},
    ]


# ------------------------------------------------------------------ through a gateway


def tool_results(seen: Seen) -> list[dict[str, Any]]:
    """The tool results the last user message of a request carries."""
    content = seen.body["messages"][-1]["content"]
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


async def collect(mesh: Mesh, question: str) -> list[Any]:
    bus = await mesh.bus()
    return [e async for e in ask(bus, question, mesh.settings, log_dir=mesh.tmp / "logs")]


async def start(mesh: Mesh, api: FakeAnthropic, **settings: object) -> None:
    configure(mesh, gateway_base_url=api.base_url, gateway_api_key=api.key, **settings)
    await start_gateway(mesh)


async def start_gateway(mesh: Mesh) -> None:
    mesh.start_agent("gateway", "gateway")
    await until(lambda: "answering operator questions" in mesh.log("gateway"), HANG_S, "the gateway")


@pytest.mark.integration
async def test_the_operator_reads_a_real_plans_tasks_and_cites_them(mesh: Mesh) -> None:
    with FakeAnthropic() as api:
        await start(mesh, api)
        mesh.brain()
        mesh.worker("w1")
        plan_id = await mesh.submit_text(PLAN)
        plan = await mesh.wait_plan(plan_id)
        assert plan.status == "failed"
        tasks = await mesh.tasks(plan_id)
        answer = f"Plan {plan_id} failed: crunch exited 3, so report never ran [plan_tasks: plan {plan_id}]."
        api.then(
            Reply(text="Let me look.", tool_calls=[("plan_tasks", {"plan_id": plan_id}), ("agents", {})]),
            Reply(text=answer),
        )
        steps = await collect(mesh, "what failed overnight?")
        assert isinstance(steps[-1], Done), (steps[-1], mesh.log("gateway")[-3000:])
        first, second = api.requests()
        # the Messages API got the operator's own instructions and tools, streamed
        assert first.body["stream"] is True
        assert [t["name"] for t in first.body["tools"]] == list(TOOL_NAMES)
        assert "cite what you looked at" in first.body["system"]
        assert first.body["messages"] == [{"role": "user", "content": "what failed overnight?"}]
        # the tool results it got back are the plan's real task records
        results = tool_results(second)
        assert len(results) == 2 and not any(r.get("is_error") for r in results)
        rows = [json.loads(line) for line in results[0]["content"].splitlines()[2:]]
        assert {r["task"]: r["status"] for r in rows} == {t: rec.status for t, rec in tasks.items()}
        assert {r["task"]: r["status"] for r in rows} == {
            "fetch": "succeeded",
            "crunch": "failed",
            "report": "failed",
        }
        crunch = next(r for r in rows if r["task"] == "crunch")
        assert crunch["rc"] == 3 and "crunch broke" in crunch["error"]
        assert "w1" in results[1]["content"] or "worker" in results[1]["content"]
        # the secret in the task's error never reached the API
        assert SECRET not in first.everything + second.everything
        assert "[REDACTED" in results[0]["content"]
        # the answer streamed, in pieces, and ended with what it looked at and its cost
        texts = "".join(s.text for s in steps if isinstance(s, Text))
        assert texts == "Let me look." + answer
        assert len([s for s in steps if isinstance(s, Text)]) >= 2
        calls = [s for s in steps if isinstance(s, ToolCall)]
        assert [c.name for c in calls] == ["plan_tasks", "agents"]
        done = steps[-1]
        assert isinstance(done, Done) and done.text == answer and done.turns == 2
        assert f"plan_tasks: plan {plan_id}, 3 task record(s)" in done.looked_at
        assert done.cost_usd > 0 and done.tokens_in > 0
        # spent under the day's budget and the question's own
        kv = await (await mesh.bus()).gateway_kv()
        keys = [k async for k in _keys(kv)]
        assert any(k.startswith("spend.day.") for k in keys) and any(
            k.startswith("spend.ask.q") for k in keys
        )

        # a tool it lacks: the scripted call gets an error naming the tools it has
        api.then(
            Reply(tool_calls=[("restart_gpu", {"gpu": 2})]),
            Reply(text="I cannot restart GPUs or see why: no tool of mine does that."),
        )
        steps = await collect(mesh, "restart GPU 2 and tell me why it hung")
        (result,) = tool_results(api.requests()[-1])
        assert result["is_error"] is True
        assert "no tool 'restart_gpu'" in result["content"] and "telemetry_history" in result["content"]
        assert isinstance(steps[-1], Done) and "cannot" in steps[-1].text
        (call,) = [s for s in steps if isinstance(s, ToolCall)]
        assert call.error and steps[-1].looked_at == []

        # `mesh ask` prints the streamed answer and its citations
        api.then(Reply(tool_calls=[("list_plans", {})]), Reply(text=f"One plan: {plan_id}."))
        printed = mesh.cli("ask", "which plans are there?")
        assert (
            f"One plan: {plan_id}." in printed
            and "looked at:" in printed
            and "list_plans: 1 plan record" in printed
        )
        listed = tool_results(api.requests()[-1])[0]["content"]
        # and as JSON, one step a line
        api.then(Reply(text="Nothing else."))
        steps_json = [json.loads(line) for line in mesh.cli("ask", "anything else?", "--json").splitlines()]
        assert [s["step"] for s in steps_json][-1] == "done" and "messages" not in steps_json[-1]
        assert "".join(s["text"] for s in steps_json if s["step"] == "text") == "Nothing else."
        assert plan_id in listed and '"status":"failed"' in listed


async def _keys(kv: Any) -> Any:
    for key in await kv.keys():
        yield key


@pytest.mark.integration
async def test_a_question_over_its_budget_is_refused_and_none_without_a_gateway(mesh: Mesh) -> None:
    with FakeAnthropic() as api:
        configure(mesh, gateway_base_url=api.base_url, gateway_api_key=api.key, gateway_budget_ask_usd=0.0001)
        # no gateway yet: said at once
        steps = await collect(mesh, "anything?")
        assert isinstance(steps[-1], Failed) and steps[-1].reason == "unreachable"
        assert "no gateway" in steps[-1].error
        await start_gateway(mesh)
        bus = await mesh.bus()
        steps = await collect(mesh, "anything?")
        failed = steps[-1]
        assert isinstance(failed, Failed) and failed.reason == "budget", failed
        assert "gateway_budget_ask_usd" in failed.error
        assert api.requests() == []
        # the sender check: a turn naming another asker than its subject's is refused, unasked
        from mesh.names import HEADER_TYPE
        from mesh.operator import AskRefused

        forged = AskTurn(asker="web", qid="q1", at=0.0, messages=[{"role": "user", "content": "hi"}])
        answer = await bus.nc.request(
            bus.names.ask("cli"), encode_ask(forged), timeout=HANG_S, headers={HEADER_TYPE: "ask.turn"}
        )
        refused = decode_ask(answer.data)
        assert isinstance(refused, AskRefused) and refused.reason == "bad_request" and refused.qid == "q1"
        assert "asker 'web'" in refused.error
        assert api.requests() == []


class FakeChatServer:
    """An OpenAI-compatible `/v1/chat/completions` that answers from a script, recording each body."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers = answers
        self.bodies: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                fake.bodies.append(body)
                message = fake.answers.pop(0)
                data = json.dumps(
                    {
                        "choices": [{"message": message, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                    }
                ).encode()
                self.send_response(200 if self.path == "/v1/chat/completions" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.integration
async def test_a_local_model_answers_from_real_state_without_the_gateway(mesh: Mesh) -> None:
    """With operator_model naming an openai model of the registry, the turns go to that server (no
    gateway runs here), in the chat completions shape, and the tool results are real state."""
    from mesh.models import ModelSpec

    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(PLAN)
    await mesh.wait_plan(plan_id)
    fake = FakeChatServer(
        [
            {
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "list_plans", "arguments": "{}"}}],
            },
            {"content": f"{plan_id} failed."},
        ]
    )
    try:
        settings = msgspec.structs.replace(
            mesh.settings,
            operator_model="local-op",
            models={"local-op": ModelSpec(kind="llm", backend="openai", base_url=fake.url, model="op")},
        )
        bus = await mesh.bus()
        steps = [e async for e in ask(bus, "what failed?", settings)]
    finally:
        fake.close()
    done = steps[-1]
    assert isinstance(done, Done) and done.text == f"{plan_id} failed." and done.turns == 2
    first, second = fake.bodies
    assert first["model"] == "op" and first["messages"][0]["role"] == "system"
    assert [t["function"]["name"] for t in first["tools"]] == list(TOOL_NAMES)
    tool_msg = second["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == "c1"
    assert plan_id in tool_msg["content"] and '"status":"failed"' in tool_msg["content"]


@pytest.mark.integration
async def test_each_tool_reads_the_real_state_it_names(mesh: Mesh, tmp_path: Path) -> None:
    """Every tool against a live mesh (a plan run, a watchdog with a hot simulated GPU): its answer
    holds that state, bounded, and it says what it looked at."""
    from mesh.events import AlertRaised
    from mesh.host.telemetry import host_token, write_simulated
    from mesh.ops.operator_tools import Tools

    sim = tmp_path / "gpus.json"
    write_simulated(
        sim, [{"name": "Hot", "temp_c": 95, "util_pct": 12, "mem_total_mb": 4096, "mem_used_mb": 100}]
    )
    configure(mesh, simulated_gpus=str(sim), watchdog_interval_s=0.2, history_fine_s=1)
    mesh.brain()
    mesh.worker("w1")
    mesh.start_agent("watchdog", "watchdog")
    plan_id = await mesh.submit_text(PLAN)
    await mesh.wait_plan(plan_id)
    bus = await mesh.bus()
    me = host_token()

    async def hot() -> bool:
        return any(
            isinstance(m, AlertRaised) and m.rule == "gpu_temp_warn"
            for _, m in await mesh.history(bus.names.alerts_all)
        )

    await until(hot, HANG_S, "the hot GPU's alert")
    tools = Tools(bus, mesh.settings, log_dir=mesh.tmp / "logs")

    async def history_there() -> bool:
        return "points" in (await tools.call("telemetry_history", {"since": "10m"})).text

    await until(history_there, HANG_S, "the hot GPU's history")
    answers = {
        name: await tools.call(name, args)
        for name, args in (
            ("plan_events", {"plan_id": plan_id}),
            ("gpus", {}),
            ("telemetry_history", {"since": "10m", "host": me, "gpu": 0}),
            ("alerts", {"since": "1h"}),
            ("dead_letters", {}),
            ("costs", {}),
            ("agent_logs", {"agent": "w1", "lines": 5}),
            ("doctor", {}),
        )
    }
    assert (
        '"type":"task.failed"' in answers["plan_events"].text
        and '"task_id":"crunch"' in answers["plan_events"].text
    )
    assert f"{me}-gpu0" in answers["gpus"].text and '"temp_c":95' in answers["gpus"].text
    assert (
        f"{me}.gpu0" in answers["telemetry_history"].text
        and '"temp_c":{"min":95.0' in answers["telemetry_history"].text
    )
    assert '"raised":"gpu_temp_warn"' in answers["alerts"].text and "still holding" in answers["alerts"].text
    assert answers["dead_letters"].text.startswith("0 dead letter(s)")
    assert "no escalations" in answers["costs"].text
    w1_tail = mesh.log("w1").splitlines()[-5:]
    assert answers["agent_logs"].text.splitlines()[-1] in w1_tail
    assert "check(s)" in answers["doctor"].text
    assert all(not a.error and a.looked_at for a in answers.values()), answers
    assert all(len(a.text) <= TOOL_RESULT_MAX_CHARS for a in answers.values())
    # what is not there is said, with what is
    missing = await tools.call("agent_logs", {"agent": "nobody"})
    assert missing.error and "w1" in missing.text
    gone = await tools.call("plan_tasks", {"plan_id": "no-such-plan"})
    assert gone.error and "no plan" in gone.text
    bad = await tools.call("plan_tasks", {"plan_id": "../etc"})
    assert bad.error and "plan id" in bad.text
