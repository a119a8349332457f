"""The brute-force reference of the ``fair_priority`` policy, written from the contract.

Source: /work/shared/API.md, "Scheduling under overload (policies)" and "Scheduling that holds
on real traffic" (which wins where they differ), and the README's "How a request is chosen"
(which tenant is backlogged; the automatic reserves). Nothing here is borrowed from the
implementation: every rule is spelled out over a plain list of the visible messages, sorted
afresh at each decision.

The total order of the visible messages at an instant ``now``:

1. With ``urgent_first``, every URGENT message (of every tenant) first, oldest first.
2. Then tenant by tenant: the tenants with (other) visible messages by their token use over the
   last ``fairness_window`` seconds divided by their weight (default 1); ties to the tenant
   whose head (its first message by rule 3) is in the earlier lane, then is older.
3. Inside a tenant, by lane: URGENT (without ``urgent_first``), HIGH, aged, NORMAL, LOW; then the
   earliest deadline (none last), then the oldest. A NORMAL or LOW message that has waited
   *longer* than ``max_wait[priority]`` is in the aged lane (it ranks as HIGH, behind every
   native HIGH message of its tenant); URGENT and HIGH never age.

"Oldest" is the earliest enqueue instant, then the earlier enqueue.

Admission (the reserves and the hold rule):

- A request needing more tokens than the limiter's capacity never fits: it is skipped and holds
  nothing.
- An URGENT message leaves nothing in the bucket (with or without ``urgent_first``). Every other
  message leaves the URGENT reserve, and one of a backlogged tenant the tenant reserve on top;
  its need (estimate + reserves) is capped at the capacity. Neither reserve is kept while a
  backlog clears: the limiter admits, now, one request as large as all the visible messages
  together, and nothing has arrived for as long as the bucket takes to refill both reserves
  (`tests.reference.scoring.UrgentHistory.kept`).
- A tenant is backlogged when another tenant is active, it has more than one visible message
  (URGENT ones included), and it has used, per weight, at least its fair share of the window's
  capacity: the tokens the limiter refills over ``fairness_window``, divided by the total weight
  of the active tenants, those that are waiting (have a visible message) or have used tokens in
  the window (use above 0). Exact arithmetic: a tenant that used exactly its share is
  backlogged.
- With ``hold``, the first message of the order (that can ever fit) is the winner: it goes when
  it is admissible now, else the dispatcher holds for it. Without, the first message of the
  order that is admissible now goes.

Token use is a ledger: each dispatch charges its estimate at the dispatch instant; a mark
corrects that charge while it lies in the window (processed with ``actual_tokens`` to that
count; failed or dead-lettered to 0). A charge at ``t`` counts while ``now - window < t``.

The automatic tenant reserve (``reserve_tokens=None``): one and a half times the largest
estimate among the last 256 dispatched requests, at most a tenth of the capacity; 1 % of the
capacity before the first dispatch. The URGENT reserve, with ``urgent_first`` only:
``urgent_reserve`` when set, else automatic (`tests.reference.scoring.UrgentHistory`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from tests.reference.scoring import UrgentHistory

__all__ = [
    "HIGH",
    "LOW",
    "NORMAL",
    "URGENT",
    "FairChoice",
    "FairMessage",
    "FairModel",
    "FairSettings",
    "Ledger",
]

URGENT, HIGH, NORMAL, LOW = 0, 1, 2, 3
PRIORITY_NAMES = {URGENT: "URGENT", HIGH: "HIGH", NORMAL: "NORMAL", LOW: "LOW"}
RECENT_ESTIMATES = 256


@dataclass(frozen=True)
class FairMessage:
    """A visible message as the policy sees it."""

    id: str
    tenant: str  # a request's tenant; None is the tenant ""
    priority: int
    tokens: int
    enqueued_at: float
    order: int  # enqueue order: ties between equal enqueue instants
    deadline: float | None = None


@dataclass(frozen=True)
class FairSettings:
    """`FairPriorityConfig`, written out again."""

    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    fairness_window: float = 60.0
    reserve_tokens: float | None = None
    urgent_first: bool = True
    max_wait: Mapping[int, float] = field(default_factory=lambda: {HIGH: 60.0, NORMAL: 300.0, LOW: 900.0})
    urgent_reserve: float | None = None

    def weight(self, tenant: str) -> float:
        return float(self.tenant_weights.get(tenant, 1.0))


@dataclass
class _Charge:
    tenant: str
    at: float
    tokens: float


class Ledger:
    """Token use per tenant over a sliding window, with corrections in place."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._charges: dict[int, _Charge] = {}
        self._next = 0

    def charge(self, tenant: str, at: float, tokens: float) -> int:
        """Charges ``tokens`` to ``tenant`` at ``at``; the charge's key for `correct`."""
        key = self._next
        self._next += 1
        self._charges[key] = _Charge(tenant, at, float(tokens))
        return key

    def correct(self, key: int, tokens: float) -> None:
        """Sets charge ``key`` to ``tokens`` (the actual count, or 0 to take it back)."""
        self._charges[key].tokens = float(tokens)

    def usage(self, tenant: str, now: float) -> float:
        """Tokens charged to ``tenant`` in the window ending at ``now``."""
        horizon = now - self.window
        return float(sum(c.tokens for c in self._charges.values() if c.tenant == tenant and c.at > horizon))

    def tenants(self, now: float) -> set[str]:
        """Tenants with a charge in the window ending at ``now``."""
        horizon = now - self.window
        return {c.tenant for c in self._charges.values() if c.at > horizon}

    def active(self, now: float) -> set[str]:
        """Tenants that used tokens in the window ending at ``now`` (their use is above 0)."""
        return {t for t in self.tenants(now) if self.usage(t, now) > 0}


