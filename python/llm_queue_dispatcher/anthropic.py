"""Messages through the ``anthropic`` SDK (Anthropic's Messages API), for `Worker`.

One file past 700 lines (707 lines): the estimator, the call with its error mapping and limiter
syncing, the handler and the drop-in client are one provider's integration, read together.

Install with ``pip install 'llm-queue-dispatcher[anthropic]'``. The SDK is imported only when a
call is made: `estimate_messages_tokens` and `LLMRequest.from_anthropic_messages` work without
it, and ``import llm_queue_dispatcher`` never imports it.

Every response (success or error) updates the limiter from Anthropic's rate-limit headers
(``anthropic-ratelimit-*``, through ``sync_from_headers``): each bucket is lowered to what the
provider says remains and refills at its own rate from there, and a ``retry-after`` pauses it.
Errors become the worker's vocabulary:

============================================  =======================================================
Response                                       Raised to the worker
============================================  =======================================================
429 (``rate_limit_error``)                     `RetryableError` after ``retry-after`` (else the reset
                                               of the exhausted limit, else 1 s), and
                                               ``limiter.penalize`` for as long, so no other request
                                               goes out meanwhile
529 (``overloaded_error``), 408, 409, 5xx;     `RetryableError` (``retry_after`` from ``retry-after``
a timeout; a connection error                  when given, else the worker's backoff)
400, 401, 402, 403, 404, 413, 422 and any      `PermanentError`: dead-lettered at once
other 4xx
arguments the SDK refuses before sending       `PermanentError` with the SDK's message (a misspelt
(``TypeError``/``ValueError``: ``temprature``)  keyword, a missing one, text it cannot encode)
a 2xx that is not JSON, has no ``content``,    `RetryableError`, never a success
or carries an error object
``x-should-retry: true`` / ``false``           overrides the status (the SDK's own convention)
============================================  =======================================================

Any wait a provider names is cut to `MAX_PROVIDER_WAIT` (a day), for the limiter's pause as for
the message's retry: a header saying "come back next month" must not park the worker that long.
The SDK's own retries are turned off for these calls (``max_retries=0``): the worker retries,
under the limiter, with the message's receive count, instead of the SDK sleeping inside a
handler while the message's budget stays reserved.

The limiter is corrected to what Anthropic counts against its limits: ``input_tokens +
cache_creation_input_tokens + output_tokens``. Cache reads (``cache_read_input_tokens``) are left
out: Anthropic's rate-limit documentation says they do not count toward the input-tokens-per-
minute limit of current models (only some older ones count them: pass
``count_cache_reads=True`` for those).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._checks import shown
from ._queued import QueuedClient, StreamCounter
from .errors import InvalidRequestError, PermanentError, RetryableError

# The helpers every provider integration shares (token counting plumbing, limiter syncing, the
# pause after a 429) live in openai.py, the first integration; none of them imports the openai SDK.
from .openai import (
    MAX_TOKEN_COUNT,
    Tokenizer,
    _as_json,
    _check_reserved,
    _count_tokens,
    _is_closed,
    _maybe_await,
    _rate_limit_pause,
    _sync_failed,
    _sync_limiter,
    _token_count,
)
from .provider_limits import parse_rate_limit_headers, settled_headers
from .throttle import MAX_PROVIDER_WAIT
from .types import LLMRequest, Priority, TokenInfo, TokenUsage

if TYPE_CHECKING:
    from anthropic import APIStatusError, AsyncAnthropic
    from anthropic.types import Message

    from .dispatcher import ProcessableMessage
    from .throttle import AsyncRateLimiter, RateLimiter

__all__ = [
    "IMAGE_BLOCK_TOKENS",
    "MAX_PROVIDER_WAIT",
    "MESSAGE_OVERHEAD_TOKENS",
    "PDF_PAGE_TOKENS",
    "REPLY_OVERHEAD_TOKENS",
    "TOOL_USE_SYSTEM_TOKENS",
    "UNCOUNTED_DOCUMENT_PAGES",
    "QueuedAsyncAnthropic",
    "Tokenizer",
    "anthropic_messages_handler",
    "create_message",
    "estimate_messages_input_tokens",
    "estimate_messages_tokens",
    "message_tokens",
    "message_usage",
    "request_from_anthropic_messages",
]

_LOGGER = logging.getLogger("llm_queue_dispatcher")

#: Tokens added per message, and for the system prompt, for the turn's framing. Anthropic does not
#: publish it; 5 keeps the estimate above what ``count_tokens`` reports for small messages (14
#: for Anthropic's own example, system "You are a scientist" and "Hello, Claude": 25 here).
MESSAGE_OVERHEAD_TOKENS = 5
#: Tokens that open the assistant's reply.
REPLY_OVERHEAD_TOKENS = 3
#: An image block, whatever its size or source: Claude Opus 4.7 takes images up to 2,576 px on
#: the long edge, about 4,800 tokens at ``width x height / 750`` (earlier models scale every image
#: down to about 1,600 tokens).
IMAGE_BLOCK_TOKENS = 4_800
#: A PDF page: up to 3,000 text tokens (Anthropic's PDF guide: "1,500-3,000 tokens per page")
#: plus the page's image, which is billed too (1,600 at the standard 1,568 px scale).
PDF_PAGE_TOKENS = 4_600
#: Pages assumed for a document whose pages cannot be counted here: one given by URL or Files API
#: id, or a PDF whose page objects are compressed.
UNCOUNTED_DOCUMENT_PAGES = 10
#: The system prompt Anthropic adds when ``tools`` are given: 530 tokens is the largest figure
#: of its tool-use pricing table (Claude 3 Opus with ``tool_choice`` auto; 346 for Claude 4).
TOOL_USE_SYSTEM_TOKENS = 530

# Request-level keyword arguments whose JSON reaches the model as input.
_JSON_INPUTS = ("tool_choice", "output_format", "output_config", "mcp_servers")
# A PDF's page objects (not the /Pages tree nodes), and the page count of a /Pages node.
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PDF_COUNT = re.compile(rb"/Count\s+(\d+)")


# -- estimating --------------------------------------------------------------------------------
def _default_count(text: str) -> int:
    """ASCII characters / 3 rounded up, plus one token per other character.

    Anthropic's older guidance was about 3.5 English characters per token, and its newer
    tokenizers produce more tokens for the same text, so 3 keeps the estimate above both;
    text in other scripts runs near one token per character."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // 3) + (len(text) - ascii_chars)


