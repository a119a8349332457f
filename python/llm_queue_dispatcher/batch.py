"""``llmqd batch``: send a JSONL file of requests to OpenAI (or any OpenAI-compatible endpoint)
or to Anthropic under RPM/TPM limits, with `Worker`, the in-memory dispatcher and `LLMThrottle`.

Input: one JSON object per line (``-`` reads standard input), in llmqd's own format (optional
``id``, ``priority``, ``tenant``; every other key a keyword argument of
``chat.completions.create``, or of ``messages.create`` with ``--provider anthropic``), in the
OpenAI Batch API's (``custom_id``, ``method``, ``url``, ``body``) or in Anthropic's Message
Batches' (``custom_id``, ``params``): `batch_formats` reads and writes them. The flags, ``--out``
and the whole input are checked before anything is sent: a bad flag or ``--out`` is one line
naming it; bad lines (not UTF-8, not JSON, NaN or Infinity, a bad field) are reported with their
numbers, the lines needing more than ``--tpm`` in one message, and nothing is sent (or, with
``--skip-invalid``, they are left out). Exit status 2.

Output: one JSON object per finished request in the output format (by default the input's),
appended and flushed as each one finishes. A line that UTF-8 cannot hold (a reply with a lone
surrogate) is written with its non-ASCII characters escaped. When the output cannot be written
(disk full), the run stops at once with exit status 3: no request is sent again for it, the
lines written stay and a line cut off is removed.

Retries: 5xx, 529, 408, 409, timeouts, connection errors and malformed replies are retried with
backoff up to ``--max-attempts`` failed attempts; 429s, which the limiter paces, count apart, up
to ``--max-rate-limited`` (a request the provider never admits, one larger than its limit, is
not retried for ever); then the request is written as failed on a transient error. Running the
same command again resumes from the output, where the last line of an id is its result: it skips
the ids done or failed for good, sends again those that failed on a transient error (all failed
ones with ``--retry-failed``), and says so. SIGINT or SIGTERM stops taking requests; those
running get ``--shutdown-grace`` seconds, and anything unfinished is simply not in the output,
so the next run sends it. (A call cut off past the grace may have been billed by the provider
without its answer arriving.)

Two runs on one ``--out`` at once would each send what the other has not written yet: a run
holds an exclusive lock on ``--out`` (``flock``) from before it reads the earlier results to its
end, and a second run is refused (exit status 2, nothing sent). On Windows no lock is taken.

The file formats live in `batch_formats`; this module is the command itself (flags, the two
providers' calls, the run, the results file and its progress), kept in one file so that a run
reads from top to bottom (about 900 lines).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _argtypes as argtypes
from .batch_formats import (
    FORMATS,
    Answer,
    Entry,
    Failure,
    Format,
    Previous,
    Refused,
    Requests,
    failure_of,
    plain_number,
    previous_results,
    read_requests,
)
from .errors import PermanentError, RetryableError
from .storage.base import MAX_VISIBILITY_TIMEOUT
from .types import TokenInfo, TokenUsage

if TYPE_CHECKING:
    from .dispatcher import ProcessableMessage

__all__ = ["EXIT_NOT_WRITTEN", "register", "run"]

_LOGGER = logging.getLogger("llm_queue_dispatcher")
#: Exit status of a run stopped because its output could not be written.
EXIT_NOT_WRITTEN = 3
#: The shortest --progress-interval: a line more often than this is a flood, not progress.
_MIN_PROGRESS_INTERVAL = 0.1
#: The largest --max-concurrent: the limiter counts requests in flight in 64 bits.
_MAX_CONCURRENT = 2**64 - 1

_DESCRIPTION = (
    "Send a JSONL file of requests to OpenAI (or any OpenAI-compatible endpoint) or to Anthropic "
    "under RPM/TPM limits."
)
_EPILOG = """\
Each input line is a JSON object: the keyword arguments of chat.completions.create (of
messages.create with --provider anthropic), plus an optional id, priority (0..3 or
urgent/high/normal/low) and tenant. The OpenAI Batch API's input files are read too (custom_id,
method "POST", url "/v1/chat/completions" or "/v1/messages", body), and Anthropic's Message
Batches' (custom_id, params): a file whose first line has a custom_id is read in that format
(--input-format says it), and its results are written in the Batch API's output format, or as
Message Batches results (--output-format says otherwise). INPUT "-" reads standard input. The
flags, --out and every line are checked before anything is sent.

