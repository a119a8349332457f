"""`LLMQueueDispatcher`: picks the best request the rate limiter can take now, and tracks it.

Messages come from a `MessageSource` (see `sources.py`): the in-memory store searched in place,
or a prefetch buffer over any other store. With `InMemoryStorage` and an `LLMThrottle` a dequeue
is one call into Rust: exact selection over every visible message, the budget reservation and
the receive, under the limiter's then the store's lock, with no await. Every error path keeps
the books: a reservation made is used or released whole, a message received is handed out or
put back.

Why one file of over 700 lines: it is one class, and its parts (selection with the two kinds of
limiter, waiting, the settle hooks the marks call, shutdown, the metrics report) all read and
write the same private state (deliveries in flight, purge generation, wake-ups, pending
give-backs). The pieces with a job of their own already live apart: the sources
(`sources.py`), the marks (`processable.py`), calling limiters (`limiters.py`), the metrics
recorder (`metrics.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

from ._checks import shown
from ._core import LLMThrottle, ScoringParams
from .config import FairPriorityConfig, LLMQueueDispatcherConfig
from .errors import InvalidRequestError, MessageStateError
from .limiters import call_limiter, start_release
from .limiters import reserve as reserve_budget
from .metrics import (
    InFlightDetail,
    MetricsRecorder,
    PerformanceMetrics,
    ProcessingMetrics,
    QueueMetrics,
    QueueMetricsReport,
    TenantMetrics,
    WaitTimePercentiles,
)
from .processable import ProcessableMessage
from .scoring import FACTOR_NAMES, MessageScore, ScoringConfig, ScoringContext, ScoringWeights
from .sources import FairDispatched, InMemorySource, MessageSource, PrefetchSource, running_here
from .storage import InMemoryStorage, QueueStorageAdapter
from .storage.base import _as_list
from .throttle import check_rate_limiter
from .types import LLMRequest, Priority, QueueMessage
from .wakeup import Wakeup

__all__ = ["LLMQueueDispatcher", "ProcessableMessage"]

T = TypeVar("T")
_Taken = TypeVar("_Taken")

_LOGGER = logging.getLogger("llm_queue_dispatcher")

# With custom scorers, a dequeue waiting for a score to reach min_score_threshold re-checks this
# often once the time-only bound says it could have (custom scores may change with anything).
_CUSTOM_RECHECK = 1.0


#: The shortest sleep of a `dequeue` waiting for something to change (seconds).
_MIN_WAIT = 0.001


class _LostRace(NamedTuple):
    """A selection whose winner another task took while the limiter answered, and the
    give-back of the reservation made for it (None when nothing was reserved)."""

    give_back: asyncio.Future[None] | None


#: Selections a dispatch step makes before it gives way to the dequeue loop.
_MAX_LOST_RACES = 8
#: How long a dispatch step waits for the limiter to confirm an earlier give-back of the
#: request it picked before it reserves the request again (seconds).
_RELEASE_WAIT = 1.0


class _Picked(NamedTuple):
    """A message a dispatch step chose and took, with what explains the choice."""

    message: QueueMessage[Any]
    score: MessageScore
    reason: str | None
    #: `(tenant id, charge id)` of a fair_priority dispatch, to correct at the mark.
    charge: tuple[int, int] | None


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
        if config is not None and not isinstance(config, LLMQueueDispatcherConfig):
            raise InvalidRequestError(f"config must be an LLMQueueDispatcherConfig or None, got {config!r}")
        # A copy: changing the caller's object later must not change a running dispatcher.
        self.config = dataclasses.replace(config) if config is not None else LLMQueueDispatcherConfig()
        self.config.validate()
        self._storage = storage
        self._logger = self.config.logger or _LOGGER
        scoring = self.config.scoring or ScoringConfig()
        weights = scoring.weights or ScoringWeights()
        self._custom_scorers = list(scoring.custom_scorers)
        urgent_reserve = self.config.urgent_reserve
        self._scoring_params = ScoringParams(
            weights.as_tuple(),
            [float(scorer.weight) for scorer in self._custom_scorers],
            self.config.max_candidates_to_evaluate,
            urgent_first=self.config.score_urgent_first(),
            urgent_reserve=None if urgent_reserve is None else float(urgent_reserve),
        )
        self._breakdown_names = (*FACTOR_NAMES, *(scorer.name for scorer in self._custom_scorers))
        # Exactly InMemoryStorage: a subclass may override its methods, so it takes the general path.
        self._source: MessageSource[T]
        if type(storage) is InMemoryStorage:
            self._source = InMemorySource(storage)
        else:
            self._source = PrefetchSource(
                storage,
                clock=self.config.clock,
                buffer_size=self.config.buffer_size,
                visibility_timeout=self.config.visibility_timeout,
                prefetch_interval=self.config.prefetch_interval,
                logger=self._logger,
                on_arrival=self._notify,
            )
        self._fair = self.config.fair_priority or FairPriorityConfig()
        if self.config.policy == "fair_priority":
            self._source.configure_fair(self._fair, self.config.urgent_reserve)
        self._clock = self.config.clock
        self._metrics = MetricsRecorder(self.config.metrics_retention, self._fair.fairness_window)
        # Keyed by delivery (the object itself): a redelivered message is a second entry, and a
        # stale mark of the first delivery never removes the live one.
        self._in_flight: dict[ProcessableMessage[T], None] = {}
        self._wakeup = Wakeup()
        # Bumped by purge(): deliveries from before it belong to messages that no longer exist.
        self._generation = 0
        self._closed = False
        self._reported_unfittable: set[str] = set()
        # (change version, clock instant) a dequeue that found nothing could next succeed at.
        self._ready: tuple[int, float] | None = None
        # Token capacity of the limiter last seen, for the unfittable count of the metrics.
        self._last_capacity: float | None = None
        # Work that outlives a cancelled caller (a mark run to its end, a reservation given
        # back): `close()` waits for it.
        self._pending: set[asyncio.Future[Any]] = set()

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller still waiting gets it too

    def _notify(self) -> None:
        """Something changed that a waiting dequeue should look at."""
        self._wakeup.notify()

    # -- time ----------------------------------------------------------------------------------
    def _now(self) -> float:
        clock = self._clock
        return float(clock()) if clock is not None else time.time()

    # -- queue operations ----------------------------------------------------------------------
    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        """Stores ``request``; wakes a waiting `dequeue`."""
        message = await self._source.enqueue(request)
        self._wakeup.notify()
        return message

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        """Stores all of ``requests`` or, on any bad one, none of them."""
        requests = _as_list(requests, "requests")
        messages = await self._source.batch_enqueue(requests)
        self._wakeup.notify()
        return messages

    async def purge(self) -> None:
        """Removes every message from the store and the buffer. Messages handed out before are
        gone too: marking them later settles their budget and nothing else (the budget of one
        whose message had been received again meanwhile is left alone, as for any stale
        delivery). If the purge fails, those it had not deleted yet are live deliveries again."""
        # The handed-out ones count as purged from now: a mark made while the store is purged
        # settles its budget and nothing else (and a job handed out meanwhile stays tracked).
        handed_out = list(self._in_flight)
        self._generation += 1
        outcome: dict[str, bool] = {}  # receipt handle -> deleted (True) or stale (False)
        for processable in handed_out:
            self._in_flight.pop(processable, None)
            processable._purge_outcome = outcome
        try:
            handles = [p.message.attributes.receipt_handle for p in handed_out]
            await self._source.purge(handles, outcome)
        except BaseException:
            # Not purged: the jobs not deleted yet are live deliveries again, marked in the store.
            for processable in handed_out:
                if not processable.settled and processable.message.attributes.receipt_handle not in outcome:
                    processable._generation = self._generation
                    processable._purge_outcome = None
                    self._in_flight[processable] = None
            raise
        finally:
            self._wakeup.notify()

    # -- selection -----------------------------------------------------------------------------
    def _custom_fn(self, limiter_metrics: Any) -> Any:
        """The callable Rust asks for custom scores (only with custom scorers configured)."""
        scorers = self._custom_scorers
        context = ScoringContext.lazy(
            rate_limiter_metrics=limiter_metrics,
            queue_metrics=self._queue_report_now,
            current_time=self._now(),
        )

        def evaluate(message: QueueMessage[T]) -> list[float]:
            return [scorer.calculate(message, context) for scorer in scorers]

        return evaluate

    def _pick_native(self, limiter: LLMThrottle) -> _Picked | float | None:
        """One dispatch step against an `LLMThrottle`, in Rust: select, reserve and take (atomic
        without custom scorers). The chosen message, the seconds until a held winner fits, or
        None."""
        config = self.config
        if config.policy == "fair_priority":
            fair = self._source.dispatch_fair(
                limiter, config.visibility_timeout, config.reserve_budget, config.hold_budget
            )
            if fair is None or isinstance(fair, float):
                return fair
            return self._fairly(fair)
        custom_fn = self._custom_fn(limiter.get_metrics()) if self._custom_scorers else None
        outcome = self._source.dispatch_native(
            limiter,
            self._scoring_params,
            custom_fn,
            config.visibility_timeout,
            config.min_score_threshold,
            config.reserve_budget,
            config.hold_budget,
        )
        if outcome is None or isinstance(outcome, float):
            return outcome
        message, total, breakdown = outcome
        return _Picked(
            message,
            MessageScore.of(total, dict(zip(self._breakdown_names, breakdown, strict=False))),
            None,
            None,
        )

    async def _pick_other(self, limiter: Any) -> _Picked | float | None:
        """One selection against any other limiter: select, reserve and take, giving the
        reservation back on every path that does not hand the message out. A winner another
        task took while the limiter answered is a lost race, not an empty queue: select again."""
        pick = self._pick_fair if self.config.policy == "fair_priority" else self._pick_scored
        give_backs: list[asyncio.Future[None]] = []
        picked: _Picked | float | _LostRace | None = 0.0  # raced out every time: try again at once
        async with self._source.selection_guard(limiter).lock:
            for _ in range(_MAX_LOST_RACES):
                picked = await pick(limiter)
                if not isinstance(picked, _LostRace):
                    break
                if picked.give_back is not None:
                    give_backs.append(picked.give_back)
        if isinstance(picked, _LostRace):
            picked = 0.0
        if give_backs and not isinstance(picked, _Picked):
            # Handing nothing out, the step returns with its books settled (within reason: a
            # limiter that never answers must not hang it); outside the lock, so others go on.
            await asyncio.wait(give_backs, timeout=_RELEASE_WAIT)
        return picked

    async def _pick_scored(self, limiter: Any) -> _Picked | float | _LostRace | None:
        config = self.config
        reserve, hold = config.reserve_budget, config.hold_budget
        metrics = await call_limiter(limiter, "get_metrics")
        custom_fn = self._custom_fn(metrics) if self._custom_scorers else None
        # Holding the budget ranks every message that fits the capacity, against the capacity.
        budget = float(metrics.tpm.limit) if hold else float(metrics.tpm.available)
        requests = float(metrics.rpm.limit) if hold else float(metrics.rpm.available)
        reported = (float(metrics.tpm.available), float(metrics.rpm.available), float(metrics.tpm.limit))
        selection = self._source.select(
            budget,
            requests,
            self._scoring_params,
            custom_fn,
            config.min_score_threshold,
            reported=reported,
            hold=hold,
        )
        if selection is None:
            return None
        needed = selection.tokens + math.ceil(selection.margin)
        if not selection.fits or not await self._admitted(
            limiter, selection.request_id, selection.tokens, reserve
        ):
            return await self._held_for(limiter, needed) if hold else None
        picked = await self._take_reserved(
            limiter,
            selection.request_id,
            reserve,
            lambda: self._source.take(selection, config.visibility_timeout),
        )
        return picked if isinstance(picked, _LostRace) else self._scored(*picked)

    async def _pick_fair(self, limiter: Any) -> _Picked | float | _LostRace | None:
        config = self.config
        reserve, hold = config.reserve_budget, config.hold_budget
        metrics = await call_limiter(limiter, "get_metrics")
        selection = self._source.select_fair(
            float(metrics.tpm.available), float(metrics.rpm.available), float(metrics.tpm.limit), hold
        )
        if selection is None:
            return None
        needed = selection.tokens + math.ceil(selection.margin)
        if not selection.fits or not await self._admitted(
            limiter, selection.request_id, selection.tokens, reserve
        ):
            return await self._held_for(limiter, needed) if hold else None
        picked = await self._take_reserved(
            limiter,
            selection.request_id,
            reserve,
            lambda: self._source.take_fair(selection, config.visibility_timeout),
        )
        return picked if isinstance(picked, _LostRace) else self._fairly(picked)

    async def _admitted(self, limiter: Any, request_id: str, tokens: int, reserve: bool) -> bool:
        """Whether the limiter admits the winner now: its budget reserved (``reserve``), or
        only checked."""
        releasing = self._source.selection_guard(limiter).releasing
        if (release := releasing.get(request_id)) is not None:
            # An earlier reservation of it is still going back: wait for it, within reason (a
            # limiter that never answers must not stall the dispatcher for good).
            await asyncio.wait({release}, timeout=_RELEASE_WAIT)
            if not release.done():
                self._logger.warning(
                    "the limiter has not confirmed giving back request %r after %s s; reserving it again",
                    request_id,
                    _RELEASE_WAIT,
                )
        if reserve:
            return await reserve_budget(
                limiter, request_id, tokens, functools.partial(self._track_release, limiter, request_id)
            )
        check = await call_limiter(limiter, "can_process", tokens)
        return bool(check.allowed)

    async def _take_reserved(
        self, limiter: Any, request_id: str, reserved: bool, take: Callable[[], _Taken | None]
    ) -> _Taken | _LostRace:
        """``take()`` of a winner whose budget may be reserved: the reservation goes back whole
        when the take fails or the winner left meanwhile (another task took it: a lost race,
        whose give-back is not awaited under the selection lock; a step picking this request
        again waits for it in `_admitted`)."""
        try:
            picked = take()
        except BaseException:
            if reserved:
                await asyncio.shield(self._give_back_reservation(limiter, request_id))
            raise
        if picked is None:
            return _LostRace(self._give_back_reservation(limiter, request_id) if reserved else None)
        return picked

    def _give_back_reservation(self, limiter: Any, request_id: str) -> asyncio.Future[None]:
        """Gives a reservation back whole: at once with a plain limiter (the future returned
        is done); with an asynchronous one in a task of its own (to await shielded, or not at
        all). Until that lands, a dispatch step that picks the same request waits
        (`_admitted`): limiters keep reservations by request id, and this release must not
        take back the new one. A failure is logged: the reservation stays spent until it
        refills."""
        loop = asyncio.get_running_loop()
        try:
            answer = start_release(limiter, request_id)
        except Exception as error:
            answer = None
            self._release_failed(request_id, error)
        if answer is None:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        release = asyncio.ensure_future(answer)
        self._track_release(limiter, request_id, release)
        release.add_done_callback(
            lambda task: (
                None
                if task.cancelled() or task.exception() is None
                else self._release_failed(request_id, task.exception())
            )
        )
        return release

    def _release_failed(self, request_id: str, error: BaseException | None) -> None:
        self._logger.warning("could not give back the reservation of request %r: %r", request_id, error)

    def _track_release(self, limiter: Any, request_id: str, release: asyncio.Future[Any]) -> None:
        releasing = self._source.selection_guard(limiter).releasing
        releasing[request_id] = release
        self._track(release)

        def landed(task: asyncio.Future[Any]) -> None:
            if releasing.get(request_id) is task:
                del releasing[request_id]

        release.add_done_callback(landed)

    @staticmethod
    async def _held_for(limiter: Any, tokens: int) -> float | None:
        """Seconds until a held winner of ``tokens`` fits (None when it never will)."""
        check = await call_limiter(limiter, "can_process", tokens)
        wait = float(check.available_in)
        return wait if math.isfinite(wait) else None

    def _scored(self, message: QueueMessage[T], total: float, breakdown: list[float]) -> _Picked:
        score = MessageScore.of(total, dict(zip(self._breakdown_names, breakdown, strict=True)))
        return _Picked(message, score, None, None)

    def _fairly(self, picked: FairDispatched) -> _Picked:
        message, (urgent, tenant, used, rank, of, effective, tenant_id, charge) = picked
        request = message.payload
        waited = max(0.0, self._now() - message.attributes.enqueued_at.timestamp())
        who = f"tenant {tenant!r}" if tenant else "the default tenant"
        if urgent:
            reason = f"fair_priority: URGENT first ({who}), waited {waited:.1f} s"
        else:
            priority = Priority(effective).name
            aged = f" (aged from {request.priority.name})" if effective < request.priority else ""
            reason = (
                f"fair_priority: {who} used {used:,.0f} tokens in the last {self._fair.fairness_window:g} s "
                f"(rank {rank} of {of}); {priority}{aged}; waited {waited:.1f} s"
            )
        breakdown = {
            "urgent_first": float(urgent),
            "tenant_rank": float(rank),
            "tenant_tokens": float(used),
            "effective_priority": float(effective),
        }
        return _Picked(message, MessageScore.of(0.0, breakdown), reason, (tenant_id, charge))

    def _hand_out(self, limiter: Any, picked: _Picked, started: float) -> ProcessableMessage[T]:
        """The delivery of a message a step took: tracked, and counted in the metrics."""
        message = picked.message
        now = self._now()
        processable = ProcessableMessage(
            self,
            message,
            picked.score,
            limiter,
            self.config.reserve_budget,
            now,
            self._generation,
            picked.reason,
            picked.charge,
        )
        request = message.payload
        self._metrics.record_dispatch(
            now,
            now - message.attributes.enqueued_at.timestamp(),
            time.perf_counter() - started,
            request.tenant or "",
            request.token_info.estimated,
        )
        self._in_flight[processable] = None
        return processable

    async def _give_back(
        self, limiter: Any, message: QueueMessage[T], charge: tuple[int, int] | None = None
    ) -> None:
        # The release is registered before the message is selectable again (see `_admitted`).
        reserved = self.config.reserve_budget
        release = self._give_back_reservation(limiter, message.payload.id) if reserved else None
        try:
            await self._source.hand_back(message)
            if charge is not None:
                self._source.correct_charge(charge[0], charge[1], 0.0)
        finally:
            if release is not None:
                await asyncio.shield(release)

    async def _try_dequeue(self, limiter: Any) -> ProcessableMessage[T] | float | None:
        """A handed-out message, the seconds until a held winner fits, or None. With the
        in-memory store and an `LLMThrottle` this never suspends."""
        source = self._source
        native = type(limiter) is LLMThrottle
        while True:
            if source.leases:
                await source.prepare()
            if self.config.drop_expired:
                await self._drop_expired()
            started = time.perf_counter()
            picked = self._pick_native(limiter) if native else await self._pick_other(limiter)
            if picked is None or isinstance(picked, float):
                return picked
            try:
                processable = self._hand_out(limiter, picked, started)
            except BaseException:
                # Nobody will own it: back where it came from, and its budget with it.
                await asyncio.shield(self._give_back(limiter, picked.message, picked.charge))
                raise
            if not source.leases:
                return processable
            try:
                confirmed = await source.confirm(processable.message, self.config.visibility_timeout)
            except BaseException:
                # Cancelled or failed while renewing the lease: the source kept the message;
                # the budget goes back and the delivery is forgotten.
                await asyncio.shield(self._revoke(limiter, processable))
                raise
            if confirmed and processable._generation == self._generation:
                return processable
            # Another consumer holds it now (never hand out a message twice), or a purge
            # removed it while its lease was renewed.
            await asyncio.shield(self._revoke(limiter, processable))

    async def _revoke(self, limiter: Any, processable: ProcessableMessage[T]) -> None:
        """Takes back a delivery that was never handed out: its budget, its charge."""
        self._forget(processable)
        if processable._charge is not None:
            self._source.correct_charge(processable._charge[0], processable._charge[1], 0.0)
        if self.config.reserve_budget:
            await asyncio.shield(self._give_back_reservation(limiter, processable.message.payload.id))

    async def _drop_expired(self) -> None:
        for request_id in await self._source.drop_expired():
            self._metrics.expired_deadlines += 1
            self._logger.warning("request %r removed unsent: its deadline has passed", request_id)

    def _forget(self, processable: ProcessableMessage[T]) -> None:
        processable._settled = True
        self._in_flight.pop(processable, None)

    async def dequeue(
        self, rate_limiter: Any, *, timeout: float | None = None
    ) -> ProcessableMessage[T] | None:
        """The best message the limiter can take now, with its budget reserved; or None.

        ``rate_limiter`` is a `RateLimiter` (e.g. `LLMThrottle`) or an `AsyncRateLimiter`.
        ``timeout=None`` returns at once. ``timeout=s`` waits up to ``s`` seconds of the event
        loop's time, sleeping until the earliest moment a message or the budget can change. A
        cancelled dequeue raises `asyncio.CancelledError` and leaves nothing taken.
        """
        if type(rate_limiter) is not LLMThrottle:
            check_rate_limiter(rate_limiter)
        if timeout is not None:
            # The sign is checked on the value given: an int too large for a float waits for
            # ever if positive, and is refused if negative.
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
                raise InvalidRequestError(
                    f"timeout must be None or a number of seconds >= 0, got {shown(timeout)}"
                )
            try:
                timeout = float(timeout)
            except OverflowError:
                timeout = math.inf
        if self._closed and isinstance(self._source, PrefetchSource):
            raise MessageStateError("dispatcher is closed")
        if self.config.enable_prefetch and isinstance(self._source, PrefetchSource):
            self._source.start_prefetching()
        if timeout is None:
            # Returns at once; with the in-memory store this never suspends.
            seen = self._wakeup.version
            if type(rate_limiter) is LLMThrottle and not self._source.leases and not self.config.drop_expired:
                # The hot path: one call into Rust and the bookkeeping, no coroutine in between.
                started = time.perf_counter()
                picked = self._pick_native(rate_limiter)
                if isinstance(picked, _Picked):
                    try:
                        return self._hand_out(rate_limiter, picked, started)
                    except BaseException:
                        await asyncio.shield(self._give_back(rate_limiter, picked.message, picked.charge))
                        raise
                await self._nothing_found(rate_limiter, picked, seen)
                return None
            found = await self._try_dequeue(rate_limiter)
            if isinstance(found, ProcessableMessage):
                return found
            await self._nothing_found(rate_limiter, found, seen)
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seen = self._wakeup.version
            found = await self._try_dequeue(rate_limiter)
            if isinstance(found, ProcessableMessage):
                return found
            until = await self._nothing_found(rate_limiter, found, seen)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            # At least a millisecond: a wait worked out as 0 (clocks that disagree) must still
            # yield to the event loop, never spin it.
            await self._wakeup.wait(seen, min(remaining, max(until, _MIN_WAIT)))

    async def _nothing_found(self, limiter: Any, held: float | None, seen: int) -> float:
        """After a selection that handed nothing out: reports unfittable requests and works out
        (and remembers, for `time_until_ready`) how long until a dequeue could succeed."""
        self._report_unfittable(await self._token_capacity(limiter))
        if held is not None:
            # Held for a winner: until it fits, or a visibility change brings another.
            until = held
            expiry = self._source.next_visibility_change()
            if expiry is not None:
                until = min(until, max(0.0, expiry - self._now()))
            if isinstance(self._source, PrefetchSource):
                # Other producers' messages reach the buffer only when it is filled again.
                until = min(until, self.config.prefetch_interval)
        else:
            until = await self._time_until_change(limiter)
        self._ready = (seen, self._now() + until)
        return until

    def time_until_ready(self) -> float:
        """Seconds of the dispatcher's clock until a `dequeue` could hand something out, as the
        last `dequeue` that found nothing worked it out: until a held winner fits, a message
        becomes visible, or the smallest waiting one fits the budget. 0 when anything changed
        since (an enqueue, a mark) or no dequeue has come up empty yet; ``inf`` when only an
        enqueue or a mark can help. What a loop on a virtual clock (a simulation) advances by.
        """
        if self._ready is None or self._ready[0] != self._wakeup.version:
            return 0.0
        return max(0.0, self._ready[1] - self._now())

    async def _time_until_change(self, limiter: Any) -> float:
        """Seconds until a message becomes visible or the smallest waiting one fits the budget."""
        candidates: list[float] = []
        expiry = self._source.next_visibility_change()
        if expiry is not None:
            candidates.append(max(0.0, expiry - self._now()))
        if isinstance(self._source, PrefetchSource):
            candidates.append(self.config.prefetch_interval)
        smallest = self._source.min_visible_tokens()
        if smallest is not None:
            check = await call_limiter(limiter, "can_process", smallest)
            if check.available_in > 0:
                if math.isfinite(check.available_in):
                    candidates.append(check.available_in)
            else:
                # Something fits but scored below min_score_threshold: scores rise as messages
                # wait, so sleep until the best one reaches it.
                metrics = await call_limiter(limiter, "get_metrics")
                crossing = self._source.time_until_score(
                    float(metrics.tpm.available), self._scoring_params, self.config.min_score_threshold
                )
                if crossing is not None:
                    # With custom scorers the crossing is a bound (they count at full weight);
                    # once it has passed, only a re-check tells.
                    candidates.append(crossing if crossing > 0 else _CUSTOM_RECHECK)
        return min(candidates) if candidates else math.inf

    def _report_unfittable(self, capacity: float) -> None:
        """Logs, once each, the visible requests that exceed the limiter's token capacity (run
        whenever a dequeue finds nothing, so they never wait unnoticed)."""
        self._last_capacity = capacity
        for request_id in self._source.ids_above(capacity):
            if request_id not in self._reported_unfittable:
                self._reported_unfittable.add(request_id)
                self._logger.warning(
                    "request %r needs more tokens than the limiter can ever grant (capacity %s); "
                    "take it out with take_unfittable()",
                    request_id,
                    capacity,
                )

    @staticmethod
    async def _token_capacity(limiter: Any) -> float:
        metrics = await call_limiter(limiter, "get_metrics")
        return float(metrics.tpm.limit)

    async def take_unfittable(self, rate_limiter: Any) -> list[QueueMessage[T]]:
        """Receives every visible message whose estimate exceeds the limiter's token capacity.

        Such a request can never be dispatched. The messages come back leased (in flight, no
        budget reserved); delete them, or fail them until the store dead-letters them.
        """
        check_rate_limiter(rate_limiter)
        capacity = await self._token_capacity(rate_limiter)
        taken = self._source.take_above(capacity, self.config.visibility_timeout)
        for message in taken:
            self._reported_unfittable.discard(message.payload.id)
        return taken

    def _on_settled(self, processable: ProcessableMessage[T], *, processed: bool, tokens: int) -> None:
        self._in_flight.pop(processable, None)
        now = self._now()
        request = processable.message.payload
        charged = request.token_info.estimated  # what `_hand_out` recorded, reserved or not
        if processed:
            self._metrics.record_completion(now, tokens, request.tenant or "", tokens - charged)
        else:
            self._metrics.record_failure(now, request.tenant or "", -charged)
        self._wakeup.notify()

    # -- prefetching and shutdown --------------------------------------------------------------
    def stop(self) -> None:
        """Stops prefetching. Buffered messages stay leased until `close()` or their timeout."""
        self._source.stop()

    async def close(self) -> None:
        """Stops prefetching and releases buffered messages at once (visibility 0); waits for
        marks and reservation give-backs whose callers were cancelled."""
        self._closed = True
        try:
            await self._source.close()
        finally:
            if running := running_here(self._pending):
                # `wait`, not `gather`: a cancelled close must not cancel what it waits for.
                await asyncio.wait(running)

    async def release_buffered(self) -> None:
        """Releases buffered messages at once (visibility 0), so other consumers take them now,
        and halts the background prefetch and lease renewal. Unlike `close()` the dispatcher
        stays usable: a later `dequeue` fills the buffer and restarts them (unless `stop()` was
        called). `Worker` calls it when it stops. A no-op with the in-memory store, which has
        no buffer."""
        if isinstance(self._source, PrefetchSource):
            await self._source.release_buffered()

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
        source = self._source
        by_priority = dict(zip([p.name for p in Priority], source.counts_by_priority(), strict=True))
        oldest = source.oldest_enqueued_at()
        selectable = sum(by_priority.values())
        in_flight = source.in_flight_count()
        if in_flight is None:
            in_flight = len(self._in_flight)
        return QueueMetricsReport(
            approximate_number_of_messages=selectable,
            approximate_number_of_messages_in_flight=in_flight,
            buffered_messages=source.buffered,
            total_messages=selectable + in_flight,
            messages_by_priority=by_priority,
            oldest_message_age=0.0 if oldest is None else max(0.0, now - oldest),
            average_wait_time=average,
            wait_time_percentiles=percentiles,
            throughput=self._metrics.throughput(now),
            dead_lettered=0,
            failed=self._metrics.failed,
            unfittable_messages=0
            if self._last_capacity is None
            else len(source.ids_above(self._last_capacity)),
            expired_deadlines=self._metrics.expired_deadlines,
        )

    async def get_queue_metrics(self) -> QueueMetrics:
        """Queue depth, waits, throughput (real tokens), in-flight details and dequeue latency."""
        attributes = await self._storage.get_queue_attributes()
        local = self._queue_report_now()
        now = self._now()
        fields = dict(local.__dict__, dead_lettered=attributes.dead_lettered)
        if isinstance(self._source, PrefetchSource):
            # The store counts buffered messages as in flight (the buffer leased them); here
            # they count once, as waiting.
            visible = attributes.approximate_number_of_messages + local.buffered_messages
            in_flight = max(0, attributes.approximate_number_of_messages_in_flight - local.buffered_messages)
            fields.update(
                approximate_number_of_messages=visible,
                approximate_number_of_messages_in_flight=in_flight,
                total_messages=visible + in_flight,
            )
        report = QueueMetricsReport(**fields)
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
            for p in self._in_flight
        ]
        buffer_utilization = (
            local.buffered_messages / self.config.buffer_size if local.buffered_messages else 0.0
        )
        return QueueMetrics(
            queue=report,
            processing=ProcessingMetrics(active_requests=len(details), in_flight_details=details),
            performance=PerformanceMetrics(
                prefetch_enabled=self.config.enable_prefetch,
                buffer_utilization=buffer_utilization,
                dequeue_latency=self._metrics.dequeue_latency(),
            ),
            tenants=self._tenant_metrics(now),
        )

    def _tenant_metrics(self, now: float) -> dict[str, TenantMetrics]:
        # In memory: the store's counts. Otherwise: the buffer's (what waits here, leased) and
        # this dispatcher's deliveries (what other processes hold or the store keeps is unseen).
        counts = dict(self._source.pool.tenant_counts())
        if not isinstance(self._source, InMemorySource):
            for p in self._in_flight:
                name = p.message.payload.tenant or ""
                visible, in_flight = counts.get(name, (0, 0))
                counts[name] = (visible, in_flight + 1)
        summaries = self._metrics.tenant_summaries(now, set(counts))
        if self.config.policy == "fair_priority":
            # What the policy ranks by: its own ledger of charges and corrections.
            usage = self._source.fair_usage()
            summaries = {
                name: (usage.get(name, 0.0), served, waits) for name, (_, served, waits) in summaries.items()
            }
            for name, used in usage.items():
                summaries.setdefault(name, (used, 0, WaitTimePercentiles()))
        out: dict[str, TenantMetrics] = {}
        for name in sorted(set(counts) | set(summaries)):
            visible, in_flight = counts.get(name, (0, 0))
            used, served, waits = summaries.get(name, (0.0, 0, None))
            out[name] = TenantMetrics(
                visible=visible,
                in_flight=in_flight,
                tokens_in_window=used,
                tokens_served=served,
                **({"wait_time_percentiles": waits} if waits is not None else {}),
            )
        return out
