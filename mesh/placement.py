"""Hot and cold: which GPUs hold which LLM. Pure, no I/O; part of the brain's state machine.

The brain sees every GPU through its worker's `gpu.state` events and counts the model work
waiting, running and arriving, per LLM model and for script work (a *class* each). On every tick
`place` decides loads and unloads (docs/gpus.md, "Hot and cold", says why each rule is there):

0. each class gets a *share* of the usable GPUs (`mesh.placement_need.allocate`): one GPU for
   each class with work, the rest by need per GPU, none beyond what its work of the last while
   kept busy, a GPU staying with its class unless another's need per GPU is well above;
   a model no usable GPU can hold takes no share (one no known GPU can hold is reported);
1. an LLM nobody used for `keep_alive_s` goes when no other work wants its GPU, unless it is
   its model's last GPU (`keep_warm`);
2. a free GPU (no LLM) is loaded with an LLM with work waiting when it is in that LLM's
   share, or idle in nobody's share while the waiting work gives each of the model's GPUs, the
   new one included, at least `grow_factor` load times of work; the smallest GPU that holds it,
   an idle one first. One of its share that runs script work is asked too when script tasks
   take no longer than the model's load: its worker takes no more script work and loads once
   the task running ends;
3. a GPU in another class's share, whose LLM has no work waiting (and that rule 4 does not move
   first), goes to that class's waiting work once unused `yield_factor` load times (at least
   `yield_after_s`), unless its model's work of the last while keeps it: the model's work is
   between bursts, not stopped, or the other class is an LLM already served somewhere (a swap
   costs a load now and likely one later);
   ... except a *loan*: a GPU in the share of an LLM with no work waiting or running, unused as
   long, goes to another class whose waiting work gives it at least `lend_factor` times the
   loan's cost (loading the borrower's model now, the lender's when its work is back); a free
   GPU in such a share is loaded for the borrower on the same terms; script work's GPUs are
   never lent (its work trickles back);
4. a GPU in the share of another class with work waiting, while its LLM holds more GPUs than
   its share, goes once it has been loaded `min_residency_s`, whether its LLM has work waiting
   or not; if it runs one of its LLM's tasks it is asked at once and goes after that task (its
   worker takes no more of them: a *drain*), since a GPU its model keeps busy would never be
   found idle. Any other GPU in another class's share whose LLM still has work goes, idle,
   once it has been loaded `min_residency_s`, on the same terms against another LLM;
5. a GPU changes hands for another class only after being in its share `settle_s` (at once for
   work no GPU serves); one request per GPU at a time; a request never answered is given up
   after `load_timeout_s` and decided again.

A model's VRAM, load time and task durations are the learned figures (`mesh.learned`) once
enough were seen; until then the configured `vram_mb`, the GPU's last load time and the
policy's priors.

Decisions are `ResourceRequested` events (the history says what the brain asked and why) and
`ResourceItem`s sent to the chosen worker's own queue.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.events import GpuState, ResourceItem, ResourceRequested
from mesh.placement_need import SCRIPT_DURATION_KEY, Figures, Pressure, Priors, Work, allocate
from mesh.settings import Settings

__all__ = ["Figures", "GpuView", "PlacementPolicy", "Pressure", "observe", "place"]

# GPU states (written by the GPU's worker)
IDLE = "idle"
BOOTING_LLM = "booting_llm"
LLM_READY = "llm_ready"
LLM_BUSY = "llm_busy"
BOOTING_SCRIPT = "booting_script"
SCRIPT_BUSY = "script_busy"
# fetching a model's file from the models bucket into this host's cache, before its load: a
# load under way (never idle, never free for another LLM)
FETCHING = "fetching"
PAUSED = "paused"
OFFLINE = "offline"
HOLDS_LLM = frozenset({FETCHING, BOOTING_LLM, LLM_READY, LLM_BUSY})
ACTIVE = frozenset({FETCHING, BOOTING_LLM, LLM_BUSY, BOOTING_SCRIPT, SCRIPT_BUSY})

SCRIPT = "script"


def llm_demand_key(model: str) -> str:
    return f"llm:{model}"


@dataclass(frozen=True)
class PlacementPolicy:
    """Placement's settings (`mesh.settings.Settings`: the same names, `placement_` before the
    new ones); the defaults are the settings' (`PlacementPolicy.of` builds one from them)."""

    # model name -> (kind, VRAM needed in MB)
    models: dict[str, tuple[str, int]] = field(default_factory=dict)
    keep_alive_s: float = 600.0
    keep_warm: bool = True
    min_residency_s: float = 300.0
    load_timeout_s: float = 900.0
    yield_after_s: float = 10.0
    yield_factor: float = 1.0
    grow_factor: float = 0.5
    memory_s: float = 900.0
    settle_s: float = 60.0
    lend_factor: float = 1.0
    # priors until measured: a task's duration, a model's load time
    task_s: float = 30.0
    load_s: float = 120.0

    @classmethod
    def of(cls, settings: Settings, models: dict[str, tuple[str, int]]) -> PlacementPolicy:
        """The policy the settings say, for the models of the registry."""
        return cls(
            models=models,
            keep_alive_s=settings.keep_alive_s,
            keep_warm=settings.keep_warm,
            min_residency_s=settings.min_residency_s,
            load_timeout_s=settings.load_timeout_s,
            yield_after_s=settings.yield_after_s,
            yield_factor=settings.placement_yield_factor,
            grow_factor=settings.placement_grow_factor,
            memory_s=settings.placement_memory_s,
            settle_s=settings.placement_settle_s,
            lend_factor=settings.placement_lend_factor,
            task_s=settings.placement_task_s,
            load_s=settings.placement_load_s,
        )


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
    # when it last ran or loaded anything (an LLM task, script work, a load)
    last_active: float = 0.0
    # how long the last LLM load took here, and each model's last load here
    load_s: float = 0.0
    load_times: dict[str, float] = field(default_factory=dict)
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

    @property
    def unloading(self) -> bool:
        return self.pending is not None and self.pending[0] == "unload"

    def holds(self, model: str) -> bool:
        """Holds (or is loading) `model`, and is not being asked to let it go."""
        if self.pending is not None:
            action, wanted = self.pending[0], self.pending[1]
            if action == "load":
                return wanted == model
            if action == "unload":
                return False
        return self.llm == model and self.state in HOLDS_LLM

    @property
    def free(self) -> bool:
        """Free of LLMs, or soon: holds none and none is on its way, or its LLM is being
        unloaded. Script work runs here."""
        if self.pending is not None:
            return self.pending[0] == "unload"
        return not self.llm and self.state not in HOLDS_LLM


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
        if ev.llm:
            view.load_times[ev.llm] = ev.took_s
    if ev.state == LLM_BUSY or (was == LLM_BUSY and ev.state == LLM_READY):
        view.last_used = ev.at
    if ev.state in ACTIVE or was in ACTIVE:
        view.last_active = ev.at
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
    demand: Mapping[str, int],
    now: float,
    policy: PlacementPolicy,
    running: Mapping[str, int] | None = None,
    pressure: Pressure | None = None,
    learned: Figures | None = None,
    arrived: Mapping[str, int] | None = None,
) -> Decision:
    """Decide loads and unloads for the model work waiting (`demand`), running (`running`) and
    arrived so far (`arrived`), by demand key. Changes the views' `pending` and `pressure`
    (placement's memory, kept between calls; a fresh one when not given). `learned`: measured
    task durations and load times (`mesh.learned.Learned`), in place of the policy's priors."""
    placer = _Placer(
        gpus,
        demand,
        now,
        policy,
        pressure if pressure is not None else Pressure(),
        learned if learned is not None else Priors(),
    )
    return placer.run(running or {}, arrived or {})


