"""Server instructions per call of the global scripts' preludes: what every call of
``global_dispatch.lua`` and ``global_mark.lua`` pays before its own work, counted by callgrind.

Each variant below is the global dispatch script's source cut short (``return 1`` after the
part named), loaded once and sent ``--calls`` times by ``EVALSHA`` to a redis-server under
``valgrind --tool=callgrind`` on an empty database; it prints ``EVALSHA``'s inclusive
instructions per call:

* ``empty``: ``return 1`` alone (the cost of a script call itself);
* ``queue prelude``: ``common.lua`` and the queue's prelude (``score_index.lua``,
  ``queue_common.lua``): their ~140 function definitions and their per-call statements;
* ``+ limiter_open defined, dispatch_common.lua``: the global script's whole prelude;
* ``+ limiter state read``: the limiter's prelude run up to its first function (its state
  read and parsed), as ``limiter_open`` runs it;
* ``+ limiter prelude``: the limiter's whole prelude (its ~40 function definitions too);
* ``+ limiter_open (session)``: ``limiter_open`` itself, which makes the session's closure too.

The differences are what Redis functions (``FUNCTION LOAD`` once, ``FCALL`` per call) could save
per call at most, the definitions; the state read stays per call::

    python benches/redis_prelude_instructions.py --calls 50
"""

from __future__ import annotations

import argparse
import glob
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import redis  # noqa: E402
import redis_compare  # noqa: E402

# A RedisThrottle's fourteen arguments (ARGV[1..14] of limiter_common.lua): rpm and tpm only.
_LIMITER_ARGV = '{"", "1e12", "1e15", "1e12", "1e15", "60000000", "10000", "", "", "", "", "", "", ""}'


def variants() -> dict[str, str]:
    from llm_queue_dispatcher.redis._connection import _source, prelude
    from llm_queue_dispatcher.redis.global_choice import _script

    whole = _script("global_dispatch").source
    preludes = whole[: whole.index(_source("dispatch_common"))] + _source("dispatch_common")
    limiter = _source("limiter_common")
    state_read = limiter[: limiter.index("local function refill_until")]

    def opened(body: str) -> str:
        return (
            f"{preludes}\nlocal function opened(KEYS, ARGV)\n{body}\nreturn 1\nend\n"
            f"opened(LIMITER_KEYS, {_LIMITER_ARGV})\nreturn 1"
        )

    return {
        "empty": "return 1",
        "queue prelude": f"{_source('common')}\n{prelude('queue_common')}\nreturn 1",
        "+ limiter_open defined, dispatch_common.lua": f"{preludes}\nreturn 1",
        "+ limiter state read": opened(state_read),
        "+ limiter prelude": opened(limiter),
        "+ limiter_open (session)": f"{preludes}\nlimiter_open(LIMITER_KEYS, {_LIMITER_ARGV})\nreturn 1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    # A queue's keys and the limiter's, as the global scripts take them (their values unused: the
    # database is empty).
    keys = [f"{{cg}}:q:p:{i}" for i in range(21)] + [f"{{cg}}:l:p:{i}" for i in range(5)] + ["{cg}:reply"]
    argv = ["", "nonce", "5", "0"]
    port = redis_compare.free_port()
    with tempfile.TemporaryDirectory() as directory:
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/cg.%p",
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--appendonly", "no", "--save", "",
        ]  # fmt: skip
        with redis_compare.started_server(
            command, port, start_seconds=120, name="redis-server under callgrind"
        ) as pid:
            client = redis.Redis(port=port)
            for name, source in variants().items():
                used = keys if name != "empty" else []
                sha = client.script_load(source)
                client.evalsha(sha, len(used), *used, *argv)  # compiled and warm
                subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
                for _ in range(args.calls):
                    client.evalsha(sha, len(used), *used, *argv)
                before = set(glob.glob(f"{directory}/cg.{pid}.*"))
                subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
                deadline = time.monotonic() + 60
                while not (new := set(glob.glob(f"{directory}/cg.{pid}.*")) - before):
                    if time.monotonic() > deadline:
                        raise SystemExit("callgrind wrote no dump")
                    time.sleep(0.1)
                time.sleep(0.5)
                path = new.pop()
                annotated = subprocess.run(
                    ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                Path(path).unlink()
                match = re.search(r"^\s*([\d,]+) .*:evalShaCommand ", annotated, re.M)
                per_call = int(match.group(1).replace(",", "")) / args.calls if match else 0
                print(f"{name:45} {per_call:12,.0f} instructions/call", flush=True)


if __name__ == "__main__":
    main()
