"""Tests of the plan parser: the format, every problem it reports, and robustness."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import PlanError, Problem
from mesh.events import PlanSpec, TaskSpec
from mesh.host.planfiles import directory_glob, load_plan
from mesh.plan import FIELDS, GlobRefused, PlanLimits, parse_followups, parse_plan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "plans" / "examples"
FENCE = "```"


def md(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def tasks_plan(tasks: str, head: str = "") -> str:
    """A plan with a title, optional sections `head`, and the given `## Tasks` body."""
    return md("# Test plan\n\n") + md(head) + "## Tasks\n\n" + md(tasks)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based line of the nth line containing `needle`."""
    found = [i for i, line in enumerate(text.split("\n"), 1) if needle in line]
    assert len(found) >= nth, f"{needle!r} not found {nth} times"
    return found[nth - 1]


def line_equal(text: str, exact: str) -> int:
    """The 1-based line of the first line that is exactly `exact`."""
    return text.split("\n").index(exact) + 1


def problems(text: str, **kwargs: object) -> list[Problem]:
    with pytest.raises(PlanError) as info:
        parse_plan(text, **kwargs)  # type: ignore[arg-type]
    assert info.value.problems
    return info.value.problems


def one(text: str, **kwargs: object) -> Problem:
    found = problems(text, **kwargs)
    assert len(found) == 1, found
    return found[0]


def in_dir(path: Path, outside: bool = False) -> dict[str, object]:
    """The arguments of parse_plan for a plan in directory `path`: its foreach globs list its files."""
    return {"workdir": str(path), "glob": directory_glob(str(path), outside=outside)}


def by_id(plan: PlanSpec) -> dict[str, TaskSpec]:
    return {t.id: t for t in plan.tasks}


def task(tid: str, body: str = "echo hi", fields: str = "", kind: str = "shell") -> str:
    return f"### {tid}\n{fields}\n{FENCE}{kind}\n{body}\n{FENCE}\n\n"


# ---------------------------------------------------------------- valid plans

FULL = md(
    """
    # Full plan

    This plan uses every field.
    It has two lines of description.

    ## Variables

    - OUT: /tmp/out
    - GREETING: hello
    - EMPTY:

    ## Env

    - LANG: C.UTF-8
    - DATA: {OUT}/data

    ## Notes

    Just prose, ignored.

    - not: a field

    ## Tasks

    ### fetch
    - class: script
    - priority: 7
    - timeout: 1h30m
    - retries: 2
    - env: MODE=fast, LANG=en_US.UTF-8
    - sensitive: yes

    Some prose about fetch.

    ```shell
    mkdir -p {OUT} && echo {GREETING} > {OUT}/fetch.txt
    echo "[{EMPTY}]"
    ```

    ### publish
    - depends_on: fetch
    - class: external

    ```bash
    cat {OUT}/fetch.txt
    ```
    """
)


def test_full_plan_has_every_field() -> None:
    plan = parse_plan(FULL, source="full.md", workdir="/some/dir")
    assert plan.title == "Full plan"
    assert plan.description == "This plan uses every field.\nIt has two lines of description."
    assert plan.source == "full.md"
    assert plan.workdir == "/some/dir"
    assert plan.variables == {"OUT": "/tmp/out", "GREETING": "hello", "EMPTY": ""}
    assert plan.env == {"LANG": "C.UTF-8", "DATA": "/tmp/out/data"}
    assert [t.id for t in plan.tasks] == ["fetch", "publish"]
    fetch, publish = plan.tasks
    assert fetch == TaskSpec(
        id="fetch",
        body='mkdir -p /tmp/out && echo hello > /tmp/out/fetch.txt\necho "[]"\n',
        kind="shell",
        cls="script",
        depends_on=(),
        priority=7,
        timeout_s=5400.0,
        retries=2,
        env={"LANG": "en_US.UTF-8", "DATA": "/tmp/out/data", "MODE": "fast"},
        sensitive=True,
        line=line_of(FULL, "### fetch"),
    )
    assert publish.kind == "shell"  # from the `bash` alias
    assert publish.cls == "external"
    assert publish.depends_on == ("fetch",)
    assert publish.env == {"LANG": "C.UTF-8", "DATA": "/tmp/out/data"}
    assert publish.line == line_of(FULL, "### publish")


def test_defaults() -> None:
    plan = parse_plan(tasks_plan(task("only")))
    (t,) = plan.tasks
    assert (t.cls, t.priority, t.timeout_s, t.retries, t.sensitive) == ("cpu", 5, 1800.0, 3, False)
    assert t.depends_on == () and t.env == {} and t.kind == "shell"
    assert t.body == "echo hi\n"
    assert plan.variables == {} and plan.env == {} and plan.description == ""
    assert plan.source == "<plan>" and plan.workdir == ""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1h 30m 5s", 5405),
        ("45", 45),
        ("1.5h", 5400),
    ],
)
def test_timeout_formats(text: str, seconds: float) -> None:
    (t,) = parse_plan(tasks_plan(task("a", fields=f"- timeout: {text}"))).tasks
    assert t.timeout_s == seconds


def test_field_keys_are_case_insensitive_and_list_markers_vary() -> None:
    (t,) = parse_plan(tasks_plan(task("a", fields="* Priority: 9\n+ CLASS: SCRIPT\n- Sensitive: No"))).tasks
    assert (t.priority, t.cls, t.sensitive) == (9, "script", False)


def test_section_names_are_case_insensitive_and_order_free() -> None:
    text = md(
        f"""
        # T

        ## TASKS

        ### a
        {FENCE}sh
        echo {{X}}
        {FENCE}

        ## variables

        - X: late
        """
    )
    (t,) = parse_plan(text).tasks
    assert t.body == "echo late\n"


def test_variables_overrides_and_additions() -> None:
    text = tasks_plan(
        task("a", body="echo {OUT} {LOG} {EXTRA}"),
        head="## Variables\n\n- OUT: /tmp/default\n- LOG: {OUT}/log\n\n",
    )
    plan = parse_plan(text, variables={"OUT": "/data", "EXTRA": "more"})
    assert plan.variables == {"OUT": "/data", "LOG": "/data/log", "EXTRA": "more"}
    assert plan.tasks[0].body == "echo /data /data/log more\n"
    default = parse_plan(text, variables={"EXTRA": ""})
    # in a shell body an empty value is an empty word, quoted like any other value
    assert default.tasks[0].body == "echo /tmp/default /tmp/default/log ''\n"


def test_override_values_are_not_substituted() -> None:
    text = tasks_plan(task("a", body="echo {A}"), head="## Variables\n\n- A: x\n\n")
    assert parse_plan(text, variables={"A": "{B}"}).tasks[0].body == "echo '{B}'\n"


def test_shell_variables_and_literal_braces_are_left_alone() -> None:
    body = "echo ${HOME} ${X:-{X}} {{X}} {a,b} '{print $1}' }} { true; }"
    (t,) = parse_plan(tasks_plan(task("a", body=body), head="## Variables\n\n- X: v\n\n")).tasks
    assert t.body == "echo ${HOME} ${X:-v} {X} {a,b} '{print $1}' } { true; }\n"


def test_headings_inside_fences_are_not_headings() -> None:
    text = md(
        """
        # T

        ```text
        # not a title
        ## Tasks
        ```

        ## Tasks

        ### a

        ````shell
        # a comment
        ## another
        ### not-a-task
        ```
        still inside: that fence is too short
        ````

        ### b
        ~~~bash
        ### nor-this
        ~~~
        """
    )
    plan = parse_plan(text)
    assert [t.id for t in plan.tasks] == ["a", "b"]
    a, b = plan.tasks
    assert a.body == "# a comment\n## another\n### not-a-task\n```\nstill inside: that fence is too short\n"
    assert b.body == "### nor-this\n"
    assert plan.description.startswith("```text")


def test_indented_fence_strips_its_indent() -> None:
    text = tasks_plan("### a\n  ```shell\n  echo one\n    echo two\n echo three\n  ```\n")
    assert parse_plan(text).tasks[0].body == "echo one\n  echo two\necho three\n"


def test_crlf_and_bom() -> None:
    text = "\ufeff" + tasks_plan(task("a")).replace("\n", "\r\n")
    assert parse_plan(text).tasks[0].body == "echo hi\n"


def test_prose_sections_and_deeper_headings_are_ignored() -> None:
    text = tasks_plan(
        "### a\n\n#### Details\n\nSome text. - priority: 2 is not a list item\n\n"
        f"{FENCE}shell\necho\n{FENCE}\n\nAfter the body, prose. - retries: 1\n\n## Appendix\n\n### b\n",
    )
    (t,) = parse_plan(text).tasks
    assert t.priority == 5 and t.retries == 3


