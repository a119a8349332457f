"""Where a dispatcher's messages come from: one interface, two implementations.

`InMemorySource` drives an `InMemoryStorage`'s Rust core directly: selection runs over every
visible message in place, and with an `LLMThrottle` a dispatch step (select, reserve, receive)
is one call into Rust without an await. `PrefetchSource` serves any other `QueueStorageAdapter`
from a prefetch buffer of leased messages (a Rust `CandidateBuffer`), renews the leases, and
releases them on close. `ProcessableMessage` and `LLMQueueDispatcher` talk to this interface
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from ._core import CandidateBuffer, FairSelection, LLMThrottle, ScoringParams, Selection, StoreCore
from .config import FairPriorityConfig
from .errors import ReceiptHandleError, StorageError
from .storage import InMemoryStorage, QueueStorageAdapter
from .types import LLMRequest, QueueMessage

__all__ = ["Dispatched", "FairDispatched", "FairFacts", "InMemorySource", "MessageSource", "PrefetchSource"]

T = TypeVar("T")

#: What a dispatch step hands out: the message, its total score and its breakdown values.
Dispatched = tuple[QueueMessage[Any], float, list[float]]

#: What a fair dispatch step hands out: the message and the facts of its choice (urgent,
#: tenant, tenant's use, rank, tenants waiting, effective priority, tenant id, charge id).
FairFacts = tuple[bool, str, float, int, int, int, int, int]
FairDispatched = tuple[QueueMessage[Any], FairFacts]


class SelectionGuard:
    """What keeps dispatch steps over one pool from reserving a request twice, with limiters
    other than `LLMThrottle` (whose step is one atomic call): two steps would pick the same
    winner and reserve its request id twice, and the loser's give-back would take back the
    winner's reservation (limiters keep reservations by request id). ``lock`` serialises
    select-reserve-take; ``releasing`` holds the give-backs still on their way, by request id,
    which a step picking that request waits for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = asyncio.Lock()
        self.releasing: dict[str, asyncio.Future[Any]] = {}


#: The guards of each pool owner, by (event loop, limiter): reservations conflict only within one
#: limiter, and a lock serves one loop.
_GUARDS: weakref.WeakKeyDictionary[Any, dict[tuple[asyncio.AbstractEventLoop, int], SelectionGuard]] = (
    weakref.WeakKeyDictionary()
)


def running_here(tasks: Iterable[asyncio.Future[Any]]) -> set[asyncio.Future[Any]]:
    """The tasks still running in this event loop: one left by an earlier `asyncio.run` can
    never finish, and waiting for it would fail."""
    loop = asyncio.get_running_loop()
    return {task for task in tasks if not task.done() and task.get_loop() is loop}


