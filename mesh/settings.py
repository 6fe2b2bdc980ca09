"""Settings: defaults, then a TOML config file, then `MESH_*` environment variables.
The struct, its defaults and checks, built from plain data; mesh.host.config reads the file.

The server URL is resolved in this order: `--server`, `MESH_NATS_URL`, the
config file's `server_url`, then the embedded default (`mesh up`'s server on
127.0.0.1 at `embedded_port`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from mesh.errors import ConfigError
from mesh.health import HealthCheck
from mesh.models import DEFAULT_MODELS, ModelSpec, builtin_models, check_registry
from mesh.names import Names
from mesh.power import PowerCaps, PowerError, parse_caps

ENV_PREFIX = "MESH_"
ENV_URL = "MESH_NATS_URL"
ENV_CONFIG = "MESH_CONFIG"


class Price(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a model costs, in USD per million tokens."""

    input: float
    output: float


# Anthropic's list prices (USD per million tokens); `[gateway_prices.MODEL]` adds or overrides
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-4-1": Price(input=15.0, output=75.0),
    "claude-opus-4-5": Price(input=5.0, output=25.0),
    "claude-sonnet-4": Price(input=3.0, output=15.0),
    "claude-sonnet-4-5": Price(input=3.0, output=15.0),
    "claude-haiku-4-5": Price(input=1.0, output=5.0),
    "claude-3-5-haiku-latest": Price(input=0.8, output=4.0),
}
ENV_ANTHROPIC_KEY = "ANTHROPIC_API_KEY"
# the settings that are secrets; a task's process does not inherit them from its worker's
# environment (`mesh.host.executors.task_env`)
SECRET_FIELDS = ("nats_password", "alert_smtp_password", "gateway_api_key", "web_token", "web_read_token")
SECRET_ENV = frozenset({ENV_ANTHROPIC_KEY, *(ENV_PREFIX + f.upper() for f in SECRET_FIELDS)})


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server_url: str = ""
    prefix: str = "mesh"
    # '' only in a struct built by hand: settings_from puts in its caller's default
    # ($XDG_DATA_HOME/mesh, or ~/.local/share/mesh: mesh.host.config.default_data_dir)
    data_dir: str = ""
    embedded_port: int = 4222

    # work delivery
    ack_wait_s: float = 30.0
    heartbeat_every_s: float = 0.0  # 0: a third of ack_wait_s
    fetch_timeout_s: float = 1.0
    # a first delivery's `run.started` waits this long: a task done sooner reports its start
    # with its end, one report and one brain commit instead of two (0: report at once)
    start_report_after_s: float = 0.1
    # a work item delivered more often than this (each time its worker died) is dead-lettered
    max_deliveries: int = 5

    # brain policy
    # the most work items of one class ready or running at once (no-op tasks, always packed,
    # count pack_size to one); the rest wait in the brain's priority queue
    release_window: int = 256
    # how many dependents, one after another, a shell task's worker may start as soon as the
    # task before succeeds, without the brain's round trip (0: each is queued by the brain)
    continue_depth: int = 8
    # how many short tasks of one class the brain packs into one work item, run one after another
    # by the worker that takes it (1: an item each), and how short a shell task's runs must be
    # (the learned median of its kind, seconds) for it to be packed; no-op tasks always are
    pack_size: int = 16
    pack_below_s: float = 0.02
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    aging_s: float = 60.0
    tick_s: float = 0.5
    sweep_s: float = 2.0
    checkpoint_s: float = 1.0
    # the brain writes a snapshot of its records (read on restart instead of one KV value per
    # task) once it knows this many tasks, and after this many record writes since the last
    snapshot_min_tasks: int = 20_000
    snapshot_writes: int = 50_000
    # a running plan's record (its counts) is written at most this often; at its end at once
    plan_record_s: float = 0.5
    # how often the brain purges the work items every consumer has acknowledged (in bulk)
    work_purge_s: float = 1.0
    # a done task's item an older unacknowledged one keeps from the purge is deleted alone after
    work_stuck_s: float = 60.0
    # the active brain holds a lease this long and renews it every third of it
    lease_s: float = 6.0

    # agents
    agent_ttl_s: float = 15.0
    agent_refresh_s: float = 5.0

    # plans (`mesh check`, `mesh submit`, `mesh up --submit`): how much one plan may ask of the
    # parser (mesh.plan.PlanLimits): foreach items in all, tasks, bytes of the text and of the parsed
    # plan, and whether a foreach glob may name files outside the plan's directory
    plan_max_expansions: int = 10_000
    plan_max_tasks: int = 100_000
    plan_max_bytes: int = 32 * 1024 * 1024
    plan_glob_outside: bool = False

    # worker
    slots: int = 1
    output_tail_bytes: int = 4096
    kill_grace_s: float = 5.0
    shell: str = "/bin/bash"

    # models and GPUs: [models.NAME] tables add to (or replace) the built-in registry
    models: dict[str, ModelSpec] = msgspec.field(default_factory=dict)
    default_models: dict[str, str] = msgspec.field(default_factory=dict)
    # tasks one GPU runs at once, per kind of work
    llm_slots: int = 1
    # with llm_slots above 1 and the model in process, LLM tasks taken beyond llm_slots: they
    # wait in the decoder's queue, so a sequence that ends is refilled at its next step
    llm_queue_ahead: int = 2
    script_slots: int = 1
    # one-text embed tasks of one model fetched together run as one encode call of at most
    # embed_batch_max tasks (1: each alone); after an embed item the script lane waits up to
    # embed_batch_wait_s for more to join it. A batch is one run of the script lane's slots
    embed_batch_max: int = 128
    embed_batch_wait_s: float = 0.05
    # a loaded LLM nobody used for this long is unloaded when no other work wants its GPU, but
    # a model's last GPU stays loaded (keep_warm = false: that one too); an LLM that still has
    # work is never unloaded for other work before it has been loaded min_residency_s
    keep_alive_s: float = 600.0
    keep_warm: bool = True
    min_residency_s: float = 300.0
    # a load the brain asked for and never saw finish is asked again after this long
    load_timeout_s: float = 900.0
    # an LLM with no work waiting hands its GPU to other waiting work once unused
    # placement_yield_factor times its load time (at least yield_after_s)
    yield_after_s: float = 10.0
    # a measured figure (a model's load time and VRAM, a task's duration) replaces the configured
    # one once this many samples were seen; the median of the last learn_window is used
    learn_min_samples: int = 3
    learn_window: int = 20
    # a brain started with this set begins with no learned figures (those of its checkpoint are
    # dropped): start it once so after a new card or a model file replaced under the same name
    learn_forget: bool = False
    placement_yield_factor: float = 1.0
    # a free GPU in no class's share is loaded for a burst while the waiting work gives each GPU
    # of the model at least this many load times of work
    placement_grow_factor: float = 0.5
    # how long a class's need is remembered once its work drops (its level falls within this)
    placement_memory_s: float = 900.0
    # a GPU changes class only after it has been in the other class's share this long
    placement_settle_s: float = 60.0
    # an idle GPU whose class has no work is lent to another class's waiting work when that work
    # gives it at least this many times what the loan costs (loads now and when the work is back)
    placement_lend_factor: float = 1.0
    # until measured: how long a model task runs, how long loading a model takes
    placement_task_s: float = 30.0
    placement_load_s: float = 120.0
    # prepended to LD_LIBRARY_PATH of GPU workers before any CUDA library loads
    gpu_library_path: str = ""
    # the memory a CPU worker offers model kinds (MB; 0: the host's available memory)
    cpu_model_memory_mb: int = 0
    # outputs bigger than this go to the object store instead of the completion event
    output_event_bytes: int = 64 * 1024
    # files that travel (docs/multihost.md) ----------------------------------------------------
    # this host's name for the plans it submits and the work it runs: a worker on the host a plan
    # was submitted from runs its tasks in the plan's own directory, any other in a per-plan work
    # directory the plan's bundle is copied into ('' : /etc/machine-id, else the host name)
    host_id: str = ""
    # where those per-plan work directories are ('' : <data_dir>/work)
    work_dir: str = ""
    # a per-plan work directory no task has used for this many days is removed when a worker
    # starts (0: never); a later task of its plan fetches the bundle again
    work_dir_keep_days: float = 7.0
    # where fetched model files are kept ('' : <data_dir>/models)
    model_cache_dir: str = ""
    # the most the files bundled with one plan may add up to (MB)
    bundle_max_mb: int = 512
    # the most the artifacts of one attempt may add up to (MB); a bigger one fails the attempt
    artifact_max_mb: int = 2048
    # an LLM's answer is published as it is generated (core NATS, `<p>.stream.…`), in batches
    # gathered over this many seconds; false: not at all
    stream_text: bool = True
    stream_batch_s: float = 0.05

    # watchdog (one per host): samples GPUs and the host this often
    watchdog_interval_s: float = 2.0
    # thermal control: a GPU at or above this stops claiming work, and claims again below resume
    thermal_pause_c: float = 87.0
    thermal_resume_c: float = 80.0
    # a host's readings leave the telemetry bucket this long after its watchdog's last sample
    telemetry_ttl_s: float = 60.0
    # telemetry history (docs/watchdog.md#history): each host's watchdog stores its samples
    # averaged over history_fine_s for history_fine_keep_h hours, and over history_coarse_s for
    # history_coarse_keep_h hours, in the history stream (at most history_max_bytes); 0 s: none
    history_fine_s: int = 10
    history_fine_keep_h: float = 24.0
    history_coarse_s: int = 60
    history_coarse_keep_h: float = 168.0
    history_max_bytes: int = 512 * 1024 * 1024
    # a JSON file of simulated GPUs the watchdog reads instead of NVML (tests, demos)
    simulated_gpus: str = ""
    # [alerts.NAME] tables over the built-in rules (see mesh/alerts.py, docs/watchdog.md)
    alerts: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # a temperature alert resolves only this far below its threshold
    alert_hysteresis_c: float = 5.0
    alert_webhook_url: str = ""
    alert_webhook_format: Literal["json", "slack", "discord", "ntfy"] = "json"
    alert_webhook_timeout_s: float = 5.0
    alert_notify_send: bool = False
    # e-mail sink (docs/watchdog.md#sinks): SMTP, STARTTLS unless alert_smtp_security says
    # otherwise; alert_email_to is a comma-separated list of addresses ('' = no e-mail)
    alert_email_to: str = ""
    alert_email_from: str = ""  # '' = mesh@<this host>
    alert_smtp_host: str = ""
    alert_smtp_port: int = 587
    alert_smtp_security: Literal["starttls", "ssl", "none"] = "starttls"
    alert_smtp_user: str = ""
    alert_smtp_password: str = ""  # or MESH_ALERT_SMTP_PASSWORD
    # a CA file to trust besides the system's (a server with its own certificate)
    alert_smtp_ca_file: str = ""
    alert_smtp_timeout_s: float = 10.0
    # a sink that fails is tried alert_retries times, the wait doubling from alert_retry_backoff_s;
    # then the alert goes to the spool (<data_dir>/alerts/undelivered.jsonl, shown by mesh doctor),
    # tried again every alert_spool_retry_s by the watchdog and at every `mesh health`
    alert_retries: int = 4
    alert_retry_backoff_s: float = 2.0
    alert_spool_retry_s: float = 300.0
    # an XID error keeps the gpu_xid alert raised this long after it was seen
    alert_xid_window_s: float = 3600.0
    # failed attempts of one task class are counted over this window (alert rule task_failures)
    failure_window_s: float = 600.0
    # whether this host's watchdog evaluates the mesh-wide rules (queue depth, failures per
    # class): leave it on for one watchdog of the mesh
    watchdog_mesh_rules: bool = True
    # [health.NAME] tables: HTTP endpoints and agents the watchdog checks and restarts
    health: dict[str, HealthCheck] = msgspec.field(default_factory=dict)
    # [gpus] power_limit_w = W (every GPU of this host), [gpus.N] power_limit_w = W (GPU N): the
    # power caps this host's watchdog sets through NVML (mesh/power.py, docs/gpus.md)
    gpus: dict[str, Any] = msgspec.field(default_factory=dict)

    # [redact] NAME = "regex": removed (as [REDACTED:NAME]) from everything sent to Claude or
    # exported, besides the built-in kinds (keys, tokens, passwords, private keys, e-mail, IPs)
    redact: dict[str, str] = msgspec.field(default_factory=dict)

    # the operator (`mesh ask`, docs/operator.md): '' asks Claude through the gateway; the name
    # of an llm model of the registry with backend 'openai' and a base_url asks that server
    operator_model: str = ""
    # the most one operator question (all its turns) may spend through the gateway (USD; 0: no limit)
    gateway_budget_ask_usd: float = 0.5

    # escalation to Claude through the gateway (docs/gateway.md) -------------------------
    # the Anthropic API key; '' takes ANTHROPIC_API_KEY from the environment
    gateway_api_key: str = ""
    # '' : the SDK's default (https://api.anthropic.com)
    gateway_base_url: str = ""
    gateway_model: str = "claude-sonnet-4-5"
    gateway_max_tokens: int = 4096
    # one API call may take this long before it counts as failed (and is tried again)
    gateway_timeout_s: float = 600.0
    # [gateway_prices.MODEL] input = 3.0, output = 15.0 (USD per million tokens), over the defaults
    gateway_prices: dict[str, Price] = msgspec.field(default_factory=dict)
    # rate limits of the gateway's own calls (0: none)
    gateway_requests_per_min: int = 50
    gateway_tokens_per_min: int = 200_000
    # spend limits in USD (0: none); a day is a UTC calendar day
    gateway_budget_day_usd: float = 10.0
    gateway_budget_plan_usd: float = 2.0
    # an unreachable API (or a 429 / 5xx) is tried again after a backoff between these bounds,
    # or after the API's Retry-After; a request is given up this long after it was made (0: never)
    gateway_backoff_min_s: float = 2.0
    gateway_backoff_max_s: float = 300.0
    gateway_give_up_after_s: float = 86400.0
    # API calls the gateway makes at once
    gateway_concurrency: int = 4
    # a request the gateway holds is delivered again this long after the gateway died
    gateway_ack_wait_s: float = 30.0
    # how often the gateway looks whether a budget alert it raised is over (a new day, the plan
    # ended, the budget raised)
    gateway_alert_check_s: float = 60.0
    # a task of a plan with `auto: true` escalation is escalated after this many local failures
    # (a plan's `after:` overrides it)
    escalate_after: int = 2
    # the llm model (of the registry) that reviews failed attempts of plans with `review: true`
    # under `## Escalation` ('' : the default llm model)
    review_model: str = ""

    # the Prometheus exporter (`mesh agent exporter`) serves /metrics here
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464

    # the web console (`mesh agent web`, docs/console.md): where it serves, and its tokens. Off
    # loopback it refuses to start without `web_token`; `web_read_token` sees but may not act
    web_host: str = "127.0.0.1"
    web_port: int = 8470
    web_token: str = ""
    web_read_token: str = ""
    # live pages (server-sent event streams) the console serves at once; one more is refused
    web_max_streams: int = 64

    # retention of the history (0: unlimited)
    events_max_age_days: float = 90.0
    events_max_bytes: int = 8 * 1024**3
    cmd_max_age_days: float = 30.0
    work_max_bytes: int = 1024**3
    kv_history: int = 1
    # a plan final for this long leaves KV and the brain's memory (its history stays); 0: never
    archive_after_days: float = 7.0
    max_payload_bytes: int = 8 * 1024 * 1024
    duplicate_window_s: float = 3600.0
    # what every nats-server config mesh writes or runs (`mesh up`, `mesh init --render` and
    # `--secure`, `mesh install-units`) asks of JetStream's file store: "always" writes each
    # message to the disk before acknowledging it, so a power cut loses nothing acknowledged;
    # "lazy" syncs every 2 minutes, faster, and a power cut loses what was acknowledged since
    durability: Literal["always", "lazy"] = "always"
    # a brain step's many messages to one stream go as JetStream atomic batches (nats-server
    # 2.12 or later; streams made with `allow_atomic`): one disk sync a batch, not one a message
    atomic_batches: bool = True

    # security and hosts (docs/security.md, docs/multihost.md) ------------------------------
    # the NATS user and password this process connects as (`mesh init --secure` writes them)
    nats_user: str = ""
    nats_password: str = ""
    # how long a JetStream request (a publish's acknowledgement, a KV write, an API call) waits
    # for its answer; a permission refusal fails it at once whatever this is
    request_timeout_s: float = 10.0
    # TLS: the CA that signed the server's certificate; a client certificate and key if the
    # server asks for one. A tls:// URL, or a CA, turns TLS on.
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    # a fixed agent id (a worker's NATS user may publish only as one agent); empty: a fresh one
    agent_id: str = ""
    # whether this process creates and updates streams, buckets and consumers; false: it waits
    # for them to exist (its NATS user may not create them)
    manage_resources: bool = True
    # copies of every stream and bucket kept by a JetStream cluster (1 on a single server)
    replicas: int = 1
    # the JetStream domain this process's streams and buckets live in; empty: the server's own.
    # A process on a leaf node server (the gateway host's, docs/multihost.md) names the rig's
    # domain, and its JetStream calls go to `$JS.<domain>.API.…` and cross the link
    jetstream_domain: str = ""
    # the server's HTTP monitoring address (`http: 127.0.0.1:8222` in its config), e.g.
    # http://127.0.0.1:8222: where its store is (`/varz`), for `mesh doctor` and for saying how
    # much room a full store has left. Empty: read from the server config mesh wrote on this host
    nats_monitor_url: str = ""

    @property
    def names(self) -> Names:
        return Names(self.prefix)

    @property
    def embedded_url(self) -> str:
        return f"nats://127.0.0.1:{self.embedded_port}"

    @property
    def url(self) -> str:
        return self.server_url or self.embedded_url

    @property
    def urls(self) -> list[str]:
        """Every server URL to try (`server_url` may list a cluster's, comma-separated)."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def lost_after_s(self) -> float:
        """A running attempt whose worker is offline this long, and was not redelivered, is lost."""
        return 2 * self.ack_wait_s + self.agent_ttl_s

    @property
    def brain_ack_wait_s(self) -> float:
        """An input a dead brain had fetched is delivered again this long after: a standby that
        took the lease (within lease_s) gets it soon after. (The live brain keeps a long batch
        of inputs alive with progress acks.)"""
        return max(2 * self.lease_s, 5.0)

    def price_table(self) -> dict[str, Price]:
        """What each Claude model costs: the built-in list prices under `[gateway_prices]`."""
        return {**DEFAULT_PRICES, **self.gateway_prices}

    def power_caps(self) -> PowerCaps:
        """The `[gpus]` power caps (checked when the settings were built)."""
        return parse_caps(self.gpus)

    def model_registry(self) -> dict[str, ModelSpec]:
        reg = builtin_models()
        reg.update(self.models)
        return reg

    def default_model(self, kind: str) -> str:
        return self.default_models.get(kind) or DEFAULT_MODELS[kind]

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_every_s or max(self.ack_wait_s / 3.0, 0.2)


_FIELDS = Settings.__struct_fields__


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
    if environ.get(ENV_URL):
        out["server_url"] = environ[ENV_URL]
    return out


def settings_from(
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
    *,
    server: str | None = None,
    file: str,
    default_data_dir: Callable[[], str],
    is_file: Callable[[str], bool],
) -> Settings:
    """Build settings from the config file's values, the environment and explicit overrides (an
    override of None is not given), and check them; raises ConfigError saying what to fix.

    `file` names the config file in the messages; `default_data_dir()` is the data directory
    when nothing sets one, and `is_file(path)` says whether a TLS file named exists."""
    values: dict[str, Any] = dict(file_values)
    values.update(_from_env(environ))
    if not values.get("gateway_api_key") and environ.get(ENV_ANTHROPIC_KEY):
        values["gateway_api_key"] = environ[ENV_ANTHROPIC_KEY]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if server:
        values["server_url"] = server
    if values.get("durability", "always") not in ("always", "lazy"):
        raise ConfigError(
            f"durability is {values['durability']!r}: set 'always' (every write on the disk before "
            f"it is acknowledged) or 'lazy' (synced every 2 minutes) (check {file} and "
            f"{ENV_PREFIX}DURABILITY)"
        )
    if "data_dir" not in values:
        values["data_dir"] = default_data_dir()
    try:
        settings = msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(
            f"bad setting: {exc} (check {file} and the {ENV_PREFIX}* environment variables)"
        ) from exc
    if not 1 <= settings.llm_slots <= 256:  # llama.cpp's most sequences in one context
        raise ConfigError(
            f"llm_slots is {settings.llm_slots}: set 1 to 256 (LLM tasks one GPU runs at once; "
            f"check {file} and {ENV_PREFIX}LLM_SLOTS)"
        )
    if not 0 <= settings.llm_queue_ahead <= 256:
        raise ConfigError(
            f"llm_queue_ahead is {settings.llm_queue_ahead}: set 0 to 256 (LLM tasks a worker takes "
            f"beyond llm_slots, waiting for a sequence; check {file} and {ENV_PREFIX}LLM_QUEUE_AHEAD)"
        )
    try:
        settings.names  # noqa: B018 - validates the prefix
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    problem = security_problem(settings, is_file)
    if problem:
        raise ConfigError(f"{problem} (check {file} and the {ENV_PREFIX}* environment variables)")
    check_registry(settings.model_registry(), {**DEFAULT_MODELS, **settings.default_models})
    if settings.review_model:
        known = settings.model_registry().get(settings.review_model)
        if known is None or known.kind != "llm":
            llms = ", ".join(sorted(n for n, m in settings.model_registry().items() if m.kind == "llm"))
            raise ConfigError(
                f"review_model {settings.review_model!r} is not an llm model of the registry "
                f"(llm models: {llms or 'none'}): name one, or add it under [models] (check {file})"
            )
    for name, check in settings.health.items():
        if check.problem():
            raise ConfigError(f"[health.{name}]: {check.problem()} (check {file})")
    try:
        parse_caps(settings.gpus)
    except PowerError as exc:
        raise ConfigError(f"{exc} (check {file})") from exc
    from mesh.alerts import RuleError, build_rules
    from mesh.redact import PatternError, Redactor

    try:
        Redactor(settings.redact)
    except PatternError as exc:
        raise ConfigError(f"[redact]: {exc} (check {file})") from exc

    problem = (
        gateway_problem(settings)
        or plan_problem(settings)
        or learn_problem(settings)
        or alert_sink_problem(settings)
    )
    if problem:
        raise ConfigError(f"{problem} (check {file})")
    try:
        build_rules(settings.alerts, settings.alert_hysteresis_c)
    except RuleError as exc:
        raise ConfigError(f"{exc} (check {file})") from exc
    return settings


def gateway_problem(settings: Settings) -> str:
    """What is wrong with the gateway's settings ('' when nothing is)."""
    if settings.gateway_model not in settings.price_table():
        return (
            f"gateway_model {settings.gateway_model!r} has no price, so its spend cannot be kept "
            f"within budget: add [gateway_prices.{settings.gateway_model}] with input = and output = "
            "(USD per million tokens)"
        )
    checks = [
        ("gateway_max_tokens", settings.gateway_max_tokens >= 1, "at least 1"),
        ("gateway_timeout_s", settings.gateway_timeout_s > 0, "above 0"),
        ("gateway_concurrency", settings.gateway_concurrency >= 1, "at least 1"),
        ("gateway_backoff_min_s", settings.gateway_backoff_min_s > 0, "above 0"),
        (
            "gateway_backoff_max_s",
            settings.gateway_backoff_max_s >= settings.gateway_backoff_min_s,
            "at least gateway_backoff_min_s",
        ),
        ("gateway_ack_wait_s", settings.gateway_ack_wait_s >= 1, "at least 1"),
        ("gateway_alert_check_s", settings.gateway_alert_check_s > 0, "above 0"),
        ("escalate_after", settings.escalate_after >= 1, "at least 1"),
    ]
    for name, ok, want in checks:
        if not ok:
            return f"{name} = {getattr(settings, name)!r} must be {want}"
    for name in ("gateway_requests_per_min", "gateway_tokens_per_min"):
        if getattr(settings, name) < 0:
            return f"{name} must be 0 (no limit) or more"
    for name in ("gateway_budget_day_usd", "gateway_budget_plan_usd"):
        if getattr(settings, name) < 0:
            return f"{name} must be 0 (no limit) or more"
    for model, price in settings.gateway_prices.items():
        if price.input < 0 or price.output < 0:
            return f"[gateway_prices.{model}]: prices cannot be negative"
    return ""


