"""An LLM behind an OpenAI-compatible HTTP server: a prompt task sent to it and its answer read back.

A model with `backend = "openai"` is not loaded in the worker. Its "load" (`load_openai`) is,
for an *external* server (`base_url` only), a probe of `GET {base_url}/models` that says whether
it answers; for a *managed* one (`command`), starting the server (`mesh.host.openai_server`)
and waiting until that probe answers. Its "unload" stops a managed server. Ollama,
llama.cpp's llama-server, vLLM, LM Studio and llama-cpp-python's `llama_cpp.server` all serve
this API.

A prompt task posts the prompt mesh builds for any LLM (`executors.build_prompt`: the body, then the
inputs as data blocks) to `{base_url}/completions`, with `stream: true` unless the model's
`stream` is false: the first streamed token gives the time to first token, and a cancel or a
timeout closes the connection, which stops the server's generation. The token counts come from
the response's `usage` where the server sends it (`stream_options.include_usage`), else the
streamed chunks are counted (`usage_reported` says which). Requests do not hold the model's
lock: with `llm_slots` above 1, several tasks are in flight at once and a server that batches
(llama-server `--parallel`, vLLM) decodes them together.

The HTTP client is httpx2 (async), which comes with the anthropic SDK mesh already depends on: no
second HTTP stack, and nothing of the OpenAI SDK's retries or typed models is needed to post
one JSON body and read server-sent events.

Failures: a server that does not answer fails the attempt (retried) with an error that names
the URL and what to do; one that closes the connection mid-answer fails it the same way (the
partial answer is dropped: one result per attempt); an HTTP 400/413/422 (a prompt over the
context, a body the server cannot take) is a definition error, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2

from mesh.events import WorkItem
from mesh.host.loaders import Loaded, effective_device
from mesh.host.openai_server import GroupWatch, ServerProcess, free_port, managed_base_url, server_argv
from mesh.host.runmodel import RunContext, first_of
from mesh.models import SCHEMA_FORMATS, ModelError, ModelSpec
from mesh.work import RunResult

PROBE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
# the request body is refused: what is asked can never work as written
DEFINITION_STATUSES = (400, 413, 422)


@dataclass
class OpenAIServer:
    """The handle of an openai-backend LLM (`Loaded.handle`): where its server answers."""

    name: str
    base_url: str
    model: str
    api_key_env: str = ""
    server: ServerProcess | None = None  # a managed server; None for an external one
    healthy: bool = True  # the last probe of GET /models answered
    last_probe: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "managed" if self.server is not None else "external"

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def close(self) -> None:
        """Stop a managed server (its whole process group); nothing for an external one."""
        if self.server is not None:
            self.server.stop()


def probe(
    base_url: str, headers: Mapping[str, str], timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[bool, str, str]:
    """GET {base_url}/models: (answers, what it said or why not, the first model id)."""
    url = f"{base_url}/models"
    try:
        with httpx2.Client(timeout=timeout_s) as client:
            resp = client.get(url, headers=dict(headers))
    except httpx2.HTTPError as exc:
        return False, f"GET {url} failed: {type(exc).__name__}: {exc}", ""
    if resp.status_code != 200:
        return False, f"GET {url} answered HTTP {resp.status_code}: {resp.text[:300]}", ""
    try:
        data = resp.json().get("data") or []
        first = str(data[0].get("id", "")) if data else ""
    except (ValueError, AttributeError, IndexError, TypeError):
        first = ""
    return True, f"GET {url} answered 200", first


def load_openai(name: str, spec: ModelSpec, device: str, reaper: GroupWatch | None = None) -> Loaded:
    """The model's "load": start a managed server and wait until it answers, or probe an
    external one. Blocks (a worker calls it in a thread); raises ModelError saying what to do."""
    if spec.api_key_env and not os.environ.get(spec.api_key_env):
        raise ModelError(
            f"model {name!r}: api_key_env names {spec.api_key_env}, which is not set in the worker's "
            "environment; set it there (the key itself never goes in the config)"
        )
    began = time.monotonic()
    handle = OpenAIServer(
        name=name, base_url=spec.base_url.rstrip("/"), model=spec.model, api_key_env=spec.api_key_env
    )
    if spec.command:
        port = free_port()
        handle.base_url = managed_base_url(spec, port)
        server = ServerProcess(name, server_argv(name, spec, port), handle.base_url, reaper)
        handle.server = server
        answers: list[tuple[bool, str, str]] = []

        def ready() -> bool:
            answers.append(probe(handle.base_url, handle.headers(), timeout_s=2.0))
            return answers[-1][0]

        server.wait_ready(spec.start_timeout_s, ready)
        handle.healthy, handle.last_probe, first = answers[-1]
    else:
        # an external server may be down now and up later: the load succeeds, each task that
        # finds it down fails (and is retried) with an error naming the URL
        handle.healthy, handle.last_probe, first = probe(handle.base_url, handle.headers())
    handle.model = handle.model or first
    return Loaded(
        name=name,
        spec=spec,
        device=effective_device(spec, device),
        handle=handle,
        load_s=time.monotonic() - began,
        options={
            "backend": "openai",
            "mode": handle.mode,
            "base_url": handle.base_url,
            "model": handle.model,
        },
    )


# a task -------------------------------------------------------------------------------


class _Refused(Exception):
    """The server answered the request with an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Cut(Exception):
    """The answer ended before the server said it was complete."""


