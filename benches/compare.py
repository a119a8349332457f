#!/usr/bin/env python3
"""Side-by-side benchmark: our dispatcher against the published TypeScript library and two Python floors.

One run measures, at each queue depth (``--depths``, default 1k/10k/100k/1M):

* ``heapq``      a bare ``heapq`` pop+push loop: the floor of any Python-level queue;
* ``bruteforce`` a plain-Python dispatcher that scans every message with the reference scorer
                 (tests/reference/scoring.py: the contract's six factor functions), default
                 weights, a simple token bucket (1k and 10k only: it is O(depth) per dequeue);
* ``ts``         ``@aid-on/llm-queue-dispatcher@1.0.2`` + ``@aid-on/llm-throttle@1.0.1`` under node
                 (installed with npm into ``benches/.cache/``), driven by ``benches/ts/bench.mjs``;
* ``ours``       this package through its public API only;
* ``baseline``   the same measurement of another commit of this package (``--baseline REF``, e.g.
                 ``main``): its tree (``git archive``) built once into ``benches/.cache/`` with a
                 virtualenv of its own, so a change is measured side by side with what it changes.

Every implementation gets the same seeded workload (a mulberry32 stream, ported bit for bit to
``bench.mjs``; the two fingerprints are compared). Each measurement runs in its own process, so
memory figures are per depth and nothing leaks between implementations.

    python benches/compare.py --quick --no-ts          # smoke configuration
    python benches/compare.py --write-results          # the full run; rewrites RESULTS.md's section
    python benches/compare.py --impls ours,baseline --baseline main --depths 1k,1M --repeat 5
                                                       # this tree against main, alternating runs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import heapq
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
# The brute force scores with the shared reference scorer (tests/reference/scoring.py), which
# imports nothing from the package: run as a script, the repository root is not on sys.path.
sys.path.insert(0, str(HERE.parent))

from tests.reference.scoring import ContractWeights, Weights, selection_key, total_score  # noqa: E402

CACHE_DIR = HERE / ".cache"
TS_SCRIPT = HERE / "ts" / "bench.mjs"
RESULTS_PATH = HERE / "RESULTS.md"
TS_PACKAGES = ("@aid-on/llm-queue-dispatcher@1.0.2", "@aid-on/llm-throttle@1.0.1")
DEFAULT_DEPTHS = (1_000, 10_000, 100_000, 1_000_000)
QUICK_DEPTHS = (100, 1_000)
QUICK_ROUNDS = 200
DEFAULT_ROUNDS = 1000
BRUTEFORCE_MAX_DEPTH = 10_000
DEFAULT_SEED = 20_240_601
# rpm and tpm of every limiter: large enough that no limiter ever blocks during a run
# (rounds x 4000 tokens stays far below it), so the figures measure selection, not waiting.
LIMIT = 1e9
# Simulated time per round for the Python implementations (ManualClock for ours, the same
# arithmetic for the brute force): wait-time factors change between dequeues, as in real use.
CLOCK_STEP = 0.001
CLOCK_START = 1_700_000_000.0
MIN_SCORE_THRESHOLD = 0.1  # the contract's default LLMQueueDispatcherConfig.min_score_threshold
IMPLEMENTATIONS = ("heapq", "bruteforce", "ts", "baseline", "ours")
START_MARKER = "<!-- compare:start -->"
END_MARKER = "<!-- compare:end -->"


# ---------------------------------------------------------------------------------------------
# Workload: a seeded stream shared with benches/ts/bench.mjs
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _imul(a: int, b: int) -> int:
    """JavaScript's ``Math.imul`` on unsigned 32-bit operands (result unsigned)."""
    return (a * b) & _MASK32


class Mulberry32:
    """mulberry32 (Tommy Ettinger's public-domain PRNG), bit-identical to the JavaScript original."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK32

    def next_float(self) -> float:
        """The next value in [0, 1), exactly as ``((t ^ t >>> 14) >>> 0) / 4294967296`` in JS."""
        self.state = (self.state + 0x6D2B79F5) & _MASK32
        a = self.state
        t = _imul(a ^ (a >> 15), 1 | a)
        t = ((t + _imul(t ^ (t >> 7), 61 | t)) & _MASK32) ^ t
        return (t ^ (t >> 14)) / 4294967296.0


class WorkItem(NamedTuple):
    """One request of the workload, independent of any implementation's request type."""

    id: str
    priority: int  # 0 URGENT .. 3 LOW
    tokens: int  # estimated tokens, 50..4000
    expected_processing_time: float | None  # seconds, or None (derived from tokens by the scorer)


