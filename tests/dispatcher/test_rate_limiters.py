"""Any `RateLimiter`: a plain-Python limiter instead of `LLMThrottle`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    MessageStateError,
    Priority,
    QueueMessage,
    QueueStorageAdapter,
    RateLimiter,
    RateLimitError,
    ReceiptHandleError,
    ScoringContext,
)
from tests.dispatcher.books import BookLimiter, native_limiter
from tests.dispatcher.books import request as sized_request
from tests.dispatcher.support import counts, queue, request, scored_queue
from tests.reference.storage import ReferenceStorage


@dataclass
class Check:
    allowed: bool
    reason: str | None
    available_in: float
    available_tokens: dict[str, float]


class FixedBudgetLimiter:
    """A RateLimiter in plain Python: a fixed budget that never refills."""

    def __init__(self, tokens: float, requests: float = 100.0, accept: bool = True) -> None:
        self.tokens = tokens
        self.capacity = tokens
        self.requests = requests
        self.accept = accept
        self.consumed: list[tuple[str, int]] = []
        self.adjusted: list[tuple[str, int]] = []
        self._reserved: dict[str, int] = {}

    def can_process(self, estimated_tokens: int) -> Check:
        if estimated_tokens > self.capacity:
            return Check(False, "tpm_limit", math.inf, self._available())
        allowed = self.requests >= 1 and estimated_tokens <= self.tokens
        return Check(
            allowed, None if allowed else "tpm_limit", 0.0 if allowed else math.inf, self._available()
        )

    def _available(self) -> dict[str, float]:
        return {"rpm": self.requests, "tpm": self.tokens}

    def get_metrics(self) -> Any:
        bucket = SimpleNamespace
        return SimpleNamespace(
            rpm=bucket(used=0.0, available=self.requests, limit=100.0, percentage=0.0),
            tpm=bucket(
                used=self.capacity - self.tokens, available=self.tokens, limit=self.capacity, percentage=0.0
            ),
        )

    def consume(self, request_id: str, estimated_tokens: int, metadata: dict[str, Any] | None = None) -> bool:
        if not self.accept or estimated_tokens > self.tokens or self.requests < 1:
            return False
        self.consumed.append((request_id, estimated_tokens))
        self._reserved[request_id] = estimated_tokens
        self.tokens -= estimated_tokens
        self.requests -= 1
        return True

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:
        self.adjusted.append((request_id, actual_tokens))
        self.tokens += self._reserved.pop(request_id) - actual_tokens


async def test_a_plain_python_rate_limiter_works(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = FixedBudgetLimiter(tokens=2_000)
    assert isinstance(limiter, RateLimiter)
    await dispatcher.batch_enqueue(
        [
            request("too-big-now", Priority.URGENT, tokens=5_000),
            request("high", Priority.HIGH, tokens=500),
            request("low", Priority.LOW, tokens=100),
        ]
    )
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "high"
    # Reserved under the delivery: the request id and its delivery number.
    assert limiter.consumed == [("high#1", 500)]
    await job.mark_as_processed(actual_tokens=700)
    assert limiter.adjusted == [("high#1", 700)]
    assert limiter.tokens == 1_300
    nxt = await dispatcher.dequeue(limiter)
    assert nxt is not None
    assert nxt.message.payload.id == "low"
    await nxt.mark_as_failed(RuntimeError("x"))
    assert limiter.adjusted[-1] == ("low#1", 0)
    assert limiter.tokens == 1_300
    again = await dispatcher.dequeue(limiter)
    assert again is not None
    assert again.message.payload.id == "low"
    assert limiter.consumed[-1] == ("low#2", 100)  # its second delivery, its own reservation


@pytest.mark.parametrize("policy", ["score", "fair_priority"])
async def test_a_stale_delivery_of_an_earlier_message_with_the_same_id_never_settles_the_new_ones(
    clock: ManualClock, policy: str
) -> None:
    # An id is unique only among messages not yet deleted: once "chat-7" is acknowledged a new
    # "chat-7" may be queued, and its first receive reserves under "chat-7#1", the key of the
    # earlier message's first delivery, still unmarked (its lease ran out). That stale
    # delivery's mark must not refund the new reservation: it makes no limiter call (its own
    # reservation stays as counted, erring high).
    dispatcher = queue(clock, visibility_timeout=10.0, policy=policy)
    limiter = FixedBudgetLimiter(tokens=10_000)
    await dispatcher.enqueue(request("chat-7", tokens=100))
    stale = await dispatcher.dequeue(limiter)
    clock.advance(11.0)
    second = await dispatcher.dequeue(limiter)
    assert stale is not None
    assert second is not None
    await second.mark_as_processed(actual_tokens=100)
    await dispatcher.enqueue(request("chat-7", tokens=300))
    fresh = await dispatcher.dequeue(limiter)
    assert fresh is not None
    assert limiter.consumed == [("chat-7#1", 100), ("chat-7#2", 100), ("chat-7#1", 300)]
    with contextlib.suppress(ReceiptHandleError):  # its message is gone: nothing to retry
        await stale.mark_as_failed(RuntimeError("its lease ran out"))
    assert limiter.adjusted == [("chat-7#2", 100)]
    await fresh.mark_as_processed(actual_tokens=250)
    assert limiter.adjusted == [("chat-7#2", 100), ("chat-7#1", 250)]
    assert limiter.tokens == 10_000 - 100 - 100 - 250


@pytest.mark.parametrize("limiter_class", [LLMThrottle, FixedBudgetLimiter, BookLimiter])
async def test_a_limiter_class_instead_of_a_limiter_is_refused_and_changes_nothing(
    clock: ManualClock, limiter_class: type
) -> None:
    """Passing the class (``LLMThrottle`` rather than ``LLMThrottle(...)``) is a caller's
    mistake refused at the door, as any other object that is not a limiter: its methods are
    unbound, and calling one half-way through a dispatch raised `TypeError`."""
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    with pytest.raises(InvalidRequestError, match="rate_limiter must be a RateLimiter"):
        await dispatcher.dequeue(limiter_class)
    with pytest.raises(InvalidRequestError, match="rate_limiter must be a RateLimiter"):
        await dispatcher.dequeue(limiter_class, timeout=1.0)
    with pytest.raises(InvalidRequestError, match="rate_limiter must be a RateLimiter"):
        await dispatcher.take_unfittable(limiter_class)
    assert await counts(dispatcher) == (1, 0, 1)
    job = await dispatcher.dequeue(FixedBudgetLimiter(tokens=2_000))
    assert job is not None
    assert job.message.payload.id == "a"


class MisreportingLimiter(FixedBudgetLimiter):
    """A plain limiter that refuses every consume and reports ``value`` where ``field`` (a path
    into its answers: ``tpm.limit`` of its metrics, ``available_in`` of its checks) should be a
    number."""

    def __init__(self, field: str, value: Any) -> None:
        super().__init__(tokens=2_000, accept=False)
        self.field, self.value = field, value

    def __repr__(self) -> str:
        return "MisreportingLimiter()"

    def can_process(self, estimated_tokens: int) -> Check:
        check = super().can_process(estimated_tokens)
        if self.field == "available_in":
            check.available_in = self.value
        return check

    def get_metrics(self) -> Any:
        metrics = super().get_metrics()
        if "." in self.field:
            bucket, name = self.field.split(".")
            setattr(getattr(metrics, bucket), name, self.value)
        return metrics


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("available_in", "soon"),
        ("available_in", None),
        ("available_in", math.nan),
        ("tpm.limit", "lots"),
        ("tpm.available", None),
        ("rpm.limit", [1]),
    ],
)
async def test_a_limiter_reporting_a_number_that_is_not_one_gets_a_typed_error_naming_it(
    clock: ManualClock, field: str, value: Any
) -> None:
    """Its answer is refused with `InvalidRequestError` naming the limiter and the field (not
    a raw `TypeError` or `ValueError` from deep inside a dispatch), and nothing is taken."""
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    limiter = MisreportingLimiter(field, value)
    named = rf"MisreportingLimiter\(\) reported .*{field.replace('.', '[.]')}"
    for timeout in (None, 1.0):
        with pytest.raises(InvalidRequestError, match=named):
            await dispatcher.dequeue(limiter, timeout=timeout)
    if field == "tpm.limit":  # the capacity take_unfittable reads
        with pytest.raises(InvalidRequestError, match=named):
            await dispatcher.take_unfittable(limiter)
    assert await counts(dispatcher) == (1, 0, 1)
    assert limiter.tokens == 2_000
    job = await dispatcher.dequeue(FixedBudgetLimiter(tokens=2_000))
    assert job is not None
    assert job.message.payload.id == "a"


async def test_a_limiter_that_refuses_to_consume_gets_nothing(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    limiter = FixedBudgetLimiter(tokens=2_000, accept=False)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(limiter) is None
    assert await counts(dispatcher) == (1, 0, 1)


async def test_a_plain_python_limiter_without_requests_left_gets_nothing(clock: ManualClock) -> None:
    dispatcher = queue(clock)
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(FixedBudgetLimiter(tokens=2_000, requests=0)) is None


async def test_custom_scorers_see_a_plain_limiters_metrics(clock: ManualClock) -> None:
    seen: list[float] = []

    def spy(message: QueueMessage[Any], context: ScoringContext) -> float:
        seen.append(context.rate_limiter_metrics.tpm.available)
        return 0.0

    dispatcher = scored_queue(clock, CustomScorer("spy", 0.1, spy))
    await dispatcher.enqueue(request("a"))
    assert await dispatcher.dequeue(FixedBudgetLimiter(tokens=1_234)) is not None
    assert seen == [1_234]


@pytest.mark.parametrize("kind", ["native", "python"])
@pytest.mark.parametrize("source", ["memory", "prefetch"])
async def test_a_refused_adjustment_still_settles_the_job(source: str, kind: str) -> None:
    """The limiter refuses the extra tokens (strict, bucket empty). Whether the mark
    reports the refusal or not, the message is deleted, the job is settled and forgotten, a
    second mark raises `MessageStateError`, and the refusal took nothing."""
    clock = ManualClock(1_000.0)
    storage: QueueStorageAdapter[Any] = (
        InMemoryStorage(clock=clock) if source == "memory" else ReferenceStorage(clock=clock)
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, buffer_size=1)
    )
    limiter: Any
    if kind == "native":
        limiter = native_limiter(ManualClock(), rpm=600, tpm=1_000, adjustment_failure_strategy="strict")
    else:
        limiter = BookLimiter(token_capacity=1_000, strict=True)
    await dispatcher.enqueue(sized_request("a", 100))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert limiter.consume("other", 900)  # the bucket is empty now
    with contextlib.suppress(RateLimitError):
        await job.mark_as_processed(actual_tokens=500)
    with pytest.raises(MessageStateError):
        await job.mark_as_processed(actual_tokens=500)
    with pytest.raises(MessageStateError):
        await job.mark_as_failed(RuntimeError("x"))
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert metrics.queue.total_messages == 0
    assert (await storage.get_queue_attributes()).approximate_number_of_messages_in_flight == 0
    assert limiter.get_metrics().tpm.available == pytest.approx(0.0)  # nothing more taken, nothing lost
