"""`llmqd simulate` under the limits as providers publish them: input and output tokens per
minute, requests and tokens per day, requests in flight. The simulated limiter enforces each,
the report names the one that bound (RPM, concurrency, ...), and a request no limit can ever
grant is counted apart."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_queue_dispatcher import Priority
from llm_queue_dispatcher.cli import main
from llm_queue_dispatcher.simulate import ProviderModel, TraceRecord, Workload, run_simulation
from tests.simulate.support import outcome


def burst(
    count: int, estimate: int = 1_000, actual: int = 900, output: int | None = 600
) -> list[TraceRecord]:
    """``count`` requests at once, each of ``output`` completion tokens out of ``actual``."""
    return [TraceRecord(0.0, Priority.NORMAL, estimate, actual, output_tokens=output) for _ in range(count)]


@pytest.mark.parametrize("strategy", ["default", "fair_priority", "fifo"])
def test_a_tight_output_limit_binds_and_every_request_completes(strategy: str) -> None:
    # 200 requests of ~600 output tokens against 6,000 a minute: about 20 minutes of output.
    result = run_simulation(
        strategy, burst(200), ProviderModel(concurrency=32), rpm=10_000, tpm=10**7, otpm=6_000
    )
    assert result.completed == 200
    assert result.binding_limit == "OTPM"
    # The output limit paced the run: 120,000 output tokens at 6,000 a minute (less its burst).
    assert result.makespan >= (200 * 600 - 6_000) / 6_000 * 60 * 0.95


def test_an_input_limit_binds_when_the_prompts_are_the_larger_part() -> None:
    records = burst(100, estimate=2_000, actual=1_900, output=100)
    result = run_simulation("default", records, rpm=10_000, tpm=10**7, itpm=20_000, otpm=10**6)
    assert result.completed == 100
    assert result.binding_limit == "ITPM"


def test_requests_per_day_bind_a_run_longer_than_a_day() -> None:
    result = run_simulation("default", burst(30, output=None), rpm=10_000, tpm=10**7, rpd=20)
    assert result.completed == 30
    assert result.binding_limit == "RPD"
    assert result.makespan > 86_400 * 10 / 20 * 0.9  # 10 requests past the day's 20, at 20 a day


def test_the_limiter_s_max_concurrent_binds_below_the_provider_s_slots() -> None:
    result = run_simulation(
        "default",
        burst(40, output=None),
        ProviderModel(concurrency=32),
        rpm=10_000,
        tpm=10**7,
        max_concurrent=2,
    )
    assert result.completed == 40
    assert result.binding_limit == "concurrency"


@pytest.mark.parametrize("strategy", ["default", "fifo"])
def test_a_request_whose_part_exceeds_its_limit_is_unfittable(strategy: str) -> None:
    # Estimates split like the actual use: 1,000 estimated, 600 of it output, against an output
    # limit of 500 that a smaller request fits.
    records = [*burst(3), *burst(5, estimate=400, actual=400, output=200)]
    result = run_simulation(strategy, records, rpm=10_000, tpm=10**7, otpm=500)
    assert (result.unfittable, result.completed) == (3, 5)


def test_the_cli_takes_the_limits_and_reports_the_binding_one(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--requests", "150", "--rpm", "10000", "--tpm", "10000000", "--seed", "3"]
    assert main([*args, "--strategy", "default", "--max-concurrent", "1", "--json"]) == 0
    results: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    [result] = results
    assert result["binding_limit"] == "concurrency"
    assert result["completed"] == 150
    with pytest.raises(SystemExit) as refused:
        main([*args, "--strategy", "default", "--tpd", "0.5"])
    assert refused.value.code == 2
    assert "argument --tpd: must be a finite number >= 1" in capsys.readouterr().err


def test_the_report_names_rpm_when_requests_per_minute_bind(capsys: pytest.CaptureFixture[str]) -> None:
    # 2.2 arrivals a second against 120 RPM, and tokens to spare: RPM binds, not TPM.
    results = [
        run_simulation(name, Workload(requests=1500, seed=4)) for name in ("default", "fair_priority", "fifo")
    ]
    assert [result.binding_limit for result in results] == ["RPM"] * 3
    assert all(result.blocked.shares()["RPM"] > 0.95 for result in results)
    status, out, _ = outcome(capsys, ["--requests", "1500", "--strategy", "fifo"])
    assert status == 0
    row = next(line for line in out.splitlines() if line.startswith("binding limit"))
    assert row.split()[-2] == "RPM"


def test_the_report_names_concurrency_when_the_provider_binds() -> None:
    result = run_simulation("default", Workload(requests=500, seed=4), rpm=10**6, tpm=10**9)
    slow = run_simulation(
        "default", Workload(requests=500, seed=4), ProviderModel(concurrency=1), rpm=10**6, tpm=10**9
    )
    assert result.binding_limit is None  # 32 calls at once and no limit: nobody waited
    assert slow.binding_limit == "concurrency"
