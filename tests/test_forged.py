"""Forged and misdirected messages: a message's type is bound to its subject, a run report is
taken only from the worker that holds the attempt, and a bad submission never jams the brain.

Each test runs real agents against a real server; the secured ones give every agent, and every
forger, its own role's credentials."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mesh import events, validate
from mesh.bus import client, history
from mesh.bus.outputs import attempt_outcomes, outcome_text, task_output
from mesh.errors import PlanError
from mesh.events import (
    DeadLetter,
    PlanSpec,
    RunFinished,
    RunStarted,
    SubmitPlan,
    TaskSpec,
)
from mesh.host.config import load_settings
from mesh.names import HEADER_MSG_ID, HEADER_TYPE
from tests import test_security
from tests.conftest import Mesh
from tests.faults import until
from tests.test_security import GPU_WORKER, OTHER, WORKER, Secure

pytestmark = pytest.mark.integration

# the secured server and its streams, as the security tests set them up
secure = test_security.secure
resources = test_security.resources

P = "mesh"


def forged_submission(plan_id: str, marker: Path) -> SubmitPlan:
    """A submission whose shell body leaves `marker` behind if it ever runs."""
    spec = PlanSpec(title="forged", tasks=(TaskSpec(id="own", body=f"touch {marker}\n"),))
    return SubmitPlan(plan_id=plan_id, plan=spec, at=time.time(), by="forger")


async def dead_letters(mesh: Mesh) -> list[DeadLetter]:
    return [m for _, m in await mesh.history(f"{P}.evt.dead.>") if isinstance(m, DeadLetter)]


async def secured_mesh(resources: Secure, tmp_path: Path, *roles: str) -> Mesh:
    """A mesh whose agents each run on their own role's credentials; the client is the CLI."""
    mesh = Mesh(resources.server, tmp_path)
    for role in roles:
        mesh.env = resources.env(role)
        if role.startswith("worker-"):
            mesh.worker(role, 2)
        else:
            mesh.start_agent(role, role)
    mesh.env = resources.env("cli")
    mesh.settings = load_settings(environ=mesh.env)
    return mesh


async def test_a_submission_on_any_other_subject_is_a_dead_letter(resources: Secure, tmp_path: Path) -> None:
    """Item: a message's type is bound to its subject. Each role publishes a submission on a
    subject its own permissions allow; the consumer of that subject refuses it by its type."""
    mesh = await secured_mesh(resources, tmp_path, "brain", "auditor", WORKER)
    marker = tmp_path / "PWNED"
    # (user, subject): a subject the user may publish to, and which an agent consumes
    forgeries = [
        (WORKER, f"{P}.evt.run.p1.t1.finished.{WORKER}"),  # the brain's report consumer
        (GPU_WORKER, f"{P}.evt.gpu.t-gpu0.state"),  # the brain's report consumer (GPU states)
        ("gateway", f"{P}.evt.esc.p1.t1.answered"),  # the brain's escalation-answer consumer
        ("cli", f"{P}.cmd.cancel.p1"),  # the brain's command consumer
        ("watchdog", f"{P}.evt.alert.hot.raised"),  # audited
        ("brain", f"{P}.evt.task.p1.t1.succeeded"),  # audited
    ]
    try:
        for i, (user, subject) in enumerate(forgeries):
            conn = await resources.client(user)
            try:
                msg = forged_submission(f"forged{i}", marker)
                js = conn.nc.jetstream(timeout=5)
                headers = {HEADER_TYPE: "cmd.submit", HEADER_MSG_ID: f"forged{i}"}
                await js.publish(subject, events.encode(msg), headers=headers)
                conn.clean()  # the server let each through: only mesh's own check stops them
            finally:
                await conn.close()

        async def all_refused() -> list[DeadLetter]:
            letters = await dead_letters(mesh)
            return letters if {d.subject for d in letters} >= {s for _, s in forgeries} else []

        letters = await until(all_refused, 60, "a dead letter for every forged submission")
        for _, subject in forgeries:
            (letter,) = [d for d in letters if d.subject == subject]
            assert "cmd.submit" in letter.reason and subject in letter.reason, letter
        # a real plan still runs, and no forged plan was ever accepted or run
        plan_id = await mesh.submit_text("# real\n\n## Tasks\n\n### a\n```shell\necho fine\n```\n")
        assert (await mesh.wait_plan(plan_id)).status == "succeeded"
        assert not marker.exists()
        assert not any(p.startswith("forged") for p in await mesh.raw_plans())
    finally:
        await mesh.close()
        mesh.stop_all()


