"""Dispatcher configuration."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidConfigError
from .storage.base import MAX_VISIBILITY_TIMEOUT

if TYPE_CHECKING:
    from .scoring import ScoringConfig

__all__ = ["LLMQueueDispatcherConfig"]


def _require_number(name: str, value: object, *, minimum: float, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidConfigError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        relation = ">=" if inclusive else ">"
        raise InvalidConfigError(f"{name} must be {relation} {minimum}, got {value!r}")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class LLMQueueDispatcherConfig:
    """How a dispatcher selects, buffers and measures. Validated by `validate()` and on use.

    Durations are float seconds. ``clock`` is a `ManualClock`, a callable returning seconds, or
    None for the system clocks.
    """

    buffer_size: int = 50
    enable_prefetch: bool = False
    prefetch_interval: float = 5.0
    max_candidates_to_evaluate: int = 20
    min_score_threshold: float = 0.1
    scoring: ScoringConfig | None = None
    metrics_retention: float = 300.0
    logger: logging.Logger | None = None
    visibility_timeout: float = 30.0
    reserve_budget: bool = True
    clock: Any = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises `InvalidConfigError` naming the first bad field."""
        _require_int("buffer_size", self.buffer_size, minimum=1)
        _require_int("max_candidates_to_evaluate", self.max_candidates_to_evaluate, minimum=1)
        _require_number("prefetch_interval", self.prefetch_interval, minimum=0.0, inclusive=False)
        _require_number("min_score_threshold", self.min_score_threshold, minimum=-math.inf)
        _require_number("metrics_retention", self.metrics_retention, minimum=0.0, inclusive=False)
        _require_number("visibility_timeout", self.visibility_timeout, minimum=0.0)
        if self.visibility_timeout > MAX_VISIBILITY_TIMEOUT:
            raise InvalidConfigError(
                f"visibility_timeout must be <= {MAX_VISIBILITY_TIMEOUT}, got {self.visibility_timeout!r}"
            )
        if not isinstance(self.enable_prefetch, bool):
            raise InvalidConfigError(f"enable_prefetch must be a bool, got {self.enable_prefetch!r}")
        if not isinstance(self.reserve_budget, bool):
            raise InvalidConfigError(f"reserve_budget must be a bool, got {self.reserve_budget!r}")
        if self.logger is not None and not isinstance(self.logger, logging.Logger):
            raise InvalidConfigError(f"logger must be a logging.Logger or None, got {self.logger!r}")
        if self.clock is not None and not callable(self.clock):
            raise InvalidConfigError(f"clock must be a ManualClock or a callable, got {self.clock!r}")
        if self.scoring is not None:
            from .scoring import ScoringConfig

            if not isinstance(self.scoring, ScoringConfig):
                raise InvalidConfigError(f"scoring must be a ScoringConfig or None, got {self.scoring!r}")
