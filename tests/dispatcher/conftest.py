"""The dispatcher tests run on one `ManualClock`; helpers are in support.py."""

from __future__ import annotations

import pytest

from llm_queue_dispatcher import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(10_000.0)
