"""The public message types. Each validates on construction; storage validates again at enqueue,
since a mutable field may have changed in between."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any, Generic, TypeVar

from ._checks import finite_float, shown
from .errors import InvalidRequestError

__all__ = [
    "LLMRequest",
    "MessageAttributes",
    "Priority",
    "QueueMessage",
    "TokenInfo",
    "validate_request_id",
    "validate_token_count",
]

T = TypeVar("T")


class Priority(IntEnum):
    """Request priority; lower values are served first."""

    URGENT = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


def validate_token_count(value: object, field_name: str) -> int:
    """Returns ``value`` as an int token count, or raises `InvalidRequestError` naming the field.

    Accepted: ints >= 0 (not bools), integer-like objects whose ``__index__`` gives one (a
    ``numpy.int64``, say: what a tokenizer or a dataframe hands back), and integral, finite
    floats >= 0 (``12.0`` becomes ``12``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = _index_of(value, field_name)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidRequestError(f"{field_name} must be a finite integral count, got {shown(value)}")
        value = int(value)
    if value < 0:
        raise InvalidRequestError(f"{field_name} must be >= 0, got {shown(value)}")
    return int(value)


def _index_of(value: object, field_name: str) -> int:
    """``operator.index(value)`` for an integer-like object that is not a bool (``numpy.bool_``
    has no ``__index__``); `InvalidRequestError` for anything else. An exception other than
    `TypeError` raised by a user's ``__index__`` is not ours to hide: it propagates."""
    if not isinstance(value, bool):
        try:
            index = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if not isinstance(index, bool):
                return index
    raise InvalidRequestError(f"{field_name} must be an int >= 0, got {shown(value)}")


def _check_text(value: str, field_name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            f"{field_name} must be a str of valid Unicode (no lone surrogates), got {shown(value)}"
        ) from None


# Python's str.isspace() also counts the four information separators U+001C..U+001F, which are
# not Unicode White_Space; the core's rule (Rust's `str::trim`) strips exactly White_Space. One
# rule at every door: the core's.
_NOT_WHITE_SPACE = frozenset("\x1c\x1d\x1e\x1f")


def _only_white_space(value: str) -> bool:
    """Whether ``value`` is empty or consists of Unicode White_Space characters only."""
    # White_Space is str.isspace() less the separators: all isspace and none a separator.
    return not value.strip() and _NOT_WHITE_SPACE.isdisjoint(value)


def validate_request_id(value: object, field_name: str = "id") -> str:
    """The one request id rule of the package (store, limiter and dispatcher alike): a str of
    valid Unicode that is not empty and not only (Unicode White_Space) whitespace. Raises
    `InvalidRequestError`."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{field_name} must be a str, got {shown(value)}")
    _check_text(value, field_name)
    if _only_white_space(value):
        raise InvalidRequestError(
            f"{field_name} must be a non-empty str that is not only whitespace, got {shown(value)}"
        )
    return value


def _validate_priority(value: object) -> Priority:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"priority must be a Priority or an int 0..3, got {shown(value)}")
    try:
        return Priority(value)
    except ValueError:
        raise InvalidRequestError(f"priority must be within 0..3, got {shown(value)}") from None


def _finite_seconds(value: object) -> bool:
    """Whether ``value`` is a number (an int, a float or an integer-like, not a bool) of finite
    seconds >= 0. An int too large for a float is not finite."""
    seconds = finite_float(value)
    return seconds is not None and seconds >= 0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class TokenInfo:
    """Token counts of one request: the estimate used for scheduling, the actual count once known."""

    estimated: int
    actual: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimated", validate_token_count(self.estimated, "token_info.estimated"))
        if self.actual is not None:
            object.__setattr__(self, "actual", validate_token_count(self.actual, "token_info.actual"))
        if self.model is not None:
            if not isinstance(self.model, str):
                raise InvalidRequestError(f"token_info.model must be None or a str, got {shown(self.model)}")
            _check_text(self.model, "token_info.model")


@dataclass
class LLMRequest(Generic[T]):
    """One LLM API call waiting to be dispatched. ``payload`` is kept by reference in memory."""

    id: str
    payload: T
    priority: Priority = Priority.NORMAL
    token_info: TokenInfo = field(default_factory=lambda: TokenInfo(0))
    expected_processing_time: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=_utc_now)
    tenant: str | None = None
    deadline: datetime | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_openai_chat(
        cls,
        id: str,
        payload: Any,
        *,
        priority: Priority | int = Priority.NORMAL,
        tenant: str | None = None,
        **fields: Any,
    ) -> LLMRequest[Any]:
        """A request for an OpenAI chat completion: ``payload`` is the keyword arguments of
        ``chat.completions.create``, the estimate `llm_queue_dispatcher.openai.estimate_chat_tokens`
        (``tokenizer=`` and ``default_completion_tokens=`` are passed on to it)."""
        from .openai import request_from_openai_chat  # the openai SDK itself is not needed

        return request_from_openai_chat(id, payload, priority=priority, tenant=tenant, **fields)

    @classmethod
    def from_anthropic_messages(
        cls,
        id: str,
        payload: Any,
        *,
        priority: Priority | int = Priority.NORMAL,
        tenant: str | None = None,
        **fields: Any,
    ) -> LLMRequest[Any]:
        """A request for an Anthropic message: ``payload`` is the keyword arguments of
        ``messages.create``, the estimate `llm_queue_dispatcher.anthropic.estimate_messages_tokens`
        (``tokenizer=`` is passed on to it)."""
        from .anthropic import request_from_anthropic_messages  # the anthropic SDK itself is not needed

        return request_from_anthropic_messages(id, payload, priority=priority, tenant=tenant, **fields)

    def validate(self) -> None:
        """Checks every field again (and normalises ``priority``); raises `InvalidRequestError`."""
        validate_request_id(self.id)
        self.priority = _validate_priority(self.priority)
        if not isinstance(self.token_info, TokenInfo):
            raise InvalidRequestError(f"token_info must be a TokenInfo, got {shown(self.token_info)}")
        # TokenInfo is frozen but a caller may have bypassed __init__; check the count again.
        validate_token_count(self.token_info.estimated, "token_info.estimated")
        ept = self.expected_processing_time
        if ept is not None and not _finite_seconds(ept):
            raise InvalidRequestError(
                f"expected_processing_time must be None or a finite number of seconds >= 0, got {shown(ept)}"
            )
        if not isinstance(self.metadata, dict):
            raise InvalidRequestError(f"metadata must be a dict, got {shown(self.metadata)}")
        if not isinstance(self.created_at, datetime):
            raise InvalidRequestError(f"created_at must be a datetime, got {shown(self.created_at)}")
        if self.deadline is not None and not isinstance(self.deadline, datetime):
            raise InvalidRequestError(f"deadline must be None or a datetime, got {shown(self.deadline)}")
        if self.tenant is not None:
            if not isinstance(self.tenant, str):
                raise InvalidRequestError(f"tenant must be None or a str, got {shown(self.tenant)}")
            _check_text(self.tenant, "tenant")


@dataclass(frozen=True)
class MessageAttributes:
    """What the store knows of one delivery of a message."""

    message_id: str
    receipt_handle: str
    enqueued_at: datetime
    receive_count: int
    first_received_at: datetime | None


@dataclass(frozen=True)
class QueueMessage(Generic[T]):
    """A request as the store holds it: the request plus its delivery attributes."""

    id: str
    payload: LLMRequest[T]
    attributes: MessageAttributes
