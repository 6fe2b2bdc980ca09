"""Values from outside a plan (foreach file names, --var values) reach shell bodies as text, never as code.

Each test runs the bodies with bash, the way a worker does, and checks two things: the body got
the exact value, and no command hidden in the value ran (no PWNED file appeared).
"""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import PlanError, Problem
from mesh.events import WorkItem
from mesh.host.executors import RunContext, run_shell
from mesh.host.planfiles import directory_glob
from mesh.plan import parse_plan
from mesh.shellquote import Hole, fill, is_plain
from tests.conftest import Mesh

FENCE = "```"
ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

# Each tries to run a command in a different way; every command creates a file named PWNED*.
PAYLOADS = [
    "b$(touch PWNED1).csv",
    "a;touch PWNED2;.csv",
    "`touch PWNED3`.csv",
    "x' ; touch PWNED4 ; '.csv",
    'q" ; touch PWNED5 ; ".csv',
    "sp ace and $HOME and ${PATH}.csv",
    "n\nl;touch PWNED6;\n.csv",
    "ba\\ck\\slash\\",
    "}${IFS}touch${IFS}PWNED7;{",
    "$'\\x41' && touch PWNED8",
    "a'b\"c`d$e\\f}g",
    "~root *",
    "-n",
    "",
]
# file names cannot be empty or hold '/'
FILE_NAMES = [p for p in PAYLOADS if p and "/" not in p]
# the payloads that reached bash unquoted before quoting ("" and "-n" meant the same then)
HOSTILE = [p for p in PAYLOADS if p not in ("", "-n")]


def pwned(where: Path) -> list[str]:
    return sorted(str(p.relative_to(where)) for p in where.rglob("PWNED*"))


