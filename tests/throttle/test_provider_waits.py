"""Waits a provider imposes on `LLMThrottle` (``penalize``, and the ``Retry-After`` that
``sync_from_headers`` reads) are clamped to `MAX_PROVIDER_WAIT`: an absurd figure never freezes
the limiter, is logged once per limiter (a reset that far too), and a NaN or negative wait is
refused. A reset holds no bucket down at all."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from llm_queue_dispatcher import InvalidRequestError, LLMThrottle, ManualClock, ProviderLimits, _core
from llm_queue_dispatcher.throttle import MAX_PROVIDER_WAIT
from tests.integer_like import IntLike

ABSURD = [1e308, math.inf, 10**400, MAX_PROVIDER_WAIT + 1, IntLike(10**400)]


def limiter(clock: ManualClock, logger: logging.Logger | None = None) -> LLMThrottle:
    return LLMThrottle(60, 10_000, clock=clock, logger=logger)


def test_the_maximum_is_one_day_and_the_same_constant_everywhere() -> None:
    assert MAX_PROVIDER_WAIT == _core.MAX_PROVIDER_WAIT == 86_400.0


@pytest.mark.parametrize("seconds", ABSURD, ids=repr)
def test_an_absurd_penalty_is_clamped_to_one_day_not_a_frozen_limiter(seconds: Any) -> None:
    clock = ManualClock()
    throttle = limiter(clock)
    throttle.penalize(seconds)
    check = throttle.can_process(10)
    assert (check.allowed, check.reason, check.available_in) == (False, "rpm_limit", MAX_PROVIDER_WAIT)
    clock.advance(MAX_PROVIDER_WAIT)
    assert throttle.consume("after", 10)


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "1e308"},
        {"retry-after": "99999999999"},
        {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
    ],
    ids=["retry-after-1e308", "retry-after-huge", "retry-after-year-9999"],
)
def test_a_retry_after_from_headers_is_clamped_to_one_day(headers: dict[str, str]) -> None:
    clock = ManualClock()
    throttle = limiter(clock)
    throttle.sync_from_headers(headers)
    wait = throttle.can_process(10).available_in
    assert MAX_PROVIDER_WAIT - 1.0 <= wait <= MAX_PROVIDER_WAIT
    clock.advance(wait)
    assert throttle.consume("after", 10)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "99999999999s"},
        {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59Z",
        },
    ],
    ids=["openai-reset", "anthropic-reset"],
)
def test_a_reset_far_in_the_future_holds_nothing_down(headers: dict[str, str]) -> None:
    clock = ManualClock()
    throttle = limiter(clock)
    throttle.sync_from_headers(headers)
    wait = throttle.can_process(10).available_in
    assert 0 < wait <= 1.0  # the emptied bucket refills at its own rate: a request a second
    clock.advance(wait)
    assert throttle.consume("after", 10)


def test_a_clamp_is_logged_once_per_limiter_through_its_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("my.app.limits")
    clock = ManualClock()
    first, second = limiter(clock, logger), limiter(clock, logger)
    with caplog.at_level(logging.WARNING, logger="my.app.limits"):
        first.penalize(1e308)
        first.penalize(math.inf)
        first.apply_provider_limits(ProviderLimits(tokens_remaining=0, tokens_reset=1e12, retry_after=1e12))
        first.penalize(60.0)  # within the maximum: nothing to say
        second.penalize(10**400)
    assert [(r.name, r.levelno) for r in caplog.records] == [("my.app.limits", logging.WARNING)] * 2
    assert "one day" in caplog.records[0].getMessage()
    assert "86400" in caplog.records[0].getMessage()


@pytest.mark.parametrize("seconds", [math.nan, -1, -0.5, -(10**400), -math.inf, "5", None, True])
def test_a_nan_negative_or_non_number_penalty_is_refused_and_changes_nothing(seconds: Any) -> None:
    throttle = limiter(ManualClock())
    with pytest.raises(InvalidRequestError, match=r"^seconds must be a number >= 0"):
        throttle.penalize(seconds)
    assert throttle.can_process(10).allowed
