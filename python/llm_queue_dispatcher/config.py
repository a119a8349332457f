"""Dispatcher configuration."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import InvalidConfigError
from .storage.base import MAX_VISIBILITY_TIMEOUT

if TYPE_CHECKING:
    from .scoring import ScoringConfig

__all__ = ["FairPriorityConfig", "LLMQueueDispatcherConfig", "Policy"]

#: The scheduling policies: "score" (the weighted score, exact over the queue) and
#: "fair_priority" (URGENT first, then the tenant with the least recent token use).
Policy = Literal["score", "fair_priority"]

_POLICIES = ("score", "fair_priority")


def _default_max_wait() -> dict[int, float]:
    from .types import Priority

    return {Priority.HIGH: 60.0, Priority.NORMAL: 300.0, Priority.LOW: 900.0}


@dataclass
class FairPriorityConfig:
    """Settings of the ``fair_priority`` policy (read when ``policy == "fair_priority"``).

    * ``tenant_weights``: share weight per tenant (default 1.0): a tenant of weight 2 may use
      twice the tokens of one of weight 1 before ranking behind it.
    * ``fairness_window``: seconds of token use that rank tenants.
    * ``reserve_tokens``: tokens a tenant with more than one waiting message may not take from
      the bucket, so that a lone request of a light tenant, or an URGENT one, finds budget at
      once. None chooses it automatically: twice the mean estimate of the last 256 dispatched
      requests, at most 10 % of the token capacity (1 % before the first dispatch).
    * ``urgent_first``: URGENT messages of every tenant go ahead of fairness, oldest first.
    * ``max_wait``: seconds after which a waiting message of that priority ranks as HIGH (never
      as URGENT); priorities not listed never age.
    """

    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    fairness_window: float = 60.0
    reserve_tokens: int | None = None
    urgent_first: bool = True
    max_wait: Mapping[int, float] = field(default_factory=_default_max_wait)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises `InvalidConfigError` naming the first bad field."""
        if not isinstance(self.tenant_weights, Mapping):
            raise InvalidConfigError(f"tenant_weights must be a mapping, got {self.tenant_weights!r}")
        for tenant, weight in self.tenant_weights.items():
            if not isinstance(tenant, str):
                raise InvalidConfigError(f"tenant_weights keys must be tenant names (str), got {tenant!r}")
            _require_number(f"tenant_weights[{tenant!r}]", weight, minimum=0.0, inclusive=False)
        _require_number("fairness_window", self.fairness_window, minimum=0.0, inclusive=False)
        if self.reserve_tokens is not None:
            _require_int("reserve_tokens", self.reserve_tokens, minimum=0)
        if not isinstance(self.urgent_first, bool):
            raise InvalidConfigError(f"urgent_first must be a bool, got {self.urgent_first!r}")
        if not isinstance(self.max_wait, Mapping):
            raise InvalidConfigError(
                f"max_wait must be a mapping of priority to seconds, got {self.max_wait!r}"
            )
        for priority, seconds in self.max_wait.items():
            if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 3:
                raise InvalidConfigError(
                    f"max_wait keys must be HIGH, NORMAL or LOW (URGENT never ages), got {priority!r}"
                )
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
                raise InvalidConfigError(f"max_wait[{priority!r}] must be seconds >= 0, got {seconds!r}")

    def max_wait_by_priority(self) -> list[float]:
        """Seconds per priority 0..3 (infinite where a priority does not age)."""
        return [math.inf] + [float(self.max_wait.get(p, math.inf)) for p in (1, 2, 3)]


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
    policy: Policy = "score"
    hold_budget: bool = True
    fair_priority: FairPriorityConfig | None = None
    drop_expired: bool = False

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
        if self.policy not in _POLICIES:
            raise InvalidConfigError(f"policy must be 'score' or 'fair_priority', got {self.policy!r}")
        for name in ("hold_budget", "drop_expired"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.fair_priority is not None:
            if not isinstance(self.fair_priority, FairPriorityConfig):
                raise InvalidConfigError(
                    f"fair_priority must be a FairPriorityConfig or None, got {self.fair_priority!r}"
                )
            self.fair_priority.validate()
        if self.policy == "fair_priority" and self.scoring is not None:
            raise InvalidConfigError(
                "policy 'fair_priority' ranks without weights: scoring (weights, custom scorers) does not "
                "apply; leave it None"
            )
