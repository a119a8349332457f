"""Hostile input: names, payloads and handles that must be refused before any command reaches
Redis (proved with ``MONITOR``), data that must be stored as data (braces and newlines in ids and
payloads never touch a key), and a password that must never show."""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.crc

from llm_queue_dispatcher import (
    InvalidConfigError,
    InvalidRequestError,
    LLMRequest,
    PayloadTooLargeError,
    ReceiptHandleError,
    StorageError,
    TokenInfo,
)
from llm_queue_dispatcher.redis import RedisStorage, RedisThrottle
from tests.redis.support import RedisServer, free_port, running_server

pytestmark = pytest.mark.fault

HOSTILE_NAMES = [
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
PASSWORD = "S3cret-Pa55word%21"  # percent-encoded "!" in the URL: both spellings must stay hidden
DECODED_PASSWORD = "S3cret-Pa55word!"


class Monitor:
    """The commands a server receives, read with ``MONITOR`` until a marker ``ECHO``."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def commands_during(self, action: Callable[[], Awaitable[None]]) -> list[str]:
        client = redis.asyncio.Redis.from_url(self.url)
        marker = redis.asyncio.Redis.from_url(self.url)
        seen: list[str] = []
        await marker.ping()  # connected before the monitor starts: its handshake is not counted
        try:
            async with client.monitor() as monitor:
                await action()
                await marker.echo("end-of-action")
                while True:
                    command = (await asyncio.wait_for(monitor.next_command(), 10))["command"]
                    if "end-of-action" in command:
                        return seen
                    seen.append(command)
        finally:
            await client.aclose()
            await marker.aclose()


@pytest.fixture
async def monitored(tmp_path: Path) -> AsyncIterator[tuple[str, Monitor]]:
    directory = tmp_path / "redis"
    directory.mkdir()
    with running_server(directory) as server:
        yield server.url, Monitor(server.url)


async def test_hostile_input_is_refused_before_any_command(monitored: tuple[str, Monitor]) -> None:
    url, monitor = monitored
    storage: RedisStorage[Any] = RedisStorage(url, "ok", max_payload_bytes=4096)
    limiter = RedisThrottle(url, "ok", rpm=60, tpm=1000)
    await storage.get_approximate_message_count()  # connected: a refusal cannot hide behind a lazy connect
    await limiter.can_process(1)

    async def hostile() -> None:
        for name in HOSTILE_NAMES:
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
        assert await monitor.commands_during(hostile) == []
        # The monitor does see commands that are sent:
        seen = await monitor.commands_during(lambda: storage.get_approximate_message_count())
        assert any("EVALSHA" in command for command in seen)
    finally:
        await storage.aclose()
        await limiter.aclose()


async def test_braces_and_newlines_in_ids_and_payloads_are_data(redis_url: str) -> None:
    namespace = "hostile-data"
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


# ----- the password ---------------------------------------------------------------------------------


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


def test_bad_names_never_reach_a_key() -> None:
    for name in HOSTILE_NAMES:
        with pytest.raises(InvalidConfigError, match="must match"):
            RedisStorage("redis://127.0.0.1:1/0", "ok", dead_letter=name)


@pytest.fixture
def redis_url(shared_server: RedisServer) -> str:
    return shared_server.url
