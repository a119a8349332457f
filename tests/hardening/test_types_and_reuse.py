"""Issue 9, defect 13: messages built by Rust are exactly the dataclasses of `types.py`; an
external store's metrics count a buffered message once; a dispatcher serves a second
`asyncio.run()` as well as the first; one accuracy formula."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    MessageAttributes,
    QueueMessage,
    QueueStorageAdapter,
)
from tests.hardening.support import native_limiter, request
from tests.reference.storage import ReferenceStorage


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def rebuilt(message: QueueMessage[Any]) -> QueueMessage[Any]:
    """The same message built by the dataclasses' own constructors."""
    attributes = MessageAttributes(
        **{name: getattr(message.attributes, name) for name in field_names(MessageAttributes)}
    )
    return QueueMessage(id=message.id, payload=message.payload, attributes=attributes)


def assert_exactly_the_dataclass(message: QueueMessage[Any]) -> None:
    assert type(message) is QueueMessage
    assert type(message.attributes) is MessageAttributes
    assert set(vars(message)) == field_names(QueueMessage)
    assert set(vars(message.attributes)) == field_names(MessageAttributes)
    twin = rebuilt(message)
    assert message == twin
    assert repr(message) == repr(twin)
    assert dataclasses.asdict(message) == dataclasses.asdict(twin)
    assert dataclasses.replace(message) == message
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.attributes.receive_count = 99  # type: ignore[misc]


async def test_messages_from_every_rust_path_are_the_dataclasses() -> None:
    """Defect 13: enqueue, batch enqueue, peek, dequeue, the dispatch step and take_unfittable
    all build `QueueMessage`/`MessageAttributes` with exactly the dataclass fields, equal to a
    dataclass-constructed twin."""
    clock = ManualClock(1_000.0)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    limiter = native_limiter(ManualClock(), tpm=1_000)
    messages = [await storage.enqueue(request("a"))]
    messages += await storage.batch_enqueue([request("b"), request("c"), request("huge", 5_000)])
    messages += await storage.peek_messages_by_priority(2, 10)
    messages += await storage.dequeue(1, 30.0)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    messages.append(job.message)
    messages += await dispatcher.take_unfittable(limiter)
    clock.advance(31.0)
    messages += await storage.dequeue(10, 30.0)  # received again: first_received_at set
    assert {m.payload.id for m in messages} == {"a", "b", "c", "huge"}
    assert any(m.attributes.first_received_at is not None for m in messages)
    for message in messages:
        assert_exactly_the_dataclass(message)


async def test_buffered_messages_count_once_in_an_external_stores_metrics() -> None:
    """Defect 13: over an external store, a buffered message is leased (in flight for the
    store) but still waiting for the dispatcher: it counts once, as waiting."""
    clock = ManualClock(1_000.0)
    storage: ReferenceStorage[Any] = ReferenceStorage(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage, LLMQueueDispatcherConfig(clock=clock, buffer_size=4)
    )
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(10)])
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


def dispatchers(clock: ManualClock) -> dict[str, LLMQueueDispatcher[Any]]:
    memory: QueueStorageAdapter[Any] = InMemoryStorage(clock=clock)
    reference: QueueStorageAdapter[Any] = ReferenceStorage(clock=clock)
    return {
        "memory": LLMQueueDispatcher(memory, LLMQueueDispatcherConfig(clock=clock)),
        "prefetch": LLMQueueDispatcher(
            reference, LLMQueueDispatcherConfig(clock=clock, enable_prefetch=True, prefetch_interval=0.01)
        ),
    }


@pytest.mark.parametrize("source", ["memory", "prefetch"])
def test_a_dispatcher_serves_a_second_event_loop(source: str) -> None:
    """Defect 13: the same dispatcher used in two `asyncio.run()` calls one after the other:
    enqueue, dequeue, a timed-out wait, and a wait woken by an enqueue all work in both."""
    clock = ManualClock(1_000.0)
    dispatcher = dispatchers(clock)[source]
    limiter: LLMThrottle = native_limiter(ManualClock())

    async def one_run(tag: str) -> list[str]:
        await dispatcher.enqueue(request(f"{tag}-1"))
        first = await dispatcher.dequeue(limiter, timeout=1.0)
        assert first is not None
        await first.mark_as_processed()
        assert await dispatcher.dequeue(limiter, timeout=0.02) is None  # waits, times out
        waiting = asyncio.ensure_future(dispatcher.dequeue(limiter, timeout=5.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await dispatcher.enqueue(request(f"{tag}-2"))
        second = await waiting  # woken by the enqueue
        assert second is not None
        await second.mark_as_processed()
        return [first.message.payload.id, second.message.payload.id]

    assert asyncio.run(one_run("first")) == ["first-1", "first-2"]
    assert asyncio.run(one_run("second")) == ["second-1", "second-2"]
    dispatcher.stop()


@given(st.integers(0, 10_000), st.integers(1, 10_000))
@example(0, 1)
def test_one_accuracy_formula_for_efficiency_and_history(estimated: int, actual: int) -> None:
    """Defect 13: the efficiency metric and the history's estimation accuracy use one formula,
    also when the estimate is 0, where the two used to disagree. (An actual count of 0 is a
    refund, not a measurement: see tests/throttle/test_estimation_accuracy.py.)"""
    limiter = native_limiter(ManualClock(), tpm=1_000_000)
    assert limiter.consume("a", estimated)
    limiter.adjust_consumption("a", actual)
    metrics = limiter.get_metrics()
    assert metrics.efficiency == metrics.consumption_history.estimation_accuracy
    if estimated == actual:
        assert metrics.efficiency == 1.0
    elif min(estimated, actual) == 0:
        assert metrics.efficiency == 0.0
