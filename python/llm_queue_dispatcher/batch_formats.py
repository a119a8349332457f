"""The file formats of ``llmqd batch``: reading the requests, writing the results, and reading
the results of an earlier run to resume it. Each format is one JSON object per line.

``native``, llmqd's own:
    request ``{"id"?, "priority"?, "tenant"?, ...}``, every other key a keyword argument of the
    provider's call; result ``{"id", "status": "ok", "response", "tokens", "attempts"}`` or
    ``{"id", "status": "failed", "error": {"type", "message", "status_code", "retryable"},
    "attempts"}``.
``batch-api``, the OpenAI Batch API's files:
    request ``{"custom_id", "method": "POST", "url", "body", "priority"?, "tenant"?}``, ``url``
    ``/v1/chat/completions`` (``/v1/messages`` for Anthropic); result ``{"id": "batch_req_...",
    "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`` for every
    answer the provider gave, an HTTP error's included (its JSON in ``body``, as OpenAI writes
    its error file), and ``{"id", "custom_id", "response": null, "error": {"code", "message"}}``
    for a failure without an answer (codes ``timeout``, ``connection_error``,
    ``malformed_response``, ``request_failed``).
``message-batches``, Anthropic's Message Batches (``--provider anthropic`` only):
    request ``{"custom_id", "params", "priority"?, "tenant"?}``; result ``{"custom_id", "result":
    {"type": "succeeded", "message"}}`` or ``{"custom_id", "result": {"type": "errored",
    "error": {"type": "error", "error": {"type", "message"}, "request_id"}}}``.

``priority`` and ``tenant`` beside ``custom_id`` are llmqd's additions (the providers' own batch
endpoints know no such keys). Resuming, an id whose last result is an answer (2xx, succeeded,
``"status": "ok"``) is done; a failure is sent again when it is transient: ``"retryable": true``;
a status of 408, 409, 429 (but ``insufficient_quota``) or 5xx; an error code or type naming a
timeout, a lost connection, a malformed answer, an overloaded or failing server.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import InvalidRequestError, RetryableError
from .types import LLMRequest, Priority, TokenInfo

__all__ = [
    "ENDPOINTS",
    "FORMATS",
    "Answer",
    "Entry",
    "Failure",
    "Format",
    "Previous",
    "Refused",
    "Requests",
    "failure_of",
    "format_named",
    "plain_number",
    "previous_results",
    "read_requests",
]

_LOGGER = logging.getLogger("llm_queue_dispatcher")
#: The ``url`` a Batch API line names for each provider.
ENDPOINTS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
# Lines named in the one "needs more than --tpm" message; the others are counted.
_LINES_NAMED = 5
_TRANSIENT_STATUSES = (408, 409, 429)
# Anthropic's error types (its "Errors" page) by status, and those a retry may cure.
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_TRANSIENT_TYPES = frozenset({"api_error", "overloaded_error", "rate_limit_error", "timeout_error"})
_BATCH_API_TRANSIENT_CODES = frozenset({"timeout", "connection_error", "malformed_response"})
# A JSON escape of a UTF-16 surrogate (\ud800 to \udfff): the only way a line that is valid
# UTF-8 can hold a lone one, which UTF-8 cannot encode again to send it. A line without such an
# escape is not searched further.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class Refused(Exception):
    """Why the run cannot start (one line); exit status 2, nothing sent."""


def plain_number(value: float, *, separators: bool = True) -> str:
    """A limit as a person writes it: ``1,000,000`` (``1000000`` without ``separators``), never
    ``1e+06``; a fraction keeps its digits (``1,234.5``)."""
    if float(value).is_integer():
        return f"{int(value):,}" if separators else str(int(value))
    return f"{value:,}" if separators else repr(float(value))


# -- what a call gave ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """A successful call: the provider's response as JSON, its request id, the tokens counted."""

    body: Any
    request_id: str | None
    tokens: int | None
    attempts: int


