"""Per-role NATS users: the server refuses what each role must not do, and a plan runs with
every agent on its own credentials."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

import nats
from mesh.bus.connect import connect
from mesh.bus.jetstream import DomainJetStream
from mesh.bus.read import read_bucket
from mesh.errors import ServerUnavailable
from mesh.events import RunFinished
from mesh.host.config import load_settings
from mesh.names import inbox_prefix
from mesh.ops.embedded import EmbeddedServer
from mesh.ops.natsconf import rendered
from mesh.ops.security import Tls, render_permissions, users, write_secure
from mesh.records import AgentRecord
from tests.conftest import FAST_ENV, HANG_S, ROOT, Mesh
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.faults import run_mesh, until
from tests.webconsole import get, post, start_console

pytestmark = pytest.mark.integration

WORKER = "worker-t-cpu1"
OTHER = "worker-t-cpu2"
GPU_WORKER = "worker-t-gpu0"
WORKERS = (WORKER, OTHER, GPU_WORKER)


class Secure:
    """A nats-server with one user per role, and each user's config file."""

    def __init__(self, tmp: Path, leaf_port: int = 0, domain: str = "") -> None:
        self.tmp = tmp
        self.dir = tmp / "secure"
        self.settings = load_settings(environ={"XDG_CONFIG_HOME": str(tmp / "none")})
        write_secure(
            self.settings,
            self.dir,
            workers=WORKERS,
            server_url="nats://127.0.0.1:4222",
            store_dir=str(tmp / "nats" / "jetstream"),
            listen_host="127.0.0.1",
            port=-1,
            leaf_port=leaf_port,
            domain=domain,
            # the gateway host's leaf server (gateway-host.conf) on any free loopback port
            leaf_host_port=-1,
        )
        data = tmp / "nats"
        data.mkdir(parents=True, exist_ok=True)
        (data / "permissions.conf").write_text((self.dir / "permissions.conf").read_text())
        self.server = EmbeddedServer(data, port=-1, config_text=(self.dir / "server.conf").read_text())

    def config(self, user: str) -> dict[str, Any]:
        return tomllib.loads((self.dir / f"{user}.toml").read_text())

    def env(self, user: str) -> dict[str, str]:
        """The environment an agent of this user runs with: its config file, the server's URL."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
            **FAST_ENV,
            "MESH_CONFIG": str(self.dir / f"{user}.toml"),
            "MESH_NATS_URL": self.server.url,
            "XDG_CONFIG_HOME": str(self.tmp / "none"),
            "PYTHONUNBUFFERED": "1",
        }

    async def client(self, user: str) -> Refusals:
        conf = self.config(user)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await nats.connect(
            self.server.url,
            user=conf["nats_user"],
            password=conf["nats_password"],
            inbox_prefix=inbox_prefix(conf["nats_user"]),
            error_cb=on_error,
            allow_reconnect=False,
        )
        return Refusals(user, nc, errors)


class Refusals:
    """One user's connection, and the permission errors the server sent it."""

    def __init__(self, user: str, nc: Client, errors: list[str]) -> None:
        self.user = user
        self.nc = nc
        self.errors = errors

    async def refused_publish(self, subject: str) -> None:
        await self.nc.publish(subject, b"{}", reply=self.nc.new_inbox())
        await self.nc.flush()
        expected = f'permissions violation for publish to "{subject.lower()}"'
        await until(
            lambda: any(expected in e for e in self.errors),
            5.0,
            f"{self.user} refused publishing to {subject}",
        )

    async def refused_subscribe(self, subject: str) -> None:
        await self.nc.subscribe(subject)
        await self.nc.flush()
        expected = f'permissions violation for subscription to "{subject.lower()}"'
        await until(
            lambda: any(expected in e for e in self.errors),
            5.0,
            f"{self.user} refused subscribing to {subject}",
        )

    def clean(self) -> None:
        assert not [e for e in self.errors if "permissions violation" in e], self.errors

    async def close(self) -> None:
        await self.nc.close()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    s = Secure(tmp_path)
    s.server.start()
    yield s
    s.server.stop()


