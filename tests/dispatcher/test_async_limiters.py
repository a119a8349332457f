"""Store and limiter replies that arrive late (a round trip to Redis), met by a purge, a
cancellation, a concurrent dequeue or a close, in the prefetch buffer and the marks."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageStateError,
    Priority,
    QueueMessage,
    StorageError,
    TokenInfo,
    Worker,
    create_in_memory_queue,
)
from tests.dispatcher.books import AsyncThrottle, AsyncThrottleWithRelease


class External(InMemoryStorage[Any]):
    """An external store to the dispatcher (a subclass is not driven through the in-memory
    core); counts its calls, can delay the replies of receives and deletes, and fail deletes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: collections.Counter[str] = collections.Counter()
        self.late_receive = 0.0
        self.late_delete = 0.0
        self.failing_deletes = 0

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        self.calls["dequeue"] += 1
        received = await super().dequeue(limit, visibility_timeout)  # done on the server
        await asyncio.sleep(self.late_receive)  # the reply in transit
        return received

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        self.calls["update_visibility_timeout"] += 1
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)

    async def delete_message(self, receipt_handle: str) -> None:
        if self.failing_deletes:
            self.failing_deletes -= 1
            raise StorageError("store unreachable")
        await super().delete_message(receipt_handle)
        await asyncio.sleep(self.late_delete)


class RoundTripLimiter(AsyncThrottleWithRelease):
    """`LLMThrottle` behind coroutines whose consume answers 10 ms after it took effect."""

    consume_latency = 0.01


def request(name: str, priority: Priority = Priority.NORMAL, tokens: int = 10) -> LLMRequest[Any]:
    return LLMRequest(name, {"n": name}, priority, TokenInfo(tokens))


async def test_a_purge_waits_for_the_receive_in_flight_and_nothing_from_before_it_is_handed_out() -> None:
    store = External()
    store.late_receive = 0.05
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(buffer_size=2))
    limiter = LLMThrottle(6_000, 1_000_000)
    for i in range(6):
        await dispatcher.enqueue(request(f"r{i}"))
    job = await dispatcher.dequeue(limiter)  # takes one of two buffered, starts a refill
    assert job is not None
    await asyncio.sleep(0.01)  # the refill's receive is done in the store, its reply is not here
    await dispatcher.purge()
    await asyncio.sleep(0.1)
    attributes = await store.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (0, 0)
    assert await dispatcher.dequeue(limiter) is None
    await dispatcher.close()


async def test_a_mark_cancelled_after_its_store_call_landed_still_corrects_the_limiter() -> None:
    clock = ManualClock(0.0)
    store = External(clock=clock)
    store.late_delete = 0.05
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(clock=clock))
    limiter = LLMThrottle(60, 10_000, clock=clock)
    await dispatcher.enqueue(request("a", tokens=1_000))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    mark = asyncio.ensure_future(job.mark_as_processed(actual_tokens=100))
    await asyncio.sleep(0.01)  # the delete landed; its reply is on its way
    mark.cancel()
    await asyncio.gather(mark, return_exceptions=True)
    await dispatcher.close()  # waits for the mark to run to its end
    assert job.settled
    assert limiter.get_metrics().tpm.used == 100
    assert (await dispatcher.get_queue_metrics()).processing.active_requests == 0
    try:
        await job.mark_as_processed(actual_tokens=100)
    except MessageStateError:
        pass  # marked once, and only once
    else:
        raise AssertionError("a second mark was accepted")


async def test_two_concurrent_dequeues_over_a_round_trip_limiter_get_both_messages() -> None:
    for storage in (InMemoryStorage[Any](), External()):
        dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
        limiter = RoundTripLimiter(LLMThrottle(6_000, 1_000_000, clock=ManualClock()))
        await dispatcher.enqueue(request("a", Priority.URGENT))
        await dispatcher.enqueue(request("b", Priority.LOW))
        jobs = await asyncio.gather(dispatcher.dequeue(limiter), dispatcher.dequeue(limiter))
        assert sorted(job.message.payload.id for job in jobs if job is not None) == ["a", "b"]
        metrics = limiter.inner.get_metrics()
        assert (metrics.rpm.used, metrics.tpm.used) == (2, 20)  # the loser's first grant went back
        await dispatcher.close()


