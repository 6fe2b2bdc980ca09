"""Make a plan's tasks: one record per task or foreach expansion, then its dependency graph.

`TaskBuilder` checks the task ids (valid, unique, and unique among the
expansions of foreach tasks) and the plan's bound on tasks, resolves each
`depends_on` and `inputs` name to the task ids it stands for, and reports every
dependency cycle; each check runs in linear time.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.planfields import FieldReader, Record
from mesh.planproblems import Report, closest
from mesh.planscan import RawTask
from mesh.plantemplate import Bound, Expander
from mesh.validate import ID_RE
from mesh.validate import show as _show

# How many cycles to report at most: a broken 10,000-task plan is not a wall of text.
_MAX_CYCLES = 50

_ID_HINT = (
    "a task id may use only letters, digits, '_' and '-' (it becomes a NATS subject token), "
    "e.g. '### fetch-data'"
)


class TaskBuilder:
    """The records of a plan's tasks, their fields read by `fields`, within `max_tasks` tasks."""

    def __init__(self, report: Report, expander: Expander, fields: FieldReader, max_tasks: int) -> None:
        self.report = report
        self.expander = expander
        self.fields = fields
        self.max_tasks = max_tasks

    def tasks(
        self, raw_tasks: list[RawTask], variables: dict[str, str], plan_env: dict[str, str]
    ) -> list[Record]:
        """One record per task or foreach expansion, in the plan's order, dependencies resolved."""
        records: list[Record] = []
        # Every name a dependency may use: a task id, or a foreach task's id
        # (meaning all its expansions), or one expansion's id.
        targets: dict[str, list[str]] = {}
        owner: dict[str, str] = {}  # name -> what defines it, for duplicate messages
        max_tasks = self.max_tasks
        if len(raw_tasks) > max_tasks:
            self.report.add(
                raw_tasks[max_tasks].line,
                f"the plan has {len(raw_tasks):,} tasks, more than the limit of {max_tasks:,}",
                "split it into several plans, or raise the setting plan_max_tasks",
            )
            return records
        # every task carries the plan's environment: its size counts once per task
        env_size = sum(len(k) + len(v) for k, v in plan_env.items())
        for task in raw_tasks:
            if self.expander.over:
                break
            if not task.id:
                self.report.add(task.line, "task heading has no id", _ID_HINT)
            elif not ID_RE.fullmatch(task.id):
                self.report.add(
                    task.line, f"task id {_show(task.id)} has characters that are not allowed", _ID_HINT
                )
            what = f"task at line {task.line}"
            if task.id in owner:
                self.report.add(
                    task.line,
                    f"task id '{task.id}' at line {task.line} is already used by the {owner[task.id]}",
                    "give each task its own id",
                )
            body = self.fields.body(task)
            expansions: list[tuple[str, Mapping[str, str]]]
            dry: list[tuple[str, Mapping[str, str]]]
            if "foreach" in task.fields:
                line, spec = task.fields["foreach"]
                name, items = self.expander.foreach(task, line, spec, variables)
                if name is None:
                    expansions, dry = [], [(task.id, variables)]
                else:
                    expansions = [
                        (f"{task.id}-{n}", Bound(name, item, variables)) for n, item in enumerate(items, 1)
                    ]
                    dry = [(task.id, Bound(name, "", variables))] if not items else []
                names = [eid for eid, _ in expansions]
                if task.id not in owner:
                    owner[task.id] = what
                    targets[task.id] = names
                for eid in names:
                    if eid in owner:
                        self.report.add(
                            task.line,
                            f"foreach task '{task.id}' expands to '{eid}', "
                            f"which is already the id of the {owner[eid]}",
                            "rename one of the two tasks",
                        )
                    else:
                        owner[eid] = f"expansion of foreach task '{task.id}' (line {task.line})"
                        targets[eid] = [eid]
            else:
                expansions, dry = [(task.id, variables)], []
                if task.id not in owner:
                    owner[task.id] = what
                    targets[task.id] = [task.id]
            if len(records) + len(expansions) > max_tasks:
                self.report.add(
                    task.line,
                    f"the plan has more than {max_tasks:,} tasks once its foreach tasks are expanded "
                    f"(task '{task.id}' makes {len(expansions):,}, after {len(records):,} before it)",
                    "split it into several plans, or raise the setting plan_max_tasks",
                )
                self.expander.over = True
                break
            for eid, values in expansions:
                if self.expander.over:
                    break
                r = self.fields.record(task, eid, values, body, plan_env)
                records.append(r)
                size = len(r.body) + env_size
                if "env" in task.fields:
                    size += sum(len(k) + len(v) for k, v in r.env.items())
                self.expander.spent += size
                if self.expander.spent > self.expander.max_bytes:
                    self.expander.room(task.line, 0)
            for eid, values in dry:  # check the fields of a task whose foreach is broken
                self.fields.record(task, eid, values, body, plan_env)
        self._resolve(records, targets)
        return records

    # ------------------------------------------------------------ dependencies

    def _resolve(self, records: list[Record], targets: dict[str, list[str]]) -> None:
        for r in records:
            if r.deps:
                out: list[str] = []
                for dep in r.deps:
                    found = self._target(r, dep, r.deps_line, targets, "depends on", "depends_on")
                    if found is not None:
                        out.extend(found)
                r.resolved = tuple(dict.fromkeys(out))
            if r.inputs or r.body_inputs:
                self._resolve_inputs(r, targets)

    def _target(
        self, r: Record, name: str, line: int, targets: dict[str, list[str]], verb: str, field: str
    ) -> list[str] | None:
        """The task ids `name` stands for in a list field of `r`, or None (reported) if none."""
        found = targets.get(name)
        if found is None:
            message = f"task '{r.base}' {verb} unknown task {_show(name)}"
            if self.report.may_suggest():
                near = closest(name, list(targets))
                if near:
                    message += f"; did you mean '{near}'?"
            self.report.add(
                line, message, f"{field} lists task ids (the '### <id>' headings), separated by commas"
            )
            return None
        if name == r.base or name == r.id:
            self.report.add(line, f"task '{r.base}' {verb} itself", f"remove '{name}' from its {field}")
            return None
        return found

    def _resolve_inputs(self, r: Record, targets: dict[str, list[str]]) -> None:
        """Resolve `inputs` (and an embed body's `input:` lines) like depends_on; each must be in it."""
        deps = set(r.resolved)

        def resolve(name: str, line: int) -> list[str]:
            found = self._target(r, name, line, targets, "takes the output of", "inputs")
            if found is None:
                return []
            if not deps.issuperset(found):
                self.report.add(
                    line,
                    f"task '{r.base}' takes the output of '{name}', which is not in its depends_on",
                    f"add '{name}' to depends_on: a task can take only the outputs of tasks it waits for",
                )
            return found

        field_ids = {name: resolve(name, r.inputs_line) for name in r.inputs}
        if r.kind != "embed":
            r.resolved_inputs = tuple(dict.fromkeys(i for ids in field_ids.values() for i in ids))
            return
        body_ids = {name: resolve(name, line) for line, name in r.body_inputs}
        used = {i for ids in body_ids.values() for i in ids}
        for name, ids in field_ids.items():
            if ids and not used.issuperset(ids):
                self.report.add(
                    r.inputs_line,
                    f"task '{r.base}' lists '{name}' in inputs, "
                    f"but its embed body has no 'input: {name}' line",
                    f"add a line 'input: {name}' to the body to embed that task's output, "
                    "or remove it from inputs",
                )
        r.resolved_inputs = tuple(dict.fromkeys(i for ids in body_ids.values() for i in ids))
        # An 'input:' line naming a foreach task stands for each of its expansions.
        many = {name: ids for name, ids in body_ids.items() if ids and ids != [name]}
        if many:
            lines: list[str] = []
            for text in r.body.split("\n"):
                name = text[len("input: ") :] if text.startswith("input: ") else ""
                if name in many:
                    lines.extend(f"input: {i}" for i in many[name])
                else:
                    lines.append(text)
            r.body = "\n".join(lines)

    def cycles(self, records: list[Record]) -> None:
        """Report each cycle an iterative depth-first search finds (one per back edge)."""
        index: dict[str, int] = {}
        for i, r in enumerate(records):
            index.setdefault(r.id, i)
        adj = [[index[d] for d in r.resolved if d in index] for r in records]
        state = [0] * len(records)  # 0 new, 1 on the current path, 2 done
        where = [0] * len(records)  # position on the path, while state is 1
        cycles: dict[tuple[int, ...], None] = {}
        for start in range(len(records)):
            if state[start]:
                continue
            path = [start]
            edge = [0]
            state[start] = 1
            while path:
                node = path[-1]
                k = edge[-1]
                if k < len(adj[node]):
                    edge[-1] = k + 1
                    nxt = adj[node][k]
                    if state[nxt] == 0:
                        state[nxt] = 1
                        where[nxt] = len(path)
                        path.append(nxt)
                        edge.append(0)
                    elif state[nxt] == 1:
                        cycle = path[where[nxt] :]  # a list of indices
                        first = cycle.index(min(cycle))
                        cycles[(*cycle[first:], *cycle[:first])] = None
                else:
                    state[node] = 2
                    path.pop()
                    edge.pop()
        for n, ring in enumerate(cycles):
            if n == _MAX_CYCLES:
                self.report.add(
                    records[ring[0]].line,
                    f"{len(cycles) - _MAX_CYCLES} more dependency cycles are not shown",
                    "fix the cycles above and check again",
                )
                break
            # Edges point from a task to what it depends on; show them that way.
            ids = [records[i].id for i in ring]
            self.report.add(
                records[ring[0]].line,
                "dependency cycle: " + " -> ".join([*ids, ids[0]]),
                "each task in it waits for the next; remove one of these depends_on entries",
            )
