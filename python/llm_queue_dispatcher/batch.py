"""``llmqd batch``: send a JSONL file of chat requests to an OpenAI-compatible endpoint under
RPM/TPM limits, with `Worker`, the in-memory dispatcher and `LLMThrottle`.

Input: one JSON object per line (``-`` reads standard input): optional ``id`` (default
``line-N``), ``priority`` (0..3 or ``urgent``/``high``/``normal``/``low``), ``tenant``; every
other key is a keyword argument of ``chat.completions.create`` (``model`` may come from
``--model``). The flags, ``--out`` and the whole input are checked before anything is sent: a
bad flag or ``--out`` is one line naming it; bad lines (not UTF-8, not JSON, NaN or Infinity, a
bad field) are reported with their numbers, the lines needing more than ``--tpm`` in one
message, and nothing is sent (or, with ``--skip-invalid``, they are left out). Exit status 2.

Output: one JSON object per finished request, appended and flushed as each one finishes:
``{"id", "status": "ok", "response", "tokens", "attempts"}`` or ``{"id", "status": "failed",
"error": {"type", "message", "status_code", "retryable"}, "attempts"}``. A line that UTF-8
cannot hold (a reply with a lone surrogate) is written with its non-ASCII characters escaped.
When the output cannot be written (disk full), the run stops at once with exit status 3: no
request is sent again for it, the lines written stay and a line cut off is removed.

Retries: 5xx, 408, 409, timeouts, connection errors and malformed replies are retried with
backoff up to ``--max-attempts`` failed attempts (429s, which the limiter paces, do not count);
then the request is written as failed with ``"retryable": true``. Running the same command
again resumes from the output, where the last line of an id is its result: it skips the ids
done or failed for good, sends again those that failed on a transient error (all failed ones
with ``--retry-failed``), and says so. SIGINT or SIGTERM stops taking requests; those running
get ``--shutdown-grace`` seconds, and anything unfinished is simply not in the output, so the
next run sends it. (A call cut off past the grace may have been billed by the provider without
its answer arriving.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _argtypes as argtypes
from .errors import InvalidRequestError, PermanentError, RetryableError
from .types import LLMRequest, Priority

if TYPE_CHECKING:
    from .dispatcher import ProcessableMessage

__all__ = ["EXIT_NOT_WRITTEN", "register", "run"]

_LOGGER = logging.getLogger("llm_queue_dispatcher")
_RESERVED = ("id", "priority", "tenant")
#: Exit status of a run stopped because its output could not be written.
EXIT_NOT_WRITTEN = 3
# Lines named in the one "needs more than --tpm" message; the others are counted.
_LINES_NAMED = 5

_DESCRIPTION = "Send a JSONL file of chat requests to an OpenAI-compatible endpoint under RPM/TPM limits."
_EPILOG = """\
Each input line is a JSON object: the keyword arguments of chat.completions.create, plus an
optional id, priority (0..3 or urgent/high/normal/low) and tenant. INPUT "-" reads standard
input. The flags, --out and every line are checked before anything is sent.

The API key is read from the environment variable OPENAI_API_KEY (--api-key-env names
another); the endpoint is --base-url, else $OPENAI_BASE_URL, else OpenAI's.

Each finished request is appended to --out as one JSON line. Running the same command again
resumes: it skips the requests done or failed for good, and sends again those that failed on a
transient error (5xx, timeout, connection); --retry-failed sends every failed one again.

