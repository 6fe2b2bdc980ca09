"""Who may do what on the NATS server: one user per role, permissions derived from `Names`.

The roles and what each may publish are the design's rules, enforced by the server
rather than trusted to the clients:

- only the CLI submits plans, cancels and retries (`<p>.cmd.>`);
- only the brain writes transitions, task and plan records, and queues work (`<p>.work.>`)
  and escalations (`<p>.esc.>`);
- a worker reports runs and streams the text of the tasks it runs, both under its own id
  only, and writes only its own registration, GPU state and GPU key; it
  takes work only from the queues of its classes, the per-model queues and its own queue,
  and can neither publish to nor read the gateway's subjects;
- a watchdog writes telemetry, thermal controls and alerts;
- the gateway consumes escalations and answers them (`<p>.evt.esc.>`), and can neither
  queue work nor send commands, nor create or delete anything on those streams.

JetStream is driven through subjects too, so every permission is a subject: publishing
into a stream is a publish on its subject (the acknowledgement comes back on the client's
inbox), a KV put is a publish on `$KV.<bucket>.<key>`, pulling from a consumer is a
publish on `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`, acknowledging one is a
publish on `$JS.ACK.<stream>.<consumer>.…`, and creating streams and consumers are
requests on `$JS.API.STREAM.CREATE.<stream>` and `$JS.API.CONSUMER.…CREATE.<stream>…`.

The server config holds users and passwords (there are no permission templates for users
defined in a config file, so each worker gets its own user with its names written out).
`render_permissions` writes one variable per user; `render_server_config` the users that
refer to them. `mesh init --secure DIR` writes both, and a config file per user.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.bus.resources import bucket_definitions, consumer_definitions
from mesh.errors import ConfigError
from mesh.events import TASK_CLASSES
from mesh.names import Names, check_token, inbox_prefix, kv_subject
from mesh.ops.embedded import server_config
from mesh.ops.serverconf import gateway_host_config
from mesh.settings import Settings

JS_API = "$JS.API"
# the most answers the gateway may send to one operator question's turn: its streamed chunks
ASK_RESPONSES = 100_000
ROLES = ("cli", "brain", "worker", "watchdog", "auditor", "exporter", "gateway", "web")
# roles that create and update streams, buckets and consumers; the others bind to them
MANAGERS = frozenset({"cli", "brain"})
# the workers of the rendering committed in nats/secure/ (docs/security.md's example host `rig`)
EXAMPLE_WORKERS = ("worker-rig-gpu0", "worker-rig-gpu1", "worker-rig-cpu1")
# a GPU worker's id as the worker makes it: `worker-<host>-gpu<N>`; its GPU is `<host>-gpu<N>`
# (a set of GPUs: `worker-<host>-gpu0_3`, its GPU `<host>-gpu0_3`)
_GPU_WORKER = re.compile(r"^worker-(?P<gpu>[A-Za-z0-9_-]+-gpu[0-9]+(?:_[0-9]+)*)$")


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _obj_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


# an object store's get subscribes to the object's chunks without naming the stream, so the
# client asks the server which stream holds that subject first (nats-py's `ObjectStore.get`)
STREAM_NAMES = "$JS.API.STREAM.NAMES"


def kv_put(bucket: str, key: str = ">") -> str:
    return kv_subject(bucket, key)


def objects_subject(bucket: str) -> str:
    return f"$O.{bucket}.>"


def api_stream(action: str, stream: str) -> str:
    return f"{JS_API}.STREAM.{action}.{stream}"


def msg_next(stream: str, consumer: str) -> str:
    return f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"


def ack(stream: str, consumer: str) -> str:
    return f"$JS.ACK.{stream}.{consumer}.>"


def consumer_create(stream: str, consumer: str, filter_subject: str) -> list[str]:
    """Creating (or updating) one named consumer with one filter: the filter is part of the
    subject, so the server refuses the same name with any other filter."""
    return [
        f"{JS_API}.CONSUMER.CREATE.{stream}.{consumer}.{filter_subject}",
        f"{JS_API}.CONSUMER.INFO.{stream}.{consumer}",
    ]


def consume(stream: str, consumer: str) -> list[str]:
    """Pull from a durable consumer and acknowledge what it delivers."""
    return [
        msg_next(stream, consumer),
        ack(stream, consumer),
        f"{JS_API}.CONSUMER.INFO.{stream}.{consumer}",
    ]


def read_stream(stream: str) -> list[str]:
    """Read a stream's messages: stream info, message gets, and ephemeral consumers.

    `CONSUMER.CREATE.<stream>` with no name creates ephemeral consumers only (the server
    refuses a durable name there). Their names are random, hence the wildcards; durables
    of the stream are denied separately (`protect`)."""
    return [
        api_stream("INFO", stream),
        api_stream("MSG.GET", stream),
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def manage_stream(stream: str) -> list[str]:
    """Create, update and use a stream and any consumer of it (never delete the stream)."""
    return [
        api_stream("CREATE", stream),
        api_stream("UPDATE", stream),
        *read_stream(stream),
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"$JS.ACK.{stream}.>",
    ]


def protect(stream: str, durables: Iterable[str]) -> list[str]:
    """Deny pulling from or deleting these durables through the ephemeral-reader wildcards."""
    out: list[str] = []
    for name in durables:
        out += [msg_next(stream, name), f"{JS_API}.CONSUMER.DELETE.{stream}.{name}"]
    return out


def in_domain(subjects: Iterable[str], domain: str) -> list[str]:
    """These subjects, and each JetStream API subject and KV write again as a client on a leaf
    node server sends it to the JetStream domain `domain`: `$JS.<domain>.API.…` for
    `$JS.API.…`, and `$JS.<domain>.API.$KV.…` for `$KV.…` (the server with that domain maps
    them back). A leaf link's user is checked against the subjects as they cross, so both
    forms are allowed, and denied, alike."""
    out = list(subjects)
    if not domain:
        return out
    check_token(domain, "JetStream domain")
    for subject in subjects:
        if subject.startswith(f"{JS_API}."):
            out.append(f"$JS.{domain}.API." + subject[len(JS_API) + 1 :])
        elif subject.startswith("$KV."):
            out.append(f"$JS.{domain}.API.{subject}")
    return out


def untouchable(stream: str) -> list[str]:
    """Every JetStream API call on a stream and its consumers."""
    return [
        f"{JS_API}.STREAM.*.{stream}",
        f"{JS_API}.STREAM.*.*.{stream}",
        f"{JS_API}.CONSUMER.*.{stream}",
        f"{JS_API}.CONSUMER.*.{stream}.>",
        f"{JS_API}.CONSUMER.*.*.{stream}.>",
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


# ------------------------------------------------------------------ users


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    # answers it may send to whoever asked it (NATS `allow_responses`): (most per request, for how long)
    responses: tuple[int, str] | None = None

    def as_conf(self) -> dict[str, dict[str, list[str]]]:
        pub: dict[str, list[str]] = {"allow": list(self.publish)}
        if self.publish_deny:
            pub["deny"] = list(self.publish_deny)
        sub: dict[str, list[str]] = {"allow": list(self.subscribe)}
        if self.subscribe_deny:
            sub["deny"] = list(self.subscribe_deny)
        return {"publish": pub, "subscribe": sub}


@dataclass(frozen=True)
class User:
    name: str
    role: str
    permissions: Permissions
    # a worker's user is bound to one agent id (the only one whose facts it may publish)
    agent_id: str = ""


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Grants:
    """The names one mesh's permissions are written in."""

    settings: Settings
    # the JetStream domain of the rig's server, which the gateway reaches over a leaf link
    domain: str = ""
    n: Names = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", self.settings.names)

    @property
    def p(self) -> str:
        return self.n.prefix

    @property
    def streams(self) -> list[str]:
        n = self.n
        return [n.events_stream, n.work_stream, n.cmd_stream, n.esc_stream, n.history_stream]

    @property
    def buckets(self) -> list[str]:
        return [d["bucket"] for d in bucket_definitions(self.settings)]

    def durables(self, stream: str) -> list[str]:
        """The durable consumers of a stream that readers of its history must leave alone."""
        named = [
            c["config"]["durable_name"] for c in consumer_definitions(self.settings) if c["stream"] == stream
        ]
        if stream == self.n.esc_stream:
            named.append(self.n.gateway_consumer)
        return named

    def read_kv(self, *buckets: str) -> list[str]:
        out: list[str] = []
        for b in buckets:
            out += read_stream(_kv_stream(b))
        return out

    def read_objects(self) -> list[str]:
        return [*read_stream(_obj_stream(self.n.objects_bucket)), STREAM_NAMES]

    def read_models(self) -> list[str]:
        """Read the model files `mesh models push` stored (only the CLI writes them)."""
        return [*read_stream(_obj_stream(self.n.models_bucket)), STREAM_NAMES]

    def inbox(self, user: str) -> str:
        return f"{inbox_prefix(user)}.>"

    def agent_events(self) -> list[str]:
        """An agent's own started/stopped events (offline is the brain's to say)."""
        return [self.n.agent_events_each]

    @property
    def offline_deny(self) -> str:
        return self.n.agent_event("*", "offline")

    @property
    def models(self) -> list[str]:
        return sorted(name for name, spec in self.settings.model_registry().items() if spec.kind == "llm")

    def manage_everything(self) -> list[str]:
        """Create, update and delete every stream, bucket and the object store (brain, cli)."""
        out: list[str] = []
        for stream in self.streams:
            out += manage_stream(stream)
        for bucket in self.buckets:
            out += manage_stream(_kv_stream(bucket))
        out += manage_stream(_obj_stream(self.n.objects_bucket))
        out += manage_stream(_obj_stream(self.n.models_bucket))
        out.append(STREAM_NAMES)
        return out

    # ---------------------------------------------------------------- roles
    def brain(self) -> Permissions:
        n = self.n
        pub = [
            n.plan_events_all,
            n.task_events_all,
            n.agent_events_all,
            n.gpu_requests_all,
            n.dead_all,
            n.work_all,
            n.esc_all,
            *(kv_put(b) for b in (n.tasks_bucket, n.plans_bucket, n.brain_bucket, n.agents_bucket)),
            # an archived plan's objects are deleted (`mesh.bus.retention`): a delete marker, and
            # the object's chunks purged
            objects_subject(n.objects_bucket),
            api_stream("PURGE", _obj_stream(n.objects_bucket)),
            # the work items every consumer acknowledged are purged in bulk, read from the work
            # consumers' ack floors, and a stale or long-done item deleted (`mesh.bus.workstream`)
            api_stream("PURGE", n.work_stream),
            api_stream("MSG.DELETE", n.work_stream),
            f"{JS_API}.CONSUMER.LIST.{n.work_stream}",
            # what an earlier brain fetched and never acknowledged is delivered again at once
            # (`Brain._take_back_inputs`)
            f"{JS_API}.CONSUMER.RESET.{n.cmd_stream}.{n.brain_cmd_consumer}",
            f"{JS_API}.CONSUMER.RESET.{n.events_stream}.{n.brain_runs_consumer}",
            f"{JS_API}.CONSUMER.RESET.{n.events_stream}.{n.brain_esc_consumer}",
        ]
        pub += self.manage_everything()
        return Permissions(
            publish=_unique(pub),
            subscribe=(self.inbox("brain"),),
            # only the CLI submits plans; the brain never speaks for the gateway
            publish_deny=(n.cmd_all, n.esc_events_all),
        )

    def cli(self) -> Permissions:
        n = self.n
        pub = [
            n.cmd_all,
            self.n.gpu_controls_all,
            kv_put(n.gpu_control_bucket, "*.operator"),
            # a power cap (`mesh gpu power`): asked for here, set by the host's watchdog
            self.n.gpu_power_all,
            kv_put(n.gpu_control_bucket, f"*.{n.POWER_KEY}"),
            objects_subject(n.objects_bucket),
            # operator questions (`mesh ask`), answered by the gateway on this user's inbox
            n.ask("cli"),
            # model files (`mesh models push`); a push over an older file purges the old chunks
            objects_subject(n.models_bucket),
            api_stream("PURGE", _obj_stream(n.models_bucket)),
        ]
        pub += self.manage_everything()
        return Permissions(
            publish=_unique(pub),
            # and the answers being generated (`mesh tail PLAN`, `mesh submit --wait`)
            subscribe=(self.inbox("cli"), n.text_all),
            # an operator asks the brain; it does not queue work or write its records
            publish_deny=(
                n.work_all,
                n.esc_all,
                n.task_events_all,
                n.plan_events_all,
                n.runs_all,
                kv_put(n.tasks_bucket),
                kv_put(n.plans_bucket),
                kv_put(n.brain_bucket),
            ),
        )

    def worker(self, agent_id: str) -> Permissions:
        n = self.n
        check_token(agent_id, "worker id")
        match = _GPU_WORKER.match(agent_id)
        # a GPU worker files its GPU under `<host>-gpu<N>`; a CPU worker under its own id
        gpu = match.group("gpu") if match else agent_id
        work = n.work_stream
        pub = [
            n.runs_by(agent_id),
            # the answer of a task it runs, as it is generated (core NATS), under its own id too
            n.text_by(agent_id),
            n.agent_event(agent_id, "*"),
            n.dead_letter(agent_id),
            n.gpu_event(gpu, "state"),
            kv_put(n.agents_bucket, agent_id),
            kv_put(n.gpus_bucket, gpu),
            objects_subject(n.objects_bucket),
        ]
        for cls in TASK_CLASSES:
            if cls != "llm":
                pub += consume(work, n.workers_consumer(cls))
        for model in self.models:
            pub += consume(work, n.llm_consumer(model))
            pub += consumer_create(work, n.llm_consumer(model), n.work_llm(model))
        pub += consume(work, n.own_consumer(agent_id))
        pub += consumer_create(work, n.own_consumer(agent_id), n.work_to(agent_id))
        pub.append(api_stream("INFO", work))
        for s in (n.events_stream, n.cmd_stream, n.history_stream):
            pub.append(api_stream("INFO", s))
        # a dependency's last report: the outputs a task takes, the artifacts it fetches
        pub.append(api_stream("MSG.GET", n.events_stream))
        pub += self.read_kv(n.tasks_bucket, n.agents_bucket, n.gpu_control_bucket, n.gpus_bucket)
        for b in self.buckets:
            pub.append(api_stream("INFO", _kv_stream(b)))
        pub += self.read_objects()
        # model files it lacks: read, never written
        pub += self.read_models()
        return Permissions(
            publish=_unique(pub),
            subscribe=(self.inbox(agent_id), n.task_cancelled_all),
            publish_deny=(
                n.cmd_all,
                n.work_all,
                n.esc_all,
                n.esc_events_all,
                self.offline_deny,
                kv_put(self.gateway_bucket),
                *untouchable(n.esc_stream),
                *untouchable(_kv_stream(self.gateway_bucket)),
            ),
            subscribe_deny=(n.esc_all, n.esc_events_all, kv_put(self.gateway_bucket)),
        )

    def watchdog(self) -> Permissions:
        n = self.n
        pub = [
            n.telemetry_all,
            kv_put(n.telemetry_bucket),
            # its samples averaged per tier, into the history stream
            n.history_all,
            kv_put(n.gpu_control_bucket, "*.thermal"),
            self.n.gpu_controls_all,
            # the power caps it sets, and its answers to `mesh gpu power` (it reads, never writes,
            # the operator's `<gpu>.power` key)
            self.n.gpu_power_all,
            n.alerts_all,
            *self.agent_events(),
            kv_put(n.agents_bucket, "*"),
            n.dead_letter("*"),
        ]
        reads, keep_off = self._observer()
        return Permissions(
            publish=_unique(pub + reads),
            subscribe=(self.inbox("watchdog"), n.agent_stopped_all),
            publish_deny=_unique([n.cmd_all, n.work_all, n.esc_all, self.offline_deny, *keep_off]),
        )

    def auditor(self) -> Permissions:
        n = self.n
        pub = [
            n.dead_letter("*"),
            *self.agent_events(),
            kv_put(n.agents_bucket, "*"),
            *consume(n.events_stream, n.auditor_consumer),
        ]
        reads, keep_off = self._observer()
        # (its own consumer is pulled through `consume`, not the readers' wildcard)
        keep_off = [d for d in keep_off if not d.endswith(f".{n.auditor_consumer}")]
        keep_off.append(f"{JS_API}.CONSUMER.DELETE.{n.events_stream}.{n.auditor_consumer}")
        return Permissions(
            publish=_unique(pub + reads),
            subscribe=(self.inbox("auditor"),),
            publish_deny=_unique([n.cmd_all, n.work_all, n.esc_all, self.offline_deny, *keep_off]),
        )

    def exporter(self) -> Permissions:
        n = self.n
        pub = [*self.agent_events(), kv_put(n.agents_bucket, "*"), n.dead_letter("*")]
        reads, keep_off = self._observer()
        return Permissions(
            publish=_unique(pub + reads),
            subscribe=(self.inbox("exporter"),),
            publish_deny=_unique([n.cmd_all, n.work_all, n.esc_all, self.offline_deny, *keep_off]),
        )

    def web(self) -> Permissions:
        """The web console: reads what an observer reads; acts only as an operator may through it
        (submit, cancel and retry plans; pause, resume and cordon GPUs; ask the operator, whose
        answers come to its inbox). It shows no LLM task's streamed text, so it may not subscribe
        to it."""
        n = self.n
        pub = [
            *self.agent_events(),
            kv_put(n.agents_bucket, "*"),
            n.dead_letter("*"),
            # submit, cancel and retry (each by name: a command added later is not the console's)
            *n.plan_commands,
            n.gpu_controls_all,
            kv_put(n.gpu_control_bucket, "*.operator"),
            # a plan too big for one message goes to the object store (`client.submit`)
            objects_subject(n.objects_bucket),
            api_stream("INFO", n.cmd_stream),
            # the chat's questions to the operator (`mesh ask`), answered by the gateway on its inbox
            n.ask("web"),
        ]
        reads, keep_off = self._observer()
        return Permissions(
            publish=_unique(pub + reads),
            subscribe=(self.inbox("web"),),
            publish_deny=_unique([n.work_all, n.esc_all, self.offline_deny, *keep_off]),
        )

    def gateway(self) -> Permissions:
        n = self.n
        esc = n.esc_stream
        own = _kv_stream(self.gateway_bucket)
        pub = [
            n.esc_events_all,
            *self.agent_events(),
            n.alerts_all,
            kv_put(n.agents_bucket, "*"),
            kv_put(self.gateway_bucket),
            n.dead_letter("*"),
            # its own bucket, and its consumer of the escalation stream
            *manage_stream(own),
            api_stream("INFO", esc),
            *consume(esc, n.gateway_consumer),
            *consumer_create(esc, n.gateway_consumer, n.esc_all),
            f"{JS_API}.CONSUMER.DURABLE.CREATE.{esc}.{n.gateway_consumer}",
        ]
        reads, keep_off = self._observer()
        pub += reads
        deny = [n.work_all, n.cmd_all, n.esc_all, self.offline_deny, *keep_off]
        for s in (n.work_stream, n.cmd_stream):
            deny += untouchable(s)
        # over a leaf node link its JetStream calls and KV writes arrive under the domain
        return Permissions(
            publish=_unique(in_domain(pub, self.domain)),
            # and operator questions (`mesh ask`), whose answers stream to the asker's inbox
            subscribe=(self.inbox("gateway"), n.ask_all),
            publish_deny=_unique(in_domain(deny, self.domain)),
            responses=(ASK_RESPONSES, "15m"),
        )

    def _observer(self) -> tuple[list[str], list[str]]:
        """Read-only: every bucket, the history, big payloads, and the streams' info; and the
        durables of the event stream that reading its history must not touch."""
        n = self.n
        allow = [api_stream("INFO", s) for s in self.streams]
        allow += read_stream(n.events_stream)
        allow += read_stream(n.history_stream)
        allow += self.read_kv(*self.buckets)
        allow += self.read_objects()
        allow += self.read_models()
        return allow, protect(n.events_stream, self.durables(n.events_stream))

    @property
    def gateway_bucket(self) -> str:
        return self.n.gateway_bucket


