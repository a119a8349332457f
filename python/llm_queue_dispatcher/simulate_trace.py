"""Traces for `llmqd simulate --trace` and ``--save-trace``: recorded traffic to replay.

One file past 700 lines: the four formats share the reading rules (headers, timestamps, the
errors naming a line) and the conversion to one request type.

Four formats are read, recognised by their header (CSV) or keys (JSON Lines), whatever the file
is called:

* **llmqd**, the project's own (CSV or JSON Lines; `write_trace` writes it): one request per
  line with the fields below. Any other column or key is an error, so a misspelt name does not
  pass unnoticed.
* **Azure**: the Azure LLM inference trace CSV as published, ``TIMESTAMP,ContextTokens,
  GeneratedTokens`` (a date with up to 7 decimals of seconds, in UTC or with its UTC offset as
  in the 2024 edition; the prompt; the completion).
* **BurstGPT**: the BurstGPT CSV as published, ``Timestamp,Model,Request tokens,Response
  tokens,Total tokens,Log Type`` (seconds; ``Request tokens`` the prompt, ``Response tokens``
  the completion; the other columns are there for the rules).
* **Mooncake**: the Mooncake JSON Lines as published, ``{"timestamp": ms, "input_length": ...,
  "output_length": ..., "hash_ids": [...]}`` (milliseconds; the prompt; the completion; other
  keys are there for the rules).

The published formats keep the prompt and the completion apart (`TraceRecord.output_tokens`)
and carry no priority, tenant or estimate: `TraceRules` says how to assign them, and
`assemble_trace` merges one or more files on their timestamps into a workload.

The project's fields, the same in CSV and JSON:

============== ======== ===================================================================
field          required meaning
============== ======== ===================================================================
arrival        yes      seconds from the start of the trace (>= 0; any order, replayed sorted)
priority       no       URGENT, HIGH, NORMAL, LOW (any case) or 0..3; default NORMAL
estimated      yes      the token estimate the dispatcher schedules by (a whole number >= 0)
actual         no       tokens the call really uses (default: the estimate)
output         no       the completion's share of ``actual`` (default: not known)
tenant         no       who sent it (default: none)
deadline       no       seconds after its arrival it should be sent by (default: none)
============== ======== ===================================================================

In CSV an empty cell is a missing value; in JSON, null or an absent key. Floats are written with
Python's shortest exact representation, so a saved trace replays to the very same results.

Every file is read as bytes a line at a time: a line that is not UTF-8, longer than
`MAX_LINE_BYTES`, or holds a bad value, and a file of more than `MAX_REQUESTS` requests, raise
`TraceError` naming the file and the line, before anything runs.

One file, over 700 lines, because reading and assembling share what a row is (`TraceRow`, its
file and line for every message) and the format table above: the readers of four formats, the
rules that complete their rows, and the writer of the project's format, each a few functions.

About 770 lines for one concept, a trace: each format's reader is short, and they share the
value checks, the rules that assign priorities and tenants (`TraceRules`) and the writer.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from .simulate_workload import MAX_REQUESTS, MAX_SECONDS, MAX_TOKENS, TraceRecord, cumulative_shares
from .types import Priority

__all__ = [
    "FIELDS",
    "FORMATS",
    "MAX_LINE_BYTES",
    "TraceError",
    "TraceFile",
    "TraceRow",
    "TraceRules",
    "TraceWorkload",
    "assemble_trace",
    "read_trace",
    "read_trace_file",
    "write_trace",
]

#: The columns of the project's format, in the order ``write_trace`` writes them.
FIELDS = ("arrival", "priority", "estimated", "actual", "output", "tenant", "deadline")
_REQUIRED = ("arrival", "estimated")

#: The formats `read_trace_file` reads (``auto``: recognised by the header or the keys).
FORMATS = ("llmqd", "azure", "burstgpt", "mooncake")

#: The longest line a trace may hold (a Mooncake line with its block hashes is a few kB).
MAX_LINE_BYTES = 1 << 20

_NAMES = {
    "llmqd": "the project's trace format",
    "azure": "the Azure LLM inference trace (TIMESTAMP,ContextTokens,GeneratedTokens)",
    "burstgpt": "the BurstGPT trace (Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type)",
    "mooncake": 'the Mooncake trace ({"timestamp", "input_length", "output_length"})',
}

# (time, prompt, completion) columns of each published format.
_PUBLISHED = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
    "mooncake": ("timestamp", "input_length", "output_length"),
}

# Columns that give a published format away even when others are missing (for the message).
_SIGNS = {
    "azure": {"TIMESTAMP", "ContextTokens", "GeneratedTokens"},
    "burstgpt": {"Timestamp", "Request tokens", "Response tokens", "Total tokens", "Log Type"},
    "mooncake": {"timestamp", "input_length", "output_length", "hash_ids"},
}


class TraceError(ValueError):
    """A trace that cannot be read or assembled; the message names the file and the line."""


class TraceRow(NamedTuple):
    """One request as a file holds it, before `assemble_trace` gives it what the file lacks."""

    time: float  # seconds on the file's clock (dated files: since midnight of `TraceFile.day`)
    actual: int  # prompt + completion
    output: int | None  # the completion, when known
    estimated: int | None  # the project's format only
    priority: Priority | None
    tenant: str | None
    deadline: float | None
    columns: tuple[str | None, ...]  # the values of the columns asked for, None when missing
    line: int


@dataclass
class TraceFile:
    """What one trace file holds: its rows in file order, and how its clock reads."""

    path: str
    label: str
    format: str
    day: int | None  # dated files (Azure): the day (since 1970-01-01) the times count from
    rows: list[TraceRow]
    columns: tuple[str, ...] = ()

    @property
    def dated(self) -> bool:
        """Whether the timestamps are dates (Azure), not seconds from the trace's start."""
        return self.day is not None


