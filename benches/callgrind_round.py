#!/usr/bin/env python3
"""Machine instructions per dequeue + ack round trip, split in two: those run inside calls into
the Rust core (``_core*.so``, inclusive: the libpython and libc work the core asks for is the
core's) and the rest, the Python layer (the interpreter running the package's Python code and
this loop). Measured with ``valgrind --tool=callgrind`` on the round trip of
``benches/compare.py``'s workload (in-memory store, ``LLMThrottle``, default config), as the
difference between a run of ``--rounds`` + ``--extra`` rounds and one of ``--rounds`` rounds,
so setup (filling the queue, imports) cancels out.

    python benches/callgrind_round.py                       # this tree's package
    python benches/callgrind_round.py --python OTHER/python # another build (e.g. main's)
    python benches/callgrind_round.py --floor               # and the loop's own cost

``--floor`` measures the same loop with the dispatcher and the job replaced by empty coroutines:
the interpreter's cost of any awaitable API driven this way (the loop, two coroutines created
and finished per round), which the Python layer's figure includes.

One round is what a worker does per request: ``job = await dispatcher.dequeue(limiter)``, then
``await job.mark_as_processed()``; the coroutines are driven with ``send(None)`` (the in-memory
path never suspends), as ``benches/test_dispatcher_bench.py`` does, so no event loop is counted.
The queue holds ``--depth`` messages more than the rounds take, so no enqueue is counted (as in
``compare.py``, where the enqueue that keeps the depth is timed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import sys
sys.path.insert(0, {root!r})
from benches.compare import CLOCK_START, CLOCK_STEP, LIMIT, take, workload
from llm_queue_dispatcher import (
    LLMRequest, LLMThrottle, ManualClock, Priority, TokenInfo, create_in_memory_queue)

def run(coro):
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("suspended")

payload = {{"prompt": "benchmark"}}
def request(item):
    return LLMRequest(
        id=item.id, payload=payload, priority=Priority(item.priority), token_info=TokenInfo(item.tokens),
        expected_processing_time=item.expected_processing_time)
stream = workload(20240601)
clock = ManualClock(start=CLOCK_START)
dispatcher = create_in_memory_queue(clock=clock)
throttle = LLMThrottle(LIMIT, LIMIT, clock=clock, max_history_records=1_000)
rounds = {rounds}
# Both runs fill the queue alike, with a message for each round of the longer run too: the
# depth stays at least {depth}, and no enqueue (timed apart in compare.py) is counted.
run(dispatcher.batch_enqueue([request(item) for item in take(stream, {fill})]))
for _ in range(rounds):
    clock.advance(CLOCK_STEP)
    job = run(dispatcher.dequeue(throttle))
    run(job.mark_as_processed())
"""


# The same loop with the package replaced by two empty coroutines: what any awaitable API costs
# the interpreter per round (the loop, `run`, creating and finishing a coroutine twice).
FLOOR = r"""
from llm_queue_dispatcher import ManualClock

def run(coro):
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("suspended")

class Job:
    async def mark_as_processed(self):
        return None

class Dispatcher:
    async def dequeue(self, limiter):
        return limiter

dispatcher, job, clock = Dispatcher(), Job(), ManualClock(start=1.0)
rounds = {rounds}
for _ in range(rounds):
    clock.advance(0.001)
    got = run(dispatcher.dequeue(job))
    run(got.mark_as_processed())
"""


def _split(path: Path) -> dict[str, int]:
    """Total instructions of a callgrind profile, and those spent inside calls from outside the
    Rust extension into it (inclusive: the libpython and libc work the core asks for counts as
    the core's). The rest ran outside the core: the interpreter running Python code."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}

    def name(kind: str, text: str) -> str:
        match = re.match(r"\((\d+)\)(?:\s+(.*))?", text)
        if match is None:
            return text
        if match.group(2) is not None:
            names[kind][match.group(1)] = match.group(2)
        return names[kind][match.group(1)]

    total = into_core = 0
    ob = cob = ""
    call = False
    with path.open() as lines:
        for line in lines:
            if line.startswith("ob="):
                ob = name("ob", line[3:].strip())
            elif line.startswith("fn="):
                cob = ""
            elif line.startswith("cob="):
                cob = name("ob", line[4:].strip())
            elif line.startswith("cfn="):
                name("fn", line[4:].strip())
            elif line.startswith("fl=") or line.startswith("fi=") or line.startswith("fe="):
                continue
            elif line.startswith("calls="):
                call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2:
                    continue
                cost = int(parts[1])
                if not call:
                    total += cost
                elif "_core" not in ob and "_core" in (cob or ob):
                    into_core += cost
                if call:
                    call = False
                    cob = ""
            if line.startswith("fn="):
                name("fn", line[3:].strip())
    return {"total": total, "core": into_core, "python": total - into_core}


def instructions(python: str, depth: int, rounds: int, fill: int, floor: bool = False) -> dict[str, int]:
    """Callgrind's instruction counts of one child run: in all, and in and outside the core."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        template = FLOOR if floor else CHILD
        code = template.format(root=str(HERE.parent), depth=depth, rounds=rounds, fill=fill)
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, "-c", code],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        return _split(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose package is measured")
    parser.add_argument("--depth", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=2_000)
    parser.add_argument("--extra", type=int, default=4_000)
    parser.add_argument(
        "--floor", action="store_true", help="also measure the loop with two empty coroutines in place"
    )
    args = parser.parse_args()
    fill = args.depth + args.rounds + args.extra

    def per_round(floor: bool) -> dict[str, int]:
        base = instructions(args.python, args.depth, args.rounds, fill, floor)
        more = instructions(args.python, args.depth, args.rounds + args.extra, fill, floor)
        return {k: round((more[k] - base[k]) / args.extra) for k in base}

    figures = {"per_round": per_round(False)}
    if args.floor:
        figures["floor_per_round"] = per_round(True)
    print(json.dumps({"python": args.python, "depth": args.depth, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
