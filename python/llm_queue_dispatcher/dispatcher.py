"""`LLMQueueDispatcher`: picks the best request the rate limiter can take now, and tracks it.

The selection, the deliveries handed out and their books live in one Rust object,
`DispatchCore`; this module keeps what only Python can own: coroutines, waiting, and the I/O the
core asks for. With `InMemoryStorage` and an `LLMThrottle` a `dequeue` is one call into Rust, and
so is each mark of the job it returns. Otherwise `_attempt` asks the core for the winner and
awaits its reservation on the limiter under the delivery's key, ``"request-id#n"`` (`_choose`),
and its lease in another store's prefetch buffer (`_hand_out`, ``prefetch.py``); over Redis the
global choice does all three in one script (``redis/global_choice.py``). A mark that needs I/O
comes back as a `Plan` that `_Runner` awaits to its end, reporting each reply to the core.

Read top to bottom, one `dequeue` calls out and never back: to the core, the limiter (the
helpers below), the prefetcher or the global choice, and `wakeup.py` to wait. What is not on
that path lives elsewhere: the metrics report (``metrics.py``), awaiting an outcome
(``outcomes.py``), the config's checks and the core's options (``config.py``), the custom
scorers' context (``scoring.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._checks import timeout_seconds
from ._core import DispatchCore, LLMThrottle, Plan, ProcessableMessage
from .config import LLMQueueDispatcherConfig
from .errors import InvalidRequestError, MessageStateError, ReceiptHandleError, UnknownRequestError
from .metrics import QueueMetrics, queue_metrics
from .outcomes import DEFAULT_SUBMIT_CONCURRENCY, Submissions
from .outcomes import enqueued as _withdrawals_lapse
from .prefetch import Prefetcher, running_here
from .scoring import ScoringConfig, custom_scores
from .storage import InMemoryStorage, QueueStorageAdapter
from .storage.base import _as_list
from .throttle import check_rate_limiter
from .types import LLMRequest, QueueMessage
from .wakeup import Wakeup

__all__ = ["LLMQueueDispatcher", "ProcessableMessage"]

T = TypeVar("T")

_LOGGER = logging.getLogger("llm_queue_dispatcher")

_MIN_WAIT = 0.001  # the shortest sleep of a waiting `dequeue` (seconds)


def _invoke(limiter: Any, method: str, *args: Any, parts: tuple[int, int] | None = None) -> Any:
    """``limiter.method(*args)``, with a request's input and output ``parts`` where they are known
    and the method takes them (each limit then takes its own share)."""
    if parts is not None and _takes_parts(limiter, method):
        return getattr(limiter, method)(*args, input_tokens=parts[0], output_tokens=parts[1])
    return getattr(limiter, method)(*args)


async def _call(limiter: Any, method: str, *args: Any, parts: tuple[int, int] | None = None) -> Any:
    """`_invoke`, awaited when the limiter's method is a coroutine."""
    result = _invoke(limiter, method, *args, parts=parts)
    return await result if inspect.isawaitable(result) else result


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


async def _done() -> None:
    """A mark with nothing left to do."""


