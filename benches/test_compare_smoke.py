"""Smoke tests of benches/compare.py: workload, contract scoring, measurements, RESULTS.md, CLI.

Fast (a few seconds) and independent of node: the TypeScript side is only exercised by the real run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import compare
import pytest
from compare import BruteForceDispatcher, Mulberry32, SimulatedClock, WorkItem, workload

from tests.reference.scoring import ContractWeights, total_score

SCRIPT = Path(compare.__file__).resolve()


# --- workload -----------------------------------------------------------------------------------


def test_mulberry32_matches_the_javascript_original() -> None:
    # Reference values printed by node for the JavaScript mulberry32 (the one bench.mjs uses).
    rng = Mulberry32(1)
    assert [rng.next_float() for _ in range(3)] == [
        0.6270739405881613,
        0.002735721180215478,
        0.5274470399599522,
    ]
    rng = Mulberry32(20_240_601)
    assert [rng.next_float() for _ in range(3)] == [
        0.35344086796976626,
        0.02818377036601305,
        0.6889668190851808,
    ]


def test_workload_is_seeded_and_within_ranges() -> None:
    first = compare.take(workload(7), 20_000)
    assert first == compare.take(workload(7), 20_000)
    assert first != compare.take(workload(8), 20_000)
    assert [item.id for item in first[:3]] == ["w0", "w1", "w2"]
    assert len({item.id for item in first}) == len(first)
    assert all(50 <= item.tokens <= 4000 for item in first)
    assert {item.priority for item in first} == {0, 1, 2, 3}
    shares = Counter(item.priority for item in first)
    for priority, share in enumerate((0.1, 0.2, 0.5, 0.2)):
        assert shares[priority] / len(first) == pytest.approx(share, abs=0.02)
    timed = [item.expected_processing_time for item in first if item.expected_processing_time is not None]
    assert len(timed) / len(first) == pytest.approx(0.25, abs=0.02)
    assert all(0.5 <= t <= 40.0 for t in timed)
    tokens = [item.tokens for item in first]
    assert min(tokens) < 100
    assert max(tokens) > 3900


def test_fingerprint_summarises_the_prefix() -> None:
    items = [WorkItem("a", 0, 100, None), WorkItem("b", 2, 50, 1.5), WorkItem("c", 2, 7, 0.25)]
    assert compare.fingerprint(items) == "n=3 p=[1, 0, 2, 0] tokens=157 timed=2 time_sum=1.750000"


@pytest.mark.parametrize(
    ("text", "depths"),
    [("1k,10k,100k,1M", [1_000, 10_000, 100_000, 1_000_000]), ("250, 2.5k", [250, 2_500])],
)
def test_parse_depths(text: str, depths: list[int]) -> None:
    assert compare.parse_depths(text) == depths


def test_parse_depth_rejects_nonsense() -> None:
    with pytest.raises(Exception, match="bad depth"):
        compare.parse_depth("ten")


# --- the brute-force dispatcher ---------------------------------------------------------------


def test_bruteforce_picks_the_best_score_every_time() -> None:
    clock = SimulatedClock(100.0)
    dispatcher = BruteForceDispatcher(clock, tpm=10_000)
    items = compare.take(workload(3), 40)
    for item in items:
        dispatcher.enqueue(item)
        clock.advance(0.5)  # different ages, so wait time matters
    chosen = []
    while dispatcher.visible:
        available = dispatcher.tokens.available()
        expected_best = max(
            (
                total_score(
                    priority=m.item.priority,
                    tokens=m.item.tokens,
                    expected_processing_time=m.item.expected_processing_time,
                    age=clock() - m.enqueued_at,
                    receive_count=0,
                    available=available,
                    weights=ContractWeights(),
                )
                for m in dispatcher.visible
                if m.item.tokens <= available
            ),
            default=None,
        )
        picked = dispatcher.dequeue()
        if picked is None:
            break
        assert expected_best is not None
        age = clock() - next(m.enqueued_at for m in dispatcher.in_flight.values() if m.item is picked)
        got = total_score(
            priority=picked.priority,
            tokens=picked.tokens,
            expected_processing_time=picked.expected_processing_time,
            age=age,
            receive_count=0,
            available=available,
            weights=ContractWeights(),
        )
        assert got == pytest.approx(expected_best)
        dispatcher.ack(picked.id)
        chosen.append(picked)
    assert chosen
    assert not dispatcher.in_flight


def test_bruteforce_respects_the_token_bucket() -> None:
    clock = SimulatedClock(0.0)
    dispatcher = BruteForceDispatcher(clock, tpm=3000)
    dispatcher.enqueue(WorkItem("big", 0, 2500, None))
    dispatcher.enqueue(WorkItem("small", 3, 1000, None))
    first = dispatcher.dequeue()
    assert first is not None
    assert first.id == "big"  # URGENT wins while it fits
    assert dispatcher.tokens.available() == pytest.approx(500)
    assert dispatcher.dequeue() is None  # 1000 tokens do not fit into the 500 left
    clock.advance(10.0)  # refill 3000/60 per second -> 500 more
    second = dispatcher.dequeue()
    assert second is not None
    assert second.id == "small"
    dispatcher.ack("big")
    dispatcher.ack("small")
    assert not dispatcher.visible
    assert not dispatcher.in_flight


# --- measurements -----------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    samples = list(range(1, 101))
    assert compare.percentile(samples, 50) == 50
    assert compare.percentile(samples, 99) == 99
    assert compare.percentile([5], 99) == 5


@pytest.mark.parametrize("measure", [compare.measure_heapq, compare.measure_bruteforce])
def test_measurement_at_a_tiny_depth(measure: Callable[[int, int, int], dict[str, Any]]) -> None:
    record = measure(50, 40, 11)
    assert record["depth"] == 50
    assert record["rounds"] == 40  # measured rounds; the warm-up rounds come on top
    assert 0 < record["p50_us"] <= record["p99_us"]
    assert record["enqueue_p50_us"] > 0
    assert record["batch_msgs_per_s"] > 0


def test_ratios_compare_p50s() -> None:
    results = [
        {"impl": "heapq", "depth": 10, "p50_us": 2.0},
        {"impl": "ours", "depth": 10, "p50_us": 6.0},
        {"impl": "ts", "depth": 10, "p50_us": 30.0},
        {"impl": "bruteforce", "depth": 10, "p50_us": 60.0},
        {"impl": "baseline", "depth": 10, "p50_us": 12.0, "p99_us": 40.0},
    ]
    results[1]["p99_us"] = 10.0
    (entry,) = compare.compute_ratios(results, [10])
    assert entry == {
        "depth": 10,
        "ours_over_heapq": 3.0,
        "ts_over_ours": 5.0,
        "ts_over_bruteforce": 0.5,
        "ours_over_baseline": 0.5,
        "ours_over_baseline_p99": 0.25,
    }
    (missing,) = compare.compute_ratios(results[:1], [10])
    assert missing["ours_over_heapq"] is None
    assert missing["ours_over_baseline"] is None


def test_repeated_runs_keep_the_median_of_each_figure_and_every_runs_p50() -> None:
    runs = [
        {"impl": "ours", "depth": 10, "p50_us": p50, "p99_us": p50 * 2, "bytes_per_msg": 100.0}
        for p50 in (5.0, 3.0, 4.0)
    ]
    record = compare.median_record(runs)
    assert (record["p50_us"], record["p99_us"], record["bytes_per_msg"]) == (4.0, 8.0, 100.0)
    assert (record["runs"], record["p50_runs_us"]) == (3, [5.0, 3.0, 4.0])
    assert compare.median_record(runs[:2])["p50_us"] == 4.0


def test_impls_are_checked() -> None:
    assert compare.parse_impls("ours, baseline") == ["ours", "baseline"]
    with pytest.raises(Exception, match="bad --impls"):
        compare.parse_impls("ours,rust")


def test_ts_is_skipped_without_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("compare.shutil.which", lambda name: None)
    with pytest.raises(compare.Skip, match="node or npm not found"):
        compare.ts_install(tmp_path)


# --- RESULTS.md -------------------------------------------------------------------------------


def _section(body: str) -> str:
    return f"{compare.START_MARKER}\n{body}\n{compare.END_MARKER}\n"


def test_rewrite_results_replaces_only_the_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    before = "# Benchmark results\n\nIntro.\n\n"
    after = "\n## Another section\n\nKept as is.\n"
    path.write_text(before + _section("old figures") + after)
    compare.rewrite_results(path, _section("new figures"))
    assert path.read_text() == before + _section("new figures") + after
    compare.rewrite_results(path, _section("newer figures"))
    assert path.read_text() == before + _section("newer figures") + after


def test_rewrite_results_appends_when_absent(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nIntro.\n")
    compare.rewrite_results(path, _section("figures"))
    assert path.read_text() == "# Benchmark results\n\nIntro.\n\n" + _section("figures")


# --- the CLI ----------------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_cli_quick_without_ts_and_ours(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nKeep me.\n")
    report_path = tmp_path / "report.json"
    proc = _run(
        [
            *("--quick", "--no-ts", "--no-ours", "--write-results"),
            *("--json", str(report_path), "--results-file", str(results)),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "ts: skipped (disabled by --no-ts)" in proc.stdout
    report = json.loads(report_path.read_text())
    measured = {(r["impl"], r["depth"]) for r in report["results"]}
    assert measured == {(impl, depth) for impl in ("heapq", "bruteforce") for depth in compare.QUICK_DEPTHS}
    for record in report["results"]:
        assert record["rounds"] > 0
        assert 0 < record["p50_us"] <= record["p99_us"]
        assert math.isfinite(record["bytes_per_msg"])
    # A full scan is far slower than a heap operation at the same depth.
    by_key = {(r["impl"], r["depth"]): r for r in report["results"]}
    assert by_key[("bruteforce", 1000)]["p50_us"] > 10 * by_key[("heapq", 1000)]["p50_us"]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nKeep me.\n")
    assert text.count(compare.START_MARKER) == 1
    assert text.count(compare.END_MARKER) == 1
    assert "--quick --no-ts --no-ours" in text
    assert "| heapq | 1k |" in text


def test_cli_reports_a_missing_dispatcher_and_carries_on(tmp_path: Path) -> None:
    # A stand-in package that shadows the real one, so the import of the dispatcher fails.
    fake = tmp_path / "llm_queue_dispatcher"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = _run(["--depths", "100", "--rounds", "20", "--no-ts"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ours: skipped (dispatcher not available: ImportError" in proc.stdout
    assert "heapq" in proc.stdout
    assert "bruteforce" in proc.stdout


# A contract-shaped stand-in for the package (pure Python, exact by priority then age), so the
# "ours" path of the harness is exercised before the real dispatcher lands on main.
FAKE_PACKAGE = """
from dataclasses import dataclass
from enum import IntEnum


