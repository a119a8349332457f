"""`llmqd demo` as a person runs it: a process that prints its URL, serves, and stops on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request

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