def test_plan_has_dependencies_in_any_order() -> None:
    text = tasks_plan(task("late", fields="- depends_on: early") + task("early"))
    assert by_id(parse_plan(text))["late"].depends_on == ("early",)


def test_duplicate_dependencies_are_kept_once() -> None:
    text = tasks_plan(task("a") + task("b", fields="- depends_on: a, a,, "))
    assert by_id(parse_plan(text))["b"].depends_on == ("a",)


# ---------------------------------------------------------------- foreach


def test_foreach_over_a_list() -> None:
    text = tasks_plan(
        task("prep")
        + task(
            "conv",
            body="convert {CITY} {OUT}",
            fields="- depends_on: prep\n- foreach: CITY in paris, , rome ,oslo\n- env: C={CITY}",
        )
        + task("done", fields="- depends_on: conv"),
        head="## Variables\n\n- OUT: /o\n\n",
    )
    plan = parse_plan(text)
    assert [t.id for t in plan.tasks] == ["prep", "conv-1", "conv-2", "conv-3", "done"]
    tasks = by_id(plan)
    for n, city in enumerate(["paris", "rome", "oslo"], 1):
        t = tasks[f"conv-{n}"]
        assert t.body == f"convert {city} /o\n"
        assert t.env == {"C": city}
        assert t.depends_on == ("prep",)
        assert t.line == line_of(text, "### conv")
    assert tasks["done"].depends_on == ("conv-1", "conv-2", "conv-3")


def test_foreach_list_from_a_variable_and_binding_in_fields() -> None:
    text = tasks_plan(
        task("p-1")
        + task("p-2")
        + task("step", fields="- foreach: N in {NUMS}\n- depends_on: p-{N}\n- priority: {N}"),
        head="## Variables\n\n- NUMS: 1, 2\n\n",
    )
    tasks = by_id(parse_plan(text))
    assert tasks["step-1"].depends_on == ("p-1",) and tasks["step-1"].priority == 1
    assert tasks["step-2"].depends_on == ("p-2",) and tasks["step-2"].priority == 2


def test_foreach_depending_on_foreach_and_on_one_expansion() -> None:
    text = tasks_plan(
        task("a", fields="- foreach: X in 1, 2")
        + task("b", fields="- foreach: Y in x, y\n- depends_on: a")
        + task("c", fields="- depends_on: b-2, a"),
    )
    tasks = by_id(parse_plan(text))
    assert tasks["b-1"].depends_on == ("a-1", "a-2")
    assert tasks["b-2"].depends_on == ("a-1", "a-2")
    assert tasks["c"].depends_on == ("b-2", "a-1", "a-2")


def test_foreach_variable_hides_a_plan_variable() -> None:
    text = tasks_plan(
        task("a", body="{X}", fields="- foreach: X in one"), head="## Variables\n\n- X: plan\n\n"
    )
    assert parse_plan(text).tasks[0].body == "one\n"


