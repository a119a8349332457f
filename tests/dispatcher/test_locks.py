"""No Python code runs while a Rust lock is held.

Each scenario runs in a child interpreter with a timeout (`run_isolated`): a deadlock hangs the
process for good, so a hang fails the test instead of hanging the run. Every scenario prints
"done" at its end; the child's exit code and output prove it finished.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.dispatcher.books import run_isolated

PRELUDE = """
import asyncio, gc, sys, threading, time
from llm_queue_dispatcher import (
    InMemoryStorage, LLMQueueDispatcher, LLMQueueDispatcherConfig, LLMRequest, LLMThrottle,
    ManualClock, ScoringConfig, CustomScorer, TokenInfo, create_in_memory_queue,
)
sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show at once
"""


def assert_done(code: str) -> None:
    result = run_isolated(PRELUDE + textwrap.dedent(code))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1:] == ["done"], result.stdout + result.stderr


def test_two_threads_dispatching_and_checking_with_a_python_store_clock() -> None:
    """One thread dispatches (`dequeue` in its own `asyncio.run`) over an
    `InMemoryStorage(clock=lambda: time.time())`, another calls `limiter.can_process` in a loop:
    the old fused dispatch called the store clock under the limiter's lock and hung every time."""
    assert_done(
        """
        limiter = LLMThrottle(1e9, 1e12)
        storage = InMemoryStorage(clock=lambda: time.time())
        dispatcher = LLMQueueDispatcher(storage)
        stop = threading.Event()

        def check():
            while not stop.is_set():
                limiter.can_process(10)

        async def cycle(i):
            await dispatcher.enqueue(LLMRequest(f"r{i}", None, token_info=TokenInfo(10)))
            job = await dispatcher.dequeue(limiter)
            assert job is not None
            await job.mark_as_processed(actual_tokens=5)

        def dispatch():
            for i in range(300):
                asyncio.run(cycle(i))
            stop.set()

        threads = [threading.Thread(target=check), threading.Thread(target=check),
                   threading.Thread(target=dispatch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("done")
        """
    )


def test_threads_calling_the_core_dispatch_step_with_python_clocks() -> None:
    """Several threads call the core's dispatch step and the limiter at once, the
    store and the limiter both on Python callable clocks."""
    assert_done(
        """
        limiter = LLMThrottle(1e9, 1e12, clock=lambda: time.monotonic())
        storage = InMemoryStorage(clock=lambda: time.time())
        core = storage.core
        for i in range(2_000):
            core.enqueue(LLMRequest(f"r{i}", None, token_info=TokenInfo(i % 50)))
        config = LLMQueueDispatcherConfig(min_score_threshold=-1.0)
        dispatch_core = LLMQueueDispatcher(storage, config)._core
        taken = []

        def dispatch():
            while True:
                picked = dispatch_core.dispatch(limiter)
                if picked is None:
                    return
                taken.append(picked.message.payload.id)
                limiter.get_metrics()

        def check():
            for _ in range(3_000):
                limiter.can_process(5)
                core.visible_count()

        threads = [threading.Thread(target=dispatch) for _ in range(3)]
        threads += [threading.Thread(target=check) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(taken) == len(set(taken)) == 2_000, len(taken)
        assert core.in_flight_count() == 2_000
        assert limiter.get_metrics().consumption_history.count == 2_000
        print("done")
        """
    )


def test_a_store_clock_that_reads_the_limiter() -> None:
    """The store's clock is Python code that takes the limiter's lock; the old fused
    dispatch called it with that lock held (a self-deadlock on one thread)."""
    assert_done(
        """
        limiter = LLMThrottle(6_000, 1e9)

        def clock():
            limiter.can_process(1)
            return time.time()

        dispatcher = LLMQueueDispatcher(InMemoryStorage(clock=clock))

        async def main():
            for i in range(20):
                await dispatcher.enqueue(LLMRequest(f"r{i}", None, token_info=TokenInfo(10)))
                job = await dispatcher.dequeue(limiter)
                assert job is not None
                await job.mark_as_processed()

        asyncio.run(main())
        print("done")
        """
    )


