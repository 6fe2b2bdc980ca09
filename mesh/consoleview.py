"""The web console's decisions as data: a plan's DAG laid out in layers, the task status an event
stands for, which live topic an event belongs to, and who may do what.

No I/O: `agents/web*.py` reads the bus and serves HTTP; what it shows is decided here, where the
tests can reach it without a server.

The layout is a layered drawing (the Sugiyama family, in its simplest useful form): a task's layer
is the length of the longest chain of dependencies under it, so every edge points down; within a
layer tasks are ordered by the mean position of their dependencies (one downward pass of the
barycentre heuristic), ties by plan order. It is O(tasks + edges) plus a sort per layer, so a
100,000-task plan is laid out once in well under a second, and the page draws only a window of it.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.status import TaskStatus

# the task status each task event leaves its task in (what the brain's `evolve` sets), for the
# live colours; an event not here changes no colour (a page load reads the records themselves)
STATUS_OF_EVENT: dict[str, str] = {
    "task.waiting": TaskStatus.WAITING,
    "task.released": TaskStatus.READY,
    "task.started": TaskStatus.RUNNING,
    "task.redelivered": TaskStatus.RUNNING,
    "task.succeeded": TaskStatus.SUCCEEDED,
    "task.retrying": TaskStatus.WAITING,
    "task.failed": TaskStatus.FAILED,
    "task.cancelled": TaskStatus.CANCELLED,
    "task.reset": TaskStatus.PENDING,
    "task.escalated": TaskStatus.ESCALATING,
    "task.climbed": TaskStatus.WAITING,
    "task.reviewing": TaskStatus.READY,
}
# events after which a plan's task list itself changed (tasks added): a cached view is rebuilt
RESHAPING_EVENTS = frozenset({"plan.tasks", "task.followups"})


@dataclass
class Layout:
    """Where each task of a plan is drawn: its layer (row) and position in the layer (column)."""

    layer: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    # the tasks of each layer, in drawing order (indices into the plan's task list)
    rows: list[list[int]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return max((len(r) for r in self.rows), default=0)


def layout(deps: Sequence[Sequence[int]]) -> Layout:
    """Lay out a DAG given, for each task (by index), the indices of the tasks it depends on.
    A dependency on an unknown index is ignored; a cycle (which validation refuses) puts the
    tasks in it on the layer after the deepest one reached."""
    n = len(deps)
    children: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    clean: list[list[int]] = []
    for i, ds in enumerate(deps):
        own = sorted({d for d in ds if 0 <= d < n and d != i})
        clean.append(own)
        indegree[i] = len(own)
        for d in own:
            children[d].append(i)
    layer = [0] * n
    ready = [i for i in range(n) if indegree[i] == 0]
    seen = 0
    head = 0
    while head < len(ready):
        i = ready[head]
        head += 1
        seen += 1
        for c in children[i]:
            layer[c] = max(layer[c], layer[i] + 1)
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if seen < n:  # a cycle: its tasks below everything else
        deepest = max(layer, default=0) + 1
        for i in range(n):
            if indegree[i] > 0:
                layer[i] = deepest
    rows: list[list[int]] = [[] for _ in range(max(layer, default=-1) + 1)]
    for i in range(n):
        rows[layer[i]].append(i)
    pos = [0] * n
    for r, row in enumerate(rows):
        if r:
            row.sort(key=lambda i: (_barycentre(clean[i], pos, i), i))
        for p, i in enumerate(row):
            pos[i] = p
    return Layout(layer=layer, pos=pos, rows=rows)


def _barycentre(parents: list[int], pos: list[int], own: int) -> float:
    if not parents:
        return float(own)
    return sum(pos[p] for p in parents) / len(parents)


def window(lay: Layout, row0: int, rows: int, col0: int, cols: int) -> list[int]:
    """The tasks drawn in a window of the layout: `rows` layers from `row0`, `cols` positions
    from `col0` in each."""
    out: list[int] = []
    for row in lay.rows[max(0, row0) : max(0, row0) + max(0, rows)]:
        out += row[max(0, col0) : max(0, col0) + max(0, cols)]
    return out


# ------------------------------------------------------------------ who may do what

VIEWER = "viewer"
OPERATOR = "operator"


def is_loopback(host: str) -> bool:
    """Whether an address to bind is this machine alone (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_problem(host: str, operator_token: str, read_token: str) -> str:
    """Why the console may not serve on `host` with these tokens ('' : it may)."""
    if not is_loopback(host) and not operator_token:
        return (
            f"web_host {host!r} is reachable from other machines: set web_token (an operator token; "
            "`mesh init --secure` writes one) or serve on 127.0.0.1"
        )
    for name, token in (("web_token", operator_token), ("web_read_token", read_token)):
        if token and len(token) < 16:
            return f"{name} is too short to be a secret: use at least 16 characters"
    if operator_token and operator_token == read_token:
        return "web_token and web_read_token are the same: give the read-only token its own value"
    return ""


def host_allowed(host_header: str, operator_token: str, read_token: str) -> bool:
    """Whether a request naming this `Host` may be answered. With no tokens (loopback only) it
    must name this machine: a page elsewhere whose name was made to resolve to 127.0.0.1 (DNS
    rebinding) would otherwise act as its visitor's operator. With tokens, the token decides."""
    if operator_token or read_token:
        return True
    name = host_header.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return bool(name) and is_loopback(name)


def role_of(presented: str, operator_token: str, read_token: str) -> str | None:
    """The role a presented token grants: operator, viewer, or None (refused). With no tokens
    configured (loopback only, `bind_problem`) everyone is an operator."""
    if not operator_token and not read_token:
        return OPERATOR
    if not presented:
        return None
    given = presented.encode()
    if operator_token and hmac.compare_digest(given, operator_token.encode()):
        return OPERATOR
    if read_token and hmac.compare_digest(given, read_token.encode()):
        return VIEWER
    return None


# ------------------------------------------------------------------ what a sensitive task shows

# the fields of an event or a task record that may carry what a sensitive task saw or made (its
# output, its prompt, Claude's answer or follow-ups, a reviewer's answer, its inputs, what a
# failed attempt printed): `mesh output` withholds them, and so does the console
SENSITIVE_FIELDS = frozenset(
    {"output", "stdout_tail", "stderr_tail", "prompt", "system", "result", "followups", "answer", "inputs"}
)
WITHHELD = "(withheld: sensitive)"


def withhold(item: dict[str, Any]) -> dict[str, Any]:
    """An event or record (as builtins) with what a sensitive task saw or made withheld, in it
    and in the attempts it carries (`attempts`, `review_of`, an escalation's `task` env)."""
    out: dict[str, Any] = {}
    for key, value in item.items():
        if key in SENSITIVE_FIELDS and value and not (key == "inputs" and isinstance(value, (list, tuple))):
            out[key] = WITHHELD  # (a task spec's `inputs` names its dependencies: kept)
        elif key in ("attempts", "review_of") and value:
            many = isinstance(value, (list, tuple))
            out[key] = [withhold(a) for a in value] if many else withhold(value)
        elif key == "env" and isinstance(value, dict):
            out[key] = {k: "(withheld)" for k in value}
        elif key in ("spec", "task") and isinstance(value, dict):
            out[key] = withhold(value)
        else:
            out[key] = value
    return out
