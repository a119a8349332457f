"""One request id rule at every door, and text Rust cannot hold is refused.

A whitespace-only id used to pass `LLMRequest` and the store while the limiter refused it: one
such request stopped every later dequeue with a non-native limiter and broke both marks with
`LLMThrottle`. Now `LLMRequest`, the store (which validates again at enqueue, since fields are
mutable) and the limiter apply the same rule; ids and tenants with lone surrogates are refused
with `InvalidRequestError` everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMRequest,
    ManualClock,
)
from tests.dispatcher.books import BookLimiter, native_limiter, request

WHITESPACE = [" ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2003", "\u2028", "\u3000"]
# Python's str.isspace() counts these four separators, Unicode White_Space does not: the doors
# must still agree on them.
SEPARATORS = ["\x1c", "\x1d", "\x1e", "\x1f"]
SURROGATES = ["\ud800", "a\udfff", "\udc00b"]


def valid_request(request_id: str = "ok") -> LLMRequest[Any]:
    return request(request_id)


def request_door(candidate: str) -> bool:
    try:
        LLMRequest(candidate, None)
    except InvalidRequestError:
        return False
    return True


def validate_door(candidate: str) -> bool:
    mutated = valid_request()
    mutated.id = candidate
    try:
        mutated.validate()
    except InvalidRequestError:
        return False
    return True


def store_door(candidate: str) -> bool:
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=ManualClock())
    mutated = valid_request()
    mutated.id = candidate
    try:
        storage.core.enqueue(mutated)
    except InvalidRequestError:
        assert storage.core.visible_count() == 0  # refused: nothing changed
        return False
    return True


def limiter_door(candidate: str) -> bool:
    limiter = native_limiter(ManualClock())
    try:
        limiter.consume(candidate, 1)
    except InvalidRequestError:
        assert limiter.get_metrics().rpm.available == 600  # refused: nothing taken
        return False
    return True


DOORS = [request_door, validate_door, store_door, limiter_door]


@pytest.mark.parametrize("candidate", ["", *WHITESPACE, *(w * 3 for w in WHITESPACE), " \u3000\t"])
def test_whitespace_only_ids_are_refused_at_every_door(candidate: str) -> None:
    """An empty or whitespace-only id is refused by `LLMRequest`, `validate()`, the
    store and the limiter alike."""
    assert [door(candidate) for door in DOORS] == [False] * len(DOORS)


@pytest.mark.parametrize("candidate", ["a", " a ", "\ta", *SEPARATORS, " \x1f ", "\u200b", "\ufeff"])
def test_ids_with_content_are_accepted_at_every_door(candidate: str) -> None:
    """What is not only whitespace passes every door (the same rule everywhere)."""
    assert [door(candidate) for door in DOORS] == [True] * len(DOORS)


@given(st.lists(st.sampled_from([*WHITESPACE, *SEPARATORS, "a", "\u200b", "\x00"]), max_size=6).map("".join))
def test_the_doors_agree_on_every_id(candidate: str) -> None:
    """For any id, the four doors give the same answer."""
    answers = {door.__name__: door(candidate) for door in DOORS}
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize("candidate", SURROGATES)
def test_lone_surrogates_in_ids_are_refused_everywhere(candidate: str) -> None:
    """An id Rust cannot hold (a lone surrogate) raises `InvalidRequestError` at
    every door, never `UnicodeEncodeError`, and changes nothing."""
    assert [door(candidate) for door in DOORS] == [False] * len(DOORS)
    limiter = native_limiter(ManualClock())
    limiter.consume("a", 1)
    for call in (
        lambda: limiter.consume_or_raise(candidate, 1),
        lambda: limiter.adjust_consumption(candidate, 1),
        lambda: limiter.release(candidate),
    ):
        with pytest.raises(InvalidRequestError):
            call()
    assert limiter.get_metrics().consumption_history.count == 1


@pytest.mark.parametrize("candidate", SURROGATES)
async def test_lone_surrogates_in_tenants_are_refused(candidate: str) -> None:
    """A tenant with a lone surrogate raises `InvalidRequestError` at construction
    and, set later, at enqueue (single and batch), with nothing stored."""
    with pytest.raises(InvalidRequestError, match="tenant"):
        LLMRequest("a", None, tenant=candidate)
    storage: InMemoryStorage[Any] = InMemoryStorage(clock=ManualClock())
    mutated = valid_request("a")
    mutated.tenant = candidate
    with pytest.raises(InvalidRequestError, match="tenant"):
        await storage.enqueue(mutated)
    with pytest.raises(InvalidRequestError, match="tenant"):
        await storage.batch_enqueue([valid_request("b"), mutated])
    assert await storage.get_approximate_message_count() == 0


@pytest.mark.parametrize("kind", ["native", "python"])
@pytest.mark.parametrize("candidate", [" ", "\u3000", "\ud800"])
async def test_a_bad_id_never_reaches_the_queue_so_dispatch_goes_on(kind: str, candidate: str) -> None:
    """End to end: a request whose id was changed to a bad one after construction is
    refused by the dispatcher's enqueue (single and batch); the queue is unchanged and the
    good requests are dispatched and marked with either kind of limiter."""
    clock = ManualClock(1_000.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(clock=clock))
    limiter = native_limiter(ManualClock()) if kind == "native" else BookLimiter()
    bad = dataclasses.replace(valid_request("later-bad"))
    bad.id = candidate
    await dispatcher.enqueue(valid_request("good-1"))
    with pytest.raises(InvalidRequestError):
        await dispatcher.enqueue(bad)
    with pytest.raises(InvalidRequestError):
        await dispatcher.batch_enqueue([valid_request("good-2"), bad])
    await dispatcher.enqueue(valid_request("good-2"))
    for _ in range(2):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        await job.mark_as_processed(actual_tokens=50)
    assert await dispatcher.dequeue(limiter) is None