async def test_no_lease_renewal_spins_with_a_visibility_timeout_of_zero() -> None:
    store = External()
    config = LLMQueueDispatcherConfig(visibility_timeout=0.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(6_000, 1_000_000)
    for i in range(3):
        await dispatcher.enqueue(request(f"r{i}"))
    assert await dispatcher.dequeue(limiter) is not None
    store.calls.clear()
    await asyncio.sleep(0.5)
    assert store.calls["update_visibility_timeout"] <= 2
    await dispatcher.close()


async def test_close_leaves_no_task_behind() -> None:
    store = External()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        store, LLMQueueDispatcherConfig(enable_prefetch=True, prefetch_interval=0.05)
    )
    limiter = RoundTripLimiter(LLMThrottle(6_000, 1_000_000, clock=ManualClock()))
    for i in range(4):
        await dispatcher.enqueue(request(f"r{i}"))
    before = asyncio.all_tasks()
    cancelled = asyncio.ensure_future(dispatcher.dequeue(limiter))
    await asyncio.sleep(0.005)  # its consume is on the wire
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    store.late_delete = 0.05
    mark = asyncio.ensure_future(job.mark_as_processed(actual_tokens=5))
    await asyncio.sleep(0.01)
    mark.cancel()
    await asyncio.gather(mark, return_exceptions=True)
    await dispatcher.close()
    assert asyncio.all_tasks() <= before
    metrics = limiter.inner.get_metrics()
    assert (metrics.rpm.used, metrics.tpm.used) == (1, 5)  # the cancelled dequeue took nothing


async def test_two_concurrent_dequeues_never_reserve_one_request_twice() -> None:
    """Both would pick the URGENT winner; the loser's give-back must not take back the
    winner's reservation (a limiter keeps its records by request id)."""

    class OneRecordPerId(RoundTripLimiter):
        """Keeps one reservation per request id, as `RedisThrottle` does: a second consume of
        an id with a reservation outstanding would overwrite it."""

        def __init__(self, inner: LLMThrottle) -> None:
            super().__init__(inner)
            self.outstanding: set[str] = set()
            self.overwritten: list[str] = []

        async def consume(self, request_id: str, tokens: int, metadata: Any = None) -> bool:
            if request_id in self.outstanding:
                self.overwritten.append(request_id)
            self.outstanding.add(request_id)
            return await super().consume(request_id, tokens, metadata)

        async def adjust_consumption(self, request_id: str, tokens: int) -> None:
            self.outstanding.discard(request_id)
            await super().adjust_consumption(request_id, tokens)

        async def release(self, request_id: str) -> None:
            self.outstanding.discard(request_id)
            await super().release(request_id)

    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage[Any]())
    limiter = OneRecordPerId(LLMThrottle(6_000, 1_000_000, clock=ManualClock()))
    await dispatcher.enqueue(request("a", Priority.LOW, tokens=100))
    await dispatcher.enqueue(request("b", Priority.URGENT, tokens=1_000))
    first, second = await asyncio.gather(dispatcher.dequeue(limiter), dispatcher.dequeue(limiter))
    assert first is not None
    assert second is not None
    assert limiter.overwritten == []
    metrics = limiter.inner.get_metrics()
    assert (metrics.rpm.used, metrics.tpm.used) == (2, 1_100)
    await first.mark_as_failed(RuntimeError("x"))  # the winner's mark, before anything else
    await second.mark_as_failed(RuntimeError("x"))
    metrics = limiter.inner.get_metrics()
    assert (metrics.rpm.used, metrics.tpm.used) == (2, 0)  # the calls count, their tokens back