def test_foreach_over_a_glob(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for name in ["b.csv", "a.csv", "c.txt"]:
        (tmp_path / "data" / name).write_text("x")
    text = tasks_plan(task("conv", body="wc -c {F}", fields="- foreach: F in data/*.csv"))
    plan = parse_plan(text, workdir=str(tmp_path), glob=directory_glob(str(tmp_path)))
    assert [t.body for t in plan.tasks] == ["wc -c data/a.csv\n", "wc -c data/b.csv\n"]
    assert [t.id for t in plan.tasks] == ["conv-1", "conv-2"]
    assert plan.workdir == str(tmp_path)


def test_foreach_absolute_glob_through_a_variable(tmp_path: Path) -> None:
    for name in ["1.txt", "2.txt"]:
        (tmp_path / name).write_text("x")
    text = tasks_plan(task("t", body="cat {F}", fields="- foreach: F in {DIR}/*.txt"))
    want = [f"cat {tmp_path}/1.txt\n", f"cat {tmp_path}/2.txt\n"]
    # under the plan's directory: allowed
    plan = parse_plan(text, variables={"DIR": str(tmp_path)}, **in_dir(tmp_path))  # type: ignore[arg-type]
    assert [t.body for t in plan.tasks] == want
    # elsewhere: only when allowed
    elsewhere = tmp_path / "plans"
    elsewhere.mkdir()
    p = one(text, variables={"DIR": str(tmp_path)}, **in_dir(elsewhere))
    assert "is an absolute pattern outside the plan's directory" in p.message
    assert "--glob-outside" in p.hint
    allowed = in_dir(elsewhere, outside=True)
    plan = parse_plan(text, variables={"DIR": str(tmp_path)}, **allowed)  # type: ignore[arg-type]
    assert [t.body for t in plan.tasks] == want


def test_load_plan_resolves_globs_next_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.md").write_text("x")
    path = tmp_path / "plan.md"
    path.write_text(tasks_plan(task("t", body="cat {F}", fields="- foreach: F in in/*.md")), encoding="utf-8")
    plan = load_plan(path, variables={"UNUSED": "1"})
    assert plan.source == str(path)
    assert plan.workdir == str(tmp_path)
    assert plan.tasks[0].body == "cat in/x.md\n"
    assert plan.variables == {"UNUSED": "1"}


def test_load_plan_keeps_a_relative_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.md").write_text(tasks_plan(task("t")), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plan = load_plan("plans/p.md")
    assert plan.source == "plans/p.md"
    assert plan.workdir == str(tmp_path / "plans")


# ---------------------------------------------------------------- structure problems


def test_no_title() -> None:
    p = one("## Tasks\n\n" + task("a"))
    assert (p.line, p.message) == (1, "plan has no title")
    assert "# <title>" in p.hint


def test_title_after_a_section() -> None:
    text = "## Notes\n\n# Late title\n\n## Tasks\n\n" + task("a")
    p = one(text)
    assert p.line == 3 and "before the first '##' section" in p.message
    assert "move '# Late title' above line 1" in p.hint


def test_second_title_and_empty_title() -> None:
    found = problems("#\n\n# Another\n\n## Tasks\n\n" + task("a"))
    assert [(p.line, p.message) for p in found] == [
        (1, "the title is empty"),
        (3, "a plan has one title, but this is a second one (the first is at line 1)"),
    ]
    assert "'### ' for tasks" in found[1].hint


def test_no_tasks_section() -> None:
    p = one("# T\n\nprose\n")
    assert (p.line, p.message) == (1, "plan has no '## Tasks' section")
    assert "## Tasks" in p.hint


def test_no_tasks_section_suggests_a_near_name() -> None:
    p = one("# T\n\n## Task\n\n" + task("a"))
    assert "did you mean '## Tasks'? (line 3 has '## Task')" in p.hint


def test_empty_tasks_section() -> None:
    p = one("# T\n\n## Tasks\n\nNothing here yet.\n")
    assert (p.line, p.message) == (3, "the '## Tasks' section has no tasks")
    assert "### <id>" in p.hint


def test_duplicate_section() -> None:
    text = tasks_plan(task("a"), head="## Variables\n\n- A: 1\n\n## variables\n\n- B: 2\n\n")
    p = one(text)
    assert p.line == line_of(text, "## variables")
    assert "first is at line 3" in p.message and "merge" in p.hint


def test_code_block_before_any_task() -> None:
    text = tasks_plan(f"{FENCE}shell\necho\n{FENCE}\n\n" + task("a"))
    p = one(text)
    assert p.line == line_of(text, FENCE + "shell")
    assert "### <id>" in p.hint


def test_field_before_any_task() -> None:
    text = tasks_plan("- retries: 2\n\n" + task("a"))
    p = one(text)
    assert p.line == line_of(text, "- retries")
    assert "before any task heading" in p.message


def test_unclosed_fence() -> None:
    text = tasks_plan(task("a") + "### b\n\n```shell\necho never closed\n\n### c\n")
    p = one(text)
    assert p.line == line_of(text, "```shell", 2)
    assert "never closed" in p.message and "```" in p.hint


def test_unclosed_fence_outside_tasks() -> None:
    text = "# T\n\n~~~\nopen\n"
    found = problems(text)
    assert (3, "this code block is never closed") in [(p.line, p.message) for p in found]


# ---------------------------------------------------------------- variable problems


def test_variable_line_problems() -> None:
    text = tasks_plan(
        task("a"),
        head="## Variables\n\n- no colon here\n- bad-name: x\n- OK: 1\n- OK: 2\n\n",
    )
    found = problems(text)
    assert [p.line for p in found] == [5, 6, 8]
    assert "has no ':'" in found[0].message and "- NAME: default" in found[0].hint
    assert "not a valid variable name" in found[1].message and "letters, digits" in found[1].hint
    assert "declared twice (first at line 7)" in found[2].message


def test_variable_default_using_a_later_or_itself() -> None:
    text = tasks_plan(task("a"), head="## Variables\n\n- A: {B}/x\n- B: {B}\n\n")
    found = problems(text)
    assert [p.line for p in found] == [5, 6]
    assert "uses {B}, which is declared below it (line 6)" in found[0].message
    assert "reorder" in found[0].hint
    assert "refers to itself" in found[1].message


def test_unknown_variable_in_body_points_at_its_line_and_suggests() -> None:
    text = tasks_plan(task("a", body="echo ok\necho {OUTDIR}"), head="## Variables\n\n- OUT: /o\n\n")
    p = one(text)
    assert p.line == line_of(text, "{OUTDIR}")
    assert p.message == "unknown variable {OUTDIR}; did you mean {OUT}?"
    assert "- OUTDIR: <default>" in p.hint and "--var OUTDIR=<value>" in p.hint


def test_unknown_variable_in_fields_env_and_foreach() -> None:
    text = tasks_plan(
        task("a", fields="- priority: {P}\n- env: X={Q}\n- foreach: I in {R}"),
        head="## Env\n\n- E: {S}\n\n",
    )
    found = problems(text)
    assert {(p.line, p.message.split(";")[0]) for p in found} >= {
        (line_of(text, "{P}"), "unknown variable {P}"),
        (line_of(text, "{Q}"), "unknown variable {Q}"),
        (line_of(text, "{R}"), "unknown variable {R}"),
        (line_of(text, "{S}"), "unknown variable {S}"),
    }


def test_foreach_variable_is_known_only_in_its_task() -> None:
    text = tasks_plan(task("a", body="{X}", fields="- foreach: X in 1") + task("b", body="{X}"))
    p = one(text)
    assert p.line == line_of(text, "{X}", 2)
    assert p.message.startswith("unknown variable {X}")


def test_bad_override_name() -> None:
    p = one(tasks_plan(task("a")), variables={"not-valid": "1"})
    assert p.line == 0 and "--var 'not-valid'" in p.message


def test_env_section_problems() -> None:
    text = tasks_plan(task("a"), head="## Env\n\n- A=1\n- 1X: y\n- B: 1\n- B: 2\n\n")
    found = problems(text)
    assert [p.line for p in found] == [5, 6, 8]
    assert "- NAME: value" in found[0].hint
    assert "not a valid environment variable name" in found[1].message
    assert "set twice (first at line 7)" in found[2].message


# ---------------------------------------------------------------- task problems


def test_bad_task_ids() -> None:
    text = tasks_plan(task("has space") + task("dot.ted") + "### \n\n```shell\necho\n```\n")
    found = problems(text)
    assert [p.line for p in found] == [
        line_of(text, "### has space"),
        line_of(text, "### dot.ted"),
        line_of(text, "### ", 3),
    ]
    assert "'has space' has characters that are not allowed" in found[0].message
    assert "letters, digits, '_' and '-'" in found[0].hint
    assert found[2].message == "task heading has no id"


def test_duplicate_task_id_names_both_lines() -> None:
    text = tasks_plan(task("a") + task("b") + task("a"))
    p = one(text)
    first, second = line_of(text, "### a"), line_of(text, "### a", 2)
    assert p.line == second
    assert f"'a' at line {second} is already used by the task at line {first}" in p.message


def test_unknown_field_suggests() -> None:
    text = tasks_plan(task("a", fields="- prio: 3\n- depends-on: b\n- colour: red"))
    found = problems(text)
    assert found[0].message == "unknown field 'prio' in task 'a'; did you mean 'priority'?"
    assert found[1].message.endswith("did you mean 'depends_on'?")
    assert "did you mean" not in found[2].message
    assert all("known fields: class, depends_on" in p.hint for p in found)
    assert [p.line for p in found] == [
        line_of(text, "- prio"),
        line_of(text, "depends-on"),
        line_of(text, "colour"),
    ]


def test_misspelt_fields() -> None:
    text = tasks_plan(task("a", fields="- retries 2\n- depends on: b"))
    found = problems(text)
    assert "has no ':'" in found[0].message and found[0].hint == "write '- retries: <value>'"
    assert found[1].hint == "write '- depends_on: <value>'"


def test_duplicate_field() -> None:
    text = tasks_plan(task("a", fields="- retries: 1\n- retries: 2"))
    p = one(text)
    assert p.line == line_of(text, "- retries: 2")
    assert "given twice" in p.message and f"first at line {line_of(text, '- retries: 1')}" in p.message


def test_field_after_body() -> None:
    text = tasks_plan(task("a") + "- retries: 2\n")
    p = one(text)
    assert p.line == line_of(text, "- retries")
    assert "after its body" in p.message and "move it above the code block" in p.hint


@pytest.mark.parametrize(
    ("field", "message", "hint"),
    [
        ("class: gpu", "class 'gpu' of task 'a' is not a known class", "cpu, script, llm, external"),
        ("priority: 11", "is not a whole number from 1 to 10", "- priority: 7"),
        ("priority: 0", "is not a whole number from 1 to 10", "- priority: 7"),
        ("priority: high", "is not a whole number from 1 to 10", "- priority: 7"),
        ("retries: -1", "is not a whole number from 0 to 100", "- retries: 2"),
        ("retries: 101", "is not a whole number from 0 to 100", "- retries: 2"),
        ("retries: 99999999999999999999", "is not a whole number from 0 to 100", "- retries: 2"),
        ("timeout: 0", "is not a duration above 0", "'1h30m'"),
        ("timeout: 10x", "is not a duration above 0", "'1h30m'"),
        ("timeout: 8d", "is not a duration above 0", "'1h30m'"),
        ("timeout: 200h", "up to 7 days", "'90s'"),
        ("timeout:", "is not a duration", "number of seconds"),
        ("sensitive: maybe", "is not true or false", "- sensitive: true"),
        ("env: A", "env entry 'A' of task 'a' has no '='", "NAME=value"),
        ("env: 1A=2", "is not a valid environment variable name", "letters, digits"),
        ("env: A=1, A=2", "sets A twice", "keep one"),
    ],
)
def test_bad_field_values(field: str, message: str, hint: str) -> None:
    text = tasks_plan(task("a", fields=f"- {field}"))
    p = one(text)
    assert p.line == line_of(text, f"- {field}")
    assert message in p.message
    assert hint in p.hint


def test_no_body() -> None:
    text = tasks_plan("### a\n- retries: 1\n\n" + task("b"))
    p = one(text)
    assert (p.line, p.message) == (line_of(text, "### a"), "task 'a' has no body")
    assert "```shell" in p.hint


def test_two_bodies() -> None:
    text = tasks_plan(task("a") + f"{FENCE}shell\necho again\n{FENCE}\n")
    p = one(text)
    assert p.line == line_of(text, FENCE + "shell", 2)
    assert "second code block" in p.message and "exactly one code block" in p.hint


def test_empty_body() -> None:
    text = tasks_plan(f"### a\n{FENCE}shell\n   \n\n{FENCE}\n")
    p = one(text)
    assert (p.line, p.message) == (line_of(text, FENCE + "shell"), "the body of task 'a' is empty")


def test_unknown_and_missing_body_kind() -> None:
    text = tasks_plan(task("a", kind="python") + task("b", kind=""))
    found = problems(text)
    assert found[0].message == "task 'a' has a body of unknown kind 'python'"
    assert found[1].message == "task 'b' has a code block with no kind"
    assert all("known kinds: shell, noop, prompt, chat, transcribe, embed, sh, bash" in p.hint for p in found)
    assert [p.line for p in found] == [line_of(text, "```python"), line_of(text, "### b") + 2]


# ---------------------------------------------------------------- dependency problems


def test_unknown_dependency_suggests() -> None:
    text = tasks_plan(task("fetch") + task("convert", fields="- depends_on: fetc, nothing_like_it"))
    found = problems(text)
    line = line_of(text, "- depends_on")
    assert [p.line for p in found] == [line, line]
    messages = sorted(p.message for p in found)
    assert messages[0] == "task 'convert' depends on unknown task 'fetc'; did you mean 'fetch'?"
    assert messages[1] == "task 'convert' depends on unknown task 'nothing_like_it'"
    assert "task ids" in found[0].hint


def test_self_dependency() -> None:
    text = tasks_plan(task("a", fields="- depends_on: a"))
    p = one(text)
    assert (p.line, p.message) == (line_of(text, "- depends_on"), "task 'a' depends on itself")
    assert "remove 'a'" in p.hint


def test_foreach_task_depending_on_itself() -> None:
    text = tasks_plan(task("a", fields="- foreach: X in 1, 2\n- depends_on: a"))
    assert one(text).message == "task 'a' depends on itself"


def test_two_task_cycle() -> None:
    text = tasks_plan(task("a", fields="- depends_on: b") + task("b", fields="- depends_on: a"))
    p = one(text)
    assert p.message == "dependency cycle: a -> b -> a"
    assert p.line == line_of(text, "### a")
    assert "remove one" in p.hint


def test_cycle_is_reported_from_its_first_task_in_the_file() -> None:
    text = tasks_plan(
        task("start", fields="- depends_on: z")
        + task("x", fields="- depends_on: z")
        + task("y", fields="- depends_on: x")
        + task("z", fields="- depends_on: y"),
    )
    p = one(text)
    assert p.message == "dependency cycle: x -> z -> y -> x"
    assert p.line == line_of(text, "### x")


def test_each_cycle_is_reported() -> None:
    text = tasks_plan(
        task("a", fields="- depends_on: b")
        + task("b", fields="- depends_on: a")
        + task("c", fields="- depends_on: d")
        + task("d", fields="- depends_on: c")
        + task("e", fields="- depends_on: a, c"),
    )
    assert sorted(p.message for p in problems(text)) == [
        "dependency cycle: a -> b -> a",
        "dependency cycle: c -> d -> c",
    ]


def test_long_chain_and_long_cycle_need_no_recursion() -> None:
    n = 12_000
    chain = "".join(task(f"t{i}", fields=f"- depends_on: t{i - 1}" if i else "") for i in range(n))
    plan = parse_plan(tasks_plan(chain))
    assert len(plan.tasks) == n and plan.tasks[-1].depends_on == (f"t{n - 2}",)
    ring = chain.replace("### t0\n\n", f"### t0\n- depends_on: t{n - 1}\n", 1)
    p = one(tasks_plan(ring))
    assert p.message.startswith("dependency cycle: t0 -> t11999 -> t11998")
    assert p.message.endswith("t1 -> t0")


# ---------------------------------------------------------------- foreach problems


@pytest.mark.parametrize("spec", ["X", "X of a, b", "1X in a", "in a, b"])
def test_foreach_bad_syntax(spec: str) -> None:
    text = tasks_plan(task("a", fields=f"- foreach: {spec}"))
    p = one(text)
    assert p.line == line_of(text, "- foreach")
    assert "is not 'NAME in <items>'" in p.message and "- foreach: NAME in a, b, c" in p.hint


def test_foreach_empty_list() -> None:
    text = tasks_plan(task("a", body="echo {X}", fields="- foreach: X in , ,"))
    p = one(text)
    assert p.line == line_of(text, "- foreach") and "empty list" in p.message


def test_foreach_glob_matching_nothing(tmp_path: Path) -> None:
    text = tasks_plan(
        task("a", body="echo {F}", fields="- foreach: F in nothing/*.csv")
        + task("b", fields="- depends_on: a")
    )
    p = one(text, **in_dir(tmp_path))
    assert p.line == line_of(text, "- foreach")
    assert p.message == "foreach glob 'nothing/*.csv' matched no files"
    assert str(tmp_path) in p.hint and "when the plan is submitted" in p.hint


def test_foreach_expansion_colliding_with_a_task() -> None:
    text = tasks_plan(task("a", fields="- foreach: X in 1, 2") + task("a-2"))
    p = one(text)
    assert p.line == line_of(text, "### a-2")
    assert "already used by the expansion of foreach task 'a'" in p.message

    text = tasks_plan(task("a-1") + task("a", fields="- foreach: X in 1, 2"))
    p = one(text)
    assert p.line == line_equal(text, "### a")
    assert f"expands to 'a-1', which is already the id of the task at line {line_of(text, '### a-1')}" in (
        p.message
    )


# ---------------------------------------------------------------- many problems at once


def test_every_problem_is_reported_at_once() -> None:
    text = md(
        f"""
        ## Tasks

        ### fetch
        - prio: 3
        - retries: lots

        {FENCE}shell
        echo {{MISSING}}
        {FENCE}

        ### convert
        - depends_on: fetc

        ### bad id
        {FENCE}python
        print()
        {FENCE}
        """
    )
    found = problems(text, source="many.md")
    assert [p.line for p in found] == [1, 4, 5, 8, 11, 12, 14, 15]
    with pytest.raises(PlanError) as info:
        parse_plan(text, source="many.md")
    rendered = str(info.value)
    assert rendered.startswith("plan many.md has 8 problems; nothing was submitted")
    assert "many.md:12: task 'convert' depends on unknown task 'fetc'; did you mean 'fetch'?" in rendered


# ---------------------------------------------------------------- files


def test_load_plan_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path / "nope.md")
    (p,) = info.value.problems
    assert p.message == "plan file not found" and info.value.source == str(tmp_path / "nope.md")


