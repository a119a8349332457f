"""Chat completions through the ``openai`` SDK (any OpenAI-compatible endpoint), for `Worker`.

One file past 700 lines (718 lines): the estimator, the call with its error mapping and limiter
syncing, the handler and the drop-in client are one provider's integration, read together.

Install with ``pip install 'llm-queue-dispatcher[openai]'``. The SDK is imported only when a
call is made: `estimate_chat_tokens` and `LLMRequest.from_openai_chat` work without it, and
``import llm_queue_dispatcher`` never imports it.

Every response (success or error) updates the limiter from the provider's rate-limit headers
(``sync_from_headers``): each bucket is lowered to what the provider says remains and refills at
its own rate from there, and a ``Retry-After`` pauses it. Errors become the worker's vocabulary:

============================================  =======================================================
Response                                       Raised to the worker
============================================  =======================================================
429 (rate limited)                             `RetryableError` after ``Retry-After`` (else the reset
                                               of the exhausted limit, else 1 s), and
                                               ``limiter.penalize`` for as long, so no other request
                                               goes out meanwhile
429 with code ``insufficient_quota``           `PermanentError` (billing: a retry cannot succeed)
408, 409, 5xx; a timeout; a connection error   `RetryableError` (``retry_after`` from ``Retry-After``
                                               when given, else the worker's backoff)
400, 401, 403, 404, 422 and any other 4xx      `PermanentError`: dead-lettered at once
arguments the SDK refuses before sending       `PermanentError` with the SDK's message (a misspelt
(``TypeError``/``ValueError``: ``temprature``)  keyword, a missing one, text it cannot encode)
a 2xx that is no chat completion: not JSON,    `RetryableError` (never a success: nothing was
an ``error`` object, no ``choices``            answered)
``x-should-retry: true`` / ``false``           overrides the status (the SDK's own convention)
============================================  =======================================================

Every wait taken from the provider (``Retry-After``, a reset, the ``retry_after`` passed on) is
at most `llm_queue_dispatcher.provider_limits.MAX_PROVIDER_WAIT` (one day).

The SDK's own retries are turned off for these calls (``max_retries=0``): the worker retries,
under the limiter, with the message's receive count, instead of the SDK sleeping inside a
handler while the message's budget stays reserved.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._checks import shown
from ._queued import QueuedClient, StreamCounter
from .errors import InvalidRequestError, PermanentError, RetryableError
from .provider_limits import FAILED_CALL, ProviderLimits, parse_rate_limit_headers, settled_headers
from .types import LLMRequest, Priority, TokenInfo, TokenUsage, validate_token_count

if TYPE_CHECKING:
    from openai import APIStatusError, AsyncOpenAI
    from openai.types.chat import ChatCompletion

    from .dispatcher import ProcessableMessage
    from .throttle import AsyncRateLimiter, RateLimiter

__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "IMAGE_PART_TOKENS",
    "MAX_TOKEN_COUNT",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_OVERHEAD_TOKENS",
    "QueuedAsyncOpenAI",
    "Tokenizer",
    "completion_usage",
    "create_chat_completion",
    "estimate_chat_tokens",
    "openai_chat_handler",
    "request_from_openai_chat",
    "total_tokens",
]

_LOGGER = logging.getLogger("llm_queue_dispatcher")

#: Completion tokens assumed when a payload sets neither ``max_completion_tokens`` nor
#: ``max_tokens``. Set one of them: the estimate is then the real ceiling of the call.
DEFAULT_COMPLETION_TOKENS = 1_024
#: Tokens added per message for its role and delimiters. OpenAI's cookbook ("How to count tokens
#: with tiktoken") counts 3 for current chat models; 4 leaves a margin.
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens that prime the assistant's reply (the same cookbook's 3).
REPLY_OVERHEAD_TOKENS = 3
#: An image part, whatever its size: OpenAI's tile formula for a high-detail image at its
#: largest after scaling (768 x 2048 px: 85 + 170 x 8 tiles).
IMAGE_PART_TOKENS = 1_445
#: The largest token count a payload field, a tokenizer's result or an estimate may hold: the
#: largest integer a float (the limiters' arithmetic, JSON elsewhere) holds exactly. Anything
#: larger is a mistake in the payload, refused with `InvalidRequestError`.
MAX_TOKEN_COUNT = 2**53
# Penalty after a 429 that named neither a Retry-After nor an exhausted limit's reset.
_DEFAULT_RATE_LIMIT_PAUSE = 1.0

#: A tokenizer: text -> token count (for instance ``lambda text: len(encoding.encode(text))``
#: with a tiktoken encoding whose file is installed locally).
Tokenizer = Callable[[str], int]


# -- estimating --------------------------------------------------------------------------------
def _default_count(text: str) -> int:
    """ASCII characters / 4 rounded up, plus one token per other character.

    Four characters per token is OpenAI's rule of thumb for English; text in other scripts
    (CJK above all) runs closer to one token per character, so counting those characters one
    each keeps the estimate conservative without a tokenizer."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // 4) + (len(text) - ascii_chars)


