"""A simulated GPU worker: one worker of classes script and llm owning one GPU view (a card, or a
set of cards with their VRAM summed), behaving as `agents/worker*.py` do.

It decides through the same pure functions of `mesh.work` the real worker asks: its own queue
(loads and unloads) is taken one item at a time (`resource_step`); a load first waits for the
LLM task running to end, unloads the LLM, waits for the script task running, closes the script
models and refuses a model that does not fit what is free (`load_refusal`); the LLM lane takes
only the loaded model's queue, the script lane only while no LLM is loaded or loading
(`lanes_enabled`); a transcription or embedding loads its script model on first use and keeps
it; an item that sat queued, or is delivered again, is checked against its task's record
(`suspect`, `still_wanted`, `verdict_action`); every run is reported with `run_started` (held
back as a first delivery's is) and `run_finished`, carrying the item's claim; every change of
state goes out as a `gpu.state` (`gpu_state`, `gpu_report`) built as `agents/worker_gpu.py`
builds it. A worker that dies loses what it runs (never acknowledged: offered again after
`ack_wait_s`) and comes back as a fresh process whose first report has no previous state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh import placement as gs
from mesh import work
from mesh.events import GpuState, ResourceItem, WorkItem
from mesh.settings import Settings
from tools.simlib.workload import DURATION_ENV, Unit

if TYPE_CHECKING:
    from tools.simlib.rig import Rig

HOST = "sim"
# the time a first delivery's `run.started` is held back (mesh's start_report_after_s)
START_REPORT_AFTER_S = Settings().start_report_after_s


@dataclass
class Queued:
    """A message on a work queue, as JetStream holds it."""

    item: WorkItem
    delivery: int
    published: float
    # a nak with a delay: not offered again before this
    not_before: float = 0.0


@dataclass
class Run:
    """An item a lane runs (or loads the script model for)."""

    item: WorkItem
    delivery: int
    started: float
    # the start's report went out (a first delivery's waits START_REPORT_AFTER_S)
    reported: bool = False


@dataclass
class Hooks:
    """What the rig tells its observer (the metrics) as it happens."""

    load_started: Callable[[SimWorker, str, float], None] = lambda w, m, took: None
    unloaded: Callable[[SimWorker, str], None] = lambda w, m: None
    script_load: Callable[[SimWorker, str], None] = lambda w, m: None


class SimWorker:
    """One GPU worker (classes script and llm) and the GPU view it owns."""

    def __init__(self, rig: Rig, index: int, unit: Unit) -> None:
        self.rig = rig
        self.index = index
        self.unit = unit
        self.gpu_id = unit.gpu_id
        self.worker = f"worker-{unit.gpu_id}"
        self.vram_total_mb = unit.vram_mb
        self.alive = True
        # bumped when the process dies: what the old process had in flight never completes
        self.epoch = 0
        # when its process died (its registration expires agent_ttl_s later)
        self.gone_at: float | None = None
        self.llm = ""
        self.llm_lane = False
        self.booting = ""
        self.script_models: dict[str, int] = {}
        # a resource item is being handled (the worker's models lock)
        self.lock = False
        self.current: ResourceItem | None = None
        self.own: deque[ResourceItem] = deque()
        self.runs: dict[str, Run] = {}
        self.reported = ""
        self.since = 0.0
        self.override = ""
        self.waiter: tuple[Callable[[], bool], Callable[[], None]] | None = None
        # when each lane last became free: JetStream serves the longest-waiting fetch first
        self.free_since: dict[str, float] = {work.LLM: 0.0, work.SCRIPT: 0.0}

    # what it holds ------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.rig.clock.now

    def llm_mb(self) -> int:
        return self.rig.w.models[self.llm].vram_mb if self.llm else 0

    def reserved_mb(self) -> int:
        return sum(self.script_models.values())

    def used_mb(self) -> int:
        return self.rig.w.base_mb + self.llm_mb() + self.reserved_mb()

    def gpu_now(self) -> work.GpuNow:
        return work.GpuNow(
            booting=self.booting,
            llm=self.llm,
            llm_mb=self.llm_mb(),
            script_models=tuple(sorted(self.script_models)),
            reserved_mb=self.reserved_mb(),
            llm_running=int(work.LLM in self.runs),
            script_running=int(work.SCRIPT in self.runs),
            running=len(self.runs),
        )

    def script_lane_open(self) -> bool:
        """`Models.update_lanes`: script work only where no LLM is loaded or loading."""
        llm_present = bool(self.llm) or self.booting == gs.BOOTING_LLM or self.lock
        return work.lanes_enabled([work.SCRIPT], held=False, llm_present=llm_present)[work.SCRIPT]

    # reporting ------------------------------------------------------------------------------
    def publish(self, force: bool = False, error: str = "", rid: str = "") -> None:
        """`Gpu.publish`: the GPU's state, when it changed or is asked for."""
        now = self.gpu_now()
        state = work.gpu_state(now, "", self.override)
        how = work.gpu_report(state, self.reported, force, error, rid)
        if how == work.SILENT:
            return
        at = self.now
        ev = GpuState(
            gpu=self.gpu_id,
            worker=self.worker,
            host=HOST,
            state=state,
            at=at,
            previous=self.reported,
            took_s=round(at - self.since, 3),
            index=self.unit.cards[0],
            name=self.unit.name,
            device="cuda",
            llm=now.llm,
            script_models=now.script_models,
            vram_total_mb=self.vram_total_mb,
            vram_used_mb=self.used_mb(),
            vram_reserved_mb=now.reserved_mb,
            llm_slots=self.rig.w.timing.llm_slots,
            script_slots=self.rig.w.timing.script_slots,
            running=now.running,
            rid=rid,
            error=error,
        )
        if state != self.reported:
            self.since = at
        self.reported = state
        if how == work.EVENT:
            self.rig.send(ev)

    def later(self, dt: float, fn: Callable[[], None]) -> None:
        """A step of this process, `dt` from now (never run if the process dies meanwhile)."""
        epoch = self.epoch

        def due() -> None:
            if self.epoch == epoch and self.alive:
                fn()

        self.rig.clock.after(dt, due)

    def wait(self, until: Callable[[], bool], then: Callable[[], None]) -> None:
        if until():
            then()
        else:
            self.waiter = (until, then)

    def resume(self) -> None:
        if self.waiter is not None and self.waiter[0]():
            then = self.waiter[1]
            self.waiter = None
            then()

    # the own lane: loads and unloads --------------------------------------------------------
    def resource(self, item: ResourceItem) -> None:
        """`Models.resource`: load or unload the LLM as the brain asked."""
        self.lock = True
        self.current = item
        if work.stale(item, self.now):
            self.publish(force=True, rid=item.rid)
            self._resource_done()
            return
        model = self.rig.w.models.get(item.model)
        step, why = work.resource_step(item, self.llm, model.kind if model is not None else None)
        if step == work.UNLOAD:

            def unloaded() -> None:
                self.publish(force=True, rid=item.rid)
                self._resource_done()

            self._unload_llm(unloaded)
        elif step == work.HAVE:
            self.publish(force=True, rid=item.rid)
            self._resource_done()
        elif step == work.REFUSE or model is None:
            self.publish(force=True, rid=item.rid, error=why)
            self._resource_done()
        else:
            self._unload_llm(
                lambda: self.wait(lambda: work.SCRIPT not in self.runs, lambda: self._load(item))
            )

    def _unload_llm(self, then: Callable[[], None]) -> None:
        """Close the LLM lane, wait for its task, unload the LLM."""
        self.llm_lane = False

        def unload() -> None:
            if self.llm:
                self.rig.hooks.unloaded(self, self.llm)
                self.llm = ""
            then()

        self.wait(lambda: work.LLM not in self.runs, unload)

    def _load(self, item: ResourceItem) -> None:
        self.script_models.clear()
        spec = self.rig.w.models[item.model]
        free = self.vram_total_mb - self.used_mb()
        why = work.load_refusal(item.model, spec.vram_mb, free)
        if why:
            self.rig.refusals += 1
            self.publish(force=True, rid=item.rid, error=why)
            self._resource_done()
            return
        took = self.rig.load_time(item.model)
        self.booting = gs.BOOTING_LLM
        self.rig.hooks.load_started(self, item.model, took)
        self.publish(rid=item.rid)

        def loaded() -> None:
            self.booting = ""
            self.llm = item.model
            self.llm_lane = True
            self.free_since[work.LLM] = self.now
            self.rig.check_memory(self)
            self.publish(rid=item.rid)
            self._resource_done()

        self.later(took, loaded)

    def _resource_done(self) -> None:
        self.lock = False
        self.current = None

    # the work lanes ---------------------------------------------------------------------
    def lanes(self) -> list[tuple[str, str]]:
        """(lane, queue) of each lane that may fetch now."""
        out: list[tuple[str, str]] = []
        if not self.alive:
            return out
        if self.llm and self.llm_lane and work.LLM not in self.runs:
            out.append((work.LLM, f"llm:{self.llm}"))
        if self.script_lane_open() and work.SCRIPT not in self.runs:
            out.append((work.SCRIPT, "script"))
        return out

    def take(self, q: Queued, lane: str) -> None:
        """`Items._work`: one delivery, from the still-wanted check to the run."""
        item = q.item
        t = self.rig.w.timing
        if work.suspect(q.delivery, self.now - q.published, cancelled=False):
            rec = self.rig.state.tasks.get(work.item_key(item.plan_id, item.task_id))
            verdict = work.still_wanted(item, rec, q.delivery, self.worker)
            if verdict == work.ASK and rec is not None:
                verdict = work.owner_verdict(rec.worker in self.rig.registered())
            action = work.verdict_action(verdict, q.delivery, t.max_deliveries)
            if action == work.NAK_LATER:
                self.rig.requeue(q, work.LATER_S)
                return
            if action == work.ACK:
                self.rig.skipped += 1
                return
        why = work.dead_letter_why(q.delivery, t.max_deliveries)
        if why:
            self.rig.send(work.dead_letter_report(item, self.worker, self.now, why))
            return
        missing = work.model_missing(item, True, self.llm)
        if missing:
            self.rig.violations.append(f"{self.now:.1f}: {self.worker} took {item.task_id}: {missing}")
        run = Run(item, q.delivery, self.now)
        self.runs[lane] = run
        self.rig.run_starts[(work.item_key(item.plan_id, item.task_id), item.attempt, self.worker)] = self.now
        after = work.start_report_after(q.delivery, START_REPORT_AFTER_S)
        self.later(after, lambda: self._report_start(run))
        if (
            lane == work.SCRIPT
            and item.kind in ("transcribe", "embed")
            and item.model not in self.script_models
        ):
            # `Models.script_model`: loaded on first use, kept while no LLM needs the room
            spec = self.rig.w.models[item.model]
            self.booting = gs.BOOTING_SCRIPT
            self.rig.hooks.script_load(self, item.model)
            self.publish()

            def loaded() -> None:
                self.booting = ""
                self.script_models[item.model] = spec.vram_mb
                self.rig.check_memory(self)
                self.publish(force=True)
                self._execute(run, lane)

            self.later(self.rig.load_time(item.model), loaded)
            return
        self.publish()
        self._execute(run, lane)

    def _report_start(self, run: Run) -> None:
        if any(r is run for r in self.runs.values()) and not run.reported:
            run.reported = True
            self.rig.send(work.run_started(run.item, self.worker, run.started, run.delivery))

    def _execute(self, run: Run, lane: str) -> None:
        duration = float(run.item.env[DURATION_ENV])

        def finished() -> None:
            result = work.RunResult(ok=True, duration_s=self.now - run.started, rc=0)
            report = work.run_finished(
                run.item,
                result,
                worker=self.worker,
                at=self.now,
                started_at=run.started,
                sensitive=False,
                output="",
                output_object="",
                prompt_limit=0,
                gpu=self.gpu_id,
            )
            run.reported = True
            del self.runs[lane]
            self.free_since[lane] = self.now
            self.rig.send(report)
            self.publish()
            self.resume()

        self.later(duration, finished)

    # dying and coming back ----------------------------------------------------------------
    def die(self, report_offline: bool) -> None:
        """The GPU falls off: its worker says `offline` (if it can) and stops. What it ran is
        never acknowledged: JetStream offers it again after `ack_wait_s`."""
        if not self.alive:
            return
        if report_offline:
            self.override = gs.OFFLINE
            self.publish(force=True)
        self.alive = False
        self.epoch += 1
        self.gone_at = self.now
        for run in self.runs.values():
            self.rig.redeliver_later(run.item, run.delivery)
        if self.current is not None:
            self.own.appendleft(self.current)  # taken, never acknowledged: delivered again
        self.runs.clear()
        self.llm, self.llm_lane, self.booting, self.lock, self.current = "", False, "", False, None
        self.script_models.clear()
        self.waiter = None

    def revive(self) -> None:
        """A fresh worker process on the same GPU: it registers, and its first report has no
        previous state."""
        if self.alive:
            return
        self.alive = True
        self.gone_at = None
        self.override = ""
        self.reported = ""
        self.since = self.now
        self.free_since = {work.LLM: self.now, work.SCRIPT: self.now}
        self.publish(force=True)
