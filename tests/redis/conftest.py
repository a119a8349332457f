"""Fixtures of the Redis tests: one shared ``redis-server`` for the tests that only read and write
(each uses names of its own), and a private one for each test that kills, pauses or restarts it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import ManualClock
from llm_queue_dispatcher.redis import RedisStorage
from tests.redis.ledger import read_ledgers
from tests.redis.support import (
    ClockedRedisStorage,
    ClockedRedisThrottle,
    RedisServer,
    ReplyCutter,
    free_port,
    running_server,
)

START = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[2]
_names = itertools.count()


def fresh_name(prefix: str) -> str:
    """A queue or limiter name no other test uses on the shared server."""
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_server(tmp_path_factory.mktemp("redis-shared")) as server:
        yield server


@pytest.fixture
def redis_url(shared_server: RedisServer) -> str:
    return shared_server.url


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone (to kill, pause or restart), stopped after it."""
    directory = tmp_path / "redis"
    directory.mkdir()
    with running_server(directory) as server:
        yield server


@pytest.fixture
async def reply_cutter(shared_server: RedisServer) -> AsyncIterator[ReplyCutter]:
    """A proxy in front of the shared server that loses the replies of the script calls it is
    armed for (see `ReplyCutter`)."""
    cutter = await ReplyCutter(shared_server.port).start()
    yield cutter
    await cutter.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def clocked_storage(
    redis_url: str, clock: ManualClock
) -> AsyncIterator[Callable[..., ClockedRedisStorage[Any]]]:
    """``clocked_storage(**options)``: a fresh queue on the test clock, closed after the test."""
    made: list[ClockedRedisStorage[Any]] = []

    def make(**options: Any) -> ClockedRedisStorage[Any]:
        queue = options.pop("queue", None) or fresh_name("queue")
        storage: ClockedRedisStorage[Any] = ClockedRedisStorage(redis_url, queue, clock=clock, **options)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.aclose()


@pytest.fixture
async def clocked_throttle(
    redis_url: str, clock: ManualClock
) -> AsyncIterator[Callable[..., ClockedRedisThrottle]]:
    """``clocked_throttle(rpm=..., tpm=..., **options)``: a fresh limiter on the test clock."""
    made: list[ClockedRedisThrottle] = []

    def make(**options: Any) -> ClockedRedisThrottle:
        name = options.pop("name", None) or fresh_name("limiter")
        throttle = ClockedRedisThrottle(redis_url, name, clock=clock, **options)
        made.append(throttle)
        return throttle

    yield make
    for throttle in made:
        await throttle.aclose()


@pytest.fixture
async def unreachable_storage() -> AsyncIterator[RedisStorage[Any]]:
    """A storage whose server does not exist (a port nothing listens on): any command it sent
    would raise `StorageError`, so a test expecting another error proves nothing was sent."""
    storage: RedisStorage[Any] = RedisStorage(f"redis://127.0.0.1:{free_port()}/0", "nowhere")
    yield storage
    await storage.aclose()


class Workers:
    """Worker processes of one test, each in its own process group, all killed at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ledgers: list[Path] = []
        self._numbers = itertools.count()

    def start(self, mode: str, **options: Any) -> subprocess.Popen[bytes]:
        ledger = self.directory / f"{mode}-{next(self._numbers)}.jsonl"
        self.ledgers.append(ledger)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.redis.worker",
                mode,
                json.dumps({**options, "ledger": str(ledger)}),
            ],
            cwd=ROOT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {process.args[3]} (pid {process.pid}) still running after {timeout} s")
        failed = [p for p in self.processes if p.returncode not in (0, -signal.SIGKILL)]
        assert not failed, f"workers exited with errors: {[(p.args[3], p.returncode) for p in failed]}"

    def records(self) -> list[dict[str, Any]]:
        return read_ledgers(self.ledgers)

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    directory = tmp_path / "ledgers"
    directory.mkdir()
    pool = Workers(directory)
    yield pool
    pool.kill_all()
