"""A plan's files travel with it: `mesh submit` bundles what the plan uses under its directory,
and a worker on another host runs the plan's tasks in a work directory holding those files.

"Another host" here is a worker with its own MESH_HOST_ID, XDG_DATA_HOME and HOME (so its data
and work directories share no path with the submitter's) started from the repository root,
never from the plan's directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nats.js.errors
import pytest

from agents.worker_files import MARKER, WorkDirs
from mesh.bus import client
from mesh.bus.bundle import send_bundle
from mesh.bus.files import blob_name, read_manifest
from mesh.events import PlanSpec, TaskSpec, WorkItem
from mesh.host.bundle import bundle_files
from mesh.host.config import host_id, load_settings
from mesh.host.executors import RunContext, run_shell
from mesh.host.planfiles import load_plan
from mesh.status import FailReason, PlanStatus, TaskStatus
from tests.conftest import ROOT, Mesh

PLAN = """\
# Travel

## Tasks

### read
- foreach: F in data/*.txt
- retries: 0

```shell
./tools/check.sh {F}
```
"""

# succeeds only where the script and the data file it is given both are, with their bytes
CHECK = '#!/bin/sh\nset -e\ntest "$(cat "$1")" = "hello from $(basename "$1" .txt)"\n'


def make_plan(base: Path) -> Path:
    (base / "tools").mkdir(parents=True)
    (base / "data").mkdir()
    script = base / "tools" / "check.sh"
    script.write_text(CHECK)
    script.chmod(0o755)
    for name in ("a", "b"):
        (base / "data" / f"{name}.txt").write_text(f"hello from {name}")
    plan = base / "plan.md"
    plan.write_text(PLAN)
    return plan


def other_host(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a worker on another host: its own id, data and home."""
    home = tmp / "other"
    return {
        "MESH_HOST_ID": "other-host",
        "XDG_DATA_HOME": str(home / "data"),
        "HOME": str(home / "home"),
        **extra,
    }


def submit(m: Mesh, plan: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """`mesh submit PLAN` as a user runs it (it may fail)."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", "submit", str(plan)],
        env={**m.env, "COLUMNS": "200", **extra},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def plan_id_of(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


async def test_plan_files_travel_to_another_host(mesh: Mesh, tmp_path: Path) -> None:
    m = mesh
    plan = make_plan(tmp_path / "plan")
    first = submit(m, plan)
    pid = plan_id_of(first)
    assert "bundle: 3 file(s)" in first.stderr and "0 already in the store" in first.stderr
    # the same files again: stored once
    again = submit(m, plan)
    pid2 = plan_id_of(again)
    assert "3 already in the store" in again.stderr
    # nothing of the plan's directory is left on this host: the files can come only from the store
    shutil.rmtree(tmp_path / "plan")
    m.brain()
    m.start_agent("other", "worker", "--slots", "2", env=other_host(tmp_path))
    for p in (pid, pid2):
        done = await m.wait_plan(p)
        tasks = await m.tasks(p)
        assert done.status == PlanStatus.SUCCEEDED, {t.task_id: t.error for t in tasks.values()}
        assert set(tasks) == {"read-1", "read-2"}
        assert done.host == host_id(m.settings) and done.bundle
    work = tmp_path / "other" / "data" / "mesh" / "work" / pid
    assert (work / "tools" / "check.sh").read_text() == CHECK
    assert os.access(work / "tools" / "check.sh", os.X_OK)
    assert (work / "data" / "a.txt").read_text() == "hello from a"
    assert (work / MARKER).exists()


async def test_a_bundle_over_the_limit_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    m = mesh
    plan = make_plan(tmp_path / "plan")
    (tmp_path / "plan" / "data" / "big.txt").write_bytes(b"x" * (2 * 1024 * 1024))
    done = submit(m, plan, MESH_BUNDLE_MAX_MB="1")
    assert done.returncode != 0
    assert "bundle_max_mb" in done.stderr and "data/big.txt (2.0 MB)" in done.stderr, done.stderr
    assert "nothing was submitted" in done.stderr
    bus = await m.bus()
    plans, _ = await client.read_plans(bus)
    assert plans == []
    names = [info.name async for info in _objects(bus)]
    assert not any(n.startswith("blobs/") for n in names), names


async def _objects(bus):  # type: ignore[no-untyped-def]
    store = await bus.objects()
    try:
        for info in await store.list():
            yield info
    except nats.js.errors.NotFoundError:  # an empty store has no list
        return


async def test_a_missing_bundle_file_fails_the_attempt(mesh: Mesh, tmp_path: Path) -> None:
    m = mesh
    plan = make_plan(tmp_path / "plan")
    pid = plan_id_of(submit(m, plan))
    sha = hashlib.sha256(b"hello from a").hexdigest()
    await (await (await m.bus()).objects()).delete(blob_name(sha))
    m.brain()
    m.start_agent("other", "worker", "--slots", "2", env=other_host(tmp_path))
    done = await m.wait_plan(pid)
    assert done.status == PlanStatus.FAILED
    task = (await m.tasks(pid))["read-1"]
    assert task.status == TaskStatus.FAILED
    assert "data/a.txt could not be fetched" in task.error, task.error
    assert blob_name(sha) in task.error
    assert task.reason != FailReason.DEFINITION  # another try may find it


async def test_a_work_directory_that_cannot_be_made_is_a_definition_error(mesh: Mesh, tmp_path: Path) -> None:
    m = mesh
    plan = make_plan(tmp_path / "plan")
    pid = plan_id_of(submit(m, plan))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the work directories should be")
    m.brain()
    m.start_agent("other", "worker", "--slots", "2", env=other_host(tmp_path, MESH_WORK_DIR=str(blocker)))
    done = await m.wait_plan(pid)
    assert done.status == PlanStatus.FAILED
    task = (await m.tasks(pid))["read-1"]
    assert task.reason == FailReason.DEFINITION, task
    assert "cannot make the task's work directory" in task.error and "MESH_WORK_DIR" in task.error


async def test_a_missing_workdir_is_a_definition_error_not_the_workers_directory() -> None:
    item = WorkItem(plan_id="p", task_id="t", attempt=1, body="pwd", workdir="/no/such/mesh/dir")
    result = await run_shell(item, RunContext())
    assert not result.ok and result.definition_error
    assert "/no/such/mesh/dir does not exist" in result.error


def test_what_is_bundled_and_what_is_not(tmp_path: Path) -> None:
    base = tmp_path / "plan"
    make_plan(base)
    (base / "notes.md").write_text("read by nothing")
    (tmp_path / "outside.txt").write_text("outside")
    (base / "link-out.txt").symlink_to(tmp_path / "outside.txt")
    (base / "link-in.txt").symlink_to(base / "data" / "a.txt")
    (base / "data" / "more").mkdir()
    (base / "data" / "more" / "extra.csv").write_text("1,2")
    body = (
        f"cat link-out.txt link-in.txt {tmp_path / 'outside.txt'} ../outside.txt data/more "
        f"--conf={base / 'notes.md'} < tools/check.sh | wc -l; echo nothing.txt\n"
        "# the script reads data/more/extra.csv"
    )
    matched: list[str] = []
    spec = load_plan(base / "plan.md", matched=matched)
    assert sorted(matched) == ["data/a.txt", "data/b.txt"]
    spec = PlanSpec(title="t", tasks=(*spec.tasks, TaskSpec(id="x", body=body)), workdir=str(base))
    found = bundle_files(spec, matched, max_mb=1)
    rels = sorted(f.rel for f in found.files)
    assert rels == [
        "data/a.txt",
        "data/b.txt",
        "data/more/extra.csv",
        "link-in.txt",
        "notes.md",
        "tools/check.sh",
    ]
    # an absolute path under the directory travels, and is said to be a problem elsewhere
    assert [n for n in found.notes if "absolute path" in n] == [
        f"{base / 'notes.md'} (named by task x) is named by its absolute path: it travels, but on another "
        "host the task runs in a work directory where that path does not exist; write it relative"
    ]
    assert any("link-out.txt" in n and "link out of" in n for n in found.notes)
    prompt = TaskSpec(id="p", body="summarise notes.md", kind="prompt", cls="llm")
    assert bundle_files(PlanSpec(title="t", tasks=(prompt,), workdir=str(base)), max_mb=1).files == []
    assert bundle_files(spec, matched, max_mb=0).files == []


def test_the_sweep_removes_only_old_marked_work_directories(tmp_path: Path) -> None:
    settings = load_settings(environ={"XDG_CONFIG_HOME": str(tmp_path), "MESH_WORK_DIR": str(tmp_path / "w")})
    dirs = WorkDirs(settings)
    old, fresh = dirs.make("old-plan")[0], dirs.make("new-plan")[0]
    (tmp_path / "w" / "not-ours").mkdir()
    os.utime(os.path.join(old, MARKER), (0, 0))
    os.utime(tmp_path / "w" / "not-ours", (0, 0))
    assert dirs.sweep() == [old]
    assert os.path.isdir(fresh) and (tmp_path / "w" / "not-ours").is_dir()


@pytest.mark.parametrize("value", ["", "machine"])
def test_host_id(tmp_path: Path, value: str) -> None:
    settings = load_settings(environ={"XDG_CONFIG_HOME": str(tmp_path), "MESH_HOST_ID": value})
    machine = tmp_path / "machine-id"
    machine.write_text("abc123\n")
    assert host_id(settings, str(machine)) == (value or "abc123")
    assert host_id(settings, str(tmp_path / "none")) == (value or os.uname().nodename)


async def test_a_copy_that_may_expire_soon_is_stored_again(mesh: Mesh, tmp_path: Path) -> None:
    make_plan(tmp_path / "plan")
    files = [(rel, str(tmp_path / "plan" / rel)) for rel in ("data/a.txt", "tools/check.sh")]
    store = await (await mesh.bus()).objects()
    first = await send_bundle(store, files)
    assert (first.files, first.already) == (2, 0)
    assert (await send_bundle(store, files)).already == 2  # young copies: kept
    again = await send_bundle(store, files, refresh_after_s=0.0)  # old ones: sent afresh
    assert again.already == 0 and again.sha256 == first.sha256
    manifest = await read_manifest(store, first.sha256)
    modes = {rel: os.stat(path).st_mode & 0o777 for rel, path in files}
    assert modes["tools/check.sh"] & 0o100
    assert [(f.path, f.size, f.mode) for f in manifest.files] == [
        ("data/a.txt", 12, modes["data/a.txt"]),
        ("tools/check.sh", len(CHECK), modes["tools/check.sh"]),
    ]
