"""``llmqd demo``: the interactive dashboard (extra ``[demo]``).

The real `LLMQueueDispatcher`, `LLMThrottle` and `InMemoryStorage`, one set per strategy, fed
the same requests and dispatching to a simulated provider in real time (``engine.py``), served
to a browser page over server-sent events by aiohttp (``server.py``), with the page's HTML,
CSS, JavaScript and the vendored uPlot charts under ``static/``. This module only registers
the subcommand: aiohttp is imported when the command runs, so ``llmqd --help`` and
``import llm_queue_dispatcher`` need no optional dependency.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from .engine import MAX_RPM, MAX_TPM, ProviderModel

__all__ = ["register", "run"]


def _figure(value: float) -> str:
    """A bound as a person writes it: ``1000000``, not ``1e+06``."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(low: float, high: float, *, low_open: bool = False, below: str = "") -> Any:
    """An argparse type: a finite number within [low, high], or (low, high] with ``low_open``;
    ``below`` ends the message of a value under the range (why it is too small)."""
    span = f"{'(' if low_open else '['}{_figure(low)}, {_figure(high)}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number within {span}, got {text}")
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be within {span}, got {text}{below}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be within {span}, got {text}")
        return value

    return parse


def _integer(low: int, high: int) -> Any:
    """An argparse type: an integer within [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be within [{low}, {high}], got {text}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    """Serves the demo until Ctrl-C; returns the exit status."""
    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as error:
        print(
            f"llmqd demo needs the [demo] extra ({error.name} is missing): "
            "pip install 'llm-queue-dispatcher[demo]'",
            file=sys.stderr,
        )
        return 2
    import asyncio

    from ..errors import InvalidConfigError
    from .engine import STRATEGIES, Controls, DemoEngine
    from .server import serve

    strategies = args.strategy or list(STRATEGIES)
    try:
        controls = Controls(rpm=args.rpm, tpm=args.tpm, arrival_rate=args.arrival_rate)
        engine = DemoEngine(strategies, speed=args.speed, controls=controls, seed=args.seed)
    except InvalidConfigError as error:
        print(f"llmqd demo: {error}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(
            f"llmqd demo: {', '.join(strategies)} at speed {args.speed:g}x on {url} (Ctrl-C stops)",
            flush=True,
        )

    async def main() -> None:
        if args.initial_burst:
            await engine.burst(args.initial_burst)
        await serve(engine, args.port, on_ready=ready)

    try:
        asyncio.run(main())
    except OSError as error:
        print(
            f"llmqd demo: cannot listen on 127.0.0.1:{args.port}: {error.strerror or error}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:  # where the loop cannot take SIGINT itself (Windows)
        pass
    print("llmqd demo: stopped", flush=True)
    return 0


def register(commands: Any) -> None:
    """Adds ``llmqd demo`` to the subcommands (see ``cli._COMMANDS``)."""
    demo = commands.add_parser(
        "demo",
        help="interactive dashboard: strategies side by side on a simulated provider (extra [demo])",
        description="Serves a live dashboard on 127.0.0.1: the real dispatcher, limiter and store, one "
        "set per strategy, on the same simulated requests. Needs the [demo] extra.",
    )
    demo.add_argument(
        "--port", type=_integer(0, 65535), default=8765, help="port on 127.0.0.1 (default 8765; 0: any free)"
    )
    demo.add_argument(
        "--speed",
        type=_number(0, 100, low_open=True),
        default=1.0,
        help="simulated seconds per real second, (0, 100] (default 1)",
    )
    demo.add_argument(
        "--strategy",
        action="append",
        help="a column to show; repeat for several (default: all of them)",
    )
    # Lower limits could never admit a request: the request bucket must hold one request, the
    # token bucket the largest request the demo's workload sends.
    demo.add_argument(
        "--rpm",
        type=_number(1, MAX_RPM, below=": below 1 request per minute, no request is ever admitted"),
        default=90.0,
        help="starting requests per minute, at least 1 (default 90)",
    )
    demo.add_argument(
        "--tpm",
        type=_number(
            ProviderModel.token_max,
            MAX_TPM,
            below=f": the demo sends requests of up to {ProviderModel.token_max} tokens, which a lower limit "
            "could never admit",
        ),
        default=60_000.0,
        help=f"starting tokens per minute, at least {ProviderModel.token_max} (the largest request the "
        "demo sends; default 60000)",
    )
    demo.add_argument(
        "--arrival-rate",
        type=_number(0, 50),
        default=1.6,
        help="starting arrivals per simulated second (default 1.6)",
    )
    demo.add_argument(
        "--initial-burst",
        type=_integer(0, 20_000),
        default=150,
        help="requests queued at the start, so there is a backlog to watch (default 150; 0: none)",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the workload (default 7)")
    demo.set_defaults(run=run)
