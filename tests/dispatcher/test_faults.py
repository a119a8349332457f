"""Every error path of a dispatch keeps the books.

A failure after the budget was reserved releases the reservation whole (its request slot too:
``rpm.available`` is checked along with ``tpm.available``) and records nothing; a failure after
a receive leaves no message in flight without an owner; a failing dead-letter hand-off loses
nothing. Each test injects one fault, then compares the limiter, the store and the dispatcher
with what was handed out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    InvalidConfigError,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMThrottle,
    ManualClock,
    ProcessableMessage,
    ScoringConfig,
)
from tests.dispatcher.books import BookLimiter, FaultyClock, books, native_limiter, request


def scored(scorer: Callable[[Any, Any], float] | None) -> ScoringConfig | None:
    return None if scorer is None else ScoringConfig(custom_scorers=[CustomScorer("probe", 0.1, scorer)])


def make(
    clock: Any, scorer: Callable[[Any, Any], float] | None = None, **storage_options: Any
) -> tuple[InMemoryStorage[Any], LLMQueueDispatcher[Any]]:
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=clock, **storage_options)
    config = LLMQueueDispatcherConfig(clock=clock, scoring=scored(scorer), min_score_threshold=0.0)
    return storage, LLMQueueDispatcher(storage, config)


def limiter_of(kind: str) -> Any:
    # The limiter's clock never moves: nothing refills, so any leak shows.
    return native_limiter(ManualClock(), rpm=600, tpm=100_000) if kind == "native" else BookLimiter()


LIMITERS = ["native", "python"]
SCORERS = {"no scorer": None, "custom scorer": lambda message, context: 0.5}


async def assert_intact(
    limiter: Any,
    storage: InMemoryStorage[Any],
    dispatcher: LLMQueueDispatcher[Any],
    held: list[ProcessableMessage[Any]],
    *,
    visible: int,
    others_in_flight: int = 0,
    reports: bool = True,
) -> None:
    """The books after a failure: exactly the jobs ``held`` are reserved and in flight (plus
    ``others_in_flight`` messages received by another consumer, which reserved nothing)."""
    state = await books(limiter, storage, dispatcher, reports=reports)
    if isinstance(limiter, LLMThrottle):
        assert state.requests_available == pytest.approx(600 - len(held))
        reserved = sum(job.message.payload.token_info.estimated for job in held)
        assert state.tokens_available == pytest.approx(100_000 - reserved)
        assert limiter.get_metrics().consumption_history.count == len(held)
    else:
        # Reserved under each delivery's key: the request id and its delivery number.
        assert limiter.requests == {job._key: 1 for job in held}
        assert limiter.tokens == {job._key: job.message.payload.token_info.estimated for job in held}
        assert all(
            job._key == f"{job.message.payload.id}#{job.message.attributes.receive_count}" for job in held
        )
        assert (limiter.settled_requests, limiter.settled_tokens) == (0, 0)
    assert state.in_flight == len(held) + others_in_flight
    assert state.active_requests == len(held)
    assert state.visible == visible
    storage.core._check_invariants()


@pytest.mark.parametrize("kind", LIMITERS)
@pytest.mark.parametrize("scorer", list(SCORERS))
@pytest.mark.parametrize("nth", range(1, 13))
async def test_a_store_clock_failing_at_any_reading(kind: str, scorer: str, nth: int) -> None:
    """The store's (and dispatcher's) clock raises at its n-th reading during a
    dequeue, whichever step that falls in: the dequeue either hands out a job whose books are
    right or raises with nothing reserved and nothing in flight."""
    clock = FaultyClock(ManualClock(1_000.0))
    storage, dispatcher = make(clock, SCORERS[scorer])
    limiter = limiter_of(kind)
    await dispatcher.batch_enqueue([request(f"r{i}", tokens=100 + i) for i in range(3)])
    clock.fail_at(nth)
    try:
        job = await dispatcher.dequeue(limiter)
    except OSError:
        held = []
    else:
        assert job is not None
        held = [job]
    clock.disarm()
    await assert_intact(limiter, storage, dispatcher, held, visible=3 - len(held))
    # Nothing was lost: the rest can still be dispatched and settled.
    for _ in range(3 - len(held)):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        held.append(job)
    for job in held:
        await job.mark_as_failed(RuntimeError("x"), retry_after=60.0)
    assert (await books(limiter, storage, dispatcher)).in_flight == 3


@pytest.mark.parametrize("kind", LIMITERS)
@pytest.mark.parametrize("scorer", list(SCORERS))
async def test_the_config_is_read_once_so_a_later_change_cannot_fail_a_dispatch(
    kind: str, scorer: str
) -> None:
    """A visibility timeout the store would refuse, set on the dispatcher's config after its
    construction, never reaches a dispatch: the config is validated and read once, and the
    dispatcher's copy refuses the change."""
    clock = ManualClock(1_000.0)
    storage, dispatcher = make(clock, SCORERS[scorer])
    limiter = limiter_of(kind)
    await dispatcher.enqueue(request("a"))
    for bad in (50_000.0, -1.0, float("nan")):
        with pytest.raises(InvalidConfigError, match="visibility_timeout cannot change"):
            dispatcher.config.visibility_timeout = bad
    assert dispatcher.config.visibility_timeout == 30.0
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await assert_intact(limiter, storage, dispatcher, [job], visible=0)
    assert storage.core.next_visibility_change() == 1_000.0 + 30.0  # the timeout given at construction


