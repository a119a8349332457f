"""`restore_from_snapshot` takes durations from the snapshot, not the old
clock's instants, so a limiter whose clock counts from elsewhere (another process, a restart)
refills at once after a restore instead of freezing until its clock passes the old instant."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    LLMThrottle,
    ManualClock,
)
from tests.dispatcher.books import native_limiter

# rpm 60 / tpm 6,000: one request and 100 tokens a second.
RPM, TPM = 60.0, 6_000.0


@pytest.mark.parametrize(("old_start", "new_start"), [(1e9, 3.0), (3.0, 1e9), (-5e8, 7e8), (1e6, 1e6)])
def test_a_restored_snapshot_refills_from_the_new_clock_at_once(old_start: float, new_start: float) -> None:
    """Two throttles whose clocks count from very different origins, in both
    directions: after a restore the buckets hold what the snapshot says and refill at the rate
    from the new clock's next reading on."""
    old_clock = ManualClock(old_start)
    old = LLMThrottle(RPM, TPM, clock=old_clock)
    assert old.consume("a", 5_000)
    old_clock.advance(2.0)  # +2 requests (capped at 60) and +200 tokens before the snapshot
    snapshot = old.create_snapshot()
    new_clock = ManualClock(new_start)
    new = LLMThrottle(RPM, TPM, clock=new_clock)
    new.restore_from_snapshot(snapshot)
    metrics = new.get_metrics()
    assert metrics.tpm.available == pytest.approx(1_200.0)
    assert metrics.rpm.available == pytest.approx(60.0)
    new_clock.advance(1.0)
    assert new.get_metrics().tpm.available == pytest.approx(1_300.0)
    assert new.can_process(1_500).available_in == pytest.approx(2.0)
    new_clock.advance(2.0)
    assert new.consume("b", 1_500)
    assert new.get_metrics().rpm.available == pytest.approx(59.0)


@given(st.integers(0, 10_000), st.integers(1, 10_000))
@example(0, 1)
def test_one_accuracy_formula_for_efficiency_and_history(estimated: int, actual: int) -> None:
    """The efficiency metric and the history's estimation accuracy use one formula,
    also when the estimate is 0, where the two used to disagree. (An actual count of 0 is a
    refund, not a measurement: see tests/throttle/test_estimation_accuracy.py.)"""
    limiter = native_limiter(ManualClock(), tpm=1_000_000)
    assert limiter.consume("a", estimated)
    limiter.adjust_consumption("a", actual)
    metrics = limiter.get_metrics()
    assert metrics.efficiency == metrics.consumption_history.estimation_accuracy
    if estimated == actual:
        assert metrics.efficiency == 1.0
    elif min(estimated, actual) == 0:
        assert metrics.efficiency == 0.0
