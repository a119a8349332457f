"""Limits as providers publish them, through the dispatcher: a request's input and output parts
(`TokenInfo(input=, max_output=)`) are reserved from the input and output limits apart, admission
and holding check each limit with its own share, and `mark_as_processed(input_tokens=,
output_tokens=)` corrects each limit. On every path: the in-memory store with an `LLMThrottle`
(one call into Rust), another store's prefetch buffer, and a limiter the dispatcher calls from
Python (keyed reservations)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    TokenInfo,
)
from tests.reference.storage import ReferenceStorage


class ForwardingLimiter:
    """A limiter the dispatcher does not know (so it reserves from Python, under the delivery's
    key), forwarding every call and its keywords to an `LLMThrottle`."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner

    def can_process(self, estimated_tokens: int, **parts: Any) -> Any:
        return self.inner.can_process(estimated_tokens, **parts)

    def get_metrics(self) -> Any:
        return self.inner.get_metrics()

    def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None, **parts: Any) -> bool:
        return self.inner.consume(request_id, estimated_tokens, metadata, **parts)

    def adjust_consumption(self, request_id: str, actual_tokens: int, **parts: Any) -> None:
        self.inner.adjust_consumption(request_id, actual_tokens, **parts)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def settle(self, request_id: str) -> None:
        self.inner.settle(request_id)


class TotalsOnlyLimiter(ForwardingLimiter):
    """A limiter of the plain protocol: it takes no parts (the dispatcher must not pass any)."""

    def can_process(self, estimated_tokens: int) -> Any:  # type: ignore[override]
        return self.inner.can_process(estimated_tokens)

    def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:  # type: ignore[override]
        return self.inner.consume(request_id, estimated_tokens, metadata)

    def adjust_consumption(self, request_id: str, actual_tokens: int) -> None:  # type: ignore[override]
        self.inner.adjust_consumption(request_id, actual_tokens)


Path = tuple[str, str, str]
# (store, limiter, policy): the Rust fast path, the prefetch buffer, the Python limiter path.
PATHS: list[Path] = [
    ("memory", "native", "score"),
    ("memory", "native", "fair_priority"),
    ("reference", "native", "score"),
    ("reference", "native", "fair_priority"),
    ("memory", "forwarding", "score"),
    ("memory", "forwarding", "fair_priority"),
]


def make(clock: ManualClock, path: Path, **config: Any) -> tuple[LLMQueueDispatcher[Any], Any]:
    """A dispatcher and the limiter to pass to it, on `path`."""
    store_kind, limiter_kind, policy = path
    throttle = LLMThrottle(60, 100_000, itpm=10_000, otpm=1_000, clock=clock)
    storage: Any = InMemoryStorage(clock=clock) if store_kind == "memory" else ReferenceStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, policy=policy, **config)
    )
    limiter = throttle if limiter_kind == "native" else ForwardingLimiter(throttle)
    return dispatcher, limiter


def inner(limiter: Any) -> LLMThrottle:
    return limiter if isinstance(limiter, LLMThrottle) else limiter.inner


def parted(
    request_id: str, input_tokens: int, max_output: int, priority: Priority = Priority.NORMAL
) -> LLMRequest[Any]:
    return LLMRequest(request_id, None, priority, TokenInfo(input=input_tokens, max_output=max_output))


def levels(limiter: Any) -> tuple[float, float, float]:
    """What the tpm, itpm and otpm buckets hold."""
    metrics = inner(limiter).get_metrics()
    assert metrics.itpm is not None
    assert metrics.otpm is not None
    return metrics.tpm.available, metrics.itpm.available, metrics.otpm.available


@pytest.mark.parametrize("path", PATHS, ids="-".join)
async def test_a_reservation_takes_the_input_from_itpm_and_the_output_from_otpm(
    clock: ManualClock, path: Path
) -> None:
    dispatcher, limiter = make(clock, path)
    # More than otpm's whole capacity in total: it fits only by its parts.
    await dispatcher.enqueue(parted("a", 5_000, 800))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "a"
    assert levels(limiter) == pytest.approx((94_200, 5_000, 200))
    await dispatcher.close()


