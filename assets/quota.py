"""Monthly quota and budget alerts (DESIGN §3 pricing, §4 quota_usage / budget_alerts).

`quota_usage`: per org, month to date as of the partition day, from
billing.billed_usage of that month up to the day (never from an earlier
partition's result, so re-runs, backfills and month boundaries need no state).
Included hours are used day by day in date order and, within a day, on the most
expensive tier first; what is left over is overage, billed at tier rates unless
the plan does not bill overage (free tier: flagged, not charged). Money is
Decimal, rounded half-up to cents once, at the end.

`budget_alerts`: 50 % and 90 % of included hours, one e-mail per (org, month,
threshold) ever, through billing.budget_alert_ledger. Delivery is at most once:

    (crossed) → queued ─┬→ pending → sent
                        │      ├───→ failed ──→ (next run) pending → …
                        │      └───→ [crash] → interrupted (never re-sent by itself)
                        ├→ not_mailed   (no SMTP configured)
                        ├→ no_address   (org has no billing_email)
                        ├→ superseded   (a higher threshold of the same month is due)
                        └→ expired      (month ended more than ALERT_GRACE ago)

A row is `pending` only inside a committed transaction taken right before the
SMTP hand-off, while the run holds the budget_alerts advisory lock. A pending row
seen by the next holder of the lock therefore belongs to a run that died between
hand-off and bookkeeping: the mail may or may not have left, so it is marked
`interrupted` and not re-sent (a crash cannot send twice); support re-queues it
after checking the mail log (docs/quota.md). `failed` means the server refused
the message or could not be reached, so it is owed and re-sent.

Pure functions first (DataFrames in, DataFrames out); the assets are at the bottom.
"""

import datetime as dt
import html
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.pricing import SECONDS_PER_HOUR, Plan, Pricing, PricingError, current_pricing, to_cents
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)
from resources.notify import NotifyError, SmtpResource
from resources.settings import RunMode

THRESHOLDS = (50, 90)
# Finance metadata: orgs at or over these shares of their included hours.
REPORT_THRESHOLDS = (50, 90, 100)
# An alert still owed this long after its month ended is no longer worth sending
# (backfills of old months record it as expired instead).
ALERT_GRACE = dt.timedelta(days=7)
# Stop a run's sending after this many SMTP failures in a row: the server is down.
MAX_CONSECUTIVE_SMTP_FAILURES = 3

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
OWED = ("queued", "failed")


