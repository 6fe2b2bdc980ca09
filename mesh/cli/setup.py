"""Setting mesh up: `mesh init` (the server's streams and buckets, its config files, a secure
config with a user per role) and `mesh up` (a whole mesh on this machine, in the foreground).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from agents.base import run_loop
from mesh import events
from mesh.cli import outputs
from mesh.cli.common import (
    OPTS,
    GlobOutsideOpt,
    VarOpt,
    connected,
    err,
    fail,
    load,
    out,
    run,
    settings,
)
from mesh.cli.plans import follow_plan, plan_files, send_plan
from mesh.errors import MeshError
from mesh.events import TASK_CLASSES
from mesh.host.bundle import BundleFiles
from mesh.host.config import load_settings
from mesh.host.logs import configure

if TYPE_CHECKING:
    from mesh.ops.up import Stack


def _unwritable(where: Path, exc: OSError) -> str:
    """What a failed write of files into `where` says (a full disk, a file where a directory
    should be, a directory mesh may not write)."""
    name = exc.filename or where
    return (
        f"could not write {name}: {exc.strerror or exc}. Name a directory mesh may write, with room "
        "on its disk"
    )


def init(
    render_dir: Annotated[
        Path | None, typer.Option("--render", help="write the nats/ config files to this dir instead")
    ] = None,
    secure_dir: Annotated[
        Path | None,
        typer.Option(
            "--secure",
            help="write a server config with a user per role, and each role's config file, to this dir",
        ),
    ] = None,
    worker: Annotated[
        list[str] | None,
        typer.Option(
            "--worker",
            help="with --secure: a worker's id, one user each (a GPU worker's is worker-<host>-gpu<N>) "
            "(default: this host's GPUs and worker-<host>-cpu1)",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="with --secure: the URL the agents reach the server at (default: nats://<host>:4222)",
        ),
    ] = None,
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="with --secure: the server's client port")
    ] = 4222,
    store_dir: Annotated[
        str, typer.Option("--store-dir", help="with --secure: the server's JetStream store")
    ] = "/var/lib/mesh/jetstream",
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="with --secure: the server's TLS certificate (PEM)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="with --secure: its private key")] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="with --secure: the CA that signed it (the agents trust this CA)"),
    ] = None,
    verify_clients: Annotated[
        bool, typer.Option("--verify-clients", help="with --tls-ca: also require client certificates")
    ] = False,
    leaf_port: Annotated[
        int,
        typer.Option(
            "--leaf-port", min=0, max=65535, help="with --secure: accept leaf node connections on this port"
        ),
    ] = 0,
    domain: Annotated[
        str,
        typer.Option(
            "--domain",
            help="with --leaf-port: name the server's JetStream domain, and write gateway.toml and "
            "gateway-host.conf for a gateway on a leaf node server (docs/multihost.md)",
        ),
    ] = "",
) -> None:
    """Create (or update) every stream, bucket and consumer on the server. Safe to repeat."""
    s = settings()
    if secure_dir is not None:
        from mesh.ops import bootstrap

        try:
            written = bootstrap.init_secure(
                s,
                secure_dir,
                workers=worker,
                url=url,
                port=port,
                store_dir=store_dir,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_ca=tls_ca,
                verify_clients=verify_clients,
                leaf_port=leaf_port,
                domain=domain,
            )
        except (MeshError, ValueError) as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(_unwritable(secure_dir, exc)) from None
        for path in written:
            out.print(f"wrote {path}", highlight=False)
        out.print(
            f"start the server with `nats-server -c {secure_dir / 'server.conf'}`; give each agent its "
            "file (MESH_CONFIG=FILE), keep them mode 0600; then `mesh --config "
            f"{secure_dir / 'cli.toml'} init` creates the streams and buckets",
            highlight=False,
        )
        if domain:
            out.print(
                "on the gateway host: `MESH_LEAF_URL=nats-leaf://gateway:PASSWORD@<this host>:"
                f"{leaf_port} nats-server -c gateway-host.conf` (PASSWORD from gateway.toml), then "
                "`MESH_CONFIG=gateway.toml mesh agent gateway`",
                highlight=False,
            )
        return
    if render_dir is not None:
        from mesh.ops.natsconf import write_config

        try:
            rendered_files = write_config(s, render_dir)
        except OSError as exc:
            raise fail(_unwritable(render_dir, exc)) from None
        for path in rendered_files:
            out.print(f"wrote {path}")
        return

    async def go() -> int:
        async with connected(s) as bus:
            # every class's queue: workers whose users may not create consumers bind to them
            await bus.ensure_resources(TASK_CLASSES)
            n = s.names
            out.print(f"streams: {n.events_stream}, {n.work_stream}, {n.cmd_stream}, {n.esc_stream}")
            out.print(f"buckets: {n.tasks_bucket}, {n.plans_bucket}, {n.agents_bucket}, {n.gateway_bucket}")
            return 0

    raise typer.Exit(run(go))


def up(
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="server store and logs")] = None,
    port: Annotated[int | None, typer.Option("--port", help="server port (default 4222)")] = None,
    workers: Annotated[int, typer.Option("--workers", help="CPU workers to start")] = 2,
    slots: Annotated[int, typer.Option("--slots", help="concurrent tasks per worker")] = 2,
    gpus: Annotated[
        str,
        typer.Option(
            "--gpus",
            help="model workers: 'auto' (one per NVIDIA GPU, else one on the CPU), 'cpu', 'off', "
            "or GPU indices such as 0,1; '+' joins GPUs into one worker's set (0+3,1,cpu)",
        ),
    ] = "auto",
    plan: Annotated[
        Path | None, typer.Option("--submit", help="submit this plan, follow it, then stop everything")
    ] = None,
    var: VarOpt = None,
    glob_outside: GlobOutsideOpt = False,
    show_outputs: Annotated[
        bool, typer.Option("--outputs", help="with --submit: show every task's output when the plan ends")
    ] = False,
) -> None:
    """Start an embedded nats-server, a brain, N CPU workers, the model workers and the web
    console (its URL is printed); Ctrl-C stops them all."""
    from mesh.ops import bootstrap
    from mesh.ops.up import Stack

    configure()
    s = settings()
    matched: list[str] = []
    spec = load(plan, var, s, glob_outside, matched) if plan is not None else None
    files = plan_files(spec, matched, s) if spec is not None else None
    data = Path(data_dir or s.data_dir)
    try:
        model_workers = bootstrap.model_workers(gpus)
    except MeshError as exc:
        raise fail(str(exc)) from None
    web_port = _free_port(s.web_host, s.web_port)
    stack = Stack(
        str(data),
        port or s.embedded_port,
        workers,
        slots,
        log_dir=str(data / "logs"),
        gpus=model_workers,
        durability=s.durability,
        web_port=web_port,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except MeshError as exc:
        raise fail(str(exc)) from None
    err.print(
        f"mesh up: server {stack.url}, store {data / 'jetstream'} (durability {s.durability}), "
        f"brain + {workers} worker(s)"
        f" + {len(model_workers)} model worker(s) ({_show_gpus(model_workers)}) + watchdog + gateway, "
        f"logs in {data / 'logs'}"
    )
    host = f"[{s.web_host}]" if ":" in s.web_host else s.web_host
    err.print(f"console: http://{host}:{web_port}/", highlight=False, soft_wrap=True)
    code = 0
    try:
        if spec is None:
            err.print("watch it: `mesh tail` or `nats sub 'mesh.evt.>'`; Ctrl-C stops everything")
            bootstrap.supervise(stack, stop)
        else:
            code = bootstrap.supervise_while(
                stack, stop, lambda: _submit_and_follow(stack, spec, files, show_outputs)
            )
    finally:
        err.print("stopping agents and server…")
        stack.stop()
    raise typer.Exit(code)


def _free_port(host: str, port: int) -> int:
    """The console's port: `port`, or where something else holds it, a free one."""
    import socket

    for want in (port, 0):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, want))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    return port


def _show_gpus(gpus: tuple[int | tuple[int, ...] | None, ...]) -> str:
    from mesh.host.gpu import as_indices, gpu_label

    return ", ".join("cpu" if g is None else f"gpu {gpu_label(as_indices(g))}" for g in gpus) or "none"


def _submit_and_follow(
    stack: Stack, spec: events.PlanSpec, files: BundleFiles | None, show_outputs: bool = False
) -> int:
    """Submit the plan to the stack's server and show it to its end (runs in a thread of its own)."""
    s = load_settings(server=stack.url, config=OPTS.config)

    async def go() -> int:
        async with connected(s, "mesh-up", wait_s=10.0) as bus:
            await bus.ensure_resources()
            pid = await send_plan(bus, s, spec, files or BundleFiles(root=""))
            err.print(f"submitted {escape(spec.source or spec.title)} as {pid}")
            code = await follow_plan(bus, pid, len(spec.tasks), brain_starting=True)
            if show_outputs:
                await outputs.show_all(bus, pid)
            return code

    try:
        return run_loop(go())
    except MeshError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
