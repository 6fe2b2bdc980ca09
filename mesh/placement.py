"""Hot and cold: which GPUs hold which LLM. Pure, no I/O; part of the brain's state machine.

The brain sees every GPU through its worker's `gpu.state` events and counts the
work waiting for each model. On every tick `place` decides loads and unloads:

- an LLM is loaded on as many GPUs as its waiting work justifies: its share of
  all waiting model work (LLM and script), at least one GPU while any of its
  work waits, never more GPUs than it has waiting tasks;
- only on a GPU that is idle, live, not paused, and has the model's VRAM free
  (a GPU holding another LLM with no work left is unloaded first);
- a loaded LLM goes when nothing has used it for `keep_alive_s`;
- an LLM with no work left gives its GPU to other waiting work (script tasks,
  another model) once unused for `yield_after_s`, or three times its last load
  time if that is longer: a GPU never spends more than about a quarter of its
  time loading, however work alternates;
- an LLM that still has work gives up GPUs beyond its share to other work only
  after `min_residency_s` since its load (a load costs minutes);
- one request per GPU at a time; a request never answered is given up after
  `load_timeout_s` and decided again.

A model's VRAM and load time are the learned figures (`mesh.learned`) once enough loads were
seen, the configured `vram_mb` and the GPU's last load time until then.

Decisions are `ResourceRequested` events (the history says what the brain asked
and why) and `ResourceItem`s sent to the chosen worker's own queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh.events import GpuState, ResourceItem, ResourceRequested
from mesh.learned import Learned

# GPU states (written by the GPU's worker)
IDLE = "idle"
BOOTING_LLM = "booting_llm"
LLM_READY = "llm_ready"
LLM_BUSY = "llm_busy"
BOOTING_SCRIPT = "booting_script"
SCRIPT_BUSY = "script_busy"
PAUSED = "paused"
OFFLINE = "offline"
HOLDS_LLM = frozenset({BOOTING_LLM, LLM_READY, LLM_BUSY})

SCRIPT = "script"


def llm_demand_key(model: str) -> str:
    return f"llm:{model}"


@dataclass(frozen=True)
class PlacementPolicy:
    # model name -> (kind, VRAM needed in MB)
    models: dict[str, tuple[str, int]] = field(default_factory=dict)
    keep_alive_s: float = 600.0
    min_residency_s: float = 300.0
    load_timeout_s: float = 900.0
    yield_after_s: float = 10.0


@dataclass
class GpuView:
    """What the brain knows of one GPU."""

    gpu: str
    worker: str
    state: str = IDLE
    llm: str = ""
    vram_total_mb: int = 0
    vram_used_mb: int = 0
    # used by mesh's own script models (freed before an LLM loads)
    vram_reserved_mb: int = 0
    llm_slots: int = 1
    live: bool = True
    loaded_at: float = 0.0
    last_used: float = 0.0
    # how long the last LLM load took here
    load_s: float = 0.0
    # the request in flight: (action, model, rid, at)
    pending: tuple[str, str, str, float] | None = None
    # a load this GPU refused, and when: not asked again until load_timeout_s passed
    refused: dict[str, float] = field(default_factory=dict)

    @property
    def free_for_llm_mb(self) -> int:
        """VRAM an LLM could have here once mesh's own script models are unloaded."""
        return self.vram_total_mb - self.vram_used_mb + self.vram_reserved_mb

    @property
    def usable(self) -> bool:
        return self.live and self.state not in (PAUSED, OFFLINE)


def observe(gpus: dict[str, GpuView], ev: GpuState) -> None:
    """Fold a worker's GPU report into the brain's view."""
    view = gpus.get(ev.gpu)
    if view is None:
        view = gpus[ev.gpu] = GpuView(gpu=ev.gpu, worker=ev.worker)
    view.worker = ev.worker
    was, was_llm = view.state, view.llm
    view.state = ev.state
    view.llm = ev.llm
    view.vram_total_mb = ev.vram_total_mb
    view.vram_used_mb = ev.vram_used_mb
    view.vram_reserved_mb = ev.vram_reserved_mb
    view.llm_slots = max(ev.llm_slots, 1)
    view.live = ev.state != OFFLINE
    if (
        ev.llm
        and ev.state in (LLM_READY, LLM_BUSY)
        and (was not in (LLM_READY, LLM_BUSY) or was_llm != ev.llm)
    ):
        view.loaded_at = ev.at
        view.last_used = ev.at
    if ev.previous == BOOTING_LLM and ev.state in (LLM_READY, LLM_BUSY):
        view.load_s = ev.took_s
    if ev.state == LLM_BUSY or (was == LLM_BUSY and ev.state == LLM_READY):
        view.last_used = ev.at
    if view.pending is not None:
        action, model, rid, _ = view.pending
        if not ev.previous:
            # the worker (re)started: whatever it was asked before is gone with its old process
            view.pending = None
        elif ev.error and (not ev.rid or ev.rid == rid):
            if action == "load":
                view.refused[model] = ev.at
            view.pending = None
        else:
            loaded = action == "load" and ev.llm == model and ev.state in (LLM_READY, LLM_BUSY)
            unloaded = action == "unload" and not ev.llm and ev.state not in HOLDS_LLM
            if loaded or unloaded or ev.state == OFFLINE:
                view.pending = None


@dataclass
class Decision:
    events: list[ResourceRequested] = field(default_factory=list)
    items: list[ResourceItem] = field(default_factory=list)
    # models no known GPU could ever hold: (model, need MB, largest GPU MB). A set of GPUs one
    # worker owns is one GPU here, its memory the cards' sum: a model bigger than any card is
    # placed on a set that holds it
    unplaceable: list[tuple[str, int, int]] = field(default_factory=list)


