"""A worker: claims work items of its classes and runs them, `slots` at a time.
This module is the agent and its life (start, the loop, burst mode, drain, stop); its pieces do the rest.

For each item: check the task record (skip work the brain no longer wants),
report `run.started`, run the body while telling JetStream it is still in
progress (so it is never redelivered to a second worker while this one lives),
report `run.finished`, then acknowledge. A worker that dies stops sending
progress, and the item is redelivered once `ack_wait` lapses.

`run.started` of a first delivery is held back `start_report_after_s` (100 ms): a
task that ends sooner reports its start in `run.finished` (`started_at`) instead,
and the brain records both transitions from that one report. Half the reports
and half the brain's commits for short tasks, and a dependent's release no
longer waits behind the commit of its predecessor's start.

On stop it takes no new work, lets running tasks finish for up to
`drain_timeout_s` while still registered, then kills what is left and hands it
back (`nak`) so another worker runs it.

In burst mode (`run_burst`) it claims and runs everything queued for it now and
returns once idle: a worker in a test's own process, with no agent process to spawn.

The pieces: `agents/worker_lanes.py` (claiming: lanes and slots), `agents/worker_items.py`
(one item: check, run, report), `agents/worker_reports.py` (reports ready together go out in
one write), `agents/worker_models.py` (model load and unload),
`agents/worker_gpu.py` (the GPU's state and controls), `agents/worker_resources.py` (what a
task used of the GPU). The decisions are `mesh/work.py`'s, pure and tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.msg import Msg as NatsMsg

from agents.base import Agent
from agents.worker_gpu import Gpu
from agents.worker_items import Items
from agents.worker_lanes import Lane, Lanes
from agents.worker_models import Models
from mesh import work
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.resources import own_consumer_definition
from mesh.bus.route import decode_checked
from mesh.errors import ConfigError
from mesh.events import TaskCancelled
from mesh.host.gpu import as_indices, gpu_id, gpu_label
from mesh.host.reaper import Reaper
from mesh.host.telemetry import host_token
from mesh.settings import Settings

log = logging.getLogger("mesh.worker")


class Worker(Agent):
    role = "worker"

    def __init__(
        self,
        settings: Settings,
        agent_id: str | None = None,
        classes: tuple[str, ...] = ("cpu",),
        slots: int | None = None,
        drain_timeout_s: float = 30.0,
        gpu: int | tuple[int, ...] | None = None,
        memory_mb: int = 0,
    ) -> None:
        indices = as_indices(gpu)
        if agent_id is None and indices:
            # a GPU's worker keeps its name across restarts: its own queue waits for it
            agent_id = f"worker-{gpu_id(host_token(), indices)}"
            if settings.agent_id and settings.agent_id != agent_id:
                raise ConfigError(
                    f"agent_id is {settings.agent_id!r}, but the worker of GPU {gpu_label(indices)} on "
                    f"this host is {agent_id!r}: a GPU worker's id names its host and GPU. Use the "
                    f"config file `mesh init --secure --worker {agent_id}` writes for it"
                )
        super().__init__(settings, agent_id)
        self.classes = list(classes)
        self.slots = slots or settings.slots
        self.drain_timeout_s = drain_timeout_s
        # claim what is queued now, then stop (`run_burst`)
        self.burst = False
        # models: a worker of class script or llm owns a GPU (or the CPU standing in for one)
        self.gpu = Gpu(
            self,
            indices,
            memory_mb or (0 if indices else settings.cpu_model_memory_mb),
            work.runs_models(self.classes),
            self._gpu_now,
            self._update_lanes,
        )
        self.lanes = Lanes(
            self, self._take, self.gpu.hold_reason, self.gpu.publish, self._take_batch, self._batch_key
        )
        self.models = Models(self, self.gpu, self.lanes, settings.model_registry())
        self.items = Items(self, self.gpu, self.models)

    @property
    def models_on(self) -> bool:
        return self.gpu.on

    @property
    def gpu_id(self) -> str:
        return self.gpu.gpu_id

    @property
    def gpu_worker_id(self) -> str:
        return self.agent_id

    def running_keys(self) -> list[str]:
        return sorted(self.items.running)

    def bound_consumers(self) -> tuple[str, ...]:
        return tuple(self.names.workers_consumer(c) for c in work.shared_lanes(self.classes))

    async def start(self) -> None:
        self.items.reaper = Reaper()
        await asyncio.to_thread(self.items.workdirs.sweep)  # work directories long unused
        if self.models_on:
            await self.gpu.open()
        await super().start()
        for cls in work.shared_lanes(self.classes):
            sub = await self.bus.js.pull_subscribe_bind(
                durable=self.names.workers_consumer(cls), stream=self.names.work_stream
            )
            slots = work.lane_slots(cls, self.slots, self.settings.script_slots)
            lane = Lane(cls, sub, slots)
            if cls == work.SCRIPT:
                # embed tasks of one model run as one encode call (`take_batch`)
                lane.batch_max = self.settings.embed_batch_max
                lane.batch_wait_s = self.settings.embed_batch_wait_s
            self.lanes.add(lane)
        if self.models_on:
            own = await self.bus.bind_consumer(own_consumer_definition(self.settings, self.gpu_worker_id))
            self.lanes.add(Lane(work.OWN, own, 1))
            await self.gpu.follow()
        self._cancel_sub = await self.bus.nc.subscribe(self.names.task_cancelled_all, cb=self._on_cancel)

    async def _on_cancel(self, raw: NatsMsg) -> None:
        msg, _ = decode_checked(raw, self.names)
        match msg:
            case TaskCancelled():
                self.items.cancel(msg.plan_id, msg.task_id)
            case _:
                return  # the brain dead-letters bad messages; a core subscriber only listens

    def _gpu_now(self) -> work.GpuNow:
        models = self.models
        return work.GpuNow(
            booting=models.booting,
            fetching=models.fetching,
            progress=models.progress,
            llm=models.loaded_llm(),
            llm_mb=models.llm_mb(),
            script_models=tuple(sorted(models.script_models)),
            reserved_mb=models.reserved_mb(),
            llm_running=self.lanes.running(work.LLM),
            script_running=self.lanes.running(work.SCRIPT),
            running=len(self.items.running),
        )

    def _update_lanes(self) -> None:
        self.models.update_lanes()

    async def _take(self, raw: NatsMsg, lane: Lane, free: Callable[[], None]) -> None:
        await self.items.take(raw, lane, free)

    async def _take_batch(self, raws: list[NatsMsg], lane: Lane, free: Callable[[], None]) -> None:
        await self.items.take_batch(raws, lane, free)

    def _batch_key(self, raw: NatsMsg) -> str:
        return self.items.batch_key(raw)

    # the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        self.lanes.burst = self.burst
        self.lanes.start_all()
        self._update_lanes()
        if self.burst:
            await self.lanes.until_loops_end()
            self.stop_requested.set()
        else:
            await self.stop_requested.wait()
        await self.lanes.stop_loops()
        await self._drain()

    async def run_burst(self) -> None:
        """Claim and run everything queued for this worker now, and return once it is idle
        (no lane finds work while nothing runs): start, run, stop. A worker in the caller's
        process, for tests and one-off runs."""
        self.burst = True
        try:
            await self.start()
            await self.run()
        finally:
            await self.stop()

    async def stop(self, reason: str = "stopped") -> None:
        # reports whose waiter is gone (a cancelled run) still go out before the bus closes
        await self.items.all_reports_out()
        if self.models_on and self._bus is not None:
            with contextlib.suppress(*TRANSIENT):
                await self.gpu.offline()
        self.models.close()
        self.gpu.close()
        await super().stop(reason)
        reaper = self.items.reaper
        if reaper is not None:
            reaper.close()

    async def _drain(self) -> None:
        tasks = self.lanes.tasks
        if not tasks:
            return
        log.info(
            "stopping: waiting up to %.0fs for %d running task(s)",
            self.drain_timeout_s,
            len(self.items.running),
        )
        _, pending = await asyncio.wait(set(tasks), timeout=self.drain_timeout_s)
        if pending:
            self.items.hand_back_all()
            await asyncio.wait(pending)