class MessageSource(ABC, Generic[T]):
    """The dispatcher's view of its store: selection over a Rust pool of candidates (the
    in-memory store's core, or the prefetch buffer — both answer the same calls), and the
    operations a mark needs."""

    #: Whether messages are leased ahead into a buffer: selection then needs `prepare` first,
    #: and a handed-out message's lease `confirm`ed.
    leases: bool = False

    #: One dispatch step against an `LLMThrottle`: select, reserve, take; with ``hold``, the
    #: seconds until a winner that does not fit yet will. Arguments: throttle, scoring params,
    #: custom scorer function, visibility timeout, minimum score, reserve, hold. It is the
    #: pool's own method, bound at construction: the hot path runs no Python frame here.
    dispatch_native: Callable[
        [LLMThrottle, ScoringParams, Any, float, float, bool, bool], Dispatched | float | None
    ]

    def __init__(self, storage: QueueStorageAdapter[T], pool: StoreCore | CandidateBuffer) -> None:
        self.storage = storage
        self.pool = pool
        self.dispatch_native = pool.dispatch_native

    # -- queue operations
    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        return await self.storage.enqueue(request)

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        return await self.storage.batch_enqueue(requests)

    async def delete(self, receipt_handle: str) -> None:
        await self.storage.delete_message(receipt_handle)

    async def change_visibility(self, receipt_handle: str, seconds: float) -> None:
        await self.storage.update_visibility_timeout(receipt_handle, seconds)

    async def dead_letter(self, message: QueueMessage[T]) -> None:
        await self.storage.dead_letter_message(message)

    @abstractmethod
    async def purge(self, handed_out: Sequence[str], outcome: dict[str, bool]) -> None:
        """Removes every message from the store (and the buffer). ``handed_out`` are the
        receipt handles of this dispatcher's deliveries still in flight: each is deleted first,
        and ``outcome`` learns at once whether it was (True) or was stale already (False: its
        message received again, or gone), also when the purge fails later."""

    @abstractmethod
    async def drop_expired(self) -> list[str]:
        """Dead-letters the selectable messages whose deadline has passed; their ids."""

    # -- selection (the pool, in Rust)
    async def prepare(self) -> None:
        """Makes candidates available before a selection (fills the prefetch buffer)."""

    def select(
        self,
        available_tokens: float,
        available_requests: float,
        params: ScoringParams,
        custom_fn: Any,
        min_score: float,
        *,
        reported: tuple[float, float, float] | None = None,
        hold: bool = False,
    ) -> Selection | None:
        """The best candidate under a limiter's reported budget, not yet taken (``reported``:
        what the limiter reported, for the URGENT reserve a non-URGENT winner leaves)."""
        return self.pool.select(
            available_tokens, available_requests, params, custom_fn, min_score, reported=reported, hold=hold
        )

    def take(self, selection: Selection, visibility_timeout: float) -> Dispatched | None:
        """Takes a selected candidate out, or None if it left meanwhile."""
        return self.pool.take(selection, visibility_timeout)

    def configure_fair(self, config: FairPriorityConfig, urgent_reserve: int | None = None) -> None:
        """Ranks by the ``fair_priority`` policy from now on (``urgent_reserve``: the dispatcher's,
        None for automatic)."""
        reserve = None if config.reserve_tokens is None else float(config.reserve_tokens)
        weights = {name: float(weight) for name, weight in config.tenant_weights.items()}
        window, max_wait = float(config.fairness_window), config.max_wait_by_priority()
        urgent = None if urgent_reserve is None else float(urgent_reserve)
        self.pool.configure_fair(weights, window, config.urgent_first, max_wait, reserve, urgent)

    def dispatch_fair(
        self, throttle: LLMThrottle, visibility_timeout: float, reserve: bool, hold: bool
    ) -> FairDispatched | float | None:
        """One fair dispatch step against an `LLMThrottle`: the message and its facts, the
        seconds until a held winner fits, or None."""
        return self.pool.dispatch_fair(throttle, visibility_timeout, reserve, hold)

    def select_fair(
        self, available_tokens: float, available_requests: float, capacity: float, hold: bool
    ) -> FairSelection | None:
        """The fair choice under a limiter's reported budget, not yet taken."""
        return self.pool.select_fair(available_tokens, available_requests, capacity, hold)

    def take_fair(self, selection: FairSelection, visibility_timeout: float) -> FairDispatched | None:
        """Takes a fair selection out (charging its tenant), or None if it left meanwhile."""
        return self.pool.take_fair(selection, visibility_timeout)

    def correct_charge(self, tenant: int, charge: int, tokens: float) -> None:
        """Corrects a fair charge to ``tokens`` (0 takes it back)."""
        self.pool.correct_charge(tenant, charge, tokens)

    def fair_usage(self) -> dict[str, float]:
        """Each tenant's token use over the fairness window (empty without ``fair_priority``)."""
        return dict(self.pool.fair_usage())

    async def confirm(self, message: QueueMessage[T], visibility_timeout: float) -> bool:
        """Makes sure the handed-out message is ours for ``visibility_timeout``; False when its
        lease was lost (another consumer holds it now)."""
        return True

    async def hand_back(self, message: QueueMessage[T]) -> None:
        """Returns a message taken but not handed out (the dispatch failed or was cancelled)."""
        with contextlib.suppress(ReceiptHandleError):
            await self.storage.update_visibility_timeout(message.attributes.receipt_handle, 0.0)

    # -- what the waiting and the metrics read
    @abstractmethod
    def next_visibility_change(self) -> float | None:
        """The store clock's instant at which the next in-flight message becomes visible."""

    def min_visible_tokens(self) -> int | None:
        """The smallest estimate among the messages selection can choose from."""
        return self.pool.min_visible_tokens()

    def time_until_score(
        self, available_tokens: float, params: ScoringParams, threshold: float
    ) -> float | None:
        """Seconds until the best score reaches ``threshold`` with time alone (None: never)."""
        return self.pool.time_until_score(available_tokens, params, threshold)

    def ids_above(self, capacity: float) -> list[str]:
        """Request ids of selectable messages whose estimate exceeds ``capacity``."""
        return self.pool.ids_above(capacity)

    def take_above(self, capacity: float, visibility_timeout: float) -> list[QueueMessage[T]]:
        """Takes every selectable message whose estimate exceeds ``capacity`` (leased)."""
        return self.pool.take_above(capacity, visibility_timeout)

    def counts_by_priority(self) -> list[int]:
        """Selectable messages per priority, URGENT first."""
        return list(self.pool.counts_by_priority())

    def oldest_enqueued_at(self) -> float | None:
        """Enqueue instant (seconds) of the oldest selectable message."""
        return self.pool.oldest_enqueued_at()

    @abstractmethod
    def in_flight_count(self) -> int | None:
        """Messages in flight in the store, when known locally."""

    @property
    def buffered(self) -> int:
        """Messages leased into a prefetch buffer (0 in memory)."""
        return 0

    def _selection_owner(self) -> Any:
        """Whose candidates selection takes from: dispatchers sharing it share one lock."""
        return self

    def selection_guard(self, limiter: Any) -> SelectionGuard:
        """The `SelectionGuard` of this pool (an `InMemoryStorage` shared by several
        dispatchers has one) and ``limiter``, for the running event loop (a dispatcher may
        serve several `asyncio.run` in turn, or threads one each)."""
        loop = asyncio.get_running_loop()
        guards = _GUARDS.setdefault(self._selection_owner(), {})
        key = (loop, id(limiter))
        guard = guards.get(key)
        if guard is None:
            for stale in [k for k in guards if k[0].is_closed()]:
                del guards[stale]
            guard = guards[key] = SelectionGuard(loop)
        return guard

    async def close(self) -> None:
        """Stops prefetching and releases what the source holds."""

    def stop(self) -> None:
        """Stops prefetching; buffered messages stay leased."""