def _as_json(value: object, where: str) -> str:
    """``value`` as compact JSON, for counting; a value JSON cannot hold (one that contains
    itself, nests past the interpreter's depth, holds an int of more than 4,300 digits) is an
    `InvalidRequestError` naming ``where``."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except RecursionError:
        raise InvalidRequestError(f"{where} is nested too deeply to be sent as JSON") from None
    except (ValueError, TypeError, OverflowError) as error:  # "Circular reference detected", ...
        raise InvalidRequestError(f"{where} cannot be sent as JSON: {error}") from None


def _token_count(value: object, where: str) -> int:
    """A token count within 0..MAX_TOKEN_COUNT, or `InvalidRequestError` naming ``where``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKEN_COUNT:
        raise InvalidRequestError(f"{where} must be at most {MAX_TOKEN_COUNT}, got {shown(value)}")
    return validate_token_count(value, where)


def _count_tokens(count: Tokenizer, text: str, where: str) -> int:
    value = count(text)
    try:
        return _token_count(value, f"tokenizer result for {where}")
    except InvalidRequestError:
        raise InvalidRequestError(
            f"tokenizer must return an int within 0..{MAX_TOKEN_COUNT}, got {shown(value)} for {where}"
        ) from None


def _content_tokens(count: Tokenizer, content: object, where: str) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _count_tokens(count, content, where)
    if isinstance(content, Sequence):
        total = 0
        for index, part in enumerate(content):
            part_where = f"{where}[{index}]"
            if isinstance(part, str):
                total += _count_tokens(count, part, part_where)
            elif not isinstance(part, Mapping):
                raise InvalidRequestError(f"{part_where} must be a str or an object, got {shown(part)}")
            elif part.get("type") in ("image_url", "input_image", "image"):
                total += IMAGE_PART_TOKENS
            elif isinstance(part.get("text"), str):
                total += _count_tokens(count, part["text"], part_where)
            else:  # audio, files, refusals, ...: their JSON, which overcounts
                total += _count_tokens(count, _as_json(part, part_where), part_where)
        return total
    raise InvalidRequestError(f"{where} must be a str, a list of parts or None, got {shown(content)}")


def _completion_allowance(payload: Mapping[str, Any], default_completion_tokens: int) -> int:
    completion = default_completion_tokens
    for key in ("max_tokens", "max_completion_tokens"):  # the second wins when both are set
        value = payload.get(key)
        if value is not None:
            completion = _token_count(value, f"payload[{key!r}]")
    choices = payload.get("n")
    if choices is not None:
        if isinstance(choices, bool) or not isinstance(choices, int) or not 1 <= choices <= MAX_TOKEN_COUNT:
            raise InvalidRequestError(
                f"payload['n'] must be an int within 1..{MAX_TOKEN_COUNT}, got {shown(choices)}"
            )
        completion *= choices
    return completion


