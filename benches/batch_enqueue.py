"""Batch enqueue throughput of the Rust store core: ``.venv/bin/python benches/batch_enqueue.py``.

Prebuilt requests (building an `LLMRequest` is not what is measured) go into an empty store in one
`StoreCore.enqueue_batch` call, at three batch sizes.
"""

from __future__ import annotations

import gc
import time

from llm_queue_dispatcher import LLMRequest, ManualClock, TokenInfo
from llm_queue_dispatcher._core import StoreCore


def main() -> None:
    for size in (10_000, 100_000, 1_000_000):
        requests = [LLMRequest(f"r{i}", i, i % 4, TokenInfo(50 + i % 3000)) for i in range(size)]
        core = StoreCore(clock=ManualClock(1.7e9))
        started = time.perf_counter()
        core.enqueue_batch(requests)
        elapsed = time.perf_counter() - started
        print(f"{size:>9,} messages: {size / elapsed:,.0f} msgs/s")
        del core, requests
        gc.collect()


if __name__ == "__main__":
    main()
