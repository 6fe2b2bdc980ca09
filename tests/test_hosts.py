"""Two hosts that share no filesystem (tests/hosts.py): work submitted on one runs on the other.

The other host's worker runs in a network namespace of its own where this machine allows it
(root, `ip`), reaching the server over a veth pair, with its own host id, data dir, model cache
and config, in a mount namespace where the submitting host's directories do not exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mesh.bus.outputs import task_output
from mesh.bus.read import read_bucket
from mesh.host.modelfiles import resolve_path
from mesh.models import builtin_models
from mesh.records import AgentRecord, decode_agent
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.hosts import OtherHost, make_network

pytestmark = pytest.mark.integration

ECHO = """\
# Elsewhere

## Tasks

### hello
```shell
echo "hello from $(hostname) in $(pwd)"
```
"""


async def agent_of(mesh: Mesh, name: str) -> AgentRecord:
    """The registration of a process the test started."""
    pid = mesh.procs[name].pid

    async def find() -> AgentRecord | None:
        agents = await read_bucket(await (await mesh.bus()).agents_kv())
        return next((a for a in map(decode_agent, agents.values()) if a.pid == pid), None)

    found = await until(find, HANG_S, f"agent {name} registered")
    assert isinstance(found, AgentRecord)
    return found


def test_a_namespace_and_its_veth_pair_go_away_when_closed() -> None:
    net = make_network()
    if net.mode != "netns":
        pytest.skip(f"no network namespace here: {net.why_shared}")
    name = net.namespace
    try:
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        net.close()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"mh{name.rsplit('-', 1)[1]}" not in links


async def test_the_other_host_sees_none_of_this_hosts_files(two_hosts: tuple[Mesh, OtherHost]) -> None:
    mesh, other = two_hosts
    assert other.host_id not in str(mesh.tmp) and not other.root.is_relative_to(mesh.tmp)
    (mesh.tmp / "only-here.txt").write_text("here\n")
    if other.isolated:
        assert not other.sees(mesh.tmp / "only-here.txt")
        if mesh.tmp.parent in other.hidden:
            assert not other.sees(mesh.tmp)
        assert other.run(["hostname"]).stdout.strip() == other.host_id
    assert other.sees(other.cwd)
    # and the `mesh` command there reaches the server over the link between the hosts
    await mesh.bus()
    done = other.cli("status")
    assert done.returncode == 0, done.stderr
    if other.network.mode == "netns":
        assert other.network.server_host in mesh.server.url


async def test_a_plan_runs_on_the_other_host_alone(two_hosts: tuple[Mesh, OtherHost]) -> None:
    mesh, other = two_hosts
    print(f"other host: {other.mode}")
    mesh.brain()
    other.worker("other", 1)
    record = await agent_of(mesh, "other")
    assert record.role == "worker"
    if other.isolated:
        assert record.host == other.host_id
    # submitted as a user does (`mesh submit`: with its host, so the other host runs it in a
    # work directory of its own; the plan's directory is not there)
    mesh.env["MESH_HOST_ID"] = "submitter"
    (mesh.tmp / "echo.md").write_text(ECHO)
    plan_id = "echo"
    mesh.cli("submit", str(mesh.tmp / "echo.md"), "--id", plan_id)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("other")[-3000:]
    task = (await mesh.tasks(plan_id))["hello"]
    assert task.worker == record.agent_id
    out = await task_output(await mesh.bus(), plan_id, "hello")
    assert out.text.startswith("hello from ")
    if other.isolated:
        # on its own host, in a directory of that host's (the plan's is not there)
        assert out.text.startswith(f"hello from {other.host_id} in {other.root}/"), out.text
    # the worker kept its files in its own data dir, nothing in this host's
    assert not (mesh.tmp / "data").exists()


# ----------------------------------------------------------------------------- files that travel

COUNT = """\
# Travelling

## Tasks

