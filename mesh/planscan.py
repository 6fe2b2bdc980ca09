"""Scan a plan's markdown into its parts: headings, fenced blocks and other lines.

Then sort them into the plan's sections: the title and description, the lines of
`## Variables`, `## Env` and `## Escalation`, and each `### <id>` task with its
field lines and code blocks. No value is read here (see `mesh.planfields`).

The scan is a single pass over the lines, fences first, so that a `#` line
inside a code block is never a heading.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from mesh.planproblems import Report, closest
from mesh.validate import show as _show

# the fields a task may have: `- name: value` lines under its heading
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
    "escalate",
    "schema",
    "artifacts",
)
# the `##` sections the parser reads (the lines of any other are ignored)
SECTIONS = ("variables", "env", "tasks", "escalation")

_LIST_ITEM_RE = re.compile(r" {0,3}[-*+][ \t]+(\S.*)")
_FIELD_RE = re.compile(r" {0,3}[-*+][ \t]+([A-Za-z_][A-Za-z0-9_-]*)[ \t]*:(.*)")
_SCAN_START = frozenset(" #`~")  # a line starting otherwise is plain text
_FENCE_START = " `~"


@dataclass(slots=True)
class Heading:
    line: int
    level: int
    text: str


@dataclass(slots=True)
class Fence:
    line: int
    info: str
    lines: list[str]
    closed: bool


@dataclass(slots=True)
class Text:
    line: int
    text: str


Item = Heading | Fence | Text


def scan(lines: list[str]) -> list[Item]:
    """Split lines into headings, fenced blocks and other non-blank lines (CommonMark-ish)."""
    items: list[Item] = []
    append = items.append
    n = len(lines)
    i = 0
    while i < n:
        raw = lines[i]
        if not raw or raw[0] not in _SCAN_START:
            if raw.strip():
                append(Text(i + 1, raw))
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
                    append(Fence(i + 1, info, body, closed))
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
                    append(Heading(i + 1, level, text))
                    i += 1
                    continue
        if s.strip():
            append(Text(i + 1, raw))
        i += 1
    return items


@dataclass(slots=True)
class RawTask:
    """A `### <id>` task as written: its field lines and code blocks, none read yet."""

    id: str
    line: int
    fields: dict[str, tuple[int, str]] = field(default_factory=dict)
    fences: list[Fence] = field(default_factory=list)


class Outline:
    """The plan's sections as written: filled by `outline`, read by `mesh.plan`."""

    def __init__(self, lines: list[str], report: Report) -> None:
        self.lines = lines
        self.report = report
        self.title: str | None = None
        self.title_line = 0
        self.description = ""
        self.var_entries: list[tuple[int, str]] = []
        self.env_entries: list[tuple[int, str]] = []
        self.escalation_entries: list[tuple[int, str]] = []
        self.tasks_line = 0
        self.other_sections: list[tuple[int, str]] = []
        self.raw_tasks: list[RawTask] = []

    def structure(self, items: list[Item]) -> None:
        mode = "pre"  # pre | desc | variables | env | tasks | other
        seen: dict[str, int] = {}
        first_section = 0
        desc_end = 0
        task: RawTask | None = None
        for item in items:
            if isinstance(item, Heading):
                if item.level == 1:
                    if self.title is None:
                        self.title, self.title_line = item.text, item.line
                        if first_section:
                            self.report.add(
                                item.line,
                                "the title must come before the first '##' section",
                                f"move '# {item.text}' above line {first_section}",
                            )
                        else:
                            mode = "desc"
                        if not item.text:
                            self.report.add(
                                item.line, "the title is empty", "write the plan's title after '# '"
                            )
                    else:
                        self.report.add(
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
                    if name in SECTIONS:
                        if name in seen:
                            self.report.add(
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
                    task = RawTask(item.text, item.line)
                    self.raw_tasks.append(task)
                continue
            if isinstance(item, Fence):
                if not item.closed:
                    self.report.add(
                        item.line,
                        "this code block is never closed",
                        "end it with a line of the same fence characters (e.g. '```'); "
                        "until then the rest of the file is part of it",
                    )
                if mode == "tasks":
                    if task is None:
                        self.report.add(
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
            self.report.add(1, "plan has no title", "start the file with '# <title>'")
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
            self.report.add(1, "plan has no '## Tasks' section", hint)
        elif not self.raw_tasks:
            self.report.add(
                self.tasks_line,
                "the '## Tasks' section has no tasks",
                "add a task: a heading '### <id>' followed by a ```shell block",
            )

    def _task_line(self, task: RawTask | None, item: Text) -> None:
        """A non-heading, non-fence line in '## Tasks': a field, or prose."""
        text = item.text
        m = _FIELD_RE.match(text)
        if m is None:
            # Prose, or a field written wrongly: '- retries 2', '- depends on: x'.
            li = _LIST_ITEM_RE.match(text)
            if task is not None and not task.fences and li is None:
                # a field indented 4 spaces or a tab: Markdown reads it as code, and mesh as
                # prose, so the field would be dropped without a word (a dependency ignored)
                deep = _FIELD_RE.match(text.lstrip(" \t"))
                if deep is not None and deep.group(1).lower() in FIELDS:
                    key = deep.group(1).lower()
                    self.report.add(
                        item.line,
                        f"field '{key}' of task '{task.id}' is indented, so it is not read as a field",
                        f"start it at the line's beginning: '- {key}: ...'",
                    )
                return
            if li is None or task is None or task.fences:
                return
            head, colon, _ = li.group(1).partition(":")
            if colon:
                key = "_".join(head.lower().replace("-", " ").split())
                if key in FIELDS:
                    self.report.add(
                        item.line,
                        f"field {_show(head.strip())} of task '{task.id}' is misspelt",
                        f"write '- {key}: <value>'",
                    )
            else:
                words = head.split()
                first = words[0].lower() if words else ""
                if first in FIELDS:
                    self.report.add(
                        item.line,
                        f"field '{first}' of task '{task.id}' has no ':' after its name",
                        f"write '- {first}: <value>'",
                    )
            return
        key = m.group(1).lower()
        value = m.group(2).strip()
        if task is None:
            if key in FIELDS:
                self.report.add(
                    item.line,
                    f"field '{key}' comes before any task heading",
                    "put fields right under a task heading '### <id>'",
                )
            return
        if task.fences:
            if key in FIELDS:
                self.report.add(
                    item.line,
                    f"field '{key}' of task '{task.id}' comes after its body",
                    f"move it above the code block at line {task.fences[0].line}",
                )
            return
        if key not in FIELDS:
            near = closest(key, list(FIELDS))
            message = f"unknown field '{m.group(1)}' in task '{task.id}'"
            if near:
                message += f"; did you mean '{near}'?"
            self.report.add(item.line, message, "known fields: " + ", ".join(FIELDS))
            return
        if key in task.fields:
            self.report.add(
                item.line,
                f"field '{key}' is given twice in task '{task.id}' (first at line {task.fields[key][0]})",
                "keep one of the two lines",
            )
            return
        task.fields[key] = (item.line, value)


def outline(lines: list[str], report: Report) -> Outline:
    """Scan `lines` and sort what is found into the plan's sections."""
    found = Outline(lines, report)
    found.structure(scan(lines))
    return found
