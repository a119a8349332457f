"""`LLMQueueDispatcher`: picks the best request the rate limiter can take now, and tracks it.

The selection, the deliveries handed out and their books live in one Rust object,
`DispatchCore`; this module keeps what only Python can own: coroutines, waiting, and the I/O the
core asks for. With `InMemoryStorage` and an `LLMThrottle` a `dequeue` is one call into Rust, and
so is each mark of the job it returns. Otherwise the core takes the winner and Python awaits its
reservation on the limiter under the delivery's key, ``"request-id#n"`` (`_choose`), or confirms
its lease in another store's prefetch buffer (`_hand_out`, `prefetch.Prefetcher`); a mark that
needs such I/O comes back as a `Plan` that `_Runner` awaits to its end, reporting each reply.

About 830 lines: the public class and the plan runner it alone uses, so that one `dequeue` reads
top to bottom in one file. What is not on that path lives elsewhere: awaiting an outcome in
`outcomes.py`, the global choice over Redis in `redis/global_choice.py`, the prefetch buffer's
I/O in `prefetch.py`; the next to move out is the metrics report (`_queue_report_now`,
`_scheduling`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._checks import shown
from ._core import CoreReport, DispatchCore, LLMThrottle, Plan, ProcessableMessage
from .config import FairPriorityConfig, LLMQueueDispatcherConfig
from .errors import (
    InvalidRequestError,
    MessageStateError,
    ReceiptHandleError,
    UnknownRequestError,
)
from .metrics import (
    InFlightDetail,
    LatencyPercentiles,
    PerformanceMetrics,
    ProcessingMetrics,
    QueueMetrics,
    QueueMetricsReport,
    SchedulingMetrics,
    SloAttainment,
    TenantMetrics,
    Throughput,
    WaitTimePercentiles,
)
from .outcomes import DEFAULT_SUBMIT_CONCURRENCY, Submissions
from .outcomes import enqueued as _withdrawals_lapse
from .prefetch import Prefetcher, running_here
from .scoring import ScoringConfig, ScoringContext, ScoringWeights
from .storage import InMemoryStorage, QueueStorageAdapter
from .storage.base import _as_list
from .throttle import check_rate_limiter
from .types import LLMRequest, Priority, QueueMessage
from .wakeup import Wakeup

__all__ = ["LLMQueueDispatcher", "ProcessableMessage"]

T = TypeVar("T")

_LOGGER = logging.getLogger("llm_queue_dispatcher")

_MIN_WAIT = 0.001  # the shortest sleep of a waiting `dequeue` (seconds)


async def _call(limiter: Any, method: str, *args: Any) -> Any:
    """``limiter.method(*args)``, awaited when the limiter's method is a coroutine."""
    result = getattr(limiter, method)(*args)
    return await result if inspect.isawaitable(result) else result


def _global_choice(
    storage: object, config: LLMQueueDispatcherConfig, core: DispatchCore, custom: bool
) -> Any:
    """The global choice over a `RedisStorage` queue (``redis/global_choice.py``), or None: with
    another store or a policy it does not cover, the prefetch buffer ranks what it leased."""
    module = sys.modules.get("llm_queue_dispatcher.redis.storage")
    if module is None or not isinstance(storage, module.RedisStorage):
        return None
    from .redis.global_choice import GlobalChoice

    return GlobalChoice.for_dispatcher(storage, config, core, custom)


async def _release(limiter: Any, key: str) -> None:
    """Gives a reservation back whole: ``release`` where the limiter has it, else
    ``adjust_consumption(key, 0)`` (the tokens only). One it no longer knows has nothing left."""
    has_release = callable(getattr(limiter, "release", None))
    with contextlib.suppress(UnknownRequestError):
        await (
            _call(limiter, "release", key) if has_release else _call(limiter, "adjust_consumption", key, 0)
        )