# -- reading -------------------------------------------------------------------------------------
def read_trace(path: str | Path) -> list[TraceRecord]:
    """The requests of a trace file in any format, sorted by arrival (stable), with the default
    `TraceRules` (no URGENT share, NORMAL, no tenant, estimates = the actual tokens). Raises
    `TraceError` on the first bad line, `OSError` if unreadable."""
    return assemble_trace([read_trace_file(path)], TraceRules()).records


def read_trace_file(
    path: str | Path,
    *,
    label: str | None = None,
    format: Literal["auto", "llmqd", "azure", "burstgpt", "mooncake"] = "auto",
    columns: Sequence[str] = (),
) -> TraceFile:
    """Reads one trace file. ``label`` names it in rules and as a tenant (default: the file's
    stem); ``format`` forces one (default: recognised); ``columns`` are the columns (CSV) or keys
    (JSON) of a published format to keep for the rules. Raises `TraceError` naming the file and
    the line, `OSError` if unreadable."""
    name = str(path)
    if format != "auto" and format not in FORMATS:
        raise TraceError(f"{name}: unknown trace format {format!r} (formats: {', '.join(FORMATS)})")
    with open(path, "rb") as stream:
        lines = _Lines(stream, name)
        first = lines.peek()
        if first is None:
            raise TraceError(f"{name}: empty file")
        reader = _read_jsonl if first.lstrip().startswith("{") else _read_csv
        kind, day, rows = reader(lines, name, format, tuple(columns))
    if not rows:
        raise TraceError(f"{name}: no requests in the trace")
    return TraceFile(name, label if label is not None else Path(name).stem, kind, day, rows, tuple(columns))


