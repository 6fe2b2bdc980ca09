"""`--help` of every `mesh` command renders, and prints every help text as written: nothing in brackets
is taken for markup and lost. The commands are enumerated from the app, so a new one is covered."""

from __future__ import annotations

import inspect
import re
from typing import Annotated

import click
import typer
from typer.testing import CliRunner

from mesh.cli import app
from mesh.cli.common import command_group

BRACKETED = re.compile(r"\[[^\[\]]*\]")
NASTY = "writes [/etc/mesh; ~/.config/mesh], [bold]not bold[/bold], [gpus.N] and [x]"


Found = list[tuple[tuple[str, ...], click.Command]]


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> Found:
    """Every command and group under `command`, with the words that reach it."""
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def _help_texts(command: click.Command) -> list[str]:
    """What the source says for a command: its help (up to a `\\f`, as click cuts it) and each shown
    parameter's."""
    texts = [inspect.cleandoc(command.help or "").partition("\f")[0]]
    for param in command.params:
        if not getattr(param, "hidden", False):
            texts.append(getattr(param, "help", None) or "")
    return texts


def _flat(text: str) -> str:
    return " ".join(text.split())


def _render(target: typer.Typer, words: tuple[str, ...]) -> str:
    result = CliRunner().invoke(target, [*words, "--help"], terminal_width=80)
    assert result.exit_code == 0, f"mesh {' '.join(words)} --help: {result.output}{result.exception!r}"
    assert "Usage:" in result.output, f"mesh {' '.join(words)} --help printed no usage"
    return result.output


def test_every_command_help_renders_with_its_bracketed_text() -> None:
    """`mesh install-units --help` once crashed on `[/etc/mesh; ...]` (rich read it as a closing tag),
    and `[health.NAME]`, `[models.NAME]`, `[default: cpu]` vanished from others as unknown styles."""
    commands = _commands(typer.main.get_command(app))
    paths = [path for path, _ in commands]
    assert len(paths) > 25 and ("install-units",) in paths and ("gpu", "pause") in paths
    tokens_seen = 0
    missing = []
    for path, command in commands:
        shown = _flat(_render(app, path))
        for text in _help_texts(command):
            for token in BRACKETED.findall(text):
                tokens_seen += 1
                if _flat(token) not in shown:
                    missing.append(f"mesh {' '.join(path)} --help lost {token!r}")
    assert not missing, missing
    assert tokens_seen >= 2, "[health.NAME] and [models.NAME] at least"


def test_a_group_made_for_mesh_prints_markup_as_text() -> None:
    """What a future command might say: a closing tag, a style name, a table name, brackets nested in
    text. Every group of `mesh` is made by `command_group`, which is where markup is turned off."""
    demo = command_group(help=NASTY)

    @demo.command()
    def go(opt: Annotated[str, typer.Option("--opt", help=NASTY)] = "") -> None:
        """Docstring with [/] and [red]x[/red] and [health.NAME]."""

    top = _flat(_render(demo, ()))
    sub = _flat(_render(demo, ("go",)))
    assert _flat(NASTY) in top
    assert _flat(NASTY) in sub and "Docstring with [/] and [red]x[/red] and [health.NAME]." in sub


def test_every_group_of_mesh_has_markup_off() -> None:
    """A group made with a bare `typer.Typer()` would parse its help as rich markup again."""
    for path, command in _commands(typer.main.get_command(app)):
        if isinstance(command, click.Group):
            assert getattr(command, "rich_markup_mode", "unset") is None, f"mesh {' '.join(path)}"
