"""Read a plan, a markdown file of tasks, into a validated `PlanSpec`.

The format is described in plans/PLAN_FORMAT.md. In short:

    # Title

    ## Variables
    - OUT: /tmp/demo

    ## Tasks

    ### fetch
    - retries: 2

    ```shell
    mkdir -p {OUT}
    ```

    ### summary
    - depends_on: fetch
    - inputs: fetch

    ```prompt
    Q: What does the text below say?
    ```

`parse_plan` and `load_plan` either return a `PlanSpec` or raise `PlanError`
carrying every problem they found, each with its line and a hint; they raise
nothing else, whatever the input.

The parser is a single pass over the lines (fences first, so that a `#` line
inside a code block is never a heading), then checks that each run in linear
time, so that plans of tens of thousands of tasks parse in well under a second.
Its work is bounded (`PlanLimits`): the size of the text, the number of tasks
and of foreach expansions, the size of the parsed plan, and where a foreach
glob may look.

In a shell body a value is written quoted for its place (`mesh.shellquote`):
a file name or a `--var` value reaches bash as text, never as code to run.
"""

from __future__ import annotations

import difflib
import functools
import glob
import math
import os
import re
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from mesh import shellquote
from mesh.errors import PlanError, Problem
from mesh.events import (
    BODY_KINDS,
    DEFAULT_CLASS_OF_KIND,
    MODEL_BODY_KINDS,
    TASK_CLASSES,
    BodyKind,
    EscalationPolicy,
    PlanSpec,
    TaskClass,
    TaskSpec,
)
from mesh.validate import (
    ID_RE,
    INPUT_KINDS,
    MAX_PRIORITY,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    MAX_TOKENS,
    MIN_PRIORITY,
    NAME_RE,
)
from mesh.validate import show as _show

__all__ = [
    "BODY_KIND_ALIASES",
    "DEFAULT_PRIORITY",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "EMBED_KEYS",
    "FIELDS",
    "MAX_RETRIES",
    "MAX_TIMEOUT_S",
    "MAX_TOKENS",
    "PlanLimits",
    "load_plan",
    "parse_plan",
]

# ---------------------------------------------------------------- constants

FIELDS: tuple[str, ...] = (
    "class",
    "depends_on",
    "priority",
    "timeout",
    "retries",
    "foreach",
    "env",
    "sensitive",
    "model",
    "inputs",
    "max_tokens",
    "requires_external",
)
# the lines of a plan's `## Escalation` section
ESCALATION_KEYS: tuple[str, ...] = ("auto", "after", "sensitive", "followups", "review")
MAX_ESCALATE_AFTER = 100
DEFAULT_CLASS: TaskClass = "cpu"
DEFAULT_PRIORITY = 5
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_RETRIES = 3
# the line keys of an embed body
EMBED_KEYS: tuple[str, ...] = ("file", "text", "input", "save")
# body kinds that take the outputs of their `inputs`
_INPUT_KINDS = INPUT_KINDS

BODY_KIND_ALIASES: dict[str, BodyKind] = {"sh": "shell", "bash": "shell"}
_BODY_KINDS: dict[str, BodyKind] = {
    **{k: cast(BodyKind, k) for k in BODY_KINDS},
    **BODY_KIND_ALIASES,
}
_CLASSES: dict[str, TaskClass] = {c: cast(TaskClass, c) for c in TASK_CLASSES}
_BOOLS: dict[str, bool] = {"true": True, "yes": True, "false": False, "no": False}
_SECTIONS = ("variables", "env", "tasks", "escalation")

# How many "did you mean" searches and cycles to report at most: both are
# there to help a person, and neither should turn a broken 10,000-task plan
# into a slow parse or a wall of text.
_MAX_SUGGESTIONS = 100
_MAX_CYCLES = 50

_LIST_ITEM_RE = re.compile(r" {0,3}[-*+][ \t]+(\S.*)")
_FIELD_RE = re.compile(r" {0,3}[-*+][ \t]+([A-Za-z_][A-Za-z0-9_-]*)[ \t]*:(.*)")
_SUBST_RE = re.compile(r"\{\{|\}\}|(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)(:raw)?\}")
_ITEM_RE = re.compile(r"[^,]+")
_FOREACH_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]+in(?:[ \t]+(.*))?", re.IGNORECASE)
_INT_RE = re.compile(r"[0-9]{1,9}")
_NUMBER = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
_SECONDS_RE = re.compile(_NUMBER)
_DURATION_RE = re.compile(rf"(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?")
_GLOB_CHARS = frozenset("*?[")
_SCAN_START = frozenset(" #`~")  # a line starting otherwise is plain text
_FENCE_START = " `~"

_BODY_HINT = (
    "put the commands in a fenced block under the task heading: a line '```shell', the commands, "
    "a line '```' (or '```prompt', '```transcribe', '```embed' for model work)"
)
_ID_HINT = (
    "a task id may use only letters, digits, '_' and '-' (it becomes a NATS subject token), "
    "e.g. '### fetch-data'"
)
_ENV_NAME_HINT = (
    "an environment variable name starts with a letter or '_' and has only letters, digits and '_'"
)
_FOREACH_HINT = (
    "write '- foreach: NAME in a, b, c' (a comma list) or '- foreach: NAME in data/*.csv' (a glob)"
)
_MODEL_HINT = (
    "a model name has only letters, digits, '_' and '-', e.g. 'gemma3-270m'; "
    "leave the field out to use the configured default model for the body's kind"
)
_EMBED_HINT = "each line of an embed body is 'file: PATH', 'text: TEXT', 'input: TASK' or 'save: PATH.npy'"


# ---------------------------------------------------------------- public API


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """How much work one plan may ask of the parser (the settings `plan_max_*`, `plan_glob_outside`).

    - `max_expansions`: foreach items, per foreach and over the whole plan;
    - `max_tasks`: tasks of the plan, foreach expansions included;
    - `max_bytes`: the plan's text, and the parsed plan (bodies and environments of every task,
      variable values) after substitution and expansion;
    - `glob_outside`: whether a foreach glob may name files outside the plan's directory (an
      absolute pattern elsewhere, or '..').
    """

    max_expansions: int = 10_000
    max_tasks: int = 100_000
    max_bytes: int = 32 * 1024 * 1024
    glob_outside: bool = False


