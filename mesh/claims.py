"""Claims: proof that a worker's report comes from the worker that took the attempt.

Every work item carries a claim, a keyed hash of its task and attempt under a secret only the
brain holds (`claim_key` in the brain's bucket, which no worker may read). A worker copies the
claim of the item it took into its reports; the brain takes a report only with the right claim.
A worker can therefore report only on attempts it was handed, not on a task it never received.
The claim is derived, not stored: a restarted or standby brain recomputes the same claim, and
neither the events nor the task records (which workers may read) ever hold it.
"""

from __future__ import annotations

import hashlib
import hmac

# the key's name in the brain's bucket, and its size
KEY_NAME = "claim-key"
KEY_BYTES = 32


def claim_of(key: bytes, plan_id: str, task_id: str, attempt: int) -> str:
    """The claim on one attempt of a task."""
    mac = hmac.new(key, f"{plan_id}.{task_id}:{attempt}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


def holds(key: bytes, claim: str, plan_id: str, task_id: str, attempt: int) -> bool:
    """Whether `claim` is the claim on that attempt (compared in constant time)."""
    return hmac.compare_digest(claim, claim_of(key, plan_id, task_id, attempt))