exit status: 0 every request sent is done, 1 some failed, 2 bad flags or input (nothing sent),
3 --out could not be written (the run stopped; what was written is kept), 128+N stopped by
signal N (Ctrl-C, SIGTERM)."""


# -- arguments -----------------------------------------------------------------------------------
def register(commands: Any) -> None:
    """Adds ``llmqd batch`` to the subcommands."""
    batch = commands.add_parser(
        "batch",
        help="send a JSONL file of chat requests to an OpenAI-compatible endpoint under RPM/TPM limits",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        # Short, so that a bad flag's error is not buried under a screen of usage.
        usage="%(prog)s INPUT --out FILE --rpm N --tpm N [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("input", help='requests, one JSON object per line ("-" reads standard input)')
    batch.add_argument("--out", type=Path, required=True, help="results (JSONL, appended; a rerun resumes)")
    batch.add_argument(
        "--rpm", type=argtypes.limit_per_minute, required=True, help="requests per minute allowed (>= 1)"
    )
    batch.add_argument(
        "--tpm", type=argtypes.limit_per_minute, required=True, help="tokens per minute allowed (>= 1)"
    )
    batch.add_argument(
        "--concurrency", type=argtypes.count, default=16, help="calls in flight at most (default 16)"
    )
    batch.add_argument(
        "--base-url", default=None, help="API base URL (default: $OPENAI_BASE_URL or OpenAI's)"
    )
    batch.add_argument("--model", default=None, help="model for lines that name none")
    batch.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    batch.add_argument(
        "--max-attempts",
        type=argtypes.count,
        default=5,
        help="failed attempts (429s not counted) before a request is given up (default 5)",
    )
    batch.add_argument(
        "--retry-failed",
        action="store_true",
        help="also send again the requests whose result in --out is a permanent failure",
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
        type=argtypes.tokens,
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


class _Refused(Exception):
    """Why the run cannot start (one line); exit status 2, nothing sent."""


# -- input ---------------------------------------------------------------------------------------
@dataclass
class _Entry:
    line: int
    request: LLMRequest[Any]


def _priority(value: object) -> Priority | int:
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"priority must be 0..3 or urgent/high/normal/low, got {value!r:.80}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_line(raw: bytes) -> Any:
    """One input line's JSON value; `InvalidRequestError` saying why there is none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(
            f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
        ) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"not JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise InvalidRequestError("not JSON this reader can hold (nested too deeply)") from None
    except ValueError as error:  # NaN or Infinity; an int of more than 4,300 digits
        raise InvalidRequestError(f"not JSON ({error})") from None


def _input_bytes(args: argparse.Namespace) -> bytes:
    if args.input == "-":
        return sys.stdin.buffer.read()
    path = Path(args.input)
    if path.is_dir():
        raise _Refused(f"{args.input}: is a directory, not a file of requests")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Refused(f"{args.input}: no such file") from None
    except OSError as error:
        raise _Refused(f"{args.input}: cannot read: {error.strerror or error}") from None


