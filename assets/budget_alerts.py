"""Budget alerts (DESIGN §4 budget_alerts): 50 % and 90 % of included hours, one
e-mail per (org, month, threshold) ever, through billing.budget_alert_ledger.

The month to date comes from `quota_usage` (assets/quota.py), read by asset key
from billing.quota_usage: the partition day's rows and those of the later days of
its month that quota_usage recomputed with it (an earlier day re-metered after a
later one), each threshold recorded as of the first of those days that reaches it.
Delivery is at most once:

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

Pure functions first (DataFrames in, DataFrames out); the asset is at the bottom.
"""

import datetime as dt
import html
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pandas as pd
import psycopg
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

from assets.config import pricing_or_fail
from assets.pricing import Plan, Pricing, to_cents
from assets.quota import hours, read_orgs
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.calendar import month_start, next_month
from resources.db import PostgresResource, load_sql, raw_connection, read_frame
from resources.notify import NotifyError, SmtpResource
from resources.settings import RunMode


class BudgetAlertStatus(StrEnum):
    """billing.budget_alert_ledger.status (CHECK constraint in migration 0004)."""

    QUEUED = "queued"
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_MAILED = "not_mailed"
    NO_ADDRESS = "no_address"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


class AlertAction(StrEnum):
    """What `settle_alerts` decides for an unsettled ledger row. Every action but
    `send` is also the status the row is settled with."""

    SEND = "send"
    INTERRUPTED = "interrupted"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    NO_ADDRESS = "no_address"
    NOT_MAILED = "not_mailed"


THRESHOLDS = (50, 90)
# An alert still owed this long after its month ended is no longer worth sending
# (backfills of old months record it as expired instead).
ALERT_GRACE = dt.timedelta(days=7)
# Stop a run's sending after this many SMTP failures in a row: the server is down.
MAX_CONSECUTIVE_SMTP_FAILURES = 3

OWED = (BudgetAlertStatus.QUEUED, BudgetAlertStatus.FAILED)
# Counted on the materialization, in this order (then `owed`).
OUTCOMES = (
    BudgetAlertStatus.SENT,
    BudgetAlertStatus.FAILED,
    BudgetAlertStatus.INTERRUPTED,
    BudgetAlertStatus.EXPIRED,
    BudgetAlertStatus.SUPERSEDED,
    BudgetAlertStatus.NO_ADDRESS,
    BudgetAlertStatus.NOT_MAILED,
)


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def alert_crossings(quota: pd.DataFrame, thresholds: tuple[int, ...] = THRESHOLDS) -> pd.DataFrame:
    """(org, month, threshold) reached in quota rows of one or more days: billable
    month to date ≥ threshold % of included, as of the earliest day that reaches it
    (one row per org, month and threshold). Orgs without included hours never alert."""
    columns = ["org_id", "month", "threshold", "usage_date", "billable_seconds", "included_seconds"]
    key = ["org_id", "month", "threshold"]
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
    crossings = pd.DataFrame(rows, columns=columns)
    return (
        crossings.sort_values("usage_date", kind="stable")
        .drop_duplicates(key, keep="first")
        .sort_values(key, kind="stable")
        .reset_index(drop=True)
    )


def settle_alerts(ledger: pd.DataFrame, now: dt.datetime, *, mail_enabled: bool) -> pd.DataFrame:
    """What to do with each unsettled ledger row (statuses queued, failed, pending),
    given every row of its (org, month). Returns org_id, month, threshold, action with
    action an `AlertAction`: send, interrupted, expired, superseded, no_address,
    not_mailed.

    Order of precedence: a pending row is a crash (interrupted, never re-sent); the
    month is over for too long (expired); a higher threshold of the same month exists
    (superseded: one e-mail says it all); no address; no SMTP (not_mailed)."""
    columns = ["org_id", "month", "threshold", "action"]
    if ledger.empty:
        return pd.DataFrame(columns=columns)
    highest = ledger.groupby(["org_id", "month"])["threshold"].max().to_dict()
    actions = []
    for row in ledger.itertuples(index=False):
        if row.status not in (*OWED, BudgetAlertStatus.PENDING):
            continue
        if row.status == BudgetAlertStatus.PENDING:
            action = AlertAction.INTERRUPTED
        elif now >= _deadline(row.month):
            action = AlertAction.EXPIRED
        elif highest[(row.org_id, row.month)] > row.threshold:
            action = AlertAction.SUPERSEDED
        elif not isinstance(row.recipient, str) or not row.recipient.strip():
            action = AlertAction.NO_ADDRESS
        elif not mail_enabled:
            action = AlertAction.NOT_MAILED
        else:
            action = AlertAction.SEND
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


