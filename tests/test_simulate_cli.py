"""`llmqd simulate`'s flags: the preset, tenants, load, traces, strategies, output, progress,
plots, and Ctrl-C; every numeric flag at extreme values runs or is refused in one line naming it
(exit status 2), and values a run could not replay are refused before anything runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import simulate_cli
from llm_queue_dispatcher.cli import main
from llm_queue_dispatcher.simulate import SimulationProgress
from tests.simulate.support import outcome

# 120 s of the overload preset at 2x: about 1,300 requests, under a second a strategy.
OVERLOAD = ["--preset", "overload", "--duration", "120"]


def simulate_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    """The JSON of a run, without its wall and CPU time (what differs between reruns)."""
    assert main(["simulate", *args, "--json"]) == 0
    data: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    for result in data:
        assert result.pop("wall_time_s") >= 0
        assert result.pop("cpu_time_s") >= 0
    return data


def test_the_overload_preset_is_the_documented_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *OVERLOAD, "--strategy", "fair_priority", "--strategy", "fifo"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    for part in (
        "overload preset",
        "8 tenants (t1 sending 80%)",
        "priorities 5/20/50/25 %",
        "median 800 sigma 1 in [20, 16000]",
        "rpm 600, tpm 400000, concurrency 32",
        "latency 0.4 s + 1.5 ms/token",
    ):
        assert part in first, part
    for row in ("heavy tenants wait p99 (s)", "light tenants wait p50 (s)", "worst light tenant p99 (s)"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    [result, fifo] = simulate_json(capsys, *OVERLOAD, "--strategy", "fair_priority", "--strategy", "fifo")
    assert result["tenants"]["heavy"] == ["t1"]
    assert len(result["tenants"]["light"]) == 7
    assert result["requests"] == fifo["requests"] > 1000
    assert result["arrival_period_s"] <= 120.0


def test_flags_override_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    [result] = simulate_json(
        capsys,
        *OVERLOAD,
        "--load",
        "1.3",
        "--tenants",
        "4",
        "--heavy-share",
        "0.5",
        "--concurrency",
        "8",
        "--tpm",
        "200000",
        "--strategy",
        "default",
    )
    assert result["tpm_limit"] == 200_000
    assert result["tenants"]["heavy"] == ["t1"]
    assert len(result["tenants"]["light"]) == 3
    # 1.3x of 200,000 tokens a minute at a mean estimate of about 1,310 tokens: ~3.3/s for 120 s.
    assert 300 < result["requests"] < 500
    [counted] = simulate_json(capsys, *OVERLOAD, "--requests", "500", "--strategy", "fifo")
    assert counted["requests"] == 500


def test_tenants_without_a_preset_and_heavy_tenants(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--requests", "2000", "--tenants", "6", "--heavy-tenants", "2", "--heavy-share", "0.9"]
    [result] = simulate_json(capsys, *args, "--tpm", "100000", "--rpm", "6000", "--strategy", "fair_priority")
    assert result["tenants"]["heavy"] == ["t1", "t2"]
    assert result["tenants"]["light"] == ["t3", "t4", "t5", "t6"]


def test_strategy_names_no_hold_and_all(capsys: pytest.CaptureFixture[str]) -> None:
    results = simulate_json(capsys, *OVERLOAD, "--strategy", "all")
    assert [r["strategy"] for r in results] == [
        "fifo",
        "default:no-hold",
        "simple_priority:no-hold",
        "throughput:no-hold",
        "fair:no-hold",
        "default",
        "simple_priority",
        "throughput",
        "fair",
        "fair_priority",
    ]
    flagged = simulate_json(
        capsys, *OVERLOAD, "--no-hold-budget", "--strategy", "default", "--strategy", "fair_priority"
    )
    # --no-hold-budget (no budget held: the TypeScript library's rule) is for the score strategies only.
    assert [r["strategy"] for r in flagged] == ["default:no-hold", "fair_priority"]
    assert flagged[0] == results[1]
    assert flagged[1] == results[-1]
    held = simulate_json(capsys, *OVERLOAD, "--strategy", "throughput")
    assert held[0] == results[7]


def test_reserve_tokens_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["simulate", *OVERLOAD, "--strategy", "fair_priority", "--reserve-tokens", "16000", "--summary"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == ["strategy", "util", "URGENT"]
    assert lines[3].split()[0] == "fair_priority"
    assert len(lines) == 4


def test_deadline_counts_requests_sent_late(capsys: pytest.CaptureFixture[str]) -> None:
    [result] = simulate_json(capsys, *OVERLOAD, "--duration", "300", "--deadline", "10", "--strategy", "fifo")
    assert result["past_deadline"] > 0  # FIFO makes everyone wait minutes by the end
    assert main(["simulate", *OVERLOAD, "--deadline", "10", "--strategy", "fifo"]) == 0
    assert any(line.startswith("sent past deadline") for line in capsys.readouterr().out.splitlines())


def test_retention_expires_requests_and_the_run_ends(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--requests",
        "3000",
        "--rpm",
        "60",
        "--retention",
        "30",
        "--strategy",
        "default",
        "--strategy",
        "fifo",
    ]
    for result in simulate_json(capsys, *args):
        assert result["expired"] > 1000
        assert (
            result["completed"] + result["expired"] + result["dead_lettered"] + result["unfittable"] == 3000
        )
    assert main(["simulate", *args]) == 0
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("expired (retention)")
    )
    assert all(int(count) > 1000 for count in row.split()[-2:])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_save_trace_then_replay_gives_identical_results(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, suffix: str
) -> None:
    trace = tmp_path / f"traffic{suffix}"
    strategies = ["--strategy", "default", "--strategy", "fair_priority", "--strategy", "fifo"]
    saved = simulate_json(capsys, *OVERLOAD, "--deadline", "20", "--save-trace", str(trace), *strategies)
    replayed = simulate_json(capsys, "--preset", "overload", "--trace", str(trace), *strategies)
    assert replayed == saved
    assert main(["simulate", "--preset", "overload", "--trace", str(trace), "--strategy", "fifo"]) == 0
    assert capsys.readouterr().out.startswith(f"trace {trace}: ")


def test_a_bad_trace_is_reported_with_its_line_and_nothing_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("arrival,priority,estimated\n0.5,HIGH,100\n1.0,SUPER,100\n", encoding="utf-8")
    assert main(["simulate", "--trace", str(trace)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == f"llmqd simulate: {trace}:3: priority must be URGENT, HIGH, NORMAL, LOW or 0..3, got 'SUPER'\n"
    )
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 1
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trace", "x.csv", "--arrival-rate", "2", "--tenants", "3"],
            "--arrival-rate, --tenants do not apply",
        ),
        (["--trace", "x.csv", "--deadline", "2"], "--deadline does not apply"),
        (["--urgent-share", "0.1"], "--urgent-share applies to recorded traffic (--trace)"),
        (["--tenant-by", "file", "--estimate", "cap"], "--tenant-by, --estimate apply to recorded traffic"),
        (["--load", "2", "--arrival-rate", "3"], "--load or --arrival-rate, not both"),
        (["--arrival", "burst", "--duration", "10"], "--arrival burst"),
        (["--heavy-share", "0.5"], "need --tenants 2 or more"),
        (["--tenants", "3", "--heavy-tenants", "3"], "must be below --tenants"),
        (["--strategy", "default:hold"], "unknown strategy 'default:hold'"),
    ],
)
def test_bad_combinations_exit_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["simulate", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "args", [["--load", "0"], ["--heavy-share", "1.5"], ["--priority-mix", "1,2,3"], ["--token-sigma", "-1"]]
)
def test_bad_values_are_refused_by_the_parser(args: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["simulate", *args])
    assert raised.value.code == 2


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "waits.png"
    args = [*OVERLOAD, "--strategy", "default", "--strategy", "fair_priority", "--plot", str(picture)]
    assert main(["simulate", *args]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().err == ""


def test_plot_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["simulate", "--requests", "10", "--plot", str(tmp_path / "p.png")]) == 2
    captured = capsys.readouterr()
    assert "pip install 'llm-queue-dispatcher[plot]'" in captured.err
    assert captured.out == ""  # refused before running anything
    assert not (tmp_path / "p.png").exists()


def test_progress_lines_after_the_delay_and_none_with_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(simulate_cli, "_PROGRESS_DELAY", 0.0)
    reporter = simulate_cli._Reporter("lines", interval=0.0)
    reporter(SimulationProgress("default", 100, 60, 45, 5, 0, 0, 12.0))
    assert capsys.readouterr().err == (
        "llmqd simulate: default: 50/100 settled (45 completed, 5 expired), 60 arrived, virtual time 12 s, "
        "0 s elapsed\n"
    )
    quiet = simulate_cli._Reporter("none", interval=0.0)
    quiet(SimulationProgress("default", 100, 60, 50, 0, 0, 0, 12.0))
    # auto off a terminal prints lines; --json turns progress off whatever --progress says.
    assert simulate_cli._Reporter("auto", interval=0.0)._mode == "lines"
    assert (
        main(["simulate", "--requests", "3000", "--strategy", "fifo", "--progress", "lines", "--json"]) == 0
    )
    assert capsys.readouterr().err == ""


def test_the_last_progress_line_counts_what_the_table_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1 request a second goes through while 2.2 arrive: about half outlive the 30 s retention.
    monkeypatch.setattr(simulate_cli, "_PROGRESS_DELAY", 0.0)
    args = ["--requests", "3000", "--rpm", "60", "--retention", "30", "--progress", "lines"]
    assert main(["simulate", *args, "--strategy", "default", "--strategy", "fifo"]) == 0
    captured = capsys.readouterr()
    rows = {line.split("  ")[0].strip(): line.split() for line in captured.out.splitlines()}
    for column, strategy in enumerate(("default", "fifo")):
        last = [
            line for line in captured.err.splitlines() if line.startswith(f"llmqd simulate: {strategy}: ")
        ][-1]
        completed = int(rows["completed"][1 + column].split("/")[0])
        expired = int(rows["expired (retention)"][2 + column])
        assert expired > 1000
        assert f"3,000/3,000 settled ({completed:,} completed, {expired:,} expired)" in last, last


def test_ctrl_c_stops_at_once_and_prints_the_partial_table() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["--requests", "200000", "--strategy", "default", "--strategy", "fifo", "--progress", "lines"]
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_queue_dispatcher.cli", "simulate", *args, "--progress-interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # the first progress line: the simulation is running
        assert first.startswith("llmqd simulate: default: "), first
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = process.communicate(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        process.kill()
    assert process.returncode == 130
    assert elapsed < 5.0
    lines = out.splitlines()
    assert next(line for line in lines if line.strip().startswith("default")).split() == ["default"]
    unfinished = next(line for line in lines if line.startswith("unfinished (interrupted)"))
    assert 0 < int(unfinished.split()[-1]) < 200_000
    assert "interrupted at virtual time" in err
    assert "not run: fifo" in err


# -- extreme values: each numeric flag runs, or is refused in one line naming it ----------------
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