@pytest.mark.parametrize("scorer", list(SCORERS))
@pytest.mark.parametrize("nth", range(1, 7))
async def test_a_lost_race_with_the_native_limiter(scorer: str, nth: int) -> None:
    """Another consumer receives every visible message while a dispatch step runs (at
    the n-th reading of the limiter's Python clock, between selection, reservation and take):
    a reservation made for a message that is gone is released whole."""
    store_clock = ManualClock(1_000.0)
    storage, dispatcher = make(store_clock, SCORERS[scorer])
    limiter_clock = FaultyClock(ManualClock())
    limiter = LLMThrottle(600, 100_000, clock=limiter_clock)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(3)])
    stolen: list[Any] = []
    limiter_clock.hook_at(nth, lambda: stolen.extend(storage.core.dequeue(10, 60.0)))
    job = await dispatcher.dequeue(limiter)
    limiter_clock.disarm()
    held = [] if job is None else [job]
    visible = 3 - len(held) - len(stolen)
    await assert_intact(limiter, storage, dispatcher, held, visible=visible, others_in_flight=len(stolen))


@pytest.mark.parametrize("scorer", list(SCORERS))
async def test_another_consumer_receiving_while_the_limiter_answers_leaves_the_winner_ours(
    scorer: str,
) -> None:
    """With a plain-Python limiter: the winner is taken before its reservation is
    asked for (under its delivery's key), so another consumer receiving every visible message
    from inside the limiter's `consume` gets the others; the winner is handed out, reserved once."""
    clock = ManualClock(1_000.0)
    storage, dispatcher = make(clock, SCORERS[scorer])
    stolen: list[Any] = []

    class Racing(BookLimiter):
        def consume(self, request_id: str, estimated_tokens: int, metadata: Any = None) -> bool:
            stolen.extend(storage.core.dequeue(10, 60.0))
            return super().consume(request_id, estimated_tokens, metadata)

    limiter = Racing()
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(3)])
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert limiter.calls["consume"] == 1
    assert job.message.payload.id not in {m.payload.id for m in stolen}
    await assert_intact(limiter, storage, dispatcher, [job], visible=0, others_in_flight=2)


@pytest.mark.parametrize("kind", LIMITERS)
@pytest.mark.parametrize("scorer", list(SCORERS))
async def test_a_failed_take_puts_the_message_back_and_releases(kind: str, scorer: str) -> None:
    """The message is received but its `QueueMessage` cannot be built (the store's
    clock jumped past the datetime range): the receive is undone — visible again, receive count
    as before — and the reservation released whole."""
    clock = FaultyClock(ManualClock(1_000.0))
    storage, dispatcher = make(clock, SCORERS[scorer], message_retention=float("inf"))
    limiter = limiter_of(kind)
    await dispatcher.enqueue(request("a"))
    clock.offset = 1e12  # year ~33,700: no datetime holds it
    with pytest.raises(InvalidRequestError):
        await dispatcher.dequeue(limiter)
    clock.offset = 0.0
    # (The store's last-modified instant stays in year ~33,700, so its attributes cannot be
    # reported as datetimes any more: the counts are read directly.)
    await assert_intact(limiter, storage, dispatcher, [], visible=1, reports=False)
    [message] = await storage.peek_messages_by_priority(2, 10)
    assert message.attributes.receive_count == 0
    assert message.attributes.first_received_at is None


