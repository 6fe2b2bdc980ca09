"""mesh's errors. Each names what is wrong and what to do about it.

A specific error also inherits the general one, so callers catch what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass


class MeshError(Exception):
    """Base of every error mesh raises on purpose. Its text is fit for a user."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan, at a line of its file."""

    line: int
    message: str
    hint: str = ""

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        text = f"{where}: {self.message}"
        if self.hint:
            text += f"\n    {self.hint}"
        return text


class PlanError(MeshError):
    """A plan that cannot be submitted. Holds every problem found, in line order."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = sorted(problems, key=lambda p: p.line)
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"plan {self.source} has {count} problem{'s' if count != 1 else ''}; nothing was submitted"
        return "\n".join([head, *(p.render(self.source) for p in self.problems)])


class ConfigError(MeshError):
    """A configuration file or setting that mesh cannot use."""


class ServerUnavailable(MeshError):
    """The NATS server cannot be reached."""


class ServerRefused(ServerUnavailable):
    """The NATS server answered and refused this client: its credentials, or a certificate the
    client does not trust. Starting a server is not the remedy; the setting it names is."""


class NotFound(MeshError):
    """A plan, task or resource that does not exist."""


class BadName(MeshError, ValueError):
    """An id that cannot be one (a plan or task id with a space, a '.'): a `ValueError` too."""


class NothingToDo(MeshError):
    """A request that would change nothing (cancel a finished plan, retry one that failed nothing)."""


class ExportError(MeshError):
    """An export that cannot be made as asked (a bad option, an output path mesh cannot write)."""