def _pdf_pages(data: object) -> int | None:
    """Pages of a base64 PDF, counted from its page objects; None when they cannot be seen."""
    if not isinstance(data, str):
        return None
    try:
        pdf = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return None
    pages = len(_PDF_PAGE.findall(pdf))
    if pages:
        return pages
    counts = [int(found) for found in _PDF_COUNT.findall(pdf)]
    return max(counts) if counts and max(counts) > 0 else None


def _document_tokens(count: Tokenizer, block: Mapping[str, Any], where: str) -> int:
    total = 0
    for key in ("title", "context"):
        if isinstance(block.get(key), str):
            total += _count_tokens(count, block[key], f"{where}[{key!r}]")
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if kind == "text" and isinstance(source, Mapping) and isinstance(source.get("data"), str):
        return total + _count_tokens(count, source["data"], f"{where}['source']['data']")
    if kind == "content" and isinstance(source, Mapping):
        return total + _blocks_tokens(count, source.get("content"), f"{where}['source']['content']")
    pages = _pdf_pages(source.get("data")) if kind == "base64" and isinstance(source, Mapping) else None
    return total + (pages or UNCOUNTED_DOCUMENT_PAGES) * PDF_PAGE_TOKENS


def _block_tokens(count: Tokenizer, block: object, where: str) -> int:
    if isinstance(block, str):
        return _count_tokens(count, block, where)
    if not isinstance(block, Mapping):
        raise InvalidRequestError(f"{where} must be a str or a content block object, got {shown(block)}")
    kind = block.get("type")
    if kind == "image":
        return IMAGE_BLOCK_TOKENS
    if kind == "document":
        return _document_tokens(count, block, where)
    if kind == "tool_result":
        return _blocks_tokens(count, block.get("content"), f"{where}['content']")
    if kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
        name = block.get("name")
        named = _count_tokens(count, name, f"{where}['name']") if isinstance(name, str) else 0
        return named + _count_tokens(
            count, _as_json(block.get("input"), f"{where}['input']"), f"{where}['input']"
        )
    for key in ("text", "thinking"):  # a text block; a thinking block sent back with tools
        if kind == key and isinstance(block.get(key), str):
            return _count_tokens(count, block[key], f"{where}[{key!r}]")
    # Search results, redacted thinking, server tool results, ...: their JSON, which overcounts.
    return _count_tokens(count, _as_json(block, where), where)


