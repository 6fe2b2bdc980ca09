"""A worker's reaper: kills its task bodies if the worker dies, even by SIGKILL.

Bodies run in their own process groups (so a timeout or cancel kills them whole), which also
means nothing ties them to the worker: a worker killed with SIGKILL would leave its bodies
running beside the copy that JetStream redelivers to another worker. The worker starts this
small process with a pipe; it writes `+ PGID` when a body starts and `- PGID` when it is done.
When the pipe closes, the worker is gone (a clean stop closes it with no groups left), and the
reaper kills every group still listed.

    python -m mesh.host.reaper        (started by the worker, never by hand)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def main() -> int:
    # the worker's terminal or service manager may signal the whole session: outlive that
    # long enough to read the pipe's end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        op, _, pgid = line.strip().partition(" ")
        if not pgid.isdigit():
            continue
        if op == "+":
            groups.add(int(pgid))
        elif op == "-":
            groups.discard(int(pgid))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return 0


class Reaper:
    """The worker's side: start the reaper, tell it about each body's process group."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.host.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def _send(self, line: str) -> None:
        if self.proc.stdin is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def watch(self, pgid: int) -> None:
        self._send(f"+ {pgid}")

    def forget(self, pgid: int) -> None:
        self._send(f"- {pgid}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


if __name__ == "__main__":
    raise SystemExit(main())
