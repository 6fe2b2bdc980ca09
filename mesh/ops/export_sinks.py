"""What `mesh export` writes: the record of one task attempt, the manifest of an export,
and the writers of the records (JSON Lines, or Parquet through pyarrow with its schema).

`mesh.ops.export` reads and joins the history into these records; every record has every
field, so a file of them loads as one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import msgspec

from mesh.errors import ExportError

PARQUET_BATCH = 5_000


# ------------------------------------------------------------------ records


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class Escalation(msgspec.Struct, kw_only=True):
    """What the gateway did with the attempt: Claude's answer, or why there was none."""

    answered: bool
    model: str = ""
    # the answer: a result, or follow-up tasks in plan format (None: withheld, sensitive)
    result: str | None = ""
    followups: str | None = ""
    # esc.failed: budget, sensitive, refused or error
    reason: str = ""
    error: str | None = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    # what the gateway redacted from the request before it left, by kind
    redacted: dict[str, int] = msgspec.field(default_factory=dict)


class Record(msgspec.Struct, kw_only=True):
    """One task attempt. Every record has every field (null where it does not apply), so the
    file loads as one table; `messages` is there in the chat format, `system` / `prompt` /
    `response` in the raw one."""

    id: str
    plan: str
    task: str
    attempt: int
    cls: str = msgspec.field(name="class")
    kind: str
    model: str
    outcome: str
    reason: str
    will_retry: bool
    sensitive: bool
    escalated: bool
    worker: str
    gpu: str
    started_at: float | None
    finished_at: float
    duration_s: float | None
    rc: int | None
    tokens_in: int | None
    tokens_out: int | None
    tokens_per_s: float | None
    ttft_s: float | None
    gpu_mem_peak_mb: float | None
    gpu_util_mean_pct: float | None
    metrics: dict[str, float]
    messages: list[ChatMessage] | msgspec.UnsetType = msgspec.UNSET
    system: str | msgspec.UnsetType | None = msgspec.UNSET
    prompt: str | msgspec.UnsetType | None = msgspec.UNSET
    response: str | msgspec.UnsetType | None = msgspec.UNSET
    body: str | None
    output: str | None
    error: str | None
    stderr_tail: str | None
    stdout_bytes: int
    stderr_bytes: int
    artifacts: list[str] | None
    escalation: Escalation | None
    # what was redacted from this record, by kind
    redacted: dict[str, int]
    # stream sequence of the attempt's final transition
    seq: int


class Manifest(msgspec.Struct, kw_only=True):
    """What an export read, wrote, dropped and redacted: `FILE.manifest.json`."""

    output: str
    format: str
    created_at: str
    filters: dict[str, str | None]
    stream: str
    # the events read (after the server's subject filter), by stream sequence and time
    first_seq: int = 0
    last_seq: int = 0
    first_at: str | None = None
    last_at: str | None = None
    events_read: int = 0
    undecodable: int = 0
    records: int = 0
    # class -> outcome -> records written
    counts: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    # kind -> matches replaced in the records written
    redacted: dict[str, int] = msgspec.field(default_factory=dict)
    duplicates_dropped: int = 0
    sensitive_metadata_only: int = 0
    # reports of sensitive attempts that carried a prompt or output anyway (never exported)
    sensitive_leaks_in_history: int = 0
    outputs_fetched: int = 0
    # output objects named by a report but gone from the store (its head from the event is used)
    outputs_missing: int = 0
    filtered_out: int = 0
    # cancelled or failed by a dependency before an attempt ever ran: no record
    never_ran: int = 0
    # attempts not final when the window ended (running, or reports without a transition)
    unfinished: int = 0
    late_reports: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0


# ------------------------------------------------------------------ output files


class Sink:
    def write(self, record: Record, encoder: msgspec.json.Encoder) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class JsonlSink(Sink):
    """One JSON object per line, UTF-8: what pandas' `read_json(lines=True)` and `datasets`'
    json loader read as they are."""

    def __init__(self, path: Path) -> None:
        self.fh: IO[bytes] = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()/abort()

    def write(self, record: Record, encoder: msgspec.json.Encoder) -> None:
        self.fh.write(encoder.encode(record))
        self.fh.write(b"\n")

    def close(self) -> None:
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


class ParquetSink(Sink):
    """Parquet through pyarrow (not a dependency of mesh), written a row group at a time."""

    def __init__(self, path: Path, fmt: str) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ExportError(
                "Parquet output needs pyarrow, which mesh does not install: `pip install pyarrow` "
                "in mesh's environment, or write FILE.jsonl instead"
            ) from None
        self.pa = pa
        self.schema = _arrow_schema(pa, fmt)
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.rows: list[Any] = []

    def write(self, record: Record, encoder: msgspec.json.Encoder) -> None:
        row = msgspec.to_builtins(record)
        row["metrics"] = sorted(row["metrics"].items())
        for name in ("redacted",):
            row[name] = sorted(row[name].items())
        if row.get("escalation") is not None:
            row["escalation"]["redacted"] = sorted(row["escalation"]["redacted"].items())
        self.rows.append(row)
        if len(self.rows) >= PARQUET_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def abort(self) -> None:
        self.rows = []
        self.writer.close()


def _arrow_schema(pa: Any, fmt: str) -> Any:
    """The arrow schema of `Record` (maps for the dicts, so every row group has one schema)."""
    counts = pa.map_(pa.string(), pa.int64())
    fields = [
        ("id", pa.string()),
        ("plan", pa.string()),
        ("task", pa.string()),
        ("attempt", pa.int64()),
        ("class", pa.string()),
        ("kind", pa.string()),
        ("model", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("will_retry", pa.bool_()),
        ("sensitive", pa.bool_()),
        ("escalated", pa.bool_()),
        ("worker", pa.string()),
        ("gpu", pa.string()),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
        ("duration_s", pa.float64()),
        ("rc", pa.int64()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("tokens_per_s", pa.float64()),
        ("ttft_s", pa.float64()),
        ("gpu_mem_peak_mb", pa.float64()),
        ("gpu_util_mean_pct", pa.float64()),
        ("metrics", pa.map_(pa.string(), pa.float64())),
    ]
    if fmt == "chat":
        fields.append(("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
    else:
        fields += [("system", pa.string()), ("prompt", pa.string()), ("response", pa.string())]
    escalation = pa.struct(
        [
            ("answered", pa.bool_()),
            ("model", pa.string()),
            ("result", pa.string()),
            ("followups", pa.string()),
            ("reason", pa.string()),
            ("error", pa.string()),
            ("tokens_in", pa.int64()),
            ("tokens_out", pa.int64()),
            ("cost_usd", pa.float64()),
            ("duration_s", pa.float64()),
            ("redacted", counts),
        ]
    )
    fields += [
        ("body", pa.string()),
        ("output", pa.string()),
        ("error", pa.string()),
        ("stderr_tail", pa.string()),
        ("stdout_bytes", pa.int64()),
        ("stderr_bytes", pa.int64()),
        ("artifacts", pa.list_(pa.string())),
        ("escalation", escalation),
        ("redacted", counts),
        ("seq", pa.int64()),
    ]
    return pa.schema(fields)