def _blocks_tokens(count: Tokenizer, content: object, where: str) -> int:
    """Tokens of a ``content`` (a message's, a tool result's): None, a str or a list of blocks."""
    if content is None:
        return 0
    if isinstance(content, str):
        return _count_tokens(count, content, where)
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        return sum(_block_tokens(count, block, f"{where}[{index}]") for index, block in enumerate(content))
    raise InvalidRequestError(f"{where} must be a str or a list of content blocks, got {shown(content)}")


def _max_tokens(payload: Mapping[str, Any]) -> int:
    value = payload.get("max_tokens")
    if value is None:
        raise InvalidRequestError(
            "payload['max_tokens'] is required by Anthropic's Messages API (the output tokens the "
            "call may use), got None"
        )
    tokens = _token_count(value, "payload['max_tokens']")
    if tokens < 1:
        raise InvalidRequestError(f"payload['max_tokens'] must be >= 1, got {shown(value)}")
    return tokens


def estimate_messages_input_tokens(payload: Mapping[str, Any], *, tokenizer: Tokenizer | None = None) -> int:
    """A conservative estimate of the input tokens of one ``messages.create`` call.

    ``payload`` is the keyword arguments of ``client.messages.create``. The estimate is the sum of:

    * the text of ``system`` (a str or text blocks) and of each message (a str or content
      blocks: text, thinking, a tool call's name and input JSON, a tool result's content), counted
      by ``tokenizer`` or, without one, as ASCII characters / 3 rounded up plus one token per
      other character; ``MESSAGE_OVERHEAD_TOKENS`` (5) per message and for a system prompt;
      ``REPLY_OVERHEAD_TOKENS`` (3);
    * an image block: ``IMAGE_BLOCK_TOKENS`` (4,800); a document: its text for a text or content
      source, else ``PDF_PAGE_TOKENS`` (4,600) per page of a base64 PDF (its page objects
      counted; ``UNCOUNTED_DOCUMENT_PAGES``, 10, when they cannot be, as for a URL or a file id);
      another block: its JSON's count;
    * ``tools``: their JSON's count plus ``TOOL_USE_SYSTEM_TOKENS`` (530) for the system prompt
      Anthropic adds; ``tool_choice``, ``output_format``, ``output_config`` and ``mcp_servers``:
      their JSON's count.

    ``max_tokens`` is checked here too (Anthropic requires it), so a payload the API would refuse
    is refused at enqueue. Nothing is downloaded: ``tokenizer`` is any ``str -> int``. A count or
    an estimate above ``MAX_TOKEN_COUNT`` (2**53, as `estimate_chat_tokens`) raises
    `InvalidRequestError`.

    >>> estimate_messages_input_tokens({"model": "m", "max_tokens": 100,
    ...                                 "messages": [{"role": "user", "content": "Hello there!"}]})
    12
    """
    if not isinstance(payload, Mapping):
        raise InvalidRequestError(
            f"payload must be a mapping of create() keyword arguments, got {shown(payload)}"
        )
    count: Tokenizer = tokenizer if tokenizer is not None else _default_count
    if not callable(count):
        raise InvalidRequestError(f"tokenizer must be a callable str -> int, got {shown(tokenizer)}")
    _max_tokens(payload)
    messages = payload.get("messages")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError(
            f"payload['messages'] must be a non-empty list of messages, got {shown(messages)}"
        )
    total = REPLY_OVERHEAD_TOKENS
    system = payload.get("system")
    if system is not None:
        total += MESSAGE_OVERHEAD_TOKENS + _blocks_tokens(count, system, "payload['system']")
    for index, message in enumerate(messages):
        where = f"payload['messages'][{index}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"{where} must be an object, got {shown(message)}")
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"{where}['role'] must be a str, got {shown(message.get('role'))}")
        total += MESSAGE_OVERHEAD_TOKENS + _blocks_tokens(
            count, message.get("content"), f"{where}['content']"
        )
    tools = payload.get("tools")
    if tools:
        total += TOOL_USE_SYSTEM_TOKENS + _count_tokens(
            count, _as_json(tools, "payload['tools']"), "payload['tools']"
        )
    for key in _JSON_INPUTS:
        if payload.get(key) is not None:
            total += _count_tokens(count, _as_json(payload[key], f"payload[{key!r}]"), f"payload[{key!r}]")
    return _within_limit(total)


