"""`mesh models`: the model registry and where each model's file is (listed by
`mesh.cli.gpus.models_list`), and `mesh models push`, which stores a model file in the models bucket.

A host that lacks a model's file fetches it from there into its model cache on first load
(docs/multihost.md#models).
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from mesh.cli.common import command_group, connected, fail, out, run, settings

models_app = command_group(
    help="The model registry, where each model's file is; `mesh models push` stores one for every host.",
)


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    offline: Annotated[
        bool, typer.Option("--offline", help="list the registry without asking the server")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object: the models and figures")] = False,
) -> None:
    """The model registry (config [models] over the built-in models), where each model's file
    is (this host, the models bucket, this host's model cache), where each is loaded now, and
    the figures the brain measured (load time, VRAM, task duration) beside the configured ones."""
    if ctx.invoked_subcommand is not None:
        return
    from mesh.cli.gpus import models_list

    models_list(offline, as_json)


def _is_gguf(path: str) -> bool:
    """Whether `path` is a file that starts as a GGUF does (its magic, b"GGUF")."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # (a directory among them)
        return False


@models_app.command("push")
def push(
    name: Annotated[str, typer.Argument(help="the model's name in the registry ([models.NAME])")],
    file: Annotated[
        str,
        typer.Argument(help="the model file (a GGUF) or directory; default: the registry's path for NAME"),
    ] = "",
) -> None:
    """Store a model file (or a model directory, file by file) in the models bucket, for hosts
    that lack it: a worker there fetches it into its model cache (checked by size and SHA-256)
    on the model's first load. Pushing the same bytes again sends nothing."""
    from mesh.bus.files import FileTransferError, sha256_file
    from mesh.bus.modelstore import models_store, push_model
    from mesh.host.modelfiles import resolve_path
    from mesh.host.telemetry import host_token
    from mesh.models import ModelError

    s = settings()
    spec = s.model_registry().get(name)
    if spec is None:
        raise fail(
            f"model {name!r} is not in the registry ({', '.join(sorted(s.model_registry()))}); "
            f"declare it under [models.{name}] first (the same on every host)"
        )
    if not file:
        try:
            file = resolve_path(name, spec)
        except ModelError as exc:
            raise fail(f"{exc}; or name the file: mesh models push {name} FILE") from None
    path = os.path.abspath(os.path.expanduser(file))
    is_dir = os.path.isdir(path)
    if not is_dir and not os.path.isfile(path):
        raise fail(f"{path} is not a file or directory")
    if spec.kind == "llm" and not _is_gguf(path):
        # (every host would fetch it, and every load there would fail)
        raise fail(f"{path} is not a GGUF file, which an llm model is: name the model's .gguf file")

    async def go() -> int:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=out,
            transient=True,
        ) as bar:
            hashed = None
            if is_dir:
                size = sum(
                    os.path.getsize(os.path.join(top, f))
                    for top, _, names in os.walk(path)
                    for f in names
                    if os.path.isfile(os.path.join(top, f))
                )
            else:
                size = os.path.getsize(path)
                hashing = bar.add_task(f"checksum {os.path.basename(path)}", total=size)
                hashed = await asyncio.to_thread(sha256_file, path)
                bar.update(hashing, completed=size, visible=False)
            sending = bar.add_task(f"push {name}", total=size)
            async with connected(s) as bus:
                store = await models_store(bus, create=True)
                assert store is not None
                try:
                    record, sent = await push_model(
                        store,
                        name,
                        path,
                        host=s.host_id or host_token(),
                        hashed=hashed,
                        progress=lambda done, total: bar.update(sending, completed=done),
                    )
                except FileTransferError as exc:
                    raise fail(str(exc)) from None
        mb = record.size / 1e6
        what = f"{record.file}/ ({len(record.files)} files, " if record.files else f"{record.object} ("
        said = (
            f"pushed {name}: {what}{mb:.1f} MB, sha256 {record.sha256[:12]})"
            if sent
            else f"{name}: the models bucket has these bytes already ({mb:.1f} MB); nothing sent"
        )
        out.print(said, highlight=False)
        return 0

    raise typer.Exit(run(go))
