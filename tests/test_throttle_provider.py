"""LLMThrottle learns from the provider and keeps its books on error paths: release, penalize,
sync_from_headers, snapshots across clocks, and no Python code under its lock."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from llm_queue_dispatcher import (
    InvalidRequestError,
    LLMThrottle,
    ManualClock,
    ProviderLimits,
    UnknownRequestError,
)


def throttle(clock: ManualClock, **kwargs: object) -> LLMThrottle:
    return LLMThrottle(60, 6_000, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_release_returns_tokens_and_the_request_slot() -> None:
    clock = ManualClock()
    limiter = LLMThrottle(2, 6_000, clock=clock)
    assert limiter.consume("a", 4_000)
    assert limiter.consume("b", 1_000)
    assert not limiter.can_process(10).allowed  # both requests of the minute used
    limiter.release("a")
    metrics = limiter.get_metrics()
    assert metrics.tpm.available == pytest.approx(5_000)
    assert metrics.rpm.available == pytest.approx(1)
    assert metrics.consumption_history.count == 1
    assert [r.request_id for r in limiter.get_consumption_history()] == ["b"]
    with pytest.raises(UnknownRequestError):
        limiter.release("a")
    with pytest.raises(UnknownRequestError):
        limiter.adjust_consumption("a", 10)
    with pytest.raises(InvalidRequestError):
        limiter.release("   ")


def test_penalize_blocks_every_grant_until_it_ends() -> None:
    clock = ManualClock()
    limiter = throttle(clock)
    limiter.penalize(5.0)
    check = limiter.can_process(1)
    assert not check.allowed
    assert check.reason == "rpm_limit"
    assert check.available_in == pytest.approx(5.0)
    assert not limiter.consume("a", 1)
    clock.advance(5.0)
    assert limiter.consume("a", 1)
    for bad in (-1, math.nan, -math.inf, "3", None, True):  # inf is clamped to a day
        with pytest.raises(InvalidRequestError):
            limiter.penalize(bad)  # type: ignore[arg-type]


def test_a_header_lowers_a_bucket_and_refill_raises_it_at_its_own_rate_before_the_reset() -> None:
    clock = ManualClock()
    limiter = throttle(clock)  # 6,000 tokens a minute: 100 a second
    read = limiter.sync_from_headers(
        {
            "x-ratelimit-remaining-tokens": "1000",
            "x-ratelimit-reset-tokens": "30s",
            "x-ratelimit-remaining-requests": "50",
        }
    )
    assert read.tokens_remaining == 1000
    assert limiter.get_metrics().tpm.available == pytest.approx(1_000)
    assert limiter.consume("a", 600)
    # Long before the provider's reset (t=30), the bucket refills at its own rate from 400.
    clock.advance(2.0)
    assert limiter.get_metrics().tpm.available == pytest.approx(600)
    assert limiter.can_process(1_000).available_in == pytest.approx(4.0)
    # A later figure never raises the level.
    limiter.sync_from_headers({"x-ratelimit-remaining-tokens": "999999", "x-ratelimit-reset-tokens": "1s"})
    assert limiter.get_metrics().tpm.available == pytest.approx(600)
    # Never above the configured limit.
    clock.advance(600.0)
    assert limiter.get_metrics().tpm.available == pytest.approx(6_000)


def test_sync_from_headers_retry_after_is_a_penalty() -> None:
    clock = ManualClock()
    limiter = throttle(clock)
    limiter.sync_from_headers([("Retry-After", "3")])
    assert limiter.can_process(1).available_in == pytest.approx(3.0)
    limiter.apply_provider_limits(ProviderLimits(retry_after=1.0))
    assert limiter.can_process(1).available_in == pytest.approx(3.0)


def test_snapshot_restored_under_another_clock_base_refills_at_once() -> None:
    old_clock = ManualClock(1_000_000.0)
    old = throttle(old_clock)
    assert old.consume("a", 6_000)
    snapshot = old.create_snapshot()
    new_clock = ManualClock(3.0)  # another process: its clock counts from elsewhere
    new = throttle(new_clock)
    new.restore_from_snapshot(snapshot)
    assert new.get_metrics().tpm.available == pytest.approx(0)
    new_clock.advance(1.0)
    assert new.get_metrics().tpm.available == pytest.approx(100)


def _run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    # A deadlock hangs the interpreter for good: run the scenario in a child with a timeout.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_a_refused_consume_releases_its_metadata_unlocked() -> None:
    result = _run_isolated(
        """
        from llm_queue_dispatcher import LLMThrottle, ManualClock
        limiter = LLMThrottle(60, 100, clock=ManualClock())
        class Meta(dict):
            def __del__(self):
                limiter.can_process(1)  # takes the limiter's lock
                print("finalized")
        assert not limiter.consume("a", 1_000, Meta())
        print("done")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["finalized", "done"]
