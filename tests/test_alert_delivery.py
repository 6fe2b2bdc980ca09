"""Alerts that reach someone: the e-mail sink against a real local SMTP server (aiosmtpd) with
STARTTLS and a throwaway self-signed certificate, retries then the spool for a sink that fails
(listed by `mesh doctor`, delivered by a later try), and `mesh health` raising and resolving its
checks' alerts (TCP and any-of checks among them) on a webhook and the event stream."""

from __future__ import annotations

import email
import email.policy
import http.server
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mesh.events import AlertRaised, AlertResolved
from mesh.health import HealthCheck, Result, round_alerts
from mesh.host.alertmail import MailConfig, split_addresses
from mesh.host.alertsinks import Sinks
from mesh.host.alertspool import Spool
from mesh.host.health import probe, probe_any, probe_tcp
from mesh.host.telemetry import write_simulated
from mesh.ops import doctor
from mesh.settings import Settings, alert_sink_problem
from tests import test_health_once as health_once
from tests.conftest import Mesh
from tests.faults import until

RAISED = AlertRaised(
    rule="gpu_temp_critical",
    target="rig1-gpu0",
    host="rig1",
    severity="critical",
    at=1767225600.0,
    metric="gpu_temp_c",
    value=91.0,
    threshold=90.0,
    message="CRITICAL gpu_temp_critical on rig1-gpu0: gpu_temp_c 91°C (threshold 90°C)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def no_sleep(_: float) -> None:
    pass


# ------------------------------------------------------------------ a real SMTP server


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl)."""
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.rcpt: list[list[str]] = []
        self.tls: list[bool] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        msg = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        self.messages.append(msg)
        self.rcpt.append(list(envelope.rcpt_tos))
        self.tls.append(session.ssl is not None)
        return "250 OK"


def _auth(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"alerts", b"s3cret")
    return AuthResult(success=ok)


@pytest.fixture
def smtp(cert: tuple[Path, Path]) -> Iterator[tuple[Inbox, int]]:
    """aiosmtpd on 127.0.0.1, requiring STARTTLS before anything else, and a login."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        authenticator=_auth,
    )
    controller.start()
    yield inbox, port
    controller.stop()


def mail(port: int, ca: Path | str, **kw: Any) -> MailConfig:
    fields: dict[str, Any] = dict(
        host="127.0.0.1",
        port=port,
        to=split_addresses("ops@example.org, oncall@example.org"),
        sender="mesh@rig1",
        user="alerts",
        password="s3cret",
        ca_file=str(ca),
        timeout_s=10.0,
    )
    fields.update(kw)
    return MailConfig(**fields)


async def test_an_alert_is_mailed_over_starttls_with_a_login(
    smtp: tuple[Inbox, int], cert: tuple[Path, Path], tmp_path: Path
) -> None:
    inbox, port = smtp
    sinks = Sinks(mail=mail(port, cert[0]), spool=Spool(tmp_path / "spool.jsonl"))
    assert await sinks.deliver(RAISED)
    [msg] = inbox.messages
    assert inbox.tls == [True], "the message went after STARTTLS"
    assert inbox.rcpt == [["ops@example.org", "oncall@example.org"]]
    assert msg["Subject"] == "mesh: gpu_temp_critical CRITICAL raised on rig1-gpu0"
    assert msg["From"] == "mesh@rig1"
    body = msg.get_content()
    assert RAISED.message in body and "threshold 90" in body and "host:      rig1" in body
    assert not (tmp_path / "spool.jsonl").exists()