def _takes_parts(limiter: Any, method: str) -> bool:
    """Whether ``limiter.method`` takes a request's ``input_tokens`` and ``output_tokens`` (as
    `LLMThrottle`'s and `RedisThrottle`'s do); a limiter of the plain protocol is called with
    the total alone. Read once per limiter class and method: a signature costs microseconds,
    and this is asked on every dispatch."""
    if method in getattr(limiter, "__dict__", ()):  # set on the instance: its own signature
        return _signature_takes_parts(getattr(limiter, method))
    key = (type(limiter), method)
    taken = _PARTS_TAKEN.get(key)
    if taken is None:
        taken = _PARTS_TAKEN[key] = _signature_takes_parts(getattr(limiter, method, None))
    return taken


_PARTS_TAKEN: dict[tuple[type, str], bool] = {}


def _signature_takes_parts(function: Any) -> bool:
    if function is None:
        return False
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    return "input_tokens" in parameters and "output_tokens" in parameters


async def _can_process(limiter: Any, tokens: int, parts: tuple[int, int] | None) -> Any:
    """``limiter.can_process(tokens)``, with the request's input and output ``parts`` where it
    knows them and the limiter takes them; awaited when the limiter's method is a coroutine."""
    if parts is not None and _takes_parts(limiter, "can_process"):
        checked = limiter.can_process(tokens, input_tokens=parts[0], output_tokens=parts[1])
        return await checked if inspect.isawaitable(checked) else checked
    return await _call(limiter, "can_process", tokens)


def _token_parts(message: QueueMessage[Any]) -> tuple[int, int] | None:
    """The input and output parts of a message's estimate, when its request gave them."""
    info = message.payload.token_info
    if info.input is None or info.max_output is None:
        return None
    return (info.input, info.max_output)


