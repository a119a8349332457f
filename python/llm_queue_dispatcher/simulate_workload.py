"""The workloads `llmqd simulate` runs: a request as a trace holds it (`TraceRecord`), the
synthetic generator (`Workload`), the simulated provider (`ProviderModel`), the named scenarios
(`PRESETS`) and what a recorded workload offers (`tokens_per_minute`, `scale_arrivals`).
`llm_queue_dispatcher.simulate` runs them and re-exports all of this; reading traces is
`llm_queue_dispatcher.simulate_trace`."""

from __future__ import annotations

import math
import random
import sys
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Literal, NamedTuple

from .types import Priority

__all__ = [
    "MAX_REQUESTS",
    "MAX_SECONDS",
    "MAX_TOKENS",
    "PRESETS",
    "Preset",
    "ProviderModel",
    "TraceRecord",
    "Workload",
    "arrivals_per_minute",
    "cumulative_shares",
    "scale_arrivals",
    "tokens_per_minute",
]

#: The most requests a workload may hold (generated or read from traces): bounds memory (a
#: request costs about 300 bytes while it runs) and a run's time.
MAX_REQUESTS = 5_000_000

#: The latest virtual instant of a workload, in seconds from its start (about 31.7 years): any
#: arrival or deadline beyond is refused rather than overflowing the dates of the requests.
MAX_SECONDS = 1e9

#: The most tokens one request may hold (estimate, prompt or completion).
MAX_TOKENS = 10**12


class TraceRecord(NamedTuple):
    """One request of a workload, as a trace file holds it.

    ``arrival`` is seconds from the start of the run; ``deadline`` (optional) is seconds after
    the request's own arrival. ``actual_tokens`` is what the call really uses (prompt and
    completion): it is reported to the limiter with ``mark_as_processed(actual_tokens=...)``
    and sets the call's latency. ``output_tokens``, when known, is the completion's share of
    ``actual_tokens``: the provider then charges the prompt and the completion apart
    (`ProviderModel.latency`).
    """

    arrival: float
    priority: Priority
    estimated_tokens: int
    actual_tokens: int
    tenant: str | None = None
    deadline: float | None = None
    output_tokens: int | None = None

    @property
    def input_tokens(self) -> int:
        """The prompt: the actual tokens that are not the completion (all of them when the
        completion is not known)."""
        return self.actual_tokens - (self.output_tokens or 0)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def cumulative_shares(weights: Iterable[float]) -> list[float]:
    """The running shares of ``weights`` but the last (``bisect_right`` of a uniform draw in it
    picks an index with probability weight / total), in one pass: linear in the weights, so
    that 100,000 tenants cost no more than 100,000 additions."""
    running = list(accumulate(weights))
    total = running[-1] if running else 0.0
    return [value / total for value in running[:-1]]