def _best_fit_order(view: GpuView) -> tuple[int, bool, bool, str]:
    """The order an LLM takes GPUs it does not hold in: the smallest first (a bigger one stays
    for a bigger model), then free ones, then those holding an idle LLM."""
    return (view.vram_total_mb, not view.free, view.state == LLM_BUSY, view.gpu)


def _giving_order(view: GpuView) -> tuple[bool, bool, int, str]:
    """The order another class takes GPUs in: free ones, then those holding an idle LLM, then
    the rest; the smallest first."""
    return (not view.free, view.state == LLM_BUSY, view.vram_total_mb, view.gpu)


class _Placer:
    """One decision: the views, the classes of work and their shares, the rules in order."""

    def __init__(
        self,
        gpus: dict[str, GpuView],
        demand: Mapping[str, int],
        now: float,
        policy: PlacementPolicy,
        pressure: Pressure,
        figures: Figures,
    ) -> None:
        self.gpus = gpus
        self.demand = demand
        self.now = now
        self.policy = policy
        self.pressure = pressure
        self.figures = figures
        self.out = Decision()
        self.usable = sorted((v for v in gpus.values() if v.usable), key=lambda v: v.gpu)
        self.llms: dict[str, Work] = {}
        self.script = Work(SCRIPT, "", 0, 0, policy.task_s, 0.0, 0)
        # the longest load time of the LLMs in view: what a GPU free of LLMs costs to give away
        self.horizon_s = policy.load_s
        # GPU id -> the class whose share it is, and how long it has been
        self.owner: dict[str, str] = {}
        self.owned_for: dict[str, float] = {}
        self.share: dict[str, int] = {}

    def run(self, running: Mapping[str, int], arrived: Mapping[str, int]) -> Decision:
        policy, now = self.policy, self.now
        for view in self.gpus.values():
            if view.pending is not None and now - view.pending[3] >= policy.load_timeout_s:
                view.pending = None
            for model, at in list(view.refused.items()):
                if now - at >= policy.load_timeout_s:
                    del view.refused[model]
        if not self.usable:
            return self.out
        self.classes(running, arrived)
        self.shares()
        self.keep_alive()
        self.grow()
        self.hand_over()
        return self.out

    # ---------------------------------------------------------------- the classes and shares
    def need_mb(self, model: str) -> int:
        """The VRAM the model takes: the learned figure, else the configured `vram_mb`."""
        return self.figures.vram_mb(model, self.policy.models[model][1])

    def fits(self, view: GpuView, model: str) -> bool:
        return view.vram_total_mb >= self.need_mb(model)

    def model_load_s(self, model: str) -> float:
        """How long loading the model takes: the learned figure, else the mean of its last
        load on each GPU that loaded it, else the prior."""
        seen = [v.load_times.get(model, v.load_s if v.llm == model else 0.0) for v in self.gpus.values()]
        seen = [s for s in seen if s > 0]
        prior = sum(seen) / len(seen) if seen else self.policy.load_s
        return self.figures.load_s(model, prior)

    def classes(self, running: Mapping[str, int], arrived: Mapping[str, int]) -> None:
        policy, usable = self.policy, self.usable
        slots = max(1, min(v.llm_slots for v in usable))
        keys = {k for k, n in self.demand.items() if n > 0} | {k for k, n in running.items() if n > 0}
        keys |= {llm_demand_key(v.llm) for v in usable if v.llm}
        largest = max((v.vram_total_mb for v in self.gpus.values()), default=0)
        for key in sorted(k for k in keys if k.startswith("llm:")):
            model = key.split(":", 1)[1]
            if model not in policy.models:
                continue
            fit = sum(1 for v in usable if self.fits(v, model))
            waiting = max(self.demand.get(key, 0), 0)
            if fit == 0:
                if waiting and self.need_mb(model) > largest:
                    self.out.unplaceable.append((model, self.need_mb(model), largest))
                continue  # no usable GPU holds it: it takes no share and moves nothing
            self.llms[model] = Work(
                key=key,
                model=model,
                waiting=waiting,
                running=max(running.get(key, 0), 0),
                task_s=self.figures.duration_s(model, policy.task_s),
                load_s=self.model_load_s(model),
                fits=fit,
                slots=slots,
                holders=sum(1 for v in usable if v.holds(model)),
            )
        self.horizon_s = max((w.load_s for w in self.llms.values()), default=policy.load_s)
        self.script = Work(
            key=SCRIPT,
            model="",
            waiting=max(self.demand.get(SCRIPT, 0), 0),
            running=max(running.get(SCRIPT, 0), 0),
            task_s=self.figures.duration_s(SCRIPT_DURATION_KEY, policy.task_s),
            load_s=0.0,
            fits=len(usable),
            holders=sum(1 for v in usable if v.free),
        )
        needs = {w.key: w.compute_need(max(w.load_s, 1.0)) for w in self.llms.values()}
        needs[SCRIPT] = self.script.compute_need(max(self.horizon_s, 1.0))
        memory = self.pressure
        memory.update(needs, arrived, self.now, policy.memory_s)
        for w in self.works:
            w.level = memory.level.get(w.key, 0.0)
            # an LLM has stopped no sooner than its yield time, script work as its flow ends
            at_least = self.yield_s(w) if w.model else policy.yield_after_s
            w.stopped = memory.stopped(w, self.now, at_least, math.inf)

    @property
    def works(self) -> list[Work]:
        return [*self.llms.values(), self.script]

    def shares(self) -> None:
        """Each class's share of the usable GPUs (`allocate`). An LLM's candidates: the GPUs
        running its tasks, then the others that hold it, then the others it fits (never one
        that refused it) in best-fit order; script work's in giving order."""
        cands: dict[str, list[str]] = {}
        for w in self.llms.values():
            fit = [v for v in self.usable if self.fits(v, w.model) and w.model not in v.refused]
            mine = sorted(
                (v for v in fit if v.holds(w.model)),
                key=lambda v: (v.vram_total_mb, v.state != LLM_BUSY, v.gpu),
            )
            others = sorted((v for v in fit if not v.holds(w.model)), key=_best_fit_order)
            cands[w.key] = [v.gpu for v in mine + others]
        cands[SCRIPT] = [v.gpu for v in sorted(self.usable, key=_giving_order)]
        self.owner = allocate(self.works, cands)
        self.share = {w.key: 0 for w in self.works}
        for key in self.owner.values():
            self.share[key] += 1
        self.owned_for = self.pressure.settle(self.owner, self.now)

    def under(self, w: Work) -> bool:
        return w.holders < self.share.get(w.key, 0)

    def settled(self, view: GpuView, w: Work) -> bool:
        """The GPU has been in `w`'s share settle_s (at once for work no GPU serves)."""
        return w.holders == 0 or self.owned_for.get(view.gpu, math.inf) >= self.policy.settle_s

    def yield_s(self, w: Work) -> float:
        """How long a GPU sits unused before it goes to other work: about one load time (for
        script work, of the LLMs that would take its GPUs)."""
        load_s = w.load_s if w.model else self.horizon_s
        return max(self.policy.yield_after_s, self.policy.yield_factor * load_s)

    # ---------------------------------------------------------------- requests
    def request(self, view: GpuView, action: str, model: str, reason: str) -> None:
        # the bus deduplicates on it (Nats-Msg-Id): two different requests never share one
        rid = f"{view.gpu}-{action}-{model}-{int(self.now * 1000)}"
        view.pending = (action, model, rid, self.now)
        at, gpu, worker, why = self.now, view.gpu, view.worker, reason
        self.out.events.append(
            ResourceRequested(gpu=gpu, worker=worker, action=action, model=model, rid=rid, at=at, reason=why)
        )
        # a load says the VRAM it was placed by (learned or configured): the worker checks that
        vram = self.need_mb(model) if action == "load" and model in self.policy.models else 0
        self.out.items.append(
            ResourceItem(
                rid=rid,
                worker=worker,
                action=action,  # type: ignore[arg-type]
                model=model,
                at=at,
                reason=why,
                vram_mb=vram,
            )
        )

    def load(self, view: GpuView, w: Work, reason: str) -> None:
        self.request(view, "load", w.model, reason)
        w.holders += 1
        self.script.holders -= 1

    def unload(self, view: GpuView, reason: str, claimant: Work | None = None) -> None:
        w = self.llms.get(view.llm)
        self.request(view, "unload", view.llm, reason)
        if w is not None:
            w.holders -= 1
        if claimant is not None:
            claimant.holders += 1  # the GPU is its (script work's at once, an LLM's next tick)

    # ---------------------------------------------------------------- the rules
    def ready(self, view: GpuView) -> bool:
        """Holds an LLM it could let go now: no request in flight, no task running."""
        return view.pending is None and view.state == LLM_READY and bool(view.llm)

    def draining(self, view: GpuView) -> bool:
        """Holds an LLM, idle or running its tasks, with no request in flight."""
        return view.pending is None and view.state in (LLM_READY, LLM_BUSY) and bool(view.llm)

    def moved(self, view: GpuView, holder: Work, other: Work) -> bool:
        """The GPU is in `other`'s share (not lent), its model holds more GPUs than its share,
        and it has been loaded min_residency_s."""
        return (
            self.owner.get(view.gpu) == other.key
            and holder.holders > self.share.get(holder.key, 0)
            and self.now - view.loaded_at >= self.policy.min_residency_s
        )

    def wanted(self, view: GpuView, exclude: str) -> bool:
        """Other work waits that could run on this GPU once it is free."""
        if self.script.waiting > 0:
            return True
        return any(
            w.waiting > 0 and w.model != exclude and self.fits(view, w.model) for w in self.llms.values()
        )

    def keep_alive(self) -> None:
        """Rule 1: an LLM nobody used for keep_alive_s goes when no other work wants its GPU
        (when some does, the shares decide), unless it is its model's last GPU (keep_warm)."""
        policy = self.policy
        for view in self.usable:
            w = self.llms.get(view.llm)
            if not self.ready(view) or self.now - view.last_used < policy.keep_alive_s:
                continue
            if w is not None and (w.waiting > 0 or self.wanted(view, view.llm)):
                continue
            if w is not None and policy.keep_warm and w.holders <= 1:
                continue
            unused = self.now - view.last_used
            self.unload(view, f"unused for {unused:.0f}s (keep_alive {policy.keep_alive_s:g}s)")

    def loadable(self, view: GpuView, model: str) -> bool:
        """Free and idle, with room for the model; or running script work on a card the model
        fits, when script tasks take no longer than the model's load (the worker takes no more
        script work once the load comes, and loads when the task running ends, if its memory
        then has room)."""
        if view.pending is not None or view.llm or model in view.refused:
            return False
        if view.state == SCRIPT_BUSY:
            w = self.llms.get(model)
            return w is not None and self.script.task_s <= w.load_s and self.fits(view, model)
        return view.state == IDLE and view.free_for_llm_mb >= self.need_mb(model)

    def best_fit(self, model: str, views: list[GpuView]) -> GpuView | None:
        """The smallest GPU that holds the model (a bigger one stays for a bigger model), an
        idle one before one running script work."""
        fitting = [v for v in views if self.loadable(v, model)]
        return min(fitting, key=lambda v: (v.vram_total_mb, v.state != IDLE, v.gpu), default=None)

    def grow(self) -> None:
        """Rule 2: free GPUs to LLMs with work waiting: a GPU of its share, or one in nobody's
        share when its waiting work pays for the load (a burst); work no GPU serves first."""
        while True:
            idle = [v for v in self.usable if v.free and v.state == IDLE]
            working = [v for v in self.usable if v.free and v.state == SCRIPT_BUSY]
            best: tuple[tuple[int, float, str], Work, GpuView, str] | None = None
            for w in self.llms.values():
                if w.waiting <= 0 or w.holders * w.slots >= w.tasks:
                    continue  # no work waiting, or a GPU for each of its tasks already
                mine = [v for v in idle + working if self.owner.get(v.gpu) == w.key and self.settled(v, w)]
                view = self.best_fit(w.model, mine) if self.under(w) else None
                why = f"its share is {self.share.get(w.key, 0)} GPU(s)"
                if view is None and w.pays(self.policy.grow_factor):
                    view = self.best_fit(w.model, [v for v in idle if v.gpu not in self.owner])
                    each = w.backlog_s(w.holders + 1)
                    why = f"a GPU in nobody's share; each of its GPUs gets {each:.0f}s of it"
                if view is None and self.lend_pays(w, None):
                    view = self.best_fit(w.model, [v for v in idle if self.lendable(v)])
                    lender = self.owner.get(view.gpu, "") if view is not None else ""
                    each = w.backlog_s(w.holders + 1)
                    why = f"lent by {lender} (no work of its own); each of its GPUs gets {each:.0f}s of it"
                if view is None:
                    continue
                rank = (0 if w.holders == 0 else 1, -w.level / (w.holders + 1), w.model)
                if best is None or rank < best[0]:
                    best = (rank, w, view, why)
            if best is None:
                return
            _, w, view, why = best
            self.load(view, w, f"{w.waiting} {w.model} task(s) waiting, {w.holders} GPU(s) hold it: {why}")

    def claimant(self, view: GpuView, holder: Work) -> Work | None:
        """The waiting work whose share this GPU is; or, for a GPU in nobody's share, waiting
        work below its share that fits it (work no GPU serves first, then the most need per GPU)."""
        key = self.owner.get(view.gpu)
        if key == holder.key:
            return None
        if key is not None:
            w = next(w for w in self.works if w.key == key)
            return w if w.waiting > 0 and self.settled(view, w) else None
        wants = [
            w
            for w in self.works
            if w is not holder
            and w.waiting > 0
            and self.under(w)
            and (not w.model or (self.fits(view, w.model) and w.model not in view.refused))
        ]
        return min(wants, key=lambda w: (w.holders > 0, -w.level / (w.holders + 1), w.key), default=None)

    def lend_pays(self, other: Work, holder: Work | None) -> bool:
        """Lending a GPU to `other` pays: its waiting work gives the GPU, beside those that hold
        it, at least lend_factor times what the loan costs (loading `other`'s model now, and
        `holder`'s again when its work comes back)."""
        if other.waiting <= 0 or other.holders * other.slots >= other.tasks:
            return False
        cost = other.load_s + (holder.load_s if holder is not None else 0.0)
        return other.backlog_s(other.holders + 1) >= self.policy.lend_factor * max(cost, 1.0)

    def lendable(self, view: GpuView) -> bool:
        """In the share of an LLM with no work waiting or running (script work's GPUs are not
        lent: its work trickles in, and a GPU lent to an LLM comes back only a load later)."""
        key = self.owner.get(view.gpu)
        w = next((w for w in self.llms.values() if w.key == key), None)
        return w is not None and w.tasks == 0

    def borrower(self, view: GpuView, holder: Work) -> Work | None:
        """Waiting work this idle GPU, in the share of a class with no work, is lent to: the
        most waiting work per GPU among those for which the loan pays."""
        wants = [
            w
            for w in self.works
            if w is not holder
            and (not w.model or (self.fits(view, w.model) and w.model not in view.refused))
            and self.lend_pays(w, holder)
        ]
        return max(wants, key=lambda w: (w.backlog_s(w.holders + 1), w.key), default=None)

    def asked(self, holder: Work, other: Work) -> tuple[str, str]:
        """What an unload for `other` says: the work waiting on it, and the two shares."""
        wanted = f"{other.waiting} {other.name} task(s) waiting on {other.holders} GPU(s)"
        shares = f"shares: {holder.model} {self.share[holder.key]}, {other.name} {self.share[other.key]}"
        return wanted, shares

    def hand_over(self) -> None:
        """Rules 3 and 4: a GPU whose LLM holds more than its share goes to waiting work whose
        share it is once loaded min_residency_s, drained if it runs its model's task; otherwise
        to waiting work whose share it is (or that is below its share): once unused about a load
        time when its model has no work waiting, once loaded min_residency_s when it has;
        unless the model's work of the last while keeps it (`Work.keeps`) from another LLM
        already served somewhere, or, with no work waiting, from anyone while that work has not
        stopped."""
        policy = self.policy
        held = [v for v in self.usable if self.draining(v) and v.llm in self.llms]
        for view in sorted(held, key=lambda v: (not self.ready(v), v.last_used, v.gpu)):
            w = self.llms[view.llm]
            other = self.claimant(view, w)
            lent = False
            idle = self.ready(view)
            if other is not None and (w.waiting <= 0 or not idle) and self.moved(view, w, other):
                # its share went to other work that waits: it takes no more of its model's
                # tasks and goes once the one running ends, whether its model's work waits or not
                wanted, shares = self.asked(w, other)
                busy = "" if idle else "; after the task it runs"
                self.unload(view, f"its share moved to {other.name}: {wanted} ({shares}){busy}", other)
                continue
            if not idle:
                continue
            if other is None and w.tasks == 0 and self.now - view.last_used >= self.yield_s(w):
                other = self.borrower(view, w)
                lent = other is not None
            if other is None:
                continue
            wanted, shares = self.asked(w, other)
            if w.waiting <= 0:
                unused = self.now - view.last_used
                kept = w.holders <= w.keeps()
                if unused < self.yield_s(w) or (
                    kept
                    and not w.stopped
                    and other.holders > 0
                    and not lent
                    and self.owner.get(view.gpu) != other.key
                    and not self.lend_pays(other, w)
                ):
                    continue
                why = f"no {w.model} work waiting, unused {unused:.0f}s; {wanted} ({shares})"
                if lent or (
                    kept and not w.stopped and other.holders > 0 and self.owner.get(view.gpu) != other.key
                ):
                    each = other.backlog_s(other.holders + 1)
                    why += f"; lent to {other.name}: {each:.0f}s of its work for this GPU pays for the loads"
            else:
                if self.now - view.loaded_at < policy.min_residency_s:
                    continue
                why = f"other work waits: {wanted}; {w.waiting} {w.model} task(s) waiting ({shares})"
            self.unload(view, why, other)
