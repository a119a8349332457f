"""Configuration: every bad field, weight or custom scorer raises `InvalidConfigError`."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import replace
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    FairPriorityConfig,
    InMemoryStorage,
    InvalidConfigError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    Priority,
    QueueMessage,
    ScoringConfig,
    ScoringContext,
    ScoringWeights,
    create_in_memory_queue,
)
from tests.dispatcher.support import FACTOR_NAMES, request, throttle
from tests.integer_like import int_likes

BAD_CONFIG = [
    ("buffer_size", 0),
    ("buffer_size", 2.5),
    ("buffer_size", True),
    ("prefetch_interval", 0.0),
    ("prefetch_interval", -1.0),
    ("prefetch_interval", math.nan),
    ("prefetch_interval", math.inf),
    ("max_candidates_to_evaluate", 0),
    ("max_candidates_to_evaluate", "20"),
    ("min_score_threshold", math.nan),
    ("min_score_threshold", "high"),
    ("metrics_retention", 0.0),
    ("metrics_retention", -5.0),
    ("visibility_timeout", -1.0),
    ("visibility_timeout", 43_200.5),
    ("visibility_timeout", math.nan),
    ("enable_prefetch", "yes"),
    ("reserve_budget", 1),
    ("logger", "llm_queue_dispatcher"),
    ("clock", 5),
    ("scoring", {"priority": 1.0}),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_bad_config_field_raises_invalid_config_error_naming_it(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        LLMQueueDispatcherConfig(**{field: value})
    with pytest.raises(InvalidConfigError, match=field):
        create_in_memory_queue(**{field: value})


def test_a_config_broken_after_construction_is_refused_by_the_dispatcher(clock: ManualClock) -> None:
    config = LLMQueueDispatcherConfig(clock=clock)
    config.buffer_size = 0
    with pytest.raises(InvalidConfigError, match="buffer_size"):
        LLMQueueDispatcher(InMemoryStorage(clock=clock), config)


@pytest.mark.parametrize("field", FACTOR_NAMES)
@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "1"])
def test_bad_weight_raises_invalid_config_error(field: str, value: Any) -> None:
    with pytest.raises(InvalidConfigError, match=field):
        ScoringWeights(**{field: value})


def _score(message: QueueMessage[Any], context: ScoringContext) -> float:
    return 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: CustomScorer("", 1.0, _score),
        lambda: CustomScorer("x", -1.0, _score),
        lambda: CustomScorer("x", math.nan, _score),
        lambda: CustomScorer("x", 1.0, "not callable"),  # type: ignore[arg-type]
        lambda: ScoringConfig(
            custom_scorers=[CustomScorer("x", 1.0, _score), CustomScorer("x", 0.5, _score)]
        ),
        lambda: ScoringConfig(custom_scorers=[CustomScorer("priority", 1.0, _score)]),
    ],
    ids=["empty-name", "negative-weight", "nan-weight", "not-callable", "duplicate-name", "shadows-a-factor"],
)
def test_bad_custom_scorer_raises_invalid_config_error(make: Any) -> None:
    with pytest.raises(InvalidConfigError):
        make()


def test_unknown_override_raises_invalid_config_error(clock: ManualClock) -> None:
    with pytest.raises(InvalidConfigError, match="bufer_size"):
        create_in_memory_queue(clock=clock, bufer_size=10)


OVERFLOWING = [
    ("buffer_size", 10**40),
    ("max_candidates_to_evaluate", 10**30),
    ("max_candidates_to_evaluate", 2**64),
]


@pytest.mark.parametrize("number", int_likes(5), ids=lambda v: type(v).__name__)
async def test_integer_like_numbers_are_valid_config_fields(number: object) -> None:
    config = LLMQueueDispatcherConfig(
        buffer_size=number,  # type: ignore[arg-type]
        max_candidates_to_evaluate=number,  # type: ignore[arg-type]
        prefetch_interval=number,  # type: ignore[arg-type]
        min_score_threshold=type(number)(0),  # type: ignore[call-arg]
        metrics_retention=number,  # type: ignore[arg-type]
        visibility_timeout=number,  # type: ignore[arg-type]
    )
    assert (config.buffer_size, config.visibility_timeout, config.prefetch_interval) == (5, 5, 5)
    fair = FairPriorityConfig(
        tenant_weights={"a": number},  # type: ignore[dict-item]
        fairness_window=number,  # type: ignore[arg-type]
        reserve_tokens=number,  # type: ignore[arg-type]
        max_wait={Priority.LOW: number},  # type: ignore[dict-item]
    )
    assert (fair.fairness_window, fair.reserve_tokens, fair.max_wait_by_priority()[3]) == (5, 5, 5.0)
    dispatcher = create_in_memory_queue(visibility_timeout=number, policy="fair_priority", fair_priority=fair)  # type: ignore[arg-type]
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(throttle(ManualClock())) is not None


@pytest.mark.parametrize(("field", "value"), OVERFLOWING, ids=[f"{f}={v}" for f, v in OVERFLOWING])
def test_an_int_too_large_for_the_core_is_an_invalid_config_error_naming_it(field: str, value: int) -> None:
    for make in (
        lambda: LLMQueueDispatcherConfig(**{field: value}),
        lambda: create_in_memory_queue(**{field: value}),
    ):
        with pytest.raises(
            InvalidConfigError, match=rf"^{field} must be an int from 1 to {sys.maxsize}, got {value}$"
        ):
            make()


@pytest.mark.parametrize(
    "fair",
    [
        {"tenant_weights": {"a": 10**400}},
        {"fairness_window": 10**400},
        {"reserve_tokens": 10**40},
        {"max_wait": {Priority.HIGH: 10**400}},
    ],
    ids=["tenant_weights", "fairness_window", "reserve_tokens", "max_wait"],
)
def test_fair_priority_numbers_too_large_are_invalid_config_errors_naming_them(fair: dict[str, Any]) -> None:
    [field] = fair
    with pytest.raises(InvalidConfigError, match=field):
        FairPriorityConfig(**fair)


def _zero_weights() -> ScoringWeights:
    return ScoringWeights(**dict.fromkeys(FACTOR_NAMES, 0.0))


def test_all_zero_weights_with_a_positive_threshold_are_refused_saying_why(clock: ManualClock) -> None:
    for scoring in (
        ScoringConfig(weights=_zero_weights()),
        ScoringConfig(weights=_zero_weights(), custom_scorers=[CustomScorer("flat", 0.0, _score)]),
    ):
        with pytest.raises(
            InvalidConfigError, match=r"^min_score_threshold=0\.1 can never be reached: every factor"
        ):
            LLMQueueDispatcherConfig(scoring=scoring)
        with pytest.raises(InvalidConfigError, match="nothing would ever be dispatched"):
            create_in_memory_queue(clock=clock, scoring=scoring)


def test_weights_that_add_up_below_the_threshold_are_refused() -> None:
    weights = ScoringWeights(**dict.fromkeys(FACTOR_NAMES, 0.01))
    with pytest.raises(InvalidConfigError, match=r"the weights add up to 0\.06"):
        LLMQueueDispatcherConfig(scoring=ScoringConfig(weights=weights), min_score_threshold=0.1)


async def test_all_zero_weights_dispatch_when_the_threshold_is_at_most_zero(clock: ManualClock) -> None:
    dispatcher = create_in_memory_queue(
        clock=clock, scoring=ScoringConfig(weights=_zero_weights()), min_score_threshold=0.0
    )
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.score.total == 0.0


async def test_a_custom_scorer_with_weight_makes_zero_factor_weights_valid(clock: ManualClock) -> None:
    scoring = ScoringConfig(
        weights=_zero_weights(), custom_scorers=[CustomScorer("mine", 1.0, lambda m, c: 0.5)]
    )
    dispatcher = create_in_memory_queue(clock=clock, scoring=scoring)
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.score.total == pytest.approx(0.5)


def test_weights_whose_sum_no_float_holds_are_refused(clock: ManualClock) -> None:
    """Each weight finite, their sum not: every total would be inf and tie, and the order the
    weights ask for (URGENT first) would be lost without a word. Weights changed to such values
    after construction are refused when a dispatcher is built."""
    weights = ScoringWeights()
    scoring = ScoringConfig(weights=weights)
    for name in FACTOR_NAMES:
        setattr(weights, name, 1e308)
    with pytest.raises(InvalidConfigError, match="factor weights add up to more than a float holds"):
        create_in_memory_queue(clock=clock, scoring=scoring)
    weights = ScoringWeights(priority=1.0)
    scoring = ScoringConfig(weights=weights, custom_scorers=[CustomScorer("mine", 1.0, _score)])
    weights.priority = 1e308
    scoring.custom_scorers[0].weight = 1e308
    with pytest.raises(InvalidConfigError, match="custom scorer weights add up to more than a float holds"):
        create_in_memory_queue(clock=clock, scoring=scoring)


def test_factor_weights_whose_sum_no_float_holds_are_refused_at_construction() -> None:
    with pytest.raises(InvalidConfigError, match="factor weights add up to more than a float holds"):
        ScoringWeights(**dict.fromkeys(FACTOR_NAMES, 1e308))
    with pytest.raises(InvalidConfigError, match="custom scorer weights add up to more than a float holds"):
        ScoringConfig(custom_scorers=[CustomScorer("a", 1e308, _score), CustomScorer("b", 1e308, _score)])


async def test_very_large_weights_a_float_can_sum_still_rank_by_priority(clock: ManualClock) -> None:
    dispatcher = create_in_memory_queue(
        clock=clock, scoring=ScoringConfig(weights=ScoringWeights(**dict.fromkeys(FACTOR_NAMES, 1e300)))
    )
    await dispatcher.enqueue(request("low", Priority.LOW))
    await dispatcher.enqueue(request("urgent", Priority.URGENT))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert job.message.payload.id == "urgent"
    assert math.isfinite(job.score.total)


async def test_changing_the_callers_config_objects_after_construction_changes_nothing(
    clock: ManualClock,
) -> None:
    """The dispatcher keeps its own copies of the SLO targets, the fair-priority settings and
    the scoring settings: the caller's objects, changed (even to bad values) after the
    dispatcher was built, neither change its config nor show in it."""
    scorer = CustomScorer("mine", 0.1, _score)
    weights = ScoringWeights()
    scoring = ScoringConfig(weights=weights, custom_scorers=[scorer])
    config = LLMQueueDispatcherConfig(clock=clock, scoring=scoring, slo_targets={"URGENT": 2.0})
    dispatcher = create_in_memory_queue(config)
    fair = FairPriorityConfig(tenant_weights={"a": 2.0}, max_wait={Priority.LOW: 100.0})
    fair_dispatcher = create_in_memory_queue(clock=clock, policy="fair_priority", fair_priority=fair)
    config.slo_targets["URGENT"] = -1.0
    weights.priority = math.nan
    scoring.custom_scorers.append(CustomScorer("late", 0.5, _score))
    scorer.weight = -1.0
    fair.tenant_weights["a"] = -5.0  # type: ignore[index]
    fair.max_wait[Priority.LOW] = -1.0  # type: ignore[index]
    assert dispatcher.config.slo_targets == {"URGENT": 2.0}
    assert dispatcher.config.scoring is not None
    assert dispatcher.config.scoring.weights == ScoringWeights()
    assert [(s.name, s.weight) for s in dispatcher.config.scoring.custom_scorers] == [("mine", 0.1)]
    assert fair_dispatcher.config.fair_priority is not None
    assert fair_dispatcher.config.fair_priority.tenant_weights == {"a": 2.0}
    assert fair_dispatcher.config.fair_priority.max_wait == {Priority.LOW: 100.0}
    dispatcher.config.validate()
    fair_dispatcher.config.validate()
    await dispatcher.enqueue(request("a"))
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    assert set(job.score.breakdown) == {*FACTOR_NAMES, "mine"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("buffer_size", 0), ("buffer_size", 500), ("enable_prefetch", True), ("visibility_timeout", math.nan)],
)
async def test_a_dispatchers_config_refuses_changes_and_its_metrics_stay_readable(
    clock: ManualClock, field: str, value: Any
) -> None:
    """The dispatcher reads some fields again after it is built (the buffer size in the
    metrics, the visibility a Worker extends leases by): a change to its config, good or bad,
    is refused with `InvalidConfigError` naming the field and changes nothing (a buffer size of
    0 set there made get_queue_metrics raise ZeroDivisionError). A copy is the caller's to
    change and build another dispatcher from."""
    dispatcher = create_in_memory_queue(clock=clock, buffer_size=10)
    await dispatcher.enqueue(request("a"))
    before = repr(dispatcher.config)
    with pytest.raises(InvalidConfigError, match=f"{field} cannot change"):
        setattr(dispatcher.config, field, value)
    assert repr(dispatcher.config) == before
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.performance.buffer_utilization == 0.0
    assert metrics.performance.prefetch_enabled is False
    job = await dispatcher.dequeue(throttle(clock))
    assert job is not None
    for copied in (copy.copy(dispatcher.config), replace(dispatcher.config)):
        copied.buffer_size = 20
        assert create_in_memory_queue(copied).config.buffer_size == 20
    assert dispatcher.config.buffer_size == 10


def test_fair_priority_ignores_the_score_threshold() -> None:
    config = LLMQueueDispatcherConfig(policy="fair_priority", min_score_threshold=5.0)
    assert config.min_score_threshold == 5.0


BAD_SLO_TARGETS = [
    ["URGENT", 1.0],
    {"urgent": 1.0},
    {"CRITICAL": 1.0},
    {4: 1.0},
    {-1: 1.0},
    {True: 1.0},
    {1.0: 1.0},
    {"URGENT": -1.0},
    {"URGENT": math.nan},
    {"URGENT": "1"},
    {"URGENT": True},
    {"URGENT": None},
    {"URGENT": 10**400},
    {"URGENT": 1.0, Priority.URGENT: 2.0},
]


@pytest.mark.parametrize("targets", BAD_SLO_TARGETS, ids=[repr(t) for t in BAD_SLO_TARGETS])
def test_bad_slo_targets_raise_invalid_config_error_at_construction(targets: Any) -> None:
    with pytest.raises(InvalidConfigError, match="slo_targets"):
        LLMQueueDispatcherConfig(slo_targets=targets)
    with pytest.raises(InvalidConfigError, match="slo_targets"):
        create_in_memory_queue(slo_targets=targets)


def test_slo_targets_take_names_priorities_and_inf_and_keep_the_defaults_left_out() -> None:
    config = LLMQueueDispatcherConfig(slo_targets={"URGENT": 0.5, Priority.LOW: math.inf, 1: 0})
    assert config.slo_targets_by_priority() == [0.5, 0.0, 300.0, math.inf]
    assert LLMQueueDispatcherConfig().slo_targets_by_priority() == [1.0, 30.0, 300.0, 1800.0]


def test_the_default_slo_targets_are_those_of_llmqd_simulate() -> None:
    from llm_queue_dispatcher.config import DEFAULT_SLO_TARGETS
    from llm_queue_dispatcher.simulate_metrics import DEFAULT_SLO

    assert dict(DEFAULT_SLO_TARGETS) == dict(DEFAULT_SLO)
