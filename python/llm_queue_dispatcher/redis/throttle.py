"""`RedisThrottle`: one budget shared by every process and host that names it.

One file past 700 lines: one class, whose methods each send one script and read its reply the
same way (its arguments, the settings it sends, its errors); the limiter itself is in Lua.

The semantics are `LLMThrottle`'s (a request bucket and a token bucket, both refilled
continuously up to their burst, and where configured the input and output token buckets
(``itpm``, ``otpm``), the daily buckets (``rpd``, ``tpd``) and a limit of requests in flight
(``max_concurrent``); all-or-nothing grants; an exact ``available_in``, infinite past the
capacity; ``adjust_consumption`` with the strict, warn and compensate strategies and a
compensation debt per token bucket), plus ``release``, ``penalize`` and ``sync_from_headers``.
Each method is one Lua script (``lua/limiter_common.lua`` + the method's file) run atomically on
the server, on the server's clock: a client whose clock is minutes off changes nothing.

It fails closed: when Redis cannot be reached, every method raises `LimiterUnavailableError` (a
`StorageError`) and nothing is granted. Falling back to a per-process budget would let N
processes overshoot the provider's limit N times. A ``consume`` whose reply never came (a
timeout while Redis was paused or slow) may still have run, or run later when Redis resumes: the
limiter keeps that call's reply key, and its next call that reaches Redis first settles it
(``lua/limiter_settle_lost.lua``): a grant that landed is given back whole, and a call that has not
run yet is answered in advance so that it grants nothing. The books hold as if it had never been
made.

A provider's delay (``penalize(seconds)``, ``Retry-After``, a reset) counts at most
`MAX_PROVIDER_WAIT` (one day): a larger one is logged once per limiter and cut to it, so no
header can hold every process's budget shut for longer, and no wait, however far (a reset in the
year 9999, a drained bucket refilling a token a minute), makes a script loop: each answers at
once with a finite wait or ``inf``. A call resent because its reply was lost (redis-py resends
on a broken connection) is applied once: a grant is charged once, a release gives back once.

Keys, under the namespace's hash tag: ``{ns}:l:{name}:state`` (hash: bucket levels, debts,
penalty, history totals), ``{ns}:l:{name}:grants`` (hash: grant number ->
record), ``{ns}:l:{name}:grant-order`` (list: grant numbers, oldest first),
``{ns}:l:{name}:latest`` (hash: request id -> its latest grant that counts),
``{ns}:l:{name}:held`` (sorted set: the grants holding a slot of ``max_concurrent``) and, for a
minute after each call that changed something, ``{ns}:l:{name}:reply:<token>`` (its reply, for a
resend).

About 810 lines for one class: the client of the limiter's scripts (grants, settling,
provider headers, metrics) with its connection handling; the scripts are in ``lua/``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, NoReturn

import redis.asyncio

from .._checks import finite_float, integer, real_number, shown
from ..errors import (
    InvalidConfigError,
    InvalidRequestError,
    LimiterUnavailableError,
    RateLimitError,
    UnknownRequestError,
)
from ..provider_limits import ProviderLimits, parse_rate_limit_headers
from ..throttle import MAX_PROVIDER_WAIT
from ..types import split_token_parts, validate_request_id, validate_token_count
from ._connection import (
    CLIENT_ERRORS,
    ClockOffset,
    Connection,
    ScriptClient,
    check_name,
    host_microseconds,
    script,
)

__all__ = [
    "MAX_PROVIDER_WAIT",
    "BucketUsage",
    "CompensationUsage",
    "HistoryUsage",
    "RateLimitCheck",
    "RedisThrottle",
    "SharedRateLimitMetrics",
]

_LOGGER = logging.getLogger("llm_queue_dispatcher")
_STRATEGIES = ("strict", "warn", "compensate")
#: What a refusal names: the binding limit.
LimitReason = Literal[
    "rpm_limit", "tpm_limit", "itpm_limit", "otpm_limit", "rpd_limit", "tpd_limit", "concurrency_limit"
]
_REASONS: tuple[LimitReason, ...] = (
    "rpm_limit",
    "tpm_limit",
    "itpm_limit",
    "otpm_limit",
    "rpd_limit",
    "tpd_limit",
    "concurrency_limit",
)

#: The longest delay, in seconds, a provider can impose on a `RedisThrottle`: one day. A
#: ``penalize(seconds)``, ``Retry-After`` or rate-limit reset beyond it counts as one day (logged
#: once per limiter). The scripts apply the same bound to whatever reaches them.


@dataclass(frozen=True)
class RateLimitCheck:
    """The answer of `RedisThrottle.can_process`, with `RateLimitCheckResult`'s attributes."""

    allowed: bool
    reason: LimitReason | None
    available_in: float
    available_tokens: Mapping[str, float]


