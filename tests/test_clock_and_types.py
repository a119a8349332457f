"""ManualClock, the error hierarchy and the validating message types."""

from __future__ import annotations

import math

import pytest

import llm_queue_dispatcher as lqd
from llm_queue_dispatcher import (
    InvalidRequestError,
    LLMQueueDispatcherError,
    LLMRequest,
    ManualClock,
    Priority,
    TokenInfo,
)


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(start=5.0)
    assert clock.now() == 5.0
    assert clock.advance(2.5) == 7.5
    assert clock() == 7.5
    clock.set(10.0)
    assert clock.now() == 10.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_manual_clock_rejects_bad_advance_and_keeps_reading(bad: float) -> None:
    clock = ManualClock(start=1.0)
    with pytest.raises(InvalidRequestError):
        clock.advance(bad)
    assert clock.now() == 1.0


def test_manual_clock_never_goes_back() -> None:
    clock = ManualClock(start=3.0)
    with pytest.raises(InvalidRequestError):
        clock.set(2.0)
    assert clock.now() == 3.0


def test_errors_share_one_base_and_invalid_request_is_a_value_error() -> None:
    for name in [n for n in lqd.__all__ if n.endswith("Error")]:
        assert issubclass(getattr(lqd, name), LLMQueueDispatcherError)
    assert issubclass(InvalidRequestError, ValueError)


def test_rate_limit_error_carries_reason_and_wait() -> None:
    err = lqd.RateLimitError("tpm_limit", 1.5)
    assert (err.reason, err.available_in) == ("tpm_limit", 1.5)


def test_request_converts_int_priority() -> None:
    request = LLMRequest(id="a", payload=None, priority=1)  # type: ignore[arg-type]
    assert request.priority is Priority.HIGH


@pytest.mark.parametrize(
    "kwargs",
    [
        {"id": ""},
        {"id": 3},
        {"priority": 4},
        {"priority": -1},
        {"priority": True},
        {"expected_processing_time": -1.0},
        {"expected_processing_time": math.nan},
    ],
)
def test_request_rejects_bad_fields(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"id": "r1", "payload": None, **kwargs}
    with pytest.raises(InvalidRequestError):
        LLMRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, math.nan, math.inf, True, "3", None])
def test_token_info_rejects_bad_estimates(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        TokenInfo(bad)  # type: ignore[arg-type]


def test_token_info_accepts_integral_float() -> None:
    assert TokenInfo(12.0).estimated == 12  # type: ignore[arg-type]
