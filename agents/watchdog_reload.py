"""The watchdog's live configuration: on SIGHUP (`systemctl reload mesh-watchdog`) it reads its
config file and environment again and applies what can change without a restart.

What reloads: alert rules and their thresholds (`[alerts.NAME]`, `alert_*`), the alert sinks,
thermal pause and resume, health checks (`[health.NAME]`), power caps (`[gpus]`) and the
failure window. A new config that does not load (bad TOML, a bad rule, a cap that is not a
number) is refused with its error: logged, and raised as a `config_reload` alert (resolved by
the next good reload), while the old config stays in force. Anything else that changed (the
server, credentials, the prefix, the data directory...) is logged as needing a restart and
keeps its old value.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from agents.base import Agent
from agents.watchdog_power import PowerControl
from mesh.alerts import AlertEngine, build_rules, replace_rules
from mesh.errors import MeshError
from mesh.events import AlertRaised, AlertResolved
from mesh.health import Tracker
from mesh.host.alertsinks import Sinks
from mesh.host.telemetry import GpuSource
from mesh.settings import Settings

log = logging.getLogger("mesh.watchdog.reload")

RULE = "config_reload"
# the settings a reload applies: these names, and every name starting with one of PREFIXES
LIVE = frozenset({"health", "gpus", "failure_window_s", "watchdog_mesh_rules"})
PREFIXES = ("alert", "thermal_")


def live(name: str) -> bool:
    """Whether a reload applies setting `name` (the others wait for a restart)."""
    return name in LIVE or name.startswith(PREFIXES)


def merged(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """The settings in force after a reload: the live ones from `new`, the rest from `old`; and
    the names of the live settings that changed, and of the others that changed (ignored)."""
    applied: list[str] = []
    waiting: list[str] = []
    keep: dict[str, Any] = {}
    for name in Settings.__struct_fields__:
        if getattr(old, name) == getattr(new, name):
            continue
        if live(name):
            applied.append(name)
        else:
            waiting.append(name)
            keep[name] = getattr(old, name)
    return msgspec.structs.replace(new, **keep), applied, waiting


class Reloading(Agent):
    """The watchdog's config reload, as a class the watchdog is made of (agents/watchdog.py
    sets these attributes and implements the alert methods)."""

    tel_host: str
    source: GpuSource | None
    engine: AlertEngine
    sinks: Sinks
    health: list[Tracker]
    power: PowerControl
    _health_raised: dict[tuple[str, str], float]
    # reads the settings again (the CLI's loader); None: no reload
    loader: Callable[[], Settings] | None = None

    def _queue_alert(self, ev: AlertRaised | AlertResolved) -> None:
        raise NotImplementedError

    def _raise(self, rule: str, target: str, severity: str, message: str) -> AlertRaised:
        raise NotImplementedError

    async def flush_alerts(self) -> None:
        raise NotImplementedError

    def _resolve(
        self, rule: str, target: str, raised_at: float, metric: str, message: str, now: float
    ) -> None:
        """Queue the resolution of alert `rule` on `target`, raised at `raised_at`."""
        self._queue_alert(
            AlertResolved(
                rule=rule,
                target=target,
                host=self.tel_host,
                severity="info",
                at=now,
                raised_at=raised_at,
                metric=metric,
                message=message,
            )
        )

    async def _health_loop(self) -> None:
        raise NotImplementedError

    def reload_requested(self) -> None:
        """SIGHUP: read the config again and apply what can change live."""
        if self.loader is None:
            super().reload_requested()
            return
        self.spawn(self.reload_config(self.loader), "reload")

    async def reload_config(self, load: Callable[[], Settings]) -> bool:
        """Read the config again and apply it; False (and the old config kept) when it is refused."""
        now = time.time()
        try:
            new = await asyncio.to_thread(load)
            settings, applied, waiting = merged(self.settings, new)
            rules = build_rules(settings.alerts, settings.alert_hysteresis_c)
        except (MeshError, ValueError, OSError) as exc:
            message = f"the new config was refused, the old one stays in force: {exc}"
            log.error("reload: %s", message)
            if (RULE, self.tel_host) not in self._health_raised:
                self._queue_alert(self._raise(RULE, self.tel_host, "critical", message))
            await self.flush_alerts()
            return False
        self.settings = settings
        for name, rule, target, raised_at in replace_rules(self.engine, rules):
            gone = f"resolved {name} on {target}: the rule is no longer in the config"
            self._resolve(name, target, raised_at, rule.metric, gone, now)
        self.sinks = Sinks.from_settings(settings, self.tel_host)
        self.engine.derived.xid_window_s = settings.alert_xid_window_s
        _reload_health(self, settings, now)
        self.power.caps = settings.power_caps()
        if (RULE, self.tel_host) in self._health_raised:
            raised_at = self._health_raised.pop((RULE, self.tel_host))
            self._resolve(RULE, self.tel_host, raised_at, "health", "a new config was loaded", now)
        if waiting:
            log.warning(
                "reload: %s changed; these take effect when the watchdog restarts", ", ".join(waiting)
            )
        log.warning(
            "reload: config read again; applied %s", ", ".join(applied) or "nothing (no live setting changed)"
        )
        await self.flush_alerts()
        # the new caps at once, not at the next round
        await self.power.enforce(sorted({*self.power.applied, *range(await asyncio.to_thread(_count, self))}))
        return True


def _count(wd: Reloading) -> int:
    source = wd.source
    try:
        return source.count() if source is not None else 0
    except Exception:
        return 0


def _reload_health(wd: Reloading, settings: Settings, now: float) -> None:
    """The health checks: a check unchanged keeps its state, a new or changed one starts afresh;
    the alerts of one removed or changed resolve."""
    old = {t.name: t for t in wd.health}
    kept = {name for name, check in settings.health.items() if name in old and old[name].check == check}
    wd.health = [
        old[name] if name in kept else Tracker(name, check) for name, check in sorted(settings.health.items())
    ]
    # a check removed or changed starts afresh: what its old form raised resolves
    for (rule, target), raised_at in list(wd._health_raised.items()):
        if rule in ("health", "restart_loop") and target not in kept:
            del wd._health_raised[(rule, target)]
            gone = f"health check {target} removed or changed in the config"
            wd._resolve(rule, target, raised_at, "health", gone, now)
    if wd.health and not any(t.get_name().endswith(":health") for t in wd._background):
        wd.spawn(wd._health_loop(), "health")
