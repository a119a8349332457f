#!/usr/bin/env python3
"""The server time of the score policy's ranking alone (``lua/score_rank.lua``), without the
dispatch around it (the limiter, the lease, the index kept as the winner leaves).

Runs one read-only script per call: the queue's prelude and ``score_rank.lua`` of each build
given, then ``ranker.best`` once, timed inside the script with ``TIME`` (so neither the round
trip nor the script's start is counted), at an instant passed as the test suite's clock does
(the same instant for every call: every call ranks the same queue at the same moment). The
builds' calls alternate, one each in turn, and the median and tenth percentile per build are
printed. The default weights, URGENT first, A = ``--capacity``.

The queues are ones that `redis_compare._score_server_figures` filled (``--queue``, one for
every build or one per build in the order of ``--build``, on a server of your own:
``redis-server --save '' --appendonly no``); each build reads the index its own scripts keep,
so a build from before the cell summaries became a sorted set needs a queue it filled.

    python benches/score_rank_time.py --port 6399 --build . --queue score-1m-new \
        --build ../main --queue score-1m
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue", action="append", required=True)
    parser.add_argument("--build", type=Path, action="append", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--capacity", type=float, default=1e7)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "python"))
    import redis

    from llm_queue_dispatcher import ScoringWeights
    from llm_queue_dispatcher.redis import RedisStorage

    client = redis.Redis(port=args.port)
    queues = args.queue if len(args.queue) == len(args.build) else args.queue[:1] * len(args.build)
    url = f"redis://127.0.0.1:{args.port}/0"
    keys = [RedisStorage(url, queue)._keys[:21] for queue in queues]
    seconds, micros = client.time()
    now = seconds * 1_000_000 + micros
    weights = [repr(w) for w in ScoringWeights().as_tuple()]
    arguments = [f"{now} {now}", "00", "0", "0", *weights, repr(args.capacity), "1"]
    shas = [client.script_load(_script(build.resolve())) for build in args.build]
    times: list[list[int]] = [[] for _ in shas]
    winners: list[bytes] = [b""] * len(shas)
    for _ in range(args.calls):
        for n, sha in enumerate(shas):
            us, winners[n] = client.evalsha(sha, len(keys[n]), *keys[n], *arguments)
            times[n].append(int(us))
    for build, queue, took, winner in zip(args.build, queues, times, winners, strict=True):
        median, tenth = statistics.median(took), statistics.quantiles(took, n=10)[0]
        print(
            f"{build} on {queue}: ranking {median:.0f} µs median, {tenth:.0f} µs tenth percentile; "
            f"winner {winner.decode()}"
        )


if __name__ == "__main__":
    main()
