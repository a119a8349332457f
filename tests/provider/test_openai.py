"""The openai integration against a local OpenAI-compatible server, with the real SDK: the
estimator, the error mapping, header sync and penalties, and Worker runs end to end."""

from __future__ import annotations

import asyncio
import doctest
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
from openai import AsyncOpenAI

import llm_queue_dispatcher.openai as lqd_openai
import llm_queue_dispatcher.worker as lqd_worker
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
    RetryableError,
    TokenUsage,
    Worker,
)
from llm_queue_dispatcher.openai import (
    DEFAULT_COMPLETION_TOKENS,
    IMAGE_PART_TOKENS,
    completion_usage,
    create_chat_completion,
    estimate_chat_tokens,
    openai_chat_handler,
)
from llm_queue_dispatcher.provider_limits import MAX_PROVIDER_WAIT

from .server import ProviderServer
from .support import AsyncLimiter, BrokenSyncLimiter


def chat(key: str, max_tokens: int = 50, **extra: Any) -> dict[str, Any]:
    return {
        "model": "test-model",
        "messages": [{"role": "user", "content": key}],
        "max_tokens": max_tokens,
        **extra,
    }


# -- estimator -----------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_openai() -> None:
    code = (
        "import sys, llm_queue_dispatcher as l; "
        "l.LLMRequest.from_openai_chat('a', {'messages': [{'role': 'user', 'content': 'x'}]}); "
        "print('openai' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_doctests_of_the_worker_and_openai_modules() -> None:
    for module in (lqd_worker, lqd_openai):
        failures, tried = doctest.testmod(module)
        assert tried > 0
        assert failures == 0


def test_estimate_counts_text_overheads_and_the_completion_allowance() -> None:
    payload = {
        "model": "m",
        "messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "hi"}],
    }
    # system: 4 + role 2 + 10; user: 4 + role 1 + 1; reply 3; no max_tokens: the default.
    assert estimate_chat_tokens(payload) == 25 + DEFAULT_COMPLETION_TOKENS
    assert estimate_chat_tokens({**payload, "max_tokens": 10}) == 35
    assert estimate_chat_tokens({**payload, "max_tokens": 10, "max_completion_tokens": 30}) == 55
    assert estimate_chat_tokens({**payload, "max_tokens": 10, "n": 3}) == 55
    assert estimate_chat_tokens(payload, default_completion_tokens=0) == 25


def test_estimate_is_conservative_for_other_scripts_images_and_tools() -> None:
    base = {"model": "m", "max_tokens": 0}
    cjk = estimate_chat_tokens({**base, "messages": [{"role": "user", "content": "東京の天気は"}]})
    assert cjk == 3 + 4 + 1 + 6  # one token per non-ASCII character
    image = estimate_chat_tokens(
        {
            **base,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}},
                    ],
                }
            ],
        }
    )
    assert image == 3 + 4 + 1 + 3 + IMAGE_PART_TOKENS
    plain = estimate_chat_tokens({**base, "messages": [{"role": "user", "content": "hi"}]})
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert (
        estimate_chat_tokens({**base, "messages": [{"role": "user", "content": "hi"}], "tools": tools})
        > plain + 10
    )


