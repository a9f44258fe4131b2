"""`tally review [--json]`: the finance review in a terminal — the same numbers as the
`finance_review` asset, from the same pure function (assets/finance_review.py).

`--json` prints one object (schema id `tally.finance_review/1`): money as strings with
two decimals (USD), hours as numbers to one decimal, dates as YYYY-MM-DD.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from assets.finance_review import FinanceReview

SCHEMA_ID = "tally.finance_review/1"


def _plain(value: Any) -> Any:
    """JSON values: money as two-decimal strings, dates as ISO text, enums by value."""
    from assets.pricing import to_cents

    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Decimal):
        return f"{to_cents(value):.2f}"
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def review_document(review: FinanceReview) -> dict[str, Any]:
    from assets.finance_review import Period

    yesterday = review.period(Period.YESTERDAY)
    month = review.period(Period.MONTH_TO_DATE)
    body = dataclasses.asdict(review)
    return _plain(
        {
            "schema": SCHEMA_ID,
            "as_of": review.as_of,
            "today": review.today,
            "stale": review.stale,
            "stale_reasons": review.stale_reasons,
            "headline": {
                "currency": "USD",
                "billed_yesterday": yesterday.expected_invoice,
                "usage_at_list_yesterday": yesterday.usage_at_list,
                "expected_invoice_month_to_date": month.expected_invoice,
                "at_risk": review.at_risk,
                "at_risk_leakage": review.at_risk_leakage,
                "at_risk_over_charge": review.at_risk_over_charge,
                "credits_to_approve_count": len(review.proposals),
                "credits_to_approve": review.credits_to_approve,
            },
            "totals": body["periods"],
            "open_credit_proposals": body["proposals"],
            "unexplained_money_moving": body["unexplained"],
            "by_kind": body["kinds"],
        }
    )


def render_text(review: FinanceReview) -> str:
    from assets.finance_review import Period, usd

    yesterday = review.period(Period.YESTERDAY)
    month = review.period(Period.MONTH_TO_DATE)
    freshness = (
        "unknown"
        if review.stale is None
        else ("STALE: " + "; ".join(review.stale_reasons) if review.stale else "fresh")
    )
    lines = [
        f"finance review as of {review.as_of} (yesterday, UTC)",
        f"billed yesterday     {usd(yesterday.expected_invoice)} added to expected invoices"
        f" ({usd(yesterday.usage_at_list)} usage at list price)",
        f"at risk              {usd(review.at_risk)}: leakage {usd(review.at_risk_leakage)}, "
        f"over-charge {usd(review.at_risk_over_charge)} (unexplained money-moving, all days)",
        f"credits to approve   {len(review.proposals)} for {usd(review.credits_to_approve)}",
        f"reconciliation       {freshness}",
        "",
        "period          days                      billable h  at list    expected"
        "   leakage    over-charge  informational (potential)",
    ]
    for totals in (yesterday, month):
        lines.append(
            f"{totals.period:<14}  {totals.start} .. {totals.end}  {totals.billable_hours:>10.1f}"
            f"  {usd(totals.usage_at_list):>9}  {usd(totals.expected_invoice):>9}"
            f"  {usd(totals.leakage):>8}  {usd(totals.over_charge):>11}"
            f"  {totals.informational_count} ({usd(totals.informational_potential)} potential)"
        )
    lines += ["", "open credit proposals"]
    lines += [
        f"  #{line.proposal_id:<5} {line.org_id} ({line.org_name})  {line.usage_date}  "
        f"{line.kind} {line.tier}  {line.hours:.1f} h  {usd(line.handed_back)} net "
        f"({usd(line.amount)} at list)  "
        f"{line.escalation}  {line.age_days} d old"
        for line in review.proposals
    ] or ["  none"]
    lines += ["", "unexplained money-moving discrepancies"]
    lines += [
        f"  {line.usage_date}  {line.kind:<18} {line.org_id} ({line.org_name})  {line.tier}  "
        f"{line.hours:.1f} h  {usd(line.dollar_impact)}  {line.effect.value}  "
        f"{line.age_days} d old"
        for line in review.unexplained
    ] or ["  none"]
    return "\n".join(lines)


def current_review() -> FinanceReview:
    from assets.finance_review import review_now
    from assets.pricing import current_pricing
    from resources.db import billing_engine, control_engine

    return review_now(
        control_engine(), billing_engine(), dt.datetime.now(dt.UTC), current_pricing()
    )


def run_review(*, as_json: bool) -> int:
    review = current_review()
    print(json.dumps(review_document(review), indent=2) if as_json else render_text(review))
    return 0
