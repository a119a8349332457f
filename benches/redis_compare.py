#!/usr/bin/env python3
"""Redis side by side: `RedisStorage`, the dispatcher over it, and BullMQ 5, on one redis-server.

One run starts its own ``redis-server`` (free port, temporary directory, ``--appendonly yes``
with ``--appendfsync everysec`` by default, ``--maxmemory-policy noeviction``), then measures,
with 1 and with 4 processes started at one instant (throughput = all messages / wall time from
the first start to the last finish):

* ``enqueue``         `RedisStorage.enqueue`, 50 calls in flight per process
* ``batch_enqueue``   `RedisStorage.batch_enqueue`, 100 requests per call
* ``dequeue+ack``     ``dequeue(50)`` then one ``batch_delete`` of the 50 (two scripts per 50)
* ``dequeue+delete``  ``dequeue(50)`` then 50 ``delete_message`` calls in flight
* ``dispatcher``      `LLMQueueDispatcher` (prefetch buffer of 50) with 16 tasks each doing
                      ``dequeue`` then ``mark_as_processed``, an `LLMThrottle` that never binds
* ``dispatcher+RedisThrottle``  the same with a shared `RedisThrottle` reserving every message
* ``limiter consume`` `RedisThrottle.consume` latency, one call at a time (p50, p99), and its
                      throughput with 4 processes
* ``bullmq add`` / ``bullmq addBulk`` / ``bullmq work``  BullMQ 5 (installed with npm into
                      ``benches/.cache/``): ``queue.add`` with 50 in flight, ``addBulk`` of 100,
                      a ``Worker`` with concurrency 50 and a no-op processor (removeOnComplete)

Skips BullMQ with a message where node or npm is missing.

``--global`` measures the global choice instead (``fair_priority`` ranked inside Redis, one
script per dispatch and one per mark; section "Redis global choice" of RESULTS.md), every
side with the same ``--concurrency`` (default 16):

* ``global dispatch+mark``  `LLMQueueDispatcher` with ``policy="fair_priority"`` and a shared
                      `RedisThrottle` (same server and namespace), that many tasks each doing
                      ``dequeue`` then ``mark_as_processed(actual_tokens=...)``, ten tenants
* ``global Worker``   a `Worker` with that many handlers over that dispatcher: the jobs of its
                      free handlers come from one script, the marks (and the outcome relay's
                      claims and reports) made together go in one call; a no-op handler
                      reporting 8 tokens; stopped, as BullMQ's, when the queue's counts (read
                      every 20 ms) show nothing waiting or in flight
* ``global score dispatch+mark`` the same with the score policy (default weights), ranked
                      inside Redis too
* ``buffered dispatch+mark`` the same dispatcher and limiter with the score policy and a
                      custom scorer (the per-process prefetch buffer, for comparison)
* ``bullmq work``     BullMQ's ``Worker`` with that concurrency and a no-op processor
* memory per queued message: ``INFO memory`` ``used_memory`` before and after enqueueing
  ``--queued`` messages (ten tenants), divided by their number; the ranking index's share from
  ``MEMORY USAGE`` of its keys
* server time on that queue: ``INFO commandstats`` (EVALSHA's time per call) over 1,000
  dispatches of one winner and their 1,000 marks one by one, then per job with 16 winners per
  dispatch and their marks made together
* ``--baseline DIR``: the two global rows and the server time also with the library of the
  checkout DIR (its ``.venv``, or without one this interpreter with ``DIR/python`` first on
  the path), each row right after this build's (``--baseline-first``: right before it, so that
  runs alternate the order), on the same server, each build on queues its own scripts filled
  (the key layouts may differ)
* the score policy's server time per dispatch and mark with ``--queued`` messages of every
  priority, estimates of 50 to 4,000 tokens and four expected processing times waiting

    python benches/redis_compare.py --quick --no-bullmq       # smoke configuration
    python benches/redis_compare.py --write-results           # the full run; updates RESULTS.md
    python benches/redis_compare.py --global --processes 1,2,4 --write-results
    python benches/redis_compare.py --global --baseline ../main --write-results   # before/after
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE_DIR = HERE / ".cache"
BULLMQ_SCRIPT = HERE / "bullmq" / "bench.mjs"
BULLMQ_PACKAGE = "bullmq@5"
RESULTS_PATH = HERE / "RESULTS.md"
START_MARKER = "<!-- redis-compare:start -->"
END_MARKER = "<!-- redis-compare:end -->"
GLOBAL_START = "<!-- redis-global:start -->"
GLOBAL_END = "<!-- redis-global:end -->"
TENANTS = 10
PAYLOAD = {"messages": [{"role": "user", "content": "hi"}]}


class Skip(Exception):
    """A side of the comparison that cannot run here (the message says why)."""


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def started_server(command: list[str], port: int, *, start_seconds: float, name: str) -> Iterator[int]:
    """Runs ``command`` (a redis-server listening on ``port``) in a session of its own until the
    block ends: its process id once it answers PING, then killed with its session."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"{name} did not start on port {port}")
            time.sleep(0.02)
        yield process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextlib.contextmanager
