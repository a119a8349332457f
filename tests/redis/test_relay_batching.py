"""`RedisRelay` (``redis/outcomes.py``): the claims and the reports made together (a Worker's
handlers start and end together) go in one script call each, and each caller gets its own
answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions

from llm_queue_dispatcher import (
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    StorageError,
    TokenInfo,
    Worker,
)
from llm_queue_dispatcher.outcomes import Outcome
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from llm_queue_dispatcher.redis.outcomes import RedisRelay
from tests.redis.conftest import fresh_name


def count_calls(storage: RedisStorage[Any], patch: pytest.MonkeyPatch) -> list[str]:
    connection = storage._connection
    original = connection.run
    names: list[str] = []

    async def counted(script: Any, keys: Any, args: Any) -> Any:
        names.append(script.name)
        return await original(script, keys, args)

    patch.setattr(connection, "run", counted)
    return names


async def test_claims_and_reports_made_together_go_in_one_call_each_with_each_callers_answer(
    redis_url: str,
) -> None:
    """Three submitted requests (one withdrawn) and one nobody waits for: their four claims are
    one call (the withdrawn one's False), their reports one call; the submitter hears exactly
    the two it still waits for, and nothing is left waiting."""
    async with RedisStorage(redis_url, fresh_name("queue")) as storage:
        heard: dict[str, Outcome] = {}
        submitter = RedisRelay(storage, lambda request_id, outcome: heard.__setitem__(request_id, outcome))
        worker = RedisRelay(storage, lambda request_id, outcome: None)
        for request_id in ("a", "b", "c"):
            await submitter.expect(request_id)
        await submitter.withdraw("b")
        with pytest.MonkeyPatch.context() as patch:
            names = count_calls(storage, patch)
            claims = await asyncio.gather(*(worker.claim(i) for i in ("a", "b", "c", "d")))
            await asyncio.gather(
                worker.report("a", Outcome(True, 1), here=False),
                worker.report("c", Outcome(True, {"n": 3}), here=False),
                worker.report("d", Outcome(True, 4), here=False),
            )
        assert claims == [True, False, True, True]
        assert names == ["claim_many", "report_many"]
        for _ in range(200):
            if len(heard) == 2:
                break
            await asyncio.sleep(0.01)
        assert heard == {"a": Outcome(True, 1), "c": Outcome(True, {"n": 3})}
        assert await storage.redis.hlen(submitter.waiting_key) == 0
        await submitter.close()
        await worker.close()


async def test_a_failed_call_fails_each_claim_with_its_own_error(redis_url: str) -> None:
    async with RedisStorage(redis_url, fresh_name("queue")) as storage:
        relay = RedisRelay(storage, lambda request_id, outcome: None)
        connection = storage._connection

        async def broken(script: Any, keys: Any, args: Any) -> Any:
            raise redis.exceptions.ConnectionError("connection reset by peer")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(connection, "run", broken)
            outcomes = await asyncio.gather(*(relay.claim(i) for i in ("a", "b")), return_exceptions=True)
        assert all(isinstance(outcome, StorageError) for outcome in outcomes)
        assert outcomes[0] is not outcomes[1]
        assert await relay.claim("a") is True  # the next call goes out again
        await relay.close()


async def test_a_global_worker_asks_the_relay_only_about_requests_its_dispatch_found_withdrawn(
    redis_url: str,
) -> None:
    """Over the global choice the dispatch script reads the withdrawals with its winners: a
    Worker handles the three requests nobody withdrew without a claim call of the relay, and
    the one whose submitter withdrew it is still claimed, deleted unprocessed and counted so."""
    queue = fresh_name("queue")
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue)
    limiter = RedisThrottle(redis_url, fresh_name("limiter"), rpm=1e6, tpm=1e9)
    config = LLMQueueDispatcherConfig(policy="fair_priority")
    handled: list[str] = []

    async def handle(job: Any) -> None:
        handled.append(job.message.payload.id)

    async with storage, limiter, LLMQueueDispatcher(storage, config) as dispatcher:
        withdrawn = asyncio.create_task(dispatcher.submit(LLMRequest("w", {}, token_info=TokenInfo(10))))
        await asyncio.sleep(0.05)
        withdrawn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await withdrawn
        await dispatcher.batch_enqueue([LLMRequest(f"r{n}", {}, token_info=TokenInfo(10)) for n in range(3)])
        connection = storage._connection
        original = connection.run
        claimed: list[str] = []
        names: list[str] = []

        async def counted(script: Any, keys: Any, args: Any) -> Any:
            names.append(script.name)
            if script.name in ("claim", "claim_many"):
                claimed.extend(arg if isinstance(arg, str) else arg.decode() for arg in args)
            return await original(script, keys, args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(connection, "run", counted)
            stats = await Worker(dispatcher, limiter, handle, concurrency=8).run(stop_when_empty=True)
        assert sorted(handled) == ["r0", "r1", "r2"]
        assert stats.withdrawn == 1
        assert stats.processed == 3
        assert claimed == ["w"]  # only the withdrawn one is asked about
        assert "global_dispatch" in names
        assert await storage.get_approximate_message_count() == 0
