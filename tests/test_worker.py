"""Worker: concurrency, settling, retries with backoff, dead letters, leases, graceful stop,
cancellation and signals, against the in-memory dispatcher and `LLMThrottle`."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidConfigError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    PermanentError,
    ProcessableMessage,
    RetryableError,
    TokenInfo,
    Worker,
    create_in_memory_queue,
)
from llm_queue_dispatcher.worker import backoff_delay


async def fill(dispatcher: LLMQueueDispatcher[Any], count: int, tokens: int = 100) -> list[str]:
    ids = [f"r{n}" for n in range(count)]
    for request_id in ids:
        await dispatcher.enqueue(LLMRequest(request_id, {"n": request_id}, token_info=TokenInfo(tokens)))
    return ids


def roomy_limiter() -> LLMThrottle:
    return LLMThrottle(60_000, 100_000_000)


async def noop(job: ProcessableMessage[Any]) -> int | None:
    return None


def test_constructor_validates_every_argument() -> None:
    dispatcher = create_in_memory_queue()
    limiter = roomy_limiter()
    with pytest.raises(InvalidConfigError, match="dispatcher"):
        Worker(object(), limiter, noop)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="limiter"):
        Worker(dispatcher, object(), noop)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="handler"):
        Worker(dispatcher, limiter, 3)  # type: ignore[arg-type]
    for bad in (0, -1, True, 2.0, "4"):
        with pytest.raises(InvalidConfigError, match="concurrency"):
            Worker(dispatcher, limiter, noop, concurrency=bad)  # type: ignore[arg-type]
    for bad in (-1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(InvalidConfigError, match="shutdown_grace"):
            Worker(dispatcher, limiter, noop, shutdown_grace=bad)  # type: ignore[arg-type]
    for bad in (-1.0, math.inf, 43_201.0):
        with pytest.raises(InvalidConfigError, match="max_retry_delay"):
            Worker(dispatcher, limiter, noop, max_retry_delay=bad)
    with pytest.raises(InvalidConfigError, match="retry_base_delay"):
        Worker(dispatcher, limiter, noop, retry_base_delay=0.0)
    with pytest.raises(InvalidConfigError, match="rng"):
        Worker(dispatcher, limiter, noop, rng=7)  # type: ignore[arg-type]
    worker = Worker(dispatcher, limiter, noop, concurrency=1, shutdown_grace=0, max_retry_delay=0)
    assert worker.concurrency == 1
    assert worker.stats.processed == 0


async def test_concurrency_bound_and_each_message_handled_once() -> None:
    dispatcher = create_in_memory_queue()
    ids = await fill(dispatcher, 40)
    running = 0
    peak = 0
    handled: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        handled[job.message.payload.id] += 1
        return 70

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, handle, concurrency=4, handle_signals=False)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert peak == 4
    assert handled == Counter({request_id: 1 for request_id in ids})
    assert stats.processed == 40
    assert stats.tokens == 40 * 70
    assert stats.in_flight == 0
    # The returned counts reached the limiter: every record adjusted to 70 actual tokens.
    assert {record.actual_tokens for record in limiter.get_consumption_history()} == {70}
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_retryable_error_waits_its_retry_after_and_keeps_the_receive_count() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    attempts: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    async def handle(job: ProcessableMessage[Any]) -> int:
        attempts.append((job.message.attributes.receive_count, loop.time()))
        if len(attempts) < 3:
            raise RetryableError("provider busy", retry_after=0.15)
        return 10

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, handle, handle_signals=False)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert [count for count, _ in attempts] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    assert all(0.14 <= gap < 1.0 for gap in gaps), gaps
    assert (stats.processed, stats.retried, stats.dead_lettered) == (1, 2, 0)
    # The failed attempts gave their tokens back: only the successful one counts.
    assert limiter.get_metrics().consumption_history.total_tokens == 10


async def test_plain_exception_backs_off_with_jitter_bounded_by_max_retry_delay() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    delays: list[float] = []
    worker: Worker[Any]

    async def handle(job: ProcessableMessage[Any]) -> int:
        if job.message.attributes.receive_count < 4:
            raise RuntimeError("boom")
        return 1

    class Recording(Worker[Any]):
        def retry_delay(self, job: ProcessableMessage[Any], error: BaseException) -> float:
            delay = super().retry_delay(job, error)
            delays.append(delay)
            return delay

    worker = Recording(
        dispatcher, roomy_limiter(), handle, retry_base_delay=0.01, max_retry_delay=0.03, handle_signals=False
    )
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert stats.retried == 3
    assert stats.processed == 1
    ceilings = [0.01, 0.02, 0.03]  # base * 2 ** (attempt - 1), capped at 0.03
    assert all(0.0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True)), delays


def test_backoff_delay_is_full_jitter_under_the_exponential_ceiling() -> None:
    rng = random.Random(12)
    for attempt in range(1, 40):
        ceiling = min(300.0, 2.0 ** (attempt - 1))
        samples = [backoff_delay(attempt, base=1.0, cap=300.0, rng=rng) for _ in range(400)]
        assert all(0.0 <= sample <= ceiling for sample in samples)
        # Spread over the whole interval, not clustered at its top (full jitter).
        assert min(samples) < 0.1 * ceiling
        assert max(samples) > 0.9 * ceiling
    assert backoff_delay(10_000, base=1.0, cap=5.0, rng=rng) <= 5.0  # no overflow
    worker = Worker(create_in_memory_queue(), roomy_limiter(), noop, max_retry_delay=7.0, rng=rng)
    assert worker.max_retry_delay == 7.0


async def test_retry_after_of_a_retryable_error_wins_over_backoff_and_bad_values_fall_back() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    job = await dispatcher.dequeue(roomy_limiter())
    assert job is not None
    worker = Worker(dispatcher, roomy_limiter(), noop, max_retry_delay=2.0, rng=random.Random(1))
    assert worker.retry_delay(job, RetryableError("x", retry_after=45.0)) == 45.0
    assert worker.retry_delay(job, RetryableError("x", retry_after=1e9)) == 43_200.0
    for bad in (math.nan, -3.0, None):
        assert 0.0 <= worker.retry_delay(job, RetryableError("x", retry_after=bad)) <= 1.0
    await job.mark_as_processed()


async def test_permanent_error_dead_letters_at_once() -> None:
    dead = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(dead_letter=dead))
    await fill(dispatcher, 3)
    calls: Counter[str] = Counter()

    async def handle(job: ProcessableMessage[Any]) -> int:
        calls[job.message.payload.id] += 1
        if job.message.payload.id == "r1":
            raise PermanentError("400: invalid model")
        return 5

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, handle, handle_signals=False)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert calls["r1"] == 1
    assert (stats.processed, stats.dead_lettered, stats.retried) == (2, 1, 0)
    [moved] = await dead.dequeue(10, 30.0)
    assert moved.payload.id == "r1"
    assert limiter.get_metrics().consumption_history.total_tokens == 10  # r1's reservation refunded


async def test_a_bad_handler_result_is_processed_with_its_estimate() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1, tokens=40)

    async def handle(job: ProcessableMessage[Any]) -> Any:
        return "lots"

    worker = Worker(dispatcher, roomy_limiter(), handle, handle_signals=False)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert (stats.processed, stats.tokens) == (1, 40)


async def test_a_handler_that_marks_its_own_job_is_not_marked_twice() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 2)

    async def handle(job: ProcessableMessage[Any]) -> int:
        await job.mark_as_processed(actual_tokens=3)
        return 3

    worker = Worker(dispatcher, roomy_limiter(), handle, handle_signals=False)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 10)
    assert stats.processed == 2
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_slow_handler_keeps_its_message_leased() -> None:
    storage: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=0.2)
    )
    await fill(dispatcher, 1)
    started = asyncio.Event()
    calls = 0

    async def slow(job: ProcessableMessage[Any]) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0.9)  # 4.5 times the visibility
        return 1

    worker = Worker(dispatcher, roomy_limiter(), slow, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    await started.wait()
    # A second consumer on the same store (another worker's dispatcher) sees nothing meanwhile.
    other: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    assert await other.dequeue(roomy_limiter(), timeout=0.7) is None
    await asyncio.sleep(0.4)
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert calls == 1
    assert stats.processed == 1


async def test_without_heartbeat_the_message_would_have_been_redelivered() -> None:
    # The control of the test above: the same slow call without a worker loses its lease.
    storage: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(visibility_timeout=0.2)
    )
    await fill(dispatcher, 1)
    assert await dispatcher.dequeue(roomy_limiter()) is not None
    other: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    assert await other.dequeue(roomy_limiter(), timeout=0.7) is not None


async def test_stop_waits_for_running_handlers_within_the_grace() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 3)
    started = 0

    async def handle(job: ProcessableMessage[Any]) -> int:
        nonlocal started
        started += 1
        await asyncio.sleep(0.3)
        return 1

    worker = Worker(
        dispatcher, roomy_limiter(), handle, concurrency=2, shutdown_grace=5.0, handle_signals=False
    )
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    begun = time.monotonic()
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert time.monotonic() - begun < 1.0
    assert started == 2  # no new dequeue after stop
    assert (stats.processed, stats.released) == (2, 0)
    queue = (await dispatcher.get_queue_metrics()).queue
    assert (queue.approximate_number_of_messages, queue.approximate_number_of_messages_in_flight) == (1, 0)


async def test_past_the_grace_handlers_are_cancelled_and_their_messages_released_at_once() -> None:
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await fill(dispatcher, 2, tokens=500)
    cancelled = 0

    async def stuck(job: ProcessableMessage[Any]) -> int:
        nonlocal cancelled
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return 1

    limiter = LLMThrottle(60_000, 1_000_000)
    worker = Worker(dispatcher, limiter, stuck, concurrency=2, shutdown_grace=0.2, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    begun = time.monotonic()
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert 0.2 <= time.monotonic() - begun < 1.0
    assert cancelled == 2
    assert stats.released == 2
    # Reservations released whole: their requests too, not only their tokens.
    assert limiter.get_metrics().consumption_history.total_tokens == 0
    assert limiter.get_metrics().consumption_history.count == 0
    # Visible at once for the next worker, the stopped receive undone: this is their first.
    again = [await dispatcher.dequeue(limiter) for _ in range(2)]
    assert sorted(job.message.payload.id for job in again if job) == ["r0", "r1"]
    assert {job.message.attributes.receive_count for job in again if job} == {1}


async def test_a_handler_that_swallows_cancellation_still_has_its_message_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("llm_queue_dispatcher.worker._CANCEL_WAIT", 0.1)
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await fill(dispatcher, 1)
    release_it = asyncio.Event()

    async def stubborn(job: ProcessableMessage[Any]) -> int:
        while not release_it.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await release_it.wait()
        return 1

    worker = Worker(dispatcher, roomy_limiter(), stubborn, shutdown_grace=0.05, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.05)
    worker.stop()
    stats = await asyncio.wait_for(run, 5)
    assert stats.released == 1
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 1
    release_it.set()
    await asyncio.sleep(0.05)  # its late mark finds the message already released
    assert (await dispatcher.get_queue_metrics()).queue.approximate_number_of_messages == 1


async def test_cancelling_run_releases_everything_it_held() -> None:
    dispatcher = create_in_memory_queue(visibility_timeout=600.0)
    await fill(dispatcher, 5, tokens=1_000)

    async def slow(job: ProcessableMessage[Any]) -> int:
        await asyncio.sleep(60)
        return 1

    limiter = LLMThrottle(60_000, 1_000_000)
    worker = Worker(dispatcher, limiter, slow, concurrency=3, shutdown_grace=30.0, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    assert worker.stats.in_flight == 3
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert worker.stats.released == 3
    assert not worker.running
    queue = (await dispatcher.get_queue_metrics()).queue
    assert (queue.approximate_number_of_messages, queue.approximate_number_of_messages_in_flight) == (5, 0)
    assert limiter.get_metrics().consumption_history.total_tokens == 0


async def test_idle_worker_sleeps_instead_of_polling() -> None:
    class Counting(LLMQueueDispatcher[Any]):
        calls = 0

        async def dequeue(self, rate_limiter: Any, *, timeout: float | None = None) -> Any:
            Counting.calls += 1
            return await super().dequeue(rate_limiter, timeout=timeout)

    dispatcher = Counting(InMemoryStorage())
    # The budget is spent: one request per minute, already taken.
    limiter = LLMThrottle(1, 1_000_000)
    assert limiter.consume("earlier", 1)
    await fill(dispatcher, 1)
    worker = Worker(dispatcher, limiter, noop, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    cpu = time.process_time()
    await asyncio.sleep(0.5)
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert Counting.calls == 1
    assert time.process_time() - cpu < 0.2
    # An empty queue: the same.
    Counting.calls = 0
    await dispatcher.purge()
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.3)
    worker.stop()
    await asyncio.wait_for(run, 5)
    assert Counting.calls == 1


async def test_a_new_message_wakes_an_idle_worker_at_once() -> None:
    dispatcher = create_in_memory_queue()
    done = asyncio.Event()

    async def handle(job: ProcessableMessage[Any]) -> int:
        done.set()
        return 1

    worker = Worker(dispatcher, roomy_limiter(), handle, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.1)
    begun = time.monotonic()
    await fill(dispatcher, 1)
    await asyncio.wait_for(done.wait(), 2)
    assert time.monotonic() - begun < 0.5  # woken by the enqueue, not by the 30 s idle timeout
    worker.stop()
    await asyncio.wait_for(run, 5)


async def test_stop_before_run_returns_at_once_and_run_twice_is_refused() -> None:
    dispatcher = create_in_memory_queue()
    await fill(dispatcher, 1)
    worker = Worker(dispatcher, roomy_limiter(), noop, handle_signals=False)
    worker.stop()
    stats = await asyncio.wait_for(worker.run(), 2)
    assert stats.processed == 0
    run = asyncio.ensure_future(worker.run(stop_when_empty=True))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        await worker.run()
    stats = await asyncio.wait_for(run, 5)
    assert stats.processed == 1


async def test_a_failing_dequeue_stops_the_worker_gracefully_and_propagates() -> None:
    def broken(message: Any, context: Any) -> float:
        raise ZeroDivisionError("scorer bug")

    from llm_queue_dispatcher import CustomScorer, ScoringConfig

    dispatcher = create_in_memory_queue(
        scoring=ScoringConfig(custom_scorers=[CustomScorer("bug", 0.1, broken)])
    )
    await fill(dispatcher, 1)
    worker = Worker(dispatcher, roomy_limiter(), noop, handle_signals=False)
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(worker.run(), 5)
    assert not worker.running


_SIGNAL_SCRIPT = """
import asyncio, os, signal, sys, time
from llm_queue_dispatcher import LLMRequest, LLMThrottle, TokenInfo, Worker, create_in_memory_queue