# ---------------------------------------------------------------------------
# Pure functions: quota
# ---------------------------------------------------------------------------


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def next_month(day: dt.date) -> dt.date:
    first = month_start(day)
    return (first + dt.timedelta(days=32)).replace(day=1)


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
    if top.empty:
        summary["table"] = "_no org at 50 % of its included hours_"
    else:
        lines = [
            "| org | plan | used h | included h | used % | overage h | expected $ |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in top.head(25).itertuples(index=False):
            lines.append(
                f"| {row.org_id} | {row.plan} | {hours(row.billable_seconds)} | "
                f"{hours(row.included_seconds)} | {row.used_pct} | "
                f"{hours(row.overage_seconds)} | {row.expected_charges} |"
            )
        summary["table"] = "\n".join(lines)
    return summary


# ---------------------------------------------------------------------------
# Pure functions: budget alerts
# ---------------------------------------------------------------------------


def alert_crossings(quota: pd.DataFrame, thresholds: tuple[int, ...] = THRESHOLDS) -> pd.DataFrame:
    """(org, month, threshold) reached in a day's quota rows: billable month to date
    ≥ threshold % of included. Orgs without included hours never alert."""
    columns = ["org_id", "month", "threshold", "usage_date", "billable_seconds", "included_seconds"]
    rows = []
    for row in quota.itertuples(index=False):
        included = int(row.included_seconds)
        if included <= 0:
            continue
        for threshold in thresholds:
            if int(row.billable_seconds) * 100 >= threshold * included:
                rows.append(
                    (
                        row.org_id,
                        row.month,
                        threshold,
                        row.usage_date,
                        int(row.billable_seconds),
                        included,
                    )
                )
    return pd.DataFrame(rows, columns=columns)


def settle_alerts(ledger: pd.DataFrame, now: dt.datetime, *, mail_enabled: bool) -> pd.DataFrame:
    """What to do with each unsettled ledger row (statuses queued, failed, pending),
    given every row of its (org, month). Returns org_id, month, threshold, action with
    action one of: send, interrupted, expired, superseded, no_address, not_mailed.

    Order of precedence: a pending row is a crash (interrupted, never re-sent); the
    month is over for too long (expired); a higher threshold of the same month exists
    (superseded: one e-mail says it all); no address; no SMTP (not_mailed)."""
    columns = ["org_id", "month", "threshold", "action"]
    if ledger.empty:
        return pd.DataFrame(columns=columns)
    highest = ledger.groupby(["org_id", "month"])["threshold"].max().to_dict()
    actions = []
    for row in ledger.itertuples(index=False):
        if row.status not in (*OWED, "pending"):
            continue
        if row.status == "pending":
            action = "interrupted"
        elif now >= _deadline(row.month):
            action = "expired"
        elif highest[(row.org_id, row.month)] > row.threshold:
            action = "superseded"
        elif not isinstance(row.recipient, str) or not row.recipient.strip():
            action = "no_address"
        elif not mail_enabled:
            action = "not_mailed"
        else:
            action = "send"
        actions.append((row.org_id, row.month, int(row.threshold), action))
    return pd.DataFrame(actions, columns=columns)


def _deadline(month: dt.date) -> dt.datetime:
    return dt.datetime.combine(next_month(month), dt.time(), tzinfo=dt.UTC) + ALERT_GRACE


@dataclass(frozen=True)
class AlertMail:
    subject: str
    text: str
    html: str


def render_alert(
    *,
    org_id: str,
    org_name: str | None,
    plan: Plan | None,
    month: dt.date,
    threshold: int,
    usage_date: dt.date,
    billable_seconds: int,
    included_seconds: int,
) -> AlertMail:
    """The e-mail for one crossed threshold: used / included hours, share, what is left."""
    name = org_name or org_id
    used, included = hours(billable_seconds), hours(included_seconds)
    left = hours(max(included_seconds - billable_seconds, 0))
    share = format(to_cents(Decimal(billable_seconds * 100) / included_seconds).normalize(), "f")
    period = month.strftime("%B %Y")
    if plan is not None and not plan.overage_billable:
        after = "Usage beyond the included hours is not billed on your plan."
    else:
        after = "Usage beyond the included hours is billed at the hourly rate of each tier."
    subject = f"{name}: {threshold}% of included hours used for {period}"
    lines = [
        f"Hello {name},",
        "",
        f"{name} ({org_id}) has reached the {threshold}% budget alert threshold for {period}.",
        "",
        f"  Used:     {used} of {included} included hours ({share}%)",
        f"  Left:     {left} included hours",
        f"  As of:    {usage_date.isoformat()} (UTC, month to date)",
        f"  Threshold: {threshold}%",
        "",
        after,
        "",
        "This is the only alert for this threshold this month.",
    ]
    escaped = html.escape(name)
    body = (
        "<html><body>"
        f"<p>Hello {escaped},</p>"
        f"<p><strong>{escaped}</strong> ({html.escape(org_id)}) has reached the "
        f"<strong>{threshold}%</strong> budget alert threshold for {period}.</p>"
        "<table>"
        f"<tr><th align='left'>Used</th><td>{used} of {included} included hours "
        f"({share}%)</td></tr>"
        f"<tr><th align='left'>Left</th><td>{left} included hours</td></tr>"
        f"<tr><th align='left'>As of</th><td>{usage_date.isoformat()} (UTC, month to date)"
        "</td></tr>"
        f"<tr><th align='left'>Threshold</th><td>{threshold}%</td></tr>"
        "</table>"
        f"<p>{html.escape(after)}</p>"
        "<p>This is the only alert for this threshold this month.</p>"
        "</body></html>"
    )
    return AlertMail(subject, "\n".join(lines) + "\n", body)


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def read_orgs(postgres: PostgresResource) -> pd.DataFrame:
    """Organizations from the control plane (possibly another database than billing:
    joined with billing rows in pandas, never in SQL)."""
    with raw_connection(postgres.control_engine()) as connection:
        return read_frame(connection, "quota_orgs.sql")


def read_month_usage(connection, as_of: dt.date) -> pd.DataFrame:
    return read_frame(
        connection,
        "quota_billed_month.sql",
        {"month_start": month_start(as_of), "usage_date": as_of},
    )


def write_quota_usage(billing_engine, usage_date: dt.date, result: QuotaResult) -> None:
    """Replace the day's rows in one transaction (a re-run replaces, never adds)."""
    with raw_connection(billing_engine) as connection, connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "quota_usage",
            usage_date,
            deletes=["quota_delete_tiers.sql", "quota_delete.sql"],
            copies=[
                ("quota_copy.sql", result.orgs.itertuples(index=False, name=None)),
                ("quota_copy_tiers.sql", result.tiers.itertuples(index=False, name=None)),
            ],
        )


