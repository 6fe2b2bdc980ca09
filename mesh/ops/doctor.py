"""`mesh doctor`: what is wrong with this host's mesh, and how to fix each thing.

Each check is a function returning findings: ok, warn, fail or skip, a message
that says what was seen, and for anything not ok a fix. The checks: the server
(reachable, JetStream on, its limits), the streams, buckets and consumers
against what `mesh/bus/` defines (drift names the field), clock skew (this
host against the server, and every agent's host through its registration), the
GPUs (NVML, driver, nvidia-smi, CUDA in llama.cpp), the configured models on
disk, free disk, alerts no sink took (the spool), the server's store (where it
is, its room), and the systemd units. `--quick` leaves out the slow ones
(model files, CUDA libraries).
"""

from __future__ import annotations

import asyncio
import datetime
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from mesh.bus import store
from mesh.bus.connect import connect
from mesh.bus.publish import Bus
from mesh.bus.read import read_stream
from mesh.bus.resources import NS, bucket_definitions, consumer_definitions, stream_definitions
from mesh.errors import MeshError, ServerRefused
from mesh.host.alertspool import Spool, spool_path
from mesh.host.modelfiles import resolve_path
from mesh.models import ModelError, builtin_models
from mesh.names import kv_keys
from mesh.records import decode_agent
from mesh.settings import Settings

Level = Literal["ok", "warn", "fail", "skip"]
GIB = 1024**3
# clock skew: leases (the brain's), registrations and "seen" times compare clocks across hosts
SKEW_WARN_S = 0.5
SKEW_FAIL_S = 2.0
DISK_FAIL_BYTES = 1 * GIB
DISK_WARN_BYTES = 5 * GIB
DISK_WARN_FRACTION = 0.05
REQUEST_TIMEOUT_S = 5.0
# JetStream config fields that cannot change on an existing stream
IMMUTABLE = frozenset({"storage", "retention", "name"})
# a bucket's definition (bus.bucket_definitions) -> the field of its stream, and the nats CLI flag
BUCKET_FIELDS = {
    "description": ("description", "--description"),
    "history": ("max_msgs_per_subject", "--max-msgs-per-subject"),
    "ttl": ("max_age", "--max-age"),
    "storage": ("storage", ""),
    "allow_direct": ("allow_direct", "--allow-direct"),
}
DURATIONS = frozenset({"max_age", "duplicate_window", "ack_wait", "inactive_threshold", "ttl"})


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    check: str
    level: Level
    message: str
    fix: str = ""


def ok(check: str, message: str) -> Finding:
    return Finding(check=check, level="ok", message=message)


def warn(check: str, message: str, fix: str) -> Finding:
    return Finding(check=check, level="warn", message=message, fix=fix)


def fail(check: str, message: str, fix: str) -> Finding:
    return Finding(check=check, level="fail", message=message, fix=fix)


def skip(check: str, message: str) -> Finding:
    return Finding(check=check, level="skip", message=message)


def failed(findings: list[Finding]) -> bool:
    return any(f.level == "fail" for f in findings)


# ------------------------------------------------------------------ the server


async def check_server(settings: Settings) -> tuple[Bus | None, list[Finding]]:
    """Connect once (no waiting): the bus for the other server checks, or a failure that says how
    to start or point at a server."""
    try:
        bus = await connect(settings, "mesh-doctor")
    except ServerRefused as exc:
        # it is running, and answered: starting it is not the remedy, the message says what is
        return None, [
            fail("server", str(exc), "fix the setting the message names, then run `mesh doctor` again")
        ]
    except MeshError as exc:
        return None, [
            fail(
                "server",
                str(exc).split(". Start one")[0],
                "start it: `sudo systemctl start mesh-nats` (`systemctl --user` for a user install), "
                "or `mesh up`; or point mesh at the right one (server_url in the config, "
                "MESH_NATS_URL, --server)",
            )
        ]
    info: dict[str, Any] = dict(bus.nc._server_info or {})
    name = info.get("server_name") or info.get("server_id", "?")
    findings = [ok("server", f"{settings.url}: nats-server {info.get('version', '?')} ({name})")]
    max_payload = int(info.get("max_payload") or 0)
    if max_payload and max_payload < settings.max_payload_bytes:
        findings.append(
            fail(
                "server",
                f"the server's max_payload is {max_payload} bytes, below mesh's max_payload_bytes "
                f"({settings.max_payload_bytes}): bigger messages are refused",
                f"set `max_payload: {settings.max_payload_bytes}` in nats-server.conf and reload "
                "(`systemctl reload mesh-nats`), or lower max_payload_bytes",
            )
        )
    return bus, findings