# ------------------------------------------------------------------ users and files


def users(settings: Settings, workers: Iterable[str], domain: str = "") -> list[User]:
    """One user per role, and one per worker (named by the worker's agent id). With `domain`
    the gateway's user may also reach the JetStream of that domain from a leaf node server."""
    g = Grants(settings, domain)
    out = [
        User("cli", "cli", g.cli()),
        User("brain", "brain", g.brain()),
        User("watchdog", "watchdog", g.watchdog()),
        User("auditor", "auditor", g.auditor()),
        User("exporter", "exporter", g.exporter()),
        User("gateway", "gateway", g.gateway()),
        User("web", "web", g.web()),
    ]
    seen = {u.name for u in out}
    for wid in workers:
        check_token(wid, "worker id")
        if wid in seen:
            raise ConfigError(
                f"worker id {wid!r} is given twice or names a role; give each worker its own id"
            )
        seen.add(wid)
        out.append(User(wid, "worker", g.worker(wid), agent_id=wid))
    return out


def _variable(user: str) -> str:
    return "PERMS_" + re.sub(r"[^A-Za-z0-9]", "_", user).upper()


def _q(value: str) -> str:
    return json.dumps(value)


def _conf_list(items: Iterable[str], indent: str) -> str:
    inner = "".join(f"{indent}  {_q(i)}\n" for i in items)
    return f"[\n{inner}{indent}]"


