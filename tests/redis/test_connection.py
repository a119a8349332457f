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

from llm_queue_dispatcher import InvalidConfigError, LLMRequest, Priority, QueueMessage, StorageError
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


# ----- pipelining: several writes on the wire at once ---------------------------------------------


def _batcher(storage: RedisStorage[Any]) -> Any:
    from llm_queue_dispatcher.redis._connection import Batcher

    batcher = storage._connection._batchers[asyncio.get_running_loop()]
    assert isinstance(batcher, Batcher)
    return batcher


async def _waves(count: int, make: Any) -> list[asyncio.Future[Any]]:
    """``count`` waves of calls, each made in a turn of the event loop of its own (a write each),
    with a few turns between them."""
    calls: list[asyncio.Future[Any]] = []
    for wave in range(count):
        calls += [asyncio.ensure_future(call) for call in make(wave)]
        for _ in range(5):
            await asyncio.sleep(0)
    return calls


@pytest.mark.fault  # starts a server of its own
async def test_calls_go_out_while_others_wait_for_their_replies_and_each_gets_its_own(
    private_server: RedisServer,
) -> None:
    """A paused server: each turn's calls are written at once, up to three writes on the wire;
    the fourth turn's wait for room. Once it resumes, every caller has its own answer."""
    async with RedisStorage(private_server.url, fresh_name("depth")) as storage:
        await storage.get_approximate_message_count()  # connected, the script loaded
        private_server.pause()
        try:
            calls = await _waves(
                4, lambda wave: [storage.enqueue(LLMRequest(f"r{wave}-{i}", i)) for i in range(3)]
            )
            batcher = _batcher(storage)
            assert len(batcher._inflight) == 3
            assert len(batcher._pending) == 3  # the fourth wave: written once a reply makes room
        finally:
            private_server.resume()
        enqueued = await asyncio.gather(*calls)
        assert [m.payload.id for m in enqueued] == [f"r{w}-{i}" for w in range(4) for i in range(3)]
        assert await storage.get_approximate_message_count() == 12


@pytest.mark.fault  # starts a server of its own
async def test_a_caller_cancelled_while_its_call_is_on_the_wire_leaves_the_others_their_replies(
    private_server: RedisServer,
) -> None:
    """Its reply is read and dropped: the replies after it still reach their own callers."""
    async with RedisStorage(private_server.url, fresh_name("cancelled")) as storage:
        for i in range(3):
            await storage.enqueue(LLMRequest(f"r{i}", i, Priority(i + 1)))
        private_server.pause()
        try:
            calls = await _waves(
                3,
                lambda wave: [
                    storage.peek_messages_by_priority(wave + 1, 5),
                    storage.get_approximate_message_count(),
                ],
            )
            calls[2].cancel()  # the second wave's peek
            await asyncio.sleep(0)
        finally:
            private_server.resume()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes[2], asyncio.CancelledError)
        assert [m.payload.id for m in outcomes[0]] == ["r0"]  # type: ignore[union-attr]
        assert [m.payload.id for m in outcomes[4]] == ["r2"]  # type: ignore[union-attr]
        assert outcomes[1] == outcomes[3] == outcomes[5] == 3
        # And the calls after it are in step too.
        assert [m.payload.id for m in await storage.peek_messages_by_priority(2, 5)] == ["r1"]


@pytest.mark.fault  # starts a server of its own
async def test_writes_on_the_wire_when_the_server_forgets_its_scripts_run_once_each(
    private_server: RedisServer,
) -> None:
    """``SCRIPT FLUSH`` with several writes on the wire: each meets ``NOSCRIPT``, loads the
    scripts and runs its calls again, once."""
    async with RedisStorage(private_server.url, fresh_name("flushed")) as storage:
        await storage.get_approximate_message_count()
        await storage.redis.script_flush()
        private_server.pause()
        try:
            calls = await _waves(
                3, lambda wave: [storage.enqueue(LLMRequest(f"r{wave}-{i}", i)) for i in range(2)]
            )
            assert len(_batcher(storage)._inflight) == 3
        finally:
            private_server.resume()
        await asyncio.gather(*calls)
        assert await storage.get_approximate_message_count() == 6


