"""`ProcessableMessage`: a message handed out by a dispatcher, to be marked exactly once.

Every mark keeps the books: the store learns the outcome through the dispatcher's message
source, the limiter's reservation is corrected to the actual count (processed), refunded
(failed, dead-lettered) or left alone (never marked), and the dispatcher forgets the delivery,
also when its receipt handle has gone stale or the store was purged meanwhile.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._checks import real_number, shown
from ._core import LLMThrottle
from .errors import (
    InvalidRequestError,
    MessageStateError,
    RateLimitError,
    ReceiptHandleError,
    UnknownRequestError,
)
from .scoring import MessageScore
from .storage.base import MAX_VISIBILITY_TIMEOUT
from .types import QueueMessage, validate_token_count

if TYPE_CHECKING:
    from .dispatcher import LLMQueueDispatcher

__all__ = ["ProcessableMessage", "describe_score"]

T = TypeVar("T")


def describe_score(score: MessageScore) -> str:
    """A human explanation naming the top weighted factors."""
    top = sorted(score.breakdown.items(), key=lambda item: item[1], reverse=True)[:3]
    parts = ", ".join(f"{name} {value:.3f}" for name, value in top if value > 0)
    return f"score {score.total:.3f}: {parts}" if parts else f"score {score.total:.3f}"


def _check_delay(value: object, name: str) -> float:
    number = real_number(value)  # an int, a float or an integer-like (numpy's), not a bool
    if number is None or not 0.0 <= number <= MAX_VISIBILITY_TIMEOUT:
        raise InvalidRequestError(f"{name} must be None or within [0, 43200] seconds, got {shown(value)}")
    return number


class ProcessableMessage(Generic[T]):
    """A message handed out by `LLMQueueDispatcher.dequeue`, to be marked exactly once.

    ``async with processable:`` marks it processed on a normal exit and failed on an exception
    (which is re-raised).
    """

    __slots__ = (
        "_charge",
        "_dispatcher",
        "_generation",
        "_limiter",
        "_purge_outcome",
        "_reason",
        "_reserved",
        "_settled",
        "dispatched_at",
        "message",
        "score",
    )

    def __init__(
        self,
        dispatcher: LLMQueueDispatcher[T],
        message: QueueMessage[T],
        score: MessageScore,
        limiter: Any,
        reserved: bool,
        dispatched_at: float,
        generation: int,
        reason: str | None = None,
        charge: tuple[int, int] | None = None,
    ) -> None:
        self.message = message
        self.score = score
        self.dispatched_at = dispatched_at
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._reserved = reserved
        self._generation = generation
        # Set by a purge of its delivery: receipt handle -> deleted, or stale already (False).
        self._purge_outcome: dict[str, bool] | None = None
        self._reason = reason
        self._charge = charge
        self._settled = False

    @property
    def reason(self) -> str:
        """Why this message won: its policy's explanation, or its total and top factors."""
        return self._reason if self._reason is not None else describe_score(self.score)

    @property
    def settled(self) -> bool:
        """Whether the message was marked (processed, failed or dead-lettered)."""
        return self._settled

    def _claim(self, action: str) -> None:
        if self._settled:
            raise MessageStateError(
                f"message {self.message.payload.id!r} was already marked; cannot {action}"
            )
        self._settled = True

    def _run_to_end(self, mark: Coroutine[Any, Any, None]) -> Awaitable[None]:
        """What a mark awaits to run ``mark``, a claimed mark's steps, to its end even if the
        caller is cancelled meanwhile: its store step may already have landed, and the books
        must follow it (the caller still gets `CancelledError`; `LLMQueueDispatcher.close`
        waits for such marks). A mark that cannot suspend (the in-memory store and an
        `LLMThrottle`) runs inline, as the hot path wants."""
        if type(self._limiter) is LLMThrottle and not self._dispatcher._source.leases:
            return mark
        task = asyncio.ensure_future(mark)
        self._dispatcher._track(task)
        return asyncio.shield(task)

    def _abandon(self) -> None:
        """Gives up a delivery whose mark failed in the store (a `Worker` does): it is settled
        and forgotten; the store redelivers its message when the lease ends, and the limiter
        keeps its reservation (as for any stale delivery, erring high)."""
        if not self._settled:
            self._dispatcher._forget(self)

    def _stale_at_purge(self) -> bool:
        """Whether a purge found this delivery's message received again already (or gone)."""
        outcome = self._purge_outcome
        return outcome is not None and outcome.get(self.message.attributes.receipt_handle) is False

    def _purged(self) -> bool:
        """Whether the store was purged since this delivery: the message no longer exists."""
        return self._generation != self._dispatcher._generation

    async def _store_step(self, step: Callable[[], Awaitable[None]]) -> bool:
        """Runs the store call of a mark. True when it landed; False when the delivery is over
        (stale handle, purged store): the mark then settles the books without the store. Any
        other failure un-claims the mark, so it can be retried, and propagates."""
        if self._generation != self._dispatcher._generation:
            return False
        try:
            await step()
        except ReceiptHandleError:
            return False
        except BaseException:
            self._settled = False
            raise
        return True

    def _recharge(self, tokens: int) -> None:
        """Corrects what a fair_priority dispatch charged the tenant (0: takes it back)."""
        if self._charge is not None:
            self._dispatcher._source.correct_charge(self._charge[0], self._charge[1], float(tokens))

    async def _adjust(self, actual_tokens: int, landed: bool = True) -> None:
        """Corrects the tenant's charge and the limiter's reservation to ``actual_tokens``. When
        the store step did not land because the delivery went stale (the message was received
        again), the limiter is left alone: its record for this request id is the new delivery's
        now, and correcting it would count the wrong call (erring high, on the safe side)."""
        self._recharge(actual_tokens)
        if not self._reserved or (not landed and (not self._purged() or self._stale_at_purge())):
            return
        request_id = self.message.payload.id
        try:
            result = self._limiter.adjust_consumption(request_id, actual_tokens)
            if inspect.isawaitable(result):
                # Shielded: a cancelled mark must not leave the reservation half corrected.
                await asyncio.shield(result)
        except UnknownRequestError:
            # The limiter forgot the reservation (older than its history retention): nothing to
            # adjust any more, and the message itself is settled.
            self._dispatcher._logger.warning(
                "rate limiter no longer knows request %r; its token count was not adjusted", request_id
            )
        except RateLimitError as error:
            # A "strict" limiter refuses to take the extra tokens. The message is settled all
            # the same: the call happened, and refusing to settle would strand the delivery.
            self._dispatcher._logger.warning(
                "rate limiter refused the extra tokens of request %r (%s); the message is settled",
                request_id,
                error,
            )
        except Exception as error:
            # The limiter failed (a shared one unreachable): the store step landed, so the
            # message is settled and forgotten; only the limiter's count could not be corrected.
            self._dispatcher._logger.warning(
                "rate limiter failed to correct request %r (%r); the message is settled", request_id, error
            )

    async def mark_as_processed(self, actual_tokens: int | None = None) -> None:
        """Deletes the message; with a reservation, adjusts the limiter to ``actual_tokens``.

        A stale receipt handle (the visibility ran out and another consumer received the
        message) settles the delivery here and raises `ReceiptHandleError`: the message will be
        processed again.
        """
        if actual_tokens is not None:
            actual_tokens = validate_token_count(actual_tokens, "actual_tokens")
        self._claim("mark it processed")
        await self._run_to_end(self._processed(actual_tokens))

    async def _processed(self, actual_tokens: int | None) -> None:
        dispatcher = self._dispatcher
        deleted = self._generation == dispatcher._generation
        if deleted:
            try:
                await dispatcher._source.delete(self.message.attributes.receipt_handle)
            except ReceiptHandleError:
                deleted = False
            except BaseException:
                self._settled = False
                raise
        used = actual_tokens if actual_tokens is not None else self.message.payload.token_info.estimated
        try:
            if actual_tokens is not None:
                await self._adjust(actual_tokens, deleted)
        finally:
            # The store step is done: even a mark cancelled at the limiter's (shielded)
            # correction is settled and forgotten, and waiting dequeues are woken.
            self._dispatcher._on_settled(self, processed=True, tokens=used)
        if not deleted and not self._purged():
            raise ReceiptHandleError(
                f"message {self.message.payload.id!r} could not be deleted: its receipt handle is no longer "
                "current (the visibility ran out and it was received again)"
            )

    async def mark_as_failed(self, error: BaseException, *, retry_after: float | None = None) -> None:
        """Makes the message visible again after ``retry_after`` s (default at once) and refunds
        its reserved tokens. The store's dead-letter rule applies."""
        delay = 0.0 if retry_after is None else _check_delay(retry_after, "retry_after")
        self._claim("mark it failed")
        await self._run_to_end(self._failed(error, delay))

    async def _failed(self, error: BaseException, delay: float) -> None:
        source, handle = self._dispatcher._source, self.message.attributes.receipt_handle
        # With a reservation, the message is kept leased (proving the lease is ours) until it
        # is refunded, and only then made visible after ``delay``: limiters keep reservations by
        # request id, and a refund landing after the next delivery's reservation would take
        # that one back.
        first = self._dispatcher.config.visibility_timeout if self._reserved else delay
        landed = await self._store_step(lambda: source.change_visibility(handle, first))
        try:
            try:
                await self._adjust(0, landed)
            finally:
                if landed and self._reserved:
                    await self._release_after(delay)
        finally:
            self._dispatcher._logger.info("request %r failed: %r", self.message.payload.id, error)
            self._dispatcher._on_settled(self, processed=False, tokens=0)

    async def _release_after(self, delay: float) -> None:
        """Makes a failed message visible after ``delay``, its reservation already back."""
        try:
            await self._dispatcher._source.change_visibility(self.message.attributes.receipt_handle, delay)
        except Exception as error:
            # The mark stands (its budget is back): the message returns when the hold ends.
            self._dispatcher._logger.warning(
                "request %r: could not make it visible again (%r); it is delivered again after %s s",
                self.message.payload.id,
                error,
                self._dispatcher.config.visibility_timeout,
            )

    async def mark_as_dead_lettered(self, error: BaseException) -> None:
        """Moves the message to the store's dead-letter target at once, whatever its receive
        count (a handler's `PermanentError`), and refunds its reserved tokens. Without a
        dead-letter target the store drops it and counts it, as its ``max_receive_count`` rule
        does."""
        self._claim("dead-letter it")
        await self._run_to_end(self._dead_lettered(error))

    async def _dead_lettered(self, error: BaseException) -> None:
        source, message = self._dispatcher._source, self.message
        moved = await self._store_step(lambda: source.dead_letter(message))
        try:
            await self._adjust(0, moved)
        finally:
            self._dispatcher._logger.warning("request %r dead-lettered: %r", self.message.payload.id, error)
            self._dispatcher._on_settled(self, processed=False, tokens=0)
        if not moved and not self._purged():
            raise ReceiptHandleError(
                f"message {self.message.payload.id!r} could not be dead-lettered: its receipt handle is no "
                "longer current (the visibility ran out and it was received again)"
            )

    async def update_visibility(self, seconds: float) -> None:
        """Keeps the message leased for ``seconds`` more, counted from now."""
        if self._settled:
            raise MessageStateError(f"message {self.message.payload.id!r} was already marked")
        seconds = _check_delay(seconds, "seconds")
        await self._dispatcher._source.change_visibility(self.message.attributes.receipt_handle, seconds)

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
