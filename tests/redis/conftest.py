"""Fixtures of the Redis tests: one shared ``redis-server`` for the tests that only read and write
(each uses names of its own), and a private one for each test that kills, pauses or restarts it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import ManualClock
from llm_queue_dispatcher.redis import RedisStorage
from tests.redis.support import (
    ClockedRedisStorage,
    ClockedRedisThrottle,
    RedisServer,
    free_port,
    running_server,
)

START = 1_700_000_000.0
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
