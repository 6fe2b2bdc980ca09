"""Fill a plan's `{NAME}`s with its variables, and expand a foreach into its items.

`Expander` resolves `## Variables` (defaults and `--var` overrides), substitutes
values into fields and bodies (quoted for their place in a shell body, by
`mesh.shellquote`), and reads a foreach's comma list or glob, counting what the
plan spends against its bounds. It reads no file: a glob's files come from the
`Glob` function its caller gives (none: a glob is refused).
"""

from __future__ import annotations

import functools
import re
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping

from mesh import shellquote
from mesh.planproblems import MAX_SUGGESTIONS, Report, closest
from mesh.planscan import RawTask
from mesh.validate import NAME_RE
from mesh.validate import show as _show

# The files port of a foreach glob: the paths `pattern` matches, in any order (they are sorted),
# read lazily (the parser stops at the first match past its limit). It raises `GlobRefused` for a
# pattern it will not read, and OSError, ValueError or RecursionError for one it cannot.
Glob = Callable[[str], Iterable[str]]

SUBST_RE = re.compile(r"\{\{|\}\}|(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)(:raw)?\}")
_ITEM_RE = re.compile(r"[^,]+")
_FOREACH_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]+in(?:[ \t]+(.*))?", re.IGNORECASE)
_GLOB_CHARS = frozenset("*?[")

_FOREACH_HINT = (
    "write '- foreach: NAME in a, b, c' (a comma list) or '- foreach: NAME in data/*.csv' (a glob)"
)


class GlobRefused(Exception):
    """A `Glob` will not read this pattern: `reason` ends the sentence "foreach glob 'P' of task
    'T' ...", and `hint` says what to do instead."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@functools.lru_cache(maxsize=256)
def _template(text: str) -> tuple[tuple[str, ...], tuple[tuple[str, bool, int, str], ...]]:
    """`text` cut at its `{NAME}`s: the literal pieces (with `{{`/`}}` made braces), and for each
    `{NAME}` its name, whether it is `:raw`, where it starts and the text of it. Cached: each
    expansion of a foreach task has the same texts."""
    pieces: list[str] = []
    names: list[tuple[str, bool, int, str]] = []
    buf: list[str] = []
    last = 0
    for m in SUBST_RE.finditer(text):
        buf.append(text[last : m.start()])
        last = m.end()
        whole = m.group(0)
        if whole == "{{" or whole == "}}":
            buf.append(whole[0])
            continue
        pieces.append("".join(buf))
        buf = []
        names.append((m.group(1), m.group(2) is not None, m.start(), whole))
    buf.append(text[last:])
    pieces.append("".join(buf))
    return tuple(pieces), tuple(names)


class Bound(Mapping[str, str]):
    """The plan's variables with a foreach variable bound over them (a view: no copy per item)."""

    __slots__ = ("base", "item", "name")

    def __init__(self, name: str, item: str, base: Mapping[str, str]) -> None:
        self.name = name
        self.item = item
        self.base = base

    def __getitem__(self, key: str) -> str:
        return self.item if key == self.name else self.base[key]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self.item if key == self.name else self.base.get(key, default)

    def __iter__(self) -> Iterator[str]:
        yield self.name
        yield from (k for k in self.base if k != self.name)

    def __len__(self) -> int:
        return len(self.base) + (self.name not in self.base)