@dataclass(frozen=True)
class Failure:
    """A request given up: what the provider answered, if it answered."""

    kind: str  # the exception's type name
    message: str
    retryable: bool
    attempts: int
    status_code: int | None = None  # the HTTP status of an error answer, or of the failing call
    body: Any = None  # the error answer's JSON, when it had one
    request_id: str | None = None
    no_answer: str | None = None  # "timeout" or "connection_error" when nothing came back


def _has_class(error: object, name: str) -> bool:
    # The openai and anthropic SDKs share their exception names (both generated by Stainless):
    # checking the name keeps this module free of either import.
    return any(cls.__name__ == name for cls in type(error).__mro__)


def failure_of(error: BaseException, attempts: int, message: str | None = None) -> Failure:
    """The `Failure` an exception from `create_chat_completion` or `create_message` stands for
    (its ``__cause__`` is the SDK's exception); ``message`` replaces ``str(error)``."""
    cause = error.__cause__ if error.__cause__ is not None else error
    status = getattr(cause, "status_code", None)
    status = status if isinstance(status, int) and not isinstance(status, bool) else None
    body: Any = None
    request_id = getattr(cause, "request_id", None)
    if status is not None and status >= 400:
        response = getattr(cause, "response", None)
        try:
            body = response.json() if response is not None else None
        except Exception:  # not JSON: the text, as an error object
            text = getattr(response, "text", "")
            body = {"error": {"message": text if isinstance(text, str) else str(cause)}}
    no_answer = None
    if _has_class(cause, "APITimeoutError"):
        no_answer = "timeout"
    elif _has_class(cause, "APIConnectionError"):
        no_answer = "connection_error"
    return Failure(
        kind=type(error).__name__,
        message=str(error) if message is None else message,
        retryable=isinstance(error, RetryableError),
        attempts=attempts,
        status_code=status,
        body=body,
        request_id=request_id if isinstance(request_id, str) else None,
        no_answer=no_answer,
    )


@dataclass
class Previous:
    """What the output already says of one id: its last line."""

    ok: bool
    retryable: bool = False


# -- the formats ---------------------------------------------------------------------------------
class Format:
    """One file format: how a request line reads, how a result is written and read back."""

    name: ClassVar[str]
    #: The keys a request line may hold besides the call's own (the native format's are free).
    keys: ClassVar[frozenset[str]]

    def request_fields(self, item: dict[str, Any], provider: str) -> tuple[object, Any]:
        """The id (None for the default) and the call's keyword arguments of a request line;
        `InvalidRequestError` naming what is wrong. ``priority`` and ``tenant`` are read apart."""
        raise NotImplementedError

    def succeeded(self, request_id: str, answer: Answer) -> dict[str, Any]:
        """The result line of an answer."""
        raise NotImplementedError

    def failed(self, request_id: str, failure: Failure) -> dict[str, Any]:
        """The result line of a request given up."""
        raise NotImplementedError

    def is_result(self, item: dict[str, Any]) -> bool:
        """Whether ``item`` has this format's result shape."""
        raise NotImplementedError

    def previous(self, item: dict[str, Any]) -> tuple[str, Previous]:
        """The id and outcome of a result line of this format (`is_result` true)."""
        raise NotImplementedError


