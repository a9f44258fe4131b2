"""Customers and invoices (DESIGN §8): what the provider's accounts say about the
usage tally pushed, beyond the day's usage summaries.

- `unknown_customer`: the provider has no such customer (from its bulk customer
  list). Stripe accepts those events and never counts them; Polar counts them for
  nobody to invoice. Money at risk: what was pushed there, at list price. It stands
  for the day's missing/under rows at that customer (the same seconds, once).
- `pushed_after_finalization`: usage pushed after the invoice of the billing period
  holding its day was finalized is on no invoice, although usage summaries still
  show it (revenue leakage).
- `invoice_mismatch`: a finalized invoice's metered seconds per tier against tally's
  billable seconds for the days of its period — checked on the day the invoice was
  finalized. Informational: the days' own discrepancies move the money; this check
  shows what the customer is actually billed.

Pure: frames in (as the reconcile SQL returns them), discrepancy rows out."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from assets.discrepancy import (
    DiscrepancyKind,
    ReconcileInputs,
    as_utc,
    discrepancy_row,
    list_dollars,
)
from assets.pricing import Pricing
from resources.calendar import usage_noon

Kind = DiscrepancyKind
Target = tuple[str, str]


def unknown_targets(inputs: ReconcileInputs) -> set[Target]:
    """(provider, customer)s the provider's customer list does not have."""
    frame = inputs.get("customers")
    return {
        (str(row.provider), str(row.customer_id))
        for row in frame.itertuples(index=False)
        if not bool(row.known)
    }


def _sent_by_org_tier(inputs: ReconcileInputs, target: Target) -> dict[tuple[str, str], int]:
    sent: dict[tuple[str, str], int] = {}
    for row in inputs.get("sends").itertuples(index=False):
        if (str(row.provider), str(row.customer_id)) == target:
            key = (str(row.org_id), str(row.tier))
            sent[key] = sent.get(key, 0) + int(row.quantity)
    return sent


def _unbilled_row(
    inputs: ReconcileInputs,
    pricing: Pricing,
    kind: DiscrepancyKind,
    key: tuple[str, str, str, str],
    seconds: int,
    detail: str,
) -> dict:
    """`seconds` tally sent that no invoice will bill: leakage at list price."""
    org_id, tier, provider, customer = key
    dollars = list_dollars(pricing, seconds, tier)
    return discrepancy_row(
        inputs.usage_date,
        kind,
        org_id,
        tier=tier,
        provider=provider,
        customer=customer,
        sent=seconds,
        delta=-seconds,
        dollars=None if dollars is None else -dollars,
        detail=detail,
    )


def unknown_customer_rows(inputs: ReconcileInputs, pricing: Pricing) -> list[dict]:
    rows = []
    for provider, customer in sorted(unknown_targets(inputs)):
        for (org_id, tier), seconds in sorted(
            _sent_by_org_tier(inputs, (provider, customer)).items()
        ):
            rows.append(
                _unbilled_row(
                    inputs,
                    pricing,
                    Kind.UNKNOWN_CUSTOMER,
                    (org_id, tier, provider, customer),
                    seconds,
                    f"{provider} has no customer {customer}: the {seconds} s pushed there "
                    "are on nobody's invoice; create the customer at the provider (or "
                    "fix the org's customer id), then re-push and explain this row",
                )
            )
    return rows


def _invoices(inputs: ReconcileInputs) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(provider, customer, invoice) → its period, finalization and seconds by tier."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in inputs.get("invoices").itertuples(index=False):
        key = (str(row.provider), str(row.customer_id), str(row.invoice_id))
        invoice = found.setdefault(
            key,
            {
                "start": as_utc(row.period_start),
                "end": as_utc(row.period_end),
                "finalized": as_utc(row.finalized_at),
                "seconds": {},
            },
        )
        if row.tier:
            invoice["seconds"][str(row.tier)] = int(row.seconds)
    return found