def estimate_chat_tokens(
    payload: Mapping[str, Any],
    *,
    tokenizer: Tokenizer | None = None,
    default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS,
) -> int:
    """A conservative token estimate of one chat completion call, for scheduling.

    ``payload`` is the keyword arguments of ``client.chat.completions.create``. The estimate is
    the sum of:

    * each message's text (role, name, content, tool calls, tool call id), counted by
      ``tokenizer`` or, without one, as ASCII characters / 4 rounded up plus one token per
      other character; ``MESSAGE_OVERHEAD_TOKENS`` (4) per message; ``REPLY_OVERHEAD_TOKENS``;
    * an image part: ``IMAGE_PART_TOKENS`` (1,445); another non-text part: its JSON's count;
    * ``tools``, ``functions`` and ``response_format``: their JSON's count;
    * the completion allowance: ``max_completion_tokens``, else ``max_tokens``, else
      ``default_completion_tokens`` (1,024), times ``n``.

    Nothing is downloaded: pass a tokenizer whose files are installed to count exactly. After
    each call `Worker` corrects the limiter to the provider's usage (`completion_usage`).

    A payload that cannot be counted raises `InvalidRequestError` naming the field: a value JSON
    cannot hold (one that contains itself, an int of more than 4,300 digits), a count above
    `MAX_TOKEN_COUNT`, or an estimate above it (``max_tokens`` times ``n``).

    >>> estimate_chat_tokens({"model": "m", "messages": [{"role": "user", "content": "Hello there!"}],
    ...                       "max_tokens": 100})
    111
    """
    if not isinstance(payload, Mapping):
        raise InvalidRequestError(
            f"payload must be a mapping of create() keyword arguments, got {shown(payload)}"
        )
    count: Tokenizer = tokenizer if tokenizer is not None else _default_count
    if not callable(count):
        raise InvalidRequestError(f"tokenizer must be a callable str -> int, got {tokenizer!r}")
    default = _token_count(default_completion_tokens, "default_completion_tokens")
    messages = payload.get("messages")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError(
            f"payload['messages'] must be a non-empty list of messages, got {shown(messages)}"
        )
    total = REPLY_OVERHEAD_TOKENS
    for index, message in enumerate(messages):
        where = f"payload['messages'][{index}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"{where} must be an object, got {shown(message)}")
        total += MESSAGE_OVERHEAD_TOKENS
        for key in ("role", "name", "tool_call_id"):
            value = message.get(key)
            if isinstance(value, str):
                total += _count_tokens(count, value, f"{where}[{key!r}]")
        total += _content_tokens(count, message.get("content"), f"{where}['content']")
        for key in ("tool_calls", "function_call", "audio"):
            if message.get(key) is not None:
                field = f"{where}[{key!r}]"
                total += _count_tokens(count, _as_json(message[key], field), field)
    for key in ("tools", "functions", "response_format"):
        if payload.get(key) is not None:
            field = f"payload[{key!r}]"
            total += _count_tokens(count, _as_json(payload[key], field), field)
    total += _completion_allowance(payload, default)
    if total > MAX_TOKEN_COUNT:
        raise InvalidRequestError(
            f"payload needs an estimate of {total} tokens, more than {MAX_TOKEN_COUNT}: lower its "
            "max_tokens, n or content"
        )
    return total


