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


class AlertKind(StrEnum):
    """billing.budget_alert_ledger.kind (CHECK constraint in migration 0015): what a
    threshold measures — % of included hours, or whole dollars of month-to-date
    charges (orgs without included hours; thresholds per plan, `Plan.spend_alerts`)."""

    INCLUDED_HOURS = "included_hours"
    SPEND = "spend"


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
# Recorded while SMTP was unset: owed as soon as SMTP is configured.
OWED_ONCE_MAILED = (BudgetAlertStatus.NOT_MAILED,)
CROSSING_COLUMNS = [
    "org_id",
    "month",
    "kind",
    "threshold",
    "usage_date",
    "billable_seconds",
    "included_seconds",
    "spend",
]
KEY = ["org_id", "month", "kind", "threshold"]
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
                        AlertKind.INCLUDED_HOURS.value,
                        threshold,
                        row.usage_date,
                        int(row.billable_seconds),
                        included,
                        None,
                    )
                )
    return _first_crossings(rows)


def _first_crossings(rows: list[tuple]) -> pd.DataFrame:
    crossings = pd.DataFrame(rows, columns=CROSSING_COLUMNS)
    return (
        crossings.sort_values("usage_date", kind="stable")
        .drop_duplicates(KEY, keep="first")
        .sort_values(KEY, kind="stable")
        .reset_index(drop=True)
    )


def spend_crossings(quota: pd.DataFrame, pricing: Pricing) -> pd.DataFrame:
    """(org, month, dollar threshold) reached by orgs without included hours: the
    month-to-date charges (`expected_charges`) ≥ a threshold of the org's plan
    (`Plan.spend_alerts`), as of the earliest day that reaches it. Same columns as
    `alert_crossings`, kind `spend`."""
    rows = []
    for row in quota.itertuples(index=False):
        plan = pricing.plans.get(row.plan)
        spent = Decimal(row.expected_charges)
        for threshold in plan.spend_alerts if plan is not None else ():
            if spent >= threshold:
                rows.append(
                    (
                        row.org_id,
                        row.month,
                        AlertKind.SPEND.value,
                        threshold,
                        row.usage_date,
                        int(row.billable_seconds),
                        0,
                        spent,
                    )
                )
    return _first_crossings(rows)


def settle_alerts(ledger: pd.DataFrame, now: dt.datetime, *, mail_enabled: bool) -> pd.DataFrame:
    """What to do with each unsettled ledger row (statuses queued, failed, pending),
    given every row of its (org, month, kind). Returns org_id, month, kind, threshold,
    action with action an `AlertAction`: send, interrupted, expired, superseded,
    no_address, not_mailed.

    Order of precedence: a pending row is a crash (interrupted, never re-sent); the
    month is over for too long (expired); a higher threshold of the same month and
    kind exists (superseded: one e-mail says it all); no address; no SMTP
    (not_mailed). A not_mailed row is owed again once SMTP is configured; until
    then it is left as it is."""
    columns = ["org_id", "month", "kind", "threshold", "action"]
    if ledger.empty:
        return pd.DataFrame(columns=columns)
    if "kind" not in ledger:  # the column's default (migration 0015)
        ledger = ledger.assign(kind=AlertKind.INCLUDED_HOURS.value)
    highest = ledger.groupby(["org_id", "month", "kind"])["threshold"].max().to_dict()
    actions = []
    for row in ledger.itertuples(index=False):
        if row.status in OWED_ONCE_MAILED and not mail_enabled:
            continue  # still recorded, not mailed: nothing new to decide
        if row.status not in (*OWED, *OWED_ONCE_MAILED, BudgetAlertStatus.PENDING):
            continue
        if row.status == BudgetAlertStatus.PENDING:
            action = AlertAction.INTERRUPTED
        elif now >= _deadline(row.month):
            action = AlertAction.EXPIRED
        elif highest[(row.org_id, row.month, row.kind)] > row.threshold:
            action = AlertAction.SUPERSEDED
        elif not isinstance(row.recipient, str) or not row.recipient.strip():
            action = AlertAction.NO_ADDRESS
        elif not mail_enabled:
            action = AlertAction.NOT_MAILED
        else:
            action = AlertAction.SEND
        actions.append((row.org_id, row.month, row.kind, int(row.threshold), action))
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


