"""Factories for ready-made dispatchers, and the longer names kept as aliases.

Each preset sets a few configuration fields. Explicit choices win over a preset: a field of
``config`` that differs from its default is kept, and keyword ``overrides`` (any
`LLMQueueDispatcherConfig` field) are applied last.

>>> from llm_queue_dispatcher import create_in_memory_queue, ManualClock
>>> dispatcher = create_in_memory_queue(clock=ManualClock(), buffer_size=10)
>>> dispatcher.config.buffer_size
10
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .config import LLMQueueDispatcherConfig
from .dispatcher import LLMQueueDispatcher
from .errors import InvalidConfigError
from .scoring import ScoringConfig, ScoringWeights
from .storage import InMemoryStorage, QueueStorageAdapter

__all__ = [
    "create_fair_llm_queue_dispatcher",
    "create_fair_priority_queue",
    "create_fair_queue",
    "create_in_memory_llm_queue_dispatcher",
    "create_in_memory_queue",
    "create_llm_queue_dispatcher",
    "create_prefetching_llm_queue_dispatcher",
    "create_prefetching_queue",
    "create_simple_priority_llm_queue_dispatcher",
    "create_simple_priority_queue",
    "create_throughput_optimized_llm_queue_dispatcher",
    "create_throughput_optimized_queue",
]

T = TypeVar("T")

_DEFAULTS = LLMQueueDispatcherConfig()


def _weights(
    priority: float,
    efficiency: float,
    wait_time: float,
    retry: float,
    token_fit: float,
    processing_time: float,
) -> ScoringConfig:
    return ScoringConfig(
        weights=ScoringWeights(
            priority=priority,
            efficiency=efficiency,
            wait_time=wait_time,
            retry=retry,
            token_fit=token_fit,
            processing_time=processing_time,
        )
    )


def _build_config(
    config: LLMQueueDispatcherConfig | None, preset: dict[str, Any], overrides: dict[str, Any]
) -> LLMQueueDispatcherConfig:
    if config is not None and not isinstance(config, LLMQueueDispatcherConfig):
        raise InvalidConfigError(f"config must be an LLMQueueDispatcherConfig or None, got {config!r}")
    known = {f.name for f in dataclasses.fields(LLMQueueDispatcherConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidConfigError(f"unknown configuration field(s): {', '.join(unknown)}")
    # Never `_DEFAULTS` itself: the config built here would share its `slo_targets` dict, and a
    # change through one dispatcher's config would reach every dispatcher built later.
    base = config if config is not None else LLMQueueDispatcherConfig()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LLMQueueDispatcherConfig)}
    for name, value in preset.items():
        # A preset only fills fields the caller left at their default.
        if fields[name] == getattr(_DEFAULTS, name):
            fields[name] = value
        elif name == "scoring" and fields[name].weights is None:
            # The caller brought custom scorers but no weights: keep both.
            fields[name] = ScoringConfig(
                weights=value.weights, custom_scorers=list(fields[name].custom_scorers)
            )
    fields.update(overrides)
    return LLMQueueDispatcherConfig(**fields)


def create_llm_queue_dispatcher(
    storage: QueueStorageAdapter[T], config: LLMQueueDispatcherConfig | None = None, **overrides: Any
) -> LLMQueueDispatcher[T]:
    """A dispatcher over ``storage`` with ``config`` and keyword overrides of its fields."""
    return LLMQueueDispatcher(storage, _build_config(config, {}, overrides))


def create_in_memory_llm_queue_dispatcher(
    config: LLMQueueDispatcherConfig | None = None, **overrides: Any
) -> LLMQueueDispatcher[Any]:
    """A dispatcher over a new `InMemoryStorage` that shares the configuration's clock."""
    built = _build_config(config, {}, overrides)
    return LLMQueueDispatcher(InMemoryStorage(clock=built.clock), built)


def create_prefetching_queue(
    storage: QueueStorageAdapter[T], config: LLMQueueDispatcherConfig | None = None, **overrides: Any
) -> LLMQueueDispatcher[T]:
    """Prefetch on, a 100-message buffer refreshed every 5 s: for stores with slow receives."""
    preset = {"enable_prefetch": True, "buffer_size": 100, "prefetch_interval": 5.0}
    return LLMQueueDispatcher(storage, _build_config(config, preset, overrides))


def create_simple_priority_queue(
    storage: QueueStorageAdapter[T], config: LLMQueueDispatcherConfig | None = None, **overrides: Any
) -> LLMQueueDispatcher[T]:
    """Mostly priority order (weights 0.8/0.05/0.1/0.05/0/0)."""
    preset = {"scoring": _weights(0.8, 0.05, 0.1, 0.05, 0.0, 0.0)}
    return LLMQueueDispatcher(storage, _build_config(config, preset, overrides))


def create_throughput_optimized_queue(
    storage: QueueStorageAdapter[T], config: LLMQueueDispatcherConfig | None = None, **overrides: Any
) -> LLMQueueDispatcher[T]:
    """Favours requests that use the TPM budget well (prefetch, buffer 200, 50 candidates)."""
    preset = {
        "enable_prefetch": True,
        "buffer_size": 200,
        "max_candidates_to_evaluate": 50,
        "scoring": _weights(0.15, 0.35, 0.1, 0.05, 0.25, 0.1),
    }
    return LLMQueueDispatcher(storage, _build_config(config, preset, overrides))


def create_fair_queue(
    storage: QueueStorageAdapter[T], config: LLMQueueDispatcherConfig | None = None, **overrides: Any
) -> LLMQueueDispatcher[T]:
    """Wait time first (weights 0.2/0.1/0.5/0.15/0.05/0): close to FIFO within the budget."""
    preset = {"scoring": _weights(0.2, 0.1, 0.5, 0.15, 0.05, 0.0)}
    return LLMQueueDispatcher(storage, _build_config(config, preset, overrides))


def create_fair_priority_queue(
    storage: QueueStorageAdapter[T] | None = None,
    config: LLMQueueDispatcherConfig | None = None,
    **overrides: Any,
) -> LLMQueueDispatcher[T]:
    """The ``fair_priority`` policy: URGENT first, then the tenant with the least recent token use,
    priority, deadline and age inside a tenant (see `FairPriorityConfig`). Without ``storage``, a
    new `InMemoryStorage` sharing the configuration's clock.

    >>> from llm_queue_dispatcher import FairPriorityConfig, ManualClock, create_fair_priority_queue
    >>> dispatcher = create_fair_priority_queue(
    ...     clock=ManualClock(), fair_priority=FairPriorityConfig(tenant_weights={"vip": 2.0})
    ... )
    >>> dispatcher.config.policy
    'fair_priority'
    """
    built = _build_config(config, {"policy": "fair_priority"}, overrides)
    store: QueueStorageAdapter[Any] = storage if storage is not None else InMemoryStorage(clock=built.clock)
    return LLMQueueDispatcher(store, built)


# The longer names of the TypeScript library, @aid-on/llm-queue-dispatcher, kept as aliases.
create_in_memory_queue = create_in_memory_llm_queue_dispatcher
create_prefetching_llm_queue_dispatcher = create_prefetching_queue
create_simple_priority_llm_queue_dispatcher = create_simple_priority_queue
create_throughput_optimized_llm_queue_dispatcher = create_throughput_optimized_queue
create_fair_llm_queue_dispatcher = create_fair_queue