@dataclass(frozen=True)
class Workload:
    """A synthetic workload; the same fields and seed give the same requests.

    * ``requests`` of them, or (``requests=None``) every Poisson arrival within ``duration``
      seconds.
    * ``priority_mix``: relative weights of URGENT, HIGH, NORMAL, LOW.
    * Estimates are log-normal (``token_median``, ``token_sigma``), rounded and clipped to
      ``[token_min, token_max]``; the actual count is the estimate times a uniform draw from
      ``actual_ratio``.
    * ``arrival``: ``"poisson"`` at ``arrival_rate`` per second, or ``"burst"`` (all at t = 0).
      `with_load` sets the rate from an offered load.
    * ``tenants``: with more than one, the first ``heavy_tenants`` (``t1``, ...) send
      ``heavy_share`` of the requests between them and the others share the rest equally
      (``heavy_share=None``: every tenant sends alike). One tenant means no tenant at all.
    * ``deadline``: seconds after its arrival each request should be sent by (None: none).
    """

    requests: int | None = 10_000
    duration: float | None = None
    priority_mix: tuple[float, float, float, float] = (0.1, 0.2, 0.5, 0.2)
    token_median: float = 800.0
    token_sigma: float = 1.0
    token_min: int = 20
    token_max: int = 200_000
    actual_ratio: tuple[float, float] = (0.6, 1.2)
    arrival: Literal["poisson", "burst"] = "poisson"
    arrival_rate: float = 2.2
    tenants: int = 1
    heavy_tenants: int = 1
    heavy_share: float | None = None
    deadline: float | None = None
    seed: int = 7

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "burst"):
            raise ValueError(f"arrival must be 'poisson' or 'burst', got {self.arrival!r}")
        if self.requests is None:
            if self.duration is None or self.arrival != "poisson":
                raise ValueError("requests=None needs Poisson arrivals and a duration")
        elif not 0 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be from 0 to {MAX_REQUESTS:,}, got {self.requests}")
        if self.duration is not None and not 0 < self.duration <= MAX_SECONDS:
            raise ValueError(f"duration must be > 0 and <= {MAX_SECONDS:g} seconds, got {self.duration}")
        mix = self.priority_mix
        if len(mix) != 4 or not all(0 <= w < math.inf for w in mix) or not 0 < sum(mix) < math.inf:
            raise ValueError(f"priority_mix must be 4 finite weights >= 0, not all 0, got {mix}")
        if not (0 < self.token_median <= MAX_TOKENS and 0 <= self.token_sigma <= 10):
            raise ValueError(
                f"token_median must be > 0 and <= {MAX_TOKENS:.0e} and token_sigma within [0, 10], got "
                f"{self.token_median}, {self.token_sigma}"
            )
        if not 0 <= self.token_min <= self.token_max <= MAX_TOKENS:
            raise ValueError(
                f"need 0 <= token_min <= token_max <= {MAX_TOKENS:.0e}, got {self.token_min}, "
                f"{self.token_max}"
            )
        low, high = self.actual_ratio
        if not 0 <= low <= high <= 100:
            raise ValueError(
                f"actual_ratio must be (low, high) with 0 <= low <= high <= 100, got {self.actual_ratio}"
            )
        if not (math.isfinite(self.arrival_rate) and self.arrival_rate > 0):
            raise ValueError(f"arrival_rate must be > 0, got {self.arrival_rate}")
        if self.tenants < 1 or not 1 <= self.heavy_tenants <= self.tenants:
            raise ValueError(f"need tenants >= 1 and 1 <= heavy_tenants <= tenants, got {self.tenants}")
        if self.tenants > MAX_REQUESTS:
            raise ValueError(f"tenants must be at most {MAX_REQUESTS:,}, got {self.tenants}")
        if self.heavy_share is not None and not 0 <= self.heavy_share <= 1:
            raise ValueError(f"heavy_share must be within [0, 1], got {self.heavy_share}")
        if self.deadline is not None and not 0 <= self.deadline <= MAX_SECONDS:
            raise ValueError(f"deadline must be from 0 to {MAX_SECONDS:g} seconds, got {self.deadline}")
        if self.arrival == "poisson":
            # The expected size and span, so that a rate of 1e-300 or a duration of 1e9 s at a
            # thousand a second is refused here rather than hanging or overflowing a date.
            if self.requests is None and self.duration is not None:
                expected = self.duration * self.arrival_rate
                if expected > MAX_REQUESTS:
                    raise ValueError(
                        f"a duration of {self.duration:g} s at {self.arrival_rate:g} arrivals/s makes about "
                        f"{expected:.3g} requests; at most {MAX_REQUESTS:,}"
                    )
            elif self.requests is not None and self.requests / self.arrival_rate > MAX_SECONDS:
                raise ValueError(
                    f"{self.requests:,} requests at {self.arrival_rate:g} arrivals/s span about "
                    f"{self.requests / self.arrival_rate:.3g} s; at most {MAX_SECONDS:g} s of virtual time"
                )

    def mean_estimate(self) -> float:
        """The expected estimate: the mean of the clipped log-normal (rounding aside)."""
        low, high = float(max(self.token_min, 1e-9)), float(self.token_max)
        mu, sigma = math.log(self.token_median), self.token_sigma
        if sigma == 0:
            return min(high, max(low, self.token_median))
        alpha = (math.log(low) - mu) / sigma
        beta = (math.log(high) - mu) / sigma
        inside = math.exp(mu + sigma * sigma / 2) * (_normal_cdf(beta - sigma) - _normal_cdf(alpha - sigma))
        return low * _normal_cdf(alpha) + high * (1.0 - _normal_cdf(beta)) + inside

    def mean_actual(self) -> float:
        """The expected actual token count of a request."""
        return self.mean_estimate() * (self.actual_ratio[0] + self.actual_ratio[1]) / 2.0

    def with_load(self, load: float, tpm: float) -> Workload:
        """This workload with the Poisson rate that offers ``load`` times ``tpm``: load = the
        estimated tokens arriving per minute / the TPM limit (what the dispatcher is asked to
        schedule; the tokens actually used are `mean_actual` / `mean_estimate` of that)."""
        if not (math.isfinite(load) and load > 0):
            raise ValueError(f"load must be > 0, got {load}")
        return replace(self, arrival="poisson", arrival_rate=load * tpm / 60.0 / self.mean_estimate())

    def tenant_names(self) -> list[str | None]:
        """The tenants' names, heavy ones first (``[None]`` for a single tenant)."""
        return [None] if self.tenants == 1 else [f"t{i + 1}" for i in range(self.tenants)]

    def _tenant_weights(self) -> list[float]:
        if self.tenants == 1 or self.heavy_share is None:
            return [1.0] * self.tenants
        light = self.tenants - self.heavy_tenants
        heavy_each = self.heavy_share / self.heavy_tenants
        light_each = (1.0 - self.heavy_share) / light if light else 0.0
        return [heavy_each] * self.heavy_tenants + [light_each] * light

    def generate(self) -> list[TraceRecord]:
        """The requests, in arrival order."""
        rng = random.Random(self.seed)
        draw, lognormal, exponential = rng.random, rng.lognormvariate, rng.expovariate
        priorities = list(Priority)
        cum_priority = cumulative_shares(self.priority_mix)
        tenants = self.tenant_names()
        cum_tenant = cumulative_shares(self._tenant_weights())
        mu, sigma = math.log(self.token_median), self.token_sigma
        token_min, token_max = self.token_min, self.token_max
        low, spread = self.actual_ratio[0], self.actual_ratio[1] - self.actual_ratio[0]
        count = self.requests if self.requests is not None else sys.maxsize
        horizon = self.duration if self.duration is not None else math.inf
        rate = self.arrival_rate if self.arrival == "poisson" else 0.0
        deadline = self.deadline
        now = 0.0
        out: list[TraceRecord] = []
        append = out.append
        for _ in range(count):
            if rate:
                now += exponential(rate)
                if now > horizon:
                    break
            estimate = min(token_max, max(token_min, round(lognormal(mu, sigma))))
            priority = priorities[bisect_right(cum_priority, draw())]
            tenant = tenants[bisect_right(cum_tenant, draw())]
            actual = round(estimate * (low + spread * draw()))
            append(TraceRecord(now, priority, estimate, actual, tenant, deadline))
        return out


