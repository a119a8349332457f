"""Server instructions per job of the Redis global choice's scripts, counted by callgrind.

The server time of a script (``INFO commandstats``) moves with the machine's load; the
instructions a server runs for it do not. This starts ``redis-server`` under ``valgrind
--tool=callgrind`` (no append-only file), and for each build (this checkout, and with
``--baseline DIR`` the checkout DIR, its ``python`` directory first on the path, in a child
process) and each phase, on a fresh queue of ``--queued`` messages of ten tenants filled by that
build's scripts:

* warms the server up (one dispatch and one mark, then 40 calls of 16 winners and their marks,
  so that the hashes the scripts write have left their small encodings, as they have on any
  queue in use), zeroes the counters (``callgrind_control -z``), runs the phase, dumps them;
* prints the instructions of ``EVALSHA`` (inclusive: the scripts and every command they call)
  divided by the jobs of the phase, and the whole server's (every command, reading the requests
  and writing the replies: what ``bullmq_server_cost.py`` reports for BullMQ's worker).

The phases: ``dispatch1`` (``--jobs`` dispatch scripts of one winner), ``mark1`` (their marks one
per call), ``dispatch16`` (dispatches of 16 winners, per job), ``mark16`` (16 marks per call, per
job). The builds alternate: the baseline goes second in the first run (first with
``--baseline-first``), and each run after swaps the order. The server's scripts are flushed
before each measurement. ``--phases`` measures some of them only; ``--keep DIR`` keeps each
measurement's callgrind dump there (``callgrind_annotate --inclusive=yes`` shows where a
script's instructions go, by the server's and Lua's C functions). Needs valgrind
(``callgrind_control``, ``callgrind_annotate``)::

    python benches/redis_script_instructions.py --baseline /tmp/base --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import redis_compare  # noqa: E402

PHASES = ("dispatch1", "mark1", "dispatch16", "mark16")


@contextlib.contextmanager
def callgrind_server(directory: Path) -> Iterator[tuple[int, int]]:
    """A redis-server under callgrind: its port and the valgrind process id."""
    port = redis_compare.free_port()
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/cg.%p",
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--appendonly", "no", "--save", "", "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    with redis_compare.started_server(
        command, port, start_seconds=120, name="redis-server under callgrind"
    ) as pid:
        yield port, pid


def dump_instructions(pid: int, directory: Path) -> tuple[int, int]:
    """Dumps callgrind's counters since the last zeroing: EVALSHA's inclusive instructions, and
    the whole server's (every command, the event loop, the replies written)."""
    before = set(glob.glob(f"{directory}/cg.{pid}.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while not (new := set(glob.glob(f"{directory}/cg.{pid}.*")) - before):
        if time.monotonic() > deadline:
            raise SystemExit("callgrind wrote no dump")
        time.sleep(0.1)
    time.sleep(0.5)  # written whole
    path = new.pop()
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    keep = os.environ.get("LQD_CALLGRIND_KEEP")
    if keep:  # --keep: the dump is kept for callgrind_annotate
        shutil.move(path, os.path.join(keep, f"{os.environ.get('LQD_CALLGRIND_NAME', 'dump')}.cg"))
    else:
        os.unlink(path)
    found = [
        re.search(pattern, annotated, re.M)
        for pattern in (r"^\s*([\d,]+) .*:evalShaCommand ", r"^\s*([\d,]+) .*PROGRAM TOTALS")
    ]
    evalsha, total = (int(match.group(1).replace(",", "")) if match else 0 for match in found)
    return evalsha, total


async def _phase(
    port: int, queue: str, queued: int, phase: str, jobs: int, pid: int, directory: Path
) -> tuple[float, float]:
    """One phase on a fresh ``queue`` of ``queued`` messages, with this process's library (its
    scripts fill the queue, 100 per call: the server is slow under callgrind): EVALSHA's and
    the whole server's instructions per job."""
    from llm_queue_dispatcher import LLMQueueDispatcher, LLMQueueDispatcherConfig, LLMRequest, TokenInfo
    from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

    url = f"redis://127.0.0.1:{port}/0"
    async with RedisStorage(url, queue) as filling:
        for first in range(0, queued, 100):
            await filling.batch_enqueue(
                [
                    LLMRequest(f"f{i}", redis_compare.PAYLOAD, token_info=TokenInfo(10), tenant=f"t{i % 10}")
                    for i in range(first, min(queued, first + 100))
                ]
            )
    storage: RedisStorage[Any] = RedisStorage(url, queue)
    limiter = RedisThrottle(url, f"cg-{time.time_ns()}", rpm=1e12, tpm=1e15)
    config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=60.0)

    def zero() -> None:
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)

    async with storage, limiter, LLMQueueDispatcher(storage, config) as dispatcher:
        await limiter.can_process(0)
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed(actual_tokens=8)
        for _ in range(40):
            taken = await dispatcher._dequeue_up_to(limiter, 16)
            await asyncio.gather(*(job.mark_as_processed(actual_tokens=8) for job in taken))
        taken = []
        zero()
        if phase in ("dispatch1", "mark1"):
            taken = [await dispatcher.dequeue(limiter) for _ in range(jobs)]
        else:
            while len(taken) < jobs:
                found = await dispatcher._dequeue_up_to(limiter, 16)
                if not found:
                    raise SystemExit("the queue ran out")
                taken += found
        if phase in ("mark1", "mark16"):
            zero()
            if phase == "mark1":
                for job in taken:
                    await job.mark_as_processed(actual_tokens=8)
            else:
                for first in range(0, len(taken), 16):
                    await asyncio.gather(
                        *(job.mark_as_processed(actual_tokens=8) for job in taken[first : first + 16])
                    )
        evalsha, total = dump_instructions(pid, directory)
        return evalsha / len(taken), total / len(taken)


