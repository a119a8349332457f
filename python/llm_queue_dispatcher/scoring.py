"""Scoring types: factor weights, custom scorers, the context a scorer sees, and a message's score.

The factors themselves are computed in Rust (``rust/scoring.rs``); the formulas are those of the
contract, each in [0, 1] before weighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from . import _core
from ._checks import finite_float, shown
from .errors import InvalidConfigError
from .metrics import queue_report

if TYPE_CHECKING:
    from .metrics import QueueMetricsReport
    from .throttle import RateLimitMetrics
    from .types import QueueMessage

__all__ = [
    "FACTOR_NAMES",
    "CustomScorer",
    "MessageScore",
    "ScoringConfig",
    "ScoringContext",
    "ScoringWeights",
]

#: The six built-in factors, in the order weights are listed everywhere (defined in the core).
FACTOR_NAMES: tuple[str, ...] = tuple(_core.FACTOR_NAMES)


def _check_weight(name: str, value: object) -> None:
    weight = finite_float(value)
    if weight is None or weight < 0:
        raise InvalidConfigError(f"weight {name} must be a finite number >= 0, got {shown(value)}")


@dataclass
class ScoringWeights:
    """Weights of the six factors. Each must be a finite number >= 0."""

    priority: float = 0.25
    efficiency: float = 0.20
    wait_time: float = 0.20
    retry: float = 0.10
    token_fit: float = 0.15
    processing_time: float = 0.10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises `InvalidConfigError` naming the first bad weight."""
        for name in FACTOR_NAMES:
            _check_weight(name, getattr(self, name))
        _check_weight_sum(self.as_tuple(), "the factor weights")

    def as_tuple(self) -> tuple[float, float, float, float, float, float]:
        """The weights in `FACTOR_NAMES` order."""
        return (
            float(self.priority),
            float(self.efficiency),
            float(self.wait_time),
            float(self.retry),
            float(self.token_fit),
            float(self.processing_time),
        )


@dataclass
class CustomScorer:
    """A user factor: ``calculate(message, context)`` should return a score in [0, 1].

    Scores are clamped to [0, 1] (NaN counts as 0) and multiplied by ``weight``. An exception
    raised by ``calculate`` propagates out of `LLMQueueDispatcher.dequeue`; nothing is dequeued.
    """

    name: str
    weight: float
    calculate: Callable[[QueueMessage[Any], ScoringContext], float]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises `InvalidConfigError` for an empty name, a bad weight or a non-callable."""
        if not isinstance(self.name, str) or not self.name:
            raise InvalidConfigError(f"custom scorer name must be a non-empty str, got {shown(self.name)}")
        try:
            self.name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidConfigError(
                f"custom scorer name must be a str of valid Unicode (no lone surrogates), got {self.name!r}"
            ) from None
        _check_weight(self.name, self.weight)
        if not callable(self.calculate):
            raise InvalidConfigError(f"custom scorer {self.name!r}: calculate must be callable")


@dataclass
class ScoringConfig:
    """Weights of the built-in factors (None: the defaults) and custom scorers."""

    weights: ScoringWeights | None = None
    custom_scorers: list[CustomScorer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks every weight and scorer, and that breakdown names are unique."""
        if self.weights is not None:
            if not isinstance(self.weights, ScoringWeights):
                raise InvalidConfigError(
                    f"weights must be a ScoringWeights or None, got {shown(self.weights)}"
                )
            self.weights.validate()
        # A list (or tuple): read more than once, so never a generator, and never a str.
        if not isinstance(self.custom_scorers, Sequence) or isinstance(self.custom_scorers, (str, bytes)):
            raise InvalidConfigError(
                f"custom_scorers must be a list of CustomScorer, got {shown(self.custom_scorers)}"
            )
        seen = set(FACTOR_NAMES)
        for scorer in self.custom_scorers:
            if not isinstance(scorer, CustomScorer):
                raise InvalidConfigError(
                    f"custom_scorers must hold CustomScorer objects, got {shown(scorer)}"
                )
            scorer.validate()
            if scorer.name in seen:
                raise InvalidConfigError(
                    f"custom scorer name {scorer.name!r} is already used by another factor"
                )
            seen.add(scorer.name)
        weights = (self.weights or ScoringWeights()).as_tuple()
        _check_weight_sum(
            (*weights, *(float(scorer.weight) for scorer in self.custom_scorers)),
            "the factor and custom scorer weights",
        )


