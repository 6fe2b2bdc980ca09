"""The layers of mesh, checked by reading the source with `ast` (nothing is imported).

- The pure core (CORE: every module at the top of mesh/) does no I/O and imports only the core.
- Subject strings are written only in mesh/names.py (and, for the JetStream API's
  `$JS.`/`$KV.`/`$O.` permission subjects, mesh/ops/security.py).
- No import cycle among the modules of mesh/ and agents/, counting imports inside functions.
- Every module opens with a docstring whose first paragraph (one or two lines) says its job,
  and says more after it.
- Imports point down the layers the tree shows (LAYERS): the core (the flat modules of
  mesh/), then mesh/bus/ and mesh/host/ (neither imports the other), agents/, mesh/ops/,
  and the CLI (mesh/cli/) on top.

There are no allow-lists: each check holds for the whole tree.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "agents")


# Imports that mean I/O (files, processes, sockets, the network, devices, models, a terminal).
IO_MODULES = frozenset(
    {
        "aiohttp",
        "anthropic",
        "asyncio",
        "ctranslate2",
        "ctypes",
        "faster_whisper",
        "glob",
        "http",
        "httpx",
        "importlib",
        "io",
        "llama_cpp",
        "multiprocessing",
        "nats",
        "os",
        "pathlib",
        "prometheus_client",
        "psutil",
        "pyarrow",
        "requests",
        "pynvml",
        "rich",
        "sentence_transformers",
        "shutil",
        "signal",
        "socket",
        "sqlite3",
        "ssl",
        "subprocess",
        "tempfile",
        "torch",
        "typer",
        "urllib",
        "uvloop",
    }
)

# A subject, written out: `mesh.` or a prefix placeholder, then a subject space; or a
# JetStream/KV/object-store API subject.
SUBJECT = re.compile(
    r"^(?:(?:mesh|\{(?:[\w.]*\.)?(?:prefix|p)\})\.(?:cmd|work|evt|esc|tel|stream)(?:\.|$)|\$(?:KV|JS|O)\.)"
)
API_SUBJECT = re.compile(r"^\$(?:KV|JS|O)\.")
NAMES_MODULE = "mesh.names"
# Where the NATS permissions are built: the `$JS.API.…`/`$KV.…`/`$O.…` subjects of a user.
API_SUBJECTS_MODULE = "mesh.ops.security"


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
    new = sorted(found)
    assert not new, (
        f"the pure core must not do I/O nor import outside the core: {new}. Move the I/O to an edge "
        "module (bus, agents, cli) and pass the data in"
    )


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
    new = sorted(f"{m.replace('.', '/')}.py:{line}: {text!r}" for (m, text), line in found.items())
    assert not new, f"a subject is written outside mesh/names.py: {new}. Add a name to Names and use it"


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
    new = sorted(sorted(c) for c in found)
    assert not new, (
        f"import cycle among {new} (imports inside functions count): make one of them import "
        "only downwards, or move what both need to a module below them"
    )


# The layers, lowest first: a module may import its own layer and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("mesh.bus", "mesh.host"),
    ("agents",),
    ("mesh.ops",),
    ("mesh.cli",),
)
# The package itself: `mesh/__init__.py` preloads a GPU worker's native libraries (host) before
# anything else is imported, and `python -m mesh` runs the CLI. Neither is imported for its names.
ENTRY_MODULES = frozenset({"mesh", "mesh.__main__"})


def layer_of(module: str) -> str:
    """The layer a module of mesh/ or agents/ belongs to, read from its place in the tree."""
    for group in LAYERS:
        for layer in group:
            if module == layer or module.startswith(layer + "."):
                return layer
    parts = module.split(".")
    assert parts[0] == "mesh" and len(parts) == 2, f"{module} is in no layer: put it in one (LAYERS)"
    return "core"


RANK = {layer: rank for rank, group in enumerate(LAYERS) for layer in group}
# The pure core: decisions over data, no I/O: every module at the top of mesh/. Everything else (the
# bus, host code, agents, ops tooling, the CLI) may import it; it imports nothing of theirs.
CORE = frozenset(m.name for m in MODULES if m.name not in ENTRY_MODULES and layer_of(m.name) == "core")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        if module in ENTRY_MODULES:
            continue
        mine = layer_of(module)
        for target in sorted(imported - ENTRY_MODULES):
            theirs = layer_of(target)
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
                found.append(f"{module} ({mine}) imports {target} ({theirs})")
    return found


def test_imports_point_down_the_layers() -> None:
    found = _upward(_graph())
    assert not found, (
        f"an import points up or across the layers: {found}. Move what both need down to a "
        "layer below both (the core when it is pure), or pass it in"
    )


def test_every_module_says_its_job() -> None:
    missing = []
    for module in MODULES:
        doc = ast.get_docstring(module.tree) or ""
        job = doc.split("\n\n")[0].splitlines()
        if not 1 <= len(job) <= 2 or len([line for line in doc.splitlines() if line.strip()]) < 2:
            missing.append(f"{module.path.relative_to(ROOT)}: {job[:3]}")
    assert not missing, (
        "every module opens with a docstring: its job in one or two lines, then a paragraph or a "
        f"line more (what it leaves to others, how it is used): {missing}"
    )


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
    assert _upward(
        {
            "mesh.events": {"mesh.bus.publish"},
            "mesh.bus.read": {"mesh.host.gpu", "mesh.names"},
            "agents.brain": {"mesh.ops.up", "mesh.machine", "mesh.bus.read"},
            "mesh.cli.app": {"agents.brain", "mesh.ops.up"},
        }
    ) == [
        "agents.brain (agents) imports mesh.ops.up (mesh.ops)",
        "mesh.bus.read (mesh.bus) imports mesh.host.gpu (mesh.host)",
        "mesh.events (core) imports mesh.bus.publish (mesh.bus)",
    ]