Limits: --rpm and --tpm as OpenAI publishes them; for Anthropic, which limits input and output
tokens per minute apart, --itpm and --otpm (--tpm then defaults to their sum); --rpd, --tpd
(per day) and --max-concurrent (calls in flight) where a provider sets them.

The API key is read from the environment variable OPENAI_API_KEY, or ANTHROPIC_API_KEY with
--provider anthropic (--api-key-env names another); the endpoint is --base-url, else
$OPENAI_BASE_URL (or $ANTHROPIC_BASE_URL), else the provider's. Anthropic requires max_tokens:
--default-max-tokens fills it into the lines that set none.

Each finished request is appended to --out as one JSON line. Running the same command again
resumes: it skips the requests done or failed for good, and sends again those that failed on a
transient error (5xx, timeout, connection, a 429 past --max-rate-limited); --retry-failed sends
every failed one again. A run holds a lock on --out: a second run on it is refused while the
first runs.

exit status: 0 every request sent is done, 1 some failed, 2 bad flags or input, or --out in use
by another run (nothing sent), 3 --out could not be written (the run stopped; what was written
is kept), 128+N stopped by signal N (Ctrl-C, SIGTERM)."""


# -- providers -----------------------------------------------------------------------------------
class _Provider:
    """One provider's SDK: its client, its call and the tokens an answer counts."""

    name = ""
    key_variable = ""
    extra = ""
    _named: frozenset[str] | None = None  # the parameters of the SDK's create
    _takes_any = False

    def as_written(self, create: Any, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``payload`` as keyword arguments of the SDK's ``create``: the keys it does not name
        go in ``extra_body``, so that the request's JSON is the line's as written (a parameter
        newer than the installed SDK, one an OpenAI-compatible server adds), where the SDK
        would raise `TypeError` at each attempt."""
        if self._named is None:  # read once: the SDK does not change during a run
            parameters = inspect.signature(create).parameters.values()
            self._takes_any = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)
            self._named = frozenset(parameter.name for parameter in parameters)
        if self._takes_any:
            return dict(payload)
        arguments = {key: value for key, value in payload.items() if key in self._named}
        unnamed = {key: value for key, value in payload.items() if key not in self._named}
        if unnamed:
            given = arguments.get("extra_body")
            arguments["extra_body"] = {**(given if isinstance(given, Mapping) else {}), **unnamed}
        return arguments

    def client(self, base_url: str | None, api_key: str, timeout: float) -> Any:
        """The SDK's async client (its own retries off: the worker retries)."""
        raise NotImplementedError

    async def call(self, client: Any, limiter: Any, payload: Any, reserved: TokenInfo) -> Any:
        """One call, with failures mapped to `RetryableError` and `PermanentError`; the limiter
        synced as it will stand once ``reserved`` (the request's reservation) is marked."""
        raise NotImplementedError

    def usage(self, answer: Any) -> TokenUsage | int | None:
        """The tokens the answer counts against the limits: by part where the provider gives
        them, else a total (None: keep the estimate)."""
        raise NotImplementedError


class _OpenAI(_Provider):
    name, key_variable, extra = "openai", "OPENAI_API_KEY", "openai"

    def client(self, base_url: str | None, api_key: str, timeout: float) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    async def call(self, client: Any, limiter: Any, payload: Any, reserved: TokenInfo) -> Any:
        from .openai import create_chat_completion

        payload = self.as_written(client.chat.completions.create, payload)
        return await create_chat_completion(client, limiter, payload, reserved=reserved)

    def usage(self, answer: Any) -> TokenUsage | int | None:
        from .openai import completion_usage

        return completion_usage(answer)


class _Anthropic(_Provider):
    name, key_variable, extra = "anthropic", "ANTHROPIC_API_KEY", "anthropic"

    def client(self, base_url: str | None, api_key: str, timeout: float) -> Any:
        from anthropic import AsyncAnthropic

        return AsyncAnthropic(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    async def call(self, client: Any, limiter: Any, payload: Any, reserved: TokenInfo) -> Any:
        from .anthropic import create_message

        payload = self.as_written(client.messages.create, payload)
        return await create_message(client, limiter, payload, reserved=reserved)

    def usage(self, answer: Any) -> TokenUsage | int | None:
        from .anthropic import message_usage

        return message_usage(answer)


_PROVIDERS: dict[str, _Provider] = {provider.name: provider for provider in (_OpenAI(), _Anthropic())}


# -- arguments -----------------------------------------------------------------------------------
def _within(
    parse: Callable[[str], Any], *, minimum: float | None = None, maximum: float | None = None, unit: str = ""
) -> Callable[[str], Any]:
    """``parse`` (one of `_argtypes`) bounded to what the object the flag feeds accepts, so that
    a value past it is one line naming the flag before anything runs, not a traceback later."""

    def bounded(text: str) -> Any:
        value = parse(text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {plain_number(minimum)}{unit}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {plain_number(maximum)}{unit}, got {text}")
        return value

    bounded.__name__ = parse.__name__  # argparse names it in "invalid ... value"
    return bounded


def _limit_per_day(text: str) -> float:
    """``--rpd``, ``--tpd``: a finite number >= 1, the rule of `LLMThrottle`'s day buckets."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of requests or tokens per day, got {text!r}"
        ) from None
    if not math.isfinite(value) or not value >= 1:
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 1 (a limit below one per day never admits a request), got {text}"
        )
    return value


def register(commands: Any) -> None:
    """Adds ``llmqd batch`` to the subcommands."""
    batch = commands.add_parser(
        "batch",
        help="send a JSONL file of requests to OpenAI or Anthropic under RPM/TPM limits",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        # Short, so that a bad flag's error is not buried under a screen of usage.
        usage="%(prog)s INPUT --out FILE --rpm N (--tpm N | --itpm N --otpm N) [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("input", help='requests, one JSON object per line ("-" reads standard input)')
    batch.add_argument("--out", type=Path, required=True, help="results (JSONL, appended; a rerun resumes)")
    batch.add_argument(
        "--rpm", type=argtypes.limit_per_minute, required=True, help="requests per minute allowed (>= 1)"
    )
    batch.add_argument(
        "--tpm",
        type=argtypes.limit_per_minute,
        default=None,
        help="tokens per minute allowed, input and output together (>= 1; required unless --itpm "
        "and --otpm are given, whose sum it then is)",
    )
    add_provider_limit_arguments(batch)
    batch.add_argument(
        "--provider",
        choices=sorted(_PROVIDERS),
        default="openai",
        help="openai (chat.completions.create, any OpenAI-compatible endpoint) or anthropic "
        "(messages.create) (default openai)",
    )
    batch.add_argument(
        "--input-format",
        choices=["auto", *FORMATS],
        default="auto",
        help="auto: a first line with custom_id means the provider's batch format, else native "
        "(default auto)",
    )
    batch.add_argument(
        "--output-format",
        choices=list(FORMATS),
        default=None,
        help="results format (default: the input's)",
    )
    batch.add_argument(
        "--concurrency", type=argtypes.count, default=16, help="calls in flight at most (default 16)"
    )
    batch.add_argument(
        "--base-url",
        default=None,
        help="API base URL (default: $OPENAI_BASE_URL or $ANTHROPIC_BASE_URL, else the provider's)",
    )
    batch.add_argument("--model", default=None, help="model for lines that name none")
    batch.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding the API key (default OPENAI_API_KEY, or ANTHROPIC_API_KEY "
        "with --provider anthropic)",
    )
    batch.add_argument(
        "--max-attempts",
        type=argtypes.count,
        default=5,
        help="failed attempts before a request is given up (default 5; 429s count apart, toward "
        "--max-rate-limited)",
    )
    batch.add_argument(
        "--max-rate-limited",
        type=argtypes.count,
        default=20,
        help="429 answers to one request before it is given up, written as failed on a transient "
        "error that a rerun sends again (default 20)",
    )
    batch.add_argument(
        "--retry-failed",
        action="store_true",
        help="also send again the requests whose result in --out is a permanent failure",
    )
    batch.add_argument(
        "--max-retry-delay",
        type=_within(argtypes.non_negative, maximum=MAX_VISIBILITY_TIMEOUT, unit=" seconds (12 hours)"),
        default=60.0,
        help="backoff cap in seconds, at most 43200 (default 60)",
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
        help="for lines that set no max_tokens: with openai the completion tokens assumed for "
        "scheduling (default 1024); with anthropic the max_tokens sent (required, >= 1)",
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
        type=_within(argtypes.positive, minimum=_MIN_PROGRESS_INTERVAL, unit=" seconds"),
        default=10.0,
        help="seconds between progress lines, at least 0.1 (default 10)",
    )
    batch.set_defaults(run=run)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuses the flag combinations no run can serve, in one line naming the flag."""
    for flag, value in (("--input-format", args.input_format), ("--output-format", args.output_format)):
        if value == "message-batches" and args.provider != "anthropic":
            raise Refused(f"{flag} message-batches holds Anthropic messages: pass --provider anthropic")
    if args.provider == "anthropic" and args.default_max_tokens == 0:
        raise Refused("--default-max-tokens 0: Anthropic needs max_tokens >= 1")
    if args.tpm is None:
        if args.itpm is None or args.otpm is None:
            raise Refused("--tpm is required (or --itpm and --otpm, whose sum it then is)")
        args.tpm = args.itpm + args.otpm


def _token_limits(args: argparse.Namespace) -> dict[str, float]:
    """The token limits given, by flag: a request's estimate must fit each."""
    given = {"--tpm": args.tpm, "--itpm": args.itpm, "--otpm": args.otpm, "--tpd": args.tpd}
    return {flag: limit for flag, limit in given.items() if limit is not None}


def add_provider_limit_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The limits as providers publish them beside ``--rpm`` and ``--tpm``, as ``llmqd batch``
    and ``llmqd simulate`` take them: ``--itpm``, ``--otpm``, ``--rpd``, ``--tpd``,
    ``--max-concurrent`` (each None when not given)."""
    parser.add_argument(
        "--itpm",
        type=argtypes.limit_per_minute,
        default=None,
        help="input tokens per minute allowed (Anthropic's ITPM)",
    )
    parser.add_argument(
        "--otpm",
        type=argtypes.limit_per_minute,
        default=None,
        help="output tokens per minute allowed (Anthropic's OTPM)",
    )
    parser.add_argument("--rpd", type=_limit_per_day, default=None, help="requests per day allowed")
    parser.add_argument("--tpd", type=_limit_per_day, default=None, help="tokens per day allowed")
    parser.add_argument(
        "--max-concurrent",
        type=_within(argtypes.count, maximum=_MAX_CONCURRENT),
        default=None,
        help="requests in flight the provider allows at once (a limit of the limiter, beside --concurrency)",
    )


def _limiter(args: argparse.Namespace) -> Any:
    """The `LLMThrottle` of the run: every limit given. Each request's input part is reserved
    from ``itpm`` and its ``max_tokens`` from ``otpm``; the answer's usage corrects each."""
    from ._core import LLMThrottle

    return LLMThrottle(
        args.rpm,
        args.tpm,
        itpm=args.itpm,
        otpm=args.otpm,
        rpd=args.rpd,
        tpd=args.tpd,
        max_concurrent=args.max_concurrent,
        # A reservation is kept (and holds its slot of --max-concurrent) until its call ends:
        # at least as long as one call may take.
        history_retention=max(60.0, args.timeout),
    )


def _input_bytes(args: argparse.Namespace) -> bytes:
    if args.input == "-":
        return sys.stdin.buffer.read()
    path = Path(args.input)
    if path.is_dir():
        raise Refused(f"{args.input}: is a directory, not a file of requests")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Refused(f"{args.input}: no such file") from None
    except OSError as error:
        raise Refused(f"{args.input}: cannot read: {error.strerror or error}") from None


# -- output --------------------------------------------------------------------------------------
def _check_out(args: argparse.Namespace) -> None:
    """Refuses an ``--out`` that cannot be the results file, before anything is sent."""
    out: Path = args.out
    if out.is_dir():
        raise Refused(f"--out {out}: is a directory; name a file")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise Refused(f"--out {out}: {parent} is a file, not a directory")
    if args.input != "-" and out.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(args.input, out):
                raise Refused(f"--out {out}: is the input file; name another file")


def _open_out(out: Path) -> BinaryIO:
    """``--out`` opened to append, unbuffered, and locked for the whole run: two runs on one
    output would each send what the other has not written yet (and a reader of a line being
    written would take it for one cut off by a crash). The lock is taken before the earlier
    results are read, and released when the file is closed, or the process ends however."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = out.open("ab", buffering=0)
    except OSError as error:
        raise Refused(f"--out {out}: cannot write: {error.strerror or error}") from None
    try:
        _lock(handle, out)
    except BaseException:
        handle.close()
        raise
    return handle


def _lock(handle: BinaryIO, out: Path) -> None:
    """An exclusive ``flock`` on the results file, not waited for: refused when another run holds
    it. A device or a pipe (``/dev/stdout``) holds no results to share and is not locked, nor is
    any file on Windows, which has no ``fcntl`` (its ``msvcrt`` locks would keep this run's own
    resume from reading the file)."""
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        return
    try:
        import fcntl
    except ImportError:  # Windows
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Refused(
            f"--out {out}: another llmqd batch run is writing it; wait for it to end or name another file"
        ) from None
    except OSError as error:  # a file system without locks: run as before, unguarded
        _LOGGER.warning("cannot lock %s (%s): two runs on it at once would send requests twice", out, error)


def _select(
    args: argparse.Namespace, entries: list[Entry], previous: dict[str, Previous]
) -> tuple[list[Entry], int]:
    """The entries to send and how many are skipped; says on stderr what it skipped and why."""
    pending: list[Entry] = []
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

    def __init__(self, handle: BinaryIO, out: Path, fmt: Format, progress: _Progress) -> None:
        self._file = handle  # `_open_out`'s, locked: closing it ends the lock
        self._regular = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
        self.out = out
        self.format = fmt
        self.progress = progress
        self.error: BaseException | None = None
        self.written = 0
        self.unwritten = 0
        self.on_write: Any = None
        self.on_broken: Any = None

    def succeeded(self, request_id: str, answer: Answer) -> None:
        """Appends the result line of an answer."""
        self._write(lambda: self.format.succeeded(request_id, answer), None, answer.tokens or 0)

    def failed(self, request_id: str, failure: Failure) -> None:
        """Appends the result line of a request given up."""
        self._write(lambda: self.format.failed(request_id, failure), failure, 0)

    def _write(self, record: Any, failure: Failure | None, tokens: int) -> None:
        """Appends the line ``record()`` builds and counts it; after a failure to write, only
        counts it as not written."""
        if self.error is None:
            try:
                self._append(_encode(record()))
            except (OSError, ValueError, TypeError, RecursionError) as error:
                self.broken(error)
            else:
                self.written += 1
                if failure is None:
                    self.progress.done += 1
                    self.progress.tokens += tokens
                else:
                    self.progress.failed += 1
                    self.progress.retryable += failure.retryable
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


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Runs ``llmqd batch``; returns the exit status (0 all done, 1 some failed, 2 bad input or
    setup, 3 the output could not be written, 128 + signal number when interrupted)."""
    logging.basicConfig(level=logging.WARNING, format="llmqd: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_batch(args))
    except Refused as refusal:
        print(f"llmqd batch: {refusal}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the worker's own handlers were in place: nothing sent
        return 130


async def _batch(args: argparse.Namespace) -> int:
    _check_flags(args)
    _check_out(args)
    provider = _PROVIDERS[args.provider]
    read = read_requests(
        _input_bytes(args),
        provider=provider.name,
        input_format=args.input_format,
        model=args.model,
        default_max_tokens=args.default_max_tokens,
        token_limits=_token_limits(args),
    )
    where = "standard input" if args.input == "-" else args.input
    for message in read.errors:
        print(f"llmqd batch: {where}: {message}", file=sys.stderr)
    if read.errors and not args.skip_invalid:
        print(
            f"llmqd batch: {read.bad_lines} bad line(s); nothing sent (--skip-invalid sends the rest)",
            file=sys.stderr,
        )
        return 2
    key_variable = args.api_key_env or provider.key_variable
    api_key = os.environ.get(key_variable)
    if not api_key:
        raise Refused(f"set {key_variable} to the API key (any value for a server that needs none)")
    try:
        client = provider.client(args.base_url, api_key, args.timeout)
    except ImportError:
        raise Refused(
            f"needs the {provider.name} SDK: pip install 'llm-queue-dispatcher[{provider.extra}]'"
        ) from None
    try:
        # Locked before the earlier results are read: they are this run's alone until it ends.
        handle = _open_out(args.out)
        try:
            return await _send(args, provider, client, read, handle)
        finally:
            with contextlib.suppress(OSError):  # every line was written through already
                handle.close()
    finally:
        await client.close()


async def _send(
    args: argparse.Namespace, provider: _Provider, client: Any, read: Requests, handle: BinaryIO
) -> int:
    """The run itself, ``--out`` open and locked as ``handle``: what to send, the worker, the
    summary; the exit status."""
    from .config import LLMQueueDispatcherConfig
    from .dispatcher import LLMQueueDispatcher
    from .storage import InMemoryStorage
    from .worker import Worker

    output = FORMATS[args.output_format] if args.output_format is not None else read.format
    pending, skipped = _select(args, read.entries, previous_results(args.out, output))
    progress = _Progress(total=len(pending))
    results = _Results(handle, args.out, output, progress)
    limiter = _limiter(args)
    # Failed requests are in the output; the dead-letter store only keeps the queue's books.
    storage: InMemoryStorage[Any] = InMemoryStorage(dead_letter=InMemoryStorage())
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=60.0)
    )
    await dispatcher.batch_enqueue([entry.request for entry in pending])
    handler = _make_handler(args, provider, client, limiter, results)
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
    wall = time.monotonic() - started
    print(_summary(args, len(read.entries), skipped, progress, stats.retried, results.unwritten, wall))
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
            "--max-attempts (or --max-rate-limited 429s); run the same command to send them again",
            file=sys.stderr,
        )
    return 1 if progress.failed else 0


def _make_handler(
    args: argparse.Namespace, provider: _Provider, client: Any, limiter: Any, results: _Results
) -> Any:
    failures: Counter[str] = Counter()
    rate_limited: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> TokenUsage | int | None:
        request = job.message.payload
        attempts = job.message.attributes.receive_count
        if results.error is not None:
            # The output broke while this request waited: not sent; the next run sends it.
            raise RetryableError("not sent: the results cannot be written")
        try:
            answer = await provider.call(client, limiter, request.payload, request.token_info)
        except PermanentError as error:
            results.failed(request.id, failure_of(error, attempts))
            raise
        except Exception as error:
            # Every failed attempt counts, whatever failed. A 429 counts apart, against a larger
            # budget: the limiter paces those, but one the provider never admits (a request
            # larger than its limit, which OpenAI answers with a 429) must not go on for ever.
            status = getattr(error.__cause__, "status_code", None)
            results.progress.statuses[status or 0] += 1
            if status == 429:
                rate_limited[request.id] += 1
                budget, count, what = (
                    args.max_rate_limited,
                    rate_limited[request.id],
                    "rate-limited (429) answers",
                )
            else:
                failures[request.id] += 1
                budget, count, what = args.max_attempts, failures[request.id], "failed attempts"
            if count >= budget:
                message = f"gave up after {count} {what}: {error}"
                results.failed(request.id, failure_of(error, attempts, message))
                raise PermanentError(message) from error
            raise
        # Answered (and billed): from here on nothing makes the request go out again in this run.
        usage = provider.usage(answer)
        tokens = usage.total if isinstance(usage, TokenUsage) else usage
        try:
            # The fields the provider sent (the SDK's models add a null for every field absent).
            body = answer.model_dump(mode="json", exclude_unset=True)
        except Exception as error:  # a reply that cannot be written stops the run as a full disk does
            results.broken(error)
            results.unwritten += 1
            return usage
        request_id = getattr(answer, "_request_id", None)
        results.succeeded(
            request.id,
            Answer(body, request_id if isinstance(request_id, str) else None, tokens, attempts),
        )
        return usage

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
        ("achieved RPM", f"{progress.done / minutes:,.1f}  (limit {plain_number(args.rpm)})"),
        ("achieved TPM", f"{progress.tokens / minutes:,.0f}  (limit {plain_number(args.tpm)})"),
    ]
    width = max(len(name) for name, _ in rows)
    body = "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
    return f"llmqd batch: {args.input} -> {args.out}\n{body}"
