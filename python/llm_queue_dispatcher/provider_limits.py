"""What a provider says of its own rate limits, read from the headers of a response.

Both limiters (`LLMThrottle` and `redis.RedisThrottle`) learn from it through
``sync_from_headers(headers)``, with one meaning:

* ``retry_after`` (``retry-after`` / ``retry-after-ms``, seconds or an HTTP date) becomes
  ``penalize(retry_after)``: nothing is granted until then.
* ``requests_remaining`` / ``tokens_remaining`` lower what the limiter believes its request and
  token buckets hold: each bucket is cut to at most the provider's figure at once (never raised
  by it), and from there refills at its own rate, never above the configured limit. The reset
  (``requests_reset`` / ``tokens_reset``, seconds from now) holds nothing down: it is the
  instant the provider's bucket is full again, and the provider refills continuously until
  then, so a limiter that sat at the figure until the reset would stall a worker for up to a
  minute with budget available. ``input_tokens_*`` and ``output_tokens_*`` do the same to a
  limiter's input and output token buckets (its ``itpm`` and ``otpm``), where it has them.

Headers understood (case-insensitive):

* OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; resets are durations such
  as ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``.
* Anthropic: ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (resets are
  RFC 3339 instants; the ``tokens`` figures are input and output together), falling back to
  ``anthropic-ratelimit-input-tokens-*`` when the combined token headers are absent; and
  ``anthropic-ratelimit-input-tokens-*`` / ``anthropic-ratelimit-output-tokens-*`` as the input
  and output figures.
* ``retry-after`` (seconds or an HTTP date) and ``retry-after-ms``.

Every wait read (``retry_after`` and both resets) is at most `MAX_PROVIDER_WAIT` (one day): a
longer one (``99999999999s``, an Anthropic reset in the year 9999) is cut to it, so no header can
hold a limiter, shared or not, for longer than a day. A value that is not a finite number >= 0
(``inf``, ``-5``, ``soon``) is ignored. Either way a provider's header never makes a worker fail;
each header name whose value was cut or ignored is logged once per process (logger
``llm_queue_dispatcher``), not on every response. Headers that are not a mapping or an iterable
of ``(name, value)`` pairs are a caller's mistake, refused with `InvalidRequestError`. A value
given as a number (``{"retry-after": 30}``: headers built by hand, a test double) is read as its
text.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from ._checks import finite_float, real_number, shown

# The longest wait, in seconds, a provider's header is believed: one day, the core's constant
# (`LLMThrottle.penalize` clamps to it too). A ``Retry-After`` or a reset further away is cut to
# it: providers' windows run from a minute (OpenAI, Anthropic) to a day (per-day limits), so a
# longer figure is a mistake, and believing it would stop every request for years.
from ._core import MAX_PROVIDER_WAIT
from .errors import InvalidRequestError
from .types import TokenInfo, TokenUsage

__all__ = [
    "FAILED_CALL",
    "MAX_PROVIDER_WAIT",
    "ProviderLimits",
    "parse_duration",
    "parse_rate_limit_headers",
    "settled_headers",
]


_LOGGER = logging.getLogger("llm_queue_dispatcher")
# Header names already logged as cut or ignored: a provider sending a bad figure on every
# response is reported once per process, not once per response.
_LOGGED: set[str] = set()
_LOGGED_LOCK = threading.Lock()
_WAITS = frozenset({"requests_reset", "tokens_reset", "retry_after"})

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class ProviderLimits:
    """The provider's view of its limits; None where a response did not say.

    Resets and ``retry_after`` are seconds from the moment the headers were read, at most
    `MAX_PROVIDER_WAIT`: a longer one given here is cut to it.
    """

    requests_limit: float | None = None
    requests_remaining: float | None = None
    requests_reset: float | None = None
    tokens_limit: float | None = None
    tokens_remaining: float | None = None
    tokens_reset: float | None = None
    retry_after: float | None = None
    input_tokens_limit: float | None = None
    input_tokens_remaining: float | None = None
    input_tokens_reset: float | None = None
    output_tokens_limit: float | None = None
    output_tokens_remaining: float | None = None
    output_tokens_reset: float | None = None

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None:
                continue
            figure = finite_float(value)
            if figure is None or figure < 0:
                raise InvalidRequestError(f"{name} must be None or a finite number >= 0, got {shown(value)}")
            if name in _WAITS and figure > MAX_PROVIDER_WAIT:
                object.__setattr__(self, name, MAX_PROVIDER_WAIT)

    @property
    def empty(self) -> bool:
        """True when the headers said nothing this module understands."""
        return all(getattr(self, name) is None for name in self.__dataclass_fields__)


def parse_duration(text: str) -> float | None:
    """Seconds of an OpenAI-style duration (``"6m0s"``, ``"20ms"``, ``"1.5"``); None if malformed.
    ``text`` that is not a str raises `InvalidRequestError`."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"text must be a str, got {shown(text)}")
    text = text.strip()
    if not text:
        return None
    try:
        plain = float(text)
    except ValueError:
        pass
    else:
        return plain if math.isfinite(plain) and plain >= 0 else None
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if position == len(text) and math.isfinite(total) else None