class Expander:
    """The plan's variables and foreach items, within its bounds: `max_bytes` for the parsed
    plan (what it has `spent` so far), `max_expansions` foreach items in all (`expanded`)."""

    def __init__(
        self,
        report: Report,
        overrides: dict[str, str],
        *,
        workdir: str,
        files: Glob | None,
        no_files: str,
        max_bytes: int,
        max_expansions: int,
    ) -> None:
        self.report = report
        self.overrides = overrides
        self.workdir = workdir
        self.files = files
        self.no_files = no_files  # why a glob is refused when there is no files port
        self.max_bytes = max_bytes
        self.max_expansions = max_expansions
        self.refusals = 0  # values a shell body could not take, reported so far
        # the bounds: foreach items so far, and bytes of the parsed plan so far
        self.expanded = 0
        self.spent = 0
        self.over = False  # the plan outgrew max_bytes or max_tasks: stop building it

    def subst(self, text: str, line: int, values: Mapping[str, str]) -> str:
        """Replace `{NAME}` (and `{NAME:raw}`) by its value; `{{`/`}}` are braces; `${NAME}` is left alone."""
        if "{" not in text and "}" not in text:
            return text
        split = self._holes(text, line, values)
        if split is None:
            return text
        pieces, holes, _ = split
        out = [pieces[0]]
        for hole, piece in zip(holes, pieces[1:], strict=True):
            out.append(hole.value)
            out.append(piece)
        return "".join(out)

    def subst_shell(self, text: str, line: int, values: Mapping[str, str]) -> str:
        """`_subst` for a shell body: each value is written quoted for its place in the script
        (`mesh.shellquote`), except `{NAME:raw}`; a value no quoting can hold is reported."""
        if "\x00" in text:
            self.report.add(
                line, "the shell body has a NUL byte, which bash cannot take", "remove the NUL byte"
            )
        if "{" not in text and "}" not in text:
            return text
        split = self._holes(text, line, values)
        if split is None:
            return text
        pieces, holes, starts = split
        if not holes:
            return "".join(pieces)
        out, refusals = shellquote.fill(pieces, holes)
        for r in refusals:
            self.refusals += 1
            if self.refusals > MAX_SUGGESTIONS:
                if self.refusals == MAX_SUGGESTIONS + 1:
                    self.report.add(
                        line, "more values that the shell bodies cannot take are not shown", "fix the above"
                    )
                continue
            hole = holes[r.index]
            where = line + text.count("\n", 0, starts[r.index])
            self.report.add(where, f"{{{hole.name}}} ({_show(hole.value)}) {r.message}", r.hint)
        return out

    def _holes(
        self, text: str, line: int, values: Mapping[str, str]
    ) -> tuple[list[str], list[shellquote.Hole], list[int]] | None:
        """`text` cut at its `{NAME}`s: the literal pieces between them (with `{{`/`}}` made
        braces), the values, and where each `{NAME}` starts. An unknown name is reported and
        kept as text. None (reported) if the result would make the plan outgrow max_bytes."""
        cut, names = _template(text)
        pieces = [cut[0]]
        holes: list[shellquote.Hole] = []
        starts: list[int] = []
        size = 0
        for (name, raw, at, whole), piece in zip(names, cut[1:], strict=True):
            value = values.get(name)
            if value is None:
                self._unknown(name, line + text.count("\n", 0, at), values)
                pieces[-1] += whole + piece
                continue
            holes.append(shellquote.Hole(name, value, raw))
            starts.append(at)
            pieces.append(piece)
            size += len(value)
        if size and not self.room(line, len(text) + size):
            return None
        return pieces, holes, starts

    def _unknown(self, name: str, where: int, values: Mapping[str, str]) -> None:
        message = f"unknown variable {{{name}}}"
        near = closest(name, list(values)) if self.report.may_suggest() else None
        if near:
            message += f"; did you mean {{{near}}}?"
        self.report.add(
            where,
            message,
            f"declare it under '## Variables' as '- {name}: <default>', or pass --var {name}=<value>; "
            f"write '{{{{{name}}}}}' for literal braces",
        )

    def room(self, line: int, size: int) -> bool:
        """Whether `size` more bytes fit in the parsed plan; reports (once) when not."""
        if self.spent + size <= self.max_bytes:
            return True
        if not self.over:
            self.over = True
            self.report.add(
                line,
                f"the plan grows past {self.max_bytes:,} bytes as its variables are substituted "
                "and its foreach tasks expanded; it was not read further",
                "use smaller values or fewer expansions, or raise the setting plan_max_bytes",
            )
        return False

    def variables(self, lines: list[tuple[int, str]]) -> dict[str, str]:
        """`## Variables`: each default, or its `--var` override; and the overrides it does not declare."""
        for name in self.overrides:
            if not NAME_RE.fullmatch(name):
                self.report.add(
                    0,
                    f"--var {_show(name)} is not a valid variable name",
                    "a variable name starts with a letter or '_' and has only letters, digits and '_'",
                )
        declared: dict[str, int] = {}
        entries: list[tuple[int, str, str]] = []
        for line, entry in lines:
            name, colon, value = entry.partition(":")
            name = name.strip()
            if not colon:
                self.report.add(
                    line, f"variable line {_show(entry)} has no ':'", "write '- NAME: default value'"
                )
                continue
            if not NAME_RE.fullmatch(name):
                self.report.add(
                    line,
                    f"{_show(name)} is not a valid variable name",
                    "a variable name starts with a letter or '_' and has only letters, digits and '_'",
                )
                continue
            if name in declared:
                self.report.add(
                    line,
                    f"variable {name} is declared twice (first at line {declared[name]})",
                    "keep one of the two lines",
                )
                continue
            declared[name] = line
            entries.append((line, name, value.strip()))

        resolved: dict[str, str] = {}
        visible: dict[str, str] = dict(self.overrides)
        for line, name, default in entries:
            if name in self.overrides:
                value = self.overrides[name]
            else:
                for m in SUBST_RE.finditer(default):
                    used = m.group(1)
                    if used is None or used in visible:
                        continue
                    if used == name:
                        self.report.add(
                            line,
                            f"variable {name}'s default refers to itself",
                            "give it a value that does not use {" + name + "}",
                        )
                    elif used in declared:
                        self.report.add(
                            line,
                            f"variable {name} uses {{{used}}}, "
                            f"which is declared below it (line {declared[used]})",
                            "a default may use only variables declared above it; reorder the lines",
                        )
                # Names declared below were reported just above: keep them as written.
                later = {n: "{" + n + "}" for n in declared if n not in visible}
                value = self.subst(default, line, ChainMap(visible, later))
            resolved[name] = value
            visible[name] = value
            self.spent += len(value)
        for name, value in self.overrides.items():
            if name not in resolved:
                resolved[name] = value
                self.spent += len(value)
        return resolved

    def foreach(
        self, task: RawTask, line: int, spec: str, variables: Mapping[str, str]
    ) -> tuple[str | None, list[str]]:
        m = _FOREACH_RE.fullmatch(spec)
        if m is None:
            self.report.add(
                line, f"foreach {_show(spec)} of task '{task.id}' is not 'NAME in <items>'", _FOREACH_HINT
            )
            return None, []
        name = m.group(1)
        what = self.subst((m.group(2) or "").strip(), line, variables)
        # at most this many items: the plan's foreach items so far count against the limit too
        room = self.max_expansions - self.expanded
        if _GLOB_CHARS.intersection(what):
            items = self._glob(task, line, what, room)
        else:
            items = self._list(task, line, what, room)
        self.expanded += len(items)
        return name, items

    def _list(self, task: RawTask, line: int, what: str, room: int) -> list[str]:
        """The items of a foreach comma list, read lazily: a huge list is refused, not built."""
        items: list[str] = []
        for part in _ITEM_RE.finditer(what):
            item = part.group().strip()
            if item:
                if len(items) == room:
                    self._too_many(line, f"foreach of task '{task.id}' has", "items")
                    return []
                items.append(item)
        if not items:
            self.report.add(line, f"foreach of task '{task.id}' has an empty list", _FOREACH_HINT)
        return items

    def _too_many(self, line: int, head: str, things: str) -> None:
        """`head` ("foreach of task 'x' has") more items than the plan has room for."""
        limit = self.max_expansions
        if self.expanded:
            message = (
                f"{head} more than {limit - self.expanded:,} {things}, all the plan has room for: "
                f"its foreach tasks may make {limit:,} tasks in all and the ones above made {self.expanded:,}"
            )
        else:
            message = f"{head} more than {limit:,} {things}, the most a plan may expand to"
        self.report.add(
            line,
            message,
            "split the work into several plans, or raise the setting plan_max_expansions "
            "(a foreach task is expanded when the plan is read, all at once)",
        )

    def _glob(self, task: RawTask, line: int, pattern: str, room: int) -> list[str]:
        """The files a foreach glob matches, sorted; none (reported) if they may not be used."""
        if self.files is None:
            self.report.add(
                line,
                f"foreach glob {_show(pattern)} of task '{task.id}' {self.no_files}",
                "list the items instead: '- foreach: NAME in a, b, c'",
            )
            return []
        found: list[str] = []
        try:
            # an iterator, stopped at the first match past the limit: '**' over a big tree stops early
            for path in self.files(pattern):
                if len(found) == room:
                    self._too_many(
                        line, f"foreach glob {_show(pattern)} of task '{task.id}' matches", "files"
                    )
                    return []
                found.append(path)
        except GlobRefused as e:
            self.report.add(line, f"foreach glob {_show(pattern)} of task '{task.id}' {e.reason}", e.hint)
            return []
        except (OSError, ValueError, RecursionError) as e:
            self.report.add(line, f"foreach glob {_show(pattern)} cannot be read: {e}", "check the pattern")
            return []
        if not found:
            base = f"'{self.workdir}'" if self.workdir else "the current directory"
            self.report.add(
                line,
                f"foreach glob {_show(pattern)} matched no files",
                f"a relative glob is resolved against {base}, when the plan is submitted "
                "(not when the task runs): check the pattern, or list the items instead",
            )
            return []
        found.sort()
        return found
