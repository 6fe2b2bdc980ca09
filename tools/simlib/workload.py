"""A simulated rig's workload, read from a TOML file: its GPUs, models, kinds of task, arrivals
(phases and bursts), GPU failures and policy overrides, and the tasks it submits for a seed.

The file's tables (every one is shown in `tools/workloads/steady.toml`):

- `[run]`: `duration_s` (arrivals stop then), `drain_s` (how much longer unfinished tasks may
  still run), `seed`.
- `[[gpus]]`: groups of cards (`count`, `vram_mb`, `name`), numbered in file order from 0.
- `[rig]`: `sets` (cards one worker owns together, e.g. `[[0, 3]]`: one GPU view whose VRAM is
  the sum), `base_mb` (memory a card uses at rest), `load_jitter` (a load takes its model's
  `load_s` times 1 ± this, uniformly), and the brain's and workers' timings (`tick_s`, `sweep_s`,
  `agent_ttl_s`, `ack_wait_s`), which default to mesh's settings.
- `[models.NAME]`: `kind` (llm, transcribe, embed), `vram_mb`, `load_s`.
- `[kinds.NAME]`: a kind of task: `body` (prompt, transcribe, embed, shell: a shell task runs in
  class script, on a GPU), `model` (for model bodies), `duration_s = [low, high]` (its true
  running time, uniform), `retries` (default 3).
- `[[phases]]`: consecutive, each `duration_s` long, with a `mix` (kind -> fraction) and either
  a target `load` (the busy share of the GPU views it asks for, from the mix's mean duration)
  or a `rate` (arrivals per second, Poisson).
- `[[bursts]]`: `count` tasks of one `kind` at `at_s`, all at once (one plan) or spread
  uniformly over `spread_s`.
- `[[failures]]`: the GPU view `unit` (its index; a set counts as one) dies at `at_s` and comes
  back `down_s` later; `report_offline` (default true): its worker still says `offline`.
- `[policy]`: overrides of the brain's `Policy` and `PlacementPolicy` fields by name.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.settings import Settings

# the body kinds a simulated task may have, and the class each runs in
BODIES: dict[str, str] = {"prompt": "llm", "transcribe": "script", "embed": "script", "shell": "script"}
# the model kind each model body needs
MODEL_OF_BODY: dict[str, str] = {"prompt": "llm", "transcribe": "transcribe", "embed": "embed"}
# the environment variable a simulated task carries its true duration in (the simulated worker
# reads it from the work item, as a real worker reads a body)
DURATION_ENV = "MESH_SIM_DURATION_S"


class WorkloadError(ValueError):
    """A workload file that cannot be simulated: what is wrong, and where."""


@dataclass(frozen=True)
class Model:
    name: str
    kind: str
    vram_mb: int
    load_s: float


@dataclass(frozen=True)
class Kind:
    name: str
    body: str
    model: str
    low_s: float
    high_s: float
    retries: int = 3

    @property
    def cls(self) -> str:
        return BODIES[self.body]

    @property
    def mean_s(self) -> float:
        return (self.low_s + self.high_s) / 2


@dataclass(frozen=True)
class Phase:
    start_s: float
    end_s: float
    mix: dict[str, float]
    # arrivals per second
    rate: float


@dataclass(frozen=True)
class Burst:
    at_s: float
    kind: str
    count: int
    spread_s: float = 0.0


@dataclass(frozen=True)
class Failure:
    unit: int
    at_s: float
    down_s: float
    report_offline: bool = True


@dataclass(frozen=True)
class Unit:
    """What one simulated worker owns: one card, or a set of cards seen as one GPU."""

    cards: tuple[int, ...]
    vram_mb: int
    name: str

    @property
    def gpu_id(self) -> str:
        return "sim-gpu" + "+".join(str(c) for c in self.cards)


@dataclass(frozen=True)
class Timing:
    """The brain's clock and the bus's timeouts (mesh's settings unless the workload says)."""

    tick_s: float
    sweep_s: float
    agent_ttl_s: float
    ack_wait_s: float
    max_deliveries: int
    llm_slots: int
    script_slots: int


@dataclass(frozen=True)
class Workload:
    name: str
    duration_s: float
    drain_s: float
    seed: int
    units: tuple[Unit, ...]
    models: dict[str, Model]
    kinds: dict[str, Kind]
    phases: tuple[Phase, ...]
    bursts: tuple[Burst, ...]
    failures: tuple[Failure, ...]
    timing: Timing
    base_mb: int = 0
    load_jitter: float = 0.1
    policy: dict[str, Any] = field(default_factory=dict)

    def fits(self, unit: Unit, model: str) -> bool:
        """Whether a model can ever be loaded on a unit (alone on it)."""
        return self.models[model].vram_mb <= unit.vram_mb - self.base_mb

    def units_for(self, kind: Kind) -> int:
        """How many GPU views can run a task of this kind."""
        if not kind.model:
            return len(self.units)
        return sum(1 for u in self.units if self.fits(u, kind.model))


@dataclass(frozen=True)
class Task:
    plan_id: str
    task_id: str
    kind: str
    at: float
    duration_s: float
    # where it comes from: ('phase', n) or ('burst', n), n counting from 0 in file order
    origin: tuple[str, int] = ("phase", 0)

    @property
    def key(self) -> str:
        return f"{self.plan_id}.{self.task_id}"


# reading -------------------------------------------------------------------------------------


def _num(table: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WorkloadError(f"{where}: {key} must be a number, not {value!r}")
    return float(value)


def load(path: str | Path) -> Workload:
    """Read a workload file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise WorkloadError(f"{path}: {exc}") from exc
    return parse(data, path.stem)


def parse(data: dict[str, Any], name: str) -> Workload:
    """Build a workload from the TOML file's data."""
    known = {"run", "gpus", "rig", "models", "kinds", "phases", "bursts", "failures", "policy"}
    extra = sorted(set(data) - known)
    if extra:
        raise WorkloadError(f"{name}: unknown table(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
    run = data.get("run", {})
    rig = data.get("rig", {})
    defaults = Settings()
    models = {
        m: Model(
            m, str(t.get("kind", "llm")), int(_num(t, "vram_mb", f"models.{m}")), _num(t, "load_s", m, 5.0)
        )
        for m, t in data.get("models", {}).items()
    }
    for m in models.values():
        if m.kind not in ("llm", "transcribe", "embed"):
            raise WorkloadError(f"{name}: model {m.name} has kind {m.kind!r}, not llm, transcribe or embed")
    kinds = {k: _kind(name, k, t, models) for k, t in data.get("kinds", {}).items()}
    units = _units(name, data.get("gpus", []), rig.get("sets", []))
    duration_s = _num(run, "duration_s", f"{name}: run", 3600.0)
    phases = _phases(name, data.get("phases", []), kinds, len(units))
    bursts = tuple(
        Burst(
            _num(b, "at_s", "burst"),
            str(b["kind"]),
            int(_num(b, "count", "burst")),
            _num(b, "spread_s", "burst", 0),
        )
        for b in data.get("bursts", [])
    )
    for b in bursts:
        if b.kind not in kinds:
            raise WorkloadError(f"{name}: a burst names kind {b.kind!r}; kinds: {', '.join(sorted(kinds))}")
    failures = tuple(
        Failure(
            int(_num(f, "unit", "failure")),
            _num(f, "at_s", "failure"),
            _num(f, "down_s", "failure"),
            bool(f.get("report_offline", True)),
        )
        for f in data.get("failures", [])
    )
    for f in failures:
        if not 0 <= f.unit < len(units):
            raise WorkloadError(f"{name}: a failure names unit {f.unit}; there are {len(units)}")
    timing = Timing(
        tick_s=_num(rig, "tick_s", "rig", defaults.tick_s),
        sweep_s=_num(rig, "sweep_s", "rig", defaults.sweep_s),
        agent_ttl_s=_num(rig, "agent_ttl_s", "rig", defaults.agent_ttl_s),
        ack_wait_s=_num(rig, "ack_wait_s", "rig", defaults.ack_wait_s),
        max_deliveries=int(_num(rig, "max_deliveries", "rig", defaults.max_deliveries)),
        llm_slots=int(_num(rig, "llm_slots", "rig", defaults.llm_slots)),
        script_slots=int(_num(rig, "script_slots", "rig", defaults.script_slots)),
    )
    return Workload(
        name=name,
        duration_s=duration_s,
        drain_s=_num(run, "drain_s", "run", 4 * 3600.0),
        seed=int(_num(run, "seed", "run", 1)),
        units=units,
        models=models,
        kinds=kinds,
        phases=phases,
        bursts=bursts,
        failures=failures,
        timing=timing,
        base_mb=int(_num(rig, "base_mb", "rig", 0)),
        load_jitter=_num(rig, "load_jitter", "rig", 0.1),
        policy=dict(data.get("policy", {})),
    )


def _kind(name: str, k: str, t: dict[str, Any], models: dict[str, Model]) -> Kind:
    body = str(t.get("body", "shell"))
    if body not in BODIES:
        raise WorkloadError(f"{name}: kind {k} has body {body!r}; bodies: {', '.join(BODIES)}")
    model = str(t.get("model", ""))
    need = MODEL_OF_BODY.get(body)
    if need is None and model:
        raise WorkloadError(f"{name}: kind {k} is a shell task and names a model")
    if need is not None and (model not in models or models[model].kind != need):
        raise WorkloadError(f"{name}: kind {k} ({body}) needs a {need} model from [models], not {model!r}")
    dur = t.get("duration_s", [1.0, 1.0])
    low, high = (float(dur), float(dur)) if isinstance(dur, int | float) else (float(dur[0]), float(dur[1]))
    if not 0 < low <= high:
        raise WorkloadError(f"{name}: kind {k} has duration_s {dur!r}; want [low, high] with 0 < low <= high")
    return Kind(k, body, model, low, high, int(t.get("retries", 3)))


def _units(name: str, groups: list[dict[str, Any]], sets: list[list[int]]) -> tuple[Unit, ...]:
    cards: list[tuple[int, str]] = []
    for g in groups:
        for _ in range(int(_num(g, "count", "gpus", 1))):
            cards.append((int(_num(g, "vram_mb", "gpus")), str(g.get("name", "GPU"))))
    if not cards:
        raise WorkloadError(f"{name}: no [[gpus]]")
    in_set: dict[int, int] = {}
    for n, members in enumerate(sets):
        for c in members:
            if not 0 <= c < len(cards) or c in in_set:
                raise WorkloadError(
                    f"{name}: set {members} names card {c} twice or past the {len(cards)} cards"
                )
            in_set[c] = n
    units: list[Unit] = []
    done: set[int] = set()
    for c in range(len(cards)):
        if c in done:
            continue
        owned = tuple(sorted(sets[in_set[c]])) if c in in_set else (c,)
        done.update(owned)
        units.append(Unit(owned, sum(cards[m][0] for m in owned), " + ".join(cards[m][1] for m in owned)))
    return tuple(units)


def _phases(name: str, tables: list[dict[str, Any]], kinds: dict[str, Kind], units: int) -> tuple[Phase, ...]:
    phases: list[Phase] = []
    start = 0.0
    for n, t in enumerate(tables):
        where = f"{name}: phase {n + 1}"
        length = _num(t, "duration_s", where)
        mix = {str(k): float(v) for k, v in t.get("mix", {}).items() if float(v) > 0}
        unknown = sorted(set(mix) - set(kinds))
        if unknown or not mix:
            raise WorkloadError(
                f"{where}: mix names {unknown or 'nothing'}; kinds: {', '.join(sorted(kinds))}"
            )
        total = sum(mix.values())
        mix = {k: v / total for k, v in mix.items()}
        if "rate" in t:
            rate = _num(t, "rate", where)
        else:
            mean_s = sum(f * kinds[k].mean_s for k, f in mix.items())
            rate = _num(t, "load", where) * units / mean_s
        phases.append(Phase(start, start + length, mix, rate))
        start += length
    return tuple(phases)


# the tasks of one seed -----------------------------------------------------------------------


def tasks_of(w: Workload, seed: int) -> list[Task]:
    """Every task the workload submits for `seed`, in arrival order. Tasks arriving at one
    instant form one plan."""
    rng = random.Random(f"{w.name}:{seed}:arrivals")
    raw: list[tuple[float, int, str, tuple[str, int]]] = []  # (at, group, kind, origin); a group is a plan
    group = 0
    for n, phase in enumerate(w.phases):
        kinds = sorted(phase.mix)
        weights = [phase.mix[k] for k in kinds]
        at = phase.start_s
        while phase.rate > 0:
            at += rng.expovariate(phase.rate)
            if at >= min(phase.end_s, w.duration_s):
                break
            group += 1
            raw.append((at, group, rng.choices(kinds, weights)[0], ("phase", n)))
    for n, burst in enumerate(w.bursts):
        group += 1
        for _ in range(burst.count):
            if burst.spread_s > 0:
                group += 1
                raw.append((burst.at_s + rng.uniform(0, burst.spread_s), group, burst.kind, ("burst", n)))
            else:
                raw.append((burst.at_s, group, burst.kind, ("burst", n)))
    raw.sort(key=lambda r: (r[0], r[1]))
    out: list[Task] = []
    plans: dict[int, str] = {}
    for n, (at, g, kind, origin) in enumerate(raw):
        plan_id = plans.setdefault(g, f"p{len(plans) + 1:05d}")
        k = w.kinds[kind]
        duration = round(rng.uniform(k.low_s, k.high_s), 3)
        out.append(Task(plan_id, f"t{n + 1:05d}", kind, at, duration, origin))
    return out
