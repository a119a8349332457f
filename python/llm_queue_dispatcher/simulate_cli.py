"""``llmqd simulate``: the command line over `llm_queue_dispatcher.simulate`.

Builds the workload from a preset and the flags (or reads traces, `simulate_scenario`), runs
each strategy on it, and prints the strategies side by side (or JSON), with a progress report on
long runs, an optional plot, and Ctrl-C stopping the run at once with the table so far.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, NoReturn

from .batch import add_provider_limit_arguments
from .config import FairPriorityConfig
from .simulate import (
    DEFAULT_RETENTION,
    DEFAULT_SLO,
    PRESETS,
    SCORE_STRATEGIES,
    STRATEGIES,
    SimulationProgress,
    SimulationResult,
    format_summary,
    format_table,
    run_simulation,
    strategy_label,
)
from .simulate_scenario import (
    BASE_RPM,
    BASE_TPM,
    Scenario,
    UsageError,
    build_scenario,
    number,
    parse_slo,
    whole,
)
from .simulate_trace import FORMATS, TraceError
from .simulate_workload import MAX_REQUESTS, MAX_SECONDS, MAX_TOKENS

__all__ = ["register", "run"]

_PROG = "llmqd simulate"

# Runs shorter than this show no progress at all.
_PROGRESS_DELAY = 2.0

# `--strategy all`: the baseline, the score presets without and with a held budget, then the
# fair_priority policy.
_ALL = (
    "fifo",
    *(f"{name}:no-hold" for name in SCORE_STRATEGIES),
    *SCORE_STRATEGIES,
    "fair_priority",
)


# -- argument types ------------------------------------------------------------------------------
def _mix(text: str) -> tuple[float, float, float, float]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(0 <= v <= 1e9 for v in values) or not sum(values) > 0:
        raise argparse.ArgumentTypeError(
            f"must be 4 weights from 0 to 1e9 for URGENT,HIGH,NORMAL,LOW (e.g. 5,20,50,25), got {text}"
        )
    return values[0], values[1], values[2], values[3]


# Limits: at least one request a minute, or one token; a limit below can never admit a request.
_limit = number(1.0, 1e15)
_positive_seconds = number(0.0, MAX_SECONDS, low_open=True)
_seconds = number(0.0, MAX_SECONDS)
_share = number(0.0, 1.0)
_fraction = number(0.0, 1.0, high_open=True)
_latency = number(0.0, 86_400.0)
_milliseconds = number(0.0, 86_400.0)
_load = number(0.0, 1000.0, low_open=True)
_rate = number(0.0, 1e9, low_open=True)
_sigma = number(0.0, 10.0)
_median = number(0.0, float(MAX_TOKENS), low_open=True)
_requests = whole(1, MAX_REQUESTS)
_tenants = whole(1, MAX_REQUESTS)
_tokens = whole(0, MAX_TOKENS)
_concurrency = whole(1, 1_000_000)


# -- registration --------------------------------------------------------------------------------
def register(commands: Any) -> None:
    """Adds ``simulate`` to the ``llmqd`` subcommands."""
    parser = commands.add_parser(
        "simulate",
        help="dispatch a workload under RPM/TPM limits on a virtual clock and compare strategies",
        description=(
            "Dispatches a generated workload, or recorded traffic (--trace), with each strategy, on "
            "a virtual clock, and prints them side by side. `--preset overload` is a synthetic "
            "overload; any flag given overrides the preset."
        ),
    )
    workload = parser.add_argument_group("generated workload")
    workload.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named scenario (overload: 8 tenants at 2x the TPM limit)"
    )
    workload.add_argument("--requests", type=_requests, help="requests in the workload (default 10000)")
    workload.add_argument(
        "--duration", type=_positive_seconds, help="seconds of Poisson arrivals (instead of a request count)"
    )
    workload.add_argument("--arrival", choices=["poisson", "burst"], help="arrival pattern (default poisson)")
    workload.add_argument("--arrival-rate", type=_rate, help="Poisson arrivals per second (default 2.2)")
    workload.add_argument(
        "--load",
        type=_load,
        help=(
            "offered load, up to 1000: for a generated workload the estimated tokens arriving per minute "
            "/ the TPM limit (sets the arrival rate); for traces the actual tokens per minute / the TPM "
            "limit (sets the TPM limit, or with --tpm scales the arrival times)"
        ),
    )
    workload.add_argument(
        "--priority-mix", type=_mix, help="weights of URGENT,HIGH,NORMAL,LOW (default 10,20,50,20)"
    )
    workload.add_argument("--token-median", type=_median, help="median token estimate (default 800)")
    workload.add_argument(
        "--token-sigma", type=_sigma, help="log-normal sigma of the estimates, up to 10 (default 1)"
    )
    workload.add_argument("--token-min", type=_tokens, help="smallest estimate (default 20)")
    workload.add_argument("--token-max", type=_tokens, help="largest estimate (default 200000)")
    workload.add_argument("--tenants", type=_tenants, help="tenants sending requests (default 1: none)")
    workload.add_argument(
        "--heavy-share", type=_share, help="share of the requests the heavy tenant(s) send (default: equal)"
    )
    workload.add_argument("--heavy-tenants", type=_tenants, help="how many tenants are heavy (default 1)")
    workload.add_argument("--deadline", type=_seconds, help="each request's deadline, seconds after arrival")
    workload.add_argument(
        "--seed",
        type=int,
        default=7,
        help="random seed of the workload, the trace rules and failures (default 7)",
    )
    workload.add_argument(
        "--save-trace", metavar="FILE", help="write the workload as a trace (.csv, else JSON Lines)"
    )
    traces = parser.add_argument_group("recorded traffic")
    traces.add_argument(
        "--trace",
        action="append",
        metavar="[LABEL=]FILE",
        help=(
            "replay a trace: the project's CSV/JSON Lines, the Azure LLM inference trace CSV, the BurstGPT "
            "CSV or the Mooncake JSON Lines (recognised by header or keys); repeat to merge traces on "
            "their timestamps; LABEL names the file in rules and as a tenant (default: its stem)"
        ),
    )
    traces.add_argument(
        "--trace-format", choices=["auto", *FORMATS], default="auto", help="read every trace as this format"
    )
    traces.add_argument(
        "--urgent-share", type=_share, help="share of the requests made URGENT, drawn with --seed (default 0)"
    )
    traces.add_argument(
        "--priority",
        action="append",
        metavar="[KEY=]CLASSES",
        help=(
            "classes of the other requests: HIGH, or NORMAL,LOW (drawn half and half), or NORMAL:3,LOW:1; "
            "KEY is a file's label (or a column's value with --priority-by); without KEY, every request "
            "no other rule matches (default NORMAL); repeatable"
        ),
    )
    traces.add_argument(
        "--priority-by",
        metavar="file|column:NAME",
        default="file",
        help="what --priority's KEY matches: the file's label (default) or a column's value",
    )
    traces.add_argument(
        "--tenant-by",
        metavar="none|file|column:NAME",
        default="none",
        help="each request's tenant: none (default), the file's label, or a column's value",
    )
    traces.add_argument(
        "--estimate",
        choices=["actual", "cap"],
        default="actual",
        help="the estimate: the actual tokens (default), or the prompt + the --max-tokens cap",
    )
    traces.add_argument(
        "--max-tokens",
        action="append",
        metavar="[LABEL=]N",
        help="the max_tokens cap of a file's requests for --estimate cap (the completion is cut at it)",
    )
    limits = parser.add_argument_group("provider and limits")
    limits.add_argument(
        "--rpm",
        type=_limit,
        help=f"requests per minute, >= 1 (default {BASE_RPM:g}; for traces twice the mean arrivals a minute)",
    )
    limits.add_argument(
        "--tpm",
        type=_limit,
        help=f"tokens per minute, >= 1 (default {BASE_TPM:g}; for traces the tokens a minute / --load)",
    )
    add_provider_limit_arguments(limits)
    limits.add_argument(
        "--concurrency", type=_concurrency, help="concurrent calls the provider takes (default 32)"
    )
    limits.add_argument("--base-latency", type=_latency, help="seconds every call takes (default 0.4)")
    limits.add_argument(
        "--ms-per-token",
        type=_milliseconds,
        help="milliseconds per token of a call whose completion is not known apart (default 1.5)",
    )
    limits.add_argument(
        "--ms-per-input-token", type=_milliseconds, help="milliseconds per prompt token (default 0.2)"
    )
    limits.add_argument(
        "--ms-per-output-token", type=_milliseconds, help="milliseconds per completion token (default 20)"
    )
    limits.add_argument(
        "--failure-rate", type=_fraction, default=0.0, help="share of attempts the provider fails (default 0)"
    )
    limits.add_argument(
        "--retention",
        type=_positive_seconds,
        default=DEFAULT_RETENTION,
        help="seconds a queued request is kept before the store drops it (default 4 days)",
    )
    strategies = parser.add_argument_group("strategies")
    strategies.add_argument(
        "--strategy",
        action="append",
        metavar="NAME",
        help=(
            f"one of {', '.join(STRATEGIES)}, optionally with ':no-hold' (no budget held: the TypeScript "
            f"library's rule), or 'all' ({', '.join(_ALL)}); repeat to compare (default: default, "
            "fair_priority, fifo)"
        ),
    )
    strategies.add_argument(
        "--no-hold-budget",
        action="store_true",
        help="the score strategies hold no budget (the TypeScript library's rule)",
    )
    strategies.add_argument(
        "--reserve-tokens", type=_tokens, help="fair_priority's reserve (default: automatic)"
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--slo",
        type=parse_slo,
        metavar="CLASS=S,...",
        help=(
            "wait targets for SLO attainment, e.g. URGENT=1,HIGH=30 (default "
            + ",".join(f"{name}={value:g}" for name, value in DEFAULT_SLO.items())
            + "; classes left out keep theirs)"
        ),
    )
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument(
        "--per-tenant", action="store_true", help="each tenant's tokens and waits (table rows, JSON detail)"
    )
    output.add_argument(
        "--summary", action="store_true", help="one row per strategy: utilisation, p99 waits, fairness"
    )
    output.add_argument(
        "--plot", metavar="FILE.png", help="draw wait distributions and queue depth (extra [plot])"
    )
    output.add_argument(
        "--progress",
        choices=["auto", "bar", "lines", "none"],
        default="auto",
        help="on runs over 2 s: a bar (rich, on a terminal), lines on stderr, or nothing (default auto)",
    )
    output.add_argument(
        "--progress-interval",
        type=_positive_seconds,
        default=5.0,
        help="seconds between progress lines (default 5)",
    )
    parser.set_defaults(run=run)
    # A bad flag is one line naming it (exit status 2), like every other refusal of the command,
    # not the 25 lines of usage argparse prints before it.
    setattr(parser, "error", _one_line_error)  # noqa: B010  (an instance attribute, on purpose)


def _one_line_error(message: str) -> NoReturn:
    print(f"{_PROG}: {message} (see llmqd simulate --help)", file=sys.stderr)
    sys.exit(2)


def _strategies(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(name, hold_budget) per requested strategy."""
    out = []
    names: list[str] = []
    for text in args.strategy or ["default", "fair_priority", "fifo"]:
        names += list(_ALL) if text == "all" else [text]
    for text in names:
        name, _, suffix = text.partition(":")
        if name not in STRATEGIES or suffix not in ("", "no-hold"):
            raise UsageError(
                f"unknown strategy {text!r}; choose from {', '.join(STRATEGIES)} (optionally NAME:no-hold)"
            )
        hold = suffix != "no-hold" and not (args.no_hold_budget and name in SCORE_STRATEGIES)
        out.append((name, hold))
    return out