@pytest.mark.fault  # starts a server of its own
async def test_replies_lost_with_several_writes_on_the_wire_apply_each_call_once(tmp_path: Path) -> None:
    """The server runs three writes' calls (leases, then grants), then the connection breaks
    before their replies: the client resends them all on a new connection and each answers as
    its first run did. Every message leased goes to exactly one caller, no grant is made twice,
    and nothing is left leased or reserved once they are deleted and settled."""
    from tests.redis.support import ReplyCutter

    directory = tmp_path / "redis"
    directory.mkdir()
    with running_server(directory) as server:
        cutter = await ReplyCutter(server.port).start()
        try:
            async with (
                RedisStorage(cutter.url, fresh_name("lost")) as storage,
                RedisThrottle(cutter.url, fresh_name("lost"), rpm=10_000, tpm=1_000_000) as limiter,
            ):
                await storage.batch_enqueue([LLMRequest(f"r{i}", i) for i in range(8)])
                await storage.dequeue(0, 1.0)  # the scripts loaded: the cut falls on calls that run
                assert await limiter.consume("warm", 1)
                # The first write's data arms the cut; the server answers the three at once.
                server.pause()
                cutter.armed = 1
                try:
                    leases = await _waves(3, lambda wave: [storage.dequeue(2, 30.0)])
                    assert len(_batcher(storage)._inflight) == 3
                finally:
                    server.resume()
                received = [m for wave in await asyncio.gather(*leases) for m in wave]
                server.pause()
                cutter.armed = 1
                try:
                    grants = await _waves(3, lambda wave: [limiter.consume(f"w{wave}", 10)])
                finally:
                    server.resume()
                assert await asyncio.gather(*grants) == [True, True, True]
                assert cutter.cuts == 2
                assert sorted(m.payload.id for m in received) == [f"r{i}" for i in range(6)]
                assert all(m.attributes.receive_count == 1 for m in received)
                attributes = await storage.get_queue_attributes()
                assert attributes.approximate_number_of_messages_in_flight == 6
                assert (await limiter.get_metrics()).consumption_history.count == 4  # warm + 3, once each
                await storage.batch_delete([m.attributes.receipt_handle for m in received])
                attributes = await storage.get_queue_attributes()
                assert (
                    attributes.approximate_number_of_messages,
                    attributes.approximate_number_of_messages_in_flight,
                ) == (2, 0)
        finally:
            await cutter.stop()


@pytest.mark.fault  # starts a server of its own
async def test_a_server_restarted_with_several_writes_on_the_wire_loses_no_request(
    private_server: RedisServer,
) -> None:
    """``kill -9`` and a restart while three writes wait on a paused server (which never ran
    them): each call either has its answer or fails with `StorageError` (the reconnection found
    the server still down), none hangs; every request acknowledged before or during the
    restart is stored, none twice, and the storage works on."""
    async with RedisStorage(private_server.url, fresh_name("restarted")) as storage:
        await storage.batch_enqueue([LLMRequest(f"before{i}", i) for i in range(4)])
        private_server.pause()
        calls = await _waves(
            3, lambda wave: [storage.enqueue(LLMRequest(f"r{wave}-{i}", i)) for i in range(2)]
        )
        assert len(_batcher(storage)._inflight) == 3
        await asyncio.to_thread(private_server.restart)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, (QueueMessage, StorageError)) for o in outcomes), outcomes
        acknowledged = [o.payload.id for o in outcomes if isinstance(o, QueueMessage)]
        await storage.enqueue(LLMRequest("after", 0))
        stored = sorted(m.payload.id for m in await storage.dequeue(20, 30.0))
        assert len(stored) == len(set(stored))
        assert {f"before{i}" for i in range(4)} | set(acknowledged) | {"after"} <= set(stored)
