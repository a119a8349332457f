"""What the flags of ``llmqd simulate`` resolve to (`build_scenario`): the requests, the
provider, the limits and the lines that describe them, for a generated workload or for traces.
Every flag is checked here or by its argument type, so that a bad value stops the command with
one line naming it (exit status 2) before anything runs; a limit that can never admit one of
the workload's requests is refused, naming the flag that set it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .simulate import PRESETS, ProviderModel, TraceRecord, Workload
from .simulate_metrics import DEFAULT_SLO
from .simulate_trace import ClassMix, TraceFile, TraceRules, TraceWorkload, assemble_trace, read_trace_file
from .simulate_workload import (
    MAX_SECONDS,
    MAX_TOKENS,
    arrivals_per_minute,
    scale_arrivals,
    tokens_per_minute,
)
from .types import Priority

__all__ = [
    "BASE_RPM",
    "BASE_TPM",
    "Scenario",
    "UsageError",
    "build_scenario",
    "number",
    "parse_slo",
    "whole",
]

# Without a preset: an RPM-bound workload (132 arrivals a minute against 120 RPM).
BASE_RPM = 120.0
BASE_TPM = 500_000.0

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

# Flags that only apply to traces, with the value each has when not given.
_TRACE_FLAGS = {
    "trace_format": ("--trace-format", "auto"),
    "urgent_share": ("--urgent-share", None),
    "priority": ("--priority", None),
    "priority_by": ("--priority-by", "file"),
    "tenant_by": ("--tenant-by", "none"),
    "estimate": ("--estimate", "actual"),
    "max_tokens": ("--max-tokens", None),
}


class UsageError(Exception):
    """A bad flag or combination of flags; exit status 2."""


# -- argument types ------------------------------------------------------------------------------
def number(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argument type: a finite number within [low, high] (an open end excludes it)."""
    opening, closing = ("(" if low_open else "["), (")" if high_open else "]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high
        )
        if not inside:  # also nan and inf
            raise argparse.ArgumentTypeError(
                f"must be a number within {opening}{low:g}, {high:g}{closing}, got {text}"
            )
        return value

    return parse


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argument type: a whole number from low to high."""

    def parse(text: str) -> int:
        stripped = text.strip()
        digits = stripped.removeprefix("-")
        value = int(stripped) if digits.isascii() and digits.isdigit() and len(digits) <= 18 else None
        if value is None or not low <= value <= high:
            shown = text if len(text) <= 30 else text[:27] + "..."
            raise argparse.ArgumentTypeError(f"must be a whole number from {low:,} to {high:,}, got {shown}")
        return value

    return parse


_slo_seconds = number(0.0, MAX_SECONDS)


def parse_slo(text: str) -> dict[str, float]:
    """``URGENT=1,HIGH=30`` as wait targets per class."""
    targets: dict[str, float] = {}
    for part in text.split(","):
        name, equals, value = part.partition("=")
        name = name.strip().upper()
        if not equals or name not in DEFAULT_SLO:
            raise argparse.ArgumentTypeError(
                f"must be CLASS=SECONDS pairs, CLASS one of {', '.join(DEFAULT_SLO)} "
                f"(e.g. URGENT=1,HIGH=30), got {text}"
            )
        try:
            targets[name] = _slo_seconds(value.strip())
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{name}: {error}") from None
    return targets


def _keyed(text: str) -> tuple[str | None, str]:
    """``KEY=VALUE`` (the last ``=`` splits) or ``VALUE``."""
    key, equals, value = text.rpartition("=")
    return (key.strip(), value.strip()) if equals else (None, text.strip())


def _classes(text: str, flag: str) -> ClassMix:
    """``HIGH``, ``NORMAL,LOW`` or ``NORMAL:3,LOW:1`` as classes with weights."""
    mix: list[tuple[Priority, float]] = []
    for part in text.split(","):
        name, colon, weight = part.partition(":")
        name = name.strip().upper()
        try:
            value = float(weight) if colon else 1.0
        except ValueError:
            value = math.nan
        if name not in Priority.__members__ or not 0 <= value <= 1e9:
            raise UsageError(
                f"{flag}: {text!r} is no class rule (HIGH, or NORMAL,LOW, or NORMAL:3,LOW:1; classes "
                f"{', '.join(Priority.__members__)}; weights from 0 to 1e9)"
            )
        mix.append((Priority[name], value))
    if not sum(weight for _, weight in mix) > 0:
        raise UsageError(f"{flag}: {text!r} gives every class a weight of 0")
    return tuple(mix)


def _trace_argument(text: str) -> tuple[str | None, str]:
    """``LABEL=FILE`` or ``FILE`` (a path that holds ``=`` is a path when it exists as one)."""
    label, path = _keyed(text)
    if label is None or os.path.exists(text) or not label or any(c in label for c in "/\\"):
        return None, text
    return label, path


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


def _provider(args: argparse.Namespace, base: ProviderModel) -> ProviderModel:
    changes: dict[str, Any] = {"failure_rate": args.failure_rate, "seed": args.seed}
    if args.concurrency is not None:
        changes["concurrency"] = args.concurrency
    for flag, name in (
        ("base_latency", "base_latency"),
        ("ms_per_token", "seconds_per_1k_tokens"),
        ("ms_per_input_token", "seconds_per_1k_input_tokens"),
        ("ms_per_output_token", "seconds_per_1k_output_tokens"),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = value  # milliseconds a token = seconds per 1,000 tokens
    return dataclasses.replace(base, **changes)


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The workload, provider and limits the flags ask for; raises `UsageError` (or a
    `TraceError` naming the file and line) for what cannot run."""
    preset = PRESETS[args.preset] if args.preset else None
    provider = _provider(args, preset.provider if preset else ProviderModel())
    if args.trace:
        return _trace_scenario(args, provider)
    given = [flag for name, (flag, default) in _TRACE_FLAGS.items() if getattr(args, name) != default]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{', '.join(given)} {verb} to recorded traffic (--trace)")
    rpm = args.rpm if args.rpm is not None else (preset.rpm if preset else BASE_RPM)
    tpm = args.tpm if args.tpm is not None else (preset.tpm if preset else BASE_TPM)
    workload, load = _workload(
        args, preset.workload if preset else Workload(), preset.load if preset else None, tpm
    )
    records = workload.generate()
    if not records:
        raise UsageError("the workload has no requests (raise --duration or --arrival-rate)")
    _check_runnable(records, provider, "--arrival-rate, --load or --duration")
    largest = max(record.estimated_tokens for record in records)
    if largest > tpm:
        source = (
            "--tpm"
            if args.tpm is not None
            else f"the {args.preset} preset's TPM limit"
            if preset
            else "--tpm"
        )
        raise UsageError(
            f"{source} ({tpm:g}) can never admit the workload's largest request ({largest:,} tokens "
            f"estimated): raise --tpm to at least {largest} or lower --token-max"
        )
    head = f"{args.preset} preset: " if preset else ""
    shape = _describe_workload(workload, load, records, tpm)
    description = f"{head}{shape}; {_limits(rpm, tpm, provider, records, args.seed)}"
    title = (
        f"{head}{len(records):,} requests, {_offered(records, tpm) or 'a burst'}; rpm {rpm:g}, tpm {tpm:g}"
    )
    return Scenario(records, provider, rpm, tpm, description, title)