class _Lines:
    """The lines of a binary stream as text, numbered from 1, each checked for its length and
    its encoding (a byte-order mark at the start is dropped)."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self._stream = stream
        self._name = name
        self.number = 0
        self._peeked: str | None = None

    def _read(self) -> str | None:
        raw = self._stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return None
        self.number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise TraceError(f"{self._name}:{self.number}: line longer than {MAX_LINE_BYTES:,} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = raw[error.start]
            raise TraceError(
                f"{self._name}:{self.number}: not UTF-8 text (byte {error.start + 1} is 0x{byte:02x})"
            ) from None
        return text.removeprefix("\ufeff") if self.number == 1 else text

    def peek(self) -> str | None:
        """The first line that is not blank (kept for the reader), or None: the file is empty."""
        while self._peeked is None:
            text = self._read()
            if text is None:
                return None
            if text.strip():
                self._peeked = text
        return self._peeked

    def __iter__(self) -> Iterator[str]:
        peeked, self._peeked = self._peeked, None
        if peeked is not None:
            yield peeked
        while (text := self._read()) is not None:
            yield text


_Rows = tuple[str, "int | None", list[TraceRow]]


def _detect(keys: Iterable[str], forced: str) -> str:
    if forced != "auto":
        return forced
    present = set(keys)
    for kind, signs in _SIGNS.items():
        if present & signs:
            return kind
    return "llmqd"


def _check_count(rows: list[TraceRow], where: str) -> None:
    if len(rows) >= MAX_REQUESTS:
        raise TraceError(f"{where}: more than {MAX_REQUESTS:,} requests; replay a part of the trace")


def _read_csv(lines: _Lines, name: str, forced: str, columns: tuple[str, ...]) -> _Rows:
    reader = csv.reader(iter(lines))
    clock = _DayClock()
    rows: list[TraceRow] = []
    header: list[str] | None = None
    parse: Callable[[list[str], str, int], TraceRow] | None = None
    kind = forced
    try:
        for cells in reader:
            line = lines.number
            if not cells or not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                kind = _detect(header, forced)
                parse = _csv_parser(kind, header, columns, f"{name}:{line}", clock)
                continue
            assert parse is not None
            if len(cells) != len(header):
                raise TraceError(f"{name}:{line}: {len(cells)} cells, the header has {len(header)}")
            _check_count(rows, f"{name}:{line}")
            rows.append(parse(cells, f"{name}:{line}", line))
    except csv.Error as error:
        raise TraceError(f"{name}:{lines.number}: not valid CSV ({error})") from None
    if header is None:
        raise TraceError(f"{name}: empty file (a CSV trace starts with a header row)")
    return kind, clock.day, rows


def _check_named_once(header: Sequence[str], read: Iterable[str], where: str) -> None:
    """Refuses a header naming a column that is read twice: which of its cells holds the value
    would be a guess (the first for some columns, the last for others)."""
    for column in read:
        if header.count(column) > 1:
            raise TraceError(f"{where}: the header names the column {column!r} twice")


def _csv_parser(
    kind: str, header: list[str], columns: tuple[str, ...], where: str, clock: _DayClock
) -> Callable[[list[str], str, int], TraceRow]:
    if kind == "llmqd":
        unknown = [column for column in header if column not in FIELDS]
        if unknown:
            raise TraceError(
                f"{where}: unknown column {unknown[0]!r} (the header names the columns: {', '.join(FIELDS)})"
            )
        missing = [column for column in _REQUIRED if column not in header]
        if missing:
            raise TraceError(f"{where}: the header has no {missing[0]!r} column")
        _check_named_once(header, header, where)
        if columns:
            raise TraceError(
                f"{where}: a trace in the project's format has its own tenant and priority columns; "
                f"rules by column ({', '.join(columns)}) apply to published traces"
            )

        def project(cells: list[str], at: str, line: int) -> TraceRow:
            fields = {
                column: cell.strip() for column, cell in zip(header, cells, strict=True) if cell.strip()
            }
            return _project_row(fields, at, line)

        return project
    if kind == "mooncake":
        raise TraceError(f"{where}: {_NAMES[kind]} is JSON Lines, not CSV")
    time_column, input_column, output_column = _PUBLISHED[kind]
    for column in (time_column, input_column, output_column, *columns):
        if column not in header:
            raise TraceError(f"{where}: the header has no {column!r} column ({_NAMES[kind]})")
    _check_named_once(header, (time_column, input_column, output_column, *columns), where)
    time_at, input_at, output_at = (header.index(c) for c in (time_column, input_column, output_column))
    extra_at = [header.index(column) for column in columns]
    to_seconds: Callable[[str, str, str], float] = clock.seconds if kind == "azure" else _seconds_value

    def published(cells: list[str], at: str, line: int) -> TraceRow:
        time = to_seconds(cells[time_at].strip(), time_column, at)
        prompt = _token_value(cells[input_at].strip(), input_column, at)
        output = _token_value(cells[output_at].strip(), output_column, at)
        extra = tuple(cells[i].strip() or None for i in extra_at)
        return TraceRow(time, prompt + output, output, None, None, None, None, extra, line)

    return published


def _read_jsonl(lines: _Lines, name: str, forced: str, columns: tuple[str, ...]) -> _Rows:
    rows: list[TraceRow] = []
    kind = ""
    for text in lines:
        line = lines.number
        if not text.strip():
            continue
        where = f"{name}:{line}"
        value = _json_object(text, where)
        if not kind:
            kind = _detect(value, forced)
            if kind in ("azure", "burstgpt"):
                raise TraceError(f"{where}: {_NAMES[kind]} is CSV, not JSON Lines")
            if kind == "llmqd" and columns:
                raise TraceError(
                    f"{where}: a trace in the project's format has its own tenant and priority columns; "
                    f"rules by key ({', '.join(columns)}) apply to published traces"
                )
        _check_count(rows, where)
        if kind == "llmqd":
            rows.append(_project_row({k: v for k, v in value.items() if v is not None}, where, line))
            continue
        for key in _PUBLISHED["mooncake"]:
            if value.get(key) is None:
                raise TraceError(f"{where}: {key!r} is required ({_NAMES['mooncake']})")
        milliseconds = _seconds_value(value["timestamp"], "timestamp", where, scale=1000.0)
        prompt = _token_value(value["input_length"], "input_length", where)
        output = _token_value(value["output_length"], "output_length", where)
        extra = tuple(_key_text(value.get(key)) for key in columns)
        rows.append(TraceRow(milliseconds, prompt + output, output, None, None, None, None, extra, line))
    return kind or "llmqd", None, rows


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a number a trace may hold")


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise TraceError(f"{where}: not valid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:  # NaN, a 5,000-digit number, deep nesting
        raise TraceError(f"{where}: not valid JSON ({str(error) or type(error).__name__})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _key_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _project_row(fields: dict[str, Any], where: str, line: int) -> TraceRow:
    unknown = [key for key in fields if key not in FIELDS]
    if unknown:
        raise TraceError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    for key in _REQUIRED:
        if key not in fields:
            raise TraceError(f"{where}: {key!r} is required")
    arrival = _seconds_value(fields["arrival"], "arrival", where)
    estimated = _token_value(fields["estimated"], "estimated", where)
    actual = _token_value(fields["actual"], "actual", where) if "actual" in fields else estimated
    output = _token_value(fields["output"], "output", where) if "output" in fields else None
    if output is not None and output > actual:
        raise TraceError(f"{where}: output ({output}) must not exceed actual ({actual})")
    deadline = _seconds_value(fields["deadline"], "deadline", where) if "deadline" in fields else None
    tenant = fields.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not tenant.strip()):
        raise TraceError(f"{where}: tenant must be a non-empty string, got {tenant!r}")
    priority = _priority(fields.get("priority"), where)
    return TraceRow(arrival, actual, output, estimated, priority, tenant, deadline, (), line)


def _seconds_value(value: Any, name: str, where: str, scale: float = 1.0) -> float:
    """Seconds from 0 to `MAX_SECONDS` (``value`` in units of 1 / ``scale`` seconds)."""
    unit = "milliseconds" if scale == 1000.0 else "seconds"
    limit = MAX_SECONDS * scale
    problem = f"{where}: {name} must be {unit} from 0 to {limit:g}, got {_shown(value)}"
    if isinstance(value, bool):
        raise TraceError(problem)
    try:
        number = float(value) if isinstance(value, (int, float, str)) else math.nan
    except (ValueError, OverflowError):
        raise TraceError(problem) from None
    if not 0 <= number <= limit:  # also refuses nan and inf
        raise TraceError(problem)
    return number / scale


def _token_value(value: Any, name: str, where: str) -> int:
    """A whole number of tokens from 0 to `MAX_TOKENS` (an int, an integral float or digits)."""
    count: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16
    ):
        count = int(value)
    if count is None or not 0 <= count <= MAX_TOKENS:
        raise TraceError(
            f"{where}: {name} must be a whole number of tokens from 0 to {MAX_TOKENS:.0e}, "
            f"got {_shown(value)}"
        )
    return count


def _shown(value: Any) -> str:
    """``value`` for a message: long numbers and texts shortened."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"a number of {len(str(abs(value))):,} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# The 2023 trace writes no zone (its clock is UTC); the 2024 one an offset, ``+00:00``.
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2}(?:\.\d{1,9})?)(Z|[+-]\d{2}:?\d{2})?")
_EPOCH_DAY = date(1970, 1, 1).toordinal()