# Cumulative priority mix: 10 % URGENT, 20 % HIGH, 50 % NORMAL, 20 % LOW.
PRIORITY_CUMULATIVE = (0.1, 0.3, 0.8, 1.0)
MIN_TOKENS = 50
MAX_TOKENS = 4000
EXPLICIT_TIME_SHARE = 0.25  # share of requests with an explicit expected_processing_time


def workload(seed: int) -> Iterator[WorkItem]:
    """Endless seeded stream of work items with ids ``w0, w1, ...``; four draws per item."""
    rng = Mulberry32(seed)
    index = 0
    while True:
        r_priority, r_tokens, r_has_time, r_time = (rng.next_float() for _ in range(4))
        priority = next(i for i, bound in enumerate(PRIORITY_CUMULATIVE) if r_priority < bound)
        tokens = MIN_TOKENS + math.floor(r_tokens * (MAX_TOKENS - MIN_TOKENS + 1))
        expected = 0.5 + r_time * 39.5 if r_has_time < EXPLICIT_TIME_SHARE else None
        yield WorkItem(f"w{index}", priority, tokens, expected)
        index += 1


def fingerprint(items: Sequence[WorkItem]) -> str:
    """A short summary of a workload prefix; bench.mjs prints the same for its own stream."""
    by_priority = [0, 0, 0, 0]
    token_sum = 0
    timed = 0
    time_sum = 0.0
    for item in items:
        by_priority[item.priority] += 1
        token_sum += item.tokens
        if item.expected_processing_time is not None:
            timed += 1
            time_sum += item.expected_processing_time
    return f"n={len(items)} p={by_priority} tokens={token_sum} timed={timed} time_sum={time_sum:.6f}"


class TokenBucket:
    """Capacity ``per_minute``, refilled continuously at ``per_minute / 60`` per second; starts full."""

    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.clock = clock
        self.tokens = per_minute
        self.updated = clock()

    def available(self) -> float:
        now = self.clock()
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        return self.tokens

    def take(self, amount: float) -> bool:
        if self.available() < amount:
            return False
        self.tokens -= amount
        return True


class _Message:
    __slots__ = ("enqueued_at", "item", "receive_count", "seq")

    def __init__(self, item: WorkItem, enqueued_at: float, seq: int) -> None:
        self.item = item
        self.enqueued_at = enqueued_at
        self.seq = seq  # enqueue order, the last tie-breaker
        self.receive_count = 0


