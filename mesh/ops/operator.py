"""The operator's loop: a question, the model's turns, the read-only tools it calls, a cited answer.
`ask()` is the library entry (`mesh ask` prints it, a console streams it); tools: mesh.ops.operator_tools.

Each turn goes to a model: through the gateway (`GatewayBackend`: Claude, under the gateway's
budget, rate limit and redaction; a request on `<p>.ask.<asker>` answered by a stream of
`ask.chunk` and one `ask.reply` on the asker's inbox), or, when `operator_model` names an
`openai` model of the registry, to that OpenAI-compatible server directly (`LocalBackend`:
nothing leaves the rig). The model's tool calls run here, with the asker's own permissions,
and their answers (bounded, redacted) go back in the next turn, until the model answers in
text or `MAX_TURNS` is reached.

`ask()` yields, as they happen: `Text` (the answer as it is generated), `ToolCall` (a tool run,
and what it looked at), then one `Done` (the answer, the citations, the cost) or `Failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
from nats.aio.msg import Msg as NatsMsg

from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.errors import MeshError
from mesh.models import ModelSpec
from mesh.names import HEADER_TYPE
from mesh.operator import (
    MAX_TURNS,
    SYSTEM,
    TOOLS,
    AskChunk,
    AskRefused,
    AskReply,
    AskTurn,
    decode_ask,
    encode_ask,
    text_of,
    tool_calls,
)
from mesh.ops.operator_tools import Tools
from mesh.settings import Settings

# the first word from the gateway (a chunk or the reply) must come within this; then each next
FIRST_WORD_S = 30.0


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    input: dict[str, Any]
    looked_at: str
    error: bool
    chars: int


@dataclass(frozen=True)
class Done:
    text: str
    looked_at: list[str]
    turns: int
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    # the conversation, to ask a follow-up question in
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    reason: str
    error: str


AskEvent = Text | ToolCall | Done | Failed


def event_dict(event: AskEvent) -> dict[str, Any]:
    """A step as plain JSON-ready data (`mesh ask --json`, a console's event stream): `step` is
    `text`, `tool`, `done` or `failed`; a `done` leaves out the conversation."""
    kind = {Text: "text", ToolCall: "tool", Done: "done", Failed: "failed"}[type(event)]
    body = dataclasses.asdict(event)
    body.pop("messages", None)
    return {"step": kind, **body}


TurnMessage = AskChunk | AskReply | AskRefused


class Backend(Protocol):
    def turn(self, qid: str, messages: list[dict[str, Any]]) -> AsyncIterator[TurnMessage]: ...


class GatewayBackend:
    """A turn asked of the gateway on `<p>.ask.<asker>`; its answer streams back to the inbox."""

    def __init__(self, bus: Bus, asker: str = "cli", timeout_s: float = 0.0) -> None:
        self.bus = bus
        self.asker = asker
        # the gateway's own call may take its timeout; a little more for the way there and back
        self.timeout_s = timeout_s or bus.settings.gateway_timeout_s + 30.0

    async def turn(self, qid: str, messages: list[dict[str, Any]]) -> AsyncIterator[TurnMessage]:
        nc = self.bus.nc
        inbox = nc.new_inbox()
        queue: asyncio.Queue[NatsMsg] = asyncio.Queue()

        async def on_msg(msg: NatsMsg) -> None:
            await queue.put(msg)

        sub = await nc.subscribe(inbox, cb=on_msg)
        try:
            turn = AskTurn(asker=self.asker, qid=qid, at=time.time(), messages=messages)
            await nc.publish(
                self.bus.names.ask(self.asker),
                encode_ask(turn),
                reply=inbox,
                headers={HEADER_TYPE: "ask.turn"},
            )
            wait = FIRST_WORD_S
            while True:
                try:
                    raw = await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    yield AskRefused(qid=qid, reason="unreachable", error=_silent(wait))
                    return
                wait = self.timeout_s
                if raw.headers and raw.headers.get("Status") == "503":
                    yield AskRefused(
                        qid=qid,
                        reason="unreachable",
                        error="no gateway serves operator questions: start one (`mesh agent gateway`), "
                        "or set operator_model to a local openai model of the registry",
                    )
                    return
                try:
                    msg = decode_ask(raw.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                # (a refusal of a turn the gateway could not read names no question)
                if isinstance(msg, AskTurn) or msg.qid not in (qid, ""):
                    continue
                yield msg
                if isinstance(msg, AskReply | AskRefused):
                    return
        finally:
            with contextlib.suppress(*TRANSIENT):
                await sub.unsubscribe()


def _silent(wait: float) -> str:
    return (
        f"no word from the gateway in {wait:.0f}s: is one running (`mesh agent gateway`), and may this "
        "user ask it (docs/operator.md)?"
    )


class LocalBackend:
    """A turn asked of an OpenAI-compatible server (`/chat/completions` with tools) directly."""

    def __init__(self, name: str, spec: ModelSpec, timeout_s: float = 600.0) -> None:
        if spec.backend != "openai" or not spec.base_url:
            raise MeshError(
                f"operator_model {name!r} is not an openai model with a base_url: the operator asks a "
                "server that runs on its own (docs/operator.md)"
            )
        self.name = name
        self.spec = spec
        self.timeout_s = timeout_s

    async def turn(self, qid: str, messages: list[dict[str, Any]]) -> AsyncIterator[TurnMessage]:
        import httpx2

        body: dict[str, Any] = {
            "messages": [{"role": "system", "content": SYSTEM}, *to_openai(messages)],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": t["name"],
                        "description": t["description"],
                        "parameters": t["input_schema"],
                    },
                }
                for t in TOOLS
            ],
            "max_tokens": self.spec.max_tokens,
            "temperature": self.spec.temperature,
        }
        if self.spec.model:
            body["model"] = self.spec.model
        headers = {}
        if self.spec.api_key_env and os.environ.get(self.spec.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.spec.api_key_env]}"
        url = self.spec.base_url.rstrip("/") + "/chat/completions"
        try:
            async with httpx2.AsyncClient(timeout=self.timeout_s) as client:
                resp = await client.post(url, json=body, headers=headers)
        except httpx2.HTTPError as exc:
            yield AskRefused(qid=qid, reason="unreachable", error=f"{self.name} at {url}: {exc!r}")
            return
        if resp.status_code != 200:
            yield AskRefused(
                qid=qid, reason="refused", error=f"{self.name} answered {resp.status_code}: {resp.text[:300]}"
            )
            return
        try:
            data = resp.json()
            content = from_openai(data["choices"][0]["message"])
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            yield AskRefused(qid=qid, reason="error", error=f"{self.name}'s answer cannot be read: {exc!r}")
            return
        text = text_of(content)
        if text:
            yield AskChunk(qid=qid, text=text)
        yield AskReply(
            qid=qid,
            content=content,
            stop_reason=str(data["choices"][0].get("finish_reason") or ""),
            model=self.name,
            tokens_in=int(usage.get("prompt_tokens") or 0),
            tokens_out=int(usage.get("completion_tokens") or 0),
        )


def to_openai(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Messages API conversation in the chat completions API's shape."""
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if m["role"] == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": text_of(content) or None}
            calls = [
                {
                    "id": b["id"],
                    "type": "function",
                    "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})},
                }
                for b in tool_calls(content)
            ]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        for b in content:
            if b.get("type") == "tool_result":
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": _result_text(b)})
            elif b.get("type") == "text":
                out.append({"role": "user", "content": b["text"]})
    return out


def from_openai(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat completions answer as Messages API blocks."""
    blocks: list[dict[str, Any]] = []
    if message.get("content"):
        blocks.append({"type": "text", "text": str(message["content"])})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            args = {}
        blocks.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or f"call_{uuid.uuid4().hex[:12]}"),
                "name": str(fn.get("name") or ""),
                "input": args if isinstance(args, dict) else {},
            }
        )
    return blocks


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def backend_for(bus: Bus, settings: Settings, asker: str = "cli") -> Backend:
    """The gateway, or the local model `operator_model` names."""
    name = settings.operator_model
    if not name:
        return GatewayBackend(bus, asker)
    spec = settings.model_registry().get(name)
    if spec is None or spec.kind != "llm":
        raise MeshError(f"operator_model {name!r} is not an llm model of the registry ([models.{name}])")
    return LocalBackend(name, spec)


async def ask(
    bus: Bus,
    question: str,
    settings: Settings,
    *,
    backend: Backend | None = None,
    asker: str = "cli",
    log_dir: str | Path | None = None,
    messages: list[dict[str, Any]] | None = None,
    max_turns: int = MAX_TURNS,
) -> AsyncIterator[AskEvent]:
    """Answer `question` from the rig's state (see the module's docstring). `messages`: an
    earlier `Done.messages`, for a follow-up question in the same conversation."""
    backend = backend or backend_for(bus, settings, asker)
    tools = Tools(bus, settings, log_dir)
    qid = f"q{uuid.uuid4().hex[:16]}"
    convo: list[dict[str, Any]] = [*(messages or []), {"role": "user", "content": question}]
    looked: list[str] = []
    tokens_in = tokens_out = 0
    cost = 0.0
    for turn in range(1, max_turns + 1):
        reply: AskReply | None = None
        async for msg in backend.turn(qid, convo):
            match msg:
                case AskChunk():
                    yield Text(msg.text)
                case AskReply():
                    reply = msg
                case AskRefused():
                    yield Failed(msg.reason, msg.error)
                    return
        if reply is None:
            yield Failed("error", "the model's turn ended without an answer")
            return
        tokens_in += reply.tokens_in
        tokens_out += reply.tokens_out
        cost += reply.cost_usd
        convo.append({"role": "assistant", "content": reply.content})
        calls = tool_calls(reply.content)
        if not calls:
            yield Done(text_of(reply.content), looked, turn, tokens_in, tokens_out, cost, convo)
            return
        results: list[dict[str, Any]] = []
        for call in calls:
            args = call.get("input") if isinstance(call.get("input"), dict) else {}
            result = await tools.call(str(call.get("name")), args)
            if not result.error:
                looked.append(result.looked_at)
            yield ToolCall(
                str(call.get("name")), args or {}, result.looked_at, result.error, len(result.text)
            )
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call["id"], "content": result.text}
            if result.error:
                block["is_error"] = True
            results.append(block)
        convo.append({"role": "user", "content": results})
    yield Failed("turns", f"no answer after {max_turns} turns of tool calls; ask a narrower question")


async def ask_steps(
    bus: Bus,
    question: str,
    settings: Settings,
    messages: list[dict[str, Any]] | None = None,
    *,
    asker: str = "web",
) -> AsyncIterator[dict[str, Any]]:
    """`ask` as JSON-ready steps (`event_dict`), for a console: a `done` step also carries the
    conversation (`messages`), which the console keeps for a follow-up and does not send on."""
    async for event in ask(bus, question, settings, asker=asker, messages=messages):
        step = event_dict(event)
        if isinstance(event, Done):
            step["messages"] = event.messages
        yield step