def pushed_after_finalization_rows(inputs: ReconcileInputs, pricing: Pricing) -> list[dict]:
    """Seconds of the day's deliveries accepted after the invoice of the period that
    holds the day (its noon, where the usage is stamped) was finalized."""
    noon = usage_noon(inputs.usage_date)
    late: dict[tuple[str, str, str, str], tuple[int, str, dt.datetime]] = {}
    invoices = _invoices(inputs)
    for row in inputs.get("sends").itertuples(index=False):
        sent_at = as_utc(row.sent_at)
        if sent_at is None:
            continue
        for (provider, customer, invoice_id), invoice in invoices.items():
            if (provider, customer) != (str(row.provider), str(row.customer_id)):
                continue
            if not (invoice["start"] <= noon < invoice["end"]) or sent_at <= invoice["finalized"]:
                continue
            key = (str(row.org_id), str(row.tier), provider, customer)
            seconds = late.get(key, (0, invoice_id, invoice["finalized"]))[0]
            late[key] = (seconds + int(row.quantity), invoice_id, invoice["finalized"])
    rows = []
    for key, (seconds, invoice_id, finalized) in sorted(late.items()):
        rows.append(
            _unbilled_row(
                inputs,
                pricing,
                Kind.PUSHED_AFTER_FINALIZATION,
                key,
                seconds,
                f"invoice {invoice_id} of this day's billing period was finalized at "
                f"{finalized:%Y-%m-%d %H:%M} UTC, before these {seconds} s were pushed: "
                "they are on no invoice; bill them by hand (invoice item) and explain "
                "this row, and give the account a finalization grace longer than the "
                "02:00 run (docs/reconciliation.md)",
            )
        )
    return rows


def invoice_mismatch_rows(inputs: ReconcileInputs, pricing: Pricing) -> list[dict]:
    """Invoices finalized on this day: metered seconds per tier vs billable seconds of
    the orgs billed to that customer over the period's days."""
    billable = inputs.get("period_billable")
    orgs = inputs.get("orgs")
    rows = []
    for (provider, customer, invoice_id), invoice in sorted(_invoices(inputs).items()):
        if invoice["finalized"].date() != inputs.usage_date:
            continue
        billed_orgs = sorted(
            str(row.org_id)
            for row in orgs.itertuples(index=False)
            if (row.provider, row.provider_customer_id) == (provider, customer)
        )
        if not billed_orgs:
            continue
        period = billable[
            (billable["period_start"] == invoice["start"]) & (billable["org_id"].isin(billed_orgs))
        ]
        ours: dict[str, int] = {}
        for row in period.itertuples(index=False):
            ours[str(row.tier)] = ours.get(str(row.tier), 0) + int(row.billable_seconds)
        for tier in sorted(set(ours) | set(invoice["seconds"])):
            held, want = invoice["seconds"].get(tier, 0), ours.get(tier, 0)
            if held == want:
                continue
            rows.append(
                discrepancy_row(
                    inputs.usage_date,
                    Kind.INVOICE_MISMATCH,
                    billed_orgs[0],
                    tier=tier,
                    provider=provider,
                    customer=customer,
                    billable=want,
                    recorded=held,
                    delta=held - want,
                    dollars=list_dollars(pricing, held - want, tier),
                    detail=(
                        f"invoice {invoice_id} ({invoice['start']:%Y-%m-%d} to "
                        f"{invoice['end']:%Y-%m-%d}) bills {held} s of {tier}; tally billed "
                        f"{want} s for those days ({', '.join(billed_orgs)}): see the days' "
                        "own discrepancies"
                    ),
                )
            )
    return rows


def account_discrepancies(inputs: ReconcileInputs, pricing: Pricing) -> list[dict]:
    return (
        unknown_customer_rows(inputs, pricing)
        + pushed_after_finalization_rows(inputs, pricing)
        + invoice_mismatch_rows(inputs, pricing)
    )


def drop_covered_by_unknown(frame: pd.DataFrame, unknown: set[Target]) -> pd.DataFrame:
    """A customer the provider does not have explains what it does not hold there:
    its missing/under (or settling) rows are the unknown_customer row's seconds."""
    if frame.empty or not unknown:
        return frame
    covered = {Kind.PROVIDER_MISSING, Kind.PROVIDER_UNDER, Kind.PROVIDER_SETTLING}
    keep = [
        not (row["kind"] in covered and (row["provider"], row["customer_id"]) in unknown)
        for _, row in frame.iterrows()
    ]
    return frame[keep].reset_index(drop=True)
