"""Alert rules and the engine that turns samples into raised and resolved alerts.
Where alerts go besides the event stream (a webhook, notify-send) is mesh.host.alertsinks.

The engine is pure: samples and the time go in, changes come out; no I/O, no clock of its own.
An alert is one rule on one target (a GPU `<host>-gpu<N>`, a host, an agent id). A rule

- *fires* when its metric is `>= above` (or `< below`), and is raised once it has fired
  continuously for `for_s` seconds;
- *resolves* only once the metric is back past the threshold by `hysteresis`
  (`< above - hysteresis`, or `>= below + hysteresis`), so a reading that wanders around
  the threshold raises once and stays raised instead of flapping.

A reading the device does not offer (None) changes nothing.

Besides the thresholds on one reading, the default host rules watch for a CPU busy for long,
RAM running out, swap thrashing, a CPU governor other than `performance` on a GPU host, XID
errors and a stuck GPU (busy with a model, 0% utilisation for minutes); the metrics that need
more than one sample (swap per second, XIDs in a window) come from `mesh.alertderived`.

Rules come from the built-in defaults (`DEFAULT_RULES`) with the config's `[alerts.NAME]`
tables over them, field by field: `[alerts.gpu_temp_warn] above = 80` moves one threshold,
`enabled = false` turns a rule off, a new name with a `metric` adds a rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from mesh.alertderived import Derived
from mesh.events import AlertRaised, AlertResolved
from mesh.names import check_token
from mesh.samples import GpuSample, HostSample

Severity = Literal["info", "warn", "critical"]

# what each metric is read from: a GPU sample, a host sample, or an agent's registration
GPU_METRICS: dict[str, str] = {
    "gpu_temp_c": "°C",
    "gpu_util_pct": "%",
    "gpu_mem_used_pct": "%",
    "gpu_power_w": "W",
    "gpu_xid_errors": "",
    "gpu_ecc_errors": "",
    # XID events within alert_xid_window_s (mesh.alertderived)
    "gpu_xid_recent": "",
}
HOST_METRICS: dict[str, str] = {
    "disk_free_pct": "%",
    "cpu_pct": "%",
    "ram_used_pct": "%",
    "swap_used_pct": "%",
    "load1": "",
    "host_temp_c": "°C",
    # MB swapped in and out per second (mesh.alertderived)
    "swap_io_mb_s": " MB/s",
    # CPUs whose frequency governor is not `performance`, on a host with GPUs (None elsewhere,
    # and where cpufreq is absent)
    "cpus_not_performance": "",
}
AGENT_METRICS: dict[str, str] = {"heartbeat_age_s": "s"}
# read from the mesh's state: tasks waiting or ready in running plans; failed attempts of one task
# class within `failure_window_s`; GPU memory in use on a GPU whose worker holds no model and runs
# nothing (something outside mesh, or a stuck process, holds it); the utilisation of a GPU whose
# worker is busy with a model on it (a stuck GPU reads 0)
MESH_METRICS: dict[str, str] = {
    "queue_depth": "",
    "class_failures": "",
    "idle_gpu_mem_mb": " MB",
    "busy_gpu_util_pct": "%",
}
METRICS: dict[str, str] = {**GPU_METRICS, **HOST_METRICS, **AGENT_METRICS, **MESH_METRICS}
TEMPERATURE_METRICS = frozenset({"gpu_temp_c", "host_temp_c"})


class AlertRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    metric: str
    above: float | None = None
    below: float | None = None
    # None: `alert_hysteresis_c` for temperatures, else 0
    hysteresis: float | None = None
    for_s: float = 0.0
    severity: Severity = "warn"
    enabled: bool = True

    def fires(self, value: float) -> bool:
        if self.above is not None:
            return value >= self.above
        assert self.below is not None
        return value < self.below

    def clear(self, value: float, hysteresis: float) -> bool:
        if self.above is not None:
            return value < self.above - hysteresis
        assert self.below is not None
        return value >= self.below + hysteresis

    @property
    def threshold(self) -> float:
        value = self.above if self.above is not None else self.below
        assert value is not None
        return value


DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "gpu_temp_warn": {"metric": "gpu_temp_c", "above": 85.0, "severity": "warn"},
    "gpu_temp_critical": {"metric": "gpu_temp_c", "above": 90.0, "severity": "critical"},
    "disk_low": {"metric": "disk_free_pct", "below": 5.0, "hysteresis": 1.0, "severity": "critical"},
    "agent_silent": {"metric": "heartbeat_age_s", "above": 30.0, "severity": "warn"},
    "queue_deep": {"metric": "queue_depth", "above": 1000.0, "for_s": 300.0, "severity": "warn"},
    "task_failures": {"metric": "class_failures", "above": 3.0, "severity": "warn"},
    "idle_vram": {"metric": "idle_gpu_mem_mb", "above": 1024.0, "for_s": 300.0, "severity": "warn"},
    # the default host rules
    "cpu_high": {"metric": "cpu_pct", "above": 95.0, "for_s": 600.0, "hysteresis": 10.0, "severity": "warn"},
    "ram_low": {
        "metric": "ram_used_pct",
        "above": 95.0,
        "for_s": 60.0,
        "hysteresis": 3.0,
        "severity": "warn",
    },
    "swap_thrash": {"metric": "swap_io_mb_s", "above": 20.0, "for_s": 120.0, "severity": "warn"},
    "cpu_governor": {"metric": "cpus_not_performance", "above": 1.0, "severity": "warn"},
    "gpu_xid": {"metric": "gpu_xid_recent", "above": 1.0, "severity": "critical"},
    "gpu_stuck": {"metric": "busy_gpu_util_pct", "below": 1.0, "for_s": 300.0, "severity": "warn"},
}


class RuleError(ValueError):
    """A rule in the config that cannot work; the message names it."""


def build_rules(
    overrides: Mapping[str, Mapping[str, Any]], hysteresis_c: float = 5.0
) -> dict[str, AlertRule]:
    """The defaults with the config's tables over them, field by field; disabled rules left out."""
    merged: dict[str, dict[str, Any]] = {name: dict(d) for name, d in DEFAULT_RULES.items()}
    for name, fields in overrides.items():
        merged.setdefault(name, {}).update(fields)
    rules: dict[str, AlertRule] = {}
    for name, fields in merged.items():
        try:
            check_token(name, "alert rule name")
            rule = msgspec.convert(fields, AlertRule, strict=False)
        except (ValueError, msgspec.ValidationError) as exc:
            raise RuleError(f"alert rule {name!r}: {exc}") from exc
        if rule.metric not in METRICS:
            raise RuleError(
                f"alert rule {name!r}: unknown metric {rule.metric!r}; known: {', '.join(METRICS)}"
            )
        if (rule.above is None) == (rule.below is None):
            raise RuleError(f"alert rule {name!r}: set exactly one of above or below")
        if rule.hysteresis is None:
            rule = msgspec.structs.replace(
                rule, hysteresis=hysteresis_c if rule.metric in TEMPERATURE_METRICS else 0.0
            )
        if rule.enabled:
            rules[name] = rule
    return rules