class _Runner:
    """The I/O of the core's plans, each run to its end in a task of its own even if its caller
    is cancelled (its store call may have landed, and the books must follow it), and the wake-up
    of waiting dequeues. The core calls it; `LLMQueueDispatcher.close` waits for what it runs."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.core: DispatchCore
        self.prefetch: Prefetcher[Any] | None = None
        self.global_choice: Any = None  # redis.global_choice.GlobalChoice, when it applies
        self.wakeup: Wakeup
        self.pending: set[asyncio.Future[Any]] = set()

    def wake(self) -> None:
        self.wakeup.wake()

    async def mark(
        self,
        job: ProcessableMessage[Any],
        kind: str,
        tokens: int | None,
        delay: float,
        error: BaseException | None,
        parts: tuple[int, int] | None = None,
    ) -> None:
        """A job's mark that needs I/O: settled in the core, then its plan awaited to its end."""
        plan = self.core.settle(job, kind, tokens, delay, error, parts)
        if plan is not None:
            await self.shielded(self._execute(plan))

    def update_visibility(self, job: ProcessableMessage[Any], handle: str, seconds: float) -> Awaitable[None]:
        assert self.prefetch is not None
        return self.prefetch.change_visibility(handle, seconds)

    def shielded(self, work: Awaitable[None]) -> Awaitable[None]:
        task = asyncio.ensure_future(work)
        self.pending.add(task)
        task.add_done_callback(self._done)
        return asyncio.shield(task)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self.pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller still waiting gets it too

    async def _execute(self, plan: Plan) -> None:
        core, stale = self.core, plan.stale
        if self.global_choice is not None and self.global_choice.handles(plan):
            # Handed out by the global choice: store, limiter and tenant use in one script.
            try:
                was_stale = await self.global_choice.mark(plan)
            except BaseException:
                core.store_replied(plan.delivery, "failed")  # markable again; nothing else done
                raise
            core.finish(plan, core.store_replied(plan.delivery, "stale" if was_stale else "landed"))
            return
        if plan.store is not None:
            assert self.prefetch is not None
            try:
                await self.prefetch.store_call(plan)
            except ReceiptHandleError:
                stale = core.store_replied(plan.delivery, "stale")
            except BaseException:
                core.store_replied(plan.delivery, "failed")  # markable again; nothing else done
                raise
            else:
                stale = core.store_replied(plan.delivery, "landed")
        try:
            await self.limiter_call(plan)
        finally:
            core.finish(plan, stale)  # logs the mark; raises ReceiptHandleError when stale

    async def limiter_call(self, plan: Plan) -> None:
        """The plan's call on the delivery's reservation. A failure is logged: the mark stands
        (its call happened); only the limiter's count could not be corrected."""
        limiter, request_id = plan.limiter, plan.request_id
        if limiter is None:
            return
        try:
            if plan.limiter_call == "adjust":
                parts = plan.parts
                if parts is not None and _takes_parts(limiter, "adjust_consumption"):
                    adjusted = limiter.adjust_consumption(
                        plan.key, plan.tokens, input_tokens=parts[0], output_tokens=parts[1]
                    )
                    if inspect.isawaitable(adjusted):
                        await adjusted
                else:
                    await _call(limiter, "adjust_consumption", plan.key, plan.tokens)
            elif plan.limiter_call == "release":
                await _release(limiter, plan.key)
            elif callable(getattr(limiter, "settle", None)):
                # Processed without a count: its slot of requests in flight ends, where it has one.
                await _call(limiter, "settle", plan.key)
        except Exception as error:  # unknown (older than its history), refused (strict), down
            why = "no longer knows it" if isinstance(error, UnknownRequestError) else repr(error)
            self.logger.warning(
                "rate limiter failed to correct request %r (%s); the message is settled", request_id, why
            )

    async def reserve(
        self, limiter: Any, key: str, tokens: int, parts: tuple[int, int] | None = None
    ) -> bool:
        """``limiter.consume(key, tokens)``, with the request's input and output ``parts`` where
        it knows them and the limiter takes them (each limit then takes its own share).
        Cancelled while an asynchronous consume is on its way (a round trip to a shared
        limiter), the call still completes, and a reservation it made is given back in a task
        `close` waits for: a cancelled dequeue takes nothing."""
        if parts is not None and _takes_parts(limiter, "consume"):
            result = limiter.consume(key, tokens, input_tokens=parts[0], output_tokens=parts[1])
        else:
            result = limiter.consume(key, tokens)
        if not inspect.isawaitable(result):
            return bool(result)
        consumed = asyncio.ensure_future(result)
        try:
            return bool(await asyncio.shield(consumed))
        except asyncio.CancelledError:
            self.shielded(self._give_back_if_granted(limiter, key, consumed))
            raise

    async def _give_back_if_granted(self, limiter: Any, key: str, consumed: asyncio.Future[Any]) -> None:
        with contextlib.suppress(Exception):  # refused with an error: nothing was taken
            if await asyncio.shield(consumed):
                try:
                    await _release(limiter, key)
                except Exception as error:
                    self.logger.warning(
                        "could not give back the reservation %r of a cancelled dequeue: %r", key, error
                    )


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
        # A copy, read once: changing the caller's object (or this one) later changes nothing.
        config = self.config = (
            dataclasses.replace(config) if config is not None else LLMQueueDispatcherConfig()
        )
        config.validate()
        self._storage = storage
        self._logger = logger = config.logger or _LOGGER
        scoring = config.scoring or ScoringConfig()
        weights = scoring.weights or ScoringWeights()
        self._custom_scorers = scorers = list(scoring.custom_scorers)
        fair = config.fair_priority or FairPriorityConfig()
        self._clock = config.clock
        # Exactly InMemoryStorage: a subclass may override its methods, so it takes the general path.
        pool = storage.core if type(storage) is InMemoryStorage else None
        self._runner = runner = _Runner(logger)
        self._core = runner.core = DispatchCore(
            pool,
            clock=config.clock,
            weights=weights.as_tuple(),
            custom_weights=[float(scorer.weight) for scorer in scorers],
            custom_names=[str(scorer.name) for scorer in scorers],
            max_candidates=config.max_candidates_to_evaluate,
            policy=config.policy,
            tenant_weights=[(name, float(weight)) for name, weight in fair.tenant_weights.items()],
            fairness_window=float(fair.fairness_window),
            urgent_first=fair.urgent_first,
            max_wait=fair.max_wait_by_priority(),
            reserve_tokens=None if fair.reserve_tokens is None else float(fair.reserve_tokens),
            visibility_timeout=config.visibility_timeout,
            min_score=config.min_score_threshold,
            reserve=config.reserve_budget,
            hold=config.hold_budget,
            metrics_retention=config.metrics_retention,
            runner=runner,
            logger=logger,
            score_urgent_first=config.score_urgent_first(),
            urgent_reserve=None if config.urgent_reserve is None else float(config.urgent_reserve),
            slo_targets=config.slo_targets_by_priority(),
        )
        self._prefetch: Prefetcher[T] | None = None
        if pool is None:
            self._prefetch = runner.prefetch = Prefetcher(
                storage,
                self._core,
                buffer_size=config.buffer_size,
                visibility_timeout=config.visibility_timeout,
                prefetch_interval=config.prefetch_interval,
                logger=logger,
            )
            self._global = runner.global_choice = _global_choice(storage, config, self._core, bool(scorers))
        else:
            self._global = None
        # The hot path: a dequeue that is one call into Rust.
        self._fast = pool is not None and not config.drop_expired
        self._wakeup = runner.wakeup = Wakeup(self._core)
        self._closed = False
        # Submitters waiting for their outcome, and the pool of `submit(handler=...)`: made when
        # first needed (a submit, or a worker reporting an outcome).
        self._submissions: Submissions | None = None
        # (change version, clock instant) a dequeue that found nothing could next succeed at.
        self._ready: tuple[int, float] | None = None

    def _now(self) -> float:
        clock = self._clock
        return float(clock()) if clock is not None else time.time()

    # -- queue operations ----------------------------------------------------------------------
    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        """Stores ``request``; wakes a waiting `dequeue`."""
        message = await self._storage.enqueue(request)
        _withdrawals_lapse(self._storage, (request,))
        self._wakeup.notify()
        return message

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        """Stores all of ``requests`` or, on any bad one, none of them."""
        batch = _as_list(requests, "requests")
        messages = await self._storage.batch_enqueue(batch)
        _withdrawals_lapse(self._storage, batch)
        self._wakeup.notify()
        return messages

    def _outcomes(self) -> Submissions:
        if self._submissions is None:
            self._submissions = Submissions(self, self._storage)
        return self._submissions

    async def submit(
        self,
        request: LLMRequest[T],
        handler: Callable[[ProcessableMessage[T]], Awaitable[Any]] | None = None,
        *,
        rate_limiter: Any = None,
        concurrency: int = DEFAULT_SUBMIT_CONCURRENCY,
    ) -> Any:
        """Enqueues ``request`` and waits for its outcome: the handler's return value once it is
        processed (``HandlerResult.value`` when the handler returns a `HandlerResult`).

        Without ``handler``, a `Worker` on this dispatcher (here, or in another process sharing
        the store) runs its own handler on it. With ``handler``, the dispatcher's own pool runs
        it: a `Worker` under ``rate_limiter`` with ``concurrency`` handlers at once, started at
        the first such submit and stopped by `close`.

        Raises `RequestFailedError` (its ``error`` the last error) when the request is
        dead-lettered, expired (``drop_expired``) or purged, or the dispatcher is closed while it
        waits. Cancelling the await withdraws the request: if it was not dispatched yet, no
        handler ever runs it (a worker that takes it deletes it unprocessed); if it was, its
        result is discarded. Bad arguments raise `InvalidRequestError`, and a submit to a closed
        dispatcher `MessageStateError`; both enqueue nothing.
        See the "Awaiting a queued call" page of the documentation.
        """
        return await self._outcomes().submit(request, handler, rate_limiter, concurrency)

    async def purge(self) -> None:
        """Removes every message from the store and the buffer. Messages handed out before are
        gone too: marking them later settles their budget and nothing else. If the purge fails,
        those it had not deleted yet are live deliveries again."""
        if self._prefetch is None:
            self._core.purge_store()
            await self._outcomes().purged()
            return
        purge, handed_out = self._core.begin_purge()
        ok = False
        try:
            await self._prefetch.purge([(p.delivery, p.handle) for p in handed_out], self._core.purge_deleted)
            ok = True
        finally:
            self._core.end_purge(purge, ok)
        await self._outcomes().purged()

    # -- selection -----------------------------------------------------------------------------
    async def dequeue(
        self, rate_limiter: Any, *, timeout: float | None = None
    ) -> ProcessableMessage[T] | None:
        """The best message the limiter can take now, with its budget reserved; or None.

        ``rate_limiter`` is a `RateLimiter` (e.g. `LLMThrottle`) or an `AsyncRateLimiter`.
        ``timeout=None`` returns at once. ``timeout=s`` waits up to ``s`` seconds of the event
        loop's time, sleeping until the earliest moment a message or the budget can change. A
        cancelled dequeue raises `asyncio.CancelledError` and leaves nothing taken.
        """
        if timeout is None and self._fast and type(rate_limiter) is LLMThrottle:
            # One call into Rust: select, reserve, receive, open the delivery.
            found = self._core.dispatch(
                rate_limiter, self._custom_fn(rate_limiter) if self._custom_scorers else None
            )
            if type(found) is ProcessableMessage:
                return found
            await self._nothing_found(rate_limiter, found)
            return None
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
        if self._prefetch is not None:
            if self._closed:
                raise MessageStateError("dispatcher is closed")
            if self.config.enable_prefetch and not (
                self._global is not None and self._global.usable_with(rate_limiter)
            ):
                self._prefetch.start_prefetching()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            seen = self._wakeup.version
            found = await self._attempt(rate_limiter)
            if type(found) is ProcessableMessage:
                return found
            until = await self._nothing_found(rate_limiter, found, seen)
            remaining = 0.0 if deadline is None else deadline - loop.time()
            if remaining <= 0:
                return None
            # At least a millisecond: a wait worked out as 0 (clocks that disagree) must still
            # yield to the event loop, never spin it.
            await self._wakeup.wait(seen, min(remaining, max(until, _MIN_WAIT)))

    async def _dequeue_up_to(
        self, rate_limiter: Any, count: int, *, timeout: float | None = None
    ) -> list[ProcessableMessage[T]]:
        """Up to ``count`` jobs for a `Worker` with that many free handlers: in rank order from
        one script where the global choice applies (``redis/global_choice.py``), else the one
        job of a `dequeue`. An empty list when `dequeue` would return None."""
        if (
            count > 1
            and not self._closed
            and self._global is not None
            and self._global.usable_with(rate_limiter)
        ):
            found: list[ProcessableMessage[T]] | float | None = await self._global.attempt_many(
                rate_limiter, count
            )
            if isinstance(found, list):
                return found
        job = await self.dequeue(rate_limiter, timeout=timeout)
        return [] if job is None else [job]

    def _custom_fn(self, limiter_metrics: Any) -> Callable[[QueueMessage[T]], list[Any]]:
        """What the core calls for custom scores: the scorers' values for one message."""
        if type(limiter_metrics) is LLMThrottle:
            limiter_metrics = limiter_metrics.get_metrics()
        scorers = self._custom_scorers
        context = ScoringContext.lazy(
            rate_limiter_metrics=limiter_metrics,
            queue_metrics=self._queue_report_now,
            current_time=self._now(),
        )
        return lambda message: [scorer.calculate(message, context) for scorer in scorers]

    async def _attempt(self, limiter: Any) -> ProcessableMessage[T] | float | None:
        """One dispatch: a job handed out, the seconds until a held winner fits, or None."""
        if self._global is not None and self._global.usable_with(limiter):
            # The exact winner over the whole Redis queue, reserved and leased in one script.
            global_found: ProcessableMessage[T] | float | None = await self._global.attempt(limiter)
            return global_found
        while True:
            if self._prefetch is not None:
                await self._prefetch.prepare()
            if self.config.drop_expired:
                await self._drop_expired()
            if type(limiter) is LLMThrottle:
                found = self._core.dispatch(
                    limiter, self._custom_fn(limiter) if self._custom_scorers else None
                )
                if self._prefetch is None:
                    return found  # handed out already
            else:
                found = await self._choose(limiter)
            if type(found) is not ProcessableMessage or await self._hand_out(found):
                return found
            # Its lease was lost to another consumer (or a purge removed it): the next one.

    async def _choose(self, limiter: Any) -> ProcessableMessage[T] | float | None:
        """The core takes the winner under what the limiter reports; its reservation (under the
        delivery's key) or admission is awaited here; refused, the winner goes back."""
        metrics = await _call(limiter, "get_metrics")
        found = self._core.choose(
            limiter,
            float(metrics.tpm.available),
            float(metrics.rpm.available),
            float(metrics.tpm.limit),
            float(metrics.rpm.limit),
            self._custom_fn(metrics) if self._custom_scorers else None,
        )
        if type(found) is int:
            return await self._held_for(limiter, found)
        if type(found) is not ProcessableMessage:
            return None
        job: ProcessableMessage[T] = found
        try:
            parts = _token_parts(job.message)
            if self.config.reserve_budget:
                granted = await self._runner.reserve(limiter, job._key or "", job._tokens, parts)
            else:
                granted = bool((await _can_process(limiter, job._tokens, parts)).allowed)
        except BaseException:
            # Failed or cancelled while the limiter answered (a reservation granted meanwhile is
            # given back by `reserve`): the winner goes back as it was.
            await self._revoke(job, restore=True, reserved=False)
            raise
        if not granted:
            await self._revoke(job, restore=True, reserved=False)
            if not self.config.hold_budget:
                return None
            # Held: the winner's wait over every limit, by its parts where the margin is none.
            exact = parts if job._needed == job._tokens else None
            return await self._held_for(limiter, job._needed, exact)
        return job

    async def _hand_out(self, job: ProcessableMessage[T]) -> bool:
        """Hands out a job the core took and reserved; with a prefetch buffer once its lease is
        sure to be ours. False when it was lost meanwhile (its reservation goes back)."""
        try:
            kept = self._prefetch is None or await self._prefetch.confirm(job)
        except BaseException:
            # Cancelled or failed while renewing the lease: still ours, back into the buffer.
            await self._revoke(job, restore=True)
            raise
        if kept and self._core.hand_out(job):
            return True
        await self._revoke(job, restore=False)
        return False

    async def _revoke(self, job: ProcessableMessage[T], *, restore: bool, reserved: bool = True) -> None:
        """Takes back a job not handed out: its message where it came from (``restore``), its
        charge and its reservation (``reserved``: made on the limiter) back, the latter to its
        end even if this caller is cancelled."""
        plan = self._core.revoke(job, restore, reserved)
        if restore and self._prefetch is not None:
            self._prefetch.returned()
        if plan is not None:
            await self._runner.shielded(self._runner.limiter_call(plan))

    async def _held_for(
        self, limiter: Any, tokens: int, parts: tuple[int, int] | None = None
    ) -> float | None:
        """Seconds until a held winner of ``tokens`` (split into ``parts`` when known) fits
        (None when it never will)."""
        check = await _can_process(limiter, tokens, parts)
        self._refused(check)
        wait = float(check.available_in)
        return wait if math.isfinite(wait) else None

    def _refused(self, check: Any) -> None:
        """Tells the core, for the metrics, the limit a limiter other than `LLMThrottle` named
        refusing a waiting message (an `LLMThrottle`'s refusals the core sees itself). A request
        that can never be admitted waits for no limit."""
        reason = getattr(check, "reason", None)
        if not check.allowed and isinstance(reason, str) and math.isfinite(float(check.available_in)):
            self._core.limiter_refused(reason)

    async def _drop_expired(self) -> None:
        if self._prefetch is None:
            ids = self._core.drop_expired()
        else:
            ids = await self._prefetch.drop_expired()
            self._core.count_expired(len(ids))
        for request_id in ids:
            self._logger.warning("request %r removed unsent: its deadline has passed", request_id)
        if ids:
            await self._outcomes().expired(list(ids))

    # -- waiting -------------------------------------------------------------------------------
    async def _nothing_found(self, limiter: Any, held: float | None, seen: int | None = None) -> float:
        """After a dispatch that handed nothing out: reports (once each) the requests that can
        never fit, and works out (and remembers, for `time_until_ready`) how long until a
        dequeue could succeed: the core's `until_ready`, from what the limiter answers."""
        seen = self._wakeup.version if seen is None else seen
        metrics = await _call(limiter, "get_metrics")
        capacity, input_capacity, output_capacity = _token_capacities(metrics)
        unfittable = self._core.unfittable(capacity, input_capacity, output_capacity)
        for request_id in unfittable:
            self._logger.warning(
                "request %r needs more tokens than the limiter can ever grant (capacity %s); take it out "
                "with take_unfittable()",
                request_id,
                _capacities_shown(capacity, input_capacity, output_capacity),
            )
        if unfittable:
            await self._outcomes().unfittable(list(unfittable), capacity)
        wait = None
        if held is None and (smallest := self._core.min_visible_tokens()) is not None:
            check = await _call(limiter, "can_process", smallest)
            if type(limiter) is not LLMThrottle:
                self._refused(check)
            wait = float(check.available_in)
        refill = self.config.prefetch_interval if self._prefetch is not None else None
        until = self._core.until_ready(held, wait, float(metrics.tpm.available), refill)
        self._ready = (seen, self._now() + until)
        return until

    def time_until_ready(self) -> float:
        """Seconds of the dispatcher's clock until a `dequeue` could hand something out, as the
        last one that found nothing worked it out (0 when anything changed since, ``inf`` when
        only an enqueue or a mark can help): what a loop on a virtual clock advances by."""
        if self._ready is None or self._ready[0] != self._wakeup.version:
            return 0.0
        return max(0.0, self._ready[1] - self._now())

    async def take_unfittable(self, rate_limiter: Any) -> list[QueueMessage[T]]:
        """Receives every visible message the limiter can never grant: its estimate above the
        capacity of a limit that counts it whole (``tpm``, ``tpd``), or, with input and output
        limits, its input part (``TokenInfo.input``) above ``itpm``'s capacity or its
        ``max_output`` above ``otpm``'s (an estimate without parts counts whole against those
        too).

        Such a request can never be dispatched. The messages come back leased (in flight, no
        budget reserved); delete them, or fail them until the store dead-letters them.
        """
        check_rate_limiter(rate_limiter)
        metrics = await _call(rate_limiter, "get_metrics")
        taken: list[QueueMessage[T]] = self._core.take_above(*_token_capacities(metrics))
        return taken

    # -- prefetching and shutdown --------------------------------------------------------------
    def stop(self) -> None:
        """Stops prefetching. Buffered messages stay leased until `close()` or their timeout."""
        if self._prefetch is not None:
            self._prefetch.stop()

    async def close(self) -> None:
        """Stops prefetching and gives buffered messages back unprocessed (their receive
        undone); waits for marks and reservation give-backs whose callers were cancelled."""
        try:
            if self._submissions is not None:
                # Its pool first: its worker still dequeues until it stops.
                await self._submissions.close()
        finally:
            self._closed = True
        try:
            if self._prefetch is not None:
                await self._prefetch.close()
        finally:
            while True:
                pending = set(self._runner.pending)
                if self._global is not None:
                    # Winners of cancelled global dispatches, calls on their way.
                    pending |= self._global._recoveries
                running = running_here(pending)
                if not running:
                    break
                # `wait`, not `gather`: a cancelled close must not cancel what it waits for.
                # Again after: what it waited for may have started more (a give-back).
                await asyncio.wait(running)

    async def release_buffered(self) -> None:
        """Gives buffered messages back unprocessed (their receive undone: a stop uses up no
        receive) and halts the background prefetch and renewals until the next `dequeue` (unlike
        `close()`). `Worker` calls it when it stops. A no-op with the in-memory store."""
        if self._prefetch is not None:
            await self._prefetch.release_buffered()

    async def __aenter__(self) -> LLMQueueDispatcher[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- metrics -------------------------------------------------------------------------------
    def _queue_report_now(self, r: CoreReport | None = None) -> QueueMetricsReport:
        """The queue report from in-process state only (what custom scorers may read)."""
        r = r or self._core.report()
        by_priority = dict(zip([p.name for p in Priority], r.counts_by_priority, strict=True))
        selectable = sum(by_priority.values())
        oldest = r.oldest_enqueued_at
        return QueueMetricsReport(
            approximate_number_of_messages=selectable,
            approximate_number_of_messages_in_flight=r.in_flight,
            buffered_messages=r.buffered,
            total_messages=selectable + r.in_flight,
            messages_by_priority=by_priority,
            oldest_message_age=0.0 if oldest is None else max(0.0, r.now - oldest),
            average_wait_time=r.average_wait,
            wait_time_percentiles=WaitTimePercentiles(r.wait_p50, r.wait_p95, r.wait_p99),
            throughput=Throughput(r.messages_per_minute, r.tokens_per_minute),
            failed=r.failed,
            unfittable_messages=r.unfittable,
            expired_deadlines=r.expired_deadlines,
        )

    async def get_queue_metrics(self) -> QueueMetrics:
        """Queue depth, waits, throughput (real tokens), in-flight details and dequeue latency."""
        attributes = await self._storage.get_queue_attributes()
        report, now = self._core.report(), self._now()
        local = self._queue_report_now(report)
        fields = dict(local.__dict__, dead_lettered=attributes.dead_lettered)
        if self._prefetch is not None:
            # The store counts buffered messages as in flight (the buffer leased them); here
            # they count once, as waiting.
            visible = attributes.approximate_number_of_messages + report.buffered
            in_flight = max(0, attributes.approximate_number_of_messages_in_flight - report.buffered)
            fields.update(
                approximate_number_of_messages=visible,
                approximate_number_of_messages_in_flight=in_flight,
                total_messages=visible + in_flight,
            )
        details = [
            InFlightDetail(
                d.request_id,
                d.message_id,
                d.priority,
                d.estimated_tokens,
                d.score,
                d.started_at,
                now - d.started_at,
            )
            for d in self._core.in_flight()
        ]
        tenants = {
            t.name: TenantMetrics(
                t.visible,
                t.in_flight,
                t.tokens_in_window,
                t.tokens_served,
                WaitTimePercentiles(t.wait_p50, t.wait_p95, t.wait_p99),
            )
            for t in self._core.tenants()
        }
        return QueueMetrics(
            queue=QueueMetricsReport(**fields),
            processing=ProcessingMetrics(active_requests=len(details), in_flight_details=details),
            performance=PerformanceMetrics(
                prefetch_enabled=self.config.enable_prefetch,
                buffer_utilization=report.buffered / self.config.buffer_size,
                dequeue_latency=LatencyPercentiles(report.latency_p50, report.latency_p99),
            ),
            tenants=tenants,
            scheduling=_scheduling(report),
        )


def _scheduling(report: CoreReport) -> SchedulingMetrics:
    """The scheduling part of a metrics report, from the core's figures."""
    slo = {
        priority.name: SloAttainment(
            target=target,
            dispatched=dispatched,
            met=met,
            attainment=met / dispatched if dispatched else None,
        )
        for priority, target, dispatched, met in zip(
            Priority, report.slo_targets, report.slo_dispatched, report.slo_met, strict=True
        )
    }
    return SchedulingMetrics(
        slo_attainment=slo,
        binding_limit=report.binding_limit or "none",
        waited_by_limit=dict(report.waited_by_limit),
    )


def _token_capacities(metrics: Any) -> tuple[float, float, float]:
    """From a limiter's metrics, the most tokens it can ever grant one request: the smallest
    capacity of the limits counting the whole estimate (``tpm``, and ``tpd`` where set), and the
    capacities of the input and output limits (``itpm``, ``otpm``; infinite where not set)."""

    def limit(name: str) -> float:
        bucket = getattr(metrics, name, None)
        return math.inf if bucket is None else float(bucket.limit)

    return min(float(metrics.tpm.limit), limit("tpd")), limit("itpm"), limit("otpm")


def _capacities_shown(capacity: float, input_capacity: float, output_capacity: float) -> str:
    """The capacities for a log line: ``1000``, or ``1000; input 300, output 200``."""
    limits = (("input", input_capacity), ("output", output_capacity))
    shown_parts = [f"{name} {value:g}" for name, value in limits if math.isfinite(value)]
    return f"{capacity:g}" + (f"; {', '.join(shown_parts)}" if shown_parts else "")