class _Native(Format):
    name = "native"
    keys = frozenset({"id", "priority", "tenant"})

    def request_fields(self, item: dict[str, Any], provider: str) -> tuple[object, Any]:
        for key in ("custom_id", "params"):
            if key in item:
                raise InvalidRequestError(
                    f"{key!r} is a key of the provider's batch files, not of the call: "
                    "this file is read as the native format (see --input-format)"
                )
        request_id = item.get("id")
        if isinstance(request_id, int) and not isinstance(request_id, bool) and abs(request_id) < 10**18:
            request_id = str(request_id)
        return request_id, {key: value for key, value in item.items() if key not in self.keys}

    def succeeded(self, request_id: str, answer: Answer) -> dict[str, Any]:
        return {
            "id": request_id,
            "status": "ok",
            "response": answer.body,
            "tokens": answer.tokens,
            "attempts": answer.attempts,
        }

    def failed(self, request_id: str, failure: Failure) -> dict[str, Any]:
        error = {
            "type": failure.kind,
            "message": failure.message,
            "status_code": failure.status_code,
            "retryable": failure.retryable,
        }
        return {"id": request_id, "status": "failed", "error": error, "attempts": failure.attempts}

    def is_result(self, item: dict[str, Any]) -> bool:
        # Only the outcomes llmqd writes: any other would be read as a failure for good, and its
        # request skipped by every rerun.
        return isinstance(item.get("id"), str) and item.get("status") in ("ok", "failed")

    def previous(self, item: dict[str, Any]) -> tuple[str, Previous]:
        error = item.get("error")
        retryable = False
        if isinstance(error, dict):
            flag = error.get("retryable")
            # Lines written before the flag existed: a give-up after transient errors kept their type.
            retryable = flag if isinstance(flag, bool) else error.get("type") == "RetryableError"
        return item["id"], Previous(ok=item.get("status") == "ok", retryable=retryable)


def _custom_id(item: dict[str, Any]) -> str:
    value = item.get("custom_id")
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"custom_id must be a non-empty string, got {value!r:.80}")
    return value


def _unknown_keys(item: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(key for key in item if key not in allowed)
    if unknown:
        raise InvalidRequestError(
            f"unknown key {unknown[0]!r} (a line holds {', '.join(sorted(allowed))}; the call's "
            "arguments go inside)"
        )


def _object(item: dict[str, Any], key: str) -> dict[str, Any]:
    value = item.get(key)
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{key} must be an object of the call's arguments, got {value!r:.80}")
    return dict(value)


class _BatchApi(Format):
    name = "batch-api"
    keys = frozenset({"custom_id", "method", "url", "body", "priority", "tenant"})

    def request_fields(self, item: dict[str, Any], provider: str) -> tuple[object, Any]:
        _unknown_keys(item, self.keys)
        request_id = _custom_id(item)
        if item.get("method") != "POST":
            raise InvalidRequestError(f"method must be 'POST', got {item.get('method')!r:.80}")
        url = item.get("url")
        if url != ENDPOINTS[provider]:
            other = next((name for name, path in ENDPOINTS.items() if path == url), None)
            hint = f" (that is --provider {other}'s)" if other is not None else ""
            raise InvalidRequestError(
                f"url must be {ENDPOINTS[provider]!r} with --provider {provider}, got {url!r:.80}{hint}"
            )
        return request_id, _object(item, "body")

    def succeeded(self, request_id: str, answer: Answer) -> dict[str, Any]:
        response = {"status_code": 200, "request_id": answer.request_id, "body": answer.body}
        return {"id": _line_id(), "custom_id": request_id, "response": response, "error": None}

    def failed(self, request_id: str, failure: Failure) -> dict[str, Any]:
        record: dict[str, Any] = {"id": _line_id(), "custom_id": request_id}
        if failure.status_code is not None and failure.status_code >= 400:
            body = failure.body if failure.body is not None else {"error": {"message": failure.message}}
            record["response"] = {
                "status_code": failure.status_code,
                "request_id": failure.request_id,
                "body": body,
            }
            record["error"] = None
            return record
        if failure.no_answer is not None:
            code = failure.no_answer
        elif failure.retryable:  # a 2xx that was no completion or message
            code = "malformed_response"
        else:
            code = "request_failed"
        record["response"] = None
        record["error"] = {"code": code, "message": failure.message}
        return record

    def is_result(self, item: dict[str, Any]) -> bool:
        # An answer (its HTTP status a number) or a failure without one (an error object).
        if not isinstance(item.get("custom_id"), str):
            return False
        response = item.get("response")
        if isinstance(response, dict):
            status = response.get("status_code")
            return isinstance(status, int) and not isinstance(status, bool)
        return response is None and isinstance(item.get("error"), dict)

    def previous(self, item: dict[str, Any]) -> tuple[str, Previous]:
        response, error = item.get("response"), item.get("error")
        status = response.get("status_code") if isinstance(response, dict) else None
        if isinstance(status, int) and not isinstance(status, bool):
            if 200 <= status < 300 and error is None:
                return item["custom_id"], Previous(ok=True)
            body = response.get("body") if isinstance(response, dict) else None
            inner = body.get("error") if isinstance(body, dict) else None
            quota = isinstance(inner, dict) and inner.get("code") == "insufficient_quota"
            transient = (status in _TRANSIENT_STATUSES or status >= 500) and not quota
            return item["custom_id"], Previous(ok=False, retryable=transient)
        code = error.get("code") if isinstance(error, dict) else None
        return item["custom_id"], Previous(ok=False, retryable=code in _BATCH_API_TRANSIENT_CODES)


class _MessageBatches(Format):
    name = "message-batches"
    keys = frozenset({"custom_id", "params", "priority", "tenant"})

    def request_fields(self, item: dict[str, Any], provider: str) -> tuple[object, Any]:
        _unknown_keys(item, self.keys)
        return _custom_id(item), _object(item, "params")

    def succeeded(self, request_id: str, answer: Answer) -> dict[str, Any]:
        return {"custom_id": request_id, "result": {"type": "succeeded", "message": answer.body}}

    def failed(self, request_id: str, failure: Failure) -> dict[str, Any]:
        body = failure.body
        answered = (
            isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)
        )
        if not answered:  # no answer, or not one of Anthropic's error bodies
            body = {
                "type": "error",
                "error": {"type": _anthropic_error_type(failure), "message": failure.message},
            }
        body = {**body, "request_id": body.get("request_id") or failure.request_id}
        return {"custom_id": request_id, "result": {"type": "errored", "error": body}}

    def is_result(self, item: dict[str, Any]) -> bool:
        result = item.get("result")
        return (
            isinstance(item.get("custom_id"), str)
            and isinstance(result, dict)
            and result.get("type") in ("succeeded", "errored", "canceled", "expired")
        )

    def previous(self, item: dict[str, Any]) -> tuple[str, Previous]:
        result = item["result"]
        kind = result.get("type")
        if kind == "succeeded":
            return item["custom_id"], Previous(ok=True)
        if kind in ("canceled", "expired"):  # never processed: sending it is no retry
            return item["custom_id"], Previous(ok=False, retryable=True)
        outer = result.get("error")
        inner = outer.get("error") if isinstance(outer, dict) else None
        error_type = inner.get("type") if isinstance(inner, dict) else None
        return item["custom_id"], Previous(ok=False, retryable=error_type in _ANTHROPIC_TRANSIENT_TYPES)