def _within_limit(total: int) -> int:
    """``total`` when it is at most `MAX_TOKEN_COUNT`, else `InvalidRequestError` (as
    `llm_queue_dispatcher.openai.estimate_chat_tokens` refuses such an estimate)."""
    if total > MAX_TOKEN_COUNT:
        raise InvalidRequestError(
            f"payload needs an estimate of {total} tokens, more than {MAX_TOKEN_COUNT}: lower its "
            "max_tokens or content"
        )
    return total


def estimate_messages_tokens(payload: Mapping[str, Any], *, tokenizer: Tokenizer | None = None) -> int:
    """A conservative token estimate of one ``messages.create`` call, for scheduling: the input
    (`estimate_messages_input_tokens`) plus ``max_tokens``, the most the reply can use, which is
    also what Anthropic reserves from the output-tokens-per-minute limit when the call starts.

    After each call `Worker` corrects the limiter to the provider's usage (`message_usage`).

    >>> estimate_messages_tokens({"model": "m", "max_tokens": 100,
    ...                           "messages": [{"role": "user", "content": "Hello there!"}]})
    112
    """
    return _within_limit(estimate_messages_input_tokens(payload, tokenizer=tokenizer) + _max_tokens(payload))


def request_from_anthropic_messages(
    id: str,
    payload: Mapping[str, Any],
    *,
    priority: Priority | int = Priority.NORMAL,
    tenant: str | None = None,
    tokenizer: Tokenizer | None = None,
    **fields: Any,
) -> LLMRequest[Any]:
    """An `LLMRequest` carrying ``payload`` (the ``messages.create`` keyword arguments), its token
    estimate from `estimate_messages_tokens` and the payload's ``model``; ``fields`` are further
    `LLMRequest` fields (``deadline``, ``metadata``, ``expected_processing_time``, ...).
    The estimate's parts are set too, ``input`` (`estimate_messages_input_tokens`) and
    ``max_output`` (``max_tokens``), for a limiter with input and output limits (``itpm``,
    ``otpm``) as Anthropic sets them.
    Streaming payloads are refused: the handler needs the whole response's usage."""
    input_tokens = estimate_messages_input_tokens(payload, tokenizer=tokenizer)
    max_output = _max_tokens(payload)
    if payload.get("stream"):
        raise InvalidRequestError("payload['stream'] must be false: the handler reads the whole response")
    model = payload.get("model")
    token_info = TokenInfo(
        model=model if isinstance(model, str) else None, input=input_tokens, max_output=max_output
    )
    # LLMRequest validates ``priority`` (ints 0..3 become a Priority).
    return LLMRequest(id, payload, priority, token_info, tenant=tenant, **fields)  # type: ignore[arg-type]


