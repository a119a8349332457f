"""`QueuedAsyncOpenAI`: the SDK's call shape, queued, against the local fake provider that
enforces its limits with 429s."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import types
from collections import Counter
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llm_queue_dispatcher import (
    InvalidRequestError,
    LLMThrottle,
    Priority,
    RemoteError,
    RequestFailedError,
    create_in_memory_queue,
)
from llm_queue_dispatcher.openai import QueuedAsyncOpenAI, estimate_chat_tokens
from tests.provider.server import ProviderServer


def messages(key: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": key}]


async def test_a_queued_call_returns_the_sdks_chat_completion(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        completion = await qc.chat.completions.create(
            model="m",
            messages=messages("hello"),
            max_tokens=50,
            priority=Priority.HIGH,
            tenant="t1",
            deadline=30,
        )
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content == "echo: hello"
    [record] = limiter.get_consumption_history()
    assert record.actual_tokens == openai_provider.usage["hello"]
    assert openai_provider.bodies["hello"] == {"model": "m", "messages": messages("hello"), "max_tokens": 50}


async def test_hundreds_of_concurrent_calls_are_answered_once_and_none_over_the_limits(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    # The limiter is told the provider's limits; the calls need most of its minute.
    openai_provider.configure(rpm=240, tpm=8_000)
    limiter = LLMThrottle(240, 8_000)
    keys = [f"k{n}" for n in range(200)]
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter, concurrency=32)
        answers = await asyncio.gather(
            *(qc.chat.completions.create(model="m", messages=messages(k), max_tokens=20) for k in keys)
        )
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    assert [a.choices[0].message.content for a in answers] == [f"echo: {k}" for k in keys]
    assert openai_provider.successes == Counter({k: 1 for k in keys})
    assert openai_provider.statuses[429] == 0


async def test_a_refused_call_raises_the_sdks_own_error(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    openai_provider.configure(status_for={"bad": 400})
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60_000, 10_000_000))
        with pytest.raises(openai.BadRequestError) as raised:
            await qc.chat.completions.create(model="m", messages=messages("bad"), max_tokens=5)
        assert raised.value.status_code == 400
        assert isinstance(raised.value.__cause__, RequestFailedError)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    assert openai_provider.calls["bad"] == 1


async def test_a_server_error_is_retried_as_often_as_the_clients_max_retries_then_raised(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    openai_provider.configure(status_for={"down": 503, "gone": 502})
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        # The SDK's own default: two retries after the first attempt.
        with pytest.raises(openai.InternalServerError) as raised:
            await asyncio.wait_for(qc.chat.completions.create(model="m", messages=messages("down")), 30)
        assert raised.value.status_code == 503
        assert isinstance(raised.value.__cause__, RequestFailedError)
        assert "gave up after 3 failed attempts" in str(raised.value.__cause__)
        # Not lost: ended, the caller told; nothing left behind in the queue.
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
        once = QueuedAsyncOpenAI(openai_client, dispatcher, limiter, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            await asyncio.wait_for(once.chat.completions.create(model="m", messages=messages("gone")), 30)
    assert openai_provider.calls == Counter({"down": 3, "gone": 1})


async def test_max_retries_and_max_rate_limited_are_checked_at_construction(
    openai_client: AsyncOpenAI,
) -> None:
    dispatcher = create_in_memory_queue()
    for option, value in [
        ("max_retries", -1),
        ("max_retries", 1.5),
        ("max_retries", True),
        ("max_rate_limited", 0),
        ("max_rate_limited", "3"),
    ]:
        with pytest.raises(InvalidRequestError, match=option):
            QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60, 1_000), **{option: value})


async def test_a_rate_limited_call_is_paused_retried_and_answered(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    openai_provider.configure(rpm=60, burst_requests=1)  # one request, then one a second
    limiter = LLMThrottle(60_000, 10_000_000)  # believes in far more: the 429 teaches it
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        first, second = await asyncio.gather(
            qc.chat.completions.create(model="m", messages=messages("a"), max_tokens=5),
            qc.chat.completions.create(model="m", messages=messages("b"), max_tokens=5),
        )
    assert (first.choices[0].message.content, second.choices[0].message.content) == ("echo: a", "echo: b")
    assert openai_provider.statuses[429] >= 1
    assert openai_provider.successes == Counter({"a": 1, "b": 1})


async def test_an_error_from_another_process_is_rebuilt_as_the_sdks_error(openai_client: AsyncOpenAI) -> None:
    qc = QueuedAsyncOpenAI(openai_client, create_in_memory_queue(), LLMThrottle(60, 1_000))
    remote = RemoteError(
        "openai.NotFoundError",
        "no such model",
        status_code=404,
        headers={"x-request-id": "req_1"},
        body={"message": "no such model"},  # as the SDK's error holds it
    )
    error = qc._sdk_error(RequestFailedError("r", remote))
    assert isinstance(error, openai.NotFoundError)
    assert (error.status_code, error.request_id, error.body) == (404, "req_1", {"message": "no such model"})
    plain = RequestFailedError("r", RemoteError("x.Y", "no"))
    assert qc._sdk_error(plain) is plain


async def test_other_attributes_are_the_wrapped_clients(openai_client: AsyncOpenAI) -> None:
    qc = QueuedAsyncOpenAI(openai_client, create_in_memory_queue(), LLMThrottle(60, 1_000))
    assert qc.models is openai_client.models
    assert qc.base_url == openai_client.base_url
    assert qc.chat.completions.with_raw_response is not None
    assert type(qc.chat.completions.with_raw_response) is type(
        openai_client.chat.completions.with_raw_response
    )


async def test_bad_calls_raise_at_the_call_and_queue_nothing(openai_client: AsyncOpenAI) -> None:
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60, 1_000))
        with pytest.raises(InvalidRequestError, match="messages"):
            await qc.chat.completions.create(model="m", messages=[])
        with pytest.raises(InvalidRequestError, match="priority"):
            await qc.chat.completions.create(model="m", messages=messages("a"), priority=9)
        with pytest.raises(InvalidRequestError, match="deadline"):
            await qc.chat.completions.create(model="m", messages=messages("a"), deadline="soon")
        # Seconds from now past the last instant a datetime holds (year 9999).
        with pytest.raises(InvalidRequestError, match="deadline"):
            await qc.chat.completions.create(model="m", messages=messages("a"), deadline=1e20)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    with pytest.raises(InvalidRequestError, match="client must be"):
        QueuedAsyncOpenAI(object(), dispatcher, LLMThrottle(60, 1_000))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="dispatcher must be"):
        QueuedAsyncOpenAI(openai_client, object(), LLMThrottle(60, 1_000))


async def test_cancelling_a_queued_call_withdraws_it(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    openai_provider.configure(slow={"first": 0.3})
    async with create_in_memory_queue() as dispatcher:
        # One call at a time: "gone" waits in the queue while "first" is answered slowly.
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60_000, 10_000_000), concurrency=1)
        first = asyncio.create_task(
            qc.chat.completions.create(model="m", messages=messages("first"), max_tokens=5)
        )
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(
            qc.chat.completions.create(model="m", messages=messages("gone"), max_tokens=5)
        )
        await asyncio.sleep(0.05)
        waiting.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await qc.chat.completions.create(model="m", messages=messages("next"), max_tokens=5)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    assert openai_provider.calls["gone"] == 0
    assert openai_provider.successes == Counter({"first": 1, "next": 1})


async def test_a_call_cancelled_while_its_attempt_fails_leaves_no_retry_count_behind(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    # Each attempt is sent, then its caller gives up while it runs; the attempt then fails (a
    # 500) and its request is withdrawn unsent at its next turn. A long-lived client must not
    # keep a retry count for every call that ended that way.
    keys = [f"k{n}" for n in range(20)]
    openai_provider.configure(slow=dict.fromkeys(keys, 0.3), fail_first=dict.fromkeys(keys, 1))
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60_000, 10_000_000), concurrency=20)
        calls = [
            asyncio.create_task(qc.chat.completions.create(model="m", messages=messages(key), max_tokens=5))
            for key in keys
        ]
        for _ in range(500):  # until every attempt is at the (slow) provider
            if sum(openai_provider.calls.values()) == len(keys):
                break
            await asyncio.sleep(0.01)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for _ in range(500):  # the attempts fail, then their requests are withdrawn
            if (await dispatcher.get_queue_metrics()).queue.total_messages == 0:
                break
            await asyncio.sleep(0.02)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
        assert not qc._failures
        assert not qc._rate_limited
    assert openai_provider.calls == Counter(dict.fromkeys(keys, 1))


async def test_calls_queued_when_the_wrapped_client_closes_end_with_an_error_not_a_hang(
    openai_provider: ProviderServer,
) -> None:
    openai_provider.configure(latency=0.2)
    sdk = AsyncOpenAI(base_url=openai_provider.base_url, api_key="test-key", timeout=10.0)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(sdk, dispatcher, LLMThrottle(60_000, 10_000_000), concurrency=2)
        calls = [
            asyncio.create_task(
                qc.chat.completions.create(model="m", messages=messages(f"k{n}"), max_tokens=5)
            )
            for n in range(6)
        ]
        await asyncio.sleep(0.05)
        await qc.__aexit__(None, None, None)  # the SDK's client closed under the queued calls
        # No attempt can be sent through a closed client: each call ends, none is retried for
        # ever (the SDK raises a bare RuntimeError for it, past the retry budget).
        ended = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        failed = [result for result in ended if isinstance(result, Exception)]
        assert len(failed) == len(calls), ended
        # The calls sent before the close: the SDK's own error (its connection closed under
        # them); those after: the client is closed, the request dead-lettered.
        for result in failed:
            assert isinstance(result, (openai.APIConnectionError, RequestFailedError)), result
        assert any("client is closed" in str(result) for result in failed)
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_queued_call_corrects_the_input_and_output_limits_with_the_providers_counts(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000, itpm=5_000_000, otpm=5_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        await asyncio.gather(
            *(
                qc.chat.completions.create(model="m", messages=messages(f"k{n}"), max_tokens=50)
                for n in range(5)
            )
        )
    parts = {r.request_id: (r.input_tokens, r.output_tokens) for r in limiter.get_consumption_history()}
    assert sorted(parts.values()) == sorted(openai_provider.usage_parts[f"k{n}"] for n in range(5))


async def test_a_streamed_call_passes_through_and_its_usage_corrects_the_limiter(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        stream = await qc.chat.completions.create(
            model="m",
            messages=messages("streamed"),
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: streamed"
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
        await stream._submitted  # the handler ended with the stream
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    [record] = limiter.get_consumption_history()
    assert record.actual_tokens == openai_provider.usage["streamed"]


async def test_a_streamed_call_without_usage_is_counted_from_its_text(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    call = {"model": "m", "messages": messages("counted"), "max_tokens": 50}
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter, tokenizer=len)  # a token per character
        async with await qc.chat.completions.create(**call, stream=True) as stream:
            async for _ in stream:
                pass
        await stream._submitted
    [record] = limiter.get_consumption_history()
    prompt = estimate_chat_tokens({**call, "max_completion_tokens": 0}, tokenizer=len)
    assert record.actual_tokens == prompt + len("echo: counted")


async def test_a_refused_streamed_call_raises_the_sdks_own_error(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    openai_provider.configure(status_for={"bad": 422})
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60_000, 10_000_000))
        with pytest.raises(openai.UnprocessableEntityError):
            await qc.chat.completions.create(model="m", messages=messages("bad"), max_tokens=5, stream=True)
        assert qc._streams == {}
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_streamed_call_corrects_the_input_and_output_limits_with_the_providers_counts(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000, itpm=5_000_000, otpm=5_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        stream = await qc.chat.completions.create(
            model="m",
            messages=messages("streamed"),
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert [chunk async for chunk in stream]
        await stream._submitted
    [record] = limiter.get_consumption_history()
    assert (record.input_tokens, record.output_tokens) == tuple(openai_provider.usage_parts["streamed"])


async def test_closing_the_dispatcher_under_an_open_stream_ends_its_call_without_waiting_for_the_reader(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    dispatcher = create_in_memory_queue()
    qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
    call = {"model": "m", "messages": messages("open"), "max_tokens": 50}
    stream = await qc.chat.completions.create(**call, stream=True)
    first = await stream.__anext__()
    # The provider answered: the call's work is done; its reader may take its time. The pool's
    # grace (30 s) is not waited out, and the call is not released to be sent again.
    await asyncio.wait_for(dispatcher.close(), 10)
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0
    [record] = limiter.get_consumption_history()
    assert record.tokens == estimate_chat_tokens(call)  # its end unseen: the estimate stands
    rest = [chunk async for chunk in stream]  # still the caller's to read to its end
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text == "echo: open"
    assert openai_provider.calls == Counter({"open": 1})


async def test_a_stream_dropped_unread_and_unclosed_frees_its_place_in_the_pool(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter, concurrency=1)
        stream = await qc.chat.completions.create(
            model="m", messages=messages("dropped"), max_tokens=50, stream=True
        )
        submitted = stream._submitted
        assert submitted is not None
        del stream  # neither read to its end nor closed
        gc.collect()
        # Bounded: a dropped stream's call held the pool's only place until the dispatcher closed.
        await asyncio.wait_for(submitted, 10)
        answer = await asyncio.wait_for(
            qc.chat.completions.create(model="m", messages=messages("next"), max_tokens=5), 10
        )
        assert answer.choices
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_call_is_reserved_by_its_prompt_and_completion_allowance_under_input_and_output_limits(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI
) -> None:
    # Whole, the estimate is above the output limit; by its parts (the prompt against itpm,
    # max_tokens against otpm) it fits at once.
    prompt = "long " * 20_000
    limiter = LLMThrottle(50, 100_000, itpm=90_000, otpm=8_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter)
        completion = await qc.chat.completions.create(model="m", messages=messages(prompt), max_tokens=1_000)
    assert isinstance(completion, ChatCompletion)
    [record] = limiter.get_consumption_history()
    assert record.estimated_tokens > 8_000
    assert record.actual_tokens == openai_provider.usage[prompt]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("concurrency", 0),
        ("concurrency", -1),
        ("concurrency", True),
        ("concurrency", 1.5),
        ("concurrency", "4"),
        ("priority", 9),
        ("priority", -1),
        ("priority", True),
        ("priority", 2.0),
        ("priority", "HIGH"),
        ("priority", None),
        ("id_prefix", 5),
        ("id_prefix", ""),
        ("id_prefix", "   "),
        ("id_prefix", "\ud800"),
    ],
)
async def test_a_bad_client_option_raises_at_construction(
    openai_client: AsyncOpenAI, option: str, value: object
) -> None:
    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(InvalidRequestError, match=option):
            QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60, 1_000), **{option: value})
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


@pytest.mark.parametrize("limiter", [None, object(), 5])
async def test_a_limiter_that_is_not_one_raises_at_construction(
    openai_client: AsyncOpenAI, limiter: object
) -> None:
    async with create_in_memory_queue() as dispatcher:
        with pytest.raises(InvalidRequestError, match="limiter"):
            QueuedAsyncOpenAI(openai_client, dispatcher, limiter)  # type: ignore[arg-type]


async def test_a_stream_whose_call_ends_in_failure_leaves_no_unretrieved_task_error(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    # The call behind an open stream fails (purged under it); nobody awaits that outcome, and
    # asyncio must not report it as an error nobody retrieved.
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, LLMThrottle(60_000, 10_000_000))
        stream = await qc.chat.completions.create(
            model="m", messages=messages("open"), max_tokens=5, stream=True
        )
        submitted = stream._submitted
        assert submitted is not None
        await dispatcher.purge()
        await stream.close()
        await asyncio.wait_for(asyncio.wait({submitted}), 10)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            del stream, submitted
            gc.collect()
            await asyncio.sleep(0)
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_queued_client_is_an_async_context_manager_that_closes_the_wrapped_client(
    openai_provider: ProviderServer,
) -> None:
    # As `async with AsyncOpenAI() as client:`; the dispatcher, which other clients may share,
    # stays open.
    sdk = AsyncOpenAI(base_url=openai_provider.base_url, api_key="test-key")
    async with create_in_memory_queue() as dispatcher:
        async with QueuedAsyncOpenAI(sdk, dispatcher, LLMThrottle(60_000, 10_000_000)) as qc:
            assert isinstance(qc, QueuedAsyncOpenAI)
            completion = await qc.chat.completions.create(model="m", messages=messages("ctx"), max_tokens=5)
            assert completion.choices[0].message.content == "echo: ctx"
        assert sdk.is_closed()
        assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


@pytest.mark.parametrize("method", ["with_options", "copy"])
async def test_a_client_with_other_options_is_queued_too(
    openai_provider: ProviderServer, openai_client: AsyncOpenAI, method: str
) -> None:
    limiter = LLMThrottle(60_000, 10_000_000)
    async with create_in_memory_queue() as dispatcher:
        qc = QueuedAsyncOpenAI(openai_client, dispatcher, limiter, priority=Priority.HIGH)
        other = getattr(qc, method)(timeout=7.0)
        assert isinstance(other, QueuedAsyncOpenAI)
        assert other._client.timeout == 7.0
        assert qc._client.timeout != 7.0  # the original keeps its options
        completion = await other.chat.completions.create(model="m", messages=messages("opts"), max_tokens=5)
        assert completion.choices[0].message.content == "echo: opts"
        stream = await other.chat.completions.create(
            model="m", messages=messages("opts-stream"), max_tokens=5, stream=True
        )
        assert [chunk async for chunk in stream]
        await stream._submitted
    # Both went through the queue, under the same limiter, as the original's calls do.
    assert len(limiter.get_consumption_history()) == 2
    assert openai_provider.successes == Counter({"opts": 1, "opts-stream": 1})


class _FakeEncoding:
    """tiktoken's encoding, as far as the estimate uses it: a token per character."""

    def encode(self, text: str, *, disallowed_special: tuple[str, ...] = ("all",)) -> list[int]:
        assert disallowed_special == ()  # special-token text in a prompt is counted, not refused
        return [0] * len(text)


