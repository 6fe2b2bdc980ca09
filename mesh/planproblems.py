"""The problems one reading of a plan finds, each with its line and a hint.

Every part of the parser reports into one `Report`; `mesh.plan` raises them
all at once as a `PlanError`. Suggestions ("did you mean ...?") are capped, so
that a broken plan of 10,000 tasks is neither a slow parse nor a wall of text.
"""

from __future__ import annotations

import difflib

from mesh.errors import Problem

# How many "did you mean" searches (and values a shell body could not take) to
# report at most: both are there to help a person.
MAX_SUGGESTIONS = 100


class Report:
    """The problems found so far, in the order found."""

    __slots__ = ("problems", "suggestions")

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.suggestions = 0

    def add(self, line: int, message: str, hint: str = "") -> None:
        self.problems.append(Problem(line, message, hint))

    def may_suggest(self) -> bool:
        self.suggestions += 1
        return self.suggestions <= MAX_SUGGESTIONS


def closest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word[:100], choices, n=1, cutoff=0.6)
    return found[0] if found else None