async def test_a_certificate_not_trusted_is_not_delivered_but_spooled(
    smtp: tuple[Inbox, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox, port = smtp
    spool = Spool(tmp_path / "spool.jsonl")
    sinks = Sinks(mail=mail(port, ""), spool=spool, retries=2, sleep=no_sleep)
    assert not await sinks.deliver(RAISED)
    assert inbox.messages == []
    [kept], bad = spool.read()
    assert bad == 0 and kept.sink == "email" and kept.attempts == 2 and kept.event == RAISED
    assert "CERTIFICATE_VERIFY_FAILED" in kept.error
    assert sum("try" in r.getMessage() and "email" in r.getMessage() for r in caplog.records) == 2


async def test_a_server_without_starttls_gets_no_credentials(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        spool = Spool(tmp_path / "spool.jsonl")
        assert not await Sinks(mail=mail(port, cert[0]), spool=spool, sleep=no_sleep).deliver(RAISED)
        [kept], _ = spool.read()
        assert "STARTTLS" in kept.error
        assert inbox.messages == []
    finally:
        controller.stop()


# ------------------------------------------------------------------ retries and the spool


class Hook:
    """A local webhook receiver that can be switched to answer 500."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.failing = False
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hook.failing:
                    self.send_response(500)
                else:
                    hook.bodies.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


async def test_a_failing_sink_is_retried_with_backoff_then_spooled_and_delivered_later(
    hook: Hook, tmp_path: Path
) -> None:
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    hook.failing = True
    settings = Settings(data_dir=str(tmp_path / "data"))
    spool = Spool(tmp_path / "spool.jsonl")
    sinks = Sinks(hook.url, spool=spool, retries=4, backoff_s=1.5, sleep=sleep)
    assert not await sinks.deliver(RAISED)
    assert waits == [1.5, 3.0, 6.0], "three waits between four tries, doubling"
    [kept], _ = spool.read()
    assert kept.sink == "webhook" and kept.attempts == 4 and "HTTP 500" in kept.error

    # mesh doctor lists it
    settings_spool = Spool(Path(settings.data_dir) / "alerts" / "undelivered.jsonl")
    settings_spool.add(kept)
    [finding] = doctor.check_alert_spool(settings)
    assert finding.level == "warn" and "1 alert(s) not delivered (1 to webhook" in finding.message
    assert "HTTP 500" in finding.message

    # still failing: kept, one more attempt counted
    assert await sinks.retry_spool() == (0, 1)
    assert spool.read()[0][0].attempts == 5

    hook.failing = False
    assert await sinks.retry_spool() == (1, 0)
    assert spool.read() == ([], 0)
    assert hook.bodies[0]["rule"] == "gpu_temp_critical" and hook.bodies[0]["text"] == RAISED.message


async def test_a_spooled_alert_of_a_sink_no_longer_configured_stays(tmp_path: Path, hook: Hook) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    hook.failing = True
    await Sinks(hook.url, spool=spool, sleep=no_sleep).deliver(RAISED)
    assert await Sinks(spool=spool).retry_spool() == (0, 1)
    assert len(spool.read()[0]) == 1


def test_the_spool_keeps_lines_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    path.write_text("not json\n")
    spool = Spool(path)
    assert spool.read() == ([], 1)
    spool.update(lambda e: None)
    assert path.read_text() == "not json\n"


def test_doctor_is_content_with_an_empty_spool(tmp_path: Path) -> None:
    [finding] = doctor.check_alert_spool(Settings(data_dir=str(tmp_path)))
    assert finding.level == "ok"


# ------------------------------------------------------------------ TCP and any-of checks


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_tcp_and_any_of_probes(listening: int) -> None:
    closed = free_port()
    assert probe_tcp(f"127.0.0.1:{listening}", 2.0)[0]
    ok, seen = probe_tcp(f"127.0.0.1:{closed}", 2.0)
    assert not ok and "ConnectionRefusedError" in seen
    ok, seen = probe_any([f"http://127.0.0.1:{closed}/health", f"tcp://127.0.0.1:{listening}"], 2.0)
    assert ok and str(listening) in seen
    ok, seen = probe_any([f"http://127.0.0.1:{closed}/health", f"tcp://127.0.0.1:{closed}"], 2.0)
    assert not ok and seen.startswith("none answered") and seen.count(str(closed)) == 2
    assert probe(HealthCheck(tcp=f"127.0.0.1:{listening}"))[0]


def test_check_targets_are_checked() -> None:
    assert not HealthCheck(tcp="127.0.0.1:8080").problem()
    assert not HealthCheck(tcp="[::1]:8080").problem()
    assert "host:port" in HealthCheck(tcp="127.0.0.1").problem()
    assert "host:port" in HealthCheck(tcp="localhost:99999").problem()
    assert not HealthCheck(any_of=["http://a:1/health", "tcp://a:2"]).problem()
    assert "neither" in HealthCheck(any_of=["a:2"]).problem()
    assert "exactly one" in HealthCheck(tcp="a:1", url="http://a/").problem()
    assert HealthCheck(any_of=["tcp://a:1", "tcp://b:2"]).target == "any of tcp://a:1, tcp://b:2"


def test_a_round_raises_once_and_resolves_when_healthy() -> None:
    down = [Result("llama", "tcp x:1", False, "refused")]
    alerts, raised = round_alerts(down, {}, "rig1", 10.0)
    assert [type(a) for a in alerts] == [AlertRaised] and raised == {"llama": 10.0}
    assert alerts[0].message == "tcp x:1 unhealthy: refused" and alerts[0].target == "llama"
    assert round_alerts(down, raised, "rig1", 70.0) == ([], raised), "still down: not raised again"
    alerts, raised = round_alerts([Result("llama", "tcp x:1", True, "ok")], raised, "rig1", 130.0)
    [resolved] = alerts
    assert isinstance(resolved, AlertResolved) and resolved.raised_at == 10.0 and raised == {}


# ------------------------------------------------------------------ mesh health, end to end


def run_health(config: Path, url: str, data: Path) -> subprocess.CompletedProcess[str]:
    return health_once.run_health(config, url, data, timeout_s=120)


@pytest.mark.integration
async def test_mesh_health_raises_its_alerts_once_and_resolves_them(mesh: Mesh, hook: Hook) -> None:
    nats_server, tmp_path = mesh.server, mesh.tmp
    await mesh.bus()  # the streams exist, as they do where agents ran
    port = free_port()
    config = tmp_path / "health.toml"
    config.write_text(
        f'alert_webhook_url = "{hook.url}"\nalert_retries = 1\n\n'
        f'[health.llama]\ntcp = "127.0.0.1:{port}"\nretries = 1\ntimeout_s = 1\n\n'
        f'[health.either]\nany_of = ["http://127.0.0.1:{free_port()}/health", "tcp://127.0.0.1:{port}"]\n'
        "retries = 1\ntimeout_s = 1\n"
    )
    data = tmp_path / "data"
    first = run_health(config, nats_server.url, data)
    assert first.returncode == 1, first.stdout + first.stderr
    verdicts = {v["name"]: v for v in map(json.loads, first.stdout.splitlines())}
    assert not verdicts["llama"]["healthy"] and not verdicts["either"]["healthy"]
    assert sorted(b["target"] for b in hook.bodies) == ["either", "llama"]
    assert {b["type"] for b in hook.bodies} == {"alert.raised"}

    second = run_health(config, nats_server.url, data)
    assert second.returncode == 1
    assert len(hook.bodies) == 2, "a check still down is not raised again"

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        third = run_health(config, nats_server.url, data)
    assert third.returncode == 0, third.stdout + third.stderr
    assert sorted((b["type"], b["target"]) for b in hook.bodies[2:]) == [
        ("alert.resolved", "either"),
        ("alert.resolved", "llama"),
    ]

    got = [m for _, m in await mesh.history(mesh.settings.names.alerts_all) if m is not None]
    assert all(isinstance(m, AlertRaised | AlertResolved) and m.host for m in got)
    assert sorted((type(m).__name__, m.target) for m in got) == [
        ("AlertRaised", "either"),
        ("AlertRaised", "llama"),
        ("AlertResolved", "either"),
        ("AlertResolved", "llama"),
    ]


@pytest.mark.integration
async def test_the_watchdog_alerts_a_closed_port_through_a_failing_webhook_that_comes_back(
    mesh: Mesh, hook: Hook
) -> None:
    """The watchdog's TCP check fails; the webhook fails every try, so the alert is spooled; the
    webhook comes back and the watchdog's spool loop delivers it."""
    data = mesh.tmp / "data"
    config = Path(mesh.env["XDG_CONFIG_HOME"]) / "mesh" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'alert_webhook_url = "{hook.url}"\nalert_retries = 2\nalert_retry_backoff_s = 0.1\n'
        f'alert_spool_retry_s = 0.5\n\n[health.db]\ntcp = "127.0.0.1:{free_port()}"\nretries = 1\n'
        "interval_s = 0.3\ntimeout_s = 1\n"
    )
    mesh.env.update({"MESH_DATA_DIR": str(data)})
    hook.failing = True
    spool = Spool(data / "alerts" / "undelivered.jsonl")
    mesh.start_agent("watchdog", "watchdog")

    def spooled() -> bool:
        if not mesh.alive("watchdog"):
            raise AssertionError(mesh.log("watchdog"))
        return any(e.event.target == "db" for e in spool.read()[0])

    await until(spooled, 60, "the health alert in the spool")
    [entry] = [e for e in spool.read()[0] if e.event.target == "db"]
    assert entry.sink == "webhook" and "HTTP 500" in entry.error and entry.attempts >= 2
    assert isinstance(entry.event, AlertRaised) and entry.event.rule == "health"
    assert "tcp 127.0.0.1:" in entry.event.message

    hook.failing = False
    await until(lambda: any(b.get("target") == "db" for b in hook.bodies), 60, "the spooled alert delivered")
    await until(lambda: not spool.read()[0], 30, "the spool emptied")
    assert hook.bodies[0]["rule"] == "health" and hook.bodies[0]["type"] == "alert.raised"


@pytest.mark.integration
async def test_mesh_health_keeps_what_the_server_did_not_take_for_the_next_run(
    mesh: Mesh, hook: Hook
) -> None:
    await mesh.bus()
    config = mesh.tmp / "health.toml"
    config.write_text(
        f'alert_webhook_url = "{hook.url}"\n\n'
        f'[health.llama]\ntcp = "127.0.0.1:{free_port()}"\nretries = 1\ntimeout_s = 1\n'
    )
    data = mesh.tmp / "data"
    away = run_health(config, f"nats://127.0.0.1:{free_port()}", data)
    assert away.returncode == 1
    assert "not published to the stream" in away.stderr and "spooled" in away.stderr
    assert [b["target"] for b in hook.bodies] == ["llama"], "the sinks have it all the same"
    [kept], _ = Spool(data / "alerts" / "undelivered.jsonl").read()
    assert kept.sink == "stream" and kept.event.target == "llama"
    [finding] = doctor.check_alert_spool(Settings(data_dir=str(data)))
    assert finding.level == "warn" and "1 to stream" in finding.message

    back = run_health(config, mesh.server.url, data)
    assert back.returncode == 1, back.stdout + back.stderr
    assert len(hook.bodies) == 1, "still down: not raised again"
    assert Spool(data / "alerts" / "undelivered.jsonl").read() == ([], 0)
    got = [m for _, m in await mesh.history(mesh.settings.names.alerts_all)]
    assert [(type(m).__name__, m.target) for m in got if m is not None] == [("AlertRaised", "llama")]
    assert isinstance(got[0], AlertRaised) and got[0].at == kept.event.at, "the alert of the first run"


async def test_the_e_mail_settings_reach_the_sink(
    smtp: tuple[Inbox, int], cert: tuple[Path, Path], tmp_path: Path
) -> None:
    inbox, port = smtp
    settings = Settings(
        data_dir=str(tmp_path),
        alert_email_to="ops@example.org",
        alert_smtp_host="127.0.0.1",
        alert_smtp_port=port,
        alert_smtp_user="alerts",
        alert_smtp_password="s3cret",
        alert_smtp_ca_file=str(cert[0]),
    )
    assert alert_sink_problem(settings) == ""
    sinks = Sinks.from_settings(settings, "rig1")
    assert list(sinks.targets()) == ["email"]
    assert await sinks.deliver(RAISED)
    [msg] = inbox.messages
    assert msg["From"] == "mesh@rig1" and msg["To"] == "ops@example.org"


def test_e_mail_settings_that_cannot_work_are_refused() -> None:
    assert "alert_smtp_host" in alert_sink_problem(Settings(alert_email_to="a@b"))
    assert "go together" in alert_sink_problem(Settings(alert_smtp_user="u"))
    assert "alert_retries" in alert_sink_problem(Settings(alert_retries=0))


@pytest.mark.integration
async def test_an_alert_the_server_did_not_take_outlives_a_killed_watchdog(mesh: Mesh) -> None:
    """The server goes away, a GPU overheats: the watchdog's alert, refused by the server, is
    spooled for the stream. The watchdog is killed (-9) and the GPU cools; the server and a new
    watchdog come back, and the alert reaches the history all the same, once."""
    sim = mesh.tmp / "gpus.json"
    cool = [{"name": "Simulated", "temp_c": 50, "util_pct": 1, "mem_used_mb": 1, "mem_total_mb": 8}]
    write_simulated(sim, cool)
    data = mesh.tmp / "data"
    mesh.env.update(
        {"MESH_SIMULATED_GPUS": str(sim), "MESH_WATCHDOG_INTERVAL_S": "0.3", "MESH_DATA_DIR": str(data)}
    )
    await mesh.bus()  # (the streams made)
    mesh.start_agent("watchdog", "watchdog")
    await until(lambda: "watching 1 GPU" in mesh.log("watchdog"), 120, "the watchdog watching")
    mesh.server.stop()
    write_simulated(sim, [{**cool[0], "temp_c": 95}])
    spool = Spool(data / "alerts" / "undelivered.jsonl")

    def kept() -> list[AlertRaised]:
        if not mesh.alive("watchdog"):
            raise AssertionError(mesh.log("watchdog"))
        return [
            e.event
            for e in spool.read()[0]
            if e.sink == "stream" and isinstance(e.event, AlertRaised) and e.event.rule == "gpu_temp_critical"
        ]

    [raised] = await until(kept, 120, "the alert spooled for the stream")
    mesh.kill("watchdog")
    write_simulated(sim, cool)  # (the new watchdog has nothing of its own to raise)
    mesh.server.start()
    mesh.start_agent("watchdog2", "watchdog")
    bus = await mesh.bus()

    async def stored() -> list[AlertRaised]:
        history = await mesh.history(bus.names.alerts_all)
        return [m for _, m in history if isinstance(m, AlertRaised) and m.rule == "gpu_temp_critical"]

    assert await until(stored, 120, "the spooled alert in the history") == [raised]
    await until(lambda: not [e for e in spool.read()[0] if e.sink == "stream"], 60, "the spool emptied")
    assert mesh.alive("watchdog2"), mesh.log("watchdog2")