@dataclass(frozen=True)
class FairChoice:
    """The reference's decision: the message, whether it goes now, and why it ranks there."""

    message: FairMessage
    fits: bool
    #: Tokens it must leave in the bucket on top of its own (the reserve part).
    margin: float
    urgent: bool  # chosen ahead of fairness (rule 1)
    rank: int  # 1-based rank of its tenant among the tenants ranked by rule 2 (0 when urgent)
    of: int  # tenants ranked by rule 2
    usage: float  # its tenant's token use over the window
    effective_priority: int

    @property
    def needed(self) -> float:
        return self.message.tokens + self.margin


def oldest_key(message: FairMessage) -> tuple[float, int]:
    return (message.enqueued_at, message.order)


AGED = 2  # the aged lane, between HIGH and NORMAL
LANE_PRIORITY = [URGENT, HIGH, HIGH, NORMAL, LOW]


def lane(message: FairMessage, now: float, settings: FairSettings) -> int:
    """URGENT 0, HIGH 1, aged 2, NORMAL 3, LOW 4: NORMAL and LOW move to the aged lane once they
    have waited longer than their ``max_wait``."""
    if message.priority in (NORMAL, LOW):
        limit = settings.max_wait.get(message.priority)
        if limit is not None and now - message.enqueued_at > limit:
            return AGED
    return [0, 1, 3, 4][message.priority]


def effective_priority(message: FairMessage, now: float, settings: FairSettings) -> int:
    """The priority its lane ranks as: an aged message as HIGH."""
    return LANE_PRIORITY[lane(message, now, settings)]


def within_tenant_key(
    message: FairMessage, now: float, settings: FairSettings
) -> tuple[int, float, float, int]:
    deadline = math.inf if message.deadline is None else message.deadline
    return (lane(message, now, settings), deadline, *oldest_key(message))


@dataclass(frozen=True)
class _Ranked:
    message: FairMessage
    urgent: bool
    rank: int
    of: int
    usage: float