def _check_runnable(records: Sequence[TraceRecord], provider: ProviderModel, flags: str) -> None:
    from .simulate import check_workload

    try:
        check_workload(records, provider)
    except ValueError as error:
        if str(error).startswith("the longest call"):
            flags = "--base-latency, --ms-per-token, --ms-per-input-token and --ms-per-output-token"
        raise UsageError(f"{error} (check {flags})") from None


def _limits(
    rpm: float,
    tpm: float,
    provider: ProviderModel,
    records: Sequence[TraceRecord],
    seed: int,
    rpm_note: str = "",
) -> str:
    split = any(record.output_tokens is not None for record in records)
    whole_calls = any(record.output_tokens is None for record in records)
    latency = f"latency {provider.base_latency:g} s"
    if split:
        latency += (
            f" + {provider.seconds_per_1k_input_tokens:g} ms/prompt token"
            f" + {provider.seconds_per_1k_output_tokens:g} ms/completion token"
        )
    if whole_calls:
        latency += f" + {provider.seconds_per_1k_tokens:g} ms/token"
    return (
        f"rpm {_round(rpm)}{rpm_note}, tpm {_round(tpm)}, concurrency {provider.concurrency}, {latency}, "
        f"failure rate {provider.failure_rate:g}, seed {seed} (virtual time)"
    )


