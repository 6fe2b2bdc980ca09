"""Quote a plan's values for the place they take in a shell body.

A `{NAME}` in a shell body is replaced by its value. The value may come from
outside the plan (a file name matched by a foreach glob, a `--var`), so it
must reach bash as that text and nothing else: never as code to run. How to
write it depends on where it stands, so `fill` reads the body the way bash
reads it (a small lexer: quotes, escapes, `$( )`, backquotes, `${ }`,
arithmetic, comments and here-documents) and writes each value for its place:

| Place | Written as |
| --- | --- |
| outside quotes, in `$( )` | `shlex.quote(value)` |
| inside `"..."` | `\\`, `$`, `` ` ``, `"` escaped with a backslash (and `}` inside `"${...}"`) |
| inside `'...'` | each `'` written `'\\''` |
| inside `$'...'` | `\\` and `'` escaped with a backslash |
| in a here-document (`<<EOF`) | `\\`, `$`, `` ` `` escaped; no line break |
| in a quoted here-document (`<<'EOF'`) | as it is; no line break |
| in a comment | quoted as outside quotes, each line break followed by `# ` |

A plain value (letters, digits and `_./:=@%+,-`) is written as it is
anywhere. A value that no writing can keep as data is refused (a `Refusal`
names it): one in arithmetic (`$(( ))`, `(( ))`, `for (( ))`, `${x:offset}`, an array's index:
`${a[i]}`, `a[i]=x`, `a=([i]=x)`, `declare a[i]`),
inside backquotes, right after a backslash, in a here-document's delimiter,
one that would end its here-document early, and any value in a body whose
quotes or substitutions this lexer finds unbalanced (it cannot then tell
where the value stands).

A raw hole (`{NAME:raw}` in a plan) is pasted as it is, and is read as part
of the script for the places of the holes after it.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Hole", "Refusal", "fill", "is_plain"]

Context = Literal[
    "word",
    "double",
    "single",
    "ansi",
    "heredoc",
    "heredoc-quoted",
    "comment",
    "arith",
    "escaped",
    "delimiter",
    "unknown",
]

_PLAIN_RE = re.compile(r"[A-Za-z0-9_./:=@%+,-]+")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-]")
_WORD_RE = re.compile(r"[A-Za-z_]+|!|\{")
# a character after which a word starts
_BREAK = frozenset(" \t\n;&|()<>`")
# the ones after which a '#' begins a comment: not a ')' or a backquote, which may close a
# substitution the word goes on after ('$(date)#x' is one word); were one of them to begin a
# comment for bash, the text after it is read here as code, and quoted as code: no harm
_COMMENT_AFTER = frozenset(" \t\n;&|(<>")
# reserved words after which a command may still start (so 'then case' opens a case, and
# 'for ((' an arithmetic loop)
_LEADING = frozenset({"if", "then", "else", "elif", "do", "while", "until", "!", "{", "time", "for"})
# a word that starts with an array's index (`a[i]=x`, `declare a[i]`, `a=([i]=x)`): bash reads
# the index as arithmetic, and runs the command substitutions in it even from a quoted value
_INDEX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\[|\[[^\]\n]*\]\+?=")
# the stand-in for a hole in the text the lexer reads: a word character, as the quoted value is a word
_STAND_IN = "x"


def is_plain(value: str) -> bool:
    """Whether `value` means the same to bash wherever it stands (and so needs no quoting)."""
    return _PLAIN_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Hole:
    """A value to put into the body; `name` is used in messages only."""

    name: str
    value: str
    raw: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the hole at `index` cannot be written safely, and what to do."""

    index: int
    message: str
    hint: str


@dataclass(frozen=True, slots=True)
class _Spot:
    context: Context
    backquoted: bool = False
    brace: bool = False  # inside "${...}": a '}' would end it, and a lone "'" open a quote
    delim: str = ""  # here-documents: the delimiter, whether its tabs are stripped,
    tabs: bool = False  # and the line of the hole (start, end) in the lexed text
    line: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class _Frame:
    kind: Literal["cmd", "dq", "sq", "ansi", "param", "arith", "heredoc"]
    close: str = ""  # cmd: ")" ("" at the top); arith: "))", "]" or "}"; dq: "'" in "${...}"
    depth: int = 0  # open '(' (cmd, arith) or '{' (param)
    cases: int = 0  # open 'case' commands (cmd): their patterns end in an unmatched ')'
    cmd_pos: bool = True  # cmd: a command may start here
    quoted: bool = False  # param: inside "..." or a here-document; heredoc: delimiter quoted
    delim: str = ""
    tabs: bool = False


