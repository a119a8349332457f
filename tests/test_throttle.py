"""LLMThrottle over the whole contract: buckets, consume, adjust strategies, history, metrics,
snapshots, bad input, and the window property (hypothesis)."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import pickle
import threading
import weakref
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    BucketState,
    InvalidConfigError,
    InvalidRequestError,
    LLMThrottle,
    ManualClock,
    RateLimiter,
    RateLimitError,
    StateSnapshot,
    UnknownRequestError,
    create_llm_throttle,
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(100.0)


def make(clock: ManualClock, rpm: float = 60, tpm: float = 1_000, **kwargs: object) -> LLMThrottle:
    return LLMThrottle(rpm, tpm, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_buckets_start_full_and_refill_at_rate_per_second(clock: ManualClock) -> None:
    throttle = make(clock)
    metrics = throttle.get_metrics()
    assert (metrics.rpm.available, metrics.rpm.limit) == (60, 60)
    assert (metrics.tpm.available, metrics.tpm.limit) == (1_000, 1_000)
    assert throttle.consume("a", 1_000)
    assert throttle.get_metrics().tpm.available == 0
    clock.advance(3.0)  # 1000 / 60 tokens per second
    assert throttle.get_metrics().tpm.available == pytest.approx(50.0)
    assert throttle.get_metrics().rpm.available == pytest.approx(60.0)  # capped at capacity


def test_burst_sets_capacity_and_rate_stays(clock: ManualClock) -> None:
    throttle = make(clock, rpm=60, tpm=1_000, burst_rpm=120, burst_tpm=3_000)
    metrics = throttle.get_metrics()
    assert (metrics.rpm.limit, metrics.tpm.limit) == (120, 3_000)
    assert throttle.consume("a", 3_000)
    clock.advance(6.0)
    assert throttle.get_metrics().tpm.available == pytest.approx(100.0)


def test_consume_is_all_or_nothing(clock: ManualClock) -> None:
    throttle = make(clock, rpm=2, tpm=1_000)
    assert throttle.consume("a", 600)
    before = throttle.get_metrics()
    assert not throttle.consume("b", 600)  # tokens short: nothing taken, not even the request
    after = throttle.get_metrics()
    assert (after.rpm.available, after.tpm.available) == (before.rpm.available, before.tpm.available)
    assert [r.request_id for r in throttle.get_consumption_history()] == ["a"]
    assert throttle.consume("c", 100)
    assert not throttle.consume("d", 1)  # requests short now
    assert throttle.get_metrics().tpm.available == pytest.approx(300.0)


def test_can_process_reports_exact_wait_reason_and_infinity(clock: ManualClock) -> None:
    throttle = make(clock, rpm=60, tpm=1_200)
    assert throttle.consume("a", 1_000)
    check = throttle.can_process(500)
    assert not check.allowed
    assert check.reason == "tpm_limit"
    assert check.available_in == pytest.approx(15.0)  # 300 short at 20 tokens/s
    assert check.available_tokens == {"rpm": pytest.approx(59.0), "tpm": pytest.approx(200.0)}
    clock.advance(check.available_in)
    assert throttle.can_process(500).allowed
    assert throttle.can_process(500).available_in == 0
    never = throttle.can_process(1_201)
    assert not never.allowed
    assert math.isinf(never.available_in)
    assert throttle.can_process(1_200).available_in < math.inf


def test_wait_covers_both_buckets(clock: ManualClock) -> None:
    throttle = make(clock, rpm=1, tpm=1_000)
    assert throttle.consume("a", 900)
    check = throttle.can_process(500)
    assert check.reason == "rpm_limit"
    assert check.available_in == pytest.approx(60.0)  # the longer of 60 s (request) and 24 s (tokens)


def test_a_clock_set_back_does_not_stop_refills_or_penalties_until_it_catches_up() -> None:
    """A plain callable clock that steps back (a wall clock set back half a day): the limiter
    counts on from its last reading. Before, nothing refilled and no penalty ran out until the
    clock came back to its old reading, while ``available_in`` kept saying 30 s."""
    now = [100_000.0]
    throttle = LLMThrottle(60, 10_000, clock=lambda: now[0])
    assert throttle.consume("a", 10_000)
    throttle.penalize(10.0)
    now[0] = 50_000.0
    check = throttle.can_process(5_000)
    assert check.available_in == pytest.approx(30.0)  # 5,000 tokens at 10,000 / 60 a second
    now[0] = 50_010.0
    assert throttle.can_process(1).allowed  # the penalty ran out
    assert throttle.can_process(5_000).available_in == pytest.approx(20.0)
    now[0] = 50_000.0 + check.available_in
    assert throttle.can_process(5_000).allowed
    assert throttle.consume("b", 5_000)
    # A reading a moment behind the last (another thread's earlier one) refills nothing twice.
    now[0] = 50_030.0 - 0.5
    assert throttle.get_metrics().tpm.available == pytest.approx(0.0, abs=1e-6)
    now[0] = 50_031.0
    assert throttle.get_metrics().tpm.available == pytest.approx(10_000 / 60, rel=1e-9)


def test_consume_or_raise(clock: ManualClock) -> None:
    throttle = make(clock, tpm=1_000)
    throttle.consume_or_raise("a", 900)
    with pytest.raises(RateLimitError) as info:
        throttle.consume_or_raise("b", 400)
    assert info.value.reason == "tpm_limit"
    assert info.value.available_in == pytest.approx(18.0)
    restored = pickle.loads(pickle.dumps(info.value))
    assert (restored.reason, restored.available_in) == ("tpm_limit", info.value.available_in)
    with pytest.raises(RateLimitError) as never:
        throttle.consume_or_raise("c", 5_000)
    assert math.isinf(never.value.available_in)


def test_adjust_takes_extra_and_refunds(clock: ManualClock) -> None:
    throttle = make(clock)
    assert throttle.consume("a", 500)
    throttle.adjust_consumption("a", 300)
    assert throttle.get_metrics().tpm.available == pytest.approx(700.0)
    throttle.adjust_consumption("a", 650)
    assert throttle.get_metrics().tpm.available == pytest.approx(350.0)
    record = throttle.get_consumption_history()[0]
    assert (record.tokens, record.estimated_tokens, record.actual_tokens) == (650, 500, 650)


def test_adjust_unknown_or_expired_request(clock: ManualClock) -> None:
    throttle = make(clock, history_retention=10.0)
    with pytest.raises(UnknownRequestError):
        throttle.adjust_consumption("never", 10)
    assert throttle.consume("a", 100)
    clock.advance(10.0)
    with pytest.raises(UnknownRequestError):
        throttle.adjust_consumption("a", 50)
    assert throttle.get_consumption_history() == []


def test_strict_strategy_raises_and_takes_nothing(clock: ManualClock) -> None:
    throttle = make(clock, adjustment_failure_strategy="strict")
    assert throttle.consume("a", 900)
    with pytest.raises(RateLimitError) as info:
        throttle.adjust_consumption("a", 1_300)
    assert info.value.reason == "tpm_limit"
    assert throttle.get_metrics().tpm.available == pytest.approx(100.0)
    assert throttle.get_consumption_history()[0].tokens == 900


def test_warn_strategy_empties_and_logs(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    throttle = make(clock, adjustment_failure_strategy="warn")
    assert throttle.consume("a", 900)
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        throttle.adjust_consumption("a", 1_300)
    assert throttle.get_metrics().tpm.available == 0
    assert throttle.get_metrics().compensation.total_debt == 0
    assert any("'a'" in r.getMessage() or '"a"' in r.getMessage() for r in caplog.records)


def test_custom_logger_receives_the_warning(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("my.app.throttle")
    throttle = make(clock, logger=logger, adjustment_failure_strategy="warn")
    assert throttle.consume("a", 1_000)
    with caplog.at_level(logging.WARNING, logger="my.app.throttle"):
        throttle.adjust_consumption("a", 1_100)
    assert [r.name for r in caplog.records] == ["my.app.throttle"]


def test_compensate_strategy_carries_debt_into_next_consume(clock: ManualClock) -> None:
    throttle = make(clock, adjustment_failure_strategy="compensate")
    assert throttle.consume("a", 900)
    throttle.adjust_consumption("a", 1_300)  # 100 taken, 300 owed
    metrics = throttle.get_metrics()
    assert metrics.tpm.available == 0
    assert metrics.compensation.total_debt == pytest.approx(300.0)
    assert metrics.compensation.pending_compensation == pytest.approx(300.0)
    clock.advance(30.0)  # 500 tokens back
    # can_process counts the debt: 300 + 300 > 500
    assert not throttle.can_process(300).allowed
    assert not throttle.consume("b", 300)
    assert throttle.can_process(200).allowed
    assert throttle.consume("b", 200)
    assert throttle.get_metrics().compensation.total_debt == 0
    assert throttle.get_metrics().tpm.available == pytest.approx(0.0)
    assert throttle.get_consumption_history()[-1].compensation_debt == pytest.approx(300.0)


def test_a_debt_is_at_most_one_full_bucket_and_never_blocks_forever(clock: ManualClock) -> None:
    throttle = make(clock, adjustment_failure_strategy="compensate")
    assert throttle.consume("a", 1_000)
    throttle.adjust_consumption("a", 3_500)  # 2,500 short: one full bucket owed
    assert throttle.get_metrics().compensation.total_debt == pytest.approx(1_000.0)
    check = throttle.can_process(10)
    assert check.available_in == pytest.approx(60.0)
    clock.advance(check.available_in)
    assert throttle.consume("b", 10)  # a full bucket pays what it can; the rest carries over
    assert throttle.get_metrics().compensation.total_debt == pytest.approx(10.0)


def test_a_huge_actual_count_holds_the_limiter_back_one_window_at_most(clock: ManualClock) -> None:
    throttle = make(clock, adjustment_failure_strategy="compensate")
    assert throttle.consume("a", 100)
    throttle.adjust_consumption("a", 2**64 - 1)
    assert throttle.get_metrics().compensation.total_debt == pytest.approx(1_000.0)
    assert throttle.can_process(100).available_in == pytest.approx(60.0)
    clock.advance(60.0)
    assert throttle.consume("b", 100)
    clock.advance(60.0)
    assert throttle.consume("c", 100)
    assert throttle.get_metrics().compensation.total_debt == 0
    assert throttle.validate_state()


def test_consume_keeps_any_mapping_as_metadata_and_refuses_anything_else(clock: ManualClock) -> None:
    throttle = make(clock)
    assert throttle.consume("a", 10, MappingProxyType({"k": 1}))
    assert throttle.get_consumption_history()[0].metadata == {"k": 1}
    with pytest.raises(InvalidRequestError, match="metadata must be None or a mapping, got 5"):
        throttle.consume("b", 10, 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="metadata"):
        throttle.consume_or_raise("b", 10, ["k"])  # type: ignore[arg-type]
    assert [r.request_id for r in throttle.get_consumption_history()] == ["a"]


def test_history_is_capped_at_max_records(clock: ManualClock) -> None:
    throttle = make(clock, rpm=1e6, tpm=1e9, max_history_records=3)
    for i in range(5):
        assert throttle.consume(f"r{i}", 10, {"i": i})
    history = throttle.get_consumption_history()
    assert [r.request_id for r in history] == ["r2", "r3", "r4"]
    assert history[0].metadata == {"i": 2}
    memory = throttle.get_metrics().memory
    assert (memory.history_records, memory.max_history_records) == (3, 3)
    assert memory.estimated_memory_usage == 600


def test_redelivered_request_adjusts_its_latest_consume(clock: ManualClock) -> None:
    throttle = make(clock, rpm=1e6, tpm=1e6)
    assert throttle.consume("a", 100)
    assert throttle.consume("a", 200)
    throttle.adjust_consumption("a", 0)
    assert [r.tokens for r in throttle.get_consumption_history()] == [100, 0]


def test_metrics_efficiency_and_accuracy_follow_the_seed(clock: ManualClock) -> None:
    throttle = make(clock, rpm=1e6, tpm=1e6, efficiency_window_size=2)
    metrics = throttle.get_metrics()
    assert metrics.efficiency == 1.0
    assert metrics.consumption_history.estimation_accuracy == 1.0
    assert throttle.consume("a", 100)
    assert throttle.get_metrics().efficiency == 0.85  # records, none adjusted yet
    throttle.adjust_consumption("a", 50)  # accuracy 0.5
    assert throttle.consume("b", 100)
    throttle.adjust_consumption("b", 100)  # accuracy 1.0
    assert throttle.consume("c", 0)
    throttle.adjust_consumption("c", 10)  # nothing estimated for a call that used tokens: a miss
    metrics = throttle.get_metrics()
    assert metrics.efficiency == pytest.approx((1.0 + 0.0) / 2)  # window of the last two
    stats = metrics.consumption_history
    assert stats.count == 3
    assert stats.total_tokens == 160
    assert stats.average_tokens_per_request == pytest.approx(160 / 3)
    # One formula for both metrics (they used to disagree on a 0 estimate).
    assert stats.estimation_accuracy == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert metrics.tpm.used == pytest.approx(160.0)
    assert metrics.tpm.percentage == pytest.approx(0.016)
    as_dict = metrics.to_dict()
    assert as_dict["tpm"]["used"] == pytest.approx(160.0)
    assert as_dict["consumption_history"]["count"] == 3


def test_reset_restores_everything(clock: ManualClock) -> None:
    throttle = make(clock, adjustment_failure_strategy="compensate")
    assert throttle.consume("a", 1_000)
    throttle.adjust_consumption("a", 1_500)
    throttle.reset()
    metrics = throttle.get_metrics()
    assert (metrics.tpm.available, metrics.rpm.available, metrics.compensation.total_debt) == (1_000, 60, 0)
    assert throttle.get_consumption_history() == []
    assert throttle.validate_state()


def test_snapshot_round_trip_and_bad_snapshots_change_nothing(clock: ManualClock) -> None:
    throttle = make(clock)
    assert throttle.consume("a", 400)
    snapshot = throttle.create_snapshot()
    assert snapshot.timestamp == 100.0
    assert snapshot.tpm_bucket_state == BucketState(600.0, 1_000.0, 100.0)
    assert snapshot.history_count == 1
    other = make(clock)
    other.restore_from_snapshot(snapshot)
    assert other.get_metrics().tpm.available == pytest.approx(600.0)
    assert other.get_consumption_history() == []
    rebuilt = StateSnapshot(
        snapshot.timestamp, snapshot.rpm_bucket_state, BucketState(5_000.0, 1_000.0, 100.0), 0, 0.0
    )
    with pytest.raises(InvalidRequestError):
        other.restore_from_snapshot(rebuilt)
    mismatched = StateSnapshot(100.0, BucketState(1.0, 7.0, 100.0), snapshot.tpm_bucket_state, 0, 0.0)
    with pytest.raises(InvalidRequestError):
        other.restore_from_snapshot(mismatched)
    with pytest.raises(InvalidRequestError):
        other.restore_from_snapshot(
            StateSnapshot(100.0, snapshot.rpm_bucket_state, snapshot.tpm_bucket_state, 0, -1)
        )
    assert other.get_metrics().tpm.available == pytest.approx(600.0)
    # Not a snapshot: the package's typed error, not a bare TypeError.
    with pytest.raises(InvalidRequestError, match="snapshot must be a StateSnapshot"):
        other.restore_from_snapshot({"not": "a snapshot"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 100), {}),
        ((60, -1), {}),
        ((math.nan, 100), {}),
        ((60, math.inf), {}),
        ((True, 100), {}),
        (("60", 100), {}),
        ((60, 100), {"burst_rpm": 30}),
        ((60, 100), {"burst_tpm": 99.5}),
        ((60, 100), {"burst_tpm": math.nan}),
        ((60, 100), {"adjustment_failure_strategy": "lenient"}),
        ((60, 100), {"max_history_records": 0}),
        ((60, 100), {"max_history_records": 2.5}),
        ((60, 100), {"history_retention": 0}),
        ((60, 100), {"efficiency_window_size": 0}),
        ((60, 100), {"clock": 42}),
    ],
)
def test_invalid_config(args: tuple[object, object], kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        LLMThrottle(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", [-1, 1.5, math.nan, math.inf, True, "10", None])
def test_bad_token_counts_raise_and_change_nothing(clock: ManualClock, tokens: object) -> None:
    throttle = make(clock)
    assert throttle.consume("a", 100)
    before = throttle.get_metrics().to_dict()
    for call in (
        lambda: throttle.can_process(tokens),  # type: ignore[arg-type]
        lambda: throttle.consume("b", tokens),  # type: ignore[arg-type]
        lambda: throttle.consume_or_raise("b", tokens),  # type: ignore[arg-type]
        lambda: throttle.adjust_consumption("a", tokens),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidRequestError) as info:
            call()
        assert isinstance(info.value, ValueError)
    assert throttle.get_metrics().to_dict() == before


@pytest.mark.parametrize("request_id", ["", "   ", None, 7])
def test_bad_request_ids(clock: ManualClock, request_id: object) -> None:
    throttle = make(clock)
    with pytest.raises(InvalidRequestError):
        throttle.consume(request_id, 1)  # type: ignore[arg-type]
    assert throttle.get_consumption_history() == []


def test_integral_float_tokens_are_accepted(clock: ManualClock) -> None:
    throttle = make(clock)
    assert throttle.consume("a", 100.0)
    assert throttle.get_consumption_history()[0].tokens == 100


def test_factory_and_protocol(clock: ManualClock) -> None:
    throttle = create_llm_throttle(rpm=10, tpm=500, burst_tpm=800, clock=clock)
    assert isinstance(throttle, LLMThrottle)
    assert isinstance(throttle, RateLimiter)
    assert throttle.get_metrics().tpm.limit == 800
    assert throttle.clock is clock
    with pytest.raises(InvalidConfigError):
        create_llm_throttle(rpm=10, tpm=500, adjustment_failure_strategy="nope")  # type: ignore[arg-type]


def test_plain_callable_clock() -> None:
    now = [0.0]
    throttle = LLMThrottle(60, 600, clock=lambda: now[0])
    assert throttle.consume("a", 600)
    now[0] = 30.0
    assert throttle.get_metrics().tpm.available == pytest.approx(300.0)


def test_default_clock_is_monotonic_and_works() -> None:
    throttle = LLMThrottle(60, 1_000)
    assert throttle.clock is None
    assert throttle.consume("a", 10)
    assert throttle.get_metrics().tpm.available <= 1_000


def test_validate_state(clock: ManualClock) -> None:
    throttle = make(clock)
    assert throttle.validate_state()
    assert throttle.consume("a", 10)
    assert throttle.validate_state()


def test_concurrent_consumes_never_overdraw(clock: ManualClock) -> None:
    throttle = make(clock, rpm=1e6, tpm=10_000)
    granted: list[bool] = []

    def worker(base: int) -> None:
        for i in range(200):
            granted.append(throttle.consume(f"{base}-{i}", 7))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 800  # 5600 of 10000 tokens: all fit
    assert throttle.get_metrics().tpm.available == pytest.approx(10_000 - 7 * 800)


def test_metadata_cycles_are_collected(clock: ManualClock) -> None:
    class Holder:
        pass

    holder = Holder()
    throttle = make(clock)
    holder.throttle = throttle  # type: ignore[attr-defined]
    assert throttle.consume("a", 1, {"holder": holder})
    ref = weakref.ref(holder)
    del holder, throttle
    gc.collect()
    assert ref() is None


# (kind, a, b): consume a tokens / adjust the a-th consumed request to b tokens / advance b s.
operations = st.lists(
    st.tuples(st.sampled_from(["consume", "adjust", "advance"]), st.integers(0, 2_500), st.floats(0.0, 20.0)),
    max_size=80,
)


@given(ops=operations, strategy=st.sampled_from(["warn", "compensate", "strict"]))
def test_grants_in_any_window_never_exceed_burst_plus_rate(
    ops: list[tuple[str, int, float]], strategy: str
) -> None:
    """Net tokens taken (consumes, adjustment extras, less refunds) and requests granted within
    any window of length L never exceed burst + rate · L."""
    clock = ManualClock()
    rpm, tpm, burst_rpm, burst_tpm = 30.0, 1_200.0, 40.0, 1_500.0
    throttle = LLMThrottle(
        rpm, tpm, burst_rpm=burst_rpm, burst_tpm=burst_tpm, clock=clock, adjustment_failure_strategy=strategy
    )
    consumed: list[str] = []
    events: list[tuple[float, float, int]] = []  # (time, net tokens, requests)
    for kind, count, seconds in ops:
        before = throttle.get_metrics().tpm.available
        if kind == "consume":
            request_id = f"r{len(consumed)}"
            if throttle.consume(request_id, count):
                consumed.append(request_id)
                events.append((clock.now(), before - throttle.get_metrics().tpm.available, 1))
        elif kind == "adjust" and consumed:
            with contextlib.suppress(RateLimitError, UnknownRequestError):
                throttle.adjust_consumption(consumed[count % len(consumed)], int(seconds * 100))
            events.append((clock.now(), before - throttle.get_metrics().tpm.available, 0))
        else:
            clock.advance(seconds)
        assert throttle.validate_state()
    for i, (start, _, _) in enumerate(events):
        tokens = 0.0
        requests = 0
        for at, net, granted in events[i:]:
            tokens += net
            requests += granted
            window = at - start
            assert tokens <= burst_tpm + tpm / 60 * window + 1e-6
            assert requests <= burst_rpm + rpm / 60 * window + 1e-9


@given(
    tpm=st.floats(1.0, 1e9),
    start=st.floats(0.0, 2e9),
    first=st.floats(0.0, 1.0),
    second=st.floats(0.0, 1.0),
)
def test_available_in_is_exact_at_any_scale(tpm: float, start: float, first: float, second: float) -> None:
    """Advancing the clock by `available_in` admits the request; it is never admitted sooner
    than the bucket really refills, and an estimate past the capacity waits forever."""
    clock = ManualClock(start)
    throttle = LLMThrottle(1e9, tpm, clock=clock)
    assert throttle.consume("a", int(tpm * first))
    wanted = int(tpm * second)
    check = throttle.can_process(wanted)
    clock.advance(check.available_in)
    assert throttle.can_process(wanted).allowed
    assert throttle.consume("b", wanted)
    assert math.isinf(throttle.can_process(int(tpm) + 1).available_in)


def test_token_capacity_is_the_token_bucket_size() -> None:
    assert LLMThrottle(10, 500).token_capacity == 500
    assert LLMThrottle(10, 500, burst_tpm=800).token_capacity == 800
