"""CPU per job of the Redis global choice, client and server apart, in one process.

One measurement: a fresh ``redis-server`` (append-only, as ``redis_compare.py`` starts it), a
queue of ``COUNT`` messages of ``TENANTS`` tenants (default 1) filled by the library on the
path (``redis_compare._fill``), then
one of ``redis_compare.py``'s children run in this process (``global``: 16 tasks each
dequeuing and marking; ``global worker``: a `Worker` with 16 handlers) until the queue is
drained. It prints the jobs per second, this process's CPU per job (``getrusage``), the
server's (``INFO cpu``, user + system), the Redis commands per job (``INFO commandstats``,
the scripts' own calls counted apart from the commands they make) and the script calls per job.

Run it once per build and alternate the builds (a checkout of another build: its ``python``
directory first on ``PYTHONPATH``, run from that checkout so that its ``benches`` is read)::

    python benches/redis_cpu_per_job.py global 20000 10       # TASK COUNT TENANTS
    (cd ../base && PYTHONPATH=python python benches/redis_cpu_per_job.py global 20000 10)
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd() / "benches"))

import redis
import redis_compare


def main(task: str, count: int, tenants: int) -> None:
    with redis_compare.redis_server("everysec") as port:
        asyncio.run(redis_compare._fill(port, "q", count, tenants))
        client = redis.Redis(port=port)
        client.config_resetstat()
        server_before = client.info("cpu")
        here_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        url = f"redis://127.0.0.1:{port}/0"
        result = asyncio.run(redis_compare._child(task, url, "q", count, time.time()))
        elapsed = time.perf_counter() - started
        here_after = resource.getrusage(resource.RUSAGE_SELF)
        server_after = client.info("cpu")
        stats = client.info("commandstats")
        client.close()
    done = result["count"]
    here = here_after.ru_utime + here_after.ru_stime - here_before.ru_utime - here_before.ru_stime
    server = sum(server_after[k] - server_before[k] for k in ("used_cpu_user", "used_cpu_sys"))
    commands = sum(
        int(v["calls"]) for k, v in stats.items() if not k.startswith(("cmdstat_evalsha", "cmdstat_config"))
    )
    scripts = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_evalsha"))
    print(
        f"{task}: {done} jobs, {done / elapsed:,.0f}/s, client CPU {here / done * 1e6:.0f} µs/job, "
        f"server CPU {server / done * 1e6:.0f} µs/job, {commands / done:.1f} commands/job, "
        f"{scripts / done:.2f} script calls/job"
    )


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(
        arguments[0] if arguments else "global",
        int(arguments[1]) if len(arguments) > 1 else 20_000,
        int(arguments[2]) if len(arguments) > 2 else 1,
    )
