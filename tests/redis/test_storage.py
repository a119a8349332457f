"""`RedisStorage` beyond the conformance suite: what crossing a process boundary adds (payloads
that round-trip, serializers, scripts the server forgot, keys in one slot, the server's clock,
dead-lettering in one step, retried enqueues), and bad input refused before any command reaches
the server (watched with ``MONITOR``) while braces and newlines in ids and payloads stay data."""

from __future__ import annotations

import asyncio
import math
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.crc
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_queue_dispatcher import (
    InvalidConfigError,
    InvalidRequestError,
    LLMRequest,
    ManualClock,
    MessageAttributes,
    PayloadTooLargeError,
    Priority,
    QueueMessage,
    QueueStorageAdapter,
    ReceiptHandleError,
    StorageError,
    TokenInfo,
)
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from llm_queue_dispatcher.redis._codec import MAX_JSON_INT, decode_request, encode_request
from tests.integer_like import IntLike, int_likes
from tests.redis.conftest import START, fresh_name
from tests.redis.support import (
    HOUR,
    ClockedRedisStorage,
    Monitor,
    RedisServer,
    RedisStorageAnHourAhead,
    ReplyCutter,
    an_hour_ahead,
    running_server,
)

MakeStorage = Callable[..., ClockedRedisStorage[Any]]


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


# ----- payloads ------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-MAX_JSON_INT, MAX_JSON_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
INSTANTS = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.none()
    | st.just(timezone.utc)
    | st.builds(timezone, st.sampled_from([timedelta(hours=-5), timedelta(hours=5, minutes=30)])),
)
REQUESTS = st.builds(
    LLMRequest,
    id=st.text(min_size=1, max_size=20).filter(str.strip),
    payload=JSON,
    priority=st.sampled_from(list(Priority)),
    token_info=st.builds(
        TokenInfo, st.integers(0, 10**12), st.none() | st.integers(0, 10**9), st.none() | st.text(max_size=10)
    )
    | st.builds(  # with the estimate's input and output parts
        TokenInfo,
        actual=st.none() | st.integers(0, 10**9),
        input=st.integers(0, 10**12),
        max_output=st.integers(0, 10**6),
    ),
    expected_processing_time=st.none() | st.floats(0, 1e6) | st.integers(0, 1000),
    metadata=st.dictionaries(st.text(max_size=8), JSON, max_size=3),
    created_at=INSTANTS,
    tenant=st.none() | st.text(max_size=10),
    deadline=st.none() | INSTANTS,
)


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(REQUESTS, min_size=1, max_size=4, unique_by=lambda r: r.id))
def test_the_whole_request_round_trips(shared_server: RedisServer, requests: list[LLMRequest[Any]]) -> None:
    """Every field of every request comes back equal (not the same object), through single and
    batch enqueues alike. Strings with lone surrogates are refused, so they are left out here."""
    requests = [r for r in requests if _encodable(r)]

    async def scenario() -> None:
        async with RedisStorage(shared_server.url, fresh_name("roundtrip")) as storage:
            await storage.enqueue(requests[0]) if requests else None
            await storage.batch_enqueue(requests[1:])
            got = await storage.dequeue(10, 30.0)
            by_id = {m.payload.id: m.payload for m in got}
            assert len(got) == len(requests)
            for request in requests:
                back = by_id[request.id]
                assert back == request
                assert back is not request
                assert back.created_at.utcoffset() == request.created_at.utcoffset()

    asyncio.run(scenario())


def _encodable(request: LLMRequest[Any]) -> bool:
    import json

    try:
        json.dumps(
            [request.id, request.payload, request.metadata, request.tenant, request.token_info.model],
            ensure_ascii=False,
        ).encode()
    except UnicodeEncodeError:
        return False
    return True


async def test_a_serializer_pair_carries_bytes(clocked_storage: MakeStorage) -> None:
    point = struct.Struct("<dd")
    storage = clocked_storage(serializer=(lambda p: point.pack(*p), point.unpack))
    await storage.enqueue(LLMRequest("p", (1.5, -2.25)))
    raw = clocked_storage(serializer=(bytes, bytes))
    payload = b"\x00\n\xff{}\r\n" * 3
    await raw.enqueue(LLMRequest("b", payload))
    [message] = await storage.dequeue(1, 5.0)
    assert message.payload.payload == (1.5, -2.25)
    [message] = await raw.dequeue(1, 5.0)
    assert message.payload.payload == payload


def _containing_itself() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["a"] = [1, loop]
    return loop


def test_a_list_held_twice_is_no_cycle() -> None:
    shared = [1, {"deep": [2]}]
    request = LLMRequest("a", {"x": shared, "y": [shared, shared]})
    assert decode_request(encode_request(request, None, 10_000), None) == request


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (object(), "object is not JSON"),
        ((1, 2), "tuple"),
        ({"a": (1,)}, r"payload\['a'\]"),
        ({1: "one"}, "key 1"),
        ([math.nan], r"payload\[0\]"),
        ({"x": math.inf}, "not a JSON number"),
        ({1, 2}, "set is not JSON"),
        (b"bytes", "bytes is not JSON"),
        ("lone \ud800 surrogate", "surrogate"),
        ({"k": ["\udfff"]}, r"payload\['k'\]\[0\]"),
        (2**70, r"payload cannot .* the int 1180591620717411303424 is beyond"),
        ({"n": [1, -(2**53)]}, r"payload\['n'\]\[1\] cannot .* beyond \+-\(2\*\*53 - 1\)"),
        ([10**5000], r"payload\[0\] cannot .* the int <int of 16610 bits>"),
        (_containing_itself(), r"payload\['a'\]\[1\] cannot .* contains itself"),
    ],
)
async def test_payloads_json_cannot_give_back_are_refused(
    unreachable_storage: RedisStorage[Any], payload: Any, named: str
) -> None:
    """Refused with `InvalidRequestError` naming the part, before any network call: the storage
    points at a port where nothing listens, so a command sent would raise `StorageError`."""
    with pytest.raises(InvalidRequestError, match=named):
        await unreachable_storage.enqueue(LLMRequest("a", payload))
    with pytest.raises(InvalidRequestError, match=named):
        await unreachable_storage.batch_enqueue([LLMRequest("ok", 1), LLMRequest("a", payload)])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: setattr(r, "metadata", {"when": datetime(2020, 1, 1)}), "metadata"),
        (lambda r: setattr(r, "metadata", {"big": 2**64}), r"metadata\['big'\] .* beyond"),
        (lambda r: setattr(r, "metadata", {"me": _containing_itself()}), r"metadata\['me'\]\['a'\]\[1\]"),
        (lambda r: setattr(r, "token_info", TokenInfo(2**70)), "token_info.estimated .* beyond"),
        (lambda r: setattr(r, "token_info", TokenInfo(5, 10**5000)), "token_info.actual .* beyond"),
        (lambda r: setattr(r, "expected_processing_time", 2**60), "expected_processing_time .* beyond"),
        (lambda r: setattr(r, "metadata", {"s": "\ud800"}), r"metadata\['s'\]"),
        (lambda r: setattr(r, "tenant", "\udc80"), "tenant"),
        (lambda r: setattr(r, "id", "x\ud800"), "id"),
        (lambda r: object.__setattr__(r.token_info, "model", 5), "token_info.model"),
    ],
)
async def test_other_fields_are_checked_too(
    unreachable_storage: RedisStorage[Any], change: Callable[[LLMRequest[Any]], None], named: str
) -> None:
    request = LLMRequest("a", {"ok": True})
    change(request)
    with pytest.raises(InvalidRequestError, match=named):
        await unreachable_storage.enqueue(request)


