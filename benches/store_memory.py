"""Memory and latency of the in-memory store's Rust core, beside the plain-Python reference.

    .venv/bin/python benches/store_memory.py [--messages 1000000] [--depths 1000,100000,1000000]
        [--chunk 10000]

Prints: RSS growth per queued message at ``--messages`` (the `LLMRequest` objects are created
before the first reading, so payload objects are excluded); batch-enqueue throughput; p50/p99 of
one sync ``dequeue(1)`` + ``delete`` at each depth (a fresh message is enqueued untimed after each
pair, so the depth stays constant). Figures go to benches/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_queue_dispatcher import LLMRequest, ManualClock, Priority, TokenInfo
from llm_queue_dispatcher._core import StoreCore
from tests.conformance.support import run
from tests.reference.storage import ReferenceStorage

CHUNK = 10_000
PAGE = os.sysconf("SC_PAGE_SIZE")
FREEZE = False  # --gc-freeze: move the bulk-created requests out of the collector's sight


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def make_requests(prefix: str, n: int) -> list[LLMRequest[int]]:
    return [
        LLMRequest(
            id=f"{prefix}{i:07d}", payload=i, priority=Priority(i % 4), token_info=TokenInfo(50 + i % 3000)
        )
        for i in range(n)
    ]


def memory_per_message(n: int) -> float:
    requests = make_requests("m", n)
    core = StoreCore(clock=ManualClock(), message_retention=float("inf"))
    gc.collect()
    before = rss()
    for start in range(0, n, CHUNK):
        core.enqueue_batch(requests[start : start + CHUNK])
    gc.collect()
    after = rss()
    assert core.visible_count() == n
    return (after - before) / n


def batch_throughput(kind: str, n: int) -> float:
    requests = make_requests("t", n)
    clock = ManualClock()
    if kind == "rust":
        core = StoreCore(clock=clock, message_retention=float("inf"))
        started = time.perf_counter()
        for start in range(0, n, CHUNK):
            core.enqueue_batch(requests[start : start + CHUNK])
    else:
        storage: Any = ReferenceStorage(clock=clock, message_retention=float("inf"))
        started = time.perf_counter()
        for start in range(0, n, CHUNK):
            run(storage.batch_enqueue(requests[start : start + CHUNK]))
    return n / (time.perf_counter() - started)


def dequeue_delete_latency(kind: str, depth: int, iterations: int) -> tuple[float, float]:
    clock = ManualClock()
    requests = make_requests("d", depth)
    fresh = iter(make_requests("f", iterations))
    samples: list[int] = []
    timer = time.perf_counter_ns
    if kind == "rust":
        core = StoreCore(clock=clock, message_retention=float("inf"))
        for start in range(0, depth, CHUNK):
            core.enqueue_batch(requests[start : start + CHUNK])
        del requests
        for _ in range(iterations):
            t0 = timer()
            [message] = core.dequeue(1, 30.0)
            core.delete(message.attributes.receipt_handle)
            samples.append(timer() - t0)
            core.enqueue(next(fresh))
    else:
        storage: Any = ReferenceStorage(clock=clock, message_retention=float("inf"))
        for start in range(0, depth, CHUNK):
            run(storage.batch_enqueue(requests[start : start + CHUNK]))
        del requests
        for _ in range(iterations):
            t0 = timer()
            [message] = run(storage.dequeue(1, 30.0))
            run(storage.delete_message(message.attributes.receipt_handle))
            samples.append(timer() - t0)
            run(storage.enqueue(next(fresh)))
    samples.sort()
    p50 = statistics.median(samples) / 1000
    p99 = samples[int(len(samples) * 0.99)] / 1000
    return p50, p99


def main() -> None:
    global FREEZE, CHUNK
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--depths", default="1000,100000,1000000")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after creating requests")
    parser.add_argument("--chunk", type=int, default=CHUNK, help=f"messages per batch (default {CHUNK:,})")
    args = parser.parse_args()
    FREEZE = args.gc_freeze
    CHUNK = max(1, args.chunk)
    print(f"RSS per queued message at {args.messages:,} (Rust core, payloads excluded):")
    print(f"  {memory_per_message(args.messages):.0f} B")
    print(f"batch enqueue ({CHUNK:,} per batch, {args.messages:,} messages), messages/s:")
    for kind in ("rust", "python"):
        print(f"  {kind:6s} {batch_throughput(kind, args.messages):,.0f}")
    print("sync dequeue(1) + delete, µs (p50 / p99):")
    for depth in (int(d) for d in args.depths.split(",")):
        for kind in ("rust", "python"):
            p50, p99 = dequeue_delete_latency(kind, depth, args.iterations)
            print(f"  depth {depth:>9,}  {kind:6s} {p50:6.2f} / {p99:6.2f}")


if __name__ == "__main__":
    main()
