"""Stripe subscription invoices: one per billing period, finalized after a grace.

For a subscription with billing periods (``POST /_sandbox/subscriptions``) each
period's invoice is created as a ``draft`` at the period's end and finalized
(status ``open``, ``status_transitions.finalized_at``) at end +
``finalization_grace_s`` (``/_sandbox/settings``, default 1 h, as Stripe). Its
lines — one per meter, ``quantity`` = the meter's summed value (instance
seconds), price ``price_tally_{tier}`` — hold the events whose timestamp lies in
the period and that Stripe had processed (and not cancelled) by finalization.
Usage processed later for that period is on no invoice: the next invoice only
bills its own period. A draft's lines move until it is finalized.

Subscriptions in ``active``, ``trialing``, ``past_due`` or ``unpaid`` invoice
their periods; ``canceled``, ``paused``, ``incomplete`` and
``incomplete_expired`` ones do not (Stripe generates no invoices for them).
Finalization is lazy (``SandboxState.settle`` runs before every answer) but each
invoice is computed as of its finalization time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from .periods import Period, ended_by, period_at

if TYPE_CHECKING:
    from .stripe_api import StripeStore

INVOICING_STATUSES = frozenset({"active", "trialing", "past_due", "unpaid"})


@dataclass
class InvoiceRecord:
    id: str
    subscription: str
    customer: str
    period: Period
    created: int
    finalize_at: int
    number: str | None = None
    finalized_at: int | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)  # frozen once finalized

    @property
    def status(self) -> str:
        return "draft" if self.finalized_at is None else "open"


def _digest(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:24]


class StripeInvoices:
    def __init__(self, store: StripeStore) -> None:
        self.store = store
        self.records: dict[str, InvoiceRecord] = {}
        self.order: list[str] = []  # creation order
        self.next_period: dict[str, int] = {}  # subscription id -> next index to invoice
        self.numbers: dict[str, int] = {}  # customer -> invoices finalized
        self.drafts: list[str] = []

    # -- lifecycle -----------------------------------------------------------------
    def settle(self, now: float) -> None:
        grace = int(self.store.state.settings.finalization_grace_s)
        for sub_id, (anchor, interval) in self.store.periods.items():
            customer = self.store.sub_owner[sub_id]
            sub = self.store.subscriptions[customer]
            first = self.next_period.get(sub["id"], 0)
            ended = ended_by(anchor, interval, now, first)
            if not ended:
                continue
            self.next_period[sub["id"]] = ended[-1].index + 1
            if sub["status"] not in INVOICING_STATUSES:
                continue
            for done in ended:
                record = InvoiceRecord(
                    id=f"in_{_digest(sub['id'], done.index)}",
                    subscription=sub["id"],
                    customer=customer,
                    period=done,
                    created=done.end,
                    finalize_at=done.end + grace,
                )
                self.records[record.id] = record
                self.order.append(record.id)
                self.drafts.append(record.id)
        if not self.drafts:
            return
        due = [i for i in self.drafts if self.records[i].finalize_at <= now]
        self.drafts = [i for i in self.drafts if self.records[i].finalize_at > now]
        for record in (self.records[i] for i in due):
            record.lines = self.lines(record.id, record, record.finalize_at)
            record.finalized_at = record.finalize_at
            count = self.numbers.get(record.customer, 0) + 1
            self.numbers[record.customer] = count
            prefix = self.store.customers[record.customer]["invoice_prefix"]
            record.number = f"{prefix}-{count:04d}"

    # -- lines -----------------------------------------------------------------------
    def lines(self, invoice_id: str, record: InvoiceRecord, as_of: float) -> list[dict[str, Any]]:
        store = self.store
        sub = store.subscriptions[record.customer]
        start, end = record.period.start, record.period.end
        totals = {meter_id: 0 for meter_id in store.meter_order}
        for event in store.by_customer.get(record.customer, []):
            if start <= event.timestamp < end and store.counted(event, as_of):
                totals[event.meter_id] = totals.get(event.meter_id, 0) + event.value
        out = []
        for meter_id in store.meter_order:
            if store.meters[meter_id]["created"] > as_of:
                continue
            price = store.metered_price(sub, meter_id)
            quantity = totals[meter_id]
            unit = Decimal(price["unit_amount_decimal"])
            amount = int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            item = store.metered_item(sub, meter_id, start, end)
            out.append(
                {
                    "id": f"il_{_digest(invoice_id, meter_id)}",
                    "object": "line_item",
                    "amount": amount,
                    "currency": "usd",
                    "description": f"{quantity} × {store.meters[meter_id]['display_name']}",
                    "discount_amounts": [],
                    "discountable": True,
                    "discounts": [],
                    "invoice": invoice_id,
                    "livemode": False,
                    "metadata": {},
                    "parent": {
                        "type": "subscription_item_details",
                        "invoice_item_details": None,
                        "subscription_item_details": {
                            "invoice_item": None,
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": sub["id"],
                            "subscription_item": item["id"],
                        },
                    },
                    "period": {"start": start, "end": end},
                    "pretax_credit_amounts": [],
                    "pricing": {
                        "type": "price_details",
                        "price_details": {"price": price["id"], "product": price["product"]},
                        "unit_amount_decimal": price["unit_amount_decimal"],
                    },
                    "quantity": quantity,
                    "quantity_decimal": str(quantity),
                    "subtotal": amount,
                    "taxes": [],
                }
            )
        return out

    # -- views ---------------------------------------------------------------------------
    def view(self, invoice_id: str) -> dict[str, Any] | None:
        record = self.records.get(invoice_id)
        if record is None:
            return None
        lines = record.lines if record.finalized_at is not None else None
        if lines is None:
            lines = self.lines(record.id, record, self.store.state.now())
        return self._invoice(record, lines)

    def upcoming(self, customer: str) -> dict[str, Any] | None:
        """The current period's invoice as it stands now, or None without one."""
        sub = self.store.subscriptions.get(customer)
        billing = self.store.periods.get(sub["id"]) if sub else None
        if sub is None or billing is None or sub["status"] not in INVOICING_STATUSES:
            return None
        now = self.store.state.now()
        current = period_at(billing[0], billing[1], now)
        if current is None:
            return None
        grace = int(self.store.state.settings.finalization_grace_s)
        record = InvoiceRecord(
            id=f"upcoming_in_{_digest(sub['id'], current.index)}",
            subscription=sub["id"],
            customer=customer,
            period=current,
            created=int(now),
            finalize_at=current.end + grace,
        )
        return self._invoice(record, self.lines(record.id, record, now))

    def listed(
        self, *, customer: str | None, subscription: str | None, status: str | None
    ) -> list[dict[str, Any]]:
        """Newest first (by creation, then period), filtered."""
        chosen = []
        for invoice_id in reversed(self.order):
            record = self.records[invoice_id]
            if customer and record.customer != customer:
                continue
            if subscription and record.subscription != subscription:
                continue
            if status and record.status != status:
                continue
            chosen.append(invoice_id)
        return [view for view in map(self.view, chosen) if view is not None]

    def _invoice(self, record: InvoiceRecord, lines: list[dict[str, Any]]) -> dict[str, Any]:
        store = self.store
        customer = store.customers[record.customer]
        total = sum(line["amount"] for line in lines)
        draft = record.finalized_at is None
        return {
            "id": record.id,
            "object": "invoice",
            "account_country": "US",
            "account_name": "tally sandbox",
            "account_tax_ids": None,
            "amount_due": total,
            "amount_overpaid": 0,
            "amount_paid": 0,
            "amount_paid_off_stripe": 0,
            "amount_remaining": total,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 0,
            "attempted": False,
            "auto_advance": draft,
            "automatic_tax": {
                "disabled_reason": None,
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "automatically_finalizes_at": record.finalize_at if draft else None,
            "billing_reason": "subscription_cycle",
            "collection_method": "charge_automatically",
            "created": record.created,
            "currency": "usd",
            "custom_fields": None,
            "customer": record.customer,
            "customer_account": None,
            "customer_address": None,
            "customer_email": customer["email"],
            "customer_name": customer["name"],
            "customer_phone": None,
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "due_date": None,
            "effective_at": record.finalized_at,
            "ending_balance": None if draft else 0,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": {
                "object": "list",
                "data": lines,
                "has_more": False,
                "url": f"/v1/invoices/{record.id}/lines",
            },
            "livemode": False,
            "metadata": {},
            "next_payment_attempt": None,
            "number": record.number,
            "on_behalf_of": None,
            "parent": {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {
                    "metadata": {"plan": store.plans.get(record.subscription, "")},
                    "subscription": record.subscription,
                },
            },
            "payment_settings": {
                "default_mandate": None,
                "payment_method_options": None,
                "payment_method_types": None,
            },
            "period_end": record.period.end,
            "period_start": record.period.start,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": 0,
            "statement_descriptor": None,
            "status": record.status,
            "status_transitions": {
                "finalized_at": record.finalized_at,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "subtotal": total,
            "subtotal_excluding_tax": total,
            "test_clock": None,
            "total": total,
            "total_discount_amounts": [],
            "total_excluding_tax": total,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": record.created,
        }
