"""The global choice of the score policy (``redis/lua/score_rank.lua``): the best-scored message
over the whole Redis queue, judged against the brute-force reference scorer
(``tests/reference/scoring.py``) at every hand-out, with one process on a manual clock (aging
across every max wait, retries, a budget that binds, the URGENT reserve) and with two and four
real processes on one queue.

Scores are compared as the reference computes them; two messages whose scores differ by less
than `TOLERANCE` may go in either order (the server sums the same factors in the same order,
but from microsecond instants: the last bits of a score can differ).

About 935 lines in one file: every test judges the server's walk with the same reference
(`Visible`, `ranking`, `same_rank`, `_drive`), which the stored-layout tests import too."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import (
    CustomScorer,
    InMemoryStorage,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    Priority,
    ScoringConfig,
    ScoringWeights,
    TokenInfo,
    create_llm_throttle,
)
from llm_queue_dispatcher.redis import RedisStorage
from tests.redis.conftest import Workers, fresh_name
from tests.redis.support import RedisServer
from tests.reference.scoring import ContractWeights, UrgentHistory, Weights, tier, total_score, urgent_margin

TOLERANCE = 1e-9
WEIGHTS = ContractWeights()
TIMES = (None, None, 0.0, 0.4, 2.5, 12.0, 45.0)  # expected processing times: every slope


@dataclass
class Visible:
    """What the reference knows of a visible message."""

    id: str
    priority: int
    tokens: int
    expected: float | None
    enqueued_at: float
    order: int
    receive_count: int = 0
    input: int | None = None  # the input part, when the request gives its parts

    def score(self, now: float, capacity: float, weights: Weights = WEIGHTS) -> float:
        return total_score(
            priority=self.priority,
            tokens=self.tokens,
            expected_processing_time=self.expected,
            age=max(now - self.enqueued_at, 0.0),  # microsecond instants: a hair below 0 is 0
            receive_count=self.receive_count,
            available=capacity,
            weights=weights,
        )


def ranking(
    visible: list[Visible],
    now: float,
    capacity: float,
    *,
    weights: Weights = WEIGHTS,
    urgent_first: bool = True,
    fits: Any = None,
) -> list[tuple[int, float, Visible]]:
    """``(tier, score, message)`` of every message that can ever fit (``fits``, by default an
    estimate within ``capacity``), best first (URGENT first, then the score, then older, then
    enqueued first); A = ``capacity``."""
    keyed = [
        (tier(m.priority, urgent_first), m.score(now, capacity, weights), -m.enqueued_at, -m.order, m)
        for m in visible
        if (m.tokens <= capacity if fits is None else fits(m))
    ]
    keyed.sort(key=lambda k: k[:4], reverse=True)
    return [(k[0], k[1], k[4]) for k in keyed]


def same_rank(
    got: Visible,
    expected: tuple[int, float, Visible],
    now: float,
    capacity: float,
    *,
    weights: Weights = WEIGHTS,
    urgent_first: bool = True,
) -> bool:
    """Whether ``got`` is the reference's winner, or ties with it within `TOLERANCE`."""
    rank, score, message = expected
    if got.id == message.id:
        return True
    return (
        tier(got.priority, urgent_first) == rank
        and abs(got.score(now, capacity, weights) - score) <= TOLERANCE
    )


def requests(count: int, seed: int, *, largest: int, above: float = 0.0) -> list[LLMRequest[Any]]:
    """Every priority, estimates up to ``largest`` (a share ``above`` of them past it: they
    never fit), every slope of the processing-time factor."""
    rng = random.Random(seed)
    made = []
    for n in range(count):
        tokens = rng.randint(20, largest) if rng.random() >= above else largest * 3
        made.append(
            LLMRequest(
                f"r{n}",
                {"actual": tokens, "fail": rng.choice([0, 0, 0, 1, 2])},
                Priority(rng.choices([0, 1, 2, 3], weights=[1, 3, 6, 4])[0]),
                TokenInfo(tokens),
                expected_processing_time=rng.choice(TIMES),
            )
        )
    return made


# -- one process, manual clock ------------------------------------------------------------------


@dataclass
class Counts:
    """What a run of `_drive` went through."""

    handed_out: int = 0
    held: int = 0
    retried: int = 0
    saturated: int = 0  # hand-outs of non-URGENT messages whose wait was past 60 s
    urgent_below: int = 0  # decisions where every URGENT message was below the threshold


