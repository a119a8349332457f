"""The anthropic integration against a local Anthropic Messages API server, with the real SDK: the
estimator, the error mapping, header sync, penalties and waits cut to a day, and Worker runs end
to end under the server's request, input-token and output-token limits. One file past 700
lines: every test drives the real SDK against the local server through the same fixtures and
request builders, kept beside them."""

from __future__ import annotations

import asyncio
import base64
import doctest
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from anthropic import AsyncAnthropic
from anthropic.types import Message

import llm_queue_dispatcher.anthropic as lqd_anthropic
from llm_queue_dispatcher import (
    InMemoryStorage,
    InvalidRequestError,
    LLMQueueDispatcher,
    LLMQueueDispatcherConfig,
    LLMRequest,
    LLMThrottle,
    ManualClock,
    PermanentError,
    Priority,
    ProcessableMessage,
    ProviderLimits,
    RetryableError,
    TokenUsage,
    Worker,
)
from llm_queue_dispatcher.anthropic import (
    IMAGE_BLOCK_TOKENS,
    MAX_PROVIDER_WAIT,
    MESSAGE_OVERHEAD_TOKENS,
    PDF_PAGE_TOKENS,
    REPLY_OVERHEAD_TOKENS,
    TOOL_USE_SYSTEM_TOKENS,
    UNCOUNTED_DOCUMENT_PAGES,
    anthropic_messages_handler,
    create_message,
    estimate_messages_input_tokens,
    estimate_messages_tokens,
    message_tokens,
    message_usage,
)

from .anthropic_server import AnthropicServer
from .support import AsyncLimiter, BrokenSyncLimiter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def provider() -> Iterator[AnthropicServer]:
    server = AnthropicServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(provider: AnthropicServer) -> AsyncIterator[AsyncAnthropic]:
    # The SDK's default max_retries (2): the integration must turn them off itself.
    sdk = AsyncAnthropic(base_url=provider.base_url, api_key="test-key", timeout=10.0)
    try:
        yield sdk
    finally:
        await sdk.close()


def ask(key: str, max_tokens: int = 40, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": key}],
        **extra,
    }


def roomy() -> LLMThrottle:
    return LLMThrottle(60_000, 10_000_000)


