"""Connecting to the NATS server: credentials, TLS, retries, and the JetStream context.

`connect` returns a `Bus`; `DomainJetStream` routes KV writes through a JetStream domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors

import nats
from mesh.bus.natsclient import MeshClient
from mesh.bus.publish import Bus
from mesh.bus.refusals import Client, Refusals
from mesh.errors import ServerRefused, ServerUnavailable
from mesh.names import inbox_prefix
from mesh.settings import Settings

log = logging.getLogger(__name__)


async def connect(
    settings: Settings,
    name: str,
    *,
    wait_s: float = 0.0,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Bus:
    """Connect to the server. With `wait_s` > 0 keep trying that long (agents starting early).

    With `nats_user` it authenticates, and its replies come to an inbox only that user may
    read; with a `tls://` URL or a CA file it speaks TLS. `server_url` may list several
    servers of a cluster, comma-separated: it fails over between them."""
    url = settings.url
    options = connect_options(settings)
    deadline = time.monotonic() + wait_s
    attempt = 0
    holder: list[Bus] = []

    refusals = Refusals(settings.names, settings.nats_user)

    async def error(exc: Exception) -> None:
        # a refusal fails what waited on it, which says so; before the first connection,
        # failures are reported once, below
        if refusals.take(exc):
            log.debug("nats: %s", exc)
        elif holder:
            log.warning("%s", refusals.message(exc) or f"nats: {exc}")

    async def disconnected() -> None:
        if holder and isinstance(holder[0].nc, MeshClient):
            holder[0].nc.connection_lost()
        # (before the first connection there is nothing to have lost: the wait below says why)
        if holder and not holder[0].closing:
            log.warning("disconnected from %s; reconnecting", url)

    async def reconnected() -> None:
        log.info("reconnected to %s", url)
        if holder:
            if isinstance(holder[0].nc, MeshClient):
                holder[0].nc.connection_back()
            holder[0].reconnected_at = time.time()
            holder[0].store.reconnected()
        if on_reconnect is not None:
            await on_reconnect()

    connect_kwargs: dict[str, Any] = dict(
        servers=settings.urls,
        name=name,
        **options,
        connect_timeout=2,
        # fail fast on the first connection (we retry it here, visibly)...
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        allow_reconnect=False,
        error_cb=error,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
    )
    while True:
        attempt += 1
        nc = Client(refusals)
        try:
            await nc.connect(**connect_kwargs)
            # ...and once connected, reconnect forever through server restarts
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            bus = Bus(nc, settings)
            holder.append(bus)
            return bus
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # (bounded: closing a connection whose TLS handshake failed can wait forever)
            with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                await asyncio.wait_for(nc.close(), timeout=2.0)
            if _refused(exc):
                raise ServerRefused(
                    f"the NATS server at {url} refused the credentials of user "
                    f"{settings.nats_user or '(none)'!r} ({exc}). Check nats_user and nats_password "
                    "(the config file `mesh init --secure` wrote for this role)."
                ) from exc
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise ServerRefused(
                    f"the NATS server at {url} has a certificate this client does not trust ({exc}). "
                    "Set nats_tls_ca to the CA file that signed it (docs/security.md#tls)."
                ) from exc
            if time.monotonic() >= deadline:
                raise ServerUnavailable(
                    f"cannot reach the NATS server at {url} ({exc.__class__.__name__}: {exc}). "
                    "Start one with `mesh up`, or point mesh at yours with --server or MESH_NATS_URL"
                    + (
                        "; if it asks clients for certificates, set nats_tls_cert and nats_tls_key."
                        if settings.nats_tls_ca or url.startswith("tls://")
                        else "."
                    )
                ) from exc
            if attempt == 1 or attempt % 10 == 0:
                log.warning("waiting for the NATS server at %s: %s", url, exc)
            await asyncio.sleep(1.0)


def _refused(exc: BaseException) -> bool:
    return "authorization violation" in str(exc).lower() or "authentication" in str(exc).lower()


def connect_options(settings: Settings) -> dict[str, Any]:
    """The credential and TLS options of `nats.connect` these settings ask for."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
        options["inbox_prefix"] = inbox_prefix(settings.nats_user)
    tls_wanted = any(u.startswith("tls://") for u in settings.urls) or settings.nats_tls_ca
    if tls_wanted:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.nats_tls_ca or None)
        if settings.nats_tls_cert:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        options["tls"] = context
    return options