def test_estimate_uses_a_pluggable_tokenizer() -> None:
    words = estimate_chat_tokens(
        {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5},
        tokenizer=lambda text: len(text.split()),
    )
    assert words == 3 + 4 + 1 + 3 + 5
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        estimate_chat_tokens({"messages": [{"role": "user", "content": "x"}]}, tokenizer=lambda text: -1)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        estimate_chat_tokens({"messages": [{"role": "user", "content": "x"}]}, tokenizer=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "payload"),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": ["hello"]}, r"messages'\]\[0\]"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "'n'"),
    ],
)
def test_estimate_names_the_bad_field(payload: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        estimate_chat_tokens(payload)


def _self_referencing() -> dict[str, Any]:
    part: dict[str, Any] = {"type": "input_audio"}
    part["again"] = part
    return {"messages": [{"role": "user", "content": [part]}]}


def _self_containing_tools() -> dict[str, Any]:
    tools: list[Any] = []
    tools.append(tools)
    return {"messages": [{"role": "user", "content": "x"}], "tools": tools}


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**400}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -(10**5000)},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e300}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 10**5000}, "'n'"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2**30, "n": 2**30}, "estimate"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"limit": 10**5000}]}, "tools"),
        ({"messages": [10**5000]}, r"messages'\]\[0\]"),
        (_self_referencing(), r"content'\]\[0\]"),
        (_self_containing_tools(), "tools"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": _nested(100_000)},
            "response_format",
        ),
    ],
    ids=[
        "max-tokens-10e400",
        "negative-huge",
        "float-1e300",
        "n-huge",
        "estimate-past-2e53",
        "huge-int-in-tools",
        "huge-int-as-message",
        "part-containing-itself",
        "tools-containing-itself",
        "nested-too-deep",
    ],
)
def test_oversize_ints_and_self_referencing_payloads_are_refused_naming_the_field(
    payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        estimate_chat_tokens(payload)
    with pytest.raises(InvalidRequestError, match=field):
        LLMRequest.from_openai_chat("r", {"model": "m", **payload})


def test_from_openai_chat_refuses_oversize_request_fields_with_a_typed_error() -> None:
    payload = chat("x")
    with pytest.raises(InvalidRequestError, match="priority"):
        LLMRequest.from_openai_chat("r", payload, priority=-(10**5000))
    with pytest.raises(InvalidRequestError, match="tenant"):
        LLMRequest.from_openai_chat("r", payload, tenant=10**5000)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        LLMRequest.from_openai_chat("r", payload, tokenizer=lambda text: 10**400)
    with pytest.raises(InvalidRequestError, match="default_completion_tokens"):
        LLMRequest.from_openai_chat("r", {"messages": payload["messages"]}, default_completion_tokens=10**400)


def test_from_openai_chat_builds_an_estimated_request() -> None:
    payload = chat("hello", max_tokens=100)
    request = LLMRequest.from_openai_chat("r1", payload, priority=1, tenant="acme", metadata={"k": 1})
    assert request.payload is payload
    assert request.priority is Priority.HIGH
    assert request.tenant == "acme"
    assert request.metadata == {"k": 1}
    assert request.token_info.estimated == estimate_chat_tokens(payload)
    assert request.token_info.model == "test-model"
    words = LLMRequest.from_openai_chat("r2", payload, tokenizer=lambda text: 1)
    assert words.token_info.estimated == 3 + 4 + 1 + 1 + 100
    with pytest.raises(InvalidRequestError, match="stream"):
        LLMRequest.from_openai_chat("r3", {**payload, "stream": True})
    # The parts: the completion allowance is the most the reply may use, the rest is input.
    assert (request.token_info.input, request.token_info.max_output) == (
        request.token_info.estimated - 100,
        100,
    )
    several = LLMRequest.from_openai_chat("r5", {**payload, "n": 3}, tokenizer=lambda text: 1)
    assert (several.token_info.input, several.token_info.max_output) == (3 + 4 + 1 + 1, 300)
    default = LLMRequest.from_openai_chat("r6", {**payload, "max_tokens": None}, default_completion_tokens=7)
    assert default.token_info.max_output == 7
    with pytest.raises(InvalidRequestError, match="priority"):
        LLMRequest.from_openai_chat("r4", payload, priority=9)
    with pytest.raises(InvalidRequestError, match="id"):
        LLMRequest.from_openai_chat("", payload)


# -- one call ------------------------------------------------------------------------------------
async def test_a_response_syncs_the_limiter_down_to_the_provider_headers(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    provider.configure(rpm=600, tpm=60_000, burst_requests=5, burst_tokens=1_000)
    # Believes in a minute's burst: 600 requests, 60k tokens. A manual clock: no refill between
    # the sync and the reading (at 10 requests/s, a slow machine's 0.1 s would add one).
    limiter = LLMThrottle(600, 60_000, clock=ManualClock())
    completion = await create_chat_completion(client, limiter, chat("hello", max_tokens=100))
    assert completion.choices[0].message.content == "echo: hello"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 2 + 20
    metrics = limiter.get_metrics()
    assert metrics.rpm.available <= 4 + 0.5  # the server said 4 remain
    assert metrics.tpm.available <= 1_000 - 102 + 5


async def _dispatch_and_mark(client: AsyncOpenAI, limiter: LLMThrottle, key: str, max_tokens: int) -> None:
    """One request through the dispatcher's reservation, the handler and the worker's mark."""
    clock = limiter.clock
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        InMemoryStorage(clock=clock), LLMQueueDispatcherConfig(clock=clock)
    )
    await dispatcher.enqueue(LLMRequest.from_openai_chat(key, chat(key, max_tokens=max_tokens)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    try:
        usage = await openai_chat_handler(client, limiter)(job)
    except Exception as error:
        await job.mark_as_failed(error)
        return
    assert isinstance(usage, TokenUsage)
    await job.mark_as_processed(input_tokens=usage.input, output_tokens=usage.output)


@pytest.mark.parametrize("outcome", ["answered", "failed"])
async def test_a_marked_call_leaves_the_limiter_no_higher_than_the_provider_said_remains(
    provider: ProviderServer, client: AsyncOpenAI, outcome: str
) -> None:
    # The provider charges the prompt and max_tokens on arrival and gives nothing back (OpenAI's
    # rule); its bucket of 1,000 tokens refills 1 a second. The limiter believes in 60,000, on a
    # manual clock: nothing refills it between the answer and the reading.
    provider.configure(rpm=600, tpm=60, burst_tokens=1_000, fail_first={"k": 1 if outcome == "failed" else 0})
    limiter = LLMThrottle(600, 60_000, clock=ManualClock())
    await _dispatch_and_mark(client, limiter, "k", max_tokens=100)
    # The answer said 1,000 - (1 + 100) remain (plus a token or two refilled while it ran). The
    # mark then gives back what the reservation held beyond the usage (all of it on a failure):
    # read as it came, the figure let the limiter believe in those tokens a second time.
    remaining = 1_000 - (1 + 100)
    assert limiter.get_metrics().tpm.available <= remaining + 3


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_429_penalizes_the_limiter_and_is_retryable_after_retry_after(
    provider: ProviderServer, client: AsyncOpenAI, kind: str
) -> None:
    provider.configure(rpm=60, burst_requests=1)  # one request, then one a second
    inner = LLMThrottle(60_000, 1_000_000)
    limiter: Any = inner if kind == "sync" else AsyncLimiter(inner)
    await create_chat_completion(client, limiter, chat("first"))
    with pytest.raises(RetryableError) as caught:
        await create_chat_completion(client, limiter, chat("second"))
    assert caught.value.retry_after is not None
    assert 0.5 < caught.value.retry_after <= 1.0
    assert inner.can_process(1).available_in >= caught.value.retry_after - 0.05
    assert provider.statuses[429] == 1
    if kind == "async":
        assert limiter.awaited == Counter({"sync_from_headers": 2, "penalize": 1})


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ({"status_for": {"k": 400}}, PermanentError),
        ({"status_for": {"k": 401}}, PermanentError),
        ({"status_for": {"k": 403}}, PermanentError),
        ({"status_for": {"k": 404}}, PermanentError),
        ({"status_for": {"k": 422}}, PermanentError),
        ({"quota": {"k"}}, PermanentError),
        ({"status_for": {"k": 500}}, RetryableError),
        ({"status_for": {"k": 503}}, RetryableError),
        ({"status_for": {"k": 408}}, RetryableError),
        ({"status_for": {"k": 409}}, RetryableError),
    ],
)
async def test_status_codes_map_to_retryable_or_permanent(
    provider: ProviderServer, client: AsyncOpenAI, setup: dict[str, Any], expected: type[Exception]
) -> None:
    provider.configure(**setup)
    with pytest.raises(expected):
        await create_chat_completion(client, LLMThrottle(60_000, 1_000_000), chat("k"))
    assert provider.calls["k"] == 1  # the SDK's own retries are off


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (chat("k", temprature=0.2), "temprature"),
        ({"model": "test-model", "max_tokens": 5}, "Missing required arguments"),
        (chat("k\ud800"), "surrogates not allowed"),
        ("not a mapping", "payload must be a mapping"),
    ],
    ids=["misspelt keyword", "missing keyword", "lone surrogate", "not a mapping"],
)
async def test_arguments_the_sdk_refuses_before_sending_are_permanent(
    provider: ProviderServer, client: AsyncOpenAI, payload: Any, words: str
) -> None:
    with pytest.raises(PermanentError, match=words):
        await create_chat_completion(client, LLMThrottle(60_000, 1_000_000), payload)
    assert sum(provider.calls.values()) == 0  # nothing was sent