@pytest.mark.parametrize("path", PATHS, ids="-".join)
async def test_a_request_fitting_tpm_but_not_itpm_is_held_for_as_long_as_itpm_needs(
    clock: ManualClock, path: Path
) -> None:
    dispatcher, limiter = make(clock, path)
    assert inner(limiter).consume("earlier", 7_000, input_tokens=7_000, output_tokens=0)
    # 3 000 input tokens are left; the URGENT winner needs 6 000: held 3 000 / (10 000/60) s.
    await dispatcher.enqueue(parted("big", 6_000, 100, Priority.URGENT))
    await dispatcher.enqueue(parted("small", 1_000, 100, Priority.LOW))
    assert await dispatcher.dequeue(limiter) is None  # nothing below the held winner goes
    clock.advance(17.5)
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(0.501)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "big"
    await dispatcher.close()


# A limiter called from Python is ranked against what its `get_metrics()` reports of requests and
# tokens: without holding, its refusal of the winner ends the dequeue (as before parts existed).
@pytest.mark.parametrize("path", [p for p in PATHS if p[1] == "native"], ids="-".join)
async def test_without_holding_the_request_that_fits_every_limit_goes_first(
    clock: ManualClock, path: Path
) -> None:
    dispatcher, limiter = make(clock, path, hold_budget=False)
    assert inner(limiter).consume("earlier", 7_000, input_tokens=7_000, output_tokens=0)
    await dispatcher.enqueue(parted("big", 6_000, 100, Priority.URGENT))
    await dispatcher.enqueue(parted("small", 500, 100, Priority.LOW))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "small"
    await dispatcher.close()


@pytest.mark.parametrize("path", PATHS, ids="-".join)
async def test_the_mark_corrects_each_limit_with_the_actual_input_and_output(
    clock: ManualClock, path: Path
) -> None:
    dispatcher, limiter = make(clock, path)
    await dispatcher.enqueue(parted("a", 5_000, 800))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(input_tokens=4_000, output_tokens=300)
    assert levels(limiter) == pytest.approx((95_700, 6_000, 700))
    [record] = inner(limiter).get_consumption_history()
    assert record.actual_tokens == 4_300
    await dispatcher.close()


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"actual_tokens": 4_300, "input_tokens": 4_000}, (95_700, 6_000, 700)),
        ({"actual_tokens": 4_300, "output_tokens": 300}, (95_700, 6_000, 700)),
        ({"actual_tokens": 4_300, "input_tokens": 4_000, "output_tokens": 300}, (95_700, 6_000, 700)),
        # The total alone: the input limit counts all of it, the output limit up to what was reserved.
        ({"actual_tokens": 4_300}, (95_700, 5_700, 200)),
    ],
)
async def test_the_total_with_one_part_takes_the_other_as_the_rest(
    clock: ManualClock, counts: dict[str, int], expected: tuple[float, float, float]
) -> None:
    dispatcher, limiter = make(clock, ("memory", "native", "score"))
    await dispatcher.enqueue(parted("a", 5_000, 800))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(**counts)
    assert levels(limiter) == pytest.approx(expected)
    await dispatcher.close()


@pytest.mark.parametrize("path", PATHS, ids="-".join)
@pytest.mark.parametrize(
    "counts",
    [
        {"input_tokens": -1, "output_tokens": 3},
        {"input_tokens": 10},
        {"output_tokens": 10},
        {"actual_tokens": 100, "input_tokens": 60, "output_tokens": 50},
        {"actual_tokens": 100, "input_tokens": 101},
        {"input_tokens": 1.5, "output_tokens": 3},
        {"input_tokens": True, "output_tokens": 3},
        {"input_tokens": "7", "output_tokens": 3},
    ],
)
async def test_bad_counts_are_refused_and_mark_nothing(
    clock: ManualClock, path: Path, counts: dict[str, Any]
) -> None:
    dispatcher, limiter = make(clock, path)
    await dispatcher.enqueue(parted("a", 5_000, 800))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    before = levels(limiter)
    with pytest.raises(InvalidRequestError):
        await job.mark_as_processed(**counts)
    assert not job.settled
    assert levels(limiter) == before
    await job.mark_as_processed(input_tokens=1_000, output_tokens=10)  # still markable
    assert levels(limiter) == pytest.approx((98_990, 9_000, 990))
    await dispatcher.close()


