"""Health checks and restarts, for the watchdog.

A check is an HTTP endpoint (a llama.cpp server's `/health`, say) or an agent's
heartbeat (its registration in the agents bucket). A check failing `retries`
times in a row makes its target unhealthy: an alert is raised and the target is
restarted, through systemd (`systemctl [--user] restart UNIT`) or a configured
command. After a restart the check waits `start_grace_s` before judging again.
More than `restart_max` restarts within `restart_window_s` is a restart loop: a
critical alert instead of another restart, until the window has passed.

The decisions (`Tracker`) are pure and take the time as an argument; probing and
restarting are small functions the watchdog runs in threads.
"""

from __future__ import annotations

import asyncio
import collections
import shlex
import subprocess
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec


class HealthCheck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # what to probe: an HTTP URL (healthy on a 2xx answer), or an agent id whose registration
    # must be present in the agents bucket
    url: str = ""
    agent: str = ""
    interval_s: float = 10.0
    timeout_s: float = 3.0
    # consecutive failures before the target counts as unhealthy
    retries: int = 3
    # how to restart it: a systemd unit (with `user = true` for `systemctl --user`), or a command
    unit: str = ""
    user: bool = False
    command: str = ""
    # after a restart, this long before the check judges again
    start_grace_s: float = 30.0
    restart_max: int = 3
    restart_window_s: float = 600.0

    def restart_argv(self) -> list[str]:
        if self.command:
            return shlex.split(self.command)
        if self.unit:
            return ["systemctl", *(["--user"] if self.user else []), "restart", self.unit]
        return []

    def problem(self) -> str:
        if bool(self.url) == bool(self.agent):
            return "needs exactly one of url or agent"
        if self.url and not self.url.startswith(("http://", "https://")):
            return f"url {self.url!r} is not http(s)"
        if self.retries < 1 or self.interval_s <= 0 or self.timeout_s <= 0:
            return "retries must be >= 1, interval_s and timeout_s > 0"
        return ""


Action = Literal["raise", "resolve", "restart", "loop"]


@dataclass
class Tracker:
    """One check's state; `observe` says what a probe's result means."""

    name: str
    check: HealthCheck
    failures: int = 0
    unhealthy: bool = False
    looping: bool = False
    next_probe: float = 0.0
    restarts: collections.deque[float] = field(default_factory=collections.deque)

    def due(self, now: float) -> bool:
        return now >= self.next_probe

    def observe(self, ok: bool, now: float, detail: str = "") -> list[Action]:
        c = self.check
        self.next_probe = now + c.interval_s
        if ok:
            self.failures = 0
            if self.unhealthy:
                self.unhealthy = False
                self.looping = False
                return ["resolve"]
            return []
        self.failures += 1
        if self.failures < c.retries:
            return []
        out: list[Action] = []
        if not self.unhealthy:
            self.unhealthy = True
            out.append("raise")
        if not c.restart_argv():
            return out
        while self.restarts and now - self.restarts[0] >= c.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= c.restart_max:
            if not self.looping:
                self.looping = True
                out.append("loop")
            return out
        self.restarts.append(now)
        self.failures = 0
        self.next_probe = now + c.start_grace_s
        out.append("restart")
        return out


def probe_http(url: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what was seen): a 2xx answer is healthy."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return False, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    return 200 <= status < 300, f"HTTP {status}"


def restart(argv: list[str], timeout_s: float = 60.0) -> tuple[bool, str]:
    """Run a restart command; (worked, what it said)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{' '.join(argv)}: {exc}"
    said = (done.stderr or done.stdout).strip()[-300:]
    return done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}" + (f": {said}" if said else "")


# ------------------------------------------------------------------ one round (`mesh health`)


@dataclass
class Verdict:
    """What one round of a check found, and what was done about it."""

    name: str
    target: str
    healthy: bool
    detail: str
    restarted: bool = False
    restart_detail: str = ""


Probe = Callable[[HealthCheck], Awaitable[tuple[bool, str]]]


async def check_once(
    name: str, check: HealthCheck, probe: Probe, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
) -> Verdict:
    """Probe up to `retries` times, `interval_s` apart, as the watchdog would; restart the target
    (its unit or command) if every probe failed. For a timer on hosts without a watchdog, where
    each run starts afresh: the target's restart loop is bounded by its own unit's start limits."""
    target = check.url or f"agent {check.agent}"
    detail = ""
    for attempt in range(check.retries):
        if attempt:
            await sleep(check.interval_s)
        ok, detail = await probe(check)
        if ok:
            return Verdict(name, target, True, detail)
    verdict = Verdict(name, target, False, f"{check.retries} failed checks: {detail}")
    argv = check.restart_argv()
    if argv:
        verdict.restarted, verdict.restart_detail = await asyncio.to_thread(restart, argv)
    return verdict
