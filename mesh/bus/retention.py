"""What the object store keeps of an archived plan: nothing. Its artifacts and its outputs too
big (or too sensitive) for an event are deleted when the brain archives it.

The brain archives a plan `archive_after_days` after it ended (`mesh.machine`); then its
objects, `artifacts/<plan>/...` (`mesh.bus.files.artifact_prefix`) and `outputs/<plan>/...`
(`mesh.work.output_prefix`), go too. Off the brain's hot path, and never fatal: an object left
behind (the brain stopped first, the server was away) expires with the bucket's age limit
(`events_max_age_days`) anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import nats.js.errors

from mesh.bus.files import artifact_prefix
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.publish import Bus
from mesh.work import output_prefix

log = logging.getLogger("mesh.bus.retention")


def plan_prefixes(plan_ids: Iterable[str]) -> tuple[str, ...]:
    """The names of the plans' objects start with one of these."""
    return tuple(p for plan_id in plan_ids for p in (artifact_prefix(plan_id), output_prefix(plan_id)))


async def forget_plans(bus: Bus, plan_ids: Iterable[str]) -> int:
    """Delete the archived plans' objects; how many were deleted. Errors are logged, not raised."""
    prefixes = plan_prefixes(plan_ids)
    if not prefixes:
        return 0
    deleted = 0
    try:
        store = await bus.objects()
        try:
            infos = await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return 0  # an empty store
        for info in infos:
            if not info.name.startswith(prefixes):
                continue
            try:
                await store.delete(info.name)
                deleted += 1
            except TRANSIENT as exc:
                log.warning("could not delete object %s of an archived plan: %s", info.name, exc)
    except TRANSIENT as exc:
        log.warning("could not delete the objects of archived plans (%s): %s", ", ".join(prefixes), exc)
    if deleted:
        log.info("deleted %d objects of archived plans (%s)", deleted, ", ".join(prefixes))
    return deleted