async def _drive(
    dispatcher: LLMQueueDispatcher[Any],
    limiter: Any,
    clock: ManualClock,
    rng: random.Random,
    pending: list[LLMRequest[Any]],
    *,
    tpm: int,
    rounds: int,
    arrivals: tuple[int, ...],
    advances: tuple[float, ...],
    weights: Weights = WEIGHTS,
    urgent_first: bool = True,
    min_score: float = 0.0,
) -> Counts:
    """Enqueues ``pending`` a few at a time, dispatches once a round and fails or marks each
    hand-out, on the manual clock: every decision must be the reference's (the best score over
    every visible message that can ever fit, A = the capacity; held when the winner and the
    URGENT reserve do not fit now; nothing below the minimum score)."""
    requests = iter(pending)
    visible: dict[str, Visible] = {}
    history = UrgentHistory()
    order = 0
    counts = Counts()
    for _ in range(rounds):
        for _ in range(rng.choice(arrivals)):
            request = next(requests, None)
            if request is None:
                break
            message = await dispatcher.enqueue(request)
            entry = Visible(
                request.id,
                int(request.priority),
                request.token_info.estimated,
                request.expected_processing_time,
                message.attributes.enqueued_at.timestamp(),
                order,
            )
            visible[request.id] = entry
            history.observe(entry.priority, entry.tokens, entry.enqueued_at)
            order += 1
        now = clock()
        metrics = await limiter.get_metrics()
        tokens, left = metrics.tpm.available, metrics.rpm.available
        ranked_first = urgent_first
        ranked = ranking(list(visible.values()), now, tpm, weights=weights, urgent_first=ranked_first)
        if ranked and ranked[0][1] < min_score and ranked[0][0]:
            # Every URGENT message scores below the threshold: none holds back the others.
            ranked_first = False
            ranked = ranking(list(visible.values()), now, tpm, weights=weights, urgent_first=False)
            counts.urgent_below += 1
        fits = False
        if ranked and ranked[0][1] >= min_score:
            winner = ranked[0][2]
            reserve = history.reserve(tpm, fixed=None, urgent_first=urgent_first)
            waiting = sum(m.tokens for m in visible.values())
            if not history.kept(
                reserve, now=now, refill_rate=tpm / 60, admits_waiting=waiting <= tokens and left >= 1
            ):
                reserve = 0.0
            margin = urgent_margin(winner.priority, winner.tokens, reserve, tpm)
            fits = winner.tokens + margin <= tokens and left >= 1
        job = await dispatcher.dequeue(limiter)
        if job is None:
            assert not fits, f"held, but the reference sends {ranked[0]}"
            counts.held += bool(ranked)
        else:
            assert fits, f"handed out {job.message.payload.id}, the reference holds for {ranked[:1]}"
            got = visible[job.message.payload.id]
            assert same_rank(got, ranked[0], now, tpm, weights=weights, urgent_first=ranked_first), (
                f"{got} instead of {ranked[0]}"
            )
            assert job.message.attributes.receive_count == got.receive_count + 1
            counts.saturated += got.priority > 0 and now - got.enqueued_at > 60
            counts.handed_out += 1
            del visible[got.id]
            if got.receive_count < job.message.payload.payload["fail"]:
                await job.mark_as_failed(RuntimeError("a retry"))
                got.receive_count += 1
                visible[got.id] = got
                history.observe(got.priority, got.tokens, got.enqueued_at)
                counts.retried += 1
            else:
                await job.mark_as_processed()
        clock.advance(rng.choice(advances))
    return counts


