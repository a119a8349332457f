"""Fault tests: real processes on a real redis-server, killed, paused and restarted.

Every test starts its own server (free port, temporary directory, AOF fsynced always) and its
own worker processes (``tests/redis/worker.py``), judges their ledgers with
``tests/redis/ledger.check`` and stops everything it started. Each is bounded to well under a
minute on two cores; they carry the ``fault`` marker and run in the default ``make test``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from llm_queue_dispatcher import LLMRequest, Priority, StorageError, TokenInfo
from llm_queue_dispatcher.redis import RedisStorage
from tests.redis.conftest import Workers
from tests.redis.ledger import Verdict, check
from tests.redis.support import RedisServer

pytestmark = pytest.mark.fault


def enqueued_ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in records if r["event"] == "enq"}


async def fill(url: str, queue: str, ids: list[str], **options: Any) -> None:
    async with RedisStorage(url, queue, **options) as storage:
        for start in range(0, len(ids), 500):
            await storage.batch_enqueue([LLMRequest(rid, {"n": rid}) for rid in ids[start : start + 500]])


async def queue_state(url: str, queue: str) -> tuple[int, int, int]:
    async with RedisStorage(url, queue) as storage:
        attributes = await storage.get_queue_attributes()
    return (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
        attributes.dead_lettered,
    )


def assert_clean(verdict: Verdict) -> None:
    assert not verdict.lost, f"lost: {sorted(verdict.lost)[:20]}"
    assert not verdict.unexpected, f"unexpected: {sorted(verdict.unexpected)[:20]}"
    assert not verdict.unexplained_duplicates, (
        f"unexplained duplicates: {sorted(verdict.unexplained_duplicates)[:20]}"
    )


# ----- the checker can fail ------------------------------------------------------------------------


def test_the_checker_counts_what_it_should() -> None:
    records = [
        {"event": "recv", "id": "a", "handle": "h1", "pid": 1},
        {"event": "recv", "id": "a", "handle": "h2", "pid": 2},
        {"event": "ack", "id": "a", "handle": "h2", "pid": 2},
        {"event": "recv", "id": "b", "handle": "h3", "pid": 2},
        {"event": "ack", "id": "b", "handle": "h3", "pid": 2},
        {"event": "recv", "id": "b", "handle": "h4", "pid": 3},
        {"event": "ack", "id": "b", "handle": "h4", "pid": 3},
        {"event": "recv", "id": "zz", "handle": "h5", "pid": 3},
    ]
    verdict = check({"a", "b", "c"}, records, killed={1})
    assert verdict.lost == {"c"}
    assert verdict.unexpected == {"zz"}
    assert verdict.duplicates == {"a", "b"}
    assert verdict.unexplained_duplicates == {"b"}  # "a" was held by killed pid 1; "b" was acked twice
    assert check({"a"}, records[:3], killed=set()).unexplained_duplicates == {"a"}
    assert check({"a"}, records[:3], leases_may_expire=True).clean
    resent = [{"event": "enq_uncertain", "id": "b", "pid": 9}, *records[3:7]]
    assert check({"b"}, resent).clean  # "b" was acked twice, but its producer may have stored it twice


# ----- many receivers ------------------------------------------------------------------------------


def test_racing_receivers_get_each_message_once(private_server: RedisServer, workers: Workers) -> None:
    ids = [f"m{i}" for i in range(1500)]
    asyncio.run(fill(private_server.url, "race", ids))
    for _ in range(4):
        workers.start(
            "consume", url=private_server.url, queue="race", visibility=60.0, batch=8, max_seconds=60
        )
    workers.wait(90)
    records = workers.records()
    verdict = check(set(ids), records)
    assert_clean(verdict)
    assert not verdict.duplicates  # leases never ran out: not one message twice
    pids = {r["pid"] for r in records if r["event"] == "recv"}
    assert len(pids) == 4  # all four really raced
    assert asyncio.run(queue_state(private_server.url, "race")) == (0, 0, 0)


def test_workers_killed_mid_flight_lose_nothing(private_server: RedisServer, workers: Workers) -> None:
    """``kill -9`` of two of four workers while they hold messages: every message is acknowledged
    in the end, and only messages the killed workers held are delivered twice."""
    ids = [f"k{i}" for i in range(400)]
    asyncio.run(fill(private_server.url, "kill", ids))
    options = {"url": private_server.url, "queue": "kill", "visibility": 1.5, "batch": 5, "work": 0.004}
    victims = [workers.start("consume", max_seconds=60, **options) for _ in range(2)]
    for _ in range(2):
        workers.start("consume", max_seconds=60, **options)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill while they are in the middle of the queue
        received = sum(r["event"] == "recv" for r in workers.records())
        if received >= 100:
            break
        time.sleep(0.02)
    for victim in victims:
        os.killpg(victim.pid, signal.SIGKILL)
    workers.wait(90)
    records = workers.records()
    killed = {victim.pid for victim in victims}
    verdict = check(set(ids), records, killed=killed)
    assert_clean(verdict)
    held = {
        r["id"]
        for r in records
        if r["event"] == "recv" and r["pid"] in killed
        and not any(a["event"] == "ack" and a["handle"] == r["handle"] for a in records)
    }  # fmt: skip
    assert held, "the victims held nothing when killed: the test did not test anything"
    assert verdict.duplicates <= held
    assert asyncio.run(queue_state(private_server.url, "kill")) == (0, 0, 0)


def test_a_paused_holder_is_fenced_off(private_server: RedisServer, workers: Workers, tmp_path: Path) -> None:
    """A worker frozen (SIGSTOP) past its lease: the message goes to another consumer; when the
    frozen one wakes, its visibility change and delete are refused, the new holder's succeed."""
    asyncio.run(fill(private_server.url, "pause", ["only"]))
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = workers.start(
        "hold", url=private_server.url, queue="pause", visibility=1.0, max_seconds=60,
        ready_file=str(ready), go_file=str(go),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the holder never received the message"
        time.sleep(0.01)
    os.killpg(holder.pid, signal.SIGSTOP)

    async def take_over() -> str:
        async with RedisStorage(private_server.url, "pause") as storage:
            while not (taken := await storage.dequeue(1, 30.0)):  # noqa: ASYNC110 (polling Redis)
                await asyncio.sleep(0.05)  # the holder's lease runs out after 1 s
            return taken[0].attributes.receipt_handle

    new_handle = asyncio.run(asyncio.wait_for(take_over(), 20))
    go.touch()
    os.killpg(holder.pid, signal.SIGCONT)
    workers.wait(30)
    refused = [r["operation"] for r in workers.records() if r["event"] == "refused"]
    assert refused == ["visibility", "delete"]

    async def finish() -> None:
        async with RedisStorage(private_server.url, "pause") as storage:
            await storage.update_visibility_timeout(new_handle, 60.0)
            await storage.delete_message(new_handle)
            assert await storage.get_approximate_message_count() == 0

    asyncio.run(finish())
    assert asyncio.run(queue_state(private_server.url, "pause")) == (0, 0, 0)


# ----- the server fails ----------------------------------------------------------------------------


def test_a_restarted_server_loses_nothing_acknowledged(private_server: RedisServer, workers: Workers) -> None:
    """``kill -9`` of redis-server while a producer enqueues and three workers consume, then a
    restart on the same append-only file: every enqueue Redis acknowledged is processed, and the
    workers carry on by themselves."""
    ids = [f"r{i}" for i in range(600)]
    workers.start("produce", url=private_server.url, queue="restart", ids=ids, pace=0.002, max_seconds=60)
    for _ in range(3):
        workers.start(
            "consume", url=private_server.url, queue="restart", visibility=2.0, batch=5, work=0.002,
            max_seconds=60, idle_seconds=1.5,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while sum(r["event"] == "ack" for r in workers.records()) < 150:
        assert time.monotonic() < deadline, "no progress before the crash"
        time.sleep(0.02)
    private_server.kill()
    time.sleep(1.0)  # down for a second: every worker sees errors
    private_server.start()
    workers.wait(90)
    records = workers.records()
    enqueued = enqueued_ids(records)
    assert enqueued == set(ids)  # the producer rode out the outage too
    verdict = check(enqueued, records, leases_may_expire=True)
    assert_clean(verdict)
    assert any(r["event"] == "storage_error" for r in records), "no worker noticed the outage"
    uncertain = {r["id"] for r in records if r["event"] == "enq_uncertain"}
    assert len(uncertain) <= 1  # only the enqueue in flight when the server died
    assert asyncio.run(queue_state(private_server.url, "restart"))[:2] == (0, 0)


async def test_an_unreachable_server_fails_fast_and_recovers(private_server: RedisServer) -> None:
    """Down at start, paused (a hung server) and back: `StorageError` within the client's timeout
    every time, never a hang, and the same storage works again once the server answers."""
    url = private_server.url + "?socket_timeout=1.0&socket_connect_timeout=1.0"
    private_server.kill()
    async with RedisStorage(url, "down") as storage:
        started = time.monotonic()
        with pytest.raises(StorageError, match="ConnectionError"):
            await storage.enqueue(LLMRequest("a", 1))
        assert time.monotonic() - started < 1.5
        private_server.start()
        await storage.enqueue(LLMRequest("a", 1))  # recovered by itself
        private_server.pause()  # a hung server: connected, never answering
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match="Timeout"):
                await storage.get_approximate_message_count()
            assert time.monotonic() - started < 2.5
        finally:
            private_server.resume()
        [message] = await storage.dequeue(1, 30.0)
        await storage.delete_message(message.attributes.receipt_handle)
        assert await storage.get_approximate_message_count() == 0


# ----- poison messages -----------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_after_max_receive_count(
    private_server: RedisServer, workers: Workers
) -> None:
    ids = [f"p{i}" for i in range(200)]
    poison = {f"p{i}" for i in range(0, 200, 17)}
    asyncio.run(fill(private_server.url, "poisoned", ids, max_receive_count=3, dead_letter="poisoned-dead"))
    for _ in range(2):
        workers.start(
            "consume", url=private_server.url, queue="poisoned", visibility=30.0, batch=4,
            max_receive_count=3, dead_letter="poisoned-dead", poison=sorted(poison), max_seconds=60,
        )  # fmt: skip
    workers.wait(90)
    records = workers.records()
    verdict = check(set(ids), records, dead_lettered=poison, leases_may_expire=True)
    assert_clean(verdict)
    failures: dict[str, int] = {}
    for record in records:
        if record["event"] == "fail":
            failures[record["id"]] = failures.get(record["id"], 0) + 1
    assert failures == dict.fromkeys(poison, 3)  # exactly three tries each, then dead-lettered

    async def dead_ids() -> set[str]:
        async with RedisStorage(private_server.url, "poisoned-dead") as dead:
            return {m.payload.id for p in Priority for m in await dead.peek_messages_by_priority(p, 1000)}

    assert asyncio.run(dead_ids()) == poison
    assert asyncio.run(queue_state(private_server.url, "poisoned")) == (0, 0, len(poison))


