"""ManualClock, the error hierarchy and the validating message types."""

from __future__ import annotations

import dataclasses
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
from llm_queue_dispatcher.types import validate_token_count
from tests.integer_like import BrokenIndex, IntLike, int_likes


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


def test_an_estimate_alone_is_a_token_info_as_before() -> None:
    info = TokenInfo(1_200, 900, "gpt-4o")
    assert (info.estimated, info.actual, info.model, info.input, info.max_output) == (
        1_200,
        900,
        "gpt-4o",
        None,
        None,
    )
    assert info.parts is None
    assert info == TokenInfo(estimated=1_200, actual=900, model="gpt-4o")


def test_input_and_max_output_make_the_estimate() -> None:
    info = TokenInfo(input=1_000, max_output=200)
    assert (info.estimated, info.input, info.max_output, info.parts) == (1_200, 1_000, 200, (1_000, 200))
    assert TokenInfo(1_200, input=1_000, max_output=200) == info


def test_one_part_with_the_estimate_leaves_the_rest_to_the_other() -> None:
    assert TokenInfo(1_200, input=1_000).max_output == 200
    assert TokenInfo(1_200, max_output=1_200).input == 0
    assert TokenInfo(12.0, input=2).parts == (2, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, r"token_info.estimated is required unless both input and max_output are given"),
        ({"input": 100}, r"token_info.estimated is required unless both"),
        (
            {"estimated": 100, "input": 60, "max_output": 60},
            r"token_info.input \+ token_info.max_output must equal",
        ),
        ({"estimated": 100, "input": 101}, r"token_info.input must be at most token_info.estimated \(100\)"),
        ({"estimated": 100, "max_output": 101}, r"token_info.max_output must be at most"),
        ({"input": -1, "max_output": 5}, r"token_info.input must be >= 0"),
        ({"input": 5, "max_output": 1.5}, r"token_info.max_output"),
        ({"input": True, "max_output": 5}, r"token_info.input"),
        ({"estimated": 10, "input": "5"}, r"token_info.input"),
    ],
)
def test_parts_that_are_no_counts_or_do_not_add_up_are_refused(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        TokenInfo(**fields)  # type: ignore[arg-type]


def test_parts_changed_behind_the_constructor_are_refused_at_the_request() -> None:
    info = TokenInfo(input=10, max_output=5)
    object.__setattr__(info, "input", 11)
    with pytest.raises(InvalidRequestError, match=r"token_info.input \+ token_info.max_output must equal"):
        LLMRequest("a", None, token_info=info)
    object.__setattr__(info, "max_output", None)
    with pytest.raises(InvalidRequestError, match="both None or both set"):
        LLMRequest("a", None, token_info=info)


def test_replacing_a_part_needs_the_estimate_recomputed() -> None:
    info = TokenInfo(input=10, max_output=5)
    assert dataclasses.replace(info, actual=12).parts == (10, 5)
    assert dataclasses.replace(info, estimated=None, input=20).estimated == 25  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="must equal"):
        dataclasses.replace(info, input=20)


def test_manual_clock_refuses_to_advance_to_a_reading_that_is_not_finite() -> None:
    clock = ManualClock()
    assert clock.advance(1e308) == 1e308
    with pytest.raises(InvalidRequestError, match=r"^seconds = 1e308 would move the clock past .* unchanged"):
        clock.advance(1e308)
    assert clock.now() == 1e308
    assert clock.advance(0.0) == 1e308


@pytest.mark.parametrize("seconds", int_likes(), ids=lambda v: type(v).__name__)
def test_integer_like_objects_are_valid_clock_readings_and_steps(seconds: object) -> None:
    clock = ManualClock(seconds)  # type: ignore[arg-type]
    assert clock.advance(seconds) == 10.0  # type: ignore[arg-type]
    later = ManualClock()
    later.set(seconds)  # type: ignore[arg-type]
    assert later.now() == 5.0


@pytest.mark.parametrize("count", int_likes(), ids=lambda v: type(v).__name__)
def test_integer_like_objects_are_valid_token_counts(count: object) -> None:
    info = TokenInfo(count, actual=count)  # type: ignore[arg-type]
    assert (info.estimated, info.actual) == (5, 5)
    assert type(info.estimated) is int
    assert validate_token_count(count, "tokens") == 5
    throttle = lqd.LLMThrottle(60, 1_000, clock=ManualClock())
    assert throttle.can_process(count).allowed  # type: ignore[arg-type]
    assert throttle.consume("a", count)  # type: ignore[arg-type]
    throttle.adjust_consumption("a", count)  # type: ignore[arg-type]
    [record] = throttle.get_consumption_history()
    assert (record.estimated_tokens, record.actual_tokens) == (5, 5)


@pytest.mark.parametrize("bad", [IntLike(-1), object()], ids=["negative", "object"])
def test_integer_like_objects_follow_the_token_count_rules(bad: object) -> None:
    throttle = lqd.LLMThrottle(60, 1_000, clock=ManualClock())
    for call in (
        lambda: TokenInfo(bad),  # type: ignore[arg-type]
        lambda: throttle.consume("a", bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidRequestError, match="estimated"):
            call()
    assert throttle.get_consumption_history() == []


def test_an_index_that_raises_propagates_its_own_error() -> None:
    with pytest.raises(RuntimeError, match="not ours to hide"):
        TokenInfo(BrokenIndex())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not ours to hide"):
        lqd.LLMThrottle(60, 1_000).consume("a", BrokenIndex())  # type: ignore[arg-type]


@pytest.mark.parametrize("count", int_likes(), ids=lambda v: type(v).__name__)
async def test_integer_like_token_counts_go_through_a_dispatch_and_its_mark(count: object) -> None:
    clock = ManualClock(1_000.0)
    dispatcher = lqd.create_in_memory_queue(clock=clock)
    throttle = lqd.LLMThrottle(60, 1_000, clock=clock)
    await dispatcher.enqueue(LLMRequest("a", None, token_info=TokenInfo(count)))  # type: ignore[arg-type]
    job = await dispatcher.dequeue(throttle)
    assert job is not None
    await job.mark_as_processed(actual_tokens=count)  # type: ignore[arg-type]
    [record] = throttle.get_consumption_history()
    assert (record.estimated_tokens, record.actual_tokens) == (5, 5)
