"""The NATS server's store: where it is, how much room it has, and telling a full one apart.

A full store shows in two ways. When JetStream reaches a limit (the server's `max_file_store`,
by default three quarters of the disk's free space at start; an account's `max_file`; a stream's
reservation) the server answers a write with an error: "insufficient resources" (10023),
"insufficient storage resources available" (10047), "resource limits exceeded for account"
(10002). When the disk itself fills under it, the server does not answer the write at all (its
log says "no space left on device"), and that stream refuses writes until the server restarts.

So a write that fails with one of those errors, or that times out while the store's disk has
less room than one message, means the store is full. `StoreWatch` says so once, with where the
store is and how much room is left, and once when writes go through again; agents keep their
work and retry quietly meanwhile.

Where the store is: the server's monitoring endpoint (`nats_monitor_url`, `/varz` tells its
`store_dir`), else the server config mesh wrote on this host (`mesh up`'s in the data dir, the
units' next to the role's config file), read only when the server is on this host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors

from mesh.settings import ENV_CONFIG, Settings

log = logging.getLogger("mesh.bus.store")

MB = 1024 * 1024
# JetStream's answers to a write that does not fit (nats-server's error codes)
FULL_ERR_CODES = frozenset({10002, 10023, 10047})
FULL_WORDS = ("insufficient resources", "insufficient storage", "no space left on device")
# a disk with this much room is not what stops the server's writes
FULL_FREE_BYTES = 256 * MB
MONITOR_TIMEOUT_S = 2.0
# a store full again this soon after it was said to be is not said again
REPEAT_S = 300.0
# a write that times out this soon after a reconnect may have been sent before it
STALE_S = 15.0
# a stream refused while the store was full counts as refusing still for this long
SETTLE_S = 30.0
# a location found (or not) is looked up again after this long
LOCATE_EVERY_S = 60.0
SERVER_CONFIG = "nats-server.conf"
_STORE_DIR = re.compile(r"""\bstore_dir\s*[:=]?\s*(?:"([^"]*)"|'([^']*)'|([^\s}#;,]+))""")
_JETSTREAM = re.compile(r"^\s*jetstream\b", re.MULTILINE)
_LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", ""})


@dataclass(frozen=True)
class StoreDir:
    """Where the server keeps its JetStream store, and how that was learned."""

    path: str
    # "the server's /varz at URL", or the config file read
    source: str
    # on this host: its free space can be measured here
    local: bool
    # JetStream's storage limit and what it holds now, when the server said (0: not known)
    max_bytes: int = 0
    used_bytes: int = 0


def full_error(exc: BaseException) -> str:
    """The server's words when `exc` is its answer that the store has no room; '' otherwise."""
    if not isinstance(exc, nats.js.errors.APIError):
        return ""
    words = (exc.description or "").strip()
    if exc.err_code in FULL_ERR_CODES or any(w in words.lower() for w in FULL_WORDS):
        return words or f"JetStream error {exc.err_code}"
    return ""


def is_local(host: str) -> bool:
    """Whether `host` (of a URL) is this host."""
    host = host.strip("[]").lower()
    if host in _LOCAL_HOSTS or host.startswith("127."):
        return True
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    return host in names or host.split(".")[0] in {n.split(".")[0] for n in names}


def server_is_local(settings: Settings) -> bool:
    return all(is_local(urllib.parse.urlsplit(u).hostname or "") for u in settings.urls)


def store_dir_of_config(text: str) -> str | None:
    """The directory a nats-server with this config stores JetStream in, or None when the config
    runs no JetStream. The server keeps its files in `<store_dir>/jetstream`, and without a
    `store_dir` under the system's temporary directory."""
    if not _JETSTREAM.search(text) or re.search(r"^\s*jetstream\s*[:=]?\s*(false|disabled)\b", text, re.M):
        return None
    match = _STORE_DIR.search(text)
    base = next((g for g in match.groups() if g), "") if match else ""
    base = base or os.path.join(tempfile.gettempdir(), "nats")
    return os.path.join(base, "jetstream")


