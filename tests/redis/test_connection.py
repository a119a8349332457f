"""The connection to Redis (``redis/_connection.py``) as a user sees it: the password of its URL
never shows, in a repr, an error, a traceback or a log line, whether it is right, wrong, or the
server is down; a client passed in keeps its connections for its owner's own commands, its
subclass's command hook and its reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from llm_queue_dispatcher import InvalidConfigError, LLMRequest, StorageError
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from tests.redis.conftest import fresh_name
from tests.redis.support import RedisServer, free_port, running_server

PASSWORD = "S3cret-Pa55word%21"  # percent-encoded "!" in the URL: both spellings must stay hidden
DECODED_PASSWORD = "S3cret-Pa55word!"


@pytest.fixture
def guarded_server(tmp_path: Path) -> Any:
    directory = tmp_path / "redis"
    directory.mkdir()
    with running_server(directory, password=DECODED_PASSWORD) as server:
        yield server


def _everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def assert_hidden(text: str) -> None:
    assert PASSWORD not in text
    assert DECODED_PASSWORD not in text
    assert "S3cret" not in text


@pytest.mark.fault  # starts a server of its own
async def test_the_password_never_shows(
    guarded_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"redis://:{PASSWORD}@127.0.0.1:{guarded_server.port}/0"
    wrong = f"redis://:{PASSWORD}x@127.0.0.1:{guarded_server.port}/0"
    down = f"redis://user:{PASSWORD}@127.0.0.1:{free_port()}/0?password={PASSWORD}"
    caplog.set_level(logging.DEBUG)
    said: list[str] = []
    async with RedisStorage(good, "q") as storage, RedisThrottle(good, "l", rpm=60, tpm=100) as limiter:
        await storage.enqueue(LLMRequest("a", 1))  # the password works
        assert await limiter.consume("a", 1)
        said += [repr(storage), repr(limiter), str(storage.__dict__)]
    for url in (wrong, down):
        async with RedisStorage(url, "q") as storage, RedisThrottle(url, "l", rpm=60, tpm=100) as limiter:
            said += [repr(storage), repr(limiter)]
            for call in (storage.enqueue(LLMRequest("a", 1)), limiter.consume("a", 1)):
                with pytest.raises(StorageError) as raised:
                    await call
                said.append(_everything_said(raised.value))
    with pytest.raises(InvalidConfigError) as invalid:
        RedisStorage(f"redis://:{PASSWORD}@127.0.0.1:notaport/0", "q")
    said.append(_everything_said(invalid.value))
    said.append(caplog.text)
    assert "***" in said[0]  # the URL is described, with the password masked
    assert "AuthenticationError" in "".join(said) or "invalid" in "".join(said).lower()
    for text in said:
        assert_hidden(text)


async def test_a_small_pool_passed_in_serves_the_storage_the_limiter_and_its_owner_together(
    redis_url: str,
) -> None:
    """A pool of one connection shared by a storage that calls without a pause, a limiter and
    the owner's own commands: none of them keeps it from the others."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=2)
    client = redis.asyncio.Redis(connection_pool=pool)
    storage: RedisStorage[Any] = RedisStorage(client, fresh_name("pool-of-one"))
    limiter = RedisThrottle(client, fresh_name("pool-of-one"), rpm=1e6, tpm=1e9)
    stop = asyncio.Event()

    async def busy() -> int:
        count = 0
        while not stop.is_set():
            await storage.enqueue(LLMRequest(f"r{count}", 1))
            count += 1
        return count

    await client.script_flush()  # scripts loaded while the pool's one connection is in use
    running = asyncio.ensure_future(busy())
    try:
        for i in range(5):
            assert await limiter.consume(f"c{i}", 1)
            assert await client.ping()
        stop.set()
        assert await storage.get_approximate_message_count() == await running
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await running
        await client.aclose()
        await pool.aclose()


async def test_the_connection_kept_between_calls_goes_back_to_the_pool_once_they_stop(
    redis_url: str,
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    in_use = client.connection_pool._in_use_connections
    try:
        storage: RedisStorage[Any] = RedisStorage(client, fresh_name("kept"))
        await storage.enqueue(LLMRequest("a", 1))
        assert len(in_use) == 1  # kept for the next call
        for _ in range(500):
            if not in_use:
                break
            await asyncio.sleep(0.01)
        assert not in_use
        await storage.enqueue(LLMRequest("b", 1))
        await storage.aclose()  # a client passed in stays open, its connection back in its pool
        assert not in_use
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_client_subclass_runs_every_script_through_its_own_execute_command(
    redis_url: str,
) -> None:
    seen: list[Any] = []

    class Recording(redis.asyncio.Redis):
        async def execute_command(self, *args: Any, **options: Any) -> Any:
            seen.append(args[0])
            return await super().execute_command(*args, **options)

    client = Recording.from_url(redis_url)
    try:
        storage: RedisStorage[Any] = RedisStorage(client, fresh_name("recorded"))
        await storage.enqueue(LLMRequest("a", 1))
        assert await storage.get_approximate_message_count() == 1
        assert seen.count("EVALSHA") >= 2
    finally:
        await client.aclose()


@pytest.mark.fault  # starts a server of its own: every connection of it is killed
async def test_a_connection_the_server_dropped_is_replaced_without_the_caller_seeing_it(
    private_server: RedisServer,
) -> None:
    admin = redis.asyncio.Redis.from_url(private_server.url)
    try:
        async with RedisStorage(private_server.url, "dropped") as storage:
            await storage.enqueue(LLMRequest("a", 1))
            # The connection the storage's calls hold is among those killed.
            assert await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
            await storage.enqueue(LLMRequest("b", 1))
            assert await storage.get_approximate_message_count() == 2
    finally:
        await admin.aclose()


@pytest.mark.fault  # starts a server of its own: its writes are paused
async def test_closing_a_storage_while_its_call_waits_for_its_reply_leaves_that_connection_to_the_call(
    private_server: RedisServer,
) -> None:
    """``aclose`` while a call waits for its reply: the connection that call reads from goes back
    to the pool only once it has its reply, never to the owner's own commands meanwhile."""
    client = redis.asyncio.Redis.from_url(private_server.url)
    admin = redis.asyncio.Redis.from_url(private_server.url, single_connection_client=True)
    try:
        storage: RedisStorage[Any] = RedisStorage(client, "closed-while-waiting")
        await storage.enqueue(LLMRequest("a", 1))  # the scripts loaded, a connection kept
        await admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # the next script's reply waits
        call = asyncio.ensure_future(storage.enqueue(LLMRequest("b", 1)))
        for _ in range(3):  # the call sent, waiting for its reply
            await asyncio.sleep(0)
        assert not call.done()
        await storage.aclose()
        assert await client.ping()  # on a connection of its own
        await call
        assert await storage.get_approximate_message_count() == 2
    finally:
        await client.aclose()
        await admin.aclose()
