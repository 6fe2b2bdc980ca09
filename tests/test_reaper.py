"""The worker's reaper, with real processes: what it kills when the worker dies, and what not.

A stand-in worker (a small script) starts a reaper and bodies the way the worker does, in
their own sessions; the test kills it with SIGKILL, or lets it stop cleanly, and looks at
which bodies are left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mesh.host.reaper import MARK_VAR, group_alive, marked
from tests.conftest import ROOT

WAIT_S = 60.0

STAND_IN = r"""
import json, os, subprocess, sys, time
from mesh.host.reaper import Reaper

reaper = Reaper()
marked = {**os.environ, **reaper.env}


def body(cmd, env):
    return subprocess.Popen(["sh", "-c", cmd], env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)


pids = {"reaper": reaper.proc.pid}
# a body the reaper was told about
listed = body("sleep 300", marked)
reaper.watch(listed.pid)
pids["listed"] = listed.pid
# a body started but not yet told (the worker died between the spawn and the pipe)
pids["unlisted"] = body("sleep 300", marked).pid
# the same without the mark: nothing ties it to the worker
pids["unmarked"] = body("sleep 300", dict(os.environ)).pid
# a body that ended, leaving a process in its group
ended = body("sleep 300 >/dev/null & echo $!", marked)
reaper.watch(ended.pid)
pids["leftover"] = int(ended.stdout.readline())
ended.wait()
reaper.forget(ended.pid)
# a body that ended after detaching a process into a session of its own
detach = "import os; os.setsid(); os.execvp('sleep', ['sleep', '300'])"
ended = body(f"{sys.executable} -c \"{detach}\" >/dev/null & echo $!", marked)
reaper.watch(ended.pid)
pids["detached"] = int(ended.stdout.readline())
ended.wait()
while os.getpgid(pids["detached"]) != pids["detached"]:  # until it has detached
    time.sleep(0.01)
reaper.forget(ended.pid)
if sys.argv[1] == "stop":
    reaper.close()
print(json.dumps(pids), flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S:g}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def stand_in() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # what a test left running: every `sleep 300` started under this test's stand-in
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if p.info["cmdline"] == ["sleep", "300"] and p.info["environ"].get("MESH_REAPER_TEST") == str(
                os.getpid()
            ):
                p.kill()
        except (psutil.Error, AttributeError):
            continue