def config_candidates(settings: Settings, environ: dict[str, str] | None = None) -> list[Path]:
    """The server configs mesh writes on a host: next to a role's config file (the units'
    `<config dir>/nats-server.conf`), and in the data dir (`mesh up`'s)."""
    env = os.environ if environ is None else environ
    out = []
    if env.get(ENV_CONFIG):
        out.append(Path(env[ENV_CONFIG]).expanduser().parent / SERVER_CONFIG)
    out.append(Path(settings.data_dir).expanduser() / SERVER_CONFIG)
    return out


def read_varz(url: str, timeout_s: float = MONITOR_TIMEOUT_S) -> dict[str, Any]:
    """The server's `/varz` (its monitoring endpoint). Raises OSError when it cannot be read."""
    target = url.rstrip("/") + "/varz"
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as answer:
            data: dict[str, Any] = json.loads(answer.read())
    except (urllib.error.URLError, ValueError) as exc:
        raise OSError(f"cannot read {target}: {exc}") from exc
    return data


def locate(settings: Settings, environ: dict[str, str] | None = None) -> StoreDir | None:
    """Where the server's store is, or None when nothing here can tell (blocking: run it in a
    thread). Raises OSError when `nats_monitor_url` is set but does not answer."""
    if settings.nats_monitor_url:
        varz = read_varz(settings.nats_monitor_url)
        js = varz.get("jetstream") or {}
        config, stats = js.get("config") or {}, js.get("stats") or {}
        if not config.get("store_dir"):
            return None
        host = urllib.parse.urlsplit(settings.nats_monitor_url).hostname or ""
        return StoreDir(
            path=str(config["store_dir"]),
            source=f"the server's /varz at {settings.nats_monitor_url}",
            local=is_local(host),
            max_bytes=int(config.get("max_storage") or 0),
            used_bytes=int(stats.get("storage") or 0),
        )
    if not server_is_local(settings):
        return None  # a config here describes this host's server, not the one mesh talks to
    for path in config_candidates(settings, environ):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found = store_dir_of_config(text)
        if found:
            return StoreDir(path=found, source=str(path), local=True)
    return None