class FairModel:
    """The policy's state over time: the ledger, the estimates the automatic reserve reads, and
    the decision at each dispatch."""

    def __init__(self, settings: FairSettings) -> None:
        self.settings = settings
        self.ledger = Ledger(settings.fairness_window)
        self.recent: list[int] = []
        self.history = UrgentHistory()

    def observe(self, message: FairMessage) -> None:
        """A message became visible (enqueued, visible again, taken into the buffer)."""
        self.history.observe(message.priority, message.tokens, message.enqueued_at)

    # -- the order ------------------------------------------------------------------------------
    def order(self, visible: Iterable[FairMessage], now: float) -> list[_Ranked]:
        """Every visible message in the policy's order at ``now``."""
        settings = self.settings
        messages = list(visible)
        ranked: list[_Ranked] = []
        rest = messages
        if settings.urgent_first:
            rest = [m for m in messages if m.priority != URGENT]
        by_tenant: dict[str, list[FairMessage]] = {}
        for message in rest:
            by_tenant.setdefault(message.tenant, []).append(message)
        for queue in by_tenant.values():
            queue.sort(key=lambda m: within_tenant_key(m, now, settings))
        usage = {tenant: self.ledger.usage(tenant, now) for tenant in by_tenant}
        if settings.urgent_first:
            urgent = sorted((m for m in messages if m.priority == URGENT), key=oldest_key)
            ranked += [_Ranked(m, True, 0, 0, self.ledger.usage(m.tenant, now)) for m in urgent]
        tenants = sorted(
            by_tenant,
            key=lambda t: (
                usage[t] / settings.weight(t),
                lane(by_tenant[t][0], now, settings),
                oldest_key(by_tenant[t][0]),
            ),
        )
        for rank, tenant in enumerate(tenants, start=1):
            ranked += [_Ranked(m, False, rank, len(tenants), usage[tenant]) for m in by_tenant[tenant]]
        return ranked

    # -- admission ------------------------------------------------------------------------------
    def reserve(self, capacity: float) -> float:
        if self.settings.reserve_tokens is not None:
            return float(self.settings.reserve_tokens)
        if not self.recent:
            return 0.01 * capacity
        return min(1.5 * max(self.recent[-RECENT_ESTIMATES:]), 0.1 * capacity)

    def urgent_reserve(self, capacity: float) -> float:
        settings = self.settings
        return self.history.reserve(
            capacity, fixed=settings.urgent_reserve, urgent_first=settings.urgent_first
        )

    def fair_share(self, visible: Sequence[FairMessage], now: float, refill_rate: float) -> Fraction | None:
        """Tokens per unit of weight a tenant may use over the window before it is backlogged
        (None: no tenant at all)."""
        active = self.ledger.active(now) | {m.tenant for m in visible}
        total = sum(Fraction(self.settings.weight(t)) for t in active)
        if total == 0:
            return None
        return Fraction(refill_rate) * Fraction(self.settings.fairness_window) / total

    def backlogged(self, tenant: str, visible: Sequence[FairMessage], now: float, refill_rate: float) -> bool:
        if sum(1 for m in visible if m.tenant == tenant) <= 1:
            return False
        if len(self.ledger.active(now) | {m.tenant for m in visible}) <= 1:
            return False  # the tenant reserve is for other tenants: none is active
        share = self.fair_share(visible, now, refill_rate)
        used = Fraction(self.ledger.usage(tenant, now)) / Fraction(self.settings.weight(tenant))
        return share is not None and used >= share

    def margin(self, ranked: _Ranked, backlogged: bool, capacity: float, reserves_kept: bool) -> float:
        """The reserve part of what the message must find in the bucket."""
        tokens = ranked.message.tokens
        if ranked.message.priority == URGENT or not reserves_kept:
            return 0.0
        reserve = self.urgent_reserve(capacity) + (self.reserve(capacity) if backlogged else 0.0)
        return min(tokens + reserve, capacity) - tokens

    def reserves_kept(
        self,
        visible: Sequence[FairMessage],
        now: float,
        capacity: float,
        refill_rate: float,
        admits: Callable[[float], bool],
    ) -> bool:
        both = self.urgent_reserve(capacity) + self.reserve(capacity)
        waiting = sum(m.tokens for m in visible)
        return self.history.kept(both, now=now, refill_rate=refill_rate, admits_waiting=admits(waiting))

    def choose(
        self,
        visible: Sequence[FairMessage],
        now: float,
        *,
        capacity: float,
        refill_rate: float,
        admits: Callable[[float], bool],
        hold: bool,
    ) -> FairChoice | None:
        """The dispatch decision at ``now`` with a limiter of token ``capacity`` refilling
        ``refill_rate`` tokens per second: ``admits(tokens)`` tells whether it admits a request
        needing that many tokens now. None: nothing goes and nothing is held."""
        reserves_kept = self.reserves_kept(visible, now, capacity, refill_rate, admits)
        for ranked in self.order(visible, now):
            message = ranked.message
            if message.tokens > capacity:
                continue  # never fits: holds nothing
            backlogged = self.backlogged(message.tenant, visible, now, refill_rate)
            margin = self.margin(ranked, backlogged, capacity, reserves_kept)
            fits = admits(message.tokens + margin)
            if fits or hold:
                return FairChoice(
                    message=message,
                    fits=fits,
                    margin=margin,
                    urgent=ranked.urgent,
                    rank=ranked.rank,
                    of=ranked.of,
                    usage=ranked.usage,
                    effective_priority=effective_priority(message, now, self.settings),
                )
        return None

    # -- what a dispatch and a mark change ------------------------------------------------------
    def dispatched(self, message: FairMessage, now: float) -> int:
        """Charges a dispatch; the charge's key."""
        self.recent.append(message.tokens)
        return self.ledger.charge(message.tenant, now, message.tokens)

    def corrected(self, key: int, tokens: float) -> None:
        self.ledger.correct(key, tokens)


def expired(visible: Iterable[FairMessage], now: float) -> list[FairMessage]:
    """The messages ``drop_expired`` removes at ``now``: deadline strictly before it."""
    return [m for m in visible if m.deadline is not None and m.deadline < now]
