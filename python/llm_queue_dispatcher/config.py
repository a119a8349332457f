"""Dispatcher configuration."""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ._checks import finite_float, shown
from .errors import InvalidConfigError, InvalidRequestError
from .storage.base import MAX_VISIBILITY_TIMEOUT

if TYPE_CHECKING:
    from .scoring import ScoringConfig

__all__ = ["DEFAULT_SLO_TARGETS", "FairPriorityConfig", "LLMQueueDispatcherConfig", "Policy"]

#: The scheduling policies: "score" (the weighted score, exact over the queue) and
#: "fair_priority" (URGENT first, then the tenant with the least recent token use).
Policy = Literal["score", "fair_priority"]

_POLICIES = ("score", "fair_priority")


#: The default wait targets (seconds from enqueue to dispatch) per priority that
#: ``get_queue_metrics().scheduling`` measures SLO attainment against: URGENT within 1 s, HIGH
#: within 30 s, NORMAL within 5 minutes, LOW within 30 minutes (the defaults of ``llmqd
#: simulate --slo``).
DEFAULT_SLO_TARGETS: Mapping[str, float] = {"URGENT": 1.0, "HIGH": 30.0, "NORMAL": 300.0, "LOW": 1800.0}

_PRIORITY_NAMES = ("URGENT", "HIGH", "NORMAL", "LOW")


def _default_slo_targets() -> dict[str, float]:
    return dict(DEFAULT_SLO_TARGETS)


def _default_max_wait() -> dict[int, float]:
    from .types import Priority

    return {Priority.HIGH: 60.0, Priority.NORMAL: 300.0, Priority.LOW: 900.0}


@dataclass
class FairPriorityConfig:
    """Settings of the ``fair_priority`` policy (read when ``policy == "fair_priority"``).

    * ``tenant_weights``: share weight per tenant (default 1.0): a tenant of weight 2 may use
      twice the tokens of one of weight 1 before ranking behind it.
    * ``fairness_window``: seconds of token use that rank tenants.
    * ``reserve_tokens``: the tenant reserve, tokens a backlogged tenant (more than one waiting
      message, at least its fair share of the window used, another tenant active) leaves in the
      bucket on top of the URGENT reserve, so that a request of a quiet tenant finds budget at
      once. None chooses it automatically: 1.5 times the largest of the last 256 dispatched
      estimates, at most 10 % of the token capacity (1 % before the first dispatch).
    * ``urgent_first``: URGENT messages of every tenant go ahead of fairness, oldest first, and
      every other dispatch leaves the URGENT reserve (``LLMQueueDispatcherConfig.urgent_reserve``).
      False: URGENT ranks inside its tenant, and no URGENT reserve is kept.
    * ``max_wait``: seconds after which a waiting NORMAL or LOW message is aged: it ranks as
      HIGH behind every native HIGH message of its tenant (never as URGENT); priorities not
      listed never age.
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
        _plain_numbers(self, ("fairness_window", "reserve_tokens"))
        if not isinstance(self.tenant_weights, Mapping):
            raise InvalidConfigError(f"tenant_weights must be a mapping, got {shown(self.tenant_weights)}")
        for tenant, weight in self.tenant_weights.items():
            if not isinstance(tenant, str) or not _is_unicode(tenant):
                raise InvalidConfigError(
                    f"tenant_weights keys must be tenant names (str of valid Unicode), got {shown(tenant)}"
                )
            _require_number(f"tenant_weights[{tenant!r}]", weight, minimum=0.0, inclusive=False)
        _require_number("fairness_window", self.fairness_window, minimum=0.0, inclusive=False)
        if self.reserve_tokens is not None:
            _require_int("reserve_tokens", self.reserve_tokens, minimum=0)
            # The core holds the reserve as a float: a count no float can hold is refused here,
            # not by an OverflowError when a dispatcher starts.
            if finite_float(self.reserve_tokens) is None:
                raise InvalidConfigError(
                    f"reserve_tokens must be an int a float can hold, got {shown(self.reserve_tokens)}"
                )
        if not isinstance(self.urgent_first, bool):
            raise InvalidConfigError(f"urgent_first must be a bool, got {shown(self.urgent_first)}")
        if not isinstance(self.max_wait, Mapping):
            raise InvalidConfigError(
                f"max_wait must be a mapping of priority to seconds, got {shown(self.max_wait)}"
            )
        for priority, seconds in self.max_wait.items():
            if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 3:
                raise InvalidConfigError(
                    f"max_wait keys must be HIGH, NORMAL or LOW (URGENT never ages), got {shown(priority)}"
                )
            # inf is valid (that priority never ages); an int too large for a float is not.
            figure = finite_float(seconds)
            if seconds != math.inf and (figure is None or figure < 0):
                raise InvalidConfigError(
                    f"max_wait[{priority!r}] must be seconds >= 0 (inf: never), got {shown(seconds)}"
                )

    def max_wait_by_priority(self) -> list[float]:
        """Seconds per priority 0..3 (infinite where a priority does not age)."""
        return [math.inf] + [float(self.max_wait.get(p, math.inf)) for p in (1, 2, 3)]


def _plain_numbers(config: object, names: tuple[str, ...]) -> None:
    """Replaces each integer-like field (a numpy integer: ``__index__``, not an int) by the int
    it stands for, so every reader of the field, in Python or in the core, takes it."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) and hasattr(type(value), "__index__"):
            with contextlib.suppress(TypeError):  # numpy's bool has __index__ and refuses
                setattr(config, name, operator.index(value))


