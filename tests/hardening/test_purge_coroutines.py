"""Issue 9, defect 5, a mark after a purge: it must not leave its store call's coroutine
unawaited. (At e1deeea `ProcessableMessage._store_step` was handed the coroutine and returned
without awaiting it for a purged delivery: a `RuntimeWarning` on every such mark.)"""

from __future__ import annotations

import gc
import warnings

import pytest

from llm_queue_dispatcher import InMemoryStorage, LLMQueueDispatcher, ManualClock
from tests.hardening.support import native_limiter, request


@pytest.mark.parametrize("mark", ["processed", "failed", "dead_lettered"])
async def test_a_mark_after_a_purge_leaves_no_coroutine_unawaited(mark: str) -> None:
    """Defect 5: marking a purged delivery awaits (or never creates) its store call."""
    dispatcher: LLMQueueDispatcher[object] = LLMQueueDispatcher(InMemoryStorage(clock=ManualClock(1_000.0)))
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(native_limiter(ManualClock()))
    assert job is not None
    await dispatcher.purge()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mark == "processed":
            await job.mark_as_processed()
        elif mark == "failed":
            await job.mark_as_failed(RuntimeError("x"))
        else:
            await job.mark_as_dead_lettered(RuntimeError("x"))
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
