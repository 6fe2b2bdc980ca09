"""Read a plan file from disk, and list the files its foreach globs match, next to it.

`load_plan` reads the file (UTF-8, within `PlanLimits.max_bytes`) and hands its
text to the pure parser `mesh.plan.parse_plan`, with `directory_glob`: a foreach
glob is resolved against the plan's directory and may not leave it (an absolute
pattern elsewhere, or '..'), unless `PlanLimits.glob_outside` allows it.
`directory_reader` reads the schema files its tasks name (`- schema: FILE.json`)
under the same rule, so the schema travels inside the submitted plan.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Mapping

from mesh.errors import PlanError, Problem
from mesh.events import PlanSpec
from mesh.plan import FileRefused, Glob, GlobRefused, PlanLimits, ReadFile, parse_plan, too_big
from mesh.validate import show as _show

__all__ = ["directory_glob", "directory_reader", "load_plan"]

# a schema file is small: anything bigger is a mistake (a wrong path), not a schema
MAX_SCHEMA_BYTES = 1024 * 1024

_GLOB_CHARS = frozenset("*?[")
_OUTSIDE_HINT = (
    "a foreach glob may name only files under the plan's directory: write a pattern "
    "relative to it, or allow others with `mesh submit --glob-outside` "
    "(the setting plan_glob_outside)"
)


def load_plan(
    path: str | os.PathLike[str],
    variables: Mapping[str, str] | None = None,
    *,
    limits: PlanLimits | None = None,
    matched: list[str] | None = None,
) -> PlanSpec:
    """Read the plan file at `path` (UTF-8) and parse it; see `parse_plan`.

    `matched`, when given, collects every path a foreach glob matched (relative to the plan's
    directory, or absolute as the pattern was): the files its bundle takes (`mesh.host.bundle`).

    The source is the path as given; the workdir is the file's absolute parent
    directory, where foreach globs are resolved (`directory_glob`). A file that
    cannot be read, or is bigger than `limits.max_bytes` (checked before it is
    read), raises `PlanError` as well.
    """
    source = os.fsdecode(os.fspath(path))
    limits = limits or PlanLimits()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = b"" if size > limits.max_bytes else f.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise PlanError(
            source,
            [
                Problem(
                    0, "plan file not found", "check the path; it is read relative to the current directory"
                )
            ],
        ) from None
    except IsADirectoryError:
        raise PlanError(
            source, [Problem(0, "this is a directory, not a plan file", "name a .md file")]
        ) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise PlanError(
            source, [Problem(0, f"cannot read the plan file: {reason}", "check the path and its permissions")]
        ) from None
    if size > limits.max_bytes or len(data) > limits.max_bytes:
        raise PlanError(source, [too_big(size if size > limits.max_bytes else 0, limits.max_bytes)]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PlanError(
            source,
            [
                Problem(
                    line,
                    f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                    "save the plan as UTF-8",
                )
            ],
        ) from None
    workdir = os.path.dirname(os.path.abspath(source))
    return parse_plan(
        text,
        source=source,
        variables=variables,
        workdir=workdir,
        limits=limits,
        glob=directory_glob(workdir, outside=limits.glob_outside, seen=matched),
        read=directory_reader(workdir, outside=limits.glob_outside),
    )


def directory_glob(workdir: str, *, outside: bool = False, seen: list[str] | None = None) -> Glob:
    """The files a foreach glob matches, a relative pattern resolved against `workdir` (the
    current directory when empty); with `outside` False, a pattern that leaves `workdir` is
    refused (`GlobRefused`). The matches are read lazily, as the parser asks for them, and
    each one read is added to `seen` when it is given."""

    def files(pattern: str) -> Iterable[str]:
        if not outside:
            why = _outside(pattern, workdir)
            if why:
                raise GlobRefused(why, _OUTSIDE_HINT)
        found = glob.iglob(pattern, root_dir=workdir or None, recursive=True)
        return found if seen is None else _noting(found, seen)

    return files


def _noting(paths: Iterable[str], seen: list[str]) -> Iterator[str]:
    for path in paths:
        seen.append(path)
        yield path


def directory_reader(workdir: str, *, outside: bool = False) -> ReadFile:
    """Reads a file a plan names (a schema), a relative path resolved against `workdir`; with
    `outside` False, a path that leaves `workdir` is refused (`FileRefused`), as a glob is."""

    def read(path: str) -> str:
        path = os.path.expanduser(path)  # (before the check: '~/x' may well be outside)
        if not outside:
            why = _outside(path, workdir)
            if why:
                raise FileRefused(why, _OUTSIDE_HINT.replace("a foreach glob", "a schema file"))
        full = os.path.join(workdir or os.curdir, path)
        try:
            with open(full, "rb") as f:
                data = f.read(MAX_SCHEMA_BYTES + 1)
        except FileNotFoundError:
            raise FileRefused(
                f"does not exist ({_show(full, 200)})", "the path is relative to the plan file's directory"
            ) from None
        except OSError as exc:
            raise FileRefused(
                f"cannot be read: {exc.strerror or exc}", "check the path and its permissions"
            ) from None
        if len(data) > MAX_SCHEMA_BYTES:
            raise FileRefused(f"is bigger than {MAX_SCHEMA_BYTES:,} bytes", "name the schema's JSON file")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FileRefused("is not UTF-8 text", "save the schema as UTF-8 JSON") from None

    return read


def _outside(pattern: str, workdir: str) -> str:
    """How a foreach glob reaches outside the plan's directory, or '' if it does not."""
    try:
        base = os.path.abspath(workdir or os.curdir)
    except OSError:  # the current directory is gone
        base = ""
    if os.path.isabs(pattern):
        prefix = base.rstrip(os.sep) + os.sep
        if not base or _GLOB_CHARS.intersection(base) or not pattern.startswith(prefix):
            return f"is an absolute pattern outside the plan's directory {_show(base, 200)}"
        pattern = pattern[len(prefix) :]
    if ".." in pattern.split(os.sep):
        return "goes up out of the plan's directory with '..'"
    return ""