def test_load_plan_directory(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path)
    assert "directory" in info.value.problems[0].message


def test_load_plan_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.md"
    path.write_bytes(tasks_plan(task("a", body="echo caf\xe9")).encode("latin-1"))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    (p,) = info.value.problems
    assert "not UTF-8" in p.message and p.hint == "save the plan as UTF-8"
    assert p.line == line_of(path.read_text(encoding="latin-1"), "caf")


# ---------------------------------------------------------------- model kinds


def test_class_is_inferred_from_the_body() -> None:
    text = tasks_plan(
        task("sh")
        + task("join", body="", kind="noop")
        + task("ask", body="Q: Why?\nA:", kind="prompt")
        + task("hear", body="/tmp/a.wav", kind="transcribe")
        + task("vec", body="text: hello", kind="embed")
    )
    found = by_id(parse_plan(text))
    assert {tid: (t.kind, t.cls) for tid, t in found.items()} == {
        "sh": ("shell", "cpu"),
        "join": ("noop", "cpu"),
        "ask": ("prompt", "llm"),
        "hear": ("transcribe", "script"),
        "vec": ("embed", "script"),
    }
    assert all((t.model, t.inputs, t.max_tokens) == ("", (), 0) for t in found.values())


def test_explicit_classes_that_suit_the_body() -> None:
    text = tasks_plan(
        task("gpu-shell", fields="- class: script")
        + task("ext", fields="- class: external")
        + task("ask", body="Q: Why?\nA:", kind="prompt", fields="- class: LLM")
        + task("vec", body="text: hello", kind="embed", fields="- class: script")
    )
    assert [t.cls for t in parse_plan(text).tasks] == ["script", "external", "llm", "script"]


@pytest.mark.parametrize(
    ("kind", "body", "cls", "message", "hint"),
    [
        ("prompt", "Q: Why?", "script", "has a prompt body, which runs only in class llm", "'- class: llm'"),
        ("prompt", "Q: Why?", "cpu", "but its class is 'cpu'", "a prompt task is class llm by default"),
        ("transcribe", "a.wav", "cpu", "which runs only in class script", "'- class: script'"),
        ("transcribe", "a.wav", "llm", "which runs only in class script", "leave class out"),
        ("embed", "text: x", "llm", "has an embed body, which runs only in class script", "class script"),
        ("embed", "text: x", "external", "but its class is 'external'", "'- class: script'"),
        (
            "shell",
            "echo hi",
            "llm",
            "has class llm, which runs only prompt and chat bodies, but its body is shell",
            "use class script for shell commands that need a GPU",
        ),
        ("noop", "", "llm", "but its body is noop", "use class script"),
    ],
)
def test_class_that_cannot_run_the_body(kind: str, body: str, cls: str, message: str, hint: str) -> None:
    text = tasks_plan(task("a", body=body, kind=kind, fields=f"- class: {cls}"))
    p = one(text)
    assert p.line == line_of(text, "- class:")
    assert message in p.message and "task 'a'" in p.message
    assert hint in p.hint


def test_model_kind_fields() -> None:
    text = tasks_plan(
        task("src")
        + task(
            "ask",
            body="Q: {Q}\nA:",
            kind="prompt",
            fields="- depends_on: src\n- inputs: src\n- model: {LLM}\n- max_tokens: 32",
        ),
        head="## Variables\n\n- Q: Why?\n- LLM: my_model-2\n\n",
    )
    ask = by_id(parse_plan(text))["ask"]
    assert (ask.model, ask.inputs, ask.max_tokens, ask.depends_on) == ("my_model-2", ("src",), 32, ("src",))
    assert ask.body == "Q: Why?\nA:"  # as written, substituted, with no final line break


def test_variables_substitute_in_every_model_body() -> None:
    text = tasks_plan(
        task("ask", body="{{literal}} about {TOPIC}", kind="prompt")
        + task("hear", body="\n{OUT}/a.wav\n", kind="transcribe")
        + task("vec", body="file: {OUT}/lines.txt\n\nText:   {TOPIC}  \nsave: {OUT}/v.npy", kind="embed"),
        head="## Variables\n\n- OUT: /data\n- TOPIC: owls\n\n",
    )
    found = by_id(parse_plan(text))
    assert found["ask"].body == "{literal} about owls"
    assert found["hear"].body == "/data/a.wav"
    assert found["vec"].body == "file: /data/lines.txt\ntext: owls\nsave: /data/v.npy"