def start(stand_in: list[subprocess.Popen[str]], how: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    env = {**os.environ, "MESH_REAPER_TEST": str(os.getpid()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, how], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    stand_in.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the stand-in worker ended early (exit {proc.wait()})"
    return proc, json.loads(line)


def test_a_killed_worker_takes_its_bodies_with_it_even_one_it_had_not_listed(
    stand_in: list[subprocess.Popen[str]],
) -> None:
    proc, pids = start(stand_in, "die")
    assert all(running(pids[k]) for k in ("listed", "unlisted", "unmarked", "leftover", "detached"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.Process(pids["reaper"]).wait(WAIT_S)
    wait_for(lambda: not running(pids["listed"]), "the listed body to die")
    wait_for(lambda: not running(pids["unlisted"]), "the body started but not yet listed to die")
    wait_for(lambda: not running(pids["detached"]), "the detached process to die")
    # the reaper is done: what it left, it leaves
    assert running(pids["unmarked"]), "a process without the mark is not the worker's"
    assert running(pids["leftover"]), "what a finished body left in its group stays, as before"


def test_a_clean_stop_kills_nothing_it_was_not_told_of(stand_in: list[subprocess.Popen[str]]) -> None:
    proc, pids = start(stand_in, "stop")
    # (the stand-in's close() waited for the reaper to end)
    wait_for(lambda: not running(pids["reaper"]), "the reaper to end")
    # the listed body was still listed at `bye`: a worker's stop has ended its bodies by then,
    # so one still listed is killed all the same
    wait_for(lambda: not running(pids["listed"]), "the listed body to die")
    for name in ("unlisted", "unmarked", "leftover", "detached"):
        assert running(pids[name]), name
    proc.kill()


def test_marked_reads_the_environment_of_each_process(tmp_path: Path) -> None:
    def proc(pid: str, environ: bytes) -> None:
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "environ").write_bytes(environ)

    proc("10", f"A=1\0{MARK_VAR}=abc\0B=2\0".encode())
    proc("11", f"{MARK_VAR}=abcd\0".encode())  # another worker's mark that starts alike
    proc("12", f"X={MARK_VAR}=abc\0".encode())  # the mark inside another variable's value
    proc("13", f"{MARK_VAR}=abc".encode())  # last, with no terminator
    (tmp_path / "self").mkdir()
    (tmp_path / "14").mkdir()  # gone, or not readable
    assert sorted(marked("abc", str(tmp_path))) == [10, 13]
    assert list(marked("abc", str(tmp_path / "absent"))) == []


STAGED = r"""
import os, subprocess, sys, time
from mesh.host.reaper import Reaper

out = sys.argv[1]
reaper = Reaper(marked=False, grace_s=float(sys.argv[2]))


def child(name, on_term):
    # says when it is asked to stop, then stops (or not: `on_term` empty ignores SIGTERM)
    script = f"trap '{on_term}' TERM; echo up > {out}.{name}; while :; do sleep 0.05; done"
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    while not os.path.exists(f"{out}.{name}"):
        time.sleep(0.01)
    return proc


stop = f"echo %s $(date +%%s.%%N) >> {out}; exit 0"
server = child("server", stop % "server")
reaper.watch(server.pid, 2)
brain = child("brain", stop % "brain")
reaper.watch(brain.pid, 1)
worker = child("worker", stop % "worker")
reaper.watch(worker.pid, 0)
stubborn = child("stubborn", "")
reaper.watch(stubborn.pid, 0)
print(" ".join(str(p.pid) for p in (server, brain, worker, stubborn)), flush=True)
time.sleep(300)
"""


def test_a_staged_reaper_stops_each_stage_in_turn_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "order"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    owner = subprocess.Popen(
        [sys.executable, "-c", STAGED, str(out), "1.0"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert owner.stdout is not None
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 4, "the owner started its children"
        owner.kill()  # SIGKILL: its reaper's pipe closes
        owner.wait()
        wait_for(lambda: not any(running(pid) for pid in pids), "every child to be gone")
        # the workers' stage first, then the brain, then the server: each asked with SIGTERM
        said = [line.split() for line in out.read_text().splitlines()]
        assert [name for name, _ in said] == ["worker", "brain", "server"]
        # the stubborn one held its stage for the whole grace, then was killed: only then was
        # the brain asked (a lower bound, which a slow machine cannot break)
        at = {name: float(t) for name, t in said}
        assert at["brain"] - at["worker"] >= 0.9
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        for pid in locals().get("pids", []):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_a_group_is_alive_while_a_process_of_it_runs_not_a_zombie(tmp_path: Path) -> None:
    def proc(pid: str, stat: str) -> None:
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)

    proc("20", "20 (sh) S 1 20 20 0 -1")
    proc("21", "21 (a (b) c) R 20 20 20 0 -1")  # a name with spaces and parentheses
    proc("30", "30 (sleep) Z 1 30 30 0 -1")  # a zombie, not reaped yet
    proc("31", "31 (x) S 1 7 7 0 -1")
    assert group_alive(20, str(tmp_path))
    assert not group_alive(30, str(tmp_path)), "a zombie cannot be killed again: the group is done"
    assert not group_alive(31, str(tmp_path)), "31 is in group 7"
    assert group_alive(7, str(tmp_path))
    (tmp_path / "20" / "stat").unlink()
    (tmp_path / "21" / "stat").write_text("21 (a (b) c) Z 20 20 20 0 -1")
    assert not group_alive(20, str(tmp_path))