class _Lexer:
    """Reads `text` as bash would and tells the place of each position in `marks`."""

    def __init__(self, text: str, marks: Sequence[int], spans: Sequence[tuple[int, int]]) -> None:
        self.s = text
        self.n = len(text)
        self.marks = frozenset(marks)
        self.spans = spans  # where plain values stand (written as they are, so lexed as text)
        self.early: list[tuple[int, str]] = []  # a span that makes a here-document line its delimiter
        self.spots: dict[int, _Spot] = {}
        self.stack: list[_Frame] = [_Frame("cmd")]
        self.pending: list[_Frame] = []  # here-documents whose bodies start after this line
        self.unclosed = False  # a backquote with no closing one

    # ---------------------------------------------------------------- helpers

    def push(self, frame: _Frame) -> None:
        self.stack.append(frame)

    def spot(self, i: int, context: Context, brace: bool = False) -> None:
        self.spots[i] = _Spot(context, False, brace)

    def backquote(self, i: int) -> int:
        """A backquote at `i`: bash takes the text up to the next unescaped one as the command,
        before it reads any quote in it, so it is one region here; its holes are backquoted."""
        s = self.s
        j = i + 1
        while j < self.n and s[j] != "`":
            j += 2 if s[j] == "\\" else 1
        for m in range(i + 1, min(j, self.n)):
            if m in self.marks:
                self.spots[m] = _Spot("word", True)
        if j >= self.n:
            self.unclosed = True
        return j + 1

    def marked(self, start: int, end: int) -> bool:
        return any(m in self.marks for m in range(start, end))

    def escaped(self, i: int) -> bool:
        """Whether the character at `i` is escaped by a backslash (an odd run of them before it)."""
        s = self.s
        k = i
        while k > 0 and s[k - 1] == "\\":
            k -= 1
        return (i - k) % 2 == 1

    def escape(self, i: int) -> int:
        """A backslash at `i` that escapes the next character: the index after both."""
        if i + 1 in self.marks:
            self.spot(i + 1, "escaped")
        return i + 2

    def dollar(self, i: int, quoted: bool) -> int:
        """`$` at `i`: open what it opens; the index after it."""
        s = self.s
        nxt = s[i + 1 : i + 2]
        if s.startswith("((", i + 1):
            self.push(_Frame("arith", close="))"))
            return i + 3
        if nxt == "(":
            self.push(_Frame("cmd", close=")"))
            return i + 2
        if nxt == "[":
            self.push(_Frame("arith", close="]"))
            return i + 2
        if nxt == "{":
            return self.param(i + 2, quoted)
        if not quoted and nxt == "'":
            self.push(_Frame("ansi"))
            return i + 2
        if not quoted and nxt == '"':
            self.push(_Frame("dq"))
            return i + 2
        return i + 1

    def param(self, i: int, quoted: bool) -> int:
        """`${` ends before `i`: its name, then a subscript or an offset, which are arithmetic."""
        s = self.s
        self.push(_Frame("param", quoted=quoted))
        if s[i : i + 1] in ("#", "!"):
            i += 1
        m = _NAME_RE.match(s, i)
        if m is not None and not self.marked(i, m.end()):
            i = m.end()
        if s[i : i + 1] == "[":
            self.push(_Frame("arith", close="]"))
            return i + 1
        if s[i : i + 1] == ":" and s[i + 1 : i + 2] not in ("-", "=", "?", "+"):
            self.push(_Frame("arith", close="}"))
            return i + 1
        return i

    # ---------------------------------------------------------------- the walk

    def run(self) -> bool:
        """Walk the text; True if it ends balanced (no open quote, substitution or case)."""
        s = self.s
        i = 0
        line_end = -1  # where the here-document line read last ends
        while i < self.n:
            top = self.stack[-1]
            if top.kind == "heredoc" and (i == 0 or s[i - 1] == "\n") and i > line_end:
                end = s.find("\n", i)
                end = self.n if end < 0 else end
                if not top.quoted:
                    # a line ending in an unescaped backslash goes on on the next one, and bash
                    # compares the lines joined with the delimiter
                    while end < self.n and self.escaped(end):
                        nxt = s.find("\n", end + 1)
                        end = self.n if nxt < 0 else nxt
                line_end = end  # (the lines it went on to are not lines of their own)
                holes = [m for m in range(i, end) if m in self.marks] if self.marks else []
                line = s[i:end] if top.quoted else _joined(s[i:end])
                if not holes and (line.lstrip("\t") if top.tabs else line) == top.delim:
                    self.early.extend(
                        (k, top.delim) for k, (a, b) in enumerate(self.spans) if a < end and b > i
                    )
                    self.stack.pop()
                    i = end + 1
                    continue
                kind: Context = "heredoc-quoted" if top.quoted else "heredoc"
                for m in holes:
                    self.spots[m] = _Spot(kind, False, False, top.delim, top.tabs, (i, end))
            i = self.step(i, top)
        bottom = self.stack[0]
        return (
            not self.unclosed
            and bottom.depth == 0
            and bottom.cases == 0
            and all(f.kind == "heredoc" for f in self.stack[1:])  # bash reads one left open to the end
        )

    def step(self, i: int, top: _Frame) -> int:
        c = self.s[i]
        kind = top.kind
        if i in self.marks:
            if kind == "cmd":
                self.spot(i, "word")
                top.cmd_pos = False
            elif kind == "dq":
                self.spot(i, "double", brace=top.close == "'")
            elif kind == "sq":
                self.spot(i, "single")
            elif kind == "ansi":
                self.spot(i, "ansi")
            elif kind == "arith":
                self.spot(i, "arith")
            elif kind == "param":
                self.spot(i, "double" if top.quoted else "word", brace=top.quoted)
            # a here-document's holes were placed at the start of their line
            return i + 1
        if kind == "cmd":
            return self.cmd(i, c, top)
        if kind == "sq":
            if c == "'":
                self.stack.pop()
            return i + 1
        if kind == "ansi":
            if c == "\\":
                return self.escape(i)
            if c == "'":
                self.stack.pop()
            return i + 1
        if kind == "heredoc" and top.quoted:
            return i + 1
        # "...", ${...}, arithmetic and an unquoted here-document: escapes and substitutions count
        if c == "\\":
            return self.escape(i)
        if c == "$":
            return self.dollar(i, quoted=kind != "param" or top.quoted)
        if c == "`":
            return self.backquote(i)
        if kind == "dq":
            if c == (top.close or '"'):
                self.stack.pop()
        elif kind == "param":
            if c == "}":
                if top.depth:
                    top.depth -= 1
                else:
                    self.stack.pop()
            elif c == "{":
                top.depth += 1
            elif c == '"':
                self.push(_Frame("dq"))
            elif c == "'":
                # outside "...": a quote; inside: paired while reading, and expanded like "..."
                self.push(_Frame("dq", close="'") if top.quoted else _Frame("sq"))
        elif kind == "arith":
            return self.arith(i, c, top)
        return i + 1

    def arith(self, i: int, c: str, top: _Frame) -> int:
        # quotes do not quote here: bash expands what is inside them too
        if c == "(":
            top.depth += 1
        elif c == ")" and top.depth:
            top.depth -= 1
        elif top.close == "))":
            if self.s.startswith("))", i):
                self.stack.pop()
                return i + 2
        elif c == top.close:
            self.stack.pop()
            if c == "}":  # an offset ends with its ${...}, which must see the brace
                return i
        return i + 1

    def cmd(self, i: int, c: str, top: _Frame) -> int:
        s = self.s
        if c in " \t":
            return i + 1
        # a word starts here: after a blank or an operator that is not itself escaped
        at_break = i == 0 or (s[i - 1] in _BREAK and not self.escaped(i - 1))
        if c == "\n":
            if self.pending:
                self.stack.extend(reversed(self.pending))
                self.pending = []
            top.cmd_pos = True
            return i + 1
        if c in ";&|":
            top.cmd_pos = True
            return i + 1
        if c == "#" and at_break and (i == 0 or s[i - 1] in _COMMENT_AFTER):
            end = s.find("\n", i)
            end = self.n if end < 0 else end
            for m in range(i, end):
                if m in self.marks:
                    self.spot(m, "comment")
            return end
        if c == "(":
            if top.cmd_pos and s[i + 1 : i + 2] == "(":
                self.push(_Frame("arith", close="))"))
                return i + 2
            top.depth += 1
            top.cmd_pos = True
            return i + 1
        if c == ")":
            if top.depth:
                top.depth -= 1
            elif top.cases:
                pass  # the end of a case pattern
            elif top.close == ")":
                self.stack.pop()
            top.cmd_pos = True
            return i + 1
        if at_break and top.cmd_pos:
            w = _WORD_RE.match(s, i)
            if w is not None and (w.end() == self.n or s[w.end()] in _BREAK) and not self.marked(i, w.end()):
                word = w.group()
                if word == "case":
                    top.cases += 1
                    top.cmd_pos = False
                elif word == "esac" and top.cases:
                    top.cases -= 1
                    top.cmd_pos = False
                else:
                    top.cmd_pos = word in _LEADING
                return w.end()
        if at_break and (index := _INDEX_RE.match(s, i)) is not None:
            # (for `a[`, past the name: a value that is the name is quoted, and names nothing)
            after = i + 1 if c == "[" else index.end()
            if not self.marked(i, after):
                top.cmd_pos = False
                self.push(_Frame("arith", close="]"))
                return after
        top.cmd_pos = False
        if c == "\\":
            if s[i + 1 : i + 2] == "\n":
                return i + 2  # a line continuation
            return self.escape(i)
        if c == "'":
            self.push(_Frame("sq"))
        elif c == '"':
            self.push(_Frame("dq"))
        elif c == "$":
            return self.dollar(i, quoted=False)
        elif c == "`":
            return self.backquote(i)
        elif c in "<>" and s[i + 1 : i + 2] == "(":
            self.push(_Frame("cmd", close=")"))
            return i + 2
        elif c == "<" and s.startswith("<<", i):
            if s.startswith("<<<", i):
                return i + 3
            return self.heredoc(i + 2)
        return i + 1

    def heredoc(self, i: int) -> int:
        """`<<` ends before `i`: read the delimiter word and queue the here-document."""
        s = self.s
        tabs = s[i : i + 1] == "-"
        if tabs:
            i += 1
        while i < self.n and s[i] in " \t":
            i += 1
        word: list[str] = []
        quoted = False
        start = i
        while i < self.n and s[i] not in " \t\n;&|<>()":
            c = s[i]
            if c == "$" and s[i + 1 : i + 2] in ("'", '"'):
                # $'...' and $"..." quote too; an escape in $'...' may stand for any character
                end = s.find(s[i + 1], i + 2)
                if s[i + 1] == "'" and "\\" in s[i + 2 : end if end >= 0 else self.n]:
                    self.unclosed = True  # (so the delimiter is not known: every value refused)
                i += 1
                continue
            if c in "'\"":
                quoted = True
                end = s.find(c, i + 1)
                end = self.n if end < 0 else end
                word.append(s[i + 1 : end])
                i = end + 1
            elif c == "\\":
                quoted = True
                word.append(s[i + 1 : i + 2])
                i += 2
            else:
                word.append(c)
                i += 1
        for m in range(start, min(i, self.n)):
            if m in self.marks:
                self.spot(m, "delimiter")
        self.pending.append(_Frame("heredoc", delim="".join(word), tabs=tabs, quoted=quoted))
        return i