async def test_oversized_requests_are_refused_before_any_io(unreachable_storage: RedisStorage[Any]) -> None:
    small = RedisStorage(unreachable_storage.redis, "small", max_payload_bytes=200)
    with pytest.raises(PayloadTooLargeError, match="max_payload_bytes = 200"):
        await small.enqueue(LLMRequest("a", "x" * 200))
    assert isinstance(PayloadTooLargeError("x"), InvalidRequestError)
    with pytest.raises(PayloadTooLargeError):
        await unreachable_storage.enqueue(LLMRequest("big", "y" * 1_048_576))


async def test_a_serializer_that_fails_or_returns_text_is_refused(
    unreachable_storage: RedisStorage[Any],
) -> None:
    def boom(payload: Any) -> bytes:
        raise TypeError("cannot")

    for serializer, named in (((boom, bytes), "raised TypeError"), ((str, bytes), "must return bytes")):
        storage = RedisStorage(unreachable_storage.redis, "s", serializer=serializer)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=named):
            await storage.enqueue(LLMRequest("a", 1))


async def test_a_mutated_request_is_validated_again(unreachable_storage: RedisStorage[Any]) -> None:
    request = LLMRequest("a", 1)
    request.priority = 9  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError, match="priority"):
        await unreachable_storage.enqueue(request)


# ----- bad input and configuration: refused before any command; data stored as data ------------

BAD_NAMES = [
    "{tag}",
    "a}b{",
    "new\nline",
    "carriage\r\nreturn",
    "x" * 81,
    "lone\ud800",
    "sp ace",
    "",
    "k:v",
]


@pytest.fixture
async def monitored(tmp_path: Path) -> AsyncIterator[tuple[str, Monitor]]:
    directory = tmp_path / "redis"
    directory.mkdir()
    with running_server(directory) as server:
        yield server.url, Monitor(server.url)


@pytest.mark.fault  # starts a server of its own
async def test_bad_names_payloads_handles_and_counts_are_refused_before_any_command(
    monitored: tuple[str, Monitor],
) -> None:
    url, monitor = monitored
    storage: RedisStorage[Any] = RedisStorage(url, "ok", max_payload_bytes=4096)
    limiter = RedisThrottle(url, "ok", rpm=60, tpm=1000)
    await storage.get_approximate_message_count()  # connected: a refusal cannot hide behind a lazy connect
    await limiter.can_process(1)

    async def refused() -> None:
        for name in BAD_NAMES:
            with pytest.raises(InvalidConfigError):
                RedisStorage(url, name)
            with pytest.raises(InvalidConfigError):
                RedisStorage(url, "ok", namespace=name)
            with pytest.raises(InvalidConfigError):
                RedisThrottle(url, name, rpm=1, tpm=1)
        for payload in ("x" * 5000, {"text": "lone \udc00"}, ("tuple",), float("nan")):
            with pytest.raises(InvalidRequestError):
                await storage.enqueue(LLMRequest("r", payload))
        with pytest.raises(PayloadTooLargeError):
            await storage.batch_enqueue([LLMRequest("a", 1), LLMRequest("b", "y" * 5000)])
        with pytest.raises(InvalidRequestError):
            await storage.enqueue(LLMRequest("id-with-\ud800", 1))
        for handle in ("{x}\n", "", "1.1.zz", "0" * 15 + ".1." + "0" * 31 + "\n", None):
            with pytest.raises(ReceiptHandleError):
                await storage.delete_message(handle)  # type: ignore[arg-type]
            with pytest.raises(ReceiptHandleError):
                await storage.update_visibility_timeout(handle, 1.0)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            await storage.dequeue(-1, 1.0)
        with pytest.raises(InvalidRequestError):
            await storage.dequeue(1, float("inf"))
        with pytest.raises(InvalidRequestError):
            await limiter.consume("\ud800", 1)
        with pytest.raises(InvalidRequestError):
            await limiter.consume("a", -1)

    try:
        assert await monitor.commands_during(refused) == []
        # The monitor does see commands that are sent:
        seen = await monitor.commands_during(lambda: storage.get_approximate_message_count())
        assert any("EVALSHA" in command for command in seen)
    finally:
        await storage.aclose()
        await limiter.aclose()


