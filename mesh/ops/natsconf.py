"""Render the `nats/` directory from the same definitions the agents apply.

    mesh init --render nats/

A test renders into a temporary dir and compares with the committed files, so
they never drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from mesh.bus.resources import bucket_definitions, consumer_definitions, stream_definitions
from mesh.ops.embedded import server_config
from mesh.ops.security import EXAMPLE_WORKERS, render_permissions
from mesh.ops.serverconf import cluster_server_config, gateway_host_config
from mesh.settings import Settings


def rendered(settings: Settings) -> dict[str, str]:
    """Relative path -> file text."""
    files: dict[str, str] = {
        "server.conf": "# A single-host nats-server with JetStream, as `mesh up` runs it.\n"
        "# Start it with: nats-server -c nats/server.conf\n"
        + server_config(
            4222, "/var/lib/mesh/jetstream", settings.max_payload_bytes, durability=settings.durability
        ),
    }
    for d in stream_definitions(settings):
        files[f"streams/{d['name']}.json"] = json.dumps(d, indent=2) + "\n"
    for d in bucket_definitions(settings):
        files[f"kv/{d['bucket']}.json"] = json.dumps(d, indent=2) + "\n"
    files["secure/permissions.conf"] = render_permissions(settings, EXAMPLE_WORKERS)
    files.update(examples(settings.durability))
    for c in consumer_definitions(settings):
        files[f"consumers/{c['stream']}.{c['config']['durable_name']}.json"] = (
            json.dumps(c["config"], indent=2) + "\n"
        )
    return files


def write_config(settings: Settings, directory: str | Path) -> list[Path]:
    base = Path(directory)
    written = []
    for rel, text in sorted(rendered(settings).items()):
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def examples(durability: str = "always") -> dict[str, str]:
    """The example configs of docs/multihost.md (three-server cluster, leaf node)."""
    hosts = ["n1.lan", "n2.lan", "n3.lan"]
    files: dict[str, str] = {}
    for i, host in enumerate(hosts):
        routes = [f"{h}:6222" for h in hosts if h != host]
        files[f"examples/cluster/n{i + 1}.conf"] = (
            f"# Server {i + 1} of a three-server JetStream cluster (docs/multihost.md).\n"
            "# Start it on its host with: nats-server -c n{i}.conf\n".replace("{i}", str(i + 1))
            + cluster_server_config(
                f"n{i + 1}",
                4222,
                6222,
                routes,
                "/var/lib/mesh/jetstream",
                host="0.0.0.0",
                durability=durability,
            )
        )
    files["examples/leaf/gateway-host.conf"] = gateway_host_config(4222)
    return files