# -- calling -------------------------------------------------------------------------------------
def _within_a_day(headers: Any) -> Any:
    """``headers`` with a ``retry-after`` longer than `MAX_PROVIDER_WAIT` cut to it, so that the
    limiter's own sync does not pause for longer either."""
    retry_after = parse_rate_limit_headers(headers).retry_after
    if retry_after is None or retry_after <= MAX_PROVIDER_WAIT:
        return headers
    kept = [
        (name, value)
        for name, value in headers.items()
        if name.lower() not in ("retry-after", "retry-after-ms")
    ]
    return [*kept, ("retry-after", str(int(MAX_PROVIDER_WAIT)))]


def _at_most_a_day(seconds: float | None) -> float | None:
    return None if seconds is None else min(seconds, MAX_PROVIDER_WAIT)


async def _penalize(limiter: object, seconds: float) -> None:
    penalize = getattr(limiter, "penalize", None)
    if penalize is not None and seconds > 0 and math.isfinite(seconds):
        try:
            await _maybe_await(penalize(seconds))
        except Exception:  # as in _sync_limiter: the 429 stays the outcome
            _LOGGER.warning("the limiter's penalize failed; the 429 stands", exc_info=True)


async def _classify(error: APIStatusError, limiter: object, reserved: TokenInfo | None) -> Exception:
    status = error.status_code
    headers = error.response.headers
    limits = await _sync_failed(limiter, _within_a_day(headers), reserved)
    description = f"HTTP {status}: {error.message}"
    should_retry = headers.get("x-should-retry")
    if status == 429 and should_retry != "false":
        pause = min(_rate_limit_pause(limits), MAX_PROVIDER_WAIT)
        await _penalize(limiter, pause)
        return RetryableError(description, retry_after=pause)
    retryable = status in (408, 409) or status >= 500  # 529: Anthropic is overloaded
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    if retryable:
        return RetryableError(description, retry_after=_at_most_a_day(limits.retry_after))
    return PermanentError(description)


def _checked(parsed: object, message_type: type[Message]) -> Message:
    """The parsed body when it is a message with content; a `RetryableError` otherwise. The SDK
    does not validate bodies: a 2xx carrying text, an error object or a message without content
    would otherwise pass for an answer."""
    if not isinstance(parsed, message_type):
        raise RetryableError(f"malformed response: expected a message, got {type(parsed).__name__}")
    kind = getattr(parsed, "type", None)
    if kind != "message":
        error = getattr(parsed, "error", None)
        raise RetryableError(f"malformed response: a 2xx of type {kind!r} ({shown(error)})")
    if not isinstance(getattr(parsed, "content", None), list):
        raise RetryableError("malformed response: a message without content")
    return parsed


async def create_message(
    client: AsyncAnthropic,
    limiter: RateLimiter | AsyncRateLimiter,
    payload: Mapping[str, Any],
    *,
    reserved: TokenInfo | None = None,
    count_cache_reads: bool = False,
) -> Message:
    """Calls ``client.messages.create(**payload)`` once (SDK retries off), syncs ``limiter``
    from the response's rate-limit headers, and maps failures as the module's table says.
    ``limiter`` may be synchronous or have coroutine methods; ``penalize`` and
    ``sync_from_headers`` are used when it has them. A payload that is not a mapping, asks for a
    stream, or that the SDK refuses before sending (a misspelt keyword), is a `PermanentError`:
    no retry can send it.

    ``reserved``: the call's reservation in ``limiter`` (the request's `TokenInfo`), which its
    mark corrects to `message_usage` (with ``count_cache_reads``; a failure's gives it all
    back): each remaining figure is read less what that mark gives back to its bucket
    (`provider_limits.settled_headers`). Without it, the unused part of ``max_tokens``."""
    _check_reserved(reserved)
    if not isinstance(count_cache_reads, bool):
        raise InvalidRequestError(f"count_cache_reads must be a bool, got {shown(count_cache_reads)}")
    message, _ = await _complete(client, limiter, payload, reserved, count_cache_reads)
    return message


