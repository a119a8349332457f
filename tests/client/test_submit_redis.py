"""`submit` over `RedisStorage`: the outcome reaches the submitting process when another process
handled the request, and nothing is left in Redis after delivery."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from llm_queue_dispatcher import (
    ExpiredError,
    HandlerResult,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    MessageStateError,
    PermanentError,
    ProcessableMessage,
    PurgedError,
    RateLimitError,
    RequestFailedError,
    TokenInfo,
    Worker,
)
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle

ROOT = Path(__file__).resolve().parents[2]
_queues = itertools.count()


def request(request_id: str) -> LLMRequest[Any]:
    return LLMRequest(request_id, {"q": request_id}, token_info=TokenInfo(10))


class Remote:
    """A worker process on the queue (``tests/client/remote_worker.py``)."""

    def __init__(self, directory: Path, url: str, queue: str) -> None:
        self.stop_file, self.handled_file = directory / "stop", directory / "handled"
        ready = directory / "ready"
        options = {
            "url": url,
            "queue": queue,
            "stop": str(self.stop_file),
            "handled": str(self.handled_file),
            "ready": str(ready),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.client.remote_worker", json.dumps(options)], cwd=ROOT
        )
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.02)

    def finish(self) -> list[str]:
        self.stop_file.write_text("stop")
        assert self.process.wait(timeout=60) == 0
        return self.handled_file.read_text().split()


@pytest.fixture
def queue_name() -> str:
    return f"client-{next(_queues)}-{time.monotonic_ns()}"


@pytest.fixture
def remote(tmp_path: Path, redis_url: str, queue_name: str) -> Iterator[Remote]:
    worker = Remote(tmp_path, redis_url, queue_name)
    yield worker
    if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait()


async def leftover_keys(url: str, queue: str) -> list[bytes]:
    """The keys of the relay still in Redis for ``queue`` (waiting entries, inboxes)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        return sorted(
            [k async for k in client.scan_iter(match=f"{{lqd}}:q:{queue}:waiting*")]
            + [k async for k in client.scan_iter(match=f"{{lqd}}:q:{queue}:inbox:*")]
        )
    finally:
        await client.aclose()