def test_unknown_variable_in_a_model_body_points_at_its_line() -> None:
    text = tasks_plan(
        task("ask", body="Q: {Q}\nA: {ANSWR}", kind="prompt")
        + task("vec", body="text: a\ntext: {ANSWR}", kind="embed"),
        head="## Variables\n\n- Q: Why?\n- ANSWER: because\n\n",
    )
    found = problems(text)
    assert [p.line for p in found] == [line_of(text, "A: {ANSWR}"), line_of(text, "text: {ANSWR}")]
    assert all("did you mean {ANSWER}?" in p.message for p in found)


def test_inputs_not_in_depends_on() -> None:
    text = tasks_plan(
        task("src") + task("other") + task("ask", kind="prompt", fields="- depends_on: other\n- inputs: src")
    )
    p = one(text)
    assert p.line == line_of(text, "- inputs:")
    assert p.message == "task 'ask' takes the output of 'src', which is not in its depends_on"
    assert "add 'src' to depends_on" in p.hint


def test_unknown_and_own_inputs() -> None:
    text = tasks_plan(
        task("fetch") + task("ask", kind="prompt", fields="- depends_on: fetch\n- inputs: fetc, ask")
    )
    found = problems(text)
    assert [p.line for p in found] == [line_of(text, "- inputs:")] * 2
    messages = sorted(p.message for p in found)
    assert messages == [
        "task 'ask' takes the output of itself",
        "task 'ask' takes the output of unknown task 'fetc'; did you mean 'fetch'?",
    ]


def test_inputs_resolve_through_foreach_like_depends_on() -> None:
    text = tasks_plan(
        task("part", fields="- foreach: X in a, b, c")
        + task("all", kind="prompt", fields="- depends_on: part\n- inputs: part")
        + task("one", kind="prompt", fields="- depends_on: part\n- inputs: part-2")
        + task(
            "each", kind="prompt", fields="- foreach: Y in 1, 2\n- depends_on: part-{Y}\n- inputs: part-{Y}"
        )
    )
    found = by_id(parse_plan(text))
    assert found["all"].inputs == ("part-1", "part-2", "part-3")
    assert found["one"].inputs == ("part-2",)
    assert (found["each-1"].inputs, found["each-2"].inputs) == (("part-1",), ("part-2",))


def test_foreach_inputs_must_all_be_dependencies() -> None:
    text = tasks_plan(
        task("part", fields="- foreach: X in a, b")
        + task("ask", kind="prompt", fields="- depends_on: part-1\n- inputs: part")
    )
    p = one(text)
    assert (p.line, p.message) == (
        line_of(text, "- inputs:"),
        "task 'ask' takes the output of 'part', which is not in its depends_on",
    )


@pytest.mark.parametrize(
    ("kind", "body", "field", "message", "hint"),
    [
        (
            "shell",
            "echo hi",
            "max_tokens: 10",
            "field 'max_tokens' of task 'a' applies only to prompt and chat bodies",
            "remove the line",
        ),
        ("embed", "text: x", "max_tokens: 10", "and its body is embed", "only an LLM's answer is generated"),
        ("prompt", "Q:", "max_tokens: 0", "max_tokens '0' of task 'a' is not a whole number from 1", "64"),
        ("prompt", "Q:", "max_tokens: lots", "is not a whole number", "'- max_tokens: 64'"),
        ("prompt", "Q:", "model: gemma 3", "model 'gemma 3' of task 'a' is not a model name", "gemma3-270m"),
        ("embed", "text: x", "model: a/b", "model 'a/b' of task 'a' is not a model name", "letters, digits"),
        ("transcribe", "a.wav", "model:", "model '' of task 'a' is not a model name", "leave the field out"),
        (
            "shell",
            "echo hi",
            "model: gemma3-270m",
            "field 'model' of task 'a' applies only to prompt, "
            "transcribe and embed bodies, and its body is shell",
            "runs no model",
        ),
        (
            "shell",
            "echo hi",
            "inputs:",
            "field 'inputs' of task 'a' applies only to prompt, chat and embed bodies",
            "have the dependency write a file",
        ),
        ("transcribe", "a.wav", "inputs:", "and its body is transcribe", "put its path in the body"),
    ],
)
def test_bad_model_fields(kind: str, body: str, field: str, message: str, hint: str) -> None:
    text = tasks_plan(task("a", body=body, kind=kind, fields=f"- {field}"))
    p = one(text)
    assert p.line == line_of(text, f"- {field}")
    assert message in p.message
    assert hint in p.hint


def test_model_field_names_are_suggested() -> None:
    fields = "- modle: x\n- max-tokens: 3\n- input: b\n- max tokens: 4\n- inputs b"
    text = tasks_plan(task("a", kind="prompt", body="Q:", fields=fields))
    found = problems(text)
    assert [p.message for p in found] == [
        "unknown field 'modle' in task 'a'; did you mean 'model'?",
        "unknown field 'max-tokens' in task 'a'; did you mean 'max_tokens'?",
        "unknown field 'input' in task 'a'; did you mean 'inputs'?",
        "field 'max tokens' of task 'a' is misspelt",
        "field 'inputs' of task 'a' has no ':' after its name",
    ]
    assert "model, inputs, max_tokens" in found[0].hint
    assert found[3].hint == "write '- max_tokens: <value>'"


def test_transcribe_body_is_one_path() -> None:
    text = tasks_plan(task("a", body="one.wav\ntwo.wav", kind="transcribe"))
    p = one(text)
    assert p.line == line_of(text, "```transcribe")
    assert p.message == "the transcribe body of task 'a' has 2 audio paths, not one"
    assert "use foreach" in p.hint
    text = tasks_plan(task("a", body="save: a.json", kind="transcribe"))
    assert one(text).message == "the transcribe body of task 'a' names no audio file"


def test_transcribe_body_may_say_where_the_segments_go() -> None:
    text = tasks_plan(task("a", body="\n Save:  {OUT}/a.json\n\n{OUT}/a.wav \n", kind="transcribe"))
    plan = parse_plan(text, variables={"OUT": "/o"})
    assert plan.tasks[0].body == "/o/a.wav\nsave: /o/a.json"
    text = tasks_plan(task("a", body="a.wav\nsave:\nsave: b.json\nsave: c.json", kind="transcribe"))
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (
            line_equal(text, "save:"),
            "the 'save:' line of the transcribe body of task 'a' has nothing after the ':'",
        ),
        (line_of(text, "save: c.json"), "the transcribe body of task 'a' has a second 'save:' line"),
    ]


def test_embed_body_problems() -> None:
    body = "\n".join(
        [
            "file: a.txt",
            "texts: oops",
            "just words",
            "text:",
            "save: out.txt",
            "save: out.npy",
        ]
    )
    text = tasks_plan(task("a", body=body, kind="embed"))
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (
            line_of(text, "texts: oops"),
            "line 'texts: oops' of the embed body of task 'a' is not a 'file:', "
            "'text:', 'input:' or 'save:' line",
        ),
        (
            line_of(text, "just words"),
            "line 'just words' of the embed body of task 'a' is not a 'file:', "
            "'text:', 'input:' or 'save:' line",
        ),
        (line_of(text, "text:"), "the 'text:' line of the embed body of task 'a' has nothing after the ':'"),
        (line_of(text, "save: out.txt"), "save path 'out.txt' of task 'a' does not end in '.npy'"),
        (
            line_of(text, "save: out.npy"),
            "the embed body of task 'a' has a second 'save:' line "
            f"(the first is at line {line_of(text, 'save: out.txt')})",
        ),
    ]
    assert "'file: PATH', 'text: TEXT', 'input: TASK' or 'save: PATH.npy'" in found[0].hint
    assert "name a .npy file" in found[3].hint


def test_embed_body_with_no_texts() -> None:
    text = tasks_plan(task("a", body="save: v.npy", kind="embed"))
    p = one(text)
    assert (p.line, p.message) == (
        line_of(text, "```embed"),
        "the embed body of task 'a' names no texts to embed",
    )


def test_embed_input_lines_are_inputs() -> None:
    text = tasks_plan(
        task("part", fields="- foreach: X in a, b")
        + task("src")
        + task(
            "vec",
            kind="embed",
            body="input: src\ntext: hi\nINPUT:  part\nsave: v.npy",
            fields="- depends_on: src, part\n- inputs: part",
        )
    )
    vec = by_id(parse_plan(text))["vec"]
    assert vec.inputs == ("src", "part-1", "part-2")
    assert vec.body == "input: src\ntext: hi\ninput: part-1\ninput: part-2\nsave: v.npy"


