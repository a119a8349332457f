"""Trace files for `llmqd simulate --trace` and ``--save-trace``: recorded traffic to replay.

One request per line, as JSON Lines (one object per line) or CSV (a header row naming the
columns, in any order). The fields, the same in both:

============== ======== ===================================================================
field          required meaning
============== ======== ===================================================================
arrival        yes      seconds from the start of the trace (>= 0; any order, replayed sorted)
priority       no       URGENT, HIGH, NORMAL, LOW (any case) or 0..3; default NORMAL
estimated      yes      the token estimate the dispatcher schedules by (a whole number >= 0)
actual         no       tokens the call really uses (default: the estimate)
tenant         no       who sent it (default: none)
deadline       no       seconds after its arrival it should be sent by (default: none)
============== ======== ===================================================================

In CSV an empty cell is a missing value; in JSON, null or an absent key. Any other column or
key is an error, so a misspelt name does not pass unnoticed. Errors name the file and line.
Floats are written with Python's shortest exact representation, so a saved trace replays to
the very same results.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .simulate import TraceRecord
from .types import Priority

__all__ = ["FIELDS", "TraceError", "read_trace", "write_trace"]

#: The columns of a trace, in the order ``write_trace`` writes them.
FIELDS = ("arrival", "priority", "estimated", "actual", "tenant", "deadline")
_REQUIRED = ("arrival", "estimated")


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


def _format(path: str | Path) -> str:
    return "csv" if str(path).lower().endswith(".csv") else "jsonl"


def read_trace(path: str | Path) -> list[TraceRecord]:
    """The requests of a trace file (CSV when the name ends in ``.csv``, else JSON Lines), sorted
    by arrival (stable). Raises `TraceError` on the first bad line, `OSError` if unreadable."""
    with open(path, encoding="utf-8", newline="") as stream:
        reader = _csv_rows if _format(path) == "csv" else _jsonl_rows
        rows = reader(stream, str(path))
        records = [_record(fields, f"{path}:{line}") for line, fields in rows]
    if not records:
        raise TraceError(f"{path}: no requests in the trace")
    records.sort(key=lambda record: record.arrival)
    return records


def _jsonl_rows(stream: IO[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise TraceError(f"{name}:{line}: not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise TraceError(f"{name}:{line}: expected a JSON object, got {type(value).__name__}")
        yield line, {key: item for key, item in value.items() if item is not None}


def _csv_rows(stream: IO[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(stream)
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            unknown = [column for column in header if column not in FIELDS]
            if unknown:
                raise TraceError(
                    f"{name}:{line}: unknown column {unknown[0]!r} (the header names the columns: "
                    f"{', '.join(FIELDS)})"
                )
            missing = [column for column in _REQUIRED if column not in header]
            if missing:
                raise TraceError(f"{name}:{line}: the header has no {missing[0]!r} column")
            continue
        if len(row) != len(header):
            raise TraceError(f"{name}:{line}: {len(row)} cells, the header has {len(header)}")
        yield line, {column: cell.strip() for column, cell in zip(header, row, strict=True) if cell.strip()}
    if header is None:
        raise TraceError(f"{name}: empty file (a CSV trace starts with a header row)")


def _record(fields: dict[str, Any], where: str) -> TraceRecord:
    unknown = [key for key in fields if key not in FIELDS]
    if unknown:
        raise TraceError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    for key in _REQUIRED:
        if key not in fields:
            raise TraceError(f"{where}: {key!r} is required")
    arrival = _seconds(fields["arrival"], "arrival", where)
    estimated = _tokens(fields["estimated"], "estimated", where)
    actual = _tokens(fields["actual"], "actual", where) if "actual" in fields else estimated
    deadline = _seconds(fields["deadline"], "deadline", where) if "deadline" in fields else None
    tenant = fields.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not tenant.strip()):
        raise TraceError(f"{where}: tenant must be a non-empty string, got {tenant!r}")
    return TraceRecord(arrival, _priority(fields.get("priority"), where), estimated, actual, tenant, deadline)


def _seconds(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool):
        raise TraceError(f"{where}: {name} must be seconds >= 0, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name} must be seconds >= 0, got {value!r}") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise TraceError(f"{where}: {name} must be seconds >= 0, got {value!r}")
    return seconds


def _tokens(value: Any, name: str, where: str) -> int:
    count: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and value.strip().isdigit()
    ):
        count = int(value)
    if count is None or count < 0:
        raise TraceError(f"{where}: {name} must be a whole number of tokens >= 0, got {value!r}")
    return count


def _priority(value: Any, where: str) -> Priority:
    if value is None:
        return Priority.NORMAL
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in Priority.__members__:
            return Priority[text.upper()]
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return Priority(value)
    raise TraceError(f"{where}: priority must be URGENT, HIGH, NORMAL, LOW or 0..3, got {value!r}")


def write_trace(path: str | Path, records: Iterable[TraceRecord]) -> int:
    """Writes ``records`` to ``path`` (CSV when the name ends in ``.csv``, else JSON Lines);
    returns how many."""
    with open(path, "w", encoding="utf-8", newline="") as stream:
        return _write(stream, records, _format(path))


def _write(stream: IO[str], records: Iterable[TraceRecord], kind: str) -> int:
    count = 0
    if kind == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(FIELDS)
        for record in records:
            writer.writerow(
                [
                    repr(record.arrival),
                    record.priority.name,
                    record.estimated_tokens,
                    record.actual_tokens,
                    record.tenant or "",
                    "" if record.deadline is None else repr(record.deadline),
                ]
            )
            count += 1
        return count
    for record in records:
        item: dict[str, Any] = {
            "arrival": record.arrival,
            "priority": record.priority.name,
            "estimated": record.estimated_tokens,
            "actual": record.actual_tokens,
        }
        if record.tenant is not None:
            item["tenant"] = record.tenant
        if record.deadline is not None:
            item["deadline"] = record.deadline
        stream.write(json.dumps(item) + "\n")
        count += 1
    return count


def dumps(records: Sequence[TraceRecord], kind: str = "jsonl") -> str:
    """The text `write_trace` would write (for tests and examples)."""
    buffer = io.StringIO()
    _write(buffer, records, kind)
    return buffer.getvalue()