async def test_a_call_through_a_closed_client_is_permanent(provider: ProviderServer) -> None:
    closed = AsyncOpenAI(base_url=provider.base_url, api_key="test-key")
    await closed.close()
    with pytest.raises(PermanentError, match="client is closed"):
        await create_chat_completion(closed, LLMThrottle(60_000, 1_000_000), chat("k"))
    assert sum(provider.calls.values()) == 0


async def test_a_misspelt_keyword_is_dead_lettered_at_once_not_retried(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    dead: InMemoryStorage[Any] = InMemoryStorage()
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage(dead_letter=dead))
    await dispatcher.enqueue(LLMRequest.from_openai_chat("typo", chat("typo", temprature=0.2)))
    await dispatcher.enqueue(LLMRequest.from_openai_chat("fine", chat("fine")))
    limiter = LLMThrottle(60_000, 1_000_000)
    worker: Worker[Any] = Worker(dispatcher, limiter, openai_chat_handler(client, limiter))
    stats = await asyncio.wait_for(worker.run(stop_when_empty=True), 30)
    assert (stats.dead_lettered, stats.retried, stats.processed) == (1, 0, 1)
    [moved] = await dead.dequeue(10, 30.0)
    assert moved.payload.id == "typo"


async def test_a_timeout_and_a_refused_connection_are_retryable(provider: ProviderServer) -> None:
    provider.configure(slow={"k": 0.8})
    sdk = AsyncOpenAI(base_url=provider.base_url, api_key="x", timeout=0.3)
    try:
        with pytest.raises(RetryableError, match="timed out"):
            await create_chat_completion(sdk, LLMThrottle(60_000, 1_000_000), chat("k"))
    finally:
        await sdk.close()
    closed = AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", timeout=2.0)
    try:
        with pytest.raises(RetryableError, match="connection"):
            await create_chat_completion(closed, LLMThrottle(60_000, 1_000_000), chat("k"))
    finally:
        await closed.close()