def _round(limit: float) -> str:
    """A limit as written: whole above 100 (a derived one has decimals nobody reads)."""
    return f"{limit:.0f}" if limit >= 100 else f"{limit:g}"


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
    load = given.get("load", None if "arrival_rate" in given else preset_load)
    try:
        workload = dataclasses.replace(preset_workload, **fields)
        if load is not None and workload.arrival == "poisson":
            return workload.with_load(load, tpm), load
    except ValueError as error:
        named = [flag for name, flag in _WORKLOAD_FLAGS.items() if name in given]
        raise UsageError(f"{error} (check {', '.join(named) or 'the preset'})") from None
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


# -- traces --------------------------------------------------------------------------------------
def _rules(args: argparse.Namespace) -> TraceRules:
    priorities: dict[str | None, ClassMix] = {}
    for text in args.priority or []:
        key, value = _keyed(text)
        if key in priorities:
            raise UsageError(f"--priority: two rules for {key or 'every request'}")
        priorities[key] = _classes(value, "--priority")
    caps: dict[str | None, int] = {}
    for text in args.max_tokens or []:
        key, value = _keyed(text)
        digits = value.isascii() and value.isdigit() and len(value) <= 13
        cap = int(value) if digits else 0
        if not 1 <= cap <= MAX_TOKENS:
            raise UsageError(
                f"--max-tokens: {text!r} must be [LABEL=]N with N a whole number from 1 to {MAX_TOKENS:.0e}"
            )
        caps[key] = cap
    if caps and args.estimate != "cap":
        raise UsageError("--max-tokens applies to --estimate cap")
    if args.estimate == "cap" and not caps:
        raise UsageError("--estimate cap needs --max-tokens (one cap for every file, or LABEL=N per file)")
    try:
        return TraceRules(
            urgent_share=args.urgent_share or 0.0,
            priorities=priorities,
            priority_by=args.priority_by,
            tenant_by=args.tenant_by,
            estimate=args.estimate,
            max_tokens=caps,
            seed=args.seed,
        )
    except ValueError as error:
        flag = "--tenant-by" if "tenant_by" in str(error) else "--priority-by"
        raise UsageError(f"{flag}: {error}") from None