async def check_jetstream(bus: Bus) -> list[Finding]:
    fix = (
        "enable JetStream in nats-server.conf (`jetstream { store_dir: ... }`, see nats/server.conf) "
        "and restart the server; with accounts, give mesh's account JetStream limits"
    )
    # (a leaf server reaching another domain's JetStream runs none of its own)
    if not bus.settings.jetstream_domain and not (bus.nc._server_info or {}).get("jetstream", False):
        return [fail("jetstream", "the server runs without JetStream", fix)]
    try:
        account = await bus.js.account_info()
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
        return [fail("jetstream", f"JetStream does not answer for this account ({exc!r})", fix)]
    limits = account.limits
    used = f"{account.streams} streams, {account.consumers} consumers, {_bytes(account.storage)} stored"
    cap = limits.max_storage if limits.max_storage and limits.max_storage > 0 else 0
    findings = [
        ok(
            "jetstream",
            f"{used}; account limits: storage {_bytes(cap) if cap else 'unlimited'}, "
            f"memory {_limit_bytes(limits.max_memory)}, streams {_limit(limits.max_streams)}, "
            f"consumers {_limit(limits.max_consumers)}",
        )
    ]
    if cap and account.storage > 0.9 * cap:
        findings.append(
            warn(
                "jetstream",
                f"the account uses {_bytes(account.storage)} of its {_bytes(cap)} storage",
                "raise the account's max_file_store, or lower events_max_bytes / events_max_age_days",
            )
        )
    return findings


async def _api(bus: Bus, subject: str) -> dict[str, Any] | None:
    """A JetStream API request; None when the thing asked about does not exist."""
    # (`$JS.<domain>.API` where the settings name a JetStream domain)
    reply = await bus.nc.request(f"{bus.js._prefix}.{subject}", b"", timeout=REQUEST_TIMEOUT_S)
    data: dict[str, Any] = msgspec.json.decode(reply.data)
    error = data.get("error")
    if error:
        if error.get("code") == 404:
            return None
        raise MeshError(f"JetStream API {subject}: {error.get('description', error)}")
    return data