# -- progress ------------------------------------------------------------------------------------
def _has_rich() -> bool:
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


def progress_line(progress: SimulationProgress, elapsed: float) -> str:
    """A progress line: the requests settled, broken down as the table counts them."""
    parts = [f"{progress.completed:,} completed"]
    for name, count in (
        ("expired", progress.expired),
        ("dead-lettered", progress.dead_lettered),
        ("unfittable", progress.unfittable),
    ):
        if count:
            parts.append(f"{count:,} {name}")
    return (
        f"{_PROG}: {progress.strategy}: {progress.settled:,}/{progress.requests:,} settled "
        f"({', '.join(parts)}), {progress.arrived:,} arrived, virtual time {progress.virtual_time:,.0f} s, "
        f"{elapsed:.0f} s elapsed"
    )


class _Reporter:
    """Shows progress once the command has run for `_PROGRESS_DELAY` seconds: a rich bar on a
    terminal (extra ``[progress]``), else a line on stderr every ``interval`` seconds and the
    last one of each run."""

    def __init__(self, mode: str, interval: float) -> None:
        self._mode = mode
        self._interval = interval
        self._started = time.monotonic()
        self._last_line = 0.0
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        if mode in ("auto", "bar"):
            self._mode = "bar" if sys.stderr.isatty() and _has_rich() else "lines"
            if mode == "bar" and self._mode != "bar":
                print(
                    f"{_PROG}: the progress bar needs rich (pip install 'llm-queue-dispatcher[progress]') "
                    "and a terminal; printing lines",
                    file=sys.stderr,
                )

    def __call__(self, progress: SimulationProgress) -> None:
        now = time.monotonic()
        if self._mode == "none" or now - self._started < _PROGRESS_DELAY:
            return
        if self._mode == "bar":
            self._update_bar(progress)
        elif now - self._last_line >= self._interval or progress.settled >= progress.requests:
            self._last_line = now
            print(progress_line(progress, now - self._started), file=sys.stderr, flush=True)

    def _update_bar(self, progress: SimulationProgress) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}, virtual {task.fields[virtual]:,.0f} s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
        task = self._tasks.get(progress.strategy)
        if task is None:
            task = self._tasks[progress.strategy] = self._bar.add_task(
                progress.strategy, total=progress.requests, virtual=0.0, detail=""
            )
        detail = f"{progress.completed:,} completed" + (
            f", {progress.expired:,} expired" if progress.expired else ""
        )
        self._bar.update(task, completed=progress.settled, virtual=progress.virtual_time, detail=detail)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _Interrupt:
    """Ctrl-C: during a simulation it ends the run at its next event (the table so far is
    printed); anywhere else, and the second time, it raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.simulating = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.simulating and not self.event.is_set():
            self.event.set()
            return
        raise KeyboardInterrupt


# -- the command ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Runs ``llmqd simulate``; returns the exit status (130 when interrupted)."""
    from .simulate_trace import write_trace

    try:
        strategies = _strategies(args)
        if args.plot:
            from .simulate_plot import require_matplotlib

            require_matplotlib()
        interrupt = _Interrupt()
        previous = _install(interrupt)
        try:
            return _run(args, strategies, interrupt, write_trace)
        except KeyboardInterrupt:
            print(f"{_PROG}: interrupted before any strategy ran", file=sys.stderr)
            return 130
        finally:
            _restore(previous)
    except (UsageError, TraceError, ImportError) as error:
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader went away: `llmqd` stops quietly
    except OSError as error:
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 1