async def test_a_request_handled_in_another_process_is_answered_in_the_submitting_one(
    redis_url: str, queue_name: str, remote: Remote
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    async with LLMQueueDispatcher(storage) as dispatcher:
        ids = [f"r{n}" for n in range(200)]
        answers = await asyncio.gather(*(dispatcher.submit(request(i)) for i in ids))
    assert [a["echo"] for a in answers] == ids
    assert {a["pid"] for a in answers} == {remote.process.pid}
    assert Counter(remote.finish()) == Counter(ids)
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()


async def test_a_dead_letter_and_an_unserialisable_result_in_another_process_reach_the_caller(
    redis_url: str, queue_name: str, remote: Remote
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    async with LLMQueueDispatcher(storage) as dispatcher:
        with pytest.raises(RequestFailedError) as refused:
            await dispatcher.submit(request("bad-1"))
        assert isinstance(refused.value.error, PermanentError)
        assert str(refused.value.error) == "refused bad-1"
        with pytest.raises(RequestFailedError) as unsendable:
            await dispatcher.submit(request("set-1"))
        assert isinstance(unsendable.value.error, InvalidRequestError)
        assert "cannot travel to its submitter as JSON" in str(unsendable.value.error)
    assert sorted(remote.finish()) == ["bad-1", "set-1"]
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()


async def test_submits_from_a_pool_and_a_remote_worker_on_one_queue_are_each_answered_once(
    redis_url: str, queue_name: str, remote: Remote
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    local: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> HandlerResult[Any]:
        local.append(job.message.payload.id)
        await asyncio.sleep(0.001)
        return HandlerResult({"echo": job.message.payload.id, "pid": 0})

    throttle = LLMThrottle(100_000, 10_000_000)
    async with LLMQueueDispatcher(storage) as dispatcher:
        ids = [f"r{n}" for n in range(300)]
        answers = await asyncio.gather(
            *(dispatcher.submit(request(i), handle, rate_limiter=throttle, concurrency=4) for i in ids)
        )
    assert [a["echo"] for a in answers] == ids
    remote_ids = remote.finish()
    assert Counter(local) + Counter(remote_ids) == Counter(ids)
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()


async def test_cancelling_withdraws_and_a_purge_reaches_every_waiting_process(
    redis_url: str, queue_name: str
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    other: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    handled: list[str] = []

    async def handle(job: ProcessableMessage[Any]) -> None:
        handled.append(job.message.payload.id)

    async with LLMQueueDispatcher(storage) as dispatcher, LLMQueueDispatcher(other) as elsewhere:
        withdrawn = asyncio.create_task(dispatcher.submit(request("w")))
        await asyncio.sleep(0.05)
        withdrawn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await withdrawn
        # A worker of another dispatcher takes it: deleted without running the handler.
        worker = Worker(elsewhere, LLMThrottle(100_000, 10_000_000), handle)
        stats = await worker.run(stop_when_empty=True)
        assert handled == []
        assert stats.withdrawn == 1
        waiting = [asyncio.create_task(dispatcher.submit(request(f"p{n}"))) for n in range(3)]
        await asyncio.sleep(0.05)
        await elsewhere.purge()
        for task in waiting:
            with pytest.raises(RequestFailedError) as raised:
                await task
            assert isinstance(raised.value.error, PurgedError)
        assert (await storage.get_queue_attributes()).approximate_number_of_messages == 0
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()
    await other.aclose()


async def test_a_request_the_store_dead_letters_itself_reaches_its_submitter(
    redis_url: str, queue_name: str
) -> None:
    # Its receives used up by a process that died holding it: the store dead-letters it in a
    # script when its lease ends, and the submitter hears so.
    storage: RedisStorage[Any] = RedisStorage(
        redis_url, queue_name, max_receive_count=1, dead_letter=f"{queue_name}-dlq"
    )
    other: RedisStorage[Any] = RedisStorage(redis_url, queue_name, max_receive_count=1)
    async with LLMQueueDispatcher(storage) as dispatcher:
        dead = asyncio.ensure_future(dispatcher.submit(request("dies-1")))
        for _ in range(500):  # taken by a process that never marks it, once enqueued
            if taken := await other.dequeue(1, 0.2):
                break
            await asyncio.sleep(0.01)
        assert taken[0].payload.id == "dies-1"
        await asyncio.sleep(0.3)
        assert await other.dequeue(10, 30.0) == []  # the store's upkeep dead-letters it
        with pytest.raises(RequestFailedError) as dead_lettered:
            await asyncio.wait_for(dead, 10)
        assert isinstance(dead_lettered.value.error, MessageStateError)
        assert "dead-lettered" in str(dead_lettered.value.error)
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()
    await other.aclose()


async def test_a_request_whose_retention_passes_unsent_reaches_its_submitter(
    redis_url: str, queue_name: str
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name, message_retention=0.5)
    other: RedisStorage[Any] = RedisStorage(redis_url, queue_name, message_retention=0.5)
    async with LLMQueueDispatcher(storage) as dispatcher:
        expiring = asyncio.ensure_future(dispatcher.submit(request("old-1")))
        await asyncio.sleep(0.8)  # nobody took it within its retention
        assert await other.dequeue(10, 30.0) == []  # the store's upkeep expires it
        with pytest.raises(RequestFailedError) as expired:
            await asyncio.wait_for(expiring, 10)
        assert isinstance(expired.value.error, ExpiredError)
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()
    await other.aclose()


async def test_a_submit_to_a_closed_dispatcher_raises_and_enqueues_nothing(
    redis_url: str, queue_name: str
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    limiter = LLMThrottle(1_000, 1_000_000)

    async def handle(job: ProcessableMessage[Any]) -> str:
        return "done"

    assert await dispatcher.submit(request("before"), handle, rate_limiter=limiter) == "done"
    await dispatcher.close()
    # Bounded: the pool of a closed dispatcher cannot dequeue, so a submit let through waits for ever.
    with pytest.raises(MessageStateError, match="closed"):
        await asyncio.wait_for(dispatcher.submit(request("after"), handle, rate_limiter=limiter), 10)
    with pytest.raises(MessageStateError, match="closed"):
        await asyncio.wait_for(dispatcher.submit(request("after")), 10)
    assert (await storage.get_queue_attributes()).approximate_number_of_messages == 0
    assert await leftover_keys(redis_url, queue_name) == []
    await storage.aclose()


async def test_a_request_the_global_choice_can_never_grant_fails_its_submit_and_stays_queued(
    redis_url: str, queue_name: str
) -> None:
    storage: RedisStorage[Any] = RedisStorage(redis_url, queue_name)
    throttle = RedisThrottle(redis_url, queue_name, rpm=600, tpm=1_000)
    config = LLMQueueDispatcherConfig(policy="fair_priority")
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage, config)

    async def handle(job: ProcessableMessage[Any]) -> str:
        return "done"

    huge = LLMRequest("huge", {"q": "huge"}, token_info=TokenInfo(5_000))
    try:
        with pytest.raises(RequestFailedError) as raised:
            await asyncio.wait_for(dispatcher.submit(huge, handle, rate_limiter=throttle), 15)
        assert isinstance(raised.value.error, RateLimitError)
        assert raised.value.error.available_in == math.inf
        assert await dispatcher.submit(request("small"), handle, rate_limiter=throttle) == "done"
        assert (await storage.get_queue_attributes()).approximate_number_of_messages == 1  # huge
    finally:
        await dispatcher.close()
        await throttle.aclose()
        await storage.aclose()
