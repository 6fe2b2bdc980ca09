"""Read a plan, a markdown text of tasks, into a validated `PlanSpec`: the parser's public API.

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

`parse_plan` and `parse_followups` either return what they read or raise
`PlanError` carrying every problem they found, each with its line and a hint;
they raise nothing else, whatever the input.

The parser reads no file: it takes the plan's text, and for a foreach glob a
`Glob` function that lists the files a pattern matches (`mesh.host.planfiles`
reads a plan file and lists the files next to it). Without one, a foreach over
a glob is refused; Claude's follow-up tasks never get one.

The parser is a single pass over the lines (`mesh.planscan`), then checks that
each run in linear time (`mesh.plantemplate`, `mesh.planfields`,
`mesh.plantasks`), so that plans of tens of thousands of tasks parse in well
under a second. Its work is bounded (`PlanLimits`): the size of the text, the
number of tasks and of foreach expansions, and the size of the parsed plan.

In a shell body a value is written quoted for its place (`mesh.shellquote`):
a file name or a `--var` value reaches bash as text, never as code to run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import PlanError, Problem
from mesh.events import PlanSpec, TaskSpec
from mesh.planfields import (
    BODY_KIND_ALIASES,
    DEFAULT_CLASS,
    DEFAULT_PRIORITY,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    EMBED_KEYS,
    ESCALATION_KEYS,
    MAX_ESCALATE_AFTER,
    FieldReader,
    Record,
)
from mesh.planproblems import Report
from mesh.planscan import FIELDS, Heading, outline, scan
from mesh.plantasks import TaskBuilder
from mesh.plantemplate import Expander, Glob, GlobRefused
from mesh.schemas import FileRefused, ReadFile
from mesh.validate import MAX_RETRIES, MAX_TIMEOUT_S, MAX_TOKENS, check_task

__all__ = [
    "BODY_KIND_ALIASES",
    "DEFAULT_CLASS",
    "DEFAULT_PRIORITY",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "EMBED_KEYS",
    "ESCALATION_KEYS",
    "FIELDS",
    "MAX_ESCALATE_AFTER",
    "MAX_RETRIES",
    "MAX_TIMEOUT_S",
    "MAX_TOKENS",
    "FileRefused",
    "Glob",
    "GlobRefused",
    "PlanLimits",
    "ReadFile",
    "parse_followups",
    "parse_plan",
    "too_big",
]

# Why a foreach glob is refused when no `Glob` is given.
NO_FILES = (
    "cannot be expanded: a glob needs a plan file on disk, to list the files next to it, "
    "and this plan was given as text"
)
NO_FILES_FOLLOWUPS = (
    "is refused: Claude's follow-up tasks may not list the files of the machine that reads them"
)


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """How much work one plan may ask of the parser (the settings `plan_max_*`, `plan_glob_outside`).

    - `max_expansions`: foreach items, per foreach and over the whole plan;
    - `max_tasks`: tasks of the plan, foreach expansions included;
    - `max_bytes`: the plan's text, and the parsed plan (bodies and environments of every task,
      variable values) after substitution and expansion;
    - `glob_outside`: whether a foreach glob may name files outside the plan's directory (an
      absolute pattern elsewhere, or '..'); the `Glob` of a plan file keeps to it.
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
    glob: Glob | None = None,
    read: ReadFile | None = None,
) -> PlanSpec:
    """Parse and validate the markdown `text` of a plan.

    `variables` override the defaults under `## Variables` (`mesh submit --var
    NAME=value`); a name the plan does not declare is added. `workdir` is kept
    as `PlanSpec.workdir` (where the tasks run, and where relative foreach globs
    were resolved). `glob` lists the files a foreach glob matches; when None, a
    foreach over a glob is a problem. `read` reads a schema file a task names
    (`- schema: FILE.json`); when None, only inline schemas are read. `limits`
    bound the work (the defaults of `PlanLimits` when None).

    Raises `PlanError` listing every problem found; never anything else.
    """
    return _parse(text, source, dict(variables or {}), workdir, limits or PlanLimits(), glob, NO_FILES, read)