def parse_plan(
    text: str,
    *,
    source: str = "<plan>",
    variables: Mapping[str, str] | None = None,
    workdir: str = "",
    limits: PlanLimits | None = None,
) -> PlanSpec:
    """Parse and validate the markdown `text` of a plan.

    `variables` override the defaults under `## Variables` (`mesh submit --var
    NAME=value`); a name the plan does not declare is added. Relative foreach
    globs are resolved against `workdir` (the current directory when empty),
    which is kept as `PlanSpec.workdir`. `limits` bound the work (the defaults
    of `PlanLimits` when None).

    Raises `PlanError` listing every problem found; never anything else.
    """
    return _Parser(text, source, dict(variables or {}), workdir, limits or PlanLimits()).parse()


def load_plan(
    path: str | os.PathLike[str],
    variables: Mapping[str, str] | None = None,
    *,
    limits: PlanLimits | None = None,
) -> PlanSpec:
    """Read the plan file at `path` (UTF-8) and parse it; see `parse_plan`.

    The source is the path as given; the workdir is the file's absolute parent
    directory. A file that cannot be read, or is bigger than `limits.max_bytes`
    (checked before it is read), raises `PlanError` as well.
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
        raise PlanError(
            source, [_too_big(size if size > limits.max_bytes else 0, limits.max_bytes)]
        ) from None
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
    return parse_plan(text, source=source, variables=variables, workdir=workdir, limits=limits)


def _too_big(size: int, limit: int) -> Problem:
    """The plan's text is over the limit (`size` 0: not known, e.g. read from a pipe)."""
    told = f"{size:,} bytes, " if size else ""
    return Problem(
        0,
        f"the plan is {told}more than the limit of {limit:,} bytes",
        "split it into several plans, or raise the setting plan_max_bytes",
    )


# ---------------------------------------------------------------- scanning


@dataclass(slots=True)
class _Heading:
    line: int
    level: int
    text: str


@dataclass(slots=True)
class _Fence:
    line: int
    info: str
    lines: list[str]
    closed: bool


@dataclass(slots=True)
class _Text:
    line: int
    text: str


_Item = _Heading | _Fence | _Text


def _scan(lines: list[str]) -> list[_Item]:
    """Split lines into headings, fenced blocks and other non-blank lines (CommonMark-ish)."""
    items: list[_Item] = []
    append = items.append
    n = len(lines)
    i = 0
    while i < n:
        raw = lines[i]
        if not raw or raw[0] not in _SCAN_START:
            if raw.strip():
                append(_Text(i + 1, raw))
            i += 1
            continue
        s = raw.lstrip(" ")
        indent = len(raw) - len(s)
        if s and indent <= 3:
            c = s[0]
            if (c == "`" or c == "~") and s.startswith(c * 3):
                rest = s.lstrip(c)
                width = len(s) - len(rest)
                info = rest.strip()
                if c == "~" or "`" not in info:
                    body: list[str] = []
                    closed = False
                    j = i + 1
                    marker = c * width
                    while j < n:
                        r2 = lines[j]
                        if r2[:1] in _FENCE_START:  # may close the block ("" is in every string)
                            s2 = r2.lstrip(" ")
                            if (
                                len(r2) - len(s2) <= 3
                                and s2.startswith(marker)
                                and not s2.lstrip(c).strip(" \t")
                            ):
                                closed = True
                                break
                        if indent:
                            k = len(r2) - len(r2.lstrip(" "))
                            r2 = r2[min(k, indent) :]
                        body.append(r2)
                        j += 1
                    append(_Fence(i + 1, info, body, closed))
                    i = j + 1
                    continue
            elif c == "#":
                rest = s.lstrip("#")
                level = len(s) - len(rest)
                if level <= 6 and (not rest or rest[0] in " \t"):
                    text = rest.strip()
                    if text.endswith("#"):
                        trimmed = text.rstrip("#")
                        if not trimmed:
                            text = ""
                        elif trimmed[-1] in " \t":
                            text = trimmed.rstrip()
                    append(_Heading(i + 1, level, text))
                    i += 1
                    continue
        if s.strip():
            append(_Text(i + 1, raw))
        i += 1
    return items


# ---------------------------------------------------------------- parsing


@dataclass(slots=True)
class _RawTask:
    id: str
    line: int
    fields: dict[str, tuple[int, str]] = field(default_factory=dict)
    fences: list[_Fence] = field(default_factory=list)


@dataclass(slots=True)
class _Record:
    """One task after foreach expansion, before dependencies are resolved."""

    id: str
    base: str
    line: int
    body: str
    kind: BodyKind
    cls: TaskClass
    priority: int
    timeout_s: float
    retries: int
    env: dict[str, str]
    sensitive: bool
    deps: list[str]
    deps_line: int
    model: str = ""
    max_tokens: int = 0
    # the `inputs` field as written, and the line of each `input:` line of an embed body
    inputs: list[str] = field(default_factory=list)
    inputs_line: int = 0
    body_inputs: list[tuple[int, str]] = field(default_factory=list)
    resolved: tuple[str, ...] = ()
    resolved_inputs: tuple[str, ...] = ()
    requires_external: bool = False


