"""Where alerts go besides the event stream: the log, a webhook (JSON, Slack, Discord, ntfy)
and desktop notifications through notify-send. The rules that raise them are mesh.alerts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal

import msgspec

from mesh.events import AlertRaised, AlertResolved

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
    subprocess.run(
        [exe, "-u", urgency, "-a", "mesh", f"mesh: {ev.rule} on {ev.target}", ev.message],
        timeout=timeout_s,
        check=False,
        capture_output=True,
    )
    return True


class Sinks:
    """Where alerts go besides the event stream: the log always, a webhook and notify-send if
    configured. Delivery runs in threads; a failure is logged and never reaches the caller."""

    def __init__(
        self,
        webhook_url: str = "",
        webhook_format: str = "json",
        timeout_s: float = 5.0,
        use_notify_send: bool = False,
    ) -> None:
        self.webhook_url = webhook_url
        self.webhook_format = webhook_format
        self.timeout_s = timeout_s
        self.use_notify_send = use_notify_send
        self._notify_missing_logged = False

    async def deliver(self, ev: AlertRaised | AlertResolved) -> None:
        match ev:
            case AlertResolved():
                level = logging.INFO
            case AlertRaised(severity="critical"):
                level = logging.ERROR
            case AlertRaised():
                level = logging.WARNING
        log.log(level, "alert: %s", ev.message)
        jobs = []
        if self.webhook_url:
            jobs.append(asyncio.to_thread(self._webhook, ev))
        if self.use_notify_send:
            jobs.append(asyncio.to_thread(self._notify, ev))
        if jobs:
            await asyncio.gather(*jobs)

    def _webhook(self, ev: AlertRaised | AlertResolved) -> None:
        try:
            url, body = webhook_request(self.webhook_url, self.webhook_format, ev)
            post_json(url, body, self.timeout_s)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log.warning("alert webhook %s failed: %s", self.webhook_url, exc)
        except Exception as exc:
            log.warning("alert webhook %s failed unexpectedly: %r", self.webhook_url, exc)

    def _notify(self, ev: AlertRaised | AlertResolved) -> None:
        try:
            if not notify_send(ev, self.timeout_s) and not self._notify_missing_logged:
                log.info("alert_notify_send is on but notify-send is not installed")
                self._notify_missing_logged = True
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("notify-send failed: %s", exc)
