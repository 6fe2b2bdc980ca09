"""The `mesh` command as a person runs it: real processes, real server, exit codes and messages."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import api

from mesh import events
from mesh.bus.read import read_bucket
from mesh.host.config import load_settings
from mesh.ops.embedded import EmbeddedServer
from mesh.ops.natsconf import rendered
from tests.conftest import FAST_ENV, HANG_S, ROOT, Mesh
from tests.faults import until

EXAMPLES = ROOT / "plans" / "examples"


def run_mesh(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        **FAST_ENV,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "COLUMNS": "200",
    }


@contextlib.contextmanager
def running_mesh(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """The `mesh` command running in the background, its stderr to read; killed after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def said(proc: subprocess.Popen[str], words: str) -> str:
    """The first line of `proc`'s stderr with `words` in it (it must say them before it ends)."""
    assert proc.stderr is not None
    while words not in (line := proc.stderr.readline()):
        assert line, f"mesh ended without saying {words!r}"
    return line


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout


def test_check_accepts_the_examples(env: dict[str, str], tmp_path: Path) -> None:
    for plan in sorted(EXAMPLES.glob("*.md")):
        result = run_mesh("check", str(plan), "--var", f"OUT={tmp_path}", env=env)
        assert result.returncode == 0, result.stderr
        assert "ok" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_agent_waiting_for_the_server_stops_when_asked(env: dict[str, str], sig: signal.Signals) -> None:
    """An agent waits up to an hour for a server that is down; `systemctl stop` or Ctrl-C ends it
    at once, not after that hour."""
    with running_mesh("--server", "nats://127.0.0.1:1", "agent", "brain", env=env) as agent:
        said(agent, "waiting for the NATS server")
        agent.send_signal(sig)
        assert agent.wait(timeout=HANG_S) == 0