def test_embed_input_line_problems() -> None:
    text = tasks_plan(
        task("src")
        + task("other")
        + task(
            "vec", kind="embed", body="input: src\ninput: nope", fields="- depends_on: other\n- inputs: other"
        )
    )
    found = problems(text)
    assert [(p.line, p.message) for p in found] == [
        (
            line_of(text, "- inputs:"),
            "task 'vec' lists 'other' in inputs, but its embed body has no 'input: other' line",
        ),
        (line_of(text, "input: src"), "task 'vec' takes the output of 'src', which is not in its depends_on"),
        (line_of(text, "input: nope"), "task 'vec' takes the output of unknown task 'nope'"),
    ]
    assert "add a line 'input: other' to the body" in found[0].hint


def test_model_problems_are_reported_at_once_with_others() -> None:
    text = tasks_plan(
        task("a", kind="prompt", body="Q:", fields="- class: cpu\n- max_tokens: -3\n- inputs: b")
        + task("b", fields="- class: llm\n- model: x y")
    )
    found = problems(text)
    assert [p.line for p in found] == [
        line_of(text, "- class: cpu"),
        line_of(text, "- max_tokens"),
        line_of(text, "- inputs"),
        line_of(text, "- class: llm"),
        line_of(text, "- model"),
        line_of(text, "- model"),
    ]


# ---------------------------------------------------------------- examples and docs


@pytest.mark.parametrize("name", ["diamond.md", "fanout.md", "retry.md"])
def test_examples_parse(name: str, tmp_path: Path) -> None:
    plan = load_plan(EXAMPLES / name, variables={"OUT": str(tmp_path)})
    assert plan.tasks and plan.variables["OUT"] == str(tmp_path)
    assert any(str(tmp_path) in t.body for t in plan.tasks)
    assert not any("/tmp/mesh-demo" in t.body or "{OUT}" in t.body for t in plan.tasks)
    default = load_plan(EXAMPLES / name)
    assert default.variables["OUT"] == f"/tmp/mesh-demo/{name.removesuffix('.md')}"


def test_example_shapes() -> None:
    diamond = by_id(load_plan(EXAMPLES / "diamond.md"))
    assert [t.depends_on for t in diamond.values()] == [(), ("seed",), ("seed",), ("upper", "count")]
    fanout = load_plan(EXAMPLES / "fanout.md")
    assert len(fanout.tasks) == 10 and fanout.tasks[-1].depends_on == tuple(f"shout-{n}" for n in range(1, 9))
    retry = by_id(load_plan(EXAMPLES / "retry.md"))
    assert retry["flaky"].retries == 2 and retry["broken"].retries == 0
    assert retry["after-broken"].depends_on == ("broken",) and retry["independent"].depends_on == ()


MODEL_EXAMPLES = ["prompt.md", "transcribe.md", "embed.md", "embed-many.md", "mixed.md"]


@pytest.mark.parametrize("name", MODEL_EXAMPLES)
def test_model_examples_parse(name: str, tmp_path: Path) -> None:
    plan = load_plan(EXAMPLES / name, variables={"OUT": str(tmp_path)})
    assert any(str(tmp_path) in t.body for t in plan.tasks)
    assert not any("/tmp/mesh-examples" in t.body or "{OUT}" in t.body for t in plan.tasks)
    assert any(t.kind != "shell" for t in plan.tasks)
    default = load_plan(EXAMPLES / name)
    assert default.variables["OUT"] == f"/tmp/mesh-examples/{name.removesuffix('.md')}"


def test_model_example_shapes() -> None:
    prompt = by_id(load_plan(EXAMPLES / "prompt.md"))
    assert [(t.kind, t.cls) for t in prompt.values()] == [
        ("shell", "cpu"),
        ("prompt", "llm"),
        ("prompt", "llm"),
    ]
    assert prompt["continue"].inputs == ("write",) and prompt["continue"].depends_on == ("write",)
    assert prompt["answer"].body.endswith("\nA:") and prompt["answer"].model == "gemma3-270m"
    transcribe = by_id(load_plan(EXAMPLES / "transcribe.md"))
    assert "espeak-ng -s 130 -w /tmp/mesh-examples/transcribe/hello.wav" in transcribe["speak"].body
    t = transcribe["transcribe"]
    assert (t.kind, t.cls, t.body, t.depends_on) == (
        "transcribe",
        "script",
        "/tmp/mesh-examples/transcribe/hello.wav",
        ("speak",),
    )
    embed = by_id(load_plan(EXAMPLES / "embed.md"))
    e = embed["embed"]
    assert (e.kind, e.cls, e.depends_on) == ("embed", "script", ("write",))
    assert e.body.splitlines()[0] == "file: /tmp/mesh-examples/embed/sentences.txt"
    assert e.body.splitlines()[-1] == "save: /tmp/mesh-examples/embed/vectors.npy"
    mixed = by_id(load_plan(EXAMPLES / "mixed.md"))
    assert {t.kind for t in mixed.values()} == {"shell", "prompt", "transcribe", "embed"}
    assert mixed["notes"].inputs == ("transcribe-1", "transcribe-2")
    assert mixed["index"].inputs == ("transcribe-1", "transcribe-2", "notes")
    assert mixed["index"].body.splitlines()[:3] == [
        "input: transcribe-1",
        "input: transcribe-2",
        "input: notes",
    ]
    assert mixed["transcribe-2"].body == "/tmp/mesh-examples/mixed/two.wav"


def test_format_document_example_parses() -> None:
    doc = (ROOT / "plans" / "PLAN_FORMAT.md").read_text(encoding="utf-8")
    match = re.search(r"````markdown\n(.*?)\n````\n", doc, re.DOTALL)
    assert match is not None
    plan = parse_plan(match.group(1))
    assert [t.id for t in plan.tasks] == ["fetch", "convert-1", "convert-2", "convert-3", "publish"]


# ---------------------------------------------------------------- speed


def big_plan(n: int) -> str:
    parts = ["# Big\n\n## Variables\n\n- OUT: /tmp/x\n\n## Tasks\n"]
    for i in range(n):
        deps = f"- depends_on: t{i // 2}, t{i - 1}\n" if i > 1 else ""
        parts.append(
            f"### t{i}\n{deps}- priority: {i % 10 + 1}\n- timeout: 1h30m\n\n```shell\necho {{OUT}}/{i}\n```\n"
        )
    return "\n".join(parts)


def test_ten_thousand_tasks_parse() -> None:
    # how fast: the `submit` scenario of `tools/bench.py` (timings live there, not in tests)
    plan = parse_plan(big_plan(10_000))
    assert len(plan.tasks) == 10_000
    assert plan.tasks[-1].depends_on == ("t4999", "t9998")
    assert plan.tasks[-1].timeout_s == 5400.0


# ---------------------------------------------------------------- bounds
# What these cost (time, memory) is measured by hand: docs/performance.md, "Plan bounds".


@pytest.mark.parametrize("count", [10_001, 1_000_000])
def test_a_huge_foreach_list_is_refused(count: int) -> None:
    items = ",".join(str(i) for i in range(count))
    text = tasks_plan(task("big", body="echo {N}", fields=f"- foreach: N in {items}"))
    p = one(text)
    assert p.line == line_of(text, "- foreach")
    assert p.message == "foreach of task 'big' has more than 10,000 items, the most a plan may expand to"
    assert "plan_max_expansions" in p.hint


def test_a_foreach_list_at_the_limit_is_accepted() -> None:
    text = tasks_plan(task("t", body="echo {N}", fields="- foreach: N in " + ",".join(map(str, range(50)))))
    assert len(parse_plan(text, limits=PlanLimits(max_expansions=50)).tasks) == 50


def test_a_glob_over_a_big_tree_is_refused(tmp_path: Path) -> None:
    for d in range(7):
        (tmp_path / "tree" / str(d)).mkdir(parents=True)
        for f in range(8):
            (tmp_path / "tree" / str(d) / f"{f}.txt").write_text("x")
    limits = PlanLimits(max_expansions=50)
    text = tasks_plan(task("all", body="cat {F}", fields="- foreach: F in **/*"))
    p = one(text, limits=limits, **in_dir(tmp_path))
    assert p.line == line_of(text, "- foreach")
    assert (
        p.message
        == "foreach glob '**/*' of task 'all' matches more than 50 files, the most a plan may expand to"
    )
    # 56 files, 7 + 1 directories: the same pattern under a bigger limit takes them all
    bigger = PlanLimits(max_expansions=64)
    assert len(parse_plan(text, limits=bigger, **in_dir(tmp_path)).tasks) == 64  # type: ignore[arg-type]


