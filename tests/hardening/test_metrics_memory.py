"""Issue 9, defect 11: the dispatcher's metrics stay bounded in memory however many dispatches
there are. The windows used to keep one sample per dispatch for the whole retention (54 MB over
200k cycles at constant depth, and a `get_queue_metrics()` sorting all of them). Sizes are
measured by counting the samples the core's recorder holds, never by timing."""

from __future__ import annotations

from llm_queue_dispatcher import LLMRequest, LLMThrottle, ManualClock, TokenInfo, create_in_memory_queue


async def test_two_hundred_thousand_dispatches_keep_the_recorder_bounded() -> None:
    """Defect 11: 200k enqueue-dispatch-complete cycles at a constant depth of 10, 1 ms of
    clock apart (all within the 300 s retention, so only a count bound can hold the memory):
    the recorder holds no more after 200k cycles than after 100k (give or take a per-second
    bucket), and less than one element per cycle; `get_queue_metrics()` then works over that bounded state."""
    clock = ManualClock(1_000.0)
    dispatcher = create_in_memory_queue(clock=clock)
    limiter = LLMThrottle(1e12, 1e15, clock=ManualClock())
    for i in range(10):
        await dispatcher.enqueue(LLMRequest(f"waiting-{i}", None, token_info=TokenInfo(1)))
    sizes = []
    for half in range(2):
        for i in range(100_000):
            await dispatcher.enqueue(LLMRequest(f"r{half}-{i}", None, token_info=TokenInfo(10)))
            job = await dispatcher.dequeue(limiter)
            assert job is not None
            await job.mark_as_processed(actual_tokens=7)
            clock.advance(0.001)
        sizes.append(dispatcher._core._samples_held)
    # Per-second buckets of the last minute may differ by one at the two instants measured.
    assert sizes[1] <= sizes[0] + 100, sizes
    # And far below one element per cycle (the unbounded windows held six per cycle).
    assert sizes[1] < 200_000, sizes
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.approximate_number_of_messages == 10
    assert metrics.processing.active_requests == 0
    assert metrics.queue.throughput.messages_per_minute > 0
    assert dispatcher._core._samples_held <= sizes[1] + 100
