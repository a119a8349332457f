"""The dispatcher over an external (plain-Python) store: the prefetch buffer.

The buffer is filled with ``storage.dequeue(buffer_size, visibility_timeout)``, selection over it
is exact, buffered leases are renewed every ``prefetch_interval``, ``close()`` gives them back
unprocessed (``release_message``: their receive undone), and no buffered message is ever handed
out twice, even when its lease runs out and another consumer receives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    MessageAttributes,
    Priority,
    QueueMessage,
    ScoringWeights,
    StorageError,
    TokenInfo,
)
from tests.dispatcher.books import Delegating, RenewalFails, native_limiter
from tests.dispatcher.books import request as sized_request
from tests.reference.scoring import reference_total
from tests.reference.storage import RecordingStorage, ReferenceStorage


def request(request_id: str, priority: Priority = Priority.NORMAL, tokens: int = 100) -> LLMRequest[str]:
    return LLMRequest(request_id, f"payload of {request_id}", priority, TokenInfo(tokens))


def make(clock: ManualClock, **config: Any) -> tuple[RecordingStorage[str], LLMQueueDispatcher[str]]:
    adapter: RecordingStorage[str] = RecordingStorage(clock)
    dispatcher = LLMQueueDispatcher(adapter, LLMQueueDispatcherConfig(clock=clock, **config))
    return adapter, dispatcher


async def test_buffer_fills_with_one_storage_dequeue_of_buffer_size() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(clock, buffer_size=4, visibility_timeout=30.0)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(10)])
    limiter = LLMThrottle(600, 100_000, clock=clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert adapter.calls_named("dequeue") == [(4, 30.0)]
    assert await adapter.get_approximate_message_count() == 6  # 4 leased: 3 buffered, 1 handed out
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.queue.buffered_messages == 3
    assert metrics.performance.buffer_utilization == 3 / 4
    second = await dispatcher.dequeue(limiter)
    assert second is not None
    await asyncio.sleep(0)  # the top-up runs in the background, off the dispatch's path
    # One receive brought the buffer back to buffer_size once the second message left it.
    assert adapter.calls_named("dequeue") == [(4, 30.0), (2, 30.0)]
    assert (await dispatcher.get_queue_metrics()).queue.buffered_messages == 4
    assert second.message.payload.id != job.message.payload.id


async def test_handed_out_message_can_be_marked_in_the_store() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(clock, buffer_size=3)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    limiter = LLMThrottle(600, 100_000, clock=clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed(actual_tokens=50)
    assert job.message.payload.id not in adapter.records
    other = await dispatcher.dequeue(limiter)
    assert other is not None
    await other.mark_as_failed(RuntimeError("x"))
    assert adapter.is_visible(other.message.payload.id)  # retry_after None: visible at once
    assert limiter.get_metrics().tpm.available == 100_000 - 50


@given(
    messages=st.lists(
        st.tuples(
            st.sampled_from(list(Priority)),
            st.one_of(st.integers(0, 50), st.integers(1, 30_000)),
            st.integers(0, 200).map(lambda q: q / 4),
        ),
        min_size=1,
        max_size=15,
    ),
    tpm=st.sampled_from([500.0, 10_000.0, 1e6]),
)
def test_selection_over_the_buffer_is_exact(messages: list[tuple[Priority, int, float]], tpm: float) -> None:
    async def scenario() -> None:
        clock = ManualClock(1_000_000.0)
        adapter, dispatcher = make(
            clock, buffer_size=len(messages), min_score_threshold=0.0, hold_budget=False
        )
        for index, (priority, tokens, advance) in enumerate(messages):
            clock.advance(advance)
            await dispatcher.enqueue(request(f"m{index}", priority, tokens))
        limiter = LLMThrottle(1e6, tpm, clock=clock)
        for _ in range(3):
            now = clock.now()
            available = limiter.get_metrics().tpm.available
            admissible = {tokens: limiter.can_process(tokens).allowed for _, tokens, _ in messages}
            job = await dispatcher.dequeue(limiter)
            # Everything not handed out sits in the buffer (leased once by the dispatcher). The
            # buffer's own lease is not a retry: score with the deliveries before it.
            buffered: list[QueueMessage[str]] = []
            for record in adapter.records.values():
                if job is not None and record.request.id == job.message.payload.id:
                    message = job.message
                else:
                    message = adapter._message(record)
                attributes = dataclasses.replace(message.attributes, receive_count=record.receive_count - 1)
                buffered.append(dataclasses.replace(message, attributes=attributes))
            totals = {
                m.payload.id: reference_total(m, now=now, available=available, weights=ScoringWeights())
                for m in buffered
                if admissible[m.payload.token_info.estimated]
            }
            if job is None:
                assert not totals
                return
            assert abs(job.score.total - max(totals.values())) <= 1e-9, (job.score, totals)
            await job.mark_as_processed()

    asyncio.run(scenario())


async def test_buffered_leases_are_renewed_every_prefetch_interval() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(
        clock, buffer_size=5, visibility_timeout=30.0, enable_prefetch=True, prefetch_interval=0.05
    )
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(5)])
    limiter = LLMThrottle(600, 100_000, clock=clock)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    buffered = {r.handle for r in adapter.records.values()} - {job.message.attributes.receipt_handle}
    assert len(buffered) == 4
    await job.mark_as_processed()
    await asyncio.sleep(0.18)  # about three intervals
    renewals = [args for args in adapter.calls_named("update_visibility_timeout") if args[0] in buffered]
    per_handle = {handle: sum(1 for h, _ in renewals if h == handle) for handle in buffered}
    assert all(2 <= n <= 6 for n in per_handle.values()), per_handle
    assert all(seconds == 30.0 for _, seconds in renewals)
    # With the renewals, the buffered messages outlive their first lease on the store's clock.
    clock.advance(25.0)
    await asyncio.sleep(0.08)
    clock.advance(25.0)
    assert await adapter.get_approximate_message_count() == 0
    await dispatcher.close()


async def test_stop_ends_the_renewals_and_keeps_the_leases() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(clock, buffer_size=5, enable_prefetch=True, prefetch_interval=0.03)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(3)])
    assert await dispatcher.dequeue(LLMThrottle(600, 100_000, clock=clock)) is not None
    await asyncio.sleep(0.05)
    dispatcher.stop()
    await asyncio.sleep(0)
    calls = len(adapter.calls)
    await asyncio.sleep(0.1)
    assert len(adapter.calls) == calls  # no more prefetching
    assert await adapter.get_approximate_message_count() == 0  # buffered messages stay leased
    await dispatcher.close()
    assert await adapter.get_approximate_message_count() == 2


async def test_close_releases_buffered_messages_at_once() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(clock, buffer_size=4, visibility_timeout=30.0)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(6)])
    async with dispatcher:
        job = await dispatcher.dequeue(LLMThrottle(600, 100_000, clock=clock))
        assert job is not None
        assert await adapter.get_approximate_message_count() == 2
    # close() let the background top-up land (the buffer was full again: 4), then released
    # every buffered message, and only those, their receive undone.
    releases = adapter.calls_named("release_message")
    released = {handle for (handle,) in releases}
    assert len(releases) == len(released) == 4
    assert job.message.attributes.receipt_handle not in released
    assert await adapter.get_approximate_message_count() == 5  # the clock did not move
    assert not adapter.is_visible(job.message.payload.id)  # the handed-out one stays leased
    for priority in range(4):
        for message in await adapter.peek_messages_by_priority(priority, 10):
            assert message.attributes.receive_count == 0  # no receive used up by the close
    assert (await dispatcher.get_queue_metrics()).queue.buffered_messages == 0


async def test_a_buffered_message_received_by_another_consumer_is_not_handed_out() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(clock, buffer_size=3, visibility_timeout=30.0)
    await dispatcher.batch_enqueue([request("a", Priority.URGENT), request("b"), request("c", Priority.LOW)])
    limiter = LLMThrottle(600, 100_000, clock=clock)
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    assert first.message.payload.id == "a"
    await first.mark_as_processed()
    clock.advance(31.0)  # b and c: leases ran out in the buffer (no prefetch loop renewing them)
    taken = await adapter.dequeue(10, 300.0)  # another consumer
    assert {m.payload.id for m in taken} == {"b", "c"}
    assert await dispatcher.dequeue(limiter) is None
    # The stale entries left the buffer: a new message goes straight through.
    await dispatcher.enqueue(request("d", Priority.LOW))
    fresh = await dispatcher.dequeue(limiter)
    assert fresh is not None
    assert fresh.message.payload.id == "d"


async def test_a_lapsed_lease_nobody_took_is_handed_out_once() -> None:
    clock = ManualClock(1_000.0)
    adapter, dispatcher = make(clock, buffer_size=2, visibility_timeout=30.0)
    await dispatcher.batch_enqueue([request("a"), request("b")])
    limiter = LLMThrottle(600, 100_000, clock=clock)
    handed: list[str] = []
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    handed.append(job.message.payload.id)
    clock.advance(31.0)  # both leases lapse; the buffered one is visible in the store again
    while (job := await dispatcher.dequeue(limiter)) is not None:
        assert adapter.current_handle(job.message.payload.id) == job.message.attributes.receipt_handle
        handed.append(job.message.payload.id)
        await job.mark_as_processed()
        if len(handed) > 4:
            break
    # "a" lapsed while handed out: at-least-once redelivery is allowed; "b" was only buffered.
    assert handed.count("b") == 1, handed


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("dispatch"), st.booleans()),
            st.tuples(st.just("advance"), st.sampled_from([1.0, 10.0, 29.0, 31.0, 60.0])),
            st.tuples(st.just("steal"), st.integers(1, 4)),
            st.tuples(st.just("enqueue"), st.sampled_from(list(Priority))),
        ),
        max_size=40,
    )
)
def test_no_delivery_is_handed_out_twice(ops: list[tuple[str, Any]]) -> None:
    """Random dispatches, clock jumps past the lease, and a competing consumer: every message
    the dispatcher hands out carries the store's current receipt handle (nobody else holds it),
    and no delivery is handed out twice."""

    async def scenario() -> None:
        clock = ManualClock(1_000.0)
        adapter, dispatcher = make(clock, buffer_size=4, visibility_timeout=30.0, min_score_threshold=0.0)
        limiter = LLMThrottle(1e6, 1e9, clock=clock)
        await dispatcher.batch_enqueue([request(f"r{i}") for i in range(6)])
        next_id = 6
        handed_handles: set[str] = set()
        held: dict[str, QueueMessage[str]] = {}
        for op, arg in ops:
            if op == "dispatch":
                job = await dispatcher.dequeue(limiter)
                if job is None:
                    continue
                handle = job.message.attributes.receipt_handle
                assert adapter.current_handle(job.message.payload.id) == handle
                assert not adapter.is_visible(job.message.payload.id)
                assert handle not in handed_handles
                handed_handles.add(handle)
                if arg:
                    await job.mark_as_processed()
            elif op == "advance":
                clock.advance(arg)
            elif op == "steal":
                for message in await adapter.dequeue(arg, 45.0):
                    held[message.payload.id] = message
            else:
                await dispatcher.enqueue(request(f"r{next_id}", arg))
                next_id += 1
        await dispatcher.close()

    asyncio.run(scenario())


class SlowRenewal(RecordingStorage[str]):
    """A store whose visibility changes take a round trip (a network call); ``renewing`` is set
    when one starts."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.renewing = asyncio.Event()

    async def update_visibility_timeout(self, receipt_handle: str, visibility_timeout: float) -> None:
        self.renewing.set()
        await asyncio.sleep(0.01)
        await super().update_visibility_timeout(receipt_handle, visibility_timeout)