@dataclass
class _State:
    pending_since: float | None = None
    raised_at: float | None = None


@dataclass(frozen=True)
class Change:
    """An alert raised or resolved."""

    kind: Literal["raised", "resolved"]
    rule: str
    target: str
    host: str
    metric: str
    severity: str
    value: float
    threshold: float
    at: float
    raised_at: float
    # what the sample says besides the value ("last XID 79", "governors: powersave x16")
    note: str = ""

    @property
    def message(self) -> str:
        unit = METRICS.get(self.metric, "")
        what = f"{self.metric} {self.value:g}{unit}"
        if self.kind == "raised":
            limit = f"{self.threshold:g}{unit}"
            note = f"; {self.note}" if self.note else ""
            return f"{self.severity.upper()} {self.rule} on {self.target}: {what} (threshold {limit}){note}"
        lasted = self.at - self.raised_at
        return f"resolved {self.rule} on {self.target}: {what} after {lasted:.0f}s"

    def event(self) -> AlertRaised | AlertResolved:
        if self.kind == "raised":
            return AlertRaised(
                rule=self.rule,
                target=self.target,
                host=self.host,
                metric=self.metric,
                severity=self.severity,
                value=self.value,
                threshold=self.threshold,
                at=self.at,
                message=self.message,
            )
        return AlertResolved(
            rule=self.rule,
            target=self.target,
            host=self.host,
            metric=self.metric,
            severity=self.severity,
            value=self.value,
            threshold=self.threshold,
            at=self.at,
            raised_at=self.raised_at,
            message=self.message,
        )


