"""The auditor: reads the event subjects no other agent consumes and dead-letters what is wrong there.

The brain consumes submissions, commands and worker reports, and workers consume work items:
each dead-letters what it cannot use. Nobody consumes the brain's own transitions
(`evt.plan.*`, `evt.task.*`) or agent events (`evt.agent.*`): garbage published there
would only sit in the history. The auditor reads them through its own durable consumer,
checks that each decodes and that its type matches its subject, and records a dead letter
for each that does not. It changes nothing else; `mesh up` runs one (and the watchdog will
carry this duty on hosts that run one).
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg as NatsMsg

from agents.base import Agent
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.pull import pull_subscribe
from mesh.bus.read import fetch_some
from mesh.bus.route import decode_checked
from mesh.names import Names

log = logging.getLogger("mesh.auditor")

FETCH_BATCH = 500


def problem(raw: NatsMsg, names: Names) -> str:
    """Why a message on an audited subject is wrong ('' when it is fine): unreadable, or not
    the message mesh would publish on that subject (`mesh.bus.route.misplaced`)."""
    return decode_checked(raw, names)[1]


class Auditor(Agent):
    role = "auditor"

    def bound_consumers(self) -> tuple[str, ...]:
        return (self.names.auditor_consumer,)

    async def start(self) -> None:
        await super().start()
        self.sub = await pull_subscribe(
            self.bus.js, durable=self.names.auditor_consumer, stream=self.names.events_stream
        )

    async def run(self) -> None:
        while not self.stop_requested.is_set():
            msgs = await fetch_some(self.sub, FETCH_BATCH, "events", store=self.bus.store)
            try:
                for raw in msgs:
                    why = problem(raw, self.names)
                    if why:
                        await self.bus.dead_letter(self.agent_id, raw, why)
                # the consumer acknowledges all up to the last (ack policy "all")
                if msgs:
                    await msgs[-1].ack()
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("recording a dead letter failed (%s); the batch comes again", exc)
                await asyncio.sleep(0.5)
