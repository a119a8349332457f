"""``llmqd``: the command line. ``llmqd throttle-demo`` shows the limiter admitting a burst."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import _argtypes as argtypes
from ._core import LLMThrottle, ManualClock, __version__
from .batch import register as _register_batch
from .demo import register as _register_demo
from .simulate_cli import register as _register_simulate

__all__ = ["main"]


def _throttle_demo(args: argparse.Namespace) -> int:
    """Offers a burst of equal requests to a fresh limiter on a virtual clock, then waits as
    `can_process` says and admits the rest; prints when each one got through."""
    clock = ManualClock()
    throttle = LLMThrottle(args.rpm, args.tpm, clock=clock)
    print(f"limiter: {args.rpm:g} requests/min, {args.tpm:g} tokens/min (both buckets start full)")
    print(f"offering {args.requests} requests of {args.tokens} tokens at t=0\n")
    print(f"{'request':>8} {'admitted at':>12} {'waited for':>11}  {'requests left':>13} {'tokens left':>12}")
    for index in range(args.requests):
        check = throttle.can_process(args.tokens)
        if check.available_in == float("inf"):
            print(f"request {index} needs {args.tokens} tokens: more than the bucket can ever hold")
            return 1
        limited_by = check.reason or "-"
        clock.advance(check.available_in)
        throttle.consume_or_raise(f"req-{index}", args.tokens)
        left = throttle.get_metrics()
        requests, tokens = left.rpm.available, left.tpm.available
        print(f"{index:>8} {clock.now():>11.2f}s {limited_by:>11}  {requests:>13.2f} {tokens:>12.0f}")
    print(f"\n{args.requests} requests admitted in {clock.now():.2f} virtual seconds")
    return 0


def _register_throttle_demo(commands: Any) -> None:
    demo = commands.add_parser("throttle-demo", help="show the RPM/TPM limiter admitting a burst of requests")
    # The limiter's rules (a bucket holds at least one request and one token; a count a float
    # holds exactly), refused in one line naming the flag, not as a traceback from the limiter.
    demo.add_argument(
        "--rpm", type=argtypes.limit_per_minute, default=30.0, help="requests per minute, >= 1 (default 30)"
    )
    demo.add_argument(
        "--tpm",
        type=argtypes.limit_per_minute,
        default=20_000.0,
        help="tokens per minute, >= 1 (default 20000)",
    )
    demo.add_argument(
        "--requests", type=argtypes.count, default=12, help="requests in the burst (default 12)"
    )
    demo.add_argument(
        "--tokens", type=argtypes.tokens, default=2_500, help="tokens per request (default 2500)"
    )
    demo.set_defaults(run=_throttle_demo)


#: Each subcommand registers itself here: ``register(commands)`` adds its parser and sets
#: ``run`` to a function of the parsed arguments returning the exit status. A command whose
#: module needs an optional dependency imports it inside ``run``, so ``llmqd --help`` needs none.
_COMMANDS: tuple[Callable[[Any], None], ...] = (
    _register_throttle_demo,
    _register_simulate,
    _register_batch,
    _register_demo,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmqd", description="llm-queue-dispatcher command line")
    parser.add_argument("--version", action="version", version=f"llmqd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for register in _COMMANDS:
        register(commands)
    return parser


#: Exit status when the reader of the output went away: a command killed by SIGPIPE, as a
#: shell reports it (128 + 13).
BROKEN_PIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llmqd``; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `llmqd simulate | head`: the reader has what it wanted. Stop quietly, as a command
        # killed by SIGPIPE does; the interpreter's last flush goes to nothing instead of failing.
        _discard_stdout()
        return BROKEN_PIPE_STATUS
    return status


def _discard_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # a stdout with no descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