def _anthropic_error_type(failure: Failure) -> str:
    """The Anthropic error type of a failure that brought no Anthropic error body."""
    status = failure.status_code
    if status is not None and status >= 400:
        return _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if failure.no_answer == "timeout":
        return "timeout_error"
    return "api_error" if failure.retryable else "invalid_request_error"


def _line_id() -> str:
    """An id for one result line, as OpenAI's ``batch_req_`` ids look."""
    return f"batch_req_{secrets.token_hex(12)}"


FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (_Native(), _BatchApi(), _MessageBatches())}


def format_named(name: str) -> Format:
    """The format of that name (``native``, ``batch-api``, ``message-batches``)."""
    return FORMATS[name]


def _detected(item: dict[str, Any]) -> Format:
    """The format a file is read in, from its first JSON object: one with ``custom_id`` is a
    provider's batch file (``params``: Anthropic's, else OpenAI's), any other is native."""
    if "custom_id" not in item:
        return FORMATS["native"]
    return FORMATS["message-batches" if "params" in item and "body" not in item else "batch-api"]


# -- reading the requests ------------------------------------------------------------------------
@dataclass
class Entry:
    line: int
    request: LLMRequest[Any]


@dataclass
class Requests:
    """The input read: the valid requests, the messages about bad lines, how many lines are
    bad, and the format the file was read in."""

    entries: list[Entry]
    errors: list[str]
    bad_lines: int
    format: Format


