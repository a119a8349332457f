"""Stubs of the compiled module ``llm_queue_dispatcher._core``."""

import logging
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar, final

from .provider_limits import ProviderLimits
from .scoring import MessageScore
from .types import LLMRequest, QueueMessage

_T = TypeVar("_T")
_R = TypeVar("_R")

__all__ = [
    "DEFAULT_MESSAGE_RETENTION",
    "DEFAULT_WEIGHTS",
    "FACTOR_NAMES",
    "MAX_PROVIDER_WAIT",
    "MAX_VISIBILITY_TIMEOUT",
    "AttributesSlot",
    "BucketMetrics",
    "BucketState",
    "Capacity",
    "CompensationMetrics",
    "ConsumptionRecord",
    "ConsumptionStatistics",
    "CoreReport",
    "DispatchCore",
    "InFlight",
    "LLMThrottle",
    "ManualClock",
    "MemoryMetrics",
    "Plan",
    "ProcessableMessage",
    "Purged",
    "RateLimitCheckResult",
    "RateLimitMetrics",
    "Ready",
    "StateSnapshot",
    "StoreCore",
    "TenantReport",
    "__version__",
]

__version__: str
#: The longest visibility timeout in seconds (12 hours, as in SQS).
MAX_VISIBILITY_TIMEOUT: float
#: The default message retention in seconds (4 days, as in SQS).
DEFAULT_MESSAGE_RETENTION: float
#: The six score factors, in the order weights are listed everywhere.
FACTOR_NAMES: list[str]
#: The default weights of the six factors, in FACTOR_NAMES order.
DEFAULT_WEIGHTS: list[float]
#: The longest wait a provider can impose on a limiter, in seconds (one day): longer penalties,
#: ``Retry-After`` values and resets are clamped to it.
MAX_PROVIDER_WAIT: float

_Reason = Literal[
    "rpm_limit", "tpm_limit", "itpm_limit", "otpm_limit", "rpd_limit", "tpd_limit", "concurrency_limit"
]

@final
class ManualClock:
    """A clock that only moves when told to; Rust code reads it without calling Python."""

    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def now(self) -> float:
        """The current reading in seconds."""
    def advance(self, seconds: float) -> float:
        """Moves the clock forward by ``seconds`` (finite, >= 0); returns the new reading. A move
        to a reading that is not finite raises `InvalidRequestError` and changes nothing."""
    def set(self, seconds: float) -> None:
        """Sets the clock to ``seconds``, which must not be earlier than the current reading."""
    def __call__(self) -> float:
        """The current reading: a ManualClock is also a plain callable clock."""

@final
class RateLimitCheckResult:
    """The answer of `LLMThrottle.can_process`."""

    @property
    def allowed(self) -> bool:
        """Whether the request would be admitted now."""
    @property
    def reason(self) -> _Reason | None:
        """The binding limit: the one with the longest wait (the first of rpm, tpm, itpm, otpm,
        rpd, tpd, concurrency on a tie; a penalty counts as rpm); None when allowed."""
    @property
    def available_in(self) -> float:
        """Exact seconds until admitted: 0 when allowed, ``inf`` when it can never fit. With
        every slot of ``max_concurrent`` held: until the oldest reservation is forgotten
        (``history_retention`` after it was made), sooner if one is settled or released."""
    @property
    def available_tokens(self) -> dict[str, float]:
        """``{"rpm": requests left, "tpm": tokens left}``, plus ``"itpm"``, ``"otpm"``,
        ``"rpd"``, ``"tpd"`` (what their buckets hold) and ``"concurrency"`` (slots free) where
        configured."""

@final
class BucketMetrics:
    """Use of one bucket; ``limit`` is its capacity, ``percentage`` the share used."""

    @property
    def used(self) -> float: ...
    @property
    def available(self) -> float: ...
    @property
    def limit(self) -> float: ...
    @property
    def percentage(self) -> float: ...
    def to_dict(self) -> dict[str, float]: ...

@final
class ConsumptionStatistics:
    """Figures of the consumption history (tokens are actual counts where adjusted)."""

    @property
    def count(self) -> int: ...
    @property
    def average_tokens_per_request(self) -> float: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def estimation_accuracy(self) -> float:
        """Mean of min(est, act) / max(est, act) over adjusted records; 1.0 without any."""
    def to_dict(self) -> dict[str, float]: ...