def render_permissions(settings: Settings, workers: Iterable[str], domain: str = "") -> str:
    """One `PERMS_<USER>` variable per user, for `server.conf` to refer to."""
    lines = [
        "# Subject permissions of each mesh user, rendered from mesh/ops/security.py.",
        "# `mesh init --secure DIR` writes this file beside the server.conf that includes it.",
        "",
    ]
    variables: dict[str, str] = {}
    for user in users(settings, workers, domain):
        var = _variable(user.name)
        if var in variables:
            raise ConfigError(
                f"worker ids {variables[var]!r} and {user.name!r} differ only in punctuation; rename one"
            )
        variables[var] = user.name
        perms = user.permissions.as_conf()
        lines.append(f"# {user.role}" + (f" {user.name}" if user.role == "worker" else ""))
        lines.append(f"{var} = {{")
        for direction in ("publish", "subscribe"):
            lines.append(f"  {direction} = {{")
            for kind, items in perms[direction].items():
                lines.append(f"    {kind} = {_conf_list(items, '    ')}")
            lines.append("  }")
        if user.permissions.responses is not None:
            most, expires = user.permissions.responses
            lines.append(f"  allow_responses = {{ max: {most}, expires: {_q(expires)} }}")
        lines.append("}")
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class Tls:
    """Server certificate and key; a CA file makes the server also ask clients for certificates."""

    cert: str
    key: str
    ca: str = ""
    verify_clients: bool = False


