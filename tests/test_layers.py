"""The layers of mesh, checked by reading the source with `ast` (nothing is imported).

- The pure core (CORE) does no I/O and imports only the core.
- Subject strings are written only in mesh/names.py (and, for the JetStream API's
  `$JS.`/`$KV.`/`$O.` permission subjects, mesh/ops/security.py).
- No import cycle among the modules of mesh/ and agents/, counting imports inside functions.

Each check has an allow-list of what the code does today and the layered tree will remove.
A new violation fails; so does an entry that no longer happens (remove it from the list).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "agents")

# The pure core: decisions over data, no I/O. Everything else (the bus, agents, host code,
# ops tooling, the CLI) may import it; it imports nothing of theirs.
CORE = frozenset(
    f"mesh.{m}"
    for m in (
        "claims",
        "errors",
        "escalation",
        "events",
        "machine",
        "machine_admission",
        "machine_cascade",
        "machine_escalation",
        "machine_release",
        "machine_retry",
        "machine_state",
        "machine_step",
        "names",
        "placement",
        "plan",
        "records",
        "redact",
        "review",
        "shellquote",
        "status",
        "untrusted",
        "validate",
    )
)

# Imports that mean I/O (files, processes, sockets, the network, devices, models, a terminal).
IO_MODULES = frozenset(
    {
        "anthropic",
        "asyncio",
        "ctranslate2",
        "faster_whisper",
        "glob",
        "http",
        "llama_cpp",
        "nats",
        "os",
        "pathlib",
        "prometheus_client",
        "psutil",
        "pyarrow",
        "pynvml",
        "rich",
        "sentence_transformers",
        "shutil",
        "signal",
        "socket",
        "ssl",
        "subprocess",
        "tempfile",
        "torch",
        "typer",
        "urllib",
        "uvloop",
    }
)

# (core module, what it uses) that the core does today. The layered tree removes each.
ALLOWED_CORE = frozenset(
    {
        # parse_plan reads the plan file and expands `foreach` globs against the plan's directory;
        # the restructure moves reading files to the edge and hands the parser text and a file list.
        ("mesh.plan", "import glob"),
        ("mesh.plan", "import os"),
        ("mesh.plan", "open()"),
        # cost_usd takes a settings.Price (an annotation only); the restructure moves Price to the
        # core beside the escalation policy.
        ("mesh.escalation", "import mesh.settings"),
    }
)

# A subject, written out: `mesh.` or a prefix placeholder, then a subject space; or a
# JetStream/KV/object-store API subject.
SUBJECT = re.compile(
    r"^(?:(?:mesh|\{(?:[\w.]*\.)?(?:prefix|p)\})\.(?:cmd|work|evt|esc|tel)(?:\.|$)|\$(?:KV|JS|O)\.)"
)
API_SUBJECT = re.compile(r"^\$(?:KV|JS|O)\.")
NAMES_MODULE = "mesh.names"
# Where the NATS permissions are built: the `$JS.API.…`/`$KV.…`/`$O.…` subjects of a user.
API_SUBJECTS_MODULE = "mesh.ops.security"

# (module, subject as written) outside mesh/names.py today. The restructure moves each into names.
ALLOWED_SUBJECTS: frozenset[tuple[str, str]] = frozenset()

# Import cycles today (each a strongly connected set of modules), all closed by imports inside
# functions. The restructure breaks each: imports then point down only.
ALLOWED_CYCLES: frozenset[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def _modules() -> list[Module]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out.append(Module(name, path, ast.parse(path.read_text(), filename=str(path))))
    return out


MODULES = _modules()
NAMES = frozenset(m.name for m in MODULES)


def _imports(module: Module) -> Iterator[tuple[int, str]]:
    """(line, module imported) for every import, at module level or inside a function. `from
    mesh import x` yields `mesh.x` when x is a module; relative imports are resolved."""
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in NAMES else base


def _core_violations() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for module in MODULES:
        if module.name not in CORE:
            continue
        for _, imported in _imports(module):
            top = imported.split(".")[0]
            if top in IO_MODULES or (imported in NAMES and imported not in CORE):
                found.add((module.name, f"import {imported}"))
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                found.add((module.name, "open()"))
    return found


def test_core_does_no_io_and_imports_only_the_core() -> None:
    assert CORE <= NAMES, f"CORE names modules that do not exist: {sorted(CORE - NAMES)}"
    found = _core_violations()
    new = sorted(found - ALLOWED_CORE)
    assert not new, (
        f"the pure core must not do I/O nor import outside the core: {new}. Move the I/O to an edge "
        "module (bus, agents, cli) and pass the data in"
    )
    stale = sorted(ALLOWED_CORE - found)
    assert not stale, f"no longer happens, remove from ALLOWED_CORE: {stale}"


def _written(node: ast.Constant | ast.JoinedStr) -> str:
    """A string as written: an f-string's fields become `{expression}`."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value))
        elif isinstance(value, ast.FormattedValue):
            parts.append("{" + ast.unparse(value.value) + "}")
    return "".join(parts)


