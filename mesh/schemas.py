"""The JSON Schema of a task's answer: checking a schema, and checking an answer against it.

A prompt or chat task with `- schema:` gets its answer generated to the schema (the executor
turns it into a llama.cpp grammar) and checked against it here by the worker: an answer that is
not JSON, or not valid against the schema, is a failed attempt whose error says why. The plan
parser and `mesh.validate` check the schema itself with `schema_problem`, so that a schema that
is not valid JSON Schema is refused when the plan is submitted.

Validation is the `jsonschema` package's (the reference implementation for Python, every draft
from 3 to 2020-12; a schema without `$schema` is read as 2020-12). It resolves no remote `$ref`:
nothing here reads a file or the network. `ReadFile` is the port through which the parser reads
a schema file (`mesh.host.planfiles` gives one for a plan file on disk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import msgspec

# reads a schema file named in a plan (its path as written), or raises FileRefused
ReadFile = Callable[[str], str]
SCHEMA_HINT = (
    "write '- schema: FILE.json' (a JSON Schema file, relative to the plan file) or the schema "
    'inline, e.g. \'- schema: {"type": "object", "properties": {"answer": {"type": "string"}}}\''
)


class FileRefused(Exception):
    """A schema file that cannot be read for a plan: `why` it cannot, and what to do."""

    def __init__(self, why: str, hint: str) -> None:
        super().__init__(why)
        self.why = why
        self.hint = hint


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return f" at {'/'.join(parts)}" if parts else ""


def load_schema(text: str) -> tuple[Any, str]:
    """(the schema, '') when `text` is a valid JSON Schema (a JSON object), else (None, why)."""
    try:
        schema = msgspec.json.decode(text.encode("utf-8"))
    except (msgspec.DecodeError, UnicodeEncodeError) as exc:
        return None, f"the schema is not JSON: {exc}"
    if not isinstance(schema, dict):
        return None, f"the schema is a JSON {type(schema).__name__}, not an object"
    from jsonschema.exceptions import SchemaError

    validator = _validator_class(schema)
    if validator is None:
        return None, (
            f"the schema's $schema {schema['$schema']!r} is not a JSON Schema draft "
            "(leave it out for draft 2020-12)"
        )
    outside = _outside_ref(schema)
    if outside:
        return None, (
            f"the schema's $ref {outside!r} points outside it, and nothing else is read: "
            "put the definition under $defs and write '#/$defs/NAME'"
        )
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        return None, f"the schema is not valid JSON Schema: {exc.message}{_where(exc.absolute_path)}"
    return schema, ""


def _validator_class(schema: dict[str, Any]) -> Any:
    """The validator of the schema's draft (2020-12 without `$schema`); None for an unknown one."""
    from jsonschema.validators import Draft202012Validator, validator_for

    if "$schema" not in schema:
        return Draft202012Validator
    # with a default given, an unknown draft gives it (None) rather than a warning and the latest
    return validator_for(schema, default=cast(Any, None))


def _outside_ref(node: Any) -> str:
    """The first `$ref` that does not point inside the schema ('' when none does)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return ref
        return next((r for r in map(_outside_ref, node.values()) if r), "")
    if isinstance(node, list):
        return next((r for r in map(_outside_ref, node) if r), "")
    return ""


def schema_problem(text: str) -> str:
    """Why `text` cannot be a task's schema ('' when it can)."""
    return load_schema(text)[1]


def canonical(schema: Any) -> str:
    """The schema as the JSON text a task spec carries (compact, keys in their order)."""
    return msgspec.json.encode(schema).decode("utf-8")


def check_answer(text: str, schema_text: str) -> tuple[Any, str]:
    """(the parsed answer, '') when `text` is JSON valid against the schema; else (None, why)."""
    schema, problem = load_schema(schema_text)
    if problem:
        return None, problem
    try:
        value = msgspec.json.decode(text.strip().encode("utf-8"))
    except (msgspec.DecodeError, UnicodeEncodeError) as exc:
        return None, f"the answer is not JSON: {exc}"
    from jsonschema.exceptions import best_match

    validator = _validator_class(schema)(schema)
    try:
        error = best_match(validator.iter_errors(value))
    except Exception as exc:  # a $ref it cannot resolve, a regex it cannot compile
        return None, f"the answer could not be checked against the schema: {type(exc).__name__}: {exc}"
    if error is not None:
        return (
            None,
            f"the answer is not valid against the schema: {error.message}{_where(error.absolute_path)}",
        )
    return value, ""