class InMemorySource(MessageSource[T]):
    """An `InMemoryStorage` driven through its Rust core, without coroutines on the hot path."""

    def __init__(self, storage: InMemoryStorage[T]) -> None:
        super().__init__(storage, storage.core)
        self.core: StoreCore = storage.core

    def _selection_owner(self) -> Any:
        return self.storage  # every dispatcher over this store selects from its core

    async def enqueue(self, request: LLMRequest[T]) -> QueueMessage[T]:
        return self.core.enqueue(request)

    async def batch_enqueue(self, requests: Sequence[LLMRequest[T]]) -> list[QueueMessage[T]]:
        return self.core.enqueue_batch(requests)

    async def delete(self, receipt_handle: str) -> None:
        self.core.delete(receipt_handle)

    async def change_visibility(self, receipt_handle: str, seconds: float) -> None:
        self.core.change_visibility(receipt_handle, seconds)

    async def dead_letter(self, message: QueueMessage[T]) -> None:
        self.core.dead_letter_now(message.attributes.receipt_handle)

    async def purge(self, handed_out: Sequence[str], outcome: dict[str, bool]) -> None:
        for handle in handed_out:  # deleted by handle first, to learn which were stale
            try:
                self.core.delete(handle)
            except ReceiptHandleError:
                outcome[handle] = False
            else:
                outcome[handle] = True
        self.core.purge()  # every message, in flight included

    async def drop_expired(self) -> list[str]:
        return self.core.drop_expired()

    async def hand_back(self, message: QueueMessage[T]) -> None:
        # Undone, not released: a receive nobody got must not count toward max_receive_count.
        with contextlib.suppress(ReceiptHandleError):
            self.core.cancel_receive(message.attributes.receipt_handle)

    def next_visibility_change(self) -> float | None:
        return self.core.next_visibility_change()

    def in_flight_count(self) -> int | None:
        return self.core.in_flight_count()


