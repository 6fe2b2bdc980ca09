"""The files a plan takes with it when it is submitted: those under its directory that its
foreach globs matched and its script bodies name, and the size they may add up to.

`bundle_files` looks on the submitting host, at submit time: every file a foreach glob matched
(the paths `mesh.host.planfiles.load_plan` collected), and every token of a shell, transcribe or
embed body, comments included, that names an existing file under the plan's directory (a
relative path, resolved against the directory, or an absolute path under it). Only files
travel: a token naming a directory brings none of its files. A file outside the directory, or
a link that leads out of it, stays behind (said in `BundleFiles.notes`). A bundle bigger than
the limit is refused (`BundleTooBig`) before anything is sent, naming its biggest files.
Storing the files is `mesh.bus.bundle`'s.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.errors import MeshError
from mesh.events import PlanSpec

MB = 1024 * 1024
# the body kinds whose bodies name files the task reads (an LLM's prompt is prose)
FILE_KINDS = frozenset({"shell", "transcribe", "embed"})
# the biggest files a refusal names
SHOWN = 5


class BundleTooBig(MeshError):
    """The files a plan references add up to more than `bundle_max_mb`."""


@dataclass(frozen=True)
class BundleFile:
    """A file that travels: where it belongs under the plan's directory ('/'-separated), and
    where it is on this host."""

    rel: str
    path: str
    size: int


@dataclass
class BundleFiles:
    """What a plan takes with it, and what it names that stays behind (and why)."""

    root: str
    files: list[BundleFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _under(rel: str) -> bool:
    """Whether a relative path stays under its base."""
    return not (rel == os.pardir or rel.startswith(os.pardir + os.sep))


def body_tokens(body: str) -> list[str]:
    """The words of a body as a shell reads them (quotes removed, `|;&<>` apart), comments
    included (`# reads conf/x.json` names a file a script opens by itself), and the value of
    each `--opt=VALUE`; plain whitespace splitting when the body does not parse."""
    try:
        lex = shlex.shlex(body, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = ""
        words = list(lex)
    except ValueError:
        words = body.split()
    out: list[str] = []
    for word in words:
        out.append(word)
        if "=" in word:
            out.append(word.rsplit("=", 1)[1])
    return out


def bundle_files(spec: PlanSpec, matched: Iterable[str] = (), *, max_mb: int) -> BundleFiles:
    """The files under the plan's directory (`spec.workdir`) that travel with it: the foreach
    glob matches `matched` and the files its script bodies name. Raises `BundleTooBig` when they
    add up to more than `max_mb` MB; `max_mb` 0 bundles nothing."""
    if not spec.workdir:
        return BundleFiles(root="")
    base = os.path.abspath(spec.workdir)
    found = BundleFiles(root=base)
    if max_mb <= 0:
        found.notes.append("bundle_max_mb is 0: no file travels with the plan")
        return found
    try:
        real_base = os.path.realpath(base)
    except OSError:
        return found
    seen: set[str] = set()

    def take(name: str, why: str, *, quiet: bool) -> None:
        full = os.path.abspath(os.path.join(base, os.path.expanduser(name)))
        if full in seen:
            return
        seen.add(full)
        rel = os.path.relpath(full, base)
        if not _under(rel) or rel == os.curdir:
            if not quiet and os.path.isfile(full):
                found.notes.append(f"{name} ({why}) is outside the plan's directory: it does not travel")
            return
        if os.path.isdir(full):
            if not quiet:
                found.notes.append(f"{name} ({why}) is a directory: only files travel, name them")
            return
        if not os.path.isfile(full):
            return
        real = os.path.realpath(full)
        if not _under(os.path.relpath(real, real_base)):
            found.notes.append(f"{name} ({why}) is a link out of the plan's directory: it does not travel")
            return
        try:
            size = os.stat(full).st_size
        except OSError:
            return
        if os.path.isabs(os.path.expanduser(name)):
            found.notes.append(
                f"{name} ({why}) is named by its absolute path: it travels, but on another host the "
                "task runs in a work directory where that path does not exist; write it relative"
            )
        found.files.append(BundleFile(rel=rel.replace(os.sep, "/"), path=full, size=size))

    for path in matched:
        take(path, "a foreach glob matched it", quiet=False)
    for task in spec.tasks:
        if task.kind not in FILE_KINDS:
            continue
        for token in body_tokens(task.body):
            if token and token[0] not in "-$" and not token.startswith(("http:", "https:")):
                take(token, f"named by task {task.id}", quiet=True)
    total = found.size
    if total > max_mb * MB:
        biggest = sorted(found.files, key=lambda f: -f.size)[:SHOWN]
        shown = ", ".join(f"{f.rel} ({f.size / MB:.1f} MB)" for f in biggest)
        raise BundleTooBig(
            f"the {len(found.files)} files the plan uses under {base} add up to {total / MB:.1f} MB, "
            f"more than bundle_max_mb ({max_mb} MB); nothing was submitted. The biggest: {shown}. "
            "Put big inputs where every host reads them (a shared path, named by an absolute path "
            "outside the plan's directory), or raise the limit (setting bundle_max_mb, env "
            "MESH_BUNDLE_MAX_MB)"
        )
    return found
