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

from dagster import ConfigurableResource

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

    def _guarded(self, operation: Callable[[], T], guard: CallGuard | None = None) -> T:
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

        return (guard or self.guard).call(attempt)

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
# Reads (reconciliation) and credits
# ---------------------------------------------------------------------------

POLAR_SUBSCRIPTION_LIVE = ("active", "trialing", "past_due")


@dataclass
class RecordedUsage:
    """What one provider holds for one usage day.

    seconds: (customer_id, tier) → seconds, non-zero only. exact: the keys read for
    that customer alone (the rest were inferred from a group total equal to the
    ledger). unread_tiers: tiers that could not be read (Polar meter missing in
    report-only). unattributed: seconds the provider holds for customers tally does
    not know (Polar root total minus the groups' totals), when measured."""

    seconds: dict[tuple[str, str], int] = field(default_factory=dict)
    exact: set[tuple[str, str]] = field(default_factory=set)
    unread_tiers: list[str] = field(default_factory=list)
    unattributed: int = 0
    calls: int = 0


@dataclass(frozen=True)
class ProviderPlan:
    customer_id: str
    plan: str | None
    status: str


@dataclass(frozen=True)
class CreditResult:
    method: str  # "stripe_balance_transaction" | "manual"
    reference: str | None
    note: str = ""


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), max(1, size))]


def narrow_down(
    customers: Iterable[str],
    expected: dict[str, int],
    total_of: Callable[[list[str] | None], int],
    group_size: int = 100,
) -> tuple[dict[str, int], set[str], int]:
    """Find each customer's recorded value with few aggregate queries.

    `total_of(None)` is the provider's total for everybody, `total_of(group)` for a
    group of customers at once. Where a total equals what the ledger says was sent
    (`expected`), every member is taken to hold its expected value; where it differs,
    the group is split in halves — only the left half is asked, the right half is the
    difference — down to single customers. Returns (values, customers read exactly,
    seconds held for customers outside `customers`). Offsetting errors inside one
    group (one customer +x, another −x) cancel out and stay invisible to the sums."""
    members = sorted(set(customers))
    values: dict[str, int] = {}
    exact: set[str] = set()
    if not members:
        return values, exact, 0

    def want(group: list[str]) -> int:
        return sum(expected.get(customer, 0) for customer in group)

    root = total_of(None)
    if root == want(members):
        return {customer: expected.get(customer, 0) for customer in members}, exact, 0

    def split(group: list[str], total: int) -> None:
        while True:
            if total == want(group):
                values.update({customer: expected.get(customer, 0) for customer in group})
                if len(group) == 1:
                    exact.add(group[0])
                return
            if len(group) == 1:
                values[group[0]] = total
                exact.add(group[0])
                return
            middle = len(group) // 2
            left, right = group[:middle], group[middle:]
            left_total = total_of(left)
            split(left, left_total)
            group, total = right, total - left_total

    attributed = 0
    for chunk in _chunks(members, group_size):
        chunk_total = total_of(chunk)
        attributed += chunk_total
        split(chunk, chunk_total)
    return values, exact, root - attributed