class BruteForceDispatcher:
    """Exact selection the naive way: score every visible message on every dequeue with the
    reference scorer (tests/reference/scoring.py), ties to the older message, then enqueue order."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        rpm: float = LIMIT,
        tpm: float = LIMIT,
        weights: Weights | None = None,
    ) -> None:
        self.clock = clock
        self.requests = TokenBucket(rpm, clock)
        self.tokens = TokenBucket(tpm, clock)
        self.weights = weights or ContractWeights()
        self.visible: list[_Message] = []
        self.in_flight: dict[str, _Message] = {}
        self._seq = 0

    def enqueue(self, item: WorkItem) -> None:
        self.visible.append(_Message(item, self.clock(), self._seq))
        self._seq += 1

    def dequeue(self) -> WorkItem | None:
        """Best-scoring message the buckets can serve now (reserving its budget), or None."""
        if self.requests.available() < 1:
            return None
        available = self.tokens.available()
        now = self.clock()
        weights = self.weights
        best_index = -1
        best_score = -math.inf
        best_key = (-math.inf, 0.0, 0)
        for index, message in enumerate(self.visible):
            item = message.item
            if item.tokens > available:
                continue
            score = total_score(
                priority=item.priority,
                tokens=item.tokens,
                expected_processing_time=item.expected_processing_time,
                age=now - message.enqueued_at,
                receive_count=message.receive_count,
                available=available,
                weights=weights,
            )
            if score >= best_score:  # the full key only where it can matter: cheap per message
                key = selection_key(score, message.enqueued_at, message.seq)
                if key > best_key:
                    best_index, best_score, best_key = index, score, key
        if best_index < 0 or best_score < MIN_SCORE_THRESHOLD:
            return None
        # Swap-remove: O(1), and order does not matter to a full scan.
        chosen = self.visible[best_index]
        last = self.visible.pop()
        if last is not chosen:
            self.visible[best_index] = last
        self.requests.take(1)
        self.tokens.take(chosen.item.tokens)
        chosen.receive_count += 1
        self.in_flight[chosen.item.id] = chosen
        return chosen.item

    def ack(self, message_id: str) -> None:
        del self.in_flight[message_id]


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the sample at rank ceil(pct/100 · n))."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except OSError:
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def summarize(
    *,
    impl: str,
    depth: int,
    rounds_ns: Sequence[int],
    enqueue_ns: Sequence[int],
    fill_seconds: float,
    bytes_delta: float,
    **extra: Any,
) -> dict[str, Any]:
    """The common result record (latencies in microseconds)."""
    return {
        "impl": impl,
        "depth": depth,
        "rounds": len(rounds_ns),
        "p50_us": percentile(rounds_ns, 50) / 1000,
        "p99_us": percentile(rounds_ns, 99) / 1000,
        "mean_us": sum(rounds_ns) / len(rounds_ns) / 1000,
        "enqueue_p50_us": percentile(enqueue_ns, 50) / 1000,
        "batch_msgs_per_s": depth / fill_seconds if fill_seconds > 0 else math.inf,
        "bytes_per_msg": bytes_delta / depth,
        **extra,
    }


def default_rounds(depth: int) -> int:
    # The same count at every depth: the TS library's dequeue cost grows with the completions it
    # has recorded (see NOTES), so equal rounds keep its depths comparable.
    del depth
    return DEFAULT_ROUNDS


def bruteforce_rounds(depth: int, rounds: int) -> int:
    # A full scan costs ~depth x 2.5 us: cap the total scanning work per depth.
    return max(20, min(rounds, 2_000_000 // depth))


def warmup_rounds(rounds: int) -> int:
    return min(200, rounds // 10)


def take(stream: Iterator[WorkItem], count: int) -> list[WorkItem]:
    return [next(stream) for _ in range(count)]


def measure_heapq(depth: int, rounds: int, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """heappop + heappush at steady depth; the entry is (priority, seq, item) like a real queue's."""
    stream = workload(seed)
    gc.collect()
    before = rss_bytes()
    items = take(stream, depth)
    start = time.perf_counter()
    heap = [(item.priority, seq, item) for seq, item in enumerate(items)]
    heapq.heapify(heap)
    fill = time.perf_counter() - start
    del items
    gc.collect()
    after = rss_bytes()
    warm = warmup_rounds(rounds)
    refills = take(stream, rounds + warm)
    clock = time.perf_counter_ns
    rounds_ns: list[int] = []
    enqueue_ns: list[int] = []
    pop, push = heapq.heappop, heapq.heappush
    for seq, item in enumerate(refills, start=depth):
        t0 = clock()
        pop(heap)
        t1 = clock()
        push(heap, (item.priority, seq, item))
        t2 = clock()
        rounds_ns.append(t2 - t0)
        enqueue_ns.append(t2 - t1)
    if len(heap) != depth:
        raise AssertionError(f"heap depth drifted to {len(heap)}")
    return summarize(
        impl="heapq",
        depth=depth,
        rounds_ns=rounds_ns[warm:],
        enqueue_ns=enqueue_ns[warm:],
        fill_seconds=fill,
        bytes_delta=after - before,
        note="heapify of the filled list",
    )


class SimulatedClock:
    """Seconds that advance only when told to (the brute force's ManualClock)."""

    def __init__(self, start: float) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


