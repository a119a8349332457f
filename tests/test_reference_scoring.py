"""The reference scorer (tests/reference/scoring.py) against values computed by hand from the
contract (API.md "Scoring"): a reference that the dispatcher and the benchmarks are checked
against must itself be checked."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    LLMRequest,
    MessageAttributes,
    Priority,
    QueueMessage,
    ScoringWeights,
    TokenInfo,
)
from tests.reference.scoring import (
    FACTOR_NAMES,
    ContractWeights,
    clamp_custom,
    efficiency_factor,
    priority_factor,
    processing_time_factor,
    reference_breakdown,
    reference_select,
    reference_total,
    retry_factor,
    token_fit_factor,
    total_score,
    wait_time_factor,
    weighted_factors,
)


def test_priority_factor() -> None:
    assert [priority_factor(p) for p in range(4)] == [1.0, 0.7, 0.4, 0.1]


@pytest.mark.parametrize(
    ("tokens", "available", "expected"),
    [
        (800, 1000, 1.0),  # u = 0.8
        (700, 1000, 1.0),  # u = 0.7, lower edge of the plateau
        (900, 1000, 1.0),  # u = 0.9, upper edge
        (950, 1000, 0.9),  # 0.9 < u <= 1
        (1000, 1000, 0.9),
        (350, 1000, 0.5),  # u / 0.7
        (1001, 1000, 0.0),  # u > 1
        (10, 0, 0.0),  # A <= 0
        (10, -5, 0.0),
    ],
)
def test_efficiency_factor(tokens: int, available: float, expected: float) -> None:
    assert efficiency_factor(tokens, available) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tokens", "available", "expected"),
    [
        (50, 1000, 0.5),  # u = 0.05 -> 10u
        (100, 1000, 1.0),  # u = 0.1
        (500, 1000, 1.0),  # u = 0.5
        (750, 1000, 0.9),  # 1 - 0.25 * 0.4
        (1000, 1000, 0.8),
        (1200, 1000, 0.0),
        (10, 0, 0.0),
    ],
)
def test_token_fit_factor(tokens: int, available: float, expected: float) -> None:
    assert token_fit_factor(tokens, available) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tokens", "expected_time", "expected"),
    [
        (4000, 3.0, 0.85),  # 3000 ms: 1 - 2000/4000 * 0.3
        (300, None, 0.85),  # derived: 300 tokens * 0.01 s = 3000 ms
        (4000, 0.0, 1.0),  # 0 is a value, not "missing"
        (100, None, 1.0),  # 1000 ms
        (4000, 5.0, 0.7),
        (4000, 17.5, 0.4),  # 0.7 - 12500/25000 * 0.6
        (4000, 30.0, 0.1),
        (4000, 40.0, 0.1),
    ],
)
def test_processing_time_factor(tokens: int, expected_time: float | None, expected: float) -> None:
    assert processing_time_factor(expected_time, tokens) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("age", "priority", "expected"),
    [
        (2.5, 0, 0.5),  # URGENT: sqrt(2.5 / 10)
        (10.0, 0, 1.0),
        (15.0, 1, 0.5),  # HIGH: 15 / 30
        (30.0, 2, 0.5),  # NORMAL: 30 / 60
        (120.0, 2, 1.0),  # capped
        (30.0, 3, 0.1),  # LOW: 30 / 300
        (0.0, 0, 0.0),
    ],
)
def test_wait_time_factor(age: float, priority: int, expected: float) -> None:
    assert wait_time_factor(age, priority) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("count", "expected"), [(0, 1.0), (1, 0.7), (2, 0.49), (6, 0.7**6), (7, 0.1), (20, 0.1)]
)
def test_retry_factor(count: int, expected: float) -> None:
    assert retry_factor(count) == pytest.approx(expected)


def test_total_score_with_default_weights() -> None:
    # URGENT, 800 of 1000 tokens, 2.5 s old, never received, time derived (8000 ms):
    # 0.25*1 + 0.20*1 + 0.20*0.5 + 0.10*1 + 0.15*0.88 + 0.10*0.628 = 0.8448
    score = total_score(
        priority=0,
        tokens=800,
        expected_processing_time=None,
        age=2.5,
        receive_count=0,
        available=1000,
        weights=ContractWeights(),
    )
    assert score == pytest.approx(0.8448)


unit = st.floats(0.0, 1.0, allow_nan=False)


@given(
    priority=st.integers(0, 3),
    tokens=st.integers(0, 10**6),
    expected_processing_time=st.one_of(st.none(), st.floats(0.0, 100.0, allow_nan=False)),
    age=st.floats(0.0, 1_000.0, allow_nan=False),
    receive_count=st.integers(0, 20),
    available=st.floats(-10.0, 1e6, allow_nan=False),
    weights=st.tuples(*[unit] * 6).map(lambda values: ContractWeights(*values)),
    custom=st.lists(st.tuples(unit, st.floats(-2.0, 2.0) | st.just(math.nan)), max_size=3).map(
        lambda parts: [(f"c{i}", weight, raw) for i, (weight, raw) in enumerate(parts)]
    ),
)
def test_total_score_is_the_sum_of_the_breakdown(**arguments: Any) -> None:
    # total_score repeats the breakdown's six terms as one expression (it runs per message in the
    # benchmarks' brute force); the two must agree to the last bit.
    assert total_score(**arguments) == sum(weighted_factors(**arguments).values())


def test_contract_weights_are_the_packages_defaults() -> None:
    assert tuple(getattr(ContractWeights(), name) for name in FACTOR_NAMES) == ScoringWeights().as_tuple()


@pytest.mark.parametrize(
    ("raw", "counted"),
    [(0.25, 0.25), (5.0, 1.0), (-3.0, 0.0), (math.nan, 0.0), (math.inf, 1.0), (-math.inf, 0.0)],
)
def test_clamp_custom(raw: float, counted: float) -> None:
    assert clamp_custom(raw) == counted


# --- messages and selection -------------------------------------------------------------------

NOW = 1_700_000_000.0


def message(
    request_id: str,
    priority: Priority = Priority.NORMAL,
    tokens: int = 100,
    age: float = 0.0,
    receive_count: int = 0,
) -> QueueMessage[Any]:
    enqueued_at = datetime.fromtimestamp(NOW - age, timezone.utc)
    attributes = MessageAttributes(f"m-{request_id}", "", enqueued_at, receive_count, None)
    return QueueMessage(
        f"m-{request_id}", LLMRequest(request_id, None, priority, TokenInfo(tokens)), attributes
    )


def test_breakdown_of_a_message_holds_the_weighted_factors_then_the_custom_parts() -> None:
    m = message("a", Priority.URGENT, tokens=800, age=2.5, receive_count=1)
    parts = reference_breakdown(
        m,
        now=NOW,
        available=1000,
        weights=ContractWeights(),
        custom=[("nan", 0.3, math.nan), ("big", 0.2, 7.0)],
    )
    assert list(parts) == [*FACTOR_NAMES, "nan", "big"]
    # The 0.8448 of test_total_score_with_default_weights, with retry 0.7 instead of 1 and the
    # custom parts 0.3 * 0 and 0.2 * 1.
    assert sum(parts.values()) == pytest.approx(0.8448 - 0.10 * 0.3 + 0.2)
    assert reference_total(m, now=NOW, available=1000, weights=ContractWeights()) == pytest.approx(
        0.8448 - 0.10 * 0.3
    )


def select(messages: list[QueueMessage[Any]], **options: Any) -> str | None:
    options.setdefault("can_process", lambda tokens: True)
    chosen = reference_select(messages, now=NOW, available=10_000, weights=ContractWeights(), **options)
    return None if chosen is None else chosen.payload.id


def test_select_takes_the_highest_total_among_the_admissible() -> None:
    messages = [message("low", Priority.LOW), message("urgent", Priority.URGENT, tokens=5_000)]
    assert select(messages) == "urgent"
    assert select(messages, can_process=lambda tokens: tokens < 1_000) == "low"
    assert select(messages, can_process=lambda tokens: False) is None
    assert select([]) is None


def test_select_breaks_ties_by_age_then_enqueue_order() -> None:
    # LOW requests younger than 300 s differ in their wait factor; past it they tie on every factor.
    older, younger = message("older", Priority.LOW, age=400.0), message("younger", Priority.LOW, age=350.0)
    assert select([younger, older]) == "older"
    first, second = message("first", Priority.LOW, age=350.0), message("second", Priority.LOW, age=350.0)
    assert select([first, second]) == "first"
    assert select([second, first]) == "second"


def test_select_counts_custom_scores_clamped() -> None:
    messages = [message("a", Priority.URGENT), message("b", Priority.LOW)]

    def custom(m: QueueMessage[Any]) -> list[tuple[str, float, float]]:
        return [("vip", 5.0, 100.0 if m.payload.id == "b" else math.nan)]

    assert select(messages, custom=custom) == "b"


def test_select_returns_none_below_the_threshold() -> None:
    m = message("a", Priority.LOW)
    total = reference_total(m, now=NOW, available=10_000, weights=ContractWeights())
    assert select([m], min_score_threshold=total) == "a"
    assert select([m], min_score_threshold=total + 1e-9) is None
