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
from ._core import AttributesSlot
from .errors import InvalidRequestError

__all__ = [
    "LLMRequest",
    "MessageAttributes",
    "Priority",
    "QueueMessage",
    "TokenInfo",
    "TokenUsage",
    "split_token_parts",
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


def split_token_parts(
    total: int, input: int | None, output: int | None, names: tuple[str, str, str]
) -> tuple[int, int] | None:
    """The input and output parts of ``total`` from what a caller gave, the rule of `TokenInfo`
    and of the limiters' ``input_tokens``/``output_tokens``: both must add up to ``total``; one
    alone leaves the rest to the other (so it may not exceed ``total``); none is None (unknown).
    ``names`` (of the total and the two parts) go into the `InvalidRequestError`. The counts
    are checked already."""
    total_name, input_name, output_name = names
    if input is None and output is None:
        return None
    if input is not None and output is not None:
        if input + output != total:
            raise InvalidRequestError(
                f"{input_name} + {output_name} must equal {total_name}: got {input} + {output}, "
                f"{total_name} = {total}"
            )
        return input, output
    part, name = (input, input_name) if output is None else (output, output_name)
    if part is None or part > total:
        raise InvalidRequestError(f"{name} must be at most {total_name} ({total}), got {part}")
    return (part, total - part) if output is None else (total - part, part)


@dataclass(frozen=True, init=False)
class TokenInfo:
    """Token counts of one request: the estimate used for scheduling, the actual count once
    known, and where known the estimate's parts, ``input`` (the prompt's tokens) and
    ``max_output`` (the most the reply may use: the request's ``max_tokens``), which a limiter
    with input and output limits (Anthropic's ITPM and OTPM) charges apart.

    Rules (each count an int >= 0; `InvalidRequestError` naming the field otherwise):

    * ``TokenInfo(1200)``: the estimate alone, as always; the parts stay None.
    * ``TokenInfo(input=1000, max_output=200)``: ``estimated`` is their sum, 1200.
    * ``TokenInfo(1200, input=1000)``: the other part is the rest (``max_output=200``); a part
      above ``estimated`` is refused.
    * ``TokenInfo(1200, input=1000, max_output=200)``: the parts must add up to ``estimated``.

    So either both parts are None or both are set and add up to ``estimated``. (To change a
    part with `dataclasses.replace`, pass ``estimated=None`` as well.)
    """

    estimated: int
    actual: int | None
    model: str | None
    input: int | None
    max_output: int | None

    def __init__(
        self,
        estimated: int | None = None,
        actual: int | None = None,
        model: str | None = None,
        *,
        input: int | None = None,
        max_output: int | None = None,
    ) -> None:
        given_input = None if input is None else validate_token_count(input, "token_info.input")
        given_output = (
            None if max_output is None else validate_token_count(max_output, "token_info.max_output")
        )
        if estimated is None:
            if given_input is None or given_output is None:
                raise InvalidRequestError(
                    "token_info.estimated is required unless both input and max_output are given, "
                    f"got input={shown(input)}, max_output={shown(max_output)}"
                )
            total = given_input + given_output
        else:
            total = validate_token_count(estimated, "token_info.estimated")
        parts = split_token_parts(
            total,
            given_input,
            given_output,
            ("token_info.estimated", "token_info.input", "token_info.max_output"),
        )
        object.__setattr__(self, "estimated", total)
        object.__setattr__(self, "input", None if parts is None else parts[0])
        object.__setattr__(self, "max_output", None if parts is None else parts[1])
        object.__setattr__(
            self, "actual", None if actual is None else validate_token_count(actual, "token_info.actual")
        )
        if model is not None:
            if not isinstance(model, str):
                raise InvalidRequestError(f"token_info.model must be None or a str, got {shown(model)}")
            _check_text(model, "token_info.model")
        object.__setattr__(self, "model", model)

    @property
    def parts(self) -> tuple[int, int] | None:
        """``(input, max_output)`` when known, else None."""
        if self.input is None or self.max_output is None:
            return None
        return self.input, self.max_output

    def validate(self) -> None:
        """Checks the counts again (a caller may have bypassed ``__init__``); raises
        `InvalidRequestError`."""
        estimated = validate_token_count(self.estimated, "token_info.estimated")
        counts = [
            None if value is None else validate_token_count(value, f"token_info.{name}")
            for name, value in (("input", self.input), ("max_output", self.max_output))
        ]
        if (counts[0] is None) != (counts[1] is None):
            raise InvalidRequestError(
                f"token_info.input and token_info.max_output must be both None or both set, "
                f"got input={shown(self.input)}, max_output={shown(self.max_output)}"
            )
        split_token_parts(
            estimated,
            counts[0],
            counts[1],
            ("token_info.estimated", "token_info.input", "token_info.max_output"),
        )


@dataclass(frozen=True, init=False)
class TokenUsage:
    """What a call used, by part: ``input`` (the prompt's tokens, as the provider counts them
    against its input limit) and ``output`` (the reply's). A `Worker` handler may return one
    instead of a total: the worker then marks the message processed with ``input_tokens`` and
    ``output_tokens``, and a limiter with input and output limits (``itpm``, ``otpm``) corrects
    each with its own count; the other limits take the total, ``input + output``.

    >>> TokenUsage(input=1000, output=180).total
    1180

    Each count is an int >= 0 (`InvalidRequestError` naming the field otherwise).
    """

    input: int
    output: int

    def __init__(self, input: int, output: int) -> None:
        object.__setattr__(self, "input", validate_token_count(input, "usage.input"))
        object.__setattr__(self, "output", validate_token_count(output, "usage.output"))

    @property
    def total(self) -> int:
        """``input + output``."""
        return self.input + self.output


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
        # TokenInfo is frozen but a caller may have bypassed __init__; check the counts again.
        self.token_info.validate()
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


class _FieldState:
    """Copying and pickling of a frozen dataclass whose fields are slots: the state is the dict
    of its fields (what an instance with a ``__dict__`` pickles, so pickles made before the
    fields became slots load, and the other way round), set back past the frozen
    ``__setattr__``."""

    __slots__ = ()

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}  # type: ignore[attr-defined]

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)


# The two classes the store builds for every message keep their fields in slots, not in a
# per-instance dict: one allocation per instance instead of two, and the store sets each field
# through its slot's descriptor (`rust/py/messages.rs`). `__weakref__` keeps them weakly
# referenceable, as a dataclass with a dict is.
@dataclass(frozen=True)
class MessageAttributes(_FieldState):
    """What the store knows of one delivery of a message."""

    __slots__ = (
        "__weakref__",
        "enqueued_at",
        "first_received_at",
        "message_id",
        "receipt_handle",
        "receive_count",
    )

    message_id: str
    receipt_handle: str
    enqueued_at: datetime
    receive_count: int
    first_received_at: datetime | None


@dataclass(frozen=True)
class QueueMessage(_FieldState, Generic[T]):
    """A request as the store holds it: the request plus its delivery attributes."""

    # `_enqueued_at`: not a field; see `AttributesSlot` below.
    __slots__ = ("__weakref__", "_enqueued_at", "attributes", "id", "payload")

    id: str
    payload: LLMRequest[T]
    attributes: MessageAttributes


# `attributes` is read through its slot, except that a message from the in-memory store's batch
# enqueue gets its `MessageAttributes` built on first read (from its id and the batch's instant,
# left in `_enqueued_at`), then kept: the same object on every read, equal to an eager build.
QueueMessage.attributes = AttributesSlot(  # type: ignore[assignment,misc]
    QueueMessage.__dict__["attributes"], QueueMessage.__dict__["_enqueued_at"]
)