def render_spend_alert(
    *,
    org_id: str,
    org_name: str | None,
    month: dt.date,
    threshold: int,
    usage_date: dt.date,
    billable_seconds: int,
    spend: Decimal,
) -> AlertMail:
    """The e-mail for one dollar threshold reached by month-to-date charges."""
    name = org_name or org_id
    period = month.strftime("%B %Y")
    spent = f"${to_cents(Decimal(spend)):,}"
    used = hours(billable_seconds)
    subject = f"{name}: ${threshold:,} spend alert for {period}"
    lines = [
        f"Hello {name},",
        "",
        f"{name} ({org_id}) has reached its ${threshold:,} spend alert for {period}.",
        "",
        f"  Charges so far: {spent} for {used} billable hours",
        f"  As of:          {usage_date.isoformat()} (UTC, month to date)",
        f"  Alert:          ${threshold:,}",
        "",
        "Usage is billed at the hourly rate of each tier.",
        "",
        "This is the only alert for this amount this month.",
    ]
    escaped = html.escape(name)
    body = (
        "<html><body>"
        f"<p>Hello {escaped},</p>"
        f"<p><strong>{escaped}</strong> ({html.escape(org_id)}) has reached its "
        f"<strong>${threshold:,}</strong> spend alert for {period}.</p>"
        "<table>"
        f"<tr><th align='left'>Charges so far</th><td>{spent} for {used} billable hours</td></tr>"
        f"<tr><th align='left'>As of</th><td>{usage_date.isoformat()} (UTC, month to date)"
        "</td></tr>"
        f"<tr><th align='left'>Alert</th><td>${threshold:,}</td></tr>"
        "</table>"
        "<p>Usage is billed at the hourly rate of each tier.</p>"
        "<p>This is the only alert for this amount this month.</p>"
        "</body></html>"
    )
    return AlertMail(subject, "\n".join(lines) + "\n", body)