# -- estimator -----------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_anthropic() -> None:
    code = (
        "import sys, llm_queue_dispatcher as l; "
        "l.LLMRequest.from_anthropic_messages('a', {'max_tokens': 5, "
        "'messages': [{'role': 'user', 'content': 'x'}]}); "
        "print('anthropic' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_doctests_of_the_anthropic_module() -> None:
    failures, tried = doctest.testmod(lqd_anthropic)
    assert tried > 0
    assert failures == 0


def test_estimate_counts_system_messages_overheads_and_max_tokens() -> None:
    payload = {
        "model": "m",
        "max_tokens": 10,
        "system": "x" * 30,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    # reply 3; system 5 + 10; user 5 + 1; assistant 5 + 2 (ASCII characters / 3, rounded up).
    assert MESSAGE_OVERHEAD_TOKENS == 5
    assert REPLY_OVERHEAD_TOKENS == 3
    assert estimate_messages_input_tokens(payload) == 31
    assert estimate_messages_tokens(payload) == 31 + 10
    blocks = {
        **payload,
        "system": [{"type": "text", "text": "x" * 30, "cache_control": {"type": "ephemeral"}}],
    }
    assert estimate_messages_input_tokens(blocks) == 31
    assert estimate_messages_tokens({**payload, "max_tokens": 4_096}) == 31 + 4_096


def pdf(pages: int) -> str:
    kids = " ".join(f"{3 + n} 0 R" for n in range(pages))
    body = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    body += f"2 0 obj << /Type /Pages /Kids [{kids}] /Count {pages} >> endobj\n".encode()
    for n in range(pages):
        body += f"{3 + n} 0 obj << /Type/Page /Parent 2 0 R >> endobj\n".encode()
    return base64.b64encode(body).decode()


def one_block(block: Any) -> int:
    """The input estimate of a user message holding ``block`` alone, overheads removed."""
    payload = {"max_tokens": 1, "messages": [{"role": "user", "content": [block]}]}
    return estimate_messages_input_tokens(payload) - REPLY_OVERHEAD_TOKENS - MESSAGE_OVERHEAD_TOKENS


def test_estimate_counts_each_kind_of_content_block() -> None:
    huge = base64.b64encode(b"\x89PNG" + b"\0" * 300_000).decode()
    assert one_block({"type": "text", "text": "x" * 9}) == 3
    assert one_block("x" * 9) == 3
    assert one_block(
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": huge}}
    ) == (IMAGE_BLOCK_TOKENS)
    assert one_block({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}) == (
        IMAGE_BLOCK_TOKENS
    )
    # name "lookup" 2 + input JSON '{"q":"abc"}' 4
    assert one_block({"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "abc"}}) == 6
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "x" * 9}, image],
    }
    assert one_block(result) == 3 + IMAGE_BLOCK_TOKENS
    assert one_block({"type": "tool_result", "tool_use_id": "toolu_1", "content": "x" * 9}) == 3
    assert one_block({"type": "thinking", "thinking": "y" * 6, "signature": "opaque"}) == 2
    text_document = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "z" * 12},
        "title": "abc",
    }
    assert one_block(text_document) == 4 + 1
    content_document = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": "z"}]},
    }
    assert one_block(content_document) == 1
    pdf_document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": pdf(3)},
    }
    assert one_block(pdf_document) == 3 * PDF_PAGE_TOKENS
    for source in (
        {"type": "url", "url": "https://example.com/report.pdf"},
        {"type": "file", "file_id": "file_011"},
        {
            "type": "base64",
            "media_type": "application/pdf",
            "data": base64.b64encode(b"%PDF-1.7 compressed").decode(),
        },
    ):
        assert one_block({"type": "document", "source": source}) == UNCOUNTED_DOCUMENT_PAGES * PDF_PAGE_TOKENS
    compressed_pages = base64.b64encode(b"%PDF-1.7 << /Type /Pages /Count 7 >>").decode()
    assert one_block({"type": "document", "source": {"type": "base64", "data": compressed_pages}}) == (
        7 * PDF_PAGE_TOKENS
    )
    other = {"type": "search_result", "source": "https://example.com", "title": "t", "content": []}
    assert one_block(other) >= 20  # its JSON


