"""Where alerts go besides the event stream: the log, a webhook (JSON, Slack, Discord, ntfy),
e-mail and desktop notifications through notify-send; retried, then spooled, never dropped.

The rules that raise alerts are mesh.alerts; the e-mail is mesh.host.alertmail and the spool of
what no try delivered is mesh.host.alertspool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

from mesh.events import AlertRaised, AlertResolved
from mesh.host.alertmail import MailConfig, alert_message, send_mail, split_addresses
from mesh.host.alertspool import Spool, Undelivered, spool_path
from mesh.settings import Settings

log = logging.getLogger("mesh.host.alertsinks")


WebhookFormat = Literal["json", "slack", "discord", "ntfy"]
WEBHOOK_FORMATS: tuple[str, ...] = ("json", "slack", "discord", "ntfy")
_NTFY_PRIORITY = {"info": 3, "warn": 4, "critical": 5}


def webhook_request(url: str, fmt: str, ev: AlertRaised | AlertResolved) -> tuple[str, dict[str, Any]]:
    """Where to POST an alert and the JSON body, in the shape the receiving service reads.

    json: the event itself plus `text`; slack: `{"text"}`; discord: `{"content"}`;
    ntfy: ntfy's JSON publish (`topic`, `title`, `message`, `priority`, `tags`) sent to the
    server's root, the topic being the last part of the configured URL (`https://ntfy.sh/mytopic`)."""
    text = ev.message
    if fmt == "slack":
        return url, {"text": text}
    if fmt == "discord":
        return url, {"content": text}
    if fmt == "ntfy":
        parts = urllib.parse.urlsplit(url)
        base, _, topic = parts.path.rstrip("/").rpartition("/")
        root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, base + "/", "", ""))
        match ev:
            case AlertRaised():
                state, priority = "raised", _NTFY_PRIORITY.get(ev.severity, 3)
                tags = ["rotating_light" if ev.severity == "critical" else "warning"]
            case AlertResolved():
                state, priority, tags = "resolved", 2, ["white_check_mark"]
        return root, {
            "topic": topic,
            "title": f"mesh: {ev.rule} {state} on {ev.target}",
            "message": text,
            "priority": priority,
            "tags": tags,
        }
    body: dict[str, Any] = json.loads(msgspec.json.encode(ev))
    body["text"] = text
    return url, body


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> int:
    """POST JSON; the HTTP status (raises on a network error or an error status)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "mesh-watchdog"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return int(resp.status)


def notify_send(ev: AlertRaised | AlertResolved, timeout_s: float = 5.0) -> bool:
    """A desktop notification through `notify-send`, where it is installed; False where not."""
    exe = shutil.which("notify-send")
    if exe is None:
        return False
    match ev:
        case AlertRaised(severity="critical"):
            urgency = "critical"
        case _:
            urgency = "normal"
    done = subprocess.run(
        [exe, "-u", urgency, "-a", "mesh", f"mesh: {ev.rule} on {ev.target}", ev.message],
        timeout=timeout_s,
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise OSError(f"notify-send exited {done.returncode}: {done.stderr.strip()[-200:]}")
    return True


Alert = AlertRaised | AlertResolved
Send = Callable[[Alert], None]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class Sinks:
    """Where alerts go besides the event stream: the log always; a webhook, e-mail and
    notify-send where configured. Each sink runs in a thread; one that fails is tried again
    `retries` times in all, the wait doubling from `backoff_s`, each failure logged. What no try
    delivered goes to the spool (with the last error), tried again by `retry_spool`. A failure
    never reaches the caller."""

    def __init__(
        self,
        webhook_url: str = "",
        webhook_format: str = "json",
        timeout_s: float = 5.0,
        use_notify_send: bool = False,
        *,
        mail: MailConfig | None = None,
        spool: Spool | None = None,
        retries: int = 1,
        backoff_s: float = 2.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.webhook_url = webhook_url
        self.webhook_format = webhook_format
        self.timeout_s = timeout_s
        self.use_notify_send = use_notify_send
        self.mail = mail
        self.spool = spool
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self.sleep = sleep
        self._notify_missing_logged = False

    @classmethod
    def from_settings(cls, settings: Settings, host: str = "") -> Sinks:
        mail = None
        if settings.alert_email_to:
            mail = MailConfig(
                host=settings.alert_smtp_host,
                port=settings.alert_smtp_port,
                security=settings.alert_smtp_security,
                to=split_addresses(settings.alert_email_to),
                sender=settings.alert_email_from or f"mesh@{host or socket.gethostname()}",
                user=settings.alert_smtp_user,
                password=settings.alert_smtp_password,
                ca_file=settings.alert_smtp_ca_file,
                timeout_s=settings.alert_smtp_timeout_s,
            )
        return cls(
            settings.alert_webhook_url,
            settings.alert_webhook_format,
            settings.alert_webhook_timeout_s,
            settings.alert_notify_send,
            mail=mail,
            spool=Spool(spool_path(settings.data_dir)),
            retries=settings.alert_retries,
            backoff_s=settings.alert_retry_backoff_s,
        )

    def targets(self) -> dict[str, Send]:
        """The configured sinks by name, each a blocking send that raises on failure."""
        out: dict[str, Send] = {}
        if self.webhook_url:
            out["webhook"] = self._webhook
        if self.mail is not None:
            out["email"] = self._email
        if self.use_notify_send:
            out["notify-send"] = self._notify
        return out

    async def deliver(self, ev: Alert) -> bool:
        """Log the alert and hand it to every sink; False if some sink's tries all failed."""
        match ev:
            case AlertResolved():
                level = logging.INFO
            case AlertRaised(severity="critical"):
                level = logging.ERROR
            case AlertRaised():
                level = logging.WARNING
        log.log(level, "alert: %s", ev.message)
        sends = self.targets()
        results = await asyncio.gather(*(self._send(name, send, ev) for name, send in sends.items()))
        return all(results)

    async def _send(self, name: str, send: Send, ev: Alert) -> bool:
        delay = self.backoff_s
        error = ""
        for attempt in range(1, self.retries + 1):
            try:
                await asyncio.to_thread(send, ev)
            except Exception as exc:
                error = _describe(exc)
                log.warning(
                    "alert %s on %s to %s failed (try %d of %d): %s",
                    ev.rule,
                    ev.target,
                    name,
                    attempt,
                    self.retries,
                    error,
                )
                if attempt < self.retries:
                    await self.sleep(delay)
                    delay *= 2
                continue
            if attempt > 1:
                log.info("alert %s on %s delivered to %s at try %d", ev.rule, ev.target, name, attempt)
            return True
        now = time.time()
        entry = Undelivered(
            sink=name, event=ev, error=error, attempts=self.retries, first_at=now, last_at=now
        )
        if self.spool is None:
            log.error("alert %s on %s NOT delivered to %s: %s (no spool)", ev.rule, ev.target, name, error)
            return False
        try:
            await asyncio.to_thread(self.spool.add, entry)
        except OSError as exc:
            log.error(
                "alert %s on %s NOT delivered to %s (%s), and cannot be spooled in %s: %s",
                ev.rule,
                ev.target,
                name,
                error,
                self.spool.path,
                exc,
            )
            return False
        log.error(
            "alert %s on %s not delivered to %s after %d tries (%s): kept in %s, tried again later "
            "(mesh doctor lists it)",
            ev.rule,
            ev.target,
            name,
            self.retries,
            error,
            self.spool.path,
        )
        return False

    async def retry_spool(self) -> tuple[int, int]:
        """One more try of each spooled alert whose sink is still configured: (delivered, kept)."""
        if self.spool is None:
            return 0, 0
        entries, _ = await asyncio.to_thread(self.spool.read)
        if not entries:
            return 0, 0
        sends = self.targets()
        delivered: set[tuple[str, str, str, str, float]] = set()
        failed: dict[tuple[str, str, str, str, float], str] = {}
        for entry in entries:
            send = sends.get(entry.sink)
            if send is None:
                continue
            try:
                await asyncio.to_thread(send, entry.event)
            except Exception as exc:
                failed[entry.key] = _describe(exc)
                continue
            delivered.add(entry.key)
            log.info(
                "spooled alert %s on %s delivered to %s", entry.event.rule, entry.event.target, entry.sink
            )
        now = time.time()

        def change(entry: Undelivered) -> Undelivered | None:
            if entry.key in delivered:
                return None
            if entry.key in failed:
                return msgspec.structs.replace(
                    entry, attempts=entry.attempts + 1, last_at=now, error=failed[entry.key]
                )
            return entry

        await asyncio.to_thread(self.spool.update, change)
        kept = len(entries) - len(delivered)
        if failed:
            log.warning("%d spooled alert(s) still not delivered; kept in %s", kept, self.spool.path)
        return len(delivered), kept

    def _webhook(self, ev: Alert) -> None:
        url, body = webhook_request(self.webhook_url, self.webhook_format, ev)
        try:
            post_json(url, body, self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise OSError(f"webhook {url}: HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise OSError(f"webhook {url}: {exc.reason}") from exc

    def _email(self, ev: Alert) -> None:
        assert self.mail is not None
        send_mail(self.mail, alert_message(ev, self.mail.sender, self.mail.to))

    def _notify(self, ev: Alert) -> None:
        if not notify_send(ev, self.timeout_s) and not self._notify_missing_logged:
            log.info("alert_notify_send is on but notify-send is not installed")
            self._notify_missing_logged = True
