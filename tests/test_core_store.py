"""`StoreCore` specifics beyond the conformance suite: messages identical to Python validation,
garbage collection of cycles through payloads, clocks, the dead-letter hand-off."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    DuplicateRequestError,
    InMemoryStorage,
    InvalidConfigError,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    ManualClock,
    MessageAttributes,
    QueueMessage,
    TokenInfo,
)
from llm_queue_dispatcher._core import StoreCore
from tests.dispatcher.books import native_limiter, request


def make(rid: str = "a", **kw: Any) -> LLMRequest[Any]:
    return LLMRequest(id=rid, payload=None, **kw)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("id", 3),
        ("priority", 9),
        ("priority", False),
        ("priority", 2.0),
        ("token_info", 5),
        ("expected_processing_time", -0.5),
        ("expected_processing_time", True),
        ("metadata", 5),
        ("created_at", "2026-01-01"),
    ],
)
def test_rust_validation_messages_equal_python_ones(field: str, value: Any) -> None:
    request = make()
    setattr(request, field, value)
    with pytest.raises(InvalidRequestError) as python_error:
        request.validate()
    with pytest.raises(InvalidRequestError) as rust_error:
        StoreCore().enqueue(request)
    assert str(rust_error.value) == str(python_error.value)


@pytest.mark.parametrize("estimated", [-2, 2.5, math.nan, True, None])
def test_rust_token_messages_equal_python_ones(estimated: Any) -> None:
    request = make()
    object.__setattr__(request.token_info, "estimated", estimated)
    with pytest.raises(InvalidRequestError) as python_error:
        request.validate()
    with pytest.raises(InvalidRequestError) as rust_error:
        StoreCore().enqueue(request)
    assert str(rust_error.value) == str(python_error.value)


def test_integral_floats_and_huge_token_counts_are_accepted() -> None:
    core = StoreCore(clock=ManualClock())
    big = make("big", token_info=TokenInfo(10**30))
    floaty = make("floaty")
    object.__setattr__(floaty.token_info, "estimated", 12.0)
    big_parts = make("big-parts", token_info=TokenInfo(input=10**30, max_output=0))
    assert len(core.enqueue_batch([big, floaty, big_parts])) == 3


def test_cycles_through_payloads_are_collected() -> None:
    class Holder:
        storage: Any = None

    storage: InMemoryStorage[Any] = InMemoryStorage(clock=ManualClock())
    holder = Holder()
    holder.storage = storage  # storage -> request -> holder -> storage
    storage.core.enqueue(LLMRequest(id="cycle", payload=holder))
    storage.core.dequeue(1, 30.0)
    refs = [weakref.ref(storage.core), weakref.ref(holder)]
    del storage, holder
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_cycles_through_callable_clocks_and_dead_letter_stores_are_collected() -> None:
    class Clock:
        core: Any = None

        def __call__(self) -> float:
            return 0.0

    clock = Clock()
    dead = StoreCore(clock=clock)
    core = StoreCore(clock=clock, dead_letter=dead, max_receive_count=1)
    clock.core = core
    refs = [weakref.ref(core), weakref.ref(dead), weakref.ref(clock)]
    del clock, dead, core
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_a_callable_clock_drives_datetimes() -> None:
    now = [100.25]
    core = StoreCore(clock=lambda: now[0])
    message = core.enqueue(make())
    assert message.attributes.enqueued_at == datetime.fromtimestamp(100.25, timezone.utc)
    now[0] = 200.0
    [received] = core.dequeue(1, 5)
    assert received.attributes.first_received_at == datetime.fromtimestamp(200.0, timezone.utc)
    assert core.next_visibility_change() == 205.0


def test_a_clock_that_returns_nan_is_refused() -> None:
    with pytest.raises(InvalidConfigError):
        StoreCore(clock=lambda: math.nan)
    with pytest.raises(InvalidConfigError):
        StoreCore(clock="soon")


def test_the_wall_clock_is_the_default() -> None:
    message = StoreCore().enqueue(make())
    age = datetime.now(timezone.utc) - message.attributes.enqueued_at
    assert 0 <= age.total_seconds() < 60


def test_dead_letters_chain_through_stores() -> None:
    clock = ManualClock()
    last = StoreCore(clock=clock)
    middle = StoreCore(clock=clock, max_receive_count=1, dead_letter=last)
    first = StoreCore(clock=clock, max_receive_count=1, dead_letter=middle)
    request = make()
    first.enqueue(request)
    first.dequeue(1, 1.0)
    clock.advance(1)
    assert (first.visible_count(), middle.visible_count()) == (0, 1)
    middle.dequeue(1, 1.0)
    clock.advance(1)
    assert last.visible_count() == 0  # expiry is found by the source's next operation
    assert middle.in_flight_count() == 0
    [final] = last.peek(2, 5)
    assert final.payload is request
    assert middle.dead_letter is last
    assert first.attributes()["dead_lettered"] == 1


def test_a_dead_letter_duplicate_is_kept_not_dropped() -> None:
    # A dead-letter store that already holds a message with the same id keeps the second copy:
    # dropping it would lose a request (it used to be counted and stored nowhere).
    clock = ManualClock()
    dead = StoreCore(clock=clock)
    dead.enqueue(make())
    core = StoreCore(clock=clock, max_receive_count=1, dead_letter=dead)
    core.enqueue(make())
    core.dequeue(1, 1.0)
    clock.advance(1)
    assert core.visible_count() == 0
    assert dead.visible_count() == 2
    assert core.attributes()["dead_lettered"] == 1
    with pytest.raises(DuplicateRequestError):
        dead.enqueue(make())  # an ordinary enqueue still refuses the id
    first, second = dead.dequeue(2, 30.0)
    assert first.payload.id == second.payload.id
    assert first.id != second.id
    dead.delete(first.attributes.receipt_handle)
    dead.delete(second.attributes.receipt_handle)
    assert dead.visible_count() == 0
    dead._check_invariants()


def test_counts_and_introspection() -> None:
    clock = ManualClock(10.0)
    core = StoreCore(clock=clock, max_receive_count=4, message_retention=math.inf)
    core.enqueue_batch([make("u", priority=0), make("l", priority=3), make("l2", priority=3)])
    assert core.counts_by_priority() == [1, 0, 0, 2]
    assert core.oldest_enqueued_at() == 10.0
    core.dequeue(1, 3.0)
    assert (core.visible_count(), core.in_flight_count()) == (2, 1)
    assert core.next_visibility_change() == 13.0
    assert core.now() == 10.0
    assert (core.max_receive_count, core.message_retention, core.clock) == (4, math.inf, clock)
    assert "visible=2" in repr(core)
    core._check_invariants()


def test_dead_letter_must_be_a_store_core() -> None:
    with pytest.raises(InvalidConfigError, match="dead_letter"):
        StoreCore(dead_letter=InMemoryStorage())  # type: ignore[arg-type]


def test_a_dead_letter_target_must_be_an_in_memory_storage() -> None:
    from llm_queue_dispatcher import InMemoryStorage, InvalidConfigError

    with pytest.raises(InvalidConfigError):
        InMemoryStorage(dead_letter="elsewhere")  # type: ignore[arg-type]


def test_batch_building_leaves_the_garbage_collector_as_it_found_it() -> None:
    import gc

    from llm_queue_dispatcher import LLMRequest
    from llm_queue_dispatcher._core import StoreCore

    core = StoreCore()
    assert gc.isenabled()
    core.enqueue_batch([LLMRequest(f"a{i}", i) for i in range(10)])
    assert gc.isenabled()
    gc.disable()
    try:
        core.enqueue_batch([LLMRequest(f"b{i}", i) for i in range(10)])
        assert not gc.isenabled()
    finally:
        gc.enable()
    from llm_queue_dispatcher import InvalidRequestError

    with pytest.raises(InvalidRequestError):  # a bad request fails the whole batch
        core.enqueue_batch([LLMRequest("c", 1), "not a request"])
    assert gc.isenabled()


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
    assert list(message.__getstate__()) == [f.name for f in dataclasses.fields(QueueMessage)]
    assert list(message.attributes.__getstate__()) == [f.name for f in dataclasses.fields(MessageAttributes)]
    twin = rebuilt(message)
    assert message.__getstate__() == twin.__getstate__()
    assert message.attributes.__getstate__() == twin.attributes.__getstate__()
    assert message == twin
    assert repr(message) == repr(twin)
    assert dataclasses.asdict(message) == dataclasses.asdict(twin)
    assert dataclasses.replace(message) == message
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.attributes.receive_count = 99  # type: ignore[misc]


async def test_messages_from_every_rust_path_are_the_dataclasses() -> None:
    """Enqueue, batch enqueue, peek, dequeue, the dispatch step and take_unfittable
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


