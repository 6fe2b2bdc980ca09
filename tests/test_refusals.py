"""A permission refusal is said at once: what was refused, to which user and role, and what to do,
never a bare `TimeoutError` after the request's timeout. On a server with one user per role."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import nats.errors
import pytest

from mesh.bus.connect import connect
from mesh.bus.refusals import PermissionRefused, Refusals
from mesh.events import AgentStarted, TaskSucceeded
from mesh.host.config import load_settings
from mesh.names import Names
from mesh.ops.security import users
from mesh.refusal import NAMED_ROLES, Violation, parse_violation, refusal_message, role_of
from mesh.settings import Settings
from tests.conftest import ROOT
from tests.test_security import WORKER, Secure, resources, secure  # noqa: F401 (fixtures)

# far longer than any test runs: a refusal that waited for it would never come back
FOREVER_S = 3600.0


# the text -------------------------------------------------------------------------------------
def test_the_servers_refusals_are_read() -> None:
    # (nats-py lowercases the server's -ERR before handing it on)
    assert parse_violation('nats: permissions violation for publish to "mesh.cmd.submit"') == Violation(
        "publish", "mesh.cmd.submit"
    )
    assert parse_violation(
        'nats: Permissions Violation for Publish with Reply of "_INBOX.x.y" to "$KV.mesh-tasks.p.t"'
    ) == Violation("publish", "$kv.mesh-tasks.p.t")
    assert parse_violation(
        'nats: permissions violation for subscription to "mesh.cmd.>" using queue "q"'
    ) == Violation("subscribe", "mesh.cmd.>")
    assert parse_violation("nats: stale connection") is None
    assert parse_violation("nats: timeout") is None


def test_roles_are_those_init_secure_makes() -> None:
    made = users(Settings(), ["worker-a-gpu0", "w2"])
    assert {u.name: u.role for u in made} == {u.name: role_of(u.name) for u in made}
    assert set(NAMED_ROLES) == {u.role for u in made if u.role != "worker"}


def test_a_refusal_says_what_who_and_what_to_do() -> None:
    n = Names()
    text = refusal_message(n, WORKER, Violation("publish", n.submit))
    assert f"refused user {WORKER!r} (role worker) permission to submit a plan" in text
    assert "mesh.cmd.submit" in text and "cli.toml" in text
    text = refusal_message(n, "gateway", Violation("publish", n.cancel("p1")))
    assert "(role gateway) permission to cancel a plan" in text
    text = refusal_message(n, WORKER, Violation("publish", n.work("cpu")))
    assert "permission to queue work" in text and "docs/security.md#the-roles" in text
    text = refusal_message(n, "watchdog", Violation("publish", "$kv.mesh-tasks.p1.t1"))
    assert "permission to write to the mesh-tasks bucket" in text
    text = refusal_message(n, WORKER, Violation("subscribe", "mesh.cmd.>"))
    assert "permission to subscribe to mesh.cmd.>" in text


# the matching, on asyncio alone ---------------------------------------------------------------
async def test_a_refusal_fails_only_what_waits_on_its_subject() -> None:
    refusals = Refusals(Names(), WORKER)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    other: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    refused = asyncio.create_task(refusals.guard(["mesh.cmd.submit"], never))
    kept = asyncio.create_task(refusals.guard(["mesh.evt.agent.x.started"], other))
    await asyncio.sleep(0)
    assert not refusals.take(nats.errors.Error("nats: stale connection"))
    assert not refusals.take(nats.errors.Error('nats: permissions violation for publish to "mesh.work.cpu"'))
    assert refusals.take(nats.errors.Error('nats: permissions violation for publish to "mesh.cmd.submit"'))
    with pytest.raises(PermissionRefused, match="permission to submit a plan") as caught:
        await refused
    assert caught.value.violation == Violation("publish", "mesh.cmd.submit")
    assert not kept.done()
    other.set_result("answered")
    assert await kept == "answered"
    assert not refusals._waiting, "nothing left registered"


async def test_a_refusal_that_came_before_its_wait_fails_the_wait_at_once() -> None:
    """A read's next batch is asked for, then waited on later: a refusal that arrives in between
    finds nothing waiting, and is kept for the wait on its subject."""
    refusals = Refusals(Names(), "auditor")
    pull = "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.brain-runs"
    assert not refusals.take(
        nats.errors.Error(f'nats: permissions violation for publish to "{pull.lower()}"')
    )
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(
        PermissionRefused, match="user 'auditor' \\(role auditor\\) permission to call the JetStream"
    ):
        await refusals.guard([pull], never)
    # kept for one wait only
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    done.set_result("ok")
    assert await refusals.guard([pull], done) == "ok"


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    refusals = Refusals(Names(), WORKER)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(refusals.guard(["mesh.cmd.submit"], never))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not refusals._waiting


# on a server with one user per role -----------------------------------------------------------
@pytest.mark.integration
def test_mesh_submit_with_a_workers_credentials_is_refused_at_once(
    resources: Secure,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """The issue: refused only after ~10 s, as a `TimeoutError` after a permissions violation.
    With requests that would wait an hour, the command still comes back, and says why."""
    plan = tmp_path / "plan.md"
    plan.write_text("# refused\n\n## Tasks\n\n### t\n\n```shell\necho hi\n```\n")
    env = {**resources.env(WORKER), "MESH_REQUEST_TIMEOUT_S": str(FOREVER_S)}
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "submit", str(plan)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=FOREVER_S / 10,  # (only so a broken build cannot hang the suite)
    )
    assert result.returncode == 2, result
    said = " ".join(result.stderr.split())
    assert f"refused user {WORKER!r} (role worker) permission to submit a plan" in said, said
    assert "mesh.cmd.submit" in said and "DIR/cli.toml" in said, said
    assert "Traceback" not in result.stderr and "Timeout" not in result.stderr, result.stderr


@pytest.mark.integration
async def test_a_refused_publish_batch_or_kv_write_fails_at_once(
    resources: Secure,  # noqa: F811 (the fixture)
) -> None:
    """Each kind of wait: a stream publish, a pipelined batch (the brain's way), a KV write. Each
    fails before its (hour-long) timeout, and the connection and its task go on unharmed."""
    conf = resources.config(WORKER)
    s = load_settings(
        server=resources.server.url,
        environ={"XDG_CONFIG_HOME": str(resources.tmp / "none")},
        nats_user=conf["nats_user"],
        nats_password=conf["nats_password"],
        agent_id=WORKER,
        request_timeout_s=FOREVER_S,
    )
    bus = await connect(s, "refusals-test")
    try:
        n = s.names
        with pytest.raises(PermissionRefused, match="permission to publish an event") as caught:
            await bus.emit(
                TaskSucceeded(plan_id="p1", task_id="t1", attempt=1, worker=WORKER, at=time.time())
            )
        assert caught.value.violation.subject == n.task_event("p1", "t1", "succeeded")
        batch = [
            TaskSucceeded(plan_id="p1", task_id=f"t{i}", attempt=1, worker=WORKER, at=time.time())
            for i in range(3)
        ]
        with pytest.raises(PermissionRefused, match=f"user {WORKER!r} \\(role worker\\)"):
            await bus.emit_many(batch)
        kv = await bus.tasks_kv()
        with pytest.raises(PermissionRefused, match="write to the mesh-tasks bucket"):
            await kv.put("p1.t1", b"{}")
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0, "no cancel left pending on the caller"
        # what the worker may do still goes through on the same connection
        ack = await bus.emit(AgentStarted(agent_id=WORKER, role="worker", host="t", pid=1, at=time.time()))
        assert ack.seq > 0
    finally:
        await bus.close()