@dataclass(frozen=True)
class BucketUsage:
    """One bucket: ``used`` (capacity minus available), ``available``, ``limit`` (its capacity)
    and ``percentage`` used."""

    used: float
    available: float
    limit: float
    percentage: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class HistoryUsage:
    """The grants kept (those younger than ``history_retention``)."""

    count: int
    average_tokens_per_request: float
    total_tokens: int
    estimation_accuracy: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class CompensationUsage:
    """The compensation debt the next grant takes on top of its estimate: the token bucket's
    (``total_debt``, ``pending_compensation``), and that of each token bucket (``debts``:
    ``"tpm"``, and ``"itpm"``, ``"otpm"``, ``"tpd"`` where configured)."""

    total_debt: float
    pending_compensation: float
    debts: Mapping[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "debts": dict(self.debts)}


_OPTIONAL_BUCKETS = ("itpm", "otpm", "rpd", "tpd", "concurrency")


@dataclass(frozen=True)
class SharedRateLimitMetrics:
    """`RedisThrottle.get_metrics`: the shape of `RateLimitMetrics` (``.rpm``, ``.tpm``, the
    optional ``.itpm``, ``.otpm``, ``.rpd``, ``.tpd`` and ``.concurrency``, None where not
    configured, ``.efficiency``, ``.consumption_history``, ``.compensation``) plus
    ``penalty_remaining`` (seconds). ``efficiency`` is the estimation accuracy over the kept
    grants (1.0 when none was adjusted yet)."""

    rpm: BucketUsage
    tpm: BucketUsage
    efficiency: float
    consumption_history: HistoryUsage
    compensation: CompensationUsage
    penalty_remaining: float
    itpm: BucketUsage | None = None
    otpm: BucketUsage | None = None
    rpd: BucketUsage | None = None
    tpd: BucketUsage | None = None
    concurrency: BucketUsage | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics as nested plain dicts (the optional limits only where configured)."""
        out = asdict(self)
        for name in _OPTIONAL_BUCKETS:
            if out[name] is None:
                del out[name]
        out["compensation"] = self.compensation.to_dict()
        return out


# Consume calls whose reply was lost, kept for settling: at most this many (a reply is kept a
# minute on the server; this many lost replies in a minute means Redis is down, not paused) and
# this many settled per call (the keys of one script call).
_MAX_UNSETTLED = 1024
_SETTLE_BATCH = 64
# The calls that change the books besides consume: a lost reply leaves their outcome unknown.
_BOOK_CHANGES = ("limiter_adjust", "limiter_release", "limiter_penalize", "limiter_sync", "limiter_reset")


def _usage(available: float, limit: float) -> BucketUsage:
    used = limit - available
    return BucketUsage(used=used, available=available, limit=limit, percentage=used / limit * 100.0)


def _positive(value: object, name: str) -> float:
    number = finite_float(value)
    if number is None or not number > 0:
        raise InvalidConfigError(f"{name} must be a finite number > 0, got {shown(value)}")
    return number


def _rate(value: object, name: str, unit: str) -> float:
    number = finite_float(value)
    if number is None or not number >= 1:
        raise InvalidConfigError(
            f"{name} must be a finite number >= 1 (a bucket that cannot hold one {unit} never admits "
            f"a request), got {shown(value)}"
        )
    return number


def _burst(value: object, name: str, rate: float | None, rate_name: str) -> float | None:
    """A bucket's capacity: None (the rate), or a finite number >= the rate (which is >= 1)."""
    if value is None:
        return None
    if rate is None:
        raise InvalidConfigError(
            f"{name} is the capacity of the {rate_name} bucket and needs {rate_name}; got "
            f"{name}={shown(value)} without {rate_name}"
        )
    number = finite_float(value)
    if number is None or not number >= rate:
        raise InvalidConfigError(f"{name} must be a finite number >= the rate ({rate}), got {shown(value)}")
    return number


