"""The adapters the conformance suite runs against. Add a factory here to test a new backend.

A factory takes the clock (a `ManualClock`) and the constructor options of `InMemoryStorage`
(``max_receive_count``, ``dead_letter`` — another adapter from the same factory —,
``message_retention``) and returns a fresh, empty adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llm_queue_dispatcher import InMemoryStorage, ManualClock, QueueStorageAdapter
from tests.reference.storage import ReferenceStorage

StorageFactory = Callable[..., QueueStorageAdapter[Any]]

FACTORIES: dict[str, StorageFactory] = {
    "memory": lambda clock, **options: InMemoryStorage(clock=clock, **options),
    "reference": lambda clock, **options: ReferenceStorage(clock=clock, **options),
}

START = 1_700_000_000.0


@pytest.fixture(params=sorted(FACTORIES))
def make_storage(request: pytest.FixtureRequest) -> StorageFactory:
    """A factory of fresh adapters of one kind: ``make_storage(clock, **options)``."""
    return FACTORIES[request.param]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)