async def _complete(
    client: AsyncAnthropic,
    limiter: RateLimiter | AsyncRateLimiter,
    payload: Mapping[str, Any],
    reserved: TokenInfo | None,
    count_cache_reads: bool,
) -> tuple[Message, TokenUsage | None]:
    """`create_message`, and the answer's `message_usage`."""
    import anthropic

    if isinstance(payload, Mapping) and payload.get("stream"):
        raise PermanentError("payload['stream'] must be false: the handler reads the whole response")
    raw = await _send_message(client, limiter, payload, reserved=reserved, sync=False)
    headers = _within_a_day(raw.headers)
    try:
        try:
            parsed: Any = raw.parse()
            if inspect.isawaitable(parsed):  # the async client's parse() is a coroutine
                parsed = await parsed
        except (anthropic.APIResponseValidationError, ValueError) as error:  # ValueError: not JSON
            raise RetryableError(f"malformed response: {error}") from error
        message = _checked(parsed, anthropic.types.Message)
    except RetryableError:
        await _sync_failed(limiter, headers, reserved)
        raise
    usage = message_usage(message, count_cache_reads=count_cache_reads)
    if reserved is None:
        reserved = _output_reserved(payload, usage)
    await _sync_limiter(limiter, settled_headers(headers, reserved, usage))
    return message, usage


def _output_reserved(payload: Mapping[str, Any], usage: TokenUsage | None) -> TokenInfo | None:
    """Without the call's reservation, the part Anthropic gives back before it answers (its
    figures count it as free), as a mark would: ``max_tokens`` less the output used."""
    max_tokens = payload.get("max_tokens")
    if usage is None or type(max_tokens) is not int or not usage.output <= max_tokens <= MAX_TOKEN_COUNT:
        return None
    return TokenInfo(input=usage.input, max_output=max_tokens)


async def open_message_stream(
    client: AsyncAnthropic, limiter: RateLimiter | AsyncRateLimiter, payload: Mapping[str, Any]
) -> Any:
    """Sends a ``stream=True`` call as `create_message` sends any (SDK retries off, the limiter
    synced, failures mapped as the module's table says) and returns the SDK's stream of events,
    open."""
    raw = await _send_message(client, limiter, payload)
    stream: Any = raw.parse()
    return await stream if inspect.isawaitable(stream) else stream


async def _send_message(
    client: AsyncAnthropic,
    limiter: RateLimiter | AsyncRateLimiter,
    payload: Mapping[str, Any],
    *,
    reserved: TokenInfo | None = None,
    sync: bool = True,
) -> Any:
    """One call, its raw response (headers read and, with ``sync``, the limiter synced from
    them), failures mapped (the limiter synced from theirs, as it will stand once ``reserved``
    is given back)."""
    import anthropic

    if not isinstance(payload, Mapping):
        raise PermanentError(f"payload must be a mapping of create() keyword arguments, got {shown(payload)}")
    if getattr(client, "max_retries", 0) != 0:
        client = client.with_options(max_retries=0)
    try:
        raw = await client.messages.with_raw_response.create(**dict(payload))
    except anthropic.APIStatusError as error:
        raise await _classify(error, limiter, reserved) from error
    except anthropic.APITimeoutError as error:
        raise RetryableError(f"timed out: {error}") from error
    except anthropic.APIConnectionError as error:
        if _is_closed(client):  # wrapped by some SDK versions: no attempt can ever be sent
            raise PermanentError(f"the anthropic client is closed: {error}") from error
        raise RetryableError(f"connection failed: {error}") from error
    except anthropic.APIResponseValidationError as error:
        raise RetryableError(f"malformed response: {error}") from error
    except (TypeError, ValueError) as error:
        # Raised by the SDK before any request went out (transport failures are its
        # APIConnectionError): a misspelt or unknown keyword ("temprature"), a missing required
        # one (max_tokens), a value it cannot encode. No retry can send it.
        raise PermanentError(f"the anthropic SDK refused the payload's arguments: {error}") from error
    except RuntimeError as error:
        if _is_closed(client):  # the SDK's bare RuntimeError: no attempt can ever be sent
            raise PermanentError(f"the anthropic client is closed: {error}") from error
        raise
    if sync:
        await _sync_limiter(limiter, _within_a_day(raw.headers))
    return raw


