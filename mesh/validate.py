"""The checks every plan submission passes, wherever it comes from.

The CLI runs them on what its parser built before anything is sent; the brain runs them again on
every submission it reads, because it does not trust its clients (any holder of the CLI's
credentials, or a script, can publish a submission). One function, so the two never disagree.

Everything checked here is about the submission alone: names that become subject tokens and KV
keys, ranges, which class runs which body, environment names, the dependency graph. What needs
the outside world (does the model exist on this mesh) is the brain's to check.
"""

from __future__ import annotations

import re
from collections import deque

from mesh.chat import read_turns
from mesh.events import (
    BODY_KINDS,
    CLAUDE,
    DEFAULT_CLASS_OF_KIND,
    LLM_BODY_KINDS,
    MODEL_BODY_KINDS,
    TASK_CLASSES,
    PlanSpec,
    SubmitPlan,
    TaskSpec,
)
from mesh.schemas import schema_problem

# A plan id or task id is a NATS subject token and part of KV keys and message ids: letters,
# digits, '_' and '-', and short enough that every subject built from it stays readable.
MAX_PLAN_ID_CHARS = 100
MAX_TASK_ID_CHARS = 200
MIN_PRIORITY = 1
MAX_PRIORITY = 10
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_RETRIES = 100
MAX_TOKENS = 1_000_000
# body kinds that take the outputs of their `inputs`
INPUT_KINDS = ("prompt", "chat", "embed")
# the most rungs an escalation ladder may have
MAX_LADDER = 8
# what is reported of a bad submission at most (a broken 100,000-task plan is not a wall of text)
MAX_PROBLEMS = 20

# a plan, task or model id; a variable or environment variable name
ID_RE = re.compile(r"[A-Za-z0-9_-]+")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def show(value: str, limit: int = 60) -> str:
    """A value quoted for a message, shortened when long."""
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return repr(value)


def id_problem(value: str, what: str, limit: int) -> str:
    """Why `value` cannot be a plan or task id ('' when it can)."""
    if not value:
        return f"{what} is empty"
    if len(value) > limit:
        return f"{what} {show(value)} is longer than {limit} characters"
    if not ID_RE.fullmatch(value):
        return f"{what} {show(value)} may hold only letters, digits, '_' and '-'"
    return ""


def plan_id_problem(plan_id: str) -> str:
    """Why `plan_id` cannot be a plan's id ('' when it can): nothing could be published about
    such a plan, not even its rejection."""
    return id_problem(plan_id, "plan id", MAX_PLAN_ID_CHARS)


def check_submission(msg: SubmitPlan) -> list[str]:
    """Every problem of a submission (at most `MAX_PROBLEMS`); [] when it may be accepted."""
    why = plan_id_problem(msg.plan_id)
    if why:
        return [why]
    if msg.object:
        return []  # the tasks are in the object store: checked once the brain has read them
    return check_plan(msg.plan)


def check_plan(plan: PlanSpec) -> list[str]:
    """Every problem of a plan's tasks and environment (at most `MAX_PROBLEMS`)."""
    problems: list[str] = []
    if not plan.tasks:
        return ["the plan has no tasks"]
    for name in plan.env:
        if not NAME_RE.fullmatch(name):
            problems.append(f"plan environment variable name {show(name)} is not a valid name")
    ids: set[str] = set()
    for spec in plan.tasks:
        if spec.id in ids:
            problems.append(f"duplicate task id {show(spec.id)}")
        ids.add(spec.id)
        problems += check_task(spec)
        if len(problems) >= MAX_PROBLEMS:
            return problems[:MAX_PROBLEMS]
    for spec in plan.tasks:
        for dep in spec.depends_on:
            if dep not in ids:
                problems.append(f"task {show(spec.id)} depends on unknown task {show(dep)}")
        for name in spec.inputs:
            if name not in ids:
                problems.append(f"task {show(spec.id)} takes the output of unknown task {show(name)}")
        if len(problems) >= MAX_PROBLEMS:
            return problems[:MAX_PROBLEMS]
    if not problems:
        cycle = find_cycle(plan.tasks)
        if cycle:
            problems.append(cycle)
    return problems