async def test_a_dequeue_cancelled_while_its_lease_is_renewed_leaves_nothing_in_flight() -> None:
    """The winner's lease is half used, so the hand-out renews it first; cancelled meanwhile,
    the dequeue takes nothing: no delivery in flight in any of the metrics, its reservation
    given back, the message back in the buffer for the next dequeue."""
    clock = ManualClock(1_000.0)
    store: SlowRenewal = SlowRenewal(clock)
    dispatcher = LLMQueueDispatcher(store, LLMQueueDispatcherConfig(clock=clock, visibility_timeout=30.0))
    await dispatcher.enqueue(dataclasses.replace(request("a"), tenant="t"))
    limiter = LLMThrottle(600, 100_000, clock=clock)
    await dispatcher._prefetch.prepare()  # type: ignore[union-attr]  # leased into the buffer
    clock.advance(20.0)  # less than half of the lease left: the hand-out renews and waits
    dequeue = asyncio.ensure_future(dispatcher.dequeue(limiter))
    await store.renewing.wait()
    dequeue.cancel()
    await asyncio.gather(dequeue, return_exceptions=True)
    assert dequeue.cancelled()
    metrics = await dispatcher.get_queue_metrics()
    assert metrics.processing.active_requests == 0
    assert metrics.processing.in_flight_details == []
    assert metrics.tenants["t"].in_flight == 0
    assert metrics.queue.buffered_messages == 1
    assert limiter.get_metrics().rpm.used == 0
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_processed()
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    await dispatcher.close()