# ----- the dispatcher in several processes ---------------------------------------------------------


def test_dispatchers_in_several_processes_share_one_queue(
    private_server: RedisServer, workers: Workers
) -> None:
    """Three processes each run `LLMQueueDispatcher` over one `RedisStorage` queue (the prefetch
    buffer path: each leases ``buffer_size`` messages): no message is handed to two of them."""
    ids = [f"d{i}" for i in range(300)]
    asyncio.run(fill(private_server.url, "dispatch", ids))
    for _ in range(3):
        workers.start(
            "dispatch", url=private_server.url, queue="dispatch", buffer_size=10, visibility=60.0,
            work=0.002, max_seconds=60,
        )  # fmt: skip
    workers.wait(90)
    records = workers.records()
    verdict = check(set(ids), records)
    assert_clean(verdict)
    assert not verdict.duplicates
    assert len({r["pid"] for r in records if r["event"] == "ack"}) == 3
    assert asyncio.run(queue_state(private_server.url, "dispatch")) == (0, 0, 0)


def test_dispatchers_in_several_processes_share_one_budget(
    private_server: RedisServer, workers: Workers
) -> None:
    """Three dispatcher processes, one queue, one `RedisThrottle`: the reservations of all three
    together stay within the one budget (a minute's burst, then the refill), and still no message
    goes to two of them. 64 requests of 100 tokens against 6,000 TPM: 60 at once, the rest one a
    second, each dispatcher waiting (``dequeue(timeout=...)``) until the shared bucket has room."""
    ids = [f"b{i}" for i in range(64)]

    async def fill_with_tokens() -> None:
        async with RedisStorage(private_server.url, "budget") as storage:
            await storage.batch_enqueue(
                [LLMRequest(rid, {"n": rid}, token_info=TokenInfo(100)) for rid in ids]
            )

    asyncio.run(fill_with_tokens())
    limiter = {"name": "shared", "rpm": 6_000.0, "tpm": 6_000.0}
    for _ in range(3):
        workers.start(
            "dispatch", url=private_server.url, queue="budget", buffer_size=4, visibility=60.0,
            limiter=limiter, max_seconds=60,
        )  # fmt: skip
    workers.wait(90)
    records = workers.records()
    verdict = check(set(ids), records)
    assert_clean(verdict)
    assert not verdict.duplicates
    grants = sorted((r for r in records if r["event"] == "recv"), key=lambda r: r["after"])
    start = min(g["before"] for g in grants)
    total = 0
    for grant in grants:
        total += grant["tokens"]
        assert total <= 6_000 + 100 * (grant["after"] - start) + 1e-6, "more than the shared budget"
    assert grants[-1]["after"] - start >= 3.0  # the last four really waited for the refill
    assert len({g["pid"] for g in grants}) >= 2
