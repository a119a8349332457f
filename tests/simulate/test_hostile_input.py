"""`llmqd simulate` under hostile input: extreme flag values and hostile traces are refused with
one line naming the flag or the file and line (exit status 2), or run and end; workloads of
many tenants are built in linear time; limits that can never admit a request are refused, and
the report names the limit that binds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import simulate_trace
from llm_queue_dispatcher.cli import main
from llm_queue_dispatcher.simulate import Workload, run_simulation

AZURE = Path(__file__).parent.parent / "data" / "azure"
CONV = AZURE / "AzureLLMInferenceTrace_conv.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"

SMALL = ["--requests", "40", "--strategy", "fifo", "--strategy", "default"]
EXTREMES = ["1e308", "-1e308", "1e-300", "inf", "-inf", "nan", "-1", "0", str(10**400)]

# Each numeric flag, with what it needs beside it to apply.
FLAGS: dict[str, list[str]] = {
    "--requests": [],
    "--duration": ["--arrival-rate", "1"],
    "--arrival-rate": [],
    "--load": [],
    "--token-median": [],
    "--token-sigma": [],
    "--token-min": [],
    "--token-max": [],
    "--tenants": [],
    "--heavy-share": ["--tenants", "3"],
    "--heavy-tenants": ["--tenants", "3"],
    "--deadline": [],
    "--seed": [],
    "--rpm": [],
    "--tpm": [],
    "--concurrency": [],
    "--base-latency": [],
    "--ms-per-token": [],
    "--failure-rate": [],
    "--retention": [],
    "--reserve-tokens": [],
    "--progress-interval": [],
}


def outcome(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of ``llmqd simulate ARGS`` (an argparse refusal as
    SystemExit too); anything else raised fails the test."""
    try:
        status = main(["simulate", *args])
    except SystemExit as exit:
        status = int(exit.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def cases() -> Iterator[Any]:
    for flag, context in FLAGS.items():
        for value in EXTREMES:
            yield pytest.param(flag, context, value, id=f"{flag}={value[:10]}")


@pytest.mark.parametrize(("flag", "context", "value"), list(cases()))
def test_an_extreme_flag_value_runs_or_is_refused_in_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], flag: str, context: list[str], value: str
) -> None:
    args = [*SMALL, *context, f"{flag}={value}", "--progress", "none"]
    status, out, err = outcome(capsys, args)
    if status == 0:
        assert out.startswith(("40 requests", "0 requests")) or " requests " in out.splitlines()[0]
        assert "completed" in out
        return
    assert status == 2, err
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("llmqd simulate: "), err
    assert flag in err, err


def test_values_a_run_could_not_replay_are_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for args, message in (
        (["--requests", "10", "--arrival-rate", "1e-300"], "at most 1e+09 s of virtual time"),
        (["--duration", "1000000000", "--arrival-rate", "1000"], "requests; at most 5,000,000"),
        (["--rpm", "0.5"], "argument --rpm: must be a number within [1, 1e+15], got 0.5"),
        (["--ms-per-token", "80000"], "the longest call would take"),
        (["--token-max", "1000000", "--tpm", "10000"], "--tpm (10000) can never admit"),
        (["--slo", "URGENT=nan"], "argument --slo: URGENT: must be a number"),
        (["--priority-mix", "inf,1,1,1"], "argument --priority-mix: must be 4 weights"),
    ):
        status, out, err = outcome(capsys, [*args, "--strategy", "fifo"])
        assert (status, out) == (2, ""), args
        assert err.count("\n") == 1, err
        assert message in err, err