@pytest.mark.parametrize("kind", LIMITERS)
@pytest.mark.parametrize("scorer", list(SCORERS))
async def test_a_failing_dead_letter_hand_off_loses_nothing(kind: str, scorer: str) -> None:
    """A message dead-lettered during a dispatch cannot be handed to the dead-letter
    store (its clock raises): the dispatch is unaffected, the message waits and arrives at the
    next operation once the dead-letter store works again."""
    clock = ManualClock(1_000.0)
    dead_clock = FaultyClock(ManualClock(1_000.0))
    dead: InMemoryStorage[Any] = InMemoryStorage(clock=dead_clock)
    storage, dispatcher = make(clock, SCORERS[scorer], max_receive_count=1, dead_letter=dead)
    limiter = limiter_of(kind)
    await dispatcher.enqueue(request("doomed"))
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    await dispatcher.enqueue(request("next"))
    clock.advance(31.0)  # the lease of "doomed" runs out: dead-lettered at the next operation
    dead_clock.fail_at(1)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "next"
    assert (await storage.get_queue_attributes()).dead_lettered == 1
    [moved] = await dead.peek_messages_by_priority(2, 10)
    assert moved.payload.id == "doomed"
    # The stale first delivery settles without touching the next one's books.
    await job.mark_as_processed()
    assert (await books(limiter, storage, dispatcher)).in_flight == 0


@pytest.mark.parametrize("kind", LIMITERS)
async def test_a_dead_letter_store_that_stays_down_keeps_the_message(kind: str) -> None:
    """While the dead-letter store keeps failing, dispatches go on and the dead letter
    waits (counted once); it is delivered when the store recovers."""
    clock = ManualClock(1_000.0)
    dead_clock = ManualClock(1_000.0)
    broken = {"on": False}

    def dead_now() -> float:
        if broken["on"]:
            raise OSError("dead-letter store down")
        return dead_clock.now()

    dead: InMemoryStorage[Any] = InMemoryStorage(clock=dead_now)
    storage, dispatcher = make(clock, max_receive_count=1, dead_letter=dead)
    limiter = limiter_of(kind)
    await dispatcher.enqueue(request("doomed"))
    assert await dispatcher.dequeue(limiter) is not None
    broken["on"] = True
    clock.advance(31.0)
    for i in range(3):
        await dispatcher.enqueue(request(f"n{i}"))
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed()
    assert (await storage.get_queue_attributes()).dead_lettered == 1
    broken["on"] = False
    assert await dead.get_approximate_message_count() == 0  # not handed over yet
    await storage.get_approximate_message_count()  # any operation of the source hands it over
    [moved] = await dead.peek_messages_by_priority(2, 10)
    assert moved.payload.id == "doomed"
    assert (await storage.get_queue_attributes()).dead_lettered == 1


@pytest.mark.parametrize("method", ["consume", "get_metrics"])
@pytest.mark.parametrize("scorer", list(SCORERS))
async def test_a_failing_python_limiter_leaves_nothing_taken(method: str, scorer: str) -> None:
    """A non-native limiter whose `consume` (or `get_metrics`) raises: the error
    propagates, nothing is received, nothing reserved."""
    clock = ManualClock(1_000.0)
    storage, dispatcher = make(clock, SCORERS[scorer])
    limiter = BookLimiter(fail_on={method})
    await dispatcher.enqueue(request("a"))
    with pytest.raises(RuntimeError, match="injected"):
        await dispatcher.dequeue(limiter)
    await assert_intact(limiter, storage, dispatcher, [], visible=1)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await assert_intact(limiter, storage, dispatcher, [job], visible=0)


@pytest.mark.parametrize("kind", LIMITERS)
@pytest.mark.parametrize("call", range(1, 4))
async def test_a_raising_custom_scorer_reserves_nothing(kind: str, call: int) -> None:
    """A custom scorer raising at its first, second or third evaluation of a dequeue
    (a job is already out): the exception propagates, nothing more is reserved or received."""
    calls = {"n": 0, "fail_at": 0}

    def scorer(message: Any, context: Any) -> float:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyError("scorer bug")
        # Distinct scores with the older messages best: every candidate gets evaluated.
        return 1.0 - 0.3 * int(message.payload.id[1:])

    clock = ManualClock(1_000.0)
    storage, dispatcher = make(clock, scorer)
    limiter = limiter_of(kind)
    await dispatcher.batch_enqueue([request(f"r{i}") for i in range(4)])
    first = await dispatcher.dequeue(limiter)
    assert first is not None
    calls["fail_at"] = calls["n"] + call
    with pytest.raises(KeyError, match="scorer bug"):
        await dispatcher.dequeue(limiter)
    await assert_intact(limiter, storage, dispatcher, [first], visible=3)