def request_from_openai_chat(
    id: str,
    payload: Mapping[str, Any],
    *,
    priority: Priority | int = Priority.NORMAL,
    tenant: str | None = None,
    tokenizer: Tokenizer | None = None,
    default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS,
    **fields: Any,
) -> LLMRequest[Any]:
    """An `LLMRequest` carrying ``payload`` (the ``create()`` keyword arguments), its token
    estimate from `estimate_chat_tokens` and the payload's ``model``; ``fields`` are further
    `LLMRequest` fields (``metadata``, ``deadline``, ``expected_processing_time``, ...).
    The estimate's parts are set too: ``max_output`` is the completion allowance (``max_tokens``
    or ``max_completion_tokens`` times ``n``, else ``default_completion_tokens``), ``input`` the
    rest, for a limiter with input and output limits.
    Streaming payloads are refused: the handler needs the whole response's usage."""
    estimate = estimate_chat_tokens(
        payload, tokenizer=tokenizer, default_completion_tokens=default_completion_tokens
    )
    if payload.get("stream"):
        raise InvalidRequestError("payload['stream'] must be false: the handler reads the whole response")
    # Checked by estimate_chat_tokens already; the allowance is within the estimate.
    completion = _completion_allowance(
        payload, _token_count(default_completion_tokens, "default_completion_tokens")
    )
    model = payload.get("model")
    token_info = TokenInfo(
        estimate,
        model=model if isinstance(model, str) else None,
        input=estimate - completion,
        max_output=completion,
    )
    # LLMRequest validates ``priority`` (ints 0..3 become a Priority).
    return LLMRequest(id, payload, priority, token_info, tenant=tenant, **fields)  # type: ignore[arg-type]


# -- calling -------------------------------------------------------------------------------------
async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


async def _sync_limiter(limiter: object, headers: Any) -> ProviderLimits:
    """Tells the limiter what the provider's headers say. A limiter failing here (a shared one
    whose server is down) is logged, not raised: the call's outcome is already decided, and a
    paid-for completion must not be turned into a retry."""
    sync = getattr(limiter, "sync_from_headers", None)
    if sync is not None:
        try:
            result = sync(headers)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            _LOGGER.warning("the limiter's sync_from_headers failed; the call's result stands", exc_info=True)
        else:
            if isinstance(result, ProviderLimits):
                return result
    return parse_rate_limit_headers(headers)


async def _sync_failed(limiter: object, headers: Any, reserved: TokenInfo | None) -> ProviderLimits:
    """`_sync_limiter` after a failed call, whose mark gives the whole reservation back: synced
    as the limiter will stand then. Returns what was read, with the remaining figures as they
    came (which limit is exhausted is the provider's word)."""
    limits = await _sync_limiter(limiter, settled_headers(headers, reserved, FAILED_CALL))
    if reserved is None:
        return limits
    given = parse_rate_limit_headers(headers)
    return dataclasses.replace(
        limits, requests_remaining=given.requests_remaining, tokens_remaining=given.tokens_remaining
    )


def _rate_limit_pause(limits: ProviderLimits) -> float:
    """How long to hold everything after a 429: Retry-After, else the reset of a limit the
    provider says is exhausted, else a second. At most `MAX_PROVIDER_WAIT`: `ProviderLimits`
    holds no longer wait."""
    if limits.retry_after is not None:
        return limits.retry_after
    resets = [
        reset
        for remaining, reset in (
            (limits.requests_remaining, limits.requests_reset),
            (limits.tokens_remaining, limits.tokens_reset),
        )
        if reset is not None and remaining is not None and remaining < 1
    ]
    return max(resets) if resets else _DEFAULT_RATE_LIMIT_PAUSE


async def _classify(error: APIStatusError, limiter: object, reserved: TokenInfo | None) -> Exception:
    status = error.status_code
    headers = error.response.headers
    limits = await _sync_failed(limiter, headers, reserved)
    description = f"HTTP {status}: {error.message}"
    should_retry = error.response.headers.get("x-should-retry")
    if status == 429 and getattr(error, "code", None) == "insufficient_quota":
        return PermanentError(description)
    if status == 429 and should_retry != "false":
        pause = _rate_limit_pause(limits)
        penalize = getattr(limiter, "penalize", None)
        if penalize is not None and pause > 0 and math.isfinite(pause):
            try:
                await _maybe_await(penalize(pause))
            except Exception:  # as in _sync_limiter: the 429 stays the outcome
                _LOGGER.warning("the limiter's penalize failed; the 429 stands", exc_info=True)
        return RetryableError(description, retry_after=pause)
    retryable = status in (408, 409) or status >= 500
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    if retryable:
        return RetryableError(description, retry_after=limits.retry_after)
    return PermanentError(description)


