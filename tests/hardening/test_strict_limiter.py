"""Issue 9, defect 9: a "strict" limiter refusing the extra tokens of `mark_as_processed` no
longer leaves a job that was deleted from the store but can never be settled."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    MessageStateError,
    QueueStorageAdapter,
    RateLimitError,
)
from tests.hardening.support import BookLimiter, native_limiter, request
from tests.reference.storage import ReferenceStorage


@pytest.mark.parametrize("kind", ["native", "python"])
@pytest.mark.parametrize("source", ["memory", "prefetch"])
async def test_a_refused_adjustment_still_settles_the_job(source: str, kind: str) -> None:
    """Defect 9: the limiter refuses the extra tokens (strict, bucket empty). Whether the mark
    reports the refusal or not, the message is deleted, the job is settled and forgotten, a
    second mark raises `MessageStateError`, and the refusal took nothing."""
    clock = ManualClock(1_000.0)
    storage: QueueStorageAdapter[Any] = (
        InMemoryStorage(clock=clock) if source == "memory" else ReferenceStorage(clock=clock)
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, buffer_size=1)
    )
    limiter: Any
    if kind == "native":
        limiter = native_limiter(ManualClock(), rpm=600, tpm=1_000, adjustment_failure_strategy="strict")
    else:
        limiter = BookLimiter(token_capacity=1_000, strict=True)
    await dispatcher.enqueue(request("a", 100))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert limiter.consume("other", 900)  # the bucket is empty now
    with contextlib.suppress(RateLimitError):
        await job.mark_as_processed(actual_tokens=500)
    with pytest.raises(MessageStateError):
        await job.mark_as_processed(actual_tokens=500)
    with pytest.raises(MessageStateError):
        await job.mark_as_failed(RuntimeError("x"))
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert metrics.queue.total_messages == 0
    assert (await storage.get_queue_attributes()).approximate_number_of_messages_in_flight == 0
    assert limiter.get_metrics().tpm.available == pytest.approx(0.0)  # nothing more taken, nothing lost