def test_foreach_expansions_count_over_the_whole_plan() -> None:
    thirty = "- foreach: N in " + ",".join(map(str, range(30)))
    text = tasks_plan(task("a", body="echo {N}", fields=thirty) + task("b", body="echo {N}", fields=thirty))
    p = one(text, limits=PlanLimits(max_expansions=50))
    assert p.line == line_of(text, "- foreach", 2)
    assert p.message == (
        "foreach of task 'b' has more than 20 items, all the plan has room for: "
        "its foreach tasks may make 50 tasks in all and the ones above made 30"
    )


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("../*.md", "goes up out of the plan's directory with '..'"),
        ("data/../../*", "goes up out of the plan's directory with '..'"),
        ("/**/*", "is an absolute pattern outside the plan's directory"),
        ("/etc/*", "is an absolute pattern outside the plan's directory"),
    ],
)
def test_globs_stay_in_the_plans_directory(pattern: str, message: str, tmp_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    (tmp_path / "x.md").write_text("x")
    path = plans / "p.md"
    path.write_text(tasks_plan(task("t", body="cat {F}", fields=f"- foreach: F in {pattern}")))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    (p,) = info.value.problems
    assert p.message.startswith(f"foreach glob '{pattern}' of task 't' {message}")
    assert "--glob-outside" in p.hint and "plan_glob_outside" in p.hint


def test_globs_outside_the_plans_directory_when_allowed(tmp_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    (tmp_path / "x.md").write_text("x")
    path = plans / "p.md"
    path.write_text(tasks_plan(task("t", body="cat {F}", fields="- foreach: F in ../*.md")))
    plan = load_plan(path, limits=PlanLimits(glob_outside=True))
    assert [t.body for t in plan.tasks] == ["cat ../x.md\n"]


def test_the_parser_lists_a_glob_through_the_function_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_plan reads no directory: a foreach glob's files are what its `glob` function lists."""
    import glob as globmodule
    import os

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser read the disk")

    for module, name in [(globmodule, "iglob"), (globmodule, "glob"), (os, "scandir"), (os, "listdir")]:
        monkeypatch.setattr(module, name, no_disk)
    asked: list[str] = []

    def listing(pattern: str) -> list[str]:
        asked.append(pattern)
        return ["data/b.csv", "data/a.csv"]

    text = tasks_plan(
        task("conv", body="wc -c {F}", fields="- foreach: F in {D}/*.csv"),
        head="## Variables\n\n- D: data\n\n",
    )
    plan = parse_plan(text, workdir="/no/such/dir", glob=listing)
    assert asked == ["data/*.csv"]
    assert [t.body for t in plan.tasks] == ["wc -c data/a.csv\n", "wc -c data/b.csv\n"]
    assert plan.workdir == "/no/such/dir"


def test_the_parser_stops_reading_a_glob_past_its_limit() -> None:
    read: list[int] = []

    def endless(pattern: str) -> Iterator[str]:
        n = 0
        while True:
            n += 1
            read.append(n)
            assert n < 100, "read on past the limit"
            yield f"f{n}"

    text = tasks_plan(task("t", body="cat {F}", fields="- foreach: F in *"))
    p = one(text, glob=endless, limits=PlanLimits(max_expansions=5))
    assert (
        p.message == "foreach glob '*' of task 't' matches more than 5 files, the most a plan may expand to"
    )
    assert read == [1, 2, 3, 4, 5, 6]


def test_a_glob_the_files_function_refuses_or_cannot_read() -> None:
    text = tasks_plan(task("t", body="cat {F}", fields="- foreach: F in x/*"))

    def refuse(pattern: str) -> list[str]:
        raise GlobRefused("is not for today", "try tomorrow")

    def broken(pattern: str) -> Iterator[str]:
        yield "x/1"
        raise PermissionError(13, "Permission denied")

    p = one(text, glob=refuse)
    assert (p.line, p.message, p.hint) == (
        line_of(text, "- foreach"),
        "foreach glob 'x/*' of task 't' is not for today",
        "try tomorrow",
    )
    p = one(text, glob=broken)
    assert p.message == "foreach glob 'x/*' cannot be read: [Errno 13] Permission denied"


def test_without_a_files_function_a_glob_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x")
    text = tasks_plan(task("t", body="cat {F}", fields="- foreach: F in *.csv"))
    p = one(text, workdir=str(tmp_path))
    assert p.line == line_of(text, "- foreach")
    assert p.message.startswith(
        "foreach glob '*.csv' of task 't' cannot be expanded: a glob needs a plan file"
    )
    assert "list the items instead" in p.hint
    assert [t.body for t in parse_plan(text.replace("*.csv", "a.csv")).tasks] == ["cat a.csv\n"]


def test_too_many_tasks() -> None:
    text = tasks_plan("".join(task(f"t{i}") for i in range(6)))
    p = one(text, limits=PlanLimits(max_tasks=5))
    assert p.message == "the plan has 6 tasks, more than the limit of 5"
    assert p.line == line_of(text, "### t5") and "plan_max_tasks" in p.hint
    expanded = tasks_plan(task("a") + task("b", fields="- foreach: N in 1, 2, 3, 4, 5"))
    p = one(expanded, limits=PlanLimits(max_tasks=5))
    assert p.message == (
        "the plan has more than 5 tasks once its foreach tasks are expanded "
        "(task 'b' makes 5, after 1 before it)"
    )


def test_a_plan_text_over_the_limit_is_not_read(tmp_path: Path) -> None:
    text = tasks_plan(task("a", body="echo " + "x" * 200))
    p = one(text, limits=PlanLimits(max_bytes=100))
    assert p.line == 0 and p.message == f"the plan is {len(text):,} bytes, more than the limit of 100 bytes"
    assert "plan_max_bytes" in p.hint
    path = tmp_path / "big.md"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        load_plan(path, limits=PlanLimits(max_bytes=100))
    assert (
        info.value.problems[0].message == f"the plan is {len(text):,} bytes, more than the limit of 100 bytes"
    )
    # a file with no size (a device, a pipe) is read only up to the limit
    with pytest.raises(PlanError) as info:
        load_plan("/dev/zero", limits=PlanLimits(max_bytes=1000))
    assert info.value.problems[0].message == "the plan is more than the limit of 1,000 bytes"


def test_variables_that_grow_without_bound_are_refused() -> None:
    head = "## Variables\n\n- A: " + "x" * 1000 + "\n"
    for a, b in zip("ABCDEF", "BCDEFG", strict=True):
        head += f"- {b}: " + f"{{{a}}}" * 10 + "\n"  # each ten times the one above: G is 1 GB
    text = tasks_plan(task("t", body="echo {G}"), head=head + "\n")
    found = problems(text, limits=PlanLimits(max_bytes=1_000_000))
    assert [p.message for p in found] == [
        "the plan grows past 1,000,000 bytes as its variables are substituted and its foreach "
        "tasks expanded; it was not read further"
    ]
    assert found[0].line == line_of(text, "- D:")  # A to C make 111,000 bytes, D a million more


def test_foreach_copies_of_a_big_body_count_against_the_size() -> None:
    body = "echo {N} " + "x" * 1000
    text = tasks_plan(task("t", body=body, fields="- foreach: N in " + ",".join(map(str, range(100)))))
    p = one(text, limits=PlanLimits(max_bytes=50_000))
    assert p.message.startswith("the plan grows past 50,000 bytes")
    assert len(parse_plan(text, limits=PlanLimits(max_bytes=200_000)).tasks) == 100


# ---------------------------------------------------------------- robustness


def parse_or_plan_error(text: str, variables: dict[str, str] | None = None) -> None:
    try:
        result = parse_plan(text, variables=variables)
    except PlanError as e:
        assert e.problems
        assert all(p.line >= 0 and p.message for p in e.problems)
    else:
        assert isinstance(result, PlanSpec)
        assert result.tasks


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_parses_or_raises_plan_error(text: str) -> None:
    parse_or_plan_error(text)


FRAGMENTS = [
    "# Title",
    "#",
    "# second title",
    "## Tasks",
    "## tasks",
    "## Variables",
    "## Env",
    "## Notes",
    "### a",
    "### b",
    "### a-1",
    "### bad id!",
    "### ",
    "#### deeper",
    "```shell",
    "```",
    "````",
    "~~~",
    "~~~bash",
    "```python",
    "```prompt",
    "```transcribe",
    "```embed",
    "```noop",
    "file: {X}/a.txt",
    "text: hello",
    "input: a",
    "INPUT: b",
    "save: v.npy",
    "save: v.txt",
    "text:",
    "   ```sh",
    "echo {X} ${Y} {{z}} }}",
    "echo {UNKNOWN}",
    "",
    "prose",
    "- X: 1",
    "- X: {X}",
    "- Y: {X}/y",
    "- : empty",
    "- 1bad: v",
    "- no colon",
    "- depends on: a",
    "- retries 2",
]
KEYS = [*FIELDS, "prio", "X"]
VALUES = [
    "cpu",
    "gpu",
    "llm",
    "script",
    "gemma3-270m",
    "a b",
    "a",
    "a, b",
    "a-1, zz",
    "0",
    "5",
    "11",
    "-1",
    "1h30m",
    "90s",
    "0s",
    "X in 1, 2",
    "X in {X}",
    "X in",
    "X in *.does-not-exist",
    "bad",
    "A=1, B={X}",
    "A",
    "true",
    "maybe",
    "{X}",
    "",
]


@st.composite
def plan_like_text(draw: st.DrawFn) -> str:
    field = st.builds(
        lambda k, v: f"- {k}: {v}",
        st.one_of(st.sampled_from(KEYS), st.text(max_size=6)),
        st.one_of(st.sampled_from(VALUES), st.text(max_size=12)),
    )
    line = st.one_of(st.sampled_from(FRAGMENTS), field, st.text(max_size=15))
    lines = draw(st.lists(line, max_size=40))
    return "\n".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_like_text(), st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=3))
