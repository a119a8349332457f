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
    python benches/callgrind_round.py --await               # the rounds awaited in a coroutine

``--floor`` measures the same loop with the package replaced by stand-ins that do no work, two
kinds: two empty coroutines (``coroutines``: what any ``async def`` API costs the interpreter
per round, the loop included), and two awaitables already complete of the kind the marks
return, each made by one call into the core (``ready``: the least any awaitable API costs this
loop; a `dequeue` returning such an object instead of a coroutine cannot go below it). The
Python layer's figure includes the loop's cost.

One round is what a worker does per request: ``job = await dispatcher.dequeue(limiter)``, then
``await job.mark_as_processed()``. By default each awaitable is driven on its own with
``send(None)`` (the in-memory path never suspends), as ``benches/test_dispatcher_bench.py``
does: each costs the loop a ``StopIteration`` caught in Python. With ``--await`` the rounds run
inside one coroutine, awaiting each as a worker's loop does, driven by one ``send(None)``. No
event loop is counted either way.
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
STEP = CLOCK_STEP
{loop}
"""

# The rounds, each awaitable driven on its own (`run`), or awaited in one coroutine (`--await`).
SEND_LOOP = """
for _ in range(rounds):
    clock.advance(STEP)
    job = run(dispatcher.dequeue(throttle))
    run(job.{mark})
"""
AWAIT_LOOP = """
async def rounds_of(count):
    for _ in range(count):
        clock.advance(STEP)
        job = await dispatcher.dequeue(throttle)
        await job.{mark}
run(rounds_of(rounds))
"""

# The same loop with the package replaced by stand-ins that do no work (see ``--floor``).
FLOOR = r"""
from llm_queue_dispatcher import (
    LLMRequest, LLMThrottle, ManualClock, Priority, TokenInfo, create_in_memory_queue)

def run(coro):
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("suspended")

class Coroutines:
    async def dequeue(self, limiter):
        return self

    async def mark_as_processed(self):
        return None

class Ready:
    # `__aenter__` of a job returns an awaitable already complete with the job; `__aexit__` of
    # a job already marked one complete with None: one call into the core each.
    def __init__(self, job):
        self.job = job

    def dequeue(self, limiter):
        return self.job.__aenter__()

clock = ManualClock(start=1.0)
throttle = LLMThrottle(60, 10_000, clock=clock)
queued = create_in_memory_queue(clock=clock)
run(queued.enqueue(LLMRequest("a", "hi", Priority.LOW, TokenInfo(10))))
settled = run(queued.dequeue(throttle))
run(settled.mark_as_processed())
dispatcher = Coroutines() if {kind!r} == "coroutines" else Ready(settled)
rounds = {rounds}
STEP = 0.001
{loop}
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


def instructions(
    python: str, depth: int, rounds: int, fill: int, floor: str | None = None, awaited: bool = False
) -> dict[str, int]:
    """Callgrind's instruction counts of one child run (``floor``: of a stand-in's loop, its
    kind): in all, and in and outside the core."""
    mark = "__aexit__(None, None, None)" if floor == "ready" else "mark_as_processed()"
    loop = (AWAIT_LOOP if awaited else SEND_LOOP).format(mark=mark)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        template = CHILD if floor is None else FLOOR
        code = template.format(
            root=str(HERE.parent), depth=depth, rounds=rounds, fill=fill, kind=floor, loop=loop
        )
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
        "--floor", action="store_true", help="also measure the loop with stand-ins that do no work in place"
    )
    parser.add_argument(
        "--await", dest="awaited", action="store_true", help="await the rounds in one coroutine"
    )
    args = parser.parse_args()
    fill = args.depth + args.rounds + args.extra

    def per_round(floor: str | None) -> dict[str, int]:
        base = instructions(args.python, args.depth, args.rounds, fill, floor, args.awaited)
        more = instructions(args.python, args.depth, args.rounds + args.extra, fill, floor, args.awaited)
        return {k: round((more[k] - base[k]) / args.extra) for k in base}

    figures = {"per_round": per_round(None)}
    if args.floor:
        figures["floor_per_round"] = per_round("coroutines")
        figures["ready_floor_per_round"] = per_round("ready")
    loop = "await" if args.awaited else "send"
    print(json.dumps({"python": args.python, "depth": args.depth, "loop": loop, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