def measure_bruteforce(depth: int, rounds: int, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """dequeue (full scan) + ack per round, one enqueue to keep the depth steady."""
    stream = workload(seed)
    clock = SimulatedClock(CLOCK_START)
    dispatcher = BruteForceDispatcher(clock)
    gc.collect()
    before = rss_bytes()
    items = take(stream, depth)
    start = time.perf_counter()
    for item in items:
        dispatcher.enqueue(item)
    fill = time.perf_counter() - start
    del items
    gc.collect()
    after = rss_bytes()
    warm = warmup_rounds(rounds)
    refills = take(stream, rounds + warm)
    timer = time.perf_counter_ns
    rounds_ns: list[int] = []
    enqueue_ns: list[int] = []
    for item in refills:
        clock.advance(CLOCK_STEP)
        t0 = timer()
        chosen = dispatcher.dequeue()
        if chosen is None:
            raise AssertionError(f"bruteforce found nothing to dequeue at depth {depth}")
        dispatcher.ack(chosen.id)
        t1 = timer()
        dispatcher.enqueue(item)
        t2 = timer()
        rounds_ns.append(t1 - t0)
        enqueue_ns.append(t2 - t1)
    return summarize(
        impl="bruteforce",
        depth=depth,
        rounds_ns=rounds_ns[warm:],
        enqueue_ns=enqueue_ns[warm:],
        fill_seconds=fill,
        bytes_delta=after - before,
    )


class DispatcherUnavailable(Exception):
    """Our dispatcher cannot be imported (it is still being built)."""


def measure_ours(depth: int, rounds: int, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Our dispatcher through the public contract API only."""
    try:
        from llm_queue_dispatcher import (  # type: ignore[attr-defined,unused-ignore]  # not on main yet
            LLMRequest,
            LLMThrottle,
            ManualClock,
            Priority,
            TokenInfo,
            create_in_memory_queue,
        )
    except Exception as exc:
        raise DispatcherUnavailable(f"{type(exc).__name__}: {exc}") from exc

    payload = {"prompt": "benchmark"}  # one shared payload: measure the queue, not the payloads

    def request(item: WorkItem) -> Any:
        return LLMRequest(
            id=item.id,
            payload=payload,
            priority=Priority(item.priority),
            token_info=TokenInfo(item.tokens),
            expected_processing_time=item.expected_processing_time,
        )

    async def run() -> dict[str, Any]:
        stream = workload(seed)
        clock = ManualClock(start=CLOCK_START)
        dispatcher = create_in_memory_queue(clock=clock)
        throttle = LLMThrottle(LIMIT, LIMIT, clock=clock)
        gc.collect()
        before = rss_bytes()
        requests = [request(item) for item in take(stream, depth)]
        start = time.perf_counter()
        await dispatcher.batch_enqueue(requests)
        fill = time.perf_counter() - start
        del requests
        gc.collect()
        after = rss_bytes()
        warm = warmup_rounds(rounds)
        refills = [request(item) for item in take(stream, rounds + warm)]
        timer = time.perf_counter_ns
        rounds_ns: list[int] = []
        enqueue_ns: list[int] = []
        for refill in refills:
            clock.advance(CLOCK_STEP)
            t0 = timer()
            job = await dispatcher.dequeue(throttle)
            if job is None:
                raise AssertionError(f"dispatcher.dequeue returned None at depth {depth}")
            await job.mark_as_processed()
            t1 = timer()
            await dispatcher.enqueue(refill)
            t2 = timer()
            rounds_ns.append(t1 - t0)
            enqueue_ns.append(t2 - t1)
        return summarize(
            impl="ours",
            depth=depth,
            rounds_ns=rounds_ns[warm:],
            enqueue_ns=enqueue_ns[warm:],
            fill_seconds=fill,
            bytes_delta=after - before,
        )

    return asyncio.run(run())


WORKERS: dict[str, Callable[[int, int, int], dict[str, Any]]] = {
    "heapq": measure_heapq,
    "bruteforce": measure_bruteforce,
    "ours": measure_ours,
}


def worker_main(kind: str, depth: int, rounds: int, seed: int) -> int:
    """Subprocess entry point: one measurement, one JSON line on stdout."""
    try:
        result = WORKERS[kind](depth, rounds, seed)
    except DispatcherUnavailable as exc:
        result = {"impl": kind, "depth": depth, "unavailable": str(exc)}
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


class Skip(Exception):
    """An implementation cannot run here; the message says why."""


def run_json_command(command: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run a measuring subprocess and parse the JSON object on its last stdout line."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def run_python_worker(
    kind: str, depth: int, rounds: int, seed: int, python: Path | None = None
) -> dict[str, Any]:
    """One measurement in a subprocess: of this tree's package, or with ``python`` (a baseline
    build's interpreter) of that one's, the workload and timing code being this file's."""
    command = [str(python or sys.executable), str(Path(__file__).resolve()), "--worker", kind]
    command += ["--depth", str(depth), "--rounds", str(rounds), "--seed", str(seed)]
    result: dict[str, Any] = run_json_command(command, timeout=3600)
    return result


def baseline_build(ref: str, cache_dir: Path = CACHE_DIR) -> tuple[str, Path]:
    """``ref``'s commit and the interpreter of a virtualenv holding its build of the package,
    made once per commit in ``cache_dir``: its tree exported with ``git archive`` (no worktree,
    nothing of the repository changed), compiled in release mode with this tree's ``maturin``,
    installed without dependencies (the measurement needs none)."""
    repo = HERE.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--verify", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Skip(f"cannot resolve {ref!r} to a commit: {exc}") from exc
    root = cache_dir / f"baseline-{sha[:12]}"
    python = root / "venv" / "bin" / "python"
    done = root / "built"
    if done.exists():
        return sha, python
    maturin = shutil.which("maturin", path=str(Path(sys.executable).parent)) or shutil.which("maturin")
    if maturin is None:
        raise Skip("maturin not found (make install puts it into .venv)")
    source = root / "src"
    shutil.rmtree(root, ignore_errors=True)
    source.mkdir(parents=True)
    print(f"baseline: building {ref} ({sha[:12]}) into {root} (once)", flush=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", sha], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    wheels = root / "wheels"
    subprocess.run(
        [maturin, "build", "--release", "--quiet", "--interpreter", str(python), "--out", str(wheels)],
        cwd=source,
        check=True,
    )
    [wheel] = wheels.glob("*.whl")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True)
    done.write_text(sha + "\n")
    return sha, python


def ts_install(cache_dir: Path = CACHE_DIR) -> Path:
    """node_modules with the pinned TypeScript packages, installed once into the cache."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise Skip("node or npm not found on PATH")
    target = cache_dir / ("ts-" + "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", p) for p in TS_PACKAGES))
    modules = target / "node_modules"
    if all((modules / pkg.rsplit("@", 1)[0] / "package.json").exists() for pkg in TS_PACKAGES):
        return modules
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="npm-", dir=cache_dir))
    try:
        (staging / "package.json").write_text('{"name": "llmqd-compare", "private": true}\n')
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", *TS_PACKAGES],
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


def run_ts(modules: Path, depth: int, rounds: int, seed: int) -> dict[str, Any]:
    command = ["node", "--expose-gc", "--max-old-space-size=16384", str(TS_SCRIPT)]
    command += ["--modules", str(modules), "--depth", str(depth), "--rounds", str(rounds)]
    command += ["--warmup", str(warmup_rounds(rounds)), "--seed", str(seed)]
    raw: dict[str, Any] = run_json_command(command, timeout=3600)
    expected = fingerprint(take(workload(seed), depth))
    if raw.get("fingerprint") != expected:
        raise RuntimeError(f"workload mismatch: node {raw.get('fingerprint')!r} != python {expected!r}")
    tenth = len(raw["rounds_ns"]) // 10
    result = summarize(
        impl="ts",
        depth=depth,
        rounds_ns=raw["rounds_ns"],
        enqueue_ns=raw["enqueue_ns"],
        fill_seconds=raw["fill_seconds"],
        bytes_delta=raw["heap_delta_bytes"],
        nulls=raw["nulls"],
        # The library's latency drifts upwards with completions: keep both ends visible.
        first_tenth_p50_us=percentile(raw["rounds_ns"][: max(1, tenth)], 50) / 1000,
        last_tenth_p50_us=percentile(raw["rounds_ns"][-max(1, tenth) :], 50) / 1000,
    )
    return result


def tool_version(command: Sequence[str]) -> str | None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": tool_version(["nproc"]) or str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "node": tool_version(["node", "--version"]),
        "ts_packages": list(TS_PACKAGES),
    }


def parse_depth(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad depth {text!r} (use e.g. 1000, 10k, 1M)")
    value = float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"bad depth {text!r}")
    return int(value)


def parse_impls(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [impl for impl in chosen if impl not in IMPLEMENTATIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"bad --impls {text!r} (choose from {','.join(IMPLEMENTATIONS)})")
    return chosen


def parse_depths(text: str) -> list[int]:
    return [parse_depth(part) for part in text.split(",") if part.strip()]


MEDIAN_FIELDS = (
    "p50_us",
    "p99_us",
    "mean_us",
    "enqueue_p50_us",
    "batch_msgs_per_s",
    "bytes_per_msg",
    "first_tenth_p50_us",
    "last_tenth_p50_us",
)


def median_record(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record for repeated runs of an implementation at a depth: the median of each figure,
    and every run's p50 and p99 (``p50_runs_us``, ``p99_runs_us``) to show the spread."""
    record = dict(runs[0])
    if len(runs) > 1:
        for key in MEDIAN_FIELDS:
            values = sorted(float(run[key]) for run in runs if key in run)
            if values:
                middle = len(values) // 2
                record[key] = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    record["runs"] = len(runs)
    record["p50_runs_us"] = [run["p50_us"] for run in runs]
    record["p99_runs_us"] = [run["p99_us"] for run in runs]
    return record


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def compute_ratios(results: Sequence[dict[str, Any]], depths: Sequence[int]) -> list[dict[str, Any]]:
    """Per depth: ours/heapq p50, TS/ours p50 (> 1: ours faster), TS/bruteforce p50, and
    ours/baseline of p50 and p99 (< 1: ours faster)."""
    by_key = {(r["impl"], r["depth"]): r for r in results}

    def p50(impl: str, depth: int, key: str = "p50_us") -> float | None:
        value = by_key.get((impl, depth), {}).get(key)
        return None if value is None else float(value)

    return [
        {
            "depth": depth,
            "ours_over_heapq": ratio(p50("ours", depth), p50("heapq", depth)),
            "ts_over_ours": ratio(p50("ts", depth), p50("ours", depth)),
            "ts_over_bruteforce": ratio(p50("ts", depth), p50("bruteforce", depth)),
            "ours_over_baseline": ratio(p50("ours", depth), p50("baseline", depth)),
            "ours_over_baseline_p99": ratio(p50("ours", depth, "p99_us"), p50("baseline", depth, "p99_us")),
        }
        for depth in depths
    ]


def human_depth(depth: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if depth >= size and depth % size == 0:
            return f"{depth // size}{unit}"
    return str(depth)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


TABLE_HEADER = (
    "impl",
    "depth",
    "rounds",
    "p50 µs",
    "p99 µs",
    "mean µs",
    "enqueue p50 µs",
    "batch enqueue msg/s",
    "bytes/msg",
)


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    order = {impl: i for i, impl in enumerate(IMPLEMENTATIONS)}
    rows = []
    for record in sorted(results, key=lambda r: (r["depth"], order.get(r["impl"], 99))):
        rows.append(
            [
                record["impl"],
                human_depth(record["depth"]),
                str(record["rounds"]),
                fmt(record["p50_us"]),
                fmt(record["p99_us"]),
                fmt(record["mean_us"]),
                fmt(record["enqueue_p50_us"]),
                fmt(record["batch_msgs_per_s"]),
                fmt(record["bytes_per_msg"], 0),
            ]
        )
    return rows


def ratio_lines(ratios: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    labels = (
        ("ours_over_heapq", "ours/heapq"),
        ("ts_over_ours", "TS/ours"),
        ("ts_over_bruteforce", "TS/bruteforce"),
        ("ours_over_baseline", "ours/baseline"),
        ("ours_over_baseline_p99", "ours/baseline p99"),
    )
    for entry in ratios:
        parts = [f"{label} {fmt(entry[key])}x" for key, label in labels if entry[key] is not None]
        lines.append(f"{human_depth(entry['depth'])}: " + (", ".join(parts) or "n/a (a side is missing)"))
    return lines


def drift_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """TS only: p50 of the first and the last tenth of the measured rounds."""
    return [
        f"{human_depth(r['depth'])}: first tenth p50 {fmt(r['first_tenth_p50_us'])} µs, "
        f"last tenth p50 {fmt(r['last_tenth_p50_us'])} µs"
        for r in sorted(results, key=lambda r: r["depth"])
        if r["impl"] == "ts" and "first_tenth_p50_us" in r
    ]


def text_table(rows: Sequence[Sequence[str]]) -> str:
    all_rows = [list(TABLE_HEADER), *rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(TABLE_HEADER))]
    out = []
    for index, row in enumerate(all_rows):
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_section(report: dict[str, Any]) -> str:
    """The RESULTS.md section, markers included."""
    env = report["environment"]
    lines = [
        START_MARKER,
        "## Side by side: heapq floor, brute force, TypeScript library, ours",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {env['date']}; `nproc`: {env['nproc']}; CPU: {env['cpu']}  ",
        f"Python {env['python']}; node {env['node'] or 'not found'}; TS packages: "
        + ", ".join(f"`{p}`" for p in env["ts_packages"]),
        "",
        "Per round: one dequeue and its ack (`markAsProcessed` / `mark_as_processed`; heapq: one pop),"
        " then one enqueue that keeps the depth steady (timed separately). Latencies in µs.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(TABLE_HEADER))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report["results"])]
    lines += ["", "Ratios of p50 round latency:", ""]
    lines += [f"- {line}" for line in ratio_lines(report["ratios"])]
    drift = drift_lines(report["results"])
    if drift:
        lines += ["", "TS latency drift within the run (see the notes):", ""]
        lines += [f"- {line}" for line in drift]
    if report["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in NOTES]
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"


NOTES = (
    "Same seeded workload everywhere (mulberry32; 10/20/50/20 % URGENT/HIGH/NORMAL/LOW, 50-4000"
    " estimated tokens, a quarter with an explicit expected processing time); the node run checks"
    " its stream's fingerprint against Python's.",
    "Limiters are configured with rpm = tpm = 1e9, so none ever blocks.",
    "The TS dispatcher scores a window: it prefetches 50 messages in insertion order and scores the"
    " first 20 of them by priority, so its cost does not grow with depth but its choice is not exact;"
    " it never consumes the limiter's budget (ours reserves it on every dequeue). Its logger is"
    " silenced (the default is console). Its dequeue rebuilds a metrics report over up to 10,000"
    " records each time, matching every completion against the enqueue records, so its latency grows"
    " with the number of completions in the 5-minute window: more rounds give a higher p50.",
    "bruteforce scans every visible message with the contract's six factor functions (1k and 10k"
    " only; fewer rounds at 10k).",
    "bytes/msg: RSS delta per queued message for the Python implementations (request objects"
    " included), V8 heapUsed delta after a forced GC for TS.",
    "Python implementations advance a simulated clock by 1 ms per round; TS reads Date.now().",
    "Every round is timed on its own (perf_counter_ns / hrtime), so the sub-microsecond heapq figures"
    " include the timer's own cost (~0.1 µs). Batch enqueue: heapify of the filled list for heapq,"
    " an append loop for bruteforce, batch_enqueue / batchEnqueue for ours / TS.",
)


def rewrite_results(path: Path, section: str) -> None:
    """Replace the delimited section of ``path`` (appending it when absent); keep everything else."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start != -1 and end != -1 and end > start:
        after = text[end + len(END_MARKER) :]
        after = after.removeprefix("\n")
        new_text = text[:start] + section + after
    else:
        new_text = text.rstrip("\n") + "\n\n" + section
    path.write_text(new_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=parse_depths, help="comma-separated depths, e.g. 1k,10k,100k,1M")
    parser.add_argument("--quick", action="store_true", help="small smoke configuration")
    parser.add_argument("--rounds", type=int, help=f"measured rounds per depth (default {DEFAULT_ROUNDS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-ts", action="store_true", help="skip the TypeScript library")
    parser.add_argument("--no-ours", action="store_true", help="skip our dispatcher")
    parser.add_argument(
        "--impls", type=parse_impls, help="comma-separated subset of " + ",".join(IMPLEMENTATIONS)
    )
    parser.add_argument(
        "--baseline", metavar="REF", help="also measure this commit's build of the package (e.g. main)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per implementation and depth, alternating; medians kept"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--write-results", action="store_true", help="rewrite the section of RESULTS.md")
    parser.add_argument("--results-file", type=Path, default=RESULTS_PATH, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.depth, args.rounds, args.seed)
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    depths = args.depths or (list(QUICK_DEPTHS) if args.quick else list(DEFAULT_DEPTHS))
    chosen_rounds = args.rounds or (QUICK_ROUNDS if args.quick else None)

    def rounds_for(depth: int) -> int:
        return chosen_rounds or default_rounds(depth)

    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    enabled = {
        "heapq": True,
        "bruteforce": True,
        "ts": not args.no_ts,
        "baseline": args.baseline is not None,
        "ours": not args.no_ours,
    }
    if args.impls is not None:
        enabled = {impl: on and impl in args.impls for impl, on in enabled.items()}
    modules: Path | None = None
    baseline_python: Path | None = None
    if enabled["baseline"]:
        try:
            sha, baseline_python = baseline_build(args.baseline)
        except (Skip, subprocess.CalledProcessError, ValueError) as exc:
            enabled["baseline"] = False
            skipped["baseline"] = str(exc)
            print(f"baseline: skipped ({exc})", flush=True)
        else:
            print(f"baseline: {args.baseline} = {sha[:12]}", flush=True)
    if enabled["ts"]:
        try:
            modules = ts_install()
        except Skip as exc:
            enabled["ts"] = False
            skipped["ts"] = str(exc)
            print(f"ts: skipped ({exc})", flush=True)
    for name, why in (("ts", "--no-ts"), ("ours", "--no-ours")):
        if not enabled[name] and name not in skipped and (args.impls is None or name in args.impls):
            skipped[name] = f"disabled by {why}"

    for depth in depths:
        rounds = rounds_for(depth)
        # Repeated runs alternate between the implementations, so a change in the machine's load
        # falls on all of them alike.
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            for impl in IMPLEMENTATIONS:
                if not enabled[impl] or (impl == "bruteforce" and depth > BRUTEFORCE_MAX_DEPTH):
                    continue
                started = time.perf_counter()
                try:
                    if impl == "ts":
                        assert modules is not None
                        record = run_ts(modules, depth, rounds, args.seed)
                    elif impl == "bruteforce":
                        record = run_python_worker(impl, depth, bruteforce_rounds(depth, rounds), args.seed)
                    elif impl == "baseline":
                        record = run_python_worker("ours", depth, rounds, args.seed, baseline_python)
                        record["impl"] = "baseline"
                    else:
                        record = run_python_worker(impl, depth, rounds, args.seed)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"{impl}: failed at depth {human_depth(depth)} ({exc}); continuing", flush=True)
                    skipped[impl] = f"failed at depth {human_depth(depth)}: {exc}"
                    continue
                if "unavailable" in record:
                    enabled[impl] = False
                    skipped[impl] = f"dispatcher not available: {record['unavailable']}"
                    print(f"{impl}: skipped (dispatcher not available: {record['unavailable']})", flush=True)
                    continue
                runs.setdefault(impl, []).append(record)
                print(
                    f"{impl:>10} {human_depth(depth):>5}: p50 {fmt(record['p50_us'])} µs, "
                    f"p99 {fmt(record['p99_us'])} µs ({time.perf_counter() - started:.1f} s)",
                    flush=True,
                )
        results += [median_record(impl_runs) for impl_runs in runs.values()]

    report: dict[str, Any] = {
        "command": " ".join(["python benches/compare.py", *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment(),
        "depths": depths,
        "results": results,
        "ratios": compute_ratios(results, depths),
        "skipped": skipped,
    }
    print()
    print(text_table(table_rows(results)))
    print()
    print(
        "Ratios of p50 round latency (ours/heapq: the price over the floor; TS/ours > 1: ours faster;"
        " ours/baseline < 1: ours faster):"
    )
    for line in ratio_lines(report["ratios"]):
        print("  " + line)
    drift = drift_lines(results)
    if drift:
        print("TS latency drift (its dequeue cost grows with recorded completions):")
        for line in drift:
            print("  " + line)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.write_results:
        rewrite_results(args.results_file, markdown_section(report))
        print(f"wrote the compare section of {args.results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
