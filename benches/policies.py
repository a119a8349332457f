"""The dequeue+ack round trip of each scheduling policy, side by side in one run.

    .venv/bin/python benches/policies.py [--depths 1k,100k,1M] [--rounds 3000] [--tenants 8]

For each depth, one in-memory dispatcher per policy is filled with the same requests (8 tenants,
one sending 80 % of them, as the overload workload of issue 10), then rounds of dequeue, mark
processed and enqueue one more (so the depth stays constant) alternate between the policies,
so the machine's noise falls on all of them alike. Coroutines are driven without an event loop
(the in-memory path never suspends), as in benches/test_dispatcher_bench.py. Prints p50/p99 in
µs and each policy's p50 relative to the score policy's (budget held, the default).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    TokenInfo,
    create_fair_priority_queue,
    create_in_memory_queue,
)
from tests.conformance.support import run

POLICIES: dict[str, Callable[[ManualClock], LLMQueueDispatcher[int]]] = {
    "score (budget held)": lambda clock: create_in_memory_queue(clock=clock),
    "score (seed rule)": lambda clock: create_in_memory_queue(clock=clock, hold_budget=False),
    "fair_priority": lambda clock: create_fair_priority_queue(clock=clock),
}


def workload(tenants: int, seed: int = 7) -> Iterator[LLMRequest[int]]:
    rng = random.Random(seed)
    names = [f"t{i}" for i in range(tenants)]
    for i in range(10**12):
        heavy = rng.random() < 0.8
        yield LLMRequest(
            id=f"r{i}",
            payload=i,
            priority=rng.choices((0, 1, 2, 3), weights=(5, 20, 50, 25))[0],
            token_info=TokenInfo(min(16_000, max(20, int(rng.lognormvariate(6.68, 1.0))))),
            tenant=names[0] if heavy else rng.choice(names[1:] or names),
        )


def parse_depth(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", default="1k,100k,1M")
    parser.add_argument("--rounds", type=int, default=3_000)
    parser.add_argument("--tenants", type=int, default=8)
    args = parser.parse_args()
    print(f"{'depth':>9}  {'policy':<20} {'p50 µs':>8} {'p99 µs':>9} {'p50 / score':>12}")
    for depth in (parse_depth(d) for d in args.depths.split(",")):
        states: dict[str, Any] = {}
        for name, make in POLICIES.items():
            clock = ManualClock(1_700_000_000.0)
            dispatcher = make(clock)
            source = workload(args.tenants)
            batch = [next(source) for _ in range(depth)]
            for start in range(0, depth, 100_000):
                run(dispatcher.batch_enqueue(batch[start : start + 100_000]))
            del batch
            limiter = LLMThrottle(1e12, 1e15, clock=clock, max_history_records=1_000)
            ahead = iter([next(source) for _ in range(args.rounds + 100)])
            states[name] = (dispatcher, limiter, clock, ahead, [])
        gc.collect()

        def one(state: Any) -> float:
            dispatcher, limiter, clock, ahead, _ = state
            clock.advance(0.001)
            started = time.perf_counter()
            job = run(dispatcher.dequeue(limiter))
            assert job is not None
            run(job.mark_as_processed())
            run(dispatcher.enqueue(next(ahead)))
            return time.perf_counter() - started

        for _ in range(100):
            for state in states.values():
                one(state)
        for _ in range(args.rounds):
            for state in states.values():
                state[4].append(one(state))
        base = statistics.median(states["score (budget held)"][4])
        for name, state in states.items():
            samples = sorted(state[4])
            p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
            print(f"{depth:>9,}  {name:<20} {p50 * 1e6:>8.2f} {p99 * 1e6:>9.1f} {p50 / base:>11.2f}x")
        states.clear()
        gc.collect()


if __name__ == "__main__":
    main()