def alert_sink_problem(settings: Settings) -> str:
    """What is wrong with the alert sinks' settings ('' when nothing is)."""
    if settings.alert_email_to and not settings.alert_smtp_host:
        return "alert_email_to is set but alert_smtp_host is empty: name the SMTP server"
    if bool(settings.alert_smtp_user) != bool(settings.alert_smtp_password):
        return "alert_smtp_user and alert_smtp_password go together: set both, or neither"
    if settings.alert_retries < 1:
        return f"alert_retries = {settings.alert_retries!r} must be at least 1"
    for name in (
        "alert_retry_backoff_s",
        "alert_spool_retry_s",
        "alert_smtp_timeout_s",
        "alert_xid_window_s",
    ):
        if getattr(settings, name) <= 0:
            return f"{name} = {getattr(settings, name)!r} must be above 0"
    return ""


def plan_problem(settings: Settings) -> str:
    """What is wrong with the plan limits ('' when nothing is)."""
    for name in ("plan_max_expansions", "plan_max_tasks", "plan_max_bytes"):
        if getattr(settings, name) < 1:
            return f"{name} = {getattr(settings, name)!r} must be at least 1"
    return ""


def learn_problem(settings: Settings) -> str:
    """What is wrong with the learned figures' and the batches' settings ('' when nothing is)."""
    if settings.embed_batch_max < 1:
        return f"embed_batch_max = {settings.embed_batch_max!r} must be at least 1 (1: no batches)"
    if settings.embed_batch_wait_s < 0:
        return f"embed_batch_wait_s = {settings.embed_batch_wait_s!r} must be 0 or more"
    if settings.pack_size < 1:
        return f"pack_size = {settings.pack_size!r} must be at least 1 (1: a work item for each task)"
    if settings.pack_below_s < 0:
        return f"pack_below_s = {settings.pack_below_s!r} must be 0 or more"
    if settings.learn_min_samples < 1:
        return f"learn_min_samples = {settings.learn_min_samples!r} must be at least 1"
    if settings.learn_window < settings.learn_min_samples:
        return (
            f"learn_window = {settings.learn_window!r} must be at least learn_min_samples "
            f"({settings.learn_min_samples})"
        )
    return ""