@pytest.mark.parametrize(
    ("tpm", "arrivals"),
    [
        (6_000, (0, 0, 1, 3)),  # a backlog: the budget binds, messages age past every max wait
        (60_000, (0, 1, 1, 2)),  # the budget rarely binds: the ranking alone decides
    ],
)
async def test_each_hand_out_is_the_reference_winner_as_messages_age_retry_and_the_budget_binds(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, tpm: int, arrivals: tuple[int, ...]
) -> None:
    """Enqueues, hand-outs, failures and marks over an hour of a manual clock (default weights,
    URGENT first, the default minimum score)."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=tpm)
    config = LLMQueueDispatcherConfig(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    pending = requests(500, 5, largest=tpm // 3, above=0.03)
    counts = await _drive(
        dispatcher, limiter, clock, random.Random(11), pending,
        tpm=tpm, rounds=700, arrivals=arrivals, advances=(0.5, 2.0, 5.0, 15.0, 40.0),
        min_score=config.min_score_threshold,
    )  # fmt: skip
    assert counts.handed_out > 150
    assert counts.retried > 20
    if tpm == 6_000:
        assert counts.held > 20
        assert counts.saturated > 20
    await dispatcher.close()


def random_weights(rng: random.Random) -> ScoringWeights:
    """Six weights, some of them zero (never all)."""
    values = [rng.choice([0.0, 0.02, rng.uniform(0.01, 1.0), rng.uniform(0.01, 1.0)]) for _ in range(6)]
    if not any(values):
        values[0] = 0.5
    return ScoringWeights(*values)


def random_requests(count: int, rng: random.Random, tpm: int) -> list[LLMRequest[Any]]:
    """Estimates over every share of the capacity (below a tenth, around the efficiency and
    token-fit breakpoints, past it: never fitting), every priority, every processing-time slope,
    up to nine failures (past the retry factor's floor)."""
    made = []
    for n in range(count):
        share = rng.choice([rng.uniform(0.0, 0.12), rng.uniform(0.4, 0.95), rng.uniform(0.0, 1.1)])
        tokens = max(1, round(tpm * share))
        made.append(
            LLMRequest(
                f"q{n}",
                {"fail": rng.choice([0, 0, 0, 1, 3, 9])},
                Priority(rng.choice([0, 1, 2, 2, 3])),
                TokenInfo(tokens),
                expected_processing_time=rng.choice([*TIMES, round(rng.uniform(0.0, 40.0), 3)]),
            )
        )
    return made


@pytest.mark.parametrize("seed", range(6))
async def test_each_hand_out_is_the_reference_winner_over_random_weights_budgets_and_queues(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, seed: int
) -> None:
    """Random weights, capacities, URGENT first or not, estimates, expected times, arrivals
    spread from a fraction of a second to minutes apart (every wait slope, some saturated) and
    failures: every decision of the server's walk is the reference's."""
    rng = random.Random(seed)
    weights = random_weights(rng)
    urgent_first = rng.random() < 0.5
    min_score = 0.0
    if seed % 3 == 2:
        # Priority counts little, URGENT goes first and a threshold holds back some messages,
        # URGENT ones too: those must hold back nothing above it.
        weights = ScoringWeights(**{**vars(weights), "priority": 0.02})
        urgent_first = True
        min_score = 0.3 * sum(vars(weights).values())
    tpm = rng.choice([3_000, 20_000, 150_000])
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=100_000, tpm=tpm)
    config = LLMQueueDispatcherConfig(
        clock=clock,
        scoring=ScoringConfig(weights=weights),
        urgent_first=urgent_first,
        min_score_threshold=min_score,
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    counts = await _drive(
        dispatcher, limiter, clock, rng, random_requests(160, rng, tpm),
        tpm=tpm, rounds=260, arrivals=(0, 1, 1, 2, 5), advances=(0.2, 1.0, 3.0, 8.0, 25.0, 90.0),
        weights=weights, urgent_first=urgent_first, min_score=min_score,
    )  # fmt: skip
    assert counts.handed_out > 60
    assert counts.retried > 10
    await dispatcher.close()


@pytest.mark.parametrize("seed", range(4))
async def test_each_hand_out_is_the_reference_winner_on_a_fresh_queue_of_many_cells_of_one_age(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, seed: int
) -> None:
    """Hundreds of messages over many cells and processing times enqueued within about a
    second, dozens at one instant (cells whose oldest members wait alike, bands whose oldest
    members tie in age), handed out milliseconds apart and some failed back: every hand-out is
    the reference's winner, with the default weights or random ones (the budget large enough
    not to bind: the ranking alone decides)."""
    rng = random.Random(100 + seed)
    scoring = random_weights(rng) if seed % 2 else None
    weights: Weights = scoring or WEIGHTS
    urgent_first = seed != 3
    tpm = rng.choice([1_000_000, 5_000_000])
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=1_000_000, tpm=tpm)
    config = LLMQueueDispatcherConfig(
        clock=clock,
        scoring=ScoringConfig(weights=scoring),
        urgent_first=urgent_first,
        min_score_threshold=0.0,
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    pending = requests(420, 40 + seed, largest=tpm // 300)
    started = clock()
    counts = await _drive(
        dispatcher, limiter, clock, rng, pending,
        tpm=tpm, rounds=320, arrivals=(0, 0, 1, 2, 40), advances=(0.0, 0.001, 0.002, 0.01),
        weights=weights, urgent_first=urgent_first,
    )  # fmt: skip
    assert counts.handed_out > 150
    assert counts.retried > 20
    assert clock() - started < 5.0  # every wait far from full: a fresh queue
    await dispatcher.close()


@pytest.mark.parametrize("seed", range(3))
async def test_each_hand_out_is_the_reference_winner_until_a_fresh_queue_timed_by_its_estimates_is_drained(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, seed: int
) -> None:
    """Hundreds of messages in a few token classes (a dozen or more per cell), most without an
    expected processing time (each estimate its own time: many times per cell), the rest of a
    few expected times, enqueued within a fraction of a second and handed out milliseconds
    apart until the queue is empty, some failed back: as each cell's best times are drained
    and its oldest members are left with worse times, every hand-out is still the reference's
    winner."""
    rng = random.Random(200 + seed)
    scoring = random_weights(rng) if seed == 2 else None
    weights: Weights = scoring or WEIGHTS
    tpm = 5_000_000
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=1_000_000, tpm=tpm)
    config = LLMQueueDispatcherConfig(
        clock=clock, scoring=ScoringConfig(weights=scoring), min_score_threshold=0.0
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    pending = [
        LLMRequest(
            f"d{n}",
            {"fail": rng.choice([0, 0, 0, 0, 1, 2])},
            Priority(rng.choices([0, 1, 2, 3], weights=[2, 3, 6, 4])[0]),
            TokenInfo(rng.randint(700, 1_500)),
            expected_processing_time=rng.choice([None, None, None, None, 0.5, 3.0, 20.0]),
        )
        for n in range(450)
    ]
    started = clock()
    counts = await _drive(
        dispatcher, limiter, clock, rng, pending,
        tpm=tpm, rounds=900, arrivals=(0, 0, 0, 60), advances=(0.0, 0.001, 0.002),
        weights=weights,
    )  # fmt: skip
    assert counts.handed_out > 450 + 50
    assert counts.retried > 50
    assert await storage.get_approximate_message_count() == 0  # drained to the last message
    assert clock() - started < 5.0  # every wait far from full: a fresh queue
    await dispatcher.close()


@pytest.mark.parametrize("seed", range(4))
async def test_each_hand_out_is_the_reference_winner_from_cells_of_many_bands_of_scattered_ages(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, seed: int
) -> None:
    """URGENT messages of one token class with a dozen and more expected processing times (a
    band each), enqueued at scattered instants over 9 s: a walk whose best bands hold only young
    messages goes on to the bands that can still win, past those that cannot, and every
    hand-out, to the last, is the reference's winner."""
    rng = random.Random(400 + seed)
    tpm = 1_000_000
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=1_000_000, tpm=tpm)
    config = LLMQueueDispatcherConfig(clock=clock, min_score_threshold=0.0)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    times = [1.0 + 0.25 * n for n in range(17)]  # 1 s to 5 s: every one its own band
    visible: dict[str, Visible] = {}
    order = 0
    for _ in range(30):
        for _ in range(rng.choice([1, 2, 4])):
            request = LLMRequest(
                f"b{order}", {}, Priority.URGENT, TokenInfo(rng.randint(1_000, 1_080)),
                expected_processing_time=rng.choice(times),
            )  # fmt: skip
            message = await dispatcher.enqueue(request)
            visible[request.id] = Visible(
                request.id, 0, request.token_info.estimated, request.expected_processing_time,
                message.attributes.enqueued_at.timestamp(), order,
            )  # fmt: skip
            order += 1
        clock.advance(rng.uniform(0.05, 0.3))
    while visible:
        now = clock()
        ranked = ranking(list(visible.values()), now, tpm)
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        got = visible.pop(job.message.payload.id)
        assert same_rank(got, ranked[0], now, tpm), f"{got} instead of {ranked[0]}"
        await job.mark_as_processed()
        clock.advance(0.001)
    await dispatcher.close()


async def test_in_a_batch_of_one_instant_the_band_s_best_estimate_goes_before_its_oldest_heads(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """Sixty URGENT requests of one expected processing time, their estimates within two token
    classes, enqueued at one instant (their waits tie): the budget part, which grows with the
    estimate below half the capacity, decides the hand-outs, not the enqueue order."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=1_000_000, tpm=100_000)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    rng = random.Random(7)
    batch = [
        LLMRequest(
            f"b{n}", "x", Priority.URGENT, TokenInfo(rng.randint(1_000, 1_080)), expected_processing_time=2.0
        )
        for n in range(60)
    ]
    messages = await dispatcher.batch_enqueue(batch)
    visible = [
        Visible(r.id, 0, r.token_info.estimated, 2.0, m.attributes.enqueued_at.timestamp(), n)
        for n, (r, m) in enumerate(zip(batch, messages, strict=True))
    ]
    clock.advance(3.0)
    for _ in range(20):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        got = next(m for m in visible if m.id == job.message.payload.id)
        assert same_rank(got, ranking(visible, clock(), 100_000)[0], clock(), 100_000)
        visible.remove(got)
        await job.mark_as_processed()
        clock.advance(0.001)
    await dispatcher.close()


async def test_with_input_and_output_limits_the_global_choice_ranks_as_the_in_memory_dispatcher(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """With an input-token limit below the TPM limit, A is the smallest capacity (ITPM's) on
    Redis as in memory; a request split into parts that fits the input limit by its input part
    competes (above A: no efficiency, no token fit), one without parts above the input limit
    never goes. Both dispatchers hand out the reference's winner every time (the buckets full
    before each dispatch: the ranking alone decides)."""
    tpm, itpm = 60_000, 6_000
    rng = random.Random(3)
    batch = []
    for n in range(40):
        if n % 8 == 7:
            info = TokenInfo(rng.randint(8_000, 30_000), input=rng.randint(500, 5_000))  # fits by parts
        elif n % 13 == 12:
            info = TokenInfo(rng.randint(7_000, 20_000))  # above the input limit, no parts: never
        else:
            info = TokenInfo(rng.randint(50, itpm))
        batch.append(
            LLMRequest(
                f"m{n}", "x", Priority(rng.choice([1, 2, 2, 3])), info,
                expected_processing_time=rng.choice(TIMES),
            )
        )  # fmt: skip
    config = LLMQueueDispatcherConfig(clock=clock)
    on_redis: LLMQueueDispatcher[Any] = LLMQueueDispatcher(clocked_storage(), config)
    assert on_redis._global is not None
    redis_limiter = clocked_throttle(rpm=600, tpm=tpm, itpm=itpm)
    in_memory: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(clock=clock), config)
    memory_limiter = create_llm_throttle(rpm=600, tpm=tpm, itpm=itpm, clock=clock)
    visible: list[Visible] = []
    for n, request in enumerate(batch):
        message = await on_redis.enqueue(request)
        await in_memory.enqueue(request)
        visible.append(
            Visible(request.id, int(request.priority), request.token_info.estimated,
                    request.expected_processing_time, message.attributes.enqueued_at.timestamp(), n,
                    input=request.token_info.input)
        )  # fmt: skip
        clock.advance(rng.choice([0.5, 3.0, 20.0]))

    def fits(m: Visible) -> bool:
        return m.tokens <= tpm and (m.input if m.input is not None else m.tokens) <= itpm

    never = {m.id for m in visible if not fits(m)}
    assert never
    assert any(m.tokens > itpm and fits(m) for m in visible)
    differs = 0
    for _ in range(len(batch) - len(never)):
        clock.advance(61.0)  # every bucket full again
        now = clock()
        ranked = ranking(visible, now, itpm, fits=fits)
        by_tpm = ranking(visible, now, tpm, fits=fits)
        differs += by_tpm[0][2].id != ranked[0][2].id
        jobs = [await on_redis.dequeue(redis_limiter), await in_memory.dequeue(memory_limiter)]
        ids = []
        for job in jobs:
            assert job is not None
            got = next(m for m in visible if m.id == job.message.payload.id)
            assert same_rank(got, ranked[0], now, itpm), f"{got} instead of {ranked[0]}"
            if got.tokens <= itpm:  # the score handed out is the one ranked
                assert job.score.total == pytest.approx(got.score(now, itpm), abs=1e-6)
            ids.append(got.id)
            await job.mark_as_processed()
        assert ids[0] == ids[1]
        visible = [m for m in visible if m.id != ids[0]]
    assert differs > 0  # A = the TPM capacity would have chosen otherwise
    assert {m.id for m in visible} == never
    assert await on_redis.dequeue(redis_limiter) is None
    await on_redis.close()
    await in_memory.close()


async def test_a_worker_takes_its_winners_in_rank_order_in_one_script(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000_000)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    batch = requests(40, 2, largest=20_000)
    messages = await dispatcher.batch_enqueue(batch)
    clock.advance(20.0)
    visible = [
        Visible(r.id, int(r.priority), r.token_info.estimated, r.expected_processing_time,
                m.attributes.enqueued_at.timestamp(), n)
        for n, (r, m) in enumerate(zip(batch, messages, strict=True))
    ]  # fmt: skip
    runs = 0
    for _ in range(4):
        jobs = await dispatcher._dequeue_up_to(limiter, 8)
        assert len(jobs) == 8
        runs += 1
        for job in jobs:
            ranked = ranking(visible, clock(), 1_000_000)
            got = next(m for m in visible if m.id == job.message.payload.id)
            assert same_rank(got, ranked[0], clock(), 1_000_000)
            visible.remove(got)
            await job.mark_as_processed()
    assert runs == 4
    await dispatcher.close()


@pytest.mark.parametrize("seed", range(4))
async def test_each_winner_of_a_call_of_many_is_the_reference_winner_once_those_before_it_left(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, seed: int
) -> None:
    """Calls of up to 16 winners over a fresh queue of many cells, most of them holding one or
    two messages (a winner often empties its cell, or changes its oldest and its best times),
    the default weights or random ones, URGENT first or not, some winners failed back between
    calls: the winners of each call come in the reference's rank order, each the best of what
    the winners before it left (the budget large enough not to bind)."""
    rng = random.Random(300 + seed)
    scoring = random_weights(rng) if seed % 2 else None
    weights: Weights = scoring or WEIGHTS
    urgent_first = seed != 2
    tpm = 1_000_000
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=1_000_000, tpm=tpm)
    config = LLMQueueDispatcherConfig(
        clock=clock,
        scoring=ScoringConfig(weights=scoring),
        urgent_first=urgent_first,
        min_score_threshold=0.0,
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    batch = requests(240, 60 + seed, largest=1_000)
    visible: dict[str, Visible] = {}
    for first in range(0, len(batch), 40):
        part = batch[first : first + 40]
        messages = await dispatcher.batch_enqueue(part)
        for n, (request, message) in enumerate(zip(part, messages, strict=True)):
            visible[request.id] = Visible(
                request.id, int(request.priority), request.token_info.estimated,
                request.expected_processing_time, message.attributes.enqueued_at.timestamp(), first + n,
            )  # fmt: skip
        clock.advance(rng.choice([0.0, 0.001, 0.2]))
    calls = retried = 0
    while visible:
        jobs = await dispatcher._dequeue_up_to(limiter, rng.choice([2, 5, 16]))
        assert jobs
        calls += 1
        now = clock()
        handed = []
        for job in jobs:
            ranked = ranking(list(visible.values()), now, tpm, weights=weights, urgent_first=urgent_first)
            got = visible.pop(job.message.payload.id)
            assert same_rank(got, ranked[0], now, tpm, weights=weights, urgent_first=urgent_first), (
                f"{got} instead of {ranked[0]}"
            )
            handed.append(got)
        for job, got in zip(jobs, handed, strict=True):
            if rng.random() < 0.1 and got.receive_count < 3:
                await job.mark_as_failed(RuntimeError("a retry"))
                got.receive_count += 1
                visible[got.id] = got
                retried += 1
            else:
                await job.mark_as_processed()
        clock.advance(rng.choice([0.001, 0.01, 0.5]))
    assert calls < 240 // 2  # most calls took several winners
    assert retried > 5
    await dispatcher.close()


async def test_a_message_above_the_capacity_is_never_ranked_and_holds_nothing(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig())
    await dispatcher.enqueue(LLMRequest("huge", "x", Priority.URGENT, TokenInfo(5_000)))
    await dispatcher.enqueue(LLMRequest("small", "x", Priority.LOW, TokenInfo(10)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "small"
    await job.mark_as_processed()
    assert await dispatcher.dequeue(limiter) is None
    assert await storage.get_approximate_message_count() == 1
    await dispatcher.close()


async def test_a_winner_below_the_minimum_score_is_not_handed_out(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    config = LLMQueueDispatcherConfig(clock=clock, min_score_threshold=0.5)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    # LOW, a large estimate and a long expected time: about 0.38 at enqueue, 0.58 after 300 s.
    await dispatcher.enqueue(
        LLMRequest("low", "x", Priority.LOW, TokenInfo(60_000), expected_processing_time=40.0)
    )
    assert await dispatcher.dequeue(limiter) is None
    clock.advance(300.0)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.score.total >= 0.5
    await job.mark_as_processed()
    await dispatcher.close()


async def test_an_urgent_winner_below_the_minimum_score_holds_back_no_message_above_it(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    # Token fit above all, priority a little: a 1-token URGENT request scores about 0.05.
    weights = ScoringWeights(
        priority=0.05, efficiency=0, wait_time=0, retry=0, token_fit=0.5, processing_time=0
    )
    config = LLMQueueDispatcherConfig(
        clock=clock, min_score_threshold=0.1, scoring=ScoringConfig(weights=weights)
    )
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    assert dispatcher._global is not None
    await dispatcher.enqueue(LLMRequest("tiny-urgent", "x", Priority.URGENT, TokenInfo(1)))
    await dispatcher.enqueue(LLMRequest("tiny-normal", "x", Priority.NORMAL, TokenInfo(1)))
    await dispatcher.enqueue(LLMRequest("good-fit", "x", Priority.NORMAL, TokenInfo(60_000)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "good-fit"
    await job.mark_as_processed()
    assert await dispatcher.dequeue(limiter) is None  # the rest score below the threshold
    assert await storage.get_approximate_message_count() == 2
    await dispatcher.close()


async def test_custom_scorers_and_the_unheld_budget_keep_the_per_process_buffer(redis_url: str) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, fresh_name("queue"))
    async with storage:
        scorer = CustomScorer("one", 0.1, lambda message, context: 1.0)
        custom = LLMQueueDispatcher(
            storage, LLMQueueDispatcherConfig(scoring=ScoringConfig(custom_scorers=[scorer]))
        )
        assert custom._global is None
        unheld = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(hold_budget=False))
        assert unheld._global is None
        weighted = LLMQueueDispatcher(
            storage, LLMQueueDispatcherConfig(scoring=ScoringConfig(weights=ScoringWeights(priority=0.8)))
        )
        assert weighted._global is not None
        # Through the buffer all the same: the message is handed out.
        await custom.enqueue(LLMRequest("r", "x", Priority.NORMAL, TokenInfo(10)))
        job = await custom.dequeue(LLMThrottle(60, 1_000))
        assert job is not None
        await job.mark_as_processed()
        for dispatcher in (custom, unheld, weighted):
            await dispatcher.close()


async def test_messages_stored_before_the_score_index_are_indexed_and_handed_out_in_score_order(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """A queue whose messages are not in the score policy's index (as one written before it
    existed): the first global dispatch indexes them, and the hand-outs follow the scores."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000_000)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    batch = requests(30, 4, largest=30_000)
    messages = await dispatcher.batch_enqueue(batch)
    prefix = storage._keys[0].decode().removesuffix("meta")
    parts = ("members", "ages", "classes", "heads", "cells")  # the whole index: none of it was written
    await storage.redis.delete(*(f"{prefix}score:{part}" for part in parts))
    await storage.redis.hdel(storage._keys[0], "scored")
    clock.advance(45.0)
    visible = [
        Visible(r.id, int(r.priority), r.token_info.estimated, r.expected_processing_time,
                m.attributes.enqueued_at.timestamp(), n)
        for n, (r, m) in enumerate(zip(batch, messages, strict=True))
    ]  # fmt: skip
    for _ in range(30):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        got = next(m for m in visible if m.id == job.message.payload.id)
        assert same_rank(got, ranking(visible, clock(), 1_000_000)[0], clock(), 1_000_000)
        visible.remove(got)
        await job.mark_as_processed()
        clock.advance(1.0)
    assert await storage.redis.hget(storage._keys[0], "scored") == b"1"
    await dispatcher.close()


@pytest.mark.parametrize("enqueue_after", [True, False])
async def test_a_score_index_of_the_earlier_hash_layout_is_dropped_and_filled_again(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, enqueue_after: bool
) -> None:
    """A queue whose cell summaries are a hash (the layout before they became one sorted set):
    an enqueue, or else the next dispatch, drops the index rather than fail; the dispatch fills
    it again, and the hand-outs follow the scores."""
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=1_000_000)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    batch = requests(24, 9, largest=30_000)
    first = 20 if enqueue_after else 24
    messages = await dispatcher.batch_enqueue(batch[:first])
    cells = f"{storage._keys[0].decode().removesuffix('meta')}score:cells"
    await storage.redis.delete(cells)
    await storage.redis.hset(cells, "00001", "a summary of the hash layout")
    if enqueue_after:
        messages += await dispatcher.batch_enqueue(batch[first:])
    clock.advance(30.0)
    visible = [
        Visible(r.id, int(r.priority), r.token_info.estimated, r.expected_processing_time,
                m.attributes.enqueued_at.timestamp(), n)
        for n, (r, m) in enumerate(zip(batch, messages, strict=True))
    ]  # fmt: skip
    for _ in range(len(batch)):
        job = await dispatcher.dequeue(limiter)
        assert job is not None
        got = next(m for m in visible if m.id == job.message.payload.id)
        assert same_rank(got, ranking(visible, clock(), 1_000_000)[0], clock(), 1_000_000)
        visible.remove(got)
        await job.mark_as_processed()
        clock.advance(1.0)
    assert await storage.redis.type(cells) in (b"none", b"zset")
    assert await dispatcher.dequeue(limiter) is None
    await dispatcher.close()