def _strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal and f-string that is not a docstring."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr) or (
            isinstance(node, ast.Constant) and isinstance(node.value, str)
        ):
            yield node.lineno, _written(node)


def _subject_violations() -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for module in MODULES:
        if module.name == NAMES_MODULE:
            continue
        for line, text in _strings(module.tree):
            if not SUBJECT.match(text):
                continue
            if module.name == API_SUBJECTS_MODULE and API_SUBJECT.match(text):
                continue
            found.setdefault((module.name, text), line)
    return found


def test_subjects_are_written_only_in_names() -> None:
    found = _subject_violations()
    new = sorted(
        f"{m.replace('.', '/')}.py:{line}: {text!r}"
        for (m, text), line in found.items()
        if (m, text) not in ALLOWED_SUBJECTS
    )
    assert not new, f"a subject is written outside mesh/names.py: {new}. Add a name to Names and use it"
    stale = sorted(ALLOWED_SUBJECTS - set(found))
    assert not stale, f"no longer written, remove from ALLOWED_SUBJECTS: {stale}"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m.name: set() for m in MODULES}
    for module in MODULES:
        for _, imported in _imports(module):
            # `import mesh.x.y` imports mesh.x too; take the longest module of ours it names
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                target = ".".join(parts[:end])
                if target in NAMES:
                    if target != module.name:
                        graph[module.name].add(target)
                    break
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.add(w)
                if w == v:
                    break
            if len(members) > 1:
                out.add(frozenset(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = _cycles(_graph())
    new = sorted(sorted(c) for c in found - ALLOWED_CYCLES)
    assert not new, (
        f"import cycle among {new} (imports inside functions count): make one of them import "
        "only downwards, or move what both need to a module below them"
    )
    stale = sorted(sorted(c) for c in ALLOWED_CYCLES - found)
    assert not stale, f"no longer a cycle, remove from ALLOWED_CYCLES: {stale}"


def test_the_checks_see_what_they_look_for() -> None:
    """The readers above find an upward import, an I/O import, `open()`, a subject and a cycle."""
    src = (
        "import subprocess\n"
        "def f():\n"
        "    from mesh import bus\n"
        "    open('x')\n"
        "    return f'{self.prefix}.evt.task.{x}', 'mesh.cmd.submit', '$KV.b.k', 'mesh.cli'\n"
    )
    module = Module("mesh.events", ROOT / "mesh" / "events.py", ast.parse(src))
    assert {imported for _, imported in _imports(module)} == {"subprocess", "mesh.bus"}
    written = [text for _, text in _strings(module.tree)]
    assert [t for t in written if SUBJECT.match(t)] == [
        "{self.prefix}.evt.task.{x}",
        "mesh.cmd.submit",
        "$KV.b.k",
    ]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset({"a", "b", "c"})}