@dataclass(frozen=True)
class ProviderModel:
    """The simulated provider: ``concurrency`` calls at once; an attempt fails with probability
    ``failure_rate``, drawn from a random sequence seeded by ``seed``.

    A call takes ``base_latency`` plus a cost per token it actually uses. When the request's
    completion is known apart from its prompt (`TraceRecord.output_tokens`, as real traces
    give it), the prompt costs ``seconds_per_1k_input_tokens`` and the completion, generated
    one token after another, ``seconds_per_1k_output_tokens`` (0.2 ms and 20 ms a token by
    default: a 2,000-token prompt with a 200-token answer takes 0.4 + 0.4 + 4 s). Otherwise
    every token costs ``seconds_per_1k_tokens`` (1.5 ms: the synthetic workloads' model).
    """

    base_latency: float = 0.4
    seconds_per_1k_tokens: float = 1.5
    concurrency: int = 32
    failure_rate: float = 0.0
    seed: int = 0
    seconds_per_1k_input_tokens: float = 0.2
    seconds_per_1k_output_tokens: float = 20.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0 <= self.failure_rate < 1:
            raise ValueError(f"failure_rate must be within [0, 1), got {self.failure_rate}")
        for name in (
            "base_latency",
            "seconds_per_1k_tokens",
            "seconds_per_1k_input_tokens",
            "seconds_per_1k_output_tokens",
        ):
            value = getattr(self, name)
            # A call longer than a day would outlive the lease the simulation gives it.
            if not 0 <= value <= 86_400:
                raise ValueError(f"{name} must be from 0 to 86400 seconds, got {value}")

    def latency(self, tokens: int, output_tokens: int | None = None) -> float:
        """Seconds a call that uses ``tokens`` in all takes; ``output_tokens`` of them the
        completion, when known."""
        if output_tokens is None:
            return self.base_latency + tokens / 1000.0 * self.seconds_per_1k_tokens
        return (
            self.base_latency
            + (tokens - output_tokens) / 1000.0 * self.seconds_per_1k_input_tokens
            + output_tokens / 1000.0 * self.seconds_per_1k_output_tokens
        )


