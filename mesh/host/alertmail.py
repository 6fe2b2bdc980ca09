"""The e-mail alert sink: an alert as a plain-text message, sent over SMTP with STARTTLS
(or implicit TLS, or none on a trusted local relay), from a thread.

The standard library's smtplib, not an asyncio client: the other sinks already run in threads,
an alert is one short message now and then, and it adds no dependency to the watchdog.
"""

from __future__ import annotations

import datetime
import email.message
import email.utils
import smtplib
import ssl
from dataclasses import dataclass

from mesh.events import AlertRaised, AlertResolved


@dataclass(frozen=True)
class MailConfig:
    host: str
    port: int = 587
    security: str = "starttls"  # "starttls", "ssl" or "none"
    to: tuple[str, ...] = ()
    sender: str = ""
    user: str = ""
    password: str = ""
    ca_file: str = ""
    timeout_s: float = 10.0


def split_addresses(text: str) -> tuple[str, ...]:
    """`a@x, b@y` -> ("a@x", "b@y")."""
    return tuple(a.strip() for a in text.split(",") if a.strip())


def alert_message(
    ev: AlertRaised | AlertResolved, sender: str, to: tuple[str, ...]
) -> email.message.EmailMessage:
    """The alert as an e-mail: the subject says what and where, the body the details."""
    match ev:
        case AlertRaised():
            state = f"{ev.severity.upper()} raised"
        case AlertResolved():
            state = "resolved"
    msg = email.message.EmailMessage()
    msg["Subject"] = f"mesh: {ev.rule} {state} on {ev.target}"
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = email.utils.formatdate(ev.at, localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain="mesh.alert")
    when = datetime.datetime.fromtimestamp(ev.at, tz=datetime.UTC).isoformat(timespec="seconds")
    lines = [
        ev.message,
        "",
        f"rule:      {ev.rule}",
        f"target:    {ev.target}",
        f"host:      {ev.host}",
        f"severity:  {ev.severity}",
        f"metric:    {ev.metric} = {ev.value:g} (threshold {ev.threshold:g})",
        f"at:        {when}",
    ]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def tls_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def send_mail(config: MailConfig, msg: email.message.EmailMessage) -> None:
    """Send one message (blocking; raises smtplib.SMTPException or OSError on failure). With
    STARTTLS, a server that does not offer it is an error: credentials never go in the clear."""
    smtp: smtplib.SMTP
    if config.security == "ssl":
        smtp = smtplib.SMTP_SSL(
            config.host, config.port, timeout=config.timeout_s, context=tls_context(config.ca_file)
        )
    else:
        smtp = smtplib.SMTP(config.host, config.port, timeout=config.timeout_s)
    with smtp:
        smtp.ehlo()
        if config.security == "starttls":
            smtp.starttls(context=tls_context(config.ca_file))
            smtp.ehlo()
        if config.user:
            smtp.login(config.user, config.password)
        smtp.send_message(msg)