def test_a_clock_reading_whose_finalizer_reads_the_limiter() -> None:
    """A clock returns a float subclass whose `__del__` takes the limiter's lock; the
    reading must be released with no lock held."""
    assert_done(
        """
        limiter = LLMThrottle(6_000, 1e9)
        finalized = []

        class Reading(float):
            def __del__(self):
                limiter.can_process(1)
                finalized.append(1)

        store_clock = ManualClock(1_000.0)
        dispatcher = LLMQueueDispatcher(InMemoryStorage(clock=lambda: Reading(store_clock.now())))
        limiter_clock = ManualClock(0.0)
        native = LLMThrottle(6_000, 1e9, clock=lambda: Reading(limiter_clock.now()))

        async def main():
            for i in range(10):
                await dispatcher.enqueue(LLMRequest(f"r{i}", None, token_info=TokenInfo(10)))
                for throttle in (limiter, native):
                    job = await dispatcher.dequeue(throttle)
                    if job is not None:
                        await job.mark_as_failed(RuntimeError("x"))

        asyncio.run(main())
        assert finalized
        print("done")
        """
    )


@pytest.mark.parametrize("reentry", ["limiter", "store"])
def test_a_payload_finalizer_run_by_the_store(reentry: str) -> None:
    """Payloads the store releases (dropped by retention during a dispatch, purged,
    deleted) have a `__del__` that takes the limiter's lock, or re-enters the store itself; the
    old store released them under its locks and hung."""
    assert_done(
        f"""
        reentry = {reentry!r}
        store_clock = ManualClock(1_000.0)
        limiter = LLMThrottle(6_000, 1e9, clock=ManualClock())
        storage = InMemoryStorage(clock=store_clock, message_retention=10.0)
        finalized = []

        class Payload:
            def __del__(self):
                if reentry == "limiter":
                    limiter.can_process(1)
                else:
                    storage.core.visible_count()
                    storage.core.attributes()
                finalized.append(1)

        dispatcher = LLMQueueDispatcher(storage)

        async def main():
            # Dropped by retention inside the dispatch step (the store holds the last reference).
            await dispatcher.enqueue(LLMRequest("old", Payload(), token_info=TokenInfo(10)))
            store_clock.advance(11.0)
            await dispatcher.enqueue(LLMRequest("new", None, token_info=TokenInfo(10)))
            job = await dispatcher.dequeue(limiter)
            assert job is not None and job.message.payload.id == "new"
            assert len(finalized) == 1, finalized
            await job.mark_as_processed()
            # Purged.
            await dispatcher.enqueue(LLMRequest("purged", Payload(), token_info=TokenInfo(10)))
            await dispatcher.purge()
            assert len(finalized) == 2, finalized
            # Deleted by a mark: the job's reference goes with it.
            await dispatcher.enqueue(LLMRequest("deleted", Payload(), token_info=TokenInfo(10)))
            job = await dispatcher.dequeue(limiter)
            await job.mark_as_processed()
            del job
            gc.collect()
            assert len(finalized) == 3, finalized

        asyncio.run(main())
        print("done")
        """
    )


def test_a_custom_scorer_that_reads_the_limiter_and_the_store_from_threads() -> None:
    """Custom scorers are Python code: they run with no lock held, so one that reads
    the limiter and the store, while other threads do too, cannot hang the dispatch."""
    assert_done(
        """
        limiter = LLMThrottle(1e9, 1e12)
        storage = InMemoryStorage(clock=lambda: time.time())

        def score(message, context):
            limiter.can_process(1)
            storage.core.visible_count()
            return 0.5

        dispatcher = create_in_memory_queue(
            scoring=ScoringConfig(custom_scorers=[CustomScorer("probe", 0.2, score)])
        )
        dispatcher = LLMQueueDispatcher(storage, dispatcher.config)
        stop = threading.Event()

        def check():
            while not stop.is_set():
                limiter.can_process(10)
                storage.core.in_flight_count()

        async def run():
            for i in range(100):
                await dispatcher.enqueue(LLMRequest(f"r{i}", None, token_info=TokenInfo(10)))
            for _ in range(100):
                job = await dispatcher.dequeue(limiter)
                assert job is not None
                await job.mark_as_processed()

        def dispatch():
            asyncio.run(run())
            stop.set()

        threads = [threading.Thread(target=check), threading.Thread(target=dispatch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("done")
        """
    )


def test_a_refused_batch_releases_its_payloads_with_no_lock_held() -> None:
    """A batch refused whole (an id repeated) drops its payloads; one whose
    `__del__` re-enters the store must find it unlocked."""
    assert_done(
        """
        storage = InMemoryStorage()
        finalized = []

        class Payload:
            def __del__(self):
                storage.core.visible_count()
                finalized.append(1)

        # A generator: once read, the core holds the payloads' last references.
        try:
            storage.core.enqueue_batch(LLMRequest("a", Payload()) for _ in range(2))
        except Exception as error:
            assert type(error).__name__ == "DuplicateRequestError", error
        else:
            raise AssertionError("a repeated id was accepted")
        gc.collect()
        assert len(finalized) == 2, finalized
        assert storage.core.visible_count() == 0
        print("done")
        """
    )
