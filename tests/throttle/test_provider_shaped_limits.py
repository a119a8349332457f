"""`LLMThrottle` with the limits providers publish besides RPM and TPM: input and output tokens per
minute, requests and tokens per day, requests in flight; a request's input and output parts at
reservation and at the mark; exact waits and the binding reason; metrics, snapshots and headers."""

from __future__ import annotations

import copy
import logging
import math
import pickle
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from llm_queue_dispatcher import (
    BucketMetrics,
    InvalidConfigError,
    InvalidRequestError,
    LLMThrottle,
    ManualClock,
    ProviderLimits,
    RateLimitError,
    RateLimitMetrics,
    UnknownRequestError,
    create_llm_throttle,
)

DAY = 86_400.0


def bucket(metrics: RateLimitMetrics, name: str) -> BucketMetrics:
    """The metrics of an optional limit the throttle has."""
    found: BucketMetrics | None = getattr(metrics, name)
    assert found is not None, name
    return found


def anthropic(clock: ManualClock, **options: Any) -> LLMThrottle:
    """Anthropic's shape: 1,000 tokens a second, 600 of them input and 300 output."""
    return LLMThrottle(600, 60_000, itpm=36_000, otpm=18_000, clock=clock, **options)


# ----- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"itpm": 0}, "itpm"),
        ({"itpm": math.nan}, "itpm"),
        ({"otpm": 0.5}, "otpm"),
        ({"itpm": 100, "burst_itpm": 50}, "burst_itpm"),
        ({"otpm": 0.5, "burst_otpm": 0.75}, "burst_otpm"),
        ({"burst_itpm": 10}, "burst_itpm"),
        ({"rpd": 0.5}, "rpd"),
        ({"tpd": -1}, "tpd"),
        ({"tpd": "1000"}, "tpd"),
        ({"rpd": True}, "rpd"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": 2.0}, "max_concurrent"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"max_concurrent": -3}, "max_concurrent"),
    ],
)
def test_a_limit_that_is_no_number_or_never_admits_a_request_is_refused_naming_it(
    options: dict[str, Any], named: str
) -> None:
    for make in (
        lambda: LLMThrottle(60, 1_000, **options),
        lambda: create_llm_throttle(rpm=60, tpm=1_000, **options),
    ):
        with pytest.raises(InvalidConfigError, match=rf"^{named} "):
            make()


def test_less_than_one_input_token_a_minute_is_allowed_when_the_bucket_holds_one() -> None:
    clock = ManualClock()
    throttle = LLMThrottle(60, 1_000, itpm=0.5, burst_itpm=1, clock=clock)
    assert throttle.consume("a", 1, input_tokens=1, output_tokens=0)
    assert throttle.can_process(1, input_tokens=1).available_in == pytest.approx(120.0)


def test_the_options_are_keyword_only_and_shown() -> None:
    throttle = LLMThrottle(60, 1_000, itpm=800, otpm=200, rpd=10_000, tpd=1e6, max_concurrent=4)
    shown = repr(throttle)
    for part in ("itpm=800", "otpm=200", "rpd=10000", "tpd=1000000", "max_concurrent=4", "in_flight=0"):
        assert part in shown
    assert "itpm" not in repr(LLMThrottle(60, 1_000))
    assert "max_concurrent=None" in (LLMThrottle.__text_signature__ or "")


# ----- a request's parts ---------------------------------------------------------------------------


def test_each_part_is_taken_from_its_own_limit() -> None:
    throttle = anthropic(ManualClock())
    assert throttle.consume("a", 20_000, input_tokens=15_000, output_tokens=5_000)
    metrics = throttle.get_metrics()
    assert (metrics.tpm.available, bucket(metrics, "itpm").available, bucket(metrics, "otpm").available) == (
        40_000,
        21_000,
        13_000,
    )
    [record] = throttle.get_consumption_history()
    assert (record.input_tokens, record.output_tokens) == (15_000, 5_000)


def test_one_part_leaves_the_rest_of_the_total_to_the_other() -> None:
    throttle = anthropic(ManualClock())
    assert throttle.consume("a", 1_000, output_tokens=300)
    [record] = throttle.get_consumption_history()
    assert (record.input_tokens, record.output_tokens) == (700, 300)


