"""Monthly quota (DESIGN §3 pricing, §4 quota_usage).

`quota_usage`: per org, month to date as of the partition day, from
billing.billed_usage of that month up to the day (never from an earlier
partition's result, so re-runs, backfills and month boundaries need no state).
A day's month to date depends on every earlier day of the month, so the run of day
D also recomputes, in date order and in the same transaction, every later day of
D's month that already has quota rows (an out-of-order backfill leaves no stale
day behind); budget_alerts then evaluates D and those days.
Included hours are used day by day in date order and, within a day, on the most
expensive tier first; what is left over is overage, billed at tier rates unless
the plan does not bill overage (free tier: flagged, not charged). Money is
Decimal, rounded half-up to cents once, at the end.

The budget alerts that read these rows are in assets/budget_alerts.py.

Pure functions first (DataFrames in, DataFrames out); the asset is at the bottom.
"""

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

import numpy as np
import pandas as pd
import psycopg
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.config import configuration_failure, pricing_or_fail
from assets.markdown import markdown_table
from assets.pricing import SECONDS_PER_HOUR, Plan, Pricing, PricingError, to_cents
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.calendar import month_start, next_month
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)

# Finance metadata: orgs at or over these shares of their included hours.
REPORT_THRESHOLDS = (50, 90, 100)
USAGE_COLUMNS = ["org_id", "usage_date", "tier", "billable_seconds"]
QUOTA_COLUMNS = [
    "org_id",
    "usage_date",
    "month",
    "plan",
    "included_seconds",
    "billable_seconds",
    "included_used_seconds",
    "included_left_seconds",
    "overage_seconds",
    "used_pct",
    "base_fee",
    "overage_charges",
    "expected_charges",
    "free_tier_overage",
]
TIER_COLUMNS = [
    "org_id",
    "usage_date",
    "tier",
    "billable_seconds",
    "included_seconds",
    "overage_seconds",
    "overage_amount",
]


# ---------------------------------------------------------------------------
# Pure functions: quota
# ---------------------------------------------------------------------------


def included_seconds(plan: Plan) -> int:
    """Whole seconds of included time (fractions of a second are not included)."""
    return int((plan.included_hours * SECONDS_PER_HOUR).to_integral_value(ROUND_FLOOR))


def hours(seconds: int) -> Decimal:
    """Exact hours, rounded half-up to 0.01 for display."""
    return (Decimal(int(seconds)) / SECONDS_PER_HOUR).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_UP
    )


def allocate_included(
    usage: pd.DataFrame, allowance: dict[str, int], pricing: Pricing
) -> pd.DataFrame:
    """Split each (org, day, tier) row's billable seconds into included and overage.

    Per org, rows are consumed in date order and, within a day, the most expensive
    tier first (`Pricing.tiers_by_price`); `allowance` maps org_id → included seconds
    of the month (missing: 0). Returns the rows in that order with `included_seconds`
    and `overage_seconds` added."""
    columns = [*USAGE_COLUMNS, "included_seconds", "overage_seconds"]
    if usage.empty:
        return pd.DataFrame(columns=columns)
    for tier in usage["tier"].unique():
        pricing.rate(tier)  # an unpriced tier is a configuration error, never $0
    rank = {tier: position for position, tier in enumerate(pricing.tiers_by_price())}
    ordered = (
        usage[USAGE_COLUMNS]
        .assign(_rank=usage["tier"].map(rank))
        .sort_values(["org_id", "usage_date", "_rank"], kind="stable")
        .reset_index(drop=True)
    )
    billable = ordered["billable_seconds"].to_numpy(dtype=np.int64)
    before = ordered.groupby("org_id")["billable_seconds"].cumsum().to_numpy(np.int64) - billable
    allowed = ordered["org_id"].map(allowance).fillna(0).to_numpy(dtype=np.int64)
    included = np.clip(allowed - before, 0, billable)
    return ordered.drop(columns="_rank").assign(
        included_seconds=included, overage_seconds=billable - included
    )[columns]


def later_days_of_month(day: dt.date, computed: Iterable[dt.date]) -> list[dt.date]:
    """The days of `computed` after `day` in `day`'s month, once each, in date order:
    the month to date of each depends on `day`, so they are recomputed with it."""
    end = next_month(month_start(day))
    return sorted({other for other in computed if day < other < end})


@dataclass
class QuotaResult:
    orgs: pd.DataFrame  # QUOTA_COLUMNS, one row per org
    tiers: pd.DataFrame  # TIER_COLUMNS, one row per (org, tier) with usage
    unknown_plans: dict[str, str | None]  # org_id → plan that has no pricing