@pytest.mark.parametrize("enable_prefetch", [False, True])
async def test_buffered_messages_keep_their_leases_while_a_slow_consumer_works(enable_prefetch: bool) -> None:
    """A consumer taking 20 s a message, a 30 s visibility and a buffer holding all five: each is
    handed out once with receive count 1, none is dead-lettered (``max_receive_count=2``), and
    the buffer never holds two copies of one message."""
    clock = ManualClock(1_000.0)
    dead: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock, max_receive_count=2, dead_letter=dead)
    config = LLMQueueDispatcherConfig(clock=clock, buffer_size=10, enable_prefetch=enable_prefetch)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(Delegating(inner), config)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    for i in range(5):
        await dispatcher.enqueue(sized_request(str(i)))
    delivered = []
    for _ in range(8):
        job = await dispatcher.dequeue(limiter)
        if job is not None:
            delivered.append((job.message.payload.id, job.message.attributes.receive_count))
            clock.advance(20)
            await job.mark_as_processed()
        else:
            clock.advance(40)
        await asyncio.sleep(0)
        buffered = dispatcher._core.ids_above(-1.0)  # every buffered request id
        assert len(buffered) == len(set(buffered))
    await dispatcher.close()
    assert delivered == [(str(i), 1) for i in range(5)]
    assert await dead.get_approximate_message_count() == 0