def redis_server(fsync: str) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="lqd-bench-redis-"))
    port = free_port()
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--appendonly", "yes", "--appendfsync", fsync, "--maxmemory-policy", "noeviction",
        "--save", "", "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip
    try:
        with started_server(command, port, start_seconds=15, name="redis-server"):
            yield port
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def redis_version() -> str | None:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Python children: one measurement each, started together, JSON on stdout
# ---------------------------------------------------------------------------------------------


async def _child(
    task: str, url: str, queue: str, count: int, start_at: float, concurrency: int = 16
) -> dict[str, Any]:
    from llm_queue_dispatcher import (
        LLMQueueDispatcher,
        LLMQueueDispatcherConfig,
        LLMRequest,
        LLMThrottle,
        TokenInfo,
    )
    from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

    if task == "server":  # the server figures of this build's scripts (``--baseline``)
        return await _script_figures(url, queue, count)
    if task == "fill":  # a queue written by this build's scripts (``--baseline``)
        await _fill(int(url.rsplit(":", 1)[1].split("/")[0]), queue, count, concurrency)
        return {"count": count}
    pid = os.getpid()
    storage: RedisStorage[Any] = RedisStorage(url, queue)
    await storage.get_approximate_message_count()  # connected and scripts loaded before the clock starts
    limiter: Any = None
    if task in ("consume", "dispatcher+RedisThrottle", "global", "global score", "buffered", "global worker"):
        limiter = RedisThrottle(url, f"bench-{queue}", rpm=1e12, tpm=1e15)
        await limiter.can_process(0)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.time()
    done = 0
    latencies: list[float] = []
    if task == "enqueue":
        next_index = 0

        async def lane() -> None:
            nonlocal next_index, done
            while next_index < count:
                i = next_index
                next_index += 1
                await storage.enqueue(LLMRequest(f"{pid}-{i}", PAYLOAD, token_info=TokenInfo(10)))
                done += 1

        await asyncio.gather(*(lane() for _ in range(50)))
    elif task == "batch_enqueue":
        for first in range(0, count, 100):
            batch = [
                LLMRequest(f"{pid}-{i}", PAYLOAD, token_info=TokenInfo(10))
                for i in range(first, min(count, first + 100))
            ]
            await storage.batch_enqueue(batch)
            done += len(batch)
    elif task in ("dequeue+ack", "dequeue+delete"):
        while batch := await storage.dequeue(50, 60.0):
            handles = [m.attributes.receipt_handle for m in batch]
            if task == "dequeue+ack":
                await storage.batch_delete(handles)
            else:
                await asyncio.gather(*(storage.delete_message(h) for h in handles))
            done += len(batch)
    elif task in ("dispatcher", "dispatcher+RedisThrottle"):
        limit = limiter if limiter is not None else LLMThrottle(1e12, 1e15)
        config = LLMQueueDispatcherConfig(buffer_size=50, visibility_timeout=60.0)
        async with LLMQueueDispatcher(storage, config) as dispatcher:

            async def worker() -> None:
                nonlocal done
                while (job := await dispatcher.dequeue(limit)) is not None:
                    await job.mark_as_processed()
                    done += 1

            await asyncio.gather(*(worker() for _ in range(16)))
    elif task in ("global", "global score", "buffered"):
        # The global choice (fair_priority or the score policy over the whole queue, in Redis)
        # or, for comparison, the score policy with a custom scorer over a per-process prefetch
        # buffer; all with the shared RedisThrottle.
        if task == "global":
            config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=60.0)
        elif task == "global score":
            config = LLMQueueDispatcherConfig(visibility_timeout=60.0)
        else:
            from llm_queue_dispatcher import CustomScorer, ScoringConfig

            scorer = CustomScorer("none", 0.0, lambda message, context: 0.0)
            config = LLMQueueDispatcherConfig(
                buffer_size=50, visibility_timeout=60.0, scoring=ScoringConfig(custom_scorers=[scorer])
            )
        async with LLMQueueDispatcher(storage, config) as dispatcher:
            assert (dispatcher._global is not None) == (task != "buffered")

            async def marker() -> None:
                nonlocal done
                while (job := await dispatcher.dequeue(limiter)) is not None:
                    await job.mark_as_processed(actual_tokens=8)
                    done += 1

            await asyncio.gather(*(marker() for _ in range(concurrency)))
    elif task == "global worker":
        # A Worker with ``concurrency`` handlers over the global choice: the jobs of its free
        # handlers come from one script; each no-op handler reports 8 tokens.
        from llm_queue_dispatcher import Worker

        config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=60.0)

        async def handle(job: Any) -> int:
            nonlocal done
            done += 1
            return 8

        async with LLMQueueDispatcher(storage, config) as dispatcher:
            worker = Worker(dispatcher, limiter, handle, concurrency=concurrency)

            async def stop_when_drained() -> None:
                # As the BullMQ side stops its worker: the queue's counts every 20 ms, from
                # outside the worker (its own stop_when_empty reads them whenever its last
                # running handler ends, one more call per round of handlers).
                while True:
                    await asyncio.sleep(0.02)
                    counts = await storage.get_queue_attributes()
                    if (
                        counts.approximate_number_of_messages
                        + counts.approximate_number_of_messages_in_flight
                        == 0
                    ):
                        worker.stop()
                        return

            watcher = asyncio.ensure_future(stop_when_drained())
            try:
                await worker.run()
            finally:
                watcher.cancel()
    elif task == "consume":
        for i in range(count):
            before = time.perf_counter()
            await limiter.consume(f"{pid}-{i}", 10)
            latencies.append(time.perf_counter() - before)
            done += 1
    else:
        raise SystemExit(f"unknown task {task}")
    finished = time.time()
    await storage.aclose()
    if limiter is not None:
        await limiter.aclose()
    result: dict[str, Any] = {"count": done, "started": started, "finished": finished}
    if latencies:
        latencies.sort()
        result["p50_us"] = statistics.median(latencies) * 1e6
        result["p99_us"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6
    return result


def _interpreter(build: Path | None) -> tuple[str, Path, dict[str, str] | None]:
    """How to run a child with the library of this checkout (``build`` None) or of the
    checkout ``build``: its own ``.venv`` when it has one, else this interpreter with
    ``build/python`` first on the path (a checkout of the same compiled core, copied in)."""
    if build is None:
        return sys.executable, ROOT, None
    if (build / ".venv" / "bin" / "python").exists():
        # Its own package, not this checkout's (an editable install is on its path).
        return str(build / ".venv" / "bin" / "python"), build, {**os.environ, "PYTHONPATH": ""}
    return sys.executable, build, {**os.environ, "PYTHONPATH": str(build / "python")}


def run_python(
    task: str,
    port: int,
    queue: str,
    count: int,
    processes: int,
    concurrency: int = 16,
    build: Path | None = None,
) -> dict[str, Any]:
    """``processes`` children of this script, each doing ``count`` (or draining the queue),
    with the library of this checkout, or of the checkout ``build`` (its ``.venv``)."""
    start_at = time.time() + 1.0 + 0.4 * processes  # after every child has imported and connected
    url = f"redis://127.0.0.1:{port}/0"
    python, cwd, env = _interpreter(build)
    children = [
        subprocess.Popen(
            [python, __file__, "--child", task, url, queue, str(count), repr(start_at), str(concurrency)],
            stdout=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        for _ in range(processes)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=900)
        if child.returncode != 0:
            raise RuntimeError(f"{task} child failed with {child.returncode}")
        results.append(json.loads(out))
    return combine(results)


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(r["count"] for r in results)
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results)
    combined: dict[str, Any] = {
        "count": total,
        "seconds": wall,
        "per_second": total / wall if wall > 0 else None,
    }
    for key in ("p50_us", "p99_us"):
        values = [r[key] for r in results if key in r]
        if values:
            combined[key] = statistics.median(values)
    return combined


async def _fill(port: int, queue: str, count: int, tenants: int = 1) -> None:
    from llm_queue_dispatcher import LLMRequest, TokenInfo
    from llm_queue_dispatcher.redis import RedisStorage

    async with RedisStorage(f"redis://127.0.0.1:{port}/0", queue) as storage:
        for first in range(0, count, 1000):
            await storage.batch_enqueue(
                [
                    LLMRequest(
                        f"f{i}",
                        PAYLOAD,
                        token_info=TokenInfo(10),
                        tenant=None if tenants == 1 else f"t{i % tenants}",
                    )
                    for i in range(first, min(count, first + 1000))
                ]
            )


async def _server_figures(port: int, queued: int) -> dict[str, Any]:
    """Memory per queued message with ``queued`` messages waiting (ten tenants); the queue is
    kept for the scripts' figures (`_script_figures`)."""
    import redis.asyncio as aioredis

    from llm_queue_dispatcher.redis import RedisStorage

    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    queue = f"server-{time.time_ns()}"
    before = int((await client.info("memory"))["used_memory"])
    await _fill(port, queue, queued, TENANTS)
    after = int((await client.info("memory"))["used_memory"])
    storage: RedisStorage[Any] = RedisStorage(url, queue)
    index_bytes = 0
    for key in storage._keys[11:16]:  # lanes, tenants, aging:2, aging:3, urgent
        index_bytes += int(await client.memory_usage(key, samples=0) or 0)
    await client.aclose()
    return {
        "queue": queue,
        "queued": queued,
        "bytes_per_message": (after - before) / queued,
        "index_bytes_per_message": index_bytes / queued,
    }


async def _script_figures(url: str, queue: str, dispatches: int = 1_000) -> dict[str, Any]:
    """The server time of the dispatch and mark scripts on ``queue`` (messages waiting): one
    winner per dispatch and one mark per call, then 16 winners per dispatch (a `Worker`'s free
    handlers) and their 16 marks made together (per job: whatever the build sends for them)."""
    import redis.asyncio as aioredis

    from llm_queue_dispatcher import LLMQueueDispatcher, LLMQueueDispatcherConfig
    from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

    client = aioredis.Redis.from_url(url)
    storage: RedisStorage[Any] = RedisStorage(url, queue)
    limiter = RedisThrottle(url, f"server-{time.time_ns()}", rpm=1e12, tpm=1e15)
    config = LLMQueueDispatcherConfig(policy="fair_priority", visibility_timeout=60.0)
    figures: dict[str, Any] = {"dispatches": dispatches}

    async def evalsha_us() -> tuple[float, int]:
        stats = (await client.info("commandstats"))["cmdstat_evalsha"]
        return float(stats["usec"]), int(stats["calls"])

    # Each phase alone on the server. ``commandstats`` counts a script's whole run once under
    # EVALSHA (the calls it makes inside are counted apart as well).
    async with storage, limiter, LLMQueueDispatcher(storage, config) as dispatcher:
        await limiter.can_process(0)
        await client.config_resetstat()
        jobs = [await dispatcher.dequeue(limiter) for _ in range(dispatches)]
        usec, calls = await evalsha_us()
        figures["dispatch_us"] = usec / calls
        await client.config_resetstat()
        for job in jobs:
            assert job is not None
            await job.mark_as_processed(actual_tokens=8)
        usec, calls = await evalsha_us()
        figures["mark_us"] = usec / calls
        await client.config_resetstat()
        taken: list[Any] = []
        while len(taken) < dispatches:
            found = await dispatcher._dequeue_up_to(limiter, 16)
            if not found:
                raise SystemExit("the queue ran out before the server figures were taken")
            taken += found
        usec, calls = await evalsha_us()
        figures["dispatch16_us_per_job"] = usec / len(taken)
        await client.config_resetstat()
        for first in range(0, len(taken), 16):
            await asyncio.gather(
                *(job.mark_as_processed(actual_tokens=8) for job in taken[first : first + 16])
            )
        usec, calls = await evalsha_us()
        figures["mark16_us_per_job"] = usec / len(taken)
        figures["mark16_calls_per_job"] = calls / len(taken)
    await client.aclose()
    return figures


async def _score_fill(storage: Any, queued: int) -> None:
    """Enqueues ``queued`` messages of every priority, estimates of 50 to 4,000 tokens and four
    expected processing times (the same ones for a given ``queued``)."""
    import random

    from llm_queue_dispatcher import LLMRequest, Priority, TokenInfo

    rng = random.Random(1)
    for first in range(0, queued, 1000):
        await storage.batch_enqueue(
            [
                LLMRequest(
                    f"s{i}",
                    PAYLOAD,
                    Priority(rng.choices([0, 1, 2, 3], weights=[1, 3, 6, 4])[0]),
                    TokenInfo(rng.randint(50, 4000)),
                    expected_processing_time=rng.choice([None, 0.5, 3.0, 20.0]),
                )
                for i in range(first, min(queued, first + 1000))
            ]
        )


async def _score_server_figures(
    port: int, queued: int, dispatches: int = 1_000, queue: str | None = None
) -> dict[str, Any]:
    """The server time of the score policy's dispatch and mark scripts with ``queued`` messages
    of every priority, varied estimates and expected times waiting; its index's memory. With
    ``queue``, a queue of that name filled by an earlier call is used as it is (so builds can
    be measured one after the other on one backlog: each call takes ``dispatches`` messages)."""
    import redis.asyncio as aioredis

    from llm_queue_dispatcher import LLMQueueDispatcher, LLMQueueDispatcherConfig
    from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    queue = queue or f"score-{time.time_ns()}"
    storage: RedisStorage[Any] = RedisStorage(url, queue)
    async with storage:
        filled = not await storage.get_approximate_message_count()
        if filled:
            await _score_fill(storage, queued)
        prefix = storage._keys[0].decode().removesuffix("meta")
        index_bytes: float | None = None
        if filled:
            # Every element counted (samples=0): it holds the server a while on a large queue,
            # so a queue measured again is not counted again.
            index_bytes = 0
            for part in ("members", "ages", "classes", "heads", "cells"):
                index_bytes += int(await client.memory_usage(f"{prefix}score:{part}", samples=0) or 0)
        # A sorted set (a hash in builds before: a baseline's queue).
        hashed = await client.type(f"{prefix}score:cells") in (b"hash", "hash")
        count = client.hlen if hashed else client.zcard
        cells = int(await count(f"{prefix}score:cells"))
        # A real budget's size (the factors' A), large enough never to bind here.
        limiter = RedisThrottle(url, f"score-{queue}", rpm=1e12, tpm=1e7)
        config = LLMQueueDispatcherConfig(visibility_timeout=60.0)
        async with limiter, LLMQueueDispatcher(storage, config) as dispatcher:
            assert dispatcher._global is not None
            await limiter.can_process(0)
            await client.config_resetstat()
            jobs = [await dispatcher.dequeue(limiter) for _ in range(dispatches)]
            stats = (await client.info("commandstats"))["cmdstat_evalsha"]
            dispatch_us = float(stats["usec"]) / int(stats["calls"])
            await client.config_resetstat()
            for job in jobs:
                assert job is not None
                await job.mark_as_processed(actual_tokens=8)
            stats = (await client.info("commandstats"))["cmdstat_evalsha"]
            mark_us = float(stats["usec"]) / int(stats["calls"])
    await client.aclose()
    return {
        "score_dispatch_us": dispatch_us,
        "score_mark_us": mark_us,
        "score_index_bytes_per_message": None if index_bytes is None else index_bytes / queued,
        "score_cells": cells,
    }


def fill(port: int, queue: str, count: int, tenants: int, build: Path | None = None) -> None:
    """`_fill` with this checkout's library, or in a child process of ``build``'s: each build
    reads a queue its own scripts wrote (their key layouts may differ)."""
    if build is None:
        asyncio.run(_fill(port, queue, count, tenants))
        return
    url = f"redis://127.0.0.1:{port}/0"
    python, cwd, env = _interpreter(build)
    subprocess.run(
        [python, __file__, "--child", "fill", url, queue, str(count), repr(time.time()), str(tenants)],
        stdout=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        check=True,
        timeout=900,
    )


def script_figures(port: int, queue: str, dispatches: int, build: Path | None = None) -> dict[str, Any]:
    """`_script_figures` in a child process of this checkout's library or of ``build``'s."""
    url = f"redis://127.0.0.1:{port}/0"
    python, cwd, env = _interpreter(build)
    out = subprocess.run(
        [python, __file__, "--child", "server", url, queue, str(dispatches), repr(time.time())],
        stdout=subprocess.PIPE,
        cwd=cwd,
        env=env,
        check=True,
        timeout=900,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


# ---------------------------------------------------------------------------------------------
# BullMQ
# ---------------------------------------------------------------------------------------------


def bullmq_install(cache_dir: Path = CACHE_DIR) -> Path:
    """node_modules with BullMQ 5, installed once into the cache."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise Skip("node or npm not found on PATH")
    target = cache_dir / "bullmq-5"
    modules = target / "node_modules"
    if (modules / "bullmq" / "package.json").exists():
        return modules
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="npm-", dir=cache_dir))
    try:
        (staging / "package.json").write_text('{"name": "llmqd-redis-compare", "private": true}\n')
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", BULLMQ_PACKAGE],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise Skip(f"npm install failed: {tail}")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except subprocess.TimeoutExpired as exc:
        raise Skip("npm install timed out") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return modules


def bullmq_version(modules: Path) -> str:
    return str(json.loads((modules / "bullmq" / "package.json").read_text())["version"])


def run_bullmq(
    modules: Path, mode: str, port: int, queue: str, count: int, processes: int, concurrency: int = 50
) -> dict[str, Any]:
    start_at_ms = int((time.time() + 1.0 + 0.3 * processes) * 1000)
    command = ["node", str(BULLMQ_SCRIPT), "--modules", str(modules), "--port", str(port), "--queue", queue]
    children = [
        subprocess.Popen(
            [
                *command,
                "--mode",
                mode,
                "--count",
                str(count),
                "--start-at",
                str(start_at_ms),
                "--concurrency",
                str(concurrency),
            ],
            stdout=subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=900)
        if child.returncode != 0:
            raise RuntimeError(f"bullmq {mode} failed with {child.returncode}")
        raw = json.loads(out)
        results.append(
            {"count": raw["count"], "started": raw["started"] / 1000, "finished": raw["finished"] / 1000}
        )
    return combine(results)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    modules: Path | None = None
    if not args.no_bullmq:
        try:
            modules = bullmq_install()
        except Skip as skip:
            notes.append(f"BullMQ skipped: {skip}")
            print(f"BullMQ skipped: {skip}", file=sys.stderr)
    n = args.messages
    load_before = os.getloadavg()[0]
    with redis_server(args.fsync) as port:
        serial = iter(range(1_000_000))

        def queue_name() -> str:
            return f"bench-{next(serial)}"

        def row(name: str, processes: int, result: dict[str, Any]) -> None:
            rows.append({"name": name, "processes": processes, **result})
            rate = result.get("per_second")
            extra = (
                f", p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us"
                if "p50_us" in result
                else ""
            )
            print(f"{name:28} x{processes}: {rate:10,.0f} /s{extra}", file=sys.stderr)

        for processes in args.processes:
            share = max(1, n // processes)
            row("enqueue", processes, run_python("enqueue", port, queue_name(), share, processes))
            row("batch_enqueue", processes, run_python("batch_enqueue", port, queue_name(), share, processes))
            for task in ("dequeue+ack", "dequeue+delete", "dispatcher", "dispatcher+RedisThrottle"):
                queue = queue_name()
                asyncio.run(_fill(port, queue, n))
                row(task, processes, run_python(task, port, queue, n, processes))
            row(
                "limiter consume",
                processes,
                run_python("consume", port, queue_name(), args.consumes, processes),
            )
            if modules is not None:
                row("bullmq add", processes, run_bullmq(modules, "add", port, queue_name(), share, processes))
                row(
                    "bullmq addBulk",
                    processes,
                    run_bullmq(modules, "addBulk", port, queue_name(), share, processes),
                )
                queue = queue_name()
                run_bullmq(modules, "fill", port, queue, n, 1)
                row("bullmq work", processes, run_bullmq(modules, "work", port, queue, n, processes))
    notes.append(
        f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: "
        "the machine is shared, so figures move from run to run."
    )
    return {
        "rows": rows,
        "notes": notes,
        "environment": environment(modules),
        "command": "python benches/redis_compare.py " + " ".join(sys.argv[1:]),
        "messages": n,
        "fsync": args.fsync,
    }


def measure_global(args: argparse.Namespace) -> dict[str, Any]:
    """The global choice: throughput with 1..n processes beside the buffered dispatcher and
    BullMQ, memory per queued message, server time per dispatch with ``--queued`` waiting."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    modules: Path | None = None
    if not args.no_bullmq:
        try:
            modules = bullmq_install()
        except Skip as skip:
            notes.append(f"BullMQ skipped: {skip}")
            print(f"BullMQ skipped: {skip}", file=sys.stderr)
    n, c = args.messages, args.concurrency
    baseline: Path | None = args.baseline
    load_before = os.getloadavg()[0]
    with redis_server(args.fsync) as port:
        serial = iter(range(1_000_000))

        def add(name: str, processes: int, result: dict[str, Any]) -> None:
            rows.append({"name": name, "processes": processes, **result})
            print(f"{name:44} x{processes}: {result['per_second']:10,.0f} /s", file=sys.stderr)

        for processes in args.processes:
            builds: list[tuple[str, Path | None]] = [("", None)]
            if baseline is not None:
                builds.append((f", before ({baseline.name})", baseline))
                if args.baseline_first:
                    builds.reverse()
            # Each build's row right after the other's: the machine's load moves between them.
            for name, task in (
                (f"global dispatch+mark ({c} tasks)", "global"),
                (f"global Worker ({c} handlers)", "global worker"),
                (f"global score dispatch+mark ({c} tasks)", "global score"),
            ):
                # The score policy chooses globally in this build only: no baseline row.
                for suffix, build in builds if task != "global score" else [("", None)]:
                    queue = f"global-{next(serial)}"
                    fill(port, queue, n, TENANTS, build)
                    add(name + suffix, processes, run_python(task, port, queue, n, processes, c, build))
            queue = f"global-{next(serial)}"
            asyncio.run(_fill(port, queue, n, TENANTS))
            add(
                f"buffered dispatch+mark ({c} tasks)",
                processes,
                run_python("buffered", port, queue, n, processes, c),
            )
            if modules is not None:
                queue = f"global-{next(serial)}"
                run_bullmq(modules, "fill", port, queue, n, 1)
                add(
                    f"bullmq work (concurrency {c})",
                    processes,
                    run_bullmq(modules, "work", port, queue, n, processes, c),
                )
        server = asyncio.run(_server_figures(port, args.queued))
        # Each build takes about 2 x `dispatches` of the queued messages.
        dispatches = min(1_000, args.queued // 5)
        if baseline is None or not args.baseline_first:
            server["scripts"] = script_figures(port, server["queue"], dispatches)
        if baseline is not None:
            # On a queue of the same size written by the baseline's own scripts.
            queue = f"global-{next(serial)}"
            fill(port, queue, args.queued, TENANTS, baseline)
            server["baseline"] = script_figures(port, queue, dispatches, baseline)
            if args.baseline_first:
                server["scripts"] = script_figures(port, server["queue"], dispatches)
        server.update(asyncio.run(_score_server_figures(port, args.queued)))
        print(f"server figures: {server}", file=sys.stderr)
    notes.append(
        f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: "
        "the machine is shared, so figures move from run to run."
    )
    return {
        "rows": rows,
        "notes": notes,
        "server": server,
        "environment": environment(modules),
        "command": "python benches/redis_compare.py " + " ".join(sys.argv[1:]),
        "messages": n,
        "fsync": args.fsync,
    }


def render_global(report: dict[str, Any]) -> str:
    """The "Redis global choice" section: the throughput table and the server figures."""
    table = render(report).splitlines()[1:-1]  # the same table, without the other section's markers
    server = report["server"]
    lines = [GLOBAL_START, *table, ""]
    lines.append(
        f"With {server['queued']:,} messages queued (ten tenants): "
        f"{server['bytes_per_message']:,.0f} bytes of Redis memory per queued message (`used_memory` "
        f"delta), of which the ranking index takes "
        f"{server['index_bytes_per_message']:,.0f} (`MEMORY USAGE` of its keys)."
    )
    scripts = server["scripts"]
    lines += [
        "",
        f"Server time on that queue (`INFO commandstats`, EVALSHA, mean over {scripts['dispatches']:,} "
        "jobs per figure, each phase alone on the server):",
        "",
        "| server time | " + ("this build | before |" if "baseline" in server else "this build |"),
        "|---|" + ("---:|---:|" if "baseline" in server else "---:|"),
    ]
    for key, label in (
        ("dispatch_us", "dispatch script, one winner per call (select + reserve + lease), µs"),
        ("mark_us", "mark script, one mark per call (delete + limiter correction + tenant charge), µs"),
        ("dispatch16_us_per_job", "dispatch, 16 winners per call, µs per job"),
        ("mark16_us_per_job", "16 marks made together, µs per job"),
        ("mark16_calls_per_job", "script calls per job for those marks"),
    ):
        cells = [
            f"{scripts[key]:.2f}" if key.endswith("per_job") and "calls" in key else f"{scripts[key]:.0f}"
        ]
        if "baseline" in server:
            other = server["baseline"][key]
            cells.append(f"{other:.2f}" if "calls" in key else f"{other:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "score_dispatch_us" in server:
        lines.append("")
        lines.append(
            f"The score policy, {server['queued']:,} messages queued (every priority, 50 to 4,000 "
            f"tokens, four expected processing times: {server['score_cells']:,} non-empty cells): "
            f"its index takes {server['score_index_bytes_per_message']:,.0f} bytes per message; server "
            f"time per dispatch script {server['score_dispatch_us']:.0f} µs, per mark "
            f"{server['score_mark_us']:.0f} µs (the same method)."
        )
    lines.append(GLOBAL_END)
    return "\n".join(lines)


def write_global_results(section: str, path: Path = RESULTS_PATH) -> None:
    text = path.read_text()
    if GLOBAL_START in text and GLOBAL_END in text:
        before, rest = text.split(GLOBAL_START, 1)
        _, after = rest.split(GLOBAL_END, 1)
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n## Redis global choice\n\n" + section + "\n"
    path.write_text(text)


def environment(modules: Path | None) -> dict[str, Any]:
    from compare import cpu_model, tool_version

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": tool_version(["nproc"]) or str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "redis_py": _redis_py_version(),
        "redis_server": redis_version(),
        "node": tool_version(["node", "--version"]),
        "bullmq": bullmq_version(modules) if modules is not None else None,
    }


def _redis_py_version() -> str:
    import redis

    return str(redis.__version__)


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    by = {(r["name"], r["processes"]): r for r in report["rows"]}
    counts = sorted({r["processes"] for r in report["rows"]})
    lines = [
        START_MARKER,
        f"Measured {env['date']} on {env['nproc']} cores ({env['cpu']}), Python {env['python']}, redis-py "
        f"{env['redis_py']}, redis-server {env['redis_server']} (append-only file, appendfsync "
        f"{report['fsync']}, noeviction), node {env['node'] or 'not found'}, "
        f"BullMQ {env['bullmq'] or 'skipped'}. {report['messages']:,} messages per measurement; every "
        "process and the server share the machine.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| measurement (per second, all processes) | "
        + " | ".join(f"{p} process{'es' if p > 1 else ''}" for p in counts)
        + " |",
        "|---|" + "---:|" * len(counts),
    ]
    names = list(dict.fromkeys(r["name"] for r in report["rows"]))
    for name in names:
        cells = []
        for processes in counts:
            record = by.get((name, processes))
            if record is None or record.get("per_second") is None:
                cells.append("-")
            elif "p50_us" in record:
                latency = f"p50 {record['p50_us']:.0f} µs, p99 {record['p99_us']:.0f} µs"
                cells.append(f"{record['per_second']:,.0f} ({latency})")
            else:
                cells.append(f"{record['per_second']:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for note in report["notes"]:
        lines += ["", note]
    lines.append(END_MARKER)
    return "\n".join(lines)


def write_results(section: str, path: Path = RESULTS_PATH) -> None:
    text = path.read_text()
    if START_MARKER in text and END_MARKER in text:
        before, rest = text.split(START_MARKER, 1)
        _, after = rest.split(END_MARKER, 1)
        text = before + section + after
    else:
        text = (
            text.rstrip()
            + "\n\n## Redis: RedisStorage, the dispatcher and BullMQ on one server\n\n"
            + section
            + "\n"
        )
    path.write_text(text)


def parse_processes(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"bad process counts {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        task, url, queue, count, start_at = argv[1:6]
        concurrency = int(argv[6]) if len(argv) > 6 else 16
        print(json.dumps(asyncio.run(_child(task, url, queue, int(count), float(start_at), concurrency))))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--messages", type=int, default=20_000, help="messages per measurement (default 20000)"
    )
    parser.add_argument("--consumes", type=int, default=5_000, help="limiter consumes per process")
    parser.add_argument("--processes", type=parse_processes, default=[1, 4], help="e.g. 1,4 (default)")
    parser.add_argument("--fsync", choices=["everysec", "always", "no"], default="everysec")
    parser.add_argument("--no-bullmq", action="store_true", help="skip the BullMQ side")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--write-results", action="store_true", help=f"update {RESULTS_PATH.name}")
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    parser.add_argument(
        "--global", dest="global_choice", action="store_true", help="measure the global choice"
    )
    parser.add_argument(
        "--queued", type=int, default=1_000_000, help="messages waiting for the server figures (--global)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="--global: dispatch tasks, Worker handlers and BullMQ's worker concurrency (default 16)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="--global: also measure the library of this checkout (its .venv), row beside row",
    )
    parser.add_argument(
        "--baseline-first",
        action="store_true",
        help="--global --baseline: measure the baseline's row before this build's (alternate runs)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.consumes = min(args.messages, 300), min(args.consumes, 200)
        args.queued = min(args.queued, 3_000)
    if args.global_choice:
        report = measure_global(args)
        section = render_global(report)
        print(json.dumps(report, indent=2) if args.json else section)
        if args.write_results:
            write_global_results(section)
        return 0
    report = measure(args)
    section = render(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(section)
    if args.write_results:
        write_results(section)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # compare.py's environment helpers
    raise SystemExit(main())
