"""The reference workload on real traffic: `llmqd simulate` over the Azure LLM inference trace 2023.

    .venv/bin/python benches/real_traffic.py --traces DIR [--loads 1.3,2] [--strategy all]

DIR holds the published files ``AzureLLMInferenceTrace_conv.csv`` and
``AzureLLMInferenceTrace_code.csv`` (https://github.com/Azure/AzurePublicDataset, ``data/``;
CC-BY 4.0, cite Patel et al., "Splitwise", ISCA 2024). The workload: the two files merged on
their timestamps; a seeded 2 % of requests URGENT; conversation requests HIGH, code requests
NORMAL or LOW half and half (seeded); tenants = the file (``conv``, ``code``), or one tenant;
estimates = the actual tokens, or the prompt + a max_tokens cap (1,000 conversation, 2,048
code); the TPM limit set so that the actual tokens a minute over the hour are ``--loads`` times
it; RPM twice the mean arrivals a minute; 256 concurrent calls.

For each load, estimate mode and tenancy it prints the one command line that reproduces the run,
then a row per strategy: p99 waits per priority, URGENT's SLO attainment, the light tenants' p99
(none at these loads: both services send more than half the capacity), Jain's index over 60 s
windows, utilisation up to the last dispatch, priority inversions, the binding limit and the CPU
time of the run (its wall time, in the JSON, depends on what else the machine runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from llm_queue_dispatcher.cli import main

ESTIMATES = {
    "actual": [],
    "cap": ["--estimate", "cap", "--max-tokens", "conv=1000", "--max-tokens", "code=2048"],
}
TENANCY = {"tenants": ["--tenant-by", "file"], "one tenant": ["--tenant-by", "none"]}


def command(traces: Path, load: str, estimate: str, tenancy: str, strategies: list[str]) -> list[str]:
    """The `llmqd simulate` arguments of one run of the reference workload."""
    return [
        "simulate",
        "--trace",
        f"conv={traces / 'AzureLLMInferenceTrace_conv.csv'}",
        "--trace",
        f"code={traces / 'AzureLLMInferenceTrace_code.csv'}",
        "--urgent-share",
        "0.02",
        "--priority",
        "conv=HIGH",
        "--priority",
        "code=NORMAL,LOW",
        *TENANCY[tenancy],
        *ESTIMATES[estimate],
        "--load",
        load,
        "--concurrency",
        "256",
        *(argument for name in strategies for argument in ("--strategy", name)),
    ]


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def row(result: dict[str, Any]) -> str:
    waits = result["wait_s"]
    tenants = result["tenants"]
    light = seconds(tenants["light_wait_s"]["p99"]) if tenants else "-"
    if tenants and not tenants["light"]:
        light = "none"
    urgent_slo = result["slo_attainment"]["URGENT"]
    jain = result["fairness"]["jain_mean"]
    cells = [
        result["strategy"],
        *(seconds(waits[name]["p99"]) for name in ("URGENT", "HIGH", "NORMAL", "LOW")),
        "-" if urgent_slo is None else f"{100 * urgent_slo:.1f}%",
        light,
        "-" if jain is None else f"{jain:.3f}",
        f"{result['dispatch_utilisation']:.3f}",
        f"{result['priority_inversions']:,}",
        result["binding_limit"] or "none",
        f"{result['cpu_time_s']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| strategy | URGENT p99 | HIGH p99 | NORMAL p99 | LOW p99 | URGENT <= 1 s | light p99 | Jain | "
    "util | inversions | binding | CPU s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
)


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", type=Path, required=True, help="the directory of the two Azure files")
    parser.add_argument("--loads", default="1.3,2", help="comma-separated loads (default 1.3,2)")
    parser.add_argument("--strategy", action="append", help="strategies (default: all)")
    parser.add_argument("--estimates", default="actual,cap", help="estimate modes (default actual,cap)")
    parser.add_argument("--tenancy", default="tenants,one tenant", help="tenancies (default both)")
    args = parser.parse_args(argv)
    strategies = args.strategy or ["all"]
    for load in args.loads.split(","):
        for estimate in args.estimates.split(","):
            for tenancy in args.tenancy.split(","):
                arguments = command(args.traces, load, estimate, tenancy, strategies)
                print(f"\n#### {load}x, estimates {estimate}, {tenancy}\n")
                print("```console\n$ llmqd " + shlex.join(arguments) + "\n```\n")
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    status = main([*arguments, "--json", "--progress", "none"])
                if status != 0:
                    return status
                print(HEADER)
                for result in json.loads(out.getvalue()):
                    print(row(result))
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main_())
