"""`llmqd demo` as a person runs it: a process that prints its URL, serves, and stops on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from llm_queue_dispatcher import cli
from tests.demo_process import start_demo


def test_it_serves_on_loopback_and_stops_cleanly_on_ctrl_c() -> None:
    with start_demo("--speed", "20", "--strategy", "default", "--strategy", "fair") as demo:
        assert demo.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(demo.url, timeout=5) as response:
            assert b"llmqd demo" in response.read()
        with urllib.request.urlopen(demo.url + "metrics", timeout=5) as response:
            assert b'llmqd_limiter_capacity_tokens{strategy="fair"} 60000.0' in response.read()
        demo.process.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=10)
    assert demo.process.returncode == 0, err
    assert "llmqd demo: stopped" in out
    assert "Traceback" not in err


def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "llm_queue_dispatcher.cli", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_arguments_are_refused() -> None:
    for arguments in (
        ["--speed", "0"],
        ["--speed", "nan"],
        ["--port", "-1"],
        ["--rpm", "-5"],
        ["--rpm", "0.5"],
        ["--tpm", "inf"],
        ["--tpm", "15999"],
        ["--initial-burst", "-1"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "llm_queue_dispatcher.cli", "demo", *arguments],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, arguments
        assert f"argument {arguments[0]}" in result.stderr
        assert "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "llm_queue_dispatcher.cli", "demo", "--strategy", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "unknown strategy 'nope'" in result.stderr


def test_the_package_and_the_help_need_no_optional_dependency() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import llm_queue_dispatcher\n"
        "from llm_queue_dispatcher import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    cli.main(['demo', '--help'])\n"
        "assert '--speed' in out.getvalue()\n"
        "loaded = {'aiohttp', 'prometheus_client'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


@pytest.mark.parametrize(
    ("arguments", "said", "unsaid"),
    [
        (["--rpm", "1e300"], "must be within [1, 1000000], got 1e300", "below"),
        (["--rpm", "0.5"], "got 0.5: below 1 request per minute", "1e+06"),
        (["--tpm", "1e20"], "must be within [16000, 1000000000], got 1e20", "never admit"),
        (["--rpm", "inf"], "must be a finite number within [1, 1000000], got inf", "below"),
    ],
    ids=["rpm too large", "rpm too small", "tpm too large", "rpm infinite"],
)
def test_a_limit_out_of_range_is_refused_for_the_right_reason(
    arguments: list[str], said: str, unsaid: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", *arguments])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert said in error
    assert unsaid not in error