async def test_a_cancelled_release_buffered_cancels_no_fill_and_strands_nothing() -> None:
    store = External()
    store.late_receive = 0.05
    config = LLMQueueDispatcherConfig(buffer_size=2, visibility_timeout=300.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(600, 1_000_000)
    for i in range(3):
        await dispatcher.enqueue(request(f"r{i}"))
    waiting = asyncio.ensure_future(dispatcher.dequeue(limiter))  # waits on the first fill
    await asyncio.sleep(0.01)  # the fill's receive is done in the store, its reply is not here
    release = asyncio.ensure_future(dispatcher.release_buffered())
    await asyncio.sleep(0.01)
    release.cancel()
    await asyncio.gather(release, return_exceptions=True)
    job = await waiting  # not cancelled: it gets its message
    assert job is not None
    await job.mark_as_processed()
    await dispatcher.close()
    attributes = await store.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (2, 0)


async def test_a_message_whose_cancelled_release_may_have_landed_is_checked_before_a_hand_out() -> None:
    class LateVisibilityReply(External):
        async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
            await super().update_visibility_timeout(receipt_handle, visibility_timeout)
            if visibility_timeout == 0:
                await asyncio.sleep(0.05)  # released in the store, the reply on its way

    store = LateVisibilityReply()
    config = LLMQueueDispatcherConfig(buffer_size=5, visibility_timeout=300.0)
    mine: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    other: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(600, 1_000_000)
    await mine.enqueue(request("a"))
    await mine.enqueue(request("b"))
    first = await mine.dequeue(limiter)
    assert first is not None  # "b" stays buffered, leased by `mine`
    release = asyncio.ensure_future(mine.release_buffered())
    await asyncio.sleep(0.01)  # "b" is visible again in the store
    release.cancel()
    await asyncio.gather(release, return_exceptions=True)
    theirs = await other.dequeue(limiter)  # another host receives "b"
    ours = await mine.dequeue(limiter)  # must not hand out "b" too
    handed_out = [job.message.payload.id for job in (theirs, ours) if job is not None]
    assert sorted(handed_out) == ["b"]
    await mine.close()
    await other.close()


async def test_a_dequeue_during_a_purge_hands_out_nothing_from_before_it() -> None:
    store = External()
    store.late_receive = 0.05
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(buffer_size=2))
    limiter = RoundTripLimiter(LLMThrottle(6_000, 1_000_000, clock=ManualClock()))
    for i in range(6):
        await dispatcher.enqueue(request(f"r{i}"))
    job = await dispatcher.dequeue(limiter)  # one of two buffered out, a refill on its way
    assert job is not None
    await asyncio.sleep(0.01)
    purge = asyncio.ensure_future(dispatcher.purge())
    await asyncio.sleep(0)
    during = await dispatcher.dequeue(limiter)
    await purge
    assert during is None
    await job.mark_as_failed(RuntimeError("x"))  # purged: settles its budget only
    metrics = limiter.inner.get_metrics()
    assert (metrics.rpm.used, metrics.tpm.used) == (1, 0)  # nothing else was reserved
    attributes = await store.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (0, 0)
    await dispatcher.close()