def test_check_prints_a_title_and_path_with_brackets_as_they_are(env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "[x]"
    folder.mkdir()
    plan = folder / "p.md"
    plan.write_text("# Fix [/] and [/bold] tags [red]now\n\n## Tasks\n\n### a\n```shell\ntrue\n```\n")
    result = run_mesh("check", str(plan), env=env)
    assert result.returncode == 0, result.stderr
    no_traceback(result)
    assert f"{plan}: 'Fix [/] and [/bold] tags [red]now', 1 tasks" in result.stdout


def test_check_refuses_a_broken_plan_with_file_and_line(env: dict[str, str], tmp_path: Path) -> None:
    plan = tmp_path / "broken.md"
    plan.write_text("# Broken\n\n## Tasks\n\n### a\n- depends_on: b\n- priority: 11\n```shell\ntrue\n```\n")
    result = run_mesh("check", str(plan), env=env)
    assert result.returncode == 2
    no_traceback(result)
    assert f"{plan}:6" in result.stderr and f"{plan}:7" in result.stderr
    assert "nothing was submitted" in result.stderr


def test_check_bounds_plans_by_the_settings(env: dict[str, str], tmp_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    (tmp_path / "a.csv").write_text("x")
    plan = plans / "p.md"
    plan.write_text("# P\n\n## Tasks\n\n### t\n- foreach: F in ../*.csv\n```shell\ncat {F}\n```\n")
    result = run_mesh("check", str(plan), env=env)
    assert result.returncode == 2
    no_traceback(result)
    assert (
        f"{plan}:6: foreach glob '../*.csv' of task 't' goes up out of the plan's directory" in result.stderr
    )
    assert run_mesh("check", str(plan), "--glob-outside", env=env).returncode == 0
    assert run_mesh("check", str(plan), env={**env, "MESH_PLAN_GLOB_OUTSIDE": "true"}).returncode == 0
    many = plans / "many.md"
    many.write_text("# P\n\n## Tasks\n\n### t\n- foreach: N in 1, 2, 3\n```shell\necho {N}\n```\n")
    result = run_mesh("check", str(many), env={**env, "MESH_PLAN_MAX_EXPANSIONS": "2"})
    assert result.returncode == 2
    assert "foreach of task 't' has more than 2 items" in result.stderr
    result = run_mesh("check", str(many), env={**env, "MESH_PLAN_MAX_TASKS": "0"})
    assert result.returncode == 2
    assert "plan_max_tasks = 0 must be at least 1" in result.stderr
    no_traceback(result)


def test_missing_plan_file_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    result = run_mesh("submit", str(tmp_path / "nope.md"), env=env)
    assert result.returncode == 2
    no_traceback(result)
    assert "nope.md" in result.stderr


def test_no_server_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "MESH_NATS_URL": "nats://127.0.0.1:1"}
    result = run_mesh("submit", str(EXAMPLES / "diamond.md"), "--var", f"OUT={tmp_path}", env=env)
    assert result.returncode == 2
    no_traceback(result)
    assert "cannot reach the NATS server at nats://127.0.0.1:1" in result.stderr
    assert "mesh up" in result.stderr
    assert "disconnected" not in result.stderr  # (it never was connected)


def test_bad_var_and_bad_config_are_clear_errors(env: dict[str, str], tmp_path: Path) -> None:
    result = run_mesh("check", str(EXAMPLES / "diamond.md"), "--var", "OUT", env=env)
    assert result.returncode == 2 and "NAME=value" in result.stderr
    no_traceback(result)
    config = tmp_path / "bad.toml"
    config.write_text("release_window = 'lots'\n")
    result = run_mesh("--config", str(config), "status", env=env)
    assert result.returncode == 2 and "release_window" in result.stderr
    no_traceback(result)
    config.write_text("no_such_setting = 1\n")
    result = run_mesh("--config", str(config), "status", env=env)
    assert result.returncode == 2 and "no_such_setting" in result.stderr
    no_traceback(result)


def test_options_that_do_not_go_together_are_clear_errors(env: dict[str, str], tmp_path: Path) -> None:
    from mesh.errors import ConfigError
    from mesh.ops.bootstrap import model_workers

    assert model_workers("off") == () and model_workers(" CPU ") == (None,)
    assert model_workers("0,1") == (0, 1)
    with pytest.raises(ConfigError, match="write auto, cpu, off, or GPU indices"):
        model_workers("0,x")
    result = run_mesh("up", "--gpus", "some", "--data-dir", str(tmp_path / "up"), env=env)
    assert result.returncode == 2 and "--gpus 'some': write auto, cpu, off" in result.stderr
    assert not (tmp_path / "up").exists(), "nothing started"
    secure = tmp_path / "secure"
    for args, said in (
        (["--domain", "rig"], "--domain needs --leaf-port"),
        (["--verify-clients"], "--verify-clients needs --tls-ca"),
        (["--tls-ca", str(tmp_path / "no-ca.pem")], f"{tmp_path / 'no-ca.pem'} is not a file"),
    ):
        result = run_mesh("init", "--secure", str(secure), "--worker", "w1", *args, env=env)
        assert result.returncode == 2 and said in result.stderr, result.stderr
        no_traceback(result)
    assert not secure.exists(), "nothing written"


@pytest.mark.integration
async def test_submit_wait_status_and_exit_codes(mesh: Mesh, env: dict[str, str], tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    env = {**env, "MESH_NATS_URL": mesh.server.url}
    ok = run_mesh("submit", str(EXAMPLES / "diamond.md"), "--var", f"OUT={tmp_path / 'd'}", "--wait", env=env)
    assert ok.returncode == 0, ok.stderr
    plan_id = ok.stdout.strip().splitlines()[0]
    assert plan_id.startswith("diamond-")
    assert f"plan {plan_id} succeeded" in ok.stderr
    assert (tmp_path / "d" / "combined.txt").read_text().startswith("words: 9")

    bad = run_mesh("submit", str(EXAMPLES / "retry.md"), "--var", f"OUT={tmp_path / 'r'}", "-w", env=env)
    assert bad.returncode == 1, bad.stderr
    assert "failed" in bad.stderr and "broken" in bad.stderr

    status = run_mesh("status", env=env)
    assert status.returncode == 0 and plan_id in status.stdout and "succeeded" in status.stdout
    one = run_mesh("status", plan_id, "--json", env=env)
    records = [json.loads(line) for line in one.stdout.splitlines()]
    assert records[0]["plan_id"] == plan_id and records[0]["status"] == "succeeded"
    assert sorted(r["task_id"] for r in records[1:]) == ["combine", "count", "seed", "upper"]

    missing = run_mesh("status", "no-such-plan", env=env)
    assert missing.returncode == 2 and "no plan" in missing.stderr
    missing = run_mesh("cancel", "no-such-plan", env=env)
    assert missing.returncode == 2 and "no plan" in missing.stderr

    # what would change nothing says so, and fails
    again = run_mesh("submit", str(EXAMPLES / "diamond.md"), "--var", "OUT=x", "--id", plan_id, env=env)
    assert again.returncode == 2 and f"a plan with id '{plan_id}' was submitted before" in again.stderr
    done = run_mesh("cancel", plan_id, env=env)
    assert done.returncode == 2 and "is succeeded already: there is nothing to cancel" in done.stderr
    done = run_mesh("retry", plan_id, "--wait", env=env)
    assert done.returncode == 2 and "there is nothing to retry" in done.stderr
    # an id that cannot be one is named, without a traceback
    for args in (
        ["status", "a b"],
        ["cancel", "a b"],
        ["retry", "a b"],
        ["output", "a b"],
        ["report", "a b"],
        ["replay", "--plan", "a b"],
        ["gpu", "pause", "a b"],
    ):
        bad_id = run_mesh(*args, env=env)
        assert bad_id.returncode == 2, (args, bad_id.stderr)
        assert "'a b' may hold only letters, digits" in bad_id.stderr, (args, bad_id.stderr)
        no_traceback(bad_id)


@pytest.mark.integration
async def test_tail_shows_events_live(mesh: Mesh, env: dict[str, str], tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    env = {**env, "MESH_NATS_URL": mesh.server.url}
    bus = await mesh.bus()  # the streams exist before tail subscribes

    async def brain_registered() -> bool:
        return any(k.startswith("brain") for k in await read_bucket(await bus.agents_kv()))

    await until(brain_registered, HANG_S, "the brain registered")
    tail_out = tmp_path / "tail.out"
    with open(tail_out, "w") as out:
        tail = subprocess.Popen(
            [sys.executable, "-m", "mesh", "tail", "--json"],
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    gate = tmp_path / "gate"
    try:

        async def following() -> bool:
            # tail's consumer: one that pushes what comes next of every event (not a count of
            # consumers: the agents' own readers come and go meanwhile)
            for c in await bus.js.consumers_info(bus.names.events_stream):
                cfg = c.config
                if (
                    cfg.deliver_subject
                    and cfg.deliver_policy == api.DeliverPolicy.NEW
                    and cfg.filter_subject == bus.names.evt_all
                ):
                    return True
            return False

        # tail follows once its consumer is on the server (however slow its start)
        await until(following, HANG_S, "tail's consumer")
        # the task runs until the brain has recorded its start (so `run.started` was sent)
        body = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo hi"
        plan_id = await mesh.submit_text(f"# T\n\n## Tasks\n\n### one\n```shell\n{body}\n```\n")
        await mesh.wait_task(plan_id, "one", "running")
        gate.touch()
        await mesh.wait_plan(plan_id)

        async def shown_finished() -> bool:
            return "plan.finished" in tail_out.read_text()

        await until(shown_finished, HANG_S, "tail shows the plan's end")
    finally:
        tail.terminate()
        _, stderr = tail.communicate(timeout=10)
    stdout = tail_out.read_text()
    types = [json.loads(line)["type"] for line in stdout.splitlines() if line.strip()]
    for expected in ("plan.accepted", "task.released", "run.started", "task.started"):
        assert expected in types, (expected, types, stderr)
    assert types.index("plan.accepted") < types.index("plan.finished")


@pytest.mark.integration
def test_up_runs_the_example_plan_and_stops_everything(env: dict[str, str], tmp_path: Path) -> None:
    result = run_mesh(
        "up",
        "--data-dir",
        str(tmp_path / "data"),
        "--port=-1",
        "--workers",
        "2",
        "--submit",
        str(EXAMPLES / "diamond.md"),
        "--var",
        f"OUT={tmp_path / 'out'}",
        "--outputs",
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stderr
    assert re.search(r"console: http://127\.0\.0\.1:\d+/", result.stderr), result.stderr
    assert (tmp_path / "out" / "combined.txt").exists()
    # the summary of the final outputs, then (--outputs) every task's output in full
    assert "combine  words: 9" in result.stderr, result.stderr
    for task in ("seed", "upper", "count", "combine"):
        assert f"── {task} " in result.stderr, result.stderr
    assert "9 words\n" in result.stdout and "words: 9\nTHE QUICK BROWN FOX\n" in result.stdout, result.stdout
    logs = tmp_path / "data" / "logs"
    assert (logs / "brain.log").exists() and (logs / "worker-1.log").exists()
    assert "stopped" in (logs / "brain.log").read_text()


@pytest.mark.integration
def test_init_into_a_file_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    taken = tmp_path / "afile"
    taken.write_text("")
    for args in (["--render", str(taken)], ["--render", str(taken / "sub")], ["--secure", str(taken)]):
        result = run_mesh("init", *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        no_traceback(result)
        assert "could not write" in result.stderr and "Name a directory mesh may write" in result.stderr
    port = run_mesh("init", "--secure", str(tmp_path / "secure"), "--port", "99999", env=env)
    assert port.returncode == 2 and "--port" in port.stderr and not (tmp_path / "secure").exists()


def test_submit_wait_with_no_brain_says_the_plan_waits_for_one(
    nats_server: EmbeddedServer, env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "MESH_NATS_URL": nats_server.url}
    args = ("submit", str(EXAMPLES / "diamond.md"), "--var", f"OUT={tmp_path}", "-w")
    with running_mesh(*args, env=env) as waiting:
        line = said(waiting, "no brain is registered")
        assert "waits in the queue until one starts" in line and waiting.poll() is None


async def test_init_is_idempotent(nats_server: EmbeddedServer, env: dict[str, str]) -> None:
    env = {**env, "MESH_NATS_URL": nats_server.url}
    for _ in range(2):
        result = run_mesh("init", env=env)
        assert result.returncode == 0, result.stderr
        assert "MESH_EVENTS" in result.stdout
    # nothing runs yet: said, not a blank
    none = run_mesh("agents", env=env)
    assert none.returncode == 0 and "no agent is registered" in none.stderr


def test_nats_dir_matches_the_code() -> None:
    settings = load_settings(environ={})
    for rel, text in rendered(settings).items():
        path = ROOT / "nats" / rel
        assert path.exists(), f"nats/{rel} is missing: run `mesh init --render nats/`"
        assert path.read_text() == text, f"nats/{rel} drifted from the code: run `mesh init --render nats/`"


@pytest.mark.integration
async def test_replay_verify_agrees_then_finds_a_tampered_record(
    mesh: Mesh, env: dict[str, str], tmp_path: Path
) -> None:
    mesh.brain()
    mesh.worker("w1")
    env = {**env, "MESH_NATS_URL": mesh.server.url}
    for example in ("diamond", "retry", "fanout"):
        result = run_mesh(
            "submit", str(EXAMPLES / f"{example}.md"), "--var", f"OUT={tmp_path / example}", "-w", env=env
        )
        assert result.returncode in (0, 1), result.stderr
    ok = run_mesh("replay", "--verify", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "KV and history agree on 3 plans" in ok.stderr
    assert "events/s" in ok.stderr
    nothing = run_mesh("replay", "--plan", "no-such-plan", env=env)
    assert nothing.returncode == 2 and "the history holds no events of plan 'no-such-plan'" in nothing.stderr

    from mesh.records import encode_record

    tasks = await mesh.raw_tasks()
    key, record = next((k, t) for k, t in tasks.items() if t.task_id == "seed")
    record.status = "failed"
    await (await (await mesh.bus()).tasks_kv()).put(key, encode_record(record))
    bad = run_mesh("replay", "--verify", env=env)
    assert bad.returncode == 1
    assert f"{key}: status: KV has 'failed', the history gives 'succeeded'" in bad.stdout
    one = run_mesh("replay", "--plan", record.plan_id, env=env)
    assert one.returncode == 0 and record.plan_id in one.stdout


@pytest.mark.integration
async def test_dead_lists_dead_letters(mesh: Mesh, env: dict[str, str]) -> None:
    mesh.brain()
    env = {**env, "MESH_NATS_URL": mesh.server.url}
    bus = await mesh.bus()
    await bus.js.publish(bus.names.submit, b"this is not a plan")
    for _ in range(100):
        result = run_mesh("dead", "--json", env=env)
        if result.stdout.strip():
            break
        time.sleep(0.1)
    letters = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(letters) == 1
    assert letters[0]["subject"] == bus.names.submit and "undecodable" in letters[0]["reason"]
    table = run_mesh("dead", "--since", "1h", env=env)
    assert table.returncode == 0 and "undecodable" in table.stdout


@pytest.mark.integration
async def test_retry_runs_failed_work_again(mesh: Mesh, env: dict[str, str], tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    env = {**env, "MESH_NATS_URL": mesh.server.url}
    gate = tmp_path / "go"
    plan = tmp_path / "gated.md"
    plan.write_text(
        "# Gated\n\n## Tasks\n\n"
        f"### gate\n- retries: 0\n```shell\ntest -f {gate}\n```\n\n"
        f"### after\n- depends_on: gate\n```shell\necho after >> {tmp_path / 'after.txt'}\n```\n\n"
        "### free\n```shell\ntrue\n```\n"
    )
    first = run_mesh("submit", str(plan), "--wait", env=env)
    assert first.returncode == 1, first.stderr
    plan_id = first.stdout.strip().splitlines()[0]
    tasks = await mesh.tasks(plan_id)
    assert tasks["gate"].status == "failed" and tasks["after"].reason == "dependency"

    nothing = run_mesh("retry", f"{plan_id}.nope", env=env)
    assert nothing.returncode == 2 and "has no task nope" in nothing.stderr

    gate.write_text("open")
    again = run_mesh("retry", f"{plan_id}.gate", "--wait", env=env)
    assert again.returncode == 0, again.stderr
    assert f"plan {plan_id} succeeded" in again.stderr
    # the report's short form, read from the whole history (the bar saw only the retry's part)
    assert "retries: 0; 2 retried by an operator" in again.stderr, again.stderr
    assert "failures (error): 1 failed attempt(s) of gate, 0 task(s) failed for good" in again.stderr, (
        again.stderr
    )
    tasks = await mesh.tasks(plan_id)
    assert {t.status for t in tasks.values()} == {"succeeded"}
    assert tasks["gate"].attempt == 2 and tasks["gate"].base_attempt == 1
    assert tasks["free"].attempt == 1, "work that succeeded is not run again"
    assert (tmp_path / "after.txt").read_text() == "after\n"
    history = [m for _, m in await mesh.history((await mesh.bus()).names.plan_filter(plan_id))]
    kinds = [events.type_of(m) for m in history if m is not None]
    assert kinds.count("plan.finished") == 2 and "plan.resumed" in kinds
    assert kinds.count("task.reset") == 2  # gate and its dependent
    verify = run_mesh("replay", "--verify", env=env)
    assert verify.returncode == 0, verify.stdout


# every agent `mesh up` starts: the brain, two workers, the model worker, the watchdog, the
# auditor, the gateway and the web console
UP_AGENTS = {"brain", "worker-1", "worker-2", "cpu-models", "watchdog", "auditor", "gateway", "web"}
UP_OPTIONS = ("--port=-1", "--workers", "2", "--gpus", "cpu")


def start_up(env: dict[str, str], data: Path) -> subprocess.Popen[str]:
    """`mesh up` on `data`, once every agent it starts has said it started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "up", "--data-dir", str(data), *UP_OPTIONS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    logs = data / "logs"
    deadline = time.monotonic() + HANG_S
    started: set[str] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        started = (
            {p.stem for p in logs.glob("*.log") if " started as " in p.read_text()}
            if logs.exists()
            else set()
        )
        if started >= UP_AGENTS:
            return proc
        time.sleep(0.1)
    proc.kill()
    _, err = proc.communicate(timeout=30)
    raise AssertionError(f"agents did not start: {sorted(UP_AGENTS - started)} missing; {err[-2000:]}")


@pytest.mark.integration
def test_up_stops_all_children_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    import psutil

    proc = start_up(env, tmp_path / "data")
    agents = UP_AGENTS
    logs = tmp_path / "data" / "logs"
    children: list[psutil.Process] = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= len(agents) + 1, "the server and every agent"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            # (a failed test leaves no server or agent behind to load the rest of the suite)
            for child in children or psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            proc.kill()
            proc.communicate(timeout=30)  # closes the pipes
    assert proc.returncode == 0, stderr
    no_traceback(subprocess.CompletedProcess(proc.args, 0, "", stderr))
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
    for name in ("brain", "worker-1", "worker-2", "auditor"):
        assert " stopped" in (logs / f"{name}.log").read_text()


@pytest.mark.integration
def test_up_killed_leaves_nothing_running_and_no_second_server_meanwhile(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`mesh up` killed with SIGKILL: its reaper stops what it started, agents first (each
    drains: SIGTERM), then the server; while that server runs, a second `mesh up` on the same
    store is refused before it touches it."""
    import psutil

    data = tmp_path / "data"
    proc = start_up(env, data)
    children = psutil.Process(proc.pid).children(recursive=True)
    try:
        second = run_mesh("up", "--data-dir", str(data), "--port=-1", "--gpus", "off", env=env)
        assert second.returncode == 2, second.stderr
        said = " ".join(second.stderr.split())
        assert "already runs on the store" in said and "--data-dir" in said, said
        proc.kill()
        proc.communicate(timeout=30)
        _gone, alive = psutil.wait_procs(children, timeout=HANG_S)
        assert not alive, f"left running: {alive}"
        for name in ("brain", "worker-1", "worker-2", "auditor"):
            assert " stopped" in (data / "logs" / f"{name}.log").read_text(), f"{name} stopped as asked"
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