def _log_once(name: str, message: str, *args: object) -> None:
    with _LOGGED_LOCK:
        if name in _LOGGED:
            return
        _LOGGED.add(name)
    _LOGGER.warning(message + " (logged once per header name)", *args)


def _ignored(name: str, value: str) -> None:
    _log_once(name, "provider header %s: %.80r is not a value it can hold; ignored", name, value)


def _at_most_a_day(name: str, value: str, seconds: float | None) -> float | None:
    """``seconds`` cut to `MAX_PROVIDER_WAIT`; a value cut is logged (once per header name)."""
    if seconds is not None and seconds > MAX_PROVIDER_WAIT:
        _log_once(
            name,
            "provider header %s: %.80r is a wait longer than a day; taken as %g s (MAX_PROVIDER_WAIT)",
            name,
            value,
            MAX_PROVIDER_WAIT,
        )
        return MAX_PROVIDER_WAIT
    return seconds


def _float(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    """The header's finite number >= 0; a present header holding anything else is logged and
    ignored."""
    value = headers.get(name)
    if value is None:
        return None
    number = _float(value)
    if number is None:
        _ignored(name, value)
    return number


def _duration(headers: Mapping[str, str], name: str) -> float | None:
    """An OpenAI-style duration header in seconds, at most a day; None if absent or malformed."""
    value = headers.get(name)
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is None:
        _ignored(name, value)
    return _at_most_a_day(name, value, seconds)


def _instant_in(headers: Mapping[str, str], name: str, now: float) -> float | None:
    """Seconds from ``now`` until an RFC 3339 instant (Anthropic's resets), at most a day; None
    if absent or malformed."""
    value = headers.get(name)
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        _ignored(name, value)
        return None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=timezone.utc)
    return _at_most_a_day(name, value, max(0.0, instant.timestamp() - now))


def _retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """``retry-after-ms``, else ``retry-after`` (seconds or an HTTP date), at most a day."""
    milliseconds = _number(headers, "retry-after-ms")
    if milliseconds is not None:
        return _at_most_a_day("retry-after-ms", headers["retry-after-ms"], milliseconds / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _float(value)
    if seconds is None:
        try:
            instant = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):  # a year past datetime's range
            _ignored("retry-after", value)
            return None
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=timezone.utc)
        seconds = max(0.0, instant.timestamp() - now)
    return _at_most_a_day("retry-after", value, seconds)


def _header_items(headers: object) -> Iterable[Any]:
    """The ``(name, value)`` pairs of a mapping or an iterable of pairs; anything else (a str,
    a number, None) is an `InvalidRequestError`."""
    if isinstance(headers, Mapping):
        return headers.items()
    if not isinstance(headers, (str, bytes)):
        try:
            return iter(headers)  # type: ignore[call-overload, no-any-return]
        except TypeError:
            pass
    raise InvalidRequestError(
        f"headers must be a mapping or an iterable of (name, value) pairs, got {shown(headers)}"
    )


def _int_text(value: int) -> str:
    """An int header value as text; one too long for Python to write (past 4,300 digits) as
    ``inf``, which no header may hold (it is then ignored, and logged)."""
    try:
        return str(value)
    except ValueError:
        return "inf" if value > 0 else "-inf"


def _lowercase(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in _header_items(headers):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable):
            raise InvalidRequestError(f"headers must hold (name, value) pairs, got {shown(pair)}")
        pair = tuple(pair)
        if len(pair) != 2:
            raise InvalidRequestError(f"headers must hold (name, value) pairs, got {shown(pair)}")
        key, value = pair
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        elif not isinstance(value, str) and real_number(value) is not None:
            # A figure given as a number (headers built by hand, a test double): read as its text.
            value = repr(value) if isinstance(value, float) else _int_text(operator.index(value))
        if isinstance(key, str) and isinstance(value, str):
            out[key.lower()] = value
    return out