def place(
    gpus: dict[str, GpuView],
    demand: dict[str, int],
    now: float,
    policy: PlacementPolicy,
    learned: Learned | None = None,
) -> Decision:
    """Decide loads and unloads for the waiting work. Changes only the views' `pending`.
    `learned`: measured VRAM and load times, used in place of the configured ones."""
    out = Decision()
    figures = learned if learned is not None else Learned()

    def need_mb(model: str) -> int:
        return figures.vram_mb(model, policy.models[model][1])

    for view in gpus.values():
        if view.pending is not None and now - view.pending[3] >= policy.load_timeout_s:
            view.pending = None
        for model, at in list(view.refused.items()):
            if now - at >= policy.load_timeout_s:
                del view.refused[model]
    usable = sorted((v for v in gpus.values() if v.usable), key=lambda v: v.gpu)
    if not usable:
        return out
    llm_wait = {
        key.split(":", 1)[1]: n
        for key, n in sorted(demand.items())
        if key.startswith("llm:") and n > 0 and key.split(":", 1)[1] in policy.models
    }
    script_wait = demand.get(SCRIPT, 0)
    total_wait = sum(llm_wait.values()) + script_wait
    n = len(usable)

    def holders(model: str) -> list[GpuView]:
        return [
            v
            for v in usable
            if (
                v.llm == model
                and v.state in HOLDS_LLM
                # one whose unload is already asked for (waiting for its running task) is going
                and not (v.pending is not None and v.pending[0] == "unload" and v.pending[1] == model)
            )
            or (v.pending is not None and v.pending[0] == "load" and v.pending[1] == model)
        ]

    want: dict[str, int] = {}
    for model, waiting in llm_wait.items():
        share = round(n * waiting / total_wait) if total_wait else 0
        slots = max(1, min(v.llm_slots for v in usable))
        want[model] = max(1, min(share, math.ceil(waiting / slots), n))

    def request(view: GpuView, action: str, model: str, reason: str) -> None:
        # the bus deduplicates on it (Nats-Msg-Id): two different requests never share one
        rid = f"{view.gpu}-{action}-{model}-{int(now * 1000)}"
        view.pending = (action, model, rid, now)
        out.events.append(
            ResourceRequested(
                gpu=view.gpu, worker=view.worker, action=action, model=model, rid=rid, at=now, reason=reason
            )
        )
        # a load says the VRAM it was placed by (learned or configured): the worker checks that
        vram = need_mb(model) if action == "load" and model in policy.models else 0
        out.items.append(
            ResourceItem(
                rid=rid,
                worker=view.worker,
                action=action,  # type: ignore[arg-type]
                model=model,
                at=now,
                reason=reason,
                vram_mb=vram,
            )
        )

    def unloadable(view: GpuView) -> bool:
        return (
            view.pending is None
            and view.state == LLM_READY
            and now - view.loaded_at >= policy.min_residency_s
        )

    def yieldable(view: GpuView) -> bool:
        """An LLM with no work left, unused long enough to hand its GPU to other work."""
        return (
            view.pending is None
            and view.state == LLM_READY
            and view.llm not in llm_wait
            and now - view.last_used >= max(policy.yield_after_s, 3 * figures.load_s(view.llm, view.load_s))
        )

    # unload what nobody used for keep_alive_s
    for view in usable:
        if (
            view.pending is None
            and view.state == LLM_READY
            and view.llm not in llm_wait
            and now - view.last_used >= policy.keep_alive_s
        ):
            request(
                view,
                "unload",
                view.llm,
                f"unused for {now - view.last_used:.0f}s (keep_alive {policy.keep_alive_s:g}s)",
            )

    # loads, most waiting work first
    for model in sorted(llm_wait, key=lambda m: (-llm_wait[m], m)):
        need = need_mb(model)
        have = len(holders(model))
        if have >= want[model]:
            continue
        largest = max((v.vram_total_mb for v in gpus.values()), default=0)
        if need > largest:
            out.unplaceable.append((model, need, largest))
            continue
        for view in sorted(usable, key=lambda v: (-v.free_for_llm_mb, v.gpu)):
            if have >= want[model]:
                break
            if view.pending is not None or model in view.refused or view.free_for_llm_mb < need:
                continue
            if view.state == IDLE and not view.llm:
                request(
                    view, "load", model, f"{llm_wait[model]} {model} task(s) waiting, {have} GPU(s) hold it"
                )
                have += 1
            elif view.llm != model and yieldable(view) and view.vram_total_mb >= need:
                # another LLM with no work left: make room (the load follows once it is idle)
                request(view, "unload", view.llm, f"{model} has {llm_wait[model]} task(s) waiting")

    # give GPUs back to script work (or another model) when an LLM holds more than its share
    def others_could_use(view: GpuView) -> bool:
        """Other waiting work could run on this GPU once it is free: script work, or a model
        short of GPUs that fits here (one that fits no such GPU is no reason to unload it)."""
        return script_wait > 0 or any(
            m != view.llm and len(holders(m)) < want[m] and view.vram_total_mb >= need_mb(m) for m in llm_wait
        )

    for model in sorted(llm_wait):
        extra = len(holders(model)) - want[model]
        for view in sorted(holders(model), key=lambda v: (v.loaded_at, v.gpu)):
            if extra <= 0:
                break
            if unloadable(view) and others_could_use(view):
                request(view, "unload", model, f"other work waits; {model} keeps {want[model]} GPU(s)")
                extra -= 1
    for view in usable:
        if view.llm and yieldable(view) and others_could_use(view):
            request(view, "unload", view.llm, "no work left for it and other work waits")
    return out