def _day_window(usage_date: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(usage_date, dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def _stripe_metadata(obj, key: str, *, container: bool = False):
    """`obj.metadata[key]` (or `obj[key]` when `container`) of a StripeObject, else None
    (StripeObjects are not dicts: no .get)."""
    try:
        source = obj if container else obj.metadata
        return source[key] if source is not None else None
    except (KeyError, AttributeError):
        return None


class StripeReader:
    """Stripe reads (meters, event summaries, subscriptions) within the read limit,
    and customer-balance credits; wraps a StripeProvider (same client, same retry
    policy; reads have their own rate limiter)."""

    name = "stripe"

    def __init__(self, provider: StripeProvider, reads_per_s: float, concurrency: int) -> None:
        self.provider = provider
        self.client = provider.client
        self.read_guard = CallGuard("stripe", RateLimiter(reads_per_s))
        self.concurrency = max(1, concurrency)

    def _read(self, operation: Callable[[], T]) -> T:
        return self.provider._guarded(operation, self.read_guard)

    def _rejected(self, error: Exception) -> Rejected:
        return Rejected("stripe", self.provider._message(error))

    def tier_meters(self, tiers: Iterable[str]) -> dict[str, str]:
        """tier → meter id for the tiers whose meter exists (Stripe refuses events
        without a meter, so a missing meter holds nothing)."""
        wanted = {STRIPE_EVENT_NAME.format(tier=tier): tier for tier in tiers}
        found: dict[str, str] = {}
        params: dict = {"limit": 100}
        while True:
            page = self._read(
                lambda params=dict(params): self.client.v1.billing.meters.list(params)
            )
            for meter in page.data:
                tier = wanted.get(meter.event_name)
                if tier and meter.status == "active":
                    found.setdefault(tier, meter.id)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id

    def _summary(self, meter_id: str, customer: str, start: int, end: int) -> int:
        stripe = self.provider._stripe
        try:
            page = self._read(
                lambda: self.client.v1.billing.meters.event_summaries.list(
                    meter_id, {"customer": customer, "start_time": start, "end_time": end}
                )
            )
        except stripe.InvalidRequestError as error:
            if error.http_status == 404:  # no such customer: it holds nothing
                return 0
            raise self._rejected(error) from None
        except stripe.StripeError as error:
            raise self._rejected(error) from None
        return int(round(sum(float(summary.aggregated_value) for summary in page.data)))

    def recorded_usage(
        self,
        usage_date: dt.date,
        customers: Iterable[str],
        tiers: Iterable[str],
        expected: dict[tuple[str, str], int],
        *,
        create_meters: bool = False,
    ) -> RecordedUsage:
        """One event-summaries call per (customer, meter) over [day, next day)."""
        from concurrent.futures import ThreadPoolExecutor

        before = self.read_guard.counters["requests"]
        meters = self.tier_meters(tiers)
        start, end = (int(moment.timestamp()) for moment in _day_window(usage_date))
        pairs = [(customer, tier) for customer in sorted(set(customers)) for tier in meters]

        def one(pair: tuple[str, str]) -> tuple[tuple[str, str], int]:
            return pair, self._summary(meters[pair[1]], pair[0], start, end)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(one, pairs))
        return RecordedUsage(
            seconds={pair: value for pair, value in answers if value},
            exact={pair for pair, _ in answers},
            calls=self.read_guard.counters["requests"] - before,
        )

    def plans(self, customers: Iterable[str]) -> dict[str, ProviderPlan]:
        """The plan of each customer's live subscription (metadata `plan`, else the
        price's lookup key), listed 100 at a time."""
        wanted = set(customers)
        found: dict[str, ProviderPlan] = {}
        params: dict = {"limit": 100}
        while True:
            page = self._read(lambda params=dict(params): self.client.v1.subscriptions.list(params))
            for subscription in page.data:
                customer = subscription.customer
                customer = customer if isinstance(customer, str) else customer.id
                if customer not in wanted or customer in found:
                    continue
                plan = _stripe_metadata(subscription, "plan")
                items = _stripe_metadata(subscription, "items", container=True)
                items = items.data if items is not None else []
                if not plan and items:
                    plan = _stripe_metadata(items[0], "plan") or items[0].price.lookup_key
                found[customer] = ProviderPlan(customer, plan, subscription.status)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id

    def find_credit(self, customer_id: str, proposal_id: int, pages: int = 5) -> str | None:
        """A balance transaction already made for this proposal (metadata
        tally_proposal_id), in the customer's latest `pages` × 100 transactions."""
        stripe = self.provider._stripe
        params: dict = {"limit": 100}
        for _ in range(pages):
            try:
                page = self._read(
                    lambda params=dict(params): self.client.v1.customers.balance_transactions.list(
                        customer_id, params
                    )
                )
            except stripe.StripeError as error:
                raise self._rejected(error) from None
            for transaction in page.data:
                if _stripe_metadata(transaction, "tally_proposal_id") == str(proposal_id):
                    return transaction.id
            if not page.has_more or not page.data:
                return None
            params["starting_after"] = page.data[-1].id
        return None

    def apply_credit(
        self, customer_id: str, amount_cents: int, currency: str, description: str, proposal_id: int
    ) -> CreditResult:
        """A negative customer balance transaction (it reduces the next invoice).
        Idempotency-Key `tally-credit-{id}` makes a retry after a lost answer replay
        the first transaction; `find_credit` covers retries past Stripe's 24 h key
        lifetime."""
        stripe = self.provider._stripe
        if amount_cents <= 0:
            raise Rejected("stripe", f"credit amount must be positive, got {amount_cents} cents")
        existing = self.find_credit(customer_id, proposal_id)
        if existing:
            return CreditResult("stripe_balance_transaction", existing, "found at Stripe")
        try:
            transaction = self.provider._guarded(
                lambda: self.client.v1.customers.balance_transactions.create(
                    customer_id,
                    {
                        "amount": -amount_cents,
                        "currency": currency,
                        "description": description[:350],
                        "metadata": {"tally_proposal_id": str(proposal_id)},
                    },
                    {"idempotency_key": f"tally-credit-{proposal_id}"},
                )
            )
        except stripe.StripeError as error:
            raise self._rejected(error) from None
        return CreditResult("stripe_balance_transaction", transaction.id)

    def read_stats(self) -> dict[str, int]:
        return dict(self.read_guard.counters)


def _polar_meter_tier(meter) -> str | None:
    """The tier of a tally meter (name = tally.instance_usage AND tier = X, sum of
    seconds), else None."""
    if getattr(meter, "archived_at", None):
        return None
    flt = getattr(meter, "filter", None)
    aggregation = getattr(meter, "aggregation", None)
    if flt is None or getattr(flt, "conjunction", None) != "and":
        return None
    if (
        getattr(aggregation, "func", None) != "sum"
        or getattr(aggregation, "property", "").removeprefix("metadata.") != "seconds"
    ):
        return None
    named, tier = False, None
    for clause in flt.clauses:
        prop = getattr(clause, "property", None)
        if prop is None or getattr(clause, "operator", None) != "eq":
            return None  # nested filters or other operators: not one of ours
        if prop == "name" and clause.value == POLAR_EVENT_NAME:
            named = True
        elif prop.removeprefix("metadata.") == "tier" and isinstance(clause.value, str):
            tier = clause.value
        else:
            return None
    return tier if named else None


class PolarReader:
    """Polar reads (meters, quantities, subscriptions) through a PolarProvider's
    client and its single guard (Polar's limit covers all requests)."""

    name = "polar"

    def __init__(self, provider: PolarProvider, group_size: int) -> None:
        self.provider = provider
        self.client = provider.client
        self.group_size = max(1, group_size)

    def _call(self, operation: Callable[[], T]) -> T:
        from polar.base import PolarClientError

        try:
            return self.provider._guarded(operation)
        except PolarClientError as error:
            raise Rejected("polar", redact_secrets(str(error), self.provider._token)) from None

    def _requests(self) -> int:
        return self.provider.guard.counters["requests"]

    def tier_meters(self, tiers: Iterable[str], *, create: bool) -> dict[str, str]:
        """tier → meter id; creates the missing tier meters when `create`."""
        wanted = list(dict.fromkeys(tiers))
        found: dict[str, str] = {}
        page = 1
        while True:
            answer = self._call(
                lambda page=page: self.client.meters.list(
                    page=page, limit=100, is_archived=False, sorting=["created_at"]
                )
            )
            for meter in answer.items:
                tier = _polar_meter_tier(meter)
                if tier in wanted:
                    found.setdefault(tier, meter.id)
            if page >= (answer.pagination.max_page or 1):
                break
            page += 1
        for tier in wanted:
            if tier in found or not create:
                continue
            meter = self._call(
                lambda tier=tier: self.client.meters.create(
                    name=f"tally instance seconds ({tier})",
                    filter={
                        "conjunction": "and",
                        "clauses": [
                            {"property": "name", "operator": "eq", "value": POLAR_EVENT_NAME},
                            {"property": "metadata.tier", "operator": "eq", "value": tier},
                        ],
                    },
                    aggregation={"func": "sum", "property": "metadata.seconds"},
                    metadata={"tally_tier": tier},
                )
            )
            found[tier] = meter.id
        return found

    def _quantity(self, meter_id: str, usage_date: dt.date, customers: list[str] | None) -> int:
        day = usage_date.isoformat()
        filters = {} if customers is None else {"external_customer_id": list(customers)}
        answer = self._call(
            lambda: self.client.meters.quantities(
                meter_id,
                start_timestamp=f"{day}T00:00:00Z",
                end_timestamp=f"{day}T23:59:59Z",
                interval="day",
                **filters,
            )
        )
        return int(
            round(sum(item.quantity for item in answer.quantities if item.timestamp[:10] == day))
        )

    def recorded_usage(
        self,
        usage_date: dt.date,
        customers: Iterable[str],
        tiers: Iterable[str],
        expected: dict[tuple[str, str], int],
        *,
        create_meters: bool = True,
    ) -> RecordedUsage:
        """Per tier meter: the whole day at once, then groups of customers, split only
        where a total differs from the ledger (`narrow_down`)."""
        before = self._requests()
        members = sorted(set(customers))
        tiers = list(dict.fromkeys(tiers))
        result = RecordedUsage()
        if not members:
            return result
        meters = self.tier_meters(tiers, create=create_meters)
        result.unread_tiers = [tier for tier in tiers if tier not in meters]
        for tier, meter_id in meters.items():
            values, exact, unattributed = narrow_down(
                members,
                {customer: expected.get((customer, tier), 0) for customer in members},
                lambda group, meter_id=meter_id: self._quantity(meter_id, usage_date, group),
                self.group_size,
            )
            result.seconds.update(
                {(customer, tier): value for customer, value in values.items() if value}
            )
            result.exact.update((customer, tier) for customer in exact)
            result.unattributed += unattributed
        result.calls = self._requests() - before
        return result

    def plans(self, customers: Iterable[str]) -> dict[str, ProviderPlan]:
        """The plan of each customer's live subscription (metadata `plan`, else the
        product's metadata `plan`, else the product name), 100 per page."""
        wanted = set(customers)
        found: dict[str, ProviderPlan] = {}
        page = 1
        while True:
            answer = self._call(
                lambda page=page: self.client.subscriptions.list(page=page, limit=100)
            )
            for subscription in answer.items:
                customer = getattr(subscription.customer, "external_id", None)
                if customer not in wanted or subscription.status not in POLAR_SUBSCRIPTION_LIVE:
                    continue
                product = subscription.product
                plan = (subscription.metadata or {}).get("plan") or (
                    (getattr(product, "metadata", None) or {}).get("plan")
                    or getattr(product, "name", None)
                )
                found.setdefault(customer, ProviderPlan(customer, plan, subscription.status))
            if page >= (answer.pagination.max_page or 1):
                return found
            page += 1

    def apply_credit(
        self, customer_id: str, amount_cents: int, currency: str, description: str, proposal_id: int
    ) -> CreditResult:
        """Polar has no customer-balance credit in its API (the sandbox serves none):
        the correction is recorded for a person to apply in the Polar dashboard."""
        return CreditResult(
            "manual",
            None,
            "Polar's API has no customer credit; refund or discount "
            f"{amount_cents / 100:.2f} {currency.upper()} for customer {customer_id} "
            "in the Polar dashboard",
        )

    def read_stats(self) -> dict[str, int]:
        return dict(self.provider.guard.counters)


UsageReader = StripeReader | PolarReader


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
    stripe_concurrency: int = 16
    # Reads (reconciliation): Stripe's live read limit is ~100/s; Polar's 500/min
    # covers every request. Polar customers are asked for in groups of this size.
    stripe_reads_per_second: float = 100.0
    stripe_read_concurrency: int = 16
    polar_group_size: int = 100

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

    def reader(self, provider: str) -> UsageReader:
        """The provider's reader (reconciliation reads and credits)."""
        client = self.client(provider)
        if isinstance(client, StripeProvider):
            return StripeReader(client, self.stripe_reads_per_second, self.stripe_read_concurrency)
        assert isinstance(client, PolarProvider)
        return PolarReader(client, self.polar_group_size)
