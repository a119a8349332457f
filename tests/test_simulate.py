"""`llmqd simulate`: the table, --json, determinism, strategies compared, bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from importlib.metadata import entry_points
from typing import Any

import pytest

from llm_queue_dispatcher import Priority
from llm_queue_dispatcher.cli import main
from llm_queue_dispatcher.simulate import SimulationResult, TraceRecord, Workload, run_simulation

SMALL = ["--requests", "150", "--rpm", "300", "--tpm", "60000", "--seed", "3"]


def waited(result: SimulationResult, priority: str, q: str) -> float:
    """A wait percentile of a class that had requests sent."""
    value = result.wait_percentiles()[priority][q]
    assert value is not None, (priority, q)
    return value


def simulate_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    """The JSON of a run, without its wall and CPU time (what differs between reruns)."""
    assert main(["simulate", *SMALL, *args, "--json"]) == 0
    data: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    for result in data:
        assert result.pop("wall_time_s") >= 0
        assert result.pop("cpu_time_s") >= 0
    return data


def test_console_script_is_the_cli_main() -> None:
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "llmqd"]
    assert script.load() is main


def test_table_has_one_column_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", *SMALL, "--strategy", "default", "--strategy", "fifo", "--strategy", "fair"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if "default" in line and "fifo" in line)
    assert header.split() == ["default", "fifo", "fair"]
    completed = next(line for line in lines if line.startswith("completed"))
    assert len(completed.split()) == 1 + 3
    for label in (
        "makespan",
        "throughput",
        "utilisation to last dispatch",
        "binding limit",
        "wait p50 URGENT",
        "wait p99 LOW",
        "SLO URGENT <= 1 s",
        "priority inversions",
        "retries",
        "wall time (s)",
    ):
        assert any(line.startswith(label) for line in lines), label
    assert any(line.startswith("dead-lettered") for line in lines)


def test_json_counts_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    results = simulate_json(capsys, "--strategy", "default", "--strategy", "fifo", "--failure-rate", "0.2")
    assert [r["strategy"] for r in results] == ["default", "fifo"]
    for result in results:
        assert result["requests"] == 150
        assert result["completed"] + result["dead_lettered"] + result["unfittable"] == 150
        assert result["completed"] > 0
        assert result["retries"] > 0  # one attempt in five fails
        assert result["makespan_s"] > 0
        # The bucket starts full, so a short run may use up to one extra minute's worth.
        assert 0 < result["tpm_utilisation"] <= 1.0 + 60.0 / result["makespan_s"]
        assert set(result["wait_s"]) == {"URGENT", "HIGH", "NORMAL", "LOW"}
        for waits in result["wait_s"].values():
            assert 0 <= waits["p50"] <= waits["p95"] <= waits["p99"]


def test_same_seed_same_result_and_another_seed_differs(capsys: pytest.CaptureFixture[str]) -> None:
    first = simulate_json(capsys, "--strategy", "default", "--failure-rate", "0.1")
    second = simulate_json(capsys, "--strategy", "default", "--failure-rate", "0.1")
    assert first == second
    assert (
        main(["simulate", *SMALL[:-1], "4", "--strategy", "default", "--failure-rate", "0.1", "--json"]) == 0
    )
    other = json.loads(capsys.readouterr().out)
    assert other != first


def test_simple_priority_serves_urgent_sooner_than_fifo() -> None:
    workload = Workload(requests=300, arrival="burst", seed=11)
    fifo = run_simulation("fifo", workload, rpm=120.0, tpm=60_000.0)
    priority = run_simulation("simple_priority", workload, rpm=120.0, tpm=60_000.0)
    assert fifo.completed == priority.completed == 300
    fifo_urgent = waited(fifo, "URGENT", "p50")
    priority_urgent = waited(priority, "URGENT", "p50")
    assert priority_urgent < fifo_urgent / 2, (priority_urgent, fifo_urgent)
    # Under simple_priority URGENT requests also beat the LOW ones of the same run.
    assert priority_urgent < waited(priority, "LOW", "p50")


def test_every_strategy_runs(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["default", "simple_priority", "throughput", "fair", "fifo"]
    args = [a for name in names for a in ("--strategy", name)]
    results = simulate_json(capsys, *args, "--arrival", "burst")
    assert [r["strategy"] for r in results] == names
    assert all(r["completed"] + r["dead_lettered"] + r["unfittable"] == 150 for r in results)


def test_a_tpm_limit_below_the_largest_request_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Most requests of the workload need more than 100 tokens: they could never be sent.
    assert main(["simulate", "--requests", "200", "--tpm", "100", "--strategy", "default"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("llmqd simulate: --tpm (100) can never admit the workload's largest request (")
    assert "raise --tpm to at least" in line


def test_the_python_api_counts_requests_above_the_tpm_limit_as_unfittable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = Workload(requests=200, seed=7).generate()
    above = sum(record.estimated_tokens > 100 for record in records)
    assert 0 < above < 200
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        results = [run_simulation(name, records, tpm=100.0) for name in ("default", "fair", "fifo")]
    # No library warning per request: each run takes them out as they arrive and counts them.
    assert [record.getMessage() for record in caplog.records] == []
    assert [result.unfittable for result in results] == [above] * 3
    assert all(result.completed == 200 - above for result in results)


def test_a_run_where_everything_fits_says_nothing_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *SMALL, "--strategy", "default"]) == 0
    assert capsys.readouterr().err == ""


def test_unknown_strategy_exits_non_zero_naming_it() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_queue_dispatcher.cli",
            "simulate",
            "--requests",
            "10",
            "--strategy",
            "bogus",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode != 0
    assert "bogus" in completed.stderr
    assert completed.stdout == ""


@pytest.mark.parametrize("strategy", ["fifo", "default"])
def test_a_tenant_whose_requests_expire_unsent_counts_as_backlogged_in_the_fairness(strategy: str) -> None:
    # Tenant a floods first; tenant b's requests queue behind a's backlog, and the budget a
    # leaves when a's requests expire is short of b's: they expire unsent after the retention.
    # b waited throughout [60, 300) and got nothing: those windows compare a's service with
    # b's zero; they do not leave b out.
    records = [
        *(TraceRecord(0.0, Priority.NORMAL, 1_000, 1_000, "a") for _ in range(100)),
        *(TraceRecord(0.5, Priority.NORMAL, 1_000, 1_000, "a") for _ in range(100)),
        *(TraceRecord(1.0 + n, Priority.NORMAL, 1_000, 1_000, "b") for n in range(4)),
    ]
    result = run_simulation(strategy, records, rpm=6_000, tpm=6_000, message_retention=300.0)
    assert result.wait_by_tenant["b"] == []
    assert result.expired == 200 - len(result.wait_by_tenant["a"]) + 4
    fairness = result.fairness
    assert fairness is not None
    assert fairness.windows == 4
    assert fairness.jain_min == pytest.approx(0.5)
    assert fairness.max_gap == 6_000