def _check_weight_sum(weights: tuple[float, ...], what: str) -> None:
    """Refuses weights whose sum no float holds: a message's total could then be ``inf``, every
    message would tie at it, and the ranking the weights ask for would be lost (URGENT behind
    LOW) without a word."""
    if not math.isfinite(sum(weights)):
        raise InvalidConfigError(
            f"{what} add up to more than a float holds ({', '.join(f'{w:g}' for w in weights)}); "
            "scale them down (only their ratios and min_score_threshold matter)"
        )


_UNSET: Any = object()


class ScoringContext:
    """What a custom scorer may read. Frozen.

    ``queue_metrics`` is built lazily: at most once per dequeue, and only when a scorer reads it.
    """

    __slots__ = ("_queue_metrics", "_queue_metrics_factory", "current_time", "rate_limiter_metrics")

    rate_limiter_metrics: RateLimitMetrics
    current_time: float
    _queue_metrics: Any
    _queue_metrics_factory: Callable[[], QueueMetricsReport] | None

    def __init__(
        self, rate_limiter_metrics: RateLimitMetrics, queue_metrics: QueueMetricsReport, current_time: float
    ) -> None:
        object.__setattr__(self, "rate_limiter_metrics", rate_limiter_metrics)
        object.__setattr__(self, "_queue_metrics", queue_metrics)
        object.__setattr__(self, "_queue_metrics_factory", None)
        object.__setattr__(self, "current_time", current_time)

    @classmethod
    def lazy(
        cls,
        *,
        rate_limiter_metrics: RateLimitMetrics,
        queue_metrics: Callable[[], QueueMetricsReport],
        current_time: float,
    ) -> ScoringContext:
        """A context whose ``queue_metrics`` is computed by ``queue_metrics()`` on first read."""
        context = cls(rate_limiter_metrics, _UNSET, current_time)
        object.__setattr__(context, "_queue_metrics_factory", queue_metrics)
        return context

    @property
    def queue_metrics(self) -> QueueMetricsReport:
        """The queue part of the dispatcher's metrics at this dequeue."""
        if self._queue_metrics is _UNSET:
            assert self._queue_metrics_factory is not None
            object.__setattr__(self, "_queue_metrics", self._queue_metrics_factory())
        report: QueueMetricsReport = self._queue_metrics
        return report

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        return (
            f"ScoringContext(current_time={self.current_time!r}, "
            f"rate_limiter_metrics={self.rate_limiter_metrics!r})"
        )


@dataclass(frozen=True)
class MessageScore:
    """A message's total and its parts: the six weighted factors, then one entry per custom
    scorer (its weight times its clamped score). ``total`` is the sum of the parts."""

    total: float
    breakdown: dict[str, float]

    @classmethod
    def of(cls, total: float, breakdown: dict[str, float]) -> MessageScore:
        """The same as ``MessageScore(total, breakdown)`` without the frozen ``__init__``'s
        per-field ``object.__setattr__``: the dispatcher builds one per dequeue."""
        score = object.__new__(cls)
        score.__dict__.update(total=total, breakdown=breakdown)
        return score


# Weight field names double as the breakdown keys, and the defaults are the core's: keep in step.
assert tuple(f.name for f in fields(ScoringWeights)) == FACTOR_NAMES
assert ScoringWeights().as_tuple() == tuple(_core.DEFAULT_WEIGHTS)


def custom_scores(
    scorers: Sequence[CustomScorer], limiter: Any, core: _core.DispatchCore
) -> Callable[[QueueMessage[Any]], list[float]]:
    """What a dispatcher's core calls for custom scores during one dispatch: the ``scorers``'
    values for one message, over one context: the limiter's metrics (``limiter``: an
    `LLMThrottle`, read here, or the metrics its ``get_metrics()`` returned), the queue's report
    (built from the core's figures on first read) and the core's clock."""
    if type(limiter) is _core.LLMThrottle:
        limiter = limiter.get_metrics()
    context = ScoringContext.lazy(
        rate_limiter_metrics=limiter,
        queue_metrics=lambda: queue_report(core.report()),
        current_time=core.now(),
    )
    return lambda message: [scorer.calculate(message, context) for scorer in scorers]
