"""End to end: real nats-server, real brain and worker processes, real plans."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from mesh import events
from mesh.bus import workstream
from mesh.events import (
    DeadLetter,
    PlanAccepted,
    PlanFinished,
    TaskReleased,
    TaskRetrying,
    TaskStarted,
    TaskSucceeded,
    TaskWaiting,
)
from mesh.machine import replay
from mesh.plan import parse_plan
from mesh.records import TaskRecord
from tests.conftest import HANG_S, Mesh
from tests.faults import until
from tests.test_machine import one_per_transition

pytestmark = pytest.mark.integration

DIAMOND = """\
# Diamond

## Variables
- OUT: {OUT_DIR}

## Tasks

### a
```shell
mkdir -p {OUT} && echo "a $(date +%s%N)" >> {OUT}/order
```

### b
- depends_on: a
```shell
sleep 0.2; echo "b $(date +%s%N)" >> {OUT}/order; echo "from b" > {OUT}/b.txt
```

### c
- depends_on: a
```shell
echo "c $(date +%s%N)" >> {OUT}/order; echo "from c" > {OUT}/c.txt
```

### d
- depends_on: b, c
```shell
cat {OUT}/b.txt {OUT}/c.txt > {OUT}/d.txt; echo "d $(date +%s%N)" >> {OUT}/order
```
"""


def diamond(out: Path) -> str:
    return DIAMOND.replace("{OUT_DIR}", str(out))


def order(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()]


async def test_diamond_runs_in_dependency_order(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    mesh.worker("w2")
    out = tmp_path / "out"
    plan_id = await mesh.submit_text(diamond(out))
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    seen = order(out / "order")
    assert sorted(seen) == ["a", "b", "c", "d"]
    assert seen[0] == "a" and seen[-1] == "d"
    assert (out / "d.txt").read_text() == "from b\nfrom c\n"
    tasks = await mesh.tasks(plan_id)
    assert {t.status for t in tasks.values()} == {"succeeded"}
    assert all(t.attempt == 1 and t.worker for t in tasks.values())


async def test_every_transition_is_in_the_history_in_order(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(diamond(tmp_path / "out"))
    await mesh.wait_plan(plan_id)
    bus = await mesh.bus()
    history = await mesh.history(bus.names.plan_filter(plan_id))
    msgs = [m for _, m in history if m is not None]
    assert len(msgs) == len(history), "every event decodes"
    assert isinstance(msgs[0], PlanAccepted)
    assert isinstance(msgs[-1], PlanFinished) and msgs[-1].status == "succeeded"
    # (a transition decided with another one of its task is stored in that one's event)
    every = one_per_transition(msgs)
    for task in "abcd":
        kinds = [
            type(m)
            for m in every
            if getattr(m, "task_id", None) == task and m.__class__.__name__.startswith("Task")
        ]
        assert kinds == [TaskWaiting, TaskReleased, TaskStarted, TaskSucceeded], task
    # the worker's own reports are there too
    assert sum(isinstance(m, events.RunFinished) for m in msgs) == 4
    # folding the brain's transitions gives back exactly what is in KV
    state = replay([m for m in msgs])
    kv_tasks = await mesh.raw_tasks()
    for key, rec in state.tasks.items():
        assert kv_tasks[key] == rec
    assert (await mesh.raw_plans())[plan_id] == state.plans[plan_id]


NO_OPS = """# No-ops

## Tasks

### i0
```noop
```

### i1
```noop
```

### c0
```noop
```

### c1
- depends_on: c0
```noop
```