def drift(expected: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, expected, actual) for every field of `expected` the server has otherwise."""
    out = []
    for key, want in expected.items():
        have = actual.get(key)
        if isinstance(want, list) and isinstance(have, list):
            if sorted(map(str, want)) == sorted(map(str, have)):
                continue
        elif want == have:
            continue
        out.append((key, want, have))
    return out


def show(key: str, value: Any) -> str:
    if key in DURATIONS and isinstance(value, int):
        return f"{_duration(value / NS)}" if value else "0 (none)"
    if key in {"max_bytes", "max_msg_size"} and isinstance(value, int) and value > 0:
        return _bytes(value)
    if value is None:
        return "unset"
    return str(value)


async def check_resources(bus: Bus) -> list[Finding]:
    """Streams, buckets and durable consumers as `mesh/bus/` defines them."""
    s = bus.settings
    findings: list[Finding] = []
    for d in stream_definitions(s):
        name = d["name"]
        info = await _api(bus, f"STREAM.INFO.{name}")
        check = f"stream {name}"
        if info is None:
            findings.append(
                warn(check, "does not exist yet", "`mesh init`, or start any agent: it creates it")
            )
            continue
        diffs = drift(d, info["config"])
        for key, want, have in diffs:
            if key in IMMUTABLE:
                fix = (
                    f"{key} cannot change on an existing stream: stop the agents, back it up "
                    f"(`nats stream backup {name} DIR`), remove it (`nats stream rm {name}`), `mesh init`"
                )
            else:
                fix = "`mesh init` sets it to the code's value (or set the matching setting on this host)"
            findings.append(fail(check, f"{key} is {show(key, have)}, mesh expects {show(key, want)}", fix))
        if not diffs:
            findings.append(ok(check, f"{info['state']['messages']} messages, config as the code defines it"))
    for d in bucket_definitions(s):
        bucket = d["bucket"]
        stream = f"KV_{bucket}"
        check = f"bucket {bucket}"
        info = await _api(bus, f"STREAM.INFO.{stream}")
        if info is None:
            findings.append(
                warn(check, "does not exist yet", "`mesh init`, or start any agent: it creates it")
            )
            continue
        expected = {BUCKET_FIELDS[k][0]: v for k, v in d.items() if k in BUCKET_FIELDS}
        expected.setdefault("allow_direct", False)
        if not expected.get("max_age"):
            expected["max_age"] = 0
        names = {BUCKET_FIELDS[k][0]: k for k in BUCKET_FIELDS}
        diffs = drift(expected, info["config"])
        for field, want, have in diffs:
            setting = names[field]
            flag = BUCKET_FIELDS[setting][1]
            if flag:
                value = _duration(want / NS) if field == "max_age" and want else str(want).lower()
                fix = f"`nats stream edit {stream} {flag} {value}` (stream {stream} holds the bucket)"
            else:
                fix = (
                    f"{setting} cannot change on an existing bucket: stop the agents, remove it "
                    f"(`nats kv rm {bucket}`), then `mesh init`"
                )
            findings.append(
                fail(check, f"{setting} is {show(field, have)}, mesh expects {show(field, want)}", fix)
            )
        if not diffs:
            findings.append(ok(check, f"{info['state']['messages']} keys, config as the code defines it"))
    for c in consumer_definitions(s):
        stream, config = c["stream"], c["config"]
        durable = config["durable_name"]
        check = f"consumer {stream}/{durable}"
        info = await _api(bus, f"CONSUMER.INFO.{stream}.{durable}")
        if info is None:
            findings.append(warn(check, "does not exist yet", "it is created when its agent starts"))
            continue
        diffs = drift(config, info["config"])
        for key, want, have in diffs:
            findings.append(
                fail(
                    check,
                    f"{key} is {show(key, have)}, mesh expects {show(key, want)}",
                    "restart the agent that reads it (it updates its consumer on start), or `mesh init`",
                )
            )
        if not diffs:
            findings.append(ok(check, f"{info['num_pending']} pending, config as the code defines it"))
    return findings


# ------------------------------------------------------------------ clocks


def parse_time(text: str) -> float:
    """An RFC 3339 time as the server writes it (nanoseconds, `Z`) -> epoch seconds."""
    base, _, frac = text.rstrip("Z").partition(".")
    at = datetime.datetime.fromisoformat(base).replace(tzinfo=datetime.UTC).timestamp()
    return at + (float(f"0.{frac}") if frac else 0.0)


def _skew_finding(check: str, who: str, skew_s: float, slack_s: float) -> Finding:
    """`skew_s`: how far `who`'s clock is ahead of the server's (measured within `slack_s`)."""
    beyond = max(0.0, abs(skew_s) - slack_s)
    way = "ahead of" if skew_s > 0 else "behind"
    message = f"{who}'s clock is {abs(skew_s):.3f}s {way} the server's"
    fix = (
        f"turn on time sync on {who} and on the server's host (`sudo timedatectl set-ntp true`, "
        "with systemd-timesyncd or chrony); leases and registrations compare clocks across hosts"
    )
    if beyond >= SKEW_FAIL_S:
        return fail(check, message, fix)
    if beyond >= SKEW_WARN_S:
        return warn(check, message, fix)
    return ok(check, message)


async def check_clock(bus: Bus, now: Callable[[], float] = time.time) -> list[Finding]:
    """This host against the server (the `ts` of an API answer, within half the round trip), and
    every registered agent's host (the time it wrote in its registration against the time the
    server stored it)."""
    findings: list[Finding] = []
    before = now()
    info = await _api(bus, f"STREAM.INFO.{bus.names.events_stream}")
    after = now()
    if info is None or "ts" not in info:
        findings.append(skip("clock", "the server gives no time in its answers (nats-server < 2.10)"))
    else:
        skew = (before + after) / 2 - parse_time(info["ts"])
        findings.append(_skew_finding("clock", "this host", skew, (after - before) / 2))
    bucket = bus.names.agents_bucket
    if await _api(bus, f"STREAM.INFO.KV_{bucket}") is None:
        return findings
    prefix = kv_keys(bucket)
    worst: dict[str, float] = {}
    config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
    async for raw in read_stream(bus.js, f"KV_{bucket}", prefix + ">", config):
        if not raw.data:
            continue
        try:
            record = decode_agent(raw.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        skew = record.seen_at - raw.metadata.timestamp.timestamp()
        if abs(skew) >= abs(worst.get(record.host, 0.0)):
            worst[record.host] = skew
    for host, skew in sorted(worst.items()):
        # an agent writes its registration a moment before the server stores it
        findings.append(_skew_finding("clock", f"host {host}", skew, 0.05))
    return findings


# ------------------------------------------------------------------ GPUs and models


def check_gpus(quick: bool = False, environ: dict[str, str] | None = None) -> list[Finding]:
    env = os.environ if environ is None else environ
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    smi = shutil.which("nvidia-smi")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml
    except ImportError:
        if nodes:
            return [
                fail(
                    "gpus",
                    f"{len(nodes)} NVIDIA device(s) in /dev but no NVML library (nvidia-ml-py)",
                    "install the model stack: `make models` (or pip install nvidia-ml-py)",
                )
            ]
        return [ok("gpus", "no NVIDIA GPU and no NVML here: CPU workers only")]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if nodes or smi:
            return [
                fail(
                    "gpus",
                    f"NVML cannot start ({exc}) although the driver's files are here",
                    "check the driver: `nvidia-smi`; after a driver upgrade reboot (or reload the "
                    "nvidia modules); in a container, pass the GPUs in (--gpus all)",
                )
            ]
        return [ok("gpus", f"no NVIDIA driver ({exc}): CPU workers only")]
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024)
            gpus.append(f"{i}: {name} ({total} MiB)")
    finally:
        pynvml.nvmlShutdown()
    findings = [ok("gpus", f"NVML sees {count} GPU(s), driver {driver}: " + "; ".join(gpus))]
    if count and not smi:
        findings.append(
            warn(
                "gpus",
                "nvidia-smi is not on PATH",
                "install the driver's utilities (Debian: nvidia-smi; Ubuntu: nvidia-utils-<version>)",
            )
        )
    if visible is not None:
        findings.append(
            ok(
                "gpus",
                f"CUDA_VISIBLE_DEVICES={visible!r} in this environment (each worker sets its own from "
                "--gpu: mesh-worker@N gets N)",
            )
        )
    if count and not quick:
        findings += _check_llama_gpu()
    return findings


def _check_llama_gpu() -> list[Finding]:
    try:
        import llama_cpp
    except ImportError:
        return [skip("cuda", "llama-cpp-python is not installed: no LLM work on this host")]
    try:
        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except AttributeError:
        return [skip("cuda", "this llama-cpp-python cannot say whether it was built for GPUs")]
    if offload:
        return [ok("cuda", "llama-cpp-python was built with GPU offload")]
    return [
        warn(
            "cuda",
            "llama-cpp-python was built without GPU offload: LLMs run on the CPU of a GPU worker",
            'rebuild it: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=on" .venv/bin/pip install '
            "--force-reinstall --no-cache-dir llama-cpp-python (needs the CUDA toolkit)",
        )
    ]


def check_models(settings: Settings, in_store: dict[str, int] | None = None) -> list[Finding]:
    """Every model of the registry has its file on disk, or in the models bucket (`in_store`:
    the size of each model pushed there, which a worker fetches on first load). One configured
    in [models] is a failure when missing; a built-in one a warning (a host without model
    workers does not need them)."""
    findings = []
    builtin = builtin_models()
    for name, spec in sorted(settings.model_registry().items()):
        check = f"model {name}"
        try:
            path = resolve_path(name, spec)
        except ModelError as exc:
            if in_store and name in in_store:
                mb = in_store[name] / 1e6
                findings.append(
                    ok(check, f"not on this host; in the models bucket ({mb:.0f} MB), fetched on first load")
                )
            elif name in settings.models or name not in builtin:
                findings.append(fail(check, str(exc), f"put the file there, or fix [models.{name}]"))
            else:
                findings.append(
                    warn(
                        check,
                        str(exc),
                        "`make models` installs the built-in models; a host that runs no model "
                        "worker can ignore this",
                    )
                )
            continue
        findings.append(ok(check, path))
    return findings


async def _models_in_store(bus: Bus) -> dict[str, int]:
    """The size of each model pushed to the models bucket ({} when there is none)."""
    from mesh.bus.modelstore import models_store, read_records

    store = await models_store(bus)
    return {} if store is None else {m: r.size for m, r in (await read_records(store)).items()}


# ------------------------------------------------------------------ disk


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _room_finding(check: str, message: str, free: int, total: int, fix: str) -> Finding:
    """fail under DISK_FAIL_BYTES free; warn under DISK_WARN_BYTES or DISK_WARN_FRACTION."""
    if free < DISK_FAIL_BYTES:
        return fail(check, message, fix)
    if free < DISK_WARN_BYTES or free < DISK_WARN_FRACTION * total:
        return warn(check, message, fix)
    return ok(check, message)


def check_disk(settings: Settings) -> list[Finding]:
    """The data dir's filesystem (task artifacts, `mesh up`'s server); the server's store is
    `check_store`'s."""
    path = Path(settings.data_dir).expanduser()
    usage = shutil.disk_usage(_existing(path))
    message = f"data dir {path}: {_bytes(usage.free)} free of {_bytes(usage.total)}"
    fix = f"free space on the filesystem of {path}"
    return [_room_finding("disk", message, usage.free, usage.total, fix)]