class Priority(IntEnum):
    URGENT = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


@dataclass(frozen=True)
class TokenInfo:
    estimated: int
    actual: int | None = None
    model: str | None = None


@dataclass
class LLMRequest:
    id: str
    payload: object
    priority: Priority = Priority.NORMAL
    token_info: TokenInfo = TokenInfo(0)
    expected_processing_time: float | None = None


class ManualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


class LLMThrottle:
    def __init__(self, rpm, tpm, *, clock=None):
        assert isinstance(clock, ManualClock)
        self.tokens = tpm


class _Job:
    def __init__(self, queue, request):
        self.queue, self.request = queue, request

    async def mark_as_processed(self, actual_tokens=None):
        del self.queue.in_flight[self.request.id]


class _Queue:
    def __init__(self, clock):
        assert isinstance(clock, ManualClock)
        self.clock, self.visible, self.in_flight = clock, {}, {}

    async def enqueue(self, request):
        assert isinstance(request, LLMRequest) and isinstance(request.priority, Priority)
        assert request.id not in self.visible and request.id not in self.in_flight
        self.visible[request.id] = (request, self.clock.now())

    async def batch_enqueue(self, requests):
        for request in requests:
            await self.enqueue(request)

    async def dequeue(self, rate_limiter, *, timeout=None):
        assert isinstance(rate_limiter, LLMThrottle)
        assert not self.in_flight, "the previous job was not acknowledged"
        key = min(self.visible, key=lambda k: (self.visible[k][0].priority, self.visible[k][1]))
        request, _ = self.visible.pop(key)
        self.in_flight[key] = request
        rate_limiter.tokens -= request.token_info.estimated
        return _Job(self, request)


def create_in_memory_queue(config=None, **overrides):
    return _Queue(overrides["clock"])
"""


def test_cli_measures_ours_through_the_contract_api(tmp_path: Path) -> None:
    fake = tmp_path / "llm_queue_dispatcher"
    fake.mkdir()
    (fake / "__init__.py").write_text(FAKE_PACKAGE)
    report_path = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = _run(["--depths", "100,300", "--rounds", "30", "--no-ts", "--json", str(report_path)], env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    ours = {r["depth"]: r for r in report["results"] if r["impl"] == "ours"}
    assert sorted(ours) == [100, 300]
    for record in ours.values():
        assert record["rounds"] == 30
        assert 0 < record["p50_us"] <= record["p99_us"]
        assert record["batch_msgs_per_s"] > 0
    for entry in report["ratios"]:
        assert entry["ours_over_heapq"] is not None
        assert entry["ours_over_heapq"] > 0
    assert "ours" not in report["skipped"]