COMPLETION_WITHOUT_CHOICES = '{"id": "x", "object": "chat.completion", "created": 1, "model": "m"}'


@pytest.mark.parametrize(
    ("body", "content_type", "match"),
    [
        (COMPLETION_WITHOUT_CHOICES, "application/json", "no choices"),
        (COMPLETION_WITHOUT_CHOICES.replace("}", ', "choices": []}'), "application/json", "no choices"),
        (
            COMPLETION_WITHOUT_CHOICES.replace("}", ', "choices": [{"index": 0}]}'),
            "application/json",
            "no message",
        ),
        (
            '{"error": {"message": "upstream overloaded", "code": 502}}',
            "application/json",
            "upstream overloaded",
        ),
        ("<html>Bad gateway</html>", "text/html", "no chat completion"),
        ("{not json", "application/json", "not JSON"),
        ("[1, 2]", "application/json", "no chat completion"),
    ],
    ids=[
        "no-choices",
        "empty-choices",
        "choice-without-message",
        "error-object",
        "html",
        "bad-json",
        "a-list",
    ],
)
async def test_a_2xx_that_is_no_completion_is_retryable_never_a_success(
    provider: ProviderServer, client: AsyncOpenAI, body: str, content_type: str, match: str
) -> None:
    provider.configure(body_for={"k": (body, content_type)})
    with pytest.raises(RetryableError, match=match):
        await create_chat_completion(client, LLMThrottle(60_000, 1_000_000), chat("k"))
    assert provider.statuses[200] == 1