def test_estimate_is_conservative_for_other_scripts_and_tools() -> None:
    assert one_block("東京の天気は") == 6  # one token per non-ASCII character
    base = {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    tools = [{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object"}}]
    plain = estimate_messages_input_tokens(base)
    with_tools = estimate_messages_input_tokens({**base, "tools": tools})
    assert with_tools > plain + TOOL_USE_SYSTEM_TOKENS + 20
    assert estimate_messages_input_tokens({**base, "tools": []}) == plain
    choice = estimate_messages_input_tokens({**base, "tool_choice": {"type": "any"}})
    assert choice > plain


def test_estimate_uses_a_pluggable_tokenizer() -> None:
    words = estimate_messages_tokens(
        {"max_tokens": 5, "system": "be brief", "messages": [{"role": "user", "content": "one two three"}]},
        tokenizer=lambda text: len(text.split()),
    )
    assert words == 3 + (5 + 2) + (5 + 3) + 5
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        estimate_messages_tokens(ask("x"), tokenizer=lambda text: -1)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        estimate_messages_tokens(ask("x"), tokenizer=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "payload"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"max_tokens'\] is required"),
        (ask("x", max_tokens=0), r"max_tokens'\] must be >= 1"),
        (ask("x", max_tokens=-1), "max_tokens"),
        (ask("x", max_tokens=True), "max_tokens"),
        (ask("x", max_tokens=2.5), "max_tokens"),
        ({"max_tokens": 5}, "messages"),
        ({"max_tokens": 5, "messages": []}, "messages"),
        ({"max_tokens": 5, "messages": "hello"}, "messages"),
        ({"max_tokens": 5, "messages": ["hello"]}, r"messages'\]\[0\]"),
        ({"max_tokens": 5, "messages": [{"content": "x"}]}, "role"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [5]}]}, r"content'\]\[0\]"),
        ({**ask("x"), "system": 5}, "system"),
        # Past the largest count a float holds exactly, as `estimate_chat_tokens` refuses it.
        (ask("x", max_tokens=2**53 + 1), r"max_tokens'\] must be at most 9007199254740992"),
        (ask("x", max_tokens=10**30), r"max_tokens'\] must be at most"),
        (ask("x", max_tokens=2**53), "estimate of .* tokens, more than 9007199254740992"),
    ],
)
def test_estimate_names_the_bad_field(payload: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        estimate_messages_tokens(payload)


def test_from_anthropic_messages_builds_an_estimated_request() -> None:
    payload = ask("hello", max_tokens=100)
    deadline = datetime.now(timezone.utc) + timedelta(minutes=5)
    request = LLMRequest.from_anthropic_messages(
        "r1", payload, priority=1, tenant="acme", deadline=deadline, metadata={"k": 1}
    )
    assert request.payload is payload
    assert request.priority is Priority.HIGH
    assert (request.tenant, request.deadline, request.metadata) == ("acme", deadline, {"k": 1})
    assert request.token_info.estimated == estimate_messages_tokens(payload)
    assert request.token_info.model == "claude-test"
    counted = LLMRequest.from_anthropic_messages("r2", payload, tokenizer=lambda text: 1)
    assert counted.token_info.estimated == 3 + 5 + 1 + 100
    # The parts, for input and output limits: the input's estimate, and max_tokens.
    info = request.token_info
    assert (info.input, info.max_output) == (estimate_messages_input_tokens(payload), 100)
    with pytest.raises(InvalidRequestError, match="stream"):
        LLMRequest.from_anthropic_messages("r3", {**payload, "stream": True})
    with pytest.raises(InvalidRequestError, match="priority"):
        LLMRequest.from_anthropic_messages("r4", payload, priority=9)
    with pytest.raises(InvalidRequestError, match="id"):
        LLMRequest.from_anthropic_messages("", payload)


def message(**usage: Any) -> Message:
    return Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
    )


def test_message_tokens_count_cache_writes_and_leave_cache_reads_out_unless_asked() -> None:
    cached = message(
        input_tokens=50, output_tokens=20, cache_creation_input_tokens=1_000, cache_read_input_tokens=9_000
    )
    assert message_tokens(cached) == 50 + 1_000 + 20
    assert message_tokens(cached, count_cache_reads=True) == 50 + 1_000 + 20 + 9_000
    assert message_tokens(message(input_tokens=50, output_tokens=20)) == 70
    assert message_tokens(message(input_tokens=50, output_tokens=20, cache_creation_input_tokens=None)) == 70
    assert message_tokens(Message.model_construct(id="msg_2", type="message", content=[])) is None


def test_message_usage_counts_cache_writes_as_input_and_output_apart() -> None:
    cached = message(
        input_tokens=50, output_tokens=20, cache_creation_input_tokens=1_000, cache_read_input_tokens=9_000
    )
    assert message_usage(cached) == TokenUsage(input=1_050, output=20)
    assert message_usage(cached, count_cache_reads=True) == TokenUsage(input=10_050, output=20)
    assert message_usage(message(input_tokens=50, output_tokens=20)) == TokenUsage(50, 20)
    assert message_usage(message(input_tokens=50, output_tokens=-1)) is None
    assert message_usage(Message.model_construct(id="msg_2", type="message", content=[])) is None


