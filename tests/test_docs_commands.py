"""The docs' commands stay runnable: every `mesh ...` command line in a ```sh (bash, shell,
console) block of README.md and docs/*.md parses against the `mesh` command as it is now.

Each command is resolved through click's parser, group by group down to the command, and its
options and arguments parsed and converted (an unknown command or option, a missing argument,
a value of the wrong type all fail); nothing is run. Placeholders such as `<plan-id>` parse as
any other string, and `[--flag]` (optional syntax) as the flag.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from mesh.cli import app
from tests.conftest import ROOT

FENCE = re.compile(r"^```(sh|bash|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
# click's base of usage and parameter errors, as typer raises it (its own copy of click or click)
ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, the arguments after `mesh`) for every mesh command in the file's shell
    blocks. A console block's commands are its `$ ` lines; the rest is output."""
    text = path.read_text()
    found: list[tuple[int, list[str]]] = []
    for block in FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            number, line = first_line + i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):  # a continued line
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            if block.group(1) == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            found += [(number, args) for args in mesh_invocations(line)]
    return found


def mesh_invocations(line: str) -> list[list[str]]:
    """The arguments of each `mesh` (or `.../bin/mesh`) a shell line runs, after `sudo` and
    `NAME=value` prefixes; a line's pipes, `&&` and `;` separate commands."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a shell line (prose in a block)
        return []
    out: list[list[str]] = []
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        while segment and (segment[0] == "sudo" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0])):
            segment.pop(0)
        if segment and (segment[0] == "mesh" or segment[0].endswith("/bin/mesh")):
            out.append([t[1:-1] if re.fullmatch(r"\[--?[\w-]+\]", t) else t for t in segment[1:]])
        segment = []
    return out


def parse(args: list[str]) -> None:
    """Resolve and parse `mesh ARGS` as the command would, without running it (raises click's
    UsageError or BadParameter, a ClickException, when the command line is wrong)."""
    command: Any = typer.main.get_command(app)
    name, parent = "mesh", None
    while True:
        ctx = command.make_context(name, list(args), parent=parent)
        if not hasattr(command, "resolve_command"):  # a command, not a group
            return
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        command, parent = sub, ctx


ALL = [(f"{path.relative_to(ROOT)}:{n}", args) for path in doc_files() for n, args in commands(path)]


def test_the_docs_have_mesh_commands_to_check() -> None:
    assert len(ALL) > 50, "the extraction found (almost) nothing: is the fence pattern right?"
    assert any(where.startswith("README.md") for where, _ in ALL)


@pytest.mark.parametrize(("where", "args"), ALL, ids=[w for w, _ in ALL])
def test_a_documented_command_parses(where: str, args: list[str]) -> None:
    try:
        parse(args)
    except typer.Exit:  # an eager option (--help) that would have printed and ended
        pass
    except ClickException as exc:
        pytest.fail(f"{where}: `mesh {shlex.join(args)}` does not parse: {exc}")


def test_a_wrong_command_fails_to_parse() -> None:
    wrong = (["nosuch"], ["submit", "--no-such-option", "p.md"], ["gpu", "pause"], ["tail", "a", "b", "c"])
    for bad in wrong:
        with pytest.raises(ClickException):
            parse(bad)
    parse(["gpu", "pause", "0"])
    parse(["agent", "worker", "--gpu", "0"])


def test_shell_lines_are_split_into_mesh_commands() -> None:
    line = "MESH_CONFIG=x.toml sudo .venv/bin/mesh gpus --json | jq . && mesh tail 'alert.>'  # live"
    assert mesh_invocations(line) == [["gpus", "--json"], ["tail", "alert.>"]]
    assert mesh_invocations("mesh init --secure DIR [--verify-clients]") == [
        ["init", "--secure", "DIR", "--verify-clients"]
    ]
    assert mesh_invocations("nats sub 'mesh.evt.>'") == []