def check_alert_spool(settings: Settings) -> list[Finding]:
    """Alerts no sink took after every try (kept in the spool until a later try delivers them)."""
    spool = Spool(spool_path(settings.data_dir))
    entries, bad = spool.read()
    if not entries and not bad:
        return [ok("alerts", "every alert was delivered to its sinks")]
    by_sink: dict[str, int] = {}
    for e in entries:
        by_sink[e.sink] = by_sink.get(e.sink, 0) + 1
    last = max(entries, key=lambda e: e.last_at) if entries else None
    said = f"; the last error: {last.error}" if last else ""
    counts = ", ".join(f"{n} to {sink}" for sink, n in sorted(by_sink.items()))
    return [
        warn(
            "alerts",
            f"{len(entries)} alert(s) not delivered ({counts or 'none readable'}; {bad} unreadable "
            f"line(s)) in {spool.path}{said}",
            "fix the sink's settings (alert_webhook_url, alert_smtp_*; for `stream`, the server); "
            "`mesh health` tries them all again at each run, the watchdog the sinks' every "
            "alert_spool_retry_s; delete the file to drop them",
        )
    ]


def check_store(settings: Settings, environ: dict[str, str] | None = None) -> list[Finding]:
    """The server's JetStream store: where it is (the server's `/varz` at nats_monitor_url, or
    the server config mesh wrote on this host) and how much room it has. A full store refuses
    every write: the agents wait (docs/reliability.md#a-full-disk)."""
    fix_room = (
        "free space there, or lower events_max_bytes / events_max_age_days (the history is most "
        "of the store); a nats-server whose disk filled up must be restarted once there is room"
    )
    try:
        where = store.locate(settings, environ)
    except OSError as exc:
        return [
            fail(
                "store",
                f"nats_monitor_url does not answer: {exc}",
                "fix nats_monitor_url (the server's `http:` address, e.g. http://127.0.0.1:8222), "
                "or unset it to read the server config on this host",
            )
        ]
    if where is None:
        if not store.server_is_local(settings):
            return [
                skip(
                    "store",
                    f"the server ({settings.url}) is on another host: run `mesh doctor` there, or set "
                    "nats_monitor_url to its monitoring address",
                )
            ]
        looked = ", ".join(str(p) for p in store.config_candidates(settings, environ))
        return [
            warn(
                "store",
                f"the server's store directory is not known: no server config with JetStream at {looked}, "
                "and no nats_monitor_url",
                "add `http: 127.0.0.1:8222` to the server's config and set nats_monitor_url = "
                '"http://127.0.0.1:8222", so the store can be found and its room said when it fills',
            )
        ]
    findings: list[Finding] = []
    held = ""
    if where.max_bytes > 0:
        held = f"; JetStream holds {_bytes(where.used_bytes)} of its {_bytes(where.max_bytes)} limit"
    if where.local:
        usage = shutil.disk_usage(_existing(Path(where.path)))
        message = (
            f"{where.path} (from {where.source}): {_bytes(usage.free)} free of {_bytes(usage.total)}{held}"
        )
        findings.append(_room_finding("store", message, usage.free, usage.total, fix_room))
    else:
        findings.append(
            ok("store", f"{where.path} on the server's host (from {where.source}){held}; run doctor there")
        )
    if where.max_bytes > 0 and where.used_bytes > 0.9 * where.max_bytes:
        findings.append(
            warn(
                "store",
                f"JetStream holds {_bytes(where.used_bytes)} of its {_bytes(where.max_bytes)} limit",
                "raise max_file_store in the server's `jetstream {}` block, or lower events_max_bytes "
                "/ events_max_age_days",
            )
        )
    return findings


