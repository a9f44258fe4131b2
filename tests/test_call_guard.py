"""The call guard and the rate limiter, on a fake clock: no network, no waiting."""

from __future__ import annotations

import pytest

from resources.providers.base import ProviderUnavailable
from resources.providers.guard import CallGuard, RateLimiter, Retryable


class FakeClock:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _guard(clock: FakeClock, **overrides: object) -> CallGuard:
    settings: dict = {
        "provider": "stripe",
        "limiter": RateLimiter(0),  # unlimited: these tests are about retries
        "sleep": clock.sleep,
        "jitter": lambda low, high: high,  # the largest jitter, to test the bound
    }
    settings.update(overrides)
    return CallGuard(**settings)


def _failing(times: int, retry_after: float | None = None):
    calls = {"n": 0}

    def operation() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise Retryable("503 unavailable", retry_after)
        return "ok"

    return operation, calls


def test_backoff_doubles_with_jitter_up_to_half_the_backoff() -> None:
    clock = FakeClock()
    guard = _guard(clock, base_delay_s=0.1)
    operation, calls = _failing(3)
    assert guard.call(operation) == "ok"
    assert calls["n"] == 4
    # 0.1, 0.2, 0.4 plus the maximal jitter of half of each.
    assert clock.sleeps == pytest.approx([0.15, 0.3, 0.6])
    assert guard.counters == {"requests": 4, "retried": 3, "rate_limited": 0, "errors": 3}


def test_backoff_is_capped_and_jitter_never_negative() -> None:
    clock = FakeClock()
    guard = _guard(clock, base_delay_s=1.0, max_delay_s=2.0, jitter=lambda low, high: low)
    operation, _ = _failing(4)
    guard.call(operation)
    assert clock.sleeps == [1.0, 2.0, 2.0, 2.0]


def test_retry_after_takes_precedence_over_backoff() -> None:
    clock = FakeClock()
    guard = _guard(clock, base_delay_s=0.05, jitter=lambda low, high: 0.0)
    operation, _ = _failing(2, retry_after=7.0)
    assert guard.call(operation) == "ok"
    assert clock.sleeps == [7.0, 7.0]
    assert guard.counters["rate_limited"] == 2


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    clock = FakeClock()
    guard = _guard(clock, max_attempts=3)
    operation, calls = _failing(10)
    with pytest.raises(ProviderUnavailable, match="stripe: gave up after 3 attempts: 503"):
        guard.call(operation)
    assert calls["n"] == 3
    assert len(clock.sleeps) == 2  # no sleep after the last attempt
    assert guard.counters == {"requests": 3, "retried": 2, "rate_limited": 0, "errors": 3}


def test_other_exceptions_are_not_retried() -> None:
    clock = FakeClock()
    guard = _guard(clock)

    def operation() -> None:
        raise ValueError("a 4xx the provider wrapper re-raises")

    with pytest.raises(ValueError):
        guard.call(operation)
    assert guard.counters["requests"] == 1 and clock.sleeps == []


def test_breaker_opens_after_consecutive_failures_and_resets_on_success() -> None:
    clock = FakeClock()
    guard = _guard(clock, max_attempts=2, breaker_threshold=4)
    down, _ = _failing(100)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable, match="gave up"):
            guard.call(down)
    # Four consecutive failures: the next call fails at once, without a request.
    requests = guard.counters["requests"]
    with pytest.raises(ProviderUnavailable, match="circuit open after 4 consecutive"):
        guard.call(lambda: "never called")
    assert guard.counters["requests"] == requests

    # Below the threshold, one success resets the count.
    guard = _guard(clock, max_attempts=5, breaker_threshold=4)
    flaky, _ = _failing(3)
    assert guard.call(flaky) == "ok"
    again, _ = _failing(3)
    assert guard.call(again) == "ok"  # would be open had the first three stayed counted


def test_token_bucket_allows_its_burst_then_paces() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, burst=3, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        limiter.acquire()
    assert clock.sleeps == []  # the burst is free
    for _ in range(5):
        limiter.acquire()
    # Then one token every 1/10 s.
    assert clock.sleeps == pytest.approx([0.1] * 5)
    assert clock.now == pytest.approx(0.5)


def test_token_bucket_refills_while_idle_but_not_beyond_capacity() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4, clock=clock, sleep=clock.sleep)
    assert limiter.capacity == 1.0  # default burst: a quarter second, at least one
    limiter.acquire()
    clock.now += 60  # a minute idle refills one token, not 240
    limiter.acquire()
    assert clock.sleeps == []
    limiter.acquire()
    assert clock.sleeps == pytest.approx([0.25])


def test_rate_zero_means_unlimited() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        limiter.acquire()
    assert clock.sleeps == []