def _checked_completion(parsed: object, status: int) -> ChatCompletion:
    """``parsed`` when it is a chat completion with choices; else a `RetryableError`: a 2xx
    that is not JSON, that carries an ``error`` object (some gateways answer 200 with one) or
    that has no ``choices`` answered nothing, and must not be taken for a success."""
    from openai.types.chat import ChatCompletion

    if not isinstance(parsed, ChatCompletion):
        text = parsed if isinstance(parsed, str) else _as_text(parsed)
        raise RetryableError(f"malformed response: HTTP {status} with no chat completion: {text[:200]!r}")
    error = (parsed.model_extra or {}).get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, Mapping) else None
        shown_error = message if isinstance(message, str) else _as_text(error)
        raise RetryableError(f"malformed response: HTTP {status} carrying an error: {shown_error[:200]}")
    choices = parsed.choices
    if not isinstance(choices, list) or not choices:
        raise RetryableError(f"malformed response: HTTP {status} with no choices")
    if any(getattr(choice, "message", None) is None for choice in choices):
        raise RetryableError(f"malformed response: HTTP {status} with a choice that has no message")
    return parsed


def _as_text(value: object) -> str:
    try:
        return json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError):
        return shown(value)


def total_tokens(completion: ChatCompletion) -> int | None:
    """``completion.usage.total_tokens`` as a token count, or None when the response has no
    usable figure (absent, negative, not an int): the limiter then keeps the estimate. A reply
    already paid for is never retried because its usage is malformed."""
    usage = getattr(completion, "usage", None)
    value = getattr(usage, "total_tokens", None) if usage is not None else None
    if value is None:
        return None
    try:
        return _token_count(value, "usage.total_tokens")
    except InvalidRequestError as error:
        _LOGGER.warning("ignoring the response's usage: %s", error)
        return None


def completion_usage(completion: ChatCompletion) -> TokenUsage | int | None:
    """What a completion used, for the limiter: a `TokenUsage` of ``usage.prompt_tokens`` and
    ``usage.completion_tokens`` when the response gives both, else ``usage.total_tokens``
    (`total_tokens`; a gateway that reports only the total), else None (the estimate stands).
    An unusable figure (negative, not an int) is ignored with a warning, as in `total_tokens`."""
    usage = getattr(completion, "usage", None)
    counts = [getattr(usage, name, None) for name in ("prompt_tokens", "completion_tokens")]
    if usage is not None and None not in counts:
        try:
            return TokenUsage(
                _token_count(counts[0], "usage.prompt_tokens"),
                _token_count(counts[1], "usage.completion_tokens"),
            )
        except InvalidRequestError as error:
            _LOGGER.warning("ignoring the response's usage by part: %s", error)
    return total_tokens(completion)


async def create_chat_completion(
    client: AsyncOpenAI,
    limiter: RateLimiter | AsyncRateLimiter,
    payload: Mapping[str, Any],
    *,
    reserved: TokenInfo | None = None,
) -> ChatCompletion:
    """Calls ``client.chat.completions.create(**payload)`` once (SDK retries off), syncs
    ``limiter`` from the response's rate-limit headers, and maps failures as the module's table
    says. ``limiter`` may be synchronous or have coroutine methods; ``penalize`` and
    ``sync_from_headers`` are used when it has them. A payload that is not a mapping, or that
    the SDK refuses before sending (a misspelt keyword), is a `PermanentError`: no retry can
    send it.

    ``reserved``: the `TokenInfo` the call's reservation holds in ``limiter`` (the request's),
    when its mark will correct the reservation to `completion_usage` (as `Worker` marks a
    handler's result; a failure gives it all back). The provider's remaining-tokens figure is
    then read less what that mark gives back, so that once marked the limiter believes in no
    more than the provider said remains."""
    _check_reserved(reserved)
    completion, _ = await _complete(client, limiter, payload, reserved)
    return completion


