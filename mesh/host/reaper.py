"""A worker's reaper: kills its task bodies if the worker dies, even by SIGKILL.

Bodies run in their own process groups (so a timeout or cancel kills them whole), which also
means nothing ties them to the worker: a worker killed with SIGKILL would leave its bodies
running beside the copy that JetStream redelivers to another worker. The worker starts this
small process with a pipe; it writes `+ PGID` when a body starts and `- PGID` when it is done.
When the pipe closes, the worker is gone, and the reaper kills every group still listed (a
clean stop writes `bye` first, with no groups left).

The pipe alone leaves a window: a body runs from its fork, and the worker tells the pipe only
once the spawn returns to it. A worker killed between the two would leave a body no one
listed. So every process the worker starts under the reaper also carries a mark in its
environment (`MARK_VAR`, a random value per worker, inherited by everything the body starts),
and when the pipe closes without `bye` the reaper also kills every marked process of this
machine that leads its own process group, with its group, until it finds none (Linux: /proc;
elsewhere the list alone). That is a body the list missed, or a process a body detached into a
session of its own; what a finished body left running in its group is left alone, as before.

`mesh up` keeps one too, for the server and agents it starts (`mesh.ops.up`), with no mark and
a grace: its children are told to stop (SIGTERM) and killed only if they are still there after
the grace, in stages, as a clean stop orders them (`+ PGID STAGE`: the workers, then the brain,
then the server), so that a `mesh up` killed with SIGKILL leaves nothing running on its store.

    python -m mesh.host.reaper MARK|- [GRACE_S]   (started by its owner, never by hand)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

MARK_VAR = "MESH_REAPER_MARK"
# rounds of the sweep: a body forking while one round reads /proc is found by the next
SWEEPS = 5


def each_process(file: str, proc_dir: str = "/proc") -> Iterator[tuple[int, bytes]]:
    """Each process's pid and its /proc `file` (`environ`, `stat`), of those this user may
    read: the rest are gone, or not ours. Nothing without /proc."""
    try:
        names = os.listdir(proc_dir)
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_dir}/{name}/{file}", "rb") as f:
                yield int(name), f.read()
        except OSError:
            continue


def marked(mark: str, proc_dir: str = "/proc") -> Iterator[int]:
    """The pids of the processes whose environment holds `MARK_VAR=mark`."""
    needle = f"{MARK_VAR}={mark}".encode()
    for pid, environ in each_process("environ", proc_dir):
        if needle in environ.split(b"\0"):
            yield pid


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def sweep(mark: str) -> int:
    """Kill every marked process that leads its own process group, with its group, round
    after round until a round finds none; return how many groups were killed."""
    found = 0
    for _ in range(SWEEPS):
        leaders = [pid for pid in marked(mark) if leads_its_group(pid)]
        if not leaders:
            break
        found += len(leaders)
        for pgid in leaders:
            kill_group(pgid)
    return found


def group_alive(pgid: int, proc_dir: str = "/proc") -> bool:
    """Whether a process of group `pgid` still runs (a zombie, waiting for whoever adopted it to
    reap it, does not: it cannot be killed again). Without /proc, whether the group exists."""
    if not os.path.isdir(proc_dir):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    group = str(pgid).encode()
    for _pid, stat in each_process("stat", proc_dir):
        # `pid (comm) state ppid pgrp ...`: comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == group and fields[0] != b"Z":
            return True
    return False


def stop_groups(groups: dict[int, int], grace_s: float) -> None:
    """Stop the groups stage by stage (lowest first): SIGKILL with no grace, else SIGTERM, then
    SIGKILL for what is still running once `grace_s` has passed."""
    for stage in sorted(set(groups.values())):
        pgids = [pgid for pgid, of in groups.items() if of == stage]
        if grace_s <= 0:
            for pgid in pgids:
                kill_group(pgid)
            continue
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pgids and time.monotonic() < deadline:
            time.sleep(0.1)
            pgids = [pgid for pgid in pgids if group_alive(pgid)]
        for pgid in pgids:
            kill_group(pgid)


def main(argv: list[str]) -> int:
    # the owner's terminal or service manager may signal the whole session: outlive that long
    # enough to read the pipe's end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mark = argv[0] if argv and argv[0] != "-" else ""
    grace_s = float(argv[1]) if len(argv) > 1 else 0.0
    groups: dict[int, int] = {}  # process group -> its stage
    clean = False
    for line in sys.stdin:
        op, *args = line.split()
        if op == "bye":
            clean = True
            break
        if not args or not args[0].isdigit():
            continue
        pgid = int(args[0])
        if op == "+":
            groups[pgid] = int(args[1]) if len(args) > 1 and args[1].isdigit() else 0
        elif op == "-":
            groups.pop(pgid, None)
    stop_groups(groups, grace_s)
    if mark and not clean:
        sweep(mark)
    return 0


class Reaper:
    """The owner's side: start the reaper, tell it about each child's process group, and give
    each child the reaper's mark (`env`). `marked=False`: no mark (`env` is empty) and no
    sweep; `grace_s`: how long a child has to stop on SIGTERM before SIGKILL (0: SIGKILL)."""

    def __init__(self, marked: bool = True, grace_s: float = 0.0) -> None:
        self.mark = secrets.token_hex(16) if marked else ""
        # what a process started under this reaper adds to its environment
        self.env = {MARK_VAR: self.mark} if marked else {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.host.reaper", self.mark or "-", str(grace_s)],
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

    def watch(self, pgid: int, stage: int = 0) -> None:
        self._send(f"+ {pgid} {stage}")

    def forget(self, pgid: int) -> None:
        self._send(f"- {pgid}")

    def close(self) -> None:
        """The owner's clean stop: its children have ended (or been killed) by now."""
        self._send("bye")
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
