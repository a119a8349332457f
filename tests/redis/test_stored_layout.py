"""The ranking indexes over data stored by an earlier release, and the score policy's index kept
only while the score policy dispatches from a queue (``redis/lua/queue_common.lua``,
``score_kept``; ``global_dispatch.lua`` drops it, ``score_start.lua`` keeps it)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    ManualClock,
    Priority,
    TokenInfo,
)
from llm_queue_dispatcher.redis import RedisStorage
from tests.redis.conftest import fresh_name
from tests.redis.support import fair_dispatcher
from tests.redis.test_global_score import Visible, ranking, same_rank

_FIXTURES = Path(__file__).parent / "fixtures"
# Queues written by earlier scripts: da1deba's score index keeps its cells' summaries in a
# hash; 1cb6663's in a sorted set, without the bands of each cell; 0f4e65e's with a band per
# exact processing time (now a band per bucket of times).
_LAYOUT = _FIXTURES / "queue_layout_da1deba.json"
_LAYOUTS = [_LAYOUT, _FIXTURES / "queue_layout_1cb6663.json", _FIXTURES / "queue_layout_0f4e65e.json"]


def _fixture(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


async def _restore_layout(storage: RedisStorage[Any], queue: str, path: Path = _LAYOUT) -> dict[str, Any]:
    """Writes the keys of the fixture (a queue filled by an earlier release's scripts, every
    key as the raw Redis commands that rebuild it) under ``queue``'s names."""
    layout = _fixture(path)
    prefix = f"{{lqd}}:q:{queue}:"
    async with storage.redis.pipeline(transaction=True) as pipe:
        for command, part, *values in layout["commands"]:
            pipe.execute_command(command, prefix + part, *(base64.b64decode(v) for v in values))
        await pipe.execute()
    return layout


@pytest.mark.parametrize("path", _LAYOUTS, ids=lambda path: path.stem)
@pytest.mark.parametrize("policy", ["fair_priority", "score"])
async def test_a_queue_written_by_the_previous_layout_is_served_whole(
    policy: str, path: Path, clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """A queue as the previous release left it (its score index kept from the start, a message
    in flight, one given back): every message is handed out once, by either policy, the one in
    flight after its lease ends, and the score index still follows the queue (it empties)."""
    queue = fresh_name("queue")
    storage = clocked_storage(queue=queue)
    limiter = clocked_throttle(rpm=1e6, tpm=1e9)
    layout = await _restore_layout(storage, queue, path)
    clock.advance(layout["clock"] - clock())
    if policy == "fair_priority":
        dispatcher = fair_dispatcher(storage)
    else:
        dispatcher = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    assert dispatcher._global is not None
    taken = []
    while (job := await dispatcher.dequeue(limiter, timeout=0)) is not None:
        taken.append(job.message.payload.id)
        await job.mark_as_processed()
    assert layout["in_flight"] not in taken
    clock.advance(60.0)  # the lease of the message in flight ends
    while (job := await dispatcher.dequeue(limiter, timeout=0)) is not None:
        taken.append(job.message.payload.id)
        await job.mark_as_processed()
    assert sorted(taken) == sorted(r[0] for r in layout["requests"])
    assert await storage.get_approximate_message_count() == 0
    prefix = f"{{lqd}}:q:{queue}:"
    for part in ("score:members", "score:ages", "score:classes", "score:heads", "lanes", "urgent"):
        assert await storage.redis.zcard(prefix + part) == 0
    await dispatcher.close()


async def test_fair_priority_drops_the_score_index_until_the_score_policy_dispatches_again(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """A queue's first fair_priority dispatch drops the score policy's index when no process of
    the score policy dispatches from it, and no script writes it any more; the score policy's
    first dispatch fills it again (then every script keeps it) and finds every message."""
    queue = fresh_name("queue")
    storage = clocked_storage(queue=queue)
    limiter = clocked_throttle(rpm=1e6, tpm=1e9)
    prefix = f"{{lqd}}:q:{queue}:"
    fair = fair_dispatcher(storage)
    await fair.batch_enqueue(
        [
            LLMRequest(f"r{n}", "x", Priority(n % 4), TokenInfo(10 + 40 * n), tenant=f"t{n % 3}")
            for n in range(12)
        ]
    )
    assert await storage.redis.zcard(prefix + "score:members") == 12  # kept from the start
    for _ in range(4):
        job = await fair.dequeue(limiter, timeout=0)
        assert job is not None
        await job.mark_as_processed()
    await fair.enqueue(LLMRequest("early", "x", Priority.HIGH, TokenInfo(10), tenant="t1"))
    assert await storage.redis.exists(prefix + "score:members", prefix + "score:cells") == 0
    scored = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    assert scored._global is not None
    job = await scored.dequeue(limiter, timeout=0)
    assert job is not None
    await job.mark_as_processed()
    assert await storage.redis.zcard(prefix + "score:members") == 8  # the rest, kept from now on
    await fair.enqueue(LLMRequest("late", "x", Priority.NORMAL, TokenInfo(10), tenant="t0"))
    job = await fair.dequeue(limiter, timeout=0)  # no longer drops it
    assert job is not None
    await job.mark_as_processed()
    assert await storage.redis.zcard(prefix + "score:members") == 8
    left = []
    while (job := await scored.dequeue(limiter, timeout=0)) is not None:
        left.append(job.message.payload.id)
        await job.mark_as_processed()
    assert len(left) == 8
    assert await storage.redis.zcard(prefix + "score:members") == 0
    await fair.close()
    await scored.close()


async def test_the_previous_score_layout_met_by_a_batch_enqueue_leaves_no_entry_behind(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock
) -> None:
    """A queue as the previous release left it meets a batch enqueue first (no process of the
    score policy has announced itself): the old score index is dropped at the batch's first
    message, and the batch's later messages are not written into a new one nobody keeps. Else
    an URGENT one taken meanwhile by a plain dequeue stays in that index, and the score policy,
    filling the index on top of it, handed it out a second time while still in flight."""
    queue = fresh_name("queue")
    storage = clocked_storage(queue=queue)
    limiter = clocked_throttle(rpm=1e6, tpm=1e9)
    layout = await _restore_layout(storage, queue)
    clock.advance(layout["clock"] - clock())
    prefix = f"{{lqd}}:q:{queue}:"
    await storage.batch_enqueue(
        [
            LLMRequest("b0", "x", Priority.LOW, TokenInfo(10), tenant="t"),
            LLMRequest("b1", "x", Priority.URGENT, TokenInfo(10), tenant="t"),
        ]
    )
    assert await storage.redis.zcard(prefix + "score:members") == 0
    held = await storage.dequeue(1, 600.0)
    assert [message.payload.id for message in held] == ["b1"]
    scored = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    taken = []
    while (job := await scored.dequeue(limiter, timeout=0)) is not None:
        taken.append(job.message.payload.id)
        await job.mark_as_processed()
    assert "b1" not in taken
    assert sorted(taken) == sorted([r[0] for r in layout["requests"] if r[0] != layout["in_flight"]] + ["b0"])
    await storage.delete_message(held[0].attributes.receipt_handle)
    await scored.close()


async def test_fair_priority_indexing_an_older_queue_leaves_the_score_index_to_the_score_policy(
    clocked_storage: Any, clocked_throttle: Any
) -> None:
    """A queue stored before the ranking index, first served by fair_priority: its messages are
    put in the fair order's index, not announced to the score policy nor filled into its index
    (a queue only fair_priority serves never pays for that index); the score policy's first
    dispatch still fills it and finds every message."""
    queue = fresh_name("queue")
    storage = clocked_storage(queue=queue)
    limiter = clocked_throttle(rpm=1e6, tpm=1e9)
    prefix = f"{{lqd}}:q:{queue}:"
    await storage.batch_enqueue(
        [LLMRequest(f"r{n}", "x", Priority.NORMAL, TokenInfo(10 + n), tenant=f"t{n % 2}") for n in range(6)]
    )
    parts = ("members", "ages", "classes", "cells", "heads")
    await storage.redis.delete(*(f"{prefix}score:{part}" for part in parts))
    await storage.redis.hdel(storage._keys[0], "indexed", "scored")
    fair = fair_dispatcher(storage)
    job = await fair.dequeue(limiter, timeout=0)
    assert job is not None
    await job.mark_as_processed()
    assert await storage.redis.hget(storage._keys[0], "scoring") is None
    assert await storage.redis.exists(*(f"{prefix}score:{part}" for part in parts)) == 0
    scored = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=storage.clock))
    left = []
    while (job := await scored.dequeue(limiter, timeout=0)) is not None:
        left.append(job.message.payload.id)
        await job.mark_as_processed()
    assert len(left) == 5
    await fair.close()
    await scored.close()


