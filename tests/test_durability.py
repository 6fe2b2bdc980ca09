"""The `durability` setting: what it renders into every nats-server config mesh writes or runs.

Whether the server then keeps what it acknowledged through a power cut is tests/test_power_cut.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.errors import ConfigError, MeshError
from mesh.host.config import load_settings
from mesh.ops import units
from mesh.ops.embedded import EmbeddedServer, server_config
from mesh.ops.natsconf import rendered
from mesh.ops.security import render_server_config


def jetstream_block(text: str) -> str:
    return text[text.index("jetstream {") : text.index("}", text.index("jetstream {"))]


def test_always_is_the_default_everywhere_mesh_writes_a_server_config() -> None:
    settings = load_settings(environ={}, config="/dev/null")
    assert settings.durability == "always"
    configs = {
        "nats/server.conf": rendered(settings)["server.conf"],
        "nats/examples/cluster/n1.conf": rendered(settings)["examples/cluster/n1.conf"],
        "mesh init --secure": render_server_config(settings, {"brain": "pw"}),
        "mesh install-units": units.config_files(units.Layout(), settings)["/etc/mesh/nats-server.conf"],
        "mesh up": server_config(4222, "/tmp/store"),
    }
    for where, text in configs.items():
        assert "sync_interval: always" in jetstream_block(text), where


def test_lazy_renders_a_two_minute_sync_interval() -> None:
    settings = load_settings(environ={"MESH_DURABILITY": "lazy"}, config="/dev/null")
    for text in (rendered(settings)["server.conf"], render_server_config(settings, {"brain": "pw"})):
        # quoted: unquoted, nats-server reads 2m as a size and refuses it as a duration
        assert 'sync_interval: "2m"' in jetstream_block(text)
        assert "always" not in jetstream_block(text).replace('durability = "always"', "")


def test_a_bad_durability_is_refused_saying_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"durability is 'sometimes': set 'always' .* or 'lazy'"):
        load_settings(environ={"MESH_DURABILITY": "sometimes"}, config="/dev/null")
    with pytest.raises(MeshError, match="must be 'always' or 'lazy'"):
        server_config(4222, "/tmp/store", durability="never")


@pytest.mark.integration
@pytest.mark.parametrize("durability", ["always", "lazy"])
def test_nats_server_starts_with_either(tmp_path: Path, durability: str) -> None:
    server = EmbeddedServer(tmp_path, port=-1, durability=durability)
    server.start()
    try:
        assert server.running()
        assert not [line for line in server.log_lines if "sync_interval" in line or "[ERR]" in line]
    finally:
        server.stop()


def test_plugfs_forgets_on_a_cut_what_was_not_synced() -> None:
    """The model of tests/plugfs.py, without mounting it: data survives a cut once synced, names
    once any sync came after them."""
    from tests.plugfs import Filesystem

    fs = Filesystem()
    fs.mkdir("/d", 0o755)
    fh = fs.create("/d/a", 0o644)
    fs.write("/d/a", b"kept", 0, fh)
    fs.fsync("/d/a", 0, fh)  # commits /d and /d/a with a's data
    fs.write("/d/a", b"-lost", 4, fh)
    synced = fs.create("/d/o_sync", 0o644, os.O_WRONLY | os.O_SYNC)
    fs.write("/d/o_sync", b"at once", 0, synced)  # durable as written, and so is its name
    fs.create("/d/late", 0o644)  # after the last sync: gone with the cut
    fs.rename("/d/a", "/d/b")  # likewise: a is back under its old name
    fs.cut()
    assert fs.readdir("/d", 0)[2:] == ["a", "o_sync"]
    assert fs.read("/d/a", 100, 0, fs.open("/d/a", os.O_RDONLY)) == b"kept"
    assert fs.read("/d/o_sync", 100, 0, fs.open("/d/o_sync", os.O_RDONLY)) == b"at once"
    assert fs.last_cut["files_lost"] == 1 and fs.last_cut["bytes_lost"] == 5