def test_without_its_parts_an_estimate_counts_whole_against_each_part_limit() -> None:
    throttle = anthropic(ManualClock())
    assert throttle.consume("a", 10_000)
    metrics = throttle.get_metrics()
    assert (bucket(metrics, "itpm").available, bucket(metrics, "otpm").available) == (26_000, 8_000)
    assert throttle.can_process(9_000).reason == "otpm_limit"
    assert throttle.can_process(9_000, input_tokens=9_000, output_tokens=0).allowed
    # No estimate above the smallest token capacity can ever fit without its parts.
    assert throttle.token_capacity == 18_000
    assert throttle.can_process(18_001).available_in == math.inf
    assert throttle.can_process(18_001, input_tokens=18_001).available_in < math.inf


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            {"input_tokens": 600, "output_tokens": 500},
            r"input_tokens \+ output_tokens must equal estimated_tokens",
        ),
        ({"input_tokens": 1_001}, r"input_tokens must be at most estimated_tokens \(1000\)"),
        ({"output_tokens": 1_001}, r"output_tokens must be at most estimated_tokens"),
        ({"input_tokens": -1}, "input_tokens must be >= 0"),
        ({"output_tokens": True}, "output_tokens"),
        ({"input_tokens": "5"}, "input_tokens"),
        ({"input_tokens": 1.5}, "input_tokens"),
    ],
)
def test_bad_parts_are_refused_and_change_nothing(parts: dict[str, Any], message: str) -> None:
    throttle = anthropic(ManualClock())
    assert throttle.consume("held", 10)
    before = throttle.get_metrics().to_dict()
    with pytest.raises(InvalidRequestError, match=message):
        throttle.consume("a", 1_000, **parts)
    with pytest.raises(InvalidRequestError, match=message):
        throttle.consume_or_raise("a", 1_000, **parts)
    with pytest.raises(InvalidRequestError, match=message):
        throttle.can_process(1_000, **parts)
    with pytest.raises(InvalidRequestError, match=message.replace("estimated_tokens", "actual_tokens")):
        throttle.adjust_consumption("held", 1_000, **parts)
    assert throttle.get_metrics().to_dict() == before
    assert [r.request_id for r in throttle.get_consumption_history()] == ["held"]


def test_the_mark_moves_each_limit_to_its_actual_part() -> None:
    throttle = anthropic(ManualClock())
    assert throttle.consume("a", 6_000, input_tokens=2_000, output_tokens=4_000)
    throttle.adjust_consumption("a", 3_000, input_tokens=2_500, output_tokens=500)
    metrics = throttle.get_metrics()
    assert (metrics.tpm.available, bucket(metrics, "itpm").available, bucket(metrics, "otpm").available) == (
        57_000,
        33_500,
        17_500,
    )
    [record] = throttle.get_consumption_history()
    assert (record.actual_tokens, record.input_tokens, record.output_tokens) == (3_000, 2_500, 500)


def test_a_mark_without_parts_counts_it_all_as_input_and_as_output_up_to_what_was_reserved() -> None:
    throttle = anthropic(ManualClock())
    assert throttle.consume("a", 6_000, input_tokens=5_000, output_tokens=1_000)
    throttle.adjust_consumption("a", 5_500)
    metrics = throttle.get_metrics()
    assert (bucket(metrics, "itpm").available, bucket(metrics, "otpm").available) == (
        36_000 - 5_500,
        18_000 - 1_000,
    )
    [record] = throttle.get_consumption_history()
    assert (record.input_tokens, record.output_tokens) == (None, None)  # the split is not known


def test_strict_refuses_when_any_limit_is_short_and_names_it() -> None:
    throttle = anthropic(ManualClock(), adjustment_failure_strategy="strict")
    assert throttle.consume("a", 17_000, input_tokens=1_000, output_tokens=16_000)
    before = throttle.get_metrics().to_dict()
    with pytest.raises(RateLimitError) as raised:
        throttle.adjust_consumption("a", 20_000, input_tokens=1_000, output_tokens=19_000)
    assert raised.value.reason == "otpm_limit"
    assert raised.value.available_in == pytest.approx(1_000 / 300)
    assert throttle.get_metrics().to_dict() == before