def render_test_mail(*, org_id: str, org_name: str | None, sent_at: dt.datetime) -> AlertMail:
    """`tally alerts test`: proves the billing address receives tally's alerts."""
    name = org_name or org_id
    stamp = sent_at.strftime("%Y-%m-%d %H:%M UTC")
    subject = f"{name}: test of tally budget alerts"
    text = (
        f"Hello {name},\n\nThis is a test of the budget alerts for {org_id}, sent {stamp}.\n"
        "Budget and spend alerts for this organization arrive at this address.\n"
        "Nothing needs to be done.\n"
    )
    body = (
        f"<html><body><p>Hello {html.escape(name)},</p><p>This is a test of the budget "
        f"alerts for {html.escape(org_id)}, sent {stamp}.</p><p>Budget and spend alerts "
        "for this organization arrive at this address.</p><p>Nothing needs to be done.</p>"
        "</body></html>"
    )
    return AlertMail(subject, text, body)


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def _mark(
    connection: psycopg.Connection,
    key: tuple,
    status: BudgetAlertStatus,
    error: str | None = None,
) -> None:
    org_id, month, kind, threshold = key
    connection.execute(
        load_sql("budget_alerts/mark.sql"),
        {
            "org_id": org_id,
            "month": month,
            "kind": kind,
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
    rows = {
        (r.org_id, r.month, r.kind, int(r.threshold)): r for r in ledger.itertuples(index=False)
    }
    by_org = {row.org_id: row for row in orgs.itertuples(index=False)}
    stats: dict[str, Any] = dict.fromkeys((outcome.value for outcome in OUTCOMES), 0)
    errors: list[str] = []
    consecutive_failures = 0
    for action in actions.itertuples(index=False):
        key = (action.org_id, action.month, action.kind, int(action.threshold))
        if action.action != AlertAction.SEND:
            _mark(connection, key, BudgetAlertStatus(action.action))
            stats[action.action] += 1
            message = f"budget alert {_describe(key)}: {action.action}"
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
        if row.kind == AlertKind.SPEND:
            mail = render_spend_alert(
                org_id=row.org_id,
                org_name=getattr(org, "name", None),
                month=row.month,
                threshold=int(row.threshold),
                usage_date=row.usage_date,
                billable_seconds=int(row.billable_seconds),
                spend=Decimal(row.spend),
            )
        else:
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
        log.info(f"budget alert {_describe(key)} sent to {row.recipient}")
    stats["owed"] = (
        sum(action == AlertAction.SEND for action in actions["action"])
        - stats[BudgetAlertStatus.SENT]
    )
    stats["errors"] = errors
    return stats


def _describe(key: tuple) -> str:
    org_id, month, kind, threshold = key
    amount = f"${threshold}" if kind == AlertKind.SPEND else f"{threshold}%"
    return f"{org_id} {month:%Y-%m} {amount}"


class AlertTestError(ValueError):
    """`tally alerts test` cannot send: SMTP unset, unknown org, no address."""


def send_test_alert(control_engine, smtp: SmtpResource, org_id: str, now: dt.datetime) -> str:
    """Send the test e-mail to the org's billing address; the one-line result.
    AlertTestError when it cannot be sent for a reason the user fixes; NotifyError
    when the server did not take it."""
    if not smtp.configured():
        raise AlertTestError("SMTP_HOST is not set; set SMTP_HOST (and SMTP_PORT) to send e-mail")
    with raw_connection(control_engine) as connection:
        org = read_frame(connection, "budget_alerts/org.sql", {"org_id": org_id})
    if org.empty:
        raise AlertTestError(f"no organization '{org_id}' in the control plane; check the id")
    row = org.iloc[0]
    address = row["billing_email"]
    if not isinstance(address, str) or not address.strip():
        raise AlertTestError(
            f"{org_id} has no billing_email; set organizations.billing_email first"
        )
    mail = render_test_mail(org_id=org_id, org_name=row["name"], sent_at=now)
    smtp.send(address, mail.subject, mail.text, mail.html)
    return f"test e-mail sent to {address} for {org_id}"


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
        spend_quota = read_frame(
            connection,
            "budget_alerts/spend_month_from_day.sql",
            {"usage_date": usage_date, "next_month": next_month(month_start(usage_date))},
        )
    pricing = pricing_or_fail()
    crossings = pd.concat(
        [alert_crossings(quota), spend_crossings(spend_quota, pricing)], ignore_index=True
    )
    evaluated = pd.concat([quota["usage_date"], spend_quota["usage_date"]])
    days_evaluated = evaluated.nunique() if len(evaluated) else 0

    if run_mode.report_only:
        with raw_connection(billing_engine) as connection:
            known = read_frame(
                connection, "budget_alerts/known.sql", {"months": [month_start(usage_date)]}
            )
        seen = {
            (r.org_id, r.month, r.kind, int(r.threshold)) for r in known.itertuples(index=False)
        }
        due = [
            _describe((r.org_id, r.month, r.kind, int(r.threshold)))
            for r in crossings.itertuples(index=False)
            if (r.org_id, r.month, r.kind, int(r.threshold)) not in seen
        ]
        context.log.info(f"report_only: nothing sent; {len(due)} alert(s) would be due")
        return MaterializeResult(
            metadata={"report_only": True, "sent": 0, "alerts_due": len(due)},
            check_results=[AssetCheckResult(check_name="no_interrupted_alerts", passed=True)],
        )

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
                        {
                            **row._asdict(),
                            "spend": None if pd.isna(row.spend) else row.spend,
                            "recipient": emails.get(row.org_id) or None,
                        }
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
