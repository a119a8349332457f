"""`LLMQueueDispatcher`: picks the best request the rate limiter can take now, and tracks it.

With `InMemoryStorage` a dequeue is one call into Rust: exact selection over every visible
message, the budget reservation on an `LLMThrottle`, and the receive, under one lock, with no
await. With any other adapter the dispatcher keeps a prefetch buffer (a Rust candidate index of
leased messages), runs the same exact search over it, and keeps the leases alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._core import CandidateBuffer, LLMThrottle, ScoringParams
from .config import LLMQueueDispatcherConfig
from .errors import InvalidRequestError, MessageStateError, ReceiptHandleError, UnknownRequestError
from .metrics import (
    InFlightDetail,
    MetricsRecorder,
    PerformanceMetrics,
    ProcessingMetrics,
    QueueMetrics,
    QueueMetricsReport,
)
from .scoring import FACTOR_NAMES, MessageScore, ScoringConfig, ScoringContext, ScoringWeights
from .storage import InMemoryStorage, QueueStorageAdapter
from .storage.base import MAX_VISIBILITY_TIMEOUT
from .throttle import RateLimiter
from .types import Priority, QueueMessage, validate_token_count

__all__ = ["LLMQueueDispatcher", "ProcessableMessage"]

T = TypeVar("T")

_LOGGER = logging.getLogger("llm_queue_dispatcher")

# When a message is visible and fits but scores below min_score_threshold, its score only rises
# with its wait time; re-check after this long rather than spin.
_BELOW_THRESHOLD_RECHECK = 0.05


def _describe(score: MessageScore) -> str:
    """A human explanation naming the top weighted factors."""
    top = sorted(score.breakdown.items(), key=lambda item: item[1], reverse=True)[:3]
    parts = ", ".join(f"{name} {value:.3f}" for name, value in top if value > 0)
    return f"score {score.total:.3f}: {parts}" if parts else f"score {score.total:.3f}"


class ProcessableMessage(Generic[T]):
    """A message handed out by `LLMQueueDispatcher.dequeue`, to be marked exactly once.

    ``async with processable:`` marks it processed on a normal exit and failed on an exception
    (which is re-raised).
    """

    __slots__ = ("_dispatcher", "_limiter", "_reserved", "_settled", "dispatched_at", "message", "score")

    def __init__(
        self,
        dispatcher: LLMQueueDispatcher[T],
        message: QueueMessage[T],
        score: MessageScore,
        limiter: RateLimiter,
        reserved: bool,
        dispatched_at: float,
    ) -> None:
        self.message = message
        self.score = score
        self.dispatched_at = dispatched_at
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._reserved = reserved
        self._settled = False

    @property
    def reason(self) -> str:
        """Why this message won: its total and its top weighted factors."""
        return _describe(self.score)

    def _settle(self, action: str) -> None:
        if self._settled:
            raise MessageStateError(
                f"message {self.message.payload.id!r} was already marked; cannot {action}"
            )
        self._settled = True

    def _adjust(self, actual_tokens: int) -> None:
        if not self._reserved:
            return
        try:
            self._limiter.adjust_consumption(self.message.payload.id, actual_tokens)
        except UnknownRequestError:
            # The limiter forgot the reservation (older than its history retention): nothing to
            # adjust any more, and the message itself must still be settled.
            self._dispatcher._logger.warning(
                "rate limiter no longer knows request %r; its token count was not adjusted",
                self.message.payload.id,
            )

    async def mark_as_processed(self, actual_tokens: int | None = None) -> None:
        """Deletes the message; with a reservation, adjusts the limiter to ``actual_tokens``."""
        if actual_tokens is not None:
            actual_tokens = validate_token_count(actual_tokens, "actual_tokens")
        self._settle("mark it processed")
        dispatcher = self._dispatcher
        try:
            if dispatcher._native:
                # The in-memory store's core directly: the same call without a coroutine.
                dispatcher._selector.delete(self.message.attributes.receipt_handle)
            else:
                await dispatcher._storage.delete_message(self.message.attributes.receipt_handle)
        except BaseException:
            self._settled = False
            raise
        if actual_tokens is not None:
            self._adjust(actual_tokens)
        used = actual_tokens if actual_tokens is not None else self.message.payload.token_info.estimated
        self._dispatcher._on_settled(self, processed=True, tokens=used)

    async def mark_as_failed(self, error: BaseException, *, retry_after: float | None = None) -> None:
        """Makes the message visible again after ``retry_after`` s (default at once) and refunds
        its reserved tokens. The store's dead-letter rule applies."""
        delay = 0.0 if retry_after is None else retry_after
        if (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or not (0.0 <= delay <= MAX_VISIBILITY_TIMEOUT)
        ):
            raise InvalidRequestError(
                f"retry_after must be None or within [0, 43200] seconds, got {retry_after!r}"
            )
        self._settle("mark it failed")
        try:
            await self._dispatcher._storage.update_visibility_timeout(
                self.message.attributes.receipt_handle, delay
            )
        except BaseException:
            self._settled = False
            raise
        self._adjust(0)
        self._dispatcher._logger.info("request %r failed: %r", self.message.payload.id, error)
        self._dispatcher._on_settled(self, processed=False, tokens=0)

    async def mark_as_dead_lettered(self, error: BaseException) -> None:
        """Moves the message to the store's dead-letter target at once, whatever its receive
        count (a handler's `PermanentError`), and refunds its reserved tokens. Without a
        dead-letter target the store drops it and counts it, as its ``max_receive_count`` rule
        does."""
        self._settle("dead-letter it")
        try:
            await self._dispatcher._storage.dead_letter_message(self.message)
        except BaseException:
            self._settled = False
            raise
        self._adjust(0)
        self._dispatcher._logger.warning("request %r dead-lettered: %r", self.message.payload.id, error)
        self._dispatcher._on_settled(self, processed=False, tokens=0)

    async def update_visibility(self, seconds: float) -> None:
        """Keeps the message leased for ``seconds`` more, counted from now."""
        if self._settled:
            raise MessageStateError(f"message {self.message.payload.id!r} was already marked")
        await self._dispatcher._storage.update_visibility_timeout(
            self.message.attributes.receipt_handle, seconds
        )

    async def __aenter__(self) -> ProcessableMessage[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._settled:
            return
        if exc is None:
            await self.mark_as_processed()
        else:
            await self.mark_as_failed(exc)

    def __repr__(self) -> str:
        state = "marked" if self._settled else "in flight"
        return f"<ProcessableMessage {self.message.payload.id!r} {state} {self.reason}>"


class LLMQueueDispatcher(Generic[T]):
    """Scores every waiting request and hands out the best one the rate limiter can take now.

    >>> import asyncio
    >>> from llm_queue_dispatcher import (LLMRequest, LLMThrottle, ManualClock, Priority,
    ...     TokenInfo, create_in_memory_queue)
    >>> async def main() -> str:
    ...     clock = ManualClock()
    ...     async with create_in_memory_queue(clock=clock) as dispatcher:
    ...         await dispatcher.enqueue(LLMRequest("a", "hi", Priority.LOW, TokenInfo(100)))
    ...         await dispatcher.enqueue(LLMRequest("b", "yo", Priority.URGENT, TokenInfo(100)))
    ...         job = await dispatcher.dequeue(LLMThrottle(60, 10_000, clock=clock))
    ...         assert job is not None
    ...         async with job:
    ...             return job.message.payload.id
    >>> asyncio.run(main())
    'b'
    """

    def __init__(
        self, storage: QueueStorageAdapter[T], config: LLMQueueDispatcherConfig | None = None
    ) -> None:
        if not isinstance(storage, QueueStorageAdapter):
            raise InvalidRequestError(f"storage must be a QueueStorageAdapter, got {storage!r}")
        self.config = config if config is not None else LLMQueueDispatcherConfig()
        self.config.validate()
        self._storage = storage
        self._logger = self.config.logger or _LOGGER
        scoring = self.config.scoring or ScoringConfig()
        weights = scoring.weights or ScoringWeights()
        self._custom_scorers = list(scoring.custom_scorers)
        self._scoring_params = ScoringParams(
            weights.as_tuple(),
            [float(scorer.weight) for scorer in self._custom_scorers],
            self.config.max_candidates_to_evaluate,
        )
        self._breakdown_names = (*FACTOR_NAMES, *(scorer.name for scorer in self._custom_scorers))
        # Exactly InMemoryStorage: a subclass may override its methods, so it takes the general path.
        self._native = type(storage) is InMemoryStorage
        self._selector: Any = (
            storage.core
            if isinstance(storage, InMemoryStorage) and self._native
            else CandidateBuffer(self.config.clock)
        )
        self._clock = self.config.clock
        self._metrics = MetricsRecorder(self.config.metrics_retention)
        self._in_flight: dict[str, ProcessableMessage[T]] = {}
        self._changed: asyncio.Event | None = None
        self._prefetch_task: asyncio.Task[None] | None = None
        self._stopped = False
        self._reported_unfittable: set[str] = set()
        # Token capacity of the limiter last seen, for the unfittable count of the metrics.
        self._last_capacity: float | None = None

    # -- time and wake-ups -------------------------------------------------------------------
    def _now(self) -> float:
        clock = self._clock
        return float(clock()) if clock is not None else time.time()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- queue operations ----------------------------------------------------------------------
    async def enqueue(self, request: Any) -> QueueMessage[T]:
        """Stores ``request``; wakes a waiting `dequeue`."""
        if self._native:
            message: QueueMessage[T] = self._selector.enqueue(request)
        else:
            message = await self._storage.enqueue(request)
        self._notify()
        return message

    async def batch_enqueue(self, requests: Sequence[Any]) -> list[QueueMessage[T]]:
        """Stores all of ``requests`` or, on any bad one, none of them."""
        messages = await self._storage.batch_enqueue(requests)
        self._notify()
        return messages

    async def purge(self) -> None:
        """Removes every message from the store and the buffer."""
        self._release_buffer_locally()
        await self._storage.purge()
        self._notify()

    def _release_buffer_locally(self) -> list[QueueMessage[T]]:
        if self._native:
            return []
        drained: list[QueueMessage[T]] = self._selector.drain()
        return drained

    # -- selection -----------------------------------------------------------------------------
    def _custom_fn(self, rate_limiter: RateLimiter) -> Any:
        """The callable Rust asks for custom scores (call only with custom scorers configured)."""
        scorers = self._custom_scorers
        context = ScoringContext.lazy(
            rate_limiter_metrics=rate_limiter.get_metrics(),
            queue_metrics=self._queue_report_now,
            current_time=self._now(),
        )

        def evaluate(message: QueueMessage[T]) -> list[float]:
            return [scorer.calculate(message, context) for scorer in scorers]

        return evaluate

    def _select(self, rate_limiter: RateLimiter) -> ProcessableMessage[T] | None:
        started = time.perf_counter()
        config = self.config
        reserve = config.reserve_budget
        custom_fn = self._custom_fn(rate_limiter) if self._custom_scorers else None
        selector = self._selector
        if type(rate_limiter) is LLMThrottle:
            picked = selector.dispatch_native(
                rate_limiter,
                self._scoring_params,
                custom_fn,
                config.visibility_timeout,
                config.min_score_threshold,
                reserve,
            )
        else:
            metrics = rate_limiter.get_metrics()
            selection = selector.select(
                float(metrics.tpm.available),
                float(metrics.rpm.available),
                self._scoring_params,
                custom_fn,
                self.config.min_score_threshold,
            )
            if selection is None:
                return None
            if reserve and not rate_limiter.consume(selection.request_id, selection.tokens):
                return None
            picked = selector.take(selection, self.config.visibility_timeout)
            if picked is None and reserve:
                # The winner left between selection and take (another task): return its budget.
                with contextlib.suppress(UnknownRequestError):
                    rate_limiter.adjust_consumption(selection.request_id, 0)
        if picked is None:
            return None
        message, total, breakdown = picked
        score = MessageScore.of(total, dict(zip(self._breakdown_names, breakdown, strict=True)))
        now = self._now()
        processable = ProcessableMessage(self, message, score, rate_limiter, reserve, now)
        self._in_flight[message.payload.id] = processable
        wait = now - message.attributes.enqueued_at.timestamp()
        self._metrics.record_dispatch(now, wait, time.perf_counter() - started)
        return processable

    def _on_settled(self, processable: ProcessableMessage[T], *, processed: bool, tokens: int) -> None:
        self._in_flight.pop(processable.message.payload.id, None)
        if processed:
            self._metrics.record_completion(self._now(), tokens)
        else:
            self._metrics.record_failure()
        self._notify()

    async def _fill_buffer(self) -> None:
        """Tops the prefetch buffer up to ``buffer_size`` leased messages (external stores)."""
        missing = self.config.buffer_size - len(self._selector)
        if missing > 0:
            messages = await self._storage.dequeue(missing, self.config.visibility_timeout)
            if messages:
                self._selector.insert(messages)

    async def _take_lease(self, processable: ProcessableMessage[T]) -> bool:
        """Renews the lease of a message leaving the buffer; False if someone else now holds it."""
        try:
            await self._storage.update_visibility_timeout(
                processable.message.attributes.receipt_handle, self.config.visibility_timeout
            )
        except ReceiptHandleError:
            # Its visibility ran out while buffered and another consumer received it: never
            # hand out a message twice. Return the budget it reserved.
            processable._settled = True
            processable._adjust(0)
            self._in_flight.pop(processable.message.payload.id, None)
            return False
        return True

    async def _try_dequeue(self, rate_limiter: RateLimiter) -> ProcessableMessage[T] | None:
        if self._native:
            return self._select(rate_limiter)
        while True:
            await self._fill_buffer()
            processable = self._select(rate_limiter)
            if processable is None or await self._take_lease(processable):
                return processable

    async def dequeue(
        self, rate_limiter: RateLimiter, *, timeout: float | None = None
    ) -> ProcessableMessage[T] | None:
        """The best message the limiter can take now, with its budget reserved; or None.

        ``timeout=None`` returns at once. ``timeout=s`` waits up to ``s`` seconds of the event
        loop's time, sleeping until the earliest moment a message or the budget can change.
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise InvalidRequestError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
        if self._stopped and not self._native:
            raise MessageStateError("dispatcher is closed")
        if (
            self.config.enable_prefetch
            and not self._native
            and self._prefetch_task is None
            and not self._stopped
        ):
            self._prefetch_task = asyncio.get_running_loop().create_task(self._prefetch_loop())
        if timeout is None:
            found = self._select(rate_limiter) if self._native else await self._try_dequeue(rate_limiter)
            if found is None:
                self._report_unfittable(rate_limiter)
            return found
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._changed is None:
            self._changed = asyncio.Event()
        while True:
            # Clear before looking, so a change made while we look wakes the wait below.
            self._changed.clear()
            processable = await self._try_dequeue(rate_limiter)
            if processable is not None:
                return processable
            self._report_unfittable(rate_limiter)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            delay = min(remaining, self._time_until_change(rate_limiter))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)

    def _time_until_change(self, rate_limiter: RateLimiter) -> float:
        """Seconds until a message becomes visible or the smallest waiting one fits the budget."""
        now = self._now()
        candidates: list[float] = []
        if self._native:
            expiry = self._selector.next_visibility_change()
            if expiry is not None:
                candidates.append(max(0.0, expiry - now))
        else:
            candidates.append(self.config.prefetch_interval)
        smallest = self._selector.min_visible_tokens()
        if smallest is not None:
            wait = rate_limiter.can_process(smallest).available_in
            if math.isinf(wait):
                pass  # nothing waiting can ever fit: only an enqueue or a mark changes that
            elif wait > 0:
                candidates.append(wait)
            else:
                # It fits but scored below min_score_threshold: its score rises with its age.
                candidates.append(_BELOW_THRESHOLD_RECHECK)
        return min(candidates) if candidates else math.inf

    def _report_unfittable(self, rate_limiter: RateLimiter) -> None:
        """Logs, once each, the visible requests that exceed the limiter's token capacity (run
        whenever a dequeue finds nothing, so they never wait unnoticed)."""
        capacity = self._token_capacity(rate_limiter)
        self._last_capacity = capacity
        for request_id in self._selector.ids_above(capacity):
            if request_id not in self._reported_unfittable:
                self._reported_unfittable.add(request_id)
                self._logger.warning(
                    "request %r needs more tokens than the limiter can ever grant (capacity %s); "
                    "take it out with take_unfittable()",
                    request_id,
                    capacity,
                )

    @staticmethod
    def _token_capacity(rate_limiter: RateLimiter) -> float:
        return float(rate_limiter.get_metrics().tpm.limit)

    async def take_unfittable(self, rate_limiter: RateLimiter) -> list[QueueMessage[T]]:
        """Receives every visible message whose estimate exceeds the limiter's token capacity.

        Such a request can never be dispatched. The messages come back leased (in flight, no
        budget reserved); delete them, or fail them until the store dead-letters them.
        """
        capacity = self._token_capacity(rate_limiter)
        taken: list[QueueMessage[T]] = self._selector.take_above(capacity, self.config.visibility_timeout)
        for message in taken:
            self._reported_unfittable.discard(message.payload.id)
        return taken

    # -- prefetching and shutdown --------------------------------------------------------------
    async def _prefetch_loop(self) -> None:
        while not self._stopped:
            try:
                await self._fill_buffer()
                for handle in self._selector.handles():
                    try:
                        await self._storage.update_visibility_timeout(handle, self.config.visibility_timeout)
                    except ReceiptHandleError:
                        self._selector.discard(handle)
            except Exception:  # keep prefetching through transient storage failures
                self._logger.exception("prefetch failed; retrying in %s s", self.config.prefetch_interval)
            await asyncio.sleep(self.config.prefetch_interval)

    def stop(self) -> None:
        """Stops prefetching. Buffered messages stay leased until `close()` or their timeout."""
        self._stopped = True
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
            self._prefetch_task = None

    async def close(self) -> None:
        """Stops prefetching and releases buffered messages at once (visibility 0)."""
        self.stop()
        for message in self._release_buffer_locally():
            with contextlib.suppress(ReceiptHandleError):
                await self._storage.update_visibility_timeout(message.attributes.receipt_handle, 0.0)

    async def __aenter__(self) -> LLMQueueDispatcher[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- metrics -------------------------------------------------------------------------------
    def _queue_report_now(self) -> QueueMetricsReport:
        """The queue report from in-process state only (what custom scorers may read)."""
        now = self._now()
        average, percentiles = self._metrics.wait_times(now)
        by_priority = dict(zip([p.name for p in Priority], self._selector.counts_by_priority(), strict=True))
        oldest = self._selector.oldest_enqueued_at()
        visible = sum(by_priority.values())
        in_flight = len(self._in_flight) if not self._native else self._selector.in_flight_count()
        buffered = 0 if self._native else len(self._selector)
        return QueueMetricsReport(
            approximate_number_of_messages=visible,
            approximate_number_of_messages_in_flight=in_flight,
            buffered_messages=buffered,
            total_messages=visible + in_flight,
            messages_by_priority=by_priority,
            oldest_message_age=0.0 if oldest is None else max(0.0, now - oldest),
            average_wait_time=average,
            wait_time_percentiles=percentiles,
            throughput=self._metrics.throughput(now),
            dead_lettered=0,
            failed=self._metrics.failed,
            unfittable_messages=(
                0 if self._last_capacity is None else len(self._selector.ids_above(self._last_capacity))
            ),
        )

    async def get_queue_metrics(self) -> QueueMetrics:
        """Queue depth, waits, throughput (real tokens), in-flight details and dequeue latency."""
        attributes = await self._storage.get_queue_attributes()
        local = self._queue_report_now()
        now = self._now()
        if self._native:
            report = local
        else:
            visible = attributes.approximate_number_of_messages + local.buffered_messages
            in_flight = attributes.approximate_number_of_messages_in_flight
            report = QueueMetricsReport(
                **{
                    **local.__dict__,
                    "approximate_number_of_messages": visible,
                    "approximate_number_of_messages_in_flight": in_flight,
                    "total_messages": visible + in_flight,
                }
            )
        report = QueueMetricsReport(**{**report.__dict__, "dead_lettered": attributes.dead_lettered})
        details = [
            InFlightDetail(
                request_id=p.message.payload.id,
                message_id=p.message.id,
                priority=int(p.message.payload.priority),
                estimated_tokens=p.message.payload.token_info.estimated,
                score=p.score.total,
                started_at=p.dispatched_at,
                age=now - p.dispatched_at,
            )
            for p in self._in_flight.values()
        ]
        buffer_utilization = 0.0 if self._native else local.buffered_messages / self.config.buffer_size
        return QueueMetrics(
            queue=report,
            processing=ProcessingMetrics(active_requests=len(details), in_flight_details=details),
            performance=PerformanceMetrics(
                prefetch_enabled=self.config.enable_prefetch,
                buffer_utilization=buffer_utilization,
                dequeue_latency=self._metrics.dequeue_latency(),
            ),
        )