def test_warn_and_compensate_apply_to_each_limit(caplog: pytest.LogCaptureFixture) -> None:
    warn = anthropic(ManualClock(), adjustment_failure_strategy="warn")
    assert warn.consume("a", 18_000, input_tokens=0, output_tokens=18_000)
    with caplog.at_level(logging.INFO, logger="llm_queue_dispatcher"):
        warn.adjust_consumption("a", 19_000, input_tokens=0, output_tokens=19_000)
    assert "the otpm bucket is empty" in caplog.text
    clock = ManualClock()
    compensate = anthropic(clock)
    assert compensate.consume("a", 18_000, input_tokens=0, output_tokens=18_000)
    compensate.adjust_consumption("a", 20_000, input_tokens=0, output_tokens=20_000)
    debts = compensate.get_metrics().compensation
    assert (debts.total_debt, debts.debts) == (0.0, {"tpm": 0.0, "itpm": 0.0, "otpm": 2_000.0})
    clock.advance(60)
    assert compensate.consume("b", 1_000, input_tokens=500, output_tokens=500)  # pays the 2,000 owed
    metrics = compensate.get_metrics()
    assert bucket(metrics, "otpm").available == 18_000 - 2_500
    assert metrics.compensation.debts["otpm"] == 0.0


# ----- waits and reasons ---------------------------------------------------------------------------


def test_available_in_is_exact_over_every_limit_and_the_reason_names_the_binding_one() -> None:
    clock = ManualClock()
    throttle = LLMThrottle(60, 60_000, itpm=600, otpm=600, clock=clock)
    assert throttle.consume("a", 600)
    for n in range(59):
        assert throttle.consume(f"x{n}", 0)
    # A request frees in 1 s, 100 input tokens in 10 s: the input limit binds.
    check = throttle.can_process(100, input_tokens=100, output_tokens=0)
    assert (check.allowed, check.reason, check.available_in) == (False, "itpm_limit", 10.0)
    assert check.available_tokens == {"rpm": 0.0, "tpm": 59_400.0, "itpm": 0.0, "otpm": 0.0}
    # Input and output equally short: the first in the order rpm, tpm, itpm, otpm, rpd, tpd.
    assert throttle.can_process(200, input_tokens=100, output_tokens=100).reason == "itpm_limit"
    with pytest.raises(RateLimitError) as raised:
        throttle.consume_or_raise("b", 100, input_tokens=0, output_tokens=100)
    assert (raised.value.reason, raised.value.available_in) == ("otpm_limit", 10.0)
    clock.advance(10.0)
    assert throttle.consume("b", 100, input_tokens=0, output_tokens=100)


def test_the_request_bucket_is_named_when_its_wait_binds() -> None:
    # An rpm/tpm throttle answers as it always did when the request bucket binds.
    throttle = LLMThrottle(1, 1_000, clock=ManualClock())
    assert throttle.consume("a", 900)
    check = throttle.can_process(500)
    assert check.reason == "rpm_limit"
    assert check.available_in == pytest.approx(60.0)
    assert check.available_tokens == {"rpm": 0.0, "tpm": 100.0}


def test_the_token_bucket_is_named_when_its_wait_binds_though_a_request_is_short_too() -> None:
    throttle = LLMThrottle(60, 1_000, clock=ManualClock())
    for n in range(60):
        assert throttle.consume(f"r{n}", 15)
    check = throttle.can_process(500)  # a request in 1 s, 400 tokens in 24 s
    assert check.reason == "tpm_limit"
    assert check.available_in == pytest.approx(24.0)


def test_daily_limits_refill_over_a_day() -> None:
    clock = ManualClock()
    throttle = LLMThrottle(600, 60_000, rpd=2, tpd=DAY, clock=clock)
    assert throttle.consume("a", 50_000)
    assert throttle.consume("b", 10)
    check = throttle.can_process(10)
    assert check.reason == "rpd_limit"
    assert check.available_in == pytest.approx(DAY / 2)
    clock.advance(30.0)
    throttle.release("b")  # gives back a request of the day and 10 tokens
    check = throttle.can_process(36_440)  # 36,430 tokens of the day left, one a second coming back
    assert check.reason == "tpd_limit"
    assert check.available_in == pytest.approx(10.0)
    metrics = throttle.get_metrics()
    assert metrics.rpd is not None
    assert bucket(metrics, "rpd").limit == 2
    assert metrics.tpd is not None
    assert bucket(metrics, "tpd").used == pytest.approx(50_000 - 30)


