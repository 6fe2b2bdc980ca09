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
from typing import Any

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
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return None, f"the schema is not valid JSON Schema: {exc.message}{_where(exc.absolute_path)}"
    return schema, ""


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
    from jsonschema.validators import validator_for

    validator = validator_for(schema)(schema)
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