class PrefetchSource(MessageSource[T]):
    """Any other store, served from a buffer of up to ``buffer_size`` leased messages.

    The buffer is filled with one ``storage.dequeue``: before a selection when it is empty, and
    otherwise in the background as soon as a message leaves it, so a dispatch does not wait for
    a round trip to the store; with ``enable_prefetch`` also every ``prefetch_interval`` seconds,
    when the leases of buffered messages are renewed too. Whatever the settings, a buffered
    message's lease is renewed once half of it is used (before each selection, and by a
    background task while the buffer holds messages): it must not become visible in the store
    while it waits here, or a fill would receive it again, a receive nobody got that counts
    toward ``max_receive_count``. A message leaving the buffer gets a
    full ``visibility_timeout`` again: its lease is renewed before it is handed out when less
    than half of it is left (by the dispatcher's clock, counted from before the receive, so the
    estimate errs short) — then never after another consumer could have received it — and in the
    background otherwise.
    """

    leases = True

    def __init__(
        self,
        storage: QueueStorageAdapter[T],
        *,
        clock: Any,
        buffer_size: int,
        visibility_timeout: float,
        prefetch_interval: float,
        logger: logging.Logger,
        on_arrival: Callable[[], None] | None = None,
    ) -> None:
        self.buffer = CandidateBuffer(clock)
        super().__init__(storage, self.buffer)
        # Called when a fill brings messages into the buffer (wakes waiting dequeues).
        self._on_arrival = on_arrival
        self._buffer_size = buffer_size
        self._visibility_timeout = visibility_timeout
        self._prefetch_interval = prefetch_interval
        self._logger = logger
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # Purges in progress: no receive starts meanwhile, and what one in flight brings is
        # handed to the purge.
        self._purging = 0
        self._arrived_while_purging: list[QueueMessage[T]] = []
        # Messages the receive in flight will bring, and that receive.
        self._pending = 0
        self._fill_task: asyncio.Task[None] | None = None
        # Receipt handle -> the instant (dispatcher clock) its lease ends at the latest.
        self._lease_ends: dict[str, float] = {}
        # Background fills and hand-out renewals, kept so they can be awaited on close.
        self._background: set[asyncio.Task[None]] = set()
        # Lease renewals on their way, by receipt handle (buffered or handed-out messages): a
        # mark or a release waits for its message's, so they reach the store in order.
        self._renewals: dict[str, asyncio.Task[None]] = {}
        # Renews buffered leases while the buffer holds messages (see `_keep_leases`).
        self._keeper: asyncio.Task[None] | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def purge(self, handed_out: Sequence[str], outcome: dict[str, bool]) -> None:
        # Nothing buffered is selectable from now on; a receive in flight lands first and what
        # it brings goes to the purge; none starts until the purge is done.
        self._purging += 1
        leased = self.buffer.drain()
        try:
            while self._fill_task is not None and not self._fill_task.done():
                await asyncio.wait({self._fill_task})
            leased += self.buffer.drain() + self._arrived_while_purging
            self._arrived_while_purging = []
            # A store's purge may leave in-flight messages (the adapter's default does): the
            # ones leased here are deleted by handle, then the handed-out ones.
            while leased:
                handle = leased[0].attributes.receipt_handle
                with contextlib.suppress(ReceiptHandleError):
                    await self.storage.delete_message(handle)
                self._lease_ends.pop(handle, None)
                leased.pop(0)
            for handle in handed_out:
                try:
                    await self.storage.delete_message(handle)
                except ReceiptHandleError:
                    outcome[handle] = False
                else:
                    outcome[handle] = True
            await self.storage.purge()
        except BaseException:
            # Cancelled or failed: what is still leased here and not deleted stays ours.
            leased += self._arrived_while_purging
            self._arrived_while_purging = []
            for message in leased:
                self._lease_ends.setdefault(message.attributes.receipt_handle, -math.inf)
            self._buffer(leased)
            raise
        finally:
            self._purging -= 1

    def _now(self) -> float:
        clock = self._clock
        return float(clock()) if clock is not None else time.monotonic()

    async def _fill(self) -> None:
        missing = self._buffer_size - len(self.buffer) - self._pending
        if missing <= 0 or self._purging:
            return
        self._pending += missing
        started = self._now()
        try:
            messages = await self.storage.dequeue(missing, self._visibility_timeout)
        finally:
            self._pending -= missing
        if self._purging:
            # Received before a purge that started meanwhile: the purge deletes them.
            self._arrived_while_purging += messages
            return
        if messages:
            ends = started + self._visibility_timeout
            for message in messages:
                self._lease_ends[message.attributes.receipt_handle] = ends
            self._buffer(messages)
            if self._on_arrival is not None:
                self._on_arrival()

    def _buffer(self, messages: Sequence[QueueMessage[T]]) -> None:
        """Puts leased messages into the buffer, where the lease keeper renews them. Of two
        copies of one request it keeps the later delivery; the lease of the other (its handle
        is stale) is forgotten."""
        for stale in self.buffer.insert(messages):
            self._lease_ends.pop(stale, None)
        self._keep_leases()

    def _start_fill(self) -> asyncio.Task[None]:
        """The fill in flight, or a new one: one receive at a time."""
        if self._fill_task is None or self._fill_task.done():
            self._fill_task = asyncio.get_running_loop().create_task(self._fill())
            self._background.add(self._fill_task)
            self._fill_task.add_done_callback(self._fill_done)
        return self._fill_task

    def _fill_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Seen here; a dequeue waiting on this fill re-raises it too.
            self._logger.warning("filling the prefetch buffer failed: %r", task.exception())

    async def prepare(self) -> None:
        try:
            await self._renew_due()
        except Exception:
            # Not this dispatch's failure: the hand-out renews its own message's lease first.
            self._logger.warning("renewing buffered leases failed; retrying later", exc_info=True)
        if len(self.buffer) == 0:
            # Nothing to select from: wait for the fill (one already in flight, or a new one).
            # Shielded: a cancelled dequeue must not cancel a receive others wait for.
            await asyncio.shield(self._start_fill())
        else:
            self._refill_soon()

    def _refill_soon(self) -> None:
        if len(self.buffer) + self._pending < self._buffer_size:
            self._start_fill()

    async def _after_renewal(self, receipt_handle: str) -> None:
        renewal = self._renewals.get(receipt_handle)
        if renewal is not None:
            await asyncio.shield(renewal)

    async def delete(self, receipt_handle: str) -> None:
        await self._after_renewal(receipt_handle)
        await self.storage.delete_message(receipt_handle)

    async def change_visibility(self, receipt_handle: str, seconds: float) -> None:
        await self._after_renewal(receipt_handle)
        await self.storage.update_visibility_timeout(receipt_handle, seconds)

    async def dead_letter(self, message: QueueMessage[T]) -> None:
        await self._after_renewal(message.attributes.receipt_handle)
        await self.storage.dead_letter_message(message)

    async def _renew_due(self, *, every: bool = False) -> None:
        """Renews, all at once, the lease of every buffered message with half of it or less
        left (``every``: of every buffered message; one already being renewed is left to that
        renewal). Each renewal is registered in `_renewals`, so a mark or a release of its
        message waits for it and reaches the store after it."""
        if self._visibility_timeout <= 0:
            return  # nothing is leased ahead for any time: nothing to keep
        half = self._visibility_timeout / 2
        now = self._now()
        due = [
            handle
            for handle in self.buffer.handles()
            if handle not in self._renewals
            and (every or self._lease_ends.get(handle, math.inf) - now <= half)
        ]
        if not due:
            return
        renewals = [self._renew(handle, self._visibility_timeout) for handle in due]
        # Shielded: a cancelled caller leaves the renewals running (they are ours either way).
        results = await asyncio.gather(*(asyncio.shield(r) for r in renewals), return_exceptions=True)
        failure: BaseException | None = None
        for handle, result in zip(due, results, strict=True):
            if isinstance(result, ReceiptHandleError):
                # Its lease ran out and another consumer received it: forget it.
                self.buffer.discard(handle)
                self._lease_ends.pop(handle, None)
            elif isinstance(result, BaseException):
                failure = failure or result
            elif handle in self._lease_ends:  # still buffered
                self._lease_ends[handle] = now + self._visibility_timeout
        if failure is not None:
            raise failure

    def _renew(self, handle: str, seconds: float) -> asyncio.Task[None]:
        """Renews a lease for ``seconds`` in a task, after any renewal of it already on its way,
        registered in `_renewals` until it lands: a mark or a release of the message waits
        for it, so the store sees them in the order they were made."""
        previous = self._renewals.get(handle)

        async def renew() -> None:
            if previous is not None:
                await asyncio.wait({previous})
            await self.storage.update_visibility_timeout(handle, seconds)

        renewal = asyncio.get_running_loop().create_task(renew())
        self._renewals[handle] = renewal
        renewal.add_done_callback(functools.partial(self._forget_renewal, handle))
        return renewal

    def _renewed_in_background(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if task.cancelled() or isinstance(task.exception(), ReceiptHandleError):
            return  # marked, or received elsewhere, meanwhile: nothing to do
        if task.exception() is not None:
            self._logger.error("renewing a lease failed: %r", task.exception())

    def _forget_renewal(self, handle: str, task: asyncio.Future[None]) -> None:
        if self._renewals.get(handle) is task:
            del self._renewals[handle]
        if not task.cancelled():
            task.exception()  # retrieved: the awaiting side handles it

    def _keep_leases(self) -> None:
        """Starts the background renewal of buffered leases unless it runs; it ends when the
        buffer is empty or the source stops. (A visibility timeout of 0 leases nothing to keep.)"""
        if self._stopped or self._visibility_timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        if self._keeper is not None and not self._keeper.done() and self._keeper.get_loop() is loop:
            return
        self._keeper = loop.create_task(self._keep_leases_loop())

    async def _keep_leases_loop(self) -> None:
        half = self._visibility_timeout / 2
        while not self._stopped and len(self.buffer):
            handles = self.buffer.handles()
            if renewing := {self._renewals[h] for h in handles if h in self._renewals}:
                # Renewals started elsewhere (a selection's): wait for them, do not poll.
                await asyncio.wait(renewing)
                continue
            ends = [self._lease_ends[h] for h in handles if h in self._lease_ends]
            if not ends:
                return
            # Real seconds, as the prefetch loop sleeps: the dispatcher's clock is assumed to
            # run at that rate (a virtual clock is covered by the renewal before each selection).
            await asyncio.sleep(max(0.01, min(ends) - half - self._now()))
            try:
                await self._renew_due()
            except Exception:
                self._logger.exception("renewing buffered leases failed; retrying")
                await asyncio.sleep(min(half, self._prefetch_interval))

    def start_prefetching(self) -> None:
        """Starts (or restarts, in a new event loop) the background refresh of the buffer."""
        if self._stopped:
            return
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._task = loop.create_task(self._prefetch_loop())

    async def _prefetch_loop(self) -> None:
        while not self._stopped:
            try:
                await self.prepare()
                await self._renew_due(every=True)
            except StorageError as error:  # the store is down: keep trying, without a traceback each time
                self._logger.warning("prefetch failed (%r); retrying in %s s", error, self._prefetch_interval)
            except Exception:  # keep prefetching through other failures too
                self._logger.exception("prefetch failed; retrying in %s s", self._prefetch_interval)
            await asyncio.sleep(self._prefetch_interval)

    async def drop_expired(self) -> list[str]:
        ids: list[str] = []
        expired = self.buffer.take_expired()
        for index, message in enumerate(expired):
            try:
                await self.storage.dead_letter_message(message)
            except ReceiptHandleError:
                continue  # its lease ran out: another consumer holds it now
            except BaseException:
                self._buffer(expired[index:])  # still leased by us: kept, tried again later
                raise
            ids.append(message.payload.id)
        return ids

    async def confirm(self, message: QueueMessage[T], visibility_timeout: float) -> bool:
        if not self._stopped:
            # The message left the buffer: top it up meanwhile, off this dispatch's path.
            self._refill_soon()
        handle = message.attributes.receipt_handle
        lease_end = self._lease_ends.pop(handle, -math.inf)
        if lease_end - self._now() > visibility_timeout / 2:
            # Still ours for a while: nobody else can hold it, renew without waiting.
            renewal = self._renew(handle, visibility_timeout)
            self._background.add(renewal)
            renewal.add_done_callback(self._renewed_in_background)
            return True
        try:
            await self.storage.update_visibility_timeout(handle, visibility_timeout)
        except ReceiptHandleError:
            # Its visibility ran out while buffered and another consumer received it: never
            # hand out a message twice.
            return False
        except BaseException:
            # Cancelled or failed mid-renewal: the lease is still ours either way, so the
            # message goes back into the buffer, not to nobody.
            self._lease_ends[handle] = lease_end
            self._buffer([message])
            raise
        return True

    async def hand_back(self, message: QueueMessage[T]) -> None:
        # Still leased by this dispatcher: back into the buffer, where it is selectable again.
        self._lease_ends.setdefault(message.attributes.receipt_handle, self._now())  # renewed soon
        self._buffer([message])

    def next_visibility_change(self) -> float | None:
        return None

    def in_flight_count(self) -> int | None:
        return None

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def stop(self) -> None:
        self._stopped = True
        self._halt()

    def _halt(self) -> list[asyncio.Task[None]]:
        """Cancels the background prefetch and lease renewal (restarted by the next dequeue and
        fill unless stopped); returns the tasks cancelled."""
        halted = [task for task in (self._task, self._keeper) if task is not None]
        for task in halted:
            task.cancel()
        self._task = self._keeper = None
        return halted

    async def close(self) -> None:
        self._stopped = True
        halted = self._halt()
        if running := running_here(halted):
            await asyncio.wait(running)  # none outlives the close
        await self.release_buffered()

    async def release_buffered(self) -> None:
        """Gives every buffered message back to the store (visibility 0). The background
        prefetch and renewals halt; a later dequeue restarts them unless `stop()` was called."""
        self._halt()
        # A fill in flight may still bring messages: let it land (a cancelled release must not
        # cancel it: its messages would be leased to nobody), then release everything.
        if running := running_here(self._background):
            await asyncio.wait(running)
        # All at once, each to its end in a task of its own: a store that does not answer costs
        # one timeout, not one per message, and a cancelled release leaves none half done.
        releases = [asyncio.ensure_future(self._release(m)) for m in self.buffer.drain()]
        self._background.update(releases)
        for release in releases:
            release.add_done_callback(self._background.discard)
        if releases:
            await asyncio.wait(releases)

    async def _release(self, message: QueueMessage[T]) -> None:
        handle = message.attributes.receipt_handle
        try:
            await self._after_renewal(handle)  # a renewal landing later would lease it again
            await self.storage.update_visibility_timeout(handle, 0.0)
        except ReceiptHandleError:
            pass
        except Exception as error:
            # Its lease runs out by itself; the others are still released.
            self._logger.warning("releasing buffered request %r failed: %r", message.payload.id, error)
        finally:
            self._lease_ends.pop(handle, None)
