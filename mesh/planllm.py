"""The parser's reading of what only an LLM task has: a chat body, and the `schema` field.

`chat_body` substitutes a chat body's variables line by line and checks its turns
(`mesh.chat.read_turns`), each problem at its line of the plan. `schema_field` reads a
`- schema:` value, inline JSON or a file read through the plan's `ReadFile`, and checks that it
is valid JSON Schema (`mesh.schemas`); the task spec carries it as compact JSON text.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.chat import read_turns
from mesh.planproblems import Report
from mesh.planscan import RawTask
from mesh.plantemplate import Expander
from mesh.schemas import SCHEMA_HINT, FileRefused, ReadFile, canonical, load_schema
from mesh.validate import show as _show

NO_SCHEMA_FILES = (
    "a schema file is read only for a plan file on disk (`mesh submit PLAN.md`); "
    "this plan came as text: write the schema inline, as one line of JSON"
)


def chat_body(
    report: Report, expander: Expander, task: RawTask, raw: str, first: int, values: Mapping[str, str]
) -> str:
    """A chat body, its variables substituted, with a problem at its line for each fault of
    its turns. A value that spans lines stays inside the turn of the line it was written in
    (its lines are indented, so none of them can open a turn)."""
    parts: list[str] = []
    lines: list[int] = []
    for i, raw_line in enumerate(raw.split("\n")):
        sub = expander.subst(raw_line, first + i, values).split("\n")
        parts.append(sub[0])
        parts.extend(" " + more if more and not more[0].isspace() else more for more in sub[1:])
        lines.extend([first + i] * len(sub))
    text = "\n".join(parts)
    _, problems = read_turns(text)
    for p in problems:
        report.add(lines[p.line] if p.line < len(lines) else first, f"task '{task.id}': {p.message}", p.hint)
    return text


def schema_field(report: Report, task: RawTask, line: int, value: str, read: ReadFile | None) -> str:
    """The schema a `- schema:` line names (compact JSON text), or '' after reporting why not."""
    value = value.strip()
    if not value:
        report.add(line, f"the schema of task '{task.id}' is empty", SCHEMA_HINT)
        return ""
    where = "inline schema"
    text = value
    if not value.startswith("{"):
        where = f"schema file {_show(value)}"
        if read is None:
            report.add(line, f"task '{task.id}' names {where}, which cannot be read here", NO_SCHEMA_FILES)
            return ""
        try:
            text = read(value)
        except FileRefused as exc:
            report.add(line, f"{where} of task '{task.id}' {exc.why}", exc.hint)
            return ""
    schema, problem = load_schema(text)
    if problem:
        report.add(line, f"{where} of task '{task.id}': {problem}", SCHEMA_HINT)
        return ""
    return canonical(schema)
