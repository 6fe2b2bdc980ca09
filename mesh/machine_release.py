"""The brain's state machine, release and placement: waiting tasks put on the work queue by class
and priority within the release window, and models placed on the GPUs for the work waiting.
"""

from __future__ import annotations

import heapq

from mesh.events import TaskReleased
from mesh.machine_escalation import Escalations
from mesh.machine_step import escalation_why
from mesh.placement import place
from mesh.records import WAITING


class Release(Escalations):
    """Work out: tasks released (or escalated), models placed."""

    def release(self) -> None:
        state = self.state
        while state.delayed and state.delayed[0][0] <= self.now:
            _, _, key = heapq.heappop(state.delayed)
            rec = state.tasks.get(key)
            if rec is not None and rec.status == WAITING and rec.not_before <= self.now:
                state._seq += 1
                vtime = rec.waiting_since - rec.spec.priority * state.aging_s
                heapq.heappush(state.queue.setdefault(rec.spec.cls, []), (vtime, state._seq, key))
        policy = self.policy
        for cls, heap in state.queue.items():
            while heap and self.window_used(cls) < policy.release_window:
                _, _, key = heapq.heappop(heap)
                rec = state.tasks.get(key)
                if rec is None or rec.status != WAITING or rec.not_before > self.now:
                    continue
                why = escalation_why(rec.spec)
                if why:
                    self.escalate(rec, why)
                    continue
                self.emit(
                    TaskReleased(
                        plan_id=rec.plan_id, task_id=rec.task_id, attempt=rec.attempt + 1, at=self.now
                    )
                )

    def window_used(self, cls: str) -> int:
        """How much of `cls`'s release window is taken: a work item for each task in flight, the
        no-op tasks (always packed: `mesh.machine_state.packs`) counted by the packs they fill,
        `pack_size` to one (a pack still filling counts once full, so the window holds its packs
        whole). The window bounds the work queued ahead of a task released later, in priority
        order; a pack of no-op tasks is one slot's short turn, as one task is, and counting its
        tasks one by one left slots with nothing queued behind them (16 packs of no-op tasks
        filled a window of 256, one for each of 2 workers' 8 slots). A short shell task counts
        one: it is packed only while more wait beyond the window, and counting it a pack at a
        time would empty that queue and pack nothing."""
        state = self.state
        packed = state.packed_inflight.get(cls, 0)
        return state.inflight.get(cls, 0) - packed + packed // max(1, self.policy.pack_size)

    def place(self) -> None:
        state = self.state
        decision = place(
            state.gpus,
            state.demand,
            self.now,
            self.policy.placement,
            running=state.running,
            pressure=state.pressure,
            arrived=state.arrived,
            learned=state.learned,
        )
        self.step.events.extend(decision.events)
        self.step.resources.extend(decision.items)
        for model, need, largest in decision.unplaceable:
            self.step.notes.append(
                f"model {model} needs {need} MB of VRAM and the largest GPU known has {largest} MB: "
                "its tasks wait until a GPU that can hold it joins: a bigger card, or cards one worker "
                "owns together (mesh agent worker --gpu 0,3); or use a smaller model"
            )