def message_tokens(message: Message, *, count_cache_reads: bool = False) -> int | None:
    """The tokens a message counts against Anthropic's limits: ``input_tokens +
    cache_creation_input_tokens + output_tokens``, plus ``cache_read_input_tokens`` when
    ``count_cache_reads`` (for the older models whose input limit counts them). None when the
    message has no usable ``usage``: the limiter then keeps the estimate. The total of
    `message_usage`."""
    usage = message_usage(message, count_cache_reads=count_cache_reads)
    return None if usage is None else usage.total


def message_usage(message: Message, *, count_cache_reads: bool = False) -> TokenUsage | None:
    """What a message used, by part, as Anthropic counts it against its input and output limits:
    ``input`` is ``input_tokens + cache_creation_input_tokens`` (plus ``cache_read_input_tokens``
    when ``count_cache_reads``), ``output`` is ``output_tokens``; their total is `message_tokens`.
    None when the message has no usable ``usage``: the limiter then keeps the estimate."""
    usage = getattr(message, "usage", None)
    names = ["input_tokens", "cache_creation_input_tokens", "output_tokens"]
    if count_cache_reads:
        names.append("cache_read_input_tokens")
    counts: dict[str, int] = {}
    for name in names:
        value = getattr(usage, name, None)
        if value is None and name.startswith("cache_"):
            value = 0  # absent when no cache was used
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        counts[name] = value
    output = counts.pop("output_tokens")
    return TokenUsage(sum(counts.values()), output)


def anthropic_messages_handler(
    client: AsyncAnthropic,
    limiter: RateLimiter | AsyncRateLimiter,
    *,
    on_completion: Callable[[ProcessableMessage[Any], Message], Awaitable[None] | None] | None = None,
    count_cache_reads: bool = False,
) -> Callable[[ProcessableMessage[Any]], Awaitable[TokenUsage | None]]:
    """A `Worker` handler: sends each message's payload with `create_message` on
    ``anthropic.AsyncAnthropic`` and returns `message_usage` of the answer, its input and output
    tokens apart, which correct the limiter, each limit with its own count (None, keeping the
    estimate, when the answer has no usage).

    ``on_completion(job, message)`` (plain or async) sees each successful response before the
    message is acknowledged: store the answer there. If it raises, the message is retried.
    """
    if not callable(getattr(client, "with_options", None)) or not hasattr(client, "messages"):
        raise InvalidRequestError(f"client must be an anthropic.AsyncAnthropic, got {shown(client)}")
    if not isinstance(count_cache_reads, bool):
        raise InvalidRequestError(f"count_cache_reads must be a bool, got {shown(count_cache_reads)}")
    quiet = client.with_options(max_retries=0)

    async def handle(job: ProcessableMessage[Any]) -> TokenUsage | None:
        request = job.message.payload
        message, usage = await _complete(
            quiet, limiter, request.payload, request.token_info, count_cache_reads
        )
        if on_completion is not None:
            await _maybe_await(on_completion(job, message))
        return usage

    return handle


# -- the drop-in client ------------------------------------------------------------------------
class _QueuedMessages:
    """``messages`` of `QueuedAsyncAnthropic`: ``create`` queued, the rest the SDK's."""

    def __init__(self, queued: QueuedAsyncAnthropic) -> None:
        self._queued = queued

    async def create(
        self,
        *,
        priority: Priority | int | None = None,
        tenant: str | None = None,
        deadline: Any = None,
        **payload: Any,
    ) -> Message:
        """``client.messages.create(**payload)``, queued: dispatched in its turn under the
        limiter, answered with the SDK's `Message` or raising the SDK's error. ``priority``
        (default the client's), ``tenant`` and ``deadline`` (a `datetime` or seconds from now)
        are the request's; the rest is sent as given."""
        message: Message = await self._queued._create(
            payload, priority=priority, tenant=tenant, deadline=deadline
        )
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queued._client.messages, name)


