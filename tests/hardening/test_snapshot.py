"""Issue 9, defect 8: `restore_from_snapshot` takes durations from the snapshot, not the old
clock's instants, so a limiter whose clock counts from elsewhere (another process, a restart)
refills at once after a restore instead of freezing until its clock passes the old instant."""

from __future__ import annotations

import pytest

from llm_queue_dispatcher import LLMThrottle, ManualClock

# rpm 60 / tpm 6,000: one request and 100 tokens a second.
RPM, TPM = 60.0, 6_000.0


@pytest.mark.parametrize(("old_start", "new_start"), [(1e9, 3.0), (3.0, 1e9), (-5e8, 7e8), (1e6, 1e6)])
def test_a_restored_snapshot_refills_from_the_new_clock_at_once(old_start: float, new_start: float) -> None:
    """Defect 8: two throttles whose clocks count from very different origins, in both
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