def _joined(line: str) -> str:
    """An unquoted here-document's line as bash compares it with the delimiter: each backslash
    that escapes a line break taken out with the break."""
    if "\\\n" not in line:
        return line
    out: list[str] = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            if line[i + 1] != "\n":
                out.append(line[i : i + 2])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _lex(
    text: str, marks: tuple[int, ...], spans: tuple[tuple[int, int], ...]
) -> tuple[dict[int, _Spot], bool, tuple[tuple[int, str], ...]]:
    """The place of each mark in `text`, whether the text ends balanced, and the spans that end
    a here-document (cached: the expansions of one foreach task often differ only in their holes)."""
    lexer = _Lexer(text, marks, spans)
    balanced = lexer.run()
    return lexer.spots, balanced, tuple(lexer.early)


def _quote(value: str, spot: _Spot, name: str) -> str | tuple[str, str]:
    """`value` written for its place, or (message, hint) if it cannot be; `name` is the
    variable's, for the hint."""
    ctx = spot.context
    if spot.backquoted:
        return (
            "is inside backquotes (`...`), where no quoting keeps it from being read as code",
            "write $( ... ) instead of backquotes",
        )
    if ctx == "word":
        return shlex.quote(value)
    if ctx == "double":
        if spot.brace and "'" in value:
            return (
                'is inside "${...}", where bash pairs single quotes, and its value has one',
                f'set it first (v={{{name}}}), then write "${{X:-$v}}"',
            )
        out = value.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`").replace('"', '\\"')
        return out.replace("}", "\\}") if spot.brace else out
    if ctx == "single":
        return value.replace("'", "'\\''")
    if ctx == "ansi":
        return value.replace("\\", "\\\\").replace("'", "\\'")
    if ctx == "comment":
        return shlex.quote(value).replace("\n", "\n# ")
    if ctx in ("heredoc", "heredoc-quoted"):
        if "\n" in value:
            return (
                f"is in a here-document (<<{spot.delim}), and its value has a line break, "
                "which could end the here-document and run what follows",
                f"pass it through the environment instead (`- env: {name}={{{name}}}`, then ${name} in the "
                f"here-document), or write {{{name}:raw}} if you trust the value",
            )
        if ctx == "heredoc":
            return value.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")
        return value
    if ctx == "arith":
        return (
            "is in arithmetic ($(( )), (( )), an array index or a ${x:offset}), "
            "where bash runs the command substitutions inside a value, quoted or not",
            f"check it in the shell first (n={{{name}}}; [[ $n =~ ^[0-9]+$ ]] || exit 1), then use $n; "
            f"or write {{{name}:raw}} if you trust the value",
        )
    if ctx == "escaped":
        return (
            "comes right after a backslash, which would escape the first character of its quoting",
            f"remove the backslash (the value is quoted for you), "
            f"or write {{{{{name}}}}} for the literal text",
        )
    if ctx == "delimiter":
        return (
            "is in a here-document's delimiter (<<...), which must be known when the plan is read",
            "write the delimiter literally, e.g. <<'EOF'",
        )
    return ("stands where the shell body cannot be read", f"write {{{name}:raw}} if you trust the value")


def _early(index: int, delim: str) -> Refusal:
    return Refusal(
        index,
        f"makes its line of a here-document read {delim!r}, the here-document's delimiter, "
        "which would end it early and run the lines after it",
        "use a delimiter that no value can be, e.g. <<'MESH_EOF'",
    )


def fill(pieces: Sequence[str], holes: Sequence[Hole]) -> tuple[str, list[Refusal]]:
    """`pieces[0] + hole 0 + pieces[1] + ...`, each hole's value written for its place.

    A refused hole is written quoted as a word; the caller must not run the result then.
    """
    if len(pieces) != len(holes) + 1:
        raise ValueError("fill wants one more piece than holes")
    parts = [pieces[0]]
    marks: list[int] = []
    marked: list[int] = []  # the hole of each mark
    spans: list[tuple[int, int]] = []
    spanned: list[int] = []  # the hole of each span
    size = len(pieces[0])
    for n, hole in enumerate(holes):
        if hole.raw or is_plain(hole.value):
            if not hole.raw:
                spans.append((size, size + len(hole.value)))
                spanned.append(n)
            parts.append(hole.value)
            size += len(hole.value)
        else:
            marks.append(size)
            marked.append(n)
            parts.append(_STAND_IN)
            size += 1
        parts.append(pieces[n + 1])
        size += len(pieces[n + 1])
    text = "".join(parts)
    if not marks and not spans:
        return text, []
    if "<<" not in text and not marks:
        return text, []  # plain values, and no here-document they could end
    spots, balanced, early = _lex(text, tuple(marks), tuple(spans))
    refusals = [_early(spanned[k], delim) for k, delim in early]
    if not marks:
        return text, refusals
    for n in marked:
        if "\x00" in holes[n].value:
            refusals.append(Refusal(n, "has a NUL byte, which bash cannot take", "remove the NUL byte"))
    if not balanced:
        first = holes[marked[0]].name
        refusals.append(
            Refusal(
                marked[0],
                "is in a shell body whose quotes, $( ), ${ }, backquotes or case ... esac "
                "do not close, so where the value stands cannot be told",
                f"close them (bash -n checks a body), or write {{{first}:raw}} if you trust the value",
            )
        )
    written: dict[int, str] = {}
    for mark, n in zip(marks, marked, strict=True):
        spot = spots.get(mark, _Spot("unknown"))
        out = _quote(holes[n].value, spot, holes[n].name)
        if isinstance(out, tuple):
            refusals.append(Refusal(n, *out))
            out = shlex.quote(holes[n].value)
        written[mark] = out
    # a hole that makes its here-document line the delimiter would end the document there
    # (each line written once, however many holes it has)
    lines: dict[tuple[int, int], tuple[_Spot, list[int]]] = {}
    for mark, n in zip(marks, marked, strict=True):
        where = spots.get(mark)
        if where is None or not where.context.startswith("heredoc") or "\n" in holes[n].value:
            continue
        lines.setdefault(where.line, (where, []))[1].append(n)
    for (start, end), (where, on_line) in lines.items():
        line = "".join(written.get(k, text[k]) for k in range(start, end))
        if where.context == "heredoc":
            line = _joined(line)
        if (line.lstrip("\t") if where.tabs else line) == where.delim:
            refusals.extend(_early(n, where.delim) for n in on_line)
    out_parts: list[str] = []
    last = 0
    for mark in marks:
        out_parts.append(text[last:mark])
        out_parts.append(written[mark])
        last = mark + 1
    out_parts.append(text[last:])
    refusals.sort(key=lambda r: r.index)
    return "".join(out_parts), refusals