def quota_month_to_date(
    usage: pd.DataFrame, orgs: pd.DataFrame, as_of: dt.date, pricing: Pricing
) -> QuotaResult:
    """Month to date as of `as_of` for every org that existed by the end of that day
    or has usage in the month.

    usage: org_id, usage_date, tier, billable_seconds (rows outside the month up to
    `as_of` are ignored). orgs: org_id, plan[, created_at]."""
    first = month_start(as_of)
    if not usage.empty:
        in_month = (usage["usage_date"] >= first) & (usage["usage_date"] <= as_of)
        usage = usage.loc[in_month & (usage["billable_seconds"] > 0), USAGE_COLUMNS]
    plan_of = dict(zip(orgs["org_id"], orgs["plan"], strict=True))
    members = set(usage["org_id"]) if not usage.empty else set()
    if "created_at" in orgs.columns and not orgs.empty:
        day_end = pd.Timestamp(as_of + dt.timedelta(days=1), tz="UTC")
        created = pd.to_datetime(orgs["created_at"], utc=True)
        existed = created.isna() | (created < day_end)
        members |= set(orgs.loc[existed.to_numpy(), "org_id"])
    else:
        members |= set(orgs["org_id"])

    unknown = {org: plan_of.get(org) for org in members if plan_of.get(org) not in pricing.plans}
    known = sorted(members - set(unknown))
    plans = {org: pricing.plans[plan_of[org]] for org in known}
    allowance = {org: included_seconds(plan) for org, plan in plans.items()}
    if not usage.empty:
        usage = usage[usage["org_id"].isin(plans)]
    allocated = allocate_included(usage, allowance, pricing)

    per_tier = (
        allocated.groupby(["org_id", "tier"], sort=True)[
            ["billable_seconds", "included_seconds", "overage_seconds"]
        ]
        .sum()
        .reset_index()
    )
    tier_rows = []
    overage_amounts: dict[str, Decimal] = {}
    for row in per_tier.itertuples(index=False):
        amount = pricing.amount(int(row.overage_seconds), row.tier)  # unrounded
        overage_amounts[row.org_id] = overage_amounts.get(row.org_id, Decimal(0)) + amount
        tier_rows.append(
            (
                row.org_id,
                as_of,
                row.tier,
                int(row.billable_seconds),
                int(row.included_seconds),
                int(row.overage_seconds),
                to_cents(amount),
            )
        )
    totals = allocated.groupby("org_id")[["billable_seconds", "included_seconds"]].sum()

    org_rows = []
    for org in known:
        plan = plans[org]
        allowed = allowance[org]
        billable = int(totals["billable_seconds"].get(org, 0))
        used = int(totals["included_seconds"].get(org, 0))
        overage = billable - used
        overage_amount = overage_amounts.get(org, Decimal(0)) if plan.overage_billable else 0
        org_rows.append(
            (
                org,
                as_of,
                first,
                plan.name,
                allowed,
                billable,
                used,
                allowed - used,
                overage,
                to_cents(Decimal(billable * 100) / allowed) if allowed else None,
                to_cents(plan.monthly_fee),
                to_cents(Decimal(overage_amount)),
                to_cents(plan.monthly_fee + overage_amount),
                (not plan.overage_billable) and overage > 0,
            )
        )
    return QuotaResult(
        pd.DataFrame(org_rows, columns=QUOTA_COLUMNS),
        pd.DataFrame(tier_rows, columns=TIER_COLUMNS),
        unknown,
    )


SUMMARY_HEADERS = (
    "org",
    "plan",
    "used h",
    "included h",
    "used %",
    "overage h",
    "expected $",
)


def finance_summary(quota: pd.DataFrame) -> dict:
    """What finance reads on the materialization: orgs at or over 50/90/100 % of their
    included hours, expected revenue of the month so far, free-tier overage."""
    with_included = quota[quota["included_seconds"] > 0]
    share = with_included["billable_seconds"] / with_included["included_seconds"] * 100
    summary: dict = {
        f"orgs_over_{level}_pct": int((share >= level).sum()) for level in REPORT_THRESHOLDS
    }
    summary["expected_revenue"] = sum(quota["expected_charges"], Decimal("0.00"))
    summary["free_tier_overage_orgs"] = int(quota["free_tier_overage"].sum())
    summary["free_tier_overage_seconds"] = int(
        quota.loc[quota["free_tier_overage"].astype(bool), "overage_seconds"].sum()
    )
    top = with_included.assign(share=share)
    top = top[top["share"] >= REPORT_THRESHOLDS[0]].sort_values(
        ["share", "org_id"], ascending=[False, True]
    )
    summary["table"] = markdown_table(
        SUMMARY_HEADERS,
        (
            (
                row.org_id,
                row.plan,
                hours(row.billable_seconds),
                hours(row.included_seconds),
                row.used_pct,
                hours(row.overage_seconds),
                row.expected_charges,
            )
            for row in top.head(25).itertuples(index=False)
        ),
        numeric=SUMMARY_HEADERS[2:],
        empty="_no org at 50 % of its included hours_",
    )
    return summary


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def read_orgs(postgres: PostgresResource) -> pd.DataFrame:
    """Organizations from the control plane (possibly another database than billing:
    joined with billing rows in pandas, never in SQL)."""
    with raw_connection(postgres.control_engine()) as connection:
        return read_frame(connection, "quota/orgs.sql")