def _read_requests(args: argparse.Namespace) -> tuple[list[_Entry], list[str], int]:
    """Every valid request of the input, the messages about bad lines, and how many lines are
    bad. The lines needing more than ``--tpm`` share one message."""
    from .openai import DEFAULT_COMPLETION_TOKENS, request_from_openai_chat

    default_completion = (
        DEFAULT_COMPLETION_TOKENS if args.default_max_tokens is None else args.default_max_tokens
    )
    entries: list[_Entry] = []
    errors: list[str] = []
    too_large: list[tuple[int, int]] = []
    first_line: dict[str, int] = {}
    # Split on b"\n" only: `str.splitlines` would also split inside a text holding U+2028.
    for number, raw in enumerate(_input_bytes(args).split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = _parse_line(raw)
        except InvalidRequestError as error:
            errors.append(f"line {number}: {error}")
            continue
        if not isinstance(item, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(item).__name__}")
            continue
        request_id = item.get("id", f"line-{number}")
        if isinstance(request_id, int) and not isinstance(request_id, bool) and abs(request_id) < 10**18:
            request_id = str(request_id)
        payload = {key: value for key, value in item.items() if key not in _RESERVED}
        if "model" not in payload and args.model is not None:
            payload["model"] = args.model
        try:
            if not isinstance(request_id, str) or not request_id:
                raise InvalidRequestError(f"id must be a non-empty string, got {request_id!r:.80}")
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
            too_large.append((number, request.token_info.estimated))
            continue
        if request_id in first_line:
            errors.append(f"line {number}: id {request_id!r} repeats line {first_line[request_id]}")
            continue
        first_line[request_id] = number
        entries.append(_Entry(number, request))
    bad_lines = len(errors) + len(too_large)
    if too_large:
        named = ", ".join(
            f"line {number} (about {tokens:,} tokens)" for number, tokens in too_large[:_LINES_NAMED]
        )
        more = f" and {len(too_large) - _LINES_NAMED:,} more" if len(too_large) > _LINES_NAMED else ""
        errors.append(
            f"{len(too_large):,} line(s) need more tokens than --tpm {args.tpm:g} allows in any minute: "
            f"{named}{more}; lower their max_tokens or raise --tpm"
        )
    return entries, errors, bad_lines


# -- output --------------------------------------------------------------------------------------
def _check_out(args: argparse.Namespace) -> None:
    """Refuses an ``--out`` that cannot be the results file, before anything is sent."""
    out: Path = args.out
    if out.is_dir():
        raise _Refused(f"--out {out}: is a directory; name a file")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _Refused(f"--out {out}: {parent} is a file, not a directory")
    if args.input != "-" and out.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(args.input, out):
                raise _Refused(f"--out {out}: is the input file; name another file")


@dataclass
class _Previous:
    """What the output already says of one id: its last line."""

    ok: bool
    retryable: bool = False


def _previous_results(out: Path) -> dict[str, _Previous]:
    """The last result of each id in an existing output. A last line cut off by a crash is
    removed (that request is sent again); any other unreadable line is refused. A device or a
    pipe (``/dev/stdout``) holds nothing to resume from."""
    if not out.is_file():
        return {}
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        _LOGGER.warning("%s: removing an incomplete last line (that request is sent again)", out)
        with out.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    previous: dict[str, _Previous] = {}
    # Split on b"\n" only: `str.splitlines` would also split inside a response holding U+2028.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON
            item = None
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise _Refused(f"--out {out}: line {number} is not an llmqd batch result")
        error = item.get("error")
        retryable = False
        if isinstance(error, dict):
            flag = error.get("retryable")
            # Lines written before the flag existed: a give-up after transient errors kept their type.
            retryable = flag if isinstance(flag, bool) else error.get("type") == "RetryableError"
        previous[item["id"]] = _Previous(ok=item.get("status") == "ok", retryable=retryable)
    return previous


def _select(
    args: argparse.Namespace, entries: list[_Entry], previous: dict[str, _Previous]
) -> tuple[list[_Entry], int]:
    """The entries to send and how many are skipped; says on stderr what it skipped and why."""
    pending: list[_Entry] = []
    done = failed_for_good = failed_again = transient_again = 0
    for entry in entries:
        before = previous.get(entry.request.id)
        if before is None:
            pending.append(entry)
        elif before.ok:
            done += 1
        elif before.retryable:
            transient_again += 1
            pending.append(entry)
        elif args.retry_failed:
            failed_again += 1
            pending.append(entry)
        else:
            failed_for_good += 1
    known = done + failed_for_good + failed_again + transient_again
    if known:
        parts = [f"skipping {done:,} done"]
        if failed_for_good:
            parts.append(f"{failed_for_good:,} failed for good (--retry-failed sends them again)")
        if transient_again:
            parts.append(f"sending again {transient_again:,} that failed on a transient error")
        if failed_again:
            parts.append(f"sending again {failed_again:,} failed for good (--retry-failed)")
        print(
            f"llmqd batch: {args.out} already holds {known:,} of these requests: " + "; ".join(parts),
            file=sys.stderr,
        )
    return pending, done + failed_for_good


@dataclass
class _Progress:
    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    retryable: int = 0
    tokens: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"{self.done + self.failed}/{self.total} finished ({self.done} ok, {self.failed} failed), "
            f"{self.tokens:,} tokens, {elapsed:.1f} s"
        )