def free_bytes(path: str) -> int | None:
    """Free space (for an unprivileged writer) on the filesystem of `path`, or of the nearest
    directory above it that exists; None when it cannot be measured."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def room(where: StoreDir | None) -> str:
    """'N MB free in DIR', or why that is not known here."""
    if where is None:
        return (
            "free space unknown: the server's store directory is not known on this host; set "
            "nats_monitor_url to its monitoring address (`http: 127.0.0.1:8222` in its config)"
        )
    if not where.local:
        return f"its store {where.path} is on another host: free space not measurable here"
    free = free_bytes(where.path)
    if free is None:
        return f"free space of {where.path} not measurable here"
    text = f"{free // MB} MB free in {where.path}"
    if where.max_bytes > 0:
        text += f"; JetStream holds {where.used_bytes // MB} of its {where.max_bytes // MB} MB limit"
    elif free >= FULL_FREE_BYTES:
        text += ": the disk has room, so JetStream's own limit is reached"
    return text


def stream_of(subject: str) -> str:
    """What stands for a subject's stream here: its first two tokens (`$KV.<bucket>`,
    `<prefix>.evt`, `<prefix>.work`, ...). A full disk leaves some streams refusing writes while
    others take them, so each is told apart."""
    return ".".join(subject.split(".", 2)[:2])


class StoreWatch:
    """Tells a full store from other server errors, says so once, and once when writes go
    through again. The bus calls `failed` with every failed JetStream write and `cleared` after
    one that went through; agents stay quiet about their retries while `full`.

    It is over when every stream a write was refused on has taken one again (or none has been
    refused for `SETTLE_S`), and the disk, where measurable, has room for a message."""

    def __init__(
        self,
        settings: Settings,
        environ: dict[str, str] | None = None,
        memory_subjects: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.environ = environ
        # subject prefixes of what the server keeps in memory: a write there that goes through
        # says nothing about the file store
        self.memory_subjects = memory_subjects
        self.full = False
        # streams (`stream_of`) a write was refused on while full, and when the last one was
        self._refused: set[str] = set()
        self._refused_at = 0.0
        self._stuck_said = False
        self._reconnected_at = -STALE_S
        # when the last "full" was said, and whether this episode goes unsaid (too soon after)
        self._said_at = -REPEAT_S
        self._quiet = False
        self._where: StoreDir | None = None
        self._located_at = -LOCATE_EVERY_S
        self._lock = asyncio.Lock()

    async def where(self) -> StoreDir | None:
        async with self._lock:
            if time.monotonic() - self._located_at >= LOCATE_EVERY_S:
                try:
                    self._where = await asyncio.to_thread(locate, self.settings, self.environ)
                except OSError as exc:
                    log.debug("cannot locate the server's store: %s", exc)
                    self._where = None
                self._located_at = time.monotonic()
            return self._where

    async def failed(self, exc: BaseException, subjects: Iterable[str] = ()) -> bool:
        """Whether `exc`, a failed write to `subjects`, comes from a full store (said when it
        first does)."""
        words = full_error(exc)
        if not words and isinstance(exc, TimeoutError):
            where = await self.where()
            free = free_bytes(where.path) if where is not None and where.local else None
            if free is None:
                return False
            if free < self.settings.max_payload_bytes:
                words = f"no answer to a write, and less than {free // MB + 1} MB left on its disk"
            elif self.full:
                self._refuse(subjects)
                # (a write sent before the connection came back is answered by its timeout)
                stale = time.monotonic() - self._reconnected_at < STALE_S
                if not self._stuck_said and not self._quiet and not stale:
                    self._stuck_said = True
                    log.warning(
                        "the NATS server's store has room again (%s) but the server still does not "
                        "answer writes: a nats-server whose disk filled up refuses writes to the "
                        "streams it was writing until it restarts (`systemctl restart mesh-nats`, or "
                        "restart `mesh up`); waiting",
                        room(where),
                    )
                return True
        if not words:
            return False
        self._refuse(subjects)
        if not self.full:
            self.full = True
            now = time.monotonic()
            # a store at its limit can take a small write and refuse the next: an episode that
            # follows the last so soon is the same one, said already
            self._quiet = now - self._said_at < REPEAT_S
            if self._quiet:
                log.debug("the server's store is full again: %s", words)
                return True
            self._said_at = now
            log.warning(
                "the NATS server's store is full (%s); the server says: %s. Waiting for room and "
                "trying again, nothing is lost meanwhile: free disk space there, or raise "
                "JetStream's max_file_store (an account's max_file) (`mesh doctor` shows the store)",
                room(await self.where()),
                words,
            )
        return True

    def reconnected(self) -> None:
        """The connection came back (the server restarted, say)."""
        self._reconnected_at = time.monotonic()

    def _refuse(self, subjects: Iterable[str]) -> None:
        self._refused.update(stream_of(s) for s in subjects if not s.startswith(self.memory_subjects))
        self._refused_at = time.monotonic()

    async def probe(self) -> bool:
        """Whether the store is full: known so, or its disk (when measurable here) has less room
        than one message. For a write whose answer is overdue."""
        return self.full or await self.failed(TimeoutError("a write got no answer in time"))

    def cleared(self, subject: str) -> None:
        """A write to `subject` went through: say once that the store takes writes again when
        this was the last stream refusing them."""
        if not self.full or subject.startswith(self.memory_subjects):
            return
        self._refused.discard(stream_of(subject))
        if self._refused and time.monotonic() - self._refused_at < SETTLE_S:
            return  # others still refuse (a disk that filled leaves some streams stuck)
        where = self._where
        if where is not None and where.local:
            free = free_bytes(where.path)
            if free is not None and free < self.settings.max_payload_bytes:
                return  # a small write fitted in what is left: the disk is still full
        self.full = False
        self._refused.clear()
        self._stuck_said = False
        if self._quiet:
            log.debug("the server's store takes writes again")
            return
        log.info("the NATS server's store takes writes again (%s); carrying on", room(where))