def render_server_config(
    settings: Settings,
    passwords: dict[str, str],
    *,
    port: int = 4222,
    store_dir: str = "/var/lib/mesh/jetstream",
    listen_host: str = "0.0.0.0",
    tls: Tls | None = None,
    name: str = "mesh",
    leaf_port: int = 0,
    domain: str = "",
) -> str:
    """A server config with JetStream, a user per role (passwords given), and TLS if asked.

    With `leaf_port` it also accepts leaf node connections there (docs/multihost.md): a
    leaf server authenticates as one of the users, and only what that user may publish and
    subscribe to crosses the link. With `domain` its JetStream has that domain name, which
    clients on the leaf side name to reach it (`jetstream_domain`)."""
    base = server_config(
        port, store_dir, settings.max_payload_bytes, name=name, domain=domain, durability=settings.durability
    ).replace(f"listen: 127.0.0.1:{port}", f"listen: {listen_host}:{port}")
    lines = [
        "# A mesh nats-server with one user per role (rendered by `mesh init --secure`).",
        "# It holds the passwords: keep it readable by the server's user alone.",
        base.rstrip("\n"),
        'include "permissions.conf"',
    ]
    if tls is not None:
        lines.append("tls {")
        lines.append(f"  cert_file: {_q(tls.cert)}")
        lines.append(f"  key_file: {_q(tls.key)}")
        if tls.ca:
            lines.append(f"  ca_file: {_q(tls.ca)}")
        if tls.verify_clients:
            lines.append("  verify: true")
        lines.append("  timeout: 5")
        lines.append("}")
    if leaf_port:
        lines.append("leafnodes {")
        lines.append(f"  listen: {listen_host}:{leaf_port}")
        lines.append("}")
    lines.append("authorization {")
    lines.append("  users = [")
    for user, password in passwords.items():
        lines.append(f"    {{ user: {_q(user)}, password: {_q(password)}, permissions: ${_variable(user)} }}")
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def new_password() -> str:
    return secrets.token_urlsafe(32)


