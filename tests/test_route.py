"""Every message's subject: the one a reader checks it against is the one mesh publishes it to."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

import msgspec

from mesh import events
from mesh.bus.route import misplaced, route, subject_of
from mesh.names import Names

# what a required field of each name holds in the messages built here (any other string: "x")
TOKENS = {"plan_id": "p1", "task_id": "t1", "worker": "w1", "agent_id": "a1", "gpu": "0", "rid": "r1"}


def example(cls: type[msgspec.Struct]) -> Any:
    """A message of type `cls` with every required field filled in, nested ones too."""
    values: dict[str, Any] = {}
    for f in msgspec.structs.fields(cls):
        if f.required:
            values[f.name] = _value(f.name, f.type)
    return cls(**values)


def _value(name: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if kind is str:
        return TOKENS.get(name, "x")
    if kind is bool:
        return False
    if kind in (int, float):
        return kind(1)
    if origin is tuple:
        return ()
    if origin is typing.Literal:
        return typing.get_args(kind)[0]
    if origin in (typing.Union, types.UnionType):
        return _value(name, typing.get_args(kind)[0])
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return next(iter(kind))
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return example(kind)
    raise TypeError(f"no example value for {name}: {kind}")


def tagged() -> list[type[msgspec.Struct]]:
    """Every message type mesh publishes under a tag."""
    return [
        c
        for c in vars(events).values()
        if isinstance(c, type)
        and issubclass(c, msgspec.Struct)
        and c is not events.Msg
        and isinstance(getattr(c.__struct_config__, "tag", None), str)
    ]


def test_every_message_is_checked_against_the_subject_it_is_published_to() -> None:
    """`subject_of`, which every reader's check uses, names what `route` publishes to, for each
    type (a task's transitions are named without `route`, whose ids a check never needs); the
    same message on another task's subject is refused."""
    names = Names()
    kinds = tagged()
    for cls in kinds:
        msg = example(cls)
        subject, _ = route(names, msg)
        assert subject_of(names, msg) == subject, cls
        assert misplaced(names, subject, msg) == "", cls
        assert "belongs on" in misplaced(names, subject + "x", msg), cls
    tags = {events.type_of(example(c)) for c in kinds}
    assert {"task.released", "task.succeeded", "task.followups", "run.finished", "work"} <= tags
    assert len([t for t in tags if t.startswith("task.")]) >= 14
