"""The obvious plain-Python dual token bucket: the baseline `LLMThrottle` is measured against."""

from __future__ import annotations

import time
from collections.abc import Callable


class PlainBucket:
    """One bucket refilled continuously, written the way most Python code writes it."""

    def __init__(self, capacity: float, per_second: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.available = capacity
        self.clock = clock
        self.last = clock()

    def refill(self) -> None:
        now = self.clock()
        if now > self.last:
            self.available = min(self.capacity, self.available + (now - self.last) * self.per_second)
            self.last = now


class PlainThrottle:
    """RPM + TPM buckets with `can_process` and an all-or-nothing `consume`, plus a history."""

    def __init__(self, rpm: float, tpm: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.requests = PlainBucket(rpm, rpm / 60, clock)
        self.tokens = PlainBucket(tpm, tpm / 60, clock)
        self.history: dict[str, int] = {}

    def can_process(self, estimated_tokens: int) -> bool:
        self.requests.refill()
        self.tokens.refill()
        return self.requests.available >= 1 and self.tokens.available >= estimated_tokens

    def consume(self, request_id: str, estimated_tokens: int) -> bool:
        if not self.can_process(estimated_tokens):
            return False
        self.requests.available -= 1
        self.tokens.available -= estimated_tokens
        self.history[request_id] = estimated_tokens
        return True