def _fake_tiktoken(fail: bool = False) -> types.ModuleType:
    module = types.ModuleType("tiktoken")

    def get_encoding(name: str) -> _FakeEncoding:
        if fail:
            raise ValueError("unknown encoding")
        assert name == "o200k_base"
        return _FakeEncoding()

    module.get_encoding = get_encoding  # type: ignore[attr-defined]
    return module


async def test_estimates_come_from_tiktoken_when_it_and_its_file_are_installed_else_the_heuristic(
    openai_client: AsyncOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    call = {"model": "m", "messages": messages("hello there, tokens"), "max_tokens": 10}
    heuristic = estimate_chat_tokens(call)
    by_characters = estimate_chat_tokens(call, tokenizer=len)
    assert heuristic != by_characters
    limiter = LLMThrottle(60, 1_000)

    def estimate() -> int:
        prompt, completion = QueuedAsyncOpenAI(openai_client, create_in_memory_queue(), limiter)._estimate(
            call
        )
        return prompt + completion

    monkeypatch.delitem(sys.modules, "tiktoken", raising=False)
    monkeypatch.setattr(sys, "path", [])  # no tiktoken to import
    assert estimate() == heuristic
    monkeypatch.setitem(sys.modules, "tiktoken", _fake_tiktoken())
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    assert estimate() == heuristic  # its file would be downloaded: never at run time
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert estimate() == heuristic  # an empty cache holds no file either
    (tmp_path / "o200k_base").write_text("cached", encoding="utf-8")
    assert estimate() == by_characters
    monkeypatch.setitem(sys.modules, "tiktoken", _fake_tiktoken(fail=True))
    assert estimate() == heuristic
