"""Read the values of a plan's fields and bodies: durations, numbers, classes, bodies.

`FieldReader` checks each field of a task (priority, timeout, retries, class,
sensitive, model, inputs, max_tokens, env) and its body (shell, prompt,
transcribe, embed, noop) against the format, and the lines of `## Env` and
`## Escalation`; it makes one `Record` per task or foreach expansion.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from mesh.events import (
    BODY_KINDS,
    DEFAULT_CLASS_OF_KIND,
    LLM_BODY_KINDS,
    MODEL_BODY_KINDS,
    TASK_CLASSES,
    BodyKind,
    EscalationPolicy,
    TaskClass,
)
from mesh.planllm import chat_body, schema_field
from mesh.planproblems import Report, closest
from mesh.planscan import RawTask
from mesh.plantemplate import Expander
from mesh.schemas import ReadFile
from mesh.validate import (
    ID_RE,
    INPUT_KINDS,
    MAX_PRIORITY,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    MAX_TOKENS,
    MIN_PRIORITY,
    NAME_RE,
    artifact_glob_problem,
    ladder_problems,
)
from mesh.validate import show as _show

# the lines of a plan's `## Escalation` section
ESCALATION_KEYS: tuple[str, ...] = ("auto", "after", "sensitive", "followups", "review", "ladder")
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

_INT_RE = re.compile(r"[0-9]{1,9}")
_NUMBER = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
_SECONDS_RE = re.compile(_NUMBER)
_DURATION_RE = re.compile(rf"(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?")

_BODY_HINT = (
    "put the commands in a fenced block under the task heading: a line '```shell', the commands, "
    "a line '```' (or '```prompt', '```chat', '```transcribe', '```embed' for model work)"
)
_ENV_NAME_HINT = (
    "an environment variable name starts with a letter or '_' and has only letters, digits and '_'"
)
_MODEL_HINT = (
    "a model name has only letters, digits, '_' and '-', e.g. 'gemma3-270m'; "
    "leave the field out to use the configured default model for the body's kind"
)
_LADDER_HINT = (
    "write e.g. '- escalate: qwen-14b, claude': the bigger llm models of the registry in the order "
    "they are tried, then 'claude' last if the gateway may have the task after them"
)
_ARTIFACTS_HINT = (
    "write e.g. '- artifacts: out/*.txt, report.pdf': globs, separated by commas, of files under "
    "the task's working directory ('**' matches any depth)"
)
_EMBED_HINT = "each line of an embed body is 'file: PATH', 'text: TEXT', 'input: TASK' or 'save: PATH.npy'"


@dataclass(slots=True)
class Record:
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
    # `- escalate:` (None : not given, the plan's `ladder` applies)
    escalate: tuple[str, ...] | None = None
    schema: str = ""
    # `- artifacts:` globs, relative to the working directory
    artifacts: tuple[str, ...] = ()


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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


class FieldReader:
    """The fields and body of each task, with its variables substituted by `expander`."""

    def __init__(self, report: Report, expander: Expander, read: ReadFile | None = None) -> None:
        self.report = report
        self.expander = expander
        # reads a schema file the plan names (None: only inline schemas)
        self.read = read

    def plan_env(self, entries: list[tuple[int, str]], variables: Mapping[str, str]) -> dict[str, str]:
        """`## Env`: the environment of every task of the plan."""
        env: dict[str, str] = {}
        lines: dict[str, int] = {}
        for line, entry in entries:
            name, colon, value = entry.partition(":")
            name = name.strip()
            if not colon:
                self.report.add(line, f"env line {_show(entry)} has no ':'", "write '- NAME: value'")
                continue
            if not NAME_RE.fullmatch(name):
                self.report.add(
                    line,
                    f"{_show(name)} is not a valid environment variable name",
                    _ENV_NAME_HINT,
                )
                continue
            if name in lines:
                self.report.add(
                    line,
                    f"environment variable {name} is set twice (first at line {lines[name]})",
                    "keep one of the two lines",
                )
                continue
            lines[name] = line
            env[name] = self.expander.subst(value.strip(), line, variables)
        return env

    def escalation(self, entries: list[tuple[int, str]], variables: Mapping[str, str]) -> EscalationPolicy:
        """`## Escalation`: what the plan lets the brain hand to Claude."""
        values: dict[str, bool | int] = {}
        ladder: tuple[str, ...] = ()
        lines: dict[str, int] = {}
        for line, entry in entries:
            name, colon, raw = entry.partition(":")
            key = name.strip().lower()
            if not colon:
                self.report.add(
                    line, f"escalation line {_show(entry)} has no ':'", "write e.g. '- auto: true'"
                )
                continue
            if key not in ESCALATION_KEYS:
                near = closest(key, list(ESCALATION_KEYS))
                message = f"unknown escalation setting {_show(name.strip())}"
                if near:
                    message += f"; did you mean '{near}'?"
                self.report.add(line, message, "known settings: " + ", ".join(ESCALATION_KEYS))
                continue
            if key in lines:
                self.report.add(
                    line,
                    f"escalation setting '{key}' is given twice (first at line {lines[key]})",
                    "keep one of the two lines",
                )
                continue
            lines[key] = line
            value = self.expander.subst(raw.strip(), line, variables)
            if key == "ladder":
                ladder = tuple(split_list(value))
                for problem in ladder_problems(ladder, "prompt", "llm", False, "the plan's ladder"):
                    self.report.add(line, problem, _LADDER_HINT.replace("- escalate:", "- ladder:"))
                continue
            if key == "after":
                n = _int(value, 1, MAX_ESCALATE_AFTER)
                if n is None:
                    self.report.add(
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
                self.report.add(
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
            ladder=ladder,
        )

    # ------------------------------------------------------------ tasks

    def body(self, task: RawTask) -> tuple[str, int, BodyKind] | None:
        if not task.fences:
            self.report.add(task.line, f"task '{task.id}' has no body", _BODY_HINT)
            return None
        for extra in task.fences[1:]:
            self.report.add(
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
            self.report.add(fence.line, message, f"known kinds: {known}; e.g. open the block with '```shell'")
        text = "\n".join(fence.lines)
        if fence.closed and not text.strip() and kind != "noop":
            self.report.add(
                fence.line,
                f"the body of task '{task.id}' is empty",
                "put the task's commands (or its prompt, audio path or embed lines) in the block",
            )
            return None
        if kind is None or not fence.closed or len(task.fences) > 1:
            return None
        return text, fence.line + 1, kind

    def record(
        self,
        task: RawTask,
        eid: str,
        values: Mapping[str, str],
        body: tuple[str, int, BodyKind] | None,
        plan_env: dict[str, str],
    ) -> Record:
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
        escalate: tuple[str, ...] | None = None
        escalate_line = 0
        schema = ""
        artifacts: tuple[str, ...] = ()
        # where the fields that must suit the body's kind are (0: not given)
        lines = {"class": 0, "model": 0, "max_tokens": 0, "inputs": 0, "schema": 0}
        for key, (line, raw_value) in task.fields.items():
            if key == "foreach":
                continue
            if key == "env":
                env = {**plan_env, **self._task_env(task, line, raw_value, values)}
                continue
            if key in lines:
                lines[key] = line
            if key == "schema" and raw_value.lstrip().startswith("{"):
                value = raw_value  # inline JSON: its braces are the schema's, not variables
            else:
                value = self.expander.subst(raw_value, line, values)
            if key == "depends_on":
                deps_line = line
                deps = list(dict.fromkeys(split_list(value)))
            elif key == "priority":
                p = _int(value, MIN_PRIORITY, MAX_PRIORITY)
                if p is None:
                    self.report.add(
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
                    self.report.add(
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
                    self.report.add(
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
                    self.report.add(
                        line,
                        f"class {_show(value)} of task '{task.id}' is not a known class",
                        "class is one of: " + ", ".join(TASK_CLASSES),
                    )
                else:
                    cls = found
            elif key in ("sensitive", "requires_external"):
                b = _BOOLS.get(value.strip().lower())
                if b is None:
                    self.report.add(
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
                    self.report.add(
                        line, f"model {_show(name)} of task '{task.id}' is not a model name", _MODEL_HINT
                    )
            elif key == "inputs":
                inputs = list(dict.fromkeys(split_list(value)))
            elif key == "escalate":
                escalate, escalate_line = tuple(split_list(value)), line
            elif key == "artifacts":
                artifacts = self._artifacts(task, line, value)
            elif key == "schema":
                schema = schema_field(self.report, task, line, value, self.read)
            elif key == "max_tokens":
                n = _int(value, 1, MAX_TOKENS)
                if n is None:
                    self.report.add(
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
            elif kind == "chat":
                text = chat_body(self.report, self.expander, task, raw, first, values)
            else:
                if kind == "shell":  # values quoted for their place in the script
                    text = self.expander.subst_shell(raw, first, values)
                else:
                    text = self.expander.subst(raw, first, values)
                if kind == "transcribe":
                    text = self._transcribe(task, text, first)
                elif kind not in LLM_BODY_KINDS:
                    text += "\n"
            self._suits(task, kind, cls, lines)
        if cls is None:
            cls = _CLASSES.get(DEFAULT_CLASS_OF_KIND.get(kind, ""), DEFAULT_CLASS)
        if escalate is not None and body is not None:
            for problem in ladder_problems(escalate, kind, cls, requires_external, f"task '{task.id}'"):
                self.report.add(escalate_line, problem, _LADDER_HINT)
        return Record(
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
            escalate=escalate,
            schema=schema,
            artifacts=artifacts,
        )

    def _artifacts(self, task: RawTask, line: int, value: str) -> tuple[str, ...]:
        """`- artifacts:` globs: relative to the working directory and staying under it."""
        globs = list(dict.fromkeys(split_list(value)))
        if not globs:
            self.report.add(line, f"field 'artifacts' of task '{task.id}' names no files", _ARTIFACTS_HINT)
        for pattern in globs:
            why = artifact_glob_problem(pattern)
            if why:
                self.report.add(
                    line, f"artifacts glob {_show(pattern)} of task '{task.id}' {why}", _ARTIFACTS_HINT
                )
        return tuple(globs)

    def _suits(self, task: RawTask, kind: str, cls: TaskClass | None, lines: dict[str, int]) -> None:
        """Check that the class (when valid and given) and the model fields suit the body's kind."""
        need = DEFAULT_CLASS_OF_KIND.get(kind)
        if cls == "external" and kind == "prompt":
            pass  # a question for Claude
        elif cls is not None and need is not None and cls != need:
            self.report.add(
                lines["class"],
                f"task '{task.id}' has {_a(kind)} {kind} body, which runs only in class {need}, "
                f"but its class is '{cls}'",
                f"write '- class: {need}', or leave class out: "
                f"{_a(kind)} {kind} task is class {need} by default",
            )
        elif cls == "llm" and kind not in LLM_BODY_KINDS:
            self.report.add(
                lines["class"],
                f"task '{task.id}' has class llm, which runs only prompt and chat bodies, "
                f"but its body is {kind}",
                "use class script for shell commands that need a GPU; class llm is for '```prompt' "
                "and '```chat' bodies",
            )
        if lines["model"] and kind not in MODEL_BODY_KINDS:
            self.report.add(
                lines["model"],
                f"field 'model' of task '{task.id}' applies only to prompt, transcribe and embed bodies, "
                f"and its body is {kind}",
                f"remove the line: {_a(kind)} {kind} task runs no model",
            )
        for name in ("max_tokens", "schema"):
            if lines[name] and kind not in LLM_BODY_KINDS:
                self.report.add(
                    lines[name],
                    f"field '{name}' of task '{task.id}' applies only to prompt and chat bodies, "
                    f"and its body is {kind}",
                    "remove the line: only an LLM's answer is generated",
                )
        if lines["inputs"] and kind not in _INPUT_KINDS:
            hint = (
                "a transcribe body is the path of one audio file: have the dependency write the file, "
                "and put its path in the body"
                if kind == "transcribe"
                else "a shell task takes no outputs: have the dependency write a file, and read it"
            )
            self.report.add(
                lines["inputs"],
                f"field 'inputs' of task '{task.id}' applies only to prompt, chat and embed bodies, "
                f"and its body is {kind}",
                hint,
            )

    def _transcribe(self, task: RawTask, text: str, first: int) -> str:
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
                self.report.add(
                    first + i,
                    f"the 'save:' line of the transcribe body of task '{task.id}' has nothing after the ':'",
                    "write 'save: PATH' (a JSON file of the segments), or leave the line out",
                )
            elif save:
                self.report.add(
                    first + i,
                    f"the transcribe body of task '{task.id}' has a second 'save:' line",
                    "the segments go to one file; keep one of the two lines",
                )
            else:
                save = value.strip()
        if len(paths) != 1:
            self.report.add(
                first - 1,
                f"the transcribe body of task '{task.id}' "
                + (f"has {len(paths)} audio paths, not one" if paths else "names no audio file"),
                "a transcribe body is the path of one audio file, e.g. '{OUT}/talk.wav' "
                "(and maybe a line 'save: PATH'); use foreach to transcribe several files",
            )
            return text
        return "\n".join([paths[0], f"save: {save}"] if save else paths)

    def _embed(
        self, task: RawTask, raw: str, first: int, values: Mapping[str, str]
    ) -> tuple[str, list[tuple[int, str]]]:
        """An embed body: its lines, each written as 'key: value', and its `input:` lines.

        Blank lines are dropped and keys lower-cased, so that the worker reads one form."""
        out: list[str] = []
        inputs: list[tuple[int, str]] = []
        texts = 0
        save_line = 0
        for i, raw_line in enumerate(raw.split("\n")):
            line = first + i
            for part in self.expander.subst(raw_line, line, values).split("\n"):
                if not part.strip():
                    continue
                head, colon, rest = part.partition(":")
                key = head.strip().lower()
                value = rest.strip()
                if not colon or key not in EMBED_KEYS:
                    self.report.add(
                        line,
                        f"line {_show(part.strip())} of the embed body of task '{task.id}' "
                        "is not a 'file:', 'text:', 'input:' or 'save:' line",
                        _EMBED_HINT,
                    )
                    continue
                if not value:
                    self.report.add(
                        line,
                        f"the '{key}:' line of the embed body of task '{task.id}' has nothing after the ':'",
                        _EMBED_HINT,
                    )
                    continue
                out.append(f"{key}: {value}")
                if key == "save":
                    if save_line:
                        self.report.add(
                            line,
                            f"the embed body of task '{task.id}' has a second 'save:' line "
                            f"(the first is at line {save_line})",
                            "the vectors go to one file; keep one of the two lines",
                        )
                    save_line = save_line or line
                    if not value.endswith(".npy"):
                        self.report.add(
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
            self.report.add(
                first - 1,
                f"the embed body of task '{task.id}' names no texts to embed",
                "add 'text: TEXT', 'file: PATH' or 'input: TASK' lines",
            )
        return "\n".join(out), inputs

    def _task_env(self, task: RawTask, line: int, text: str, values: Mapping[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for part in split_list(text):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq:
                self.report.add(
                    line,
                    f"env entry {_show(part)} of task '{task.id}' has no '='",
                    "write '- env: NAME=value, OTHER=value'",
                )
                continue
            if not NAME_RE.fullmatch(name):
                self.report.add(
                    line,
                    f"{_show(name)} in the env of task '{task.id}' is not a valid environment variable name",
                    _ENV_NAME_HINT,
                )
                continue
            if name in env:
                self.report.add(
                    line, f"env of task '{task.id}' sets {name} twice", "keep one of the two entries"
                )
                continue
            env[name] = self.expander.subst(value.strip(), line, values)
        return env