def _pricing_or_fail() -> Pricing:
    try:
        return current_pricing()
    except PricingError as error:
        raise Failure(description=f"pricing configuration: {error}", allow_retries=False) from None


@asset(
    partitions_def=daily_partitions,
    group_name="quota",
    deps=["billed_usage"],
    retry_policy=STEP_RETRY,
    check_specs=[
        AssetCheckSpec(
            "orgs_have_known_plans",
            asset="quota_usage",
            blocking=True,
            description="every org's plan is priced (TALLY_PRICING_FILE or the defaults)",
        )
    ],
    description="Month-to-date hours, included hours used/left, overage and expected charges "
    "per org as of the day (DESIGN §3, §4).",
)
def quota_usage(context: AssetExecutionContext, postgres: PostgresResource) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    pricing = _pricing_or_fail()
    orgs = read_orgs(postgres)
    billing_engine = postgres.billing_engine()
    with raw_connection(billing_engine) as connection:
        usage = read_month_usage(connection, usage_date)
    try:
        result = quota_month_to_date(usage, orgs, usage_date, pricing)
    except PricingError as error:
        raise Failure(description=f"pricing configuration: {error}", allow_retries=False) from None
    write_quota_usage(billing_engine, usage_date, result)

    summary = finance_summary(result.orgs)
    unknown = sorted(result.unknown_plans.items())
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


def _mark(connection, key: tuple, status: str, error: str | None = None) -> None:
    org_id, month, threshold = key
    connection.execute(
        load_sql("budget_mark.sql"),
        {
            "org_id": org_id,
            "month": month,
            "threshold": threshold,
            "status": status,
            "last_error": error,
        },
    )
    connection.commit()


def settle_and_send(
    connection, smtp: SmtpResource, orgs: pd.DataFrame, pricing: Pricing, now: dt.datetime, log
) -> dict:
    """Settle every open ledger row and send what is owed, on a connection that holds
    the budget_alerts lock. Returns counts by outcome and the SMTP errors."""
    ledger = read_frame(connection, "budget_open.sql")
    connection.commit()
    actions = settle_alerts(ledger, now, mail_enabled=smtp.configured())
    rows = {(r.org_id, r.month, int(r.threshold)): r for r in ledger.itertuples(index=False)}
    by_org = {row.org_id: row for row in orgs.itertuples(index=False)}
    outcomes = ("sent", "failed", "interrupted", "expired", "superseded", "no_address")
    stats = dict.fromkeys((*outcomes, "not_mailed"), 0)
    errors: list[str] = []
    consecutive_failures = 0
    for action in actions.itertuples(index=False):
        key = (action.org_id, action.month, int(action.threshold))
        if action.action != "send":
            _mark(connection, key, action.action)
            stats[action.action] += 1
            message = f"budget alert {key[0]} {key[1]:%Y-%m} {key[2]}%: {action.action}"
            if action.action == "interrupted":
                log.warning(
                    message + " (a run died while sending; not re-sent - check the mail log, "
                    "then re-queue it if it never left: docs/quota.md)"
                )
            elif action.action == "not_mailed":
                log.info(message + " (SMTP_HOST unset: recorded, not mailed)")
            else:
                log.info(message)
            continue
        if consecutive_failures >= MAX_CONSECUTIVE_SMTP_FAILURES:
            continue  # the server is down; still owed, the next run sends it
        row = rows[key]
        org = by_org.get(row.org_id)
        plan_name = getattr(org, "plan", None)
        mail = render_alert(
            org_id=row.org_id,
            org_name=getattr(org, "name", None),
            plan=pricing.plans.get(plan_name) if plan_name else None,
            month=row.month,
            threshold=int(row.threshold),
            usage_date=row.usage_date,
            billable_seconds=int(row.billable_seconds),
            included_seconds=int(row.included_seconds),
        )
        _mark(connection, key, "pending")  # committed before the SMTP hand-off
        try:
            smtp.send(row.recipient, mail.subject, mail.text, mail.html)
        except NotifyError as error:
            _mark(connection, key, "failed", str(error)[:500])
            stats["failed"] += 1
            consecutive_failures += 1
            errors.append(str(error))
            continue
        _mark(connection, key, "sent")
        stats["sent"] += 1
        consecutive_failures = 0
        log.info(f"budget alert {key[0]} {key[1]:%Y-%m} {key[2]}% sent to {row.recipient}")
    stats["owed"] = sum(action == "send" for action in actions["action"]) - stats["sent"]
    stats["errors"] = errors
    return stats