class _Runner:
    """The I/O of the core's plans, each run to its end in a task of its own even if its caller
    is cancelled (its store call may have landed, and the books must follow it). The core calls
    its `mark`, its `wakeup` (waiting dequeues) and its `prefetch` (a buffered job's visibility);
    `LLMQueueDispatcher.close` waits for what it runs."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.core: DispatchCore
        self.prefetch: Prefetcher[Any] | None = None
        self.global_choice: Any = None  # redis.global_choice.GlobalChoice, when it applies
        self.wakeup: Wakeup
        self.pending: set[asyncio.Future[Any]] = set()

    def mark(self, job: ProcessableMessage[Any], *settle: Any) -> Awaitable[None]:
        """A job's mark that needs I/O (``settle``: what `DispatchCore.settle` takes after the
        job): settled in the core when awaited, then its plan awaited to its end. A job of the
        global choice settles at once, and its plan joins that choice's next mark call without a
        task of its own (`GlobalChoice.settled`)."""
        choice = self.global_choice
        if choice is None or not choice.owns(job):
            return self._mark(job, *settle)
        plan = self.core.settle(job, *settle)
        if plan is not None and choice.handles(plan):
            settled: Awaitable[None] = choice.settled(plan)
            return settled
        return self.shielded(self._execute(plan)) if plan is not None else _done()

    async def _mark(self, job: ProcessableMessage[Any], *settle: Any) -> None:
        plan = self.core.settle(job, *settle)
        if plan is not None:
            await self.shielded(self._execute(plan))

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
                await _call(limiter, "adjust_consumption", plan.key, plan.tokens, parts=plan.parts)
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
        """``limiter.consume(key, tokens)`` (by ``parts``: `_invoke`). Cancelled while an
        asynchronous consume is on its way (a round trip to a shared limiter), the call still
        completes, and a reservation it made is given back in a task `close` waits for: a
        cancelled dequeue takes nothing."""
        result = _invoke(limiter, "consume", key, tokens, parts=parts)
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
        config = self.config = LLMQueueDispatcherConfig._checked_copy(config)
        self._storage = storage
        logger = config.logger or _LOGGER
        scorers = list((config.scoring or ScoringConfig()).custom_scorers)
        # Exactly InMemoryStorage: a subclass may override its methods, so it takes the general path.
        pool = storage.core if type(storage) is InMemoryStorage else None
        self._runner = runner = _Runner(logger)
        self._core = runner.core = DispatchCore(pool, runner=runner, logger=logger, **config._core_options())
        # What the core calls for custom scores during one dispatch, given the limiter (or its metrics).
        self._scores = functools.partial(custom_scores, scorers, core=self._core) if scorers else None
        self._prefetch: Prefetcher[T] | None = None
        self._global: Any = None  # redis.global_choice.GlobalChoice, where the store offers it
        if pool is None:
            self._prefetch = runner.prefetch = Prefetcher(storage, self._core, config, logger)
            if choice := getattr(storage, "_global_choice", None):  # RedisStorage's
                self._global = runner.global_choice = choice(config, self._core, bool(scorers))
        # The hot path: a dequeue that is one call into Rust.
        self._fast = pool is not None and not config.drop_expired
        self._wakeup = runner.wakeup = Wakeup(self._core)
        self._closed = False
        # Submitters waiting for their outcome, and the pool of `submit(handler=...)`: made when
        # first needed (a submit, or a worker reporting an outcome).
        self._submissions: Submissions | None = None

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
        else:
            await self._prefetch.purge()
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
            found = self._core.dispatch(rate_limiter, self._scores(rate_limiter) if self._scores else None)
            if type(found) is ProcessableMessage:
                return found
            await self._nothing_found(rate_limiter, found)
            return None
        check_rate_limiter(rate_limiter)
        timeout = timeout_seconds(timeout)
        if self._prefetch is not None:
            if self._closed:
                raise MessageStateError("dispatcher is closed")
            if self.config.enable_prefetch and self._global_with(rate_limiter) is None:
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
        if count > 1 and not self._closed and (choice := self._global_with(rate_limiter)) is not None:
            found: list[ProcessableMessage[T]] | float | None = await choice.attempt_many(rate_limiter, count)
            if isinstance(found, list):
                return found
        job = await self.dequeue(rate_limiter, timeout=timeout)
        return [] if job is None else [job]

    def _global_with(self, limiter: Any) -> Any:
        """The global choice (``redis/global_choice.py``) where it applies with ``limiter``: a
        `RedisThrottle` co-located with the queue; else None."""
        return self._global if self._global is not None and self._global.usable_with(limiter) else None

    async def _attempt(self, limiter: Any) -> ProcessableMessage[T] | float | None:
        """One dispatch: a job handed out, the seconds until a held winner fits, or None."""
        if (choice := self._global_with(limiter)) is not None:
            # The exact winner over the whole Redis queue, reserved and leased in one script.
            global_found: ProcessableMessage[T] | float | None = await choice.attempt(limiter)
            return global_found
        while True:
            if self._prefetch is not None:
                await self._prefetch.prepare()
            if self.config.drop_expired:
                await self._drop_expired()
            if type(limiter) is LLMThrottle:
                found = self._core.dispatch(limiter, self._scores(limiter) if self._scores else None)
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
        found = self._core.choose(limiter, metrics, self._scores(metrics) if self._scores else None)
        if type(found) is int:
            return await self._held_for(limiter, found)
        if type(found) is not ProcessableMessage:
            return None
        job: ProcessableMessage[T] = found
        try:
            parts = job.message.payload.token_info.parts
            if self.config.reserve_budget:
                granted = await self._runner.reserve(limiter, job._key or "", job._tokens, parts)
            else:
                granted = bool((await _call(limiter, "can_process", job._tokens, parts=parts)).allowed)
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
        check = await _call(limiter, "can_process", tokens, parts=parts)
        wait = self._core.refusal_wait(limiter, check)
        return wait if math.isfinite(wait) else None

    async def _drop_expired(self) -> None:
        """Removes the requests whose deadline has passed (the core logs and counts them)."""
        ids = self._core.drop_expired() if self._prefetch is None else await self._prefetch.drop_expired()
        if ids:
            await self._outcomes().expired(list(ids))

    # -- waiting -------------------------------------------------------------------------------
    async def _nothing_found(self, limiter: Any, held: float | None, seen: int | None = None) -> float:
        """After a dispatch that handed nothing out: reports (once each) the requests that can
        never fit, and works out (and remembers, for `time_until_ready`) how long until a
        dequeue could succeed: the core's `until_ready`, from what the limiter answers."""
        seen = self._wakeup.version if seen is None else seen
        metrics = await _call(limiter, "get_metrics")
        capacity = self._core.capacity(limiter, metrics)
        if unfittable := self._core.unfittable(capacity):  # logs each once
            await self._outcomes().unfittable(unfittable, capacity.whole)
        wait = None
        if held is None and (smallest := self._core.min_visible_tokens()) is not None:
            wait = self._core.refusal_wait(limiter, await _call(limiter, "can_process", smallest))
        refill = self.config.prefetch_interval if self._prefetch is not None else None
        return self._core.until_ready(limiter, metrics, held, wait, refill, seen)

    def time_until_ready(self) -> float:
        """Seconds of the dispatcher's clock until a `dequeue` could hand something out, as the
        last one that found nothing worked it out (0 when anything changed since, ``inf`` when
        only an enqueue or a mark can help): what a loop on a virtual clock advances by."""
        return self._core.time_until_ready()

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
        taken: list[QueueMessage[T]] = self._core.take_above(self._core.capacity(rate_limiter, metrics))
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
                    pending |= self._global.pending()  # give-backs, calls on their way
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
    async def get_queue_metrics(self) -> QueueMetrics:
        """Queue depth, waits, throughput (real tokens), in-flight details and dequeue latency."""
        attributes = await self._storage.get_queue_attributes()
        return queue_metrics(
            self._core, attributes, self.config, buffered_in_store=self._prefetch is not None
        )