async def test_braces_and_newlines_in_ids_and_payloads_are_data(redis_url: str) -> None:
    namespace = "braces-data"
    async with RedisStorage(redis_url, "q", namespace=namespace) as storage:
        await storage.purge()
        ids = ["{q}", "}{", "line\nbreak\r\n", "\x00nul", "*3\r\n$4\r\nPING", "ünï©ødé {ns}:q:q:ids"]
        requests = [
            LLMRequest(
                rid, {"{": "}", "\n": ["\r\n", "{x}"]}, token_info=TokenInfo(1, model="{m}\n"), tenant="{t}"
            )
            for rid in ids
        ]
        await storage.batch_enqueue(requests)
        got = await storage.dequeue(10, 30.0)
        assert sorted(m.payload.id for m in got) == sorted(ids)
        assert {m.payload.id: m.payload for m in got} == {r.id: r for r in requests}
        keys = [key async for key in storage.redis.scan_iter(match=f"{{{namespace}}}*")]
        assert {redis.crc.key_slot(key) for key in keys} == {redis.crc.key_slot(f"{{{namespace}}}".encode())}
        replies = [key for key in keys if b":reply:" in key]
        assert len(replies) == 1  # the receive's reply, kept a minute for a resend
        assert 0 < await storage.redis.pttl(replies[0]) <= 60_000
        # meta, seq, ids, body, state, in flight (all received): no stray key
        assert len(keys) - len(replies) == 6


def test_bad_dead_letter_names_never_reach_a_key() -> None:
    for name in BAD_NAMES:
        with pytest.raises(InvalidConfigError, match="must match"):
            RedisStorage("redis://127.0.0.1:1/0", "ok", dead_letter=name)


def test_every_script_loop_has_a_written_bound() -> None:
    """No script loops on a condition (``while``, ``repeat``): each loop is a ``for`` over a
    constant, the call's arguments or what a key holds, with a comment naming that bound on its
    line or the line before. A script that never ended would stop Redis for every client."""
    scripts = resources.files("llm_queue_dispatcher.redis").joinpath("lua")
    unbounded: list[str] = []
    for script in scripts.iterdir():
        lines = script.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            code = line.split("--", 1)[0]
            where = f"{script.name}:{number + 1}: {line.strip()}"
            on_a_condition = re.search(r"\b(while|repeat)\b", code) is not None
            unsaid = re.match(r"\s*for\b", code) and "--" not in line and "Bounded" not in lines[number - 1]
            if on_a_condition or unsaid:
                unbounded.append(where)
    assert not unbounded, unbounded


@pytest.mark.parametrize("name", ["", "{tag}", "a b", "line\nbreak", "a:b", "x" * 81, "ü", None, 3])
def test_bad_names_are_refused(redis_url: str, name: Any) -> None:
    with pytest.raises(InvalidConfigError, match="queue"):
        RedisStorage(redis_url, name)
    with pytest.raises(InvalidConfigError, match="namespace"):
        RedisStorage(redis_url, "ok", namespace=name)
    if name is not None:
        with pytest.raises(InvalidConfigError, match="dead_letter"):
            RedisStorage(redis_url, "ok", dead_letter=name)


@pytest.mark.parametrize(
    "options",
    [
        {"dead_letter": "same"},
        {"max_payload_bytes": 0},
        {"max_payload_bytes": 1.5},
        {"serializer": (bytes,)},
        {"serializer": "json"},
    ],
)
def test_bad_options_are_refused(redis_url: str, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError):
        RedisStorage(redis_url, "same", **options)


@pytest.mark.parametrize("retention", [1e308, math.inf, 2.0**53], ids=["1e308", "inf", "2**53 s"])
async def test_a_retention_longer_than_redis_can_count_keeps_messages_forever(
    clocked_storage: MakeStorage, clock: ManualClock, retention: float
) -> None:
    storage = clocked_storage(message_retention=retention)
    assert storage.message_retention == retention
    await storage.enqueue(LLMRequest("r", {"n": 1}, token_info=TokenInfo(1)))
    clock.advance(10 * 365 * 86_400.0)  # ten years on
    [message] = await storage.dequeue(1, 30.0)
    assert message.payload.id == "r"


@pytest.mark.parametrize(
    "retention",
    [10**400, -(10**400), 0, math.nan, "60", True],
    ids=["10**400", "-10**400", "0", "nan", "str", "bool"],
)
def test_a_retention_no_number_of_seconds_can_hold_is_refused_naming_it(
    redis_url: str, retention: Any
) -> None:
    with pytest.raises(InvalidConfigError, match="message_retention"):
        RedisStorage(redis_url, "q", message_retention=retention)


@pytest.mark.parametrize("number", int_likes(30), ids=lambda v: type(v).__name__)
async def test_integer_like_numbers_are_valid_storage_arguments(
    clocked_storage: MakeStorage, number: object
) -> None:
    storage = clocked_storage(
        message_retention=number, max_receive_count=number, max_payload_bytes=IntLike(4096)
    )
    assert (storage.message_retention, storage.max_receive_count, storage.max_payload_bytes) == (
        30.0,
        30,
        4096,
    )
    await storage.enqueue(LLMRequest("r", {"n": 1}, token_info=TokenInfo(1)))
    [message] = await storage.dequeue(number, number)  # type: ignore[arg-type]
    await storage.update_visibility_timeout(message.attributes.receipt_handle, number)  # type: ignore[arg-type]