def _require_number(name: str, value: object, *, minimum: float, inclusive: bool = True) -> None:
    """An int or float (not a bool) of finite value, an int too large for a float refused;
    ``>= minimum`` (``> minimum`` unless ``inclusive``)."""
    number = finite_float(value)
    if number is None:
        raise InvalidConfigError(f"{name} must be a finite number, got {shown(value)}")
    if number < minimum or (not inclusive and number == minimum):
        relation = ">=" if inclusive else ">"
        raise InvalidConfigError(f"{name} must be {relation} {minimum}, got {shown(value)}")


def _require_int(name: str, value: object, *, minimum: int, maximum: int = sys.maxsize) -> None:
    """An int (not a bool; `_plain_numbers` turned integer-likes into ints) within [minimum,
    maximum]. The default maximum is the largest count the core holds (``sys.maxsize``): a larger
    one would raise `OverflowError` where it is used, far from the field that caused it."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidConfigError(f"{name} must be an int from {minimum} to {maximum}, got {shown(value)}")


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogates), as the core's strings must be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    #: Score policy: every URGENT request ranks above every other, whatever the scores (among
    #: URGENT ones the score decides). False: URGENT is the priority factor's 1.0 among six
    #: weighted factors, the TypeScript library's rule. None (the default) follows
    #: ``hold_budget``: on when the budget is held, off with ``hold_budget=False``, which stays
    #: the TypeScript library's rule exactly. (``fair_priority`` has its own switch,
    #: ``FairPriorityConfig.urgent_first``.)
    urgent_first: bool | None = None
    #: Tokens every non-URGENT dispatch leaves in the bucket for URGENT requests, under both
    #: policies while URGENT goes first (none otherwise). None: automatic, twice the largest of
    #: the last 64 URGENT estimates (none before the first), at most a quarter of the token
    #: capacity. 0: none.
    urgent_reserve: int | None = None
    #: Wait targets in seconds (from enqueue to dispatch) per priority, keyed by name
    #: (``"URGENT"``, ``"HIGH"``, ``"NORMAL"``, ``"LOW"``) or by `Priority`: the SLO attainment
    #: of ``get_queue_metrics().scheduling`` is the share of each priority's recent dispatches
    #: that waited at most its target. A priority left out keeps its default
    #: (`DEFAULT_SLO_TARGETS`); ``inf`` counts every dispatch as met.
    slo_targets: Mapping[str, float] | Mapping[int, float] = field(default_factory=_default_slo_targets)

    def __post_init__(self) -> None:
        self.validate()

    def slo_targets_by_priority(self) -> list[float]:
        """The wait target of each priority, URGENT first (the defaults where not given)."""
        targets = [float(DEFAULT_SLO_TARGETS[name]) for name in _PRIORITY_NAMES]
        for key, seconds in self.slo_targets.items():
            index = _PRIORITY_NAMES.index(key) if isinstance(key, str) else int(key)
            targets[index] = float(seconds)
        return targets

    def score_urgent_first(self) -> bool:
        """Whether the score policy ranks URGENT first: ``urgent_first``, or ``hold_budget``
        when it is None."""
        return self.hold_budget if self.urgent_first is None else self.urgent_first

    @classmethod
    def _checked_copy(cls, config: object) -> LLMQueueDispatcherConfig:
        """A dispatcher's own copy of ``config`` (None: the defaults), checked: changing the
        caller's object later, or the objects it holds (``slo_targets``, ``fair_priority``,
        ``scoring``), changes nothing. Raises `InvalidRequestError` for anything but a
        config or None, and `InvalidConfigError` naming the first bad field."""
        if config is None:
            return cls()
        if not isinstance(config, LLMQueueDispatcherConfig):
            raise InvalidRequestError(f"config must be an LLMQueueDispatcherConfig or None, got {config!r}")
        copy = replace(config)
        copy.validate()
        copy._own_containers()
        object.__setattr__(copy, "_fixed", True)
        return copy

    def __setattr__(self, name: str, value: Any) -> None:
        # A dispatcher reads its config when it is built, and a few fields again later (the
        # prefetch settings, the buffer size in the metrics, the visibility a Worker extends
        # leases by): a change to its copy would apply half-way, unchecked (a buffer_size of 0
        # broke get_queue_metrics). So the copy a dispatcher holds refuses every change.
        if self.__dict__.get("_fixed", False):
            raise InvalidConfigError(
                f"a dispatcher's config is fixed when the dispatcher is built: {name} cannot change; "
                f"build another dispatcher, e.g. from dataclasses.replace(dispatcher.config, {name}=...)"
            )
        object.__setattr__(self, name, value)

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle of a dispatcher's config is the caller's to change.
        state = dict(self.__dict__)
        state.pop("_fixed", None)
        return state

    def _own_containers(self) -> None:
        """Replaces the mutable objects this config shares with its caller (the SLO targets, the
        fair-priority settings and their mappings, the scoring settings, their weights and
        scorers) by copies, so that a later change to the caller's objects, or to the copy's,
        reaches neither the other nor any other dispatcher."""
        from .scoring import ScoringConfig

        self.slo_targets = dict(self.slo_targets)
        if self.fair_priority is not None:
            fair = self.fair_priority
            self.fair_priority = replace(
                fair, tenant_weights=dict(fair.tenant_weights), max_wait=dict(fair.max_wait)
            )
        if self.scoring is not None:
            scoring = self.scoring
            self.scoring = ScoringConfig(
                weights=None if scoring.weights is None else replace(scoring.weights),
                custom_scorers=[replace(scorer) for scorer in scoring.custom_scorers],
            )

    def _core_options(self) -> dict[str, Any]:
        """The keyword arguments of the dispatcher's Rust core (`DispatchCore`) this config sets:
        the scoring weights and custom scorers' names and weights, the policy and its fair
        shares, and the limits of the search, the reservations and the metrics."""
        from .scoring import ScoringConfig, ScoringWeights

        scoring = self.scoring or ScoringConfig()
        scorers = scoring.custom_scorers
        fair = self.fair_priority or FairPriorityConfig()
        return {
            "clock": self.clock,
            "weights": (scoring.weights or ScoringWeights()).as_tuple(),
            "custom_weights": [float(scorer.weight) for scorer in scorers],
            "custom_names": [str(scorer.name) for scorer in scorers],
            "max_candidates": self.max_candidates_to_evaluate,
            "policy": self.policy,
            "tenant_weights": [(name, float(weight)) for name, weight in fair.tenant_weights.items()],
            "fairness_window": float(fair.fairness_window),
            "urgent_first": fair.urgent_first,
            "max_wait": fair.max_wait_by_priority(),
            "reserve_tokens": None if fair.reserve_tokens is None else float(fair.reserve_tokens),
            "visibility_timeout": self.visibility_timeout,
            "min_score": self.min_score_threshold,
            "reserve": self.reserve_budget,
            "hold": self.hold_budget,
            "metrics_retention": self.metrics_retention,
            "score_urgent_first": self.score_urgent_first(),
            "urgent_reserve": None if self.urgent_reserve is None else float(self.urgent_reserve),
            "slo_targets": self.slo_targets_by_priority(),
        }

    def validate(self) -> None:
        """Raises `InvalidConfigError` naming the first bad field."""
        _plain_numbers(
            self,
            (
                "buffer_size",
                "max_candidates_to_evaluate",
                "prefetch_interval",
                "min_score_threshold",
                "metrics_retention",
                "visibility_timeout",
            ),
        )
        _require_int("buffer_size", self.buffer_size, minimum=1)
        _require_int("max_candidates_to_evaluate", self.max_candidates_to_evaluate, minimum=1)
        _require_number("prefetch_interval", self.prefetch_interval, minimum=0.0, inclusive=False)
        _require_number("min_score_threshold", self.min_score_threshold, minimum=-math.inf)
        _require_number("metrics_retention", self.metrics_retention, minimum=0.0, inclusive=False)
        _require_number("visibility_timeout", self.visibility_timeout, minimum=0.0)
        if self.visibility_timeout > MAX_VISIBILITY_TIMEOUT:
            raise InvalidConfigError(
                f"visibility_timeout must be <= {MAX_VISIBILITY_TIMEOUT}, "
                f"got {shown(self.visibility_timeout)}"
            )
        if not isinstance(self.enable_prefetch, bool):
            raise InvalidConfigError(f"enable_prefetch must be a bool, got {shown(self.enable_prefetch)}")
        if not isinstance(self.reserve_budget, bool):
            raise InvalidConfigError(f"reserve_budget must be a bool, got {shown(self.reserve_budget)}")
        if self.logger is not None and not isinstance(self.logger, logging.Logger):
            raise InvalidConfigError(f"logger must be a logging.Logger or None, got {shown(self.logger)}")
        if self.clock is not None and not callable(self.clock):
            raise InvalidConfigError(f"clock must be a ManualClock or a callable, got {shown(self.clock)}")
        if self.scoring is not None:
            from .scoring import ScoringConfig

            if not isinstance(self.scoring, ScoringConfig):
                raise InvalidConfigError(
                    f"scoring must be a ScoringConfig or None, got {shown(self.scoring)}"
                )
            self.scoring.validate()
        if self.policy not in _POLICIES:
            raise InvalidConfigError(f"policy must be 'score' or 'fair_priority', got {shown(self.policy)}")
        for name in ("hold_budget", "drop_expired"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfigError(f"{name} must be a bool, got {shown(getattr(self, name))}")
        if self.policy == "score":
            self._check_threshold_reachable()
        if self.fair_priority is not None:
            if not isinstance(self.fair_priority, FairPriorityConfig):
                raise InvalidConfigError(
                    f"fair_priority must be a FairPriorityConfig or None, got {shown(self.fair_priority)}"
                )
            self.fair_priority.validate()
        if self.urgent_first is not None and not isinstance(self.urgent_first, bool):
            raise InvalidConfigError(f"urgent_first must be a bool or None, got {shown(self.urgent_first)}")
        if self.policy == "fair_priority" and self.urgent_first is not None:
            raise InvalidConfigError(
                "urgent_first applies to the score policy; with policy 'fair_priority' set "
                "FairPriorityConfig.urgent_first instead"
            )
        if self.urgent_reserve is not None:
            _require_int("urgent_reserve", self.urgent_reserve, minimum=0)
            if finite_float(self.urgent_reserve) is None:
                raise InvalidConfigError(
                    f"urgent_reserve must be an int a float can hold, got {shown(self.urgent_reserve)}"
                )
        self._check_slo_targets()
        if self.policy == "fair_priority" and self.scoring is not None:
            raise InvalidConfigError(
                "policy 'fair_priority' ranks without weights: scoring (weights, custom scorers) does not "
                "apply; leave it None"
            )

    def _check_slo_targets(self) -> None:
        if not isinstance(self.slo_targets, Mapping):
            raise InvalidConfigError(
                f"slo_targets must be a mapping of priority to seconds, got {shown(self.slo_targets)}"
            )
        seen: dict[int, object] = {}
        for key, seconds in self.slo_targets.items():
            if isinstance(key, str) and key in _PRIORITY_NAMES:
                index = _PRIORITY_NAMES.index(key)
            elif not isinstance(key, (bool, str)) and isinstance(key, int) and 0 <= key <= 3:
                index = int(key)
            else:
                raise InvalidConfigError(
                    "slo_targets keys must be priorities: 'URGENT', 'HIGH', 'NORMAL', 'LOW' or a "
                    f"Priority, got {shown(key)}"
                )
            if index in seen:
                raise InvalidConfigError(
                    f"slo_targets gives {_PRIORITY_NAMES[index]} twice "
                    f"({shown(seen[index])} and {shown(key)})"
                )
            seen[index] = key
            # inf is valid (every dispatch meets it); an int too large for a float is not.
            figure = finite_float(seconds)
            if seconds != math.inf and (figure is None or figure < 0):
                raise InvalidConfigError(
                    f"slo_targets[{key!r}] must be seconds >= 0 (inf: always met), got {shown(seconds)}"
                )

    def _check_threshold_reachable(self) -> None:
        """Refuses a score policy whose ``min_score_threshold`` no message can reach. Each factor
        and each custom score is at most 1, so no total exceeds the sum of the weights: below the
        threshold, nothing would ever be dispatched and the queue would only grow, silently.
        (All weights 0 with a threshold <= 0 is valid: every message scores 0 and ties decide.)"""
        from .scoring import ScoringWeights

        scoring = self.scoring
        weights = (scoring.weights if scoring is not None else None) or ScoringWeights()
        custom = [float(scorer.weight) for scorer in scoring.custom_scorers] if scoring is not None else []
        highest = sum(weights.as_tuple()) + sum(custom)
        threshold = float(self.min_score_threshold)
        # A margin for float rounding: weights that add up to the threshold reach it.
        if highest + 1e-9 >= threshold:
            return
        if highest == 0.0:
            why = (
                "every factor weight is 0 and no custom scorer has a positive weight, so every message "
                "scores 0"
            )
        else:
            why = f"the weights add up to {highest:g}, and each factor and custom score is at most 1"
        raise InvalidConfigError(
            f"min_score_threshold={shown(self.min_score_threshold)} can never be reached: {why}; nothing "
            "would ever be dispatched. Give the factors more weight, or lower min_score_threshold "
            "(<= 0 dispatches whatever the scores)"
        )