# Request ids around the length the store keeps inline (23 bytes of UTF-8), ASCII and
# multi-byte (a character must not be split at the limit), and a few long ones.
EDGE_IDS = [
    *("x" * n for n in range(1, 27)),
    *("é" * n for n in (11, 12)),  # 22 and 24 bytes
    "é" * 11 + "a",  # 23 bytes
    "😀" * 5 + "abc",  # 23 bytes
    "😀" * 6,  # 24 bytes
    "a" * 22 + "😀",  # 26 bytes: the last character crosses the limit
    " x",
    "\tid",
    "req-" + "0" * 60,
]


def test_request_ids_of_every_length_round_trip_through_the_store() -> None:
    """The store reports back exactly the ids it was given (here as the ids of dead-lettered
    messages), recognises them as duplicates, and tells apart ids that differ in the last byte."""
    clock = ManualClock(0.0)
    core = StoreCore(clock=clock, max_receive_count=1)
    ended: list[str] = []
    core.set_ended_listener(lambda dead, expired: ended.extend(dead))
    core.enqueue_batch([make(rid) for rid in EDGE_IDS])
    for rid in EDGE_IDS:
        with pytest.raises(DuplicateRequestError):
            core.enqueue(make(rid))
    near = list(dict.fromkeys(rid[:-1] + ("y" if rid[-1] != "y" else "z") for rid in EDGE_IDS))
    near = [rid for rid in near if rid not in EDGE_IDS]
    core.enqueue_batch([make(rid) for rid in near])
    received = core.dequeue(len(EDGE_IDS) * 2, 1.0)
    assert sorted(m.payload.id for m in received) == sorted(EDGE_IDS + near)
    clock.advance(2.0)
    core.dequeue(1, 1.0)  # the expired receives are dead-lettered, reported by id
    assert sorted(ended) == sorted(EDGE_IDS + near)
    core._check_invariants()


