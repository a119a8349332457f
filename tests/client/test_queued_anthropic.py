"""`QueuedAsyncAnthropic`: ``messages.create`` queued, against the local fake Anthropic server
that enforces requests, input and output tokens per minute with 429s."""

from __future__ import annotations

import asyncio
from collections import Counter

import anthropic
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import Message

from llm_queue_dispatcher import (
    InvalidRequestError,
    LLMThrottle,
    RemoteError,
    RequestFailedError,
    create_in_memory_queue,
)
from llm_queue_dispatcher.anthropic import QueuedAsyncAnthropic
from tests.provider.anthropic_server import AnthropicServer


def call(key: str, max_tokens: int = 50) -> dict[str, object]:
    return {"model": "claude-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": key}]}


async def test_a_queued_call_returns_the_sdks_message(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, limiter)
        message = await qc.messages.create(**call("hello"), tenant="t", priority=1)  # type: ignore[arg-type]
    assert isinstance(message, Message)
    assert message.usage.output_tokens > 0
    [record] = limiter.get_consumption_history()
    assert record.actual_tokens == message.usage.input_tokens + message.usage.output_tokens
    assert anthropic_provider.successes == Counter({"hello": 1})


async def test_hundreds_of_concurrent_calls_are_answered_once_and_none_over_the_limits(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    anthropic_provider.configure(rpm=600, itpm=20_000, otpm=20_000)
    limiter = LLMThrottle(600, 40_000, itpm=20_000, otpm=20_000)
    keys = [f"k{n}" for n in range(200)]
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, limiter, concurrency=32)
        answers = await asyncio.gather(*(qc.messages.create(**call(k, 40)) for k in keys))  # type: ignore[arg-type]
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    assert all(isinstance(a, Message) for a in answers)
    assert anthropic_provider.successes == Counter({k: 1 for k in keys})
    assert anthropic_provider.statuses[429] == 0


async def test_a_refused_call_raises_the_sdks_own_error(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    anthropic_provider.configure(status_for={"bad": 403})
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, LLMThrottle(60_000, 10_000_000))
        with pytest.raises(anthropic.PermissionDeniedError) as raised:
            await qc.messages.create(**call("bad"))  # type: ignore[arg-type]
        assert isinstance(raised.value.__cause__, RequestFailedError)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_server_error_is_retried_as_often_as_the_clients_max_retries_then_raised(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    anthropic_provider.configure(status_for={"down": 529})
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(
            anthropic_client.with_options(max_retries=1), dispatcher, LLMThrottle(60_000, 10_000_000)
        )
        with pytest.raises(anthropic.APIStatusError) as raised:
            await asyncio.wait_for(qc.messages.create(**call("down")), 30)  # type: ignore[arg-type]
        assert raised.value.status_code == 529
        assert isinstance(raised.value.__cause__, RequestFailedError)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    assert anthropic_provider.calls["down"] == 2


async def test_an_error_from_another_process_is_rebuilt_as_the_sdks_error(
    anthropic_client: AsyncAnthropic,
) -> None:
    qc = QueuedAsyncAnthropic(anthropic_client, create_in_memory_queue(), LLMThrottle(60, 1_000))
    remote = RemoteError(
        "anthropic.RateLimitError", "slow down", status_code=429, headers={"retry-after": "3"}
    )
    error = qc._sdk_error(RequestFailedError("r", remote))
    assert isinstance(error, anthropic.RateLimitError)
    assert error.response.headers["retry-after"] == "3"


async def test_bad_calls_raise_at_the_call_and_other_attributes_pass_through(
    anthropic_client: AsyncAnthropic,
) -> None:
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, LLMThrottle(60, 1_000))
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            await qc.messages.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
        assert qc.models is anthropic_client.models
        assert qc.messages.count_tokens == anthropic_client.messages.count_tokens
    with pytest.raises(InvalidRequestError, match="count_cache_reads"):
        QueuedAsyncAnthropic(anthropic_client, dispatcher, LLMThrottle(60, 1_000), count_cache_reads=1)  # type: ignore[arg-type]


async def test_a_streamed_call_passes_through_and_its_usage_corrects_the_limiter(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, limiter)
        stream = await qc.messages.create(**call("streamed"), stream=True)  # type: ignore[arg-type]
        events = [event async for event in stream]
        assert events[0].type == "message_start"
        assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "echo: streamed"
        await stream._submitted
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    [record] = limiter.get_consumption_history()
    assert record.actual_tokens == sum(anthropic_provider.usage["streamed"])


async def test_a_streamed_call_corrects_the_input_and_output_limits_with_the_providers_counts(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000, itpm=5_000_000, otpm=5_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, limiter)
        stream = await qc.messages.create(**call("streamed"), stream=True)  # type: ignore[arg-type]
        assert [event async for event in stream]
        await stream._submitted
    [record] = limiter.get_consumption_history()
    assert (record.input_tokens, record.output_tokens) == tuple(anthropic_provider.usage["streamed"])


async def test_a_call_is_reserved_by_its_input_and_max_tokens_under_input_and_output_limits(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    # A long prompt with a short reply: whole, its estimate is above the output limit; by its
    # parts (the input against itpm, max_tokens against otpm) it fits at once.
    prompt = "long " * 20_000
    limiter = LLMThrottle(50, 100_000, itpm=90_000, otpm=8_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncAnthropic(anthropic_client, dispatcher, limiter)
        message = await qc.messages.create(**call(prompt, 1_000))  # type: ignore[arg-type]
    assert isinstance(message, Message)
    [record] = limiter.get_consumption_history()
    assert (record.input_tokens, record.output_tokens) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    assert record.estimated_tokens > 8_000


@pytest.mark.parametrize(
    ("option", "value"),
    [("concurrency", 0), ("concurrency", True), ("priority", 7), ("priority", False), ("id_prefix", 3)],
)
async def test_a_bad_client_option_raises_at_construction(
    anthropic_client: AsyncAnthropic, option: str, value: object
) -> None:
    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(InvalidRequestError, match=option):
            QueuedAsyncAnthropic(anthropic_client, dispatcher, LLMThrottle(60, 1_000), **{option: value})
        with pytest.raises(InvalidRequestError, match="limiter"):
            QueuedAsyncAnthropic(anthropic_client, dispatcher, None)  # type: ignore[arg-type]


async def test_a_queued_client_is_an_async_context_manager_and_keeps_its_queue_with_other_options(
    anthropic_provider: AnthropicServer, anthropic_client: AsyncAnthropic
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        async with QueuedAsyncAnthropic(anthropic_client, dispatcher, limiter, count_cache_reads=True) as qc:
            other = qc.with_options(timeout=7.0)
            assert isinstance(other, QueuedAsyncAnthropic)
            assert other._count_cache_reads
            message = await other.messages.create(**call("opts"))  # type: ignore[arg-type]
            assert isinstance(message, Message)
        assert anthropic_client.is_closed()
    assert len(limiter.get_consumption_history()) == 1
    assert anthropic_provider.successes == Counter({"opts": 1})