async def test_a_worker_cannot_report_on_an_attempt_it_does_not_hold(
    resources: Secure, tmp_path: Path
) -> None:
    """Item: a run report is accepted only from the worker that holds the attempt. `OTHER` has a
    worker's credentials but was never handed the tasks: its reports are refused, whatever
    worker it names, and the honest worker's result is the one that counts."""
    mesh = await secured_mesh(resources, tmp_path, "brain", WORKER)
    gate = tmp_path / "gate"
    try:
        plan_id = await mesh.submit_text(
            "# claims\n\n## Tasks\n\n"
            f"### hold\n```shell\nwhile [ ! -e {gate} ]; do sleep 0.05; done; echo honest\n```\n\n"
            "### gpu\n- class: script\n\n```shell\necho never runs here\n```\n\n"
            "### after\n- depends_on: hold\n\n```shell\necho after\n```\n"
        )
    except Exception:
        await mesh.close()
        mesh.stop_all()
        raise
    forger = await resources.client(OTHER)
    js = forger.nc.jetstream(timeout=5)

    async def report(msg: RunStarted | RunFinished, subject_worker: str = OTHER) -> None:
        subject = (
            f"{P}.evt.run.{msg.plan_id}.{msg.task_id}.{events.type_of(msg).split('.')[1]}.{subject_worker}"
        )
        await js.publish(subject, events.encode(msg), headers={HEADER_MSG_ID: f"{subject}:{time.time()}"})

    try:
        await mesh.wait_task(plan_id, "hold", "running", 60)
        gpu = await mesh.wait_task(plan_id, "gpu", "ready", 60)  # no script worker: never started
        now = time.time()
        lies = [
            # a task that never started, "finished" by the forger
            RunFinished(
                plan_id=plan_id,
                task_id="gpu",
                attempt=gpu.attempt,
                worker=OTHER,
                at=now,
                ok=True,
                duration_s=0.1,
                started_at=now,
                output="forged",
                claim="0" * 32,
            ),
            # the running task, "finished" by the forger without its claim
            RunFinished(
                plan_id=plan_id,
                task_id="hold",
                attempt=1,
                worker=OTHER,
                at=now,
                ok=True,
                duration_s=0.1,
                output="forged",
            ),
            # a redelivery the forger never received
            RunStarted(plan_id=plan_id, task_id="hold", attempt=1, worker=OTHER, at=now, delivery=2),
        ]
        for lie in lies:
            await report(lie)
        # naming the honest worker in the payload, on its own subject: misplaced
        await report(
            RunFinished(
                plan_id=plan_id,
                task_id="gpu",
                attempt=gpu.attempt,
                worker=WORKER,
                at=now,
                ok=True,
                duration_s=0.1,
                started_at=now,
            )
        )
        forger.clean()
        # and the honest worker's own subject is refused by the server
        await forger.refused_publish(f"{P}.evt.run.{plan_id}.hold.finished.{WORKER}")

        async def refused() -> list[DeadLetter]:
            letters = [d for d in await dead_letters(mesh) if d.subject.endswith(f".{OTHER}")]
            return letters if len(letters) == 4 else []

        letters = await until(refused, 60, "four refused reports")
        reasons = "\n".join(d.reason for d in letters)
        assert reasons.count("without the attempt's claim") == 3, reasons
        assert "belongs on" in reasons and f"gpu.finished.{WORKER}, not on" in reasons, reasons
        tasks = await mesh.tasks(plan_id)
        assert tasks["gpu"].status == "ready" and tasks["hold"].status == "running"
        assert tasks["hold"].worker == WORKER
        gate.touch()
        await mesh.wait_task(plan_id, "after", "succeeded", 60)
        tasks = await mesh.tasks(plan_id)
        assert tasks["hold"].status == "succeeded" and tasks["hold"].worker == WORKER
        # the output dependents are given is the honest one, not the forged one
        bus = await mesh.bus()
        assert (await task_output(bus, plan_id, "hold")).text.strip() == "honest"
        # and so is what `mesh output` shows: the report of the worker the brain took it from;
        # a task only the forger "finished" has no outcome at all
        ended = await attempt_outcomes(bus, plan_id)
        assert [(o.attempt, o.worker, o.ok) for o in ended["hold"]] == [(1, WORKER, True)]
        assert (await outcome_text(bus, ended["hold"][0])).strip() == "honest"
        assert "gpu" not in ended
    finally:
        await forger.close()
        await mesh.close()
        mesh.stop_all()


BAD_IDS = ["has space", "has.dot", "wild*", "wild>", "x" * 10_000, ""]


