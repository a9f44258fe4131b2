"""Polar, on the official SDK: event ingestion (external_id dedupe), meters and
meter quantities for read-back, subscriptions for plans. One guard: Polar's rate
limit covers every request."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar, cast

from polar.base import PolarClientError, PolarNetworkError, PolarRateLimitError, PolarServerError
from polar.v2026_10 import Polar

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
from resources.providers.narrowing import narrow_down

T = TypeVar("T")

POLAR_EVENT_NAME = "tally.instance_usage"
POLAR_SUBSCRIPTION_LIVE = ("active", "trialing", "past_due")


def _polar_meter_tier(meter: Any) -> str | None:
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


def _ingest_payload(event: UsageEvent) -> dict[str, Any]:
    return {
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


class PolarProvider:
    name = Provider.POLAR

    def __init__(
        self,
        access_token: str,
        api_base: str | None,
        rate_per_minute: float,
        batch_size: int = 100,
        group_size: int = 100,
    ) -> None:
        self._token = access_token
        self.client = Polar(
            access_token=access_token, base_url=api_base.rstrip("/") if api_base else None
        )
        self.guard = CallGuard(self.name, RateLimiter(rate_per_minute / 60, burst=1))
        self.batch_size = batch_size
        self.group_size = max(1, group_size)

    # -- the guard ---------------------------------------------------------------

    def _guarded(self, operation: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return operation()
            except PolarRateLimitError as error:
                retry_after = error.retry_after if error.retry_after is not None else 1.0
                raise Retryable("429 rate limited", float(retry_after)) from None
            except (PolarNetworkError, PolarServerError) as error:
                raise Retryable(redact_secrets(str(error), self._token)) from None

        return self.guard.call(attempt)

    def _call(self, operation: Callable[[], T]) -> T:
        """A guarded read; a 4xx becomes Rejected."""
        try:
            return self._guarded(operation)
        except PolarClientError as error:
            raise Rejected(self.name, redact_secrets(str(error), self._token)) from None

    # -- push --------------------------------------------------------------------

    def ensure_meters(self, tiers: Iterable[str]) -> None:
        # Polar meters are defined on event name + metadata.tier and are created by
        # the account owner; ingestion does not depend on them existing.
        return None

    def send(self, events: list[UsageEvent]) -> list[SendOutcome]:
        outcomes: list[SendOutcome] = []
        for start in range(0, len(events), self.batch_size):
            batch = events[start : start + self.batch_size]
            payload: Any = [_ingest_payload(event) for event in batch]
            try:
                self._guarded(partial(self.client.events.ingest, events=payload))
            except PolarClientError as error:
                detail = redact_secrets(str(error), self._token)
                outcomes.extend(
                    SendOutcome(event.identifier, SendStatus.REJECTED, detail) for event in batch
                )
                continue
            except ProviderError as error:  # retries exhausted, circuit open: unknown
                outcomes.extend(
                    SendOutcome(event.identifier, SendStatus.UNANSWERED, str(error))
                    for event in batch
                )
                continue
            # Polar's external_id dedupe is permanent: inserted or duplicate, the
            # event is recorded exactly once either way.
            outcomes.extend(SendOutcome(event.identifier, SendStatus.SENT) for event in batch)
        return outcomes

    def cancel(self, event: UsageEvent) -> str:
        return "unsupported: Polar events cannot be cancelled"

    # -- read-back ---------------------------------------------------------------

    def tier_meters(self, tiers: Iterable[str], *, create: bool) -> dict[str, str]:
        """tier → meter id; creates the missing tier meters when `create`."""
        wanted = list(dict.fromkeys(tiers))
        found: dict[str, str] = {}
        page = 1
        while True:
            answer = self._call(
                partial(
                    self.client.meters.list,
                    page=page,
                    limit=100,
                    is_archived=False,
                    sorting=["created_at"],
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
            meter = self._call(partial(self._create_meter, tier))
            found[tier] = meter.id
        return found

    def _create_meter(self, tier: str) -> Any:
        return self.client.meters.create(
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

    def _quantity(self, meter_id: str, usage_date: dt.date, customers: list[str] | None) -> int:
        day = usage_date.isoformat()
        filters = {} if customers is None else {"external_customer_id": list(customers)}
        answer = self._call(
            lambda: self.client.meters.quantities(
                meter_id,
                start_timestamp=f"{day}T00:00:00Z",
                end_timestamp=f"{day}T23:59:59Z",
                interval="day",
                **cast(dict[str, Any], filters),
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
        before = self.guard.counters["requests"]
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
                partial(self._quantity, meter_id, usage_date),
                self.group_size,
            )
            result.seconds.update(
                {(customer, tier): value for customer, value in values.items() if value}
            )
            result.exact.update((customer, tier) for customer in exact)
            result.unattributed += unattributed
        result.calls = self.guard.counters["requests"] - before
        return result

    def plans(self, customers: Iterable[str]) -> dict[str, ProviderPlan]:
        """The plan of each customer's live subscription (metadata `plan`, else the
        product's metadata `plan`, else the product name), 100 per page."""
        wanted = set(customers)
        found: dict[str, ProviderPlan] = {}
        page = 1
        while True:
            answer = self._call(partial(self.client.subscriptions.list, page=page, limit=100))
            for subscription in answer.items:
                customer = getattr(subscription.customer, "external_id", None)
                if customer not in wanted or subscription.status not in POLAR_SUBSCRIPTION_LIVE:
                    continue
                product = subscription.product
                plan = (subscription.metadata or {}).get("plan") or (
                    (getattr(product, "metadata", None) or {}).get("plan")
                    or getattr(product, "name", None)
                )
                found.setdefault(
                    customer,
                    ProviderPlan(
                        customer, None if plan is None else str(plan), subscription.status
                    ),
                )
            if page >= (answer.pagination.max_page or 1):
                return found
            page += 1

    # -- credits -----------------------------------------------------------------

    def apply_credit(
        self, customer_id: str, amount_cents: int, currency: str, description: str, proposal_id: int
    ) -> CreditResult:
        """Polar's API (2026-10, ../shared/reference/polar-orders-customers.json) has no
        customer credit: customer meters are read-only, there is no /v1/credits, and
        meter credits come only from `meter_credit` benefits granted through products.
        The correction is recorded for a person to apply, with the steps."""
        return CreditResult(
            CorrectionMethod.MANUAL,
            None,
            "Polar's API has no customer credit; in the Polar dashboard refund "
            f"{amount_cents / 100:.2f} {currency.upper()} on customer {customer_id}'s order "
            "for the period of the usage day (Sales → Orders → Refund), or discount their "
            f"next order by that amount, and note the refund on the ticket (tally credit "
            f"#{proposal_id})",
        )

    # -- doctor ------------------------------------------------------------------

    # -- customers and invoices ----------------------------------------------------

    def existing_customers(self, customers: Iterable[str]) -> set[str]:
        """Which external customer ids Polar has (its customer list, 100 per page):
        Polar counts events for customers it does not have, and invoices nobody."""
        wanted = set(customers)
        found: set[str] = set()
        page = 1
        while wanted:
            answer = self._call(partial(self.client.customers.list, page=page, limit=100))
            found |= {c.external_id for c in answer.items if c.external_id in wanted}
            if page >= (answer.pagination.max_page or 1):
                break
            page += 1
        return found

    def finalized_invoices(
        self, customers: Iterable[str], tiers: Iterable[str]
    ) -> list[ProviderInvoice]:
        """Polar bills metered usage by when it ingested an event, not by the event's
        day: an order cannot be compared with usage days (docs/reconciliation.md)."""
        return []

    def ping(self) -> None:
        self._call(partial(self.client.meters.list, page=1, limit=1))

    # -- counters ----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return dict(self.guard.counters)

    def read_stats(self) -> dict[str, int]:
        return dict(self.guard.counters)
