"""Polar subscription orders: usage billed by when Polar ingested it.

For a subscription with billing periods (``POST /_sandbox/subscriptions``) Polar
cycles at each period's end and creates a paid ``subscription_cycle`` order for
the period. Its metered items hold, per meter, the events Polar *ingested*
during the period (sandbox clock at ingest), whatever their ``timestamp`` says:
a late event lands on the current cycle and no earlier order changes (Polar's
docs, ``event-ingestion.mdx``). Polar creates the order at the cycle itself, so
``finalization_grace_s`` (a Stripe setting) does not delay it.

Orders carry no quantity field, so each metered item's ``label`` is
``"<meter name>: <quantity> units"`` and its ``amount`` is quantity × the tier's
``unit_amounts`` (cents; default 0). Subscriptions in ``active``, ``trialing``,
``past_due`` or ``unpaid`` are billed; others are not.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from .common import iso
from .periods import Period, ended_by

if TYPE_CHECKING:
    from .polar_api import PolarStore

BILLED_STATUSES = frozenset({"active", "trialing", "past_due", "unpaid"})


@dataclass
class OrderRecord:
    id: str
    subscription: str  # subscription id
    customer: str  # Polar customer id
    period: Period
    number: str
    items: list[dict[str, Any]]
    amount: int


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "sandbox:" + "|".join(map(str, parts))))


class PolarOrders:
    def __init__(self, store: PolarStore) -> None:
        self.store = store
        self.records: dict[str, OrderRecord] = {}
        self.order: list[str] = []
        self.next_period: dict[str, int] = {}
        self.numbers: dict[str, int] = {}

    def settle(self, now: float) -> None:
        store = self.store
        for sub_id, (anchor, interval) in store.periods.items():
            customer_id = store.sub_owner[sub_id]
            sub = store.subscriptions[customer_id]
            ended = ended_by(anchor, interval, now, self.next_period.get(sub["id"], 0))
            if not ended:
                continue
            self.next_period[sub["id"]] = ended[-1].index + 1
            if sub["status"] not in BILLED_STATUSES:
                continue
            for done in ended:
                self._create(customer_id, sub, done)

    def quantities(self, customer_id: str, start: float, end: float) -> dict[str, float]:
        """Per meter id: what the customer's events ingested in [start, end) add up to."""
        store = self.store
        customer = store.customers[customer_id]
        keys = {f"id:{customer_id}"} | (
            {customer["external_id"]} if customer["external_id"] else set()
        )
        from .polar_api import aggregation_value, filter_matches

        totals = {meter_id: 0.0 for meter_id in store.meter_order}
        for event in store.events:
            if event.key not in keys or not start <= event.ingested_at < end:
                continue
            for meter_id in store.meter_order:
                meter = store.meters[meter_id]
                if filter_matches(meter["filter"], event):
                    value = aggregation_value(meter["aggregation"], event)
                    if value is not None:
                        totals[meter_id] += value
        return totals

    def _create(self, customer_id: str, sub: dict[str, Any], done: Period) -> None:
        store = self.store
        totals = self.quantities(customer_id, done.start, done.end)
        units = store.unit_amounts.get(sub["id"], {})
        created = iso(done.end)
        order_id = _uuid("order", sub["id"], done.index)
        items: list[dict[str, Any]] = []
        total = 0
        for meter_id, quantity in totals.items():
            meter = store.meters[meter_id]
            tier = next(
                (
                    str(c["value"])
                    for c in meter["filter"]["clauses"]
                    if c.get("property") == "tier"
                ),
                meter["name"],
            )
            unit = Decimal(units.get(tier, "0"))
            amount = int((unit * Decimal(str(quantity))).quantize(Decimal(1), ROUND_HALF_UP))
            total += amount
            items.append(
                {
                    "created_at": created,
                    "modified_at": None,
                    "id": _uuid("order-item", order_id, meter_id),
                    "label": f"{meter['name']}: {quantity:g} units",
                    "amount": amount,
                    "tax_amount": 0,
                    "proration": False,
                    "product_price_id": _uuid("price", meter_id),
                    # polar-sdk 1.0.2 requires the item's period (newer than the excerpt)
                    "start_timestamp": iso(done.start),
                    "end_timestamp": iso(done.end),
                }
            )
        count = self.numbers.get(customer_id, 0) + 1
        self.numbers[customer_id] = count
        record = OrderRecord(
            id=order_id,
            subscription=sub["id"],
            customer=customer_id,
            period=done,
            number=f"SBX-{customer_id[:8].upper()}-{count:04d}",
            items=items,
            amount=total,
        )
        self.records[order_id] = record
        self.order.append(order_id)

    def view(self, order_id: str) -> dict[str, Any] | None:
        record = self.records.get(order_id)
        if record is None:
            return None
        store = self.store
        sub = store.subscriptions[record.customer]
        customer = store.customers[record.customer]
        created = iso(record.period.end)
        subscription = {k: v for k, v in sub.items() if k not in ("customer", "product")}
        return {
            "id": record.id,
            "created_at": created,
            "modified_at": None,
            "status": "paid",
            "paid": True,
            "subtotal_amount": record.amount,
            "discount_amount": 0,
            "net_amount": record.amount,
            "tax_amount": 0,
            "total_amount": record.amount,
            "applied_balance_amount": 0,
            "due_amount": 0,
            "refunded_amount": 0,
            "refunded_tax_amount": 0,
            "currency": "usd",
            "billing_reason": "subscription_cycle",
            "billing_name": customer["name"],
            "billing_address": None,
            "invoice_number": record.number,
            "is_invoice_generated": False,
            "receipt_number": None,
            "seats": None,
            "units": None,  # polar-sdk 1.0.2 requires it (newer than the excerpt)
            "customer_id": record.customer,
            "product_id": sub["product_id"],
            "discount_id": None,
            "subscription_id": record.subscription,
            "checkout_id": None,
            "next_payment_attempt_at": None,
            "metadata": {
                "period_start": iso(record.period.start),
                "period_end": iso(record.period.end),
            },
            "custom_field_data": {},
            "platform_fee_amount": 0,
            "platform_fee_currency": None,
            "customer": dict(customer),
            "product": sub["product"],
            "discount": None,
            "subscription": subscription,
            "items": record.items,
            "description": f"{sub['product']['name']}: subscription cycle",
            "refundable_amount": 0,
            "refundable_tax_amount": 0,
        }

    def listed(
        self,
        *,
        customer_ids: set[str],
        subscription_ids: set[str],
        descending: bool,
    ) -> list[dict[str, Any]]:
        chosen = [
            r
            for r in (self.records[i] for i in self.order)
            if (not customer_ids or r.customer in customer_ids)
            and (not subscription_ids or r.subscription in subscription_ids)
        ]
        chosen.sort(key=lambda r: (r.period.end, r.id), reverse=descending)
        views = (self.view(r.id) for r in chosen)
        return [view for view in views if view is not None]