@pytest.mark.parametrize("path", PATHS, ids="-".join)
async def test_a_mark_without_counts_settles_the_reservation_as_it_is(clock: ManualClock, path: Path) -> None:
    store_kind, limiter_kind, policy = path
    throttle = LLMThrottle(60, 100_000, itpm=10_000, otpm=1_000, max_concurrent=1, clock=clock)
    storage: Any = InMemoryStorage(clock=clock) if store_kind == "memory" else ReferenceStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, policy=policy)
    )
    limiter: Any = throttle if limiter_kind == "native" else ForwardingLimiter(throttle)
    await dispatcher.enqueue(parted("a", 5_000, 800))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await dispatcher.enqueue(parted("b", 100, 10))
    assert await dispatcher.dequeue(limiter) is None  # the one slot is taken
    await job.mark_as_processed()
    assert levels(limiter) == pytest.approx((94_200 - 0, 5_000, 200))
    second = await dispatcher.dequeue(limiter)  # the slot is free again
    assert second is not None
    assert second.message.payload.id == "b"
    await dispatcher.close()


async def test_a_limiter_of_the_plain_protocol_is_called_with_the_totals(clock: ManualClock) -> None:
    throttle = LLMThrottle(60, 100_000, clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(clock=clock), LLMQueueDispatcherConfig(clock=clock)
    )
    limiter = TotalsOnlyLimiter(throttle)
    await dispatcher.enqueue(parted("a", 500, 80))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(input_tokens=400, output_tokens=30)
    assert throttle.get_metrics().tpm.available == pytest.approx(99_570)
    await dispatcher.close()


# ----- the books of every limit ---------------------------------------------------------------

MARK = st.sampled_from(["parts", "total", "none", "failed", "release"])
JOBS = st.lists(
    st.tuples(st.integers(0, 3_000), st.integers(0, 400), MARK, st.integers(0, 3_000), st.integers(0, 400)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(jobs=JOBS, path=st.sampled_from(PATHS))
def test_reservations_and_marks_by_parts_keep_every_limit_s_books(
    jobs: list[tuple[int, int, str, int, int]], path: Path
) -> None:
    """Each request's reservation is used (corrected to what its mark says) or given back
    whole; on a clock that does not move, every limit then holds its capacity less exactly what
    was used: the input on itpm, the output on otpm, their sum on tpm."""

    async def scenario() -> None:
        clock = ManualClock(10_000.0)
        store_kind, limiter_kind, policy = path
        throttle = LLMThrottle(1_000, 1_000_000, itpm=100_000, otpm=10_000, max_concurrent=50, clock=clock)
        storage: Any = (
            InMemoryStorage(clock=clock) if store_kind == "memory" else ReferenceStorage(clock=clock)
        )
        dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
            storage, LLMQueueDispatcherConfig(clock=clock, policy=policy)
        )
        limiter: Any = throttle if limiter_kind == "native" else ForwardingLimiter(throttle)
        for i, (input_tokens, max_output, *_) in enumerate(jobs):
            await dispatcher.enqueue(parted(f"r{i}", input_tokens, max_output))
        used = [0, 0]  # input, output
        handed = []
        while (job := await dispatcher.dequeue(limiter)) is not None:
            handed.append(job)
        assert len(handed) == len(jobs)
        for job in handed:
            i = int(job.message.payload.id[1:])
            input_tokens, max_output, mark, actual_in, actual_out = jobs[i]
            if mark == "parts":
                await job.mark_as_processed(input_tokens=actual_in, output_tokens=actual_out)
                used[0] += actual_in
                used[1] += actual_out
            elif mark == "total":
                await job.mark_as_processed(actual_in + actual_out, input_tokens=actual_in)
                used[0] += actual_in
                used[1] += actual_out
            elif mark == "none":
                await job.mark_as_processed()
                used[0] += input_tokens
                used[1] += max_output
            elif mark == "failed":
                await job.mark_as_failed(RuntimeError("x"))
            else:
                await job.release()
        metrics = throttle.get_metrics()
        assert metrics.itpm is not None
        assert metrics.otpm is not None
        assert metrics.itpm.available == pytest.approx(100_000 - used[0])
        assert metrics.otpm.available == pytest.approx(10_000 - used[1])
        assert metrics.tpm.available == pytest.approx(1_000_000 - used[0] - used[1])
        assert metrics.compensation.total_debt == 0
        assert throttle.validate_state()
        await dispatcher.close()

    asyncio.run(scenario())
