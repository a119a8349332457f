"""``llmqd simulate``: the command line over `llm_queue_dispatcher.simulate`.

Builds the workload from a preset and the flags (or reads a trace), runs each strategy on it,
and prints the strategies side by side (or JSON), with a progress report on long runs, an
optional plot, and Ctrl-C stopping the run at once with the table so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from . import _argtypes as argtypes
from .config import FairPriorityConfig
from .simulate import (
    DEFAULT_RETENTION,
    PRESETS,
    SCORE_STRATEGIES,
    STRATEGIES,
    ProviderModel,
    SimulationProgress,
    SimulationResult,
    TraceRecord,
    Workload,
    format_summary,
    format_table,
    run_simulation,
    strategy_label,
)

__all__ = ["register", "run"]

_PROG = "llmqd simulate"

# Runs shorter than this show no progress at all.
_PROGRESS_DELAY = 2.0

# Without a preset: an RPM-bound workload (132 arrivals a minute against 120 RPM).
_BASE_RPM = 120.0
_BASE_TPM = 500_000.0

# Flags that describe a generated workload (a trace replaces them all).
_WORKLOAD_FLAGS = {
    "requests": "--requests",
    "duration": "--duration",
    "arrival": "--arrival",
    "arrival_rate": "--arrival-rate",
    "load": "--load",
    "priority_mix": "--priority-mix",
    "token_median": "--token-median",
    "token_sigma": "--token-sigma",
    "token_min": "--token-min",
    "token_max": "--token-max",
    "tenants": "--tenants",
    "heavy_tenants": "--heavy-tenants",
    "heavy_share": "--heavy-share",
    "deadline": "--deadline",
}


# `--strategy all`: the baseline, the seed's presets and rule, then the two policies.
_ALL = ("fifo", *(f"{name}:no-hold" for name in SCORE_STRATEGIES), "default", "fair_priority")


class UsageError(Exception):
    """A bad combination of flags; exit status 2."""


# -- argument types (the shared ones are in _argtypes) -------------------------------------------
def _mix(text: str) -> tuple[float, float, float, float]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 0 or not sum(values) > 0:
        raise argparse.ArgumentTypeError(
            f"must be 4 weights >= 0 for URGENT,HIGH,NORMAL,LOW (e.g. 5,20,50,25), got {text}"
        )
    return values[0], values[1], values[2], values[3]


# -- registration --------------------------------------------------------------------------------
def register(commands: Any) -> None:
    """Adds ``simulate`` to the ``llmqd`` subcommands."""
    parser = commands.add_parser(
        "simulate",
        help="dispatch a workload under RPM/TPM limits on a virtual clock and compare strategies",
        description=(
            "Dispatches a generated workload (or a recorded trace) with each strategy, on a virtual "
            "clock, and prints them side by side. `--preset overload` is issue 10's workload; any "
            "flag given overrides the preset."
        ),
    )
    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named scenario (overload: 8 tenants at 2x the TPM limit)"
    )
    workload.add_argument("--requests", type=argtypes.count, help="requests in the workload (default 10000)")
    workload.add_argument(
        "--duration", type=argtypes.positive, help="seconds of Poisson arrivals (instead of a request count)"
    )
    workload.add_argument("--arrival", choices=["poisson", "burst"], help="arrival pattern (default poisson)")
    workload.add_argument(
        "--arrival-rate", type=argtypes.positive, help="Poisson arrivals per second (default 2.2)"
    )
    workload.add_argument(
        "--load",
        type=argtypes.positive,
        help="offered load: estimated tokens arriving per minute / the TPM limit; sets the arrival rate",
    )
    workload.add_argument(
        "--priority-mix", type=_mix, help="weights of URGENT,HIGH,NORMAL,LOW (default 10,20,50,20)"
    )
    workload.add_argument(
        "--token-median", type=argtypes.positive, help="median token estimate (default 800)"
    )
    workload.add_argument(
        "--token-sigma", type=argtypes.non_negative, help="log-normal sigma of the estimates (default 1)"
    )
    workload.add_argument("--token-min", type=argtypes.tokens, help="smallest estimate (default 20)")
    workload.add_argument("--token-max", type=argtypes.tokens, help="largest estimate (default 200000)")
    workload.add_argument("--tenants", type=argtypes.count, help="tenants sending requests (default 1: none)")
    workload.add_argument(
        "--heavy-share",
        type=argtypes.share,
        help="share of the requests the heavy tenant(s) send (default: equal)",
    )
    workload.add_argument(
        "--heavy-tenants", type=argtypes.count, help="how many tenants are heavy (default 1)"
    )
    workload.add_argument(
        "--deadline", type=argtypes.non_negative, help="each request's deadline, seconds after arrival"
    )
    workload.add_argument(
        "--seed", type=int, default=7, help="random seed of the workload and failures (default 7)"
    )
    workload.add_argument("--trace", metavar="FILE", help="replay a recorded trace (.csv, else JSON Lines)")
    workload.add_argument(
        "--save-trace", metavar="FILE", help="write the workload as a trace (.csv, else JSON Lines)"
    )
    limits = parser.add_argument_group("provider and limits")
    limits.add_argument("--rpm", type=argtypes.positive, help=f"requests per minute (default {_BASE_RPM:g})")
    limits.add_argument("--tpm", type=argtypes.positive, help=f"tokens per minute (default {_BASE_TPM:g})")
    limits.add_argument(
        "--concurrency", type=argtypes.count, help="concurrent calls the provider takes (default 32)"
    )
    limits.add_argument(
        "--failure-rate",
        type=argtypes.fraction,
        default=0.0,
        help="share of attempts the provider fails (default 0)",
    )
    limits.add_argument(
        "--retention",
        type=argtypes.positive,
        default=DEFAULT_RETENTION,
        help="seconds a queued request is kept before the store drops it (default 4 days)",
    )
    strategies = parser.add_argument_group("strategies")
    strategies.add_argument(
        "--strategy",
        action="append",
        metavar="NAME",
        help=(
            f"one of {', '.join(STRATEGIES)}, optionally with ':no-hold' (the seed's rule), or 'all' "
            f"({', '.join(_ALL)}); repeat to compare (default: default, fair_priority, fifo)"
        ),
    )
    strategies.add_argument(
        "--no-hold-budget",
        action="store_true",
        help="the score strategies use the seed's rule: the best among those the limiter admits now",
    )
    strategies.add_argument(
        "--reserve-tokens", type=argtypes.tokens, help="fair_priority's reserve (default: automatic)"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument(
        "--summary", action="store_true", help="one row per strategy: utilisation and p99 waits only"
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
        type=argtypes.positive,
        default=5.0,
        help="seconds between progress lines (default 5)",
    )
    parser.set_defaults(run=run)


# -- the scenario --------------------------------------------------------------------------------
@dataclass
class Scenario:
    """What the flags resolve to."""

    records: list[TraceRecord]
    provider: ProviderModel
    rpm: float
    tpm: float
    description: str
    title: str


def _workload(
    args: argparse.Namespace, preset_workload: Workload, preset_load: float | None, tpm: float
) -> tuple[Workload, float | None]:
    """The workload the flags ask for, and the load it was built for (None: a rate or a burst)."""
    given = {name: getattr(args, name) for name in _WORKLOAD_FLAGS if getattr(args, name) is not None}
    if "load" in given and "arrival_rate" in given:
        raise UsageError("give --load or --arrival-rate, not both")
    if given.get("arrival") == "burst" and ({"load", "arrival_rate", "duration"} & set(given)):
        raise UsageError(
            "--arrival burst sends every request at t = 0: --load, --arrival-rate and --duration do not apply"
        )
    fields: dict[str, Any] = {name: value for name, value in given.items() if name != "load"}
    if "requests" in given and "duration" not in given:
        fields["duration"] = None
    if "duration" in given and "requests" not in given:
        fields["requests"] = None
    if fields.get("arrival") == "burst":
        fields["duration"] = None
        if fields.get("requests", preset_workload.requests) is None:
            fields["requests"] = Workload().requests
    tenants = given.get("tenants", preset_workload.tenants)
    if tenants == 1 and ("heavy_share" in given or "heavy_tenants" in given):
        raise UsageError("--heavy-share and --heavy-tenants need --tenants 2 or more")
    if "heavy_tenants" in given and given["heavy_tenants"] >= tenants:
        raise UsageError(f"--heavy-tenants must be below --tenants ({tenants}): some tenants must be light")
    if "tenants" in given and "heavy_tenants" not in given and preset_workload.heavy_tenants >= tenants:
        fields["heavy_tenants"] = 1
    fields["seed"] = args.seed
    try:
        workload = dataclasses.replace(preset_workload, **fields)
    except ValueError as error:
        raise UsageError(str(error)) from None
    load = given.get("load", None if "arrival_rate" in given else preset_load)
    if load is not None and workload.arrival == "poisson":
        return workload.with_load(load, tpm), load
    return workload, None


def _describe_workload(
    workload: Workload, load: float | None, records: Sequence[TraceRecord], tpm: float
) -> str:
    if workload.arrival == "burst":
        shape = f"{len(records):,} requests at t = 0"
    else:
        period = records[-1].arrival if records else 0.0
        rate = f"{workload.arrival_rate:.2f}/s" + (f" for a load of {load:g}x" if load is not None else "")
        shape = f"{len(records):,} requests over {period:,.0f} s (Poisson, {rate})"
    parts = [shape, _offered(records, tpm)]
    if workload.tenants > 1:
        if workload.heavy_share is None:
            parts.append(f"{workload.tenants} tenants sending alike")
        else:
            heavy = "t1" if workload.heavy_tenants == 1 else f"t1-t{workload.heavy_tenants}"
            parts.append(f"{workload.tenants} tenants ({heavy} sending {workload.heavy_share:.0%})")
    mix = "/".join(f"{100 * w / sum(workload.priority_mix):g}" for w in workload.priority_mix)
    parts.append(f"priorities {mix} %")
    parts.append(
        f"estimates log-normal median {workload.token_median:g} sigma {workload.token_sigma:g} "
        f"in [{workload.token_min}, {workload.token_max}]"
    )
    return ", ".join(part for part in parts if part)


def _offered(records: Sequence[TraceRecord], tpm: float) -> str:
    if len(records) < 2 or records[-1].arrival <= 0:
        return ""
    estimated = sum(record.estimated_tokens for record in records)
    return f"offered {estimated / records[-1].arrival * 60.0 / tpm:.2f}x the TPM limit in estimates"


def _scenario(args: argparse.Namespace) -> Scenario:
    from .simulate_trace import read_trace

    preset = PRESETS[args.preset] if args.preset else None
    rpm = args.rpm if args.rpm is not None else (preset.rpm if preset else _BASE_RPM)
    tpm = args.tpm if args.tpm is not None else (preset.tpm if preset else _BASE_TPM)
    base_provider = preset.provider if preset else ProviderModel()
    provider = dataclasses.replace(
        base_provider,
        concurrency=args.concurrency if args.concurrency is not None else base_provider.concurrency,
        failure_rate=args.failure_rate,
        seed=args.seed,
    )
    if args.trace:
        given = [flag for name, flag in _WORKLOAD_FLAGS.items() if getattr(args, name) is not None]
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise UsageError(f"--trace replays recorded traffic: {', '.join(given)} {verb} not apply")
        records = read_trace(args.trace)
        tenants = len({record.tenant for record in records})
        description = ", ".join(
            part
            for part in (
                f"trace {args.trace}: {len(records):,} requests over {records[-1].arrival:,.0f} s",
                _offered(records, tpm),
                f"{tenants} tenants" if tenants > 1 else "",
            )
            if part
        )
    else:
        workload, load = _workload(
            args, preset.workload if preset else Workload(), preset.load if preset else None, tpm
        )
        records = workload.generate()
        if not records:
            raise UsageError("the workload has no requests (raise --duration or --arrival-rate)")
        description = _describe_workload(workload, load, records, tpm)
    head = f"{args.preset} preset: " if preset and not args.trace else ""
    description = (
        f"{head}{description}; rpm {rpm:g}, tpm {tpm:g}, concurrency {provider.concurrency}, latency "
        f"{provider.base_latency:g} s + {provider.seconds_per_1k_tokens:g} ms/token, failure rate "
        f"{provider.failure_rate:g}, seed {args.seed} (virtual time)"
    )
    title = (
        f"{head}{len(records):,} requests, {_offered(records, tpm) or 'a burst'}; rpm {rpm:g}, tpm {tpm:g}"
    )
    return Scenario(records, provider, rpm, tpm, description, title)


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


class _Reporter:
    """Shows progress once the command has run for `_PROGRESS_DELAY` seconds: a rich bar on a
    terminal (extra ``[progress]``), else a line on stderr every ``interval`` seconds."""

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
            print(
                f"{_PROG}: {progress.strategy}: {progress.settled:,}/{progress.requests:,} requests done, "
                f"{progress.arrived:,} arrived, virtual time {progress.virtual_time:,.0f} s, "
                f"{now - self._started:.0f} s elapsed",
                file=sys.stderr,
                flush=True,
            )

    def _update_bar(self, progress: SimulationProgress) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("virtual {task.fields[virtual]:,.0f} s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
        task = self._tasks.get(progress.strategy)
        if task is None:
            task = self._tasks[progress.strategy] = self._bar.add_task(
                progress.strategy, total=progress.requests, virtual=0.0
            )
        self._bar.update(task, completed=progress.settled, virtual=progress.virtual_time)

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
    from .simulate_trace import TraceError, write_trace

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
    scenario = _scenario(args)
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
                hold_budget=hold,
                fair_priority=fair,
                message_retention=args.retention,
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
    unfittable = max((result.unfittable for result in results), default=0)
    if unfittable:
        print(
            f"{_PROG}: {unfittable} of {len(scenario.records)} requests need more tokens than the TPM "
            f"limit ({scenario.tpm:g}) allows and were never sent (the 'unfittable' count); raise --tpm",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([result.to_dict() for result in results], indent=2))
    else:
        print(scenario.description + "\n")
        print(format_summary(results) if args.summary else format_table(results))