class _DayClock:
    """Reads dates like ``2023-11-16 18:17:03.9799600`` (the 2023 trace: no zone, UTC) or
    ``2024-05-10 00:00:00.009930+00:00`` (the 2024 trace: a UTC offset, taken off) as seconds
    from midnight of the first date read: counted from 1970 a float would keep only a quarter of
    a microsecond, from that midnight it keeps the trace's 100 ns."""

    def __init__(self) -> None:
        self.day: int | None = None
        self._days: dict[tuple[str, str, str], int] = {}

    def seconds(self, text: str, name: str, where: str) -> float:
        match = _DATE.fullmatch(text)
        if match is None:
            raise TraceError(
                f"{where}: {name} must be a date like 2023-11-16 18:17:03.9799600, got {_shown(text)}"
            )
        year, month, day, hours, minutes, seconds, zone = match.groups()
        offset = 0.0
        if zone is not None and zone != "Z":
            zone_hours, zone_minutes = int(zone[1:3]), int(zone[-2:])
            if zone_hours > 23 or zone_minutes > 59:
                raise TraceError(f"{where}: {name}'s UTC offset must be within ±23:59, got {text!r}")
            offset = (zone_hours * 3_600.0 + zone_minutes * 60.0) * (-1.0 if zone[0] == "-" else 1.0)
        key = (year, month, day)
        days = self._days.get(key)
        if days is None:
            try:
                days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_DAY
            except ValueError as error:
                raise TraceError(f"{where}: {name} is no date ({error}), got {text!r}") from None
            if len(self._days) < 10_000:
                self._days[key] = days
        hour, minute, second = int(hours), int(minutes), float(seconds)
        if hour > 23 or minute > 59 or second >= 61:
            raise TraceError(f"{where}: {name} is no time of day, got {text!r}")
        if self.day is None:
            self.day = days
        return (days - self.day) * 86_400.0 + hour * 3_600.0 + minute * 60.0 + second - offset


