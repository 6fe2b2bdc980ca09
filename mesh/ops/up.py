"""`mesh up`: an embedded server, a brain, N workers, a watchdog, the auditor, the gateway and the
web console on this machine, as child processes.

The supervisor restarts an agent that dies (with a growing delay, so a crash
loop does not spin) and on Ctrl-C or SIGTERM stops workers first, then the
brain, then the server, each with SIGTERM so they drain. Should the supervisor
itself be killed (SIGKILL, the OOM killer), its reaper (`mesh.host.reaper`)
stops them in the same order, each given `STOP_GRACE_S` before SIGKILL: nothing
it started is left running on the store.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.host.gpu import as_indices, gpu_token
from mesh.host.reaper import Reaper
from mesh.ops.embedded import EmbeddedServer, agent_command

log = logging.getLogger(__name__)

# a dead supervisor's children, stopped by its reaper: the agents but the brain, the brain,
# then the server (the order of `Stack.stop`), each stage given this long to stop on SIGTERM
STOP_GRACE_S = 30.0
AGENTS_STAGE, BRAIN_STAGE, SERVER_STAGE = 0, 1, 2


def _last_words(log_path: Path | None, limit: int = 300) -> str:
    """The last lines an exited agent wrote to its log (why it stopped, most often), their last
    `limit` characters; '' when there is none to read."""
    if log_path is None:
        return ""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # (the last few lines: a message the console wrapped to its width spans several)
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return " ".join(lines[-3:])[-limit:]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path | None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    _log_file: object = field(default=None, repr=False)
    # told of each process this child starts, in its stage (`Stack` sets it)
    reaper: Reaper | None = field(default=None, repr=False)
    stage: int = AGENTS_STAGE

    def start(self, env: dict[str, str]) -> None:
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its life
            self._log_file = out
        if self.reaper is not None and self.proc is not None:
            self.reaper.forget(self.proc.pid)  # (its group is gone: the number may be reused)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
        )
        if self.reaper is not None:
            self.reaper.watch(self.proc.pid, self.stage)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()

    def wait(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()


class Stack:
    """The whole single-machine mesh."""

    def __init__(
        self,
        data_dir: str,
        port: int,
        workers: int,
        slots: int,
        *,
        log_dir: str | None = None,
        env: dict[str, str] | None = None,
        max_payload: int = 8 * 1024 * 1024,
        auditor: bool = True,
        gpus: tuple[int | tuple[int, ...] | None, ...] = (),
        watchdog: bool = True,
        gateway: bool = True,
        durability: str = "always",
        web_port: int | None = None,
    ) -> None:
        self.server = EmbeddedServer(data_dir, port, max_payload, durability=durability)
        self.workers = workers
        self.slots = slots
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = dict(os.environ if env is None else env)
        # the agents know how the server syncs (whether atomic batches pay: `Bus._atomic_groups`)
        self.env["MESH_DURABILITY"] = durability
        self.auditor = auditor
        self.watchdog = watchdog
        # the gateway to Claude (without an API key it runs, and fails escalations saying why)
        self.gateway = gateway
        # one model worker per entry: a GPU index, a set of them, or None for the CPU standing in
        self.gpus = gpus
        # the web console's port (None: no console)
        self.web_port = web_port
        self.children: list[Child] = []
        self.reaper: Reaper | None = None
        self._server_pid = 0

    @property
    def url(self) -> str:
        return self.server.url

    def _start_server(self) -> None:
        if self.reaper is not None and self._server_pid:
            self.reaper.forget(self._server_pid)
        self.server.start()
        assert self.server.proc is not None
        self._server_pid = self.server.proc.pid
        if self.reaper is not None:
            self.reaper.watch(self._server_pid, SERVER_STAGE)

    def start(self) -> None:
        self.reaper = Reaper(marked=False, grace_s=STOP_GRACE_S)
        try:
            self._start_server()
        except BaseException:
            self.reaper.close()
            self.reaper = None
            raise
        url = self.server.url
        self.env["MESH_NATS_URL"] = url
        self.children = [Child("brain", agent_command("brain", url), self._log("brain"), stage=BRAIN_STAGE)]
        for i in range(self.workers):
            self.children.append(
                Child(
                    f"worker-{i + 1}",
                    agent_command("worker", url, "--slots", str(self.slots)),
                    self._log(f"worker-{i + 1}"),
                )
            )
        for gpu in self.gpus:
            indices = as_indices(gpu)
            name = f"gpu-{gpu_token(indices)}" if indices else "cpu-models"
            args = (
                ["--gpu", ",".join(map(str, indices))]
                if indices
                else ["--gpu", "none", "--classes", "script,llm"]
            )
            self.children.append(Child(name, agent_command("worker", url, *args), self._log(name)))
        if self.watchdog:
            self.children.append(Child("watchdog", agent_command("watchdog", url), self._log("watchdog")))
        if self.auditor:
            self.children.append(Child("auditor", agent_command("auditor", url), self._log("auditor")))
        if self.gateway:
            self.children.append(Child("gateway", agent_command("gateway", url), self._log("gateway")))
        if self.web_port is not None:
            argv = agent_command("web", url, "--port", str(self.web_port))
            self.children.append(Child("web", argv, self._log("web")))
        for child in self.children:
            self._launch(child)

    def add(self, child: Child) -> None:
        """Start one more agent under the stack (its reaper told), beside those of `start`."""
        self.children.append(child)
        self._launch(child)

    def _launch(self, child: Child) -> None:
        child.reaper = self.reaper
        child.start(self.env)

    def _log(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def supervise(self) -> None:
        """Restart dead agents; call this every so often."""
        now = time.monotonic()
        for child in self.children:
            if child.alive() or child.proc is None:
                continue
            if child.next_start == 0.0:
                rc = child.proc.returncode
                delay = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                if now - child.started_at > 60:
                    child.restarts = 0
                    delay = 0.5
                said = _last_words(child.log_path)
                log.warning(
                    "%s exited with %s%s; restarting in %.1fs",
                    child.name,
                    rc,
                    f" ({said}; all of it in {child.log_path})" if said else "",
                    delay,
                )
                child.next_start = now + delay
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start(self.env)
        if not self.server.running():
            log.error("the embedded nats-server exited; restarting it")
            self._start_server()

    def stop(self) -> None:
        # (the order the reaper keeps should this process die: `AGENTS_STAGE`, then `BRAIN_STAGE`)
        for stage in (AGENTS_STAGE, BRAIN_STAGE):
            group = [c for c in self.children if c.stage == stage]
            for child in group:
                child.terminate()
            for child in group:
                child.wait(60.0)
        self.server.stop()
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None
