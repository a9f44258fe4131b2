"""Stripe, on the official SDK: meter events (v1), cancels (meter event
adjustments), event summaries and subscriptions for read-back, customer-balance
credits. Writes and reads have their own rate limits, so their own guards."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar
from uuid import uuid4

import stripe

from resources.calendar import day_bounds_epoch
from resources.providers.base import (
    CorrectionMethod,
    CreditResult,
    Provider,
    ProviderError,
    ProviderInvoice,
    ProviderPlan,
    RecordedUsage,
    Rejected,
    SendOutcome,
    SendStatus,
    UsageEvent,
    redact_secrets,
)
from resources.providers.guard import CallGuard, RateLimiter, Retryable

T = TypeVar("T")

STRIPE_EVENT_NAME = "tally_instance_seconds_{tier}"


def _fresh_key(prefix: str) -> str:
    """An Idempotency-Key for one attempt. Stripe saves a keyed request's answer, a
    500 included, and replays it to every retry with that key for 24 h, so retries
    need their own; what keeps a retry from counting twice is the meter event's
    identifier (deduped by Stripe), a cancel being a no-op the second time, and
    `find_credit` before a credit."""
    return f"{prefix}:{uuid4().hex[:16]}"


def _retry_after(headers: Any) -> float | None:
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


def _params(params: dict[str, Any]) -> Any:
    """A copy of list parameters built at run time (the SDK types them as TypedDicts)."""
    return dict(params)


def _stripe_metadata(obj: Any, key: str, *, container: bool = False) -> Any:
    """`obj.metadata[key]` (or `obj[key]` when `container`) of a StripeObject, else None
    (StripeObjects are not dicts: no .get)."""
    try:
        source = obj if container else obj.metadata
        return source[key] if source is not None else None
    except (KeyError, AttributeError):
        return None


class StripeProvider:
    name = Provider.STRIPE

    def __init__(
        self,
        api_key: str,
        api_base: str | None,
        writes_per_s: float,
        concurrency: int = 8,
        reads_per_s: float = 100.0,
        read_concurrency: int = 16,
    ) -> None:
        self._key = api_key
        bases = None
        if api_base:
            # Override every base or the v2 meter-event stream escapes to the internet.
            bases = {
                name: api_base.rstrip("/") for name in ("api", "meter_events", "files", "connect")
            }
        self.client = stripe.StripeClient(
            api_key,
            base_addresses=bases,  # type: ignore[arg-type]
            max_network_retries=0,
            http_client=stripe.HTTPXClient(timeout=30, allow_sync_methods=True),
        )
        self.write_guard = CallGuard(self.name, RateLimiter(writes_per_s))
        self.read_guard = CallGuard(self.name, RateLimiter(reads_per_s))
        self.concurrency = concurrency
        self.read_concurrency = max(1, read_concurrency)
        self._meters_ready: set[str] = set()

    # -- the guard ---------------------------------------------------------------

    def _guarded(self, operation: Callable[[], T], guard: CallGuard) -> T:
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

        return guard.call(attempt)

    def _write(self, operation: Callable[[], T]) -> T:
        return self._guarded(operation, self.write_guard)

    def _read(self, operation: Callable[[], T]) -> T:
        return self._guarded(operation, self.read_guard)

    def _message(self, error: Exception) -> str:
        text = getattr(error, "user_message", None) or str(error) or type(error).__name__
        return redact_secrets(text, self._key)

    def _rejected(self, error: Exception) -> Rejected:
        return Rejected(self.name, self._message(error))

    # -- push --------------------------------------------------------------------

    def ensure_meters(self, tiers: Iterable[str]) -> None:
        wanted = {STRIPE_EVENT_NAME.format(tier=tier) for tier in tiers} - self._meters_ready
        if not wanted:
            return
        existing = {
            meter.event_name
            for meter in self._write(
                lambda: self.client.v1.billing.meters.list({"limit": 100})
            ).auto_paging_iter()
        }
        for event_name in sorted(wanted - existing):
            try:
                self._write(partial(self._create_meter, event_name))
            except stripe.StripeError as error:
                # A retry after a lost answer finds the meter made by the first attempt.
                if getattr(error, "code", None) != "resource_already_exists":
                    raise
        self._meters_ready |= wanted

    def _create_meter(self, event_name: str) -> Any:
        return self.client.v1.billing.meters.create(
            {
                "display_name": f"Instance seconds ({event_name.rsplit('_', 1)[-1]})",
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "value_settings": {"event_payload_key": "value"},
            },
            {"idempotency_key": _fresh_key(f"tally-meter-{event_name}")},
        )

    def _send_one(self, event: UsageEvent) -> SendOutcome:
        params: Any = {
            "event_name": STRIPE_EVENT_NAME.format(tier=event.tier),
            "identifier": event.identifier,
            "timestamp": event.timestamp,
            "payload": {"stripe_customer_id": event.customer_id, "value": str(event.seconds)},
        }
        try:
            self._write(
                lambda: self.client.v1.billing.meter_events.create(
                    params, {"idempotency_key": _fresh_key(event.identifier)}
                )
            )
        except stripe.StripeError as error:
            if _is_duplicate(error):
                return SendOutcome(event.identifier, SendStatus.DUPLICATE)
            return SendOutcome(event.identifier, SendStatus.REJECTED, self._message(error))
        except ProviderError as error:  # retries exhausted, circuit open: unknown
            return SendOutcome(event.identifier, SendStatus.UNANSWERED, str(error))
        return SendOutcome(event.identifier, SendStatus.SENT)

    def send(self, events: list[UsageEvent]) -> list[SendOutcome]:
        if len(events) <= 1:
            return [self._send_one(event) for event in events]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._send_one, events))

    def cancel(self, event: UsageEvent) -> str:
        """'cancelled', or 'expired' when Stripe no longer allows it (> 24 h)."""
        try:
            self._write(
                lambda: self.client.v1.billing.meter_event_adjustments.create(
                    {
                        "event_name": STRIPE_EVENT_NAME.format(tier=event.tier),
                        "type": "cancel",
                        "cancel": {"identifier": event.identifier},
                    },
                    {"idempotency_key": _fresh_key(f"cancel-{event.identifier}")},
                )
            )
        except stripe.StripeError as error:
            return f"expired: {self._message(error)}"
        return "cancelled"

    # -- read-back ---------------------------------------------------------------

    def tier_meters(self, tiers: Iterable[str]) -> dict[str, str]:
        """tier → meter id for the tiers whose meter exists (Stripe refuses events
        without a meter, so a missing meter holds nothing)."""
        wanted = {STRIPE_EVENT_NAME.format(tier=tier): tier for tier in tiers}
        found: dict[str, str] = {}
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._read(partial(self.client.v1.billing.meters.list, _params(params)))
            for meter in page.data:
                tier = wanted.get(meter.event_name)
                if tier and meter.status == "active":
                    found.setdefault(tier, meter.id)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id

    def _summary(self, meter_id: str, customer: str, start: int, end: int) -> int:
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
        """One event-summaries call per (customer, meter) over [day, next day). Stripe
        meters are made by the push (`ensure_meters`); a missing one holds nothing."""
        before = self.read_guard.counters["requests"]
        meters = self.tier_meters(tiers)
        start, end = day_bounds_epoch(usage_date)
        pairs = [(customer, tier) for customer in sorted(set(customers)) for tier in meters]

        def one(pair: tuple[str, str]) -> tuple[tuple[str, str], int]:
            return pair, self._summary(meters[pair[1]], pair[0], start, end)

        with ThreadPoolExecutor(max_workers=self.read_concurrency) as pool:
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
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._read(partial(self.client.v1.subscriptions.list, _params(params)))
            for subscription in page.data:
                customer = subscription.customer
                customer_id = customer if isinstance(customer, str) else customer.id
                if customer_id not in wanted or customer_id in found:
                    continue
                plan = _stripe_metadata(subscription, "plan")
                items = _stripe_metadata(subscription, "items", container=True)
                items = items.data if items is not None else []
                if not plan and items:
                    plan = _stripe_metadata(items[0], "plan") or items[0].price.lookup_key
                found[customer_id] = ProviderPlan(customer_id, plan, subscription.status)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id

    # -- credits -----------------------------------------------------------------

    def find_credit(self, customer_id: str, proposal_id: int, pages: int = 5) -> str | None:
        """A balance transaction already made for this proposal (metadata
        tally_proposal_id), in the customer's latest `pages` × 100 transactions."""
        params: dict[str, Any] = {"limit": 100}
        for _ in range(pages):
            try:
                page = self._read(
                    partial(
                        self.client.v1.customers.balance_transactions.list,
                        customer_id,
                        _params(params),
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
        """A negative customer balance transaction (it reduces the next invoice),
        tagged with metadata tally_proposal_id: every attempt first looks for one
        already made for the proposal (`find_credit`), so a retry after a lost answer,
        or a re-run days later, never credits twice."""
        if amount_cents <= 0:
            raise Rejected(self.name, f"credit amount must be positive, got {amount_cents} cents")
        existing = self.find_credit(customer_id, proposal_id)
        if existing:
            return CreditResult(
                CorrectionMethod.STRIPE_BALANCE_TRANSACTION, existing, "found at Stripe"
            )

        def attempt() -> Any:
            # Each attempt looks first: an earlier attempt whose answer was lost may
            # have made the transaction (its own key would only replay a saved 5xx).
            found = self.find_credit(customer_id, proposal_id)
            if found:
                return found
            return self.client.v1.customers.balance_transactions.create(
                customer_id,
                {
                    "amount": -amount_cents,
                    "currency": currency,
                    "description": description[:350],
                    "metadata": {"tally_proposal_id": str(proposal_id)},
                },
                {"idempotency_key": _fresh_key(f"tally-credit-{proposal_id}")},
            ).id

        try:
            reference = self._write(attempt)
        except stripe.StripeError as error:
            raise self._rejected(error) from None
        return CreditResult(CorrectionMethod.STRIPE_BALANCE_TRANSACTION, reference)

    # -- doctor ------------------------------------------------------------------

    # -- customers and invoices ----------------------------------------------------

    def _all(self, lister: Callable[[Any], Any], params: dict[str, Any]) -> Iterable[Any]:
        """Every object of a Stripe list, 100 per page."""
        params = {"limit": 100, **params}
        while True:
            page = self._read(partial(lister, _params(params)))
            yield from page.data
            if not page.has_more or not page.data:
                return
            params["starting_after"] = page.data[-1].id

    def existing_customers(self, customers: Iterable[str]) -> set[str]:
        wanted = set(customers)
        return {c.id for c in self._all(self.client.v1.customers.list, {}) if c.id in wanted}

    def finalized_invoices(
        self, customers: Iterable[str], tiers: Iterable[str]
    ) -> list[ProviderInvoice]:
        """Finalized invoices of `customers`; a line is a tier's when its subscription
        item's price is metered by that tier's meter."""
        wanted = set(customers)
        if not wanted:
            return []
        meter_tier = {meter: tier for tier, meter in self.tier_meters(tiers).items()}
        item_tier: dict[str, str] = {}
        for subscription in self._all(self.client.v1.subscriptions.list, {"status": "all"}):
            items = _stripe_metadata(subscription, "items", container=True)
            for item in items.data if items is not None else []:
                recurring = getattr(item.price, "recurring", None)
                meter = getattr(recurring, "meter", None) if recurring else None
                if meter in meter_tier:
                    item_tier[item.id] = meter_tier[meter]
        found: list[ProviderInvoice] = []
        for invoice in self._all(self.client.v1.invoices.list, {}):
            customer = invoice.customer if isinstance(invoice.customer, str) else None
            finalized = invoice.status_transitions.finalized_at
            if customer not in wanted or finalized is None or customer is None:
                continue
            seconds: dict[str, int] = {}
            for line in invoice.lines.data:
                parent = getattr(line, "parent", None)
                details = getattr(parent, "subscription_item_details", None) if parent else None
                tier = item_tier.get(getattr(details, "subscription_item", None) or "")
                if tier is not None:
                    seconds[tier] = seconds.get(tier, 0) + int(line.quantity or 0)
            found.append(
                ProviderInvoice(
                    customer,
                    invoice.id,
                    dt.datetime.fromtimestamp(invoice.period_start, dt.UTC),
                    dt.datetime.fromtimestamp(invoice.period_end, dt.UTC),
                    dt.datetime.fromtimestamp(finalized, dt.UTC),
                    seconds,
                )
            )
        return found

    def ping(self) -> None:
        try:
            self._read(lambda: self.client.v1.billing.meters.list({"limit": 1}))
        except stripe.StripeError as error:
            raise self._rejected(error) from None

    # -- counters ----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return dict(self.write_guard.counters)

    def read_stats(self) -> dict[str, int]:
        return dict(self.read_guard.counters)