@final
class MemoryMetrics:
    """Size of the consumption history (200 bytes per record, as the seed library estimates)."""

    @property
    def history_records(self) -> int: ...
    @property
    def estimated_memory_usage(self) -> int: ...
    @property
    def max_history_records(self) -> int: ...
    def to_dict(self) -> dict[str, int]: ...

@final
class CompensationMetrics:
    """Tokens the next successful consume takes on top of its estimate."""

    @property
    def total_debt(self) -> float:
        """The token bucket's (tpm) debt."""
    @property
    def pending_compensation(self) -> float:
        """The same figure as ``total_debt``."""
    @property
    def debts(self) -> dict[str, float]:
        """The debt of each token limit: ``"tpm"``, and ``"itpm"``, ``"otpm"``, ``"tpd"`` where
        configured."""
    def to_dict(self) -> dict[str, Any]: ...

@final
class RateLimitMetrics:
    """Everything `LLMThrottle.get_metrics` reports."""

    @property
    def rpm(self) -> BucketMetrics: ...
    @property
    def tpm(self) -> BucketMetrics: ...
    @property
    def itpm(self) -> BucketMetrics | None:
        """Input tokens per minute; None when not limited."""
    @property
    def otpm(self) -> BucketMetrics | None:
        """Output tokens per minute; None when not limited."""
    @property
    def rpd(self) -> BucketMetrics | None:
        """Requests per day; None when not limited."""
    @property
    def tpd(self) -> BucketMetrics | None:
        """Tokens per day; None when not limited."""
    @property
    def concurrency(self) -> BucketMetrics | None:
        """Requests in flight (``used``) against ``max_concurrent`` (``limit``); None when not
        limited."""
    @property
    def efficiency(self) -> float:
        """Estimate accuracy over the last ``efficiency_window_size`` records (1.0 without
        records, 0.85 when none has an actual count yet)."""
    @property
    def consumption_history(self) -> ConsumptionStatistics: ...
    @property
    def memory(self) -> MemoryMetrics: ...
    @property
    def compensation(self) -> CompensationMetrics: ...
    def to_dict(self) -> dict[str, Any]:
        """The metrics as nested plain dicts (the optional limits only where configured)."""

@final
class ConsumptionRecord:
    """One successful `LLMThrottle.consume`."""

    @property
    def timestamp(self) -> float: ...
    @property
    def tokens(self) -> int:
        """The estimate, or the actual count once adjusted."""
    @property
    def request_id(self) -> str: ...
    @property
    def metadata(self) -> Any: ...
    @property
    def estimated_tokens(self) -> int: ...
    @property
    def actual_tokens(self) -> int | None:
        """The count of the last adjustment; None before one, and after an adjustment to 0 (a
        refund: a failed call is not an estimation miss)."""
    @property
    def compensation_debt(self) -> float:
        """Debt this consume took on top of its estimate."""
    @property
    def input_tokens(self) -> int | None:
        """The input tokens it counts for, when given: the estimate's, then the actual count's
        once adjusted with them (None after an adjustment without them)."""
    @property
    def output_tokens(self) -> int | None:
        """The output tokens it counts for, as ``input_tokens``."""

@final
class BucketState:
    """One bucket in a snapshot. Fields are ints or floats (else `InvalidRequestError`);
    `LLMThrottle.restore_from_snapshot` checks their range."""

    def __new__(cls, available: float, capacity: float, last_refill: float) -> BucketState: ...
    def __getnewargs__(self) -> tuple[float, float, float]:
        """Pickling and copying: the constructor's arguments."""
    @property
    def available(self) -> float: ...
    @property
    def capacity(self) -> float: ...
    @property
    def last_refill(self) -> float: ...