SIG = getattr(signal, sys.argv[1])

async def main():
    dispatcher = create_in_memory_queue()
    for n in range(4):
        await dispatcher.enqueue(LLMRequest(f"r{n}", n, token_info=TokenInfo(10)))
    started = asyncio.Event()
    async def handle(job):
        started.set()
        await asyncio.sleep(float(sys.argv[2]))
        return 1
    worker = Worker(dispatcher, LLMThrottle(6000, 1e6), handle, concurrency=2, shutdown_grace=0.5)
    before = signal.getsignal(SIG)
    run = asyncio.ensure_future(worker.run())
    await started.wait()
    os.kill(os.getpid(), SIG)
    stats = await asyncio.wait_for(run, 5)
    assert signal.getsignal(SIG) is before, (signal.getsignal(SIG), before)
    queue = (await dispatcher.get_queue_metrics()).queue
    print(worker.stop_signal.name, stats.processed, stats.released, queue.approximate_number_of_messages,
          queue.approximate_number_of_messages_in_flight)

asyncio.run(main())
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signals_stop_gracefully_and_the_previous_handlers_come_back(name: str) -> None:
    # In a child process: a signal the worker failed to catch would kill the test runner.
    fast = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_SCRIPT), name, "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fast.returncode == 0, fast.stderr
    # Both running handlers finished within the grace; the two others were never taken.
    assert fast.stdout.split() == [name, "2", "0", "2", "0"]
    slow = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SIGNAL_SCRIPT), name, "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert slow.returncode == 0, slow.stderr
    # Past the grace: both released, all four visible again.
    assert slow.stdout.split() == [name, "0", "2", "4", "0"]