async def test_invalid_submissions_are_dead_letters_and_never_jam_the_brain(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Item: a submission the CLI would refuse, published straight to the command stream, is
    dead-lettered with the reason, and the brain goes on accepting plans, across a restart."""
    marker = tmp_path / "PWNED"
    bus = await mesh.bus()
    mesh.brain()
    mesh.worker()
    for i, bad in enumerate(BAD_IDS):
        msg = forged_submission(bad, marker)
        await bus.js.publish(
            bus.names.submit,
            events.encode(msg),
            headers={HEADER_TYPE: "cmd.submit", HEADER_MSG_ID: f"bad{i}"},
        )
    bad_specs = {
        "prio": TaskSpec(id="a", body="true\n", priority=99),
        "retries": TaskSpec(id="a", body="true\n", retries=-1),
        "envname": TaskSpec(id="a", body="true\n", env={"A B": "x"}),
        "classbody": TaskSpec(id="a", body="true\n", cls="llm"),
        "taskid": TaskSpec(id="a.b", body="true\n"),
    }
    for plan_id, spec in bad_specs.items():
        msg = SubmitPlan(plan_id=plan_id, plan=PlanSpec(title="bad", tasks=(spec,)), at=time.time())
        await bus.publish(bus.names.submit, msg, plan_id)
    good = await mesh.submit_text("# good\n\n## Tasks\n\n### a\n```shell\necho fine\n```\n")
    assert (await mesh.wait_plan(good)).status == "succeeded"

    async def all_dead() -> list[DeadLetter]:
        letters = [d for d in await dead_letters(mesh) if "invalid submission" in d.reason]
        return letters if len(letters) == len(BAD_IDS) + len(bad_specs) else []

    letters = await until(all_dead, 60, "a dead letter for every invalid submission")
    reasons = "\n".join(d.reason for d in letters)
    for needle in (
        "may hold only letters",
        "longer than 100 characters",
        "plan id is empty",
        "priority 99",
        "retries -1",
        "'A B'",
        "class llm",
        "task id 'a.b'",
    ):
        assert needle in reasons, (needle, reasons)
    # the ones with a usable id are also rejected plans, so `mesh status` shows why
    plans = await mesh.raw_plans()
    for plan_id in bad_specs:
        assert plans[plan_id].status == "rejected", plans[plan_id]
    assert not marker.exists()
    # a restarted brain is not jammed either: nothing of the above is delivered again
    mesh._expected_dead.add("brain")
    mesh.kill("brain")
    mesh.brain("brain2")
    again = await mesh.submit_text("# again\n\n## Tasks\n\n### a\n```shell\necho fine\n```\n")
    assert (await mesh.wait_plan(again)).status == "succeeded"
    assert len([d for d in await dead_letters(mesh) if "invalid submission" in d.reason]) == len(letters)


async def test_the_cli_refuses_what_the_brain_would_with_the_same_reasons(mesh: Mesh) -> None:
    """The CLI's submit runs the brain's checks first: nothing is sent for a plan that fails."""
    bus = await mesh.bus()
    cases = {
        "has space": PlanSpec(title="t", tasks=(TaskSpec(id="a", body="true\n"),)),
        "ok-id": PlanSpec(title="t", tasks=(TaskSpec(id="a", body="true\n", priority=0),)),
    }
    for plan_id, spec in cases.items():
        with pytest.raises(PlanError, match="nothing was submitted") as err:
            await client.submit(bus, spec, plan_id)
        brain_says = validate.check_submission(SubmitPlan(plan_id=plan_id, plan=spec, at=0.0))
        assert brain_says and all(p in str(err.value) for p in brain_says)
    info = await bus.js.stream_info(bus.names.cmd_stream)
    assert info.state.messages == 0


async def test_a_transition_on_another_tasks_subject_is_not_folded(mesh: Mesh) -> None:
    """Replay and the brain's catch-up read the history through the same subject check: a
    transition that names one task but sits on another's subject is never folded."""
    mesh.brain()
    mesh.worker()
    plan_id = await mesh.submit_text(
        "# two\n\n## Tasks\n\n### a\n```shell\ntrue\n```\n\n### b\n```shell\ntrue\n```\n"
    )
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    bus = await mesh.bus()
    lie = events.TaskFailed(plan_id=plan_id, task_id="a", attempt=1, at=time.time(), error="forged")
    subject = bus.names.task_event(plan_id, "b", "failed")
    await bus.js.publish(subject, events.encode(lie), headers={HEADER_TYPE: "task.failed"})
    result = await history.replay(bus, plan_id=plan_id)
    assert result.undecodable == 1
    assert result.state.tasks[f"{plan_id}.a"].status == "succeeded"
    assert not (await history.verify(bus, result, plan_id=plan_id)).differences
