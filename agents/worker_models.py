"""The models on a worker's GPU: the LLM loaded and unloaded as the brain asks (resource items
on the worker's own queue), script models loaded on first use and kept while no LLM needs room.

What a resource item asks, and whether a model fits, is decided in `mesh.work`
(`resource_step`, `load_refusal`); here the models are loaded (in a thread), the LLM's lane
opened and closed, and every step answered with the GPU's state. Which lanes may claim follows
what is loaded (`update_lanes`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agents.base import Agent
from agents.worker_fetch import ModelFiles
from agents.worker_gpu import Gpu
from agents.worker_lanes import Lane, Lanes
from mesh import placement as gs
from mesh import work
from mesh.bus.resources import llm_consumer_definition
from mesh.events import ResourceItem
from mesh.models import ModelError, ModelSpec

log = logging.getLogger("mesh.worker")


class Models:
    """The LLM and the script models one worker holds."""

    def __init__(self, agent: Agent, gpu: Gpu, lanes: Lanes, registry: dict[str, ModelSpec]) -> None:
        self.agent = agent
        self.gpu = gpu
        self.lanes = lanes
        self.registry = registry
        self.llm: Any = None  # mesh.host.loaders.Loaded
        self.llm_name = ""
        self.script_models: dict[str, Any] = {}
        self.booting = ""  # gs.BOOTING_LLM / gs.BOOTING_SCRIPT while a load runs, gs.FETCHING
        # the model whose file is being fetched from the models bucket, and how far (0 to 1)
        self.fetching = ""
        self.progress = 0.0
        self.files = ModelFiles(agent)
        self.lock = asyncio.Lock()
        self.watches: set[asyncio.Task[None]] = set()  # managed servers' exits (`_server_gone`)

    def loaded_llm(self) -> str:
        """The LLM loaded ('' when none)."""
        return self.llm_name if self.llm is not None else ""

    def reserved_mb(self) -> int:
        return sum(m.spec.vram_mb for m in self.script_models.values())

    def llm_mb(self) -> int:
        return self.llm.spec.vram_mb if self.llm is not None else 0

    def mesh_used_mb(self) -> int:
        """The GPU memory the models loaded here take."""
        return self.reserved_mb() + self.llm_mb()

    def update_lanes(self) -> None:
        """Script work runs only where no LLM is loaded or loading (it would not fit beside it);
        a paused or cordoned GPU's worker claims nothing (what runs finishes)."""
        llm_present = self.llm is not None or self.booting == gs.BOOTING_LLM or self.lock.locked()
        self.lanes.enable(bool(self.gpu.hold_reason()), llm_present)

    def close(self) -> None:
        for name in list(self.script_models):
            self.script_models.pop(name).close()
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    async def _ready(self, name: str, spec: ModelSpec, rid: str = "") -> ModelSpec:
        """The spec to load: its file on this host, or fetched into the model cache (the GPU
        `fetching` meanwhile, with its progress). Raises ModelError."""

        def on_fetch(progress: float) -> None:
            first = not self.fetching
            self.booting, self.fetching, self.progress = gs.FETCHING, name, progress
            # the change of state is an event (answering the brain's request); progress, the bucket
            self.gpu.publish(rid=rid if first else "", refresh=not first)

        try:
            return await self.files.ready(name, spec, on_fetch)
        finally:
            self.fetching, self.progress = "", 0.0
            if self.booting == gs.FETCHING:
                self.booting = ""

    async def _load(self, name: str, spec: ModelSpec, cards_free_mb: tuple[int, ...] = ()) -> Any:
        from mesh.host.loaders import load_model

        device = "cpu" if spec.device == "cpu" else self.gpu.kind
        if spec.backend == "openai":
            # an OpenAI-compatible server: a managed one is started (its process group told to
            # the reaper), an external one probed
            from mesh.host.openai_backend import load_openai

            reaper = getattr(getattr(self.agent, "items", None), "reaper", None)
            loaded = await asyncio.to_thread(load_openai, name, spec, device, reaper)
            handle = loaded.handle
            log.info("%s: %s server at %s (%s)", name, handle.mode, handle.base_url, handle.last_probe)
            return loaded
        # an LLM in process decodes up to llm_slots tasks together (mesh.host.llmbatch)
        slots = self.agent.settings.llm_slots
        return await asyncio.to_thread(load_model, name, spec, device, cards_free_mb, slots)

    # the LLM, as the brain asks -----------------------------------------------------------
    async def resource(self, item: ResourceItem) -> None:
        """Load or unload the LLM as the brain asked. A refusal or failure is reported, not raised."""
        if work.stale(item, time.time()):
            log.info(
                "ignoring a stale %s of %s (asked %.0fs ago)", item.action, item.model, time.time() - item.at
            )
            self.gpu.publish(force=True, rid=item.rid)
            return
        try:
            await self._resource_locked(item)
        finally:
            # whatever happened, script work may run again if no LLM is left
            self.update_lanes()

    async def _resource_locked(self, item: ResourceItem) -> None:
        async with self.lock:
            self.update_lanes()
            spec = self.registry.get(item.model)
            step, why = work.resource_step(item, self.loaded_llm(), spec.kind if spec is not None else None)
            if step == work.UNLOAD:
                await self._unload_llm()
                self.gpu.publish(force=True, rid=item.rid)
                return
            if step == work.HAVE:
                self.gpu.publish(force=True, rid=item.rid)
                return
            if step == work.REFUSE or spec is None:
                self.gpu.publish(force=True, rid=item.rid, error=why)
                return
            await self._unload_llm()
            await self._wait_lane_idle(work.SCRIPT)
            for name in list(self.script_models):
                self.script_models.pop(name).close()
            free = await self.gpu.free_mb()
            why = work.load_refusal(item.model, work.load_need_mb(item, spec.vram_mb), free)
            if why:
                log.warning("%s", why)
                self.gpu.publish(force=True, rid=item.rid, error=why)
                return
            try:
                spec = await self._ready(item.model, spec, item.rid)
            except ModelError as exc:
                log.error("loading %s failed: %s", item.model, exc)
                self.gpu.publish(force=True, rid=item.rid, error=f"load of {item.model} failed: {exc}")
                return
            self.booting = gs.BOOTING_LLM
            self.gpu.publish(rid=item.rid)
            began = time.monotonic()
            try:
                # on a set of GPUs the LLM is split over the cards by what each has free
                cards = await self.gpu.cards_free_mb() if len(self.gpu.indices) > 1 else ()
                loaded = await self._load(item.model, spec, cards)
            except (ModelError, OSError, RuntimeError, ValueError) as exc:
                self.booting = ""
                log.error("loading %s failed: %s", item.model, exc)
                self.gpu.publish(force=True, rid=item.rid, error=f"load of {item.model} failed: {exc}")
                return
            self.booting = ""
            self.llm, self.llm_name = loaded, item.model
            self._watch_server(loaded)
            split = loaded.options.get("tensor_split") if len(self.gpu.indices) > 1 else None
            log.info(
                "loaded %s in %.1fs%s",
                item.model,
                time.monotonic() - began,
                f" over GPUs {self.gpu.label} (free MB {', '.join(map(str, cards))}; tensor_split "
                f"{', '.join(f'{x:g}' for x in split)}; main GPU {self.gpu.indices[0]})"
                if split
                else "",
            )
            settings = self.agent.settings
            sub = await self.agent.bus.bind_consumer(llm_consumer_definition(settings, item.model))
            # decoding in process, a few more than the decoder's sequences wait in its queue: a
            # sequence that ends takes the next at the decoder's next step, not after a fetch
            ahead = settings.llm_queue_ahead if loaded.decoder is not None else 0
            lane = Lane(work.LLM, sub, settings.llm_slots + ahead)
            self.lanes.add(lane)
            self.lanes.start(lane)
            await self.gpu.read_memory()
            self.gpu.publish(rid=item.rid)

    def _watch_server(self, loaded: Any) -> None:
        """A managed server that exits on its own is an unload the brain hears about."""
        server = getattr(loaded.handle, "server", None)
        if server is not None:
            watch = asyncio.get_running_loop().create_task(self._server_gone(loaded, server))
            self.watches.add(watch)
            watch.add_done_callback(self.watches.discard)

    async def _server_gone(self, loaded: Any, server: Any) -> None:
        code = await asyncio.to_thread(server.wait)
        if server.stopping or self.llm is not loaded:
            return  # an unload stopped it
        why = server.gone_error(code)
        log.error("%s; unloading %s", why, loaded.name)
        async with self.lock:
            if self.llm is not loaded:
                return
            await self._unload_llm()
        self.update_lanes()
        self.gpu.publish(force=True, error=f"unloaded {loaded.name}: {why}")

    async def _wait_lane_idle(self, name: str) -> None:
        lane = self.lanes.get(name)
        if lane is not None:
            await lane.until_idle()

    async def _unload_llm(self) -> None:
        await self.lanes.close(work.LLM)
        if self.llm is not None:
            # the LLM is gone for the GPU's state only once it is closed and the memory read
            # without it, with no wait after: a state reported while it closed (the publisher's
            # refresh) said `idle` without the unload's rid, and the unload's own answer then
            # came as idle -> idle (seen on a busy machine, where closing takes longer)
            loaded = self.llm
            await asyncio.to_thread(loaded.close)
            log.info("unloaded %s", loaded.name)
            await self.gpu.read_memory(self.reserved_mb())
            self.llm, self.llm_name = None, ""

    # script models ----------------------------------------------------------------------
    async def script_model(self, name: str) -> Any:
        """A script model, loaded on first use (seconds) and kept while no LLM needs the room."""
        loaded = self.script_models.get(name)
        if loaded is not None:
            return loaded
        spec = self.registry.get(name)
        if spec is None:
            raise ModelError(f"model {name!r} is not in this worker's registry; add it under [models]")
        try:
            spec = await self._ready(name, spec)
        finally:
            self.gpu.publish()
        self.booting = gs.BOOTING_SCRIPT
        self.gpu.publish()
        try:
            loaded = await self._load(name, spec)
        finally:
            self.booting = ""
        self.script_models[name] = loaded
        await self.gpu.read_memory()
        self.gpu.publish(force=True)
        return loaded
