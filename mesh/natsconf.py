"""Render the `nats/` directory from the same definitions the agents apply.

    mesh init --render nats/

A test renders into a temporary dir and compares with the committed files, so
they never drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from mesh.bus import bucket_definitions, consumer_definitions, stream_definitions
from mesh.embedded import server_config
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
    from mesh.security import EXAMPLE_WORKERS, render_permissions

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


def cluster_server_config(
    name: str,
    client_port: int,
    cluster_port: int,
    routes: list[str],
    store_dir: str,
    *,
    host: str = "127.0.0.1",
    cluster_name: str = "mesh",
    max_payload: int = 8 * 1024 * 1024,
    durability: str = "always",
) -> str:
    """One server of a JetStream cluster: its own name and store, and routes to the others
    (`host:port` of their cluster listeners). Streams and buckets kept on 3 of them survive
    one server's loss: set `replicas = 3` for the agents that create them."""
    route_lines = "".join(f'    "nats-route://{r}"\n' for r in routes)
    return (
        server_config(client_port, store_dir, max_payload, name=name, durability=durability).replace(
            f"listen: 127.0.0.1:{client_port}", f"listen: {host}:{client_port}"
        )
        + "cluster {\n"
        + f"  name: {cluster_name}\n"
        + f"  listen: {host}:{cluster_port}\n"
        + "  routes: [\n"
        + route_lines
        + "  ]\n"
        + "}\n"
    )


def leaf_server_config(name: str, port: int, remote_url_variable: str = "MESH_LEAF_URL") -> str:
    """A server with no JetStream of its own that reaches the mesh's server as a leaf node.

    Its clients (the gateway on an internet-connected host) connect to it on loopback; it
    forwards what they send over one outbound link whose user's permissions decide what
    crosses. They reach the rig's JetStream through its domain (`jetstream_domain`), on
    `$JS.<domain>.API.>`, which the rig's server maps to its own API. The link's URL, with
    that user's password, comes from the environment variable `remote_url_variable`
    (nats-leaf://USER:PASSWORD@HOST:7422), so no password is written here."""
    return (
        f"server_name: {name}\n"
        f"listen: 127.0.0.1:{port}\n"
        "leafnodes {\n"
        "  remotes: [\n"
        f"    {{ url: ${remote_url_variable} }}\n"
        "  ]\n"
        "}\n"
    )


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


def gateway_host_config(port: int) -> str:
    """The gateway host's leaf server, as `mesh init --secure --leaf-port P --domain D` writes it."""
    return (
        "# The gateway host's server: a leaf node of the GPU rig's server (docs/multihost.md).\n"
        "# It runs no JetStream: its clients reach the rig's, named by jetstream_domain.\n"
        "# Start it with (PASSWORD from the gateway.toml `mesh init --secure` wrote):\n"
        "#   MESH_LEAF_URL=nats-leaf://gateway:PASSWORD@rig.lan:7422 nats-server -c gateway-host.conf\n"
        + leaf_server_config("gateway-host", port)
    )
