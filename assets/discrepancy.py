"""What a discrepancy is (DESIGN §8): its kinds, its columns, and how one row is built.

The one owner of the discrepancy kinds: the reconciliation rules produce them, the
credit proposals and finance read them, migrations constrain them (a test checks
`DiscrepancyKind` against the CHECK constraint of `billing.discrepancies.kind`).

Sign convention: `delta_seconds` is actual minus expected (provider − sent/billable,
counter − runtime, sent − billable); `dollar_impact` follows it at list tier rates:
positive means the customer is (or would be) charged too much, negative too little.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pandas as pd

from assets.metering_rules import MeteringRules
from assets.pricing import Pricing, PricingError, to_cents
from resources.calendar import SECONDS_PER_DAY
from resources.control_plane import COLUMNS as CONTROL_PLANE
from resources.providers.base import usable_customer_id


class DiscrepancyKind(StrEnum):
    """In report order (the order rows are sorted and counted in)."""

    UNPUSHED = "unpushed"
    PROVIDER_MISSING = "provider_missing"
    PROVIDER_UNDER = "provider_under"
    PROVIDER_OVER = "provider_over"
    PROVIDER_SETTLING = "provider_settling"
    TIER_MISMATCH = "tier_mismatch"
    COUNTER_DRIFT = "counter_drift"
    MISSING_COUNTER = "missing_counter"
    CAP_EXCEEDED = "cap_exceeded"
    PUSH_WINDOW_EXPIRED = "push_window_expired"
    PLAN_MISMATCH = "plan_mismatch"
    UNKNOWN_CUSTOMER = "unknown_customer"
    PUSHED_AFTER_FINALIZATION = "pushed_after_finalization"
    INVOICE_MISMATCH = "invoice_mismatch"
    STUCK_INSTANCE = "stuck_instance"
    ZOMBIE_INSTANCE = "zombie_instance"

    @property
    def money_moving(self) -> bool:
        """Money is (or will be) charged wrongly: ERROR until explained."""
        return self in MONEY_MOVING


KINDS = tuple(DiscrepancyKind)
MONEY_MOVING = frozenset(
    {
        DiscrepancyKind.UNPUSHED,
        DiscrepancyKind.PROVIDER_MISSING,
        DiscrepancyKind.PROVIDER_UNDER,
        DiscrepancyKind.PROVIDER_OVER,
        DiscrepancyKind.TIER_MISMATCH,
        DiscrepancyKind.CAP_EXCEEDED,
        DiscrepancyKind.PUSH_WINDOW_EXPIRED,
        DiscrepancyKind.UNKNOWN_CUSTOMER,
        DiscrepancyKind.PUSHED_AFTER_FINALIZATION,
    }
)

DISCREPANCY_COLUMNS = [
    "usage_date",
    "kind",
    "org_id",
    "tier",
    "instance_id",
    "provider",
    "customer_id",
    "billable_seconds",
    "sent_seconds",
    "provider_seconds",
    "counter_seconds",
    "delta_seconds",
    "dollar_impact",
    "money_moving",
    "explained",
    "detail",
]
INT_COLUMNS = frozenset(
    {"billable_seconds", "sent_seconds", "provider_seconds", "counter_seconds", "delta_seconds"}
)

# The columns of each frame reconciliation reads, as its SQL returns them.
INPUT_COLUMNS = {
    "billed": ["org_id", "tier", "runtime_seconds", "billable_seconds"],
    "ledger": ["org_id", "tier", "provider", "customer_id", "sent_seconds", "pending_seconds"],
    "refusals": ["org_id", "tier", "provider", "seconds", "reason"],
    "provider_usage": ["org_id", "tier", "provider", "customer_id", "seconds", "exact"],
    "reads": ["provider", "status", "unread_tiers", "note"],
    "counters": ["org_id", "tier", "runtime_seconds", "updated_at"],
    "orgs": ["org_id", "plan", "provider", "provider_customer_id", "daily_limit_s"],
    "plans": ["org_id", "provider", "customer_id", "plan", "status"],
    "instances": CONTROL_PLANE["instances"],
    "zombies": ["instance_id", "heartbeats", "first_at", "last_at"],
    "credits": ["proposal_id", "org_id", "tier", "kind", "provider", "seconds", "amount", "status"],
    "explanations": ["kind", "org_id", "tier", "explanation", "explained_by"],
    "activity": ["provider", "customer_id", "last_sent_at", "last_cancel_at"],
    "customers": ["provider", "customer_id", "known"],
    "invoices": [
        "provider",
        "customer_id",
        "invoice_id",
        "period_start",
        "period_end",
        "finalized_at",
        "tier",
        "seconds",
    ],
    "sends": ["org_id", "tier", "provider", "customer_id", "quantity", "sent_at"],
    # tally's billable seconds over each finalized invoice's period, keyed by period
    "period_billable": ["period_start", "period_end", "org_id", "tier", "billable_seconds"],
}


def with_columns(frame: pd.DataFrame | None, name: str) -> pd.DataFrame:
    """`frame` with at least the expected columns of input `name` (an empty read has
    none)."""
    if frame is None or frame.empty:
        return pd.DataFrame(columns=INPUT_COLUMNS[name])
    return frame


@dataclass
class ReconcileInputs:
    """Everything one day's reconciliation looks at; each frame as read from SQL."""

    usage_date: dt.date
    now: dt.datetime
    billed: pd.DataFrame | None = None
    ledger: pd.DataFrame | None = None
    refusals: pd.DataFrame | None = None
    provider_usage: pd.DataFrame | None = None
    reads: pd.DataFrame | None = None
    counters: pd.DataFrame | None = None
    orgs: pd.DataFrame | None = None
    plans: pd.DataFrame | None = None
    instances: pd.DataFrame | None = None
    zombies: pd.DataFrame | None = None
    credits: pd.DataFrame | None = None
    explanations: pd.DataFrame | None = None
    activity: pd.DataFrame | None = None
    customers: pd.DataFrame | None = None
    invoices: pd.DataFrame | None = None
    sends: pd.DataFrame | None = None
    period_billable: pd.DataFrame | None = None
    report_only: bool = False

    def get(self, name: str) -> pd.DataFrame:
        return with_columns(getattr(self, name), name)