# -- one call ------------------------------------------------------------------------------------
async def test_a_response_syncs_the_limiter_down_to_the_provider_headers(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    provider.configure(
        rpm=600, itpm=6_000, otpm=6_000, burst_requests=5, burst_input_tokens=1_000, burst_output_tokens=1_000
    )
    # Believes in a minute's burst. A manual clock: no refill between the sync and the reading.
    limiter = LLMThrottle(600, 60_000, clock=ManualClock())
    answer = await create_message(client, limiter, ask("hello", max_tokens=50))
    assert [block.text for block in answer.content if block.type == "text"] == ["echo: hello"]
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (2 + 3, 20)
    metrics = limiter.get_metrics()
    assert metrics.rpm.available <= 4 + 0.5  # the server said 4 requests remain
    # input 1,000 - 5 and output 1,000 - 50 reserved + 30 unused: the combined header says 1,975
    # (plus what the server's buckets refilled, at 100 tokens a second each, while it answered).
    assert metrics.tpm.available <= 1_975 + 20


@pytest.mark.parametrize("outcome", ["answered", "failed"])
async def test_a_marked_call_leaves_each_bucket_no_higher_than_the_provider_said_remains(
    provider: AnthropicServer, client: AsyncAnthropic, outcome: str
) -> None:
    # Buckets of 1,000 input and 1,000 output tokens, refilled one token a second; the limiter
    # believes in far more, on a manual clock (nothing refills it between answer and reading).
    provider.configure(
        rpm=600,
        itpm=60,
        otpm=60,
        burst_input_tokens=1_000,
        burst_output_tokens=1_000,
        script={"hello": [500] if outcome == "failed" else []},
    )
    clock = ManualClock()
    limiter = LLMThrottle(600, 60_000, itpm=6_000, otpm=6_000, clock=clock)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(clock=clock), LLMQueueDispatcherConfig(clock=clock)
    )
    request = LLMRequest.from_anthropic_messages("r", ask("hello", max_tokens=50))
    # The estimate counts more input than the provider (its overheads are conservative).
    assert request.token_info.input is not None
    assert request.token_info.input > 2 + 3
    await dispatcher.enqueue(request)
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    try:
        usage = await anthropic_messages_handler(client, limiter)(job)
    except RetryableError as error:
        assert outcome == "failed"
        await job.mark_as_failed(error)
    else:
        assert usage is not None
        await job.mark_as_processed(input_tokens=usage.input, output_tokens=usage.output)
    # The provider charged the input (2 + 3) and kept the output the answer used (20, none for
    # a failure). The mark gives back what the reservation held beyond the usage: read as they
    # came, the figures let the limiter believe in those tokens a second time.
    output = 20 if outcome == "answered" else 0
    metrics = limiter.get_metrics()
    assert metrics.itpm is not None
    assert metrics.otpm is not None
    assert metrics.itpm.available <= 1_000 - 5 + 2
    assert metrics.otpm.available <= 1_000 - output + 2
    assert metrics.tpm.available <= 2_000 - 5 - output + 3


