#!/usr/bin/env python3
"""The server time of the score policy's ranking alone (``lua/score_rank.lua``), without the
dispatch around it (the limiter, the lease, the index kept as the winner leaves); and, with
``--fresh``, of the whole dispatch script on a fresh queue.

Ranking alone: runs one read-only script per call: the queue's prelude and ``score_rank.lua``
of each build given, then ``ranker.best`` once, timed inside the script with ``TIME`` (so
neither the round trip nor the script's start is counted), at an instant passed as the test
suite's clock does (the same instant for every call: every call ranks the same queue at the
same moment). The builds' calls alternate, one each in turn, and the median and tenth
percentile per build are printed. The default weights, URGENT first, A = ``--capacity``.

The queues are ones that `redis_compare._score_server_figures` filled (``--queue``, one for
every build or one per build in the order of ``--build``, on a server of your own:
``redis-server --save '' --appendonly no``); each build reads the index its own scripts keep,
so a build whose index has another layout needs a queue it filled.

    python benches/score_rank_time.py --port 6399 --build . --queue score-1m-new \\
        --build ../main --queue score-1m

Fresh queues (``--fresh N``): each build's queue is filled, if empty, by that build's library
(a child process) with the messages of `redis_compare._score_fill`, on a manual clock that
spreads their enqueue instants over ``--span`` seconds (every message about as old as the
others: the case where the cells' oldest members bound alike); then, ``--rounds`` times, the
builds alternating, each build's dispatcher (default weights, URGENT first, a `RedisThrottle`
of 10,000,000 TPM, which binds only after about 5,000 dispatches: a round that meets it stops
with a message) dispatches ``--dispatches`` times on that clock, from
``--after`` seconds past the last enqueue and ``--step`` seconds further per dispatch (each
round goes on where the build's last one stopped), and the dispatch script's server time per
call (`INFO commandstats`, EVALSHA) is printed with the index range reads (ZRANGEBYLEX) the
scripts made per call, a count the machine's load does not move; the ranking alone is then
timed at the instant the build's last round reached. With ``--winners N`` each dispatch is one
call for N winners (a Worker's free handlers ask so): the figures are per call, the printed
line also per winner.

    python benches/score_rank_time.py --port 6399 --fresh 1000000 --build . --queue fresh-new \\
        --build /tmp/base --queue fresh-base

Instructions (``--callgrind PID``): the server on ``--port`` runs under ``valgrind
--tool=callgrind`` (process PID, its dumps written to ``--callgrind-dir``: started with
``--callgrind-out-file=DIR/cg.%p``, and with ``--instr-atstart=no`` plus ``callgrind_control -i
on`` once its queues are loaded, since a fill under callgrind takes hours: fill a plain server,
``SAVE``, and start the callgrind one on that dump). Each round then also counts the
instructions of the dispatch scripts (``EVALSHA`` inclusive: the script and every command it
calls) per call, which the machine's load does not move (redis_script_instructions.py's
counting); the ranking alone is not timed then.

    python benches/score_rank_time.py --port 6399 --fresh 1000000 --build . --queue fresh-new \\
        --build /tmp/base --queue fresh-base --callgrind 12345 --callgrind-dir /tmp/cg
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Runs after the prelude and score_rank.lua: ARGV[5..10] the weights, ARGV[11] A (and the
# largest estimate ranked), ARGV[12] urgent_first. Returns the microseconds ranked and the
# winner's member.
_RANK = """
local weights = {}
for i = 1, 6 do
  weights[i] = tonumber(ARGV[4 + i])
end
local capacity = tonumber(ARGV[11])
local started = redis.call('TIME')
local ranker = TWO_CAPACITIES and score_ranker(weights, capacity, capacity, ARGV[12] == '1')
  or score_ranker(weights, capacity, ARGV[12] == '1')
local best = ranker.best({n = 0}, function() end)
local ended = redis.call('TIME')
local us = (tonumber(ended[1]) - tonumber(started[1])) * 1000000 + tonumber(ended[2]) - tonumber(started[2])
return {us, best and best.member or ''}
"""


def _script(build: Path) -> str:
    """The ranking script of the checkout ``build``."""
    lua = build / "python" / "llm_queue_dispatcher" / "redis" / "lua"

    def source(name: str) -> str:
        return (lua / f"{name}.lua").read_text(encoding="utf-8")

    rank = source("score_rank")
    # The ranker took (weights, A, urgent_first) before it took the largest estimate ranked too.
    two = "score_ranker(W, C, M, urgent_first)" in rank
    parts = [source("common"), source("score_index"), source("queue_common"), rank]
    return "\n".join([*parts, f"local TWO_CAPACITIES = {'true' if two else 'false'}", _RANK])


def _clock_key(queue: str) -> str:
    """Where a fresh queue's manual clock is kept between rounds (its last reading, seconds)."""
    return f"bench:score-fresh:{queue}:clock"


