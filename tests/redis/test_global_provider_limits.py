"""The global choice over Redis with provider-shaped limits (ITPM, OTPM, TPD) beside the TPM: the
dispatcher's reserves are kept in the TPM bucket only, as `LLMThrottle` keeps them in memory, so
a reserve never makes a request that fits the other limits look as if it never could; a request
that can never fit one of them is skipped and holds nothing. Each case is run in memory too, and
both must hand out the same request."""

from __future__ import annotations

from typing import Any

import pytest

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
    create_in_memory_queue,
)

POLICIES = ["score", "fair_priority"]

# An URGENT request above one limit's capacity (it can never be sent), a LOW one that fits:
# the URGENT estimates size the URGENT reserve (up to a quarter of the TPM, 2,500 here), which
# the LOW one must leave in the TPM bucket but not in the ITPM, OTPM or TPD bucket.
CASES = {
    "itpm": ({"itpm": 1_000}, TokenInfo(3_000, input=2_000, max_output=1_000)),
    "otpm": ({"otpm": 1_000}, TokenInfo(3_000, input=500, max_output=2_500)),
    "tpd": ({"tpd": 5_000}, TokenInfo(6_000)),
}


def requests(never_fits: TokenInfo) -> list[LLMRequest[str]]:
    return [
        LLMRequest("never-fits", "x", Priority.URGENT, never_fits),
        LLMRequest("fits", "x", Priority.LOW, TokenInfo(100)),
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", list(CASES))
async def test_a_request_above_a_provider_limit_does_not_hold_the_queue_through_the_urgent_reserve(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, policy: str, case: str
) -> None:
    limits, never_fits = CASES[case]
    options = {"rpm": 600, "tpm": 10_000, **limits}

    in_memory = create_in_memory_queue(LLMQueueDispatcherConfig(policy=policy, clock=clock))  # type: ignore[arg-type]
    async with in_memory:
        await in_memory.batch_enqueue(requests(never_fits))
        local = await in_memory.dequeue(LLMThrottle(clock=clock, **options))
        assert local is not None
        assert local.message.payload.id == "fits"

    storage = clocked_storage()
    limiter = clocked_throttle(**options)
    config = LLMQueueDispatcherConfig(policy=policy, clock=clock)  # type: ignore[arg-type]
    async with LLMQueueDispatcher(storage, config) as dispatcher:
        assert dispatcher._global is not None
        await dispatcher.batch_enqueue(requests(never_fits))
        job = await dispatcher.dequeue(limiter)
        assert job is not None, "the queue was held for a request that can never be sent"
        assert job.message.payload.id == "fits"
        await job.mark_as_processed(actual_tokens=100)
        # The request that never fits stays queued and holds nothing: the budget is whole again
        # once the dispatch is settled, and nothing else is handed out.
        assert await dispatcher.dequeue(limiter) is None
        assert await storage.get_approximate_message_count() == 1


@pytest.mark.parametrize("policy", POLICIES)
async def test_the_urgent_reserve_is_still_kept_in_the_tpm_bucket(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, policy: str
) -> None:
    """With an ITPM beside the TPM, a LOW request that would leave less than the URGENT reserve
    in the TPM bucket still waits (the reserve moved to TPM only; it did not go away)."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=10_000, itpm=50_000)
    config = LLMQueueDispatcherConfig(policy=policy, clock=clock)  # type: ignore[arg-type]
    async with LLMQueueDispatcher(storage, config) as dispatcher:
        # An URGENT dispatch of 1,000 tokens sizes the reserve at 2,000.
        await dispatcher.enqueue(LLMRequest("urgent", "x", Priority.URGENT, TokenInfo(1_000)))
        first = await dispatcher.dequeue(limiter)
        assert first is not None
        await first.mark_as_processed(actual_tokens=1_000)
        # 9,000 left in the TPM bucket: a LOW request of 8,000 would leave 1,000 < 2,000.
        await dispatcher.enqueue(LLMRequest("low", "x", Priority.LOW, TokenInfo(8_000)))
        await dispatcher.enqueue(LLMRequest("other", "x", Priority.LOW, TokenInfo(8_000)))
        assert await dispatcher.dequeue(limiter) is None
        clock.advance(60.0)  # the bucket refilled: 8,000 leaves 2,000
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        assert job.message.payload.id in {"low", "other"}
