"""`Worker`: the loop every user would otherwise write around `LLMQueueDispatcher.dequeue`.

One file past 700 lines: the handler's outcomes, its leases, its stop and its signals all act
on the same running handlers and must be read together to see that each message settles once.

It takes the message the dispatcher chose (its budget already reserved), runs the handler on it
with at most ``concurrency`` handlers at once, keeps the message leased while the handler runs,
and settles it exactly once:

* the handler returns ``n`` (or None) -> ``mark_as_processed(actual_tokens=n)``; it returns a
  `TokenUsage` -> ``mark_as_processed(input_tokens=usage.input, output_tokens=usage.output)``,
  so a limiter with input and output limits corrects each with its own count;
* it raises `PermanentError` -> ``mark_as_dead_lettered`` at once;
* it raises anything else -> ``mark_as_failed(error, retry_after=delay)``, where ``delay`` is a
  `RetryableError`'s ``retry_after`` or exponential backoff with full jitter. "Anything else"
  includes `BaseException` subclasses, `GeneratorExit` and a `CancelledError` the handler raised
  itself (a cancelled inner task): backed off like any failure, never retried in a hot loop;
* it is cancelled by the worker (stop past the grace, or ``run()`` cancelled) -> ``job.release()``:
  the message is visible again at once for another worker, its receive undone (a stop never uses
  one up toward ``max_receive_count``), its whole reservation released;
* it raises `KeyboardInterrupt` or `SystemExit` -> the worker stops taking messages, its message
  is released (so not handled again before the stop) and the worker stops gracefully (the other
  handlers get the grace), then ``run()`` raises that exception.

A message delivered again while its handler still runs (its lease ran out because a handler
blocked the event loop for longer than the visibility timeout, so no lease renewal could run) is
not handled a second time: the running handler's outcome settles the newest delivery (the only
one whose receipt handle still works) and its reservation; the older delivery is given back with
its own reservation released whole (``job.release()``: its handle is stale, so the store changes
nothing).

So a message is always acknowledged, visible, leased by a running handler, or dead-lettered, and
every reservation is used or given back.

About 970 lines for one loop whose every exit (handler outcome, stop, grace, signal, redelivery)
must settle the same books; the signal plumbing shared with the CLI is in `_signals.py`, the
submitters' outcomes in `outcomes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import operator
import random
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from . import _signals
from ._checks import finite_float, real_number, shown
from .dispatcher import LLMQueueDispatcher, ProcessableMessage
from .errors import (
    InvalidConfigError,
    InvalidRequestError,
    MessageStateError,
    PermanentError,
    ReceiptHandleError,
    RetryableError,
    StorageError,
)
from .outcomes import split_result
from .storage.base import MAX_VISIBILITY_TIMEOUT
from .throttle import AsyncRateLimiter, RateLimiter
from .types import TokenUsage, validate_token_count

__all__ = ["Handler", "Worker", "WorkerStats", "backoff_delay"]

T = TypeVar("T")

_LOGGER = logging.getLogger("llm_queue_dispatcher")

#: A handler: takes a dispatched message, returns the actual tokens used: a total, a
#: `TokenUsage` (input and output apart), or None (the estimate stands).
Handler = Callable[[ProcessableMessage[T]], Awaitable["int | TokenUsage | None"]]

# How long one dequeue sleeps when nothing can be dispatched. The dispatcher wakes it early on
# an enqueue, a mark, a visibility expiry or a refill, so this only bounds an idle wait.
_DEQUEUE_WAIT = 30.0
# With stop_when_empty, how often an idle worker looks whether the queue emptied by a path that
# wakes no dequeue (a message the store dead-letters at its visibility expiry).
_DRAIN_CHECK = 1.0
# How long a cancelled handler may take to finish after the grace before the worker releases its
# message itself (a handler that swallows CancelledError).
_CANCEL_WAIT = 5.0
# The most jobs one dequeue takes for free handlers (with the global choice on Redis).
_MOST_PER_DEQUEUE = 64
# Backoff after the storage failed a dequeue, doubled per consecutive failure up to the cap.
_STORAGE_RETRY_BASE = 0.5
_STORAGE_RETRY_CAP = 30.0


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2 ** (attempt - 1))]``.

    "Full jitter" from Marc Brooker, "Exponential Backoff And Jitter" (AWS Architecture Blog,
    2015): spreading retries over the whole interval keeps many failed callers from coming back
    together. ``attempt`` is 1 for the first failure (a message's ``receive_count``).

    >>> backoff_delay(3, base=1.0, cap=300.0, rng=random.Random(7)) <= 4.0
    True
    """
    exponent = min(max(attempt, 1) - 1, 64)  # 2 ** 64 s is past any cap; avoids float overflow
    ceiling = min(cap, base * math.ldexp(1.0, exponent))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True)
