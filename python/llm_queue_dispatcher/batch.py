"""``llmqd batch``: send a JSONL file of chat requests to an OpenAI-compatible endpoint under
RPM/TPM limits, with `Worker`, the in-memory dispatcher and `LLMThrottle`.

Input: one JSON object per line: optional ``id`` (default ``line-N``), ``priority`` (0..3 or
``urgent``/``high``/``normal``/``low``), ``tenant``; every other key is a keyword argument of
``chat.completions.create`` (``model`` may come from ``--model``). The whole file is checked
before anything is sent: bad lines are reported with their numbers and nothing is sent (or,
with ``--skip-invalid``, they are left out).

Output: one JSON object per finished request, appended and flushed as each one finishes:
``{"id", "status": "ok", "response", "tokens", "attempts"}`` or ``{"id", "status": "failed",
"error": {"type", "message", "status_code"}, "attempts"}``. Ids already in the output are
skipped, so running the same command again resumes an interrupted run; delete a failed line to
send it again. SIGINT or SIGTERM stops taking requests; those running get ``--shutdown-grace``
seconds, and anything unfinished is simply not in the output, so the next run sends it. (A
call cut off past the grace may have been billed by the provider without its answer arriving.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import _argtypes as argtypes
from .errors import InvalidRequestError, PermanentError
from .types import LLMRequest, Priority

if TYPE_CHECKING:
    from .dispatcher import ProcessableMessage

__all__ = ["register", "run"]

_LOGGER = logging.getLogger("llm_queue_dispatcher")
_RESERVED = ("id", "priority", "tenant")


# -- arguments -----------------------------------------------------------------------------------
def register(commands: Any) -> None:
    """Adds ``llmqd batch`` to the subcommands."""
    batch = commands.add_parser(
        "batch",
        help="send a JSONL file of chat requests to an OpenAI-compatible endpoint under RPM/TPM limits",
        description=(__doc__ or "").split("\n\n")[0],
    )
    batch.add_argument("input", type=Path, help="requests, one JSON object per line")
    batch.add_argument("--out", type=Path, required=True, help="results (JSONL, appended; resumes from it)")
    batch.add_argument("--rpm", type=argtypes.positive, required=True, help="requests per minute allowed")
    batch.add_argument("--tpm", type=argtypes.positive, required=True, help="tokens per minute allowed")
    batch.add_argument(
        "--concurrency", type=argtypes.count, default=16, help="calls in flight at most (default 16)"
    )
    batch.add_argument(
        "--base-url", default=None, help="API base URL (default: $OPENAI_BASE_URL or OpenAI's)"
    )
    batch.add_argument("--model", default=None, help="model for lines that name none")
    batch.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key"
    )
    batch.add_argument(
        "--max-attempts",
        type=argtypes.count,
        default=5,
        help="failed attempts (429s not counted) before a request is given up (default 5)",
    )
    batch.add_argument(
        "--max-retry-delay",
        type=argtypes.non_negative,
        default=60.0,
        help="backoff cap in seconds (default 60)",
    )
    batch.add_argument(
        "--shutdown-grace",
        type=argtypes.non_negative,
        default=30.0,
        help="seconds running calls get after Ctrl-C or SIGTERM (default 30)",
    )
    batch.add_argument(
        "--timeout", type=argtypes.positive, default=120.0, help="seconds per call (default 120)"
    )
    batch.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="completion tokens assumed for scheduling when a line sets no max_tokens (default 1024)",
    )
    batch.add_argument("--skip-invalid", action="store_true", help="send the valid lines despite bad ones")
    batch.add_argument(
        "--progress",
        choices=["auto", "bar", "lines", "none"],
        default="auto",
        help="a progress bar (needs rich and a terminal), periodic lines, or nothing (default auto)",
    )
    batch.add_argument(
        "--progress-interval",
        type=argtypes.positive,
        default=10.0,
        help="seconds between progress lines (default 10)",
    )
    batch.set_defaults(run=run)


# -- input and output ----------------------------------------------------------------------------
@dataclass
class _Entry:
    line: int
    request: LLMRequest[Any]


def _priority(value: object) -> Priority | int:
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"priority must be 0..3 or urgent/high/normal/low, got {value!r}")
    return value


def _read_requests(args: argparse.Namespace) -> tuple[list[_Entry], list[str]]:
    """Every valid request of the input and a message per bad line."""
    from .openai import DEFAULT_COMPLETION_TOKENS, request_from_openai_chat

    default_completion = (
        DEFAULT_COMPLETION_TOKENS if args.default_max_tokens is None else args.default_max_tokens
    )
    entries: list[_Entry] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    with args.input.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as error:
                errors.append(f"line {number}: not JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(item, dict):
                errors.append(f"line {number}: expected a JSON object, got {type(item).__name__}")
                continue
            request_id = item.get("id", f"line-{number}")
            if isinstance(request_id, int) and not isinstance(request_id, bool):
                request_id = str(request_id)
            payload = {key: value for key, value in item.items() if key not in _RESERVED}
            if "model" not in payload and args.model is not None:
                payload["model"] = args.model
            try:
                if not isinstance(request_id, str) or not request_id:
                    raise InvalidRequestError(f"id must be a non-empty string, got {request_id!r}")
                if not isinstance(payload.get("model"), str):
                    raise InvalidRequestError("no model: set 'model' on the line or pass --model")
                request = request_from_openai_chat(
                    request_id,
                    payload,
                    priority=_priority(item.get("priority", Priority.NORMAL)),
                    tenant=item.get("tenant"),
                    default_completion_tokens=default_completion,
                    metadata={"line": number},
                )
            except InvalidRequestError as error:
                errors.append(f"line {number}: {error}")
                continue
            if request.token_info.estimated > args.tpm:
                errors.append(
                    f"line {number}: needs about {request.token_info.estimated} tokens, more than --tpm "
                    f"{args.tpm:g} allows in any minute (lower its max_tokens)"
                )
                continue
            if request_id in first_line:
                errors.append(f"line {number}: id {request_id!r} repeats line {first_line[request_id]}")
                continue
            first_line[request_id] = number
            entries.append(_Entry(number, request))
    return entries, errors


def _finished_ids(out: Path) -> set[str]:
    """Ids in an existing output. A last line cut off by a crash is removed (it is sent again);
    any other unreadable line is an error."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        _LOGGER.warning("%s: removing an incomplete last line (that request is sent again)", out)
        with out.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    done: set[str] = set()
    # Split on b"\n" only: `str.splitlines` would also split inside a response holding U+2028.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        text = raw.decode("utf-8")
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError:
            item = None
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError(f"{out}: line {number} is not an llmqd batch result")
        done.add(item["id"])
    return done


