"""The brain's lease: only the brain that holds it acts; another waits as a standby.

Taken at start (a standby waits for it to expire, or for its holder on this host to be gone),
renewed every third of `lease_s` and checked before each step. A brain that cannot renew it
in time stops acting at once and exits; one whose lease ran out because the server's store is
full acts on nothing until it renews it at its own revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import nats.js.errors
import psutil
from nats.js.kv import KeyValue

from agents.base import Agent
from mesh.bus.jetstream import TRANSIENT
from mesh.records import UNREADABLE, Lease, decode_lease, encode_record

log = logging.getLogger("mesh.brain")

LEASE_KEY = "lease"


class LeaseLost(Exception):
    """Another brain may be acting: this one must stop at once."""


class LeaseStalled(Exception):
    """The lease ran out because the server's store is full: no brain can write it, this one
    included. This one acts on nothing until it renews the lease at its own revision (which
    proves no other brain took it meanwhile)."""


class BrainLease(Agent):
    """Taking, renewing and checking the brain lease (its fields are set by `Brain.__init__`)."""

    lease_revision: int
    lease_valid_until: float  # monotonic
    lost_lease: bool
    # the lease ran out while the store was full: not acting until renewed
    _stalled: bool

    async def acquire_lease(self) -> None:
        kv = await self.bus.brain_kv()
        waiting_logged = False
        while not self.stop_requested.is_set():
            now = time.time()
            lease = self._new_lease(now)
            began = time.monotonic()
            try:
                try:
                    entry = await kv.get(LEASE_KEY)
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    self.lease_revision = await kv.create(LEASE_KEY, encode_record(lease))
                else:
                    held = decode_lease(entry.value or b"")
                    if held.expires_at > now and held.holder != self.agent_id and not self._holder_dead(held):
                        if not waiting_logged:
                            log.info("standby: %s holds the brain lease; waiting to take over", held.holder)
                            waiting_logged = True
                        await self._sleep(min(1.0, self.settings.lease_s / 3))
                        continue
                    self.lease_revision = await kv.update(
                        LEASE_KEY, encode_record(lease), last=entry.revision
                    )
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                await self._sleep(0.2)  # another brain took it first
                continue
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("cannot reach the lease (%s); retrying", exc)
                await self._sleep(1.0)
                continue
            self.lease_valid_until = began + self.settings.lease_s - 1.0
            log.info("took the brain lease (revision %d)", self.lease_revision)
            return

    def _new_lease(self, now: float) -> Lease:
        return Lease(
            holder=self.agent_id,
            expires_at=now + self.settings.lease_s,
            acquired_at=now,
            host=self.host,
            pid=os.getpid(),
        )

    def _holder_dead(self, held: Lease) -> bool:
        """A holder on this host whose process is gone (a brain restarted after a crash) need not
        be waited out; one elsewhere can only be judged by its lease expiring."""
        if held.host != self.host or held.pid <= 0 or held.pid == os.getpid():
            return False
        try:
            proc = psutil.Process(held.pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE and "brain" in " ".join(proc.cmdline())
        except psutil.Error:
            alive = False
        if not alive:
            log.info(
                "the lease holder %s (pid %d on this host) is gone; taking over now", held.holder, held.pid
            )
        return not alive

    async def _renew_loop(self) -> None:
        kv = await self.bus.brain_kv()
        every = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(every)
            now = time.time()
            began = time.monotonic()
            lease = self._new_lease(now)
            try:
                self.lease_revision = await kv.update(
                    LEASE_KEY, encode_record(lease), last=self.lease_revision
                )
                self.lease_valid_until = began + self.settings.lease_s - 1.0
                if self._stalled:
                    self._stalled = False
                    log.warning("renewed the brain lease (no other brain took it); acting again")
            except nats.js.errors.KeyWrongLastSequenceError:
                if await self._stored_after_all(kv):
                    continue
                log.error("lost the brain lease to another brain; stopping")
                self.lost_lease = True
                self.stop_requested.set()
                return
            except TRANSIENT as exc:
                if not self.bus.store.full:  # (the bus said that once)
                    log.warning("could not renew the brain lease (%s)", exc)

    async def _stored_after_all(self, kv: KeyValue) -> bool:
        """Whether the lease, at a revision past this brain's, is still this brain's own: a
        renewal whose reply was lost with the connection (`mesh.bus.natsclient.LostReply`) can
        have been stored. No other brain writes its own id, so this brain goes on from there."""
        try:
            entry = await kv.get(LEASE_KEY)
            held = decode_lease(entry.value or b"")
        except (*TRANSIENT, *UNREADABLE):
            return False
        if held.holder != self.agent_id or entry.revision is None:
            return False
        self.lease_revision = entry.revision
        self.lease_valid_until = time.monotonic() + (held.expires_at - time.time()) - 1.0
        log.warning(
            "the brain lease is at revision %d, written by this brain (a renewal whose reply was "
            "lost); going on from there",
            entry.revision,
        )
        return True

    async def _check_lease(self) -> None:
        expired = time.monotonic() > self.lease_valid_until
        # (a renewal that gets no answer takes longer than the lease: ask the store's disk)
        if not self.lost_lease and expired and (self._stalled or await self.bus.store.probe()):
            # nobody can write the lease: wait for this brain's renewal, which succeeds only if
            # no other brain took it meanwhile (the store may take other writes again first)
            raise LeaseStalled("the brain lease ran out while the server's store is full")
        if self.lost_lease or time.monotonic() > self.lease_valid_until:
            self.lost_lease = True
            self.stop_requested.set()
            raise LeaseLost("the brain lease could not be renewed in time")

    def _say_stalled(self) -> None:
        if not self._stalled:
            self._stalled = True
            log.warning(
                "the brain lease ran out while the server's store is full: acting on nothing until "
                "it is renewed (no other brain can take it meanwhile)"
            )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_requested.wait(), timeout=seconds)