@pytest.mark.parametrize("path", _LAYOUTS[1:], ids=lambda path: path.stem)
async def test_a_score_index_of_an_earlier_band_layout_is_filled_again_and_hands_out_in_score_order(
    clocked_storage: Any, clocked_throttle: Any, clock: ManualClock, path: Path
) -> None:
    """A queue whose score index an earlier release wrote (its cells' summaries without the
    bands, or with a band per exact processing time): the score policy's hand-outs are the
    reference's winners at each instant, the one given back with its receive count, the one in
    flight once its lease ends."""
    queue = fresh_name("queue")
    storage = clocked_storage(queue=queue)
    limiter = clocked_throttle(rpm=1e6, tpm=1e9)
    layout = await _restore_layout(storage, queue, path)
    clock.advance(layout["clock"] - clock())
    visible = [
        Visible(rid, priority, tokens, expected, 1_700_000_000.0 + n, n, int(rid == layout["given_back"]))
        for n, (rid, _, priority, tokens, expected) in enumerate(layout["requests"])
        if rid != layout["in_flight"]
    ]
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, LLMQueueDispatcherConfig(clock=clock))
    assert dispatcher._global is not None
    while visible:
        job = await dispatcher.dequeue(limiter, timeout=0)
        assert job is not None
        got = next(m for m in visible if m.id == job.message.payload.id)
        assert same_rank(got, ranking(visible, clock(), 1e9)[0], clock(), 1e9)
        assert job.message.attributes.receive_count == got.receive_count + 1
        visible.remove(got)
        await job.mark_as_processed()
        clock.advance(0.5)
    assert await dispatcher.dequeue(limiter, timeout=0) is None
    clock.advance(60.0)  # the lease of the message in flight ends
    job = await dispatcher.dequeue(limiter, timeout=0)
    assert job is not None
    assert job.message.payload.id == layout["in_flight"]
    await job.mark_as_processed()
    await dispatcher.close()
