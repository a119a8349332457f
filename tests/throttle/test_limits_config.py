"""`LLMThrottle` configuration: a limit that can never admit one request is refused where it is
made, counts too large for the core are typed errors, and the default strategy is "compensate"."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pytest

from llm_queue_dispatcher import InvalidConfigError, LLMThrottle, ManualClock, create_llm_throttle
from tests.integer_like import int_likes


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((0.5, 1_000), {}, "rpm"),
        ((60, 0.5), {}, "tpm"),
        ((0.25, 1_000), {"burst_rpm": 0.5}, "burst_rpm"),
        ((60, 0.25), {"burst_tpm": 0.75}, "burst_tpm"),
    ],
)
def test_a_bucket_that_can_never_hold_one_request_or_token_is_refused_naming_it(
    args: tuple[float, float], kwargs: dict[str, Any], named: str
) -> None:
    for make in (
        lambda: LLMThrottle(*args, **kwargs),
        lambda: create_llm_throttle(rpm=args[0], tpm=args[1], **kwargs),
    ):
        with pytest.raises(InvalidConfigError, match=rf"^{named} must be >= 1: .*never admits a request"):
            make()


def test_less_than_one_request_a_minute_is_allowed_when_the_bucket_holds_one() -> None:
    clock = ManualClock()
    throttle = LLMThrottle(0.5, 1, burst_rpm=1, clock=clock)
    assert throttle.consume("a", 1)
    assert throttle.can_process(1).available_in == pytest.approx(120.0)  # one request every 2 min
    clock.advance(120.0)
    assert throttle.consume("b", 1)


@pytest.mark.parametrize("field", ["max_history_records", "efficiency_window_size"])
@pytest.mark.parametrize("value", [10**30, 2**64])
def test_a_count_too_large_for_the_core_is_an_invalid_config_error_naming_it(field: str, value: int) -> None:
    with pytest.raises(InvalidConfigError, match=rf"^{field} must be an int from 1 to \d+, got {value}$"):
        LLMThrottle(60, 1_000, **{field: value})  # type: ignore[arg-type]


def test_the_default_strategy_is_compensate_everywhere() -> None:
    assert "compensate" in repr(LLMThrottle(60, 1_000))
    assert "compensate" in repr(create_llm_throttle(rpm=60, tpm=1_000))
    assert (
        inspect.signature(create_llm_throttle).parameters["adjustment_failure_strategy"].default
        == "compensate"
    )
    assert "adjustment_failure_strategy='compensate'" in (LLMThrottle.__text_signature__ or "")


def test_warn_stays_available_by_name(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LLMThrottle(60, 1_000, clock=ManualClock(), adjustment_failure_strategy="warn")
    assert "'warn'" in repr(throttle)
    assert throttle.consume("a", 1_000)
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        throttle.adjust_consumption("a", 1_200)
    assert throttle.get_metrics().compensation.total_debt == 0  # forgiven, and said so
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


@pytest.mark.parametrize("number", int_likes(60), ids=lambda v: type(v).__name__)
def test_integer_like_numbers_are_valid_limits_durations_and_counts(number: object) -> None:
    clock = ManualClock()
    throttle = LLMThrottle(
        number,  # type: ignore[arg-type]
        number,  # type: ignore[arg-type]
        burst_rpm=number,  # type: ignore[arg-type]
        burst_tpm=number,  # type: ignore[arg-type]
        history_retention=number,  # type: ignore[arg-type]
        max_history_records=number,  # type: ignore[arg-type]
        clock=clock,
    )
    assert (throttle.get_metrics().rpm.limit, throttle.token_capacity) == (60, 60.0)
    throttle.penalize(number)  # type: ignore[arg-type]
    assert throttle.can_process(1).available_in == 60.0