def _optional_rate(value: object, name: str, unit: str) -> float | None:
    return None if value is None else _rate(value, name, unit)


# The largest count LLMThrottle's core holds (a u64): the same bound for the same options here.
_MAX_COUNT = 2**64 - 1


def _concurrency(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_COUNT:
        raise InvalidConfigError(
            f"max_concurrent must be None or an int from 1 to {_MAX_COUNT} (with no request in flight "
            f"allowed, none is ever admitted), got {shown(value)}"
        )
    return value


def _parts(total: int, input_tokens: object, output_tokens: object, total_name: str) -> tuple[str, str]:
    """The input and output parts of a call as script arguments ('' each when not given): counts
    that add up to ``total``, or one of them and the rest (`split_token_parts`)."""
    given = [
        None if value is None else validate_token_count(value, name)
        for name, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens))
    ]
    parts = split_token_parts(total, given[0], given[1], (total_name, "input_tokens", "output_tokens"))
    return ("", "") if parts is None else (str(_saturated(parts[0])), str(_saturated(parts[1])))


def _saturated(count: int) -> int:
    """A token count as the scripts take it: beyond 64 bits, the largest 64-bit count, as
    `LLMThrottle` reads one (no budget ever fits it). Lua's doubles would hold a larger one as
    ``inf``, which no later reply could give back as a count."""
    return min(count, _MAX_COUNT)


def _reason(name: str) -> LimitReason:
    """The reason a script named (a name of `_REASONS`)."""
    return next((reason for reason in _REASONS if reason == name), "tpm_limit")


def _request_id(request_id: object) -> bytes:
    return validate_request_id(request_id, "request_id").encode("utf-8")