class _EventCounter(StreamCounter):
    """A message stream's tokens, as `message_usage` counts them: the input usage of its
    ``message_start`` and the output of its last ``message_delta``."""

    def __init__(self, count_cache_reads: bool) -> None:
        self._count_cache_reads = count_cache_reads
        self._input: int | None = None
        self._output: int | None = None

    def see(self, item: Any) -> None:
        kind = getattr(item, "type", None)
        if kind == "message_start":
            usage = getattr(getattr(item, "message", None), "usage", None)
            parts = ["input_tokens", "cache_creation_input_tokens"]
            if self._count_cache_reads:
                parts.append("cache_read_input_tokens")
            values = [getattr(usage, name, None) for name in parts]
            self._input = sum(v for v in values if isinstance(v, int) and not isinstance(v, bool))
        elif kind == "message_delta":
            output = getattr(getattr(item, "usage", None), "output_tokens", None)
            if isinstance(output, int) and not isinstance(output, bool):
                self._output = output

    def total(self) -> TokenUsage | None:
        if self._input is None or self._output is None:
            return None
        # By part, as `message_usage` counts a whole message: each limit corrected with its own.
        return TokenUsage(self._input, self._output)


class QueuedAsyncAnthropic(QueuedClient):
    """``anthropic.AsyncAnthropic`` with ``messages.create`` queued: a drop-in for the client.

    ``await qc.messages.create(model=..., max_tokens=..., messages=..., priority=...,
    tenant=..., deadline=...)`` enqueues the call on ``dispatcher``, waits its turn under
    ``limiter`` (whose ``itpm``/``otpm`` take the input estimate and ``max_tokens``) and returns
    the SDK's `Message`; a permanent failure raises the SDK's own error. 429s, ``retry-after``
    and the ``anthropic-ratelimit-*`` headers are handled as `anthropic_messages_handler`
    handles them. Every other attribute is the wrapped client's, unqueued. Options as
    `llm_queue_dispatcher.openai.QueuedAsyncOpenAI`'s (``tokenizer``, ``concurrency``,
    ``priority``, ``id_prefix``, ``max_retries``, ``max_rate_limited``); ``count_cache_reads``
    as `message_tokens`'. ``stream=True`` is queued too: the call returns the SDK's stream of
    events, open, once its turn came; the usage of its ``message_start`` and ``message_delta``
    corrects the limiter at its end.
    """

    _sdk = "anthropic"

    def __init__(
        self,
        client: AsyncAnthropic,
        dispatcher: Any,
        limiter: RateLimiter | AsyncRateLimiter,
        *,
        count_cache_reads: bool = False,
        **options: Any,
    ) -> None:
        if not callable(getattr(client, "with_options", None)) or not hasattr(client, "messages"):
            raise InvalidRequestError(f"client must be an anthropic.AsyncAnthropic, got {shown(client)}")
        if not isinstance(count_cache_reads, bool):
            raise InvalidRequestError(f"count_cache_reads must be a bool, got {shown(count_cache_reads)}")
        self._count_cache_reads = count_cache_reads
        super().__init__(client, dispatcher, limiter, **options)

    def _set_client(self, client: Any) -> None:
        super()._set_client(client)
        self._quiet = client.with_options(max_retries=0)
        self.messages = _QueuedMessages(self)

    def _estimate(self, payload: Mapping[str, Any]) -> tuple[int, int]:
        prompt, max_output = (
            estimate_messages_input_tokens(payload, tokenizer=self._tokenizer),
            _max_tokens(payload),
        )
        _within_limit(prompt + max_output)
        return prompt, max_output

    async def _call(
        self, payload: Mapping[str, Any], reserved: TokenInfo | None
    ) -> tuple[Any, TokenUsage | int | None]:
        return await _complete(self._quiet, self._limiter, payload, reserved, self._count_cache_reads)

    async def _open_stream(self, payload: Mapping[str, Any]) -> Any:
        return await open_message_stream(self._quiet, self._limiter, payload)

    def _stream_counter(self, payload: Mapping[str, Any]) -> StreamCounter:
        return _EventCounter(self._count_cache_reads)

    def _rebuild(self, value: object) -> Any:
        from anthropic.types import Message

        return value if isinstance(value, Message) else Message.model_validate(value)