def _check_reserved(reserved: object) -> None:
    if reserved is not None and not isinstance(reserved, TokenInfo):
        raise InvalidRequestError(f"reserved must be a TokenInfo or None, got {shown(reserved)}")


async def _complete(
    client: AsyncOpenAI,
    limiter: RateLimiter | AsyncRateLimiter,
    payload: Mapping[str, Any],
    reserved: TokenInfo | None,
) -> tuple[ChatCompletion, TokenUsage | int | None]:
    """`create_chat_completion`, and the answer's `completion_usage`."""
    import openai

    raw = await _send_chat(client, limiter, payload, reserved=reserved, sync=False)
    try:
        try:
            parsed: Any = raw.parse()
            if inspect.isawaitable(parsed):  # the SDK announces parse() becomes a coroutine
                parsed = await parsed
        except openai.APIResponseValidationError as error:
            raise RetryableError(f"malformed response: {error}") from error
        except ValueError as error:  # a body announced as JSON that is not (json.JSONDecodeError)
            raise RetryableError(f"malformed response: HTTP {raw.status_code}, not JSON: {error}") from error
        completion = _checked_completion(parsed, raw.status_code)
    except RetryableError:
        await _sync_failed(limiter, raw.headers, reserved)
        raise
    usage = completion_usage(completion)
    await _sync_limiter(limiter, settled_headers(raw.headers, reserved, usage))
    return completion, usage


async def open_chat_stream(
    client: AsyncOpenAI, limiter: RateLimiter | AsyncRateLimiter, payload: Mapping[str, Any]
) -> Any:
    """Sends a ``stream=True`` call as `create_chat_completion` sends any (SDK retries off, the
    limiter synced, failures mapped as the module's table says) and returns the SDK's stream of
    chunks, open."""
    raw = await _send_chat(client, limiter, payload)
    stream: Any = raw.parse()
    return await stream if inspect.isawaitable(stream) else stream