@dataclass
class _Answer:
    parts: list[str] = field(default_factory=list)
    chunks: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    finish: str = ""
    first_at: float = 0.0
    ended_at: float = 0.0


def request_for(
    item: WorkItem,
    spec: ModelSpec,
    model: str,
    prompt: str,
    messages: list[dict[str, str]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The endpoint and JSON body of a prompt task. A chat task (its turns as `messages`, the
    server's own chat template renders them) goes to `/chat/completions` with the same options;
    `_read_stream` reads either answer. A task with a JSON schema asks for it as the answer's
    `response_format` (and llama.cpp's servers for a grammar from it); the worker validates the
    answer whatever the server did with it."""
    body: dict[str, Any] = {
        "max_tokens": item.max_tokens or spec.max_tokens,
        "temperature": spec.temperature,
        "seed": spec.seed,
    }
    path = "/completions"
    if messages is not None:
        body["messages"] = messages
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
    if item.schema:
        schema = json.loads(item.schema)
        if messages is None:
            body["json_schema"] = schema  # llama-server's field on /completions; others ignore it
        elif spec.schema_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        else:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema},
            }
    if spec.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if model:
        body["model"] = model
    if item.grammar:
        body["grammar"] = item.grammar  # llama.cpp's servers; others ignore it
    return path, body


def _error_message(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return text[:500]


async def _read_stream(
    handle: OpenAIServer, path: str, body: dict[str, Any], answer: _Answer, ctx: RunContext
) -> None:
    timeout = httpx2.Timeout(CONNECT_TIMEOUT_S, read=None, write=60.0, pool=None)
    async with (
        httpx2.AsyncClient(timeout=timeout) as client,
        client.stream("POST", handle.base_url + path, json=body, headers=handle.headers()) as resp,
    ):
        if resp.status_code >= 400:
            raise _Refused(resp.status_code, _error_message(await resp.aread()))
        if not body.get("stream"):
            _read_whole(json.loads(await resp.aread()), answer)
            ctx.first_token.set()
            return
        done = False
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if isinstance(chunk.get("error"), dict | str):
                raise _Cut(f"the server reported an error mid-answer: {chunk['error']}")
            if chunk.get("usage"):
                answer.usage = dict(chunk["usage"])
            for choice in chunk.get("choices") or []:
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if not answer.first_at:
                        answer.first_at = time.monotonic()
                        ctx.first_token.set()
                    answer.parts.append(str(piece))
                    answer.chunks += 1
                    ctx.on_text(str(piece))
                if choice.get("finish_reason"):
                    answer.finish = str(choice["finish_reason"])
        answer.ended_at = time.monotonic()
        if not done and not answer.finish:
            if not answer.chunks:
                raise _Cut(
                    "the answer ended with neither a token nor an error (llama-cpp-python's server "
                    "answers a prompt over its context so when streaming: set stream = false for it)"
                )
            raise _Cut("the answer ended before the server said it was complete")


def _read_whole(data: dict[str, Any], answer: _Answer) -> None:
    """A whole (not streamed) answer: its first token's time is its end."""
    answer.ended_at = answer.first_at = time.monotonic()
    answer.usage = dict(data.get("usage") or {})
    for choice in data.get("choices") or []:
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content")
        answer.parts.append(str(text or ""))
        answer.chunks += 1
        answer.finish = str(choice.get("finish_reason") or "")


def _metrics(answer: _Answer, began: float) -> dict[str, float]:
    ended = answer.ended_at or time.monotonic()
    first = answer.first_at or ended
    reported = bool(answer.usage.get("completion_tokens"))
    out = int(answer.usage["completion_tokens"]) if reported else answer.chunks
    gen_s = ended - first
    return {
        "tokens_in": float(answer.usage.get("prompt_tokens", 0) or 0),
        "tokens_out": float(out),
        "ttft_s": first - began,
        "gen_s": gen_s,
        "tokens_per_s": (out - 1) / gen_s if out > 1 and gen_s > 0 else 0.0,
        "usage_reported": 1.0 if reported else 0.0,
    }


async def run_openai_prompt(
    item: WorkItem, ctx: RunContext, prompt: str, messages: list[dict[str, str]] | None = None
) -> RunResult:
    """Send the task's prompt (built by the executor, as for a model in process), or a chat
    task's messages, to the model's server; its answer is the output, streamed to the task's
    text subject as it comes (`ctx.on_text`)."""
    began = time.monotonic()
    loaded: Loaded = ctx.model
    handle: OpenAIServer | None = getattr(loaded, "handle", None)
    if handle is None:
        return RunResult(ok=False, duration_s=0.0, error=f"the model {loaded.name} was unloaded")
    if not prompt:
        return RunResult(
            ok=False,
            duration_s=0.0,
            definition_error=True,
            error="the prompt is empty: write the instruction in the task's body",
        )
    if ctx.cancel.is_set():
        return RunResult(ok=False, duration_s=0.0, cancelled=True, error="cancelled before it started")
    path, body = request_for(item, loaded.spec, handle.model, prompt, messages)
    answer = _Answer()
    job = asyncio.ensure_future(_read_stream(handle, path, body, answer, ctx))
    try:
        stopped_for = await first_of(job, ctx.cancel, item.timeout_s)
    finally:
        # closing the connection is what stops the server's generation
        if not job.done():
            job.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job
    result = RunResult(ok=False, duration_s=0.0, prompt=prompt, metrics=_metrics(answer, began))
    url = handle.base_url + path
    if stopped_for:
        result.timed_out = stopped_for == "timed out"
        result.cancelled = not result.timed_out
        head = f"timed out after {item.timeout_s:g}s" if result.timed_out else "cancelled"
        result.error = f"{head}; stopped after {answer.chunks} tokens from {url}"
    elif (exc := job.exception()) is None:
        result.ok = True
        result.output = "".join(answer.parts)
    else:
        result.error, result.definition_error = _failure(handle, url, exc, answer)
    result.duration_s = time.monotonic() - began
    return result


def _failure(handle: OpenAIServer, url: str, exc: BaseException, answer: _Answer) -> tuple[str, bool]:
    """The error of a failed request, and whether it is the task's definition at fault."""
    where = f"[models.{handle.name}]"
    if isinstance(exc, _Refused):
        what = f"the server at {url} refused the request (HTTP {exc.status}): {exc}"
        if "response_format" in str(exc):
            what += f"; set {where}.schema_format to the other of {' or '.join(SCHEMA_FORMATS)}"
        if exc.status in DEFINITION_STATUSES:
            return f"{what}; shorten the prompt or lower max_tokens if it is too long", True
        if exc.status in (401, 403):
            return f"{what}; check the key in the variable {where}.api_key_env names", False
        if exc.status == 404:
            return f"{what}; check {where}.model and base_url (the server lists its models at /models)", False
        return what, False
    if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
        if handle.server is not None:
            code = handle.server.exited()
            gone = f" ({handle.server.gone_error(code)})" if code is not None else ""
            return (
                f"the worker's server for {handle.name} does not answer at {url}: {exc}{gone}; "
                "the worker unloads the model if it exited, and the attempt is retried",
                False,
            )
        return (
            f"no OpenAI-compatible server answers at {url} ({type(exc).__name__}: {exc}): start it, "
            f"or point {where}.base_url at one; the attempt is retried",
            False,
        )
    if isinstance(exc, _Cut | httpx2.TransportError):
        return (
            f"the server at {url} broke off the answer after {answer.chunks} tokens "
            f"({type(exc).__name__}: {exc}); did it exit? The partial answer is dropped and the "
            "attempt is retried",
            False,
        )
    if isinstance(exc, ValueError):  # a line of the stream that is not JSON
        return f"the server at {url} sent something that is not an OpenAI-compatible answer: {exc}", False
    return f"{type(exc).__name__}: {exc} (from {url})", False
