"""`llmqd simulate --trace` on the Azure slice: priorities and tenants assigned by rule, the
estimates (actual tokens, or the prompt + a max_tokens cap), `--load`, the defaults of the
limits, the provider charging prompt and completion apart, and the report of every strategy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import Priority
from llm_queue_dispatcher.cli import main
from llm_queue_dispatcher.simulate import ProviderModel, TraceRecord
from llm_queue_dispatcher.simulate_scenario import BASE_TPM
from llm_queue_dispatcher.simulate_trace import TraceRules, assemble_trace, read_trace_file
from llm_queue_dispatcher.simulate_workload import arrivals_per_minute, scale_arrivals, tokens_per_minute

AZURE = Path(__file__).parent.parent / "data" / "azure"
CONV = AZURE / "AzureLLMInferenceTrace_conv.csv"
CODE = AZURE / "AzureLLMInferenceTrace_code.csv"
BOTH = ["--trace", f"conv={CONV}", "--trace", f"code={CODE}"]

HIGH = ((Priority.HIGH, 1.0),)
HALF = ((Priority.NORMAL, 1.0), (Priority.LOW, 1.0))


def azure(rules: TraceRules) -> list[TraceRecord]:
    return assemble_trace(
        [read_trace_file(CONV, label="conv"), read_trace_file(CODE, label="code")], rules
    ).records


def simulate_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main(["simulate", *args, "--json"]) == 0
    data: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return data


def stderr_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["simulate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


# -- priorities ----------------------------------------------------------------------------------
def test_a_seeded_share_is_urgent_and_the_rules_give_the_others_their_class() -> None:
    records = azure(
        TraceRules(urgent_share=0.1, priorities={"conv": HIGH, "code": HALF}, tenant_by="file", seed=3)
    )
    counts = Counter((r.tenant, r.priority) for r in records)
    urgent = counts["conv", Priority.URGENT] + counts["code", Priority.URGENT]
    assert urgent == pytest.approx(0.1 * len(records), rel=0.25)
    # conv: HIGH but for the URGENT share; code: NORMAL or LOW, half and half.
    assert {p for t, p in counts if t == "conv"} == {Priority.URGENT, Priority.HIGH}
    assert counts["code", Priority.HIGH] == 0
    assert counts["code", Priority.NORMAL] == pytest.approx(counts["code", Priority.LOW], rel=0.2)


def test_the_urgent_requests_depend_on_the_seed_only() -> None:
    def urgent(rules: TraceRules) -> list[int]:
        return [i for i, r in enumerate(azure(rules)) if r.priority is Priority.URGENT]

    first = urgent(TraceRules(urgent_share=0.05, seed=7))
    assert first == urgent(TraceRules(urgent_share=0.05, seed=7, priorities={"conv": HIGH, "code": HALF}))
    assert first != urgent(TraceRules(urgent_share=0.05, seed=8))
    assert urgent(TraceRules(seed=7)) == []


def test_weighted_classes_and_a_rule_for_every_other_request() -> None:
    three_to_one = ((Priority.NORMAL, 3.0), (Priority.LOW, 1.0))
    records = azure(TraceRules(priorities={"conv": HIGH, None: three_to_one}, tenant_by="file"))
    code = Counter(r.priority for r in records if r.tenant == "code")
    assert code[Priority.NORMAL] / (code[Priority.NORMAL] + code[Priority.LOW]) == pytest.approx(
        0.75, abs=0.06
    )
    assert {r.priority for r in records if r.tenant == "conv"} == {Priority.HIGH}


# -- tenants -------------------------------------------------------------------------------------
def test_tenants_are_the_files_label_or_none() -> None:
    assert {r.tenant for r in azure(TraceRules(tenant_by="file"))} == {"conv", "code"}
    assert {r.tenant for r in azure(TraceRules())} == {None}


# -- estimates -----------------------------------------------------------------------------------
def test_a_cap_estimates_the_prompt_plus_max_tokens_and_cuts_longer_completions() -> None:
    actual = azure(TraceRules(tenant_by="file"))
    capped = azure(TraceRules(tenant_by="file", estimate="cap", max_tokens={"conv": 1000, "code": 2048}))
    assert [(r.arrival, r.tenant) for r in capped] == [(r.arrival, r.tenant) for r in actual]
    for before, after in zip(actual, capped, strict=True):
        assert before.estimated_tokens == before.actual_tokens
        cap = 1000 if after.tenant == "conv" else 2048
        assert after.estimated_tokens == after.input_tokens + cap
        assert after.actual_tokens == before.actual_tokens  # the slice's completions fit their caps
    small = assemble_trace([read_trace_file(CODE)], TraceRules(estimate="cap", max_tokens={None: 20}))
    longer = [row for row in read_trace_file(CODE).rows if row.output is not None and row.output > 20]
    assert small.cut == len(longer) > 0
    assert max(r.output_tokens or 0 for r in small.records) == 20


# -- load and limits -----------------------------------------------------------------------------
def test_load_sets_the_tpm_limit_from_the_traces_actual_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    records = azure(TraceRules())
    offered = tokens_per_minute(records)
    assert offered is not None
    [result] = simulate_json(capsys, *BOTH, "--load", "2", "--strategy", "fifo")
    assert result["tpm_limit"] == pytest.approx(offered / 2)
    # RPM, not given: twice the mean arrivals a minute.
    assert result["rpm_limit"] == pytest.approx(2 * arrivals_per_minute(records))
    assert result["arrival_period_s"] == records[-1].arrival


def test_load_with_a_tpm_limit_scales_the_arrival_times(capsys: pytest.CaptureFixture[str]) -> None:
    records = azure(TraceRules())
    offered = tokens_per_minute(records)
    assert offered is not None
    [result] = simulate_json(capsys, *BOTH, "--load", "2", "--tpm", "500000", "--strategy", "fifo")
    assert result["tpm_limit"] == 500_000
    # The same tokens, arriving over a span that offers 2 x 500,000 a minute.
    scaled = scale_arrivals(records, offered / 1_000_000)
    assert tokens_per_minute(scaled) == pytest.approx(1_000_000)
    assert result["arrival_period_s"] == pytest.approx(scaled[-1].arrival)
    assert result["tokens_used"] == sum(r.actual_tokens for r in records)


def test_a_trace_without_load_or_tpm_runs_at_load_1(capsys: pytest.CaptureFixture[str]) -> None:
    offered = tokens_per_minute(azure(TraceRules()))
    [result] = simulate_json(capsys, *BOTH, "--strategy", "fifo")
    assert result["tpm_limit"] == pytest.approx(offered)
    assert main(["simulate", *BOTH, "--strategy", "fifo"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(
        f"traces conv={CONV} (azure, 588), code={CODE} (azure, 628): 1,216 requests over "
    )
    assert "= 1.00x the TPM limit" in first
    assert "(twice the mean arrivals a minute)" in first
    assert "latency 0.4 s + 0.2 ms/prompt token + 20 ms/completion token" in first


def test_a_trace_whose_requests_have_no_tokens_runs_and_refuses_a_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every request of 0 tokens: no tokens arrive a minute, so load 1 sets no TPM limit (the
    default limit applies, as for a trace arriving at one instant) and ``--load`` is refused in
    one line naming it; before, the report divided by a TPM limit of 0."""
    trace = tmp_path / "zeros.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,0,0\n"
        "2023-11-16 18:15:47.6805900,0,0\n"
    )
    [result] = simulate_json(capsys, "--trace", str(trace), "--strategy", "fifo")
    assert result["tpm_limit"] == BASE_TPM
    assert result["tokens_used"] == 0
    for extra in ([], ["--tpm", "100"]):
        err = stderr_of(capsys, "--trace", str(trace), "--load", "2", *extra)
        assert err.count("\n") == 1
        assert "--load needs a trace with tokens" in err, err