async def test_the_fake_provider_limits_input_and_output_tokens_apart(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    # Buckets of 100 tokens each, refilled at one token a second.
    provider.configure(itpm=60, otpm=60, burst_input_tokens=100, burst_output_tokens=100)
    await create_message(client, roomy(), ask("a", max_tokens=80))  # 4 input; 80 reserved, 60 back
    with pytest.raises(RetryableError):
        await create_message(client, roomy(), ask("b", max_tokens=90))  # about 80 output tokens left
    assert provider.rate_limited == Counter({"output_tokens": 1})
    with pytest.raises(RetryableError):
        await create_message(client, roomy(), ask("c" * 380, max_tokens=1))  # 98 input, about 96 left
    assert provider.rate_limited == Counter({"output_tokens": 1, "input_tokens": 1})
    assert provider.successes == Counter({"a": 1})
    assert provider.peak("output_tokens") == 20


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_429_penalizes_the_limiter_and_is_retryable_after_retry_after(
    provider: AnthropicServer, client: AsyncAnthropic, kind: str
) -> None:
    provider.configure(rpm=60, burst_requests=1)  # one request, then one a second
    inner = roomy()
    limiter: Any = inner if kind == "sync" else AsyncLimiter(inner)
    await create_message(client, limiter, ask("first"))
    with pytest.raises(RetryableError) as caught:
        await create_message(client, limiter, ask("second"))
    assert caught.value.retry_after == 1.0  # Anthropic's retry-after: whole seconds
    assert inner.can_process(1).available_in >= 1.0 - 0.05
    assert provider.statuses[429] == 1
    assert provider.rate_limited == Counter({"requests": 1})
    if kind == "async":
        assert limiter.awaited == Counter({"sync_from_headers": 2, "penalize": 1})


async def test_a_wait_longer_than_a_day_is_cut_to_a_day(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    month = str(30 * 86_400)
    provider.configure(
        status_for={"limited": 429, "down": 503},
        headers_for={key: {"retry-after": month} for key in ("limited", "down", "fine")},
    )
    for key in ("limited", "down"):
        limiter = LLMThrottle(60_000, 10_000_000, clock=ManualClock())
        with pytest.raises(RetryableError) as caught:
            await create_message(client, limiter, ask(key))
        assert caught.value.retry_after == MAX_PROVIDER_WAIT
        assert limiter.can_process(1).available_in == pytest.approx(MAX_PROVIDER_WAIT)
    limiter = LLMThrottle(60_000, 10_000_000, clock=ManualClock())
    await create_message(client, limiter, ask("fine"))  # a success's header pauses the limiter too
    assert limiter.can_process(1).available_in == pytest.approx(MAX_PROVIDER_WAIT)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, PermanentError),
        (401, PermanentError),
        (402, PermanentError),
        (403, PermanentError),
        (404, PermanentError),
        (413, PermanentError),
        (422, PermanentError),
        (408, RetryableError),
        (409, RetryableError),
        (429, RetryableError),
        (500, RetryableError),
        (502, RetryableError),
        (503, RetryableError),
        (504, RetryableError),
        (529, RetryableError),
    ],
)
async def test_status_codes_map_to_retryable_or_permanent(
    provider: AnthropicServer, client: AsyncAnthropic, status: int, expected: type[Exception]
) -> None:
    provider.configure(status_for={"k": status})
    with pytest.raises(expected, match=f"HTTP {status}"):
        await create_message(client, roomy(), ask("k"))
    assert provider.calls["k"] == 1  # the SDK's own retries are off


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (ask("k", temprature=0.2), "temprature"),
        (
            {"model": "claude-test", "messages": [{"role": "user", "content": "k"}]},
            "Missing required arguments",
        ),
        (ask("k\ud800"), "surrogates not allowed"),
    ],
    ids=["misspelt keyword", "missing max_tokens", "lone surrogate"],
)
async def test_arguments_the_sdk_refuses_before_sending_are_permanent(
    provider: AnthropicServer, client: AsyncAnthropic, payload: dict[str, Any], words: str
) -> None:
    with pytest.raises(PermanentError, match=words):
        await create_message(client, roomy(), payload)
    assert sum(provider.calls.values()) == 0  # nothing was sent


async def test_a_call_through_a_closed_client_is_permanent(provider: AnthropicServer) -> None:
    closed = AsyncAnthropic(base_url=provider.base_url, api_key="test-key")
    await closed.close()
    with pytest.raises(PermanentError, match="client is closed"):
        await create_message(closed, roomy(), ask("k"))
    assert sum(provider.calls.values()) == 0


async def test_a_misspelt_keyword_is_dead_lettered_at_once_not_retried(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    dead: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(dead_letter=dead))
    await dispatcher.enqueue(LLMRequest.from_anthropic_messages("typo", ask("typo", temprature=0.2)))
    await dispatcher.enqueue(LLMRequest.from_anthropic_messages("fine", ask("fine")))
    limiter = roomy()
    worker: Worker[Any] = Worker(dispatcher, limiter, anthropic_messages_handler(client, limiter))
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 30)
    assert (stats.dead_lettered, stats.retried, stats.processed) == (1, 0, 1)
    [moved] = await dead.dequeue(10, 30.0)
    assert moved.payload.id == "typo"


@pytest.mark.parametrize(
    ("status", "should_retry", "expected"),
    [(503, "false", PermanentError), (400, "true", RetryableError), (429, "false", PermanentError)],
)
async def test_x_should_retry_overrides_the_status(
    provider: AnthropicServer,
    client: AsyncAnthropic,
    status: int,
    should_retry: str,
    expected: type[Exception],
) -> None:
    provider.configure(status_for={"k": status}, headers_for={"k": {"x-should-retry": should_retry}})
    with pytest.raises(expected):
        await create_message(client, roomy(), ask("k"))