async def test_a_handler_never_acknowledges_a_2xx_that_is_no_completion(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    provider.configure(body_for={"k": ('{"error": {"message": "try later"}}', "application/json")})
    limiter = LLMThrottle(60_000, 1_000_000)
    dead: InMemoryStorage[Any] = InMemoryStorage()
    storage: InMemoryStorage[Any] = InMemoryStorage(max_receive_count=3, dead_letter=dead)
    worker, _ = await run_batch(
        client, limiter, ["k"], storage=storage, retry_base_delay=0.01, max_retry_delay=0.02
    )
    assert (worker.stats.processed, worker.stats.retried) == (0, 3)
    assert provider.calls["k"] == 3
    assert [message.payload.id for message in await dead.dequeue(10, 30.0)] == ["k"]


@pytest.mark.parametrize("usage", ['{"total_tokens": -5}', '{"total_tokens": "lots"}', "null"])
async def test_a_completion_with_unusable_usage_keeps_the_estimate_and_is_not_retried(
    provider: ProviderServer, client: AsyncOpenAI, usage: str
) -> None:
    body = COMPLETION_WITHOUT_CHOICES.replace(
        "}",
        ', "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
        f'"content": "hi"}}}}], "usage": {usage}}}',
    )
    provider.configure(body_for={"k": (body, "application/json")})
    limiter = LLMThrottle(60_000, 1_000_000)
    worker, _ = await run_batch(client, limiter, ["k"])
    assert (worker.stats.processed, worker.stats.retried) == (1, 0)
    [record] = limiter.get_consumption_history()
    assert record.actual_tokens is None or record.actual_tokens == record.estimated_tokens


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ('{"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}', TokenUsage(12, 30)),
        # A gateway that reports only the total; one whose parts are unusable.
        ('{"total_tokens": 42}', 42),
        ('{"prompt_tokens": -1, "completion_tokens": 30, "total_tokens": 42}', 42),
        ('{"prompt_tokens": 12, "completion_tokens": "many"}', None),
    ],
)
async def test_a_completion_reports_its_prompt_and_completion_tokens_apart_or_its_total(
    provider: ProviderServer, client: AsyncOpenAI, usage: str, expected: object
) -> None:
    body = COMPLETION_WITHOUT_CHOICES.replace(
        "}",
        ', "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
        f'"content": "hi"}}}}], "usage": {usage}}}',
    )
    provider.configure(body_for={"k": (body, "application/json")})
    completion = await create_chat_completion(client, LLMThrottle(60_000, 1_000_000), chat("k"))
    assert completion_usage(completion) == expected


async def test_the_worker_marks_prompt_and_completion_tokens_as_input_and_output(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    provider.configure(completion_tokens=30)
    keys = [f"request-{n:02d}" for n in range(12)]
    limiter = LLMThrottle(60_000, 10_000_000, itpm=5_000_000, otpm=5_000_000)
    worker, _ = await run_batch(client, limiter, keys)
    assert worker.stats.processed == len(keys)
    parts = {r.request_id: (r.input_tokens, r.output_tokens) for r in limiter.get_consumption_history()}
    assert parts == provider.usage_parts
    assert worker.stats.tokens == sum(provider.usage.values())


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, {"retry-after": "99999999999"}),
        (429, {"retry-after-ms": "99999999999999"}),
        (429, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "99999999999s"}),
        (503, {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}),
    ],
    ids=["429-retry-after", "429-retry-after-ms", "429-reset", "503-retry-after-date"],
)
async def test_a_provider_wait_years_away_is_passed_on_as_one_day_at_most(
    provider: ProviderServer, client: AsyncOpenAI, status: int, headers: dict[str, str]
) -> None:
    provider.configure(status_for={"k": status}, headers_for={"k": headers})
    limiter = LLMThrottle(60_000, 1_000_000)
    with pytest.raises(RetryableError) as caught:
        await create_chat_completion(client, limiter, chat("k"))
    assert caught.value.retry_after == MAX_PROVIDER_WAIT
    assert limiter.can_process(1).available_in <= MAX_PROVIDER_WAIT + 1.0


# -- Worker end to end ---------------------------------------------------------------------------
async def run_batch(
    client: AsyncOpenAI,
    limiter: Any,
    keys: list[str],
    *,
    storage: InMemoryStorage[Any] | None = None,
    visibility_timeout: float = 30.0,
    concurrency: int = 8,
    max_tokens: int = 200,
    **worker_options: Any,
) -> tuple[Worker[Any], LLMQueueDispatcher[Any]]:
    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(
        storage if storage is not None else InMemoryStorage(),
        LLMQueueDispatcherConfig(visibility_timeout=visibility_timeout),
    )
    for key in keys:
        await dispatcher.enqueue(LLMRequest.from_openai_chat(key, chat(key, max_tokens=max_tokens)))
    worker: Worker[Any] = Worker(
        dispatcher,
        limiter,
        openai_chat_handler(client, limiter),
        concurrency=concurrency,
        handle_signals=False,
        **worker_options,
    )
    await asyncio.wait_for(worker.run(stop_when_empty=True), 60)
    return worker, dispatcher


