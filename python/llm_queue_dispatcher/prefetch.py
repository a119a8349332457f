"""`Prefetcher`: the I/O of a dispatcher's prefetch buffer over a store other than the in-memory
one. The buffer, selection from it and its lease book live in the dispatcher's Rust core; this
module keeps what only Python can own: the receives that fill it, the renewals that keep its
leases, and their order.

One ``storage.dequeue`` fills the buffer: before a selection when it is empty, else in the
background as soon as a message leaves it (and with ``enable_prefetch`` every
``prefetch_interval``). A buffered lease is renewed once half of it is used (before each
selection, and by a background task): a message visible in the store while it waits here would
be received again, a receive that counts toward ``max_receive_count``. A message leaving the
buffer with less than half of its lease left (counted from before the receive: the estimate
errs short) is renewed before its hand-out, else in the background. Releasing the buffer
(``close``, a `Worker` stopping) gives every message back with ``release_message``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from ._checks import shown
from ._core import DispatchCore, Plan, ProcessableMessage
from .config import LLMQueueDispatcherConfig
from .errors import ReceiptHandleError, StorageError
from .storage import QueueStorageAdapter
from .types import QueueMessage

__all__ = ["Prefetcher", "running_here"]

T = TypeVar("T")


def running_here(tasks: Iterable[asyncio.Future[Any]]) -> set[asyncio.Future[Any]]:
    """The tasks still running in this event loop: one left by an earlier `asyncio.run` can
    never finish, and waiting for it would fail."""
    loop = asyncio.get_running_loop()
    return {task for task in tasks if not task.done() and task.get_loop() is loop}


class Prefetcher(Generic[T]):
    """Fills, renews and releases the prefetch buffer of ``core`` from ``storage``, as ``config``
    sets it (``buffer_size``, ``visibility_timeout``, ``prefetch_interval``)."""

    def __init__(
        self,
        storage: QueueStorageAdapter[T],
        core: DispatchCore,
        config: LLMQueueDispatcherConfig,
        logger: logging.Logger,
    ) -> None:
        self.storage = storage
        self._core = core
        self._buffer_size = config.buffer_size
        self._visibility_timeout = config.visibility_timeout
        self._prefetch_interval = config.prefetch_interval
        self._logger = logger
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # Purges in progress: no receive starts meanwhile, and what one in flight brings is
        # handed to the purge.
        self._purging = 0
        self._arrived_while_purging: list[QueueMessage[T]] = []
        # Messages the receive in flight will bring, and that receive.
        self._pending = 0
        self._fill_task: asyncio.Task[None] | None = None
        # Background fills and hand-out renewals, kept so they can be awaited on close.
        self._background: set[asyncio.Task[None]] = set()
        # Lease renewals on their way, by receipt handle (buffered or handed-out messages): a
        # mark or a release waits for its message's, so they reach the store in order.
        self._renewals: dict[str, asyncio.Task[None]] = {}
        # Renews buffered leases while the buffer holds messages (see `_keep_leases`).
        self._keeper: asyncio.Task[None] | None = None

    # -- filling ---------------------------------------------------------------------------------
    async def _fill(self) -> None:
        missing = self._buffer_size - self._core.buffered - self._pending
        if missing <= 0 or self._purging:
            return
        self._pending += missing
        started = self._core.now()  # lease ends are counted from before the receive: they err short
        try:
            reply = await self.storage.dequeue(missing, self._visibility_timeout)
        finally:
            self._pending -= missing
        messages = await self._checked(reply)
        if self._purging:
            # Received before a purge that started meanwhile: the purge deletes them.
            self._arrived_while_purging += messages
            return
        if messages:
            self._buffer(messages, started + self._visibility_timeout)

    async def _checked(self, reply: object) -> list[QueueMessage[T]]:
        """The messages of a ``dequeue`` reply: a list (or tuple) of `QueueMessage`. Anything
        else is the adapter's failure, a `StorageError` naming it; the messages it did bring are
        given back at once rather than leased to nobody until their visibility runs out."""
        if isinstance(reply, (list, tuple)) and all(isinstance(m, QueueMessage) for m in reply):
            return list(reply)
        received = (
            [m for m in reply if isinstance(m, QueueMessage)] if isinstance(reply, (list, tuple)) else []
        )
        if received:
            await asyncio.wait([asyncio.ensure_future(self._release(m)) for m in received])
        raise StorageError(
            f"{type(self.storage).__name__}.dequeue returned {shown(reply)[:200]}, not a list of QueueMessage"
        )

    def _buffer(self, messages: Sequence[QueueMessage[T]], lease_end: float) -> None:
        """Puts messages leased until ``lease_end`` into the buffer, where the lease keeper renews
        them (of two copies of one request the core keeps the later delivery)."""
        self._core.buffer_insert(messages, lease_end)
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
        """Makes candidates available before a selection: renews the leases due, and fills the
        buffer (waiting for the fill when it is empty)."""
        try:
            await self._renew_due()
        except Exception:
            # Not this dispatch's failure: the hand-out renews its own message's lease first.
            self._logger.warning("renewing buffered leases failed; retrying later", exc_info=True)
        if self._core.buffered == 0:
            # Nothing to select from: wait for the fill (one already in flight, or a new one).
            # Shielded: a cancelled dequeue must not cancel a receive others wait for.
            await asyncio.shield(self._start_fill())
        else:
            self._refill_soon()

    def _refill_soon(self) -> None:
        if self._core.buffered + self._pending < self._buffer_size:
            self._start_fill()

    # -- leases ----------------------------------------------------------------------------------
    async def _after_renewal(self, receipt_handle: str) -> None:
        renewal = self._renewals.get(receipt_handle)
        if renewal is not None:
            await asyncio.shield(renewal)

    async def store_call(self, plan: Plan) -> None:
        """A mark's store call (after any renewal of its lease on its way)."""
        handle = plan.message.attributes.receipt_handle
        await self._after_renewal(handle)
        if plan.store == "delete":
            await self.storage.delete_message(handle)
        elif plan.store == "visibility":
            await self.storage.update_visibility_timeout(handle, plan.seconds)
        elif plan.store == "dead_letter":
            await self.storage.dead_letter_message(plan.message)
        else:
            await self.storage.release_message(handle)

    async def change_visibility(self, handle: str, seconds: float) -> None:
        """A job's `update_visibility` (after any renewal of its lease on its way)."""
        await self._after_renewal(handle)
        await self.storage.update_visibility_timeout(handle, seconds)

    async def _renew_due(self, *, every: bool = False) -> None:
        """Renews at once every buffered lease half used or more (``every``: all) that is not on
        its way already; each in `_renewals`, so a mark or release of its message comes after."""
        if self._visibility_timeout <= 0:
            return  # nothing is leased ahead for any time: nothing to keep
        started = self._core.now()
        due = self._core.buffer_due(every, set(self._renewals))
        if not due:
            return
        renewals = [self._renew(handle, self._visibility_timeout) for handle in due]
        # Shielded: a cancelled caller leaves the renewals running (they are ours either way).
        results = await asyncio.gather(*(asyncio.shield(r) for r in renewals), return_exceptions=True)
        failure: BaseException | None = None
        for handle, result in zip(due, results, strict=True):
            if isinstance(result, ReceiptHandleError):
                self._core.buffer_discard(handle)  # its lease ran out and another consumer has it
            elif isinstance(result, BaseException):
                failure = failure or result
            else:
                self._core.buffer_renewed(handle, started)
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
        buffer is empty or the prefetcher stops. (A visibility timeout of 0 leases nothing.)"""
        if self._stopped or self._visibility_timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        if self._keeper is not None and not self._keeper.done() and self._keeper.get_loop() is loop:
            return
        self._keeper = loop.create_task(self._keep_leases_loop())

    async def _keep_leases_loop(self) -> None:
        half = self._visibility_timeout / 2
        while not self._stopped and self._core.buffered:
            handles = self._core.buffer_handles()
            if renewing := {self._renewals[h] for h in handles if h in self._renewals}:
                # Renewals started elsewhere (a selection's): wait for them, do not poll.
                await asyncio.wait(renewing)
                continue
            due_in = self._core.buffer_next_due()
            if due_in is None:
                return
            # Real seconds, as the prefetch loop sleeps: the dispatcher's clock is assumed to
            # run at that rate (a virtual clock is covered by the renewal before each selection).
            await asyncio.sleep(max(0.01, due_in))
            try:
                await self._renew_due()
            except Exception:
                self._logger.exception("renewing buffered leases failed; retrying")
                await asyncio.sleep(min(half, self._prefetch_interval))

    async def confirm(self, job: ProcessableMessage[T]) -> bool:
        """Makes sure a job taken out of the buffer is ours for a full visibility timeout;
        False when its lease was lost (another consumer holds its message now)."""
        if not self._stopped:
            # The message left the buffer: top it up meanwhile, off this dispatch's path.
            self._refill_soon()
        handle = job.message.attributes.receipt_handle
        if job._lease_end - self._core.now() > self._visibility_timeout / 2:
            # Still ours for a while: nobody else can hold it, renew without waiting.
            renewal = self._renew(handle, self._visibility_timeout)
            self._background.add(renewal)
            renewal.add_done_callback(self._renewed_in_background)
            return True
        try:
            await self.storage.update_visibility_timeout(handle, self._visibility_timeout)
        except ReceiptHandleError:
            # Its visibility ran out while buffered and another consumer received it: never
            # hand out a message twice.
            return False
        return True

    def returned(self) -> None:
        """A message taken out was put back into the buffer (its lease end kept): keep it."""
        self._keep_leases()

    # -- deadlines and purge -----------------------------------------------------------------------
    async def drop_expired(self) -> list[str]:
        """Dead-letters the buffered messages whose deadline has passed; their ids, which the
        core logs and counts."""
        ids: list[str] = []
        expired = self._core.buffer_take_expired()
        for index, message in enumerate(expired):
            try:
                await self.storage.dead_letter_message(message)
            except ReceiptHandleError:
                continue  # its lease ran out: another consumer holds it now
            except BaseException:
                # Still leased by us: kept (its lease renewed soon), tried again later.
                self._buffer(expired[index:], self._core.now())
                raise
            ids.append(message.payload.id)
        return self._core.count_expired(ids)

    async def purge(self) -> None:
        """Removes every message from the store and the buffer. The deliveries handed out when
        the purge begins (`DispatchCore.begin_purge`) are deleted by handle first (a store's
        purge may leave in-flight messages), and the core learns each one whose message is
        gone, also when the purge fails later."""
        # Nothing buffered is selectable from now on; a receive in flight lands first and what
        # it brings goes to the purge; none starts until the purge is done.
        self._purging += 1
        purge, handed_out = self._core.begin_purge()
        leased, ok = self._core.buffer_drain(), False
        try:
            while self._fill_task is not None and not self._fill_task.done():
                await asyncio.wait({self._fill_task})
            leased += self._core.buffer_drain() + self._arrived_while_purging
            self._arrived_while_purging = []
            while leased:
                with contextlib.suppress(ReceiptHandleError):
                    await self.storage.delete_message(leased[0].attributes.receipt_handle)
                leased.pop(0)
            for delivered in handed_out:
                with contextlib.suppress(ReceiptHandleError):
                    await self.storage.delete_message(delivered.handle)
                self._core.purge_deleted(delivered.delivery)
            await self.storage.purge()
            ok = True
        except BaseException:
            # Cancelled or failed: what is still leased here and not deleted stays ours.
            leased += self._arrived_while_purging
            self._arrived_while_purging = []
            self._buffer(leased, -math.inf)  # leases of unknown length: renewed at once
            raise
        finally:
            self._purging -= 1
            self._core.end_purge(purge, ok)

    # -- prefetching and shutdown ------------------------------------------------------------------
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

    def stop(self) -> None:
        """Stops prefetching; buffered messages stay leased."""
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
        """Stops prefetching and releases the buffer."""
        self._stopped = True
        halted = self._halt()
        if running := running_here(halted):
            await asyncio.wait(running)  # none outlives the close
        await self.release_buffered()

    async def release_buffered(self) -> None:
        """Gives every buffered message back to the store unprocessed (``release_message``: its
        receive undone). The background prefetch and renewals halt; a later dequeue restarts them
        unless `stop()` was called."""
        self._halt()
        # A fill in flight may still bring messages: let it land (a cancelled release must not
        # cancel it: its messages would be leased to nobody), then release everything.
        if running := running_here(self._background):
            await asyncio.wait(running)
        # All at once, each to its end in a task of its own: a store that does not answer costs
        # one timeout, not one per message, and a cancelled release leaves none half done.
        releases = [asyncio.ensure_future(self._release(m)) for m in self._core.buffer_drain()]
        self._background.update(releases)
        for release in releases:
            release.add_done_callback(self._background.discard)
        if releases:
            await asyncio.wait(releases)

    async def _release(self, message: QueueMessage[T]) -> None:
        handle = message.attributes.receipt_handle
        try:
            await self._after_renewal(handle)  # a renewal landing later would lease it again
            await self.storage.release_message(handle)
        except ReceiptHandleError:
            pass
        except Exception as error:
            # Its lease runs out by itself; the others are still released.
            self._logger.warning("releasing buffered request %r failed: %r", message.payload.id, error)