@pytest.mark.parametrize(
    ("kind", "says"),
    [("not-json", "expected a message"), ("no-content", "without content"), ("error-object", "type 'error'")],
)
async def test_a_malformed_2xx_is_retryable_not_a_success(
    provider: AnthropicServer, client: AsyncAnthropic, kind: str, says: str
) -> None:
    provider.configure(rpm=600, burst_requests=5, script={"k": [kind]})
    limiter = LLMThrottle(600, 60_000, clock=ManualClock())
    with pytest.raises(RetryableError, match=says):
        await create_message(client, limiter, ask("k"))
    assert limiter.get_metrics().rpm.available <= 4 + 0.5  # its headers were read all the same
    answer = await create_message(client, limiter, ask("k"))  # the next attempt is answered
    assert answer.content[0].type == "text"
    assert provider.malformed == Counter({kind: 1})


async def test_a_timeout_and_a_refused_connection_are_retryable(provider: AnthropicServer) -> None:
    provider.configure(slow={"k": 0.8})
    sdk = AsyncAnthropic(base_url=provider.base_url, api_key="x", timeout=0.3)
    try:
        with pytest.raises(RetryableError, match="timed out"):
            await create_message(sdk, roomy(), ask("k"))
    finally:
        await sdk.close()
    closed = AsyncAnthropic(base_url="http://127.0.0.1:9", api_key="x", timeout=2.0)
    try:
        with pytest.raises(RetryableError, match="connection"):
            await create_message(closed, roomy(), ask("k"))
    finally:
        await closed.close()


@pytest.mark.parametrize(
    ("payload", "says"), [(["not", "a", "mapping"], "mapping"), (ask("k", stream=True), "stream")]
)
async def test_a_payload_no_retry_can_send_is_permanent(
    provider: AnthropicServer, client: AsyncAnthropic, payload: Any, says: str
) -> None:
    with pytest.raises(PermanentError, match=says):
        await create_message(client, roomy(), payload)
    assert sum(provider.calls.values()) == 0


