"""What the web console's tests share: starting `mesh agent web` on a free port and finding its
URL, HTTP calls as a browser makes them, and a reader of its server-sent events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mesh.host.telemetry import host_token, write_simulated
from tests.conftest import Mesh
from tests.faults import until

GPU = f"{host_token()}-gpu0"
ACTION = {"X-Mesh-Action": "1"}
URL_LINE = re.compile(r"console serving on (http://\S+)")


async def start_console(mesh: Mesh, name: str = "web", *args: str, env: dict[str, str] | None = None) -> str:
    """Start the console on a free port; its URL (ending in '/') once it serves."""
    mesh.start_agent(name, "web", "--port", "0", *args, env=env)

    def serving() -> str | None:
        if not mesh.alive(name):
            raise AssertionError(f"the console exited:\n{mesh.log(name)}")
        found = URL_LINE.search(mesh.log(name))
        return found.group(1) if found else None

    url: str = await until(serving, 60, "the console serving")
    return url


def simulate_gpu(path: Path, temp_c: float = 55.0) -> None:
    write_simulated(
        path,
        [
            {
                "name": "Simulated 8GB",
                "temp_c": temp_c,
                "util_pct": 30,
                "mem_used_mb": 900,
                "mem_total_mb": 8192,
                "power_w": 120,
            }
        ],
    )


async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with session.get(url, **kw) as r:
        assert r.status == 200, f"GET {url}: {r.status} {await r.text()}"
        return await r.json()


async def post(session: aiohttp.ClientSession, url: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    headers = {**ACTION, **kw.pop("headers", {})}
    async with session.post(url, json=body or {}, headers=headers, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


class Listener:
    """A browser's event stream, open (its `hello` read) before the test acts, so nothing the
    test causes can come before it; `wait` returns the first update a predicate accepts."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> Listener:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        self._response = await self.session.get(self.url, timeout=timeout)
        r = self._response
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readline(), 30)
        assert first == b"event: hello\n", first
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._response is not None
        kind = ""
        async for raw in self._response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: ") and kind == "update":
                await self.updates.put(json.loads(line[len("data: ") :]))

    async def wait(
        self, want: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 120
    ) -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            while True:
                update = await self.updates.get()
                if want(update):
                    return update

        try:
            return await asyncio.wait_for(first(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"no update: {what}") from None

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._response is not None:
            self._response.close()