def _encode(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: \\ud800 escaped, as the provider had sent it
        return (json.dumps(record) + "\n").encode("ascii")


class _Results:
    """Appends one line per finished request, written through at once (no buffer). The first
    write that fails stops every later one: the output keeps whole lines only (a line cut off
    is truncated away), `on_broken` is called once, and each result not written is counted."""

    def __init__(self, out: Path, progress: _Progress) -> None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._file = out.open("ab", buffering=0)
        except OSError as error:
            raise _Refused(f"--out {out}: cannot write: {error.strerror or error}") from None
        self._regular = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
        self.out = out
        self.progress = progress
        self.error: BaseException | None = None
        self.written = 0
        self.unwritten = 0
        self.on_write: Any = None
        self.on_broken: Any = None

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record``; after a failure, only counts it as not written."""
        if self.error is None:
            try:
                self._append(_encode(record))
            except (OSError, ValueError, TypeError, RecursionError) as error:
                self.broken(error)
            else:
                self.written += 1
                if record["status"] == "ok":
                    self.progress.done += 1
                    self.progress.tokens += record.get("tokens") or 0
                else:
                    self.progress.failed += 1
                    self.progress.retryable += bool(record["error"].get("retryable"))
                if self.on_write is not None:
                    self.on_write()
                return
        self.unwritten += 1

    def broken(self, error: BaseException) -> None:
        """Records the first failure to write and stops the run (`on_broken`)."""
        if self.error is None:
            self.error = error
            if self.on_broken is not None:
                self.on_broken()

    def _append(self, line: bytes) -> None:
        start = os.fstat(self._file.fileno()).st_size if self._regular else None
        view = memoryview(line)
        try:
            while view:
                count = self._file.write(view)
                if not count:
                    raise OSError(f"{self.out}: the write took nothing")
                view = view[count:]
        except OSError:
            if start is not None:  # keep whole lines only: cut off what part of this one got in
                with contextlib.suppress(OSError):
                    os.ftruncate(self._file.fileno(), start)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


def _error_record(error: BaseException) -> dict[str, Any]:
    cause = error.__cause__ if error.__cause__ is not None else error
    status = getattr(cause, "status_code", None)
    return {
        "type": type(error).__name__,
        "message": str(error),
        "status_code": status,
        "retryable": isinstance(error, RetryableError),
    }


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Runs ``llmqd batch``; returns the exit status (0 all done, 1 some failed, 2 bad input or
    setup, 3 the output could not be written, 128 + signal number when interrupted)."""
    logging.basicConfig(level=logging.WARNING, format="llmqd: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_batch(args))
    except _Refused as refusal:
        print(f"llmqd batch: {refusal}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the worker's own handlers were in place: nothing sent
        return 130


async def _batch(args: argparse.Namespace) -> int:
    from .worker import Worker

    _check_out(args)
    entries, errors, bad_lines = _read_requests(args)
    where = "standard input" if args.input == "-" else args.input
    for message in errors:
        print(f"llmqd batch: {where}: {message}", file=sys.stderr)
    if errors and not args.skip_invalid:
        print(
            f"llmqd batch: {bad_lines} bad line(s); nothing sent (--skip-invalid sends the rest)",
            file=sys.stderr,
        )
        return 2
    pending, skipped = _select(args, entries, _previous_results(args.out))
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        raise _Refused(f"set {args.api_key_env} to the API key (any value for a server that needs none)")
    try:
        from openai import AsyncOpenAI
    except ImportError:
        raise _Refused("needs the openai SDK: pip install 'llm-queue-dispatcher[openai]'") from None
    from ._core import LLMThrottle
    from .config import LLMQueueDispatcherConfig
    from .dispatcher import LLMQueueDispatcher
    from .storage import InMemoryStorage

    progress = _Progress(total=len(pending))
    results = _Results(args.out, progress)
    limiter = LLMThrottle(args.rpm, args.tpm)
    # Failed requests are in the output; the dead-letter store only keeps the queue's books.
    storage: InMemoryStorage[Any] = InMemoryStorage(dead_letter=InMemoryStorage())
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=60.0)
    )
    await dispatcher.batch_enqueue([entry.request for entry in pending])
    client = AsyncOpenAI(base_url=args.base_url, api_key=api_key, timeout=args.timeout, max_retries=0)
    handler = _make_handler(args, client, limiter, results)
    worker: Worker[Any] = Worker(
        dispatcher,
        limiter,
        handler,
        concurrency=args.concurrency,
        shutdown_grace=args.shutdown_grace,
        max_retry_delay=args.max_retry_delay,
        handle_signals=True,  # the whole program: Ctrl-C and SIGTERM stop it gracefully
    )
    results.on_broken = worker.stop
    reporter = _start_reporter(args, progress, results)
    started = time.monotonic()
    try:
        stats = await worker.run(stop_when_empty=True)
    finally:
        await reporter.close()
        results.close()
        await client.close()
    wall = time.monotonic() - started
    print(_summary(args, len(entries), skipped, progress, stats.retried, results.unwritten, wall))
    if results.error is not None:
        print(
            f"llmqd batch: stopped: cannot write {args.out}: {results.error}. The {results.written} "
            f"result(s) written are kept; {results.unwritten} answer(s) received could not be "
            "written and go out again with the rest on the next run",
            file=sys.stderr,
        )
        return EXIT_NOT_WRITTEN
    if worker.stop_signal is not None:
        left = progress.total - progress.done - progress.failed
        print(
            f"interrupted by {worker.stop_signal.name}: {left} request(s) not finished; "
            "run the same command to send them"
        )
        return 128 + int(worker.stop_signal)
    if progress.retryable:
        print(
            f"llmqd batch: {progress.retryable} request(s) failed on transient errors after "
            "--max-attempts; run the same command to send them again",
            file=sys.stderr,
        )
    return 1 if progress.failed else 0


def _make_handler(args: argparse.Namespace, client: Any, limiter: Any, results: _Results) -> Any:
    from .openai import create_chat_completion, total_tokens

    failures: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> int | None:
        request = job.message.payload
        attempts = job.message.attributes.receive_count
        if results.error is not None:
            # The output broke while this request waited: not sent; the next run sends it.
            raise RetryableError("not sent: the results cannot be written")
        try:
            completion = await create_chat_completion(client, limiter, request.payload)
        except PermanentError as error:
            results.write(
                {"id": request.id, "status": "failed", "error": _error_record(error), "attempts": attempts}
            )
            raise
        except Exception as error:
            # Every failed attempt counts, whatever failed, but a 429: the limiter paces those.
            status = getattr(error.__cause__, "status_code", None)
            results.progress.statuses[status or 0] += 1
            if status != 429:
                failures[request.id] += 1
            if failures[request.id] >= args.max_attempts:
                record = _error_record(error)
                record["message"] = (
                    f"gave up after {failures[request.id]} failed attempts: {record['message']}"
                )
                results.write({"id": request.id, "status": "failed", "error": record, "attempts": attempts})
                raise PermanentError(record["message"]) from error
            raise
        # Answered (and billed): from here on nothing makes the request go out again in this run.
        tokens = total_tokens(completion)
        try:
            response = completion.model_dump(mode="json")
        except Exception as error:  # a reply that cannot be written stops the run as a full disk does
            results.broken(error)
            results.unwritten += 1
            return tokens
        results.write(
            {"id": request.id, "status": "ok", "response": response, "tokens": tokens, "attempts": attempts}
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
    args: argparse.Namespace,
    in_file: int,
    skipped: int,
    progress: _Progress,
    retried: int,
    unwritten: int,
    wall: float,
) -> str:
    minutes = wall / 60.0 if wall > 0 else float("inf")
    unfinished = progress.total - progress.done - progress.failed
    rows = [
        ("requests in file", f"{in_file:,}"),
        ("already in output", f"{skipped:,}"),
        ("done", f"{progress.done:,}"),
        ("failed", f"{progress.failed:,}"),
        ("not finished", f"{unfinished:,}"),
        *(
            [("not written", f"{unwritten:,}  (answered, but --out could not take them)")]
            if unwritten
            else []
        ),
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
