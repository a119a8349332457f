"""Issue 9, defect 3, cancellation during lease renewal. The external store's
`update_visibility_timeout` suspends before and after its work, so a consumer's cancellation can
land while the dispatcher renews the lease of the message it is about to hand out. (At e1deeea
the reservation of such a cancelled dequeue was released by request id in a shielded task that
ran later, after another consumer had reserved the re-buffered message: that one's reservation
was released instead and one was left over. Fixed on main by 19d189e.)"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from llm_queue_dispatcher import ManualClock
from tests.hardening.support import BookLimiter, native_limiter
from tests.hardening.test_cancellation import assert_books, make, stress
from tests.reference.storage import RecordingStorage


class SuspendingStorage(RecordingStorage[Any]):
    """The reference adapter whose lease renewal suspends, as a network call does."""

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        await asyncio.sleep(0)
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)
        await asyncio.sleep(0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["native", "python"])
async def test_cancellations_during_lease_renewal_take_nothing(kind: str, seed: int) -> None:
    """Defect 3: as `test_cancelled_dequeues_take_nothing`, with cancellations landing during
    the lease renewal of the prefetch path."""
    storage, dispatcher = make("prefetch", SuspendingStorage)
    limiter: Any = native_limiter(ManualClock(), rpm=1e9, tpm=1e12) if kind == "native" else BookLimiter()
    jobs, cancelled = await stress(dispatcher, limiter, random.Random(seed))
    assert cancelled > 0
    await assert_books(storage, dispatcher, limiter, jobs)
    await dispatcher.close()
