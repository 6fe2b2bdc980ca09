"""Typed statuses and failure reasons: the values a task or plan record's `status`, and a failed
attempt's `reason`, may take on the wire and in KV.

Each is a `StrEnum`: a member is the string it names (`TaskStatus.RUNNING == "running"`), and
msgspec encodes it by value, so records and events read exactly as they did when these were
bare strings. Decoding gives the member back; a value not listed here does not decode.
"""

from __future__ import annotations

import enum


class TaskStatus(enum.StrEnum):
    """Where a task stands. `waiting` sits between `pending` and `ready`: every dependency
    succeeded (or a retry's backoff is running) but the brain has not yet put the task on the
    work queue, which it keeps short so that priorities mean something."""

    PENDING = "pending"
    WAITING = "waiting"
    READY = "ready"
    RUNNING = "running"
    # handed to the gateway: waiting on Claude's answer, or on the follow-up tasks it proposed
    ESCALATING = "escalating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PlanStatus(enum.StrEnum):
    """Where a plan stands: running, final as its tasks ended, or rejected at submission."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class FailReason(enum.StrEnum):
    """Why an attempt (or a task) failed; `NONE` where nothing failed."""

    NONE = ""
    # the attempt: its command failed, ran out of time, or its worker went away
    ERROR = "error"
    TIMEOUT = "timeout"
    LOST = "lost"
    # delivered more than `max_deliveries` times without an end: no retry can help
    DEAD_LETTER = "dead_letter"
    # the task can never run as defined (e.g. a prompt longer than the model's context)
    DEFINITION = "definition"
    # the task cannot run: a dependency (or, for an escalated task, a follow-up task) failed
    DEPENDENCY = "dependency"
    # the task was cancelled, or its worker reports the attempt cancelled
    CANCELLED = "cancelled"
    # an escalation failed: the gateway's reasons (and `error`), then the brain's own
    SENSITIVE = "sensitive"
    CONFIG = "config"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"
    BUDGET = "budget"
    FOLLOWUPS = "followups"
