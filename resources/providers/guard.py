"""The call guard every provider request goes through.

Neither SDK retries the way billing needs (Stripe retries only when asked and
ignores Retry-After; Polar never retries), so the policy lives here, once:
retries with exponential backoff and jitter on 5xx, timeouts, connection errors
and 429 (honouring Retry-After), a circuit breaker, and a client-side token-bucket
rate limiter. Clock, sleep and jitter are injectable so the policy is tested
without waiting."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from resources.providers.base import ProviderUnavailable

T = TypeVar("T")


class Retryable(Exception):
    """A failure worth retrying; `retry_after` (seconds) when the provider said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    """Token bucket shared by every thread talking to one provider."""

    def __init__(
        self,
        per_second: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.per_second = per_second
        # A quarter-second burst lets the sender catch up after ledger writes; real
        # providers (and the sandbox) allow at least a second's worth.
        self.capacity = burst if burst is not None else max(1.0, per_second / 4)
        self._tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self.per_second <= 0:
            return
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(
                    self.capacity, self._tokens + (now - self._updated) * self.per_second
                )
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self.per_second
            self._sleep(wait)


def _new_counters() -> dict[str, int]:
    return {"requests": 0, "retried": 0, "rate_limited": 0, "errors": 0}


@dataclass
class CallGuard:
    """Retries, backoff with jitter, Retry-After, and a circuit breaker.

    Attempt n (0-based) that fails waits Retry-After when given, else
    min(max_delay_s, base_delay_s · 2ⁿ), plus a jitter in [0, backoff / 2]. After
    `breaker_threshold` consecutive failures (across calls) every call fails at once
    until one succeeds again."""

    provider: str
    limiter: RateLimiter
    max_attempts: int = 6
    base_delay_s: float = 0.05
    max_delay_s: float = 30.0
    breaker_threshold: int = 20
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[float, float], float] = random.uniform
    counters: dict[str, int] = field(default_factory=_new_counters)
    _consecutive_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, operation: Callable[[], T]) -> T:
        for attempt in range(self.max_attempts):
            if self._consecutive_failures >= self.breaker_threshold:
                raise ProviderUnavailable(
                    self.provider,
                    f"circuit open after {self._consecutive_failures} consecutive failed "
                    "requests; the provider looks down — re-run the partition later",
                )
            self.limiter.acquire()
            with self._lock:
                self.counters["requests"] += 1
            try:
                result = operation()
            except Retryable as error:
                last = attempt + 1 >= self.max_attempts
                self._count_failure(error, retried=not last)
                if last:
                    raise ProviderUnavailable(
                        self.provider, f"gave up after {self.max_attempts} attempts: {error}"
                    ) from None
                self.sleep(self.delay(attempt, error.retry_after))
                continue
            with self._lock:
                self._consecutive_failures = 0
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based)."""
        backoff = min(self.max_delay_s, self.base_delay_s * 2**attempt)
        wait = retry_after if retry_after is not None else backoff
        return wait + self.jitter(0, backoff / 2)

    def _count_failure(self, error: Retryable, *, retried: bool) -> None:
        with self._lock:
            self._consecutive_failures += 1
            self.counters["errors"] += 1
            if error.retry_after is not None:
                self.counters["rate_limited"] += 1
            if retried:
                self.counters["retried"] += 1
