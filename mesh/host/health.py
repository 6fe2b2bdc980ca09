"""Probing health checks and restarting their targets, for the watchdog and `mesh health`:
HTTP, TCP and any-of probes and a restart command (run in threads), and one round of checks.

The checks and what their results mean (`HealthCheck`, `Tracker`) are in `mesh.health`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mesh.health import HealthCheck, split_host_port


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


def probe_tcp(host_port: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what was seen): healthy when `host:port` accepts a TCP connection."""
    where = split_host_port(host_port)
    if where is None:
        return False, f"{host_port!r} is not host:port"
    try:
        with socket.create_connection(where, timeout=timeout_s):
            pass
    except OSError as exc:
        return False, f"tcp {host_port}: {type(exc).__name__}: {exc.strerror or exc}"
    return True, f"tcp {host_port} accepts connections"


def probe_one(target: str, timeout_s: float) -> tuple[bool, str]:
    """One entry of an `any_of` list: `http(s)://...` or `tcp://host:port`."""
    if target.startswith("tcp://"):
        return probe_tcp(target.removeprefix("tcp://"), timeout_s)
    ok, seen = probe_http(target, timeout_s)
    return ok, f"{target}: {seen}"


def probe_any(targets: list[str], timeout_s: float) -> tuple[bool, str]:
    """Healthy when any one of the targets answers; they are probed at once, in threads."""
    if not targets:
        return False, "nothing to probe"
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
        results = list(pool.map(lambda t: probe_one(t, timeout_s), targets))
    answered = [seen for ok, seen in results if ok]
    if answered:
        return True, answered[0]
    return False, "none answered: " + "; ".join(seen for _, seen in results)


def probe(check: HealthCheck) -> tuple[bool, str]:
    """Probe a check that needs no server (url, tcp, any_of); blocking, so run it in a thread.
    An agent check reads the agents bucket: its caller does that."""
    if check.url:
        return probe_http(check.url, check.timeout_s)
    if check.tcp:
        return probe_tcp(check.tcp, check.timeout_s)
    if check.any_of:
        return probe_any(check.any_of, check.timeout_s)
    return False, f"agent {check.agent}: needs the agents bucket"


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
    target = check.target
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
