"""The server's permission refusals read as data: what was refused, to which user and role, and what to do.
The text of a `-ERR 'Permissions Violation ...'` in, a `Violation` and a message for a person out.

nats-server refuses a publish or a subscription it does not permit with an asynchronous error on
the connection, never an answer to the request: a client waiting for the answer waits until its
timeout. `mesh.bus.refusals` matches the violation to what is waiting (by subject) and fails it
at once with `refusal_message`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.names import KV_SUBJECTS, Names

# nats-server: `Permissions Violation for Publish to "S"`, `... for Publish with Reply of "R" to "S"`,
# `... for Subscription to "S"` (and `using queue "Q"`); nats-py hands it on lowercased
_VIOLATION = re.compile(
    r'permissions violation for (publish|subscription)(?: with reply of "[^"]*")? to "([^"]+)"',
    re.IGNORECASE,
)

# the roles whose user is named after the role (`mesh init --secure`); a worker's user is its agent id
NAMED_ROLES = ("cli", "brain", "watchdog", "auditor", "exporter", "gateway", "web")


@dataclass(frozen=True)
class Violation:
    """One refusal: `publish` or `subscribe`, and the subject (lowercased, as the client reads it)."""

    kind: str
    subject: str


def parse_violation(text: str) -> Violation | None:
    """The violation an error's text reports, or None when it reports none."""
    m = _VIOLATION.search(text)
    if m is None:
        return None
    kind = "publish" if m.group(1).lower() == "publish" else "subscribe"
    return Violation(kind, m.group(2).lower())


def role_of(user: str) -> str:
    """The role of a NATS user `mesh init --secure` made: its name, or `worker` for a worker's id."""
    if not user:
        return ""
    return user if user in NAMED_ROLES else "worker"


def operation(names: Names, subject: str, kind: str = "publish") -> str:
    """What a person was doing when the server refused `kind` on `subject`, in words."""
    s = subject.lower()
    cmd = names.cmd_all[:-1].lower()  # `<p>.cmd.`
    if kind == "subscribe":
        return f"subscribe to {subject}"
    if s == names.submit.lower():
        return "submit a plan"
    if s.startswith(cmd):
        verb = s[len(cmd) :].split(".", 1)[0]
        return f"{verb} a plan" if verb in ("cancel", "retry") else f"send the command {subject}"
    if s.startswith(names.work_prefix.lower()):
        return "queue work"
    if s.startswith(names.evt_prefix.lower()):
        return "publish an event"
    if KV_SUBJECTS.lower() in s:
        bucket = s.split(KV_SUBJECTS.lower(), 1)[1].split(".", 1)[0]
        return f"write to the {bucket} bucket"
    if ".api." in s:
        return "call the JetStream API"
    return f"publish to {subject}"


def refusal_message(names: Names, user: str, violation: Violation) -> str:
    """What was refused, for whom, and what to do: a MeshError's text."""
    role = role_of(user)
    who = f"user {user!r} (role {role})" if user else "this connection (no NATS user)"
    what = operation(names, violation.subject, violation.kind)
    verb = "publish to" if violation.kind == "publish" else "subscribe to"
    head = (
        f"the NATS server refused {who} permission to {what} "
        f"(it may not {verb} {violation.subject!r}), so nothing was done"
    )
    if what in ("submit a plan", "cancel a plan", "retry a plan") and role != "cli":
        todo = (
            "`mesh submit`, `cancel` and `retry` take the cli user's credentials: run them with the "
            "config `mesh init --secure` wrote for it (`mesh --config DIR/cli.toml ...` or "
            "MESH_CONFIG=DIR/cli.toml)"
        )
    else:
        todo = (
            f"use the credentials of a role that may (docs/security.md#the-roles lists what each "
            f"may do); if the {role or 'open'} role should be allowed to, its permissions come from "
            "mesh/ops/security.py: run `mesh init --secure` again and restart the server"
        )
    return f"{head}. {todo}."