# ------------------------------------------------------------------ systemd units


Runner = Callable[[list[str]], tuple[int, str]]


def _run(argv: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return done.returncode, done.stdout + done.stderr


def parse_list_units(text: str) -> list[tuple[str, str, str, str]]:
    """`systemctl list-units --plain --no-legend` lines -> (unit, load, active, sub)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].startswith("mesh"):
            rows.append((parts[0], parts[1], parts[2], parts[3]))
    return rows


def check_units(
    runner: Runner = _run,
    system_dir: Path = Path("/etc/systemd/system"),
    user_dir: Path | None = None,
    booted: bool | None = None,
) -> list[Finding]:
    """Which mesh units are installed (system-wide, for this user), enabled and running."""
    if booted is None:
        booted = Path("/run/systemd/system").is_dir()
    if not booted:
        return [skip("units", "systemd is not running on this host: unit checks skipped")]
    if user_dir is None:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        user_dir = Path(base) / "systemd" / "user"
    findings: list[Finding] = []
    for scope, directory in (("system", system_dir), ("user", user_dir)):
        installed = sorted(p.name for p in directory.glob("mesh*")) if directory.is_dir() else []
        if not installed:
            continue
        ctl = ["systemctl", *(["--user"] if scope == "user" else [])]
        journal = "journalctl" + (" --user" if scope == "user" else "")
        sudo = "sudo " if scope == "system" else ""
        code, said = runner([*ctl, "is-enabled", "mesh.target"])
        if said.strip() != "enabled":
            findings.append(
                warn(
                    f"units ({scope})",
                    f"mesh.target is {said.strip() or 'not enabled'}: mesh does not start at boot",
                    f"`{sudo}{' '.join(ctl)} enable mesh.target`",
                )
            )
        code, said = runner([*ctl, "list-units", "mesh*", "--all", "--plain", "--no-legend", "--no-pager"])
        if code not in (0, 1):
            findings.append(skip(f"units ({scope})", f"cannot ask systemd: {said.strip()[-200:]}"))
            continue
        rows = parse_list_units(said)
        if not rows:
            findings.append(
                warn(
                    f"units ({scope})",
                    f"{len(installed)} mesh unit files installed, none enabled or loaded",
                    f"enable this host's services: `{sudo}{' '.join(ctl)} enable --now mesh.target "
                    "mesh-nats.service mesh-brain.service mesh-worker@0.service ...` (docs/deploy.md)",
                )
            )
        for unit, load, active, sub in rows:
            check = f"unit {unit}"
            if active == "active":
                findings.append(ok(check, f"{active} ({sub})"))
            elif active == "failed":
                findings.append(
                    fail(
                        check,
                        f"failed ({sub})",
                        f"see why: `{journal} -u {unit} -e`; then `{sudo}{' '.join(ctl)} restart {unit}`",
                    )
                )
            elif load == "not-found":
                findings.append(
                    fail(check, "wanted but its unit file is gone", "`mesh install-units --install` again")
                )
            elif unit.endswith(".timer") or (unit == "mesh-health.service" and sub == "dead"):
                # the timer waits; the one-shot check it starts is inactive between rounds
                findings.append(ok(check, f"{active} ({sub})"))
            else:
                findings.append(
                    warn(
                        check,
                        f"{active} ({sub})",
                        f"`{sudo}{' '.join(ctl)} start {unit}` (`enable` it to start at boot)",
                    )
                )
    if not findings:
        findings.append(
            warn(
                "units",
                "no mesh units installed on this host",
                "`sudo mesh install-units --install` (or `mesh install-units --user --install`); "
                "docs/deploy.md",
            )
        )
    return findings


# ------------------------------------------------------------------ all of it


async def diagnose(settings: Settings, quick: bool = False) -> list[Finding]:
    findings: list[Finding] = []
    bus, found = await check_server(settings)
    findings += found
    in_store: dict[str, int] = {}
    if bus is None:
        findings.append(skip("jetstream", "no server: JetStream, streams and clocks not checked"))
    else:
        try:
            jetstream = await check_jetstream(bus)
            findings += jetstream
            if not failed(jetstream):
                findings += await check_resources(bus)
                findings += await check_clock(bus)
                in_store = await _models_in_store(bus)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, MeshError) as exc:
            findings.append(
                fail(
                    "server",
                    f"the server stopped answering mid-check ({exc.__class__.__name__}: {exc})",
                    "run `mesh doctor` again; if it persists, check the server's log "
                    "(`journalctl -u mesh-nats -e`)",
                )
            )
        finally:
            await bus.close()
    findings += await asyncio.to_thread(check_gpus, quick)
    if not quick:
        findings += await asyncio.to_thread(check_models, settings, in_store)
    findings += check_disk(settings)
    findings += await asyncio.to_thread(check_alert_spool, settings)
    findings += await asyncio.to_thread(check_store, settings)
    findings += await asyncio.to_thread(check_units)
    return findings


# ------------------------------------------------------------------ formatting


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _limit(n: int | None) -> str:
    return "unlimited" if n is None or n < 0 else str(n)


def _limit_bytes(n: int | None) -> str:
    return "unlimited" if n is None or n < 0 else _bytes(n)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"
