"""BullMQ's server cost per job: what a no-op BullMQ ``Worker`` costs redis-server, the target
the Redis global choice's scripts are measured against (``redis_script_instructions.py``).

Two measurements, each on a fresh redis-server of its own (no append-only file) and a queue
filled by BullMQ itself (``bench.mjs fill``, 100 jobs per ``addBulk``) before it is measured:

* ``cpu``: the server's CPU time (``INFO cpu``, user + system) and its commands (``INFO
  commandstats``) over one ``bench.mjs work`` run of ``--jobs`` jobs, divided by the jobs;
* ``callgrind``: redis-server under ``valgrind --tool=callgrind``, the counters zeroed after the
  fill and dumped after the work run: the server's instructions per job, all of them and those
  under ``EVALSHA`` (inclusive: BullMQ's scripts and the commands they call).

The worker runs with ``--concurrency`` jobs in flight (16, as the global choice's benchmarks)::

    python benches/bullmq_server_cost.py --jobs 20000 --callgrind-jobs 2000 --runs 2
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

import redis_compare  # noqa: E402


def _info(port: int, section: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", section], check=True, capture_output=True, text=True
    ).stdout


def _cpu_seconds(port: int) -> float:
    info = _info(port, "cpu")
    user = float(re.search(r"used_cpu_user:([\d.]+)", info).group(1))  # type: ignore[union-attr]
    system = float(re.search(r"used_cpu_sys:([\d.]+)", info).group(1))  # type: ignore[union-attr]
    return user + system


def _commands(port: int) -> int:
    return sum(int(n) for n in re.findall(r"cmdstat_\w+:calls=(\d+)", _info(port, "commandstats")))


def _bullmq(modules: Path, mode: str, port: int, queue: str, jobs: int, concurrency: int) -> None:
    subprocess.run(
        [
            "node", str(redis_compare.BULLMQ_SCRIPT), "--modules", str(modules), "--port", str(port),
            "--queue", queue, "--mode", mode, "--count", str(jobs), "--concurrency", str(concurrency),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=3600,
    )  # fmt: skip


def cpu(modules: Path, jobs: int, concurrency: int) -> dict[str, float]:
    port = redis_compare.free_port()
    with tempfile.TemporaryDirectory() as directory:
        command = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--appendonly", "no", "--save", "",
        ]  # fmt: skip
        with redis_compare.started_server(command, port, start_seconds=20, name="redis-server"):
            queue = f"cost-{time.time_ns()}"
            _bullmq(modules, "fill", port, queue, jobs, 1)
            subprocess.run(
                ["redis-cli", "-p", str(port), "CONFIG", "RESETSTAT"], check=True, capture_output=True
            )
            before = _cpu_seconds(port)
            started = time.perf_counter()
            _bullmq(modules, "work", port, queue, jobs, concurrency)
            seconds = time.perf_counter() - started
            used = _cpu_seconds(port) - before
            commands = _commands(port)
    return {
        "jobs/s (incl. node start)": jobs / seconds,
        "server CPU us/job": used / jobs * 1e6,
        "commands/job": commands / jobs,
    }


def callgrind(modules: Path, jobs: int, concurrency: int) -> dict[str, float]:
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
            queue = f"cost-{time.time_ns()}"
            _bullmq(modules, "fill", port, queue, jobs, 1)
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
            _bullmq(modules, "work", port, queue, jobs, concurrency)
            before = set(glob.glob(f"{directory}/cg.{pid}.*"))
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
            deadline = time.monotonic() + 60
            while not (new := set(glob.glob(f"{directory}/cg.{pid}.*")) - before):
                if time.monotonic() > deadline:
                    raise SystemExit("callgrind wrote no dump")
                time.sleep(0.1)
            time.sleep(0.5)
            annotated = subprocess.run(
                ["callgrind_annotate", "--inclusive=yes", "--threshold=100", new.pop()],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
    total = re.search(r"^\s*([\d,]+) .*PROGRAM TOTALS", annotated, re.M)
    evalsha = re.search(r"^\s*([\d,]+) .*:evalShaCommand ", annotated, re.M)

    def number(match: re.Match[str] | None) -> float:
        return int(match.group(1).replace(",", "")) if match else 0

    return {
        "server instructions/job": number(total) / jobs,
        "EVALSHA instructions/job": number(evalsha) / jobs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--callgrind-jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-callgrind", action="store_true")
    args = parser.parse_args()
    modules = redis_compare.bullmq_install()
    print(f"BullMQ {redis_compare.bullmq_version(modules)}, concurrency {args.concurrency}")
    for run in range(1, args.runs + 1):
        for name, value in cpu(modules, args.jobs, args.concurrency).items():
            print(f"run {run} cpu ({args.jobs} jobs): {name} {value:,.1f}", flush=True)
        if not args.no_callgrind:
            for name, value in callgrind(modules, args.callgrind_jobs, args.concurrency).items():
                print(f"run {run} callgrind ({args.callgrind_jobs} jobs): {name} {value:,.0f}", flush=True)


if __name__ == "__main__":
    main()
