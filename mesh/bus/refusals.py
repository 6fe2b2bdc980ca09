"""A permission refusal fails the request or publish it refused at once, with what, who and what to do.
`Client` is nats-py's client whose requests are watched; `Refusals` matches the server's violations.

nats-server answers a publish it does not permit with an asynchronous `-ERR` on the connection and
no reply: a JetStream publish or API request would wait its whole timeout and raise a bare
`TimeoutError`. Each request (and each pipelined batch, `Bus._send`) is registered under its
subjects while it waits; the connection's error callback hands every error to `Refusals.take`,
which cancels the waiting task of each request to a refused subject, and the request raises
`PermissionRefused` in its place.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg as NatsMsg

from mesh.bus.natsclient import MeshClient
from mesh.errors import MeshError
from mesh.names import Names
from mesh.refusal import Violation, parse_violation, refusal_message

T = TypeVar("T")

# the refusals nothing waited on that are kept for the next wait on their subject
UNCLAIMED_MAX = 64


class PermissionRefused(MeshError, nats.errors.Error):
    """The server refused this user an operation its role lacks. A server error too, so code that
    rides out server errors sees it; `agents.base.passing` knows it does not pass."""

    def __init__(self, message: str, violation: Violation) -> None:
        super().__init__(message)
        self.violation = violation

    def __str__(self) -> str:
        return str(self.args[0])


class _Waiter:
    __slots__ = ("refused", "subjects", "task")

    def __init__(self, task: asyncio.Task[Any], subjects: Collection[str]) -> None:
        self.task = task
        # as given: compared (lowercased) only when a refusal comes, which is rare
        self.subjects = subjects
        self.refused: PermissionRefused | None = None


class Refusals:
    """What waits on the server, and the violations that fail it by subject.

    A wait costs a registration and its removal, whatever its subjects (a batch of a thousand
    publishes is one wait); the subjects are looked at only when a violation comes."""

    def __init__(self, names: Names, user: str) -> None:
        self.names = names
        self.user = user
        self._waiting: set[_Waiter] = set()
        # refusals nothing waited on when they came (a plain publish, or one whose wait began
        # later, as a read's next batch does): the next wait on the subject fails with it at once
        self._unclaimed: dict[str, Violation] = {}

    async def guard(self, subjects: Collection[str], waiting: Awaitable[T]) -> T:
        """Await `waiting` (a request or publish to `subjects`); raise `PermissionRefused` as soon as
        the server refuses one of them."""
        task = asyncio.current_task()
        if task is None:
            return await waiting
        if self._unclaimed:
            for subject in subjects:
                violation = self._unclaimed.pop(subject.lower(), None)
                if violation is not None:
                    if inspect.iscoroutine(waiting):
                        waiting.close()
                    raise self._refused(violation)
        waiter = _Waiter(task, subjects)
        self._waiting.add(waiter)
        try:
            result = await waiting
        except asyncio.CancelledError:
            # cancelled by `take` (and by nobody else: a cancel of ours only is taken back)
            if waiter.refused is not None and task.uncancel() == 0:
                raise waiter.refused from None
            raise
        else:
            if waiter.refused is not None:
                task.uncancel()  # (what it waited on had its answer already)
            return result
        finally:
            self._waiting.discard(waiter)

    def take(self, exc: BaseException) -> bool:
        """Fail what waits on the subject `exc` reports refused; True when something did wait."""
        violation = parse_violation(str(exc))
        if violation is None:
            return False
        refused = violation.subject
        waiters = [
            w for w in self._waiting if w.refused is None and any(s.lower() == refused for s in w.subjects)
        ]
        for waiter in waiters:
            waiter.refused = self._refused(violation)
            waiter.task.cancel()
        if not waiters:
            self._unclaimed.pop(refused, None)
            self._unclaimed[refused] = violation
            while len(self._unclaimed) > UNCLAIMED_MAX:
                del self._unclaimed[next(iter(self._unclaimed))]
        return bool(waiters)

    def _refused(self, violation: Violation) -> PermissionRefused:
        return PermissionRefused(refusal_message(self.names, self.user, violation), violation)

    def message(self, exc: BaseException) -> str:
        """A violation nothing waited on, told as `refusal_message` tells it ('' when not one)."""
        violation = parse_violation(str(exc))
        return refusal_message(self.names, self.user, violation) if violation else ""


class Client(MeshClient):
    """mesh's NATS client (`mesh.bus.natsclient`), each request watched for a refusal (JetStream
    publishes, KV writes and API calls are all requests)."""

    def __init__(self, refusals: Refusals) -> None:
        super().__init__()
        self.refusals = refusals

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> NatsMsg:
        return await self.refusals.guard(
            (subject,),
            super().request(subject, payload, timeout=timeout, old_style=old_style, headers=headers),
        )
