"""Stateful property test: random operation sequences on a ManualClock, each adapter checked
step by step against a small pure-Python model of the contract.

Model states: every message is exactly one of visible, in flight, dead-lettered, expired, deleted
or purged. Checked: receive order and content (so nothing is delivered while invisible), receive
counts grow by one per receive and fall back by one when a receive is released (an adapter that
cannot undo a receive keeps the fallback of `QueueStorageAdapter.release_message`), every stale
handle is refused without effect, and the counts and attributes of the adapter and of its
dead-letter store match the model after every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from llm_queue_dispatcher import (
    DuplicateRequestError,
    InvalidRequestError,
    ManualClock,
    Priority,
    QueueStorageAdapter,
    ReceiptHandleError,
)
from tests.conformance.conftest import (
    DEAD_LETTER_COPIES,
    FACTORIES,
    KINDS,
    START,
    RedisFactory,
    StorageFactory,
)
from tests.conformance.support import req, run

R = TypeVar("R")

MAX_RECEIVES = 3
RETENTION = 60.0
IDS = st.sampled_from([f"r{i}" for i in range(8)])
PRIORITIES = st.sampled_from(list(Priority))
TIMEOUTS = st.sampled_from([0.0, 0.5, 1.0, 5.0, 20.0])
STEPS = st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0, 25.0])
BAD_TIMEOUTS = st.sampled_from([-1.0, 43_200.5, float("nan"), float("inf"), "5"])


@dataclass
class Model:
    rid: str
    priority: int
    seq: int
    enqueued_at: float
    receive_count: int = 0
    first_received_at: float | None = None
    state: str = "visible"  # visible | in_flight (live); dead | expired | deleted | purged
    deadline: float = 0.0
    handle: str | None = None


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def machine_for(
    factory: StorageFactory, *, in_process: bool = True, keeps_dead_letter_copies: bool = False
) -> type[RuleBasedStateMachine]:
    """The machine for one adapter kind. In-process adapters are driven by ``run`` (which also
    proves no operation suspends); an out-of-process one (Redis) by an event loop of its own per
    machine, its adapters closed at teardown. ``keeps_dead_letter_copies``: the dead-letter store
    keeps a second copy of a request id it already holds (InMemoryStorage since the index
    restructure, RedisStorage) rather than dropping it (the reference adapter)."""

    class StorageMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = None if in_process else asyncio.new_event_loop()
            self.clock = ManualClock(START)
            self.dead: QueueStorageAdapter[Any] = factory(self.clock)
            self.storage: QueueStorageAdapter[Any] = factory(
                self.clock, max_receive_count=MAX_RECEIVES, dead_letter=self.dead, message_retention=RETENTION
            )
            self.live: dict[str, Model] = {}
            self.stale: list[str] = []
            self.seen_handles: set[str] = set()
            self.seq = 0
            self.dead_lettered = 0
            self.expired = 0
            self.dead_letters: list[str] = []

        def run(self, coro: Coroutine[Any, Any, R]) -> R:
            return run(coro) if self.loop is None else self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            if self.loop is not None:
                for storage in (self.storage, self.dead):
                    self.loop.run_until_complete(storage.aclose())  # type: ignore[attr-defined]
                self.loop.close()

        # ----- the model ----------------------------------------------------------------

        def _end(self, m: Model, state: str) -> None:
            m.state = state
            del self.live[m.rid]
            if m.handle is not None:
                self.stale.append(m.handle)

        def maintain(self) -> None:
            now = self.clock.now()
            expiring = sorted(
                (m for m in self.live.values() if m.state == "in_flight" and m.deadline <= now),
                key=lambda m: (m.deadline, m.seq),
            )
            for m in expiring:
                if now - m.enqueued_at > RETENTION:
                    self.expired += 1
                    self._end(m, "expired")
                elif m.receive_count >= MAX_RECEIVES:
                    self.dead_lettered += 1
                    self.dead_letters.append(m.rid)  # the dead-letter store is never drained here
                    self._end(m, "dead")
                else:
                    m.state = "visible"
            for m in list(self.live.values()):
                if m.state == "visible" and now - m.enqueued_at > RETENTION:
                    self.expired += 1
                    self._end(m, "expired")

        def visible(self) -> list[Model]:
            return sorted(
                (m for m in self.live.values() if m.state == "visible"),
                key=lambda m: (m.priority, m.enqueued_at, m.seq),
            )

        def counts(self) -> tuple[int, int]:
            attributes = self.run(self.storage.get_queue_attributes())
            return (
                attributes.approximate_number_of_messages,
                attributes.approximate_number_of_messages_in_flight,
            )

        def add(self, rid: str, priority: int) -> None:
            self.live[rid] = Model(rid, priority, self.seq, self.clock.now())
            self.seq += 1

        # ----- rules --------------------------------------------------------------------

        @rule(rid=IDS, priority=PRIORITIES)
        def enqueue(self, rid: str, priority: Priority) -> None:
            self.maintain()
            if rid in self.live:
                with pytest.raises(DuplicateRequestError):
                    self.run(self.storage.enqueue(req(rid, priority)))
                return
            message = self.run(self.storage.enqueue(req(rid, priority)))
            assert message.payload.id == rid
            assert message.attributes.enqueued_at == utc(self.clock.now())
            self.add(rid, priority)

        @rule(rids=st.lists(IDS, max_size=4), priority=PRIORITIES)
        def batch_enqueue(self, rids: list[str], priority: Priority) -> None:
            self.maintain()
            ok = len(set(rids)) == len(rids) and not any(r in self.live for r in rids)
            requests = [req(r, priority) for r in rids]
            if not ok:
                with pytest.raises(DuplicateRequestError):
                    self.run(self.storage.batch_enqueue(requests))
                return
            messages = self.run(self.storage.batch_enqueue(requests))
            assert [m.payload.id for m in messages] == rids
            for rid in rids:
                self.add(rid, priority)

        @rule(limit=st.integers(0, 3), timeout=TIMEOUTS)
        def dequeue(self, limit: int, timeout: float) -> None:
            self.maintain()
            expected = self.visible()[:limit]
            got = self.run(self.storage.dequeue(limit, timeout))
            assert [m.payload.id for m in got] == [m.rid for m in expected]
            now = self.clock.now()
            for message, m in zip(got, expected, strict=True):
                m.receive_count += 1
                if m.first_received_at is None:
                    m.first_received_at = now
                attributes = message.attributes
                assert attributes.receive_count == m.receive_count
                assert attributes.first_received_at == utc(m.first_received_at)
                assert attributes.enqueued_at == utc(m.enqueued_at)
                handle = attributes.receipt_handle
                assert handle not in self.seen_handles
                self.seen_handles.add(handle)
                if m.handle is not None:
                    self.stale.append(m.handle)
                m.handle, m.state, m.deadline = handle, "in_flight", now + timeout

        @rule(data=st.data())
        def delete_current(self, data: st.DataObject) -> None:
            self.maintain()
            holders = sorted((m for m in self.live.values() if m.handle is not None), key=lambda m: m.seq)
            if not holders:
                return
            m = data.draw(st.sampled_from(holders))
            assert m.handle is not None
            self.run(self.storage.delete_message(m.handle))
            self._end(m, "deleted")

        @rule(data=st.data(), timeout=TIMEOUTS)
        def change_visibility(self, data: st.DataObject, timeout: float) -> None:
            self.maintain()
            holders = sorted((m for m in self.live.values() if m.handle is not None), key=lambda m: m.seq)
            if not holders:
                return
            m = data.draw(st.sampled_from(holders))
            assert m.handle is not None
            self.run(self.storage.update_visibility_timeout(m.handle, timeout))
            m.state, m.deadline = "in_flight", self.clock.now() + timeout
            self.maintain()

        @rule(data=st.data())
        def release_current(self, data: st.DataObject) -> None:
            self.maintain()
            holders = sorted((m for m in self.live.values() if m.handle is not None), key=lambda m: m.seq)
            if not holders:
                return
            m = data.draw(st.sampled_from(holders))
            assert m.handle is not None
            self.run(self.storage.release_message(m.handle))
            if type(self.storage).release_message is QueueStorageAdapter.release_message:
                # The fallback: visible at once, the receive counted, the handle current.
                m.state, m.deadline = "in_flight", self.clock.now()
                self.maintain()
                return
            m.receive_count -= 1
            if m.receive_count == 0:
                m.first_received_at = None
            self.stale.append(m.handle)
            m.handle, m.state = None, "visible"

        @rule(data=st.data(), delete=st.booleans())
        def use_stale_handle(self, data: st.DataObject, delete: bool) -> None:
            self.maintain()
            if not self.stale:
                return
            handle = data.draw(st.sampled_from(self.stale))
            before = self.counts()
            operation = (
                self.storage.delete_message(handle)
                if delete
                else self.storage.update_visibility_timeout(handle, 0.0)
            )
            with pytest.raises(ReceiptHandleError):
                self.run(operation)
            assert self.counts() == before

        @rule(handle=st.text(max_size=40))
        def use_unknown_handle(self, handle: str) -> None:
            self.maintain()
            before = self.counts()
            with pytest.raises(ReceiptHandleError):
                self.run(self.storage.delete_message(handle))
            assert self.counts() == before

        @rule(timeout=BAD_TIMEOUTS)
        def bad_timeout(self, timeout: Any) -> None:
            self.maintain()
            before = self.counts()
            with pytest.raises(InvalidRequestError):
                self.run(self.storage.dequeue(1, timeout))
            assert self.counts() == before

        @rule(priority=PRIORITIES, limit=st.integers(0, 4))
        def peek(self, priority: Priority, limit: int) -> None:
            self.maintain()
            expected = [m.rid for m in self.visible() if m.priority == priority][:limit]
            got = self.run(self.storage.peek_messages_by_priority(priority, limit))
            assert [m.payload.id for m in got] == expected
            assert all(m.attributes.receipt_handle == "" for m in got)

        @rule(step=STEPS)
        def advance(self, step: float) -> None:
            self.clock.advance(step)

        @rule()
        def purge(self) -> None:
            self.maintain()
            self.run(self.storage.purge())
            for m in list(self.live.values()):
                self._end(m, "purged")

        # ----- invariants ---------------------------------------------------------------

        @invariant()
        def matches_the_model(self) -> None:
            self.maintain()
            attributes = self.run(self.storage.get_queue_attributes())
            visible = sum(m.state == "visible" for m in self.live.values())
            assert attributes.approximate_number_of_messages == visible
            assert attributes.approximate_number_of_messages_in_flight == len(self.live) - visible
            assert attributes.dead_lettered == self.dead_lettered
            assert attributes.expired == self.expired
            assert attributes.created_timestamp == utc(START)
            assert self.run(self.storage.get_approximate_message_count()) == visible
            held = self.dead_letters if keeps_dead_letter_copies else set(self.dead_letters)
            assert self.run(self.dead.get_approximate_message_count()) == len(held)
            check = getattr(getattr(self.storage, "core", None), "_check_invariants", None)
            if check is not None:
                check()

    return StorageMachine


@pytest.mark.parametrize("kind", KINDS)
def test_storage_matches_the_model(kind: str, request: pytest.FixtureRequest) -> None:
    copies = DEAD_LETTER_COPIES[kind]
    if kind in FACTORIES:
        run_state_machine_as_test(machine_for(FACTORIES[kind], keeps_dead_letter_copies=copies))
    else:
        factory = RedisFactory(request.getfixturevalue("redis_url"))
        run_state_machine_as_test(machine_for(factory, in_process=False, keeps_dead_letter_copies=copies))
