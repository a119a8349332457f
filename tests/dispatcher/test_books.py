"""The books of the dispatch core, as a model test: whatever happens — enqueues, dequeues
through two dispatchers (one on the fused native step, one with a custom scorer) with the native
`LLMThrottle` and with a plain-Python limiter, marks of every kind (stale ones included), a job
given back unprocessed, purges, the clock running past leases, and faults injected into any of
it — the books hold, exactly:

* every message enqueued is acknowledged, visible, in flight with an owner (a live delivery, or
  a failed one's retry delay), dead-lettered (in the dead-letter store), or purged: exactly one;
* a message's receive count is the number of deliveries handed out for it, less those given
  back unprocessed (their receive undone);
* each dispatcher tracks exactly its unsettled deliveries since its last purge;
* each limiter counts one request per delivery handed out and not given back, and as tokens the
  estimate of every unsettled delivery plus the actual count of every settled one (estimate for
  a completion without a count, 0 for a failure, a dead letter or a give-back). Every delivery
  has a reservation of its own, so a stale mark (its message was received again, or is gone)
  settles its own reservation exactly and never another's. A failed dequeue reserves nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ProcessableMessage,
    ReceiptHandleError,
    ScoringConfig,
    TokenInfo,
)
from tests.dispatcher.books import BookLimiter, FaultyClock

VISIBILITY = 30.0
MAX_RECEIVES = 3
LIMITERS = ("native", "python")
DISPATCHERS = ("fused", "scored")


@dataclass(eq=False)
class Delivery:
    job: ProcessableMessage[Any]
    limiter: str
    dispatcher: str
    generation: int  # the dispatcher's purge count when handed out
    seq: int  # order of hand-out, over all deliveries
    settled_tokens: int | None = None  # None while unsettled
    given_back: bool = False  # released unprocessed (its reservation whole, its receive if current)
    undone: bool = False  # its receive was undone in the store

    @property
    def request_id(self) -> str:
        return self.job.message.payload.id

    @property
    def estimate(self) -> int:
        return self.job.message.payload.token_info.estimated

    @property
    def tokens(self) -> int:
        return self.estimate if self.settled_tokens is None else self.settled_tokens


class DispatchBooks(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.time = ManualClock(1_000.0)
        self.store_clock = FaultyClock(self.time)
        self.dead_clock = FaultyClock(self.time)
        self.dead: InMemoryStorage[Any] = InMemoryStorage(clock=self.dead_clock)
        self.storage: InMemoryStorage[Any] = InMemoryStorage(
            clock=self.store_clock, max_receive_count=MAX_RECEIVES, dead_letter=self.dead
        )
        self.scorer_fails = False

        def scorer(message: Any, context: Any) -> float:
            if self.scorer_fails:
                raise KeyError("scorer bug")
            return 0.5

        scoring = ScoringConfig(custom_scorers=[CustomScorer("probe", 0.1, scorer)])
        self.dispatchers = {
            "fused": LLMQueueDispatcher(
                self.storage, LLMQueueDispatcherConfig(clock=self.time, visibility_timeout=VISIBILITY)
            ),
            "scored": LLMQueueDispatcher(
                self.storage,
                LLMQueueDispatcherConfig(clock=self.time, visibility_timeout=VISIBILITY, scoring=scoring),
            ),
        }
        self.limiters: dict[str, Any] = {
            "native": LLMThrottle(1e9, 1e12, clock=ManualClock()),  # never refills: all counts show
            "python": BookLimiter(),
        }
        self.ids = itertools.count()
        self.seqs = itertools.count()
        self.enqueued: set[str] = set()
        self.acked: set[str] = set()
        self.purged: set[str] = set()
        self.deliveries: list[Delivery] = []
        self.latest: dict[str, Delivery] = {}
        self.retry_until: dict[str, float] = {}  # a failed delivery's retry delay
        self.generations = dict.fromkeys(DISPATCHERS, 0)

    def teardown(self) -> None:
        self.loop.close()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def disarm(self) -> None:
        self.store_clock.disarm()
        self.dead_clock.disarm()
        self.scorer_fails = False
        self.limiters["python"].fail_on.clear()

    # ----- what the stores hold ---------------------------------------------------------------

    def visible(self) -> dict[str, int]:
        """Visible messages of the source store: request id -> receive count."""
        out = {}
        for priority in range(4):
            for message in self.run(self.storage.peek_messages_by_priority(priority, 10_000)):
                out[message.payload.id] = message.attributes.receive_count
        return out

    def dead_lettered(self) -> list[str]:
        return [
            m.payload.id
            for priority in range(4)
            for m in self.run(self.dead.peek_messages_by_priority(priority, 10_000))
        ]

    def in_store(self) -> set[str]:
        return self.enqueued - self.acked - self.purged - set(self.dead_lettered())

    def current(self, delivery: Delivery) -> bool:
        """Whether the delivery's receipt handle still names its message in the store."""
        rid = delivery.request_id
        return self.latest.get(rid) is delivery and rid in self.in_store()

    # ----- rules ------------------------------------------------------------------------------

    @rule(priority=st.sampled_from(list(Priority)), tokens=st.integers(0, 500))
    def enqueue(self, priority: Priority, tokens: int) -> None:
        rid = f"r{next(self.ids)}"
        self.run(self.dispatchers["fused"].enqueue(LLMRequest(rid, None, priority, TokenInfo(tokens))))
        self.enqueued.add(rid)

    @rule(
        dispatcher=st.sampled_from(DISPATCHERS),
        limiter=st.sampled_from(LIMITERS),
        fault=st.sampled_from(["none"] * 5 + ["store clock", "dead clock", "scorer", "consume", "metrics"]),
        nth=st.integers(1, 4),
    )
    def dequeue(self, dispatcher: str, limiter: str, fault: str, nth: int) -> None:
        if fault == "store clock":
            self.store_clock.fail_at(nth)
        elif fault == "dead clock":
            self.dead_clock.fail_at(1)
        elif fault == "scorer":
            self.scorer_fails = True
        elif fault in ("consume", "metrics") and limiter == "python":
            self.limiters["python"].fail_on.add("consume" if fault == "consume" else "get_metrics")
        asked = len(self.limiters["python"].consume_keys)
        try:
            job = self.run(self.dispatchers[dispatcher].dequeue(self.limiters[limiter]))
        except (OSError, KeyError, RuntimeError, InvalidRequestError):
            # A failed attempt releases what it reserved, and the id's older reservation (a
            # delivery whose lease ran out) is the current one again.
            job = None
            if fault == "consume":
                # Its message was received, then the receive undone: an earlier delivery's
                # handle (its lease ran out) was made stale by that receive.
                for key in self.limiters["python"].consume_keys[asked:]:
                    self.latest.pop(key.rsplit("#", 1)[0], None)
        finally:
            self.disarm()
        if job is None:
            return
        delivery = Delivery(job, limiter, dispatcher, self.generations[dispatcher], next(self.seqs))
        assert delivery.request_id in self.enqueued
        self.deliveries.append(delivery)
        self.latest[delivery.request_id] = delivery
        self.retry_until.pop(delivery.request_id, None)

    def markable(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.settled_tokens is None]

    @precondition(lambda self: bool(self.markable()))
    @rule(
        data=st.data(),
        mark=st.sampled_from(
            ["processed", "processed with count", "failed", "failed later", "dead", "release"]
        ),
        actual=st.integers(0, 800),
        delay=st.integers(1, 60),
        fault=st.sampled_from(["none", "none", "store clock", "dead clock"]),
    )
    def mark(self, data: st.DataObject, mark: str, actual: int, delay: int, fault: str) -> None:
        delivery = data.draw(st.sampled_from(self.markable()))
        job = delivery.job
        current = self.current(delivery)
        purged_here = delivery.generation != self.generations[delivery.dispatcher]
        if fault == "store clock":
            self.store_clock.fail_at(1)
        elif fault == "dead clock":
            self.dead_clock.fail_at(1)
        try:
            if mark.startswith("processed"):
                count = actual if mark == "processed with count" else None
                self.run(job.mark_as_processed(actual_tokens=count))
            elif mark.startswith("failed"):
                self.run(
                    job.mark_as_failed(
                        RuntimeError("x"), retry_after=delay if mark == "failed later" else None
                    )
                )
            elif mark == "release":
                self.run(job.release())
            else:
                self.run(job.mark_as_dead_lettered(RuntimeError("x")))
        except ReceiptHandleError:
            # Only a delivery that lost its message reports a stale handle (after settling).
            assert not current
            assert not purged_here
            assert mark.startswith("processed") or mark == "dead"
        except OSError:
            pass  # the injected clock failure: the mark either did not happen or completed
        finally:
            self.disarm()
        if not job.settled:
            assert fault == "store clock"  # a failed store step leaves the job markable
            return
        # Each delivery's own reservation, exactly, whether its handle was current or not.
        if mark == "processed with count":
            delivery.settled_tokens = actual
        elif mark == "processed":
            delivery.settled_tokens = delivery.estimate
        else:
            delivery.settled_tokens = 0
        if mark == "release":
            delivery.given_back = True
            delivery.undone = current and not purged_here
        if current and not purged_here:
            if mark.startswith("processed"):
                self.acked.add(delivery.request_id)
            elif mark == "failed later":
                self.retry_until[delivery.request_id] = self.time.now() + delay

    @rule(seconds=st.sampled_from([0, 1, 10, 29, 31, 45]))
    def advance(self, seconds: int) -> None:
        self.time.advance(float(seconds))

    @rule(dispatcher=st.sampled_from(DISPATCHERS))
    def purge(self, dispatcher: str) -> None:
        gone = self.in_store()
        self.run(self.dispatchers[dispatcher].purge())
        self.purged |= gone
        self.generations[dispatcher] += 1
        for rid in gone:
            self.retry_until.pop(rid, None)

    # ----- the books ----------------------------------------------------------------------------

    @invariant()
    def every_message_is_somewhere_once(self) -> None:
        visible = self.visible()  # (an operation of the source: pending dead letters move now)
        dead = self.dead_lettered()
        assert len(dead) == len(set(dead))
        places = [set(visible), set(dead), self.acked, self.purged]
        for a, b in itertools.combinations(places, 2):
            assert not a & b
        in_flight = self.enqueued - set().union(*places)
        assert len(in_flight) == self.storage.core.in_flight_count()
        now = self.time.now()
        for rid in in_flight:
            delivery = self.latest.get(rid)
            leased = (
                delivery is not None
                and delivery.settled_tokens is None
                and (delivery.job.dispatched_at + VISIBILITY > now)
            )
            delayed = self.retry_until.get(rid, -1.0) > now
            assert leased or delayed, f"{rid} is in flight without an owner"
        handed_out: dict[str, int] = {}
        for d in self.deliveries:
            if not d.undone:
                handed_out[d.request_id] = handed_out.get(d.request_id, 0) + 1
        for rid, receive_count in visible.items():
            assert receive_count == handed_out.get(rid, 0), rid

    @invariant()
    def dispatchers_track_their_unsettled_deliveries(self) -> None:
        for name, dispatcher in self.dispatchers.items():
            expected = sum(
                1
                for d in self.deliveries
                if d.dispatcher == name
                and d.settled_tokens is None
                and d.generation == self.generations[name]
            )
            assert dispatcher._core.active == expected, name

    @invariant()
    def limiters_count_every_delivery(self) -> None:
        for name, limiter in self.limiters.items():
            mine = [d for d in self.deliveries if d.limiter == name]
            metrics = limiter.get_metrics()
            assert metrics.rpm.used == sum(1 for d in mine if not d.given_back), name
            assert metrics.tpm.used == sum(d.tokens for d in mine), name


DispatchBooks.TestCase.settings = settings(
    DispatchBooks.TestCase.settings,
    max_examples=max(DispatchBooks.TestCase.settings.max_examples, 150),
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDispatchBooks = DispatchBooks.TestCase
