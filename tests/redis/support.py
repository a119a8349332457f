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

The lost reply. `ReplyCutter` is a TCP proxy on 127.0.0.1 in front of a server that, once armed,
lets the next script call (``EVALSHA``) through and closes the connection when the server's
reply comes back, before the client reads it: the script ran, the client sees a broken
connection, and redis-py resends the call on a new one.

The server. `RedisServer` runs ``redis-server`` on a free port of 127.0.0.1 in a temporary
directory with ``--appendonly yes --appendfsync always --maxmemory-policy noeviction`` (the
configuration the README recommends), in its own process group, and can be killed, paused,
resumed and restarted on the same append-only file. `require_redis_server` skips only where the
binary is not installed outside CI; everywhere else a server that cannot start fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio

from llm_queue_dispatcher import FairPriorityConfig, LLMQueueDispatcher, LLMQueueDispatcherConfig
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


#: How far the clock of `an_hour_ahead` hosts is off.
HOUR = 3600.0


def an_hour_ahead() -> float:
    """The clock of a host an hour ahead of the server (and of this one)."""
    return time.time() + HOUR


class RedisStorageAnHourAhead(RedisStorage[T]):
    """`RedisStorage` on a host whose clock is an hour ahead of the server's. Test-only."""

    def _host_time(self) -> float:
        return an_hour_ahead()


class RedisThrottleAnHourAhead(RedisThrottle):
    """`RedisThrottle` on a host whose clock is an hour ahead of the server's. Test-only."""

    def _host_time(self) -> float:
        return an_hour_ahead()


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


class ReplyCutter:
    """A proxy that loses the reply of the next ``armed`` script calls (see the module docstring).
    ``cuts`` counts the replies lost."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._sessions: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def start(self) -> ReplyCutter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Closes every connection, waits for every session to end, then stops listening."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._sessions:
            await asyncio.wait(self._sessions)
        await self._server.wait_closed()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        session = asyncio.current_task()
        assert session is not None
        self._sessions.add(session)
        self._writers.add(client_out)
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(server_out)
        cut_next_reply = asyncio.Event()

        async def upstream() -> None:
            while data := await client_in.read(65_536):
                if self.armed and b"EVALSHA" in data:
                    self.armed -= 1
                    cut_next_reply.set()
                server_out.write(data)
                await server_out.drain()

        async def downstream() -> None:
            while data := await server_in.read(65_536):
                if cut_next_reply.is_set():
                    self.cuts += 1
                    return  # the reply is dropped and both connections closed
                client_out.write(data)
                await client_out.drain()

        directions = {asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())}
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.wait(directions)
            for writer in (client_out, server_out):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                self._writers.discard(writer)
            self._sessions.discard(session)


class Monitor:
    """The commands a server receives, read with ``MONITOR`` until a marker ``ECHO``."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def commands_during(self, action: Callable[[], Awaitable[None]]) -> list[str]:
        client = redis.asyncio.Redis.from_url(self.url)
        marker = redis.asyncio.Redis.from_url(self.url)
        seen: list[str] = []
        await marker.ping()  # connected before the monitor starts: its handshake is not counted
        try:
            async with client.monitor() as monitor:
                await action()
                await marker.echo("end-of-action")
                while True:
                    command = (await asyncio.wait_for(monitor.next_command(), 10))["command"]
                    if "end-of-action" in command:
                        return seen
                    seen.append(command)
        finally:
            await client.aclose()
            await marker.aclose()


def fair_dispatcher(storage: RedisStorage[Any], **fair: Any) -> LLMQueueDispatcher[Any]:
    """A `fair_priority` dispatcher over ``storage`` (``fair``: `FairPriorityConfig`'s fields), on
    the storage's test clock where it has one."""
    config = LLMQueueDispatcherConfig(
        policy="fair_priority",
        fair_priority=FairPriorityConfig(**fair),
        clock=getattr(storage, "clock", None),
    )
    return LLMQueueDispatcher(storage, config)
