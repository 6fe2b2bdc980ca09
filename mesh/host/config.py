"""Loading the settings on this machine: the TOML config file (`MESH_CONFIG`, or
$XDG_CONFIG_HOME/mesh/config.toml) and the process environment, checked by mesh.settings.

Also what the settings leave to the machine: this host's id (`host_id`) and where per-plan
work directories are (`work_root`).
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from mesh.settings import ENV_CONFIG, Settings, settings_from


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "mesh")


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mesh" / "config.toml"


MACHINE_ID = "/etc/machine-id"


def host_id(settings: Settings, machine_id: str = MACHINE_ID) -> str:
    """This host's id: the setting `host_id` (env MESH_HOST_ID), else the contents of
    /etc/machine-id, else the host name. A plan records the id of the host it was submitted
    from; a worker with the same id runs its tasks in the plan's own directory."""
    if settings.host_id:
        return settings.host_id
    try:
        with open(machine_id, encoding="ascii", errors="replace") as f:
            found = f.read(256).strip()
    except OSError:
        found = ""
    return found or socket.gethostname() or "localhost"


def work_root(settings: Settings) -> str:
    """Where a worker makes the per-plan work directories: the setting `work_dir`, else
    <data_dir>/work."""
    if settings.work_dir:
        return os.path.expanduser(settings.work_dir)
    return os.path.join(settings.data_dir, "work")


def _is_file(path: str) -> bool:
    return Path(path).is_file()


def load_settings(
    *,
    server: str | None = None,
    config: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings from the config file, the environment and explicit overrides."""
    env = dict(os.environ) if environ is None else environ
    path = Path(config) if config else Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else None
    values: dict[str, Any] = {}
    file = path or default_config_path()
    if path is not None and not file.exists():
        raise ConfigError(f"config file {file} does not exist; create it or unset {ENV_CONFIG}")
    if file.exists():
        try:
            values.update(tomllib.loads(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    return settings_from(
        values,
        env,
        overrides,
        server=server,
        file=str(file),
        default_data_dir=default_data_dir,
        is_file=_is_file,
    )