def test_the_provider_charges_the_prompt_and_the_completion_apart() -> None:
    provider = ProviderModel(
        base_latency=0.5, seconds_per_1k_input_tokens=0.1, seconds_per_1k_output_tokens=30.0
    )
    # 2,000 prompt tokens and 200 completion tokens: 0.5 + 0.2 + 6 s.
    assert provider.latency(2200, 200) == pytest.approx(6.7)
    assert provider.latency(2200) == pytest.approx(0.5 + 2.2 * 1.5)  # completion unknown: 1.5 ms a token


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--load", "1000"], "--load gives a TPM limit of "),
        (["--tpm", "5000"], "--tpm gives a TPM limit of 5,000, which can never admit the workload's largest"),
        (["--estimate", "cap"], "--estimate cap needs --max-tokens"),
        (["--max-tokens", "conv=100"], "--max-tokens applies to --estimate cap"),
        (["--estimate", "cap", "--max-tokens", "conv=x"], "--max-tokens: 'conv=x' must be [LABEL=]N"),
        (["--priority", "conv=SUPER"], "--priority: 'SUPER' is no class rule"),
        (["--priority", "cnv=HIGH"], "no trace file is labelled 'cnv' (labels: conv, code)"),
        (["--priority", "HIGH", "--priority", "LOW"], "--priority: two rules for every request"),
        (["--tenant-by", "everyone"], "--tenant-by: tenant_by must be 'file' or 'none' or 'column:NAME'"),
        (["--tenant-by", "column:Model"], "the header has no 'Model' column"),
    ],
)
def test_bad_trace_flags_are_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    err = stderr_of(capsys, *BOTH, *args)
    assert err.count("\n") == 1
    assert message in err, err


