"""Exactness of the dispatcher's selection, proven against a brute-force reference.

The reference (tests/reference/scoring.py) is the contract's scoring written out in plain Python
(API.md, "Scoring"): it scores every visible message the rate limiter can process now and takes
the maximum. The dispatcher over `InMemoryStorage` must hand out a message whose total equals that
maximum, for random queues (priorities, ages, receive counts, token estimates from 0 to far above
the budget, expected processing times incl. None and 0), budgets from tiny to huge, and 0-3
custom scorers with deterministic pseudo-random scores including out-of-range values and NaN.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    QueueMessage,
    ScoringConfig,
    ScoringContext,
    ScoringWeights,
    TokenInfo,
)
from tests.reference.scoring import reference_breakdown, reference_total

TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------
# Deterministic pseudo-random custom scorers.
# --------------------------------------------------------------------------------------------


def raw_custom_score(seed: int, message_id: str) -> float:
    """A fixed score per (scorer seed, message): NaN, below 0, above 1, or within [0, 1]."""
    v = random.Random(f"{seed}:{message_id}").random()
    if v < 0.1:
        return math.nan
    if v < 0.2:
        return -5.0 * v
    if v < 0.3:
        return 1.0 + 5.0 * v
    return (v - 0.3) / 0.7


@dataclass
class RecordingScorer:
    seed: int
    calls: list[str] = field(default_factory=list)

    def __call__(self, message: QueueMessage[Any], context: ScoringContext) -> float:
        assert isinstance(context, ScoringContext)
        self.calls.append(message.payload.id)
        return raw_custom_score(self.seed, message.payload.id)


# --------------------------------------------------------------------------------------------
# Random scenarios.
# --------------------------------------------------------------------------------------------

PRESET_WEIGHTS = [
    (0.25, 0.20, 0.20, 0.10, 0.15, 0.10),  # default
    (0.8, 0.05, 0.1, 0.05, 0.0, 0.0),  # simple priority
    (0.15, 0.35, 0.1, 0.05, 0.25, 0.1),  # throughput
    (0.2, 0.1, 0.5, 0.15, 0.05, 0.0),  # fair
]

weights_strategy = st.one_of(
    st.sampled_from(PRESET_WEIGHTS),
    st.tuples(*[st.floats(0.0, 1.0, allow_nan=False) for _ in range(6)]),
)


def tokens_strategy(tpm: float) -> st.SearchStrategy[int]:
    """Token estimates from 0 to far above the budget, many of them near it."""
    return st.one_of(
        st.integers(0, 60),
        st.integers(1, 200_000),
        st.floats(0.0, 1.1).map(lambda share: int(share * tpm)),
        st.floats(1.0, 1_000.0).map(lambda share: int(share * tpm) + 1),
    )


# Quarter seconds keep every instant exact in floats and in `datetime` (microseconds).
quarters = st.one_of(st.integers(0, 12), st.integers(0, 400)).map(lambda q: q / 4)


def message_strategy(tpm: float) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.sampled_from(list(Priority)),
        tokens_strategy(tpm),
        st.one_of(st.none(), st.just(0.0), st.floats(0.0, 120.0, allow_nan=False)),
        quarters,  # clock advance before the enqueue
        # After the enqueue: None, or a receive round (how many to receive, which to park, and
        # whether it goes through the dispatcher and mark_as_failed instead of the store).
        st.one_of(
            st.none(),
            st.tuples(st.integers(1, 6), st.lists(st.booleans(), min_size=6, max_size=6), st.booleans()),
        ),
    )


@dataclass
class Scenario:
    messages: list[tuple[Priority, int, float | None, float, Any]]
    weights: tuple[float, ...]
    custom: list[tuple[float, int]]  # (weight, seed)
    rpm: float
    tpm: float
    pre_consumed: float  # share of the token bucket consumed before dispatching
    refill_advance: float
    dispatches: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tpm = draw(st.sampled_from([1.0, 50.0, 1_000.0, 40_000.0, 1e6, 1e9]))
    return Scenario(
        messages=draw(st.lists(message_strategy(tpm), min_size=1, max_size=25)),
        weights=draw(weights_strategy),
        custom=draw(
            st.lists(st.tuples(st.floats(0.0, 1.0, allow_nan=False), st.integers(0, 10**6)), max_size=3)
        ),
        rpm=draw(st.sampled_from([1.0, 2.0, 60.0, 1e6])),
        tpm=tpm,
        pre_consumed=draw(st.sampled_from([0.0, 0.0, 0.3, 0.75, 0.99, 1.0])),
        refill_advance=draw(st.one_of(st.integers(0, 8), st.integers(0, 240)).map(lambda q: q / 4)),
        dispatches=draw(st.integers(1, 3)),
    )


PARK = 43_200.0  # the longest visibility: parked messages stay hidden until released


async def run_scenario(scenario: Scenario) -> None:
    clock = ManualClock(1_000_000.0)
    storage: InMemoryStorage[int] = InMemoryStorage(clock=clock)
    weights = ScoringWeights(*scenario.weights)
    scorers = [RecordingScorer(seed) for _, seed in scenario.custom]
    custom_scorers = [
        CustomScorer(name=f"custom{i}", weight=weight, calculate=scorer)
        for i, ((weight, _), scorer) in enumerate(zip(scenario.custom, scorers, strict=True))
    ]
    config = LLMQueueDispatcherConfig(
        clock=clock,
        min_score_threshold=0.0,
        # The seed's rule (best among those admitted now) is what this reference computes.
        hold_budget=False,
        # Large enough that the search can always stop on its exact rule.
        max_candidates_to_evaluate=len(scenario.messages) + 1,
        scoring=ScoringConfig(weights=weights, custom_scorers=custom_scorers),
    )
    dispatcher: LLMQueueDispatcher[int] = LLMQueueDispatcher(storage, config)
    roomy = LLMThrottle(1e9, 1e12, clock=clock)  # for redeliveries through the dispatcher

    latest: dict[str, QueueMessage[int]] = {}  # every message not handed out, newest attributes
    parked: set[str] = set()

    for index, (priority, tokens, ept, advance, receive_round) in enumerate(scenario.messages):
        clock.advance(advance)
        request = LLMRequest(
            id=f"m{index}",
            payload=index,
            priority=priority,
            token_info=TokenInfo(tokens),
            expected_processing_time=ept,
        )
        message = await dispatcher.enqueue(request)
        latest[request.id] = message
        if receive_round is None:
            continue
        count, park_mask, through_dispatcher = receive_round
        if through_dispatcher:
            for i in range(count):
                job = await dispatcher.dequeue(roomy)
                if job is None:
                    break
                park = park_mask[i]
                await job.mark_as_failed(RuntimeError("redeliver"), retry_after=PARK if park else None)
                latest[job.message.payload.id] = job.message
                if park:
                    parked.add(job.message.payload.id)
        else:
            received = await storage.dequeue(count, PARK)
            for i, got in enumerate(received):
                latest[got.payload.id] = got
                if park_mask[i]:
                    parked.add(got.payload.id)
                else:
                    await storage.update_visibility_timeout(got.attributes.receipt_handle, 0.0)
    for message_id in sorted(parked):
        await storage.update_visibility_timeout(latest[message_id].attributes.receipt_handle, 0.0)

    throttle = LLMThrottle(scenario.rpm, scenario.tpm, clock=clock)
    pre = math.floor(scenario.tpm * scenario.pre_consumed)
    if pre > 0:
        assert throttle.consume("pre-consumed", pre)
    clock.advance(scenario.refill_advance)

    for _ in range(scenario.dispatches):
        now = clock.now()
        available = throttle.get_metrics().tpm.available

        def custom_parts(message: QueueMessage[int]) -> list[tuple[str, float, float]]:
            return [
                (f"custom{i}", weight, raw_custom_score(seed, message.payload.id))
                for i, (weight, seed) in enumerate(scenario.custom)
            ]

        admissible = [
            m for m in latest.values() if throttle.can_process(m.payload.token_info.estimated).allowed
        ]
        totals = {
            m.payload.id: reference_total(
                m, now=now, available=available, weights=weights, custom=custom_parts(m)
            )
            for m in admissible
        }
        for scorer in scorers:
            scorer.calls.clear()
        job = await dispatcher.dequeue(throttle)
        if not totals:
            assert job is None, f"nothing is admissible, yet {job!r} was dispatched"
            return
        best = max(totals.values())
        assert job is not None, f"expected a message scoring {best}, got None"
        got_id = job.message.payload.id
        assert got_id in totals, f"{got_id} was not visible and admissible"
        assert abs(job.score.total - best) <= TOLERANCE, (job.score.total, best, got_id, totals)
        assert abs(totals[got_id] - best) <= TOLERANCE
        expected_parts = reference_breakdown(
            latest[got_id], now=now, available=available, weights=weights, custom=custom_parts(latest[got_id])
        )
        assert list(job.score.breakdown) == list(expected_parts)
        for name, value in expected_parts.items():
            assert abs(job.score.breakdown[name] - value) <= TOLERANCE, (
                name,
                job.score.breakdown,
                expected_parts,
            )
        # The dispatched message is the stored one, with its delivery counted.
        assert job.message.attributes.receive_count == latest[got_id].attributes.receive_count + 1
        # Each custom scorer was called at most once per candidate.
        for scorer in scorers:
            assert len(scorer.calls) == len(set(scorer.calls))
        del latest[got_id]


@given(scenarios())
@example(  # one token above the capacity: can_process and the dispatcher must agree on it
    Scenario(
        messages=[(Priority.URGENT, 1_000_000_001, None, 0.0, None)],
        weights=PRESET_WEIGHTS[0],
        custom=[],
        rpm=60.0,
        tpm=1e9,
        pre_consumed=0.0,
        refill_advance=0.0,
        dispatches=1,
    )
)
def test_dispatch_picks_the_brute_force_maximum(scenario: Scenario) -> None:
    asyncio.run(run_scenario(scenario))


# --------------------------------------------------------------------------------------------
# The cap on custom scorer calls.
# --------------------------------------------------------------------------------------------


@given(
    messages=st.lists(
        st.tuples(st.sampled_from(list(Priority)), st.integers(1, 3_000), quarters), min_size=1, max_size=120
    ),
    cap=st.one_of(st.just(20), st.integers(1, 30)),
    seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
)
def test_custom_calls_never_exceed_max_candidates(
    messages: list[tuple[Priority, int, float]], cap: int, seeds: list[int]
) -> None:
    async def scenario() -> None:
        clock = ManualClock(5_000.0)
        storage: InMemoryStorage[int] = InMemoryStorage(clock=clock)
        scorers = [RecordingScorer(seed) for seed in seeds]
        # Heavy custom weights: the base score alone can rarely settle the winner early.
        config = LLMQueueDispatcherConfig(
            clock=clock,
            min_score_threshold=0.0,
            hold_budget=False,
            max_candidates_to_evaluate=cap,
            scoring=ScoringConfig(
                custom_scorers=[CustomScorer(f"c{i}", 1.0, scorer) for i, scorer in enumerate(scorers)]
            ),
        )
        dispatcher: LLMQueueDispatcher[int] = LLMQueueDispatcher(storage, config)
        for index, (priority, tokens, advance) in enumerate(messages):
            clock.advance(advance)
            await dispatcher.enqueue(LLMRequest(f"m{index}", index, priority, TokenInfo(tokens)))
        throttle = LLMThrottle(1e6, 1e7, clock=clock)
        weights = ScoringWeights()
        for _ in range(min(len(messages), 5)):
            visible = {}
            for priority in Priority:
                for message in await storage.peek_messages_by_priority(int(priority), len(messages)):
                    visible[message.payload.id] = message
            now = clock.now()
            available = throttle.get_metrics().tpm.available
            for scorer in scorers:
                scorer.calls.clear()
            job = await dispatcher.dequeue(throttle)
            assert job is not None
            for scorer in scorers:
                assert 1 <= len(scorer.calls) <= cap
                assert scorer.calls == scorers[0].calls
            evaluated = scorers[0].calls
            # The winner is the best of the evaluated candidates, custom scores included.
            assert job.message.payload.id in evaluated
            best = max(
                reference_total(
                    visible[mid],
                    now=now,
                    available=available,
                    weights=weights,
                    custom=[(f"c{i}", 1.0, raw_custom_score(seed, mid)) for i, seed in enumerate(seeds)],
                )
                for mid in evaluated
            )
            assert abs(job.score.total - best) <= TOLERANCE
            await job.mark_as_processed()

    asyncio.run(scenario())
