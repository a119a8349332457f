"""The compiled selection classes directly: parameters, the prefetch buffer."""

from __future__ import annotations

import gc
import weakref
from datetime import datetime, timezone

import pytest

from llm_queue_dispatcher import (
    InvalidConfigError,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageAttributes,
    Priority,
    QueueMessage,
    TokenInfo,
)
from llm_queue_dispatcher._core import CandidateBuffer, ScoringParams

WEIGHTS = (0.25, 0.2, 0.2, 0.1, 0.15, 0.1)


def leased(
    request_id: str, priority: Priority, tokens: int, *, received: int = 1, payload: object = None
) -> QueueMessage[object]:
    attributes = MessageAttributes(
        message_id=f"m-{request_id}",
        receipt_handle=f"h-{request_id}",
        enqueued_at=datetime.fromtimestamp(100.0, timezone.utc),
        receive_count=received,
        first_received_at=datetime.fromtimestamp(100.0, timezone.utc),
    )
    return QueueMessage(
        f"m-{request_id}", LLMRequest(request_id, payload, priority, TokenInfo(tokens)), attributes
    )


@pytest.mark.parametrize(
    ("weights", "custom", "cap"),
    [
        ((-0.1, 0, 0, 0, 0, 0), [], 20),
        ((float("nan"), 0, 0, 0, 0, 0), [], 20),
        (WEIGHTS, [-1.0], 20),
        (WEIGHTS, [], 0),
    ],
)
def test_bad_scoring_parameters(weights: tuple[float, ...], custom: list[float], cap: int) -> None:
    with pytest.raises(InvalidConfigError):
        ScoringParams(weights, custom, cap)  # type: ignore[arg-type]


def test_buffer_picks_the_best_admissible_and_hands_it_out_once() -> None:
    clock = ManualClock(110.0)
    buffer = CandidateBuffer(clock)
    buffer.insert(
        [
            leased("low", Priority.LOW, 100),
            leased("urgent", Priority.URGENT, 100),
            leased("big", Priority.URGENT, 5_000),
        ]
    )
    throttle = LLMThrottle(60, 1_000, clock=clock)
    params = ScoringParams(WEIGHTS, [], 20)
    picked = buffer.dispatch_native(throttle, params, None, 30.0, 0.0, True)
    assert picked is not None
    assert picked[0].payload.id == "urgent"  # "big" exceeds the budget
    assert len(picked[2]) == 6
    assert picked[1] == pytest.approx(sum(picked[2]))
    assert throttle.get_metrics().tpm.available == pytest.approx(900.0)
    assert sorted(m.payload.id for m in buffer.drain()) == ["big", "low"]
    assert len(buffer) == 0


def test_buffer_releases_cycles_through_its_messages() -> None:
    class Holder:
        pass

    holder = Holder()
    buffer = CandidateBuffer()
    holder.buffer = buffer  # type: ignore[attr-defined]
    buffer.insert([leased("a", Priority.NORMAL, 10, payload=holder)])
    ref = weakref.ref(holder)
    del holder, buffer
    gc.collect()
    assert ref() is None
