"""`llm_queue_dispatcher.simulate` as a Python API: workloads, the provider model, traces,
retention, determinism, stopping, and what the policies achieve on a small overload; a workload
of many tenants is built in linear time."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import FairPriorityConfig, Priority
from llm_queue_dispatcher.simulate import (
    PRESETS,
    STRATEGIES,
    ProviderModel,
    SimulationProgress,
    SimulationResult,
    TraceRecord,
    Workload,
    format_summary,
    format_table,
    run_simulation,
)
from llm_queue_dispatcher.simulate_trace import TraceError, dumps, read_trace, write_trace

OVERLOAD = PRESETS["overload"]


def waited(result: SimulationResult, priority: str, q: str) -> float:
    """A wait percentile of a class that had requests sent."""
    value = result.wait_percentiles()[priority][q]
    assert value is not None, (priority, q)
    return value


def small_overload(seconds: float = 60.0, load: float = 2.0, seed: int = 3) -> list[TraceRecord]:
    workload = dataclasses.replace(OVERLOAD.workload, duration=seconds, seed=seed)
    return workload.with_load(load, OVERLOAD.tpm).generate()


def run(strategy: str, records: list[TraceRecord], **kwargs: Any) -> SimulationResult:
    return run_simulation(strategy, records, OVERLOAD.provider, rpm=OVERLOAD.rpm, tpm=OVERLOAD.tpm, **kwargs)


def figures(result: SimulationResult) -> dict[str, Any]:
    """Everything a run reports but its wall and CPU time (what differs between reruns)."""
    data = result.to_dict(per_tenant=True)
    assert data.pop("wall_time_s") >= 0
    assert data.pop("cpu_time_s") >= 0
    return data


# -- workloads ---------------------------------------------------------------------------------
def test_the_default_latency_model_is_0_4_s_plus_1_5_ms_per_token() -> None:
    provider = ProviderModel()
    assert provider.latency(0) == pytest.approx(0.4)
    assert provider.latency(1000) == pytest.approx(1.9)
    assert provider.concurrency == 32


def test_actual_tokens_are_the_estimate_times_0_6_to_1_2() -> None:
    records = Workload(requests=5000, seed=2).generate()
    ratios = [r.actual_tokens / r.estimated_tokens for r in records if r.estimated_tokens >= 200]
    assert min(ratios) >= 0.6 - 0.01
    assert max(ratios) <= 1.2 + 0.01
    assert sum(ratios) / len(ratios) == pytest.approx(0.9, abs=0.01)


def test_load_sets_the_rate_from_the_estimates_and_the_tpm_limit() -> None:
    workload = dataclasses.replace(OVERLOAD.workload, duration=3000.0).with_load(1.3, OVERLOAD.tpm)
    # The clipped log-normal mean, worked out in closed form ...
    assert workload.mean_estimate() == pytest.approx(800 * math.exp(0.5), rel=0.01)
    assert workload.arrival_rate == pytest.approx(1.3 * 400_000 / 60 / workload.mean_estimate())
    # ... matches what the generator draws: the offered load comes out as asked.
    records = workload.generate()
    offered = sum(r.estimated_tokens for r in records) / records[-1].arrival * 60 / OVERLOAD.tpm
    assert offered == pytest.approx(1.3, rel=0.05)
    assert records[-1].arrival <= 3000.0


def test_tenants_heavy_share_and_priority_mix() -> None:
    workload = Workload(
        requests=20_000, tenants=8, heavy_tenants=2, heavy_share=0.6, priority_mix=(5, 20, 50, 25), seed=4
    )
    records = workload.generate()
    share = {f"t{i}": sum(r.tenant == f"t{i}" for r in records) / len(records) for i in range(1, 9)}
    assert share["t1"] == pytest.approx(0.3, abs=0.02)
    assert share["t2"] == pytest.approx(0.3, abs=0.02)
    for light in range(3, 9):
        assert share[f"t{light}"] == pytest.approx(0.4 / 6, abs=0.01)
    urgent = sum(r.priority is Priority.URGENT for r in records) / len(records)
    assert urgent == pytest.approx(0.05, abs=0.01)
    assert all(20 <= r.estimated_tokens <= 200_000 for r in records)
    assert Workload(requests=10).generate()[0].tenant is None


def test_a_bad_workload_is_refused() -> None:
    with pytest.raises(ValueError, match="heavy_share"):
        Workload(tenants=4, heavy_share=1.5)
    with pytest.raises(ValueError, match="duration"):
        Workload(requests=None)
    with pytest.raises(ValueError, match="strategy"):
        run_simulation("lifo", Workload(requests=1))


# -- runs ------------------------------------------------------------------------------------------
def test_every_strategy_accounts_for_every_request_and_is_deterministic() -> None:
    records = small_overload(30.0)
    for strategy in STRATEGIES:
        first = run(strategy, records)
        again = run(strategy, records)
        assert figures(first) == figures(again), strategy
        assert first.completed == len(records), strategy
        assert first.tokens_used == sum(r.actual_tokens for r in records)


def test_a_short_retention_expires_queued_requests_and_the_run_ends() -> None:
    # The RPM limit lets 1 request a second through while 5 arrive: most wait past the 20 s
    # retention. A run of any size must end with each of them counted, never wait for them.
    workload = Workload(requests=600, arrival_rate=5.0, seed=5)
    for strategy in ("default", "fair_priority", "fifo", "simple_priority"):
        result = run_simulation(strategy, workload, rpm=60.0, tpm=1_000_000.0, message_retention=20.0)
        assert result.expired > 300, strategy
        assert result.completed + result.expired + result.dead_lettered + result.unfittable == 600
        assert result.unfinished == 0
        assert max(max(w, default=0.0) for w in result.wait_by_priority.values()) <= 20.0 + 1e-6


def test_failures_are_retried_then_dead_lettered_and_counted() -> None:
    workload = Workload(requests=300, arrival="burst", seed=6)
    result = run_simulation("fair_priority", workload, ProviderModel(failure_rate=0.5, seed=1), tpm=10**7)
    assert result.retries > 100
    assert result.dead_lettered > 0
    assert result.completed + result.dead_lettered == 300


def test_concurrency_bounds_the_calls_in_flight() -> None:
    # One call at a time: the makespan is at least the sum of the latencies.
    workload = Workload(requests=40, arrival="burst", seed=8)
    records = workload.generate()
    result = run_simulation("default", records, ProviderModel(concurrency=1), rpm=10**6, tpm=10**9)
    assert result.makespan >= sum(ProviderModel().latency(r.actual_tokens) for r in records) - 1e-6
    wide = run_simulation("default", records, ProviderModel(concurrency=40), rpm=10**6, tpm=10**9)
    assert wide.makespan == pytest.approx(max(ProviderModel().latency(r.actual_tokens) for r in records))


def test_a_set_stop_event_ends_the_run_with_a_partial_result() -> None:
    stop = threading.Event()
    seen: list[SimulationProgress] = []

    def on_progress(progress: SimulationProgress) -> None:
        seen.append(progress)
        stop.set()

    records = Workload(requests=20_000, seed=9).generate()
    result = run_simulation("default", records, stop=stop, on_progress=on_progress, progress_interval=0.0)
    assert result.interrupted
    assert 0 < result.completed < 20_000
    assert result.unfinished == 20_000 - result.completed - result.expired - result.dead_lettered
    assert seen
    assert seen[0].strategy == "default"
    assert "unfinished (interrupted)" in format_table([result])


def test_hold_budget_false_holds_no_budget_and_labels_the_column() -> None:
    records = small_overload(240.0)
    seed_rule = run("default", records, hold_budget=False)
    held = run("default", records)
    assert seed_rule.strategy == "default:no-hold"
    assert held.strategy == "default"
    # Without a held budget small requests drain the bucket ahead of a large URGENT winner.
    urgent = {r.strategy: waited(r, "URGENT", "p99") for r in (seed_rule, held)}
    assert urgent["default"] < urgent["default:no-hold"]


def test_fair_priority_serves_light_tenants_and_urgent_first_and_reserve_tokens_applies() -> None:
    records = small_overload(120.0)
    auto = run("fair_priority", records)
    fifo = run("fifo", records)
    summary, baseline = auto.tenant_summary(), fifo.tenant_summary()
    assert summary["heavy"] == ["t1"]
    assert len(summary["light"]) == 7
    assert summary["light_wait_s"]["p99"] < baseline["light_wait_s"]["p99"] / 10
    assert waited(auto, "URGENT", "p99") < 2.0
    big = run("fair_priority", records, fair_priority=FairPriorityConfig(reserve_tokens=16_000))
    assert figures(big) != figures(auto)
    assert waited(big, "URGENT", "p99") <= waited(auto, "URGENT", "p99")


def test_utilisation_counts_the_full_starting_bucket_and_the_arrival_period() -> None:
    records = small_overload(120.0)
    result = run("default", records)
    grantable = OVERLOAD.tpm + OVERLOAD.tpm * result.makespan / 60
    assert result.tpm_utilisation == pytest.approx(result.tokens_used / grantable)
    assert result.arrival_period == records[-1].arrival
    assert 0.9 < result.arrival_utilisation <= 1.01
    assert result.tokens_in_arrival_period < result.tokens_used


def test_the_summary_has_one_row_per_strategy() -> None:
    records = small_overload(30.0)
    results = [run(name, records) for name in ("fifo", "fair_priority")]
    lines = format_summary(results).splitlines()
    assert lines[0].split()[:3] == ["strategy", "util", "URGENT"]
    assert [line.split()[0] for line in lines[1:]] == ["fifo", "fair_priority"]
    for column in ("worst light p99", "URGENT SLO", "Jain", "inversions", "binding", "wall s"):
        assert column in lines[0], column


# -- traces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_saved_trace_replays_to_the_same_results(tmp_path: Path, suffix: str) -> None:
    workload = dataclasses.replace(OVERLOAD.workload, duration=40.0, deadline=5.0, seed=11)
    records = workload.with_load(2.0, OVERLOAD.tpm).generate()
    path = tmp_path / f"trace{suffix}"
    assert write_trace(path, records) == len(records)
    replayed = read_trace(path)
    assert replayed == records
    for strategy in ("default", "fair_priority"):
        assert figures(run(strategy, replayed)) == figures(run(strategy, records))


def test_trace_fields_are_optional_where_documented(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("estimated,arrival\n100,2.5\n50,0.5\n", encoding="utf-8")
    assert read_trace(path) == [
        TraceRecord(0.5, Priority.NORMAL, 50, 50, None, None),
        TraceRecord(2.5, Priority.NORMAL, 100, 100, None, None),
    ]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"arrival": 1, "estimated": 7, "priority": 0, "tenant": "a", "deadline": null}\n\n')
    assert read_trace(jsonl) == [TraceRecord(1.0, Priority.URGENT, 7, 7, "a", None)]
    assert dumps(read_trace(jsonl)).strip() == (
        '{"arrival": 1.0, "priority": "URGENT", "estimated": 7, "actual": 7, "tenant": "a"}'
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.csv", "arrival,estimated,colour\n1,2,red\n", "t.csv:1: unknown column 'colour'"),
        ("t.csv", "arrival,priority\n1,HIGH\n", "t.csv:1: the header has no 'estimated' column"),
        ("t.csv", "arrival,estimated\n1,5\n\n2,x\n", "t.csv:4: estimated must be a whole number"),
        ("t.csv", "arrival,estimated,priority\n1,5,LOW\n2,5,SUPER\n", "t.csv:3: priority must be"),
        ("t.csv", "arrival,estimated\n1,5,6\n", "t.csv:2: 3 cells, the header has 2"),
        ("t.csv", "arrival,estimated\n-1,5\n", "t.csv:2: arrival must be seconds from 0 to 1e+09, got '-1'"),
        ("t.csv", "arrival,estimated,actual\n1,5,-2\n", "t.csv:2: actual must be a whole number"),
        ("t.csv", "", "empty file"),
        ("t.jsonl", '{"arrival": 1, "estimated": 5}\n{"arrival": 1\n', "t.jsonl:2: not valid JSON"),
        ("t.jsonl", '{"arrival": 1, "estimated": 5}\n[1, 2]\n', "t.jsonl:2: expected a JSON object"),
        ("t.jsonl", '{"arrival": 1}\n', "t.jsonl:1: 'estimated' is required"),
        ("t.jsonl", '{"arrival": 1, "estimated": 2.5}\n', "t.jsonl:1: estimated must be a whole number"),
        ("t.jsonl", '{"arrival": 1, "estimated": 2, "deadline": "soon"}\n', "t.jsonl:1: deadline must be"),
        ("t.jsonl", '{"arrival": 1, "estimated": 2, "tenant": 5}\n', "t.jsonl:1: tenant must be"),
        ("t.jsonl", '{"arrival": 1, "estimated": 2, "prio": 1}\n', "t.jsonl:1: unknown field 'prio'"),
        ("t.jsonl", "\n", "empty file"),
        (
            "t.jsonl",
            '{"arrival": 1, "estimated": 2, "actual": 1, "output": 2}\n',
            "output (2) must not exceed",
        ),
    ],
)
def test_bad_trace_lines_are_rejected_with_their_line_number(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TraceError) as raised:
        read_trace(path)
    assert message in str(raised.value)


class CountingWeights(list[float]):
    """Tenant weights that count every element read, by iteration or by slice."""

    reads = 0

    def __iter__(self) -> Iterator[float]:
        for value in super().__iter__():
            CountingWeights.reads += 1
            yield value

    def __getitem__(self, index: Any) -> Any:
        value = super().__getitem__(index)
        CountingWeights.reads += len(value) if isinstance(index, slice) else 1
        return value


def test_a_workload_of_many_tenants_reads_each_weight_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenants = 2_000
    original = Workload._tenant_weights
    monkeypatch.setattr(Workload, "_tenant_weights", lambda self: CountingWeights(original(self)))
    CountingWeights.reads = 0
    records = Workload(requests=500, tenants=tenants, seed=2).generate()
    assert len(records) == 500
    # Linear: a couple of reads per tenant (cumulating the weights once), not one per pair.
    assert CountingWeights.reads <= 2 * tenants
