"""Scaling table: async dequeue+ack round trip by queue depth, and by number of custom scorers.

    .venv/bin/python benches/scaling.py [--rounds 2000]

Prints a Markdown table of p50/p99 in µs. Same workload and drivers as
``benches/test_dispatcher_bench.py`` (coroutines driven without an event loop: the in-memory
path never suspends).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_dispatcher_bench as bench

from llm_queue_dispatcher import LLMQueueDispatcherConfig, ScoringConfig


def measure(depth: int, scorers: int, rounds: int) -> tuple[float, float]:
    config = (
        LLMQueueDispatcherConfig(
            scoring=ScoringConfig(custom_scorers=[bench._scorer(f"s{i}") for i in range(scorers)])
        )
        if scorers
        else None
    )
    bench.ROUNDS, bench.WARMUP = rounds, 100
    dispatcher, state = bench.filled(depth, config)
    one = bench.round_trip(dispatcher, state)
    for _ in range(100):
        one()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        one()
        samples.append(time.perf_counter() - started)
    samples.sort()
    del dispatcher, state, one
    gc.collect()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2_000)
    args = parser.parse_args()
    print("| queue depth | custom scorers | p50 µs | p99 µs |")
    print("|---:|---:|---:|---:|")
    for depth in (1_000, 10_000, 100_000, 1_000_000):
        p50, p99 = measure(depth, 0, args.rounds)
        print(f"| {depth:,} | 0 | {p50:.2f} | {p99:.2f} |", flush=True)
    for scorers in (1, 2, 3, 4):
        p50, p99 = measure(10_000, scorers, args.rounds // 4)
        print(f"| 10,000 | {scorers} | {p50:.2f} | {p99:.2f} |", flush=True)


if __name__ == "__main__":
    main()