def test_batch_enqueued_messages_are_the_ones_the_store_holds() -> None:
    """Each message of a batch names the message the store holds (the id a peek reports), ids
    are unique, and every message equals its twin built by the public constructors, pickles,
    and has hashable attributes equal to the twin's."""
    import pickle

    core = StoreCore(clock=ManualClock(1_700_000_000.25))
    batch = core.enqueue_batch([make(rid) for rid in EDGE_IDS])
    assert [m.payload.id for m in batch] == EDGE_IDS
    assert len({m.id for m in batch}) == len(batch)
    peeked = {m.payload.id: m for m in core.peek(2, len(batch))}
    for message in batch:
        assert_exactly_the_dataclass(message)
        assert message == peeked[message.payload.id]
        twin = rebuilt(message)
        assert hash(message.attributes) == hash(twin.attributes)
        assert message.attributes.enqueued_at == datetime(2023, 11, 14, 22, 13, 20, 250_000, timezone.utc)
        copy = pickle.loads(pickle.dumps(message))
        assert copy == message
        assert type(copy.attributes) is MessageAttributes


def test_message_attributes_stay_out_of_the_collector_and_messages_in_it() -> None:
    """`MessageAttributes` hold atomic values only, so the store leaves them untracked (as
    CPython does atomic tuples); the message, which holds the caller's request, stays tracked,
    and a cycle through the request is still collected."""
    core = StoreCore()
    request = make("cyclic")
    request.metadata["self"] = request
    [message] = core.enqueue_batch([request])
    [received] = core.dequeue(1, 30.0)
    assert gc.is_tracked(message)
    assert gc.is_tracked(received)
    assert not gc.is_tracked(message.attributes)
    assert not gc.is_tracked(received.attributes)
    request.metadata["message"] = message
    alive = weakref.ref(request)
    core.delete(received.attributes.receipt_handle)
    del request, message, received
    gc.collect()
    assert alive() is None


