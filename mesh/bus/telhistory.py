"""Telemetry history on the server: storing the watchdog's downsampled points, reading them back.
The points and their arithmetic are `mesh.telhistory`; the stream is `resources.history_stream_definition`.

Each point is published on `<p>.hist.<res>.gpu.<host>.<index>` (or `.host.<host>`) with its
tier's retention as its TTL (`Nats-TTL`), and an id naming its bucket, so a point published
again is stored once. `read_points` reads one GPU's, one host's or every series over a window,
at the finest resolution that still covers it; `mesh gpus --history`, the operator's tools and
a console's charts read through it.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence

import msgspec
from nats.js import api

from mesh.bus.publish import Bus
from mesh.bus.read import read_stream
from mesh.names import HEADER_MSG_ID, HEADER_TYPE
from mesh.settings import Settings
from mesh.telhistory import (
    HistoryPoint,
    Series,
    Tier,
    decode_point,
    encode_point,
    one_per_bucket,
    pick_tier,
    series_of,
    tiers,
)

log = logging.getLogger(__name__)

HEADER_TTL = "Nats-TTL"


def history_tiers(settings: Settings) -> tuple[Tier, ...]:
    return tiers(
        settings.history_fine_s,
        settings.history_fine_keep_h,
        settings.history_coarse_s,
        settings.history_coarse_keep_h,
    )


def point_subject(bus: Bus, point: HistoryPoint) -> str:
    n = bus.names
    if point.kind == "gpu":
        return n.hist_gpu(point.res_s, point.host, point.index)
    return n.hist_host(point.res_s, point.host)


async def publish_points(bus: Bus, points: Sequence[HistoryPoint]) -> None:
    """Store points, each kept for its tier's retention (raises TRANSIENT errors)."""
    keep = {t.res_s: t.keep_s for t in history_tiers(bus.settings)}
    for p in points:
        ttl = keep.get(p.res_s)
        if ttl is None:
            continue  # a tier configured away meanwhile
        headers = {
            HEADER_MSG_ID: p.msg_id,
            HEADER_TYPE: "tel.point",
            HEADER_TTL: f"{int(ttl)}s",
        }
        await bus.js.publish(point_subject(bus, p), encode_point(p), headers=headers)


async def read_points(
    bus: Bus,
    *,
    since: float,
    until: float | None = None,
    host: str = "*",
    gpu: int | None = None,
    kind: str = "gpu",
    res_s: int | None = None,
    now: float | None = None,
) -> tuple[int, list[HistoryPoint]]:
    """(resolution, points) of `kind` ("gpu" or "host") on `host` (`*`: every host), one GPU
    when `gpu` is given, from `since` to `until` (UNIX times), oldest first. The resolution is
    `res_s`, or the finest tier whose retention still covers `since`."""
    now = time.time() if now is None else now
    available = history_tiers(bus.settings)
    if res_s is None:
        tier = pick_tier(available, since, now)
        if tier is None:
            return 0, []
        res_s = tier.res_s
    n = bus.names
    subject = (
        n.hist_gpu(res_s, host, "*" if gpu is None else gpu) if kind == "gpu" else n.hist_host(res_s, host)
    )
    # a point is stored when its bucket closes, up to one resolution after its start
    start = max(0.0, since - res_s)
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.datetime.fromtimestamp(start, tz=datetime.UTC),
    )
    out: list[HistoryPoint] = []
    async for raw in read_stream(bus.js, n.history_stream, subject, config, idle_timeout_s=2.0):
        try:
            point = decode_point(raw.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("an unreadable history point on %s; left out", raw.subject)
            continue
        if raw.subject != point_subject(bus, point):
            # a point says what it is of, and its subject, which only that host's watchdog may
            # publish on, must say the same
            log.warning(
                "a history point on %s that belongs on %s; left out", raw.subject, point_subject(bus, point)
            )
            continue
        if point.at + res_s < since or (until is not None and point.at > until):
            continue
        out.append(point)
    return res_s, one_per_bucket(out)


async def read_series(
    bus: Bus,
    *,
    since: float,
    until: float | None = None,
    host: str = "*",
    gpu: int | None = None,
    kind: str = "gpu",
    res_s: int | None = None,
) -> list[Series]:
    """`read_points` grouped into one series per GPU (or host), for a chart or a table."""
    _, points = await read_points(bus, since=since, until=until, host=host, gpu=gpu, kind=kind, res_s=res_s)
    return series_of(points)
