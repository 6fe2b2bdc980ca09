"""A chat body: its `system:` / `user:` / `assistant:` turns, and the messages a model is given.

The plan parser checks a chat body with `read_turns` (each problem with its line), the worker
turns it into `{"role", "content"}` messages with `chat_messages` (the task's inputs appended
to the last user turn as untrusted data), and export reads the turns back. Pure: text in, data
out; rendering the messages with a model's chat template is the executor's
(`mesh.host.chatrender`).

The format: a line that starts (in its first column) with `system:`, `user:` or `assistant:`
opens a turn; the text after the colon and every line up to the next such line are the turn's
text. A line indented by a space is never a role line. A line that starts with a role-like word
mesh does not know (`human:`, `model:`, `bot:` ...) is refused rather than read as text, so a
misspelt role cannot silently become part of the previous turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.untrusted import data_section

ROLES: tuple[str, ...] = ("system", "user", "assistant")
# words people write for a role that is not one of ours: refused, with the role they likely meant
NEAR_ROLES: dict[str, str] = {
    "human": "user",
    "model": "assistant",
    "bot": "assistant",
    "ai": "assistant",
    "gpt": "assistant",
    "developer": "system",
    "tool": "",
    "function": "",
}
_ROLE_RE = re.compile(r"(?P<role>[A-Za-z]+)[ \t]*:(?P<rest>.*)", re.DOTALL)
HINT = (
    "a chat body is turns, each opened by a line 'system: ...', 'user: ...' or 'assistant: ...' "
    "(a turn goes on until the next such line); the model answers the last user turn"
)


@dataclass(frozen=True, slots=True)
class Turn:
    role: str
    text: str
    # the index of the body line that opened it
    line: int


@dataclass(frozen=True, slots=True)
class ChatProblem:
    # the index of the body line it is about
    line: int
    message: str
    hint: str = HINT


def _role_of(line: str) -> tuple[str, str] | None:
    """(role word lower-cased, the rest of the line) when `line` opens with 'word:' in its first
    column; None otherwise."""
    m = _ROLE_RE.fullmatch(line)
    if m is None:
        return None
    return m.group("role").lower(), m.group("rest")


def read_turns(body: str) -> tuple[list[Turn], list[ChatProblem]]:
    """The turns of a chat body, and its problems (none when the body can be sent to a model)."""
    turns: list[Turn] = []
    problems: list[ChatProblem] = []
    role = ""
    opened = 0
    text: list[str] = []

    def close() -> None:
        if role:
            turns.append(Turn(role, "\n".join(text).strip(), opened))

    for i, line in enumerate(body.split("\n")):
        found = _role_of(line)
        if found is not None and found[0] in ROLES:
            close()
            role, opened, text = found[0], i, [found[1]]
            continue
        if found is not None and (found[0] in NEAR_ROLES or not role):
            near = NEAR_ROLES.get(found[0], "")
            message = f"{found[0]!r} is not a chat role (roles: {', '.join(ROLES)})"
            if near:
                message += f"; did you mean '{near}:'?"
            problems.append(
                ChatProblem(
                    i,
                    message,
                    "start the line with 'system:', 'user:' or 'assistant:'; "
                    "indent it by a space to keep it as text of the turn above",
                )
            )
            continue
        if not role:
            if line.strip():
                problems.append(ChatProblem(i, "the chat body has text before its first turn", HINT))
            continue
        text.append(line)
    close()
    problems += _order_problems(turns)
    return turns, problems


def _order_problems(turns: list[Turn]) -> list[ChatProblem]:
    """What the order of the turns gets wrong: one system turn, first; user and assistant
    turns alternating; a user turn last; no empty turn."""
    problems: list[ChatProblem] = []
    if not turns:
        return [ChatProblem(0, "the chat body has no turns")]
    for n, turn in enumerate(turns):
        if not turn.text:
            problems.append(
                ChatProblem(turn.line, f"the {turn.role} turn is empty", "write its text after the ':'")
            )
        if turn.role == "system" and n > 0:
            problems.append(
                ChatProblem(
                    turn.line,
                    "a system turn comes only first, and only once",
                    "move the system text to the top of the body, in one 'system:' turn",
                )
            )
        elif n > 0 and turn.role == turns[n - 1].role:
            problems.append(
                ChatProblem(
                    turn.line,
                    f"two {turn.role} turns follow each other",
                    "user and assistant turns alternate: merge the two into one turn",
                )
            )
    if not any(t.role == "user" for t in turns):
        problems.append(ChatProblem(turns[0].line, "the chat body has no user turn"))
    elif turns[-1].role != "user":
        problems.append(
            ChatProblem(
                turns[-1].line,
                f"the last turn is {turns[-1].role}, not user",
                "end the body with the user turn the model is to answer",
            )
        )
    return problems


def chat_messages(
    body: str, inputs: Mapping[str, str] | None = None, order: Sequence[str] = ()
) -> list[dict[str, str]]:
    """The `{"role", "content"}` messages of a chat body, the task's inputs appended to the
    last user turn as untrusted <data> blocks. Raises ValueError for a body `read_turns`
    finds a problem in (a plan's bodies were checked when it was read)."""
    turns, problems = read_turns(body)
    if problems:
        first = problems[0]
        raise ValueError(f"line {first.line + 1} of the chat body: {first.message}; {first.hint}")
    messages = [{"role": t.role, "content": t.text} for t in turns]
    data = data_section(inputs or {}, order)
    if data:
        last = messages[-1]
        last["content"] = f"{last['content']}\n\n{data}"
    return messages


def written(messages: Sequence[Mapping[str, str]]) -> str:
    """Messages written back in the body's own notation ('user: ...' turns)."""
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)
