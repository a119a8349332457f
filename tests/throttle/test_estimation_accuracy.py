"""A failed call is not an estimation miss: the refund that settles it (an adjustment to 0
tokens, as ``mark_as_failed`` makes) gives the tokens back and records no actual count, so the
limiter's ``efficiency`` and ``estimation_accuracy`` measure only calls that used tokens."""

from __future__ import annotations

import pytest

from llm_queue_dispatcher import LLMRequest, LLMThrottle, ManualClock, TokenInfo, create_in_memory_queue


def test_a_refund_to_zero_tokens_records_no_actual_count() -> None:
    throttle = LLMThrottle(60, 10_000, clock=ManualClock())
    assert throttle.consume("failed", 400)
    throttle.adjust_consumption("failed", 0)
    [record] = throttle.get_consumption_history()
    assert (record.tokens, record.estimated_tokens, record.actual_tokens) == (0, 400, None)
    metrics = throttle.get_metrics()
    assert metrics.tpm.available == pytest.approx(10_000)
    assert metrics.consumption_history.estimation_accuracy == 1.0
    assert throttle.consume("ok", 400)
    throttle.adjust_consumption("ok", 200)
    metrics = throttle.get_metrics()
    assert metrics.consumption_history.estimation_accuracy == pytest.approx(0.5)
    assert metrics.efficiency == pytest.approx(0.5)


async def test_a_call_marked_failed_does_not_lower_the_estimation_accuracy() -> None:
    clock = ManualClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock)
    throttle = LLMThrottle(60, 10_000, clock=clock)
    await dispatcher.batch_enqueue(
        [
            LLMRequest("fails", None, token_info=TokenInfo(300)),
            LLMRequest("works", None, token_info=TokenInfo(300)),
        ]
    )
    first = await dispatcher.dequeue(throttle)
    second = await dispatcher.dequeue(throttle)
    assert first is not None
    assert second is not None
    await first.mark_as_failed(RuntimeError("provider error"))
    await second.mark_as_processed(actual_tokens=300)
    metrics = throttle.get_metrics()
    assert metrics.consumption_history.estimation_accuracy == 1.0
    assert metrics.efficiency == 1.0