def _install(interrupt: _Interrupt) -> Any:
    try:
        return signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread: Ctrl-C stays Python's
        return None


def _restore(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def _run(
    args: argparse.Namespace, strategies: list[tuple[str, bool]], interrupt: _Interrupt, write_trace: Any
) -> int:
    scenario = build_scenario(args)
    if args.save_trace:
        write_trace(args.save_trace, scenario.records)
    reporter = _Reporter("none" if args.json else args.progress, args.progress_interval)
    fair = FairPriorityConfig(reserve_tokens=args.reserve_tokens) if args.reserve_tokens is not None else None
    results: list[SimulationResult] = []
    try:
        for name, hold in strategies:
            interrupt.simulating = True
            result = run_simulation(
                name,
                scenario.records,
                scenario.provider,
                rpm=scenario.rpm,
                tpm=scenario.tpm,
                itpm=args.itpm,
                otpm=args.otpm,
                rpd=args.rpd,
                tpd=args.tpd,
                max_concurrent=args.max_concurrent,
                hold_budget=hold,
                fair_priority=fair,
                message_retention=args.retention,
                slo=args.slo,
                stop=interrupt.event,
                on_progress=reporter,
                progress_interval=min(0.25, args.progress_interval),
            )
            interrupt.simulating = False
            results.append(result)
            if result.interrupted:
                break
    finally:
        interrupt.simulating = False
        reporter.close()
    _report(args, scenario, results)
    if args.plot and results:
        from .simulate_plot import plot_results

        plot_results(results, args.plot, title=scenario.title)
    if results and results[-1].interrupted:
        skipped = [strategy_label(name, hold) for name, hold in strategies[len(results) :]]
        print(
            f"{_PROG}: interrupted at virtual time {results[-1].makespan:,.0f} s; {results[-1].strategy} is "
            f"partial ({results[-1].unfinished:,} requests unfinished)"
            + (f"; not run: {', '.join(skipped)}" if skipped else ""),
            file=sys.stderr,
        )
        return 130
    return 0


def _report(args: argparse.Namespace, scenario: Scenario, results: list[SimulationResult]) -> None:
    if args.json:
        print(json.dumps([result.to_dict(per_tenant=args.per_tenant) for result in results], indent=2))
    else:
        print(scenario.description + "\n")
        print(format_summary(results) if args.summary else format_table(results, per_tenant=args.per_tenant))
