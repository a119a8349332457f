"""Traces read as published: the Azure LLM inference trace CSV (the slice in tests/data/azure),
the BurstGPT CSV and the Mooncake JSON Lines, recognised by header or keys, prompt and
completion apart, merged on their timestamps; and the project's own format still read. A
malformed trace is refused in one line naming the file and the line (exit status 2)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import Priority, simulate_trace
from llm_queue_dispatcher.simulate import TraceRecord
from llm_queue_dispatcher.simulate_trace import (
    TraceError,
    TraceRules,
    assemble_trace,
    read_trace,
    read_trace_file,
    write_trace,
)
from tests.simulate.support import outcome

AZURE = Path(__file__).parent.parent / "data" / "azure"
CONV = AZURE / "AzureLLMInferenceTrace_conv.csv"
CODE = AZURE / "AzureLLMInferenceTrace_code.csv"

BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,230,1317,Conversation log
45.5,GPT-4,417,276,693,API log
118,GPT-4,300,0,300,API log
"""

MOONCAKE = [
    {"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [0, 1, 2]},
    {"timestamp": 3052, "input_length": 7319, "output_length": 490, "hash_ids": [0, 3]},
    {"timestamp": 3052, "input_length": 2287, "output_length": 316, "hash_ids": [4]},
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def mooncake(tmp_path: Path, rows: list[dict[str, object]] = MOONCAKE) -> Path:
    return write(tmp_path / "trace.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


# -- Azure ---------------------------------------------------------------------------------------
def test_the_azure_slice_reads_as_published_with_prompt_and_completion_apart() -> None:
    conv = read_trace_file(CONV)
    code = read_trace_file(CODE)
    assert (conv.format, conv.dated, conv.label, len(conv.rows)) == (
        "azure",
        True,
        "AzureLLMInferenceTrace_conv",
        588,
    )
    assert (code.format, len(code.rows)) == ("azure", 628)
    # The first data line of the conversation slice: 2023-11-16 18:40:00.5246250,13..
    lines = CONV.read_text(encoding="utf-8").splitlines()
    stamp, prompt, completion = lines[1].split(",")
    first = conv.rows[0]
    # Seconds from midnight of the first date: 18:40:00.5246250.
    assert first.time == 18 * 3600 + 40 * 60 + float(stamp[17:])
    assert (first.actual, first.output, first.line) == (int(prompt) + int(completion), int(completion), 2)
    assert (first.estimated, first.priority, first.tenant) == (None, None, None)


def test_azure_dates_keep_all_seven_decimals(tmp_path: Path) -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:40:00.0000001,1,1\n"
        "2023-11-16 18:40:00.0000002,1,1\n"
    )
    records = read_trace(write(tmp_path / "t.csv", text))
    # Dated traces start at their first request; 100 ns later comes the second.
    assert records[0].arrival == 0.0
    assert records[1].arrival == pytest.approx(1e-7, abs=1e-9)


def test_azure_2024_dates_with_their_utc_offset_are_read(tmp_path: Path) -> None:
    # The 2024 edition of the trace writes each instant with its offset, six decimals, and
    # none on a whole second.
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2162,5\n"
        "2024-05-10 00:00:01+00:00,374,12\n"
        "2024-05-10 02:00:02.500000+02:00,1058,84\n"
    )
    trace = read_trace_file(write(tmp_path / "AzureLLMInferenceTrace_code_1week.csv", text))
    assert (trace.format, len(trace.rows)) == ("azure", 3)
    workload = assemble_trace([trace], TraceRules())
    # The third instant is 00:00:02.5 UTC: an offset is taken off, not ignored.
    assert [r.arrival for r in workload.records] == pytest.approx([0.0, 1.0 - 0.00993, 2.5 - 0.00993])
    assert workload.start == pytest.approx(epoch("2024-05-10 00:00:00.009930"))
    assert [(r.actual_tokens, r.output_tokens) for r in workload.records] == [
        (2167, 5),
        (386, 12),
        (1142, 84),
    ]


def test_the_two_azure_files_merge_on_their_shared_clock() -> None:
    workload = assemble_trace(
        [read_trace_file(CONV, label="conv"), read_trace_file(CODE, label="code")], TraceRules()
    )
    records = workload.records
    assert len(records) == 588 + 628
    assert [r.arrival for r in records] == sorted(r.arrival for r in records)
    assert records[0].arrival == 0.0
    # The code file's first request (18:40:00.0343470) comes before the conversation's first.
    assert workload.start == pytest.approx(epoch("2023-11-16 18:40:00.034347"))
    assert sum(r.actual_tokens for r in records) == sum(
        row.actual for path in (CONV, CODE) for row in read_trace_file(path).rows
    )
    assert all(r.output_tokens is not None and r.output_tokens <= r.actual_tokens for r in records)
    # Without rules: NORMAL, no tenant, the estimate is what the call uses.
    assert {(r.priority, r.tenant) for r in records} == {(Priority.NORMAL, None)}
    assert all(r.estimated_tokens == r.actual_tokens for r in records)


# -- BurstGPT ------------------------------------------------------------------------------------
def test_burstgpt_reads_as_published_and_its_columns_serve_the_rules(tmp_path: Path) -> None:
    path = write(tmp_path / "BurstGPT_1.csv", BURSTGPT)
    trace = read_trace_file(path, columns=("Model", "Log Type"))
    assert (trace.format, trace.dated) == ("burstgpt", False)
    assert [(row.time, row.actual, row.output) for row in trace.rows] == [
        (5.0, 490, 18),
        (45.0, 1317, 230),
        (45.5, 693, 276),
        (118.0, 300, 0),  # a failed request (no response) is replayed with an empty completion
    ]
    assert trace.rows[2].columns == ("GPT-4", "API log")
    rules = TraceRules(
        tenant_by="column:Model",
        priority_by="column:Log Type",
        priorities={"Conversation log": ((Priority.HIGH, 1.0),), "API log": ((Priority.LOW, 1.0),)},
    )
    records = assemble_trace([trace], rules).records
    # Seconds-counting traces keep their clock: the first request arrives at 5 s.
    assert [(r.arrival, r.tenant, r.priority) for r in records] == [
        (5.0, "ChatGPT", Priority.HIGH),
        (45.0, "ChatGPT", Priority.HIGH),
        (45.5, "GPT-4", Priority.LOW),
        (118.0, "GPT-4", Priority.LOW),
    ]


# -- Mooncake ------------------------------------------------------------------------------------
def test_mooncake_reads_milliseconds_and_ignores_the_block_hashes(tmp_path: Path) -> None:
    trace = read_trace_file(mooncake(tmp_path))
    assert trace.format == "mooncake"
    assert [(row.time, row.actual, row.output) for row in trace.rows] == [
        (0.0, 7255, 500),
        (3.052, 7809, 490),
        (3.052, 2603, 316),
    ]
    records = read_trace(tmp_path / "trace.jsonl")
    assert [r.arrival for r in records] == [0.0, 3.052, 3.052]
    assert [r.output_tokens for r in records] == [500, 490, 316]  # ties keep the file's order


def test_a_key_of_a_mooncake_line_can_name_the_tenant(tmp_path: Path) -> None:
    rows = [dict(row, session_id=f"s{index % 2}") for index, row in enumerate(MOONCAKE)]
    trace = read_trace_file(mooncake(tmp_path, rows), columns=("session_id",))
    records = assemble_trace([trace], TraceRules(tenant_by="column:session_id")).records
    assert [r.tenant for r in records] == ["s0", "s1", "s0"]


# -- recognising and forcing formats -------------------------------------------------------------
def test_the_format_is_recognised_by_content_whatever_the_file_is_called(tmp_path: Path) -> None:
    assert read_trace_file(write(tmp_path / "a.txt", BURSTGPT)).format == "burstgpt"
    assert read_trace_file(write(tmp_path / "b.csv", json.dumps(MOONCAKE[0]) + "\n")).format == "mooncake"
    assert read_trace_file(write(tmp_path / "c.log", "arrival,estimated\n1,2\n")).format == "llmqd"
    # A byte-order mark does not hide the header.
    assert (
        read_trace_file(write(tmp_path / "d.csv", "\ufeff" + CONV.read_text(encoding="utf-8"))).format
        == "azure"
    )


@pytest.mark.parametrize(
    ("name", "text", "forced", "message"),
    [
        (
            "t.csv",
            "TIMESTAMP,ContextTokens\n2023-11-16 18:40:00,1\n",
            "auto",
            "t.csv:1: the header has no 'GeneratedTokens'",
        ),
        ("t.csv", "Timestamp,Request tokens\n1,2\n", "auto", "t.csv:1: the header has no 'Response tokens'"),
        ("t.csv", "arrival,estimated\n1,2\n", "azure", "t.csv:1: the header has no 'TIMESTAMP'"),
        ("t.csv", "a,b\n1,2\n", "mooncake", "t.csv:1: the Mooncake trace"),
        (
            "t.jsonl",
            '{"timestamp": 1, "input_length": 5}\n',
            "auto",
            "t.jsonl:1: 'output_length' is required",
        ),
        ("t.jsonl", '{"timestamp": 1}\n', "burstgpt", "t.jsonl:1: the BurstGPT trace"),
    ],
)
def test_a_header_that_lacks_a_column_of_its_format_is_named(
    tmp_path: Path, name: str, text: str, forced: Any, message: str
) -> None:
    with pytest.raises(TraceError) as raised:
        read_trace_file(write(tmp_path / name, text), format=forced)
    assert message in str(raised.value)


def test_a_column_the_rules_ask_for_must_be_in_the_header(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="the header has no 'Session ID' column"):
        read_trace_file(write(tmp_path / "b.csv", BURSTGPT), columns=("Session ID",))
    with pytest.raises(TraceError, match="rules by column"):
        read_trace_file(write(tmp_path / "p.csv", "arrival,estimated\n1,2\n"), columns=("Model",))


# -- merging and the rules' checks ---------------------------------------------------------------
def test_traces_on_different_clocks_are_not_merged(tmp_path: Path) -> None:
    burst = read_trace_file(write(tmp_path / "b.csv", BURSTGPT))
    with pytest.raises(TraceError, match=r"counts time in dates and .* in seconds"):
        assemble_trace([read_trace_file(CONV), burst], TraceRules())


def test_the_rules_must_name_files_and_values_that_exist(tmp_path: Path) -> None:
    conv, code = read_trace_file(CONV, label="conv"), read_trace_file(CODE, label="code")
    high = ((Priority.HIGH, 1.0),)
    with pytest.raises(TraceError, match=r"no trace file is labelled 'cnv' \(labels: conv, code\)"):
        assemble_trace([conv, code], TraceRules(priorities={"cnv": high}))
    with pytest.raises(TraceError, match="two trace files are labelled 'conv'"):
        assemble_trace([conv, read_trace_file(CODE, label="conv")], TraceRules())
    with pytest.raises(TraceError, match="no max_tokens cap for 'code'"):
        assemble_trace([conv, code], TraceRules(estimate="cap", max_tokens={"conv": 1000}))
    burst = read_trace_file(write(tmp_path / "b.csv", BURSTGPT), columns=("Model",))
    with pytest.raises(TraceError, match=r"no request has 'Model' = 'GPT-5' \(values: 'ChatGPT', 'GPT-4'\)"):
        assemble_trace([burst], TraceRules(priority_by="column:Model", priorities={"GPT-5": high}))
    project = read_trace_file(write(tmp_path / "p.csv", "arrival,estimated\n1,2\n"))
    with pytest.raises(TraceError, match="gives its own estimates"):
        assemble_trace([project], TraceRules(estimate="cap", max_tokens={None: 100}))


# -- the project's format ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_the_completion_survives_a_save_and_a_replay(tmp_path: Path, suffix: str) -> None:
    records = [
        TraceRecord(0.5, Priority.HIGH, 1100, 1042, "conv", None, 42),
        TraceRecord(1.0, Priority.LOW, 300, 300, None, 10.0, None),
    ]
    path = tmp_path / f"saved{suffix}"
    assert write_trace(path, records) == 2
    assert read_trace(path) == records
    if suffix == ".csv":
        assert path.read_text(encoding="utf-8").splitlines()[0] == (
            "arrival,priority,estimated,actual,output,tenant,deadline"
        )


def test_a_project_trace_keeps_its_own_priorities_and_tenants_over_the_rules(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "arrival,estimated,priority,tenant\n1,2,LOW,x\n2,3,,\n")
    rules = TraceRules(tenant_by="file", priorities={None: ((Priority.HIGH, 1.0),)})
    records = assemble_trace([read_trace_file(path)], rules).records
    assert [(r.priority, r.tenant) for r in records] == [(Priority.LOW, "x"), (Priority.HIGH, "p")]


# -- malformed traces: refused in one line naming the file and the line ---------------------------
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"

MALFORMED: list[tuple[str, bytes, str]] = [
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
        "a column read twice",
        b"TIMESTAMP,ContextTokens,GeneratedTokens,ContextTokens\n2023-11-16 18:40:00,1,3,500\n",
        "t.csv:1: the header names the column 'ContextTokens' twice",
    ),
    (
        "a project column twice",
        b"arrival,estimated,arrival\n0.5,10,7\n",
        "t.csv:1: the header names the column 'arrival' twice",
    ),
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
        "bad offset",
        HEADER.encode() + b"2024-05-10 00:00:00+25:00,1,3\n",
        "t.csv:2: TIMESTAMP's UTC offset must be within",
    ),
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


@pytest.mark.parametrize(("name", "content", "message"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_trace_is_refused_in_one_line_naming_the_file_and_line(
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