def maintain_batch() -> int:
    """The most messages one call expires (queue_common.lua's MAINTAIN_BATCH)."""
    source = resources.files("llm_queue_dispatcher.redis").joinpath("lua", "queue_common.lua").read_text()
    match = re.search(r"^local MAINTAIN_BATCH = (\d+)$", source, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


async def test_expiring_many_messages_at_once_is_bounded_work_per_call_and_answers_stay_right(
    private_server: RedisServer, clock: ManualClock
) -> None:
    """20,000 messages past the retention period at one instant: one call drops at most
    MAINTAIN_BATCH of them (counted by the server's own command statistics, not by time), the
    rest go in later calls, and meanwhile none is delivered or counted as visible, all count as
    expired, and their request ids are free again."""
    batch = maintain_batch()
    old = 20 * batch
    storage: ClockedRedisStorage[Any] = ClockedRedisStorage(
        private_server.url, "bulk", clock=clock, message_retention=60.0
    )
    async with storage:
        for start in range(0, old, 1_000):
            await storage.batch_enqueue(
                [LLMRequest(f"old-{n}", n, token_info=TokenInfo(1)) for n in range(start, start + 1_000)]
            )
        clock.advance(30.0)
        await storage.batch_enqueue([LLMRequest(f"new-{n}", n, token_info=TokenInfo(1)) for n in range(5)])
        clock.advance(31.0)  # the old ones are past the retention period, the new ones are not
        client = storage.redis
        await client.config_resetstat()
        assert await storage.get_approximate_message_count() == 5
        # One call, bounded work: each dropped message is three HDELs (id, body, state).
        hdels = (await client.info("commandstats"))["cmdstat_hdel"]["calls"]
        assert 0 < hdels <= 3 * batch
        attributes = await storage.get_queue_attributes()
        assert attributes.approximate_number_of_messages == 5
        assert attributes.approximate_number_of_messages_in_flight == 0
        assert attributes.expired == old  # all counted as expired at once
        assert [len(await storage.peek_messages_by_priority(p, 100)) for p in Priority] == [0, 0, 5, 0]
        # Never delivered: a receive takes only the live ones, though the expired are older.
        received = await storage.dequeue(100, 30.0)
        assert sorted(m.payload.id for m in received) == [f"new-{n}" for n in range(5)]
        # An expired request's id is free again at once, before any call dropped it.
        await storage.enqueue(LLMRequest(f"old-{old - 1}", 0, token_info=TokenInfo(1)))
        for _ in range(old // batch):  # later calls finish the job, MAINTAIN_BATCH at a time
            await storage.get_approximate_message_count()
        state_key = storage._keys[4]
        assert await client.hlen(state_key) == 6  # the five received and the one enqueued again
        assert (await storage.get_queue_attributes()).expired == old


async def test_many_leases_ending_at_once_are_bounded_work_per_call(
    private_server: RedisServer, clock: ManualClock
) -> None:
    """2.5 x MAINTAIN_BATCH leases ending at one instant: one call returns at most MAINTAIN_BATCH
    of them (the others count as in flight until a later call returns them), and a few calls
    later every message is visible again, none lost or doubled."""
    batch = maintain_batch()
    total = batch * 5 // 2
    storage: ClockedRedisStorage[Any] = ClockedRedisStorage(private_server.url, "leases", clock=clock)
    async with storage:
        for start in range(0, total, 500):
            await storage.batch_enqueue(
                [LLMRequest(f"r{n}", n, token_info=TokenInfo(1)) for n in range(start, start + 500)]
            )
        received = 0
        while received < total:
            received += len(await storage.dequeue(1_000, 10.0))
        clock.advance(11.0)  # every lease has ended
        client = storage.redis
        await client.config_resetstat()
        assert await storage.get_approximate_message_count() == batch
        # Each message returned is at most six ZADDs: its visible set, the fair ranking index's
        # lanes and its aging (or URGENT) set, the score index's members and ages sets and, when
        # it heads its class, the class list.
        assert (await client.info("commandstats"))["cmdstat_zadd"]["calls"] <= 6 * batch
        for _ in range(2):
            await storage.get_approximate_message_count()
        attributes = await storage.get_queue_attributes()
        assert attributes.approximate_number_of_messages == total
        assert attributes.approximate_number_of_messages_in_flight == 0


def test_the_client_must_be_a_redis_client_or_a_url() -> None:
    with pytest.raises(InvalidConfigError, match="redis must be"):
        RedisStorage(object(), "q")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="not usable"):
        RedisStorage("http://not-redis", "q")


# ----- scripts, keys, clocks -----------------------------------------------------------------------


async def test_scripts_flushed_from_the_server_are_reloaded_invisibly(redis_url: str) -> None:
    async with (
        RedisStorage(redis_url, fresh_name("flush")) as storage,
        RedisThrottle(redis_url, fresh_name("flush"), rpm=60, tpm=1000) as limiter,
    ):
        admin = redis.asyncio.Redis.from_url(redis_url)
        try:
            await storage.enqueue(LLMRequest("a", 1))
            assert await limiter.consume("a", 1)
            await admin.script_flush()
            assert await admin.script_exists(storage.redis and _sha("queue_common", "dequeue")) == [False]
            [message] = await storage.dequeue(1, 30.0)
            await storage.delete_message(message.attributes.receipt_handle)
            assert await limiter.consume("b", 1)
            assert await admin.script_exists(_sha("queue_common", "dequeue")) == [True]
        finally:
            await admin.aclose()


def _sha(prelude: str, name: str) -> str:
    from llm_queue_dispatcher.redis._connection import script

    return script(prelude, name).sha


async def test_every_key_of_a_namespace_is_in_one_cluster_slot(redis_url: str) -> None:
    namespace = fresh_name("slot")
    async with (
        RedisStorage(
            redis_url, "work", namespace=namespace, max_receive_count=1, dead_letter="dead"
        ) as storage,
        RedisThrottle(redis_url, "gpt", namespace=namespace, rpm=60, tpm=100) as limiter,
    ):
        await storage.enqueue(LLMRequest("a", 1))
        message = (await storage.dequeue(1, 30.0))[0]
        await storage.dead_letter_message(message)
        await storage.enqueue(LLMRequest("b", 1))
        await storage.dequeue(1, 30.0)
        assert await limiter.consume("a", 5)
        keys = [key async for key in storage.redis.scan_iter(match=f"{{{namespace}}}:*")]
    assert len(keys) >= 10
    assert {redis.crc.key_slot(key) for key in keys} == {redis.crc.key_slot(f"{{{namespace}}}".encode())}


async def test_instants_come_from_the_server_and_expiry_needs_no_background_task(redis_url: str) -> None:
    async with RedisStorage(redis_url, fresh_name("server-clock")) as storage:
        server_seconds, server_micro = await storage.redis.time()
        message = await storage.enqueue(LLMRequest("a", 1))
        server_now = server_seconds + server_micro / 1e6
        assert abs(message.attributes.enqueued_at.timestamp() - server_now) < 1.0
        [received] = await storage.dequeue(1, 0.2)
        assert await storage.dequeue(1, 0.2) == []
        await asyncio.sleep(0.25)  # no task runs in between: the next call finds it visible
        [again] = await storage.dequeue(1, 0.2)
        assert again.attributes.receive_count == 2
        assert again.attributes.first_received_at == received.attributes.first_received_at


async def test_a_host_clock_an_hour_off_sees_the_same_ages(redis_url: str) -> None:
    """Instants are the server's, told on each host's clock: a host an hour ahead gets them an
    hour later, so its ``now - enqueued_at`` (a message's age, its wait) is the server's age,
    the same as on a host whose clock agrees."""
    queue = fresh_name("skewed-host")
    async with (
        RedisStorage(redis_url, queue) as here,
        RedisStorageAnHourAhead[Any](redis_url, queue) as ahead,
    ):
        await here.enqueue(LLMRequest("a", 1))
        await ahead.enqueue(LLMRequest("b", 2))
        await asyncio.sleep(0.2)
        seen_here = await here.peek_messages_by_priority(int(Priority.NORMAL), 5)
        seen_ahead = await ahead.peek_messages_by_priority(int(Priority.NORMAL), 5)
        ages_here = [time.time() - m.attributes.enqueued_at.timestamp() for m in seen_here]
        ages_ahead = [an_hour_ahead() - m.attributes.enqueued_at.timestamp() for m in seen_ahead]
        assert ages_ahead == pytest.approx(ages_here, abs=0.05)
        assert all(0.15 < age < 5 for age in ages_ahead)
        for mine, theirs in zip(seen_here, seen_ahead, strict=True):
            shift = theirs.attributes.enqueued_at - mine.attributes.enqueued_at
            assert shift.total_seconds() == pytest.approx(HOUR, abs=0.05)
        [received] = await ahead.dequeue(1, 30.0)
        assert received.attributes.first_received_at is not None
        assert 0 <= an_hour_ahead() - received.attributes.first_received_at.timestamp() < 1
        attributes_here, attributes_ahead = (
            await here.get_queue_attributes(),
            await ahead.get_queue_attributes(),
        )
        shift = attributes_ahead.created_timestamp - attributes_here.created_timestamp
        assert shift.total_seconds() == pytest.approx(HOUR, abs=0.05)


async def test_a_client_decoding_responses_works_too(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        storage: RedisStorage[Any] = RedisStorage(client, fresh_name("decoding"), serializer=(bytes, bytes))
        await storage.enqueue(LLMRequest("a", b"\xff\x00 not utf-8"))
        [message] = await storage.dequeue(1, 5.0)
        assert message.payload.payload == b"\xff\x00 not utf-8"
        await storage.aclose()  # a client passed in is not closed by the storage
        assert await client.ping()
    finally:
        await client.aclose()


# ----- dead-lettering and retried enqueues ---------------------------------------------------------


async def test_dead_letter_message_moves_at_once_keeping_the_enqueue_time(
    clocked_storage: MakeStorage, clock: ManualClock
) -> None:
    dead = clocked_storage()
    storage = clocked_storage(dead_letter=dead.queue)
    request = LLMRequest("a", {"n": 1}, Priority.HIGH, TokenInfo(7))
    await storage.enqueue(request)
    clock.advance(5)
    [message] = await storage.dequeue(1, 30.0)
    await storage.dead_letter_message(message)
    attributes = await storage.get_queue_attributes()
    assert (attributes.approximate_number_of_messages_in_flight, attributes.dead_lettered) == (0, 1)
    [moved] = await dead.dequeue(1, 30.0)
    assert moved.payload == request
    assert moved.attributes.enqueued_at == utc(START)  # the original enqueue time
    assert moved.attributes.receive_count == 1
    with pytest.raises(ReceiptHandleError):
        await storage.dead_letter_message(message)  # its handle is stale now
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(message.attributes.receipt_handle)


async def test_dead_letter_message_without_a_target_drops_and_counts(
    clocked_storage: MakeStorage, caplog: pytest.LogCaptureFixture
) -> None:
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", 1))
    [message] = await storage.dequeue(1, 30.0)
    await storage.dead_letter_message(message)
    attributes = await storage.get_queue_attributes()
    assert (attributes.approximate_number_of_messages_in_flight, attributes.dead_lettered) == (0, 1)
    assert "dropped" in caplog.text


async def test_expiry_dead_letters_keep_the_enqueue_time(
    clocked_storage: MakeStorage, clock: ManualClock
) -> None:
    dead = clocked_storage()
    storage = clocked_storage(max_receive_count=1, dead_letter=dead.queue)
    await storage.enqueue(LLMRequest("a", 1))
    clock.advance(3)
    await storage.dequeue(1, 10.0)
    clock.advance(10)
    assert await storage.get_approximate_message_count() == 0
    [moved] = await dead.peek_messages_by_priority(Priority.NORMAL, 5)
    assert moved.attributes.enqueued_at == utc(START)


async def test_a_retried_enqueue_finds_its_own_messages(
    clocked_storage: MakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that resends an enqueue whose reply was lost gets the first run's answer, not a
    duplicate error; another call with the same ids is a duplicate."""
    import llm_queue_dispatcher.redis.storage as module

    storage = clocked_storage()
    batch = [LLMRequest("a", 1), LLMRequest("b", 2)]
    monkeypatch.setattr(module.secrets, "token_hex", lambda n: "ab" * n)
    first = await storage.batch_enqueue(batch)
    again = await storage.batch_enqueue(batch)  # the same call, resent
    assert [m.id for m in again] == [m.id for m in first]
    assert [m.attributes.enqueued_at for m in again] == [m.attributes.enqueued_at for m in first]
    assert await storage.get_approximate_message_count() == 2
    monkeypatch.undo()
    from llm_queue_dispatcher import DuplicateRequestError

    with pytest.raises(DuplicateRequestError, match="'a'"):
        await storage.batch_enqueue(batch)


# ----- giving a received message back ----------------------------------------------------------


async def test_release_message_undoes_the_receive(clocked_storage: MakeStorage, clock: ManualClock) -> None:
    """Visible at once, the receive count and first_received_at as before that receive, the
    handle stale; the next receive counts as the first again."""
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", {"n": 1}))
    clock.advance(2)
    [message] = await storage.dequeue(1, 30.0)
    handle = message.attributes.receipt_handle
    await storage.release_message(handle)
    [back] = await storage.peek_messages_by_priority(int(Priority.NORMAL), 5)
    assert (back.attributes.receive_count, back.attributes.first_received_at) == (0, None)
    assert back.attributes.enqueued_at == utc(START)
    attributes = await storage.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (
        1,
        0,
    )
    for stale_call in (storage.release_message, storage.delete_message):
        with pytest.raises(ReceiptHandleError):
            await stale_call(handle)
    clock.advance(3)
    [again] = await storage.dequeue(1, 30.0)
    assert again.attributes.receive_count == 1
    assert again.attributes.first_received_at == utc(START + 5)


async def test_a_release_after_a_second_receive_keeps_the_first_receive(
    clocked_storage: MakeStorage, clock: ManualClock
) -> None:
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", 1))
    [first] = await storage.dequeue(1, 1.0)
    clock.advance(1)
    [second] = await storage.dequeue(1, 30.0)
    assert second.attributes.receive_count == 2
    await storage.release_message(second.attributes.receipt_handle)
    [back] = await storage.peek_messages_by_priority(int(Priority.NORMAL), 5)
    assert back.attributes.receive_count == 1
    assert back.attributes.first_received_at == first.attributes.first_received_at == utc(START)


async def test_a_release_never_uses_up_a_receive(clocked_storage: MakeStorage, clock: ManualClock) -> None:
    """With max_receive_count=1, receive + release + receive again dead-letters nothing: the
    handler never saw the message. (Visibility 0 instead would have used up its one receive.)"""
    dead = clocked_storage()
    storage = clocked_storage(max_receive_count=1, dead_letter=dead.queue)
    await storage.enqueue(LLMRequest("a", 1))
    for _ in range(3):
        [message] = await storage.dequeue(1, 30.0)
        assert message.attributes.receive_count == 1
        await storage.release_message(message.attributes.receipt_handle)
    [message] = await storage.dequeue(1, 30.0)
    await storage.delete_message(message.attributes.receipt_handle)
    assert (await storage.get_queue_attributes()).dead_lettered == 0
    assert await dead.get_approximate_message_count() == 0


async def test_a_stale_or_unknown_handle_releases_nothing(
    clocked_storage: MakeStorage, clock: ManualClock
) -> None:
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", 1))
    [lost] = await storage.dequeue(1, 1.0)
    clock.advance(1)  # its lease ran out; another consumer receives it
    [current] = await storage.dequeue(1, 30.0)
    member = current.attributes.receipt_handle.split(".")[0]
    for handle in (lost.attributes.receipt_handle, f"{member}.2.{'0' * 32}", "not a handle", ""):
        with pytest.raises(ReceiptHandleError):
            await storage.release_message(handle)
    attributes = await storage.get_queue_attributes()
    assert (
        attributes.approximate_number_of_messages,
        attributes.approximate_number_of_messages_in_flight,
    ) == (
        0,
        1,
    )
    await storage.delete_message(current.attributes.receipt_handle)  # still the holder's


async def test_batch_release_gives_back_the_current_and_names_the_stale(
    clocked_storage: MakeStorage, clock: ManualClock
) -> None:
    storage = clocked_storage()
    await storage.batch_enqueue([LLMRequest(f"r{i}", i) for i in range(4)])
    received = await storage.dequeue(4, 30.0)
    handles = [m.attributes.receipt_handle for m in received]
    await storage.delete_message(handles[1])
    with pytest.raises(ReceiptHandleError) as raised:
        await storage.batch_release([handles[0], handles[1], "bogus", handles[2]])
    assert "2 of 4" in str(raised.value)
    assert handles[1] in str(raised.value)
    assert "bogus" in str(raised.value)
    assert handles[0] not in str(raised.value)
    assert await storage.get_approximate_message_count() == 2  # r0 and r2 back
    await storage.batch_release([handles[3]])
    again = await storage.dequeue(10, 30.0)
    assert sorted(m.payload.id for m in again) == ["r0", "r2", "r3"]
    assert {m.attributes.receive_count for m in again} == {1}
    await storage.batch_release([])  # nothing to do, nothing sent


# ----- replies lost in transit ----------------------------------------------------------------------


async def _load_scripts(storage: RedisStorage[Any]) -> None:
    """Runs every script once, so the server knows them and an armed cut falls on a script that
    runs (not on a NOSCRIPT answer)."""
    stale = f"{'0' * 15}.1.{'0' * 32}"
    await storage.dequeue(0, 1.0)
    for call in (
        storage.delete_message(stale),
        storage.batch_delete([stale]),
        storage.release_message(stale),
        storage.update_visibility_timeout(stale, 1.0),
    ):
        with pytest.raises(ReceiptHandleError):
            await call


async def test_a_delete_whose_reply_was_lost_is_not_reported_stale(reply_cutter: ReplyCutter) -> None:
    """The delete ran, the connection broke before its reply, redis-py resent it: the resend
    answers as the first run did instead of calling its own handle stale."""
    async with RedisStorage(reply_cutter.url, fresh_name("lost-delete")) as storage:
        await _load_scripts(storage)
        await storage.batch_enqueue([LLMRequest(f"r{i}", i) for i in range(3)])
        handles = [m.attributes.receipt_handle for m in await storage.dequeue(3, 30.0)]
        reply_cutter.armed = 1
        await storage.delete_message(handles[0])
        reply_cutter.armed = 1
        await storage.batch_delete(handles[1:])
        assert reply_cutter.cuts == 2
        attributes = await storage.get_queue_attributes()
        assert (
            attributes.approximate_number_of_messages + attributes.approximate_number_of_messages_in_flight
            == 0
        )


async def test_a_receive_whose_reply_was_lost_hands_out_what_it_leased(reply_cutter: ReplyCutter) -> None:
    """The resent receive returns the messages the first run leased, and leases no others:
    nothing is left leased to nobody."""
    async with RedisStorage(reply_cutter.url, fresh_name("lost-receive")) as storage:
        await _load_scripts(storage)
        await storage.batch_enqueue([LLMRequest(f"r{i}", i) for i in range(5)])
        reply_cutter.armed = 1
        received = await storage.dequeue(2, 30.0)
        assert reply_cutter.cuts == 1
        assert [m.payload.id for m in received] == ["r0", "r1"]
        assert [m.attributes.receive_count for m in received] == [1, 1]
        attributes = await storage.get_queue_attributes()
        assert attributes.approximate_number_of_messages_in_flight == 2
        await storage.batch_delete([m.attributes.receipt_handle for m in received])  # the handles work


async def test_releases_and_visibility_changes_whose_reply_was_lost_apply_once(
    reply_cutter: ReplyCutter,
) -> None:
    async with RedisStorage(reply_cutter.url, fresh_name("lost-release")) as storage:
        await _load_scripts(storage)
        await storage.enqueue(LLMRequest("a", 1))
        [first] = await storage.dequeue(1, 30.0)
        reply_cutter.armed = 1
        await storage.update_visibility_timeout(first.attributes.receipt_handle, 0.0)  # visible now
        [second] = await storage.dequeue(1, 30.0)
        assert second.attributes.receive_count == 2
        reply_cutter.armed = 1
        await storage.release_message(second.attributes.receipt_handle)
        assert reply_cutter.cuts == 2
        [back] = await storage.peek_messages_by_priority(int(Priority.NORMAL), 5)
        assert back.attributes.receive_count == 1  # that receive undone, once


async def test_a_dead_letter_whose_reply_was_lost_moves_once(reply_cutter: ReplyCutter) -> None:
    async with RedisStorage(reply_cutter.url, fresh_name("lost-dlq")) as storage:
        await _load_scripts(storage)
        await storage.enqueue(LLMRequest("a", 1))
        [message] = await storage.dequeue(1, 30.0)
        stale = replace(
            message, attributes=replace(message.attributes, receipt_handle=f"{'0' * 15}.1.{'0' * 32}")
        )
        with pytest.raises(ReceiptHandleError):
            await storage.dead_letter_message(stale)  # loads the script
        reply_cutter.armed = 1
        await storage.dead_letter_message(message)
        assert reply_cutter.cuts == 1
        assert (await storage.get_queue_attributes()).dead_lettered == 1


async def test_receipt_handles_carry_the_receive_count_and_128_random_bits(
    clocked_storage: MakeStorage, clock: ManualClock
) -> None:
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", 1))
    handles = []
    for count in (1, 2, 3):
        [message] = await storage.dequeue(1, 1.0)
        handles.append(message.attributes.receipt_handle)
        _member, receives, token = message.attributes.receipt_handle.split(".")
        assert int(receives) == count
        assert len(token) == 32
        assert int(token, 16) >= 0
        clock.advance(1)
    assert len({h.split(".")[2] for h in handles}) == 3
    forged = handles[-1].rsplit(".", 1)[0] + "." + "0" * 32
    with pytest.raises(ReceiptHandleError):
        await storage.delete_message(forged)


async def test_payloads_come_back_equal_not_identical(clocked_storage: MakeStorage) -> None:
    storage: QueueStorageAdapter[Any] = clocked_storage()
    payload = {"prompt": "hi", "n": [1, 2]}
    request = LLMRequest("a", payload)
    assert (await storage.enqueue(request)).payload is request  # enqueue answers with the request given
    [message] = await storage.dequeue(1, 1.0)
    assert message.payload == request
    assert message.payload is not request
    assert message.payload.payload == payload
    assert message.payload.payload is not payload


# ----- auto-pipelining -----------------------------------------------------------------------------


async def test_concurrent_calls_share_round_trips_and_each_gets_its_own_answer(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls made in one turn of the event loop go out together in one write; every caller
    still gets its own reply or its own error, even when the server forgot the scripts between."""
    from llm_queue_dispatcher import DuplicateRequestError
    from llm_queue_dispatcher.redis import _connection

    sizes: list[int] = []
    original = _connection._pack_calls

    def recording(calls: list[Any]) -> bytes:
        sizes.append(len(calls))
        return original(calls)

    monkeypatch.setattr(_connection, "_pack_calls", recording)
    async with RedisStorage(redis_url, fresh_name("pipelined")) as storage:
        await storage.enqueue(LLMRequest("taken", 0))
        await storage.redis.script_flush()  # the batch below must reload what it needs
        requests = [LLMRequest(f"r{i}", {"i": i}) for i in range(60)] + [LLMRequest("taken", 1)]
        outcomes = await asyncio.gather(*(storage.enqueue(r) for r in requests), return_exceptions=True)
        assert max(sizes) > 1  # batched
        assert isinstance(outcomes[-1], DuplicateRequestError)
        assert [m.payload.id for m in outcomes[:-1]] == [f"r{i}" for i in range(60)]  # type: ignore[union-attr]
        received = await storage.dequeue(100, 30.0)
        handles = [m.attributes.receipt_handle for m in received] + ["000000000000001.1." + "0" * 32]
        deleted = await asyncio.gather(*(storage.delete_message(h) for h in handles), return_exceptions=True)
        assert deleted[:-1] == [None] * len(received)
        assert isinstance(deleted[-1], ReceiptHandleError)
        assert await storage.get_approximate_message_count() == 0


async def test_a_failed_round_trip_fails_every_call_in_it(private_server: RedisServer) -> None:
    async with RedisStorage(private_server.url + "?socket_timeout=0.5", "pipefail") as storage:
        await storage.enqueue(LLMRequest("warm", 0))
        private_server.pause()
        try:
            outcomes = await asyncio.gather(
                *(storage.enqueue(LLMRequest(f"r{i}", i)) for i in range(20)), return_exceptions=True
            )
        finally:
            private_server.resume()
        assert all(isinstance(outcome, StorageError) for outcome in outcomes)
        assert await storage.get_approximate_message_count() >= 1  # and the storage works again


@pytest.mark.parametrize("with_dead_letter", [True, False])
async def test_an_unreadable_message_does_not_strand_the_ones_received_with_it(
    clocked_storage: MakeStorage, clock: ManualClock, with_dead_letter: bool, caplog: pytest.LogCaptureFixture
) -> None:
    dead = clocked_storage(serializer=(bytes, bytes))
    storage = clocked_storage(dead_letter=dead.queue if with_dead_letter else None)
    writer = clocked_storage(queue=storage.queue, serializer=(bytes, bytes))  # another serializer
    await storage.enqueue(LLMRequest("good-1", {"n": 1}))
    await writer.enqueue(LLMRequest("bad", b"\xff not json"))
    await storage.enqueue(LLMRequest("good-2", {"n": 2}))
    messages = await storage.dequeue(10, 30.0)
    assert [m.payload.id for m in messages] == ["good-1", "good-2"]
    assert "cannot be read back" in caplog.text
    for message in messages:
        await storage.delete_message(message.attributes.receipt_handle)
    attributes = await storage.get_queue_attributes()
    if with_dead_letter:
        # Moved unread, readable with the writer's serializer.
        assert (attributes.approximate_number_of_messages, attributes.dead_lettered) == (0, 1)
        [moved] = await dead.dequeue(1, 30.0)
        assert (moved.payload.id, moved.payload.payload) == ("bad", b"\xff not json")
    else:
        # Still stored, leased; received again after its visibility timeout, alone: an error.
        assert attributes.approximate_number_of_messages_in_flight == 1
        clock.advance(31)
        with pytest.raises(StorageError, match="cannot be read back"):
            await storage.dequeue(10, 30.0)
        clock.advance(31)
        [again] = await writer.dequeue(1, 30.0)  # the right serializer reads it
        assert (again.payload.id, again.attributes.receive_count) == ("bad", 3)


@pytest.mark.parametrize("limit", [10**17, 2**63, 10**40])
async def test_a_huge_limit_means_everything(clocked_storage: MakeStorage, limit: int) -> None:
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", 1))
    await storage.enqueue(LLMRequest("b", 2, Priority.HIGH))
    assert [m.payload.id for m in await storage.peek_messages_by_priority(int(Priority.HIGH), limit)] == ["b"]
    assert [m.payload.id for m in await storage.dequeue(limit, 30.0)] == ["b", "a"]


async def test_a_call_queued_behind_a_hung_one_fails_within_its_own_timeout(
    private_server: RedisServer,
) -> None:
    """A paused server: the first call times out after the client's timeout; a call made while
    it is on the wire must not wait for that and then for its own timeout too."""
    async with RedisStorage(private_server.url + "?socket_timeout=1.0", "queued") as storage:
        await storage.enqueue(LLMRequest("warm", 0))
        loop = asyncio.get_running_loop()
        private_server.pause()
        try:
            first = asyncio.ensure_future(storage.get_approximate_message_count())
            await asyncio.sleep(0.3)
            started = loop.time()
            with pytest.raises(StorageError):
                await storage.get_approximate_message_count()  # queued behind the first
            waited = loop.time() - started
            with pytest.raises(StorageError):
                await first
        finally:
            private_server.resume()
        assert waited < 1.35  # its own timeout (1 s), not the first's remainder plus its own (1.7 s)
        assert await storage.get_approximate_message_count() == 1


def test_a_request_read_back_has_every_field_of_its_type_and_equals_it() -> None:
    """A stored request is read back without `LLMRequest.__init__` (its checks that the reading
    answers already are not made twice): every field of the type is there, equal."""
    import dataclasses

    from llm_queue_dispatcher.redis._codec import _REQUEST_FIELDS

    assert tuple(field.name for field in dataclasses.fields(LLMRequest)) == _REQUEST_FIELDS
    request = LLMRequest(
        "r-1",
        {"messages": ["hi"]},
        Priority.HIGH,
        TokenInfo(120, 80, "gpt", input=100, max_output=20),
        expected_processing_time=1.5,
        metadata={"k": [1, 2]},
        tenant="acme",
        deadline=datetime(2030, 1, 1, tzinfo=timezone.utc),
    )
    read = decode_request(encode_request(request, None, 10_000), None)
    assert read == request
    assert vars(read).keys() == vars(request).keys()
    assert type(read.priority) is Priority


@pytest.mark.parametrize(
    "token_info",
    [TokenInfo(10), TokenInfo(0), TokenInfo(12, 7, "gpt"), TokenInfo(30, input=20, max_output=10)],
)
def test_token_counts_read_back_equal_the_ones_stored(token_info: TokenInfo) -> None:
    """The usual stored estimate (a count alone) is read back without `TokenInfo.__init__`:
    it has every field of its type and equals (and hashes as) the one stored."""
    import dataclasses

    from llm_queue_dispatcher.redis._codec import _TOKEN_INFO_FIELDS

    assert tuple(field.name for field in dataclasses.fields(TokenInfo)) == _TOKEN_INFO_FIELDS
    read = decode_request(encode_request(LLMRequest("r", "x", token_info=token_info), None, 10_000), None)
    assert read.token_info == token_info
    assert hash(read.token_info) == hash(token_info)
    assert vars(read.token_info) == vars(token_info)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("id", " ", "id must be a non-empty str"),
        ("id", 5, "id must be a str"),
        ("metadata", [1], "metadata must be a dict"),
        ("tenant", 3, "tenant must be None or a str"),
        ("expected_processing_time", -1, "expected_processing_time must be None"),
        ("priority", 9, "9 is not a valid Priority"),
        ("token_info", [-1, None, None], "estimated"),
    ],
)
def test_a_stored_request_with_a_bad_field_is_not_read_back(field: str, value: Any, error: str) -> None:
    """A stored request whose field another writer got wrong is refused when read back, as
    `LLMRequest` refuses it when made (the storage then names the message unreadable)."""
    import json

    head, _, payload = encode_request(LLMRequest("r-1", "x"), None, 10_000).partition(b"\n")
    fields = json.loads(head)
    fields[field] = value
    with pytest.raises((InvalidRequestError, ValueError), match=error):
        decode_request(json.dumps(fields).encode() + b"\n" + payload, None)


async def test_a_message_received_equals_the_one_its_constructors_make(clocked_storage: Any) -> None:
    """A received message and its attributes are made without their dataclasses' __init__:
    they equal (and hash as) the ones those make."""
    storage = clocked_storage()
    await storage.enqueue(LLMRequest("a", "x"))
    [message] = await storage.dequeue(1, 5.0)
    attributes = message.attributes
    made = QueueMessage(
        message.id,
        message.payload,
        MessageAttributes(
            attributes.message_id,
            attributes.receipt_handle,
            attributes.enqueued_at,
            attributes.receive_count,
            attributes.first_received_at,
        ),
    )
    assert message == made
    assert hash(attributes) == hash(made.attributes)
    assert message.__getstate__() == made.__getstate__()  # type: ignore[attr-defined]
    assert attributes.__getstate__() == made.attributes.__getstate__()  # type: ignore[attr-defined]
