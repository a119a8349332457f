"""What the Redis tests share: a real ``redis-server`` they start themselves, and the test-only
time source of the Lua scripts.

The time source. In production every instant the scripts use comes from the server's ``TIME``:
`RedisStorage._time_argument` and `RedisThrottle._time_argument` always return ``""``, and no
constructor argument, environment variable or key in Redis changes that. The conformance suite
and the stateful model test need time they control (a `ManualClock` advanced by hours in a
millisecond), so the private subclasses below, which live only in ``tests/``, override that one
method to pass the clock's reading (and, for queues, the reading at construction as the creation
time) to every script. Production code cannot switch this on by accident: it would take
subclassing a private method. Everything else (keys, scripts, arithmetic) is the production
code, unchanged.

The server. `RedisServer` runs ``redis-server`` on a free port of 127.0.0.1 in a temporary
directory with ``--appendonly yes --appendfsync always --maxmemory-policy noeviction`` (the
configuration the README recommends), in its own process group, and can be killed, paused,
resumed and restarted on the same append-only file. `require_redis_server` skips only where the
binary is not installed outside CI; everywhere else a server that cannot start fails the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def microseconds(seconds: float) -> int:
    """A clock reading in whole microseconds, rounded exactly as ``datetime.fromtimestamp``
    rounds it (so a message's datetime equals ``datetime.fromtimestamp(reading, utc)``)."""
    return (datetime.fromtimestamp(seconds, timezone.utc) - _EPOCH) // timedelta(microseconds=1)


class ClockedRedisStorage(RedisStorage[T]):
    """`RedisStorage` on a test clock (see the module docstring). Test-only."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self._created_us = microseconds(clock())

    def _time_argument(self) -> str:
        return f"{microseconds(self.clock())} {self._created_us}"

    def _host_time(self) -> float:
        return self.clock()  # the scripts' clock: this "host" agrees with the "server"


class ClockedRedisThrottle(RedisThrottle):
    """`RedisThrottle` on a test clock (see the module docstring). Test-only."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock

    def _time_argument(self) -> str:
        return str(microseconds(self.clock()))

    def _host_time(self) -> float:
        return self.clock()  # the scripts' clock: this "host" agrees with the "server"


def require_redis_server() -> str:
    """The path of ``redis-server``. Missing: a skip on a developer's machine, a failure in CI
    (``.ci/run`` installs it, so a missing binary there is a broken setup, not a reason to skip)."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` of a test, on 127.0.0.1, with its data in ``directory``."""

    def __init__(self, directory: Path, *, password: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = require_redis_server()
        self.directory = directory
        self.password = password
        self.extra = extra
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        return command + list(self.extra)

    def start(self, *, timeout: float = 15.0) -> RedisServer:
        """Starts the server (on a fresh free port the first time, on the same port after that,
        so clients reconnect to a restarted server) and waits until it answers."""
        attempts = 5 if self.port == 0 else 1
        for _ in range(attempts):
            if self.port == 0 or attempts > 1:
                self.port = free_port()
            self.process = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            if self._wait_ready(timeout):
                return self
            self.kill()
        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on port {self.port}; log tail:\n{log}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.5) as conn,
            ):
                conn.sendall(b"PING\r\n")
                reply = conn.recv(64)
                # +PONG, or -NOAUTH with a password: either way it is serving (AOF loaded).
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return True
            time.sleep(0.02)
        return False

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """``kill -9``: no shutdown, no final fsync (the AOF has what ``always`` wrote)."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)
            self.process = None

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def restart(self) -> None:
        """``kill -9`` then start again on the same port and the same append-only file."""
        self.kill()
        self.start()


@contextlib.contextmanager
def running_server(directory: Path, **options: Any) -> Iterator[RedisServer]:
    server = RedisServer(directory, **options).start()
    try:
        yield server
    finally:
        server.resume()
        server.kill()