@dataclass(frozen=True)
class Preset:
    """A named scenario of `llmqd simulate --preset`: workload, provider and limits."""

    description: str
    workload: Workload
    provider: ProviderModel
    rpm: float
    tpm: float
    load: float | None = None


#: ``overload``: a synthetic overload (Poisson arrivals at twice the TPM limit for 600 s,
#: priorities 5/20/50/25 %, log-normal estimates with median 800 and sigma 1 clipped to
#: 20-16,000, actual = estimate x U(0.6, 1.2), 8 tenants of which one sends 80 % of the
#: requests, 32 concurrent calls, RPM 600 / TPM 400,000).
PRESETS: dict[str, Preset] = {
    "overload": Preset(
        description="a synthetic overload: 8 tenants, one sending 80 %, at 2x the TPM limit for 600 s",
        workload=Workload(
            requests=None,
            duration=600.0,
            priority_mix=(0.05, 0.20, 0.50, 0.25),
            token_median=800.0,
            token_sigma=1.0,
            token_min=20,
            token_max=16_000,
            actual_ratio=(0.6, 1.2),
            tenants=8,
            heavy_tenants=1,
            heavy_share=0.8,
        ),
        provider=ProviderModel(concurrency=32),
        rpm=600.0,
        tpm=400_000.0,
        load=2.0,
    ),
}


# -- what a recorded workload offers ---------------------------------------------------------------
def _span(records: Sequence[TraceRecord]) -> float:
    return records[-1].arrival - records[0].arrival if records else 0.0


def tokens_per_minute(records: Sequence[TraceRecord]) -> float | None:
    """The actual tokens (prompt and completion) arriving per minute, from the first arrival to
    the last of ``records`` (in arrival order); None when they all arrive at one instant."""
    span = _span(records)
    if span <= 0:
        return None
    return sum(record.actual_tokens for record in records) / span * 60.0


def arrivals_per_minute(records: Sequence[TraceRecord]) -> float:
    """The mean arrivals per minute from the first arrival to the last (a workload spanning less
    than a minute counts as one minute)."""
    return len(records) / max(_span(records), 60.0) * 60.0


def scale_arrivals(records: Sequence[TraceRecord], factor: float) -> list[TraceRecord]:
    """``records`` with every arrival time multiplied by ``factor`` (> 0): below 1 the same
    requests come faster. Deadlines, relative to each arrival, stay."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be > 0, got {factor}")
    if factor == 1.0:
        return list(records)
    return [record._replace(arrival=record.arrival * factor) for record in records]
