"""`FairPriorityConfig` and the policy fields of `LLMQueueDispatcherConfig`: bad values raise
`InvalidConfigError` naming the field, at construction and again wherever a changed config is
used; ``policy="fair_priority"`` with ``scoring`` set is refused."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from llm_queue_dispatcher import (
    FairPriorityConfig,
    InMemoryStorage,
    InvalidConfigError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    Priority,
    ScoringConfig,
    ScoringWeights,
    create_fair_priority_queue,
    create_in_memory_queue,
)


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 0},
        {"a": 0.0},
        {"a": -1.0},
        {"a": math.nan},
        {"a": math.inf},
        {"a": True},
        {"a": "2"},
        {"a": None},
        {"ok": 1.0, "bad": -0.5},
        {1: 1.0},
        {None: 1.0},
    ],
)
def test_bad_tenant_weights_are_refused(weights: dict[Any, Any]) -> None:
    with pytest.raises(InvalidConfigError, match="tenant_weights"):
        FairPriorityConfig(tenant_weights=weights)


def test_tenant_weights_must_be_a_mapping() -> None:
    with pytest.raises(InvalidConfigError, match="tenant_weights"):
        FairPriorityConfig(tenant_weights=[("a", 1.0)])  # type: ignore[arg-type]


def test_good_tenant_weights_are_accepted() -> None:
    config = FairPriorityConfig(tenant_weights={"a": 0.001, "b": 3, "": 2.5})
    assert dict(config.tenant_weights) == {"a": 0.001, "b": 3, "": 2.5}


@pytest.mark.parametrize("window", [0, 0.0, -1.0, math.nan, math.inf, True, "60", None])
def test_bad_fairness_window_is_refused(window: Any) -> None:
    with pytest.raises(InvalidConfigError, match="fairness_window"):
        FairPriorityConfig(fairness_window=window)


@pytest.mark.parametrize("reserve", [-1, 1.5, 10.0, math.nan, math.inf, True, False, "10"])
def test_bad_reserve_tokens_are_refused(reserve: Any) -> None:
    with pytest.raises(InvalidConfigError, match="reserve_tokens"):
        FairPriorityConfig(reserve_tokens=reserve)


@pytest.mark.parametrize("reserve", [None, 0, 1, 10**9])
def test_good_reserve_tokens_are_accepted(reserve: int | None) -> None:
    assert FairPriorityConfig(reserve_tokens=reserve).reserve_tokens == reserve


@pytest.mark.parametrize(
    "max_wait",
    [
        {Priority.URGENT: 10.0},  # URGENT never ages
        {0: 10.0},
        {4: 10.0},
        {-1: 10.0},
        {True: 10.0},
        {"HIGH": 10.0},
        {1.0: 10.0},
        {Priority.HIGH: 60.0, Priority.URGENT: 5.0},
    ],
)
def test_bad_max_wait_keys_are_refused(max_wait: dict[Any, float]) -> None:
    with pytest.raises(InvalidConfigError, match="max_wait"):
        FairPriorityConfig(max_wait=max_wait)


@pytest.mark.parametrize("seconds", [-1.0, math.nan, True, "5", None])
def test_bad_max_wait_values_are_refused(seconds: Any) -> None:
    with pytest.raises(InvalidConfigError, match="max_wait"):
        FairPriorityConfig(max_wait={Priority.NORMAL: seconds})


def test_max_wait_must_be_a_mapping() -> None:
    with pytest.raises(InvalidConfigError, match="max_wait"):
        FairPriorityConfig(max_wait=[(Priority.LOW, 10.0)])  # type: ignore[arg-type]


def test_good_max_wait_is_accepted() -> None:
    config = FairPriorityConfig(max_wait={Priority.HIGH: 0, 2: 1.5, Priority.LOW: math.inf})
    assert config.max_wait_by_priority() == [math.inf, 0.0, 1.5, math.inf]
    assert FairPriorityConfig(max_wait={}).max_wait_by_priority() == [math.inf] * 4


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_urgent_first_must_be_a_bool(value: Any) -> None:
    with pytest.raises(InvalidConfigError, match="urgent_first"):
        FairPriorityConfig(urgent_first=value)


def test_the_defaults_are_the_contracts() -> None:
    config = FairPriorityConfig()
    assert dict(config.tenant_weights) == {}
    assert config.fairness_window == 60.0
    assert config.reserve_tokens is None
    assert config.urgent_first is True
    assert dict(config.max_wait) == {Priority.HIGH: 60.0, Priority.NORMAL: 300.0, Priority.LOW: 900.0}
    defaults = LLMQueueDispatcherConfig()
    assert (defaults.policy, defaults.hold_budget, defaults.fair_priority, defaults.drop_expired) == (
        "score",
        True,
        None,
        False,
    )


def test_a_config_changed_after_construction_is_refused_where_it_is_used() -> None:
    fair = FairPriorityConfig()
    fair.fairness_window = -5.0
    with pytest.raises(InvalidConfigError, match="fairness_window"):
        LLMQueueDispatcherConfig(policy="fair_priority", fair_priority=fair)
    good = LLMQueueDispatcherConfig(policy="fair_priority", fair_priority=FairPriorityConfig())
    assert good.fair_priority is not None
    good.fair_priority.max_wait = {Priority.URGENT: 1.0}
    with pytest.raises(InvalidConfigError, match="max_wait"):
        LLMQueueDispatcher(InMemoryStorage(), good)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy", "fifo"),
        ("policy", None),
        ("policy", "FAIR_PRIORITY"),
        ("hold_budget", 1),
        ("hold_budget", None),
        ("drop_expired", "yes"),
        ("fair_priority", {"fairness_window": 60.0}),
        ("fair_priority", ScoringConfig()),
    ],
)
def test_bad_policy_fields_are_refused(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        LLMQueueDispatcherConfig(**{field: value})
    with pytest.raises(InvalidConfigError, match=field):
        create_in_memory_queue(**{field: value})


@pytest.mark.parametrize(
    "scoring",
    [
        ScoringConfig(),
        ScoringConfig(weights=ScoringWeights()),
        ScoringConfig(custom_scorers=[]),
    ],
)
def test_fair_priority_with_scoring_is_refused(scoring: ScoringConfig) -> None:
    with pytest.raises(InvalidConfigError, match="scoring"):
        LLMQueueDispatcherConfig(policy="fair_priority", scoring=scoring)
    with pytest.raises(InvalidConfigError, match="scoring"):
        create_fair_priority_queue(scoring=scoring)
    with pytest.raises(InvalidConfigError, match="scoring"):
        create_fair_priority_queue(config=LLMQueueDispatcherConfig(scoring=scoring))
    config = LLMQueueDispatcherConfig(scoring=scoring)
    config.policy = "fair_priority"
    with pytest.raises(InvalidConfigError, match="scoring"):
        LLMQueueDispatcher(InMemoryStorage(), config)


def test_create_fair_priority_queue_keeps_the_callers_fields() -> None:
    clock = ManualClock(5.0)
    fair = FairPriorityConfig(tenant_weights={"vip": 2.0}, reserve_tokens=100)
    dispatcher = create_fair_priority_queue(clock=clock, fair_priority=fair, hold_budget=False)
    assert dispatcher.config.policy == "fair_priority"
    assert dispatcher.config.hold_budget is False
    assert dispatcher.config.fair_priority == fair
    external = InMemoryStorage(clock=clock)
    assert create_fair_priority_queue(external, clock=clock).config.policy == "fair_priority"
    # A score config handed in becomes a fair_priority one; its other fields stay.
    base = dataclasses.replace(LLMQueueDispatcherConfig(), buffer_size=7, clock=clock)
    assert create_fair_priority_queue(config=base).config.buffer_size == 7


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("urgent_first", 1),
        ("urgent_first", "yes"),
        ("urgent_reserve", -1),
        ("urgent_reserve", 1.5),
        ("urgent_reserve", True),
        ("urgent_reserve", "100"),
        ("urgent_reserve", 10**400),
    ],
)
def test_bad_urgent_fields_are_refused(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        LLMQueueDispatcherConfig(**{field: value})
    with pytest.raises(InvalidConfigError, match=field):
        create_in_memory_queue(**{field: value})


def test_urgent_first_belongs_to_the_score_policy() -> None:
    """``fair_priority`` has its own switch (`FairPriorityConfig.urgent_first`): setting the
    score policy's under ``fair_priority`` is refused, naming the one to use."""
    with pytest.raises(InvalidConfigError, match=r"FairPriorityConfig\.urgent_first"):
        LLMQueueDispatcherConfig(policy="fair_priority", urgent_first=False)
    with pytest.raises(InvalidConfigError, match="urgent_first"):
        create_fair_priority_queue(urgent_first=True)


def test_urgent_first_follows_hold_budget_unless_set() -> None:
    assert LLMQueueDispatcherConfig().score_urgent_first() is True
    assert LLMQueueDispatcherConfig(hold_budget=False).score_urgent_first() is False
    assert LLMQueueDispatcherConfig(hold_budget=False, urgent_first=True).score_urgent_first() is True
    assert LLMQueueDispatcherConfig(urgent_first=False).score_urgent_first() is False
    assert LLMQueueDispatcherConfig(urgent_reserve=0).urgent_reserve == 0