def check_task(spec: TaskSpec) -> list[str]:
    """The problems of one task on its own."""
    problems = []
    why = id_problem(spec.id, "task id", MAX_TASK_ID_CHARS)
    if why:
        return [why]
    t = show(spec.id)
    if spec.cls not in TASK_CLASSES:
        problems.append(f"task {t} has unknown class {show(spec.cls)}; classes: {', '.join(TASK_CLASSES)}")
    if spec.kind not in BODY_KINDS:
        problems.append(f"task {t} has unknown body kind {show(spec.kind)}; kinds: {', '.join(BODY_KINDS)}")
    need = DEFAULT_CLASS_OF_KIND.get(spec.kind)
    if spec.cls == "external" and spec.kind == "prompt":
        pass  # a question for Claude
    elif need is not None and spec.cls != need:
        problems.append(f"task {t} has a {spec.kind} body, which runs only in class {need}, not {spec.cls}")
    elif spec.cls == "llm" and spec.kind not in LLM_BODY_KINDS:
        problems.append(f"task {t} has class llm, which runs only prompt and chat bodies, not {spec.kind}")
    if not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
        problems.append(f"task {t} has priority {spec.priority}, not from {MIN_PRIORITY} to {MAX_PRIORITY}")
    if not 0 <= spec.retries <= MAX_RETRIES:
        problems.append(f"task {t} has retries {spec.retries}, not from 0 to {MAX_RETRIES}")
    if not 0 < spec.timeout_s <= MAX_TIMEOUT_S:
        problems.append(
            f"task {t} has timeout {spec.timeout_s}s, not above 0 and at most {MAX_TIMEOUT_S:.0f}s"
        )
    if not 0 <= spec.max_tokens <= MAX_TOKENS:
        problems.append(f"task {t} has max_tokens {spec.max_tokens}, not from 0 to {MAX_TOKENS}")
    if spec.max_tokens and spec.kind not in LLM_BODY_KINDS:
        problems.append(
            f"task {t} has max_tokens, which applies only to prompt and chat bodies, not {spec.kind}"
        )
    problems += _llm_problems(spec, t)
    if spec.model:
        if spec.kind not in MODEL_BODY_KINDS:
            problems.append(f"task {t} names a model, but a {spec.kind} body runs none")
        elif not ID_RE.fullmatch(spec.model):
            problems.append(f"task {t} names model {show(spec.model)}: letters, digits, '_' and '-' only")
    problems += ladder_problems(spec.escalate, spec.kind, spec.cls, spec.requires_external, f"task {t}")
    if spec.inputs and spec.kind not in INPUT_KINDS:
        problems.append(
            f"task {t} takes inputs, which apply only to prompt, chat and embed bodies, not {spec.kind}"
        )
    for name, value in spec.env.items():
        if not NAME_RE.fullmatch(name):
            problems.append(
                f"task {t} sets environment variable name {show(name)}, which is not a valid name"
            )
        elif "\0" in value:
            problems.append(f"task {t} sets environment variable {name} to a value holding a NUL byte")
    if "\0" in spec.body:
        problems.append(f"task {t} has a body holding a NUL byte")
    for pattern in spec.artifacts:
        if why := artifact_glob_problem(pattern):
            problems.append(f"task {t} has artifacts glob {show(pattern)}, which {why}")
    return problems


def artifact_glob_problem(pattern: str) -> str:
    """What is wrong with an `- artifacts:` glob ('' : nothing): it must stay under the task's
    working directory, so no absolute path, no '~' and no '..'."""
    if pattern.startswith(("/", "~")) or "\\" in pattern:
        return "is not relative to the task's working directory"
    if ".." in pattern.split("/"):
        return "leaves the task's working directory ('..')"
    return ""


def ladder_problems(ladder: tuple[str, ...], kind: str, cls: str, external: bool, who: str) -> list[str]:
    """The problems of an escalation ladder as written: model names, `claude` last and only
    there, no rung twice; local rungs only for a prompt task that runs locally (class llm)."""
    problems = []
    if len(ladder) > MAX_LADDER:
        problems.append(f"{who} has an escalation ladder of {len(ladder)} rungs, more than {MAX_LADDER}")
    for n, rung in enumerate(ladder):
        if not ID_RE.fullmatch(rung):
            problems.append(f"{who} climbs to model {show(rung)}: letters, digits, '_' and '-' only")
        elif rung == CLAUDE and n != len(ladder) - 1:
            problems.append(
                f"{who} names '{CLAUDE}' before the end of its escalation ladder: it is the last rung"
            )
        elif rung in ladder[:n]:
            problems.append(f"{who} names {show(rung)} twice in its escalation ladder")
    if any(r != CLAUDE for r in ladder) and (kind not in ("prompt", "chat") or cls != "llm" or external):
        problems.append(
            f"{who} climbs to local models, which run only prompt and chat bodies of class llm "
            f"(it is {kind}, class {cls}{', requires_external' if external else ''}); "
            f"'- escalate: {CLAUDE}' alone hands any task to Claude"
        )
    return problems


def _llm_problems(spec: TaskSpec, t: str) -> list[str]:
    """A chat body's turns and a schema, checked as the parser checks them."""
    problems = []
    if spec.schema:
        if spec.kind not in LLM_BODY_KINDS:
            problems.append(
                f"task {t} has a schema, which applies only to prompt and chat bodies, not {spec.kind}"
            )
        elif why := schema_problem(spec.schema):
            problems.append(f"task {t}: {why}")
    if spec.kind == "chat":
        problems += [
            f"task {t}, line {p.line + 1} of its chat body: {p.message}" for p in read_turns(spec.body)[1][:3]
        ]
    return problems


def find_cycle(tasks: tuple[TaskSpec, ...]) -> str:
    """'' when the dependencies form no cycle, else which tasks sit on one (Kahn's algorithm:
    whatever is never freed of its dependencies is on a cycle or behind one)."""
    indegree = {t.id: len(set(t.depends_on)) for t in tasks}
    children: dict[str, list[str]] = {}
    for t in tasks:
        for d in set(t.depends_on):
            children.setdefault(d, []).append(t.id)
    todo = deque(i for i, n in indegree.items() if n == 0)
    seen = 0
    while todo:
        node = todo.popleft()
        seen += 1
        for child in children.get(node, ()):
            indegree[child] -= 1
            if indegree[child] == 0:
                todo.append(child)
    if seen == len(indegree):
        return ""
    stuck = sorted(i for i, n in indegree.items() if n > 0)
    return f"dependency cycle among {', '.join(stuck[:10])}"