@asset(
    partitions_def=daily_partitions,
    group_name="quota",
    deps=["quota_usage"],
    retry_policy=STEP_RETRY,
    check_specs=[
        AssetCheckSpec(
            "no_interrupted_alerts",
            asset="budget_alerts",
            description="WARN when a run died while handing an alert to SMTP (not re-sent)",
        )
    ],
    description="50 % / 90 % of included hours: one e-mail per org, month and threshold, "
    "ever, through billing.budget_alert_ledger (DESIGN §4).",
)
def budget_alerts(
    context: AssetExecutionContext,
    postgres: PostgresResource,
    smtp: SmtpResource,
    run_mode: RunMode,
) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    billing_engine = postgres.billing_engine()
    with raw_connection(billing_engine) as connection:
        quota = read_frame(connection, "budget_quota_day.sql", {"usage_date": usage_date})
    crossings = alert_crossings(quota)

    if run_mode.report_only:
        with raw_connection(billing_engine) as connection:
            known = read_frame(
                connection, "budget_known.sql", {"months": [month_start(usage_date)]}
            )
        seen = {(r.org_id, r.month, int(r.threshold)) for r in known.itertuples(index=False)}
        due = [
            f"{r.org_id} {r.threshold}%"
            for r in crossings.itertuples(index=False)
            if (r.org_id, r.month, int(r.threshold)) not in seen
        ]
        context.log.info(f"report_only: nothing sent; {len(due)} alert(s) would be due")
        return MaterializeResult(
            metadata={"report_only": True, "sent": 0, "alerts_due": len(due)},
            check_results=[AssetCheckResult(check_name="no_interrupted_alerts", passed=True)],
        )

    pricing = _pricing_or_fail()
    orgs = read_orgs(postgres)
    emails = dict(zip(orgs["org_id"], orgs["billing_email"], strict=True))
    with raw_connection(billing_engine) as connection:
        connection.execute(load_sql("budget_lock.sql"))
        connection.commit()
        try:
            with connection.cursor() as cursor:
                cursor.executemany(
                    load_sql("budget_insert.sql"),
                    [
                        {**row._asdict(), "recipient": emails.get(row.org_id) or None}
                        for row in crossings.itertuples(index=False)
                    ],
                )
            connection.commit()  # recorded before anything is sent
            stats = settle_and_send(
                connection, smtp, orgs, pricing, dt.datetime.now(dt.UTC), context.log
            )
        finally:
            connection.rollback()
            connection.execute(load_sql("budget_unlock.sql"))
            connection.commit()

    errors = stats.pop("errors")
    metadata = {key: MetadataValue.int(int(value)) for key, value in stats.items()}
    metadata["thresholds_reached"] = MetadataValue.int(len(crossings))
    metadata["smtp_configured"] = MetadataValue.bool(smtp.configured())
    if errors:
        raise Failure(
            description=(
                f"{len(errors)} budget alert e-mail(s) not sent, still owed (the next run "
                f"sends them): {errors[0]}"
            ),
            metadata=metadata,
        )
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            AssetCheckResult(
                check_name="no_interrupted_alerts",
                passed=stats["interrupted"] == 0,
                severity=AssetCheckSeverity.WARN,
                metadata={"interrupted": stats["interrupted"]},
            )
        ],
    )
