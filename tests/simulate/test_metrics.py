"""The scheduling metrics of `llmqd simulate`, each on a small hand-made input whose answer is
known: SLO attainment, Jain's index, light and heavy tenants, window fairness, priority
inversions, the binding limit and utilisation up to the last dispatch."""

from __future__ import annotations

import math

import pytest

from llm_queue_dispatcher.simulate import SimulationResult
from llm_queue_dispatcher.simulate_metrics import (
    BlockedTime,
    InversionCounter,
    jain_index,
    light_tenants,
    slo_attainment,
    window_fairness,
)

URGENT, HIGH, NORMAL, LOW = 0, 1, 2, 3


# -- SLO attainment ------------------------------------------------------------------------------
def test_slo_attainment_is_the_share_of_arrivals_sent_within_the_target() -> None:
    # Four of five arrived requests were sent, three within 1 s (a wait of exactly 1 s meets it).
    assert slo_attainment([0.0, 0.5, 1.0, 4.0], 1.0, 5) == pytest.approx(3 / 5)
    assert slo_attainment([0.0, 0.5], 10.0, 2) == 1.0
    assert slo_attainment([], 1.0, 3) == 0.0  # nothing sent: every request missed
    assert slo_attainment([], 1.0, 0) is None  # no request of the class at all