def gpu_metrics(s: GpuSample) -> dict[str, float | None]:
    return {
        "gpu_temp_c": s.temp_c,
        "gpu_util_pct": s.util_pct,
        "gpu_mem_used_pct": s.mem_used_pct,
        "gpu_power_w": s.power_w,
        "gpu_xid_errors": None if s.xid_errors is None else float(s.xid_errors),
        "gpu_ecc_errors": None if s.ecc_errors is None else float(s.ecc_errors),
    }


def host_metrics(s: HostSample, gpu_host: bool = False) -> dict[str, float | None]:
    slow = sum(n for governor, n in s.cpu_governors.items() if governor != "performance")
    return {
        "cpus_not_performance": float(slow) if gpu_host and s.cpu_governors else None,
        "disk_free_pct": s.disk_free_pct,
        "cpu_pct": s.cpu_pct,
        "ram_used_pct": 100.0 * s.ram_used_mb / s.ram_total_mb if s.ram_total_mb else None,
        "swap_used_pct": 100.0 * s.swap_used_mb / s.swap_total_mb if s.swap_total_mb else None,
        "load1": s.load1,
        "host_temp_c": max(s.temps.values()) if s.temps else None,
    }


class AlertEngine:
    """Rules over time. Feed it samples (and agents' last heartbeats); it returns the changes."""

    def __init__(self, rules: Mapping[str, AlertRule], xid_window_s: float = 3600.0) -> None:
        self.rules = dict(rules)
        self.derived = Derived(xid_window_s=xid_window_s)
        self._states: dict[tuple[str, str], _State] = {}
        # agent id -> (host, last seen_at)
        self._agents: dict[str, tuple[str, float]] = {}

    @property
    def active(self) -> dict[tuple[str, str], float]:
        """(rule, target) -> when raised, for every alert raised now."""
        return {k: s.raised_at for k, s in self._states.items() if s.raised_at is not None}

    def _evaluate(
        self,
        metrics: Mapping[str, float | None],
        target: str,
        host: str,
        now: float,
        notes: Mapping[str, str] | None = None,
    ) -> list[Change]:
        changes: list[Change] = []
        for name, rule in self.rules.items():
            if rule.metric not in metrics:
                continue
            value = metrics[rule.metric]
            if value is None:
                continue
            state = self._states.setdefault((name, target), _State())
            if state.raised_at is None:
                if not rule.fires(value):
                    state.pending_since = None
                    continue
                if state.pending_since is None:
                    state.pending_since = now
                if now - state.pending_since >= rule.for_s:
                    state.raised_at = now
                    note = (notes or {}).get(rule.metric, "")
                    changes.append(self._change("raised", name, rule, target, host, value, now, now, note))
            elif rule.clear(value, rule.hysteresis or 0.0):
                changes.append(
                    self._change("resolved", name, rule, target, host, value, now, state.raised_at)
                )
                state.raised_at = None
                state.pending_since = None
        return changes

    @staticmethod
    def _change(
        kind: Literal["raised", "resolved"],
        name: str,
        rule: AlertRule,
        target: str,
        host: str,
        value: float,
        now: float,
        raised_at: float,
        note: str = "",
    ) -> Change:
        return Change(
            kind=kind,
            rule=name,
            target=target,
            host=host,
            metric=rule.metric,
            severity=rule.severity,
            value=round(value, 3),
            threshold=rule.threshold,
            at=now,
            raised_at=raised_at,
            note=note,
        )

    def mesh(self, metrics: Mapping[str, float | None], target: str, host: str, now: float) -> list[Change]:
        """Readings of the mesh's state (queue depth, failures per class, idle GPU memory)."""
        return self._evaluate(metrics, target, host, now)

    def gpu(self, sample: GpuSample, now: float) -> list[Change]:
        metrics = {**gpu_metrics(sample), **self.derived.gpu(sample, now)}
        notes = {"gpu_xid_recent": f"last XID {sample.last_xid}"} if sample.last_xid is not None else {}
        return self._evaluate(metrics, sample.gpu_id, sample.host, now, notes)

    def host(self, sample: HostSample, now: float, gpu_host: bool = False) -> list[Change]:
        """The host's rules; `gpu_host`: it has GPUs (the CPU governor rule applies)."""
        metrics = {**host_metrics(sample, gpu_host), **self.derived.host(sample)}
        governors = ", ".join(f"{g} x{n}" for g, n in sorted(sample.cpu_governors.items()))
        notes = {"cpus_not_performance": f"governors: {governors}"} if governors else {}
        return self._evaluate(metrics, sample.host, sample.host, now, notes)

    def stuck(self, sample: GpuSample, busy: bool, now: float) -> list[Change]:
        """A GPU whose worker is busy with a model on it, by its utilisation (`busy_gpu_util_pct`).
        Not busy, the question is gone: an alert raised on it resolves and any wait restarts."""
        if busy:
            return self._evaluate({"busy_gpu_util_pct": sample.util_pct}, sample.gpu_id, sample.host, now)
        return self._absent("busy_gpu_util_pct", sample.gpu_id, sample.host, now, sample.util_pct or 0.0)

    def _absent(self, metric: str, target: str, host: str, now: float, value: float) -> list[Change]:
        changes: list[Change] = []
        for name, rule in self.rules.items():
            state = self._states.get((name, target))
            if rule.metric != metric or state is None:
                continue
            if state.raised_at is not None:
                changes.append(
                    self._change("resolved", name, rule, target, host, value, now, state.raised_at)
                )
            del self._states[(name, target)]
        return changes

    def agents(self, seen: Mapping[str, float], host: str, now: float) -> list[Change]:
        """Heartbeats: `seen` is each registered agent's `seen_at` now. An agent that was seen
        before and is missing now keeps aging from its last heartbeat (its key expired)."""
        for agent_id, seen_at in seen.items():
            _, last = self._agents.get(agent_id, (host, 0.0))
            self._agents[agent_id] = (host, max(last, seen_at))
        changes: list[Change] = []
        for agent_id, (agent_host, last) in self._agents.items():
            changes += self._evaluate({"heartbeat_age_s": max(0.0, now - last)}, agent_id, agent_host, now)
        return changes

    def forget_agent(self, agent_id: str, now: float) -> list[Change]:
        """An agent that stopped cleanly: no longer watched; an alert raised on it resolves."""
        entry = self._agents.pop(agent_id, None)
        changes: list[Change] = []
        for (name, target), state in list(self._states.items()):
            if target != agent_id:
                continue
            if state.raised_at is not None and entry is not None:
                rule = self.rules[name]
                changes.append(
                    self._change(
                        "resolved",
                        name,
                        rule,
                        target,
                        entry[0],
                        max(0.0, now - entry[1]),
                        now,
                        state.raised_at,
                    )
                )
            del self._states[(name, target)]
        return changes


def replace_rules(
    engine: AlertEngine, rules: Mapping[str, AlertRule]
) -> list[tuple[str, AlertRule, str, float]]:
    """A config reload's rules in place of the engine's. A rule whose name and metric stay keeps
    its state (a raised alert is judged by the new threshold at the next reading); the alerts
    raised under a rule removed (or disabled, or onto another metric) are dropped and returned,
    `(name, old rule, target, raised_at)`, for the caller to resolve."""
    gone: list[tuple[str, AlertRule, str, float]] = []
    for (name, target), state in list(engine._states.items()):
        old, new = engine.rules.get(name), rules.get(name)
        if old is not None and new is not None and new.metric == old.metric:
            continue
        if state.raised_at is not None and old is not None:
            gone.append((name, old, target, state.raised_at))
        del engine._states[(name, target)]
    engine.rules = dict(rules)
    return gone