async def _send_chat(
    client: AsyncOpenAI,
    limiter: RateLimiter | AsyncRateLimiter,
    payload: Mapping[str, Any],
    *,
    reserved: TokenInfo | None = None,
    sync: bool = True,
) -> Any:
    """One call, its raw response (with ``sync``, the limiter synced from its headers), failures
    mapped (the limiter synced from theirs, as it will stand once ``reserved`` is given back)."""
    import openai

    if not isinstance(payload, Mapping):
        raise PermanentError(f"payload must be a mapping of create() keyword arguments, got {shown(payload)}")
    if getattr(client, "max_retries", 0) != 0:
        client = client.with_options(max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(**dict(payload))
    except openai.APIStatusError as error:
        raise await _classify(error, limiter, reserved) from error
    except openai.APITimeoutError as error:
        raise RetryableError(f"timed out: {error}") from error
    except openai.APIConnectionError as error:
        if _is_closed(client):  # wrapped by some SDK versions: no attempt can ever be sent
            raise PermanentError(f"the openai client is closed: {error}") from error
        raise RetryableError(f"connection failed: {error}") from error
    except openai.APIResponseValidationError as error:
        raise RetryableError(f"malformed response: {error}") from error
    except (TypeError, ValueError) as error:
        # Raised by the SDK before any request went out (transport failures are its
        # APIConnectionError): a misspelt or unknown keyword ("temprature"), a missing required
        # one, a value it cannot encode. No retry can send it.
        raise PermanentError(f"the openai SDK refused the payload's arguments: {error}") from error
    except RuntimeError as error:
        if _is_closed(client):  # the SDK's bare RuntimeError: no attempt can ever be sent
            raise PermanentError(f"the openai client is closed: {error}") from error
        raise
    if sync:
        await _sync_limiter(limiter, raw.headers)
    return raw


def _is_closed(client: object) -> bool:
    """Whether an SDK client was closed (its ``is_closed()``)."""
    closed = getattr(client, "is_closed", None)
    try:
        return callable(closed) and closed() is True
    except Exception:
        return False


def openai_chat_handler(
    client: AsyncOpenAI,
    limiter: RateLimiter | AsyncRateLimiter,
    *,
    on_completion: Callable[[ProcessableMessage[Any], ChatCompletion], Awaitable[None] | None] | None = None,
) -> Callable[[ProcessableMessage[Any]], Awaitable[TokenUsage | int | None]]:
    """A `Worker` handler: sends each message's payload with `create_chat_completion` and
    returns what it used (`completion_usage`): the prompt and completion tokens apart, which
    the worker marks as input and output, else ``usage.total_tokens``, else None.

    ``on_completion(job, completion)`` (plain or async) sees each successful response before
    the message is acknowledged: store the answer there. If it raises, the message is retried.
    """
    if not callable(getattr(client, "with_options", None)):
        raise InvalidRequestError(f"client must be an openai.AsyncOpenAI, got {client!r}")
    quiet = client.with_options(max_retries=0)

    async def handle(job: ProcessableMessage[Any]) -> TokenUsage | int | None:
        request = job.message.payload
        completion, usage = await _complete(quiet, limiter, request.payload, request.token_info)
        if on_completion is not None:
            await _maybe_await(on_completion(job, completion))
        return usage

    return handle


# -- the drop-in client ------------------------------------------------------------------------
class _QueuedCompletions:
    """``chat.completions`` of `QueuedAsyncOpenAI`: ``create`` queued, the rest the SDK's."""

    def __init__(self, queued: QueuedAsyncOpenAI) -> None:
        self._queued = queued

    async def create(
        self,
        *,
        priority: Priority | int | None = None,
        tenant: str | None = None,
        deadline: Any = None,
        **payload: Any,
    ) -> ChatCompletion:
        """``client.chat.completions.create(**payload)``, queued: dispatched in its turn under
        the limiter, answered with the SDK's `ChatCompletion` or raising the SDK's error.
        ``priority`` (default the client's), ``tenant`` and ``deadline`` (a `datetime` or
        seconds from now) are the request's; the rest is sent as given."""
        completion: ChatCompletion = await self._queued._create(
            payload, priority=priority, tenant=tenant, deadline=deadline
        )
        return completion

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queued._client.chat.completions, name)


class _QueuedChat:
    def __init__(self, queued: QueuedAsyncOpenAI) -> None:
        self._queued = queued
        self.completions = _QueuedCompletions(queued)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queued._client.chat, name)


class _ChunkCounter(StreamCounter):
    """A chat stream's tokens: its ``usage`` chunk's counts when it sends one
    (``stream_options={"include_usage": True}``), as `completion_usage` reads a completion's;
    else the estimate of the prompt and the streamed text counted by the client's tokenizer
    (or the heuristic), as the input and output parts."""

    def __init__(self, queued: QueuedAsyncOpenAI, payload: Mapping[str, Any]) -> None:
        self._queued = queued
        self._payload = payload
        self._usage: TokenUsage | int | None = None
        self._text: list[str] = []

    def see(self, item: Any) -> None:
        if getattr(item, "usage", None) is not None:
            usage = completion_usage(item)
            if usage is not None:
                self._usage = usage
        for choice in getattr(item, "choices", None) or []:
            content = getattr(getattr(choice, "delta", None), "content", None)
            if isinstance(content, str):
                self._text.append(content)

    def total(self) -> TokenUsage | int | None:
        if self._usage is not None:
            return self._usage
        count = self._queued._tokenizer or _default_count
        prompt = estimate_chat_tokens(
            {**self._payload, "max_completion_tokens": 0, "n": None}, tokenizer=self._queued._tokenizer
        )
        return TokenUsage(prompt, _token_count(count("".join(self._text)), "streamed text"))