@dataclass
class _Progress:
    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    tokens: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"{self.done + self.failed}/{self.total} finished ({self.done} ok, {self.failed} failed), "
            f"{self.tokens:,} tokens, {elapsed:.1f} s"
        )


class _Results:
    """Appends one line per finished request, flushed at once."""

    def __init__(self, out: Path, progress: _Progress) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = out.open("a", encoding="utf-8")
        self.progress = progress
        self.on_write: Any = None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if record["status"] == "ok":
            self.progress.done += 1
            self.progress.tokens += record.get("tokens") or 0
        else:
            self.progress.failed += 1
        if self.on_write is not None:
            self.on_write()

    def close(self) -> None:
        self._file.close()


def _error_record(error: BaseException) -> dict[str, Any]:
    cause = error.__cause__ if error.__cause__ is not None else error
    status = getattr(cause, "status_code", None)
    return {"type": type(error).__name__, "message": str(error), "status_code": status}


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Runs ``llmqd batch``; returns the exit status (0 all done, 1 some failed, 2 bad input or
    setup, 128 + signal number when interrupted)."""
    logging.basicConfig(level=logging.WARNING, format="llmqd: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_batch(args))
    except KeyboardInterrupt:  # before the worker's own handlers were in place: nothing sent
        return 130


async def _batch(args: argparse.Namespace) -> int:
    from .worker import Worker

    if not args.input.is_file():
        print(f"llmqd batch: {args.input}: no such file", file=sys.stderr)
        return 2
    entries, errors = _read_requests(args)
    for message in errors:
        print(f"llmqd batch: {args.input}: {message}", file=sys.stderr)
    if errors and not args.skip_invalid:
        print(
            f"llmqd batch: {len(errors)} bad line(s); nothing sent (--skip-invalid sends the rest)",
            file=sys.stderr,
        )
        return 2
    try:
        finished = _finished_ids(args.out)
    except (ValueError, UnicodeDecodeError) as error:
        print(f"llmqd batch: {error}", file=sys.stderr)
        return 2
    pending = [entry for entry in entries if entry.request.id not in finished]
    skipped = len(entries) - len(pending)
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        print(
            f"llmqd batch: set {args.api_key_env} to the API key (any value for a server that needs none)",
            file=sys.stderr,
        )
        return 2
    try:
        from openai import AsyncOpenAI
    except ImportError:
        print(
            "llmqd batch: needs the openai SDK: pip install 'llm-queue-dispatcher[openai]'", file=sys.stderr
        )
        return 2
    from ._core import LLMThrottle
    from .config import LLMQueueDispatcherConfig
    from .dispatcher import LLMQueueDispatcher
    from .storage import InMemoryStorage

    progress = _Progress(total=len(pending))
    limiter = LLMThrottle(args.rpm, args.tpm)
    # Failed requests are in the output; the dead-letter store only keeps the queue's books.
    storage: InMemoryStorage[Any] = InMemoryStorage(dead_letter=InMemoryStorage())
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=60.0)
    )
    await dispatcher.batch_enqueue([entry.request for entry in pending])
    client = AsyncOpenAI(base_url=args.base_url, api_key=api_key, timeout=args.timeout, max_retries=0)
    results = _Results(args.out, progress)
    failures: Counter[str] = Counter()
    handler = _make_handler(args, client, limiter, results, failures)
    worker: Worker[Any] = Worker(
        dispatcher,
        limiter,
        handler,
        concurrency=args.concurrency,
        shutdown_grace=args.shutdown_grace,
        max_retry_delay=args.max_retry_delay,
        handle_signals=True,  # the whole program: Ctrl-C and SIGTERM stop it gracefully
    )
    reporter = _start_reporter(args, progress, results)
    started = time.monotonic()
    try:
        stats = await worker.run(stop_when_empty=True)
    finally:
        await reporter.close()
        results.close()
        await client.close()
    wall = time.monotonic() - started
    print(_summary(args, len(entries), skipped, progress, stats.retried, wall))
    if worker.stop_signal is not None:
        left = progress.total - progress.done - progress.failed
        print(
            f"interrupted by {worker.stop_signal.name}: {left} request(s) not finished; "
            "run the same command to send them"
        )
        return 128 + int(worker.stop_signal)
    return 1 if progress.failed else 0


def _make_handler(
    args: argparse.Namespace, client: Any, limiter: Any, results: _Results, failures: Counter[str]
) -> Any:
    from .openai import create_chat_completion

    async def handle(job: ProcessableMessage[Any]) -> int | None:
        request = job.message.payload
        attempts = job.message.attributes.receive_count
        try:
            completion = await create_chat_completion(client, limiter, request.payload)
        except PermanentError as error:
            results.write(
                {"id": request.id, "status": "failed", "error": _error_record(error), "attempts": attempts}
            )
            raise
        except Exception as error:
            status = getattr(error.__cause__, "status_code", None)
            results.progress.statuses[status or 0] += 1
            if status != 429:  # the limiter paces 429s away; they do not use up attempts
                failures[request.id] += 1
            if failures[request.id] >= args.max_attempts:
                record = _error_record(error)
                record["message"] = (
                    f"gave up after {failures[request.id]} failed attempts: {record['message']}"
                )
                results.write({"id": request.id, "status": "failed", "error": record, "attempts": attempts})
                raise PermanentError(record["message"]) from error
            raise
        usage = completion.usage
        tokens = None if usage is None else int(usage.total_tokens)
        results.write(
            {
                "id": request.id,
                "status": "ok",
                "response": completion.model_dump(mode="json"),
                "tokens": tokens,
                "attempts": attempts,
            }
        )
        return tokens

    return handle


# -- progress and summary ------------------------------------------------------------------------
class _Reporter:
    async def close(self) -> None:
        """Stops reporting."""


class _LineReporter(_Reporter):
    def __init__(self, progress: _Progress, interval: float) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(progress, interval))

    @staticmethod
    async def _loop(progress: _Progress, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            print(f"llmqd batch: {progress.line()}", file=sys.stderr, flush=True)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _BarReporter(_Reporter):
    def __init__(self, progress: _Progress, results: _Results) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("llmqd batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._bar.add_task("batch", total=progress.total, detail="")
        self._progress = progress
        results.on_write = self._update
        self._bar.start()

    def _update(self) -> None:
        progress = self._progress
        self._bar.update(
            self._task,
            completed=progress.done + progress.failed,
            detail=f"{progress.failed} failed, {progress.tokens:,} tokens",
        )

    async def close(self) -> None:
        self._update()
        self._bar.stop()


def _start_reporter(args: argparse.Namespace, progress: _Progress, results: _Results) -> _Reporter:
    mode = args.progress
    if mode in ("auto", "bar") and sys.stderr.isatty():
        try:
            return _BarReporter(progress, results)
        except ImportError:
            if mode == "bar":
                _LOGGER.warning("the progress bar needs rich (pip install 'llm-queue-dispatcher[progress]')")
    if mode == "none":
        return _Reporter()
    return _LineReporter(progress, args.progress_interval)


def _summary(
    args: argparse.Namespace, in_file: int, skipped: int, progress: _Progress, retried: int, wall: float
) -> str:
    minutes = wall / 60.0 if wall > 0 else float("inf")
    unfinished = progress.total - progress.done - progress.failed
    rows = [
        ("requests in file", f"{in_file:,}"),
        ("already in output", f"{skipped:,}"),
        ("done", f"{progress.done:,}"),
        ("failed", f"{progress.failed:,}"),
        ("not finished", f"{unfinished:,}"),
        ("retried", f"{retried:,}"),
        ("rate limited (429)", f"{progress.statuses[429]:,}"),
        ("tokens", f"{progress.tokens:,}"),
        ("wall time", f"{wall:.1f} s"),
        ("achieved RPM", f"{progress.done / minutes:,.1f}  (limit {args.rpm:g})"),
        ("achieved TPM", f"{progress.tokens / minutes:,.0f}  (limit {args.tpm:g})"),
    ]
    width = max(len(name) for name, _ in rows)
    body = "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
    return f"llmqd batch: {args.input} -> {args.out}\n{body}"
