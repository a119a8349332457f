"""`RedisRelay` (``redis/outcomes.py``): the claims and the reports made together (a Worker's
handlers start and end together) go in one script call each, and each caller gets its own
answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions

from llm_queue_dispatcher import StorageError
from llm_queue_dispatcher.outcomes import Outcome
from llm_queue_dispatcher.redis import RedisStorage
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
