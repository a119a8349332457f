"""The public dispatcher over `RedisStorage` and `RedisThrottle`: the prefetch buffer leases,
renews and releases; budget is reserved in the shared limiter, adjusted and refunded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    Priority,
    ScoringConfig,
    TokenInfo,
)
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from tests.redis.conftest import fresh_name
from tests.redis.support import RedisStorageAnHourAhead, an_hour_ahead

# A custom scorer keeps the per-process prefetch buffer (the score policy without one ranks in
# Redis: tests/redis/test_global_score.py).
BUFFERED = ScoringConfig(custom_scorers=[CustomScorer("none", 0.0, lambda message, context: 0.0)])


@pytest.fixture
async def storage(redis_url: str) -> AsyncIterator[RedisStorage[Any]]:
    async with RedisStorage(redis_url, fresh_name("dispatch")) as queue:
        yield queue


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[RedisThrottle]:
    # Slow refills (6 requests, 60 tokens a minute; bursts of 60 and 10,000): what a dispatch
    # took shows for seconds, however loaded the machine.
    async with RedisThrottle(
        redis_url, fresh_name("dispatch"), rpm=6, tpm=60, burst_rpm=60, burst_tpm=10_000
    ) as shared:
        yield shared


async def counts(storage: RedisStorage[Any]) -> tuple[int, int]:
    attributes = await storage.get_queue_attributes()
    return attributes.approximate_number_of_messages, attributes.approximate_number_of_messages_in_flight


async def test_the_buffer_leases_renews_and_releases(
    storage: RedisStorage[Any], limiter: RedisThrottle
) -> None:
    await storage.batch_enqueue([LLMRequest(f"m{i}", {"i": i}, token_info=TokenInfo(100)) for i in range(8)])
    config = LLMQueueDispatcherConfig(
        buffer_size=5, visibility_timeout=0.6, enable_prefetch=True, prefetch_interval=0.2, scoring=BUFFERED
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is None
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await asyncio.sleep(0.05)  # the buffer is topped up in the background
    # Five buffered (never more: two fills do not overshoot) and one handed out.
    assert await counts(storage) == (2, 6)
    await asyncio.sleep(1.5)  # more than twice the visibility: the prefetch loop renewed the leases
    # ... of the buffered messages; the one handed out is its handler's to extend, and it was not.
    assert await counts(storage) == (3, 5)
    await job.mark_as_processed(actual_tokens=40)
    await dispatcher.close()  # the four still buffered go back at once
    assert await counts(storage) == (7, 0)


async def test_a_dispatcher_whose_host_clock_is_an_hour_off_sees_the_same_waits(redis_url: str) -> None:
    """The dispatcher computes ages as its clock's now minus ``enqueued_at``; over Redis both
    are on this host's clock, the instants translated from the server's, so a host an hour ahead
    scores and reports the same waits as one whose clock agrees (and does not, say, rank every
    message as an hour old)."""
    requests = [LLMRequest(f"m{i}", i, token_info=TokenInfo(100)) for i in range(3)]
    async with (
        RedisStorage(redis_url, fresh_name("clock-here")) as here,
        RedisStorageAnHourAhead[Any](redis_url, fresh_name("clock-ahead")) as ahead,
    ):
        await asyncio.gather(here.batch_enqueue(requests), ahead.batch_enqueue(requests))
        await asyncio.sleep(0.3)

        async def dispatch(storage: RedisStorage[Any], clock: Any) -> tuple[float, float, float]:
            config = LLMQueueDispatcherConfig(clock=clock, buffer_size=5)
            async with LLMQueueDispatcher(storage, config) as dispatcher:
                job = await dispatcher.dequeue(LLMThrottle(600, 100_000))
                assert job is not None
                metrics = (await dispatcher.get_queue_metrics()).queue
                await job.mark_as_processed()
                return job.score.breakdown["wait_time"], metrics.average_wait_time, metrics.oldest_message_age

        seen_here, seen_ahead = await asyncio.gather(
            dispatch(here, time.time), dispatch(ahead, an_hour_ahead)
        )
    assert seen_ahead == pytest.approx(seen_here, abs=0.05)
    assert 0.25 < seen_ahead[1] < 5  # waited about 0.3 s, not an hour


async def test_budget_is_reserved_in_the_shared_limiter(
    storage: RedisStorage[Any], limiter: RedisThrottle
) -> None:
    await storage.enqueue(LLMRequest("big", 1, Priority.HIGH, TokenInfo(3_000)))
    await storage.enqueue(LLMRequest("small", 2, Priority.LOW, TokenInfo(500)))
    async with LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(buffer_size=10)) as dispatcher:
        first = await dispatcher.dequeue(limiter)
        assert first is not None
        assert first.message.payload.id == "big"
        metrics = await limiter.get_metrics()
        assert (metrics.rpm.used, metrics.tpm.used) == (
            pytest.approx(1, abs=0.01),
            pytest.approx(3_000, abs=1),
        )
        await first.mark_as_processed(actual_tokens=2_000)  # adjusted down: 1,000 back
        assert (await limiter.get_metrics()).tpm.used == pytest.approx(2_000, abs=5)
        second = await dispatcher.dequeue(limiter)
        assert second is not None
        await second.mark_as_failed(RuntimeError("provider down"))  # its 500 tokens come back
        assert (await limiter.get_metrics()).tpm.used == pytest.approx(2_000, abs=5)
    assert await counts(storage) == (1, 0)


async def test_a_second_process_sees_the_budget_the_first_used(
    redis_url: str, storage: RedisStorage[Any]
) -> None:
    """Two dispatchers (as two processes would) on one queue and one limiter name: the budget one
    of them reserved is gone for the other."""
    name = fresh_name("budget")
    await storage.batch_enqueue([LLMRequest(f"r{i}", i, token_info=TokenInfo(600)) for i in range(3)])
    other_storage: RedisStorage[Any] = RedisStorage(redis_url, storage.queue)
    async with (
        RedisThrottle(redis_url, name, rpm=60, tpm=1_000) as one,
        RedisThrottle(redis_url, name, rpm=60, tpm=1_000) as two,
        LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(buffer_size=1)) as first,
        LLMQueueDispatcher(other_storage, LLMQueueDispatcherConfig(buffer_size=1)) as second,
    ):
        job = await first.dequeue(one)
        assert job is not None
        assert await second.dequeue(two) is None  # 400 tokens left: 600 does not fit
        check = await two.can_process(600)
        assert (check.reason, check.available_in) == ("tpm_limit", pytest.approx(12.0, abs=0.5))
        await job.mark_as_failed(RuntimeError("retry"))  # refunded: the other can go now
        again = await second.dequeue(two)
        assert again is not None
        await again.mark_as_processed()
    await other_storage.aclose()


async def test_a_local_throttle_over_redis_storage_works_too(storage: RedisStorage[Any]) -> None:
    await storage.batch_enqueue([LLMRequest(f"r{i}", i, Priority(i % 4)) for i in range(6)])
    order = []
    async with LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(buffer_size=3)) as dispatcher:
        limiter = LLMThrottle(600, 100_000)
        while (job := await dispatcher.dequeue(limiter)) is not None:
            order.append(job.message.payload.priority)
            await job.mark_as_processed()
    assert len(order) == 6
    assert await counts(storage) == (0, 0)


async def test_a_permanent_failure_dead_letters_at_once(redis_url: str, limiter: RedisThrottle) -> None:
    dead_name = fresh_name("dead")
    async with (
        RedisStorage(redis_url, fresh_name("permanent"), dead_letter=dead_name) as storage,
        RedisStorage(redis_url, dead_name) as dead,
    ):
        request = LLMRequest("doomed", {"bad": True}, token_info=TokenInfo(700))
        await storage.enqueue(request)
        async with LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(buffer_size=5)) as dispatcher:
            job = await dispatcher.dequeue(limiter)
            assert job is not None
            await job.mark_as_dead_lettered(ValueError("the provider refuses this request"))
        assert (await storage.get_queue_attributes()).dead_lettered == 1
        assert await counts(storage) == (0, 0)
        [moved] = await dead.dequeue(1, 30.0)
        assert moved.payload == request
        assert (await limiter.get_metrics()).tpm.used == pytest.approx(0, abs=1)  # tokens refunded


async def test_a_worker_over_redis_storage_and_the_shared_limiter(
    redis_url: str, limiter: RedisThrottle
) -> None:
    """`Worker` with a `RedisThrottle`: every message handled once, a flaky one retried, a hopeless
    one dead-lettered, a slow one kept leased past its visibility timeout, budget settled."""
    from llm_queue_dispatcher import PermanentError, RetryableError, Worker

    dead_name = fresh_name("worker-dead")
    async with (
        RedisStorage(redis_url, fresh_name("worker"), dead_letter=dead_name) as storage,
        RedisStorage(redis_url, dead_name) as dead,
    ):
        await storage.batch_enqueue(
            [LLMRequest(f"w{i}", {"i": i}, token_info=TokenInfo(100)) for i in range(12)]
        )
        attempts: dict[str, int] = {}

        async def handle(job: Any) -> int:
            rid = job.message.payload.id
            attempts[rid] = attempts.get(rid, 0) + 1
            if rid == "w3" and attempts[rid] == 1:
                raise RetryableError("flaky", retry_after=0.0)
            if rid == "w7":
                raise PermanentError("hopeless")
            if rid == "w5":
                await asyncio.sleep(1.0)  # longer than the 0.4 s lease: the worker extends it
            return 60

        config = LLMQueueDispatcherConfig(buffer_size=4, visibility_timeout=0.4)
        async with LLMQueueDispatcher(storage, config) as dispatcher:
            worker = Worker(dispatcher, limiter, handle, concurrency=4, handle_signals=False)
            stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 60)
        assert (stats.processed, stats.dead_lettered) == (11, 1)
        assert attempts == {**{f"w{i}": 1 for i in range(12)}, "w3": 2}  # w5 was never handed out twice
        assert await counts(storage) == (0, 0)
        assert [m.payload.id for m in await dead.dequeue(5, 30.0)] == ["w7"]
        metrics = await limiter.get_metrics()
        assert metrics.consumption_history.total_tokens == 11 * 60  # actual counts; failures refunded


async def test_releasing_a_buffer_against_a_hung_server_costs_one_timeout(private_server: Any) -> None:
    """`close()` (and a stopping Worker) gives every buffered message back at once: a paused
    server costs one client timeout, not one per message."""
    async with RedisStorage(private_server.url + "?socket_timeout=0.5", fresh_name("hung")) as store:
        await store.batch_enqueue([LLMRequest(f"r{i}", i, token_info=TokenInfo(1)) for i in range(10)])
        dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
            store, LLMQueueDispatcherConfig(buffer_size=10, visibility_timeout=2.0)
        )
        job = await dispatcher.dequeue(LLMThrottle(600, 100_000))
        assert job is not None
        loop = asyncio.get_running_loop()
        private_server.pause()
        try:
            started = loop.time()
            await dispatcher.close()
            took = loop.time() - started
        finally:
            private_server.resume()
        assert took < 2.5  # one timeout (0.5 s), where one per message took 4.5 s
        await asyncio.sleep(2.5)  # the leases it could not give back run out by themselves
        assert (await counts(store))[0] >= 9