async def test_a_message_dead_lettered_into_a_new_dead_letter_queue_is_in_its_score_index(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """With ``max_receive_count=1`` a job whose lease runs out is dead-lettered into a queue no
    script has touched yet: that queue is created marked as having its score index whole, so
    the message must be in it, and the score policy on the dead-letter queue hands it out."""
    dead = fresh_name("dead")
    storage = clocked_storage(max_receive_count=1, dead_letter=dead)
    graveyard = clocked_storage(queue=dead)
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    config = LLMQueueDispatcherConfig(clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)
    reader: LLMQueueDispatcher[Any] = LLMQueueDispatcher(graveyard, config)
    await dispatcher.enqueue(LLMRequest("r", "x", Priority.HIGH, TokenInfo(100), tenant="A"))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    clock.advance(31.0)
    assert await dispatcher.dequeue(limiter, timeout=0) is None
    assert await graveyard.get_approximate_message_count() == 1
    again = await reader.dequeue(limiter, timeout=0)
    assert again is not None
    assert again.message.payload.id == "r"
    await again.mark_as_processed()
    await dispatcher.close()
    await reader.close()


async def test_a_purged_queue_leaves_nothing_in_the_score_index(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    storage = clocked_storage()
    limiter = clocked_throttle(rpm=600, tpm=100_000)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig())
    await dispatcher.batch_enqueue(requests(20, 6, largest=5_000))
    await dispatcher.purge()
    prefix = storage._keys[0].decode().removesuffix("meta")
    assert (
        await storage.redis.exists(
            *(f"{prefix}score:{part}" for part in ("members", "ages", "classes", "cells"))
        )
        == 0
    )
    await dispatcher.enqueue(LLMRequest("after", "x", Priority.NORMAL, TokenInfo(10)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    assert job.message.payload.id == "after"
    await job.mark_as_processed()
    await dispatcher.close()


# -- real processes ------------------------------------------------------------------------------


def _replay(
    records: list[dict[str, Any]], batch: list[LLMRequest[Any]], enqueued_at: list[float], capacity: float
) -> int:
    """Replays the processes' hand-outs and failures in the server's order against the
    reference; returns the hand-outs checked."""
    visible = {
        r.id: Visible(
            r.id, int(r.priority), r.token_info.estimated, r.expected_processing_time, enqueued_at[n], n
        )
        for n, r in enumerate(batch)
    }
    taken: dict[str, Visible] = {}
    events = sorted((r for r in records if r["event"] in ("recv", "fail")), key=lambda r: r["at"])
    checked = 0
    for event in events:
        now = event["at"] / 1_000_000
        if event["event"] == "recv":
            ranked = ranking(list(visible.values()), now, capacity)
            got = visible.pop(event["id"])
            assert same_rank(got, ranked[0], now, capacity), (
                f"hand-out {checked}: {got} instead of {ranked[0]}"
            )
            taken[got.id] = got
            checked += 1
        else:
            again = taken.pop(event["id"])
            again.receive_count = event["count"]
            visible[again.id] = again
    return checked


@pytest.mark.parametrize("processes", [2, 4])
async def test_every_hand_out_of_several_processes_is_the_best_score_of_its_instant(
    private_server: RedisServer, workers: Workers, tmp_path: Path, processes: int
) -> None:
    """Two or four processes drain one queue at once, failing some deliveries (visible again at
    once, one receive more): replayed in the server's order, each hand-out is the best-scored
    message of what was visible then (no minimum score: every message goes)."""
    queue, limiter = fresh_name("global"), fresh_name("budget")
    storage: RedisStorage[Any] = RedisStorage(private_server.url, queue)
    tpm = 20_000_000  # never binds: every hand-out is the ranking's
    batch = requests(240, 8, largest=20_000)
    enqueued_at: list[float] = []
    async with storage:
        for start in range(0, len(batch), 60):  # four arrivals: their waits differ
            messages = await storage.batch_enqueue(batch[start : start + 60])
            enqueued_at += [m.attributes.enqueued_at.timestamp() for m in messages]
            await asyncio.sleep(0.4)
    go = tmp_path / f"go-{queue}"
    options = {
        "url": private_server.url,
        "queue": queue,
        "limiter": limiter,
        "rpm": 1e7,
        "tpm": tpm,
        "policy": "score",
        "min_score": 0.0,
    }
    for _ in range(processes):
        workers.start("global", go=str(go), max_seconds=60, **options)
    await asyncio.sleep(0.5)  # every process imported and waiting
    go.touch()
    workers.wait(90)
    records = [r for r in workers.records() if r.get("at") is not None]
    received = [r["id"] for r in records if r["event"] == "recv"]
    failures = sum(1 for r in records if r["event"] == "fail")
    # Every message handed out, once per delivery, across every process.
    assert sorted(set(received)) == sorted(r.id for r in batch)
    assert len(received) == len(batch) + failures
    assert failures > 50
    assert len({r["pid"] for r in records if r["event"] == "recv"}) == processes
    assert _replay(records, batch, enqueued_at, tpm) == len(received)