def web_tokens() -> dict[str, str]:
    """The web console's tokens (docs/console.md): one that acts, one that only looks."""
    return {
        "web_token": new_password(),
        "web_read_token": new_password(),
    }


def client_config(
    user: User,
    password: str,
    server_url: str,
    *,
    prefix: str,
    tls_ca: str = "",
    manage: bool,
    domain: str = "",
    extra: dict[str, str] | None = None,
) -> str:
    """The TOML settings one agent (or the CLI) connects with (and `extra` settings of its own)."""
    lines = [
        f"# mesh settings for the {user.role} user {user.name!r} (written by `mesh init --secure`).",
        "# Point the agent at it: MESH_CONFIG=THIS_FILE or --config THIS_FILE.",
        f"server_url = {_q(server_url)}",
        f"prefix = {_q(prefix)}",
        f"nats_user = {_q(user.name)}",
        f"nats_password = {_q(password)}",
    ]
    if tls_ca:
        lines.append(f"nats_tls_ca = {_q(tls_ca)}")
    if domain:
        lines.append("# the rig's JetStream, reached through the leaf node server this host runs")
        lines.append(f"jetstream_domain = {_q(domain)}")
    if user.agent_id:
        lines.append("# the server lets this user publish only as this agent")
        lines.append(f"agent_id = {_q(user.agent_id)}")
    if not manage:
        lines.append("# this user may not create streams, buckets or consumers: bind to existing ones")
        lines.append("manage_resources = false")
    for name, value in (extra or {}).items():
        lines.append(f"{name} = {_q(value)}")
    return "\n".join(lines) + "\n"