def test_batch_enqueued_attributes_behave_as_constructed_ones() -> None:
    """The attributes the store builds for a batch and for a single enqueue (without running
    the dataclass's ``__init__``) behave as `MessageAttributes` built by its constructor: same
    state in field order, equality, hashing, repr, fields, copies, pickles, weak
    references, frozen, out of the collector."""
    import copy
    import pickle

    core = StoreCore(clock=ManualClock(1_700_000_000.5))
    batch = core.enqueue_batch([make(f"b{i}") for i in range(3)])
    single = core.enqueue(make("single"))
    for message in [*batch, single]:
        attributes = message.attributes
        twin = rebuilt(message).attributes
        assert type(attributes) is MessageAttributes
        assert isinstance(attributes, MessageAttributes)
        assert list(attributes.__getstate__().items()) == list(twin.__getstate__().items())
        assert attributes == twin
        assert hash(attributes) == hash(twin)
        assert repr(attributes) == repr(twin)
        assert dataclasses.fields(attributes) == dataclasses.fields(twin)
        assert dataclasses.astuple(attributes) == dataclasses.astuple(twin)
        assert dataclasses.replace(attributes, receive_count=1) == dataclasses.replace(twin, receive_count=1)
        pickled = pickle.loads(pickle.dumps(attributes))
        for copied in (copy.copy(attributes), copy.deepcopy(attributes), pickled):
            assert copied == twin
            assert type(copied) is MessageAttributes
        assert copy.deepcopy(message) == rebuilt(message)
        assert weakref.ref(attributes)() is attributes
        with pytest.raises(dataclasses.FrozenInstanceError):
            attributes.message_id = "other"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            attributes.extra = 1  # type: ignore[attr-defined]
        assert not gc.is_tracked(attributes)
    # Each message has its own attributes, never shared within a batch.
    assert len({id(m.attributes) for m in batch}) == len(batch)
    assert [m.attributes.message_id for m in batch] == [m.id for m in batch]