def _mark(
    connection: psycopg.Connection,
    key: tuple,
    status: BudgetAlertStatus,
    error: str | None = None,
) -> None:
    org_id, month, threshold = key
    connection.execute(
        load_sql("budget_alerts/mark.sql"),
        {
            "org_id": org_id,
            "month": month,
            "threshold": threshold,
            "status": str(BudgetAlertStatus(status)),
            "last_error": error,
        },
    )
    connection.commit()


def settle_and_send(
    connection: psycopg.Connection,
    smtp: SmtpResource,
    orgs: pd.DataFrame,
    pricing: Pricing,
    now: dt.datetime,
    log,
) -> dict:
    """Settle every open ledger row and send what is owed, on a connection that holds
    the budget_alerts lock. Returns counts by outcome and the SMTP errors."""
    ledger = read_frame(connection, "budget_alerts/open.sql")
    connection.commit()
    actions = settle_alerts(ledger, now, mail_enabled=smtp.configured())
    rows = {(r.org_id, r.month, int(r.threshold)): r for r in ledger.itertuples(index=False)}
    by_org = {row.org_id: row for row in orgs.itertuples(index=False)}
    stats: dict[str, Any] = dict.fromkeys((outcome.value for outcome in OUTCOMES), 0)
    errors: list[str] = []
    consecutive_failures = 0
    for action in actions.itertuples(index=False):
        key = (action.org_id, action.month, int(action.threshold))
        if action.action != AlertAction.SEND:
            _mark(connection, key, BudgetAlertStatus(action.action))
            stats[action.action] += 1
            message = f"budget alert {key[0]} {key[1]:%Y-%m} {key[2]}%: {action.action}"
            if action.action == AlertAction.INTERRUPTED:
                log.warning(
                    message + " (a run died while sending; not re-sent - check the mail log, "
                    "then re-queue it if it never left: docs/quota.md)"
                )
            elif action.action == AlertAction.NOT_MAILED:
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
        _mark(connection, key, BudgetAlertStatus.PENDING)  # committed before the SMTP hand-off
        try:
            smtp.send(row.recipient, mail.subject, mail.text, mail.html)
        except NotifyError as error:
            _mark(connection, key, BudgetAlertStatus.FAILED, str(error)[:500])
            stats[BudgetAlertStatus.FAILED] += 1
            consecutive_failures += 1
            errors.append(str(error))
            continue
        _mark(connection, key, BudgetAlertStatus.SENT)
        stats[BudgetAlertStatus.SENT] += 1
        consecutive_failures = 0
        log.info(f"budget alert {key[0]} {key[1]:%Y-%m} {key[2]}% sent to {row.recipient}")
    stats["owed"] = (
        sum(action == AlertAction.SEND for action in actions["action"])
        - stats[BudgetAlertStatus.SENT]
    )
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
            partitions_def=daily_partitions,
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
        quota = read_frame(
            connection,
            "budget_alerts/quota_month_from_day.sql",
            {"usage_date": usage_date, "next_month": next_month(month_start(usage_date))},
        )
    crossings = alert_crossings(quota)
    days_evaluated = quota["usage_date"].nunique() if not quota.empty else 0

    if run_mode.report_only:
        with raw_connection(billing_engine) as connection:
            known = read_frame(
                connection, "budget_alerts/known.sql", {"months": [month_start(usage_date)]}
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

    pricing = pricing_or_fail()
    orgs = read_orgs(postgres)
    emails = dict(zip(orgs["org_id"], orgs["billing_email"], strict=True))
    with raw_connection(billing_engine) as connection:
        connection.execute(load_sql("budget_alerts/lock.sql"))
        connection.commit()
        try:
            with connection.cursor() as cursor:
                cursor.executemany(
                    load_sql("budget_alerts/insert.sql"),
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
            connection.execute(load_sql("budget_alerts/unlock.sql"))
            connection.commit()

    errors = stats.pop("errors")
    metadata: dict[str, Any] = {key: MetadataValue.int(int(value)) for key, value in stats.items()}
    metadata["thresholds_reached"] = MetadataValue.int(len(crossings))
    metadata["quota_days_evaluated"] = MetadataValue.int(int(days_evaluated))
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
                passed=stats[BudgetAlertStatus.INTERRUPTED] == 0,
                severity=AssetCheckSeverity.WARN,
                metadata={"interrupted": stats[BudgetAlertStatus.INTERRUPTED]},
            )
        ],
    )