def _write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read, never readable by others even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(path, 0o600)


def write_secure(
    settings: Settings,
    directory: str | os.PathLike[str],
    *,
    workers: Iterable[str],
    server_url: str,
    port: int = 4222,
    store_dir: str = "/var/lib/mesh/jetstream",
    listen_host: str = "0.0.0.0",
    tls: Tls | None = None,
    client_ca: str = "",
    leaf_port: int = 0,
    domain: str = "",
    leaf_host_port: int = 4222,
) -> list[Path]:
    """`mesh init --secure DIR`: server.conf, permissions.conf and `<user>.toml` for each user.

    With `leaf_port` and `domain` (docs/multihost.md, the air-gapped rig): the server accepts
    leaf node links and its JetStream is named `domain`; `gateway.toml` is for the gateway
    host, whose gateway connects to its own leaf server on loopback port `leaf_host_port`,
    whose config `gateway-host.conf` is written too."""
    if domain and not leaf_port:
        raise ConfigError("a JetStream domain is for a leaf node link: give the leaf port too")
    if domain:
        check_token(domain, "JetStream domain")
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    workers = list(workers)
    all_users = users(settings, workers, domain)
    passwords = {u.name: new_password() for u in all_users}
    written = []
    perms = base / "permissions.conf"
    perms.write_text(render_permissions(settings, workers, domain), encoding="utf-8")
    written.append(perms)
    server = base / "server.conf"
    _write_secret(
        server,
        render_server_config(
            settings,
            passwords,
            port=port,
            store_dir=store_dir,
            listen_host=listen_host,
            tls=tls,
            leaf_port=leaf_port,
            domain=domain,
        ),
    )
    written.append(server)
    for user in all_users:
        path = base / f"{user.name}.toml"
        # behind a leaf link the gateway speaks to its own host's server, without TLS on loopback
        behind_leaf = bool(domain) and user.role == "gateway"
        _write_secret(
            path,
            client_config(
                user,
                passwords[user.name],
                f"nats://127.0.0.1:{leaf_host_port}" if behind_leaf else server_url,
                prefix=settings.prefix,
                tls_ca="" if behind_leaf else client_ca,
                manage=user.role in MANAGERS,
                domain=domain if behind_leaf else "",
                extra=web_tokens() if user.role == "web" else None,
            ),
        )
        written.append(path)
    if domain:
        host_conf = base / "gateway-host.conf"
        host_conf.write_text(gateway_host_config(leaf_host_port), encoding="utf-8")
        written.append(host_conf)
    return written