def test_worker_signal_handlers_are_only_installed_in_the_main_thread() -> None:
    result: list[object] = []

    def in_thread() -> None:
        async def main() -> None:
            dispatcher = create_in_memory_queue()
            worker = Worker(dispatcher, roomy_limiter(), noop)
            run = asyncio.ensure_future(worker.run())
            await asyncio.sleep(0.05)
            worker.stop()
            result.append(await run)

        asyncio.run(main())

    import threading

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert result
    assert signal.getsignal(signal.SIGTERM) is before


async def test_stop_when_empty_also_notices_a_message_the_store_dead_lettered() -> None:
    dead = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(max_receive_count=1, dead_letter=dead)
    )
    await fill(dispatcher, 1)

    async def failing(job: ProcessableMessage[Any]) -> int:
        raise RuntimeError("always")

    worker = Worker(dispatcher, roomy_limiter(), failing, retry_base_delay=0.01, handle_signals=False)
    begun = time.monotonic()
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 5)
    assert time.monotonic() - begun < 2.5  # within one idle check after the expiry
    assert stats.retried == 1
    assert (await dead.get_queue_attributes()).approximate_number_of_messages == 1


class ExternalStore(InMemoryStorage[Any]):
    """An `InMemoryStorage` the dispatcher must treat as an external store (leased ahead into
    a prefetch buffer): a subclass is not driven through the in-memory core."""


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_stopping_gives_back_the_messages_leased_ahead_into_the_buffer(how: str) -> None:
    store = ExternalStore()
    config = LLMQueueDispatcherConfig(visibility_timeout=600.0, buffer_size=10, enable_prefetch=True)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    assert dispatcher._prefetch is not None  # the premise: a prefetch buffer
    await fill(dispatcher, 20)
    handled: list[str] = []

    async def slow(job: ProcessableMessage[Any]) -> int | None:
        handled.append(job.message.payload.id)
        await asyncio.sleep(60)
        return None

    limiter = roomy_limiter()
    worker = Worker(dispatcher, limiter, slow, concurrency=2, shutdown_grace=0.0, handle_signals=False)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.2)
    assert len(handled) == 2
    assert (await store.get_queue_attributes()).approximate_number_of_messages < 18  # leased ahead
    if how == "stop":
        worker.stop()
        await run
    else:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    queue = await store.get_queue_attributes()
    # The two handled ones are released too: all 20 are visible to another worker at once.
    assert (queue.approximate_number_of_messages, queue.approximate_number_of_messages_in_flight) == (20, 0)
