"""Batch enqueue throughput into an empty in-memory queue: ``.venv/bin/python benches/batch_enqueue.py``.

Prebuilt requests (building an `LLMRequest` is not what is measured) go into an empty queue in
one call, at each batch size, two ways:

* ``store``: `StoreCore.enqueue_batch`, the Rust store alone;
* ``dispatcher``: ``await dispatcher.batch_enqueue(requests)`` of `create_in_memory_queue`, the
  returned list dropped inside the timing, as ``benches/compare.py`` times its fill (so the
  young collection that follows a large batch, and freeing the messages, are included).

Each figure is the best of ``--repeat`` runs, each in a fresh process; with ``--baseline DIR``
(another checkout whose ``python/`` holds a built package, e.g. a clone of main after
``make build-dev``) the runs alternate between this tree and that one (each first every other
time), with this interpreter:

    .venv/bin/python benches/batch_enqueue.py --baseline /tmp/main-clone --sizes 1M --repeat 5

Throughput is reported from the thread's CPU time (what the machine's other load disturbs
least) and from the wall clock. Instructions per message, with the measured call alone
counted (it runs inside ``sorted``, which nothing else here calls):

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=builtin_sorted \
        .venv/bin/python benches/batch_enqueue.py --callgrind dispatcher --sizes 30k
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WAYS = ("store", "dispatcher")


def parse_size(text: str) -> int:
    scale = {"k": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def requests_of(size: int) -> list[Any]:
    from llm_queue_dispatcher import LLMRequest, Priority, TokenInfo

    payload = {"prompt": "benchmark"}
    return [
        LLMRequest(
            f"r{i:07d}",
            payload,
            Priority(i % 4),
            TokenInfo(50 + i * 7919 % 3950),
            expected_processing_time=None if i % 4 else 0.5 + i % 7,
        )
        for i in range(size)
    ]


def measure(way: str, size: int) -> dict[str, float]:
    """One fill of ``size`` messages into an empty queue, in this process."""
    from llm_queue_dispatcher import ManualClock, create_in_memory_queue
    from llm_queue_dispatcher._core import StoreCore

    requests = requests_of(size)
    gc.collect()
    clock = ManualClock(1.7e9)
    if way == "store":
        core = StoreCore(clock=clock)
        wall, cpu = time.perf_counter(), time.thread_time()
        core.enqueue_batch(requests)
    else:
        dispatcher = create_in_memory_queue(clock=clock)
        coroutine = dispatcher.batch_enqueue(requests)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            coroutine.send(None)  # the in-memory path never suspends
        except StopIteration:
            pass
        else:
            raise AssertionError("batch_enqueue suspended")
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return {"cpu_msgs_per_s": size / cpu, "wall_msgs_per_s": size / wall}


def callgrind_once(way: str, size: int) -> None:
    """One fill, for callgrind: the call (and for ``dispatcher`` the young collection and the
    freeing of the messages it returns) runs inside ``sorted``, the only call of it here."""
    from llm_queue_dispatcher import ManualClock, create_in_memory_queue
    from llm_queue_dispatcher._core import StoreCore

    requests = requests_of(size)
    gc.collect()

    def fill(_: object) -> int:
        if way == "store":
            StoreCore(clock=ManualClock(1.7e9)).enqueue_batch(requests)
            return 0
        coroutine = create_in_memory_queue(clock=ManualClock(1.7e9)).batch_enqueue(requests)
        with contextlib.suppress(StopIteration):  # the in-memory path never suspends
            coroutine.send(None)
        return 0

    sorted([0], key=fill)


def run(tree: Path | None, way: str, size: int) -> dict[str, float]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "python"), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--worker", way, "--sizes", str(size)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10k,100k,1M", help="comma-separated batch sizes")
    parser.add_argument("--ways", default=",".join(WAYS), help="store, dispatcher or both")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best is shown)")
    parser.add_argument("--baseline", type=Path, help="a built checkout to run alternately with this one")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--callgrind", choices=WAYS, help="one fill of the first size, for callgrind")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.callgrind:
        callgrind_once(args.callgrind, sizes[0])
        return
    if args.worker:
        print(json.dumps(measure(args.worker, sizes[0])))
        return
    trees: dict[str, Path | None] = {"this tree": None}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    for way in args.ways.split(","):
        for size in sizes:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for repetition in range(args.repeat):
                # Each tree goes first every other time: the load of the machine drifts.
                order = list(trees.items())[:: -1 if repetition % 2 else 1]
                for name, tree in order:
                    runs[name].append(run(tree, way, size))
            for name, results in runs.items():
                cpu = [r["cpu_msgs_per_s"] for r in results]
                wall = [r["wall_msgs_per_s"] for r in results]
                print(
                    f"{way:>10} {size:>9,} {name:>9}: best {max(cpu):>9,.0f} msgs/s CPU, "
                    f"{max(wall):>9,.0f} wall (runs, CPU: {', '.join(f'{c / 1000:,.0f}k' for c in cpu)})"
                )
            if "baseline" in runs:
                best = {name: max(r["cpu_msgs_per_s"] for r in results) for name, results in runs.items()}
                ratio = best["this tree"] / best["baseline"]
                print(f"{way:>10} {size:>9,} this tree / baseline, best CPU: {ratio:.2f}x")


if __name__ == "__main__":
    main()