@pytest.fixture
async def resources(secure: Secure) -> AsyncIterator[Secure]:
    """The streams and buckets, created by the CLI's user (as `mesh init` does)."""
    code = subprocess.run(
        [sys.executable, "-m", "mesh", "init"],
        env=secure.env("cli"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert code.returncode == 0, code.stderr
    yield secure


P = "mesh"
SUBMIT = f"{P}.cmd.submit"
WORK = (f"{P}.work.cpu", f"{P}.work.llm.gemma3-270m", f"{P}.work.to.{WORKER}")

# (user, subject): what the server must refuse each role
FORBIDDEN_PUBLISH = [
    # only the CLI submits plans (and cancels, and retries)
    *[(u, SUBMIT) for u in ("brain", WORKER, "watchdog", "auditor", "exporter", "gateway")],
    *[(u, f"{P}.cmd.cancel.p1") for u in (WORKER, "gateway", "brain")],
    # only the brain queues work
    *[(u, s) for u in ("gateway", WORKER, "watchdog", "cli") for s in WORK],
    # only the brain writes transitions and records
    *[(u, f"{P}.evt.task.p1.t1.succeeded") for u in (WORKER, "gateway", "cli", "watchdog")],
    *[(u, f"$KV.{P}-tasks.p1.t1") for u in (WORKER, "gateway", "cli", "watchdog")],
    (WORKER, f"$KV.{P}-brain.lease"),
    (WORKER, f"{P}.evt.agent.{WORKER}.offline"),
    ("watchdog", f"{P}.evt.agent.{WORKER}.offline"),
    # a worker publishes only its own facts and GPU keys
    (WORKER, f"{P}.evt.agent.{OTHER}.started"),
    (WORKER, f"$KV.{P}-agents.{OTHER}"),
    (WORKER, f"{P}.evt.gpu.t-gpu0.state"),
    (WORKER, f"$KV.{P}-gpus.t-gpu0"),
    (WORKER, f"{P}.evt.dead.{OTHER}"),
    (GPU_WORKER, f"$KV.{P}-gpus.{WORKER}"),
    # ...and streams text only under its own id; nobody else streams text
    (WORKER, f"{P}.stream.p1.t1.{OTHER}"),
    (WORKER, f"{P}.stream.p1.t1"),
    *[(u, f"{P}.stream.p1.t1.{WORKER}") for u in ("cli", "brain", "watchdog", "gateway")],
    (WORKER, f"$KV.{P}-gpu-control.t-gpu0.operator"),
    # only the CLI asks for a power cap (the watchdog sets it and answers on the event subject)
    *[(u, f"$KV.{P}-gpu-control.t-gpu0.power") for u in (WORKER, "watchdog", "gateway", "brain")],
    *[(u, f"{P}.evt.gpu.t-gpu0.power") for u in (WORKER, "gateway", "auditor", "exporter")],
    # ...takes work only from its own queues...
    (WORKER, f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_WORK.worker-{OTHER}"),
    (WORKER, f"$JS.API.CONSUMER.CREATE.{P.upper()}_WORK.worker-{OTHER}.{P}.work.to.{OTHER}"),
    (WORKER, f"$JS.API.CONSUMER.CREATE.{P.upper()}_WORK.worker-{WORKER}.{P}.work.>"),
    (WORKER, f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_CMD.brain-cmd"),
    (WORKER, f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_EVENTS.brain-runs"),
    # ...and cannot reach the gateway
    (WORKER, f"{P}.esc.p1.t1"),
    (WORKER, f"{P}.evt.esc.p1.t1.answered"),
    (WORKER, f"$KV.{P}-gateway.state"),
    (WORKER, f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_ESC.gateway"),
    (WORKER, f"$JS.API.STREAM.INFO.{P.upper()}_ESC"),
    # the brain asks the gateway; it does not answer for it
    ("brain", f"{P}.evt.esc.p1.t1.answered"),
    # only the brain and the CLI create streams; nobody deletes or purges them (but the brain
    # the work stream's acknowledged items)
    *[(u, f"$JS.API.STREAM.CREATE.{P.upper()}_EVENTS") for u in (WORKER, "watchdog", "gateway", "auditor")],
    *[(u, f"$JS.API.STREAM.UPDATE.{P.upper()}_WORK") for u in (WORKER, "watchdog", "gateway", "exporter")],
    *[(u, f"$JS.API.STREAM.DELETE.{P.upper()}_EVENTS") for u in ("brain", "cli", WORKER, "gateway")],
    *[(u, f"$JS.API.STREAM.PURGE.{P.upper()}_WORK") for u in ("cli", WORKER, "gateway")],
    *[(u, f"$JS.API.STREAM.DELETE.{P.upper()}_WORK") for u in ("brain", "cli", WORKER, "gateway")],
    # readers of the history leave the agents' durables alone
    ("watchdog", f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_EVENTS.brain-runs"),
    ("exporter", f"$JS.API.CONSUMER.DELETE.{P.upper()}_EVENTS.auditor"),
    ("auditor", f"$JS.API.CONSUMER.DELETE.{P.upper()}_EVENTS.auditor"),
    ("gateway", f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_EVENTS.brain-runs"),
    # the web console sends commands and operator controls, nothing an agent says
    *[("web", s) for s in WORK],
    ("web", f"{P}.evt.task.p1.t1.succeeded"),
    ("web", f"$KV.{P}-tasks.p1.t1"),
    ("web", f"$KV.{P}-plans.p1"),
    ("web", f"$KV.{P}-gpu-control.t-gpu0.thermal"),
    ("web", f"{P}.esc.p1.t1"),
    ("web", f"{P}.evt.agent.{WORKER}.offline"),
    ("web", f"$JS.API.STREAM.DELETE.{P.upper()}_EVENTS"),
    ("web", f"$JS.API.CONSUMER.MSG.NEXT.{P.upper()}_EVENTS.brain-runs"),
    # ...and only the commands it sends: submit, cancel, retry
    ("web", f"{P}.cmd.anything-else"),
    ("web", f"{P}.cmd.cancel.p1.more"),
]

FORBIDDEN_SUBSCRIBE = [
    (WORKER, f"{P}.esc.>"),
    (WORKER, f"{P}.evt.esc.>"),
    (WORKER, f"{P}.cmd.>"),
    (WORKER, "_INBOX.brain.>"),
    (WORKER, f"_INBOX.{OTHER}.>"),
    ("gateway", f"{P}.work.>"),
    (WORKER, f"{P}.stream.>"),
    ("gateway", f"{P}.stream.>"),
    ("gateway", "_INBOX.cli.>"),
    ("watchdog", f"{P}.cmd.submit"),
    ("exporter", ">"),
    # the console shows no streamed answers (a sensitive task's among them)
    ("web", f"{P}.stream.>"),
    ("web", f"{P}.stream.p1.t1.{WORKER}"),
]


def _by_user(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for user, subject in pairs:
        out.setdefault(user, []).append(subject)
    return out


async def test_each_role_is_refused_what_it_must_not_do(secure: Secure) -> None:
    for user, subjects in _by_user(FORBIDDEN_PUBLISH).items():
        conn = await secure.client(user)
        try:
            for subject in subjects:
                await conn.refused_publish(subject)
        finally:
            await conn.close()
    for user, subjects in _by_user(FORBIDDEN_SUBSCRIBE).items():
        conn = await secure.client(user)
        try:
            for subject in subjects:
                await conn.refused_subscribe(subject)
        finally:
            await conn.close()


async def test_a_worker_publishes_its_own_facts_and_is_refused_another_workers(resources: Secure) -> None:
    """The same subjects that are refused for another worker's names are accepted for its own
    (so the refusals above are about whose names, not about the subjects' shape)."""
    mine = await resources.client(GPU_WORKER)
    js = mine.nc.jetstream(timeout=5)
    try:
        ack = await js.publish(f"{P}.evt.gpu.t-gpu0.state", b"{}")
        assert ack.stream == f"{P.upper()}_EVENTS"
        ack = await js.publish(f"$KV.{P}-gpus.t-gpu0", b"{}")
        assert ack.stream == f"KV_{P}-gpus"
        ack = await js.publish(f"{P}.evt.agent.{GPU_WORKER}.started", b"{}")
        assert ack.stream == f"{P.upper()}_EVENTS"
        ack = await js.publish(f"{P}.evt.run.p1.t1.started.{GPU_WORKER}", b"{}")
        assert ack.stream == f"{P.upper()}_EVENTS"
        mine.clean()
        # reports only under its own name
        await mine.refused_publish(f"{P}.evt.run.p1.t1.started.{WORKER}")
        await mine.refused_publish(f"{P}.evt.run.p1.t1.started")
        await mine.refused_publish(f"{P}.evt.gpu.t-cpu1.state")
        await mine.refused_publish(f"{P}.evt.agent.{WORKER}.started")
    finally:
        await mine.close()


async def test_a_worker_streams_text_under_its_own_id_and_the_cli_reads_it(resources: Secure) -> None:
    cli = await resources.client("cli")
    mine = await resources.client(GPU_WORKER)
    got: list[tuple[str, bytes]] = []

    async def take(msg: Msg) -> None:
        got.append((msg.subject, msg.data))

    try:
        await cli.nc.subscribe(f"{P}.stream.p1.>", cb=take)
        await cli.nc.flush()
        await mine.nc.publish(f"{P}.stream.p1.t1.{GPU_WORKER}", b"chunk")
        await mine.nc.flush()
        await until(lambda: got or mine.errors or cli.errors, HANG_S, "the chunk, or a refusal")
        assert got == [(f"{P}.stream.p1.t1.{GPU_WORKER}", b"chunk")], (mine.errors, cli.errors)
        mine.clean()
        cli.clean()
    finally:
        await mine.close()
        await cli.close()


async def test_the_gateway_answers_escalations_and_cannot_queue_work_or_submit(resources: Secure) -> None:
    """Issue 7, permissions: with the gateway's credentials the server refuses work and
    submissions, while what the gateway is for works."""
    n = resources.settings.names
    admin = await resources.client("cli")
    brain = await resources.client("brain")
    gateway = await resources.client("gateway")
    try:
        ajs = admin.nc.jetstream(timeout=5)
        # the brain asks (`mesh init` created the escalation stream and the gateway's bucket)
        await brain.nc.jetstream(timeout=5).publish(n.escalation("p1", "t1"), b'{"q": 1}')
        # the gateway creates its own consumer and bucket, pulls the request, answers it
        gjs = gateway.nc.jetstream(timeout=5)
        await gjs.add_consumer(
            n.esc_stream,
            config=api.ConsumerConfig(
                name=n.gateway_consumer, durable_name=n.gateway_consumer, filter_subject=n.esc_all
            ),
        )
        sub = await gjs.pull_subscribe_bind(durable=n.gateway_consumer, stream=n.esc_stream)
        msgs = await sub.fetch(1, timeout=5)
        assert msgs[0].data == b'{"q": 1}'
        await msgs[0].ack_sync()
        ack = await gjs.publish(n.esc_event("p1", "t1", "answered"), b"{}")
        assert ack.stream == n.events_stream
        kv = await gjs.key_value(n.gateway_bucket)
        await kv.put("budget", b"1")
        gateway.clean()
        # and it cannot queue work, submit, command, or touch those streams
        for subject in (
            n.work("cpu"),
            n.work_llm("gemma3-270m"),
            n.work_to(WORKER),
            n.submit,
            n.cancel("p1"),
            n.retry("p1"),
            n.escalation("p1", "t2"),
            f"$JS.API.STREAM.CREATE.{n.work_stream}",
            f"$JS.API.STREAM.DELETE.{n.work_stream}",
            f"$JS.API.STREAM.PURGE.{n.cmd_stream}",
            f"$JS.API.CONSUMER.CREATE.{n.work_stream}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{n.work_stream}.mine",
            f"$JS.API.CONSUMER.CREATE.{n.cmd_stream}.mine.{n.cmd_all}",
            f"$JS.API.CONSUMER.DELETE.{n.work_stream}.workers-cpu",
            f"$JS.API.CONSUMER.MSG.NEXT.{n.work_stream}.workers-cpu",
        ):
            await gateway.refused_publish(subject)
        # and nothing it was refused reached a stream
        info = await ajs.stream_info(n.work_stream)
        assert info.state.messages == 0
        info = await ajs.stream_info(n.cmd_stream)
        assert info.state.messages == 0
    finally:
        for conn in (admin, brain, gateway):
            await conn.close()


async def test_a_plan_runs_with_every_agent_on_its_own_credentials(resources: Secure, tmp_path: Path) -> None:
    mesh = Mesh(resources.server, tmp_path)
    mesh.env = resources.env("cli")
    mesh.settings = load_settings(environ=mesh.env)
    log_from = len(resources.server.log_lines)
    api = FakeAnthropic().__enter__()
    api.then(Reply(result="forty-two"))
    try:
        for role in ("brain", "auditor", "watchdog", "exporter"):
            mesh.env = resources.env(role)
            mesh.start_agent(role, role, *(("--port", "0") if role == "exporter" else ()))
        # the gateway, on its credentials, answering from a local Messages API
        mesh.env = {
            **resources.env("gateway"),
            "MESH_GATEWAY_BASE_URL": api.base_url,
            "MESH_GATEWAY_API_KEY": api.key,
        }
        mesh.start_agent("gateway", "gateway")
        mesh.env = resources.env(WORKER)
        mesh.worker(WORKER, 2)
        mesh.env = resources.env(OTHER)
        # a model worker on the CPU: it creates its own resource queue at start
        mesh.start_agent(OTHER, "worker", "--gpu", "none", "--classes", "script,cpu")
        mesh.env = resources.env("cli")
        out = tmp_path / "out"
        out.mkdir()
        plan_id = await mesh.submit_text(
            "# secured\n\n## Tasks\n\n"
            + "".join(
                f"### t{i}\n{'- depends_on: t0' if i else '- artifacts: zero.txt'}\n\n```shell\n"
                f"{'cat zero.txt >> ' + str(out) + '/got' if i else 'echo zero > zero.txt'}\n"
                f"echo {i} >> {out}/ran\n```\n\n"
                for i in range(6)
            )
            + "### ask\n- class: external\n\n```prompt\nWhat is six times seven?\n```\n"
        )
        plan = await mesh.wait_plan(plan_id, 60)
        assert plan.status == "succeeded", await mesh.tasks(plan_id)
        assert sorted((out / "ran").read_text().split()) == [str(i) for i in range(6)]
        # t0's artifact stored by its worker, each dependent's worker read t0's report for it
        assert (out / "got").read_text().split() == ["zero"] * 5
        (_, made), *_ = await mesh.history((await mesh.bus()).names.run_events(plan_id, "t0", "finished"))
        assert isinstance(made, RunFinished) and [f.path for f in made.files] == ["zero.txt"]
        tasks = await mesh.tasks(plan_id)
        workers = {t.worker for k, t in tasks.items() if k != "ask"}
        assert workers <= {WORKER, OTHER}, workers
        # the external task was answered through the gateway, not run by a worker
        assert tasks["ask"].status == "succeeded" and tasks["ask"].worker == ""
        (seen,) = api.requests()
        assert "six times seven" in seen.user
        # the model worker registered under its own id, with its own queue
        agents = await mesh.history(f"{P}.evt.agent.*.started")
        started = {subject.split(".")[3] for subject, _ in agents}
        assert {WORKER, OTHER} <= started, started
        bus = await mesh.bus()
        own = await bus.js.consumer_info(bus.names.work_stream, bus.names.own_consumer(OTHER))
        assert own.config.filter_subject == bus.names.work_to(OTHER)
        # the web console, on its own credentials: it follows everything, and submits (with the
        # operator token `mesh init --secure` wrote beside them)
        mesh.env = resources.env("web")
        token = load_settings(environ=mesh.env).web_token
        assert len(token) >= 32
        url = await start_console(mesh)
        async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {token}"}) as http:
            listed = await get(http, "/api/plans")
            assert [p["id"] for p in listed["plans"]] == [plan_id]
            status, sent = await post(
                http,
                "/api/submit",
                {"text": "# from the web\n\n## Tasks\n\n### a\n\n```shell\necho web\n```\n"},
            )
            assert status == 200, sent
        mesh.env = resources.env("cli")
        assert (await mesh.wait_plan(sent["plan"], 60)).status == "succeeded"
        # an operator's power cap, on the CLI's credentials (no watchdog here has that GPU)
        said = await asyncio.to_thread(mesh.cli, "gpu", "power", "nohost-gpu0", "150", "--wait", "1")
        assert "nohost-gpu0: 150 W stored" in said
        violations = [line for line in resources.server.log_lines[log_from:] if "Violation" in line]
        assert not violations, violations
    finally:
        await mesh.close()
        mesh.stop_all()
        api.__exit__()


async def test_wrong_password_is_refused_with_a_clear_error(secure: Secure) -> None:
    settings = load_settings(environ=secure.env(WORKER)).__class__(
        server_url=secure.server.url, nats_user=WORKER, nats_password="not-the-password"
    )
    with pytest.raises(ServerUnavailable, match="refused the credentials of user 'worker-t-cpu1'"):
        await connect(settings, "test")
    with pytest.raises(ServerUnavailable, match="user '\\(none\\)'"):
        await connect(load_settings(server=secure.server.url, environ={}), "test")
    # `mesh doctor` does not tell one to start a server that answered
    from mesh.ops.doctor import check_server

    bus, found = await check_server(settings)
    assert bus is None and "refused the credentials" in found[0].message
    assert "start it" not in found[0].fix and "fix the setting" in found[0].fix


def test_init_secure_writes_private_files_and_refuses_bad_worker_ids(tmp_path: Path, mesh: Mesh) -> None:
    out = run_mesh(
        mesh, "init", "--secure", str(tmp_path / "s"), "--worker", "worker-a-gpu0", "--worker", "w2"
    )
    assert out.returncode == 0, out.stderr
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "s").iterdir()}
    for name in ("server.conf", "cli.toml", "brain.toml", "worker-a-gpu0.toml", "w2.toml", "gateway.toml"):
        assert files[name] == 0o600, (name, oct(files[name]))
    worker = tomllib.loads((tmp_path / "s" / "w2.toml").read_text())
    assert worker["agent_id"] == "w2" and worker["manage_resources"] is False
    assert "manage_resources" not in tomllib.loads((tmp_path / "s" / "brain.toml").read_text())
    # the server accepts the config as written
    from mesh.ops.embedded import find_server_binary

    check = subprocess.run(
        [find_server_binary(), "-t", "-c", str(tmp_path / "s" / "server.conf")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    bad = run_mesh(mesh, "init", "--secure", str(tmp_path / "b"), "--worker", "a.b")
    assert bad.returncode == 2
    assert "worker id 'a.b' may hold only letters, digits" in bad.stderr
    twice = run_mesh(mesh, "init", "--secure", str(tmp_path / "c"), "--worker", "w", "--worker", "w")
    assert twice.returncode == 2 and "given twice" in twice.stderr
    tls = run_mesh(
        mesh, "init", "--secure", str(tmp_path / "d"), "--tls-cert", str(tmp_path / "s" / "w2.toml")
    )
    assert tls.returncode == 2 and "--tls-cert and --tls-key go together" in tls.stderr


def test_init_secure_with_a_domain_writes_the_gateway_hosts_files(tmp_path: Path, mesh: Mesh) -> None:
    """`mesh init --secure --leaf-port P --domain D`: the rig's server names its JetStream
    domain and accepts leaf links; the gateway's file points at its own host's leaf server
    and names the domain; only the gateway's user gets the domain's subjects."""
    d = tmp_path / "s"
    done = run_mesh(
        mesh, "init", "--secure", str(d), "--worker", "w1", "--leaf-port", "7422", "--domain", "rig"
    )
    assert done.returncode == 0, done.stderr
    server = (d / "server.conf").read_text()
    assert "  domain: rig\n" in server and "leafnodes {\n  listen: 0.0.0.0:7422\n}" in server
    gateway = tomllib.loads((d / "gateway.toml").read_text())
    assert gateway["jetstream_domain"] == "rig" and gateway["server_url"] == "nats://127.0.0.1:4222"
    assert "jetstream_domain" not in tomllib.loads((d / "brain.toml").read_text())
    assert (d / "gateway-host.conf").read_text() == rendered(mesh.settings)["examples/leaf/gateway-host.conf"]
    perms = (d / "permissions.conf").read_text()
    gateway_perms = perms[perms.index("PERMS_GATEWAY") :].split("\n}\n")[0]
    assert '"$JS.rig.API.CONSUMER.MSG.NEXT.MESH_ESC.gateway"' in gateway_perms
    assert '"$JS.rig.API.$KV.mesh-gateway.>"' in gateway_perms
    # ...denied alike under the domain
    assert '"$JS.rig.API.STREAM.*.MESH_WORK"' in gateway_perms
    assert perms.count("$JS.rig.API.") == gateway_perms.count("$JS.rig.API.")
    from mesh.ops.embedded import find_server_binary

    check = subprocess.run(
        [find_server_binary(), "-t", "-c", str(d / "server.conf")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    alone = run_mesh(mesh, "init", "--secure", str(tmp_path / "a"), "--domain", "rig")
    assert alone.returncode == 2 and "--domain needs --leaf-port" in alone.stderr
    bad = run_mesh(mesh, "init", "--secure", str(tmp_path / "b"), "--leaf-port", "7422", "--domain", "a.b")
    assert bad.returncode == 2 and "JetStream domain 'a.b' may hold only" in bad.stderr


def test_a_password_without_a_user_is_a_clear_error(tmp_path: Path) -> None:
    from mesh.errors import ConfigError

    with pytest.raises(ConfigError, match="nats_password is set but nats_user is empty"):
        load_settings(environ={"MESH_NATS_PASSWORD": "x", "XDG_CONFIG_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="replicas is 7"):
        load_settings(environ={"MESH_REPLICAS": "7", "XDG_CONFIG_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"jetstream_domain 'a\.b' may hold only"):
        load_settings(environ={"MESH_JETSTREAM_DOMAIN": "a.b", "XDG_CONFIG_HOME": str(tmp_path)})


def test_committed_permissions_match_the_rendering() -> None:
    settings = load_settings(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    files = rendered(settings)
    committed = (ROOT / "nats" / "secure" / "permissions.conf").read_text()
    assert files["secure/permissions.conf"] == committed, "run `mesh init --render nats/`"


def test_every_user_gets_its_own_inbox_and_roles_are_covered() -> None:
    settings = load_settings(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    all_users = users(settings, WORKERS)
    assert {u.role for u in all_users} == {
        "cli",
        "brain",
        "worker",
        "watchdog",
        "auditor",
        "exporter",
        "gateway",
        "web",
    }
    for user in all_users:
        assert user.permissions.subscribe[0] == f"_INBOX.{user.name}.>"
    text = render_permissions(settings, WORKERS)
    assert text.count("PERMS_") == len(all_users)


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def make_certificates(where: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed for 127.0.0.1 (openssl CLI)."""
    where.mkdir(parents=True, exist_ok=True)
    ca = "-x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=mesh-test-CA -keyout ca.key -out ca.pem"
    _openssl("req", *ca.split(), cwd=where)
    (where / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        request = f"-newkey rsa:2048 -nodes -subj /CN={name} -keyout {name}.key -out {name}.csr"
        _openssl("req", *request.split(), cwd=where)
        sign = f"-req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext"
        _openssl("x509", *sign.split(), "-out", f"{name}.pem", cwd=where)
    return {n: where / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make certificates")
async def test_tls_on_loopback_runs_a_plan_and_refuses_clients_without_ca_or_cert(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    settings = load_settings(environ={"XDG_CONFIG_HOME": str(tmp_path / "none")})
    conf = tmp_path / "secure"
    write_secure(
        settings,
        conf,
        workers=[WORKER],
        server_url="tls://127.0.0.1:4222",
        port=-1,
        listen_host="127.0.0.1",
        store_dir=str(tmp_path / "nats" / "jetstream"),
        tls=Tls(str(certs["server.pem"]), str(certs["server.key"]), str(certs["ca.pem"]), True),
        client_ca=str(certs["ca.pem"]),
    )
    data = tmp_path / "nats"
    data.mkdir()
    (data / "permissions.conf").write_text((conf / "permissions.conf").read_text())
    server = EmbeddedServer(data, port=-1, config_text=(conf / "server.conf").read_text())
    server.scheme = "tls"
    server.start()
    mesh = Mesh(server, tmp_path)
    client_cert = {
        "MESH_NATS_TLS_CERT": str(certs["client.pem"]),
        "MESH_NATS_TLS_KEY": str(certs["client.key"]),
    }

    def env(user: str) -> dict[str, str]:
        return {**mesh.env, "MESH_CONFIG": str(conf / f"{user}.toml"), **client_cert}

    try:
        assert server.url.startswith("tls://")
        mesh.env = env("cli")
        mesh.settings = load_settings(environ=mesh.env)
        assert mesh.settings.nats_tls_ca == str(certs["ca.pem"])
        for role in ("brain",):
            mesh.env = env(role)
            mesh.brain()
        mesh.env = env(WORKER)
        mesh.worker(WORKER, 2)
        mesh.env = env("cli")
        out = tmp_path / "ran"
        plan_id = await mesh.submit_text(f"# tls\n\n## Tasks\n\n### a\n```shell\necho a > {out}\n```\n")
        plan = await mesh.wait_plan(plan_id, 60)
        assert plan.status == "succeeded"
        assert out.read_text() == "a\n"
        # the same user without the CA does not trust the server; without a client certificate
        # the server does not let it in
        no_ca = msgspec.structs.replace(mesh.settings, nats_tls_ca="")
        with pytest.raises(ServerUnavailable, match="certificate this client does not trust"):
            await connect(no_ca, "test", wait_s=30)  # refused at once, not retried
        no_cert = msgspec.structs.replace(mesh.settings, nats_tls_cert="", nats_tls_key="")
        with pytest.raises(ServerUnavailable, match="set nats_tls_cert and nats_tls_key"):
            await connect(no_cert, "test")
    finally:
        await mesh.close()
        mesh.stop_all()
        server.stop()


async def test_the_gateway_on_a_leaf_node_server_answers_through_the_link_and_nothing_else_crosses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/multihost.md, the air-gapped rig: the rig's server (secure, JetStream in domain
    `rig`) runs the brain and a worker; the gateway host runs its own leaf server, linked as
    the gateway's user, and the real gateway connects to that on loopback with the files
    `mesh init --secure --leaf-port P --domain rig` wrote. An external task is answered
    through the link, and what the gateway's user may not do does not cross it."""
    from tests.test_cluster import free_ports

    (leaf_port,) = free_ports(1)
    rig = Secure(tmp_path / "rig", leaf_port=leaf_port, domain="rig")
    rig.server.start()
    gateway_conf = rig.config("gateway")
    assert gateway_conf["jetstream_domain"] == "rig" and "nats_tls_ca" not in gateway_conf
    assert gateway_conf["server_url"].startswith("nats://127.0.0.1:")
    monkeypatch.setenv(
        "MESH_LEAF_URL", f"nats-leaf://gateway:{gateway_conf['nats_password']}@127.0.0.1:{leaf_port}"
    )
    leaf = EmbeddedServer(tmp_path / "leaf", port=-1, config_text=(rig.dir / "gateway-host.conf").read_text())
    leaf.start()
    mesh = Mesh(rig.server, tmp_path)
    api_ = FakeAnthropic().__enter__()
    api_.then(Reply(result="forty-two"))
    local: Client | None = None
    try:
        init = subprocess.run(
            [sys.executable, "-m", "mesh", "init"],
            env=rig.env("cli"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        mesh.env = rig.env("brain")
        mesh.brain()
        mesh.env = rig.env(WORKER)
        mesh.worker(WORKER, 2)
        # the gateway on the gateway host: its own file, its host's leaf server, a model API
        mesh.env = {
            **rig.env("gateway"),
            "MESH_NATS_URL": leaf.url,
            "MESH_GATEWAY_BASE_URL": api_.base_url,
            "MESH_GATEWAY_API_KEY": api_.key,
        }
        mesh.start_agent("gateway", "gateway")
        mesh.env = rig.env("cli")
        mesh.settings = load_settings(environ=mesh.env)
        out = tmp_path / "ran"
        plan_id = await mesh.submit_text(
            f"# behind a leaf\n\n## Tasks\n\n### a\n```shell\necho a > {out}\n```\n\n"
            "### ask\n- class: external\n\n```prompt\nWhat is six times seven?\n```\n"
        )
        plan = await mesh.wait_plan(plan_id, 60)
        tasks = await mesh.tasks(plan_id)
        assert plan.status == "succeeded", (tasks, mesh.log("gateway")[-3000:])
        assert out.read_text() == "a\n"
        assert tasks["ask"].status == "succeeded" and tasks["ask"].worker == ""
        (seen,) = api_.requests()
        assert "six times seven" in seen.user
        # its KV writes crossed too (as `$JS.rig.API.$KV.…`): its registration and its records
        bus = await mesh.bus()
        n = bus.names
        registered = await read_bucket(await bus.agents_kv())
        roles = {msgspec.json.decode(v, type=AgentRecord).role for v in registered.values()}
        assert "gateway" in roles, roles
        assert await read_bucket(await bus.gateway_kv())
        answered = await mesh.history(f"{P}.evt.esc.>")
        assert any(subject.endswith(".answered") for subject, _ in answered), answered

        # from the gateway host, what the gateway's user may not do does not reach the rig
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        local = await nats.connect(leaf.url, inbox_prefix=inbox_prefix("gateway"), error_cb=on_error)
        ljs = local.jetstream(domain="rig", timeout=5)

        async def last_seq(stream: str) -> int:
            return int((await bus.js.stream_info(stream)).state.last_seq)

        before = {s: await last_seq(s) for s in (n.work_stream, n.cmd_stream, f"KV_{n.tasks_bucket}")}
        refused = (n.work("cpu"), n.work_to(WORKER), n.submit, n.cancel(plan_id), n.escalation("p", "t"))
        for subject in refused:
            await local.publish(subject, b"{}")
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await ljs.publish(subject, b"{}")
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await DomainJetStream(local, domain="rig", timeout=5).publish(f"$KV.{n.tasks_bucket}.p.t", b"{}")
        for call in (
            f"STREAM.PURGE.{n.work_stream}",
            f"STREAM.DELETE.{n.cmd_stream}",
            f"STREAM.INFO.{n.work_stream}",
            f"CONSUMER.MSG.NEXT.{n.work_stream}.{n.workers_consumer('cpu')}",
            f"CONSUMER.CREATE.{n.cmd_stream}",
        ):
            with pytest.raises(nats.errors.NoRespondersError):
                await local.request(f"$JS.rig.API.{call}", b"{}", timeout=5)
        # while what it may do answers on the same link, after all of the above
        info = await ljs.stream_info(n.esc_stream)
        assert info.config.name == n.esc_stream
        after = {s: await last_seq(s) for s in before}
        assert after == before
        assert not errors, errors
    finally:
        if local is not None:
            await local.close()
        await mesh.close()
        mesh.stop_all()
        api_.__exit__()
        leaf.stop()
        rig.server.stop()


async def test_the_cli_pushes_model_files_and_a_worker_only_reads_them(
    resources: Secure, tmp_path: Path
) -> None:
    """`mesh models push` on the CLI's credentials (again, over an older file: the store purges
    its chunks); a worker fetches the file, and is refused writing the models bucket."""
    from mesh.bus.files import fetch_file
    from mesh.bus.modelstore import models_store, push_model, read_record

    model = tmp_path / "tiny.gguf"
    cli = await connect(load_settings(environ=resources.env("cli")), "t-cli")
    worker = await connect(load_settings(environ=resources.env(WORKER)), "t-worker")
    mine = await resources.client(WORKER)
    try:
        store = await models_store(cli, create=True)
        assert store is not None
        for data in (b"first" * 50_000, b"second" * 60_000):
            model.write_bytes(data)
            record, sent = await push_model(store, "tiny", str(model), host="t")
            assert sent and record.size == len(data)
        readable = await models_store(worker)
        assert readable is not None
        seen = await read_record(readable, "tiny")
        assert seen == record
        got = tmp_path / "cache" / "tiny.gguf"
        await fetch_file(readable, seen.object, str(got), sha256=seen.sha256, size=seen.size)
        assert got.read_bytes() == b"second" * 60_000
        # a worker may not store, replace or purge a model file
        await mine.refused_publish(f"$O.{P}-models.M.dGlueS9jdXJyZW50")
        await mine.refused_publish(f"$O.{P}-models.C.somechunks")
        await mine.refused_publish(f"$JS.API.STREAM.PURGE.OBJ_{P}-models")
        await mine.refused_publish(f"$JS.API.STREAM.DELETE.OBJ_{P}-models")
    finally:
        await mine.close()
        await worker.close()
        await cli.close()


async def test_a_model_file_is_fetched_through_a_leaf_node_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/multihost.md#models, an air-gapped host: the models bucket is on the rig's server
    (JetStream domain `rig`); a process on the host behind the leaf node, connected to its
    leaf server with `jetstream_domain = "rig"`, reads the record and fetches the file through
    the link (on the link user's credentials: the gateway's, the one rendered for a link)."""
    from mesh.bus.files import fetch_file
    from mesh.bus.modelstore import models_store, push_model, read_record
    from tests.test_cluster import free_ports

    (leaf_port,) = free_ports(1)
    rig = Secure(tmp_path / "rig", leaf_port=leaf_port, domain="rig")
    rig.server.start()
    password = rig.config("gateway")["nats_password"]
    monkeypatch.setenv("MESH_LEAF_URL", f"nats-leaf://gateway:{password}@127.0.0.1:{leaf_port}")
    leaf = EmbeddedServer(tmp_path / "leaf", port=-1, config_text=(rig.dir / "gateway-host.conf").read_text())
    leaf.start()
    model = tmp_path / "tiny.gguf"
    model.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    cli = await connect(load_settings(environ=rig.env("cli")), "t-cli")
    far = await connect(
        load_settings(environ={**rig.env("gateway"), "MESH_NATS_URL": leaf.url}), "t-far", wait_s=10
    )
    try:
        store = await models_store(cli, create=True)
        assert store is not None
        record, _ = await push_model(store, "tiny", str(model))
        assert far.settings.jetstream_domain == "rig"
        readable = await models_store(far)
        assert readable is not None
        seen = await read_record(readable, "tiny")
        assert seen == record
        got = tmp_path / "far" / "tiny.gguf"
        await fetch_file(readable, seen.object, str(got), sha256=seen.sha256, size=seen.size, stall_s=10)
        assert got.read_bytes() == model.read_bytes()
    finally:
        await far.close()
        await cli.close()
        leaf.stop()
        rig.server.stop()
