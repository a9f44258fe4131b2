"""Billing providers behind one interface, on the real SDKs.

Neither SDK retries the way billing needs (Stripe retries only when asked and
ignores Retry-After; Polar never retries), so the policy lives here, once:
retries with exponential backoff and jitter on 5xx, timeouts, connection errors
and 429 (honouring Retry-After), a circuit breaker, and a client-side token-bucket
rate limiter. Keys never appear in messages: errors carry the provider's own
message, which never echoes the key, and `redact_secrets` scrubs anything that does.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from dagster import ConfigurableResource, EnvVar

T = TypeVar("T")

STRIPE_EVENT_NAME = "tally_instance_seconds_{tier}"
POLAR_EVENT_NAME = "tally.instance_usage"
STRIPE_MAX_EVENT_AGE = dt.timedelta(days=35)
_SECRET_PATTERN = re.compile(r"(sk|rk|pk)_(test|live)_[A-Za-z0-9]+|polar_[A-Za-z0-9_]+")


def redact_secrets(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERN.sub("[redacted]", text)


class ProviderError(Exception):
    """Base: `provider` names Stripe or Polar in every message."""

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider


class ProviderConfigError(ProviderError):
    """Missing key or base URL: the message names the environment variable."""


class Rejected(ProviderError):
    """The provider answered definitively that it did not store the request (4xx)."""


class ProviderUnavailable(ProviderError):
    """Retries exhausted or circuit open: the outcome of the last call is unknown."""


class Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class UsageEvent:
    identifier: str
    customer_id: str
    tier: str
    seconds: int
    usage_date: dt.date

    @property
    def timestamp(self) -> int:
        """Usage is stamped at noon UTC of its day (DESIGN §6)."""
        noon = dt.datetime.combine(self.usage_date, dt.time(12), tzinfo=dt.UTC)
        return int(noon.timestamp())


@dataclass
class SendOutcome:
    identifier: str
    status: str  # "sent" | "duplicate" | "rejected"
    detail: str = ""


class BillingProvider(Protocol):
    name: str

    def ensure_meters(self, tiers: Iterable[str]) -> None: ...

    def send(self, events: list[UsageEvent]) -> list[SendOutcome]: ...

    def cancel(self, event: UsageEvent) -> str: ...

    def stats(self) -> dict[str, int]: ...


# ---------------------------------------------------------------------------
# Retry policy, circuit breaker, rate limiter
# ---------------------------------------------------------------------------


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
        self.capacity = burst if burst is not None else max(1.0, per_second / 10)
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


@dataclass
class CallGuard:
    """Retries, backoff with jitter, Retry-After, and a circuit breaker."""

    provider: str
    limiter: RateLimiter
    max_attempts: int = 6
    base_delay_s: float = 0.05
    max_delay_s: float = 30.0
    breaker_threshold: int = 20
    sleep: Callable[[float], None] = time.sleep
    counters: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "retried": 0, "rate_limited": 0, "errors": 0}
    )
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
                with self._lock:
                    self._consecutive_failures += 1
                    self.counters["errors"] += 1
                    if error.retry_after is not None:
                        self.counters["rate_limited"] += 1
                    if attempt + 1 < self.max_attempts:
                        self.counters["retried"] += 1
                if attempt + 1 >= self.max_attempts:
                    raise ProviderUnavailable(
                        self.provider, f"gave up after {self.max_attempts} attempts: {error}"
                    ) from None
                backoff = min(self.max_delay_s, self.base_delay_s * 2**attempt)
                delay = error.retry_after if error.retry_after is not None else backoff
                self.sleep(delay + random.uniform(0, backoff / 2))
                continue
            with self._lock:
                self._consecutive_failures = 0
            return result
        raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------
# Stripe
# ---------------------------------------------------------------------------


def _require(value: str | None, variable: str, provider: str) -> str:
    if not value:
        raise ProviderConfigError(
            provider,
            f"{variable} is not set; export {variable}=… (tally demo sets it for the sandbox)",
        )
    return value


class StripeProvider:
    name = "stripe"

    def __init__(
        self, api_key: str, api_base: str | None, rate_per_s: float, concurrency: int = 8
    ) -> None:
        import stripe

        self._stripe = stripe
        self._key = api_key
        bases = None
        if api_base:
            # Override every base or the v2 meter-event stream escapes to the internet.
            bases = {
                name: api_base.rstrip("/") for name in ("api", "meter_events", "files", "connect")
            }
        self.client = stripe.StripeClient(
            api_key,
            base_addresses=bases,
            max_network_retries=0,
            http_client=stripe.HTTPXClient(timeout=30, allow_sync_methods=True),
        )
        self.guard = CallGuard("stripe", RateLimiter(rate_per_s))
        self.concurrency = concurrency
        self._meters_ready: set[str] = set()

    def _guarded(self, operation: Callable[[], T]) -> T:
        stripe = self._stripe

        def attempt() -> T:
            try:
                return operation()
            except stripe.RateLimitError as error:
                raise Retryable("429 rate limited", _retry_after(error.headers)) from None
            except (stripe.APIConnectionError, stripe.APIError) as error:
                raise Retryable(self._message(error)) from None
            except stripe.StripeError as error:
                status = error.http_status or 0
                if status >= 500 or status == 0:
                    raise Retryable(self._message(error)) from None
                raise

        return self.guard.call(attempt)

    def _message(self, error: Exception) -> str:
        text = getattr(error, "user_message", None) or str(error) or type(error).__name__
        return redact_secrets(text, self._key)

    def ensure_meters(self, tiers: Iterable[str]) -> None:
        wanted = {STRIPE_EVENT_NAME.format(tier=tier) for tier in tiers} - self._meters_ready
        if not wanted:
            return
        existing = {
            meter.event_name
            for meter in self._guarded(
                lambda: self.client.v1.billing.meters.list({"limit": 100})
            ).auto_paging_iter()
        }
        for event_name in sorted(wanted - existing):
            self._guarded(
                lambda name=event_name: self.client.v1.billing.meters.create(
                    {
                        "display_name": f"Instance seconds ({name.rsplit('_', 1)[-1]})",
                        "event_name": name,
                        "default_aggregation": {"formula": "sum"},
                        "customer_mapping": {
                            "event_payload_key": "stripe_customer_id",
                            "type": "by_id",
                        },
                        "value_settings": {"event_payload_key": "value"},
                    },
                    {"idempotency_key": f"tally-meter-{name}"},
                )
            )
        self._meters_ready |= wanted

    def _send_one(self, event: UsageEvent) -> SendOutcome:
        stripe = self._stripe
        params = {
            "event_name": STRIPE_EVENT_NAME.format(tier=event.tier),
            "identifier": event.identifier,
            "timestamp": event.timestamp,
            "payload": {"stripe_customer_id": event.customer_id, "value": str(event.seconds)},
        }
        try:
            self._guarded(
                lambda: self.client.v1.billing.meter_events.create(
                    params, {"idempotency_key": event.identifier}
                )
            )
        except stripe.StripeError as error:
            if _is_duplicate(error):
                return SendOutcome(event.identifier, "duplicate")
            return SendOutcome(event.identifier, "rejected", self._message(error))
        return SendOutcome(event.identifier, "sent")

    def send(self, events: list[UsageEvent]) -> list[SendOutcome]:
        from concurrent.futures import ThreadPoolExecutor

        if len(events) <= 1:
            return [self._send_one(event) for event in events]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._send_one, events))

    def cancel(self, event: UsageEvent) -> str:
        """'cancelled', or 'expired' when Stripe no longer allows it (> 24 h)."""
        stripe = self._stripe
        try:
            self._guarded(
                lambda: self.client.v1.billing.meter_event_adjustments.create(
                    {
                        "event_name": STRIPE_EVENT_NAME.format(tier=event.tier),
                        "type": "cancel",
                        "cancel": {"identifier": event.identifier},
                    },
                    {"idempotency_key": f"cancel-{event.identifier}"},
                )
            )
        except stripe.StripeError as error:
            return f"expired: {self._message(error)}"
        return "cancelled"

    def stats(self) -> dict[str, int]:
        return dict(self.guard.counters)


def _retry_after(headers) -> float | None:
    try:
        value = (headers or {}).get("retry-after") or (headers or {}).get("Retry-After")
        return float(value) if value is not None else 1.0
    except (TypeError, ValueError):
        return 1.0


def _is_duplicate(error: Exception) -> bool:
    """Stripe v1 answers a repeated identifier with a 400 whose message says the event
    already exists (no code); v2 uses code duplicate_meter_event. Both: delivered."""
    code = getattr(error, "code", None) or ""
    message = str(error).lower()
    return code == "duplicate_meter_event" or "already exists with identifier" in message


# ---------------------------------------------------------------------------
# Polar
# ---------------------------------------------------------------------------


class PolarProvider:
    name = "polar"

    def __init__(
        self, access_token: str, api_base: str | None, rate_per_minute: float, batch_size: int = 100
    ) -> None:
        from polar.v2026_10 import Polar

        self._token = access_token
        self.client = Polar(
            access_token=access_token, base_url=api_base.rstrip("/") if api_base else None
        )
        self.guard = CallGuard("polar", RateLimiter(rate_per_minute / 60, burst=1))
        self.batch_size = batch_size

    def _guarded(self, operation: Callable[[], T]) -> T:
        from polar.base import (
            PolarNetworkError,
            PolarRateLimitError,
            PolarServerError,
        )

        def attempt() -> T:
            try:
                return operation()
            except PolarRateLimitError as error:
                retry_after = error.retry_after if error.retry_after is not None else 1.0
                raise Retryable("429 rate limited", float(retry_after)) from None
            except (PolarNetworkError, PolarServerError) as error:
                raise Retryable(redact_secrets(str(error), self._token)) from None

        return self.guard.call(attempt)

    def ensure_meters(self, tiers: Iterable[str]) -> None:
        # Polar meters are defined on event name + metadata.tier and are created by
        # the account owner; ingestion does not depend on them existing.
        return None

    def send(self, events: list[UsageEvent]) -> list[SendOutcome]:
        from polar.base import PolarClientError

        outcomes: list[SendOutcome] = []
        for start in range(0, len(events), self.batch_size):
            batch = events[start : start + self.batch_size]
            payload = [
                {
                    "name": POLAR_EVENT_NAME,
                    "external_customer_id": event.customer_id,
                    "external_id": event.identifier,
                    "timestamp": dt.datetime.fromtimestamp(event.timestamp, dt.UTC).isoformat(),
                    "metadata": {
                        "tier": event.tier,
                        "seconds": event.seconds,
                        "usage_date": event.usage_date.isoformat(),
                    },
                }
                for event in batch
            ]
            try:
                self._guarded(lambda payload=payload: self.client.events.ingest(events=payload))
            except PolarClientError as error:
                detail = redact_secrets(str(error), self._token)
                outcomes.extend(
                    SendOutcome(event.identifier, "rejected", detail) for event in batch
                )
                continue
            # Polar's external_id dedupe is permanent: inserted or duplicate, the
            # event is recorded exactly once either way.
            outcomes.extend(SendOutcome(event.identifier, "sent") for event in batch)
        return outcomes

    def cancel(self, event: UsageEvent) -> str:
        return "unsupported: Polar events cannot be cancelled"

    def stats(self) -> dict[str, int]:
        return dict(self.guard.counters)


# ---------------------------------------------------------------------------
# Dagster resource
# ---------------------------------------------------------------------------


class ProvidersResource(ConfigurableResource):
    """Builds the provider clients from the environment (`STRIPE_API_KEY`,
    `STRIPE_API_BASE`, `POLAR_ACCESS_TOKEN`, `POLAR_API_BASE`)."""

    stripe_api_key: str = ""
    stripe_api_base: str = ""
    polar_access_token: str = ""
    polar_api_base: str = ""
    stripe_writes_per_second: float = 1000.0
    polar_requests_per_minute: float = 500.0
    polar_batch_size: int = 100
    stripe_concurrency: int = 8

    def client(self, provider: str) -> BillingProvider:
        if provider == "stripe":
            return StripeProvider(
                _require(
                    self.stripe_api_key or os.environ.get("STRIPE_API_KEY"),
                    "STRIPE_API_KEY",
                    "stripe",
                ),
                self.stripe_api_base or os.environ.get("STRIPE_API_BASE"),
                self.stripe_writes_per_second,
                self.stripe_concurrency,
            )
        if provider == "polar":
            return PolarProvider(
                _require(
                    self.polar_access_token or os.environ.get("POLAR_ACCESS_TOKEN"),
                    "POLAR_ACCESS_TOKEN",
                    "polar",
                ),
                self.polar_api_base or os.environ.get("POLAR_API_BASE"),
                self.polar_requests_per_minute,
                self.polar_batch_size,
            )
        raise ProviderConfigError(provider, "unknown provider; expected 'stripe' or 'polar'")


__all__ = ["EnvVar", "ProvidersResource"]