@final
class StateSnapshot:
    """The buckets and the compensation debts at one instant. Built from numbers, `BucketState`
    objects and an int count (else `InvalidRequestError`); the optional limits' buckets are
    given where the throttle has them, their debts in ``compensation_debts`` (``"itpm"``,
    ``"otpm"``, ``"tpd"``)."""

    def __new__(
        cls,
        timestamp: float,
        rpm_bucket_state: BucketState,
        tpm_bucket_state: BucketState,
        history_count: int,
        compensation_debt: float,
        *,
        itpm_bucket_state: BucketState | None = None,
        otpm_bucket_state: BucketState | None = None,
        rpd_bucket_state: BucketState | None = None,
        tpd_bucket_state: BucketState | None = None,
        compensation_debts: dict[str, float] | None = None,
    ) -> StateSnapshot: ...
    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Pickling and copying (a backup travels to another process): the constructor's
        arguments, positional and keyword."""
    @property
    def timestamp(self) -> float: ...
    @property
    def rpm_bucket_state(self) -> BucketState: ...
    @property
    def tpm_bucket_state(self) -> BucketState: ...
    @property
    def history_count(self) -> int: ...
    @property
    def compensation_debt(self) -> float: ...
    @property
    def itpm_bucket_state(self) -> BucketState | None: ...
    @property
    def otpm_bucket_state(self) -> BucketState | None: ...
    @property
    def rpd_bucket_state(self) -> BucketState | None: ...
    @property
    def tpd_bucket_state(self) -> BucketState | None: ...
    @property
    def compensation_debts(self) -> dict[str, float]: ...

@final
class LLMThrottle:
    """Token buckets for requests and tokens per minute, and optionally for the other limits
    providers publish, with burst, history and compensation.

    Every bucket starts full; the request bucket holds ``burst_rpm or rpm`` and refills at
    ``rpm / 60`` per second, the token bucket likewise with ``tpm``; ``itpm`` and ``otpm``
    (input and output tokens per minute, each with its burst) likewise; ``rpd`` and ``tpd``
    (per day) hold a day's limit and refill at ``rpd / 86400`` per second. ``max_concurrent``
    limits the reservations in flight: each holds a slot until it is adjusted (settled),
    released, or forgotten with its record after ``history_retention``. Thread-safe.

    Every argument is checked at construction (`InvalidConfigError` naming it): the numbers are
    ints or floats (not bools) a float can hold; each bucket holds at least one (``rpm`` or
    ``burst_rpm``, ``tpm`` or ``burst_tpm``, and so on, >= 1: a smaller bucket never admits a
    request); ``max_concurrent`` is an int >= 1; ``logger`` is None (the
    ``llm_queue_dispatcher`` logger) or a `logging.Logger`, the rule of every ``logger`` option
    of the package. The default ``adjustment_failure_strategy``, "compensate", keeps long-run
    use within the limits when estimates run low.

    A request's ``input_tokens`` and ``output_tokens`` (keyword arguments of `can_process`,
    `consume` and `adjust_consumption`) must add up to its total; given one, the other is the
    rest. Without them, ``itpm`` and ``otpm`` each count the whole total.
    """

    def __new__(
        cls,
        rpm: float,
        tpm: float,
        *,
        burst_rpm: float | None = None,
        burst_tpm: float | None = None,
        itpm: float | None = None,
        otpm: float | None = None,
        burst_itpm: float | None = None,
        burst_otpm: float | None = None,
        rpd: float | None = None,
        tpd: float | None = None,
        max_concurrent: int | None = None,
        clock: Any = None,
        adjustment_failure_strategy: Literal["strict", "warn", "compensate"] = "compensate",
        max_history_records: int = 10000,
        history_retention: float = 60.0,
        efficiency_window_size: int = 50,
        logger: logging.Logger | None = None,
    ) -> LLMThrottle: ...
    def can_process(
        self, estimated_tokens: int, *, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> RateLimitCheckResult:
        """Whether 1 request and ``estimated_tokens`` (plus any compensation debt) fit every
        limit now, and if not, exactly when."""
    def consume(
        self,
        request_id: str,
        estimated_tokens: int,
        metadata: Any = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> bool:
        """Takes 1 request from rpm (and rpd), ``estimated_tokens`` + debt from tpm (and tpd),
        the input part from itpm, the output part from otpm (each the whole estimate when the
        parts are not given) and a slot of ``max_concurrent``, all or nothing; False takes
        nothing. ``metadata`` (None or a mapping, else `InvalidRequestError`) is kept by
        reference in the consumption record."""
    def consume_or_raise(
        self,
        request_id: str,
        estimated_tokens: int,
        metadata: Any = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Like `consume`, raising `RateLimitError(reason, available_in)` when refused."""
    def adjust_consumption(
        self,
        request_id: str,
        actual_tokens: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Sets the latest consume of ``request_id`` to ``actual_tokens`` on every limit (its
        input and output parts on itpm and otpm): takes the extra (per the adjustment failure
        strategy when short; "strict" refuses if any limit is short) or refunds the difference,
        and frees its slot of ``max_concurrent``. Without the parts, itpm counts the whole
        actual count and otpm the whole of it up to the output reserved. 0 is a refund (a
        failed call): it records no actual count, so it is not an estimation miss."""
    def release(self, request_id: str) -> None:
        """Gives the latest reservation of ``request_id`` back whole (its tokens, its requests,
        its slot, the debt it paid); it no longer counts. `UnknownRequestError` when there is
        none."""
    def settle(self, request_id: str) -> None:
        """Ends the time in flight of the latest reservation of ``request_id``: frees its slot of
        ``max_concurrent`` and keeps its tokens as counted (a call that ended without a count to
        adjust to; an adjustment settles too). `UnknownRequestError` when there is none."""
    def penalize(self, seconds: float) -> None:
        """Grants nothing for ``seconds`` from now (a provider's 429 with ``Retry-After``). More
        than `MAX_PROVIDER_WAIT` (infinity included) is clamped to it and logged once per
        limiter; NaN or a negative wait raises `InvalidRequestError`."""
    def sync_from_headers(self, headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> ProviderLimits:
        """Lowers the buckets (requests, tokens, and input and output tokens where limited) to
        what the provider's rate-limit headers say remains, and applies ``retry-after`` as a
        penalty; returns what was read. From there each bucket refills at its own rate, never
        above its own capacity: a reset (when the provider's bucket is full again) holds nothing
        down. Resets and ``retry-after`` beyond
        `MAX_PROVIDER_WAIT` are clamped to it (logged once per limiter)."""
    def apply_provider_limits(self, limits: ProviderLimits) -> None:
        """`sync_from_headers` for figures already read."""
    def get_metrics(self) -> RateLimitMetrics:
        """Bucket use, efficiency, history statistics, memory and compensation."""
    def get_consumption_history(self) -> list[ConsumptionRecord]:
        """The records kept (within ``history_retention`` and ``max_history_records``), oldest first."""
    def reset(self) -> None:
        """Full buckets, no history, no debt, no request in flight."""
    def validate_state(self) -> bool:
        """Whether buckets, debts, slots and history are consistent."""
    def create_snapshot(self) -> StateSnapshot:
        """The buckets and the debts now."""
    def restore_from_snapshot(self, snapshot: StateSnapshot) -> None:
        """Restores buckets and debts (validated first, against this throttle's limits; the
        history is cleared, and the slots it held are free)."""
    @property
    def token_capacity(self) -> float:
        """The largest estimate that can ever fit without its parts: the smallest capacity of
        the token limits (``burst_tpm or tpm``, and itpm, otpm, tpd where set, since each counts
        the whole estimate then)."""
    @property
    def clock(self) -> Any:
        """The clock given at construction; None for the system monotonic clock."""

@final
class AttributesSlot:
    """The ``attributes`` field of ``QueueMessage``: its slot, read, set and deleted through the
    slot's member descriptor; a message a batch enqueue left without its ``MessageAttributes``
    gets them built on first read (from its id and ``_enqueued_at``) and kept."""

    def __new__(cls, slot: Any, enqueued_at: Any) -> AttributesSlot: ...
    def __get__(self, instance: Any, owner: Any = None, /) -> Any: ...
    def __set__(self, instance: Any, value: Any, /) -> None: ...
    def __delete__(self, instance: Any, /) -> None: ...

@final
class StoreCore:
    """The in-memory store's Rust core: SQS semantics over ``LLMRequest`` objects kept by reference.

    Every method reads the clock once, first releases messages whose visibility ran out (moving
    those received ``max_receive_count`` times to ``dead_letter``, or dropping them, and dropping
    messages older than ``message_retention``), then does its work. ``InMemoryStorage`` wraps it.
    """

    def __new__(
        cls,
        *,
        clock: Any = None,
        max_receive_count: int | None = None,
        dead_letter: StoreCore | None = None,
        message_retention: float = 345600.0,
    ) -> StoreCore: ...
    def enqueue(self, request: LLMRequest[Any]) -> QueueMessage[Any]:
        """Validates and enqueues one request; its ``receipt_handle`` is "" until received."""
    def enqueue_batch(self, requests: Iterable[LLMRequest[Any]]) -> list[QueueMessage[Any]]:
        """Validates the whole batch (fields, duplicates), then enqueues it; all or nothing."""
    def dequeue(self, limit: int, visibility_timeout: float) -> list[QueueMessage[Any]]:
        """Receives up to ``limit`` visible messages, priority then oldest first."""
    def delete(self, handle: str) -> None:
        """Deletes the message a current receipt handle names; ``ReceiptHandleError`` otherwise."""
    def withdraw(self, request_id: str) -> bool:
        """Removes the visible message of ``request_id`` unprocessed (its submitter withdrew
        it); False, changing nothing, when no message of that id is visible."""
    def dead_letter_now(self, handle: str) -> None:
        """Dead-letters the message a current receipt handle names, at once (counted)."""
    def release(self, handle: str) -> None:
        """Gives a received message back unprocessed, as if that receive had not happened:
        visible at once, its receive count and first receive as before; the handle is stale."""
    def release_batch(self, handles: Iterable[str]) -> list[str]:
        """Releases every current handle's message; returns the stale or unknown handles."""
    def change_visibility(self, handle: str, visibility_timeout: float) -> None:
        """Makes the message invisible for ``visibility_timeout`` seconds from now (0: visible)."""
    def peek(self, priority: int, limit: int) -> list[QueueMessage[Any]]:
        """Up to ``limit`` visible messages of ``priority``, oldest first, not received."""
    def set_ended_listener(self, listener: Callable[[list[str], list[str]], object] | None) -> None:
        """Sets (or with None removes) what is told, once the locks are released, the ids of the
        requests the store itself ended: ``listener(dead_lettered_ids, expired_ids)``."""
    def purge(self) -> None:
        """Removes every message; every receipt handle becomes invalid."""
    def attributes(self) -> dict[str, Any]:
        """The fields of ``QueueAttributes``, plus ``expired`` (dropped by retention)."""
    def visible_count(self) -> int:
        """Visible messages."""
    def in_flight_count(self) -> int:
        """Received messages whose visibility has not run out."""
    def next_visibility_change(self) -> float | None:
        """Clock reading at which the next in-flight message's visibility ends."""
    def counts_by_priority(self) -> list[int]:
        """Visible messages per priority, URGENT first."""
    def oldest_enqueued_at(self) -> float | None:
        """Clock reading at which the oldest visible message was enqueued."""
    def now(self) -> float:
        """The current reading of this store's clock in seconds."""
    @property
    def clock(self) -> Any:
        """The clock given at construction (None for the wall clock)."""
    @property
    def max_receive_count(self) -> int | None: ...
    @property
    def message_retention(self) -> float: ...
    @property
    def dead_letter(self) -> StoreCore | None: ...
    def _check_invariants(self) -> None:
        """Checks the structural invariants by a full scan; raises AssertionError."""

@final
class Ready(Generic[_R]):
    """An awaitable whose outcome is known already: awaiting it returns its value or raises its
    error without suspending (what a mark needing no I/O returns)."""

    def __await__(self) -> Generator[Any, None, _R]: ...
    def __iter__(self) -> Ready[_R]: ...
    def __next__(self) -> Any: ...
    def send(self, value: Any) -> None: ...
    def throw(self, error: BaseException, *rest: Any) -> None: ...
    def close(self) -> None: ...

@final
class ProcessableMessage(Generic[_T]):
    """A message handed out by ``LLMQueueDispatcher.dequeue``, to be marked exactly once.

    ``async with job:`` marks it processed on a normal exit and failed on an exception (which
    propagates). A mark needing no I/O (the in-memory store with an ``LLMThrottle``) is done when
    called and returns an awaitable that is complete already; errors are raised on await.
    """

    @property
    def message(self) -> QueueMessage[_T]:
        """The message handed out."""
    @property
    def score(self) -> MessageScore:
        """Its score: the total and the weighted parts."""
    @property
    def reason(self) -> str:
        """Why this message won: its policy's explanation, or its total and top factors."""
    @property
    def dispatched_at(self) -> float:
        """When it was handed out (the dispatcher's clock)."""
    @property
    def settled(self) -> bool:
        """Whether it was marked (processed, failed, dead-lettered or released)."""
    @property
    def _key(self) -> str | None: ...
    @property
    def _needed(self) -> int: ...
    @property
    def _delivery(self) -> int: ...
    @property
    def _tokens(self) -> int: ...
    @property
    def _lease_end(self) -> float: ...
    def mark_as_processed(
        self,
        actual_tokens: int | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> Awaitable[None]:
        """Deletes the message; with a reservation, adjusts the limiter to ``actual_tokens``,
        each limit to its share when ``input_tokens`` and ``output_tokens`` are given (the
        total is their sum when only they are given); with no count the reservation is settled
        as it is. Bad counts raise ``InvalidRequestError`` and mark nothing. A stale receipt
        handle settles the delivery and raises ``ReceiptHandleError``."""
    def mark_as_failed(self, error: BaseException, *, retry_after: float | None = None) -> Awaitable[None]:
        """Makes the message visible again after ``retry_after`` s (default at once) and refunds
        its reserved tokens; ``retry_after`` outside [0, 43200] raises ``InvalidRequestError``
        and changes nothing."""
    def mark_as_dead_lettered(self, error: BaseException) -> Awaitable[None]:
        """Moves the message to the store's dead-letter target at once and refunds its tokens."""
    def release(self) -> Awaitable[None]:
        """Gives the message back unprocessed: visible at once, its receive undone, its whole
        reservation (tokens and request) released."""
    def update_visibility(self, seconds: float) -> Awaitable[None]:
        """Keeps the message leased for ``seconds`` more, counted from now."""
    def _abandon(self) -> None: ...
    def __aenter__(self) -> Awaitable[ProcessableMessage[_T]]: ...
    def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Awaitable[None]: ...
    def __class_getitem__(cls, item: Any) -> Any: ...

@final
class Plan:
    """The I/O a mark asks Python to await: the store call, then the limiter call."""

    @property
    def delivery(self) -> int: ...
    @property
    def store(self) -> Literal["delete", "visibility", "dead_letter", "release"] | None: ...
    @property
    def seconds(self) -> float: ...
    @property
    def message(self) -> QueueMessage[Any]: ...
    @property
    def limiter(self) -> Any: ...
    @property
    def limiter_call(self) -> Literal["adjust", "release", "settle"] | None: ...
    @property
    def tokens(self) -> int: ...
    @property
    def parts(self) -> tuple[int, int] | None: ...
    @property
    def key(self) -> str: ...
    @property
    def stale(self) -> bool: ...
    @property
    def request_id(self) -> str: ...
    @property
    def log(self) -> tuple[str, str, Any] | None: ...

@final
class CoreReport:
    """The figures of a dispatcher's metrics report."""

    @property
    def now(self) -> float: ...
    @property
    def counts_by_priority(self) -> list[int]: ...
    @property
    def oldest_enqueued_at(self) -> float | None: ...
    @property
    def oldest_by_priority(self) -> list[float | None]: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def buffered(self) -> int: ...
    @property
    def average_wait(self) -> float: ...
    @property
    def wait_p50(self) -> float: ...
    @property
    def wait_p95(self) -> float: ...
    @property
    def wait_p99(self) -> float: ...
    @property
    def messages_per_minute(self) -> float: ...
    @property
    def tokens_per_minute(self) -> float: ...
    @property
    def latency_p50(self) -> float: ...
    @property
    def latency_p99(self) -> float: ...
    @property
    def failed(self) -> int: ...
    @property
    def expired_deadlines(self) -> int: ...
    @property
    def unfittable(self) -> int: ...
    @property
    def slo_targets(self) -> list[float]: ...
    @property
    def slo_dispatched(self) -> list[int]: ...
    @property
    def slo_met(self) -> list[int]: ...
    @property
    def binding_limit(self) -> str | None: ...
    @property
    def waited_by_limit(self) -> list[tuple[str, int]]: ...

@final
class InFlight:
    """One delivery in flight: the fields of ``InFlightDetail`` but its age."""

    @property
    def request_id(self) -> str: ...
    @property
    def message_id(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def estimated_tokens(self) -> int: ...
    @property
    def score(self) -> float: ...
    @property
    def started_at(self) -> float: ...

@final
class TenantReport:
    """One tenant's line of the metrics report."""

    @property
    def name(self) -> str: ...
    @property
    def visible(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def tokens_in_window(self) -> float: ...
    @property
    def tokens_served(self) -> int: ...
    @property
    def wait_p50(self) -> float: ...
    @property
    def wait_p95(self) -> float: ...
    @property
    def wait_p99(self) -> float: ...

@final
class Capacity:
    """The most tokens a limiter can ever grant one request."""

    @property
    def whole(self) -> float:
        """The smallest capacity of the limits counting the whole estimate (``tpm``, ``tpd``)."""
    @property
    def input(self) -> float:
        """The input limit's capacity (``itpm``; ``inf`` without one)."""
    @property
    def output(self) -> float:
        """The output limit's capacity (``otpm``; ``inf`` without one)."""

@final
class Purged:
    """A delivery handed out when a purge began, to delete by its receipt handle."""

    @property
    def delivery(self) -> int: ...
    @property
    def handle(self) -> str: ...

@final
class DispatchCore:
    """One dispatcher's selection, delivery books and metrics: what its Python layer asks and
    tells. ``pool`` is an in-memory store's core, or None for a prefetch buffer of its own."""

    def __new__(
        cls,
        pool: StoreCore | None,
        *,
        clock: Any,
        weights: Sequence[float],
        custom_weights: Sequence[float],
        custom_names: Sequence[str],
        max_candidates: int,
        policy: str,
        tenant_weights: Sequence[tuple[str, float]],
        fairness_window: float,
        urgent_first: bool,
        max_wait: Sequence[float],
        reserve_tokens: float | None,
        visibility_timeout: float,
        min_score: float,
        reserve: bool,
        hold: bool,
        metrics_retention: float,
        runner: Any,
        logger: logging.Logger,
        score_urgent_first: bool = False,
        urgent_reserve: float | None = None,
        slo_targets: Sequence[float] = ...,
    ) -> DispatchCore: ...
    def dispatch(
        self, throttle: LLMThrottle, custom_fn: Callable[[QueueMessage[Any]], list[Any]] | None = None
    ) -> ProcessableMessage[Any] | float | None:
        """Select, reserve and take with an ``LLMThrottle``: the job, the seconds until a held
        winner fits, or None."""
    def limiter_refused(self, reason: str) -> None:
        """Records, for the metrics, that another limiter refused a waiting message with
        ``reason`` (e.g. ``"tpm_limit"``)."""
    def choose(
        self,
        limiter: Any,
        metrics: Any,
        custom_fn: Callable[[QueueMessage[Any]], list[Any]] | None = None,
    ) -> ProcessableMessage[Any] | int | None:
        """Select and take under the budget another limiter reported (``metrics``, its
        ``get_metrics()``): the job (its reservation is the caller's), the tokens a held winner
        needs, or None. A number of ``metrics`` that is not one (or NaN) is an
        `InvalidRequestError` naming the limiter; nothing is taken."""
    def settle(
        self,
        job: ProcessableMessage[Any],
        kind: str,
        tokens: int | None = None,
        delay: float = 0.0,
        error: BaseException | None = None,
        parts: tuple[int, int] | None = None,
    ) -> Plan | None:
        """Settles a job; what needs an await comes back as a ``Plan``."""
    def hand_out(self, job: ProcessableMessage[Any]) -> bool:
        """Hands out a job taken and reserved; False when a purge removed its message."""
    def open_winner(
        self,
        message: QueueMessage[Any],
        lease_seconds: float,
        limiter: Any,
        token_capacity: float,
        request_capacity: float,
    ) -> tuple[ProcessableMessage[Any] | int | None, bool]:
        """A global winner put in the buffer, taken and handed out in one call: what was taken,
        and whether it was this message, handed out."""
    def revoke(
        self, job: ProcessableMessage[Any], restore: bool = True, reserved: bool = True
    ) -> Plan | None:
        """Takes back a job not handed out; another limiter's release comes back as a ``Plan``."""
    def store_replied(self, delivery: int, reply: Literal["landed", "stale", "failed"]) -> bool:
        """A plan's store reply; whether the mark must raise ``ReceiptHandleError``."""
    def finish(self, plan: Plan, stale: bool) -> None:
        """Ends a settling delivery once its plan is done; logs the mark; ``stale``: raises
        ``ReceiptHandleError``."""
    def buffer_insert(self, messages: Iterable[QueueMessage[Any]], lease_end: float) -> list[str]:
        """Adds messages leased until ``lease_end``; the handles of copies not kept."""
    def buffer_due(self, every: bool, renewing: set[str]) -> list[str]:
        """Handles of buffered leases half used or more (``every``: all), but ``renewing``."""
    def buffer_renewed(self, handle: str, started: float) -> None:
        """A buffered lease renewed at ``started``: it ends a visibility timeout later."""
    def buffer_next_due(self) -> float | None:
        """Seconds until the next buffered lease is due for renewal."""
    def now(self) -> float:
        """The core clock's reading."""
    def buffer_drain(self) -> list[QueueMessage[Any]]:
        """Removes and returns every buffered message."""
    def buffer_handles(self) -> list[str]:
        """Receipt handles of the buffered messages."""
    def buffer_discard(self, handle: str) -> QueueMessage[Any] | None:
        """Removes the buffered message with this handle."""
    def buffer_take_expired(self) -> list[QueueMessage[Any]]:
        """Removes buffered messages whose deadline has passed."""
    @property
    def buffered(self) -> int: ...
    @property
    def version(self) -> int:
        """Bumped by every change a waiting dequeue should look at."""
    def bump(self) -> None:
        """Records a change made outside the core."""
    @property
    def waiting(self) -> int: ...
    @waiting.setter
    def waiting(self, waiting: int) -> None: ...
    def next_visibility_change(self) -> float | None: ...
    def min_visible_tokens(self) -> int | None: ...
    def time_until_score(self, available_tokens: float) -> float | None: ...
    def ids_above(self, capacity: float) -> list[str]: ...
    def unfittable(self, capacity: Capacity) -> list[str]:
        """Requests the limiter can never grant not reported before, each logged once: an
        estimate above ``capacity.whole``, an input part above ``capacity.input``, an output
        part above ``capacity.output`` (without parts, the estimate against all three)."""
    @staticmethod
    def capacity(limiter: Any, metrics: Any) -> Capacity:
        """From ``limiter``'s ``get_metrics()`` (``metrics``), the most tokens it can ever grant
        one request; a limit that is not a number is an `InvalidRequestError` naming it."""
    def refusal_wait(self, limiter: Any, check: Any) -> float:
        """The seconds ``limiter``'s `can_process` answer ``check`` says a waiting dequeue should
        wait (``inf``: never; 0.05 for another limiter refusing without saying when), noting the
        limit another limiter named refusing; an ``available_in`` that is not a number is an
        `InvalidRequestError` naming the limiter."""
    def until_ready(
        self,
        limiter: Any,
        metrics: Any,
        held: float | None,
        smallest_wait: float | None,
        refill: float | None,
        seen: int,
    ) -> float:
        """Seconds until a dequeue that found nothing (from change version ``seen``) could hand
        something out, with the tokens ``limiter`` reported available in ``metrics``; kept for
        `time_until_ready`."""
    def time_until_ready(self) -> float:
        """What the last `until_ready` worked out, less the time since; 0 after any change."""
    def take_above(self, capacity: Capacity) -> list[QueueMessage[Any]]: ...
    def drop_expired(self) -> list[str]:
        """Dead-letters the in-memory store's requests past their deadline; their ids, logged
        and counted."""
    def count_expired(self, ids: list[str]) -> list[str]:
        """Logs and counts requests removed unsent past their deadline; returns ``ids``."""
    def purge_store(self) -> None: ...
    def begin_purge(self) -> tuple[int, list[Purged]]: ...
    def purge_deleted(self, delivery: int) -> None: ...
    def end_purge(self, purge: int, ok: bool) -> None: ...
    @property
    def active(self) -> int:
        """Deliveries handed out and not settled (purged ones excepted)."""
    def report(self) -> CoreReport: ...
    def in_flight(self) -> list[InFlight]: ...
    def tenants(self) -> list[TenantReport]: ...
    @property
    def _samples_held(self) -> int: ...
