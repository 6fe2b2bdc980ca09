"""What every agent shares: its life (start, run, stop), registration, and signals.

A signal only sets `stop_requested`; the agent's own loop notices, stops taking
work, finishes or hands back what it holds (still registered and heartbeating),
then drains its connection and exits. SIGHUP (`systemctl reload`) calls
`reload_requested`: the watchdog reads its config again (agents/watchdog_reload.py), the
others say they cannot and go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats.js.errors

from mesh.bus.connect import connect
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.bus.refusals import PermissionRefused
from mesh.bus.store import full_error
from mesh.events import AgentStarted, AgentStopped
from mesh.records import AgentRecord, encode_record
from mesh.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_WAIT_S = 5.0
# the longest pause between tries of a step that the server refused
RETRY_MAX_S = 5.0


def passing(exc: BaseException) -> bool:
    """Whether a server error may go away by itself: no answer, no connection, a server that is
    unavailable or whose store is full; not a request it refused (a bad config, a permission)."""
    if isinstance(exc, PermissionRefused):
        return False
    if not isinstance(exc, nats.js.errors.APIError):
        return True
    return isinstance(exc, nats.js.errors.ServiceUnavailableError) or bool(full_error(exc))


def new_agent_id(role: str) -> str:
    host = socket.gethostname().split(".")[0] or "host"
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in host)
    return f"{role}-{safe}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class Agent:
    role = "agent"

    def __init__(self, settings: Settings, agent_id: str | None = None) -> None:
        self.settings = settings
        self.names = settings.names
        self.agent_id = agent_id or settings.agent_id or new_agent_id(self.role)
        self.host = socket.gethostname()
        self.started_at = time.time()
        self.stop_requested = asyncio.Event()
        self._bus: Bus | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.classes: list[str] = []
        self.slots = 0
        # the process's exit status; not 0 when it stopped for a reason a supervisor (systemd's
        # Restart=on-failure, `mesh up`) should answer by starting it again
        self.exit_code = 0
        # whether a stop that leaves background tasks stuck ends the process (`run_agent`: an
        # agent's own process); an agent run inside another program (a test) only says so
        self.exit_when_stuck = False

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "agent not started"
        return self._bus

    # life ----------------------------------------------------------------------
    async def start(self) -> None:
        self._bus = await connect(self.settings, self.agent_id, wait_s=3600.0, on_reconnect=self.on_reconnect)
        await self.retrying(self._join, "joining the mesh")

    async def _join(self) -> None:
        """Resources, registration, `agent.started`: each safe to do again."""
        await self.ensure_resources()
        await self.register()
        await self.bus.publish(
            self.names.agent_event(self.agent_id, "started"),
            AgentStarted(
                agent_id=self.agent_id, role=self.role, host=self.host, pid=os.getpid(), at=time.time()
            ),
            # one start per process: a restarted agent that keeps its id (a GPU worker) is new
            f"{self.agent_id}:started:{self.started_at!r}",
        )
        self.spawn(self._refresh_loop(), "registration")
        log.info("%s started as %s on %s", self.role, self.agent_id, self.settings.url)

    async def retrying(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        """Run `step` until it goes through, riding out server errors that pass (a full store, a
        server restarting) with a growing pause; raises the others, and any once asked to stop."""
        delay = 0.2
        while True:
            try:
                return await step()
            except TRANSIENT as exc:
                if self.stop_requested.is_set() or not passing(exc):
                    raise
                # a full store was said once already (by the bus); other errors each time
                if not self.bus.store.full:
                    log.warning("%s failed (%r); retrying in %.1fs", what, exc, delay)
                await self.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_requested.wait(), timeout=seconds)

    async def ensure_resources(self) -> None:
        """Create or update the streams, buckets and consumers this agent uses; where its NATS
        user may not (`manage_resources = false`), wait for them to exist."""
        await self.bus.prepare(tuple(self.classes) or ("cpu",), self.bound_consumers())

    async def run(self) -> None:
        raise NotImplementedError

    def bound_consumers(self) -> tuple[str, ...]:
        """The durable consumers (of `consumer_definitions`) this agent binds to at start."""
        return ()

    async def on_reconnect(self) -> None:
        """Called when the connection to the server comes back (after a server restart, say)."""

    async def stop(self, reason: str = "stopped") -> None:
        for task in list(self._background):
            task.cancel()
        stuck: set[asyncio.Task[Any]] = set()
        if self._background:
            # bounded: a task that will not finish cancelling (seen after a SIGSTOP/SIGCONT)
            # must not keep a stopped agent alive
            _, stuck = await asyncio.wait(set(self._background), timeout=STOP_WAIT_S)
        if self._bus is None:
            return
        try:
            await self.bus.publish(
                self.names.agent_event(self.agent_id, "stopped"),
                AgentStopped(agent_id=self.agent_id, role=self.role, at=time.time(), reason=reason),
                f"{self.agent_id}:stopped:{self.started_at!r}",
            )
            kv = await self.bus.agents_kv()
            await kv.delete(self.agent_id)
        except TRANSIENT as exc:
            log.warning("could not record the stop of %s: %s", self.agent_id, exc)
        await self.bus.close()
        log.info("%s %s stopped", self.role, self.agent_id)
        if stuck:
            log.error(
                "%d background task(s) would not stop (%s)%s",
                len(stuck),
                ", ".join(t.get_name() for t in stuck),
                "; exiting anyway" if self.exit_when_stuck else "",
            )
            if self.exit_when_stuck:
                logging.shutdown()
                os._exit(self.exit_code or 1)

    # registration ------------------------------------------------------------------
    def record(self) -> AgentRecord:
        return AgentRecord(
            agent_id=self.agent_id,
            role=self.role,
            host=self.host,
            pid=os.getpid(),
            started_at=self.started_at,
            seen_at=time.time(),
            classes=list(self.classes),
            slots=self.slots,
            running=self.running_keys(),
            state="stopping" if self.stop_requested.is_set() else "running",
        )

    def running_keys(self) -> list[str]:
        return []

    async def register(self) -> None:
        kv = await self.bus.agents_kv()
        await kv.put(self.agent_id, encode_record(self.record()))

    async def _refresh_loop(self) -> None:
        interval = self.settings.agent_refresh_s
        while True:
            began = time.monotonic()
            try:
                await self.register()
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("could not refresh the registration of %s: %s", self.agent_id, exc)
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - began)))

    def reload_requested(self) -> None:
        """SIGHUP: an agent that reads its config again overrides this; the others say so and go on."""
        log.warning("SIGHUP: the %s does not read its config again; restart it for a new config", self.role)

    # tasks -----------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a background task whose failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.agent_id}:{name}")
        self._background.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed: %r", task.get_name(), exc, exc_info=exc)
            self.stop_requested.set()


async def _main(agent: Agent) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop_requested.set)
    # SIGHUP (`systemctl reload`): read the config again, where the agent can (the watchdog)
    loop.add_signal_handler(signal.SIGHUP, agent.reload_requested)
    try:
        if not await _unless_stopped(agent, agent.start()):
            log.info("%s %s stopped before it joined the mesh", agent.role, agent.agent_id)
            return agent.exit_code
        await agent.run()
    except TRANSIENT as exc:
        if not agent.stop_requested.is_set():
            raise
        log.warning("asked to stop while the server refused a step (%r)", exc)
    finally:
        await agent.stop()
    return agent.exit_code


async def _unless_stopped(agent: Agent, start: Coroutine[Any, Any, None]) -> bool:
    """Run an agent's start unless it is asked to stop first (a start waits up to an hour for
    the server: SIGTERM from systemd, or Ctrl-C, must not wait with it); whether it ran."""
    step = asyncio.ensure_future(start)
    stop = asyncio.ensure_future(agent.stop_requested.wait())
    try:
        await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if step.done():
        step.result()  # (its error, if it failed)
        return True
    step.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await step
    return False


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion under uvloop, the event loop mesh uses everywhere."""
    import uvloop

    return uvloop.run(coro)


def run_agent(agent: Agent) -> int:
    """Run an agent to completion. A crash in native code (a model library, a driver) prints
    the Python stack to its log (stderr); `kill -USR1 PID` prints every thread's stack and the
    agent goes on: how to see where a stuck agent waits."""
    try:
        faulthandler.enable(all_threads=True)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, OSError, RuntimeError, ValueError) as exc:  # no usable stderr
        log.debug("no stack dumps on crashes: %s", exc)
    agent.exit_when_stuck = True
    return run_loop(_main(agent))