def _check_metadata(metadata: object) -> None:
    """A consume's ``metadata``: None or a mapping, as for `LLMThrottle` (not stored here)."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidRequestError(f"metadata must be None or a mapping, got {shown(metadata)}")


# Microseconds past 2**53 (about 285 years; Lua's doubles hold no finer instant there) are
# forever: a history_retention of 1e308 s keeps grants as long as the record limit allows.
_FOREVER_US = 2**53


def _microseconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    microseconds = seconds * 1_000_000  # compared before rounding: round(inf) raises
    return str(_FOREVER_US if microseconds > _FOREVER_US else round(microseconds))


def _figure(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisThrottle(ScriptClient):
    """A token-bucket limiter in Redis, shared by every process that uses the same name.

    Args:
        redis: a `redis.asyncio.Redis` client (used as given), or a URL (a client with bounded
            timeouts is built, owned and closed by `aclose`).
        name: the limiter's name, ``[A-Za-z0-9_.-]{1,80}``; processes naming the same one share
            one budget.
        rpm, tpm: requests and tokens per minute (the refill rates), each at least 1: a bucket
            that cannot hold one request (or one token) would never admit anything.
        burst_rpm, burst_tpm: bucket capacities (default: the rates), at least the rates.
        itpm, otpm: input and output tokens per minute (as Anthropic limits them), each at least
            1; ``burst_itpm`` and ``burst_otpm`` their capacities. Without a request's parts
            (``input_tokens``, ``output_tokens``) each counts its whole estimate.
        rpd, tpd: requests and tokens per day (capacity and a day's refill), each at least 1.
        max_concurrent: requests in flight: a grant holds a slot until it is adjusted (settled),
            released, or forgotten after ``history_retention``.
        namespace: key prefix and hash tag.
        adjustment_failure_strategy: "compensate" (default), "strict" or "warn", as in `LLMThrottle`.
        history_retention: seconds a grant is kept for ``adjust_consumption`` and ``release``
            (finite, > 0; past 2**53 microseconds, about 285 years, is as long as
            ``max_history_records`` allows).
        max_history_records: the most grants kept.
        logger: where "warn" and "compensate" adjustments are logged.

    Every method is a coroutine; ``can_process`` returns a `RateLimitCheck`, ``get_metrics`` a
    `SharedRateLimitMetrics`. Processes sharing a name should pass the same settings: each call
    applies the caller's. Redis unreachable: `LimiterUnavailableError`, nothing granted (a
    consume that runs anyway, once a paused Redis resumes, is given back by the next call).

    Example::

        limiter = RedisThrottle("redis://localhost:6379/0", "openai-gpt-4o", rpm=500, tpm=200_000)
        if await limiter.consume("req-1", 1_200):
            ...  # call the provider, then:
            await limiter.adjust_consumption("req-1", 950)
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis | str,
        name: str,
        *,
        rpm: float,
        tpm: float,
        burst_rpm: float | None = None,
        burst_tpm: float | None = None,
        itpm: float | None = None,
        otpm: float | None = None,
        burst_itpm: float | None = None,
        burst_otpm: float | None = None,
        rpd: float | None = None,
        tpd: float | None = None,
        max_concurrent: int | None = None,
        namespace: str = "lqd",
        adjustment_failure_strategy: Literal["strict", "warn", "compensate"] = "compensate",
        history_retention: float = 60.0,
        max_history_records: int = 10_000,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = check_name(name, "name")
        self.namespace = check_name(namespace, "namespace")
        self.rpm = _rate(rpm, "rpm", "request")
        self.tpm = _rate(tpm, "tpm", "token")
        for option, burst, rate in (("burst_rpm", burst_rpm, self.rpm), ("burst_tpm", burst_tpm, self.tpm)):
            # At least the rate, which is at least 1: every bucket holds one request or token.
            if burst is not None and not ((number := finite_float(burst)) is not None and number >= rate):
                raise InvalidConfigError(
                    f"{option} must be a finite number >= the rate ({rate}), got {shown(burst)}"
                )
        self.burst_rpm = None if burst_rpm is None else float(burst_rpm)
        self.burst_tpm = None if burst_tpm is None else float(burst_tpm)
        self.itpm = _optional_rate(itpm, "itpm", "input token")
        self.otpm = _optional_rate(otpm, "otpm", "output token")
        self.burst_itpm = _burst(burst_itpm, "burst_itpm", self.itpm, "itpm")
        self.burst_otpm = _burst(burst_otpm, "burst_otpm", self.otpm, "otpm")
        self.rpd = _optional_rate(rpd, "rpd", "request")
        self.tpd = _optional_rate(tpd, "tpd", "token")
        self.max_concurrent = _concurrency(max_concurrent)
        if adjustment_failure_strategy not in _STRATEGIES:
            raise InvalidConfigError(
                "adjustment_failure_strategy must be 'strict', 'warn' or 'compensate', "
                f"got {adjustment_failure_strategy!r}"
            )
        self.adjustment_failure_strategy = adjustment_failure_strategy
        self.history_retention = _positive(history_retention, "history_retention")
        records = integer(max_history_records)  # an int or an integer-like (numpy's), not a bool
        if records is None or not 1 <= records <= _MAX_COUNT:
            raise InvalidConfigError(
                f"max_history_records must be an int from 1 to {_MAX_COUNT}, got {shown(max_history_records)}"
            )
        self.max_history_records = records
        if logger is not None and not isinstance(logger, logging.Logger):
            raise InvalidConfigError(f"logger must be a logging.Logger or None, got {shown(logger)}")
        self._logger = logger or _LOGGER
        self._connection = Connection(redis)
        self._prefix = f"{{{namespace}}}:l:{name}:"
        self._keys = [
            (self._prefix + part).encode() for part in ("state", "grants", "grant-order", "latest", "held")
        ]
        self._clock_offset = ClockOffset()
        self._delay_logged = False
        # Reply keys of consume calls whose reply never came, oldest first (`_settle_lost_grants`).
        self._unsettled: list[bytes] = []
        self.request_capacity = self.burst_rpm or self.rpm
        optional_capacities = ((self.itpm, self.burst_itpm), (self.otpm, self.burst_otpm), (self.tpd, None))
        token_capacities = [self.burst_tpm or self.tpm]
        token_capacities += [burst or rate for rate, burst in optional_capacities if rate is not None]
        #: The largest estimate that can ever fit without its input and output parts: the
        #: smallest capacity of the token buckets (each counts the whole estimate then).
        self.token_capacity = min(token_capacities)
        self._settings: tuple[Any, ...] = (
            repr(self.rpm),
            repr(self.tpm),
            repr(self.request_capacity),
            repr(self.burst_tpm or self.tpm),
            _microseconds(self.history_retention),
            str(records),
            _figure(self.itpm),
            _figure(self.burst_itpm or self.itpm),
            _figure(self.otpm),
            _figure(self.burst_otpm or self.otpm),
            _figure(self.rpd),
            _figure(self.tpd),
            "" if self.max_concurrent is None else str(self.max_concurrent),
        )
        # Sent with every call: encoded once here rather than by the client at each call.
        self._settings = tuple(setting.encode() for setting in self._settings)

    # ----- plumbing ------------------------------------------------------------------------------

    async def _run(self, name: str, *args: Any, resendable: bool = False) -> Any:
        """Runs operation ``name``. ``resendable``: the call changes the books, so it gets a key
        of its own (a random token drawn once for this call) under which the script keeps its
        reply, and a resend of this very call (redis-py resends on a broken connection) is
        answered from it instead of being applied twice. Grants whose reply was lost are settled
        first (`_settle_lost_grants`)."""
        if self._unsettled:
            await self._settle_lost_grants()
        keys = self._keys
        reply_key = None
        if resendable:
            reply_key = f"{self._prefix}reply:{secrets.token_hex(16)}".encode()
            keys = [*keys, reply_key]
        arguments = (self._time_argument(), *self._settings, *args)
        try:
            return await self._connection.run(script("limiter_common", name), keys, arguments)
        except CLIENT_ERRORS as exc:
            if name == "limiter_consume" and reply_key is not None:
                # Sent, perhaps run, perhaps still to run when Redis resumes: settled by the next
                # call that reaches Redis. Past the bound, the oldest are dropped (their replies
                # expired long ago; a grant among them went back to the budget by refill).
                self._unsettled.append(reply_key)
                del self._unsettled[:-_MAX_UNSETTLED]
            self._fail(name, exc)

    async def _settle_lost_grants(self) -> None:
        """Settles the consume calls whose reply never came (``lua/limiter_settle_lost.lua``): a grant
        that landed is given back, a call still to run is answered in advance with a refusal.
        Redis still unreachable: they wait for the next call."""
        batch, self._unsettled = self._unsettled[:_SETTLE_BATCH], self._unsettled[_SETTLE_BATCH:]
        arguments = (self._time_argument(), *self._settings)
        try:
            given_back = await self._connection.run(
                script("limiter_common", "limiter_settle_lost"), [*self._keys, *batch], arguments
            )
        except CLIENT_ERRORS:
            self._unsettled[:0] = batch
            return
        if given_back:
            self._logger.warning(
                "shared limiter %r: gave back %d grant(s) made by a consume whose reply was lost "
                "(its caller was told nothing was granted)",
                self.name,
                given_back,
            )

    async def _run_observed(self, name: str, *args: Any) -> Any:
        """`_run` for a script that answers the server's instant (us): learns this host's offset
        from it."""
        sent = host_microseconds(self._host_time())
        reply = await self._run(name, *args)
        self._clock_offset.observe(sent, host_microseconds(self._host_time()), int(reply))
        return reply

    def _bounded_delay(self, seconds: float | None, what: str) -> float | None:
        """``seconds`` cut to `MAX_PROVIDER_WAIT`; the first cut of this limiter is logged."""
        if seconds is None or seconds <= MAX_PROVIDER_WAIT:
            return seconds
        if not self._delay_logged:
            self._delay_logged = True
            self._logger.warning(
                "%s of %s s for shared limiter %r counts as %s s (one day, the most a provider's "
                "delay counts); later ones above it are cut silently",
                what,
                seconds,
                self.name,
                MAX_PROVIDER_WAIT,
            )
        return MAX_PROVIDER_WAIT

    def _fail(self, operation: str, exc: BaseException) -> NoReturn:
        if operation == "limiter_consume":
            outcome = (
                "failing closed, nothing granted to this call (if Redis runs it anyway, once paused "
                "or slow past the timeout, this limiter's next call that reaches Redis gives the "
                "grant back)"
            )
        elif operation in _BOOK_CHANGES:
            outcome = "failing closed; the call may or may not have been applied"
        else:
            outcome = "failing closed, nothing granted"
        message = (
            f"shared limiter {self.name!r} unavailable ({operation}): "
            f"{self._connection.describe_error(exc)}; {outcome}"
        )
        self._logger.warning("%s", message)
        if self._connection.scrub(str(exc)) != str(exc):
            raise LimiterUnavailableError(message) from None
        raise LimiterUnavailableError(message) from exc

    def _check(
        self, reason: bytes, wait_us: bytes, requests: bytes, tokens: bytes, *levels: bytes
    ) -> RateLimitCheck:
        named = reason.decode()
        available = {"rpm": float(requests), "tpm": float(tokens)}
        available.update((levels[i].decode(), float(levels[i + 1])) for i in range(0, len(levels), 2))
        return RateLimitCheck(
            allowed=not named,
            reason=_reason(named) if named else None,
            available_in=float(wait_us) / 1_000_000,
            available_tokens=available,
        )

    # ----- the limiter ---------------------------------------------------------------------------

    async def can_process(
        self, estimated_tokens: int, *, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> RateLimitCheck:
        """Whether a request of ``estimated_tokens`` (split into ``input_tokens`` and
        ``output_tokens`` when known) would be granted now, and if not, in exactly how many
        seconds (``inf`` when it exceeds a bucket's capacity); ``reason`` names the binding
        limit."""
        estimated = validate_token_count(estimated_tokens, "estimated_tokens")
        parts = _parts(estimated, input_tokens, output_tokens, "estimated_tokens")
        reply = await self._run("limiter_check", _saturated(estimated), *parts)
        return self._check(*reply)

    async def _consume(
        self,
        request_id: str,
        estimated_tokens: int,
        metadata: object,
        input_tokens: object,
        output_tokens: object,
    ) -> RateLimitCheck | None:
        rid = _request_id(request_id)
        estimated = validate_token_count(estimated_tokens, "estimated_tokens")
        _check_metadata(metadata)
        parts = _parts(estimated, input_tokens, output_tokens, "estimated_tokens")
        reply = await self._run("limiter_consume", rid, _saturated(estimated), *parts, resendable=True)
        if reply[0] == 1:
            return None
        return self._check(*reply[1:])

    async def consume(
        self,
        request_id: str,
        estimated_tokens: int,
        metadata: dict[str, Any] | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> bool:
        """Takes one request and ``estimated_tokens`` (plus any debt) from every bucket (the
        input part from itpm, the output part from otpm: each the whole estimate when the parts
        are not given) and a slot of ``max_concurrent``, all or nothing, for every process at
        once. A second grant under one ``request_id`` is a grant of its own, as in
        `LLMThrottle`: ``adjust_consumption`` and ``release`` act on the latest, and after its
        release the one before it is the latest again. ``metadata`` (None or a
        mapping, else `InvalidRequestError`) is accepted for `RateLimiter` compatibility and not
        stored."""
        return (
            await self._consume(request_id, estimated_tokens, metadata, input_tokens, output_tokens) is None
        )

    async def consume_or_raise(
        self,
        request_id: str,
        estimated_tokens: int,
        metadata: dict[str, Any] | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Like `consume`, but raises `RateLimitError(reason, available_in)` when refused."""
        refused = await self._consume(request_id, estimated_tokens, metadata, input_tokens, output_tokens)
        if refused is not None:
            raise RateLimitError(refused.reason or "tpm_limit", refused.available_in)

    async def adjust_consumption(
        self,
        request_id: str,
        actual_tokens: int,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Sets the latest grant of ``request_id`` to ``actual_tokens`` on every bucket (its
        input and output parts on itpm and otpm; without them itpm counts the whole actual count
        and otpm the whole of it up to the output reserved): takes the extra or refunds the
        difference, and frees its slot of ``max_concurrent``. When a bucket holds less than its
        extra: "strict" raises `RateLimitError` (naming the binding bucket) and takes nothing,
        "warn" empties the bucket and logs, "compensate" empties it and carries the rest as that
        bucket's debt (at most one full bucket, as in `LLMThrottle`). Unknown id: `UnknownRequestError`."""
        rid = _request_id(request_id)
        actual = validate_token_count(actual_tokens, "actual_tokens")
        parts = _parts(actual, input_tokens, output_tokens, "actual_tokens")
        strategy = self.adjustment_failure_strategy
        reply = await self._run("limiter_adjust", rid, _saturated(actual), strategy, *parts, resendable=True)
        outcome = reply[0]
        if outcome == b"unknown":
            raise UnknownRequestError(
                f"request {request_id!r} has no consumption record (never consumed, or older than "
                f"history_retention = {self.history_retention} s)"
            )
        if outcome == b"strict":
            raise RateLimitError(_reason(reply[2].decode()), float(reply[1]) / 1_000_000)
        for i in range(1, len(reply), 4):
            bucket, kind, shortfall, debt = (
                reply[i].decode(),
                reply[i + 1],
                float(reply[i + 2]),
                float(reply[i + 3]),
            )
            # The token bucket's messages predate the other buckets: kept word for word.
            what = "token" if bucket == "tpm" else bucket
            if kind == b"warn":
                self._logger.warning(
                    "could not take %s more tokens for request %r: the shared %s bucket %r is empty",
                    shortfall,
                    request_id,
                    what,
                    self.name,
                )
            else:
                self._logger.info(
                    "adding %s tokens of request %r to the %scompensation debt of %r (now %s)",
                    shortfall,
                    request_id,
                    "" if bucket == "tpm" else f"{bucket} ",
                    self.name,
                    debt,
                )

    async def release(self, request_id: str) -> None:
        """Gives the latest grant of ``request_id`` back whole (its request, its tokens and the
        debt it paid) and forgets it, as if it had never been granted; an earlier grant of the
        same id, if one still counts, is the latest again, never above a bucket's capacity.
        Unknown id: `UnknownRequestError`."""
        rid = _request_id(request_id)
        if not await self._run("limiter_release", rid, resendable=True):
            raise UnknownRequestError(
                f"request {request_id!r} has no consumption record (never consumed, released, or older "
                f"than history_retention = {self.history_retention} s)"
            )

    async def settle(self, request_id: str) -> None:
        """Ends the time in flight of the latest grant of ``request_id``, for every process: frees
        its slot of ``max_concurrent`` and keeps its tokens as counted (a call that ended without
        a count to adjust to; an adjustment settles too). Unknown id: `UnknownRequestError`."""
        rid = _request_id(request_id)
        if not await self._run("limiter_settle", rid, resendable=True):
            raise UnknownRequestError(
                f"request {request_id!r} has no consumption record (never consumed, released, or older "
                f"than history_retention = {self.history_retention} s)"
            )

    async def get_metrics(self) -> SharedRateLimitMetrics:
        """Every bucket (as every process sees them now), the history totals, debts and penalty."""
        reply = await self._run("limiter_metrics")
        requests, tokens, debt, penalty_us = (float(value) for value in reply[:4])
        count, total, adjusted = int(reply[4]), int(reply[5]), int(reply[6])
        accuracy = 1.0 if adjusted == 0 else min(1.0, max(0.0, float(reply[7]) / adjusted))
        capacities = {
            "itpm": self.burst_itpm or self.itpm,
            "otpm": self.burst_otpm or self.otpm,
            "rpd": self.rpd,
            "tpd": self.tpd,
            "concurrency": self.max_concurrent,
        }
        optional: dict[str, BucketUsage] = {}
        debts = {"tpm": debt}
        for i in range(8, len(reply), 3):
            name, level, bucket_debt = reply[i].decode(), float(reply[i + 1]), float(reply[i + 2])
            capacity = capacities.get(name)
            if capacity is None:
                continue  # a bucket another process configured: not this instance's to report
            if name == "concurrency":  # the script counts the requests in flight
                level = capacity - level
            optional[name] = _usage(level, capacity)
            if name in ("itpm", "otpm", "tpd"):
                debts[name] = bucket_debt
        return SharedRateLimitMetrics(
            rpm=_usage(requests, self.request_capacity),
            tpm=_usage(tokens, self.burst_tpm or self.tpm),
            efficiency=accuracy,
            consumption_history=HistoryUsage(
                count=count,
                average_tokens_per_request=total / count if count else 0.0,
                total_tokens=total,
                estimation_accuracy=accuracy,
            ),
            compensation=CompensationUsage(total_debt=debt, pending_compensation=debt, debts=debts),
            penalty_remaining=penalty_us / 1_000_000,
            **optional,
        )

    async def penalize(self, seconds: float) -> None:
        """Grants nothing, to any process, for ``seconds`` from the server's now (a provider's 429
        with ``Retry-After``); a later penalty already set is kept. ``seconds`` must be a number
        >= 0 (an int, a float or an integer-like; else `InvalidRequestError`); above
        `MAX_PROVIDER_WAIT` (one day), infinity and an int too large for a float included, it
        counts as one day, logged once per limiter: `LLMThrottle.penalize`'s rule."""
        number = real_number(seconds)
        if number is None or not number >= 0:  # NaN fails it too
            raise InvalidRequestError(f"seconds must be a number >= 0, got {shown(seconds)}")
        bounded = self._bounded_delay(number, "a penalty")
        await self._run("limiter_penalize", _microseconds(bounded))

    async def sync_from_headers(
        self, headers: Mapping[str, Any] | Iterable[tuple[str, Any]]
    ) -> ProviderLimits:
        """Learns from a provider response's rate-limit headers (see
        `llm_queue_dispatcher.provider_limits`): ``retry-after`` penalizes; a remaining figure
        (of requests, tokens, and input and output tokens where itpm and otpm are set) cuts its
        bucket to at most that now, and from there the bucket refills at its own rate, never
        above its own capacity. A reset holds nothing down: it is when the provider's own bucket
        is full again, and the provider refills continuously until then. Returns what was read;
        malformed headers are ignored.

        Absolute instants (Anthropic's resets, a ``Retry-After`` date) are read against the
        server's clock, not this host's: a host clock an hour off changes nothing. Delays count
        at most `MAX_PROVIDER_WAIT`."""
        if not isinstance(headers, (Mapping, str, bytes)):
            # Read twice below; not iterable: parse_rate_limit_headers refuses it.
            with contextlib.suppress(TypeError):
                headers = list(headers)
        limits = parse_rate_limit_headers(headers, now=self._server_now())
        if not self._clock_offset.observed:  # the first sync: learn this host's offset first
            await self._run_observed("limiter_time")
            limits = parse_rate_limit_headers(headers, now=self._server_now())
        await self.apply_provider_limits(limits)
        return limits

    def _server_now(self) -> float:
        """The server's clock now, as this host estimates it (seconds)."""
        return self._host_time() - self._clock_offset.microseconds / 1_000_000

    async def apply_provider_limits(self, limits: ProviderLimits) -> None:
        """`sync_from_headers` for figures already read."""
        if not isinstance(limits, ProviderLimits):
            raise InvalidRequestError(f"limits must be a ProviderLimits, got {limits!r}")
        if limits.empty:
            return
        await self._run_observed(
            "limiter_sync",
            _microseconds(self._bounded_delay(limits.retry_after, "a Retry-After")),
            _figure(limits.requests_remaining),
            _microseconds(self._bounded_delay(limits.requests_reset, "a request limit reset")),
            _figure(limits.tokens_remaining),
            _microseconds(self._bounded_delay(limits.tokens_reset, "a token limit reset")),
            _figure(limits.input_tokens_remaining),
            _microseconds(self._bounded_delay(limits.input_tokens_reset, "an input token limit reset")),
            _figure(limits.output_tokens_remaining),
            _microseconds(self._bounded_delay(limits.output_tokens_reset, "an output token limit reset")),
        )

    async def reset(self) -> None:
        """Full buckets, no history, no debt, no penalty, no request in flight, for
        every process."""
        await self._run("limiter_reset")

    # ----- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> RedisThrottle:
        return self

    def __repr__(self) -> str:
        # The optional limits appear only when set: an rpm/tpm limiter reads as it always did.
        optional = "".join(
            f", {name}={value!r}"
            for name, value in (
                ("itpm", self.itpm),
                ("otpm", self.otpm),
                ("burst_itpm", self.burst_itpm),
                ("burst_otpm", self.burst_otpm),
                ("rpd", self.rpd),
                ("tpd", self.tpd),
                ("max_concurrent", self.max_concurrent),
            )
            if value is not None
        )
        return (
            f"RedisThrottle(name={self.name!r}, namespace={self.namespace!r}, "
            f"redis={self._connection.description}, rpm={self.rpm!r}, tpm={self.tpm!r}, "
            f"burst_rpm={self.burst_rpm!r}, burst_tpm={self.burst_tpm!r}{optional})"
        )