@dataclass(frozen=True)
class ReconcileRules:
    """The tolerances of the rules; metering's own facts come from MeteringRules."""

    counter_tolerance_s: int = 60
    counter_tolerance_percent: int = 1
    stuck_after: dt.timedelta = dt.timedelta(minutes=15)
    counters_max_age: dt.timedelta = dt.timedelta(days=2)
    # Heartbeat interval and default daily limit: metering's, never a copy.
    metering: MeteringRules = field(default_factory=MeteringRules)


# -- the numbers compared, per (org, tier) and per org ---------------------------------


Target = tuple[str, str]  # (provider, customer_id) that received usage


@dataclass
class AtTarget:
    """What the ledger sent to one (provider, customer) and what that provider holds."""

    sent: int = 0
    recorded: int = 0


@dataclass
class TierNumbers:
    """The four numbers of one (org, tier), and sent/recorded per (provider,
    customer) the usage went to (an org that moved provider or customer id has
    several). A ledger frame without provider columns keys its rows under None: the
    org's current provider and customer."""

    org_id: str
    tier: str
    runtime: int = 0
    billable: int = 0
    sent: int = 0
    pending: int = 0
    recorded: int = 0
    counter: int | None = None
    targets: dict[Target | None, AtTarget] = field(default_factory=dict)

    def at(self, target: Target | None) -> AtTarget:
        found = self.targets.get(target)
        if found is None:
            found = self.targets[target] = AtTarget()
        return found