def _trace_scenario(args: argparse.Namespace, provider: ProviderModel) -> Scenario:
    given = [
        flag for name, flag in _WORKLOAD_FLAGS.items() if name != "load" and getattr(args, name) is not None
    ]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise UsageError(f"--trace replays recorded traffic: {', '.join(given)} {verb} not apply")
    rules = _rules(args)
    files = []
    for text in args.trace:
        label, path = _trace_argument(text)
        files.append(read_trace_file(path, label=label, format=args.trace_format, columns=rules.columns()))
    workload = assemble_trace(files, rules)
    records = workload.records
    offered = tokens_per_minute(records)
    preset = PRESETS[args.preset] if args.preset else None
    scale = 1.0
    if args.load is not None:
        if offered is None:
            raise UsageError("--load needs a trace whose requests arrive over time, not at one instant")
        if offered == 0:
            # No load to scale: neither a TPM limit nor an arrival scale follows from it.
            raise UsageError("--load needs a trace with tokens: every request of this one has 0 tokens")
        if args.tpm is not None:
            tpm = args.tpm
            scale = offered / (args.load * tpm)
            records = scale_arrivals(records, scale)
            tpm_source = "--tpm"
        else:
            tpm = offered / args.load
            tpm_source = "--load"
    elif args.tpm is not None or preset is not None or not offered:
        # Without tokens arriving (all at one instant, or none at all), load 1 sets no limit.
        tpm = args.tpm if args.tpm is not None else preset.tpm if preset else BASE_TPM
        tpm_source = (
            "--tpm" if args.tpm is not None or not preset else f"the {args.preset} preset's TPM limit"
        )
    else:
        tpm, tpm_source = offered, "the trace's tokens a minute (load 1)"
    _check_runnable(records, provider, "--load and --tpm, or the latency flags")
    rpm_note = ""
    if args.rpm is not None:
        rpm = args.rpm
    elif preset is not None:
        rpm = preset.rpm
    else:
        rpm = max(1.0, 2.0 * arrivals_per_minute(records))
        rpm_note = " (twice the mean arrivals a minute)"
    largest = max(records, key=lambda record: record.estimated_tokens)
    if largest.estimated_tokens > tpm:
        fix = "lower --load or give --tpm" if tpm_source == "--load" else "raise --tpm"
        raise UsageError(
            f"{tpm_source} gives a TPM limit of {tpm:,.0f}, which can never admit the workload's largest "
            f"request ({largest.estimated_tokens:,} tokens estimated): {fix}"
        )
    description = _describe_trace(args, files, workload, records, offered, scale, tpm)
    limits = _limits(rpm, tpm, provider, records, args.seed, rpm_note)
    names = ", ".join(_shown_path(file.label, file.path) for file in files)
    title = f"{names}: {len(records):,} requests; rpm {_round(rpm)}, tpm {_round(tpm)}"
    return Scenario(records, provider, rpm, tpm, f"{description}; {limits}", title)


def _shown_path(label: str, path: str) -> str:
    return path if label == Path(path).stem else f"{label}={path}"


def _describe_trace(
    args: argparse.Namespace,
    files: Sequence[TraceFile],
    workload: TraceWorkload,
    records: Sequence[TraceRecord],
    offered: float | None,
    scale: float,
    tpm: float,
) -> str:
    counts = ", ".join(
        f"{_shown_path(file.label, file.path)} ({file.format}, {len(file.rows):,})"
        if len(files) > 1
        else f"{_shown_path(file.label, file.path)}"
        for file in files
    )
    span = records[-1].arrival - records[0].arrival
    head = f"trace{'s' if len(files) > 1 else ''} {counts}: {len(records):,} requests over {span:,.0f} s"
    parts = [head]
    if workload.start is not None:
        from datetime import datetime, timezone

        parts[0] += f" from {datetime.fromtimestamp(workload.start, timezone.utc):%Y-%m-%d %H:%M:%S}"
    if scale != 1.0:
        parts.append(f"arrival times x {scale:.4g}")
    if offered is not None:
        rate = offered / scale
        parts.append(f"{rate:,.0f} actual tokens a minute = {rate / tpm:.2f}x the TPM limit")
    if any(file.format != "llmqd" for file in files):
        rules = []
        if args.urgent_share:
            rules.append(f"{100 * args.urgent_share:g} % URGENT")
        if args.priority:
            rules.append("priorities " + ", ".join(args.priority))
        parts.append("; ".join(rules) if rules else "priorities NORMAL")
        parts.append(f"tenants by {args.tenant_by}" if args.tenant_by != "none" else "no tenants")
        if args.estimate == "cap":
            caps = ", ".join(args.max_tokens)
            cut = f", {workload.cut:,} completions cut at their cap" if workload.cut else ""
            parts.append(f"estimates prompt + max_tokens ({caps}){cut}")
        else:
            parts.append("estimates = actual tokens")
    tenants = len({record.tenant for record in records})
    if tenants > 1:
        parts.append(f"{tenants:,} tenants")
    return ", ".join(parts)
