"""The adapters the conformance suite runs against. Add a factory here to test a new backend.

A factory takes the clock (a `ManualClock`) and the constructor options of `InMemoryStorage`
(``max_receive_count``, ``dead_letter`` — another adapter from the same factory —,
``message_retention``) and returns a fresh, empty adapter.

``FACTORIES`` holds the in-process adapters: they keep payloads by reference and never suspend,
two promises of the in-memory contract that ``make_in_process_storage`` tests. ``redis`` is the
out-of-process kind: `RedisStorage` on a real ``redis-server`` this suite starts (once per
session, on a free port, append-only file fsynced always, ``noeviction``), on the test clock of
``tests/redis/support.py``; its payloads come back equal, not identical (``copies_payloads``).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import InMemoryStorage, ManualClock, QueueStorageAdapter
from tests.redis.support import ClockedRedisStorage, RedisServer, running_server
from tests.reference.storage import ReferenceStorage

StorageFactory = Callable[..., QueueStorageAdapter[Any]]

FACTORIES: dict[str, StorageFactory] = {
    "memory": lambda clock, **options: InMemoryStorage(clock=clock, **options),
    "reference": lambda clock, **options: ReferenceStorage(clock=clock, **options),
}
KINDS = sorted([*FACTORIES, "redis"])
# Whether a kind's dead-letter store keeps a second copy of a request id it already holds. Every
# adapter does now (dropping one loses a request; test_dead_letter_copies.py
# holds each to it); the stateful model still takes the rule per kind.
DEAD_LETTER_COPIES = {"memory": True, "reference": True, "redis": True}

START = 1_700_000_000.0

_queue_numbers = itertools.count()


class RedisFactory:
    """Fresh `RedisStorage` queues (a new name each) on one server, on the test clock."""

    copies_payloads = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[ClockedRedisStorage[Any]] = []

    def __call__(self, clock: ManualClock, **options: Any) -> ClockedRedisStorage[Any]:
        dead_letter = options.pop("dead_letter", None)
        if dead_letter is not None:
            options["dead_letter"] = dead_letter.queue
        storage: ClockedRedisStorage[Any] = ClockedRedisStorage(
            self.url, f"conformance-{next(_queue_numbers)}", clock=clock, **options
        )
        self.created.append(storage)
        return storage

    async def aclose(self) -> None:
        for storage in self.created:
            await storage.aclose()
        self.created.clear()


def same_request(factory: StorageFactory, got: Any, stored: Any) -> bool:
    """The request read back is the one stored: the same object for the in-process adapters,
    an equal one for those that copy payloads out of process."""
    return bool(got == stored) if getattr(factory, "copies_payloads", False) else got is stored


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the suite (each test uses queues of its own)."""
    directory: Path = tmp_path_factory.mktemp("conformance-redis")
    with running_server(directory) as server:
        yield server.url


@pytest.fixture
async def redis_factory(redis_url: str) -> AsyncIterator[RedisFactory]:
    factory = RedisFactory(redis_url)
    yield factory
    await factory.aclose()


@pytest.fixture(params=KINDS)
def make_storage(request: pytest.FixtureRequest) -> StorageFactory:
    """A factory of fresh adapters of one kind: ``make_storage(clock, **options)``."""
    if request.param == "redis":
        factory: RedisFactory = request.getfixturevalue("redis_factory")
        return factory
    return FACTORIES[request.param]


@pytest.fixture(params=sorted(FACTORIES))
def make_in_process_storage(request: pytest.FixtureRequest) -> StorageFactory:
    """Only the in-process adapters (by-reference payloads, operations that never suspend)."""
    return FACTORIES[request.param]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


__all__ = [
    "DEAD_LETTER_COPIES",
    "FACTORIES",
    "KINDS",
    "START",
    "RedisFactory",
    "RedisServer",
    "StorageFactory",
    "same_request",
]
