"""How an `LLMRequest` is stored in Redis: bytes that read back to an equal request, never pickle.

A stored request is one line of JSON holding every field but the payload (id, priority, token
info, expected processing time, metadata, created_at, tenant, deadline), a newline, then the
payload's bytes: JSON by default, or whatever the ``dumps`` of a ``serializer=(dumps, loads)``
pair returns. JSON never holds a raw newline, so the first one ends the envelope.

What JSON cannot give back equal is refused before any network call, with `InvalidRequestError`
naming the field: tuples (they come back as lists), dict keys that are not strings (they come
back as strings), NaN and infinities, ints beyond +-(2**53 - 1) (readers of the stored JSON that
hold numbers as doubles, as JavaScript and Lua do, would read another number; Python itself
refuses to write ints of more than 4,300 digits), a list or dict that contains itself, objects
JSON does not know, strings holding lone surrogates (not encodable as UTF-8), nesting too deep
to walk. Datetimes travel as ISO 8601 strings, so an aware datetime comes back equal (same
instant) and a naive one identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .._checks import shown
from ..errors import InvalidRequestError, PayloadTooLargeError
from ..types import LLMRequest, Priority, TokenInfo, _check_text, _finite_seconds, validate_request_id

__all__ = ["MAX_JSON_INT", "Serializer", "decode_request", "encode_request", "request_id_bytes"]

#: ``(dumps, loads)``: ``dumps(payload) -> bytes`` and ``loads(bytes) -> payload``.
Serializer = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]

_dumps_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_loads_json = json.loads
_decode_json = json.JSONDecoder().decode
# Priority by value: a dict lookup, not the enum's call.
_PRIORITIES = {int(priority): priority for priority in Priority}


#: The largest int stored as a JSON number: every int up to it is a double too.
MAX_JSON_INT = 2**53 - 1


def _refuse(path: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"{path} cannot be stored in Redis: {why}")


def _check_int(value: int, path: str) -> None:
    if not -MAX_JSON_INT <= value <= MAX_JSON_INT:
        raise _refuse(
            path,
            f"the int {shown(value)} is beyond +-(2**53 - 1), which JSON readers holding numbers as "
            "doubles would not read back exactly (store it as a string, or pass serializer=(dumps, loads))",
        )


def _check_json(value: Any, path: str, depth: int = 0, inside: frozenset[int] = frozenset()) -> None:
    """Raises `InvalidRequestError` naming the first part of ``value`` that JSON would not give
    back equal. ``inside``: the ids of the lists and dicts ``value`` is part of (a cycle)."""
    if depth > 200:
        raise _refuse(path, "nested more than 200 levels deep")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        _check_int(value, path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _refuse(path, f"{value!r} is not a JSON number")
        return
    if isinstance(value, (list, dict)):
        if id(value) in inside:
            raise _refuse(path, "it contains itself (a cycle JSON cannot hold)")
        inside = inside | {id(value)}
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth + 1, inside)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _refuse(path, f"key {key!r} is not a str (JSON would give it back as a string)")
            _check_json(item, f"{path}[{key!r}]", depth + 1, inside)
        return
    if isinstance(value, tuple):
        raise _refuse(path, "a tuple would come back as a list; use a list")
    raise _refuse(
        path, f"{type(value).__name__} is not JSON (pass serializer=(dumps, loads) for other types)"
    )


def _find_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` that is not encodable as UTF-8, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_surrogate(key, f"{path} key {key!r}") or _find_surrogate(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    return None


def _utf8(text: str, path: str, root: Any = None) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        where = _find_surrogate(root, path) if root is not None else path
        raise _refuse(where or path, "a string holds a lone surrogate (not encodable as UTF-8)") from None


def request_id_bytes(request_id: str) -> bytes:
    """The UTF-8 bytes of a request id, or `InvalidRequestError`."""
    return _utf8(request_id, "id")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def encode_request(request: LLMRequest[Any], serializer: Serializer | None, max_bytes: int) -> bytes:
    """The stored bytes of a validated ``request``; raises `InvalidRequestError` (naming the
    field) or `PayloadTooLargeError`."""
    payload = request.payload
    if serializer is None:
        _check_json(payload, "payload")
        payload_bytes = _utf8(_dumps_json(payload), "payload", payload)
    else:
        try:
            payload_bytes = serializer[0](payload)
        except Exception as exc:
            raise _refuse("payload", f"serializer dumps raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(payload_bytes, (bytes, bytearray, memoryview)):
            raise _refuse(
                "payload", f"serializer dumps must return bytes, got {type(payload_bytes).__name__}"
            )
        payload_bytes = bytes(payload_bytes)
    token_info = request.token_info
    if token_info.model is not None and not isinstance(token_info.model, str):
        raise _refuse("token_info.model", f"must be None or a str, got {token_info.model!r}")
    for field, number in (
        ("token_info.estimated", token_info.estimated),
        ("token_info.actual", token_info.actual),
        ("token_info.input", token_info.input),
        ("token_info.max_output", token_info.max_output),
        ("expected_processing_time", request.expected_processing_time),
    ):
        if isinstance(number, int):
            _check_int(number, field)
    _check_json(request.metadata, "metadata")
    envelope = {
        "id": request.id,
        "priority": int(request.priority),
        # The estimate's parts, where known, after the three fields every stored request has.
        "token_info": [token_info.estimated, token_info.actual, token_info.model]
        + ([] if token_info.parts is None else list(token_info.parts)),
        "expected_processing_time": request.expected_processing_time,
        "metadata": request.metadata,
        "created_at": _iso(request.created_at),
        "tenant": request.tenant,
        "deadline": _iso(request.deadline),
    }
    try:
        head = _dumps_json(envelope).encode("utf-8")
    except UnicodeEncodeError:
        where = next(filter(None, (_find_surrogate(v, k) for k, v in envelope.items())), "request")
        raise _refuse(where, "a string holds a lone surrogate (not encodable as UTF-8)") from None
    size = len(head) + 1 + len(payload_bytes)
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"request {request.id!r} serialises to {size} bytes, more than max_payload_bytes = {max_bytes}"
        )
    return head + b"\n" + payload_bytes


def _loads(data: bytes) -> Any:
    """``json.loads(data)``: UTF-8 decoded directly (what every writer of this format stores),
    without ``json.loads``'s guess of the encoding; anything else read as ``json.loads`` reads it."""
    try:
        return _decode_json(data.decode())
    except ValueError:  # not UTF-8, a byte order mark, or not JSON: json.loads's answer
        return _loads_json(data)