### c2
- depends_on: c1
```noop
```
"""


async def test_a_no_op_task_is_three_stored_events(mesh: Mesh) -> None:
    """Its release (carrying its waiting), the worker's report, its success (carrying its
    start): three messages on the event stream, each one disk write; the transitions they
    stand for are all in the history, which still folds into exactly what KV holds. (Queued by
    the brain, each of them: a chain continued on its worker is tests/test_continue.py's.)"""
    mesh.start_agent("brain", "brain", env={"MESH_CONTINUE_DEPTH": "0"})
    mesh.worker("w1")
    plan_id = await mesh.submit_text(NO_OPS)
    await mesh.wait_plan(plan_id)
    bus = await mesh.bus()
    msgs = [m for _, m in await mesh.history(bus.names.plan_filter(plan_id)) if m is not None]
    assert [type(m) for m in msgs if not hasattr(m, "task_id")] == [PlanAccepted, PlanFinished]
    short = 0
    for task in ("i0", "i1", "c0", "c1", "c2"):
        mine = [m for m in msgs if getattr(m, "task_id", None) == task]
        if any(isinstance(m, events.RunStarted) for m in mine):
            continue  # a loaded machine held the no-op past `start_report_after_s`
        short += 1
        assert [type(m) for m in mine] == [TaskReleased, events.RunFinished, TaskSucceeded], task
        released, _, succeeded = mine
        assert isinstance(released, TaskReleased) and isinstance(succeeded, TaskSucceeded)
        assert (released.waited_at > 0) == (task in ("c1", "c2")), released
        assert succeeded.started_at > 0
    assert short, "no task was short enough to report its start with its end"
    every = [type(m) for m in one_per_transition(msgs) if getattr(m, "task_id", None) == "c1"]
    assert every == [TaskWaiting, TaskReleased, events.RunFinished, TaskStarted, TaskSucceeded] or (
        events.RunStarted in every
    )
    state = replay(msgs)
    kv_tasks = await mesh.raw_tasks()
    assert set(kv_tasks) >= set(state.tasks)
    for key, rec in state.tasks.items():
        assert kv_tasks[key] == rec
    assert (await mesh.raw_plans())[plan_id] == state.plans[plan_id]


async def test_foreach_fan_out_of_50(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1", slots=4)
    mesh.worker("w2", slots=4)
    out = tmp_path / "fan"
    items = ", ".join(f"item{i:02d}" for i in range(50))
    text = f"""\
# Fan out

## Variables
- OUT: {out}

## Tasks

### prepare
```shell
mkdir -p {{OUT}}
```

### each
- depends_on: prepare
- foreach: ITEM in {items}
```shell
echo {{ITEM}} > {{OUT}}/{{ITEM}}.txt
```

### count
- depends_on: each
```shell
ls {{OUT}} | wc -l > {{OUT}}/../count.txt
```
"""
    plan_id = await mesh.submit_text(text)
    plan = await mesh.wait_plan(plan_id, timeout_s=90)
    assert plan.status == "succeeded"
    assert plan.total == 52
    assert sorted(p.name for p in out.iterdir()) == sorted(f"item{i:02d}.txt" for i in range(50))
    assert (tmp_path / "count.txt").read_text().strip() == "50"


async def test_failing_task_is_retried_then_fails_its_dependents(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    runs = tmp_path / "runs"
    text = f"""\
# Failing

## Tasks

### flaky
- retries: 2
```shell
echo run >> {runs}; echo "something broke" >&2; exit 7
```

### after
- depends_on: flaky
```shell
echo never
```

### later
- depends_on: after
```shell
echo never
```

### independent
```shell
true
```
"""
    plan_id = await mesh.submit_text(text)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "failed"
    assert runs.read_text().count("run") == 3, "1 attempt + 2 retries"
    tasks = await mesh.tasks(plan_id)
    assert tasks["flaky"].status == "failed" and tasks["flaky"].reason == "error"
    assert tasks["flaky"].rc == 7 and "something broke" in tasks["flaky"].error
    assert tasks["flaky"].attempt == 3
    for dep in ("after", "later"):
        assert tasks[dep].status == "failed" and tasks[dep].reason == "dependency"
        assert tasks[dep].attempt == 0, "a dependent of a failed task never runs"
    assert tasks["independent"].status == "succeeded"
    history = [m for _, m in await mesh.history((await mesh.bus()).names.plan_filter(plan_id))]
    retrying = [m for m in history if isinstance(m, TaskRetrying)]
    assert [r.attempt for r in retrying] == [1, 2]
    assert all(r.retry_at > r.at for r in retrying)


async def test_timeout_kills_the_whole_process_group(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    pidfile = tmp_path / "child.pid"
    text = f"""\
# Slow

## Tasks

### slow
- timeout: 1s
- retries: 0
```shell
sleep 1200 &
echo $! > {pidfile}
wait
```
"""
    plan_id = await mesh.submit_text(text)
    plan = await mesh.wait_plan(plan_id, timeout_s=30)
    assert plan.status == "failed"
    task = (await mesh.tasks(plan_id))["slow"]
    assert task.reason == "timeout"
    assert "timed out after 1s" in task.error
    child = int(pidfile.read_text())
    # waited for, not looked at once after a pause; it would sleep long past the wait
    await until(lambda: not _pid_alive(child), HANG_S, "the background child of the body to be killed too")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_cancel_kills_running_and_cancels_the_rest(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    pidfile = tmp_path / "long.pid"
    text = f"""\
# Cancel me

## Tasks

### long
```shell
sleep 120 &
echo $! > {pidfile}
wait
```

### next
- depends_on: long
```shell
echo never
```
"""
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "long", "running")
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.05)
    from mesh.bus import client

    await client.cancel(await mesh.bus(), plan_id)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "cancelled"
    tasks = await mesh.tasks(plan_id)
    assert tasks["long"].status == "cancelled" and tasks["next"].status == "cancelled"
    child = int(pidfile.read_text())
    for _ in range(100):
        if not _pid_alive(child):
            break
        await asyncio.sleep(0.05)
    assert not _pid_alive(child), "the running body was killed"


async def test_submission_while_brain_is_down_runs_once_it_starts(mesh: Mesh, tmp_path: Path) -> None:
    mesh.worker("w1")
    out = tmp_path / "out"
    plan_id = await mesh.submit_text(diamond(out))
    await asyncio.sleep(1.0)
    assert await mesh.plan(plan_id) is None, "nobody has accepted it yet"
    mesh.brain()
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    assert order(out / "order")[-1] == "d"


async def test_garbage_is_dead_lettered_and_agents_keep_running(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    bus = await mesh.bus()
    names = bus.names
    await bus.ensure_resources()
    garbage = [
        (names.submit, b"\x00\xffnot json"),
        (names.submit, b'{"type": "cmd.submit", "plan_id": 3}'),
        (names.cancel("nope"), b'{"type": "no.such.type"}'),
        (names.work("cpu"), b"[1, 2, 3]"),
        (names.run_event("p", "t", "finished", "w1"), b'{"type": "run.finished"}'),
        (names.work("cpu"), b'{"type": "cmd.cancel", "plan_id": "x", "at": 1}'),
    ]
    for subject, data in garbage:
        await bus.js.publish(subject, data)
    out = tmp_path / "out"
    plan_id = await mesh.submit_text(diamond(out))
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    assert mesh.alive("brain") and mesh.alive("w1")
    letters = [m for _, m in await mesh.history(names.dead_all) if isinstance(m, DeadLetter)]
    assert sorted(letter.subject for letter in letters) == sorted(s for s, _ in garbage)
    assert all(letter.reason for letter in letters)


async def test_graceful_stop_finishes_running_work(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    done = tmp_path / "done"
    text = f"""\
# Stop gently

## Tasks

### work
```shell
sleep 1.5; echo finished > {done}
```
"""
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "work", "running")
    mesh._expected_dead.add("w1")
    mesh.kill("w1", signal.SIGTERM)
    assert mesh.procs["w1"].returncode == 0
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    assert done.read_text().strip() == "finished"
    assert (await mesh.tasks(plan_id))["work"].attempt == 1


async def test_cancelled_queued_work_never_runs(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1", slots=1)
    ran = tmp_path / "ran"
    queued = "".join(f"\n### q{i}\n```shell\necho q{i} >> {ran}\n```\n" for i in range(3))
    text = f"# Queue\n\n## Tasks\n\n### long\n- priority: 10\n```shell\nsleep 60\n```\n{queued}"
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "long", "running")
    tasks = await mesh.tasks(plan_id)
    assert all(tasks[f"q{i}"].status == "ready" for i in range(3)), "queued behind the running task"
    from mesh.bus import client

    await client.cancel(await mesh.bus(), plan_id)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "cancelled"
    # the worker is free again: give it time to pick up anything left on the queue
    await asyncio.sleep(1.5)
    assert not ran.exists(), "a cancelled task ran"
    bus = await mesh.bus()
    left = await workstream.queued(bus.js, bus.names.work_stream)
    assert left == 0, "the cancelled items were removed from the queue"


async def test_noop_tasks_join_work(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1", slots=4)
    text = "# Noop\n\n## Tasks\n\n" + "".join(f"### n{i}\n```noop\n```\n\n" for i in range(20))
    text += "### join\n- depends_on: " + ", ".join(f"n{i}" for i in range(20)) + "\n```noop\n```\n"
    plan_id = await mesh.submit_text(text)
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded" and plan.total == 21


async def test_a_plan_too_big_for_one_message_goes_through_the_object_store(tmp_path: Path) -> None:
    from mesh.ops.embedded import EmbeddedServer

    server = EmbeddedServer(tmp_path / "small", port=-1, max_payload=64 * 1024)
    server.start()
    mesh = Mesh(server, tmp_path)
    try:
        mesh.brain()
        mesh.worker("w1", slots=8)
        n = 1200  # (a spec leaves out its defaults: 105 bytes a task here)
        text = "# Big\n\n## Tasks\n\n" + "".join(
            f"### task-{i}\n- priority: {1 + i % 10}\n```noop\n# a longer body {i}\n```\n\n" for i in range(n)
        )
        spec = parse_plan(text, source="big.md")
        assert len(events.encode(events.SubmitPlan(plan_id="x", plan=spec, at=0.0))) > 64 * 1024
        plan_id = await mesh.submit(spec)
        plan = await mesh.wait_plan(plan_id, timeout_s=120)
        assert plan.status == "succeeded" and plan.total == n
        history = [m for _, m in await mesh.history((await mesh.bus()).names.plan_filter(plan_id))]
        parts = [m for m in history if isinstance(m, events.PlanTasks)]
        assert parts, "accepted in parts, each within the server's max payload"
        accepted = next(m for m in history if isinstance(m, PlanAccepted))
        assert accepted.total == n
        assert len(accepted.plan.tasks) + sum(len(p.tasks) for p in parts) == n

        # the plan's record and its tasks' are in different buckets, stored independently: the
        # last task records may land just after the plan's final one
        async def all_records() -> dict[str, TaskRecord]:
            records = await mesh.tasks(plan_id)
            return records if len(records) == n else {}

        records = await until(all_records, HANG_S, "every task record")
        assert [r.index for r in records.values()] == list(range(n))
        state = replay([m for m in history if m is not None])
        assert state.plans[plan_id] == (await mesh.raw_plans())[plan_id]
    finally:
        await mesh.close()
        mesh.stop_all()
        server.stop()


async def test_finished_plans_leave_kv_but_not_the_history(mesh: Mesh, tmp_path: Path) -> None:
    mesh.env["MESH_ARCHIVE_AFTER_DAYS"] = str(1.0 / 86400)  # one second
    mesh.env["MESH_SWEEP_S"] = "0.5"
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(diamond(tmp_path / "out"))
    await mesh.wait_plan(plan_id)
    for _ in range(100):
        if await mesh.plan(plan_id) is None:
            break
        await asyncio.sleep(0.1)
    assert await mesh.plan(plan_id) is None, "archived: gone from the plans bucket"
    assert not [k for k in await mesh.raw_tasks() if k.startswith(plan_id)], "and its tasks too"
    from mesh.bus import history

    bus = await mesh.bus()
    result = await history.replay(bus)
    assert plan_id not in result.state.plans
    read = [e async for e in history.read_history(bus, bus.names.transition_filters(None))]
    assert result.events == len(read) and result.undecodable == 0
    assert (result.first_seq, result.last_seq) == (read[0].seq, read[-1].seq)
    check = await history.verify(bus, result)
    assert check.differences == []
    kinds = [
        events.type_of(m) for _, m in await mesh.history(bus.names.plan_filter(plan_id)) if m is not None
    ]
    assert kinds[0] == "plan.accepted" and kinds[-1] == "plan.archived" and "plan.finished" in kinds


async def test_auditor_dead_letters_garbage_on_subjects_no_agent_consumes(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    mesh.start_agent("auditor", "auditor")
    bus = await mesh.bus()
    names = bus.names
    for _ in range(100):  # the auditor's consumer delivers only what comes after it starts
        if "auditor started as" in mesh.log("auditor"):
            break
        await asyncio.sleep(0.1)
    plan_id = await mesh.submit_text(diamond(tmp_path / "out"))
    garbage = [
        (names.task_event("p", "t", "succeeded"), b"\x00\x01 not json"),
        (names.plan_event("p", "finished"), b'{"type": "plan.finished", "plan_id": 7}'),
        (names.agent_event("a", "started"), b'{"type": "no.such.type"}'),
        # well formed, but not what this subject carries
        (names.task_event("p", "t", "failed"), events.encode(events.PlanResumed(plan_id="p", at=1.0))),
    ]
    for subject, data in garbage:
        await bus.js.publish(subject, data)
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    letters: list[DeadLetter] = []
    for _ in range(100):
        letters = [m for _, m in await mesh.history(names.dead_all) if isinstance(m, DeadLetter)]
        if len(letters) >= len(garbage):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    letters = [m for _, m in await mesh.history(names.dead_all) if isinstance(m, DeadLetter)]
    assert sorted(d.subject for d in letters) == sorted(s for s, _ in garbage), "each once, nothing else"
    assert all(d.agent_id.startswith("auditor-") for d in letters)
    assert "belongs on mesh.evt.plan.p.resumed, not on mesh.evt.task.p.t.failed" in next(
        d.reason for d in letters if d.subject.endswith(".failed")
    )
    assert mesh.alive("auditor")


async def test_an_agent_restarted_under_the_same_id_is_in_the_history_each_time(mesh: Mesh) -> None:
    """A GPU worker keeps its id across restarts: each start and stop is a new fact."""
    mesh.env["MESH_AGENT_ID"] = "worker-fixed"
    for n in (1, 2):
        mesh.worker("fixed")
        await until(lambda n=n: mesh.log("fixed").count("started as worker-fixed") == n, 30, "a start")
        mesh.kill("fixed", signal.SIGTERM)
        mesh.procs.pop("fixed")
    kinds = [type(msg).__name__ for _, msg in await mesh.history("mesh.evt.agent.worker-fixed.>")]
    assert kinds == ["AgentStarted", "AgentStopped", "AgentStarted", "AgentStopped"], kinds