_DOMAIN = re.compile(r"^[A-Za-z0-9_-]+$")


def security_problem(settings: Settings, is_file: Callable[[str], bool]) -> str:
    """What is wrong with the credential, TLS and cluster settings, or ''. `is_file(path)` says
    whether a TLS file named exists."""
    if settings.nats_user and not settings.nats_password:
        return f"nats_user is {settings.nats_user!r} but nats_password is empty: set both, or neither"
    if settings.nats_password and not settings.nats_user:
        return "nats_password is set but nats_user is empty: set both, or neither"
    if bool(settings.nats_tls_cert) != bool(settings.nats_tls_key):
        return "nats_tls_cert and nats_tls_key go together: a client certificate needs its key"
    if not settings.request_timeout_s > 0:
        return f"request_timeout_s = {settings.request_timeout_s!r} must be above 0"
    for name in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
        path = getattr(settings, name)
        if path and not is_file(path):
            return f"{name} {path!r} is not a file"
    if not 1 <= settings.replicas <= 5:
        return f"replicas is {settings.replicas}: JetStream keeps 1 to 5 copies (3 on a 3-server cluster)"
    if settings.jetstream_domain and not _DOMAIN.match(settings.jetstream_domain):
        return (
            f"jetstream_domain {settings.jetstream_domain!r} may hold only letters, digits, '-' and '_' "
            "(it is one token of a subject)"
        )
    if settings.agent_id:
        try:
            Names(settings.prefix).own_consumer(settings.agent_id)
        except ValueError as exc:
            return f"agent_id: {exc}"
    return ""
