"""Bringing mesh up on a host, the library side of `mesh init --secure` and `mesh up`: the secure
config's defaults and checks, the model workers `--gpus` asks for, a stack supervised while work runs.

The CLI parses the options, calls these and says what happened; nothing here prints.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from mesh.errors import ConfigError
from mesh.ops.security import Tls, write_secure
from mesh.ops.up import Stack
from mesh.settings import Settings


def init_secure(
    s: Settings,
    directory: Path,
    *,
    workers: list[str] | None,
    url: str | None,
    port: int,
    store_dir: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    verify_clients: bool,
    leaf_port: int,
    domain: str,
) -> list[Path]:
    """`mesh init --secure DIR`: `security.write_secure` with this host's defaults (a user per
    GPU of this host and one CPU worker; the URL `<scheme>://<host>:<port>`), after checking
    the options go together. Returns the files written."""
    from mesh.host.gpu import count_gpus
    from mesh.host.telemetry import host_token

    host = host_token()
    if not workers:
        workers = [f"worker-{host}-gpu{i}" for i in range(count_gpus())] + [f"worker-{host}-cpu1"]
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError(
            "--tls-cert and --tls-key go together: the server needs its certificate and its key"
        )
    if domain and not leaf_port:
        raise ConfigError("--domain needs --leaf-port: the domain is how a leaf node server reaches this one")
    if verify_clients and not tls_ca:
        raise ConfigError(
            "--verify-clients needs --tls-ca: the CA the clients' certificates are checked against"
        )
    for path in (tls_cert, tls_key, tls_ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path} is not a file")
    tls = None
    if tls_cert and tls_key:
        tls = Tls(
            str(tls_cert.resolve()),
            str(tls_key.resolve()),
            str(tls_ca.resolve()) if tls_ca else "",
            verify_clients,
        )
    scheme = "tls" if tls else "nats"
    server_url = url or f"{scheme}://{host}:{port}"
    return write_secure(
        s,
        directory,
        workers=workers,
        server_url=server_url,
        port=port,
        store_dir=store_dir,
        tls=tls,
        client_ca=str(tls_ca.resolve()) if tls_ca else "",
        leaf_port=leaf_port,
        domain=domain,
    )


def model_workers(spec: str) -> tuple[int | tuple[int, ...] | None, ...]:
    """`mesh up --gpus`: 'auto' (one per NVIDIA GPU, else one on the CPU), 'off', or a comma list
    of model workers, each a GPU index, a set of GPUs joined by '+' (one worker for a model
    bigger than one card), or 'cpu': `0+3,1,2,4,cpu`. Per model worker: a GPU index, a tuple of
    indices for a set, None for the CPU standing in for a GPU. A GPU belongs to one worker."""
    from mesh.host.gpu import GpuError, gpu_label, parse_gpus

    word = spec.strip().lower()
    if word == "off":
        return ()
    if word == "auto":
        from mesh.host.gpu import count_gpus

        n = count_gpus()
        return tuple(range(n)) if n else (None,)
    workers: list[int | tuple[int, ...] | None] = []
    owner: dict[int, str] = {}
    for part in (p.strip() for p in word.split(",")):
        if not part:
            continue
        try:
            indices = parse_gpus(part)
        except GpuError as exc:
            raise ConfigError(
                f"--gpus {spec!r}: write auto, cpu, off, or GPU indices such as 0,1, a set of GPUs "
                f"for one worker joined by '+' (0+3,1,cpu); {exc}"
            ) from None
        for index in indices:
            if index in owner:
                raise ConfigError(
                    f"--gpus {spec!r}: GPU {index} is in {owner[index]} and in {part}: a GPU belongs "
                    "to one worker"
                )
            owner[index] = gpu_label(indices)
        workers.append(None if not indices else indices[0] if len(indices) == 1 else indices)
    return tuple(workers)


def supervise(stack: Stack, stop: threading.Event) -> None:
    """Restart what dies in the stack until `stop` is set."""
    while not stop.wait(0.5):
        stack.supervise()


def supervise_while(stack: Stack, stop: threading.Event, work: Callable[[], int]) -> int:
    """Run `work` in a thread while supervising the stack, until it ends or `stop` is set.
    Returns what `work` returned, or 130 when it did not (stopped, or it raised)."""
    result: dict[str, int] = {}

    def target() -> None:
        try:
            result["code"] = work()
        finally:
            stop.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    supervise(stack, stop)
    thread.join(timeout=5)
    return result.get("code", 130)