def _priority(value: Any, where: str) -> Priority | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in Priority.__members__:
            return Priority[text.upper()]
        if text.isdigit() and len(text) == 1:
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return Priority(value)
    raise TraceError(f"{where}: priority must be URGENT, HIGH, NORMAL, LOW or 0..3, got {value!r}")


# -- assembling ----------------------------------------------------------------------------------
#: Classes to draw from, with weights: ``((Priority.NORMAL, 1.0), (Priority.LOW, 1.0))`` is
#: NORMAL or LOW half and half; one class is that class.
ClassMix = tuple[tuple[Priority, float], ...]


@dataclass(frozen=True)
class TraceRules:
    """How `assemble_trace` completes what a published trace lacks. Where a row has its own
    priority, tenant or estimate (the project's format), it is kept.

    * ``urgent_share``: each request is URGENT with this probability, drawn in arrival order
      from a sequence seeded by ``seed`` (two draws a request: URGENT or not, then its class).
    * ``priorities``: the class (or classes, with weights, drawn) of the others, by key; the key
      ``None`` is the rule for requests no other key matches (default NORMAL). The key is the
      file's label (``priority_by="file"``) or the value of a column (``"column:NAME"``).
    * ``tenant_by``: ``"none"`` (no tenant), ``"file"`` (the file's label) or
      ``"column:NAME"`` (the value of that column or key; none where it is empty).
    * ``estimate``: ``"actual"`` (the tokens the call uses) or ``"cap"``: the prompt plus the
      ``max_tokens`` cap of the request's file (key: label, or ``None`` for every file), and
      the completion is cut at the cap, as a provider would.
    """

    urgent_share: float = 0.0
    priorities: Mapping[str | None, ClassMix] = field(default_factory=dict)
    priority_by: str = "file"
    tenant_by: str = "none"
    estimate: Literal["actual", "cap"] = "actual"
    max_tokens: Mapping[str | None, int] = field(default_factory=dict)
    seed: int = 7

    def __post_init__(self) -> None:
        if not 0 <= self.urgent_share <= 1:
            raise ValueError(f"urgent_share must be within [0, 1], got {self.urgent_share}")
        for rule in ("priority_by", "tenant_by"):
            text = getattr(self, rule)
            allowed = ("file", "none") if rule == "tenant_by" else ("file",)
            if text not in allowed and not (text.startswith("column:") and text[7:].strip()):
                choices = " or ".join(f"'{a}'" for a in allowed)
                raise ValueError(f"{rule} must be {choices} or 'column:NAME', got {text!r}")
        for key, mix in self.priorities.items():
            if (
                not mix
                or not all(0 <= w < math.inf for _, w in mix)
                or not 0 < sum(w for _, w in mix) < math.inf
            ):
                raise ValueError(
                    f"the classes for {key or 'every request'} need finite weights >= 0, not all 0"
                )
        if self.estimate not in ("actual", "cap"):
            raise ValueError(f"estimate must be 'actual' or 'cap', got {self.estimate!r}")
        for key, cap in self.max_tokens.items():
            if not 1 <= cap <= MAX_TOKENS:
                raise ValueError(
                    f"the max_tokens cap for {key or 'every file'} must be from 1 to {MAX_TOKENS:.0e}"
                )

    def columns(self) -> tuple[str, ...]:
        """The columns (or keys) the rules read, to ask `read_trace_file` for."""
        wanted = [text[7:] for text in (self.priority_by, self.tenant_by) if text.startswith("column:")]
        return tuple(dict.fromkeys(wanted))


