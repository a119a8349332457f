"""Configuration: every bad field, weight or custom scorer raises `InvalidConfigError`."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    InvalidConfigError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    ManualClock,
    QueueMessage,
    ScoringConfig,
    ScoringContext,
    ScoringWeights,
    create_in_memory_queue,
)
from tests.dispatcher.support import FACTOR_NAMES

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