def decode_request(blob: bytes, serializer: Serializer | None) -> LLMRequest[Any]:
    """The request ``encode_request`` stored (equal to it, not the same object)."""
    head, _, payload_bytes = blob.partition(b"\n")
    fields = _loads(head)
    payload = _loads(payload_bytes) if serializer is None else serializer[1](payload_bytes)
    estimated, actual, model, *parts = fields["token_info"]
    input_tokens, max_output = parts if parts else (None, None)
    created_at = fields["created_at"]
    deadline = fields["deadline"]
    stored = fields["priority"]
    priority = _PRIORITIES.get(stored) if type(stored) is int else None
    request: LLMRequest[Any] = _new_request(LLMRequest)
    # Every field, with `LLMRequest.validate`'s checks but those its making here answers
    # already: the priority is a Priority, the token info a TokenInfo (checked when made), the
    # instants datetimes (or `fromisoformat`'s ValueError). Read back once per dispatch: this
    # spares the checks made twice.
    request.__dict__.update(
        id=validate_request_id(fields["id"]),
        payload=payload,
        priority=Priority(stored) if priority is None else priority,
        token_info=_token_info(estimated, actual, model, input_tokens, max_output),
        expected_processing_time=_processing_time(fields["expected_processing_time"]),
        metadata=_metadata(fields["metadata"]),
        created_at=datetime.fromisoformat(created_at),
        tenant=_tenant(fields["tenant"]),
        deadline=None if deadline is None else datetime.fromisoformat(deadline),
    )
    return request


def _token_info(estimated: Any, actual: Any, model: Any, input_tokens: Any, max_output: Any) -> TokenInfo:
    """``TokenInfo(estimated, actual, model, input=input_tokens, max_output=max_output)``; the
    usual stored estimate (a count alone) made without ``__init__``, whose checks it passes."""
    if (
        type(estimated) is int
        and estimated >= 0
        and actual is None
        and model is None
        and input_tokens is None
        and max_output is None
    ):
        info: TokenInfo = _new_token_info(TokenInfo)
        # Every field of `TokenInfo` (`_TOKEN_INFO_FIELDS`).
        info.__dict__.update(estimated=estimated, actual=None, model=None, input=None, max_output=None)
        return info
    return TokenInfo(estimated, actual, model, input=input_tokens, max_output=max_output)


_new_token_info = object.__new__

#: The fields `_token_info` sets: `TokenInfo`'s.
_TOKEN_INFO_FIELDS = ("estimated", "actual", "model", "input", "max_output")

# An LLMRequest without its __init__, whose fields `decode_request` sets (all of them: see
# `_REQUEST_FIELDS`).
_new_request = object.__new__

#: The fields `decode_request` sets: `LLMRequest`'s (a field added there must be read back too).
_REQUEST_FIELDS = (
    "id",
    "payload",
    "priority",
    "token_info",
    "expected_processing_time",
    "metadata",
    "created_at",
    "tenant",
    "deadline",
)


def _processing_time(value: Any) -> Any:
    if value is not None and not _finite_seconds(value):
        raise InvalidRequestError(
            f"expected_processing_time must be None or a finite number of seconds >= 0, got {shown(value)}"
        )
    return value


def _metadata(value: Any) -> Any:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"metadata must be a dict, got {shown(value)}")
    return value


def _tenant(value: Any) -> Any:
    if value is not None:
        if not isinstance(value, str):
            raise InvalidRequestError(f"tenant must be None or a str, got {shown(value)}")
        _check_text(value, "tenant")
    return value