class QueuedAsyncOpenAI(QueuedClient):
    """``openai.AsyncOpenAI`` with its chat completions queued: a drop-in for the client.

    ``await qc.chat.completions.create(model=..., messages=..., priority=..., tenant=...,
    deadline=...)`` enqueues the call on ``dispatcher``, waits its turn under ``limiter`` and
    returns the SDK's `ChatCompletion`; a permanent failure raises the SDK's own error
    (``openai.BadRequestError``, ...). 429s, ``retry-after`` and the ``x-ratelimit-*`` headers
    are handled as `openai_chat_handler` handles them. Every other attribute (``qc.models``,
    ``qc.embeddings``, ...) is the wrapped client's, unqueued.

    ``stream=True`` is queued too: the call returns the SDK's stream, open, once its turn came
    (wrapped to count it: its usage chunk, or the streamed text); the count corrects the limiter
    when the stream ends. Read it to its end or close it.

    Args:
        client: an ``openai.AsyncOpenAI`` (its own retries are turned off for queued calls).
        dispatcher: the queue (in memory, or a `RedisStorage` shared with other processes).
        limiter: the provider's limits (`LLMThrottle` or a shared `RedisThrottle`).
        tokenizer: ``str -> int`` for the estimates; default tiktoken's ``o200k_base`` when
            tiktoken and its file are installed (never downloaded), else `estimate_chat_tokens`'s
            heuristic.
        concurrency: calls in flight at once (the dispatcher's pool).
        priority: the default priority of a call.
        id_prefix: the prefix of the request ids (default ``openai-`` and 8 random hex digits).
        max_retries: retries of a call after a transient failure (a 5xx, 408, 409, a timeout,
            a connection error, a malformed answer), through the queue with the worker's
            backoff; then the call raises the SDK's error and its request is dead-lettered.
            Default: the wrapped client's own ``max_retries`` (the SDK's default, 2).
        max_rate_limited: 429 answers to one call before it is given up the same way
            (default 20: the limiter paces them, but a request the provider never admits must
            not be retried for ever).
    """

    _sdk = "openai"

    def __init__(
        self,
        client: AsyncOpenAI,
        dispatcher: Any,
        limiter: RateLimiter | AsyncRateLimiter,
        **options: Any,
    ) -> None:
        if not callable(getattr(client, "with_options", None)) or not hasattr(client, "chat"):
            raise InvalidRequestError(f"client must be an openai.AsyncOpenAI, got {shown(client)}")
        super().__init__(client, dispatcher, limiter, **options)

    def _set_client(self, client: Any) -> None:
        super()._set_client(client)
        self._quiet = client.with_options(max_retries=0)
        self.chat = _QueuedChat(self)

    def _estimate(self, payload: Mapping[str, Any]) -> tuple[int, int]:
        estimate = estimate_chat_tokens(payload, tokenizer=self._tokenizer)
        # Checked by estimate_chat_tokens already; the allowance is within the estimate.
        completion = _completion_allowance(payload, DEFAULT_COMPLETION_TOKENS)
        return estimate - completion, completion

    async def _call(
        self, payload: Mapping[str, Any], reserved: TokenInfo | None
    ) -> tuple[Any, TokenUsage | int | None]:
        return await _complete(self._quiet, self._limiter, payload, reserved)

    async def _open_stream(self, payload: Mapping[str, Any]) -> Any:
        return await open_chat_stream(self._quiet, self._limiter, payload)

    def _stream_counter(self, payload: Mapping[str, Any]) -> StreamCounter:
        return _ChunkCounter(self, payload)

    def _rebuild(self, value: object) -> Any:
        from openai.types.chat import ChatCompletion

        return value if isinstance(value, ChatCompletion) else ChatCompletion.model_validate(value)