def measure(
    port: int, pid: int, directory: Path, build: Path | None, phase: str, args: Any, serial: int
) -> tuple[float, float]:
    """One phase with ``build``'s library (None: this checkout's), in a child process."""
    queue = f"cg-{serial}"
    subprocess.run(["redis-cli", "-p", str(port), "script", "flush"], check=True, capture_output=True)
    python, cwd, env = redis_compare._interpreter(build)
    out = subprocess.run(
        [
            python,
            __file__,
            "--child",
            str(port),
            queue,
            str(args.queued),
            phase,
            str(args.jobs),
            str(pid),
            str(directory),
        ],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    evalsha, total = out.strip().splitlines()[-1].split()
    return float(evalsha), float(total)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        port, queue, queued, phase, jobs, pid, directory = argv[1:8]
        result = asyncio.run(
            _phase(int(port), queue, int(queued), phase, int(jobs), int(pid), Path(directory))
        )
        print(*result)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=3_000, help="messages per fresh queue (default 3000)")
    parser.add_argument("--jobs", type=int, default=300, help="jobs per phase (default 300)")
    parser.add_argument("--runs", type=int, default=1, help="measurements per build and phase (default 1)")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to measure beside this one")
    parser.add_argument("--baseline-first", action="store_true", help="the baseline's measurement first")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated phases (default {','.join(PHASES)})"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep each measurement's callgrind dump in this directory"
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    builds: list[tuple[str, Path | None]] = [("this build", None)]
    if args.baseline is not None:
        builds.append((f"before ({args.baseline.name})", args.baseline))
    if args.baseline_first:
        builds.reverse()
    directory = Path(tempfile.mkdtemp(prefix="lqd-callgrind-"))
    serial = 0
    try:
        with callgrind_server(directory) as (port, pid):
            for run_number in range(args.runs):
                for phase in args.phases.split(","):
                    # Builds alternate their order from run to run.
                    order = builds if run_number % 2 == 0 else builds[::-1]
                    for name, build in order:
                        serial += 1
                        if args.keep is not None:
                            args.keep.mkdir(parents=True, exist_ok=True)
                            os.environ["LQD_CALLGRIND_KEEP"] = str(args.keep.resolve())
                            label = "this" if build is None else "base"
                            os.environ["LQD_CALLGRIND_NAME"] = f"run{run_number + 1}-{phase}-{label}"
                        per_job, whole = measure(port, pid, directory, build, phase, args, serial)
                        print(
                            f"run {run_number + 1} {phase:10} {name:24} {per_job:12,.0f} instructions/job"
                            f" (whole server {whole:,.0f})"
                        )
                        subprocess.run(
                            ["redis-cli", "-p", str(port), "flushall"], check=True, capture_output=True
                        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