def test_a_reservation_holds_a_slot_until_it_is_settled_released_or_forgotten() -> None:
    clock = ManualClock()
    throttle = LLMThrottle(600, 60_000, max_concurrent=2, history_retention=60.0, clock=clock)
    assert throttle.consume("a", 10)
    clock.advance(5.0)
    assert throttle.consume("b", 10)
    check = throttle.can_process(1)
    # No slot frees by itself before the oldest reservation is forgotten, 60 s after it was made.
    assert (check.allowed, check.reason) == (False, "concurrency_limit")
    assert check.available_in == pytest.approx(55.0)
    assert check.available_tokens["concurrency"] == 0
    assert not throttle.consume("c", 10)
    throttle.adjust_consumption("b", 12)  # settled: its slot is free
    assert bucket(throttle.get_metrics(), "concurrency").used == 1
    throttle.settle("b")  # a settle after it frees nothing more
    assert bucket(throttle.get_metrics(), "concurrency").used == 1
    assert throttle.consume("c", 10)
    throttle.release("c")  # released: its slot is free too
    assert throttle.consume("d", 10)
    clock.advance(55.0)  # "a", never settled, is forgotten and frees its slot
    assert throttle.can_process(1).allowed
    assert throttle.validate_state()


def test_a_call_that_ended_without_a_count_is_settled_its_tokens_kept() -> None:
    throttle = LLMThrottle(600, 60_000, max_concurrent=1, clock=ManualClock())
    assert throttle.consume("a", 1_000)
    assert not throttle.consume("b", 10)
    throttle.settle("a")
    metrics = throttle.get_metrics()
    assert (bucket(metrics, "concurrency").used, metrics.tpm.available) == (0, 59_000)
    [record] = throttle.get_consumption_history()
    assert (record.tokens, record.actual_tokens) == (1_000, None)  # no measurement, no miss
    assert throttle.consume("b", 10)
    with pytest.raises(UnknownRequestError):
        throttle.settle("nobody")
    with pytest.raises(InvalidRequestError):
        throttle.settle("  ")


# ----- metrics and snapshots -----------------------------------------------------------------------


def test_metrics_report_each_configured_limit() -> None:
    throttle = LLMThrottle(
        60, 1_000, itpm=800, otpm=200, rpd=100, tpd=5_000, max_concurrent=4, clock=ManualClock()
    )
    assert throttle.consume("a", 300, input_tokens=200, output_tokens=100)
    metrics = throttle.get_metrics()
    assert bucket(metrics, "itpm").to_dict() == {
        "used": 200.0,
        "available": 600.0,
        "limit": 800.0,
        "percentage": 25.0,
    }
    assert bucket(metrics, "otpm").used == 100
    assert (bucket(metrics, "rpd").used, bucket(metrics, "tpd").used) == (1, 300)
    assert bucket(metrics, "concurrency").to_dict() == {
        "used": 1.0,
        "available": 3.0,
        "limit": 4.0,
        "percentage": 25.0,
    }
    as_dict = metrics.to_dict()
    assert {"itpm", "otpm", "rpd", "tpd", "concurrency"} <= as_dict.keys()
    plain = LLMThrottle(60, 1_000).get_metrics()
    assert (plain.itpm, plain.otpm, plain.rpd, plain.tpd, plain.concurrency) == (None,) * 5
    assert plain.to_dict().keys() == {
        "rpm",
        "tpm",
        "efficiency",
        "consumption_history",
        "memory",
        "compensation",
    }
    assert plain.compensation.debts == {"tpm": 0.0}


def test_a_snapshot_carries_every_bucket_and_debt_and_must_match_the_limits() -> None:
    clock = ManualClock()
    throttle = LLMThrottle(60, 60_000, otpm=18_000, rpd=100, clock=clock)
    assert throttle.consume("a", 18_000, input_tokens=0, output_tokens=18_000)
    throttle.adjust_consumption("a", 19_000, input_tokens=0, output_tokens=19_000)
    snapshot = throttle.create_snapshot()
    assert snapshot.otpm_bucket_state is not None
    assert snapshot.itpm_bucket_state is None
    assert snapshot.compensation_debts == {"otpm": 1_000.0}
    again = LLMThrottle(60, 60_000, otpm=18_000, rpd=100, clock=ManualClock(500.0))
    again.restore_from_snapshot(snapshot)
    metrics = again.get_metrics()
    assert (bucket(metrics, "otpm").available, bucket(metrics, "rpd").available) == (0.0, 99.0)
    assert metrics.compensation.debts["otpm"] == 1_000.0
    with pytest.raises(InvalidRequestError, match="otpm"):
        LLMThrottle(60, 60_000).restore_from_snapshot(snapshot)
    with pytest.raises(InvalidRequestError, match="compensation_debts"):
        type(snapshot)(
            0, snapshot.rpm_bucket_state, snapshot.tpm_bucket_state, 0, 0, compensation_debts={"rpm": 1}
        )