def parse_rate_limit_headers(
    headers: Mapping[str, Any] | Iterable[tuple[str, Any]], *, now: float | None = None
) -> ProviderLimits:
    """Reads OpenAI's and Anthropic's rate-limit headers and ``retry-after``.

    ``headers`` is any mapping (``httpx.Headers``, a dict) or a sequence of pairs; ``now`` is the
    wall-clock time in seconds used for absolute instants (default: ``time.time()``).

    >>> limits = parse_rate_limit_headers({"x-ratelimit-remaining-tokens": "1200",
    ...                                    "x-ratelimit-reset-tokens": "6m0s"})
    >>> limits.tokens_remaining, limits.tokens_reset
    (1200.0, 360.0)
    """
    if now is not None and finite_float(now) is None:
        raise InvalidRequestError(f"now must be None or a finite number of seconds, got {shown(now)}")
    h = _lowercase(headers)
    now = time.time() if now is None else float(now)
    requests = (
        _number(h, "x-ratelimit-limit-requests"),
        _number(h, "x-ratelimit-remaining-requests"),
        _duration(h, "x-ratelimit-reset-requests"),
    )
    tokens = (
        _number(h, "x-ratelimit-limit-tokens"),
        _number(h, "x-ratelimit-remaining-tokens"),
        _duration(h, "x-ratelimit-reset-tokens"),
    )
    if all(v is None for v in requests):
        requests = (
            _number(h, "anthropic-ratelimit-requests-limit"),
            _number(h, "anthropic-ratelimit-requests-remaining"),
            _instant_in(h, "anthropic-ratelimit-requests-reset", now),
        )

    def anthropic(prefix: str) -> tuple[float | None, float | None, float | None]:
        return (
            _number(h, f"{prefix}-limit"),
            _number(h, f"{prefix}-remaining"),
            _instant_in(h, f"{prefix}-reset", now),
        )

    input_tokens = anthropic("anthropic-ratelimit-input-tokens")
    output_tokens = anthropic("anthropic-ratelimit-output-tokens")
    if all(v is None for v in tokens):
        tokens = anthropic("anthropic-ratelimit-tokens")
        if all(v is None for v in tokens):
            tokens = input_tokens
    return ProviderLimits(
        requests_limit=requests[0],
        requests_remaining=requests[1],
        requests_reset=requests[2],
        tokens_limit=tokens[0],
        tokens_remaining=tokens[1],
        tokens_reset=tokens[2],
        retry_after=_retry_after(h, now),
        input_tokens_limit=input_tokens[0],
        input_tokens_remaining=input_tokens[1],
        input_tokens_reset=input_tokens[2],
        output_tokens_limit=output_tokens[0],
        output_tokens_remaining=output_tokens[1],
        output_tokens_reset=output_tokens[2],
    )


# The headers of what remains of a token limit, by the part of a reservation each counts.
_REMAINING_TOKEN_HEADERS = {
    "x-ratelimit-remaining-tokens": "total",
    "anthropic-ratelimit-tokens-remaining": "total",
    "anthropic-ratelimit-input-tokens-remaining": "input",
    "anthropic-ratelimit-output-tokens-remaining": "output",
}
#: What a failed call counts when it is marked: nothing (its whole reservation is given back).
FAILED_CALL = TokenUsage(0, 0)


def _given_back(reserved: TokenInfo, used: TokenUsage | int | None) -> dict[str, int]:
    """What marking a call gives back to each token bucket of the limiter, by part (``total``,
    ``input``, ``output``): the reservation beyond what the call ``used`` (a failure's mark gives
    back all of it: `FAILED_CALL`). Nothing when ``used`` is None (the estimate stands), nor for
    a part the mark does not correct (a total gives nothing back to the input and output)."""
    if used is None:
        return {}
    total = used.total if isinstance(used, TokenUsage) else used
    back = {"total": max(0, reserved.estimated - total)}
    if isinstance(used, TokenUsage) and reserved.input is not None and reserved.max_output is not None:
        back["input"] = max(0, reserved.input - used.input)
        back["output"] = max(0, reserved.max_output - used.output)
    return back


def settled_headers(headers: Any, reserved: TokenInfo | None, used: TokenUsage | int | None) -> Any:
    """A response's headers as the limiter will stand once the call is marked.

    The provider's ``remaining`` figures count the call as the provider charged it; the
    limiter's bucket holds the call's reservation, and its mark gives back what the reservation
    held beyond the usage (all of it for a failure). Synced from the figures as they came, the
    limiter would then believe in those tokens on top of what the provider said remains (each
    marked call adding its part: 429s at the limit). So each remaining-tokens figure is read less
    what the mark gives back to its bucket. ``headers`` unchanged without a reservation.

    A figure below what the mark gives back is read as 0 (a bucket holds no less): the limiter
    then believes in the difference once marked, until the next answer's figures."""
    back = {} if reserved is None else _given_back(reserved, used)
    if not any(back.values()):
        return headers
    pairs = list(headers.items()) if hasattr(headers, "items") else list(headers)
    names = {str(name).lower() for name, _ in pairs}
    combined = "anthropic-ratelimit-tokens-remaining"
    fallback = "anthropic-ratelimit-input-tokens-remaining"
    if combined not in names and fallback in names and "x-ratelimit-remaining-tokens" not in names:
        # Without the combined figures the input ones stand for them (`parse_rate_limit_headers`):
        # named as the combined ones here, so that the total bucket is read less the total.
        pairs += [
            (name.replace("-input-tokens-", "-tokens-"), value)
            for name, value in pairs
            if str(name).lower().startswith("anthropic-ratelimit-input-tokens-")
        ]
    settled = []
    for name, value in pairs:
        part = _REMAINING_TOKEN_HEADERS.get(str(name).lower())
        if part is not None and back.get(part) and isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a figure: the sync ignores it and says so
                figure = float(value.strip())
                if math.isfinite(figure) and figure >= 0:
                    value = repr(max(0.0, figure - back[part]))
        settled.append((name, value))
    if isinstance(headers, Mapping):
        # Of the kind given (``httpx.Headers``: read without regard to case), for a limiter
        # whose ``sync_from_headers`` reads a mapping.
        kind: Any = type(headers)
        with contextlib.suppress(Exception):
            return kind(settled)
        return dict(settled)
    return settled
