"""What a run of `llmqd simulate` reports: `SimulationProgress` as it goes, `SimulationResult`
at the end (the counts, the waits, utilisation, SLO attainment, tenants judged by tokens, the
fairness figures, inversions and the binding limit; `simulate_metrics` computes them).
`llm_queue_dispatcher.simulate` re-exports both."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .metrics import percentile
from .simulate_metrics import DEFAULT_SLO, BlockedTime, WindowFairness, light_tenants, slo_attainment
from .types import Priority

__all__ = ["SimulationProgress", "SimulationResult"]

_CLASSES = [p.name for p in Priority]


@dataclass(frozen=True)
class SimulationProgress:
    """How far a run has come, as reported to ``on_progress``: each request that arrived is
    waiting, in flight, or settled (completed, expired by retention, dead-lettered after its
    failures, or taken out as unfittable)."""

    strategy: str
    requests: int
    arrived: int
    completed: int
    expired: int
    dead_lettered: int
    unfittable: int
    virtual_time: float

    @property
    def settled(self) -> int:
        return self.completed + self.expired + self.dead_lettered + self.unfittable


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 of sorted ``values``; None each when there are none."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    return {q: percentile(values, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


@dataclass
class SimulationResult:
    """What one strategy achieved on one workload.

    Waits run from a request's arrival to the dispatch that completed it. Utilisation is the
    share of the tokens the limiter could have granted that requests actually used: tokens used /
    (the token bucket's capacity, which starts full, + TPM x minutes). `dispatch_utilisation`
    counts up to the last dispatch (the scheduler's doing: what follows is the last calls
    running); `arrival_utilisation` only the arrival period (requests dispatched by the last
    arrival); `tpm_utilisation` up to the last completion.
    """

    strategy: str
    requests: int
    completed: int = 0
    dead_lettered: int = 0
    expired: int = 0
    unfittable: int = 0
    retries: int = 0
    past_deadline: int = 0
    makespan: float = 0.0
    arrival_period: float = 0.0
    last_dispatch: float = 0.0
    tokens_used: int = 0
    tokens_in_arrival_period: int = 0
    tpm_limit: float = 0.0
    tpm_capacity: float = 0.0
    rpm_limit: float = 0.0
    interrupted: bool = False
    wall_time: float = 0.0
    cpu_time: float = 0.0
    wait_by_priority: dict[str, list[float]] = field(default_factory=dict)
    wait_by_tenant: dict[str, list[float]] = field(default_factory=dict)
    requests_by_tenant: dict[str, int] = field(default_factory=dict)
    tokens_by_tenant: dict[str, int] = field(default_factory=dict)
    arrived_by_priority: dict[str, int] = field(default_factory=dict)
    queue_depth: list[tuple[float, int]] = field(default_factory=list)
    has_deadlines: bool = False
    slo_targets: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SLO))
    dispatches: int = 0
    inversions: int = 0
    inversions_within_tenant: int = 0
    blocked: BlockedTime = field(default_factory=BlockedTime)
    fairness: WindowFairness = field(default_factory=lambda: WindowFairness(0, None, None, None, None))

    @property
    def unfinished(self) -> int:
        """Requests neither completed nor dropped (only an interrupted run leaves any)."""
        return self.requests - self.completed - self.dead_lettered - self.expired - self.unfittable

    @property
    def throughput_per_minute(self) -> float:
        return self.completed / self.makespan * 60.0 if self.makespan > 0 else 0.0

    def _grantable(self, seconds: float) -> float:
        return self.tpm_capacity + self.tpm_limit * seconds / 60.0

    def _utilisation(self, tokens: int, seconds: float) -> float:
        grantable = self._grantable(seconds)
        return tokens / grantable if grantable > 0 else 0.0

    @property
    def dispatch_utilisation(self) -> float:
        """Tokens used / tokens grantable, up to the last dispatch."""
        return self._utilisation(self.tokens_used, self.last_dispatch)

    @property
    def tpm_utilisation(self) -> float:
        """Tokens used / tokens grantable, up to the last completion."""
        return self._utilisation(self.tokens_used, self.makespan)

    @property
    def arrival_utilisation(self) -> float:
        """Tokens used / tokens grantable, over the arrival period (the whole run for a burst)."""
        if self.arrival_period <= 0:
            return self.dispatch_utilisation
        return self._utilisation(self.tokens_in_arrival_period, self.arrival_period)

    @property
    def binding_limit(self) -> str | None:
        """The limit (``RPM``, ``TPM`` or ``concurrency``) that held waiting requests back
        longest; None when requests never waited on one."""
        return self.blocked.binding()

    def wait_percentiles(self) -> dict[str, dict[str, float | None]]:
        """p50/p95/p99 of the wait per priority (None for a class with no request sent)."""
        return {name: _percentiles(self.wait_by_priority.get(name, [])) for name in _CLASSES}

    def slo_attainment(self) -> dict[str, float | None]:
        """Per priority, the share of the requests that arrived that were sent within
        ``slo_targets`` (None for a class with no request)."""
        return {
            name: slo_attainment(
                self.wait_by_priority.get(name, []),
                self.slo_targets.get(name, math.inf),
                self.arrived_by_priority.get(name, 0),
            )
            for name in _CLASSES
        }

    @property
    def fair_capacity(self) -> float:
        """The tokens tenants share: the TPM limit over the arrival period (the token bucket's
        capacity when that is larger, for a burst or a run under a minute)."""
        return max(self.tpm_limit * self.arrival_period / 60.0, self.tpm_capacity)

    def light_tenants(self) -> list[str]:
        """The tenants whose tokens (prompt and completion, over the whole workload) are at most
        their max-min fair share of `fair_capacity` ([] with a single tenant)."""
        if len(self.tokens_by_tenant) < 2:
            return []
        return sorted(light_tenants(self.tokens_by_tenant, self.fair_capacity))

    def heavy_tenants(self) -> list[str]:
        """The tenants that offer more than their max-min fair share of tokens."""
        if len(self.tokens_by_tenant) < 2:
            return []
        light = set(self.light_tenants())
        return sorted(name for name in self.tokens_by_tenant if name not in light)

    def tenant_summary(self, per_tenant: bool = True) -> dict[str, Any]:
        """Heavy vs light tenants, judged by tokens (`light_tenants`): p50/p95/p99 of each
        group's pooled waits (None for an empty group) and the worst light tenant's p99; with
        ``per_tenant``, each tenant's tokens, requests and wait percentiles. {} with a single
        tenant."""
        if len(self.requests_by_tenant) < 2:
            return {}
        light = self.light_tenants()
        heavy = self.heavy_tenants()
        per = {
            name: _percentiles(self.wait_by_tenant.get(name, [])) for name in sorted(self.requests_by_tenant)
        }
        worst = max(
            (name for name in light if per[name]["p99"] is not None),
            key=lambda name: per[name]["p99"] or 0.0,
            default=None,
        )
        summary: dict[str, Any] = {
            "heavy": heavy,
            "light": light,
            "heavy_wait_s": _percentiles(
                sorted(w for name in heavy for w in self.wait_by_tenant.get(name, []))
            ),
            "light_wait_s": _percentiles(
                sorted(w for name in light for w in self.wait_by_tenant.get(name, []))
            ),
            "worst_light_tenant": worst,
            "worst_light_p99_s": per[worst]["p99"] if worst is not None else None,
        }
        if per_tenant:
            summary["per_tenant"] = {
                name: {
                    "requests": self.requests_by_tenant[name],
                    "tokens": self.tokens_by_tenant.get(name, 0),
                    "wait_s": per[name],
                }
                for name in per
            }
        return summary

    def to_dict(self, per_tenant: bool = False) -> dict[str, Any]:
        """Everything as JSON-ready values (None where there is nothing to measure); each tenant's
        detail only with ``per_tenant``."""
        shares = self.blocked.shares()
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "completed": self.completed,
            "dead_lettered": self.dead_lettered,
            "expired": self.expired,
            "unfittable": self.unfittable,
            "unfinished": self.unfinished,
            "retries": self.retries,
            "past_deadline": self.past_deadline,
            "interrupted": self.interrupted,
            "makespan_s": self.makespan,
            "last_dispatch_s": self.last_dispatch,
            "arrival_period_s": self.arrival_period,
            "throughput_per_min": self.throughput_per_minute,
            "tokens_used": self.tokens_used,
            "tokens_in_arrival_period": self.tokens_in_arrival_period,
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "tpm_capacity": self.tpm_capacity,
            "dispatch_utilisation": self.dispatch_utilisation,
            "arrival_utilisation": self.arrival_utilisation,
            "tpm_utilisation": self.tpm_utilisation,
            "wait_s": self.wait_percentiles(),
            "slo_targets_s": dict(self.slo_targets),
            "slo_attainment": self.slo_attainment(),
            "dispatches": self.dispatches,
            "priority_inversions": self.inversions,
            "priority_inversions_within_tenant": self.inversions_within_tenant,
            "binding_limit": self.binding_limit,
            "blocked_s": dict(self.blocked.seconds),
            "blocked_share": shares,
            "fairness": self.fairness.to_dict(),
            "tenants": self.tenant_summary(per_tenant),
            "wall_time_s": self.wall_time,
            "cpu_time_s": self.cpu_time,
        }
