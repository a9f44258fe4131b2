"""Sensors: the reconciliation freshness alert (replaces `BillingReconciliationMissing`)
and the dead man's switch ping after each successful reconciliation (DESIGN §9).

No `from __future__ import annotations`: Dagster reads the resource annotations."""

import datetime as dt
import logging
import os
from collections.abc import Callable

import httpx
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunStatusSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_status_sensor,
    sensor,
)

from pipelines.freshness import (
    RECONCILIATION_ASSET,
    AlertCursor,
    AlertDelivery,
    Freshness,
    after_delivery,
    alert_text,
    cursor_from_history,
    latest_alert,
    next_alert_step,
    read_freshness,
    record_alert,
    supersede_alert,
    unreadable_freshness,
    webhook_payload,
)
from resources.db import PostgresResource, raw_connection
from resources.notify import NotifyError, SmtpResource, WebhookResource

FRESHNESS_INTERVAL_SECONDS = 300
DEADMANS_SWITCH_TIMEOUT_S = 10.0

_log = logging.getLogger(__name__)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _scrub(text: str) -> str:
    """Belt and braces: no credential from the environment in a message we keep."""
    for variable in ("SMTP_PASSWORD", "SMTP_USERNAME"):
        secret = os.environ.get(variable)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


def alert_channels(
    smtp: SmtpResource, webhook: WebhookResource, log
) -> dict[str, Callable[[Freshness], None]]:
    """The configured channels, each a function delivering one alert."""
    channels: dict[str, Callable[[Freshness], None]] = {}
    recipients = os.environ.get("ALERT_EMAIL_TO", "").strip()
    if smtp.configured() and recipients:

        def email(freshness: Freshness) -> None:
            subject, body = alert_text(freshness)
            smtp.send(recipients, subject, body)

        channels["email"] = email
    elif smtp.configured():
        log.warning("SMTP_HOST is set but ALERT_EMAIL_TO is not: freshness alerts are not mailed")
    elif recipients:
        log.warning("ALERT_EMAIL_TO is set but SMTP_HOST is not: freshness alerts are not mailed")
    if webhook.configured():
        channels["webhook"] = lambda freshness: webhook.post(webhook_payload(freshness))
    return channels


def check_and_alert(
    *,
    smtp: SmtpResource,
    webhook: WebhookResource,
    postgres: PostgresResource,
    cursor_text: str | None,
    now: dt.datetime,
    log=_log,
) -> tuple[AlertCursor, str]:
    """One sensor tick: evaluate freshness, send the owed alert if any, record it.

    Returns the new cursor and a one-line summary of what happened."""
    freshness = _billing_freshness(postgres, now, log)
    connection_source = _BillingConnection(postgres, log)
    cursor = AlertCursor.load(cursor_text)
    if cursor is None:
        cursor = connection_source.run(lambda c: cursor_from_history(latest_alert(c)))
        cursor = cursor or AlertCursor()

    channels = alert_channels(smtp, webhook, log)
    step = next_alert_step(cursor, freshness, list(channels))
    if step.state is None:
        if cursor.pending and cursor.alert_id is not None:
            connection_source.run(lambda c: supersede_alert(c, cursor.alert_id, now))
            log.info(f"freshness back to {freshness.state} before the owed alert was delivered")
        return step.cursor, f"{freshness.state}; nothing to send"

    delivered: list[str] = []
    errors: list[str] = []
    for name in step.channels:
        try:
            channels[name](freshness)
        except NotifyError as error:
            errors.append(_scrub(str(error)))
        except Exception as error:  # noqa: BLE001 - a broken channel must not stop the others
            errors.append(_scrub(f"{name}: {type(error).__name__}: {error}"))
        else:
            delivered.append(name)
    failed = bool(errors)
    new_cursor = after_delivery(step, delivered, failed)
    all_channels = sorted(set(step.cursor.delivered) | set(delivered))
    status = (
        AlertDelivery.FAILED
        if failed
        else (AlertDelivery.SENT if all_channels else AlertDelivery.LOGGED)
    )
    alert_id = connection_source.run(
        lambda c: record_alert(
            c,
            step.cursor,
            freshness,
            delivered=all_channels,
            errors=errors,
            status=status,
            now=now,
        )
    )
    if alert_id is not None:
        new_cursor.alert_id = alert_id

    reasons = "; ".join(freshness.reasons) or "all checks pass"
    if failed:
        summary = (
            f"{freshness.state} alert NOT delivered ({'; '.join(errors)}); "
            "retrying on the next tick"
        )
        log.error(f"billing reconciliation {freshness.state}: {reasons}. {summary}")
    elif all_channels:
        summary = f"{freshness.state} alert sent via {', '.join(all_channels)}"
        log.warning(f"billing reconciliation {freshness.state}: {reasons}. {summary}")
    else:
        summary = (
            f"{freshness.state} alert recorded and logged (no SMTP_HOST + ALERT_EMAIL_TO, "
            "no ALERT_WEBHOOK_URL)"
        )
        log.warning(f"billing reconciliation {freshness.state}: {reasons}. {summary}")
    return new_cursor, summary