### count
- artifacts: out/*.txt
```shell
mkdir -p out && sh scripts/count.sh data/words.txt > out/count.txt && cat out/count.txt
```

### twice
- depends_on: count
- artifacts: out/twice.txt
```shell
echo $(( $(cat out/count.txt) * 2 )) > out/twice.txt && cat out/twice.txt
```
"""


def write_plan_dir(base: Path) -> Path:
    plan_dir = base / "plan"
    (plan_dir / "scripts").mkdir(parents=True)
    (plan_dir / "data").mkdir()
    (plan_dir / "scripts" / "count.sh").write_text('wc -w < "$1" | tr -d " "\n')
    (plan_dir / "data" / "words.txt").write_text("one two three four five six seven\n")
    (plan_dir / "travel.md").write_text(COUNT)
    return plan_dir


async def submit_and_hide(mesh: Mesh, plan_dir: Path) -> str:
    """`mesh submit` on this host, then the plan's directory moved away: whatever runs it must
    have brought its files along."""
    plan_id = "travel"
    mesh.cli("submit", str(plan_dir / "travel.md"), "--id", plan_id)
    plan = await until(lambda: mesh.plan(plan_id), HANG_S, "the plan accepted")
    assert plan is not None and plan.bundle, "`mesh submit` sent the plan without its files"
    shutil.move(plan_dir, plan_dir.with_name("plan-gone"))
    return plan_id


@pytest.mark.slow
async def test_a_plans_files_travel_and_its_artifacts_come_back(
    two_hosts: tuple[Mesh, OtherHost],
) -> None:
    mesh, other = two_hosts
    print(f"other host: {other.mode}")
    mesh.env["MESH_HOST_ID"] = "submitter"
    plan_dir = write_plan_dir(mesh.tmp)
    mesh.brain()
    other.worker("other", 2)
    await agent_of(mesh, "other")
    plan_id = await submit_and_hide(mesh, plan_dir)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded", mesh.log("other")[-3000:]
    assert (await task_output(await mesh.bus(), plan_id, "count")).text.strip() == "7"
    # the dependent found its dependency's artifact in its own working directory
    assert (await task_output(await mesh.bus(), plan_id, "twice")).text.strip() == "14"
    # nothing was written where the plan came from
    assert not (mesh.tmp / "plan").exists()

    saved = mesh.tmp / "saved"
    mesh.cli("output", f"{plan_id}.count", "--save", str(saved))
    found = [p for p in saved.rglob("count.txt")]
    assert len(found) == 1 and found[0].read_text().strip() == "7"
    # and from the other host too: `--save` fetches from the store, not from a local disk
    there = other.root / "saved"
    done = other.cli("output", f"{plan_id}.twice", "--save", str(there))
    assert done.returncode == 0, done.stderr
    assert [p.read_text().strip() for p in there.rglob("twice.txt")] == ["14"]


GEMMA = "gemma3-270m"


def models_config(path: str) -> str:
    spec = builtin_models()[GEMMA]
    return (
        f'[models.pushed]\nkind = "llm"\npath = "{path}"\nvram_mb = {spec.vram_mb}\n'
        f'chat_format = "gemma"\nmax_tokens = 8\n'
    )


@pytest.mark.slow
@pytest.mark.models
async def test_a_model_pushed_once_is_loaded_on_the_host_that_lacked_it(
    two_hosts: tuple[Mesh, OtherHost],
) -> None:
    gguf = resolve_path(GEMMA, builtin_models()[GEMMA])
    mesh, other = two_hosts
    print(f"other host: {other.mode}")
    # both hosts know the model 'pushed'; only this one has its file, at a path the other lacks
    (mesh.tmp / "config" / "mesh").mkdir(parents=True, exist_ok=True)
    (mesh.tmp / "config" / "mesh" / "config.toml").write_text(models_config(str(gguf)))
    missing = other.root / "nowhere" / "pushed.gguf"
    (other.root / "config" / "mesh").mkdir(parents=True, exist_ok=True)
    (other.root / "config" / "mesh" / "config.toml").write_text(models_config(str(missing)))
    mesh.cli("models", "push", "pushed", str(gguf), timeout=600)
    mesh.brain()
    other.worker("other", 1, "--gpu", "none", "--classes", "script,llm")
    await agent_of(mesh, "other")
    text = "# Pushed\n\n## Tasks\n\n### ask\n- model: pushed\n- max_tokens: 4\n\n```prompt\n1, 2, 3,\n```\n"
    plan_id = await mesh.submit_text(text)
    plan = await mesh.wait_plan(plan_id, timeout_s=600)
    assert plan.status == "succeeded", mesh.log("other")[-3000:]
    assert not missing.exists()
    cached = [
        p for p in other.data_dir.rglob("*") if p.is_file() and p.stat().st_size == Path(gguf).stat().st_size
    ]
    assert cached, f"no copy of the model in {other.data_dir}"