class WorkerStats:
    """What a worker did so far.

    ``processed``: handlers that returned (messages deleted). ``retried``: failed attempts handed
    back with a delay. ``dead_lettered``: `PermanentError`\\ s. ``released``: messages handed
    back unprocessed (their receive undone) because the worker stopped or was cancelled while their handler
    ran. ``tokens``: tokens of the processed messages, actual where the handler returned a count
    and estimated otherwise. ``in_flight``: handlers running now. ``redelivered``: deliveries of
    a message whose handler was still running (its lease ran out while the event loop was
    blocked), not handled a second time. ``withdrawn``: messages whose submitter withdrew them
    (cancelled its ``submit``) before they were dispatched, deleted without calling the handler.
    """

    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    tokens: int = 0
    in_flight: int = 0
    redelivered: int = 0
    withdrawn: int = 0


@dataclass(eq=False)
class _Run(Generic[T]):
    """One running handler: the deliveries of its message (the first, which the handler got, and
    any taken again while it ran, newest last) and the lease renewals of the newest."""

    deliveries: list[ProcessableMessage[T]]
    leases: list[_Lease] = field(default_factory=list)
    #: Set once the handler ended and its outcome is being settled: no more adoptions.
    closed: bool = False


class _Lease:
    """The lease renewals of one delivery: a place in the worker's lease timers
    (`_LeaseTimers`) until the first renewal is due (about half the visibility timeout), then the
    task that renews it (`Worker._keep_leased`). A handler that ends sooner, as most do, leaves
    its place: no timer or task is made for it."""

    __slots__ = ("_due", "_job", "_task", "_timers", "_worker")

    def __init__(self, worker: Worker[Any], job: ProcessableMessage[Any]) -> None:
        self._task: asyncio.Task[None] | None = None
        self._due: _Place | None = None  # its place in the lease timers
        self._worker, self._job = worker, job
        visibility = float(worker.dispatcher.config.visibility_timeout)
        if visibility > 0:  # a zero lease cannot be kept: the message is visible again at once
            self._timers = worker._lease_timers
            self._due = self._timers.add(self, visibility)

    def begin(self) -> None:
        """The first renewal is due: the task that renews the lease from now on."""
        self._due = None
        self._task = asyncio.get_running_loop().create_task(self._worker._keep_leased(self._job))

    def cancel(self) -> None:
        """No more renewals (one on its way still runs to its end or its cancellation)."""
        if self._due is not None:
            self._timers.discard(self, self._due)
            self._due = None
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        """No more renewals, and none on its way: returns once a renewal that had started ended,
        so it cannot land after the mark."""
        self.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# A lease's place in `_LeaseTimers`: the span's number, the visibility timeout, the event loop.
_Place = tuple[int, float, asyncio.AbstractEventLoop]


