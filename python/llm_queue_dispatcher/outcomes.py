"""What `LLMQueueDispatcher.submit` awaits: the outcome of one request, from whoever ends it.

A submitted request ends in exactly one of these ways, and its submitter hears of each:

* processed: a `Worker` (or the dispatcher's own pool) ran its handler, which returned: the
  submitter gets the handler's return value (``HandlerResult.value`` when it returns one);
* dead-lettered: the handler raised `PermanentError`, or failed for the last time its store's
  ``max_receive_count`` allows: `RequestFailedError` with that error (reported when the worker
  marks it, before the store moves it); dead-lettered by the store itself when the lease of its
  last receive ran out: `RequestFailedError` with a `MessageStateError` (told by the store:
  `_LocalHub.store_ended`, or the Redis queue scripts);
* expired (``drop_expired``, or past the store's message retention) or purged:
  `RequestFailedError` with an error saying so;
* larger than the limiter can ever grant: `RequestFailedError` with a `RateLimitError`
  (``available_in`` infinite); the message stays queued for ``take_unfittable()``;
* withdrawn: the submitter's await was cancelled. A request not yet dispatched is never handed
  to a handler: the in-memory store takes it out at once (its id is free again); elsewhere, or
  when a dequeue received it already, a worker that takes it deletes it without calling the
  handler (one request of the limiter's budget, no tokens). One already running runs to its
  end; its result is discarded.

The outcomes travel through a *relay*: `LocalRelay` within one process, or the store's own (with
`RedisStorage`, `llm_queue_dispatcher.redis.outcomes.RedisRelay`, so the outcome reaches the
submitting process when another process handled the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import operator
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from ._checks import real_number, shown
from ._core import StoreCore
from .errors import (
    DuplicateRequestError,
    ExpiredError,
    InvalidRequestError,
    MessageStateError,
    PermanentError,
    PurgedError,
    RateLimitError,
    RequestFailedError,
)
from .throttle import check_rate_limiter
from .types import LLMRequest, TokenUsage

if TYPE_CHECKING:
    from ._core import ProcessableMessage
    from .dispatcher import LLMQueueDispatcher
    from .throttle import AsyncRateLimiter, RateLimiter
    from .worker import Worker

__all__ = [
    "DEFAULT_SUBMIT_CONCURRENCY",
    "HandlerResult",
    "LocalRelay",
    "Outcome",
    "OutcomeRelay",
    "Submissions",
]

R = TypeVar("R")

_LOGGER = logging.getLogger("llm_queue_dispatcher")

#: Handlers the dispatcher's own pool runs at once, unless ``submit(concurrency=...)`` says.
DEFAULT_SUBMIT_CONCURRENCY = 16


@dataclass(frozen=True)
class HandlerResult(Generic[R]):
    """What a handler returns when its submitter's answer is not the token count: ``value`` goes
    to the submitter, ``actual_tokens`` (a total, a `TokenUsage` with the input and output apart,
    or None: keep the estimate) corrects the rate limiter.

    A handler returning anything else: a `Worker` marks it processed with that value as the
    token count (the `Worker` contract) and the submitter gets the same value; the dispatcher's
    own pool (``submit(request, handler)``) hands it to the submitter and keeps the estimate.
    """

    value: R
    actual_tokens: int | TokenUsage | None = None


def split_result(result: object) -> tuple[object, object]:
    """(the submitter's value, the token count for the mark) of a handler's return value."""
    if isinstance(result, HandlerResult):
        return result.value, result.actual_tokens
    return result, result


@dataclass(frozen=True)
class Outcome:
    """How one request ended: ``value`` when ``ok``, else ``error``."""

    ok: bool
    value: Any = None
    error: BaseException | None = None


class OutcomeRelay(Protocol):
    """How outcomes travel from whoever ends a request to its submitter. ``deliver`` (given at
    construction) resolves a submitter waiting in this process."""

    async def expect(self, request_id: str) -> None:
        """A submitter of this process waits for ``request_id`` (before its enqueue)."""

    async def enqueued(self, request_id: str) -> None:
        """Its enqueue succeeded."""

    async def forget(self, request_id: str) -> None:
        """Its enqueue failed: nobody waits."""

    async def claim(self, request_id: str) -> bool:
        """A worker is about to run the handler: False when the submitter withdrew it (the
        worker then deletes it unprocessed)."""

    async def report(self, request_id: str, outcome: Outcome, *, here: bool) -> None:
        """``request_id`` ended; ``here``: its submitter waits in this process and has the
        outcome already, only the relay's record of the wait must go."""

    async def withdraw(self, request_id: str) -> None:
        """Its submitter stopped waiting."""

    async def purged(self) -> None:
        """Every queued request of the store was purged: all their submitters fail."""

    async def close(self) -> None:
        """Stops listening."""


class _LocalHub:
    """What the dispatchers of one process sharing one store (an `InMemoryStorage`) know of
    its submitters: who waits for each request, and the requests withdrawn and not yet taken
    by a worker. A worker on one dispatcher thus answers a submit made on another."""

    def __init__(self, store: StoreCore | None = None) -> None:
        self.waiting: dict[str, Callable[[str, Outcome], None]] = {}
        self.withdrawn: set[str] = set()
        # The in-memory store, where a withdrawn request still waiting is taken out at once.
        self.store = store

    def store_ended(self, dead_lettered: list[str], expired: list[str]) -> None:
        """The store ended these requests (an `InMemoryStorage` core's ended listener):
        dead-lettered, or dropped past the message retention. Their submitters hear so on the
        event loop's next turn, unless the outcome was told meanwhile by whoever ended them
        with a reason of their own (a worker's dead-letter mark, a deadline's expiry): a store
        that dead-letters a message whose last lease ran out, or drops one past its retention,
        is the only one to know."""
        ended: list[tuple[str, BaseException]] = []
        for rid in dead_lettered:
            ended.append((rid, MessageStateError(f"request {rid!r} was dead-lettered by the store")))
        for rid in expired:
            ended.append((rid, ExpiredError(f"request {rid!r} expired past its retention period")))
        try:
            asyncio.get_running_loop().call_soon(self._end_all, ended)
        except RuntimeError:  # no event loop here (a store used from a thread of its own)
            self._end_all(ended)

    def _end_all(self, ended: list[tuple[str, BaseException]]) -> None:
        for request_id, error in ended:
            self._end(request_id, error)

    def _end(self, request_id: str, error: BaseException) -> None:
        self.withdrawn.discard(request_id)
        deliver = self.waiting.pop(request_id, None)
        if deliver is not None:
            deliver(request_id, Outcome(False, error=error))


# The hub of each store whose relay is a `LocalRelay`, as long as the store lives.
_HUBS: weakref.WeakKeyDictionary[object, _LocalHub] = weakref.WeakKeyDictionary()


def _hub_of(storage: object) -> _LocalHub:
    try:
        hub = _HUBS.get(storage)
    except TypeError:  # a store that cannot be weakly referenced: its dispatcher's own
        return _LocalHub()
    if hub is None:
        core = getattr(storage, "core", None)
        store = core if isinstance(core, StoreCore) else None
        hub = _HUBS[storage] = _LocalHub(store)
        if store is not None:  # an InMemoryStorage: the store tells what it ends
            store.set_ended_listener(hub.store_ended)
    return hub


class LocalRelay:
    """Outcomes within one process, shared by the dispatchers of one store (``hub``): who
    waits for each request, and the requests withdrawn and not yet taken by a worker."""

    def __init__(self, deliver: Callable[[str, Outcome], None], hub: _LocalHub | None = None) -> None:
        self._deliver = deliver
        self._hub = _LocalHub() if hub is None else hub
        self.withdrawn = self._hub.withdrawn

    async def expect(self, request_id: str) -> None:
        if self._hub.waiting.get(request_id, self._deliver) != self._deliver:
            raise DuplicateRequestError(f"request {request_id!r} is already submitted and waiting")
        self._hub.waiting[request_id] = self._deliver

    async def enqueued(self, request_id: str) -> None:
        # The enqueue succeeded, so no message of that id was left: a withdrawal is moot.
        self.withdrawn.discard(request_id)

    def _ours(self, request_id: str) -> None:
        if self._hub.waiting.get(request_id) == self._deliver:
            del self._hub.waiting[request_id]

    async def forget(self, request_id: str) -> None:
        self._ours(request_id)

    async def claim(self, request_id: str) -> bool:
        if request_id in self.withdrawn:
            self.withdrawn.discard(request_id)
            return False
        return True

    async def report(self, request_id: str, outcome: Outcome, *, here: bool) -> None:
        self.withdrawn.discard(request_id)
        if here:
            self._ours(request_id)
            return
        deliver = self._hub.waiting.pop(request_id, None)
        if deliver is not None:
            deliver(request_id, outcome)  # a submitter of another dispatcher of the store

    async def withdraw(self, request_id: str) -> None:
        # Only while it is awaited (as the Redis relay does): one already reported or ended
        # has no message left for a worker to skip, and nothing would ever take the mark away.
        if self._hub.waiting.get(request_id) == self._deliver:
            del self._hub.waiting[request_id]
            store = self._hub.store
            if store is None or not store.withdraw(request_id):
                # Received already (its worker decides), or a store that cannot take it out:
                # the worker that takes it deletes it unprocessed.
                self.withdrawn.add(request_id)

    async def purged(self) -> None:
        self.withdrawn.clear()
        for request_id, deliver in list(self._hub.waiting.items()):
            del self._hub.waiting[request_id]
            if deliver != self._deliver:  # this dispatcher's own were told already
                deliver(request_id, Outcome(False, error=PurgedError(f"request {request_id!r} was purged")))

    async def close(self) -> None:
        return None


def _relay_for(storage: object, deliver: Callable[[str, Outcome], None]) -> OutcomeRelay:
    make = getattr(storage, "_outcome_relay", None)
    if callable(make):
        relay: OutcomeRelay = make(deliver)
        return relay
    return LocalRelay(deliver, _hub_of(storage))


def enqueued(storage: object, requests: Sequence[LLMRequest[Any]]) -> None:
    """Requests just enqueued on ``storage`` by any means: a withdrawal of an earlier request of
    the same id (its message gone since, dropped by the store) no longer applies, so the new one
    is not deleted unrun when a worker takes it. Only in-process stores keep withdrawals here."""
    hub = _HUBS.get(storage) if _weakly_referable(storage) else None
    if hub is not None and hub.withdrawn:
        for request in requests:
            hub.withdrawn.discard(request.id)


def _weakly_referable(storage: object) -> bool:
    try:
        weakref.ref(storage)
    except TypeError:
        return False
    return True


class _Pool:
    """The dispatcher's own workers for ``submit(request, handler)``: one `Worker` under one
    rate limiter, started at the first such submit, stopped by `LLMQueueDispatcher.close`."""

    def __init__(self, book: Submissions, limiter: Any, concurrency: int) -> None:
        from .worker import Worker

        self.limiter = limiter
        self.book = book
        self.latest: Callable[[ProcessableMessage[Any]], Awaitable[Any]] | None = None
        self.worker: Worker[Any] = Worker(book.dispatcher, limiter, self._run, concurrency=concurrency)
        self.task: asyncio.Task[Any] | None = None

    def ensure_running(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.worker.run(), name="llmqd-submit-pool")
            self.task.add_done_callback(self._ended)

    @staticmethod
    def _ended(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error(
                "the submit pool's worker failed; restarted by the next submit", exc_info=task.exception()
            )

    async def _run(self, job: ProcessableMessage[Any]) -> Any:
        handler = self.book.handlers.get(job.message.payload.id) or self.latest
        if handler is None:
            # Not submitted with a handler in this process and none ever was: nothing can run it.
            raise MessageStateError(f"no handler for request {job.message.payload.id!r}")
        running = handler(job)
        if not inspect.isawaitable(running):
            # A plain function given by mistake: it ran, but a retry would run it again for
            # nothing (for ever without max_receive_count). Its submitter hears why at once.
            raise PermanentError(
                f"handler {shown(handler)} returned {shown(running)}, not an awaitable: submit takes an "
                "async handler (an async def function)"
            )
        result = await running
        return result if isinstance(result, HandlerResult) else HandlerResult(result)

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            self.worker.stop()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task


def _concurrency(value: object) -> int:
    count = real_number(value)
    if count is None or isinstance(value, float) or count < 1:
        raise InvalidRequestError(f"concurrency must be an int >= 1, got {shown(value)}")
    return operator.index(cast("int", value))


class Submissions:
    """One dispatcher's submitters waiting for their outcome, and its pool. Created by the
    dispatcher when first needed (a submit, or a worker reporting)."""

    def __init__(self, dispatcher: LLMQueueDispatcher[Any], storage: object) -> None:
        self.dispatcher = dispatcher
        self.waiting: dict[str, asyncio.Future[Outcome]] = {}
        self.handlers: dict[str, Callable[[ProcessableMessage[Any]], Awaitable[Any]]] = {}
        self.relay: OutcomeRelay = _relay_for(storage, self.deliver)
        self.max_receive_count: int | None = getattr(storage, "max_receive_count", None)
        self.pool: _Pool | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        # Set by `close`: a closed dispatcher's pool no longer dequeues, nor does its relay listen.
        self.closed = False
        # Set when `close` begins: a handler waiting on its caller (a queued client's open
        # stream) ends at once instead of holding the pool's stop for its grace.
        self.closing = asyncio.Event()

    # -- the submitter's side ------------------------------------------------------------------
    async def submit(
        self,
        request: LLMRequest[Any],
        handler: Callable[[ProcessableMessage[Any]], Awaitable[Any]] | None,
        limiter: RateLimiter | AsyncRateLimiter | None,
        concurrency: object,
    ) -> Any:
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"request must be an LLMRequest, got {shown(request)}")
        pool = None
        if handler is not None:
            if not callable(handler):
                raise InvalidRequestError(f"handler must be an async callable or None, got {shown(handler)}")
            # Checked (and built, unstarted) now, kept only once the request is enqueued: a submit
            # refused later (a bad or duplicate request, a closed dispatcher) must not leave the
            # dispatcher's pool bound to its limiter, which would refuse every other limiter.
            pool = self._pool(limiter, _concurrency(concurrency))
        elif limiter is not None:
            raise InvalidRequestError("rate_limiter is only used with a handler (the dispatcher's own pool)")
        if self.closed or self.dispatcher._closed:
            # Nothing would end it: its pool is stopped and its relay no longer listens.
            raise MessageStateError("dispatcher is closed")
        request_id = request.id
        if request_id in self.waiting:
            raise DuplicateRequestError(f"request {request_id!r} is already submitted and waiting")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        if handler is not None:
            self.handlers[request_id] = handler
        try:
            await self.relay.expect(request_id)
            try:
                await self.dispatcher.enqueue(request)
            except asyncio.CancelledError:
                # The enqueue may have landed (a store's reply lost to the cancellation):
                # withdrawn, so that no handler runs it if it did.
                await self._shielded(self.relay.withdraw(request_id))
                raise
            except BaseException:
                await self._shielded(self.relay.forget(request_id))
                raise
            recorded = asyncio.ensure_future(self.relay.enqueued(request_id))
            try:
                await self._shielded(recorded)
            except asyncio.CancelledError:
                # Enqueued, and its submitter stopped waiting: withdrawn once the relay has the
                # enqueue (which clears an earlier withdrawal of the id), so no handler runs it.
                await self._shielded(self._withdraw_once_recorded(recorded, request_id))
                raise
        except BaseException:
            if self.waiting.get(request_id) is future:
                del self.waiting[request_id]
            self.handlers.pop(request_id, None)
            raise
        if pool is not None and not self.closed:
            # Another submit may have kept a pool while this one enqueued: that one runs it.
            pool = self.pool = self.pool or pool
            pool.latest = handler
            pool.ensure_running()
        try:
            outcome = await future
        except asyncio.CancelledError:
            if self.waiting.get(request_id) is future:
                del self.waiting[request_id]
                self.handlers.pop(request_id, None)
                await self._shielded(self.relay.withdraw(request_id))
            raise
        if outcome.ok:
            return outcome.value
        assert outcome.error is not None
        raise RequestFailedError(request_id, outcome.error)

    def _pool(self, limiter: Any, concurrency: int) -> _Pool:
        if limiter is None:
            raise InvalidRequestError(
                "submit with a handler needs rate_limiter= (its pool dispatches under it)"
            )
        if self.pool is None:
            # The dispatcher's own check (a limiter class is refused too): a limiter its
            # `dequeue` refuses would stop the pool's worker at once and leave the submitter
            # waiting for ever.
            check_rate_limiter(limiter)
            # Not kept here: `submit` keeps it once its request is enqueued.
            return _Pool(self, limiter, concurrency)  # the Worker checks the rest
        if self.pool.limiter is not limiter:
            raise InvalidRequestError(
                "the dispatcher's pool already runs under another rate limiter; pass the same one"
            )
        return self.pool

    async def _withdraw_once_recorded(self, recorded: asyncio.Future[None], request_id: str) -> None:
        with contextlib.suppress(Exception):  # the relay's failure to record it: withdrawn anyway
            await recorded
        await self.relay.withdraw(request_id)

    def _shielded(self, work: Awaitable[None]) -> Awaitable[None]:
        """Runs ``work`` to its end even if the caller is cancelled meanwhile."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return asyncio.shield(task)

    def deliver(self, request_id: str, outcome: Outcome) -> None:
        """Resolves the submitter of this process waiting for ``request_id``, if any."""
        future = self.waiting.pop(request_id, None)
        self.handlers.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    # -- the side of whoever ends a request ----------------------------------------------------
    async def claim(self, job: ProcessableMessage[Any]) -> bool:
        """Before a handler runs: False when its submitter withdrew the request."""
        try:
            return await self.relay.claim(job.message.payload.id)
        except Exception:
            _LOGGER.exception(
                "could not look whether request %r was withdrawn; running it", job.message.payload.id
            )
            return True

    async def report(self, request_id: str, outcome: Outcome) -> None:
        """``request_id`` ended: its submitter hears of it, here or (through the relay) in the
        process that submitted it. A relay failure is logged: the request's own mark stands."""
        here = request_id in self.waiting
        if here:
            self.deliver(request_id, outcome)
        try:
            await self.relay.report(request_id, outcome, here=here)
        except Exception:
            _LOGGER.exception("could not report the outcome of request %r to its submitter", request_id)

    async def processed(self, job: ProcessableMessage[Any], value: object) -> None:
        await self.report(job.message.payload.id, Outcome(True, value))

    async def failed(self, job: ProcessableMessage[Any], error: BaseException) -> None:
        await self.report(job.message.payload.id, Outcome(False, error=error))

    def last_attempt(self, job: ProcessableMessage[Any]) -> bool:
        """Whether a failed mark of ``job`` dead-letters it (its store's ``max_receive_count``
        used up): the failure is then its outcome."""
        limit = self.max_receive_count
        return limit is not None and job.message.attributes.receive_count >= limit

    async def expired(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            await self.report(
                request_id, Outcome(False, error=ExpiredError(f"request {request_id!r} expired"))
            )

    async def unfittable(self, request_ids: list[str], capacity: float) -> None:
        """Requests larger than the limiter can ever grant: their submitters fail (the messages
        stay queued, for ``take_unfittable()``)."""
        for request_id in request_ids:
            error = RateLimitError(
                "tpm_limit",
                math.inf,
                f"request {request_id!r} needs more tokens than the limiter can ever grant "
                f"(capacity {capacity})",
            )
            await self.report(request_id, Outcome(False, error=error))

    async def purged(self) -> None:
        for request_id in list(self.waiting):
            self.deliver(request_id, Outcome(False, error=PurgedError(f"request {request_id!r} was purged")))
        try:
            await self.relay.purged()
        except Exception:
            _LOGGER.exception("could not report the purge to the submitters of other processes")

    async def close(self) -> None:
        """Stops the pool and the relay; submitters still waiting here fail and their requests
        are withdrawn (one already running elsewhere ends there; its outcome reaches nobody).
        Later submits raise `MessageStateError`."""
        self.closed = True
        self.closing.set()
        if self.pool is not None:
            await self.pool.stop()
        for request_id in list(self.waiting):
            closed = MessageStateError("the dispatcher was closed while the request waited")
            self.deliver(request_id, Outcome(False, error=closed))
            with contextlib.suppress(Exception):
                await self.relay.withdraw(request_id)
        await self.relay.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
