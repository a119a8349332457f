"""Reading providers' rate-limit headers (OpenAI, Anthropic, retry-after)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle

import pytest

from llm_queue_dispatcher import (
    InvalidRequestError,
    LimiterUnavailableError,
    LLMThrottle,
    ManualClock,
    PayloadTooLargeError,
    PermanentError,
    ProviderLimits,
    RetryableError,
    StorageError,
    TokenInfo,
    TokenUsage,
    parse_rate_limit_headers,
    provider_limits,
)
from llm_queue_dispatcher.provider_limits import (
    FAILED_CALL,
    MAX_PROVIDER_WAIT,
    parse_duration,
    settled_headers,
)
from tests.integer_like import IntLike

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("7", 7.0)],
)
def test_openai_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1s2", "-1s", "1x", "nan", "inf", "s"])
def test_malformed_durations_are_none(text: str) -> None:
    assert parse_duration(text) is None


def test_openai_headers_any_case() -> None:
    limits = parse_rate_limit_headers(
        {
            "X-RateLimit-Limit-Requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29100",
            "x-ratelimit-reset-tokens": "1.8s",
        },
        now=NOW,
    )
    assert (limits.requests_limit, limits.requests_remaining) == (500.0, 499.0)
    assert limits.requests_reset == pytest.approx(0.12)
    assert (limits.tokens_limit, limits.tokens_remaining) == (30000.0, 29100.0)
    assert limits.tokens_reset == pytest.approx(1.8)
    assert limits.retry_after is None
    assert not limits.empty


def test_anthropic_headers_and_input_token_fallback() -> None:
    limits = parse_rate_limit_headers(
        [
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:50Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "1000"),
            ("anthropic-ratelimit-input-tokens-reset", "2023-11-14T22:14:20+00:00"),
            ("retry-after", "12"),
        ],
        now=NOW,
    )
    assert limits.requests_remaining == 49.0
    assert limits.requests_reset == pytest.approx(30.0)
    assert limits.tokens_remaining == 1000.0
    assert limits.tokens_reset == pytest.approx(60.0)
    assert limits.retry_after == 12.0


def test_anthropic_input_and_output_token_figures_apart() -> None:
    # As Anthropic's responses carry them: the combined figure is input plus output.
    limits = parse_rate_limit_headers(
        {
            "anthropic-ratelimit-input-tokens-limit": "80000",
            "anthropic-ratelimit-input-tokens-remaining": "79000",
            "anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:13:21Z",
            "anthropic-ratelimit-output-tokens-limit": "16000",
            "anthropic-ratelimit-output-tokens-remaining": "12000",
            "anthropic-ratelimit-output-tokens-reset": "2023-11-14T22:13:35Z",
            "anthropic-ratelimit-tokens-limit": "96000",
            "anthropic-ratelimit-tokens-remaining": "91000",
            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:35Z",
        },
        now=NOW,
    )
    assert (limits.input_tokens_limit, limits.input_tokens_remaining) == (80000.0, 79000.0)
    assert limits.input_tokens_reset == pytest.approx(1.0)
    assert (limits.output_tokens_limit, limits.output_tokens_remaining) == (16000.0, 12000.0)
    assert limits.output_tokens_reset == pytest.approx(15.0)
    assert (limits.tokens_limit, limits.tokens_remaining) == (96000.0, 91000.0)
    openai = parse_rate_limit_headers({"x-ratelimit-remaining-tokens": "5"}, now=NOW)
    assert openai.input_tokens_remaining is None
    assert openai.output_tokens_remaining is None
    assert not parse_rate_limit_headers({"anthropic-ratelimit-output-tokens-remaining": "1"}).empty


def test_retry_after_forms() -> None:
    assert parse_rate_limit_headers({"retry-after-ms": "1500"}).retry_after == 1.5
    http_date = parse_rate_limit_headers({"Retry-After": "Tue, 14 Nov 2023 22:14:20 GMT"}, now=NOW)
    assert http_date.retry_after == pytest.approx(60.0)
    assert parse_rate_limit_headers({"retry-after": "soon"}).retry_after is None


def test_garbage_is_ignored_not_raised() -> None:
    limits = parse_rate_limit_headers(
        {"x-ratelimit-remaining-tokens": "-5", "x-ratelimit-reset-tokens": "later", "retry-after": "nan"}
    )
    assert limits.empty


def test_new_error_classes() -> None:
    assert issubclass(LimiterUnavailableError, StorageError)
    assert issubclass(PayloadTooLargeError, InvalidRequestError)
    assert issubclass(PayloadTooLargeError, ValueError)
    error = RetryableError("slow down", retry_after=2.5)
    assert error.retry_after == 2.5
    assert str(error) == "slow down"
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, RetryableError)
    assert copy.retry_after == 2.5
    assert RetryableError().retry_after is None
    assert str(PermanentError("bad request")) == "bad request"


async def test_mark_as_dead_lettered_moves_the_message_now() -> None:
    from llm_queue_dispatcher import (
        InMemoryStorage,
        LLMRequest,
        LLMThrottle,
        MessageStateError,
        TokenInfo,
        create_llm_queue_dispatcher,
    )

    clock = ManualClock()
    dead: InMemoryStorage[str] = InMemoryStorage(clock=clock)
    storage: InMemoryStorage[str] = InMemoryStorage(clock=clock, max_receive_count=5, dead_letter=dead)
    limiter = LLMThrottle(60, 10_000, clock=clock)
    dispatcher = create_llm_queue_dispatcher(storage, clock=clock)
    await dispatcher.enqueue(LLMRequest("bad", "x", token_info=TokenInfo(500)))
    job = await dispatcher.dequeue(limiter)
    assert job is not None
    await job.mark_as_dead_lettered(PermanentError("invalid request"))
    assert await storage.get_approximate_message_count() == 0
    assert (await storage.get_queue_attributes()).approximate_number_of_messages_in_flight == 0
    [moved] = await dead.peek_messages_by_priority(2, 10)
    assert moved.payload.id == "bad"
    assert limiter.get_metrics().tpm.available == pytest.approx(10_000)
    with pytest.raises(MessageStateError):
        await job.mark_as_processed()


# -- waits far away ------------------------------------------------------------------------------
def test_the_longest_wait_believed_is_one_day() -> None:
    assert MAX_PROVIDER_WAIT == 86_400.0


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("x-ratelimit-reset-tokens", "99999999999s", "tokens_reset"),
        ("x-ratelimit-reset-requests", "1000000h", "requests_reset"),
        ("anthropic-ratelimit-tokens-reset", "9999-12-31T23:59:59Z", "tokens_reset"),
        ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59+00:00", "requests_reset"),
        ("retry-after", "99999999999", "retry_after"),
        ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT", "retry_after"),
        ("retry-after-ms", "99999999999999", "retry_after"),
    ],
)
def test_a_wait_longer_than_a_day_is_cut_to_a_day(name: str, value: str, field: str) -> None:
    limits = parse_rate_limit_headers({name: value}, now=NOW)
    assert getattr(limits, field) == MAX_PROVIDER_WAIT


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-ratelimit-reset-tokens", "inf"),
        ("x-ratelimit-reset-tokens", "-5s"),
        ("x-ratelimit-reset-requests", "soon"),
        ("anthropic-ratelimit-tokens-reset", "10000-01-01T00:00:00Z"),
        ("retry-after", "inf"),
        ("retry-after", "-5"),
        ("retry-after", "nan"),
        ("retry-after", "1e400"),
        ("retry-after-ms", "-1"),
    ],
)
def test_a_wait_that_is_no_finite_number_is_ignored(name: str, value: str) -> None:
    assert parse_rate_limit_headers({name: value}, now=NOW).empty


def test_a_bad_header_is_logged_once_per_name(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_limits, "_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger="llm_queue_dispatcher"):
        for _ in range(3):
            parse_rate_limit_headers({"x-ratelimit-reset-tokens": "99999999999s", "retry-after": "soon"})
        parse_rate_limit_headers({"x-ratelimit-reset-tokens": "later"})
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert any("x-ratelimit-reset-tokens" in m and "99999999999s" in m and "86400" in m for m in messages)
    assert any("retry-after" in m and "soon" in m and "ignored" in m for m in messages)


def test_provider_limits_built_by_hand_cut_their_waits_to_a_day() -> None:
    limits = ProviderLimits(
        requests_reset=1e12, tokens_reset=90_000.0, retry_after=1e300, tokens_remaining=1e12
    )
    assert (limits.requests_reset, limits.tokens_reset, limits.retry_after) == (MAX_PROVIDER_WAIT,) * 3
    assert limits.tokens_remaining == 1e12  # not a wait: left as given


def test_header_values_given_as_numbers_are_read_as_their_text() -> None:
    # Headers built by hand or by a test double: {"retry-after": 30}, not {"retry-after": "30"}.
    headers = {
        "retry-after": 30,
        "x-ratelimit-remaining-tokens": 0,
        "x-ratelimit-reset-tokens": 2.5,
        "x-ratelimit-remaining-requests": IntLike(7),
        "x-ratelimit-limit-requests": True,  # a bool is no figure: ignored
    }
    limits = parse_rate_limit_headers(headers)
    assert (limits.retry_after, limits.tokens_remaining, limits.tokens_reset) == (30.0, 0.0, 2.5)
    assert (limits.requests_remaining, limits.requests_limit) == (7.0, None)
    clock = ManualClock()
    throttle = LLMThrottle(60, 1_000, clock=clock)
    throttle.sync_from_headers({"retry-after": 30, "x-ratelimit-remaining-tokens": 0})
    check = throttle.can_process(10)
    assert (check.allowed, check.available_in) == (False, 30.0)


def test_a_header_value_given_as_an_int_too_long_for_text_is_taken_as_infinite() -> None:
    # Python refuses to write an int of more than 4,300 digits as text: such a figure is read
    # as infinite, and ignored as "1e400" is.
    huge = 10**5000
    limits = parse_rate_limit_headers({"retry-after": huge, "x-ratelimit-remaining-tokens": huge}, now=NOW)
    assert (limits.retry_after, limits.tokens_remaining) == (None, None)
    throttle = LLMThrottle(60, 1_000, clock=ManualClock())
    throttle.sync_from_headers({"x-ratelimit-remaining-tokens": huge})
    assert throttle.can_process(10).allowed


@pytest.mark.parametrize("text", [5, None, b"1s", 1.5])
def test_a_duration_that_is_not_text_raises_invalid_request(text: object) -> None:
    with pytest.raises(InvalidRequestError, match="text"):
        parse_duration(text)  # type: ignore[arg-type]


def test_settled_headers_read_each_remaining_figure_less_what_the_mark_gives_back() -> None:
    # The headers' class of the SDKs' HTTP library, by their versions.
    httpx = (
        pytest.importorskip("httpx2") if importlib.util.find_spec("httpx2") else pytest.importorskip("httpx")
    )
    headers = httpx.Headers(
        {
            "X-RateLimit-Remaining-Tokens": "900",
            "x-ratelimit-remaining-requests": "4",
            "anthropic-ratelimit-input-tokens-remaining": "500",
            "anthropic-ratelimit-output-tokens-remaining": "300",
        }
    )
    reserved = TokenInfo(input=110, max_output=400)
    settled = settled_headers(headers, reserved, TokenUsage(100, 21))
    # Of the same kind, so that a limiter reading them as a mapping reads them as before.
    assert isinstance(settled, httpx.Headers)
    assert settled["x-ratelimit-remaining-tokens"] == "511.0"  # 900 - (510 - 121)
    assert settled["x-ratelimit-remaining-requests"] == "4"  # a mark gives back no request
    assert settled["anthropic-ratelimit-input-tokens-remaining"] == "490.0"
    assert settled["anthropic-ratelimit-output-tokens-remaining"] == "0.0"  # 300 - 379: none left
    # Without Anthropic's combined figures its input ones stand for them: less the whole.
    anthropic = settled_headers(
        {"anthropic-ratelimit-input-tokens-remaining": "500"}, reserved, TokenUsage(100, 21)
    )
    limits = parse_rate_limit_headers(anthropic)
    assert (limits.tokens_remaining, limits.input_tokens_remaining) == (111.0, 490.0)
    plain = settled_headers({"x-ratelimit-remaining-tokens": "900"}, TokenInfo(500), FAILED_CALL)
    assert plain == {"x-ratelimit-remaining-tokens": "400.0"}
    pairs = [("x-ratelimit-remaining-tokens", "900")]
    assert settled_headers(pairs, TokenInfo(500), 600) is pairs  # used more than reserved
    assert settled_headers(pairs, None, FAILED_CALL) is pairs
    assert settled_headers(pairs, TokenInfo(500), None) is pairs  # the estimate stands
