"""Starts ``llmqd demo`` as a separate process on a free port, for tests, the screenshot and the
CPU measurement. Its output goes to files (a pipe nobody reads could fill up and stall it)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_URL = re.compile(r"http://127\.0\.0\.1:\d+/")


@dataclass
class DemoProcess:
    process: subprocess.Popen[str]
    url: str
    stdout: Path
    stderr: Path

    def communicate(self, timeout: float) -> tuple[str, str]:
        """Waits for the process to end; returns what it printed."""
        self.process.wait(timeout=timeout)
        return self.stdout.read_text(), self.stderr.read_text()


@contextlib.contextmanager
def start_demo(*arguments: str, startup_timeout: float = 30.0) -> Iterator[DemoProcess]:
    """``llmqd demo --port 0 *arguments`` running; stopped (SIGTERM, then SIGKILL) on exit."""
    with tempfile.TemporaryDirectory(prefix="llmqd-demo-") as folder:
        stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
        with stdout.open("w") as out, stderr.open("w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "llm_queue_dispatcher.cli", "demo", "--port", "0", *arguments],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                found = _URL.search(stdout.read_text())
                if found:
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llmqd demo did not start: {stderr.read_text()}")
                time.sleep(0.05)
            yield DemoProcess(process, found.group(0), stdout, stderr)
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