def _billing_freshness(postgres: PostgresResource, now: dt.datetime, log) -> Freshness:
    """Freshness from the billing database; when it cannot be read, stale with why."""
    try:
        freshness, _ = read_freshness(postgres.billing_engine(), now)
        return freshness
    except Exception as error:  # noqa: BLE001 - an unreadable billing database pages
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error(f"billing.reconciliations not readable: {problem}")
        return unreadable_freshness(now, problem)


class _BillingConnection:
    """Runs a function on a billing-database connection; the alert still goes out
    (and the cursor still moves) when the database is down — only the record is lost."""

    def __init__(self, postgres: PostgresResource, log) -> None:
        self.postgres = postgres
        self.log = log

    def run(self, function):
        try:
            with raw_connection(self.postgres.billing_engine()) as connection:
                return function(connection)
        except Exception as error:  # noqa: BLE001 - logged; the alert matters more
            self.log.error(
                f"billing.freshness_alerts not available ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            )
            return None


def freshness_sensor(
    name: str = "reconciliation_freshness",
    clock: Callable[[], dt.datetime] = utc_now,
    minimum_interval_seconds: int = FRESHNESS_INTERVAL_SECONDS,
) -> SensorDefinition:
    """The freshness sensor; `clock` is injectable for tests."""

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Alerts (e-mail and/or webhook) once when the reconciliation goes stale — no "
            "success in 24 h, or yesterday not reconciled by 06:00 UTC — and once when it "
            "recovers. Replaces BillingReconciliationMissing."
        ),
    )
    def _freshness(
        context: SensorEvaluationContext,
        smtp: SmtpResource,
        webhook: WebhookResource,
        postgres: PostgresResource,
    ) -> SkipReason:
        cursor, summary = check_and_alert(
            smtp=smtp,
            webhook=webhook,
            postgres=postgres,
            cursor_text=context.cursor,
            now=clock(),
            log=context.log,
        )
        context.update_cursor(cursor.dump())
        return SkipReason(summary)

    return _freshness


reconciliation_freshness = freshness_sensor()


# ---------------------------------------------------------------------------
# Dead man's switch
# ---------------------------------------------------------------------------


def run_reconciled(instance, run_id: str) -> bool:
    """Did this run materialize the `reconciliation` asset?"""
    key = AssetKey(RECONCILIATION_ASSET)
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
    ).records
    return any(
        record.event_log_entry.dagster_event is not None
        and record.event_log_entry.dagster_event.asset_key == key
        for record in records
    )


def ping_deadmans_switch(url: str, timeout_s: float = DEADMANS_SWITCH_TIMEOUT_S) -> str | None:
    """GET the URL; returns an error message (host only: the URL path is often a
    secret token) or None on success."""
    try:
        httpx.get(url, timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as error:
        host = httpx.URL(url).host or "<no host>"
        return f"dead man's switch at {host} failed: {type(error).__name__}"
    return None


@run_status_sensor(
    run_status=DagsterRunStatus.SUCCESS,
    name="deadmans_switch",
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "After each successful run that reconciled a day, GET DEADMANS_SWITCH_URL "
        "(e.g. a healthchecks.io check); unset: nothing."
    ),
)
def deadmans_switch(context: RunStatusSensorContext):
    url = os.environ.get("DEADMANS_SWITCH_URL", "").strip()
    run_id = context.dagster_run.run_id
    if not url:
        return SkipReason("DEADMANS_SWITCH_URL is not set")
    if not run_reconciled(context.instance, run_id):
        return SkipReason(f"run {run_id[:8]} did not reconcile a day; no ping")
    error = ping_deadmans_switch(url)
    if error:
        context.log.warning(f"{error} (run {run_id[:8]}); the switch will page if it persists")
        return SkipReason(error)
    context.log.info(f"dead man's switch pinged after run {run_id[:8]}")
    return None