async def test_a_purge_that_fails_leaves_the_handed_out_jobs_live() -> None:
    store = External()
    config = LLMQueueDispatcherConfig(buffer_size=2, visibility_timeout=300.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(600, 1_000_000)
    await dispatcher.enqueue(request("a"))
    await dispatcher.enqueue(request("b"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    store.failing_deletes = 1
    with pytest.raises(StorageError):
        await dispatcher.purge()
    await job.mark_as_processed()  # the work was done: the message must be deleted
    assert job.message.payload.id not in {m.payload.id for m in await store.peek_messages_by_priority(2, 10)}
    attributes = await store.get_queue_attributes()
    # Nothing of "a" left anywhere; "b" (not purged) is still there, buffered or visible.
    assert (
        attributes.approximate_number_of_messages + attributes.approximate_number_of_messages_in_flight == 1
    )
    await dispatcher.close()
    assert [m.payload.id for m in await store.peek_messages_by_priority(2, 10)] == ["b"]


async def test_a_close_cut_short_does_not_cancel_the_mark_it_waits_for() -> None:
    clock = ManualClock(0.0)
    store = External(clock=clock)
    store.late_delete = 0.2
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(clock=clock))
    limiter = LLMThrottle(60, 10_000, clock=clock)
    await dispatcher.enqueue(request("a", tokens=1_000))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    mark = asyncio.ensure_future(job.mark_as_processed(actual_tokens=100))
    await asyncio.sleep(0.01)  # the delete landed, its reply is on its way
    mark.cancel()
    await asyncio.gather(mark, return_exceptions=True)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(dispatcher.close(), 0.05)
    await asyncio.sleep(0.3)
    assert job.settled
    assert limiter.get_metrics().tpm.used == 100


def test_close_in_a_later_event_loop_releases_the_buffer() -> None:
    store = External()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(buffer_size=5))
    limiter = LLMThrottle(600, 1_000_000)

    async def first() -> None:
        for i in range(3):
            await dispatcher.enqueue(request(f"r{i}"))
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed()

    asyncio.run(first())
    asyncio.run(dispatcher.close())  # its lease keeper died with the first loop
    attributes = asyncio.run(store.get_queue_attributes())
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (2, 0)


async def test_a_cancelled_purge_strands_nothing() -> None:
    store = External()
    store.late_receive = 0.05
    config = LLMQueueDispatcherConfig(buffer_size=3, visibility_timeout=30.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(6_000, 1_000_000)
    for i in range(6):
        await dispatcher.enqueue(request(f"r{i}"))
    job = await dispatcher.dequeue(limiter)  # three received, two buffered, a refill on its way
    assert job is not None
    await job.mark_as_processed()
    await asyncio.sleep(0.01)
    purge = asyncio.ensure_future(dispatcher.purge())
    await asyncio.sleep(0.01)  # the buffer is drained, the purge waits for the fill
    purge.cancel()
    await asyncio.gather(purge, return_exceptions=True)
    await asyncio.sleep(0.1)
    await dispatcher.close()
    attributes = await store.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (5, 0)


async def test_a_failed_mark_refunds_its_own_reservation_not_the_redeliverys() -> None:
    """A concurrent dequeue that takes the redelivery while the failed mark's refund is on its
    way keeps its own reservation: each delivery has its own."""
    for throttle_is_async in (False, True):
        clock = ManualClock(1_000.0)
        dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue(clock=clock)
        throttle = LLMThrottle(60, 10_000, clock=clock)
        limiter: Any = RoundTripLimiter(throttle) if throttle_is_async else throttle
        await dispatcher.enqueue(request("a", tokens=500))
        first = await dispatcher.dequeue(limiter)
        assert first is not None
        failing = asyncio.ensure_future(first.mark_as_failed(RuntimeError("x")))
        await asyncio.sleep(0)
        second = await dispatcher.dequeue(limiter, timeout=1.0)  # takes the redelivery
        await failing
        assert second is not None
        await second.mark_as_processed(actual_tokens=100)
        assert throttle.get_metrics().tpm.used == 100, throttle_is_async


async def test_dispatchers_sharing_one_store_never_reserve_one_request_twice() -> None:
    store: InMemoryStorage[Any] = InMemoryStorage()
    throttle = LLMThrottle(60, 10_000, clock=ManualClock())
    limiter = AsyncThrottle(throttle)  # no release: the four required coroutines only
    one: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store)
    two: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store)
    await store.enqueue(request("a", tokens=500))
    await store.enqueue(request("b", tokens=500))
    jobs = await asyncio.gather(one.dequeue(limiter), two.dequeue(limiter))
    assert sorted(job.message.payload.id for job in jobs if job is not None) == ["a", "b"]
    for job in jobs:
        assert job is not None
        await job.mark_as_processed(actual_tokens=100)
    assert throttle.get_metrics().tpm.used == 200


async def test_a_worker_whose_mark_fails_in_the_store_counts_nothing_and_keeps_no_phantom() -> None:
    store = External()
    store.failing_deletes = 2
    config = LLMQueueDispatcherConfig(visibility_timeout=0.3, buffer_size=4)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    for i in range(6):
        await dispatcher.enqueue(request(f"r{i}"))

    async def handle(job: Any) -> int:
        return 7

    worker = Worker(dispatcher, LLMThrottle(60_000, 10_000_000), handle, concurrency=2, handle_signals=False)
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 30)
    # Two marks failed: those messages came back after their lease and were processed again.
    assert (stats.processed, stats.tokens) == (6, 42)
    assert (await dispatcher.get_queue_metrics()).processing.active_requests == 0
    await dispatcher.close()
    attributes = await store.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (0, 0)


async def test_a_cancelled_failed_mark_refunds_before_the_message_is_visible_again() -> None:
    class SlowRefund(RoundTripLimiter):
        async def consume(self, request_id: str, tokens: int, metadata: Any = None) -> bool:
            return self.inner.consume(request_id, tokens, metadata)

        async def adjust_consumption(self, request_id: str, tokens: int) -> None:
            await asyncio.sleep(0.05)
            self.inner.adjust_consumption(request_id, tokens)

    throttle = LLMThrottle(60, 10_000, clock=ManualClock())
    limiter = SlowRefund(throttle)
    dispatcher: LLMQueueDispatcher[Any] = create_in_memory_queue()
    await dispatcher.enqueue(request("a", tokens=1_000))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    failing = asyncio.ensure_future(first.mark_as_failed(RuntimeError("x")))
    await asyncio.sleep(0.01)  # the refund is on its way
    failing.cancel()
    await asyncio.gather(failing, return_exceptions=True)
    second = await dispatcher.dequeue(limiter, timeout=1.0)  # only once the refund landed
    assert second is not None
    await second.mark_as_processed(actual_tokens=200)
    await dispatcher.close()
    assert throttle.get_metrics().tpm.used == 200


