"""The control plane's own tally against metering (DESIGN §8): counter_drift when
|counter − runtime| > max(60 s, 1 %), missing_counter, and the freshness of the
counters themselves (the `usage_counters_fresh` check). Pure functions."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from assets.discrepancy import (
    DiscrepancyKind,
    OrgFacts,
    ReconcileInputs,
    ReconcileRules,
    TierNumbers,
    discrepancy_row,
    list_dollars,
    org_facts,
)
from assets.pricing import Pricing

Kind = DiscrepancyKind


def _counter_row(
    day: dt.date,
    pricing: Pricing,
    kind: DiscrepancyKind,
    entry: TierNumbers,
    provider: str | None,
    delta: int,
    priced: int,
    detail: str,
) -> dict:
    """`priced`: the seconds the dollar impact is of (billable for a missing counter)."""
    return discrepancy_row(
        day,
        kind,
        entry.org_id,
        tier=entry.tier,
        provider=provider,
        billable=entry.billable,
        sent=entry.sent,
        counter=entry.counter,
        delta=delta,
        dollars=list_dollars(pricing, priced, entry.tier),
        detail=detail,
    )


def counter_discrepancies(
    inputs: ReconcileInputs,
    keys: dict[tuple[str, str], TierNumbers],
    pricing: Pricing,
    rules: ReconcileRules,
) -> list[dict]:
    """counter_drift (|counter − runtime| > max(60 s, 1 %)) and missing_counter. When
    the control plane has no counter at all for the day, no per-org rows: the
    counters check reports the outage once."""
    day = inputs.usage_date
    if inputs.get("counters").empty:
        return []
    orgs = org_facts(inputs, rules)
    rows = []
    for (org_id, _tier), entry in sorted(keys.items()):
        provider = orgs.get(org_id, OrgFacts()).provider

        if entry.counter is None:
            if entry.runtime > 0:
                detail = (
                    f"metered runtime {entry.runtime} s; the control plane has no "
                    "usage counter for this org, day and tier"
                )
                rows.append(
                    _counter_row(
                        day,
                        pricing,
                        Kind.MISSING_COUNTER,
                        entry,
                        provider,
                        -entry.runtime,
                        -entry.billable,
                        detail,
                    )
                )
            continue
        drift = entry.counter - entry.runtime
        tolerance = max(
            rules.counter_tolerance_s, entry.runtime * rules.counter_tolerance_percent / 100
        )
        if abs(drift) > tolerance:
            detail = (
                f"control-plane counter {entry.counter} s vs metered runtime "
                f"{entry.runtime} s ({drift:+d} s, tolerance {tolerance:.0f} s)"
            )
            rows.append(
                _counter_row(
                    day, pricing, Kind.COUNTER_DRIFT, entry, provider, drift, drift, detail
                )
            )
    return rows


def counters_check(
    counters: pd.DataFrame,
    billed: pd.DataFrame,
    latest_update: dt.datetime | None,
    now: dt.datetime,
    rules: ReconcileRules,
) -> tuple[bool, dict]:
    """Counters missing for a day with usage, or none written anywhere in 2 days."""
    runtime = int(billed["runtime_seconds"].sum()) if not billed.empty else 0
    absent = runtime > 0 and counters.empty
    age = None if latest_update is None else now - latest_update
    stale = age is None or age > rules.counters_max_age
    reasons = []
    if absent:
        reasons.append("no usage counter for this day although instances ran")
    if stale:
        reasons.append(
            "the control plane wrote no usage counter at all"
            if age is None
            else f"the newest usage counter is {age.total_seconds() / 3600:.1f} h old (> 48 h)"
        )
    metadata = {
        "counters_for_day": len(counters),
        "newest_counter_update": latest_update.isoformat() if latest_update else "never",
        "problem": "; ".join(reasons) or "none",
    }
    return not reasons, metadata
