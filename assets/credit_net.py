"""Credits net of included hours (issue 12).

An over-charge inside the org's included hours cost the customer nothing: the
provider counted the extra seconds against hours the plan includes anyway. What a
proposal hands back is what the extra seconds made the customer pay: the month's
charge with them minus the charge without them, both by quota's own rules
(`allocate_included`: included hours used day by day, the most expensive tier
first; overage at tier rates, nothing on a plan that does not bill overage), over
the month's billable usage known now. Never more than the list amount (the
evidence is priced at list rates), never below $0.

Pure functions (frames in, Decimal out); the I/O is in assets/credits.py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd

from assets.discrepancy import DiscrepancyKind
from assets.pricing import Plan, Pricing, to_cents
from assets.quota import USAGE_COLUMNS, allocate_included, included_seconds

# (usage day, tier, seconds the provider holds beyond billable: + added, − missing)
Change = tuple[dt.date, str, int]


@dataclass(frozen=True)
class NetCredit:
    list_amount: Decimal  # at tier rates, cents
    net_amount: Decimal  # what the over-charge made the customer pay, cents
    included_seconds: int  # over-charged seconds that fell inside included hours


def _charge(usage: pd.DataFrame, org_id: str, plan: Plan, pricing: Pricing) -> tuple[Decimal, int]:
    """(unrounded dollars of overage, overage seconds) of one org's month."""
    allocated = allocate_included(usage, {org_id: included_seconds(plan)}, pricing)
    if allocated.empty:
        return Decimal(0), 0
    dollars = Decimal(0)
    for row in allocated.itertuples(index=False):
        dollars += pricing.amount(int(row.overage_seconds), row.tier)
    seconds = int(allocated["overage_seconds"].sum())
    return (dollars if plan.overage_billable else Decimal(0)), seconds


def _with_changes(usage: pd.DataFrame, org_id: str, changes: list[Change]) -> pd.DataFrame:
    added = pd.DataFrame(
        [(org_id, day, tier, int(seconds)) for day, tier, seconds in changes],
        columns=USAGE_COLUMNS,
    )
    both = pd.concat([usage[USAGE_COLUMNS], added], ignore_index=True) if not usage.empty else added
    summed = both.groupby(["org_id", "usage_date", "tier"], as_index=False)[
        "billable_seconds"
    ].sum()
    summed["billable_seconds"] = summed["billable_seconds"].clip(lower=0).astype("int64")
    return summed[summed["billable_seconds"] > 0]


def net_credit(
    usage: pd.DataFrame,
    org_id: str,
    plan: Plan | None,
    pricing: Pricing,
    changes: list[Change] | None,
    list_amount: Decimal,
) -> NetCredit:
    """The proposal's worth to the customer. `usage`: the org's billable rows of the
    proposal's month (org_id, usage_date, tier, billable_seconds); `changes`: what
    the provider holds beyond them (`proposal_changes`). An org whose plan is not
    priced (plan None), or whose changes are unknown (None), is credited the list
    amount."""
    if plan is None or changes is None:
        return NetCredit(list_amount, list_amount, 0)
    over = sum(seconds for _, _, seconds in changes if seconds > 0)
    if over <= 0:
        return NetCredit(list_amount, list_amount, 0)
    mine = usage[usage["org_id"] == org_id] if not usage.empty else usage
    if mine.empty:
        mine = pd.DataFrame(columns=USAGE_COLUMNS)
    without, overage_without = _charge(mine, org_id, plan, pricing)
    with_, overage_with = _charge(_with_changes(mine, org_id, changes), org_id, plan, pricing)
    net = min(max(to_cents(with_ - without), Decimal("0.00")), list_amount)
    charged = overage_with - overage_without
    return NetCredit(list_amount, net, min(max(over - charged, 0), over))


def proposal_changes(
    kind: str,
    org_id: str,
    usage_date: dt.date,
    tier: str,
    seconds: int,
    discrepancies: pd.DataFrame | None,
) -> list[Change] | None:
    """What the provider holds beyond billable for one proposal: its seconds of its
    tier, or for tier_mismatch the org's difference per tier that day (gains and
    losses, from the day's discrepancies; None when they are gone)."""
    if kind != DiscrepancyKind.TIER_MISMATCH:
        return [(usage_date, tier, int(seconds))]
    if discrepancies is None or discrepancies.empty:
        return None
    rows = discrepancies[
        (discrepancies["kind"] == DiscrepancyKind.TIER_MISMATCH)
        & (discrepancies["org_id"] == org_id)
    ]
    changes = [(usage_date, str(row.tier), int(row.delta_seconds)) for row in rows.itertuples()]
    return changes or None
