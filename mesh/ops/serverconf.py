"""nats-server configs beyond the embedded one: a server of a cluster, a leaf node, the gateway host's.

`mesh init` writes them (natsconf for the examples, security for `--secure --leaf-port`).
"""

from __future__ import annotations

from mesh.ops.embedded import server_config


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


def gateway_host_config(port: int) -> str:
    """The gateway host's leaf server, as `mesh init --secure --leaf-port P --domain D` writes it."""
    return (
        "# The gateway host's server: a leaf node of the GPU rig's server (docs/multihost.md).\n"
        "# It runs no JetStream: its clients reach the rig's, named by jetstream_domain.\n"
        "# Start it with (PASSWORD from the gateway.toml `mesh init --secure` wrote):\n"
        "#   MESH_LEAF_URL=nats-leaf://gateway:PASSWORD@rig.lan:7422 nats-server -c gateway-host.conf\n"
        + leaf_server_config("gateway-host", port)
    )
