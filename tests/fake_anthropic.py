"""A local fake of the Anthropic Messages API: a real HTTP server in a thread.

It answers `POST /v1/messages` with responses shaped like the real API's (an id, content blocks,
usage, a stop reason), or with what a test scripts: 429s with Retry-After, 500s, slow answers.
Every request is recorded (headers and JSON body) for the test to inspect. The SDK sends its key
as `Authorization: Bearer ...`, so either that or `x-api-key` is accepted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted response."""

    status: int = 200
    # for 200: the answer, as a result or as follow-up tasks (plan-format markdown)
    result: str | None = None
    followups: str | None = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    error_type: str = ""
    # calls of any tools by name and input (the operator's, say), after `text` if any
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Seen:
    headers: dict[str, str]
    body: dict[str, Any]
    status: int = 0

    @property
    def user(self) -> str:
        """The text of the request's user message."""
        content = self.body["messages"][0]["content"]
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content)

    @property
    def everything(self) -> str:
        return json.dumps(self.body)


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class FakeAnthropic:
    """`with FakeAnthropic() as api:` serves on `api.base_url` until the block ends."""

    def __init__(self, key: str = "test-key-for-the-fake-api") -> None:
        self.key = key
        self.script: deque[Reply] = deque()
        # what to answer when nothing is scripted (default: a result naming the task)
        self.default: Callable[[Seen], Reply] = lambda seen: Reply(result="fake answer")
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-anthropic", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAnthropic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def then(self, *replies: Reply) -> None:
        with self.lock:
            self.script.extend(replies)

    def answered(self) -> list[Seen]:
        """The requests it answered with 200."""
        with self.lock:
            return [s for s in self.seen if s.status == 200]

    def requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def _next(self, seen: Seen) -> Reply:
        with self.lock:
            if self.script:
                return self.script.popleft()
        return self.default(seen)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                if self.path.rstrip("/") != "/v1/messages":
                    self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}})
                    return
                auth = headers.get("authorization", "")
                if auth != f"Bearer {fake.key}" and headers.get("x-api-key") != fake.key:
                    self._send(
                        401,
                        {
                            "type": "error",
                            "error": {"type": "authentication_error", "message": "invalid key"},
                        },
                    )
                    return
                seen = Seen(headers=headers, body=json.loads(raw))
                with fake.lock:
                    fake.seen.append(seen)
                reply = fake._next(seen)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                seen.status = reply.status
                if reply.status != 200:
                    kind = reply.error_type or ERROR_TYPES.get(reply.status, "api_error")
                    body = {"type": "error", "error": {"type": kind, "message": f"fake {reply.status}"}}
                    self._send(reply.status, body, reply.headers)
                    return
                if seen.body.get("stream"):
                    self._stream(fake.message(seen, reply), reply.headers)
                    return
                self._send(200, fake.message(seen, reply), reply.headers)

            def _stream(self, message: dict[str, Any], headers: dict[str, str]) -> None:
                """The message as the API streams it (server-sent events), text in pieces."""
                data = b"".join(_event(e) for e in stream_events(message))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    @staticmethod
    def message(seen: Seen, reply: Reply) -> dict[str, Any]:
        """A Messages API answer: a tool call (result or follow-ups) or text, with usage."""
        if reply.tool_calls:
            content = [{"type": "text", "text": reply.text}] if reply.text else []
            content += [
                {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": args}
                for name, args in reply.tool_calls
            ]
            stop = "tool_use"
        elif reply.followups is not None:
            content: list[dict[str, Any]] = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": "propose_followups",
                    "input": {"tasks": reply.followups, "why": "the work needs commands run"},
                }
            ]
            stop = "tool_use"
        elif reply.text is not None:
            content = [{"type": "text", "text": reply.text}]
            stop = "end_turn"
        else:
            content = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": "give_result",
                    "input": {"result": reply.result or ""},
                }
            ]
            stop = "tool_use"
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": seen.body.get("model", "claude-sonnet-4-5"),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": max(1, len(json.dumps(seen.body)) // 4),
                "output_tokens": max(1, len(json.dumps(content)) // 4),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }


def _event(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def stream_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole message as the Messages API's stream of events: text in pieces of a few words."""
    start = {**message, "content": [], "stop_reason": None, "usage": {**message["usage"], "output_tokens": 1}}
    out: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            out.append(
                {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}
            )
            words = block["text"].split(" ")
            for k in range(0, len(words), 3):
                piece = " ".join(words[k : k + 3]) + (" " if k + 3 < len(words) else "")
                out.append(
                    {
                        "type": "content_block_delta",
                        "index": i,
                        "delta": {"type": "text_delta", "text": piece},
                    }
                )
        else:
            out.append({"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}})
            out.append(
                {
                    "type": "content_block_delta",
                    "index": i,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
                }
            )
        out.append({"type": "content_block_stop", "index": i})
    out.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        }
    )
    out.append({"type": "message_stop"})
    return out