def run_body(body: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a shell body as a worker does (mesh.executors.run_shell) and return its stdout."""
    item = WorkItem(plan_id="p", task_id="t", attempt=1, body=body, workdir=str(cwd), env=env or {})
    result = asyncio.run(run_shell(item, RunContext(tail_bytes=1 << 20)))
    assert result.ok, (body, result.error, result.stderr_tail)
    return result.stdout_tail


def plan(tasks: str, head: str = "") -> str:
    return "# Hostile\n\n" + textwrap.dedent(head) + "## Tasks\n\n" + textwrap.dedent(tasks)


def problems(text: str, **kwargs: object) -> list[Problem]:
    with pytest.raises(PlanError) as info:
        parse_plan(text, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


# ---------------------------------------------------------------- through the parser


BODY = """\
printf '[%s]\\n' {F}
printf '[%s]\\n' "{F}"
printf '[%s]\\n' '{F}'
printf '[%s]\\n' "$(printf '%s' {F})"
v={F}; printf '[%s]\\n' "$v"
printf '[%s]\\n' ${NOT_SET:-{F}}
# {F}
"""


def expected(value: str) -> str:
    return f"[{value}]\n" * 6


def test_hostile_file_names_from_a_glob_run_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in FILE_NAMES:
        (data / name).write_text("x")
    text = plan(f"### conv\n- foreach: F in data/*\n\n{FENCE}shell\n{BODY}{FENCE}\n")
    spec = parse_plan(text, workdir=str(tmp_path), glob=directory_glob(str(tmp_path)))
    assert len(spec.tasks) == len(FILE_NAMES)
    seen = set()
    for n, t in enumerate(spec.tasks, 1):
        # ids are numbered, never made of the file name: always a valid subject token
        assert t.id == f"conv-{n}" and set(t.id) <= ID_CHARS
        out = run_body(t.body, tmp_path)
        name = out.split("]\n", 1)[0].removeprefix("[")
        assert out == expected(name), t.body
        seen.add(name.removeprefix("data/"))
    assert seen == set(FILE_NAMES)
    assert pwned(tmp_path) == []


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_var_values_run_nothing(value: str, tmp_path: Path) -> None:
    text = plan(
        f"### t\n\n{FENCE}shell\n{BODY.replace('{F}', '{V}')}{FENCE}\n", head="## Variables\n\n- V: x\n\n"
    )
    (t,) = parse_plan(text, variables={"V": value}).tasks
    assert run_body(t.body, tmp_path) == expected(value)
    assert pwned(tmp_path) == []


def test_values_in_here_documents(tmp_path: Path) -> None:
    body = "cat <<EOF\n[{V}]\nEOF\ncat <<'EOF'\n[{V}]\nEOF\ncat <<-EOF\n\t[{V}]\n\tEOF\n"
    text = plan(f"### t\n\n{FENCE}shell\n{body}{FENCE}\n")
    for value in [p for p in PAYLOADS if "\n" not in p]:
        (t,) = parse_plan(text, variables={"V": value}).tasks
        assert run_body(t.body, tmp_path) == f"[{value}]\n" * 3, t.body
    assert pwned(tmp_path) == []


def test_prompt_bodies_and_fields_keep_plain_values() -> None:
    value = "a b $(touch PWNED) 'c'"
    text = plan(
        f"""\
        ### t
        - env: X={{V}}

        {FENCE}prompt
        About {{V}}:
        {FENCE}

        ### s
        - env: X={{V}}

        {FENCE}shell
        echo {{V}} "$X"
        {FENCE}
        """
    )
    p, s = parse_plan(text, variables={"V": value}).tasks
    assert p.body == f"About {value}:" and p.env == {"X": value}
    assert s.env == {"X": value}  # an environment variable: never read as code
    assert s.body == "echo 'a b $(touch PWNED) '\"'\"'c'\"'\"'' \"$X\"\n"


def test_plain_values_are_written_as_they_are() -> None:
    text = plan(f"### t\n\n{FENCE}shell\ncp {{A}} \"{{B}}\" '{{C}}'\n{FENCE}\n")
    values = {"A": "/data/in-1.csv", "B": "user@host:8080", "C": "a=b,c+d%e"}
    (t,) = parse_plan(text, variables=values).tasks
    assert t.body == "cp /data/in-1.csv \"user@host:8080\" 'a=b,c+d%e'\n"


def test_raw_values_are_pasted_as_they_are(tmp_path: Path) -> None:
    text = plan(f"### t\n\n{FENCE}shell\n{{CMD:raw}} {{ARG}}\n{FENCE}\n")
    (t,) = parse_plan(text, variables={"CMD": "printf '<%s>' a", "ARG": "b c"}).tasks
    assert t.body == "printf '<%s>' a 'b c'\n"
    assert run_body(t.body, tmp_path) == "<a><b c>"
    # {{NAME:raw}} is the literal text
    text = plan(f"### t\n\n{FENCE}shell\necho {{{{CMD:raw}}}}\n{FENCE}\n")
    assert parse_plan(text).tasks[0].body == "echo {CMD:raw}\n"


@pytest.mark.parametrize(
    ("body", "value", "message"),
    [
        (
            "cat <<EOF\n{V}\nEOF",
            "a\ntouch PWNED",
            "is in a here-document (<<EOF), and its value has a line break",
        ),
        ("cat <<'EOF'\n{V}\nEOF", "EOF\ntouch PWNED", "is in a here-document (<<EOF)"),
        ("cat <<EOF\n{V}\nEOF", "EOF", "makes its line of a here-document read 'EOF'"),
        ("cat <<EOF\nE{V}\nEOF", "OF", "makes its line of a here-document read 'EOF'"),
        ("cat <<'A B'\nA{V}\nA B", " B", "makes its line of a here-document read 'A B'"),
        ("echo $(( {V} + 1 ))", "a[$(touch PWNED)]", "is in arithmetic"),
        ("(( {V} > 1 ))", "a[$(touch PWNED)]", "is in arithmetic"),
        ("echo ${X:{V}}", "$(touch PWNED)", "is in arithmetic"),
        ("echo `echo {V}`", "a b", "is inside backquotes"),
        ("echo \\{V}", "a;touch PWNED", "comes right after a backslash"),
        ('echo "\\{V}"', "$(touch PWNED)", "comes right after a backslash"),
        ("cat <<{V}\nx\n", "E F", "is in a here-document's delimiter"),
        ("echo 'unclosed {V}", "a b", "do not close"),
        ("echo $(echo {V}", "a b", "do not close"),
        ('echo "${X:-{V}}"', "it's", "where bash pairs single quotes"),
        ("echo {V}", "a\x00b", "has a NUL byte"),
        ("for ((i=0; i<{V}; i++)); do :; done", "$(touch PWNED)", "is in arithmetic"),
        ("for((i=0; i<{V}; i++)); do :; done", "$(touch PWNED)", "is in arithmetic"),
        ("a[{V}]=1", "$(touch PWNED)", "is in arithmetic"),
        ("declare -a b; b[{V}]+=x", "$(touch PWNED)", "is in arithmetic"),
        ("local c[{V}]=1", "$(touch PWNED)", "is in arithmetic"),
        ("cat <<$'E\\x4fF'\nEOF\necho \"{V}\"\nEOF", "$(touch PWNED)", "do not close"),
        ("cat <<EOF\nE\\\n{V}\necho hi\nEOF", "OF", "makes its line of a here-document read 'EOF'"),
        ("cat <<E~F\nE\\\n{V}\necho hi\nE~F", "~F", "makes its line of a here-document read 'E~F'"),
    ],
)
def test_values_no_quoting_can_hold_are_refused(body: str, value: str, message: str) -> None:
    text = plan(f"### t\n\n{FENCE}shell\necho first\n{body}\n{FENCE}\n")
    line = 9 + body[: body.index("{V}")].count("\n")  # the body starts at line 9
    found = problems(text, variables={"V": value})
    assert any(p.line == line and p.message.startswith("{V} (") and message in p.message for p in found), (
        found
    )
    assert all(p.hint for p in found)


def test_plain_values_pass_where_others_are_refused() -> None:
    text = plan(f"### t\n\n{FENCE}shell\necho $(( {{N}} + 1 )) `echo {{N}}`\n{FENCE}\n")
    assert parse_plan(text, variables={"N": "41"}).tasks[0].body == "echo $(( 41 + 1 )) `echo 41`\n"


def test_a_task_does_not_inherit_its_workers_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bus's password and the API key in the worker's environment stay out of the task's;
    the rest of it, and what the plan sets, go in."""
    monkeypatch.setenv("MESH_NATS_PASSWORD", "hunter2")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-x")
    monkeypatch.setenv("MESH_WEB_TOKEN", "tok")
    monkeypatch.setenv("SOME_TOOL_HOME", "/opt/tool")
    out = run_body(
        'printf "[%s]" "${MESH_NATS_PASSWORD-}${ANTHROPIC_API_KEY-}${MESH_WEB_TOKEN-}" '
        '"$SOME_TOOL_HOME" "$MINE"',
        tmp_path,
        env={"MINE": "set"},
    )
    assert out == "[][/opt/tool][set]"


def test_a_nul_byte_in_a_shell_body_is_refused() -> None:
    text = plan(f"### t\n\n{FENCE}shell\necho a\x00b\n{FENCE}\n")
    assert any("NUL byte" in p.message for p in problems(text))


@pytest.mark.integration
async def test_hostile_file_names_through_a_worker(mesh: Mesh) -> None:
    """End to end: a glob over hostile file names, and a hostile --var, run by a real worker."""
    data = mesh.tmp / "data"
    data.mkdir()
    for name in FILE_NAMES:
        (data / name).write_text("x")
    body = 'printf \'%s\\0\' {F} "{V}" > "out/$MESH_TASK_ID"'
    text = plan(
        f"""\
        ### setup

        {FENCE}shell
        mkdir -p out
        {FENCE}

        ### conv
        - depends_on: setup
        - foreach: F in data/*

        {FENCE}shell
        {body}
        {FENCE}
        """,
        head="## Variables\n\n- V: x\n\n",
    )
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(text, V="$(touch PWNED_VAR); `touch PWNED_VAR2`")
    record = await mesh.wait_plan(plan_id)
    assert record.status == "succeeded"
    got = []
    for n in range(1, len(FILE_NAMES) + 1):
        f, v, _ = (mesh.tmp / "out" / f"conv-{n}").read_text().split("\0")
        assert v == "$(touch PWNED_VAR); `touch PWNED_VAR2`"
        got.append(f.removeprefix("data/"))
    assert sorted(got) == sorted(FILE_NAMES)
    assert pwned(mesh.tmp) == []


# ---------------------------------------------------------------- the quoting itself

# Templates: `@` marks the holes; each prints the value between brackets, once per hole.
TEMPLATES = [
    "printf '[%s]' @",
    'printf "[%s]" "@"',
    "printf '[%s]' '@'",
    "printf '[%s]' $'@'",
    "v=pre@; printf '[%s]' \"${v#pre}\"",
    "printf '[%s]' \"$(printf '%s' @)\"",
    'printf "[%s]" "$(printf "%s" "@")"',
    "printf '[%s]' \"$(printf '%s' \"$(printf '%s' @)\")\"",
    "x=@; printf '[%s]' \"$x\"",
    "printf '[%s]' \"${UNSET:-@}\"",
    "printf '[%s]' ${UNSET:-@}",
    'printf \'[%s]\' "${UNSET:-"@"}"',
    "printf '[%s]' ${UNSET:+never} \"${HOME:+@}\"",
    "# a comment: @\nprintf '[%s]' @",
    "v=$(case a in a) printf '%s' @;; esac); printf '[%s]' \"$v\"",
    "v=$(case a in (a) printf '%s' @;; esac); printf '[%s]' \"$v\"",
    "if true; then case x in x) printf '[%s]' @;; esac; fi",
    "for f in @; do printf '[%s]' \"$f\"; done",
    "f() { printf '[%s]' \"$1\"; }; f @",
    "printf '%s' <(:) >/dev/null; printf '[%s]' @",
    "arr=( @ ); printf '[%s]' \"${arr[0]}\"",
    "v=$(echo ')' >/dev/null; printf '%s' @); printf '[%s]' \"$v\"",
    "echo \"it's\" >/dev/null; printf '[%s]' @ # it's",
    "printf '[%s]' \"$(cat <<EOF\n@\nEOF\n)\"",
    "printf '%s' \"$(cat <<EOF\n[$(printf '%s' @)]\nEOF\n)\"",
    "printf '[%s]' @ \\\n  >/dev/stdout",
    "[[ x@ == x@ ]] && printf '[%s]' @",
    "x=`echo \"a)\" '#'`; printf '[%s]' @",
    "printf '%s' \"`echo '\"'`\" >/dev/null; printf '[%s]' \"@\"",
    "cat <<A >/dev/null; cat <<'B' >/dev/null; printf '[%s]' @\n$(echo ')')\nA\n$(echo @)\nB",
    # a '#' that continues a word (after a substitution's ')', a backquote, an escaped character)
    # starts no comment: the quotes after it still count
    ': $(true)#"@"; printf \'[%s]\' "@"',
    ': `true`#"@"; printf \'[%s]\' "@"',
    ': $((1+2))#"@"; printf \'[%s]\' "@"',
    ': <(true)#"@"; printf \'[%s]\' "@"',
    ": a\\ #'@'; printf '[%s]' \"@\"",
    ': a\\;#"@"; printf \'[%s]\' "@"',
    # $'...' and $"..." quote a here-document's delimiter: the document ends at its first line
    "cat <<$'EOF' >/dev/null\nEOF\nprintf '[%s]' \"@\"",
    'cat <<$"EOF" >/dev/null\nEOF\nprintf \'[%s]\' "@"',
    # and one after an escaped backslash and a blank does
    ": a\\\\ #\"@\"\nprintf '[%s]' @",
]


def shown(template: str) -> int:
    """How many times a template prints its value."""
    return template.count("%s' @") + template.count('%s" "@"') + template.count("%s' '@'") or 1


def template_ok(template: str, value: str, tmp: Path) -> tuple[bool, str]:
    pieces = template.split("@")
    out, refusals = fill(pieces, [Hole("V", value)] * (len(pieces) - 1))
    if refusals:
        # the two places a value can be refused in these templates (see the refusal tests)
        known = ("<<" in template and "\n" in value) or ('"${' in template and "'" in value)
        return known, f"refused: {refusals}"
    run = subprocess.run(["/bin/bash", "-c", out], cwd=tmp, capture_output=True, text=True, timeout=10)
    want = f"[{value}]" * shown(template)
    return run.stdout == want and not pwned(tmp), f"{out!r} -> {run.stdout!r} {run.stderr!r}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_place_gets_the_exact_value(template: str, tmp_path: Path) -> None:
    for value in PAYLOADS:
        ok, why = template_ok(template, value, tmp_path)
        assert ok, why
    assert pwned(tmp_path) == []


def test_plain_is_plain() -> None:
    assert is_plain("data/in_1.csv") and is_plain("a=b,c:d@e%f+g-h")
    assert not any(is_plain(v) for v in ["", "a b", "~x", "a*", "a'", "$x", "#", "a\nb", "é"])


def test_fill_wants_one_more_piece_than_holes() -> None:
    with pytest.raises(ValueError):
        fill(["a"], [Hole("V", "x")])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    templates=st.lists(st.sampled_from(TEMPLATES), min_size=2, max_size=5), value=st.sampled_from(PAYLOADS)
)
def test_places_do_not_leak_into_the_commands_after_them(
    templates: list[str], value: str, tmp_path: Path
) -> None:
    """Bodies made of several templates in a row: each still gets the exact value, so no place
    (a here-document, a case, a quote) is read as ending anywhere but where bash ends it."""
    body = "\n".join(templates)
    pieces = body.split("@")
    out, refusals = fill(pieces, [Hole("V", value)] * (len(pieces) - 1))
    if refusals:
        assert ("<<" in body and "\n" in value) or ('"${' in body and "'" in value), refusals
        return
    run = subprocess.run(["/bin/bash", "-c", out], cwd=tmp_path, capture_output=True, text=True, timeout=10)
    assert run.stdout == "".join(f"[{value}]" * shown(t) for t in templates), (out, run.stderr)
    assert pwned(tmp_path) == []