@dataclass
class TraceWorkload:
    """The workload `assemble_trace` makes: ``records`` in arrival order; ``start`` the date the
    first one arrived (seconds since 1970, for dated traces; else None); ``cut`` how many
    completions the ``max_tokens`` cap shortened."""

    records: list[TraceRecord]
    start: float | None
    cut: int = 0


def assemble_trace(files: Sequence[TraceFile], rules: TraceRules) -> TraceWorkload:
    """Merges ``files`` on their timestamps (stable: ties keep the order of the files, then of
    the lines) into one workload, completed by ``rules``. Dated files (Azure) start at their
    earliest request; files that count seconds keep their clock. Raises `TraceError` for files
    that do not share a clock, a rule naming no file or value, a span over `MAX_SECONDS`."""
    if not files:
        raise TraceError("no trace files")
    days = [file.day for file in files if file.day is not None]
    if days and len(days) < len(files):
        first_dated = next(file for file in files if file.dated)
        other = next(file for file in files if not file.dated)
        raise TraceError(
            f"{first_dated.path} counts time in dates and {other.path} in seconds from its start: "
            "traces merged must share one clock"
        )
    total = sum(len(file.rows) for file in files)
    if total > MAX_REQUESTS:
        raise TraceError(f"the traces hold {total:,} requests; at most {MAX_REQUESTS:,}")
    _check_rules(files, rules)
    # Dated files count from midnight of their first date: brought onto the earliest one's.
    first_day = min(days) if days else 0
    shifts = [((file.day or first_day) - first_day) * 86_400.0 for file in files]
    merged = sorted(
        ((row.time + shifts[index], row, index) for index, file in enumerate(files) for row in file.rows),
        key=lambda item: item[0],
    )
    start = merged[0][0] if days else 0.0
    last_time, last_row, last_file = merged[-1]
    if last_time - start > MAX_SECONDS:
        raise TraceError(
            f"{files[last_file].path}:{last_row.line}: {last_time - start:.3g} s after the trace's "
            f"start; at most {MAX_SECONDS:g} s"
        )
    rng = random.Random(rules.seed)
    draw = rng.random
    share = rules.urgent_share
    mixes = {
        key: ([p for p, _ in mix], cumulative_shares(w for _, w in mix))
        for key, mix in rules.priorities.items()
    }
    default_mix = mixes.get(None, ([Priority.NORMAL], []))
    priority_at = [_column_at(file, rules.priority_by) for file in files]
    tenant_at = [_column_at(file, rules.tenant_by) for file in files]
    labels = [file.label for file in files]
    caps = [rules.max_tokens.get(label, rules.max_tokens.get(None)) for label in labels]
    cap_mode = rules.estimate == "cap"
    records: list[TraceRecord] = []
    append = records.append
    cut = 0
    for time, row, index in merged:
        urgent, pick = draw(), draw()
        priority = row.priority
        if priority is None:
            if urgent < share:
                priority = Priority.URGENT
            else:
                at = priority_at[index]
                key = labels[index] if at is None else row.columns[at] if at >= 0 else None
                classes, cumulative = mixes.get(key, default_mix)
                priority = classes[bisect_right(cumulative, pick)]
        tenant = row.tenant
        if tenant is None:
            at = tenant_at[index]
            if at is not None:
                tenant = row.columns[at] if at >= 0 else None
            elif rules.tenant_by == "file":
                tenant = labels[index]
        actual, output, estimated = row.actual, row.output, row.estimated
        if estimated is None:
            if cap_mode:
                cap = caps[index]
                assert cap is not None  # _check_rules
                assert output is not None  # a published format's row
                if output > cap:
                    actual, output, cut = actual - output + cap, cap, cut + 1
                estimated = actual - output + cap
            else:
                estimated = actual
        append(TraceRecord(time - start, priority, estimated, actual, tenant, row.deadline, output))
    return TraceWorkload(records, first_day * 86_400.0 + start if days else None, cut)


