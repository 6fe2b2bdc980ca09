"""Health checks: what a check probes, how to restart its target, and what its results mean
(the pure decisions: raise, resolve, restart, or call it a restart loop).

A check is an HTTP endpoint (a llama.cpp server's `/health`, say) or an agent's
heartbeat (its registration in the agents bucket). A check failing `retries`
times in a row makes its target unhealthy: an alert is raised and the target is
restarted, through systemd (`systemctl [--user] restart UNIT`) or a configured
command. After a restart the check waits `start_grace_s` before judging again.
More than `restart_max` restarts within `restart_window_s` is a restart loop: a
critical alert instead of another restart, until the window has passed.

The decisions (`Tracker`) are pure and take the time as an argument; probing and
restarting are in `mesh.host.health`, which the watchdog runs in threads.
"""

from __future__ import annotations

import collections
import shlex
from dataclasses import dataclass, field
from typing import Literal

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
