"""Health checks: what a check probes, how to restart its target, and what its results mean
(the pure decisions: raise, resolve, restart, or call it a restart loop).

A check is an HTTP endpoint (a llama.cpp server's `/health`, say), a TCP port that must
accept a connection (`tcp = "host:port"`), a service reachable on any one of several URLs or
ports (`any_of`), or an agent's heartbeat (its registration in the agents bucket). A check failing `retries`
times in a row makes its target unhealthy: an alert is raised and the target is
restarted, through systemd (`systemctl [--user] restart UNIT`) or a configured
command. After a restart the check waits `start_grace_s` before judging again.
More than `restart_max` restarts within `restart_window_s` is a restart loop: a
critical alert instead of another restart, until the window has passed.

The decisions (`Tracker`, and `round_alerts` for `mesh health`'s one round at a time) are pure
and take the time as an argument; probing and restarting are in `mesh.host.health`, which the
watchdog runs in threads.
"""

from __future__ import annotations

import collections
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from mesh.events import AlertRaised, AlertResolved


class HealthCheck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # what to probe (exactly one): an HTTP URL (healthy on a 2xx answer); a TCP `host:port` that
    # must accept a connection; several of those (`http(s)://...` or `tcp://host:port`), healthy
    # when any one answers; or an agent id whose registration must be in the agents bucket
    url: str = ""
    tcp: str = ""
    any_of: list[str] = msgspec.field(default_factory=list)
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

    @property
    def target(self) -> str:
        """What it probes, in words."""
        if self.url:
            return self.url
        if self.tcp:
            return f"tcp {self.tcp}"
        if self.any_of:
            return "any of " + ", ".join(self.any_of)
        return f"agent {self.agent}"

    def problem(self) -> str:
        if sum(map(bool, (self.url, self.tcp, self.any_of, self.agent))) != 1:
            return "needs exactly one of url, tcp, any_of or agent"
        if self.url and not self.url.startswith(("http://", "https://")):
            return f"url {self.url!r} is not http(s)"
        if self.tcp and split_host_port(self.tcp) is None:
            return f"tcp {self.tcp!r} is not host:port"
        for each in self.any_of:
            if not each.startswith(("http://", "https://")) and (
                not each.startswith("tcp://") or split_host_port(each.removeprefix("tcp://")) is None
            ):
                return f"any_of entry {each!r} is neither http(s)://... nor tcp://host:port"
        if self.retries < 1 or self.interval_s <= 0 or self.timeout_s <= 0:
            return "retries must be >= 1, interval_s and timeout_s > 0"
        return ""


def split_host_port(text: str) -> tuple[str, int] | None:
    """`host:port` (`[::1]:port` for IPv6) -> (host, port); None if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


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


@dataclass(frozen=True)
class Result:
    """One check's result in a round of `mesh health`."""

    name: str
    target: str
    healthy: bool
    detail: str


def round_alerts(
    results: Sequence[Result], raised: Mapping[str, float], host: str, now: float
) -> tuple[list[AlertRaised | AlertResolved], dict[str, float]]:
    """What a round of `mesh health` says: a `health` alert raised for a check that failed and
    was not raised already, resolved for one raised before and healthy now. `raised` (check
    name -> when raised) is what the previous rounds left; the new one is returned with the
    alerts. A check no longer configured keeps its entry until it is configured and healthy."""
    out: list[AlertRaised | AlertResolved] = []
    now_raised = dict(raised)
    for r in results:
        if not r.healthy and r.name not in now_raised:
            now_raised[r.name] = now
            out.append(
                AlertRaised(
                    rule="health",
                    target=r.name,
                    host=host,
                    severity="warning",
                    at=now,
                    metric="health",
                    message=f"{r.target} unhealthy: {r.detail}",
                )
            )
        elif r.healthy and r.name in now_raised:
            out.append(
                AlertResolved(
                    rule="health",
                    target=r.name,
                    host=host,
                    severity="info",
                    at=now,
                    raised_at=now_raised.pop(r.name),
                    metric="health",
                    message=f"{r.target} healthy again ({r.detail})",
                )
            )
    return out, now_raised