def test_a_snapshot_survives_pickling_and_copying_whole() -> None:
    # A backup is for another process or a later start: it must travel (pickle, a copy).
    clock = ManualClock()
    throttle = LLMThrottle(60, 60_000, itpm=40_000, otpm=18_000, rpd=100, tpd=1_000_000, clock=clock)
    assert throttle.consume("a", 18_000, input_tokens=0, output_tokens=18_000)
    throttle.adjust_consumption("a", 19_000, input_tokens=0, output_tokens=19_000)
    snapshot = throttle.create_snapshot()
    for travelled in (pickle.loads(pickle.dumps(snapshot)), copy.deepcopy(snapshot), copy.copy(snapshot)):
        assert travelled == snapshot
        assert type(travelled) is type(snapshot)
        again = LLMThrottle(
            60, 60_000, itpm=40_000, otpm=18_000, rpd=100, tpd=1_000_000, clock=ManualClock(9.0)
        )
        again.restore_from_snapshot(travelled)
        assert again.get_metrics().compensation.debts == throttle.get_metrics().compensation.debts
    bare = LLMThrottle(60, 1_000, clock=clock).create_snapshot()
    assert pickle.loads(pickle.dumps(bare)) == bare
    assert pickle.loads(pickle.dumps(bare.rpm_bucket_state)) == bare.rpm_bucket_state


# ----- provider headers ----------------------------------------------------------------------------


def _instant(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds_from_now, timezone.utc).isoformat()


def test_anthropic_input_and_output_headers_lower_their_limits() -> None:
    clock = ManualClock()
    throttle = anthropic(clock)
    read = throttle.sync_from_headers(
        {
            "anthropic-ratelimit-input-tokens-remaining": "30000",
            "anthropic-ratelimit-input-tokens-reset": _instant(30),
            "anthropic-ratelimit-output-tokens-remaining": "1000",
            "anthropic-ratelimit-output-tokens-reset": _instant(10),
            "anthropic-ratelimit-tokens-remaining": "31000",
            "anthropic-ratelimit-tokens-reset": _instant(30),
        }
    )
    assert (read.input_tokens_remaining, read.output_tokens_remaining) == (30_000, 1_000)
    metrics = throttle.get_metrics()
    assert (bucket(metrics, "itpm").available, bucket(metrics, "otpm").available) == (30_000, 1_000)
    assert metrics.tpm.available == 31_000  # the combined figure: input and output together


def test_a_header_lowers_a_part_limit_and_refill_raises_it_again_never_above_its_capacity() -> None:
    clock = ManualClock()
    throttle = anthropic(clock)
    throttle.apply_provider_limits(ProviderLimits(output_tokens_remaining=1_000, output_tokens_reset=60.0))
    assert throttle.consume("a", 600, input_tokens=0, output_tokens=600)
    # A minute before the provider's reset, it refills at its own rate from 400, 300 a second.
    clock.advance(2.0)
    assert bucket(throttle.get_metrics(), "otpm").available == pytest.approx(400 + 2 * 300)
    assert throttle.can_process(1_600, input_tokens=0, output_tokens=1_600).available_in == pytest.approx(2.0)
    # A later figure above what it holds does not raise it.
    throttle.apply_provider_limits(ProviderLimits(output_tokens_remaining=17_000, output_tokens_reset=30.0))
    assert bucket(throttle.get_metrics(), "otpm").available == pytest.approx(1_000)
    clock.advance(600.0)  # never above the configured limit
    assert bucket(throttle.get_metrics(), "otpm").available == 18_000
    # Figures for limits this throttle does not keep are ignored.
    plain = LLMThrottle(60, 1_000, clock=clock)
    plain.apply_provider_limits(ProviderLimits(input_tokens_remaining=5, output_tokens_remaining=5))
    assert plain.get_metrics().tpm.available == 1_000