def read_month_usage(connection: psycopg.Connection, as_of: dt.date) -> pd.DataFrame:
    return read_frame(
        connection,
        "quota/billed_month.sql",
        {"month_start": month_start(as_of), "usage_date": as_of},
    )


def lock_month(connection: psycopg.Connection, usage_date: dt.date) -> None:
    """One writer per month until the transaction ends: what a run reads (usage,
    computed days) stays what it rewrites."""
    connection.execute(
        load_sql("quota/month_lock.sql"), {"month": month_start(usage_date).isoformat()}
    )


def read_later_days(connection: psycopg.Connection, usage_date: dt.date) -> list[dt.date]:
    """Days after `usage_date` in its month that already have quota rows."""
    days = read_frame(
        connection,
        "quota/later_days.sql",
        {"usage_date": usage_date, "next_month": next_month(month_start(usage_date))},
    )
    return later_days_of_month(usage_date, days["usage_date"] if not days.empty else [])


def write_quota_usage(
    connection: psycopg.Connection, results: Iterable[tuple[dt.date, QuotaResult]]
) -> None:
    """Replace each day's rows, in date order, in the connection's transaction (a
    re-run replaces, never adds); the caller commits."""
    with connection.cursor() as cursor:
        for usage_date, result in sorted(results, key=lambda item: item[0]):
            replace_day_rows(
                cursor,
                "quota_usage",
                usage_date,
                deletes=["quota/delete_tiers.sql", "quota/delete.sql"],
                copies=[
                    ("quota/copy.sql", result.orgs.itertuples(index=False, name=None)),
                    ("quota/copy_tiers.sql", result.tiers.itertuples(index=False, name=None)),
                ],
            )


@asset(
    partitions_def=daily_partitions,
    group_name="quota",
    deps=["billed_usage"],
    retry_policy=STEP_RETRY,
    check_specs=[
        AssetCheckSpec(
            "orgs_have_known_plans",
            asset="quota_usage",
            partitions_def=daily_partitions,
            blocking=True,
            description="every org's plan is priced (TALLY_PRICING_FILE or the defaults)",
        )
    ],
    description="Month-to-date hours, included hours used/left, overage and expected charges "
    "per org as of the day (DESIGN §3, §4).",
)
def quota_usage(context: AssetExecutionContext, postgres: PostgresResource) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    pricing = pricing_or_fail()
    orgs = read_orgs(postgres)
    with raw_connection(postgres.billing_engine()) as connection:  # one transaction
        lock_month(connection, usage_date)
        later = read_later_days(connection, usage_date)
        days = [usage_date, *later]
        usage = read_month_usage(connection, days[-1])
        try:
            results = {day: quota_month_to_date(usage, orgs, day, pricing) for day in days}
        except PricingError as error:  # a tier without a rate: a setting to fix, not retried
            raise configuration_failure(f"pricing configuration: {error}") from None
        write_quota_usage(connection, results.items())
    result = results[usage_date]
    if later:
        context.log.info(
            f"month to date recomputed for {len(later)} later day(s) of "
            f"{usage_date:%Y-%m} already computed: " + ", ".join(map(str, later))
        )

    summary = finance_summary(result.orgs)
    unknown_plans = {org: plan for r in results.values() for org, plan in r.unknown_plans.items()}
    unknown = sorted(unknown_plans.items())
    if unknown:
        context.log.error(
            "orgs without a priced plan (not in quota_usage): "
            + ", ".join(f"{org} ({plan!r})" for org, plan in unknown[:20])
        )
    revenue = summary["expected_revenue"]
    return MaterializeResult(
        metadata={
            "usage_date": usage_date.isoformat(),
            "month": month_start(usage_date).strftime("%Y-%m"),
            "orgs": len(result.orgs),
            **{f"orgs_over_{level}_pct": summary[f"orgs_over_{level}_pct"] for level in (50, 90)},
            "orgs_over_100_pct": summary["orgs_over_100_pct"],
            "expected_revenue_month_to_date": MetadataValue.float(float(revenue)),
            "expected_revenue_month_to_date_exact": MetadataValue.text(f"${revenue}"),
            "free_tier_overage_orgs": summary["free_tier_overage_orgs"],
            "free_tier_overage_hours": MetadataValue.float(
                float(hours(summary["free_tier_overage_seconds"]))
            ),
            "billable_hours_month_to_date": MetadataValue.float(
                float(hours(int(result.orgs["billable_seconds"].sum())))
            ),
            "orgs_near_or_over_quota": MetadataValue.md(summary["table"]),
            "later_days_recomputed": len(later),
            "later_days_recomputed_dates": MetadataValue.text(", ".join(map(str, later))),
        },
        check_results=[
            AssetCheckResult(
                check_name="orgs_have_known_plans",
                passed=not unknown,
                metadata={
                    "orgs_without_priced_plan": len(unknown),
                    "examples": ", ".join(f"{org}={plan!r}" for org, plan in unknown[:10]),
                },
            )
        ],
    )