class _LeaseTimers:
    """One timer for the leases taken within the same 1/64 of the visibility timeout, at half
    the visibility timeout after the first instant of that span: each lease's first renewal is
    due between 31/64 and 32/64 of the visibility timeout after it was taken, and a worker
    taking thousands of jobs a second makes a timer every few hundred of them, not one per job
    (a timer whose leases all ended is cancelled)."""

    __slots__ = ("_due",)

    #: The spans of a visibility timeout that share a timer.
    SPANS = 64

    def __init__(self) -> None:
        # A span (`_Place`) -> its leases, its timer.
        self._due: dict[_Place, tuple[set[_Lease], asyncio.TimerHandle]] = {}

    def add(self, lease: _Lease, visibility: float) -> _Place:
        """Puts ``lease`` under its span's timer; returns its place (for `discard`)."""
        loop = asyncio.get_running_loop()
        span = visibility / self.SPANS
        key = (int(loop.time() // span), visibility, loop)
        due = self._due.get(key)
        if due is None:
            leases: set[_Lease] = set()
            timer = loop.call_at(key[0] * span + visibility / 2, self._fire, key)
            due = self._due[key] = (leases, timer)
        due[0].add(lease)
        return key

    def discard(self, lease: _Lease, key: _Place) -> None:
        due = self._due.get(key)
        if due is not None:
            due[0].discard(lease)
            if not due[0]:
                due[1].cancel()
                del self._due[key]

    def _fire(self, key: _Place) -> None:
        leases, _ = self._due.pop(key)
        for lease in list(leases):
            lease.begin()


def _require_number(name: str, value: object, *, minimum: float, maximum: float = math.inf) -> float:
    number = finite_float(value)
    if number is None:
        raise InvalidConfigError(f"{name} must be a finite number of seconds, got {shown(value)}")
    if not minimum <= number <= maximum:
        raise InvalidConfigError(f"{name} must be within [{minimum}, {maximum}], got {value!r}")
    return number


class Worker(Generic[T]):
    """Runs ``handler`` on the messages ``dispatcher`` hands out under ``limiter``.

    >>> import asyncio
    >>> from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue
    >>> async def main() -> int:
    ...     dispatcher = create_in_memory_queue()
    ...     for n in range(3):
    ...         await dispatcher.enqueue(LLMRequest(f"r{n}", {"n": n}, token_info=TokenInfo(100)))
    ...     async def handle(job):
    ...         return 80  # the tokens the call really used
    ...     worker = Worker(dispatcher, LLMThrottle(60, 10_000), handle)
    ...     stats = await worker.run(stop_when_empty=True)
    ...     return stats.processed
    >>> asyncio.run(main())
    3

    Args:
        dispatcher: where the messages come from; its ``visibility_timeout`` is the lease the
            worker renews at half its length while a handler runs.
        limiter: a `RateLimiter` (`LLMThrottle`) or an `AsyncRateLimiter`, passed to ``dequeue``.
        handler: ``async def handler(job) -> int | TokenUsage | None``; returns the actual
            tokens used: a total, or a `TokenUsage` with the input and output counts apart
            (which a limiter with ``itpm``/``otpm`` corrects each with), or None to keep the
            estimate.
        concurrency: handlers running at once (>= 1).
        shutdown_grace: seconds running handlers get to finish after a stop; then they are
            cancelled and their messages given back unprocessed (their receive undone).
        max_retry_delay: cap of the backoff after a failure, in seconds (<= 43200).
        retry_base_delay: backoff ceiling after the first failure; doubles per receive.
        handle_signals: off by default, so a worker inside a host application (aiohttp,
            uvicorn, your own loop) leaves the host's Ctrl-C and SIGTERM handling alone; stop it
            with `stop` or by cancelling `run`. When True (the ``llmqd`` commands, a worker that
            is the whole program), in the main thread `run` stops on SIGTERM and SIGINT (a
            second signal skips the rest of the grace) and afterwards puts back exactly what
            each signal had: a ``signal.signal`` handler, or the very handler a host registered
            with ``loop.add_signal_handler``. Several such workers of one loop share the
            signals: a signal stops them all, and the last to end puts back what the first
            found, whatever order they end in. On a loop that does not expose its handlers
            (uvloop) a signal that already has a handler is left to it.
        rng: the random source of the jitter (a seeded `random.Random` in tests).
        logger: where the worker logs; default the ``llm_queue_dispatcher`` logger.
    """

    def __init__(
        self,
        dispatcher: LLMQueueDispatcher[T],
        limiter: RateLimiter | AsyncRateLimiter,
        handler: Callable[[ProcessableMessage[T]], Awaitable[int | TokenUsage | None]],
        *,
        concurrency: int = 16,
        shutdown_grace: float = 30.0,
        max_retry_delay: float = 300.0,
        retry_base_delay: float = 1.0,
        handle_signals: bool = False,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(dispatcher, LLMQueueDispatcher):
            raise InvalidConfigError(f"dispatcher must be an LLMQueueDispatcher, got {dispatcher!r}")
        # A class (`LLMThrottle` itself) has the four methods too, unbound: refused here, not at
        # the first dequeue.
        if isinstance(limiter, type) or not isinstance(limiter, (RateLimiter, AsyncRateLimiter)):
            raise InvalidConfigError(
                f"limiter must have can_process, get_metrics, consume and adjust_consumption, got {limiter!r}"
            )
        if not callable(handler):
            raise InvalidConfigError(f"handler must be an async callable, got {handler!r}")
        count = real_number(concurrency)  # an int or an integer-like (numpy's), not a bool
        if count is None or isinstance(concurrency, float) or count < 1:
            raise InvalidConfigError(f"concurrency must be an int >= 1, got {shown(concurrency)}")
        concurrency = operator.index(concurrency)
        self.shutdown_grace = _require_number("shutdown_grace", shutdown_grace, minimum=0.0)
        self.max_retry_delay = _require_number(
            "max_retry_delay", max_retry_delay, minimum=0.0, maximum=MAX_VISIBILITY_TIMEOUT
        )
        self.retry_base_delay = _require_number("retry_base_delay", retry_base_delay, minimum=0.0)
        if self.retry_base_delay == 0.0:
            raise InvalidConfigError("retry_base_delay must be > 0, got 0")
        if not isinstance(handle_signals, bool):
            raise InvalidConfigError(f"handle_signals must be a bool, got {handle_signals!r}")
        if rng is not None and not isinstance(rng, random.Random):
            raise InvalidConfigError(f"rng must be a random.Random or None, got {rng!r}")
        if logger is not None and not isinstance(logger, logging.Logger):
            raise InvalidConfigError(f"logger must be a logging.Logger or None, got {logger!r}")
        self.dispatcher = dispatcher
        self.limiter = limiter
        self.handler = handler
        self.concurrency = concurrency
        self.handle_signals = handle_signals
        self._rng = rng or random.Random()
        self._logger = logger or _LOGGER
        #: The signal that stopped the last run (SIGTERM or SIGINT), or None.
        self.stop_signal: signal.Signals | None = None
        # Running handlers and the delivery each one settles (the newest of its message).
        self._active: dict[asyncio.Task[None], ProcessableMessage[T]] = {}
        self._runs: dict[asyncio.Task[None], _Run[T]] = {}
        # The timers of the running handlers' lease renewals (`_Lease`).
        self._lease_timers = _LeaseTimers()
        # Message id -> the running handler of that message, to spot a delivery taken again.
        self._by_message: dict[str, asyncio.Task[None]] = {}
        # Handler tasks the worker cancelled itself (a stop past the grace, `run` cancelled).
        self._cancelled_by_worker: set[asyncio.Task[None]] = set()
        # A KeyboardInterrupt or SystemExit a handler raised: `run` raises it once stopped.
        self._fatal: BaseException | None = None
        # Give-backs of jobs whose handler was cancelled before it started (see `_on_job_done`).
        self._releasing: set[asyncio.Future[None]] = set()
        self._running = False
        self._stop_requested = False
        self._force = False
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle = asyncio.Event()
        # Set once the dispatch loop of the current run has ended: no dequeue can take a message
        # any more.
        self._dispatch_ended = asyncio.Event()
        self._stop_when_empty = False
        self._processed = 0
        self._retried = 0
        self._dead_lettered = 0
        self._released = 0
        self._tokens = 0
        self._redelivered = 0
        self._withdrawn = 0
        # Whether a `retry_after` past the store's limit was logged (once per worker).
        self._clamp_logged = False

    # -- public ----------------------------------------------------------------------------------
    @property
    def stats(self) -> WorkerStats:
        """Counts of what this worker did, across runs."""
        return WorkerStats(
            processed=self._processed,
            retried=self._retried,
            dead_lettered=self._dead_lettered,
            released=self._released,
            tokens=self._tokens,
            in_flight=len(self._active),
            redelivered=self._redelivered,
            withdrawn=self._withdrawn,
        )

    @property
    def running(self) -> bool:
        """True while `run` runs."""
        return self._running

    def stop(self) -> None:
        """Stops taking messages; `run` returns once the running handlers finished or the grace
        ran out. Call it from the event loop's thread (from another thread:
        ``loop.call_soon_threadsafe(worker.stop)``). Before `run`, makes the next run return at
        once."""
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()

    def retry_delay(self, job: ProcessableMessage[T], error: BaseException) -> float:
        """Seconds before a failed message is visible again: a `RetryableError`'s
        ``retry_after`` when it is a number >= 0 (an int, a float or an integer-like such as
        ``numpy.int64``), cut to 43200 (the store's limit; infinity and an int too large for a
        float included, logged once per worker); else, and for a NaN, a negative or a non-number
        ``retry_after``, `backoff_delay` over the message's receive count, capped at
        ``max_retry_delay``."""
        if isinstance(error, RetryableError) and error.retry_after is not None:
            after = real_number(error.retry_after)
            if after is not None and after >= 0:  # NaN fails the comparison
                if after > MAX_VISIBILITY_TIMEOUT and not self._clamp_logged:
                    self._clamp_logged = True
                    self._logger.warning(
                        "request %r asked to be retried after %s s; waiting %s s, the longest a "
                        "message can stay invisible (logged once per worker)",
                        job.message.payload.id,
                        shown(error.retry_after),
                        MAX_VISIBILITY_TIMEOUT,
                    )
                return min(after, MAX_VISIBILITY_TIMEOUT)
        return backoff_delay(
            job.message.attributes.receive_count,
            base=self.retry_base_delay,
            cap=self.max_retry_delay,
            rng=self._rng,
        )

    async def run(self, *, stop_when_empty: bool = False) -> WorkerStats:
        """Takes and handles messages until `stop` (or, with ``handle_signals``, SIGTERM or
        SIGINT); returns the `stats`.

        With ``stop_when_empty`` it also stops once the queue holds nothing (no visible message,
        none in flight, none waiting for a retry) and no handler runs, or once what it holds can
        never be dispatched as it is (a request larger than the limiter can ever grant, say:
        logged, and left for `LLMQueueDispatcher.take_unfittable`).

        Cancelling the task that runs it cancels the running handlers at once and releases their
        messages (their receive undone) before the cancellation propagates: nothing is lost.

        A handler that raises `KeyboardInterrupt` or `SystemExit` stops the worker as `stop`
        does (its own message released at once, the others given the grace); then `run` raises
        that very exception, so the program ends as the handler asked (``sys.exit(3)`` exits
        with 3), after the books are kept.
        """
        if self._running:
            raise RuntimeError("this Worker is already running")
        loop = asyncio.get_running_loop()
        self._running = True
        self._force = False
        self.stop_signal = None
        self._stop_when_empty = stop_when_empty
        self._stop_event = asyncio.Event()
        self._force_event = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._idle = asyncio.Event()
        self._idle.set()
        self._dispatch_ended = asyncio.Event()
        self._fatal = None
        if self._stop_requested:
            self._stop_event.set()
        installed = self._install_signal_handlers(loop)
        dispatch: asyncio.Task[None] | None = None
        watchers: list[asyncio.Task[Any]] = []
        try:
            dispatch = loop.create_task(self._dispatch_loop(), name="llmqd-worker-dispatch")
            watchers.append(loop.create_task(self._stop_event.wait()))
            if stop_when_empty:
                watchers.append(loop.create_task(self._stop_when_drained()))
            try:
                await asyncio.wait({dispatch, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for watcher in watchers:
                    watcher.cancel()
            failure = None
            for task in (dispatch, *watchers):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    failure = failure or task.exception()
            await self._shutdown(dispatch, graceful=True)
            if self._fatal is not None:
                raise self._fatal
            if failure is not None:
                raise failure
        except asyncio.CancelledError:
            await self._shutdown(dispatch, graceful=False)
            raise
        finally:
            self._restore_signal_handlers(loop, installed)
            self._running = False
            self._stop_requested = False
            self._stop_event = None
            self._force_event = None
            self._fatal = None
            self._cancelled_by_worker.clear()
        return self.stats

    # -- the loop --------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        try:
            await self._take_messages()
        finally:
            self._dispatch_ended.set()

    async def _take_messages(self) -> None:
        assert self._slots is not None
        storage_failures = 0
        wait = _DRAIN_CHECK if self._stop_when_empty else _DEQUEUE_WAIT
        limiter = cast("RateLimiter", self.limiter)  # either kind (AsyncRateLimiter: see dequeue)
        global_choice = getattr(self.dispatcher, "_global", None)
        batched = global_choice is not None and global_choice.usable_with(limiter)
        while not self._stop_requested:
            await self._slots.acquire()
            if self._stop_requested:
                self._slots.release()
                return
            # With the global choice on Redis, every free handler's job comes from one script.
            slots = 1
            while batched and slots < _MOST_PER_DEQUEUE and not self._slots.locked():
                await self._slots.acquire()  # free: returns at once
                slots += 1
            try:
                if slots > 1:
                    jobs = await self.dispatcher._dequeue_up_to(limiter, slots, timeout=wait)
                else:
                    job = await self.dispatcher.dequeue(limiter, timeout=wait)
                    jobs = [] if job is None else [job]
            except StorageError:
                self._release_slots(slots)
                storage_failures += 1
                delay = min(_STORAGE_RETRY_CAP, _STORAGE_RETRY_BASE * 2 ** min(storage_failures, 16))
                self._logger.exception("dequeue failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                continue
            except BaseException:
                self._release_slots(slots)
                raise
            storage_failures = 0
            self._release_slots(slots - len(jobs))
            if not jobs:
                if not self._active:
                    self._idle.set()
                continue
            # No await between the dequeue and this: each job has an owner at once.
            for job in jobs:
                self._start(job)

    def _release_slots(self, count: int) -> None:
        assert self._slots is not None
        for _ in range(count):
            self._slots.release()

    def _start(self, job: ProcessableMessage[T]) -> None:
        """Gives a dequeued job its handler task (or to the handler of its message already
        running, as a new delivery of it); the job holds one acquired slot."""
        running = self._by_message.get(job.message.id)
        if running is not None and self._adopt(running, job):
            self._release_slots(1)
            return
        task = asyncio.get_running_loop().create_task(
            self._process(job), name=f"llmqd-job-{job.message.payload.id}"
        )
        self._active[task] = job
        self._runs[task] = _Run([job])
        self._by_message[job.message.id] = task
        task.add_done_callback(self._on_job_done)

    def _adopt(self, task: asyncio.Task[None], job: ProcessableMessage[T]) -> bool:
        """Makes ``job``, a new delivery of the message ``task`` is handling, the delivery that
        handler settles; False when the handler already ended (``job`` is then a new attempt).

        The store received the message again because its lease ran out: the earlier delivery's
        receipt handle is stale, so only this one can delete it or change its visibility. Its
        lease renewal takes over, and its reservation is given back when the handler ends
        (`_close_run`)."""
        run = self._runs.get(task)
        if run is None or run.closed or task.done():
            return False
        run.deliveries.append(job)
        self._active[task] = job
        for lease in run.leases:
            lease.cancel()  # the stale delivery's renewals would only fail now
        run.leases.append(_Lease(self, job))
        self._redelivered += 1
        self._logger.warning(
            "request %r was delivered again (receive %d) while its handler still runs: its lease of "
            "%s s ran out, most likely because a handler blocked the event loop that long; not "
            "handling it twice, the running handler's outcome settles the new delivery",
            job.message.payload.id,
            job.message.attributes.receive_count,
            self.dispatcher.config.visibility_timeout,
        )
        return True

    def _on_job_done(self, task: asyncio.Task[None]) -> None:
        job = self._active.pop(task, None)
        if job is not None and task.cancelled() and not job.settled:
            # Cancelled before its handler started: nothing gave its message back yet.
            release = asyncio.ensure_future(self._release(job, asyncio.CancelledError()))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)
        run = self._runs.pop(task, None)
        if run is not None and self._by_message.get(run.deliveries[0].message.id) is task:
            del self._by_message[run.deliveries[0].message.id]
        self._cancelled_by_worker.discard(task)
        if self._slots is not None:
            self._slots.release()
        if not self._active:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            self._logger.error("worker task failed", exc_info=task.exception())

    async def _stop_when_drained(self) -> None:
        """Stops the worker once no handler runs and the queue holds nothing (checked each time
        the last running handler ends, at start, and when an idle dequeue times out)."""
        while True:
            await self._idle.wait()
            self._idle.clear()
            if self._active:
                continue
            try:
                # The store's counters alone (one cheap call): the whole metrics report would
                # cost a round of handlers as much as its jobs' marks.
                counts = await self.dispatcher._storage.get_queue_attributes()
            except StorageError:
                self._logger.exception("could not read the queue's size")
                continue
            held = (
                counts.approximate_number_of_messages
                + counts.approximate_number_of_messages_in_flight
                + counts.approximate_number_of_messages_delayed
            )
            if held == 0 and not self._active:
                self.stop()
                return
            if (
                counts.approximate_number_of_messages_in_flight
                + counts.approximate_number_of_messages_delayed
                == 0
                and not self._active
                and self.dispatcher.time_until_ready() == math.inf
            ):
                # Only requests no dispatch can ever hand out are left (more tokens than the
                # limiter can ever grant, a score that stays below the threshold): nothing but
                # a new message could change that, so a run meant to end with its work ends.
                self._logger.warning(
                    "stopping: the %d request(s) left can never be dispatched as they are "
                    "(take them out with dispatcher.take_unfittable())",
                    counts.approximate_number_of_messages,
                )
                self.stop()
                return

    async def _process(self, job: ProcessableMessage[T]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._runs[task].leases.append(_Lease(self, job))
        outcomes = self.dispatcher._outcomes()
        # The global choice's dispatch read the withdrawals already (one call fewer per round
        # of handlers): the relay is asked only about the others.
        global_choice = getattr(self.dispatcher, "_global", None)
        claimed = global_choice is not None and global_choice.claimed(job)
        if not claimed and not await outcomes.claim(job):
            # Its submitter withdrew it: deleted unprocessed, its tokens given back.
            current = await self._close_run(task, job)
            if await self._settle(current, "delete withdrawn", current.mark_as_processed(actual_tokens=0)):
                self._withdrawn += 1
            await self._close_superseded(task)
            return
        try:
            running = self.handler(job)
            if not inspect.isawaitable(running):
                # A plain function given by mistake: it ran, but a retry would run it again for
                # nothing (for ever without max_receive_count): dead-lettered at once.
                raise PermanentError(
                    f"handler {shown(self.handler)} returned {shown(running)}, not an awaitable: "
                    "a Worker takes an async handler (an async def function)"
                )
            result = await running
        except asyncio.CancelledError as error:
            if not self._is_stopping(task):
                # Raised by the handler itself (an inner task was cancelled, a timeout helper),
                # not a stop: a failure like any other, backed off. Releasing it at once would
                # run it again at once, in a hot loop.
                await self._retry(task, job, error)
                return
            current = await self._close_run(task, job)
            await self._release(current, error)
            await self._close_superseded(task)
            raise
        except (KeyboardInterrupt, SystemExit) as error:
            # Left to propagate, asyncio would re-raise it out of the event loop at once, with
            # no grace for the other handlers and their messages still leased: stop instead,
            # and `run` raises it once everything is handed back.
            self._logger.warning(
                "handler of request %r raised %r: releasing its message and stopping",
                job.message.payload.id,
                error,
            )
            if self._fatal is None:
                self._fatal = error
            # Stop taking messages before this one is visible again, or the dequeue waiting for
            # work would take it and run the handler on it a second time: `run` ends the
            # dispatch loop on the stop, before it gives the running handlers their grace.
            self.stop()
            try:
                await self._dispatch_ended.wait()
            finally:  # a stop past the grace cancels this wait: the message is released all the same
                current = await self._close_run(task, job)
                await self._release(current, error)
                await self._close_superseded(task)
        except PermanentError as error:
            current = await self._close_run(task, job)
            await outcomes.failed(current, error)  # before the mark: nothing waits for ever
            if await self._settle(current, "dead-letter", current.mark_as_dead_lettered(error)):
                self._dead_lettered += 1
            await self._close_superseded(task)
        except BaseException as error:  # an Exception, GeneratorExit or another BaseException
            await self._retry(task, job, error)
        else:
            current = await self._close_run(task, job)
            value, reported = split_result(result)
            await outcomes.processed(current, value)  # before the mark: nothing waits for ever
            tokens = self._token_count(job, reported)
            if isinstance(tokens, TokenUsage):
                marking = current.mark_as_processed(input_tokens=tokens.input, output_tokens=tokens.output)
                counted = tokens.total
            else:
                marking = current.mark_as_processed(actual_tokens=tokens)
                counted = tokens if tokens is not None else job.message.payload.token_info.estimated
            if await self._settle(current, "mark processed", marking):
                self._processed += 1
                self._tokens += counted
            await self._close_superseded(task)

    async def _retry(
        self, task: asyncio.Task[None], job: ProcessableMessage[T], error: BaseException
    ) -> None:
        """Hands a failed message back after its retry delay (backoff or ``retry_after``)."""
        current = await self._close_run(task, job)
        try:
            delay = self.retry_delay(current, error)
            if not 0.0 <= delay <= MAX_VISIBILITY_TIMEOUT:  # NaN fails it too
                raise ValueError(f"retry_delay returned {shown(delay)}, not within [0, 43200] seconds")
        except Exception:
            # An overridden retry_delay that raised or answered nonsense: the message is handed
            # back all the same (never left leased with its reservation held), after a backoff.
            self._logger.exception("could not compute the retry delay of request %r", job.message.payload.id)
            delay = backoff_delay(
                current.message.attributes.receive_count,
                base=self.retry_base_delay,
                cap=self.max_retry_delay,
                rng=self._rng,
            )
        self._logger.info(
            "request %r failed (attempt %d), retrying in %.2f s: %r",
            job.message.payload.id,
            current.message.attributes.receive_count,
            delay,
            error,
        )
        outcomes = self.dispatcher._outcomes()
        if outcomes.last_attempt(current):
            await outcomes.failed(current, error)  # the store dead-letters it at its visibility end
        if await self._settle(current, "retry", current.mark_as_failed(error, retry_after=delay)):
            self._retried += 1
        await self._close_superseded(task)

    def _is_stopping(self, task: asyncio.Task[None]) -> bool:
        """Whether ``task`` was cancelled by the worker (or by anyone, where asyncio can tell:
        Python 3.11 counts pending cancellations) rather than raising `CancelledError` itself."""
        if task in self._cancelled_by_worker:
            return True
        cancelling = getattr(task, "cancelling", None)
        return bool(cancelling()) if cancelling is not None else False

    async def _close_run(self, task: asyncio.Task[None], job: ProcessableMessage[T]) -> ProcessableMessage[T]:
        """The handler of ``task`` ended: stops the lease renewals; returns the delivery its
        outcome settles (the newest). Each delivery holds a reservation of its own, settled by
        its own mark: the newest's by the outcome, the earlier ones' by `_close_superseded`.
        Runs once per handler; later calls only return it."""
        run = self._runs.get(task)
        if run is None or run.closed:
            return self._active.get(task, job)
        run.closed = True
        if self._by_message.get(job.message.id) is task:
            del self._by_message[job.message.id]
        for lease in run.leases:
            await lease.stop()
        run.leases.clear()
        return run.deliveries[-1]

    async def _close_superseded(self, task: asyncio.Task[None]) -> None:
        """Gives back the deliveries a newer one replaced (``job.release()``): each one's own
        reservation is released whole, the newest delivery's mark settling the budget the
        handler used; their receipt handles are stale, so the store changes nothing (and says
        so: `ReceiptHandleError`, expected here)."""
        run = self._runs.get(task)
        if run is None:
            return
        for delivery in run.deliveries[:-1]:
            if delivery.settled:
                continue
            try:
                await delivery.release()
            except (ReceiptHandleError, MessageStateError):
                pass  # stale, as expected (or settled meanwhile): its reservation is released
            except Exception:
                self._logger.exception(
                    "could not close the earlier delivery of request %r", delivery.message.payload.id
                )
                delivery._abandon()  # nobody will mark it now: no longer counted in flight

    def _token_count(self, job: ProcessableMessage[T], result: object) -> int | TokenUsage | None:
        if result is None:
            return None
        try:
            if isinstance(result, TokenUsage):
                # Checked again: a frozen dataclass's fields can still be set by force.
                return TokenUsage(result.input, result.output)
            return validate_token_count(result, "handler result")
        except InvalidRequestError:
            # The call itself succeeded: retrying would spend it again. Keep the estimate.
            self._logger.error(
                "handler for %r returned %r, not a token count (int >= 0, TokenUsage or None); "
                "marked processed with its estimate",
                job.message.payload.id,
                result,
            )
            return None

    async def _settle(self, job: ProcessableMessage[T], action: str, marking: Awaitable[None]) -> bool:
        """Runs a mark; whether it counts (the handler's own mark counts too)."""
        try:
            await marking
        except MessageStateError:
            self._logger.debug("request %r was already marked by its handler", job.message.payload.id)
        except ReceiptHandleError:
            self._logger.warning(
                "could not %s request %r: its lease ran out and another consumer received it",
                action,
                job.message.payload.id,
            )
            return False
        except Exception:
            self._logger.exception(
                "could not %s request %r; it stays leased until its visibility ends, then is delivered again",
                action,
                job.message.payload.id,
            )
            # Nobody will mark this delivery now: the dispatcher stops counting it in flight.
            job._abandon()
            return False
        return True

    async def _release(self, job: ProcessableMessage[T], error: BaseException) -> None:
        """Gives a message back unprocessed (``job.release()``: visible at once, its receive
        undone so a stop never uses one up, its whole reservation released)."""
        try:
            await job.release()
        except MessageStateError:
            return
        except ReceiptHandleError:
            self._logger.warning("request %r was no longer leased when released", job.message.payload.id)
            return
        except Exception:
            self._logger.exception(
                "could not release request %r; it is delivered again when its visibility ends",
                job.message.payload.id,
            )
            job._abandon()  # nobody will mark it now: no longer counted in flight
            return
        self._released += 1

    # -- leases ----------------------------------------------------------------------------------
    async def _keep_leased(self, job: ProcessableMessage[T]) -> None:
        """Extends the message's visibility now, then every half of its length while the handler
        runs (started by its `_Lease` when the first renewal is due)."""
        while True:
            visibility = float(self.dispatcher.config.visibility_timeout)
            if visibility <= 0:
                return  # a zero lease cannot be kept: the message is visible again at once
            try:
                await job.update_visibility(visibility)
            except MessageStateError:
                return  # the handler settled it itself
            except ReceiptHandleError:
                self._logger.warning(
                    "lost the lease of request %r (another consumer received it)", job.message.payload.id
                )
                return
            except Exception:
                self._logger.exception("could not extend the lease of request %r", job.message.payload.id)
            await asyncio.sleep(visibility / 2)

    # -- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self, dispatch: asyncio.Task[None] | None, *, graceful: bool) -> None:
        """No new dequeues; the running handlers get the grace (when ``graceful``), then are
        cancelled; a message still held after that is released here. Idempotent."""
        loop = asyncio.get_running_loop()
        if dispatch is not None and not dispatch.done():
            # The dequeue waits on an event and reserves budget only in the same step as it
            # takes a message, so cancelling it in its wait takes nothing.
            dispatch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch
        if graceful and self._active and not self._force:
            deadline = loop.time() + self.shutdown_grace
            assert self._force_event is not None
            force_wait = loop.create_task(self._force_event.wait())
            try:
                while self._active and not self._force:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    await asyncio.wait(
                        {*self._active, force_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                    )
            finally:
                force_wait.cancel()
        try:
            await self._cancel_remaining()
            if self._releasing:
                await asyncio.wait(set(self._releasing))
        finally:
            # Messages this process leased ahead into the dispatcher's buffer are held too.
            await self.dispatcher.release_buffered()

    async def _cancel_remaining(self) -> None:
        pending = dict(self._active)
        if not pending:
            return
        self._logger.warning("cancelling %d handler(s) still running; releasing their messages", len(pending))
        for task in pending:
            self._cancelled_by_worker.add(task)
            task.cancel()
        _done, stuck = await asyncio.wait(pending, timeout=_CANCEL_WAIT)
        for task in stuck:
            job = pending[task]
            self._logger.error(
                "handler of request %r ignored its cancellation; releasing its message anyway",
                job.message.payload.id,
            )
            error = asyncio.CancelledError()
            await self._release(await self._close_run(task, job), error)
            await self._close_superseded(task)

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: signal.Signals) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self._logger.warning("%s: stopping (again to skip the grace)", signum.name)
            self.stop()
        else:
            self._logger.warning("%s again: cancelling the running handlers now", signum.name)
            self._force = True
            if self._force_event is not None:
                self._force_event.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> _signals.SignalListener | None:
        """With ``handle_signals``, in the main thread: SIGTERM and SIGINT stop this run, through
        the registration every such worker of ``loop`` shares (`_signals`)."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return None
        return _signals.listen(loop, self._on_signal, self._logger)

    @staticmethod
    def _restore_signal_handlers(
        loop: asyncio.AbstractEventLoop, listener: _signals.SignalListener | None
    ) -> None:
        """Leaves the shared registration; the last worker to leave puts back exactly what the
        signals had before the first took them."""
        if listener is not None:
            _signals.stop_listening(listener)

    def __repr__(self) -> str:
        state = "running" if self._running else "idle"
        return f"<Worker {state} concurrency={self.concurrency} {self.stats}>"