def parse_followups(text: str, *, source: str) -> tuple[TaskSpec, ...]:
    """Follow-up tasks (plan-format task sections, as Claude proposes them), checked exactly as a
    plan's tasks are. A text without its own `## Tasks` heading is read as that section's body.
    A foreach over a glob is refused: the follow-ups come from Claude, and a glob would list the
    files of the machine that reads them.

    Raises `PlanError` listing every problem; never anything else."""
    # its headings as the plan's scan finds them: a '# comment' in a code block is none
    headings = [h for h in scan(text.splitlines()) if isinstance(h, Heading)]
    has_tasks = any(h.level == 2 and h.text.lower() == "tasks" for h in headings)
    body = text if has_tasks else "## Tasks\n\n" + text
    if not any(h.level == 1 for h in headings):
        body = "# follow-up tasks\n\n" + body
    return _parse(body, source, {}, "", PlanLimits(), None, NO_FILES_FOLLOWUPS).tasks


def _ladder(r: Record, default: tuple[str, ...]) -> tuple[str, ...]:
    """A task's escalation ladder: its own `escalate`, else the plan's `ladder` for a prompt task
    that runs on a local model (class llm)."""
    if r.escalate is not None:
        return r.escalate
    return default if r.kind in ("prompt", "chat") and r.cls == "llm" and not r.requires_external else ()


def too_big(size: int, limit: int) -> Problem:
    """The plan's text is over the limit (`size` 0: not known, e.g. read from a pipe)."""
    told = f"{size:,} bytes, " if size else ""
    return Problem(
        0,
        f"the plan is {told}more than the limit of {limit:,} bytes",
        "split it into several plans, or raise the setting plan_max_bytes",
    )


def _parse(
    text: str,
    source: str,
    overrides: dict[str, str],
    workdir: str,
    limits: PlanLimits,
    glob: Glob | None,
    no_files: str,
    read: ReadFile | None = None,
) -> PlanSpec:
    """Scan, read every section, make the tasks, check the graph; then raise, or build the plan."""
    report = Report()
    if len(text) > limits.max_bytes:  # the text is too big to read at all
        raise PlanError(source, [too_big(len(text), limits.max_bytes)])
    text = text.removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    plan = outline(lines, report)
    expander = Expander(
        report,
        overrides,
        workdir=workdir,
        files=glob,
        no_files=no_files,
        max_bytes=limits.max_bytes,
        max_expansions=limits.max_expansions,
    )
    fields = FieldReader(report, expander, read)
    builder = TaskBuilder(report, expander, fields, limits.max_tasks)
    variables = expander.variables(plan.var_entries)
    env = fields.plan_env(plan.env_entries, variables)
    escalation = fields.escalation(plan.escalation_entries, variables)
    records = builder.tasks(plan.raw_tasks, variables, env)
    builder.cycles(records)
    if report.problems:
        raise PlanError(source, list(dict.fromkeys(report.problems)))
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
            escalate=_ladder(r, escalation.ladder),
            schema=r.schema,
            artifacts=r.artifacts,
        )
        for r in records
    )
    # what the brain checks of each task (`mesh.validate`), for what the reading above leaves to
    # it (an id a foreach made too long, a NUL byte in a value): refused here, at the task's line,
    # not by the brain after the plan's files were sent
    for t in tasks:
        for why in check_task(t):
            report.add(t.line, why, "the brain refuses a plan with such a task: change the task")
    if report.problems:
        raise PlanError(source, list(dict.fromkeys(report.problems)))
    return PlanSpec(
        title=plan.title or "",
        tasks=tasks,
        description=plan.description,
        source=source,
        workdir=workdir,
        variables=variables,
        env=env,
        escalation=escalation,
    )