# -- hostile traces ------------------------------------------------------------------------------
HOSTILE: list[tuple[str, bytes, str]] = [
    (
        "non-utf8",
        HEADER.encode() + b"2023-11-16 18:40:00,1\xff2,3\n",
        "t.csv:2: not UTF-8 text (byte 22 is 0xff)",
    ),
    (
        "missing column",
        b"TIMESTAMP,ContextTokens\n2023-11-16 18:40:00,1\n",
        "t.csv:1: the header has no 'GeneratedTokens'",
    ),
    ("short row", HEADER.encode() + b"2023-11-16 18:40:00,1\n", "t.csv:2: 2 cells, the header has 3"),
    (
        "negative tokens",
        HEADER.encode() + b"2023-11-16 18:40:00,-5,3\n",
        "t.csv:2: ContextTokens must be a whole number",
    ),
    (
        "huge tokens",
        HEADER.encode() + b"2023-11-16 18:40:00," + str(10**400).encode() + b",3\n",
        "t.csv:2: ContextTokens",
    ),
    ("nan tokens", HEADER.encode() + b"2023-11-16 18:40:00,nan,3\n", "t.csv:2: ContextTokens must be"),
    (
        "fractional tokens",
        HEADER.encode() + b"2023-11-16 18:40:00,1e-300,3\n",
        "t.csv:2: ContextTokens must be",
    ),
    ("bad date", HEADER.encode() + b"2023-13-16 18:40:00,1,3\n", "t.csv:2: TIMESTAMP is no date"),
    ("no date", HEADER.encode() + b"1e308,1,3\n", "t.csv:2: TIMESTAMP must be a date"),
    (
        "span",
        HEADER.encode() + b"1970-01-01 00:00:00,1,3\n2023-11-16 18:40:00,1,3\n",
        "t.csv:3: 1.7e+09 s after the trace's start; at most 1e+09 s",
    ),
    ("nul byte", HEADER.encode() + b"2023-11-16 18:40:00,1,\x003\n", "t.csv:2: "),
    ("long line", HEADER.encode() + b"x" * (2 << 20) + b"\n", "t.csv:2: line longer than 1,048,576 bytes"),
    ("empty", b"", "t.csv: empty file"),
    ("header only", HEADER.encode(), "t.csv: no requests in the trace"),
    ("json nan", b'{"timestamp": NaN, "input_length": 1, "output_length": 1}\n', "t.csv:1: not valid JSON"),
    (
        "json huge",
        b'{"timestamp": 1, "input_length": 1' + b"0" * 5000 + b', "output_length": 1}\n',
        "t.csv:1: not valid JSON",
    ),
    ("json deep", b"{" + b'"a": [' * 100_000 + b"\n", "t.csv:1: not valid JSON"),
    (
        "json big time",
        b'{"timestamp": 1e308, "input_length": 1, "output_length": 1}\n',
        "t.csv:1: timestamp must be milliseconds",
    ),
    (
        "json 10**400",
        b'{"timestamp": 1, "input_length": ' + str(10**400).encode() + b', "output_length": 1}\n',
        "a number of 401 digits",
    ),
    (
        "json negative",
        b'{"timestamp": 1, "input_length": 5, "output_length": -1}\n',
        "t.csv:1: output_length must be",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_a_hostile_trace_is_refused_in_one_line_naming_the_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    status, out, err = outcome(capsys, ["--trace", str(path), "--strategy", "fifo"])
    assert (status, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith(f"llmqd simulate: {tmp_path}/"), err
    assert message in err, err


def test_a_trace_above_the_request_limit_is_refused_at_the_line_that_crosses_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulate_trace, "MAX_REQUESTS", 100)
    path = tmp_path / "big.csv"
    path.write_text(
        HEADER + "".join(f"2023-11-16 18:40:{i % 60:02d},1,1\n" for i in range(150)), encoding="utf-8"
    )
    status, _, err = outcome(capsys, ["--trace", str(path)])
    assert status == 2
    assert err == f"llmqd simulate: {path}:102: more than 100 requests; replay a part of the trace\n"


# -- many tenants --------------------------------------------------------------------------------
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


def test_a_hundred_thousand_tenants_build_and_run(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--tenants",
        "100000",
        "--requests",
        "2000",
        "--strategy",
        "fair_priority",
        "--json",
        "--progress",
        "none",
    ]
    status, out, _ = outcome(capsys, args)
    assert status == 0
    [result] = json.loads(out)
    assert result["completed"] == 2000
    assert len(result["tenants"]["light"]) + len(result["tenants"]["heavy"]) > 1000


# -- limits --------------------------------------------------------------------------------------
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
    from llm_queue_dispatcher.simulate import ProviderModel

    slow = run_simulation(
        "default", Workload(requests=500, seed=4), ProviderModel(concurrency=1), rpm=10**6, tpm=10**9
    )
    assert result.binding_limit is None  # 32 calls at once and no limit: nobody waited
    assert slow.binding_limit == "concurrency"