def _column_at(file: TraceFile, rule: str) -> int | None:
    """Where a ``column:NAME`` rule's value sits in ``file``'s rows (-1: the file has no such
    column, as the project's format); None for a rule that is no column."""
    if not rule.startswith("column:"):
        return None
    name = rule[7:]
    if name in file.columns:
        return file.columns.index(name)
    if file.format != "llmqd":
        raise TraceError(f"{file.path} was read without the column {name!r} the rules ask for")
    return -1


def _check_rules(files: Sequence[TraceFile], rules: TraceRules) -> None:
    labels = [file.label for file in files]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise TraceError(f"two trace files are labelled {twice!r}: give each its own (LABEL=FILE)")
    keys = [key for key in rules.priorities if key is not None]
    if rules.priority_by == "file":
        unknown = [key for key in keys if key not in labels]
        if unknown:
            raise TraceError(f"no trace file is labelled {unknown[0]!r} (labels: {', '.join(labels)})")
    elif keys:
        column = rules.priority_by[7:]
        seen: set[str | None] = set()
        for file in files:
            at = _column_at(file, rules.priority_by)
            if at is not None and at >= 0:
                seen.update(row.columns[at] for row in file.rows)
        unknown = [key for key in keys if key not in seen]
        if unknown:
            values = ", ".join(sorted(repr(v) for v in seen if v is not None)[:8])
            raise TraceError(f"no request has {column!r} = {unknown[0]!r} (values: {values or 'none'})")
    unknown_caps = [key for key in rules.max_tokens if key is not None and key not in labels]
    if unknown_caps:
        raise TraceError(f"no trace file is labelled {unknown_caps[0]!r} (labels: {', '.join(labels)})")
    for file in files:
        if file.format == "llmqd":
            if rules.estimate == "cap":
                raise TraceError(
                    f"{file.path} gives its own estimates (the project's format): the max_tokens cap "
                    "applies to published traces"
                )
            continue
        if rules.estimate == "cap" and rules.max_tokens.get(file.label, rules.max_tokens.get(None)) is None:
            raise TraceError(f"no max_tokens cap for {file.label!r} ({file.path})")


# -- writing -------------------------------------------------------------------------------------
def write_trace(path: str | Path, records: Iterable[TraceRecord]) -> int:
    """Writes ``records`` to ``path`` in the project's format (CSV when the name ends in
    ``.csv``, else JSON Lines); returns how many."""
    kind = "csv" if str(path).lower().endswith(".csv") else "jsonl"
    with open(path, "w", encoding="utf-8", newline="") as stream:
        return _write(stream, records, kind)


def _write(stream: IO[str], records: Iterable[TraceRecord], kind: str) -> int:
    count = 0
    if kind == "csv":
        listed = list(records)
        columns = [c for c in FIELDS if c != "output" or any(r.output_tokens is not None for r in listed)]
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for record in listed:
            cells = {
                "arrival": repr(record.arrival),
                "priority": record.priority.name,
                "estimated": record.estimated_tokens,
                "actual": record.actual_tokens,
                "output": "" if record.output_tokens is None else record.output_tokens,
                "tenant": record.tenant or "",
                "deadline": "" if record.deadline is None else repr(record.deadline),
            }
            writer.writerow([cells[column] for column in columns])
            count += 1
        return count
    for record in records:
        item: dict[str, Any] = {
            "arrival": record.arrival,
            "priority": record.priority.name,
            "estimated": record.estimated_tokens,
            "actual": record.actual_tokens,
        }
        if record.output_tokens is not None:
            item["output"] = record.output_tokens
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