def _priority(value: object) -> Priority | int:
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"priority must be 0..3 or urgent/high/normal/low, got {value!r:.80}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_line(raw: bytes) -> Any:
    """One input line's JSON value; `InvalidRequestError` saying why there is none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(
            f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
        ) from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"not JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise InvalidRequestError("not JSON this reader can hold (nested too deeply)") from None
    except ValueError as error:  # NaN or Infinity; an int of more than 4,300 digits
        raise InvalidRequestError(f"not JSON ({error})") from None
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(value)
        if where is not None:
            raise InvalidRequestError(
                f"{where} holds a lone surrogate (a \\ud800-\\udfff escape without its pair): "
                "UTF-8 cannot carry it to the provider"
            )
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(value: Any) -> str | None:
    """Where in ``value`` (parsed JSON) a string holds a lone surrogate, as a path
    (``messages[0].content``), or None. A loop, not recursion: the JSON reader took the depth."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return where or "the line"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _encodable(key):  # the path stops before it: it cannot be printed
                    return f"a key of {where or 'the line'}"
                stack.append((f"{where}.{key}" if where else key, child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{index}]", child) for index, child in enumerate(item))
    return None


def _build(
    provider: str,
    request_id: str,
    payload: dict[str, Any],
    item: dict[str, Any],
    number: int,
    default_max_tokens: int | None,
) -> LLMRequest[Any]:
    """The request of one line, its estimate split into the input and the most the reply may
    use (``TokenInfo.input`` and ``max_output``), which limits of input and output tokens per
    minute (``--itpm``, ``--otpm``) charge apart."""
    priority = _priority(item.get("priority", Priority.NORMAL))
    tenant = item.get("tenant")
    # Both constructors set the estimate's parts.
    if provider == "anthropic":
        from .anthropic import request_from_anthropic_messages

        if "max_tokens" not in payload:
            if default_max_tokens is None:
                raise InvalidRequestError(
                    "no max_tokens: Anthropic requires it; set it on the line or pass --default-max-tokens"
                )
            payload["max_tokens"] = default_max_tokens
        return request_from_anthropic_messages(
            request_id, payload, priority=priority, tenant=tenant, metadata={"line": number}
        )
    from .openai import DEFAULT_COMPLETION_TOKENS, request_from_openai_chat

    completion_tokens = DEFAULT_COMPLETION_TOKENS if default_max_tokens is None else default_max_tokens
    return request_from_openai_chat(
        request_id,
        payload,
        priority=priority,
        tenant=tenant,
        default_completion_tokens=completion_tokens,
        metadata={"line": number},
    )


def read_requests(
    data: bytes,
    *,
    provider: str,
    input_format: str,
    model: str | None,
    default_max_tokens: int | None,
    token_limits: Mapping[str, float],
) -> Requests:
    """Every request of the input ``data`` (``input_format`` ``auto`` or a format's name), and
    a message naming each bad line. ``token_limits`` are the token limits by flag (``--tpm``,
    ``--itpm``, ``--otpm``, ``--tpd``): a request's whole estimate must fit ``--tpm`` and
    ``--tpd``, its input part ``--itpm`` and its output part (``max_tokens``) ``--otpm``, as the
    limiter charges them; the lines needing more than a limit share one message naming it."""
    fmt = None if input_format == "auto" else FORMATS[input_format]
    entries: list[Entry] = []
    errors: list[str] = []
    too_large: dict[str, list[tuple[int, int]]] = {}
    first_line: dict[str, int] = {}
    # A UTF-8 byte order mark (as Windows tools write one) is not part of the first line.
    data = data.removeprefix(codecs.BOM_UTF8)
    # Split on b"\n" only: `str.splitlines` would also split inside a text holding U+2028.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = _parse_line(raw)
        except InvalidRequestError as error:
            errors.append(f"line {number}: {error}")
            continue
        if not isinstance(item, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(item).__name__}")
            continue
        if fmt is None:
            fmt = _detected(item)
            if fmt.name == "message-batches" and provider != "anthropic":
                raise Refused(
                    f"line {number} is in Anthropic's Message Batches format (custom_id and params): "
                    "pass --provider anthropic"
                )
        try:
            request_id, payload = fmt.request_fields(item, provider)
            if request_id is None:
                request_id = f"line-{number}"
            if not isinstance(request_id, str) or not request_id:
                raise InvalidRequestError(f"id must be a non-empty string, got {request_id!r:.80}")
            if "model" not in payload and model is not None:
                payload["model"] = model
            if not isinstance(payload.get("model"), str):
                raise InvalidRequestError("no model: set 'model' in the request or pass --model")
            request = _build(provider, request_id, payload, item, number, default_max_tokens)
        except InvalidRequestError as error:
            errors.append(f"line {number}: {error}")
            continue
        over = _over_a_limit(request.token_info, token_limits)
        if over is not None:
            too_large.setdefault(over[0], []).append((number, over[1]))
            continue
        if request_id in first_line:
            errors.append(f"line {number}: id {request_id!r} repeats line {first_line[request_id]}")
            continue
        first_line[request_id] = number
        entries.append(Entry(number, request))
    bad_lines = len(errors) + sum(len(lines) for lines in too_large.values())
    for flag, lines in too_large.items():
        named = ", ".join(
            f"line {number} (about {tokens:,} tokens)" for number, tokens in lines[:_LINES_NAMED]
        )
        more = f" and {len(lines) - _LINES_NAMED:,} more" if len(lines) > _LINES_NAMED else ""
        period = "day" if flag.endswith("pd") else "minute"
        counted = {"--itpm": " of input", "--otpm": " of output (max_tokens)"}.get(flag, "")
        limit = plain_number(token_limits[flag], separators=False)
        lower = "their input" if flag == "--itpm" else "their max_tokens"
        errors.append(
            f"{len(lines):,} line(s) need more tokens{counted} than {flag} {limit} allows in any {period}: "
            f"{named}{more}; lower {lower} or raise {flag}"
        )
    return Requests(entries, errors, bad_lines, fmt if fmt is not None else FORMATS["native"])


def _over_a_limit(info: TokenInfo, token_limits: Mapping[str, float]) -> tuple[str, int] | None:
    """The first token limit (by flag) a request can never fit, with the tokens it counts there:
    ``--tpm`` and ``--tpd`` count the whole estimate, ``--itpm`` the input part and ``--otpm``
    the output part (each the whole estimate when the request has no parts)."""
    counted = {
        "--tpm": info.estimated,
        "--tpd": info.estimated,
        "--itpm": info.estimated if info.input is None else info.input,
        "--otpm": info.estimated if info.max_output is None else info.max_output,
    }
    for flag, limit in token_limits.items():
        if counted[flag] > limit:
            return flag, counted[flag]
    return None


# -- reading earlier results ---------------------------------------------------------------------
def previous_results(out: Path, fmt: Format) -> dict[str, Previous]:
    """The last result of each id in an existing output written in ``fmt``. A last line cut off
    by a crash is removed (that request is sent again); a line of another format, or none, is
    refused. A device or a pipe (``/dev/stdout``) holds nothing to resume from."""
    if not out.is_file():
        return {}
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        _LOGGER.warning("%s: removing an incomplete last line (that request is sent again)", out)
        with out.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    # A byte order mark an editor saved it with is not part of the first line.
    data = data.removeprefix(codecs.BOM_UTF8)
    previous: dict[str, Previous] = {}
    # Split on b"\n" only: `str.splitlines` would also split inside a response holding U+2028.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON
            item = None
        if not isinstance(item, dict):
            raise Refused(f"--out {out}: line {number} is not an llmqd batch result")
        if not fmt.is_result(item):
            other = next((other for other in FORMATS.values() if other.is_result(item)), None)
            if other is None:
                raise Refused(f"--out {out}: line {number} is not an llmqd batch result")
            raise Refused(
                f"--out {out}: holds results in the {other.name} format and this run writes the "
                f"{fmt.name} format; pass --output-format {other.name} to go on with it, or name "
                "another file"
            )
        request_id, outcome = fmt.previous(item)
        previous[request_id] = outcome
    return previous