async def test_every_request_completes_exactly_once_and_actual_tokens_reach_the_limiter(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    keys = [f"request-{n:02d}" for n in range(40)]
    provider.configure(fail_first={keys[3]: 2, keys[17]: 1}, fail_rate=0.1, seed=3, completion_tokens=30)
    limiter = LLMThrottle(60_000, 10_000_000)
    worker, dispatcher = await run_batch(client, limiter, keys, retry_base_delay=0.01, max_retry_delay=0.05)
    assert provider.successes == Counter({key: 1 for key in keys})
    assert provider.statuses[500] >= 3
    stats = worker.stats
    assert (stats.processed, stats.retried, stats.dead_lettered) == (40, provider.statuses[500], 0)
    # The limiter holds the provider's usage for each request, not the estimate.
    actual = {record.request_id: record.actual_tokens for record in limiter.get_consumption_history()}
    assert actual == provider.usage
    assert stats.tokens == sum(provider.usage.values())
    assert (await dispatcher.get_queue_metrics()).queue.total_messages == 0


async def test_429s_stay_few_after_the_first_ones(provider: ProviderServer, client: AsyncOpenAI) -> None:
    # The provider enforces its minute in one-second slices (like OpenAI); the limiter is told
    # the same per-minute limits, so it starts out believing in a whole minute's burst.
    provider.configure(rpm=1_200, tpm=120_000, burst_requests=20, burst_tokens=1_000, latency=0.05)
    keys = [f"request-{n:02d}" for n in range(40)]
    limiter = LLMThrottle(1_200, 120_000)
    worker, _ = await run_batch(client, limiter, keys, concurrency=16, max_tokens=100)
    assert provider.successes == Counter({key: 1 for key in keys})
    # Counted, not timed (a loaded machine shifts every instant): the limiter's minute-sized burst
    # overruns the provider at first; 16 calls in flight, of which its burst of 1,000 tokens
    # admits 9, so the first wave holds at most 7 refusals. Each 429 pauses the limiter and
    # lowers it to what the provider says remains; what follows comes in a few smaller waves
    # (the refused calls give their reservations back), bounded here as if each were one
    # smaller than the last: 7 + 6 + ... + 1 = 28. Measured 17-18 in all, on a quiet machine and
    # on a loaded one alike (where a cut at a wall-clock instant miscounted); without the sync,
    # 170+ (below).
    assert 1 <= provider.statuses[429] <= 28, provider.rate_limited_at
    assert worker.stats.retried == provider.statuses[429]


async def test_without_header_sync_and_penalty_429s_keep_coming(
    provider: ProviderServer, client: AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control of the test above: the same run with a limiter that ignores the provider.
    provider.configure(rpm=1_200, tpm=120_000, burst_requests=20, burst_tokens=1_000, latency=0.05)

    class Deaf:
        """LLMThrottle's budget without penalize or sync_from_headers."""

        def __init__(self, inner: LLMThrottle) -> None:
            self.can_process = inner.can_process
            self.get_metrics = inner.get_metrics
            self.consume = inner.consume
            self.adjust_consumption = inner.adjust_consumption
            self.get_consumption_history = inner.get_consumption_history

    keys = [f"request-{n:02d}" for n in range(40)]
    limiter: Any = Deaf(LLMThrottle(1_200, 120_000))
    await run_batch(
        client, limiter, keys, concurrency=16, max_tokens=100, retry_base_delay=0.05, max_retry_delay=0.2
    )
    assert provider.successes == Counter({key: 1 for key in keys})
    assert len([at for at in provider.rate_limited_at if at >= 0.5]) > 50


async def test_a_slow_call_keeps_its_message_invisible(provider: ProviderServer, client: AsyncOpenAI) -> None:
    provider.configure(slow={"slow-one": 1.2})
    storage: InMemoryStorage[Any] = InMemoryStorage()
    limiter = LLMThrottle(60_000, 10_000_000)
    run = asyncio.ensure_future(
        run_batch(client, limiter, ["slow-one"], storage=storage, visibility_timeout=0.3)
    )
    await asyncio.sleep(0.2)
    rival: LLMQueueDispatcher[Any] = LLMQueueDispatcher(storage)
    assert await rival.dequeue(LLMThrottle(60_000, 10_000_000), timeout=0.9) is None
    worker, _ = await run
    assert provider.calls["slow-one"] == 1
    assert worker.stats.processed == 1


async def test_permanent_errors_dead_letter_and_the_rest_completes(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    provider.configure(status_for={"bad-model": 404, "bad-args": 400}, quota={"no-money"})
    dead: InMemoryStorage[Any] = InMemoryStorage()
    keys = ["ok-1", "bad-model", "ok-2", "bad-args", "no-money"]
    limiter = LLMThrottle(60_000, 10_000_000)
    worker, _ = await run_batch(client, limiter, keys, storage=InMemoryStorage(dead_letter=dead))
    assert worker.stats.dead_lettered == 3
    assert worker.stats.processed == 2
    assert {provider.calls[key] for key in ("bad-model", "bad-args", "no-money")} == {1}
    moved = await dead.dequeue(10, 30.0)
    assert sorted(message.payload.id for message in moved) == ["bad-args", "bad-model", "no-money"]


async def test_the_handler_hands_each_completion_to_on_completion(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    seen: dict[str, str | None] = {}

    async def keep(job: ProcessableMessage[Any], completion: Any) -> None:
        seen[job.message.payload.id] = completion.choices[0].message.content

    dispatcher: LLMQueueDispatcher[Any] = LLMQueueDispatcher(InMemoryStorage())
    await dispatcher.enqueue(LLMRequest.from_openai_chat("a", chat("a")))
    limiter = LLMThrottle(60_000, 10_000_000)
    worker: Worker[Any] = Worker(
        dispatcher, limiter, openai_chat_handler(client, limiter, on_completion=keep), handle_signals=False
    )
    await asyncio.wait_for(worker.run(stop_when_empty=True), 30)
    assert seen == {"a": "echo: a"}
    with pytest.raises(InvalidRequestError, match="client"):
        openai_chat_handler(object(), limiter)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("page", "heading", "questions"),
    [
        ("README.md", "## Calling a provider", ["What is a token bucket?", "Why add jitter to retries?"]),
        (
            "docs/workers.md",
            "## The openai SDK",
            ["What is a token bucket?", "Why add jitter to retries?", "What is a dead-letter queue?"],
        ),
    ],
)
def test_the_documented_openai_example_runs_against_an_openai_compatible_server(
    provider: ProviderServer, page: str, heading: str, questions: list[str]
) -> None:
    import os
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / page).read_text()
    section = text[text.index(heading) :]
    code = re.search(r"```python \{\.norun\}\n(.*?)```", section, re.S)
    assert code is not None
    env = {**os.environ, "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": provider.base_url}
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The README's example prints each answer as it comes (in any order); the docs' sorts them.
    expected = [f"q{n} echo: {question}" for n, question in enumerate(questions)]
    assert sorted(lines[: len(questions)]) == expected
    stats = f"WorkerStats(processed={len(questions)}, retried=0, dead_lettered=0"
    assert lines[len(questions)].startswith(stats)


async def test_a_limiter_failing_to_sync_does_not_turn_a_completion_into_a_retry(
    provider: ProviderServer, client: AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = BrokenSyncLimiter(LLMThrottle(600, 60_000))
    completion = await create_chat_completion(client, limiter, chat("paid for"))
    assert completion.choices[0].message.content == "echo: paid for"
    assert "sync_from_headers failed" in caplog.text


async def test_a_limiter_failing_at_a_429_still_gives_the_429s_retry(
    provider: ProviderServer, client: AsyncOpenAI
) -> None:
    provider.configure(rpm=60, burst_requests=1)
    limiter = BrokenSyncLimiter(LLMThrottle(60_000, 1_000_000))
    await create_chat_completion(client, limiter, chat("first"))
    with pytest.raises(RetryableError) as caught:
        await create_chat_completion(client, limiter, chat("second"))
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0