def _zero_counters(pid: int) -> None:
    """Zeroes the counters of the callgrind process ``pid``."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


async def _fresh_round(
    port: int,
    queue: str,
    fill: int,
    span: float,
    after: float,
    step: float,
    dispatches: int,
    callgrind: tuple[int, Path] | None = None,
    winners: int = 1,
) -> dict[str, Any]:
    """One round of ``--fresh`` in this process's library: fills ``queue`` if it is empty, then
    dispatches ``dispatches`` times on the queue's manual clock. Returns the dispatch script's
    mean server time per call, the clock's reading after the round and, with ``callgrind`` (the
    server's valgrind process and dump directory), the instructions per call. With ``winners``
    above 1, each dispatch is one call for that many winners (as a Worker's free handlers ask)."""
    import redis.asyncio as aioredis

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benches"))
    from redis_compare import _score_fill

    from llm_queue_dispatcher import LLMQueueDispatcher, LLMQueueDispatcherConfig, ManualClock
    from tests.redis.support import ClockedRedisStorage, ClockedRedisThrottle

    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    kept = await client.get(_clock_key(queue))
    if kept is None:
        seconds, micros = await client.time()
        clock = ManualClock(seconds + micros / 1e6)
    else:
        clock = ManualClock(float(kept))
    storage: Any = ClockedRedisStorage(url, queue, clock=clock)
    async with storage:
        if kept is None:
            batch = 1_000
            per_batch = span * batch / fill

            class Spread:
                """The storage as `_score_fill` uses it, the clock moving on after each batch."""

                async def batch_enqueue(self, requests: list[Any]) -> Any:
                    done = await storage.batch_enqueue(requests)
                    clock.advance(per_batch)
                    return done

            await _score_fill(Spread(), fill)
            clock.advance(after)
        limiter = ClockedRedisThrottle(url, f"score-fresh-{queue}", rpm=1e12, tpm=1e7, clock=clock)
        config = LLMQueueDispatcherConfig(visibility_timeout=3600.0, clock=clock)
        async with limiter, LLMQueueDispatcher(storage, config) as dispatcher:
            assert dispatcher._global is not None
            await limiter.can_process(0)
            await dispatcher.dequeue(limiter)  # the index filled if needed, the script loaded
            clock.advance(step)
            await client.config_resetstat()
            if callgrind is not None:
                _zero_counters(callgrind[0])
            for _ in range(dispatches):
                if winners == 1:
                    taken = int(await dispatcher.dequeue(limiter) is not None)
                else:
                    taken = len(await dispatcher._dequeue_up_to(limiter, winners))
                if taken < winners:
                    # The winners' estimates (about 2,000 tokens each) used up the budget.
                    raise SystemExit("the limiter's 10,000,000 TPM bind: the queue is drained too far")
                clock.advance(step)
            commands = await client.info("commandstats")
            instructions = None
            if callgrind is not None:
                from redis_script_instructions import dump_instructions

                instructions = dump_instructions(callgrind[0], callgrind[1])[0] / dispatches
    stats = commands["cmdstat_evalsha"]
    ranges = commands.get("cmdstat_zrangebylex", {"calls": 0})
    await client.set(_clock_key(queue), repr(clock()))
    await client.aclose()
    return {
        "dispatch_us": float(stats["usec"]) / int(stats["calls"]),
        "ranges": int(ranges["calls"]) / int(stats["calls"]),
        "clock": clock(),
        "instructions": instructions,
    }


def _rank_times(
    port: int, builds: list[Path], queues: list[str], calls: int, capacity: float, now: list[int] | None
) -> None:
    """Times the ranking alone of each build on its queue, the builds alternating (see the
    module docstring); ``now``: the instant (us) per build, else the server's."""
    sys.path.insert(0, str(ROOT / "python"))
    import redis

    from llm_queue_dispatcher import ScoringWeights
    from llm_queue_dispatcher.redis import RedisStorage

    client = redis.Redis(port=port)
    url = f"redis://127.0.0.1:{port}/0"
    keys = [RedisStorage(url, queue)._keys[:21] for queue in queues]
    if now is None:
        seconds, micros = client.time()
        now = [seconds * 1_000_000 + micros] * len(builds)
    weights = [repr(w) for w in ScoringWeights().as_tuple()]
    shas = [client.script_load(_script(build.resolve())) for build in builds]
    times: list[list[int]] = [[] for _ in shas]
    winners: list[bytes] = [b""] * len(shas)
    for _ in range(calls):
        for n, sha in enumerate(shas):
            arguments = [f"{now[n]} {now[n]}", "00", "0", "0", *weights, repr(capacity), "1"]
            us, winners[n] = client.evalsha(sha, len(keys[n]), *keys[n], *arguments)
            times[n].append(int(us))
    for build, queue, took, winner in zip(builds, queues, times, winners, strict=True):
        median, tenth = statistics.median(took), statistics.quantiles(took, n=10)[0]
        print(
            f"{build} on {queue}: ranking {median:.0f} µs median, {tenth:.0f} µs tenth percentile; "
            f"winner {winner.decode()}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue", action="append", required=True)
    parser.add_argument("--build", type=Path, action="append", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--capacity", type=float, default=1e7)
    parser.add_argument("--fresh", type=int, default=0, help="fill each queue with this many fresh messages")
    parser.add_argument("--span", type=float, default=2.0, help="seconds the fresh messages' enqueues span")
    parser.add_argument(
        "--after", type=float, default=1.0, help="seconds from the last enqueue to the first dispatch"
    )
    parser.add_argument("--step", type=float, default=0.001, help="seconds the clock moves per dispatch")
    parser.add_argument("--dispatches", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--winners", type=int, default=1, help="winners per dispatch call (default 1)")
    parser.add_argument("--callgrind", type=int, default=0, help="the valgrind process of the server")
    parser.add_argument("--callgrind-dir", type=Path, default=None, help="where that server writes dumps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    queues = args.queue if len(args.queue) == len(args.build) else args.queue[:1] * len(args.build)
    if args.callgrind and args.callgrind_dir is None:
        parser.error("--callgrind needs --callgrind-dir")
    callgrind = (args.callgrind, args.callgrind_dir.resolve()) if args.callgrind else None
    if args.child:
        round_args = (args.fresh, args.span, args.after, args.step, args.dispatches, callgrind, args.winners)
        figures = asyncio.run(_fresh_round(args.port, queues[0], *round_args))
        print(json.dumps(figures))
        return
    if not args.fresh:
        _rank_times(args.port, args.build, queues, args.calls, args.capacity, None)
        return
    clocks = [0.0] * len(args.build)
    for round_ in range(args.rounds):
        order = list(range(len(args.build)))
        if round_ % 2:
            order.reverse()  # alternate which build goes first
        for n in order:
            build = args.build[n].resolve()
            env = {**os.environ, "PYTHONPATH": str(build / "python")}
            command = [
                sys.executable, __file__, "--child", "--port", str(args.port), "--queue", queues[n],
                "--build", str(build), "--fresh", str(args.fresh), "--span", str(args.span),
                "--after", str(args.after), "--step", str(args.step), "--dispatches", str(args.dispatches),
                "--winners", str(args.winners),
            ]  # fmt: skip
            if callgrind is not None:
                command += ["--callgrind", str(callgrind[0]), "--callgrind-dir", str(callgrind[1])]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=3600)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            clocks[n] = figures["clock"]
            load = os.getloadavg()[0]
            counted = "" if callgrind is None else f", {figures['instructions']:,.0f} instructions per call"
            if args.winners > 1:
                counted += f" ({figures['dispatch_us'] / args.winners:.0f} µs per winner"
                if callgrind is not None:
                    counted += f", {figures['instructions'] / args.winners:,.0f} instructions"
                counted += ")"
            print(
                f"round {round_ + 1}, {args.build[n]} on {queues[n]}: dispatch script "
                f"{figures['dispatch_us']:.0f} µs per call, {figures['ranges']:.1f} index range reads "
                f"(ZRANGEBYLEX) per call{counted} (load {load:.1f})",
                flush=True,
            )
    if callgrind is not None:
        return  # timed figures of a server under valgrind tell nothing
    _rank_times(
        args.port, args.build, queues, args.calls, args.capacity, [round(c * 1_000_000) for c in clocks]
    )


if __name__ == "__main__":
    main()
