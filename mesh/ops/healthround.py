"""`mesh health`: one round of the configured health checks, its alerts raised or resolved
through the sinks and, where the server answers, on the event stream as the watchdog's are.

The sinks are the log, a webhook, e-mail and notify-send; what they fail to take is spooled.

Rounds remember which checks they raised an alert for (`<data_dir>/health/raised.json`), so a
check that stays down is raised once and resolved when it is healthy again, not every minute.
Alerts an earlier round (or the watchdog) could not deliver are tried again first; one the
server did not take goes to the spool as sink `stream`, published by a later round (or the
watchdog).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from mesh.bus import client
from mesh.bus.connect import connect
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.errors import MeshError
from mesh.health import HealthCheck, Result, round_alerts
from mesh.host.alertsinks import Sinks
from mesh.host.alertspool import Spool, for_stream, publish_spooled, spool_path
from mesh.host.health import Verdict, check_once, probe
from mesh.host.telemetry import host_token
from mesh.settings import Settings

log = logging.getLogger("mesh.health")


def state_path(data_dir: str) -> Path:
    return Path(data_dir) / "health" / "raised.json"


def load_raised(path: Path) -> dict[str, float]:
    """Check name -> when its alert was raised, as the last round left it ({} if unreadable)."""
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("cannot read %s (%s): starting with no alerts raised", path, exc)
        return {}


def save_raised(path: Path, raised: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(raised, sort_keys=True))
    os.replace(tmp, path)


class Round:
    """What a round did besides its verdicts: alerts raised and resolved, where they went."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.alerts = 0
        self.published = 0
        self.not_published = ""
        self.undelivered = 0
        self.spool_delivered = 0
        self.stream_delivered = 0


async def health_round(s: Settings, now: float, host: str | None = None) -> Round:
    """Probe every check (restarting what stays unhealthy), then raise and resolve their alerts."""
    done = Round()
    sinks = Sinks.from_settings(s, host_token(host))
    try:
        done.spool_delivered, _ = await sinks.retry_spool()
    except OSError as exc:
        log.warning("retrying the alert spool failed: %r", exc)
    async with contextlib.AsyncExitStack() as stack:
        bus: Bus | None = None
        bus_error = ""
        try:
            bus = await stack.enter_async_context(_connected(s))
        except MeshError as exc:
            bus_error = str(exc)
        spool = Spool(spool_path(s.data_dir))
        if bus is not None:
            done.stream_delivered, _ = await publish_spooled(spool, bus.emit, TRANSIENT)

        async def check(c: HealthCheck) -> tuple[bool, str]:
            if not c.agent:
                return await asyncio.to_thread(probe, c)
            if bus is None:
                return False, f"cannot read the agents bucket: {bus_error}"
            return await client.agent_registered(bus, c.agent)

        done.verdicts = list(
            await asyncio.gather(*(check_once(n, c, check) for n, c in sorted(s.health.items())))
        )
        path = state_path(s.data_dir)
        results = [Result(v.name, v.target, v.healthy, v.detail) for v in done.verdicts]
        alerts, raised = round_alerts(results, load_raised(path), host_token(host), now)
        done.alerts = len(alerts)
        if alerts:
            save_raised(path, raised)
        delivered = await asyncio.gather(*(sinks.deliver(ev) for ev in alerts))
        done.undelivered = sum(not ok for ok in delivered)
        for ev in alerts:
            if bus is not None and not done.not_published:
                try:
                    await bus.emit(ev)
                    done.published += 1
                    continue
                except TRANSIENT as exc:
                    done.not_published = repr(exc)
            done.not_published = done.not_published or bus_error
            await asyncio.to_thread(spool.add, for_stream(ev, done.not_published))
        if done.not_published:
            log.error(
                "%d alert(s) not published to the event stream (%s): kept in %s for the next round",
                done.alerts - done.published,
                done.not_published,
                spool.path,
            )
    return done


@contextlib.asynccontextmanager
async def _connected(s: Settings) -> AsyncIterator[Bus]:
    bus = await connect(s, "mesh-health")
    try:
        yield bus
    finally:
        await bus.close()