async def test_after_release_buffered_the_buffer_is_renewed_again() -> None:
    """`release_buffered` (what a stopping Worker calls) halts the background renewal only
    until the next dequeue: a buffer filled again keeps its leases under a slow consumer."""
    inner: InMemoryStorage[Any] = InMemoryStorage()
    config = LLMQueueDispatcherConfig(visibility_timeout=1.0, buffer_size=10)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(Delegating(inner), config)
    limiter = LLMThrottle(60_000, 10_000_000)
    for i in range(5):
        await dispatcher.enqueue(sized_request(str(i)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_failed(RuntimeError("x"))  # visible again at once
    await dispatcher.release_buffered()
    assert (await inner.get_queue_attributes()).approximate_number_of_messages_in_flight == 0
    job = await dispatcher.dequeue(limiter)  # fills the buffer again
    assert job is not None
    await job.update_visibility(600.0)  # the handed-out one is its consumer's to extend
    await asyncio.sleep(2.5)  # a slow call: the buffered leases (1 s) must be renewed meanwhile
    attributes = await inner.get_queue_attributes()
    assert attributes.approximate_number_of_messages_in_flight == 5
    await job.mark_as_processed()
    await dispatcher.close()
    assert (await inner.get_queue_attributes()).approximate_number_of_messages == 4


def test_the_buffer_keeps_the_later_delivery_of_a_request() -> None:
    core = LLMQueueDispatcher(Delegating(InMemoryStorage()))._core

    def delivery(count: int) -> QueueMessage[Any]:
        attributes = MessageAttributes(
            message_id="m",
            receipt_handle=f"h{count}",
            enqueued_at=datetime.now(timezone.utc),
            receive_count=count,
            first_received_at=datetime.now(timezone.utc),
        )
        return QueueMessage("m", sized_request("a"), attributes)

    assert core.buffer_insert([delivery(2)], 1e9) == []
    assert core.buffer_insert([delivery(1)], 1e9) == ["h1"]  # an older one coming back is not kept
    assert core.buffer_handles() == ["h2"]
    assert core.buffer_insert([delivery(3)], 1e9) == ["h2"]
    assert core.buffer_handles() == ["h3"]


async def test_a_failing_renewal_of_another_buffered_message_does_not_fail_the_dequeue() -> None:
    clock = ManualClock(1_000.0)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    store = RenewalFails(inner)
    config = LLMQueueDispatcherConfig(clock=clock, visibility_timeout=30.0, buffer_size=10)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(store, config)
    limiter = LLMThrottle(600, 100_000, clock=clock)
    await dispatcher.enqueue(LLMRequest("stuck", None, Priority.LOW, TokenInfo(10)))
    await dispatcher.enqueue(LLMRequest("first", None, Priority.URGENT, TokenInfo(10)))
    await dispatcher.enqueue(LLMRequest("second", None, Priority.HIGH, TokenInfo(10)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "first"
    await job.mark_as_processed()
    clock.advance(20)  # every buffered lease is due for renewal; "stuck"'s fails
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "second"
    await job.mark_as_processed()
    await dispatcher.close()


async def test_buffered_messages_count_once_in_an_external_stores_metrics() -> None:
    """Over an external store, a buffered message is leased (in flight for the
    store) but still waiting for the dispatcher: it counts once, as waiting."""
    clock = ManualClock(1_000.0)
    storage: ReferenceStorage[Any] = ReferenceStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, buffer_size=4)
    )
    await dispatcher.batch_enqueue([sized_request(f"r{i}") for i in range(10)])
    job = await dispatcher.dequeue(native_limiter(ManualClock()))
    assert job is not None
    attributes = await storage.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (
        6,
        4,
    )
    queue = (await dispatcher.get_queue_metrics()).queue
    assert queue.buffered_messages == 3
    assert queue.approximate_number_of_messages == 9  # 6 in the store + 3 buffered
    assert queue.approximate_number_of_messages_in_flight == 1  # the job
    assert queue.total_messages == 10


class _BadReply(Delegating):
    """An adapter whose ``dequeue`` answers with what the storage contract does not allow."""

    def __init__(self, inner: InMemoryStorage[Any], reply: str) -> None:
        super().__init__(inner)
        self.reply = reply

    async def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        messages = await self.inner.dequeue(limit, visibility_timeout)
        if self.reply == "junk":
            return [*messages, "junk"]  # type: ignore[list-item]
        if self.reply == "none":
            return None  # type: ignore[return-value]
        return {"messages": messages}  # type: ignore[return-value]

    async def release_message(self, receipt_handle: str) -> None:
        await self.inner.release_message(receipt_handle)


@pytest.mark.parametrize("reply", ["junk", "none", "mapping"])
async def test_a_store_answering_a_dequeue_with_no_list_of_messages_raises_storage_error(reply: str) -> None:
    clock = ManualClock(1_000.0)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher = LLMQueueDispatcher(
        _BadReply(inner, reply), LLMQueueDispatcherConfig(clock=clock, buffer_size=2)
    )
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(4)])
    limiter = LLMThrottle(600, 100_000, clock=clock)
    with pytest.raises(StorageError, match=r"_BadReply\.dequeue returned"):
        await dispatcher.dequeue(limiter)
    assert limiter.get_metrics().rpm.used == 0  # nothing reserved
    await dispatcher.close()


async def test_the_messages_of_a_malformed_dequeue_reply_are_given_back_at_once() -> None:
    clock = ManualClock(1_000.0)
    inner: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher = LLMQueueDispatcher(
        _BadReply(inner, "junk"), LLMQueueDispatcherConfig(clock=clock, buffer_size=2)
    )
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(4)])
    with pytest.raises(StorageError):
        await dispatcher.dequeue(LLMThrottle(600, 100_000, clock=clock))
    # Not leased to nobody until their visibility runs out, nor counted as received.
    attributes = await inner.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (4, 0)
    assert [
        m.attributes.receive_count for m in await inner.peek_messages_by_priority(Priority.NORMAL, 4)
    ] == [0] * 4
    await dispatcher.close()