# -- Jain's index --------------------------------------------------------------------------------
def test_jain_index_is_1_for_equal_shares_and_1_over_n_for_one_taking_all() -> None:
    assert jain_index([5.0, 5.0, 5.0]) == 1.0
    assert jain_index([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    # (1 + 3)^2 / (2 * (1 + 9)) = 16 / 20
    assert jain_index([1.0, 3.0]) == pytest.approx(0.8)
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([]) is None


# -- light and heavy tenants ---------------------------------------------------------------------
def test_light_tenants_ask_no_more_than_their_max_min_fair_share() -> None:
    # Capacity 90: c (10) and b (30) fit in an equal third (30); a gets what is left (50).
    assert light_tenants({"a": 100.0, "b": 30.0, "c": 10.0}, 90.0) == {"b", "c"}
    # Capacity 60: the equal share is 20; c fits, then (60 - 10) / 2 = 25 < 30: a and b heavy.
    assert light_tenants({"a": 100.0, "b": 30.0, "c": 10.0}, 60.0) == {"c"}
    # Everything fits: everyone is light. Nothing fits: everyone is heavy.
    assert light_tenants({"a": 10.0, "b": 20.0}, 100.0) == {"a", "b"}
    assert light_tenants({"a": 10.0, "b": 20.0}, 0.0) == set()
    assert light_tenants({}, 10.0) == set()


# -- fairness over windows -----------------------------------------------------------------------
def test_window_fairness_compares_tenants_backlogged_throughout_a_window() -> None:
    requests = [
        # a waits from 0 to 130 s (two requests, one after the other) and is served 100 + 300.
        ("a", 0.0, 70.0, 100.0),
        ("a", 60.0, 130.0, 300.0),
        # b waits from 0 to 125 s and is served 100 in [0, 60) and 100 in [60, 120).
        ("b", 0.0, 30.0, 100.0),
        ("b", 10.0, 125.0, 100.0),
        ("b", 20.0, 90.0, 100.0),
        # c waits only from 10 s to 50 s: backlogged in no whole window.
        ("c", 10.0, 50.0, 1000.0),
    ]
    fairness = window_fairness(requests, end=130.0, window=60.0)
    # Windows [0, 60) and [60, 120): a and b backlogged in both; [120, 180) ends after 130 s.
    # [0, 60): a served 0 and b 100 -> Jain 0.5, gap 100. [60, 120): a 100, b 100 -> 1, gap 0.
    assert fairness.windows == 2
    assert fairness.jain_mean == pytest.approx(0.75)
    assert fairness.jain_min == pytest.approx(0.5)
    assert fairness.max_gap == 100.0
    assert fairness.gap_window == 0.0


def test_window_fairness_needs_two_backlogged_tenants() -> None:
    one = window_fairness([("a", 0.0, 200.0, 10.0), ("b", 0.0, 1.0, 10.0)], end=200.0)
    assert one.windows == 0
    assert one.jain_mean is None
    assert one.max_gap is None
    assert window_fairness([], end=100.0).windows == 0


def test_a_backlog_with_a_gap_is_not_backlogged_throughout() -> None:
    # a waits [0, 50) and [51, 130): the gap at 50-51 s breaks window [0, 60) but not [60, 120).
    requests = [
        ("a", 0.0, 50.0, 1.0),
        ("a", 51.0, 130.0, 1.0),
        ("b", 0.0, 130.0, 1.0),
    ]
    assert window_fairness(requests, end=130.0).windows == 1


# -- priority inversions -------------------------------------------------------------------------
def counter(estimates: list[int], classes: list[int], tenants: list[str | None]) -> InversionCounter:
    return InversionCounter(estimates, classes, tenants, [0.0] * len(estimates), retention=100.0)


def test_a_lower_class_dispatched_while_a_fitting_higher_one_waits_is_an_inversion() -> None:
    inversions = counter([100, 500, 50], [HIGH, LOW, NORMAL], ["a", "b", "a"])
    for index in range(3):
        inversions.arrive(index)
    # LOW (b) goes with 200 tokens available: the HIGH request (100) fitted -> an inversion, and
    # a's HIGH was not b's own: none within a tenant.
    inversions.dispatch(1, available_tokens=200.0, now=1.0)
    assert (inversions.inversions, inversions.within_tenant) == (1, 0)
    # NORMAL (a) goes while a's own HIGH (100) fits in 150: an inversion within the tenant.
    inversions.dispatch(2, available_tokens=150.0, now=1.0)
    assert (inversions.inversions, inversions.within_tenant) == (2, 1)
    # HIGH goes: nothing above it waits.
    inversions.dispatch(0, available_tokens=100.0, now=1.0)
    assert (inversions.inversions, inversions.within_tenant) == (2, 1)


def test_a_higher_class_that_does_not_fit_makes_no_inversion() -> None:
    inversions = counter([1000, 10], [URGENT, LOW], [None, None])
    inversions.arrive(0)
    inversions.arrive(1)
    inversions.dispatch(1, available_tokens=999.0, now=0.0)  # URGENT needs 1000: it could not go
    assert inversions.inversions == 0


def test_requests_sent_dropped_or_expired_wait_no_more() -> None:
    inversions = InversionCounter(
        [10, 10, 10, 10], [HIGH, HIGH, URGENT, LOW], ["a"] * 4, [0.0, 0.0, 50.0, 0.0], 30.0
    )
    for index in range(4):
        inversions.arrive(index)
    inversions.drop(0)  # dead-lettered
    inversions.dispatch(2, available_tokens=100.0, now=60.0)  # URGENT goes first
    # Request 1 (HIGH, arrived at 0) expired at 30 s: the LOW dispatch at 60 s inverts nothing.
    inversions.dispatch(3, available_tokens=100.0, now=60.0)
    assert inversions.inversions == 0
    # A failed request waits again.
    inversions.requeue(2)
    inversions.arrive(3)
    inversions.dispatch(3, available_tokens=100.0, now=61.0)
    assert (inversions.inversions, inversions.within_tenant) == (1, 1)


# -- the binding limit ---------------------------------------------------------------------------
def test_the_limit_holding_a_dispatch_is_concurrency_then_rpm_then_tpm() -> None:
    classify = BlockedTime.classify
    assert classify(in_flight=8, concurrency=8, requests_left=0.0, rpm=60.0, wait=5.0) == "concurrency"
    # Half a request left at 60 RPM: 0.5 s until the next; the budget says 0.5 s: RPM holds.
    assert classify(in_flight=1, concurrency=8, requests_left=0.5, rpm=60.0, wait=0.5) == "RPM"
    # ... but if tokens need 3 s, TPM holds longer.
    assert classify(in_flight=1, concurrency=8, requests_left=0.5, rpm=60.0, wait=3.0) == "TPM"
    assert classify(in_flight=1, concurrency=8, requests_left=2.0, rpm=60.0, wait=3.0) == "TPM"
    assert classify(in_flight=1, concurrency=8, requests_left=0.0, rpm=60.0, wait=math.inf) == "RPM"


def test_every_limit_of_the_limiter_can_be_the_one_holding_a_dispatch() -> None:
    classify = BlockedTime.classify_limits
    rates = {
        "rpm": 1.0,
        "tpm": 1_000.0,
        "itpm": 500.0,
        "otpm": 100.0,
        "rpd": 0.01,
        "tpd": 10.0,
        "concurrency": 4,
    }
    full = {
        "rpm": (60.0, 60.0),
        "tpm": (6e4, 6e4),
        "itpm": (3e4, 3e4),
        "otpm": (6e3, 6e3),
        "rpd": (900.0, 900.0),
    }
    full |= {"tpd": (8.64e5, 8.64e5), "concurrency": (4.0, 4.0)}
    # Every slot of max_concurrent held.
    assert classify({**full, "concurrency": (0.0, 4.0)}, rates, 5.0) == "concurrency"
    # Half a request left a day: 50 s until the next, the budget says 50 s: RPD holds.
    assert classify({**full, "rpd": (0.5, 900.0)}, rates, 50.0) == "RPD"
    # Both request limits short: the longer wait names it.
    assert classify({**full, "rpm": (0.5, 60.0), "rpd": (0.5, 900.0)}, rates, 50.0) == "RPD"
    assert classify({**full, "rpm": (0.5, 60.0)}, rates, 0.5) == "RPM"
    # The token limit whose bucket holds the smallest share of its capacity.
    assert classify({**full, "otpm": (100.0, 6e3), "tpm": (5e4, 6e4)}, rates, 3.0) == "OTPM"
    assert classify({**full, "itpm": (10.0, 3e4)}, rates, 3.0) == "ITPM"
    assert classify({**full, "tpd": (0.0, 8.64e5)}, rates, 3.0) == "TPD"
    assert classify({**full, "tpm": (0.0, 6e4)}, rates, 3.0) == "TPM"
    # Only RPM and TPM configured: as `classify`.
    assert classify({"rpm": (0.5, 60.0), "tpm": (10.0, 6e4)}, {"rpm": 1.0, "tpm": 1e3}, 3.0) == "TPM"


def test_the_binding_limit_is_the_one_that_held_longest() -> None:
    blocked = BlockedTime()
    assert blocked.binding() is None
    assert blocked.shares() == {"RPM": 0.0, "TPM": 0.0, "concurrency": 0.0}
    blocked.add("TPM", 3.0)
    blocked.add("RPM", 5.0)
    blocked.add("concurrency", 2.0)
    assert blocked.binding() == "RPM"
    assert blocked.shares() == {"RPM": 0.5, "TPM": 0.3, "concurrency": 0.2}


# -- utilisation ---------------------------------------------------------------------------------
def test_utilisation_runs_up_to_the_last_dispatch() -> None:
    # 60,000 tokens a minute, a full bucket of 60,000 to start: by the last dispatch at 120 s the
    # limiter could grant 60,000 + 120,000; 135,000 were used.
    result = SimulationResult(
        "x",
        10,
        tokens_used=135_000,
        tpm_limit=60_000.0,
        tpm_capacity=60_000.0,
        last_dispatch=120.0,
        makespan=150.0,
    )
    assert result.dispatch_utilisation == pytest.approx(0.75)
    assert result.tpm_utilisation == pytest.approx(135_000 / 210_000)
    assert SimulationResult("idle", 0).dispatch_utilisation == 0.0