async def test_a_limiter_that_never_confirms_a_give_back_stalls_nothing_for_good() -> None:
    class NeverReleases(RoundTripLimiter):
        async def release(self, request_id: str) -> None:
            await asyncio.Event().wait()  # hangs

    store: InMemoryStorage[Any] = InMemoryStorage()
    stuck = NeverReleases(LLMThrottle(6_000, 1_000_000, clock=ManualClock()))
    healthy = RoundTripLimiter(LLMThrottle(6_000, 1_000_000, clock=ManualClock()))
    one: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store)
    two: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store)
    await store.enqueue(request("a", Priority.URGENT))
    await store.enqueue(request("b", Priority.LOW))
    cancelled = asyncio.ensure_future(one.dequeue(stuck))
    await asyncio.sleep(0.005)  # its consume is on the wire
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)  # its give-back never lands
    job = await asyncio.wait_for(two.dequeue(healthy), 0.5)  # another limiter: not held up
    assert job is not None
    assert job.message.payload.id == "a"
    await job.mark_as_failed(RuntimeError("x"))
    again = await asyncio.wait_for(one.dequeue(stuck), 3.0)  # held up about a second at most
    assert again is not None


async def test_another_consumer_receiving_while_a_consume_is_on_the_wire_leaves_the_winner_ours() -> None:
    """The winner is taken before its reservation is asked for: another consumer receiving
    while the consume is on the wire gets the next message, and the dequeue hands the winner out
    at once, with no give-back to wait for (the limiter's slow release is never called)."""

    released: list[str] = []

    class SlowRelease(RoundTripLimiter):
        async def release(self, request_id: str) -> None:
            released.append(request_id)
            await asyncio.sleep(0.5)
            self.inner.release(request_id)

    clock = ManualClock(1_000.0)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    await dispatcher.enqueue(request("x", Priority.URGENT))
    await dispatcher.enqueue(request("y", Priority.LOW))
    limiter = SlowRelease(LLMThrottle(600, 100_000, clock=clock))

    async def thief() -> list[Any]:
        await asyncio.sleep(0.005)
        return await storage.dequeue(1, 30.0)  # receives while the consume is on the wire

    stolen = asyncio.ensure_future(thief())
    job = await asyncio.wait_for(dispatcher.dequeue(limiter), 0.3)
    assert job is not None
    assert job.message.payload.id == "x"
    assert [m.payload.id for m in await stolen] == ["y"]
    assert released == []


async def test_a_failed_mark_is_not_hidden_again_by_a_renewal_on_its_way() -> None:
    class SlowRenewals(External):
        slow = False

        async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
            if self.slow:
                await asyncio.sleep(0.05)
            await super().update_visibility_timeout(receipt_handle, visibility_timeout)

    store = SlowRenewals()
    config = LLMQueueDispatcherConfig(enable_prefetch=True, prefetch_interval=0.2, visibility_timeout=30.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    await dispatcher.enqueue(request("a", tokens=100))
    await dispatcher.enqueue(request("b", tokens=50))
    limiter = LLMThrottle(600, 100_000)
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    await first.mark_as_failed(RuntimeError("x"))
    await asyncio.sleep(0.1)
    store.slow = True
    await asyncio.sleep(0.12)  # the prefetch loop renews the buffered leases, slowly
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    store.slow = False
    await job.mark_as_failed(RuntimeError("x"), retry_after=0)
    await asyncio.sleep(0.1)  # the renewal that was on its way has landed before the release
    visible = {m.payload.id for m in await store.peek_messages_by_priority(int(Priority.NORMAL), 10)}
    assert job.message.payload.id in visible
    await dispatcher.close()


async def test_a_purge_failing_after_its_deletes_keeps_deleted_jobs_purged() -> None:
    class PurgeFails(External):
        async def purge(self) -> None:
            raise StorageError("store unreachable")

    store = PurgeFails()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(buffer_size=1))
    throttle = LLMThrottle(600, 100_000, clock=ManualClock())
    await dispatcher.enqueue(request("a", tokens=300))
    job = await dispatcher.dequeue(throttle)
    assert job is not None
    with pytest.raises(StorageError):
        await dispatcher.purge()  # deleted "a" by its handle, then the store's purge failed
    await job.mark_as_failed(RuntimeError("x"))  # purged: its budget comes back, no error
    assert throttle.get_metrics().tpm.used == 0
    await dispatcher.close()