def _target(row: Any) -> Target | None:
    provider, customer = getattr(row, "provider", None), getattr(row, "customer_id", None)
    if missing(provider) or missing(customer):
        return None
    return (str(provider), str(customer))


@dataclass
class OrgFacts:
    plan: str | None = None
    provider: str | None = None
    customer: str | None = None
    daily_limit_s: int = SECONDS_PER_DAY


def tier_numbers(inputs: ReconcileInputs) -> dict[tuple[str, str], TierNumbers]:
    keys: dict[tuple[str, str], TierNumbers] = {}

    def key(org_id: str, tier: str) -> TierNumbers:
        found = keys.get((org_id, tier))
        if found is None:
            found = keys[(org_id, tier)] = TierNumbers(str(org_id), str(tier))
        return found

    for row in inputs.get("billed").itertuples(index=False):
        entry = key(row.org_id, row.tier)
        entry.runtime, entry.billable = int(row.runtime_seconds), int(row.billable_seconds)
    for row in inputs.get("ledger").itertuples(index=False):
        entry = key(row.org_id, row.tier)
        sent, pending = int(row.sent_seconds or 0), int(row.pending_seconds or 0)
        entry.sent += sent
        entry.pending += pending
        entry.at(_target(row)).sent += sent
    for row in inputs.get("provider_usage").itertuples(index=False):
        entry = key(row.org_id, row.tier)
        entry.recorded += int(row.seconds)
        entry.at(_target(row)).recorded += int(row.seconds)
    for row in inputs.get("counters").itertuples(index=False):
        key(row.org_id, row.tier).counter = int(row.runtime_seconds)
    return keys


def org_facts(inputs: ReconcileInputs, rules: ReconcileRules) -> dict[str, OrgFacts]:
    default_limit = rules.metering.default_daily_limit_s
    orgs = {}
    for row in inputs.get("orgs").itertuples(index=False):
        limit = as_int(row.daily_limit_s)
        orgs[row.org_id] = OrgFacts(
            as_text(row.plan),
            as_text(row.provider),
            usable_customer_id(row.provider_customer_id),
            default_limit if limit is None else limit,
        )
    return orgs


# -- values as SQL and pandas hand them over (None, NaN, NaT, "") ----------------------


def missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str | Decimal | bool) and pd.isna(value))


def as_int(value: Any) -> int | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return int(value)


def as_text(value: Any) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "":
        return None
    return str(value)


def as_utc(value: Any) -> dt.datetime | None:
    if value is None or pd.isna(value):
        return None
    return pd.Timestamp(value).tz_convert("UTC").to_pydatetime()


def list_dollars(pricing: Pricing, seconds: int | None, tier: str | None) -> Decimal | None:
    """Unrounded list-rate dollars, None when the tier has no rate."""
    if seconds is None or tier is None:
        return None
    try:
        return pricing.amount(int(seconds), tier)
    except PricingError:
        return None


def discrepancy_row(
    usage_date: dt.date,
    kind: DiscrepancyKind,
    org_id: str,
    *,
    delta: int,
    dollars: Decimal | None,
    detail: str,
    tier: str | None = None,
    instance_id: str | None = None,
    provider: str | None = None,
    customer: str | None = None,
    billable: int | None = None,
    sent: int | None = None,
    recorded: int | None = None,
    counter: int | None = None,
    explained: bool = False,
) -> dict[str, Any]:
    """One row of DISCREPANCY_COLUMNS; the dollar impact rounded to cents here."""
    return {
        "usage_date": usage_date,
        "kind": kind,
        "org_id": org_id,
        "tier": tier,
        "instance_id": instance_id,
        "provider": provider,
        "customer_id": customer,
        "billable_seconds": billable,
        "sent_seconds": sent,
        "provider_seconds": recorded,
        "counter_seconds": counter,
        "delta_seconds": int(delta),
        "dollar_impact": None if dollars is None else to_cents(dollars),
        "money_moving": kind.money_moving,
        "explained": explained,
        "detail": detail,
    }