def _closest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word[:100], choices, n=1, cutoff=0.6)
    return found[0] if found else None


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _Parser:
    def __init__(
        self, text: str, source: str, overrides: dict[str, str], workdir: str, limits: PlanLimits
    ) -> None:
        self.limits = limits
        self.problems: list[Problem] = []
        if len(text) > limits.max_bytes:
            self.problems.append(_too_big(len(text), limits.max_bytes))
            text = ""
        text = text.removeprefix("\ufeff")
        self.lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.source = source
        self.overrides = overrides
        self.workdir = workdir
        self.suggestions = 0
        self.refusals = 0  # values a shell body could not take, reported so far
        # the bounds: foreach items so far, and bytes of the parsed plan so far
        self.expanded = 0
        self.spent = 0
        self.over = False  # the plan outgrew max_bytes or max_tasks: stop building it
        # filled by _structure
        self.title: str | None = None
        self.title_line = 0
        self.description = ""
        self.var_entries: list[tuple[int, str]] = []
        self.env_entries: list[tuple[int, str]] = []
        self.escalation_entries: list[tuple[int, str]] = []
        self.tasks_line = 0
        self.other_sections: list[tuple[int, str]] = []
        self.raw_tasks: list[_RawTask] = []

    def add(self, line: int, message: str, hint: str = "") -> None:
        self.problems.append(Problem(line, message, hint))

    # ------------------------------------------------------------ driver

    def parse(self) -> PlanSpec:
        if self.problems:  # the text is too big to read at all
            raise PlanError(self.source, self.problems)
        self._structure(_scan(self.lines))
        variables = self._variables()
        env = self._plan_env(variables)
        escalation = self._escalation(variables)
        records = self._tasks(variables, env)
        self._cycles(records)
        if self.problems:
            raise PlanError(self.source, list(dict.fromkeys(self.problems)))
        tasks = tuple(
            TaskSpec(
                id=r.id,
                body=r.body,
                kind=r.kind,
                cls=r.cls,
                depends_on=r.resolved,
                priority=r.priority,
                timeout_s=r.timeout_s,
                retries=r.retries,
                env=r.env,
                sensitive=r.sensitive,
                line=r.line,
                model=r.model,
                inputs=r.resolved_inputs,
                max_tokens=r.max_tokens,
                requires_external=r.requires_external,
            )
            for r in records
        )
        return PlanSpec(
            title=self.title or "",
            tasks=tasks,
            description=self.description,
            source=self.source,
            workdir=self.workdir,
            variables=variables,
            env=env,
            escalation=escalation,
        )

    # ------------------------------------------------------------ structure

    def _structure(self, items: list[_Item]) -> None:
        mode = "pre"  # pre | desc | variables | env | tasks | other
        seen: dict[str, int] = {}
        first_section = 0
        desc_end = 0
        task: _RawTask | None = None
        for item in items:
            if isinstance(item, _Heading):
                if item.level == 1:
                    if self.title is None:
                        self.title, self.title_line = item.text, item.line
                        if first_section:
                            self.add(
                                item.line,
                                "the title must come before the first '##' section",
                                f"move '# {item.text}' above line {first_section}",
                            )
                        else:
                            mode = "desc"
                        if not item.text:
                            self.add(item.line, "the title is empty", "write the plan's title after '# '")
                    else:
                        self.add(
                            item.line,
                            "a plan has one title, but this is a second one "
                            f"(the first is at line {self.title_line})",
                            "use '## ' for sections and '### ' for tasks",
                        )
                    continue
                if item.level == 2:
                    if mode == "desc":
                        desc_end = item.line
                    first_section = first_section or item.line
                    task = None
                    name = item.text.lower()
                    if name in _SECTIONS:
                        if name in seen:
                            self.add(
                                item.line,
                                f"a second '## {item.text}' section (the first is at line {seen[name]})",
                                "merge the two sections into one",
                            )
                        else:
                            seen[name] = item.line
                        if name == "tasks" and not self.tasks_line:
                            self.tasks_line = item.line
                        mode = name
                    else:
                        self.other_sections.append((item.line, item.text))
                        mode = "other"
                    continue
                if item.level == 3 and mode == "tasks":
                    task = _RawTask(item.text, item.line)
                    self.raw_tasks.append(task)
                continue
            if isinstance(item, _Fence):
                if not item.closed:
                    self.add(
                        item.line,
                        "this code block is never closed",
                        "end it with a line of the same fence characters (e.g. '```'); "
                        "until then the rest of the file is part of it",
                    )
                if mode == "tasks":
                    if task is None:
                        self.add(
                            item.line,
                            "a code block in '## Tasks' before any task heading",
                            "put it under a task heading '### <id>', or move it out of '## Tasks'",
                        )
                    else:
                        task.fences.append(item)
                continue
            text = item.text
            if mode == "variables" or mode == "env" or mode == "escalation":
                m = _LIST_ITEM_RE.match(text)
                if m:
                    entry = m.group(1)
                    entries = {
                        "variables": self.var_entries,
                        "env": self.env_entries,
                        "escalation": self.escalation_entries,
                    }[mode]
                    entries.append((item.line, entry))
            elif mode == "tasks":
                self._task_line(task, item)

        if self.title is None:
            self.add(1, "plan has no title", "start the file with '# <title>'")
        elif self.title_line:
            end = (desc_end - 1) if desc_end else len(self.lines)
            self.description = "\n".join(self.lines[self.title_line : end]).strip()
        if not self.tasks_line:
            hint = "add a '## Tasks' section with one '### <id>' heading and a ```shell block per task"
            near = [
                (line, text)
                for line, text in self.other_sections
                if difflib.get_close_matches(text.lower()[:40], ["tasks"], n=1, cutoff=0.6)
            ]
            if near:
                hint = f"did you mean '## Tasks'? (line {near[0][0]} has '## {near[0][1]}')"
            self.add(1, "plan has no '## Tasks' section", hint)
        elif not self.raw_tasks:
            self.add(
                self.tasks_line,
                "the '## Tasks' section has no tasks",
                "add a task: a heading '### <id>' followed by a ```shell block",
            )

    def _task_line(self, task: _RawTask | None, item: _Text) -> None:
        """A non-heading, non-fence line in '## Tasks': a field, or prose."""
        text = item.text
        m = _FIELD_RE.match(text)
        if m is None:
            # Prose, or a field written wrongly: '- retries 2', '- depends on: x'.
            li = _LIST_ITEM_RE.match(text)
            if li is None or task is None or task.fences:
                return
            head, colon, _ = li.group(1).partition(":")
            if colon:
                key = "_".join(head.lower().replace("-", " ").split())
                if key in FIELDS:
                    self.add(
                        item.line,
                        f"field {_show(head.strip())} of task '{task.id}' is misspelt",
                        f"write '- {key}: <value>'",
                    )
            else:
                words = head.split()
                first = words[0].lower() if words else ""
                if first in FIELDS:
                    self.add(
                        item.line,
                        f"field '{first}' of task '{task.id}' has no ':' after its name",
                        f"write '- {first}: <value>'",
                    )
            return
        key = m.group(1).lower()
        value = m.group(2).strip()
        if task is None:
            if key in FIELDS:
                self.add(
                    item.line,
                    f"field '{key}' comes before any task heading",
                    "put fields right under a task heading '### <id>'",
                )
            return
        if task.fences:
            if key in FIELDS:
                self.add(
                    item.line,
                    f"field '{key}' of task '{task.id}' comes after its body",
                    f"move it above the code block at line {task.fences[0].line}",
                )
            return
        if key not in FIELDS:
            near = _closest(key, list(FIELDS))
            message = f"unknown field '{m.group(1)}' in task '{task.id}'"
            if near:
                message += f"; did you mean '{near}'?"
            self.add(item.line, message, "known fields: " + ", ".join(FIELDS))
            return
        if key in task.fields:
            self.add(
                item.line,
                f"field '{key}' is given twice in task '{task.id}' (first at line {task.fields[key][0]})",
                "keep one of the two lines",
            )
            return
        task.fields[key] = (item.line, value)

    # ------------------------------------------------------------ variables

    def _subst(self, text: str, line: int, values: Mapping[str, str]) -> str:
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

    def _subst_shell(self, text: str, line: int, values: Mapping[str, str]) -> str:
        """`_subst` for a shell body: each value is written quoted for its place in the script
        (`mesh.shellquote`), except `{NAME:raw}`; a value no quoting can hold is reported."""
        if "\x00" in text:
            self.add(line, "the shell body has a NUL byte, which bash cannot take", "remove the NUL byte")
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
            if self.refusals > _MAX_SUGGESTIONS:
                if self.refusals == _MAX_SUGGESTIONS + 1:
                    self.add(
                        line, "more values that the shell bodies cannot take are not shown", "fix the above"
                    )
                continue
            hole = holes[r.index]
            where = line + text.count("\n", 0, starts[r.index])
            self.add(where, f"{{{hole.name}}} ({_show(hole.value)}) {r.message}", r.hint)
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
        if size and not self._room(line, len(text) + size):
            return None
        return pieces, holes, starts

    def _unknown(self, name: str, where: int, values: Mapping[str, str]) -> None:
        message = f"unknown variable {{{name}}}"
        near = _closest(name, list(values)) if self._may_suggest() else None
        if near:
            message += f"; did you mean {{{near}}}?"
        self.add(
            where,
            message,
            f"declare it under '## Variables' as '- {name}: <default>', or pass --var {name}=<value>; "
            f"write '{{{{{name}}}}}' for literal braces",
        )

    def _room(self, line: int, size: int) -> bool:
        """Whether `size` more bytes fit in the parsed plan; reports (once) when not."""
        if self.spent + size <= self.limits.max_bytes:
            return True
        if not self.over:
            self.over = True
            self.add(
                line,
                f"the plan grows past {self.limits.max_bytes:,} bytes as its variables are substituted "
                "and its foreach tasks expanded; it was not read further",
                "use smaller values or fewer expansions, or raise the setting plan_max_bytes",
            )
        return False

    def _may_suggest(self) -> bool:
        self.suggestions += 1
        return self.suggestions <= _MAX_SUGGESTIONS

    def _variables(self) -> dict[str, str]:
        for name in self.overrides:
            if not NAME_RE.fullmatch(name):
                self.add(
                    0,
                    f"--var {_show(name)} is not a valid variable name",
                    "a variable name starts with a letter or '_' and has only letters, digits and '_'",
                )
        declared: dict[str, int] = {}
        entries: list[tuple[int, str, str]] = []
        for line, entry in self.var_entries:
            name, colon, value = entry.partition(":")
            name = name.strip()
            if not colon:
                self.add(line, f"variable line {_show(entry)} has no ':'", "write '- NAME: default value'")
                continue
            if not NAME_RE.fullmatch(name):
                self.add(
                    line,
                    f"{_show(name)} is not a valid variable name",
                    "a variable name starts with a letter or '_' and has only letters, digits and '_'",
                )
                continue
            if name in declared:
                self.add(
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
                for m in _SUBST_RE.finditer(default):
                    used = m.group(1)
                    if used is None or used in visible:
                        continue
                    if used == name:
                        self.add(
                            line,
                            f"variable {name}'s default refers to itself",
                            "give it a value that does not use {" + name + "}",
                        )
                    elif used in declared:
                        self.add(
                            line,
                            f"variable {name} uses {{{used}}}, "
                            f"which is declared below it (line {declared[used]})",
                            "a default may use only variables declared above it; reorder the lines",
                        )
                # Names declared below were reported just above: keep them as written.
                later = {n: "{" + n + "}" for n in declared if n not in visible}
                value = self._subst(default, line, ChainMap(visible, later))
            resolved[name] = value
            visible[name] = value
            self.spent += len(value)
        for name, value in self.overrides.items():
            if name not in resolved:
                resolved[name] = value
                self.spent += len(value)
        return resolved

    def _plan_env(self, variables: Mapping[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        lines: dict[str, int] = {}
        for line, entry in self.env_entries:
            name, colon, value = entry.partition(":")
            name = name.strip()
            if not colon:
                self.add(line, f"env line {_show(entry)} has no ':'", "write '- NAME: value'")
                continue
            if not NAME_RE.fullmatch(name):
                self.add(
                    line,
                    f"{_show(name)} is not a valid environment variable name",
                    _ENV_NAME_HINT,
                )
                continue
            if name in lines:
                self.add(
                    line,
                    f"environment variable {name} is set twice (first at line {lines[name]})",
                    "keep one of the two lines",
                )
                continue
            lines[name] = line
            env[name] = self._subst(value.strip(), line, variables)
        return env

    def _escalation(self, variables: Mapping[str, str]) -> EscalationPolicy:
        """`## Escalation`: what the plan lets the brain hand to Claude."""
        values: dict[str, bool | int] = {}
        lines: dict[str, int] = {}
        for line, entry in self.escalation_entries:
            name, colon, raw = entry.partition(":")
            key = name.strip().lower()
            if not colon:
                self.add(line, f"escalation line {_show(entry)} has no ':'", "write e.g. '- auto: true'")
                continue
            if key not in ESCALATION_KEYS:
                near = _closest(key, list(ESCALATION_KEYS))
                message = f"unknown escalation setting {_show(name.strip())}"
                if near:
                    message += f"; did you mean '{near}'?"
                self.add(line, message, "known settings: " + ", ".join(ESCALATION_KEYS))
                continue
            if key in lines:
                self.add(
                    line,
                    f"escalation setting '{key}' is given twice (first at line {lines[key]})",
                    "keep one of the two lines",
                )
                continue
            lines[key] = line
            value = self._subst(raw.strip(), line, variables)
            if key == "after":
                n = _int(value, 1, MAX_ESCALATE_AFTER)
                if n is None:
                    self.add(
                        line,
                        f"escalation 'after' {_show(value)} is not a whole number "
                        f"from 1 to {MAX_ESCALATE_AFTER}",
                        "write e.g. '- after: 2': escalate a task after 2 failed local attempts",
                    )
                else:
                    values[key] = n
                continue
            b = _BOOLS.get(value.lower())
            if b is None:
                self.add(
                    line,
                    f"escalation '{key}' {_show(value)} is not true or false",
                    f"write '- {key}: true' or '- {key}: false' (or yes / no)",
                )
            else:
                values[key] = b
        return EscalationPolicy(
            auto=bool(values.get("auto", False)),
            after=int(values.get("after", 0)),
            sensitive=bool(values.get("sensitive", False)),
            followups=bool(values.get("followups", True)),
            review=bool(values.get("review", False)),
        )

    # ------------------------------------------------------------ tasks

    def _body(self, task: _RawTask) -> tuple[str, int, BodyKind] | None:
        if not task.fences:
            self.add(task.line, f"task '{task.id}' has no body", _BODY_HINT)
            return None
        for extra in task.fences[1:]:
            self.add(
                extra.line,
                f"task '{task.id}' has a second code block "
                f"(its body is the one at line {task.fences[0].line})",
                "a task has exactly one code block; merge them, or make this one a separate task",
            )
        fence = task.fences[0]
        word = fence.info.split()[0].lower() if fence.info.strip() else ""
        kind = _BODY_KINDS.get(word)
        known = ", ".join([*BODY_KINDS, *BODY_KIND_ALIASES])
        if kind is None:
            if word:
                message = f"task '{task.id}' has a body of unknown kind {_show(word)}"
            else:
                message = f"task '{task.id}' has a code block with no kind"
            self.add(fence.line, message, f"known kinds: {known}; e.g. open the block with '```shell'")
        text = "\n".join(fence.lines)
        if fence.closed and not text.strip() and kind != "noop":
            self.add(
                fence.line,
                f"the body of task '{task.id}' is empty",
                "put the task's commands (or its prompt, audio path or embed lines) in the block",
            )
            return None
        if kind is None or not fence.closed or len(task.fences) > 1:
            return None
        return text, fence.line + 1, kind

    def _foreach(
        self, task: _RawTask, line: int, spec: str, variables: Mapping[str, str]
    ) -> tuple[str | None, list[str]]:
        m = _FOREACH_RE.fullmatch(spec)
        if m is None:
            self.add(
                line, f"foreach {_show(spec)} of task '{task.id}' is not 'NAME in <items>'", _FOREACH_HINT
            )
            return None, []
        name = m.group(1)
        what = self._subst((m.group(2) or "").strip(), line, variables)
        # at most this many items: the plan's foreach items so far count against the limit too
        room = self.limits.max_expansions - self.expanded
        if _GLOB_CHARS.intersection(what):
            items = self._glob(task, line, what, room)
        else:
            items = self._list(task, line, what, room)
        self.expanded += len(items)
        return name, items

    def _list(self, task: _RawTask, line: int, what: str, room: int) -> list[str]:
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
            self.add(line, f"foreach of task '{task.id}' has an empty list", _FOREACH_HINT)
        return items

    def _too_many(self, line: int, head: str, things: str) -> None:
        """`head` ("foreach of task 'x' has") more items than the plan has room for."""
        limit = self.limits.max_expansions
        if self.expanded:
            message = (
                f"{head} more than {limit - self.expanded:,} {things}, all the plan has room for: "
                f"its foreach tasks may make {limit:,} tasks in all and the ones above made {self.expanded:,}"
            )
        else:
            message = f"{head} more than {limit:,} {things}, the most a plan may expand to"
        self.add(
            line,
            message,
            "split the work into several plans, or raise the setting plan_max_expansions "
            "(a foreach task is expanded when the plan is read, all at once)",
        )

    def _glob(self, task: _RawTask, line: int, pattern: str, room: int) -> list[str]:
        """The files a foreach glob matches, sorted; none (reported) if they may not be used."""
        if not self.limits.glob_outside:
            outside = _outside(pattern, self.workdir)
            if outside:
                self.add(
                    line,
                    f"foreach glob {_show(pattern)} of task '{task.id}' {outside}",
                    "a foreach glob may name only files under the plan's directory: write a pattern "
                    "relative to it, or allow others with `mesh submit --glob-outside` "
                    "(the setting plan_glob_outside)",
                )
                return []
        found: list[str] = []
        try:
            # an iterator, stopped at the first match past the limit: '**' over a big tree stops early
            for path in glob.iglob(pattern, root_dir=self.workdir or None, recursive=True):
                if len(found) == room:
                    self._too_many(
                        line, f"foreach glob {_show(pattern)} of task '{task.id}' matches", "files"
                    )
                    return []
                found.append(path)
        except (OSError, ValueError, RecursionError) as e:
            self.add(line, f"foreach glob {_show(pattern)} cannot be read: {e}", "check the pattern")
            return []
        if not found:
            base = f"'{self.workdir}'" if self.workdir else "the current directory"
            self.add(
                line,
                f"foreach glob {_show(pattern)} matched no files",
                f"a relative glob is resolved against {base}, when the plan is submitted "
                "(not when the task runs): check the pattern, or list the items instead",
            )
            return []
        found.sort()
        return found

    def _tasks(self, variables: dict[str, str], plan_env: dict[str, str]) -> list[_Record]:
        records: list[_Record] = []
        # Every name a dependency may use: a task id, or a foreach task's id
        # (meaning all its expansions), or one expansion's id.
        targets: dict[str, list[str]] = {}
        owner: dict[str, str] = {}  # name -> what defines it, for duplicate messages
        max_tasks = self.limits.max_tasks
        if len(self.raw_tasks) > max_tasks:
            self.add(
                self.raw_tasks[max_tasks].line,
                f"the plan has {len(self.raw_tasks):,} tasks, more than the limit of {max_tasks:,}",
                "split it into several plans, or raise the setting plan_max_tasks",
            )
            return records
        # every task carries the plan's environment: its size counts once per task
        env_size = sum(len(k) + len(v) for k, v in plan_env.items())
        for task in self.raw_tasks:
            if self.over:
                break
            if not task.id:
                self.add(task.line, "task heading has no id", _ID_HINT)
            elif not ID_RE.fullmatch(task.id):
                self.add(task.line, f"task id {_show(task.id)} has characters that are not allowed", _ID_HINT)
            what = f"task at line {task.line}"
            if task.id in owner:
                self.add(
                    task.line,
                    f"task id '{task.id}' at line {task.line} is already used by the {owner[task.id]}",
                    "give each task its own id",
                )
            body = self._body(task)
            expansions: list[tuple[str, Mapping[str, str]]]
            dry: list[tuple[str, Mapping[str, str]]]
            if "foreach" in task.fields:
                line, spec = task.fields["foreach"]
                name, items = self._foreach(task, line, spec, variables)
                if name is None:
                    expansions, dry = [], [(task.id, variables)]
                else:
                    expansions = [
                        (f"{task.id}-{n}", _Bound(name, item, variables)) for n, item in enumerate(items, 1)
                    ]
                    dry = [(task.id, _Bound(name, "", variables))] if not items else []
                names = [eid for eid, _ in expansions]
                if task.id not in owner:
                    owner[task.id] = what
                    targets[task.id] = names
                for eid in names:
                    if eid in owner:
                        self.add(
                            task.line,
                            f"foreach task '{task.id}' expands to '{eid}', "
                            f"which is already the id of the {owner[eid]}",
                            "rename one of the two tasks",
                        )
                    else:
                        owner[eid] = f"expansion of foreach task '{task.id}' (line {task.line})"
                        targets[eid] = [eid]
            else:
                expansions, dry = [(task.id, variables)], []
                if task.id not in owner:
                    owner[task.id] = what
                    targets[task.id] = [task.id]
            if len(records) + len(expansions) > max_tasks:
                self.add(
                    task.line,
                    f"the plan has more than {max_tasks:,} tasks once its foreach tasks are expanded "
                    f"(task '{task.id}' makes {len(expansions):,}, after {len(records):,} before it)",
                    "split it into several plans, or raise the setting plan_max_tasks",
                )
                self.over = True
                break
            for eid, values in expansions:
                if self.over:
                    break
                r = self._record(task, eid, values, body, plan_env)
                records.append(r)
                size = len(r.body) + env_size
                if "env" in task.fields:
                    size += sum(len(k) + len(v) for k, v in r.env.items())
                self.spent += size
                if self.spent > self.limits.max_bytes:
                    self._room(task.line, 0)
            for eid, values in dry:  # check the fields of a task whose foreach is broken
                self._record(task, eid, values, body, plan_env)
        self._resolve(records, targets)
        return records

    def _record(
        self,
        task: _RawTask,
        eid: str,
        values: Mapping[str, str],
        body: tuple[str, int, BodyKind] | None,
        plan_env: dict[str, str],
    ) -> _Record:
        cls: TaskClass | None = None
        priority = DEFAULT_PRIORITY
        retries = DEFAULT_RETRIES
        timeout_s = DEFAULT_TIMEOUT_S
        sensitive = False
        requires_external = False
        env = plan_env
        deps: list[str] = []
        deps_line = 0
        model = ""
        max_tokens = 0
        inputs: list[str] = []
        # where the fields that must suit the body's kind are (0: not given)
        lines = {"class": 0, "model": 0, "max_tokens": 0, "inputs": 0}
        for key, (line, raw_value) in task.fields.items():
            if key == "foreach":
                continue
            if key == "env":
                env = {**plan_env, **self._task_env(task, line, raw_value, values)}
                continue
            if key in lines:
                lines[key] = line
            value = self._subst(raw_value, line, values)
            if key == "depends_on":
                deps_line = line
                deps = list(dict.fromkeys(_split_list(value)))
            elif key == "priority":
                p = _int(value, MIN_PRIORITY, MAX_PRIORITY)
                if p is None:
                    self.add(
                        line,
                        f"priority {_show(value)} of task '{task.id}' is not a whole number from "
                        f"{MIN_PRIORITY} to {MAX_PRIORITY}",
                        f"write e.g. '- priority: 7' ({MAX_PRIORITY} runs first; "
                        f"the default is {DEFAULT_PRIORITY})",
                    )
                else:
                    priority = p
            elif key == "timeout":
                t = _duration(value)
                if t is None or t <= 0 or t > MAX_TIMEOUT_S:
                    self.add(
                        line,
                        f"timeout {_show(value)} of task '{task.id}' is not a duration "
                        "above 0 and up to 7 days",
                        "write e.g. '90s', '30m', '2h', '1h30m', or a number of seconds",
                    )
                else:
                    timeout_s = t
            elif key == "retries":
                r = _int(value, 0, MAX_RETRIES)
                if r is None:
                    self.add(
                        line,
                        f"retries {_show(value)} of task '{task.id}' is not a whole number "
                        f"from 0 to {MAX_RETRIES}",
                        "write e.g. '- retries: 2' (0 means a single attempt; "
                        f"the default is {DEFAULT_RETRIES})",
                    )
                else:
                    retries = r
            elif key == "class":
                found = _CLASSES.get(value.strip().lower())
                if found is None:
                    self.add(
                        line,
                        f"class {_show(value)} of task '{task.id}' is not a known class",
                        "class is one of: " + ", ".join(TASK_CLASSES),
                    )
                else:
                    cls = found
            elif key in ("sensitive", "requires_external"):
                b = _BOOLS.get(value.strip().lower())
                if b is None:
                    self.add(
                        line,
                        f"{key} {_show(value)} of task '{task.id}' is not true or false",
                        f"write '- {key}: true' or '- {key}: false' (or yes / no)",
                    )
                elif key == "sensitive":
                    sensitive = b
                else:
                    requires_external = b
            elif key == "model":
                name = value.strip()
                if ID_RE.fullmatch(name):
                    model = name
                else:
                    self.add(
                        line, f"model {_show(name)} of task '{task.id}' is not a model name", _MODEL_HINT
                    )
            elif key == "inputs":
                inputs = list(dict.fromkeys(_split_list(value)))
            elif key == "max_tokens":
                n = _int(value, 1, MAX_TOKENS)
                if n is None:
                    self.add(
                        line,
                        f"max_tokens {_show(value)} of task '{task.id}' is not a whole number "
                        f"from 1 to {MAX_TOKENS}",
                        "write e.g. '- max_tokens: 64' (leave it out for the model's configured default)",
                    )
                else:
                    max_tokens = n
        if env is plan_env:
            env = dict(plan_env)
        text, kind = "", cast(BodyKind, BODY_KINDS[0])
        body_inputs: list[tuple[int, str]] = []
        if body is not None:
            raw, first, kind = body
            if kind == "embed":
                text, body_inputs = self._embed(task, raw, first, values)
            else:
                if kind == "shell":  # values quoted for their place in the script
                    text = self._subst_shell(raw, first, values)
                else:
                    text = self._subst(raw, first, values)
                if kind == "transcribe":
                    text = self._transcribe(task, text, first)
                elif kind != "prompt":
                    text += "\n"
            self._suits(task, kind, cls, lines)
        if cls is None:
            cls = _CLASSES.get(DEFAULT_CLASS_OF_KIND.get(kind, ""), DEFAULT_CLASS)
        return _Record(
            id=eid,
            base=task.id,
            line=task.line,
            body=text,
            kind=kind,
            cls=cls,
            priority=priority,
            timeout_s=timeout_s,
            retries=retries,
            env=env,
            sensitive=sensitive,
            deps=deps,
            deps_line=deps_line,
            model=model,
            max_tokens=max_tokens,
            inputs=inputs,
            inputs_line=lines["inputs"],
            body_inputs=body_inputs,
            requires_external=requires_external,
        )

    def _suits(self, task: _RawTask, kind: str, cls: TaskClass | None, lines: dict[str, int]) -> None:
        """Check that the class (when valid and given) and the model fields suit the body's kind."""
        need = DEFAULT_CLASS_OF_KIND.get(kind)
        if cls == "external" and kind == "prompt":
            pass  # a question for Claude
        elif cls is not None and need is not None and cls != need:
            self.add(
                lines["class"],
                f"task '{task.id}' has {_a(kind)} {kind} body, which runs only in class {need}, "
                f"but its class is '{cls}'",
                f"write '- class: {need}', or leave class out: "
                f"{_a(kind)} {kind} task is class {need} by default",
            )
        elif cls == "llm" and kind != "prompt":
            self.add(
                lines["class"],
                f"task '{task.id}' has class llm, which runs only prompt bodies, but its body is {kind}",
                "use class script for shell commands that need a GPU; class llm is for '```prompt' bodies",
            )
        if lines["model"] and kind not in MODEL_BODY_KINDS:
            self.add(
                lines["model"],
                f"field 'model' of task '{task.id}' applies only to prompt, transcribe and embed bodies, "
                f"and its body is {kind}",
                f"remove the line: {_a(kind)} {kind} task runs no model",
            )
        if lines["max_tokens"] and kind != "prompt":
            self.add(
                lines["max_tokens"],
                f"field 'max_tokens' of task '{task.id}' applies only to prompt bodies, "
                f"and its body is {kind}",
                "remove the line: only a prompt generates tokens",
            )
        if lines["inputs"] and kind not in _INPUT_KINDS:
            hint = (
                "a transcribe body is the path of one audio file: have the dependency write the file, "
                "and put its path in the body"
                if kind == "transcribe"
                else "a shell task takes no outputs: have the dependency write a file, and read it"
            )
            self.add(
                lines["inputs"],
                f"field 'inputs' of task '{task.id}' applies only to prompt and embed bodies, "
                f"and its body is {kind}",
                hint,
            )

    def _transcribe(self, task: _RawTask, text: str, first: int) -> str:
        """A transcribe body: the path of one audio file, and at most one 'save: PATH' line (where
        the worker writes the segments). Kept as the path, then the save line, without blank lines."""
        paths: list[str] = []
        save = ""
        for i, part in enumerate(text.split("\n")):
            part = part.strip()
            key, colon, value = part.partition(":")
            if not colon or key.strip().lower() != "save":
                if part:
                    paths.append(part)
                continue
            if not value.strip():
                self.add(
                    first + i,
                    f"the 'save:' line of the transcribe body of task '{task.id}' has nothing after the ':'",
                    "write 'save: PATH' (a JSON file of the segments), or leave the line out",
                )
            elif save:
                self.add(
                    first + i,
                    f"the transcribe body of task '{task.id}' has a second 'save:' line",
                    "the segments go to one file; keep one of the two lines",
                )
            else:
                save = value.strip()
        if len(paths) != 1:
            self.add(
                first - 1,
                f"the transcribe body of task '{task.id}' "
                + (f"has {len(paths)} audio paths, not one" if paths else "names no audio file"),
                "a transcribe body is the path of one audio file, e.g. '{OUT}/talk.wav' "
                "(and maybe a line 'save: PATH'); use foreach to transcribe several files",
            )
            return text
        return "\n".join([paths[0], f"save: {save}"] if save else paths)

    def _embed(
        self, task: _RawTask, raw: str, first: int, values: Mapping[str, str]
    ) -> tuple[str, list[tuple[int, str]]]:
        """An embed body: its lines, each written as 'key: value', and its `input:` lines.

        Blank lines are dropped and keys lower-cased, so that the worker reads one form."""
        out: list[str] = []
        inputs: list[tuple[int, str]] = []
        texts = 0
        save_line = 0
        for i, raw_line in enumerate(raw.split("\n")):
            line = first + i
            for part in self._subst(raw_line, line, values).split("\n"):
                if not part.strip():
                    continue
                head, colon, rest = part.partition(":")
                key = head.strip().lower()
                value = rest.strip()
                if not colon or key not in EMBED_KEYS:
                    self.add(
                        line,
                        f"line {_show(part.strip())} of the embed body of task '{task.id}' "
                        "is not a 'file:', 'text:', 'input:' or 'save:' line",
                        _EMBED_HINT,
                    )
                    continue
                if not value:
                    self.add(
                        line,
                        f"the '{key}:' line of the embed body of task '{task.id}' has nothing after the ':'",
                        _EMBED_HINT,
                    )
                    continue
                out.append(f"{key}: {value}")
                if key == "save":
                    if save_line:
                        self.add(
                            line,
                            f"the embed body of task '{task.id}' has a second 'save:' line "
                            f"(the first is at line {save_line})",
                            "the vectors go to one file; keep one of the two lines",
                        )
                    save_line = save_line or line
                    if not value.endswith(".npy"):
                        self.add(
                            line,
                            f"save path {_show(value)} of task '{task.id}' does not end in '.npy'",
                            "the vectors are saved as a NumPy array: name a .npy file, "
                            "e.g. 'save: {OUT}/vectors.npy'",
                        )
                    continue
                texts += 1
                if key == "input":
                    inputs.append((line, value))
        if not texts:
            self.add(
                first - 1,
                f"the embed body of task '{task.id}' names no texts to embed",
                "add 'text: TEXT', 'file: PATH' or 'input: TASK' lines",
            )
        return "\n".join(out), inputs

    def _task_env(self, task: _RawTask, line: int, text: str, values: Mapping[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for part in _split_list(text):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq:
                self.add(
                    line,
                    f"env entry {_show(part)} of task '{task.id}' has no '='",
                    "write '- env: NAME=value, OTHER=value'",
                )
                continue
            if not NAME_RE.fullmatch(name):
                self.add(
                    line,
                    f"{_show(name)} in the env of task '{task.id}' is not a valid environment variable name",
                    _ENV_NAME_HINT,
                )
                continue
            if name in env:
                self.add(line, f"env of task '{task.id}' sets {name} twice", "keep one of the two entries")
                continue
            env[name] = self._subst(value.strip(), line, values)
        return env

    # ------------------------------------------------------------ dependencies

    def _resolve(self, records: list[_Record], targets: dict[str, list[str]]) -> None:
        for r in records:
            if r.deps:
                out: list[str] = []
                for dep in r.deps:
                    found = self._target(r, dep, r.deps_line, targets, "depends on", "depends_on")
                    if found is not None:
                        out.extend(found)
                r.resolved = tuple(dict.fromkeys(out))
            if r.inputs or r.body_inputs:
                self._resolve_inputs(r, targets)

    def _target(
        self, r: _Record, name: str, line: int, targets: dict[str, list[str]], verb: str, field: str
    ) -> list[str] | None:
        """The task ids `name` stands for in a list field of `r`, or None (reported) if none."""
        found = targets.get(name)
        if found is None:
            message = f"task '{r.base}' {verb} unknown task {_show(name)}"
            if self._may_suggest():
                near = _closest(name, list(targets))
                if near:
                    message += f"; did you mean '{near}'?"
            self.add(line, message, f"{field} lists task ids (the '### <id>' headings), separated by commas")
            return None
        if name == r.base or name == r.id:
            self.add(line, f"task '{r.base}' {verb} itself", f"remove '{name}' from its {field}")
            return None
        return found

    def _resolve_inputs(self, r: _Record, targets: dict[str, list[str]]) -> None:
        """Resolve `inputs` (and an embed body's `input:` lines) like depends_on; each must be in it."""
        deps = set(r.resolved)

        def resolve(name: str, line: int) -> list[str]:
            found = self._target(r, name, line, targets, "takes the output of", "inputs")
            if found is None:
                return []
            if not deps.issuperset(found):
                self.add(
                    line,
                    f"task '{r.base}' takes the output of '{name}', which is not in its depends_on",
                    f"add '{name}' to depends_on: a task can take only the outputs of tasks it waits for",
                )
            return found

        field_ids = {name: resolve(name, r.inputs_line) for name in r.inputs}
        if r.kind != "embed":
            r.resolved_inputs = tuple(dict.fromkeys(i for ids in field_ids.values() for i in ids))
            return
        body_ids = {name: resolve(name, line) for line, name in r.body_inputs}
        used = {i for ids in body_ids.values() for i in ids}
        for name, ids in field_ids.items():
            if ids and not used.issuperset(ids):
                self.add(
                    r.inputs_line,
                    f"task '{r.base}' lists '{name}' in inputs, "
                    f"but its embed body has no 'input: {name}' line",
                    f"add a line 'input: {name}' to the body to embed that task's output, "
                    "or remove it from inputs",
                )
        r.resolved_inputs = tuple(dict.fromkeys(i for ids in body_ids.values() for i in ids))
        # An 'input:' line naming a foreach task stands for each of its expansions.
        many = {name: ids for name, ids in body_ids.items() if ids and ids != [name]}
        if many:
            lines: list[str] = []
            for text in r.body.split("\n"):
                name = text[len("input: ") :] if text.startswith("input: ") else ""
                if name in many:
                    lines.extend(f"input: {i}" for i in many[name])
                else:
                    lines.append(text)
            r.body = "\n".join(lines)

    def _cycles(self, records: list[_Record]) -> None:
        """Report each cycle an iterative depth-first search finds (one per back edge)."""
        index: dict[str, int] = {}
        for i, r in enumerate(records):
            index.setdefault(r.id, i)
        adj = [[index[d] for d in r.resolved if d in index] for r in records]
        state = [0] * len(records)  # 0 new, 1 on the current path, 2 done
        where = [0] * len(records)  # position on the path, while state is 1
        cycles: dict[tuple[int, ...], None] = {}
        for start in range(len(records)):
            if state[start]:
                continue
            path = [start]
            edge = [0]
            state[start] = 1
            while path:
                node = path[-1]
                k = edge[-1]
                if k < len(adj[node]):
                    edge[-1] = k + 1
                    nxt = adj[node][k]
                    if state[nxt] == 0:
                        state[nxt] = 1
                        where[nxt] = len(path)
                        path.append(nxt)
                        edge.append(0)
                    elif state[nxt] == 1:
                        cycle = path[where[nxt] :]  # a list of indices
                        first = cycle.index(min(cycle))
                        cycles[(*cycle[first:], *cycle[:first])] = None
                else:
                    state[node] = 2
                    path.pop()
                    edge.pop()
        for n, ring in enumerate(cycles):
            if n == _MAX_CYCLES:
                self.add(
                    records[ring[0]].line,
                    f"{len(cycles) - _MAX_CYCLES} more dependency cycles are not shown",
                    "fix the cycles above and check again",
                )
                break
            # Edges point from a task to what it depends on; show them that way.
            ids = [records[i].id for i in ring]
            self.add(
                records[ring[0]].line,
                "dependency cycle: " + " -> ".join([*ids, ids[0]]),
                "each task in it waits for the next; remove one of these depends_on entries",
            )


@functools.lru_cache(maxsize=256)
def _template(text: str) -> tuple[tuple[str, ...], tuple[tuple[str, bool, int, str], ...]]:
    """`text` cut at its `{NAME}`s: the literal pieces (with `{{`/`}}` made braces), and for each
    `{NAME}` its name, whether it is `:raw`, where it starts and the text of it. Cached: each
    expansion of a foreach task has the same texts."""
    pieces: list[str] = []
    names: list[tuple[str, bool, int, str]] = []
    buf: list[str] = []
    last = 0
    for m in _SUBST_RE.finditer(text):
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


class _Bound(Mapping[str, str]):
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


def _a(word: str) -> str:
    """The indefinite article for `word`."""
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def _int(text: str, low: int, high: int) -> int | None:
    text = text.strip()
    if not _INT_RE.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


@functools.lru_cache(maxsize=256)
def _duration(text: str) -> float | None:
    t = text.strip().lower().replace(" ", "")
    if not t:
        return None
    if _SECONDS_RE.fullmatch(t):
        value = float(t)
    else:
        m = _DURATION_RE.fullmatch(t)
        if m is None or not any(m.groups()):
            return None
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        value = h * 3600 + mi * 60 + s
    return value if math.isfinite(value) else None


def parse_followups(text: str, *, source: str, workdir: str = "") -> tuple[TaskSpec, ...]:
    """Follow-up tasks (plan-format task sections, as Claude proposes them), checked exactly as a
    plan's tasks are. A text without its own `## Tasks` heading is read as that section's body.

    Raises `PlanError` listing every problem; never anything else."""
    body = text if re.search(r"^ {0,3}##[ \t]+tasks[ \t]*$", text, re.M | re.I) else "## Tasks\n\n" + text
    if not re.search(r"^ {0,3}#[ \t]", body, re.M):
        body = "# follow-up tasks\n\n" + body
    return parse_plan(body, source=source, workdir=workdir).tasks
