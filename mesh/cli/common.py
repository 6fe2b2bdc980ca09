"""What every `mesh` command shares: the typer app and its global options, settings, the one
connection helper (`connected`), and errors turned into a message and an exit code (`run`, `fail`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import nats.errors
import nats.js.errors
import typer
from rich.console import Console
from rich.markup import escape

from agents.base import run_loop
from mesh import events
from mesh.bus.connect import connect
from mesh.bus.publish import Bus
from mesh.bus.store import full_error
from mesh.errors import MeshError
from mesh.host.config import load_settings
from mesh.settings import Settings


def command_group(**kwargs: Any) -> typer.Typer:
    """A typer app or command group whose help texts are printed as written.

    typer's default (`rich_markup_mode="rich"`) reads every help text and docstring as rich markup:
    `[health.NAME]` or `[default: cpu]` vanish as unknown styles and `[/etc/mesh]` crashes `--help`
    with a MarkupError. mesh's help texts are plain text (backticks, config table names, defaults in
    brackets), so no group of the `mesh` command parses them: each is made here, with markup off.
    """
    return typer.Typer(rich_markup_mode=None, **kwargs)


app = command_group(
    name="mesh",
    help="Run plans of local AI work across your GPUs, coordinated through NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


class Opts:
    server: str | None = None
    config: str | None = None


OPTS = Opts()


@app.callback()
def main(
    server: Annotated[
        str | None,
        typer.Option(
            "--server", "-s", help="NATS URL (else MESH_NATS_URL, the config file, the embedded default)"
        ),
    ] = None,
    config: Annotated[str | None, typer.Option("--config", help="config file (TOML)")] = None,
) -> None:
    OPTS.server = server
    OPTS.config = config


def settings(**overrides: Any) -> Settings:
    return load_settings(server=OPTS.server, config=OPTS.config, **overrides)


def checked_settings() -> Settings:
    try:
        return settings()
    except MeshError as exc:
        raise fail(str(exc)) from None


def fail(message: str, code: int = 2) -> typer.Exit:
    """The message printed as it is (a `[models.NAME]` in it is text, not markup), exit `code`."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning mesh and server errors into a message and an exit code."""
    try:
        return run_loop(coro_fn())  # type: ignore[arg-type]
    except MeshError as exc:
        raise fail(str(exc)) from None
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        if full_error(exc):
            raise fail(
                f"the NATS server's store is full (it says: {full_error(exc)}); nothing was written. "
                "Free space in its store (`mesh doctor` shows where and how much) and try again"
            ) from None
        raise fail(f"NATS error: {exc.__class__.__name__}: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@contextlib.asynccontextmanager
async def connected(s: Settings, name: str = "mesh-cli", wait_s: float = 0.0) -> AsyncIterator[Bus]:
    """A connection to the server for the length of the block, closed however the block ends."""
    bus = await connect(s, name, wait_s=wait_s)
    try:
        yield bus
    finally:
        await bus.close()


def parse_vars(pairs: list[str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise fail(f"--var wants NAME=value, got {pair!r}")
        values[name.strip()] = value
    return values


def load(
    path: Path,
    var: list[str] | None,
    s: Settings,
    glob_outside: bool = False,
    matched: list[str] | None = None,
) -> events.PlanSpec:
    """Read and check a plan within the limits of the settings `plan_*` (`matched` collects the
    files its foreach globs matched: they travel with it)."""
    from mesh.host.planfiles import load_plan
    from mesh.plan import PlanLimits

    limits = PlanLimits(
        max_expansions=s.plan_max_expansions,
        max_tasks=s.plan_max_tasks,
        max_bytes=s.plan_max_bytes,
        glob_outside=glob_outside or s.plan_glob_outside,
    )
    try:
        return load_plan(path, parse_vars(var), limits=limits, matched=matched)
    except MeshError as exc:
        raise fail(str(exc)) from None


VarOpt = Annotated[
    list[str] | None, typer.Option("--var", "-v", help="NAME=value, overriding a plan variable")
]
GlobOutsideOpt = Annotated[
    bool,
    typer.Option(
        "--glob-outside",
        help="let foreach globs match files outside the plan's directory (setting plan_glob_outside)",
    ),
]


def entry() -> None:
    try:
        app()
    except MeshError as exc:  # settings and config errors raised outside `run`
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