def test_plan_like_text_parses_or_raises_plan_error(text: str, variables: dict[str, str]) -> None:
    parse_or_plan_error(text, variables)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=6), st.sampled_from(["a", "b", "c", "d"]))
def test_random_small_graphs(deps_of_a: list[str], dep_of_b: str) -> None:
    text = tasks_plan(
        task("a", fields="- depends_on: " + ", ".join(deps_of_a))
        + task("b", fields=f"- depends_on: {dep_of_b}")
        + task("c")
        + task("d", fields="- foreach: X in 1, 2"),
    )
    parse_or_plan_error(text)


def test_noop_body_may_be_empty() -> None:
    spec = parse_plan("# N\n\n## Tasks\n\n### join\n```noop\n```\n")
    assert spec.tasks[0].kind == "noop"
    found = problems("# N\n\n## Tasks\n\n### empty\n```shell\n```\n")
    assert "is empty" in found[0].message


# ---------------------------------------------------------------- escalation


def test_escalation_section_and_requires_external() -> None:
    from mesh.events import EscalationPolicy

    head = "## Escalation\n\n- auto: yes\n- after: 3\n- sensitive: true\n- followups: no\n\n"
    text = tasks_plan(
        task("ask", body="Why is the sky blue?", kind="prompt", fields="- class: external")
        + task("hard", fields="- requires_external: true"),
        head=head,
    )
    plan = parse_plan(text)
    assert plan.escalation == EscalationPolicy(auto=True, after=3, sensitive=True, followups=False)
    ask, hard = plan.tasks
    assert (ask.cls, ask.kind, ask.requires_external) == ("external", "prompt", False)
    assert (hard.cls, hard.requires_external) == ("cpu", True)
    assert parse_plan(tasks_plan(task("a"))).escalation == EscalationPolicy()


@pytest.mark.parametrize(
    ("line", "message", "hint"),
    [
        ("- auto: maybe", "escalation 'auto' 'maybe' is not true or false", "'- auto: true'"),
        ("- after: 0", "escalation 'after' '0' is not a whole number from 1 to 100", "'- after: 2'"),
        ("- atuo: true", "unknown escalation setting 'atuo'; did you mean 'auto'?", "known settings"),
        ("- auto", "escalation line 'auto' has no ':'", "'- auto: true'"),
    ],
)
def test_bad_escalation_lines(line: str, message: str, hint: str) -> None:
    text = tasks_plan(task("a"), head=f"## Escalation\n\n{line}\n\n")
    p = one(text)
    assert p.line == line_of(text, line) and p.message == message and hint in p.hint


def test_requires_external_must_be_a_boolean() -> None:
    text = tasks_plan(task("a", fields="- requires_external: sometimes"))
    assert "requires_external 'sometimes' of task 'a' is not true or false" in one(text).message


@pytest.mark.parametrize("lead", ["\t", "    "])
def test_an_indented_field_is_an_error_not_prose(lead: str) -> None:
    """Four spaces or a tab make a line code to Markdown; a field there would be dropped, and
    the task run without its dependency."""
    text = tasks_plan(task("a") + task("b", fields=f"{lead}- depends_on: a"))
    p = one(text)
    assert p.message == "field 'depends_on' of task 'b' is indented, so it is not read as a field"
    assert p.line == line_of(text, "depends_on") and "- depends_on: ..." in p.hint
    # prose that looks like no field stays prose
    assert parse_plan(tasks_plan(task("c", fields=f"{lead}- see the notes: below")))


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (task("a" * 201), "is longer than 200 characters"),
        # the id of the tenth expansion is 198 + 3 characters
        (task("b" * 198, body="echo {X}", fields="- foreach: X in 1,2,3,4,5,6,7,8,9,10"), "longer than 200"),
        (task("c", fields="- env: A=x\x00y"), "sets environment variable A to a value holding a NUL byte"),
        (task("d", body="hi \x00 there", kind="prompt"), "has a body holding a NUL byte"),
    ],
)
def test_what_the_brain_would_refuse_is_refused_at_the_tasks_line(tasks: str, message: str) -> None:
    text = tasks_plan(tasks)
    p = problems(text)[0]
    assert message in p.message and p.line == line_of(text, "### ") and p.hint


def test_followups_are_checked_like_plan_tasks() -> None:
    tasks = parse_followups(md(task("t-fix") + task("t-check", fields="- depends_on: t-fix")), source="f")
    assert [(t.id, t.depends_on) for t in tasks] == [("t-fix", ()), ("t-check", ("t-fix",))]
    with pytest.raises(PlanError, match="depends on unknown task 'nope'"):
        parse_followups(md(task("t-x", fields="- depends_on: nope")), source="f")


def test_followups_whose_bodies_hold_headings_in_code_get_a_title_and_a_tasks_section() -> None:
    """A '# comment' or '## tasks' inside a code block is no heading: the follow-ups still get
    their title and their tasks section."""
    body = "# install deps\necho hi\n## tasks\n"
    tasks = parse_followups(f"### fix\n\n{FENCE}shell\n{body}{FENCE}\n", source="f")
    assert [(t.id, t.body) for t in tasks] == [("fix", body)]
    titled = parse_followups(f"# Fixes\n\n## Tasks\n\n### fix\n\n{FENCE}shell\n{body}{FENCE}\n", source="f")
    assert [t.id for t in titled] == ["fix"]


def test_followups_may_not_use_a_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claude's follow-up tasks cannot list the files of the machine that reads them (the brain's)."""
    (tmp_path / "secret.key").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError) as info:
        parse_followups(md(task("t-all", body="cat {F}", fields="- foreach: F in *")), source="f")
    (p,) = info.value.problems
    assert p.message == (
        "foreach glob '*' of task 't-all' is refused: "
        "Claude's follow-up tasks may not list the files of the machine that reads them"
    )
    assert "list the items instead" in p.hint
    tasks = parse_followups(md(task("t-two", body="cat {F}", fields="- foreach: F in a, b")), source="f")
    assert [t.body for t in tasks] == ["cat a\n", "cat b\n"]


# ---------------------------------------------------------------- artifacts


def test_artifacts_field_takes_globs_with_variables() -> None:
    text = tasks_plan(
        task("a", fields="- artifacts: out/*.txt, {D}/r.bin, out/*.txt, **/*.npy"),
        head="## Variables\n\n- D: data\n\n",
    )
    spec = parse_plan(text, source="t.md")
    assert spec.tasks[0].artifacts == ("out/*.txt", "data/r.bin", "**/*.npy")
    assert parse_plan(tasks_plan(task("b")), source="t.md").tasks[0].artifacts == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/etc/*", "artifacts glob '/etc/*' of task 'a' is not relative to the task's working directory"),
        ("~/x", "is not relative to the task's working directory"),
        ("out/*, ../x", "artifacts glob '../x' of task 'a' leaves the task's working directory"),
        ("a/../../b", "leaves the task's working directory"),
        (",", "field 'artifacts' of task 'a' names no files"),
    ],
)
def test_artifacts_outside_the_working_directory_are_refused(value: str, message: str) -> None:
    text = tasks_plan(task("a", fields=f"- artifacts: {value}"))
    p = one(text)
    assert p.line == line_of(text, "- artifacts:")
    assert message in p.message and "globs, separated by commas" in p.hint


def test_artifacts_of_a_submitted_spec_are_checked_too() -> None:
    from mesh.validate import check_task

    assert not check_task(TaskSpec(id="a", body="true\n", artifacts=("out/*",)))
    found = check_task(TaskSpec(id="a", body="true\n", artifacts=("out/*", "/abs", "x/../..")))
    assert len(found) == 2 and "'/abs', which is not relative" in found[0] and "('..')" in found[1]