def test_messages_copy_and_pickle_with_every_protocol() -> None:
    """Messages and their attributes keep their fields in slots, and still pickle with every
    protocol, copy, deep-copy (a cycle through the request included), take weak references and
    refuse new attributes; a pickle whose state is the dict of the fields (as one made when the
    fields were in a per-instance dict) loads into an equal message."""
    import copy
    import pickle

    core = StoreCore(clock=ManualClock(1_700_000_000.0))
    request = make("cyclic")
    [message] = core.enqueue_batch([request])
    request.metadata["message"] = message
    twin = rebuilt(message)
    # The copies' requests hold the copies (a cycle): compared field by field, not with ==.
    copies = [pickle.loads(pickle.dumps(message, p)) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    for loaded in [*copies, copy.deepcopy(message)]:
        assert type(loaded) is QueueMessage
        assert (loaded.id, loaded.attributes) == (message.id, twin.attributes)
        assert loaded.payload is not request
        assert loaded.payload.id == request.id
        assert loaded.payload.metadata["message"] is loaded
    assert copy.copy(message) == twin
    assert weakref.ref(message)() is message
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        object.__setattr__(message, "extra", 1)

    class AsBefore:
        """Pickles as a dataclass instance with a ``__dict__`` did: a new instance, then the
        dict of its fields as its state."""

        def __init__(self, cls: type, state: dict[str, Any]) -> None:
            self.cls, self.state = cls, state

        def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
            return (object.__new__, (self.cls,), self.state)

    fields = {f.name: getattr(twin.attributes, f.name) for f in dataclasses.fields(MessageAttributes)}
    plain = make("plain")
    old = AsBefore(
        QueueMessage, {"id": message.id, "payload": plain, "attributes": AsBefore(MessageAttributes, fields)}
    )
    loaded = pickle.loads(pickle.dumps(old, 2))
    assert type(loaded) is QueueMessage
    assert type(loaded.attributes) is MessageAttributes
    assert loaded == QueueMessage(message.id, plain, twin.attributes)


def test_batch_message_attributes_are_built_on_first_read_and_kept() -> None:
    """A batch's messages read their `MessageAttributes` as if built eagerly: the same object
    on every read, equal to the constructor's, out of the collector; a message whose attributes
    were never read compares, prints, copies, pickles and is replaced as an eager one; a value
    set past the frozen ``__setattr__`` replaces them; a deleted field is gone."""
    import copy
    import pickle

    core = StoreCore(clock=ManualClock(1_700_000_000.5))
    at = datetime(2023, 11, 14, 22, 13, 20, 500_000, timezone.utc)
    batch = core.enqueue_batch([make(f"m{i}") for i in range(6)])
    eager = [QueueMessage(m.id, m.payload, MessageAttributes(m.id, "", at, 0, None)) for m in batch]
    first = batch[0].attributes
    assert batch[0].attributes is first
    assert first == eager[0].attributes
    assert not gc.is_tracked(first)
    assert batch[1] == eager[1]  # compared before any read of its attributes
    assert repr(batch[2]) == repr(eager[2])
    assert copy.copy(batch[3]) == eager[3]
    assert pickle.loads(pickle.dumps(batch[4])) == eager[4]
    assert dataclasses.replace(batch[5], id="other") == dataclasses.replace(eager[5], id="other")
    [unread] = core.enqueue_batch([make("set")])
    other = MessageAttributes("x", "h", at, 1, at)
    object.__setattr__(unread, "attributes", other)
    assert unread.attributes is other
    [gone] = core.enqueue_batch([make("deleted")])
    object.__delattr__(gone, "attributes")
    with pytest.raises(AttributeError):
        _ = gone.attributes
    assert [f.name for f in dataclasses.fields(QueueMessage)] == ["id", "payload", "attributes"]
    assert QueueMessage(first.message_id, make("c"), first).attributes is first
    with pytest.raises(TypeError, match="member descriptors"):
        type(QueueMessage.__dict__["attributes"])(QueueMessage.__dict__["id"], property())
    with pytest.raises(TypeError, match="doesn't apply to a 'object' object"):
        QueueMessage.__dict__["attributes"].__get__(object())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 10_000),
            st.none() | st.floats(0.0, 1e6),
            st.none() | st.sampled_from(["t1", "t2", "ü"]),
        ),
        max_size=40,
    ),
    st.floats(0.0, 4e9),
)
def test_batch_enqueue_returns_the_messages_a_constructor_would_build(
    fields: list[tuple[int, int, float | None, str | None]], now: float
) -> None:
    """Each message a batch returns equals, and has the state, repr and hash of attributes of,
    the message built by the dataclasses' constructors from the request, its message id and the
    batch's instant; the ids are distinct and name the stored messages."""
    core = StoreCore(clock=ManualClock(now))
    requests = [
        make(f"r{i}", priority=p, token_info=TokenInfo(t), expected_processing_time=e, tenant=n)
        for i, (p, t, e, n) in enumerate(fields)
    ]
    batch = core.enqueue_batch(requests)
    assert type(batch) is list
    # The clock's reading to the microsecond, halves away from zero (the store's rounding).
    enqueued_at = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(
        microseconds=math.floor(now * 1e6 + 0.5)
    )
    for message, req in zip(batch, requests, strict=True):
        eager = QueueMessage(
            id=message.id,
            payload=req,
            attributes=MessageAttributes(message.id, "", enqueued_at, 0, None),
        )
        assert message == eager
        assert message.payload is req
        assert repr(message) == repr(eager)
        assert message.__getstate__() == eager.__getstate__()
        assert hash(message.attributes) == hash(eager.attributes)
        assert dataclasses.astuple(message) == dataclasses.astuple(eager)
    assert len({m.id for m in batch}) == len(batch)
    peeked = [m for priority in range(4) for m in core.peek(priority, len(batch) + 1)]
    assert sorted(m.id for m in peeked) == sorted(m.id for m in batch)


def test_requests_whose_class_reads_attributes_its_own_way_are_read_through_it() -> None:
    """The store reads a request's fields directly only when its class looks attributes up the
    default way; a subclass with its own ``__getattribute__`` is read through it (here it shows
    a bad priority, which the store refuses, while the stored field is fine)."""

    class Shown(LLMRequest[Any]):
        lying = False  # set once built: construction validates the priority too

        def __getattribute__(self, name: str) -> Any:
            if name == "priority" and type(self).lying:
                return 7
            return super().__getattribute__(name)

    core = StoreCore(clock=ManualClock(0.0))
    request = Shown("r", None)
    Shown.lying = True
    assert vars(request)["priority"] == 2
    with pytest.raises(InvalidRequestError, match=r"priority must be within 0\.\.3, got 7"):
        core.enqueue_batch([make("fine"), request])
    assert core.enqueue_batch([make("fine")])[0].payload.id == "fine"  # the batch left nothing