# -- counted once: which rows move money (the kind's rule, refined by the day) -------


class MoneyEffect(StrEnum):
    """What a discrepancy does to the customer's bill, from the sign convention above:
    money-moving rows with a negative impact are revenue leakage (charged too little),
    positive ones over-charges; every other row is informational (its dollars are
    potential, not money that moved)."""

    LEAKAGE = "leakage"
    OVER_CHARGE = "over_charge"
    INFORMATIONAL = "informational"


def money_effect(money_moving: Any, dollar_impact: Any, delta_seconds: Any = 0) -> MoneyEffect:
    """The effect of one stored row (its `money_moving` flag and signed impact)."""
    if not bool(money_moving):
        return MoneyEffect.INFORMATIONAL
    sign = dollar_impact if not missing(dollar_impact) else delta_seconds
    return MoneyEffect.OVER_CHARGE if sign is not None and sign > 0 else MoneyEffect.LEAKAGE


def never_charged(plan: str | None, customer: str | None, pricing: Pricing) -> str | None:
    """Why unpushed usage of this org would never be charged, or None when it would:
    its plan bills no usage (free tier: overage is not billed) and the org has no
    provider customer to charge."""
    known = pricing.plans.get(plan or "")
    if known is None or known.overage_billable or customer is not None:
        return None
    return (
        f"not money-moving: plan {known.name!r} bills no usage and the org has no "
        "provider customer id, so this usage would never be charged"
    )


def settle_money_moving(
    frame: pd.DataFrame, orgs: dict[str, OrgFacts], pricing: Pricing
) -> pd.DataFrame:
    """Refine the kinds' money-moving flag with what the day shows, so a second of
    wrong charge is in one money-moving total only:

    - cap_exceeded: the provider's excess over the daily limit is made of seconds the
      org-day's provider_over rows already count whenever billable stayed within the
      limit (metering's blocking check). Covered entirely → informational; partly →
      the row keeps only the uncovered seconds (and their pro-rata dollars).
    - unpushed usage that would never be charged (`never_charged`) → informational.
    """
    if frame.empty:
        return frame
    frame = frame.copy()
    over = frame[frame["kind"] == DiscrepancyKind.PROVIDER_OVER]
    over_by_org = {
        str(org): int(sum(int(value) for value in group["delta_seconds"]))
        for (org, _day), group in over.groupby(["org_id", "usage_date"])
    }
    for index, row in frame.iterrows():
        kind, org_id = row["kind"], str(row["org_id"])
        if kind == DiscrepancyKind.CAP_EXCEEDED and row["money_moving"]:
            covered = over_by_org.get(org_id, 0)
            excess = int(row["delta_seconds"])
            if covered <= 0:
                continue
            if covered >= excess:
                frame.at[index, "money_moving"] = False
                frame.at[index, "detail"] = (
                    f"{row['detail']}; not money-moving: the same seconds are counted as "
                    f"provider_over ({covered} s) and credited there"
                )
                continue
            left = excess - covered
            dollars = row["dollar_impact"]
            frame.at[index, "delta_seconds"] = left
            if not missing(dollars):
                frame.at[index, "dollar_impact"] = to_cents(
                    Decimal(dollars) * Decimal(left) / Decimal(excess)
                )
            frame.at[index, "detail"] = (
                f"{row['detail']}; {covered} s of it counted as provider_over, the other "
                f"{left} s here"
            )
        elif kind == DiscrepancyKind.UNPUSHED and row["money_moving"]:
            org = orgs.get(org_id)
            reason = never_charged(org.plan, org.customer, pricing) if org else None
            if reason is not None:
                frame.at[index, "money_moving"] = False
                frame.at[index, "detail"] = f"{row['detail']}; {reason}"
    return frame