async def test_a_limiter_failing_to_sync_does_not_turn_a_message_into_a_retry(
    provider: AnthropicServer, client: AsyncAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await create_message(client, BrokenSyncLimiter(LLMThrottle(600, 60_000)), ask("paid for"))
    assert answer.content[0].type == "text"
    assert "sync_from_headers failed" in caplog.text


async def test_a_limiter_failing_at_a_429_still_gives_the_429s_retry(
    provider: AnthropicServer, client: AsyncAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    provider.configure(status_for={"k": 429}, headers_for={"k": {"retry-after": "3"}})
    with pytest.raises(RetryableError) as caught:
        await create_message(client, BrokenSyncLimiter(roomy()), ask("k"))
    assert caught.value.retry_after == 3.0
    assert "penalize failed" in caplog.text


# -- Worker end to end ---------------------------------------------------------------------------
async def run_batch(
    client: AsyncAnthropic,
    limiter: Any,
    keys: list[str],
    *,
    storage: InMemoryStorage[Any] | None = None,
    max_tokens: int = 40,
    concurrency: int = 8,
    **worker_options: Any,
) -> tuple[Worker[Any], LLMQueueDispatcher[Any]]:
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage if storage is not None else InMemoryStorage(),
        LLMQueueDispatcherConfig(visibility_timeout=30.0),
    )
    for key in keys:
        await dispatcher.enqueue(LLMRequest.from_anthropic_messages(key, ask(key, max_tokens=max_tokens)))
    worker: Worker[Any] = Worker(
        dispatcher,
        limiter,
        anthropic_messages_handler(client, limiter),
        concurrency=concurrency,
        handle_signals=False,
        **worker_options,
    )
    await asyncio.wait_for(worker.run(stop_when_empty=True), 60)
    return worker, dispatcher


async def test_hundreds_of_requests_are_each_answered_once_and_never_over_a_limit(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    # Output tokens bind: 250 replies of 250 tokens are more than the server's 60,000 a minute, so
    # the last ones wait for its bucket to refill. The limiter has one token budget, as large as
    # the output limit; it counts each request's input too (12 estimated and 300 max_tokens while
    # in flight, 6 + 250 once answered), so the server's output bucket never runs short. (With a
    # budget of 120,000 the same run met 4 output-token 429s.)
    provider.configure(
        rpm=6_000,
        itpm=120_000,
        otpm=60_000,
        output_tokens=250,
        latency=0.02,
        fail_rate=0.03,
        overload_rate=0.03,
        malformed_rate=0.03,
        seed=7,
    )
    limiter = LLMThrottle(6_000, 60_000)
    keys = [f"request-{n:03d}" for n in range(250)]
    worker, dispatcher = await run_batch(
        client, limiter, keys, max_tokens=300, concurrency=16, retry_base_delay=0.01, max_retry_delay=0.05
    )
    assert provider.successes == Counter({key: 1 for key in keys})
    assert provider.statuses[429] == 0, provider.rate_limited
    assert provider.peak("output_tokens") > provider.limit("output_tokens")  # the refill was needed
    failures = provider.statuses[500] + provider.statuses[529] + sum(provider.malformed.values())
    assert failures >= 10  # the injected failures did happen
    stats = worker.stats
    assert (stats.processed, stats.retried, stats.dead_lettered) == (250, failures, 0)
    # The limiter holds what the server counted for each request, not the estimate.
    actual = {record.request_id: record.actual_tokens for record in limiter.get_consumption_history()}
    assert actual == {key: sum(provider.usage[key]) for key in keys}
    assert stats.tokens == sum(sum(usage) for usage in provider.usage.values())
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_a_limiter_with_the_provider_s_input_and_output_limits_meets_no_429(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    # The limiter is told the limits as Anthropic publishes them: each request reserves its
    # input estimate from itpm and its max_tokens from otpm, and the handler's usage corrects
    # each with what the server counted. 120 replies of 250 tokens, 300 reserved each: the
    # output limit (40,000 a minute) holds them all once corrected, not all reserved at once.
    provider.configure(rpm=6_000, itpm=100_000, otpm=40_000, output_tokens=250, latency=0.02)
    limiter = LLMThrottle(6_000, 140_000, itpm=100_000, otpm=40_000)
    keys = [f"request-{n:03d}" for n in range(120)]
    worker, _ = await run_batch(client, limiter, keys, max_tokens=300, concurrency=16)
    assert provider.successes == Counter({key: 1 for key in keys})
    assert provider.statuses[429] == 0, provider.rate_limited
    parts = {r.request_id: (r.input_tokens, r.output_tokens) for r in limiter.get_consumption_history()}
    assert parts == provider.usage
    assert worker.stats.tokens == sum(sum(usage) for usage in provider.usage.values())


class SyncRecorder:
    """The handler's side of a limiter (penalties and header syncs) forwarded to an
    `LLMThrottle`, keeping what each sync read."""

    def __init__(self, inner: LLMThrottle) -> None:
        self.inner = inner
        self.read: list[ProviderLimits] = []

    def penalize(self, seconds: float) -> None:
        self.inner.penalize(seconds)

    def sync_from_headers(self, headers: Any) -> ProviderLimits:
        limits = self.inner.sync_from_headers(headers)
        self.read.append(limits)
        return limits


async def test_a_worker_under_a_tight_output_limit_does_not_stall_until_the_provider_s_reset(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    # 63 replies of 1,000 output tokens against 60,000 a minute (1,000 a second): 60 fit at once,
    # the last 3 wait about a second each for the refill. The server's headers then say about
    # nothing remains, with a reset (when its bucket is full again) about a minute away; a
    # limiter that held the bucket at the figure until the reset would stall the Worker that
    # long. It refills at its own rate instead, and the run ends well before the reset.
    provider.configure(rpm=6_000, otpm=60_000, output_tokens=1_000)
    limiter = LLMThrottle(6_000, 10_000_000, otpm=60_000)
    recorder = SyncRecorder(limiter)
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(), LLMQueueDispatcherConfig(visibility_timeout=60.0)
    )
    keys = [f"request-{n:02d}" for n in range(63)]
    for key in keys:
        await dispatcher.enqueue(LLMRequest.from_anthropic_messages(key, ask(key, max_tokens=1_000)))
    worker: Worker[Any] = Worker(
        dispatcher,
        limiter,
        anthropic_messages_handler(client, recorder),
        concurrency=16,
        handle_signals=False,
    )
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(worker.run(stop_when_empty=True), 30)
    took = asyncio.get_running_loop().time() - started
    assert provider.successes == Counter({key: 1 for key in keys})
    resets = [r.output_tokens_reset for r in recorder.read if r.output_tokens_reset is not None]
    assert max(resets) >= 45  # the provider's reset was most of a minute away ...
    assert took < max(resets) - 15  # ... and the run did not wait for it


async def test_each_429_pauses_the_limiter_and_retries_the_message(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    # The limiter believes in a minute's burst of requests; the server allows 5 at once, then 10
    # a second, and the worker sends 16 at once.
    provider.configure(rpm=600, burst_requests=5, latency=0.05)
    limiter = AsyncLimiter(LLMThrottle(600, 1_000_000))
    keys = [f"request-{n:02d}" for n in range(30)]
    worker, _ = await run_batch(client, limiter, keys, concurrency=16)
    assert provider.successes == Counter({key: 1 for key in keys})
    assert provider.statuses[429] >= 1
    assert provider.rate_limited.keys() == {"requests"}
    assert limiter.awaited["penalize"] == provider.statuses[429]
    assert worker.stats.retried == provider.statuses[429]


async def test_permanent_errors_dead_letter_and_the_rest_completes(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    provider.configure(status_for={"bad-model": 404, "bad-args": 400, "too-large": 413, "no-key": 401})
    dead: InMemoryStorage[Any] = InMemoryStorage()
    keys = ["ok-1", "bad-model", "ok-2", "bad-args", "too-large", "no-key"]
    worker, _ = await run_batch(client, roomy(), keys, storage=InMemoryStorage(dead_letter=dead))
    assert (worker.stats.processed, worker.stats.dead_lettered, worker.stats.retried) == (2, 4, 0)
    assert {provider.calls[key] for key in ("bad-model", "bad-args", "too-large", "no-key")} == {1}
    moved = await dead.dequeue(10, 30.0)
    assert sorted(message.payload.id for message in moved) == ["bad-args", "bad-model", "no-key", "too-large"]


async def test_the_handler_hands_each_message_to_on_completion(
    provider: AnthropicServer, client: AsyncAnthropic
) -> None:
    seen: dict[str, str] = {}

    async def keep(job: ProcessableMessage[Any], answer: Message) -> None:
        block = answer.content[0]
        seen[job.message.payload.id] = block.text if block.type == "text" else ""

    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage())
    await dispatcher.enqueue(LLMRequest.from_anthropic_messages("a", ask("a")))
    limiter = roomy()
    handler = anthropic_messages_handler(client, limiter, on_completion=keep)
    worker: Worker[Any] = Worker(dispatcher, limiter, handler, handle_signals=False)
    await asyncio.wait_for(worker.run(stop_when_empty=True), 30)
    assert seen == {"a": "echo: a"}
    with pytest.raises(InvalidRequestError, match="client"):
        anthropic_messages_handler(object(), limiter)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="count_cache_reads"):
        anthropic_messages_handler(client, limiter, count_cache_reads="yes")  # type: ignore[arg-type]


def test_the_documentation_example_runs_against_the_local_server(provider: AnthropicServer) -> None:
    page = (ROOT / "docs" / "workers.md").read_text(encoding="utf-8")
    section = page[page.index("## The anthropic SDK") :]
    code = re.search(r"```python \{\.norun\}\n(.*?)```", section, re.S)
    assert code is not None
    env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": provider.base_url}
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [
        "q0 echo: What is a token bucket?",
        "q1 echo: Why add jitter to retries?",
        "q2 echo: What is a dead-letter queue?",
    ]
    assert result.stdout.splitlines()[3].startswith("WorkerStats(processed=3, retried=0, dead_lettered=0")
