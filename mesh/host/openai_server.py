"""A managed OpenAI-compatible server: the process a worker starts as an LLM's load, stops as its unload.

The command comes from the registry (`ModelSpec.command`, a list: no shell ever reads it) with
`{port}` (a free port on 127.0.0.1, picked here), `{model_path}` (the model's file, resolved as
an in-process load would), `{gpu}` (the worker's GPU indices as its CUDA_VISIBLE_DEVICES names
them) and `{python}` (this interpreter) filled in. The server runs in its own process group, so
stopping it stops everything it started; the worker's reaper is told the group, so a worker
killed even by SIGKILL leaves no server behind. Its output (stdout and stderr together) is kept
as a tail for the error when it fails to start or exits.

"Ready" means `GET {base_url}/models` answers 200. Everything here blocks: the worker calls it
in a thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Protocol

from mesh.host.modelfiles import resolve_path
from mesh.models import ModelError, ModelSpec

READY_POLL_S = 0.25
STOP_GRACE_S = 5.0
TAIL_BYTES = 4096


class GroupWatch(Protocol):
    """The worker's reaper: told a process group when it starts and when it is gone; `env` is
    what the process adds to its environment (the mark the reaper finds it by)."""

    env: dict[str, str]

    def watch(self, pgid: int) -> None: ...

    def forget(self, pgid: int) -> None: ...


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1 (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_argv(name: str, spec: ModelSpec, port: int) -> list[str]:
    """The command line of the model's server, its fields filled in."""
    fields = {
        "port": str(port),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "python": sys.executable,
        "model_path": "",
    }
    if any("{model_path}" in arg for arg in spec.command):
        fields["model_path"] = resolve_path(name, spec)
    try:
        return [arg.format(**fields) for arg in spec.command]
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelError(
            f"model {name!r}: cannot fill in its command ({type(exc).__name__}: {exc}); the fields "
            "are {port}, {model_path}, {gpu} and {python} (a literal brace is written twice)"
        ) from exc


def managed_base_url(spec: ModelSpec, port: int) -> str:
    """Where the managed server answers: the spec's base_url (with {port}), else 127.0.0.1."""
    if spec.base_url:
        return spec.base_url.replace("{port}", str(port)).rstrip("/")
    return f"http://127.0.0.1:{port}/v1"


class ServerProcess:
    """One running server process of a model, in its own process group."""

    def __init__(self, name: str, argv: list[str], base_url: str, reaper: GroupWatch | None = None) -> None:
        self.name = name
        self.argv = argv
        self.base_url = base_url
        self.reaper = reaper
        self.stopping = False
        self._tail = bytearray()
        self._tail_lock = threading.Lock()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if reaper is None else {**os.environ, **reaper.env},
            )
        except OSError as exc:
            raise ModelError(
                f"model {name!r}: cannot start its server {argv[0]!r}: {exc}; check [models.{name}].command"
            ) from exc
        if reaper is not None:
            reaper.watch(self.proc.pid)
        self._drain = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        while chunk := os.read(stream.fileno(), 65536):
            with self._tail_lock:
                self._tail += chunk
                if len(self._tail) > 2 * TAIL_BYTES:
                    del self._tail[: len(self._tail) - TAIL_BYTES]

    def tail(self) -> str:
        """The last lines the server wrote (stdout and stderr)."""
        with self._tail_lock:
            data = bytes(self._tail[-TAIL_BYTES:])
        return data.decode("utf-8", errors="replace").strip()

    def exited(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.proc.wait()

    def gone_error(self, code: int) -> str:
        tail = self.tail()[-1500:]
        return (
            f"the server of model {self.name!r} ({' '.join(self.argv[:4])} ...) exited with code {code}"
            + (f"; its last output:\n{tail}" if tail else " and wrote nothing")
        )

    def wait_ready(self, timeout_s: float, probe: Callable[[], bool]) -> None:
        """Until `probe()` (GET /models) is true; raise ModelError (and stop the server) if it
        exits first or does not answer within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise ModelError(self.gone_error(code))
            if probe():
                return
            if time.monotonic() > deadline:
                tail = self.tail()[-1500:]
                self.stop()
                raise ModelError(
                    f"model {self.name!r}: its server did not answer GET {self.base_url}/models within "
                    f"{timeout_s:g}s (raise [models.{self.name}].start_timeout_s if it loads slowly)"
                    + (f"; its last output:\n{tail}" if tail else "")
                )
            time.sleep(READY_POLL_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace_s`. Safe to call twice."""
        self.stopping = True
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        # what the server left running in its group goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        self._drain.join(timeout=grace_s)
        if self.reaper is not None:
            self.reaper.forget(pgid)
            self.reaper = None