# -- the report ----------------------------------------------------------------------------------
def test_every_strategy_reports_every_figure_on_the_reference_workload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rules = ["--urgent-share", "0.02", "--priority", "conv=HIGH", "--priority", "code=NORMAL,LOW"]
    args = [*BOTH, *rules, "--tenant-by", "file", "--load", "2", "--concurrency", "256", "--strategy", "all"]
    results = simulate_json(capsys, *args, "--per-tenant")
    assert len(results) == 10
    for result in results:
        assert result["completed"] == result["requests"] == 1216
        assert result["binding_limit"] == "TPM"
        assert 0.9 < result["dispatch_utilisation"] <= 1.01
        assert set(result["slo_attainment"]) == {"URGENT", "HIGH", "NORMAL", "LOW"}
        assert set(result["fairness"]) == {
            "windows",
            "jain_mean",
            "jain_min",
            "max_gap_tokens",
            "max_gap_window_s",
        }
        assert result["priority_inversions"] >= result["priority_inversions_within_tenant"] >= 0
        assert set(result["tenants"]["per_tenant"]) == {"conv", "code"}
        assert result["wall_time_s"] > 0
        assert result["cpu_time_s"] > 0
    # Without --per-tenant the JSON keeps the groups but not each tenant.
    [plain] = simulate_json(capsys, *args[:-2], "--strategy", "fifo")
    assert "per_tenant" not in plain["tenants"]
    assert set(plain["tenants"]) >= {"heavy", "light", "heavy_wait_s", "light_wait_s"}


def test_fair_priority_serves_backlogged_tenants_evenly_where_fifo_does_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # At 4x both services stay backlogged for minutes: three whole windows to compare them in.
    args = [*BOTH, "--tenant-by", "file", "--load", "4", "--strategy", "fifo", "--strategy", "fair_priority"]
    fifo, fair = (result["fairness"] for result in simulate_json(capsys, *args))
    assert fifo["windows"] == fair["windows"] == 3
    assert fifo["jain_min"] < 0.95 < 0.98 < fair["jain_min"]
    assert fair["max_gap_tokens"] < fifo["max_gap_tokens"] / 3


def test_an_empty_group_of_tenants_shows_as_none_not_zero(capsys: pytest.CaptureFixture[str]) -> None:
    # At 2x both services send more than half the capacity: both are heavy, no tenant is light.
    args = [*BOTH, "--tenant-by", "file", "--load", "2", "--strategy", "fifo"]
    [result] = simulate_json(capsys, *args)
    assert result["tenants"]["light"] == []
    assert result["tenants"]["light_wait_s"] == {"p50": None, "p95": None, "p99": None}
    assert result["tenants"]["worst_light_p99_s"] is None
    assert main(["simulate", *args]) == 0
    rows = capsys.readouterr().out.splitlines()
    for name in ("light tenants wait p50 (s)", "light tenants wait p99 (s)", "worst light tenant p99 (s)"):
        assert next(row for row in rows if row.startswith(name)).split()[-1] == "none", name
    # A class with no request (no URGENT share) shows "-".
    urgent = next(row for row in rows if row.startswith("wait p99 URGENT (s)"))
    assert urgent.split()[-1] == "-"
    assert next(row for row in rows if row.startswith("SLO URGENT")).split()[-1] == "-"
