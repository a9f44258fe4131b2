"""The run-failure sensor (DESIGN §9): one alert per failed `daily_billing` or
`issue_credits` run, one recovery when a later run of the same job and day succeeds.
E-mail (SMTP settings as the freshness alert) and the alert webhook (tally's JSON or
PagerDuty Events v2, resources/notify.py). What to announce: `plan_alerts`.

A plain sensor over the run storage rather than a `run_failure_sensor` pair: the
recovery must be decided after the failure it ends (two sensors each with its own
cursor could see them in either order), and run-status sensors only see runs
launched from their own code location, while `tally run` executes in-process.

Once-ness lives in billing.run_failure_alerts, not in the cursor: every alert is
claimed there (committed) before it is sent, so a reset cursor, a restarted daemon
or a repeated tick finds it already announced. The cursor only bounds the scan.

No `from __future__ import annotations`: Dagster reads the resource annotations."""

import datetime as dt
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import replace

import sqlalchemy as sa
from dagster import (
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from pipelines.logs import scrub
from pipelines.run_failure import (
    MAX_ATTEMPTS,
    MONITORED_JOBS,
    NO_PARTITION,
    AlertAction,
    AlertKind,
    Announced,
    FinishedRun,
    RunOutcome,
    alert_text,
    channels_to_try,
    delivery_status,
    plan_alerts,
    webhook_payload,
    with_failure,
)
from pipelines.runner import _framework_message, _own_message
from resources.db import DatabaseUnavailable, PostgresResource, load_sql, raw_connection
from resources.notify import NotifyError, SmtpResource, WebhookResource

SENSOR_NAME = "run_failure_alerts"
INTERVAL_SECONDS = 30
FIRST_LOOKBACK = dt.timedelta(hours=24)  # an empty cursor scans the last day's runs
OVERLAP = dt.timedelta(minutes=10)  # re-scan a margin: run updates can land late
RUNS_PER_TICK = 200
PARTITION_TAG = "dagster/partition"
_OUTCOMES = {
    DagsterRunStatus.FAILURE: RunOutcome.FAILURE,
    DagsterRunStatus.SUCCESS: RunOutcome.SUCCESS,
}

_log = logging.getLogger(__name__)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- the runs


def _since(cursor_text: str | None, now: dt.datetime) -> dt.datetime:
    try:
        scanned = dt.datetime.fromisoformat(json.loads(cursor_text or "")["updated_after"])
    except (ValueError, KeyError, TypeError):
        return now - FIRST_LOOKBACK
    return scanned - OVERLAP


def finished_runs(instance, since: dt.datetime) -> tuple[list[FinishedRun], dt.datetime | None]:
    """Failed and successful runs of the monitored jobs updated after `since`, and the
    newest update time among them (the next cursor)."""
    runs: list[FinishedRun] = []
    newest: dt.datetime | None = None
    for job_name in MONITORED_JOBS:
        records = instance.get_run_records(
            filters=RunsFilter(job_name=job_name, statuses=list(_OUTCOMES), updated_after=since),
            order_by="update_timestamp",
            ascending=True,
            limit=RUNS_PER_TICK,
        )
        for record in records:
            run = record.dagster_run
            updated = record.update_timestamp.replace(
                tzinfo=record.update_timestamp.tzinfo or dt.UTC
            )
            ended = (
                dt.datetime.fromtimestamp(record.end_time, dt.UTC) if record.end_time else updated
            )
            runs.append(
                FinishedRun(
                    run_id=run.run_id,
                    job_name=run.job_name,
                    partition_key=run.tags.get(PARTITION_TAG) or NO_PARTITION,
                    outcome=_OUTCOMES[run.status],
                    ended_at=ended,
                )
            )
            newest = max(newest, updated) if newest else updated
    return runs, newest


def failure_details(instance, run_id: str) -> tuple[str | None, str | None]:
    """(the failed step(s), the first one's one-line error) as Dagster recorded them;
    a run that failed outside any step gives (None, the run's failure message)."""
    steps: list[str] = []
    error: str | None = None
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE)
    for record in records.records:
        event = record.event_log_entry.dagster_event
        if event is None or not event.step_key or event.step_key in steps:
            continue
        steps.append(event.step_key)
        data = event.event_specific_data
        error = error or _own_message(data) or _framework_message(getattr(data, "error", None))
    if steps:
        return ", ".join(steps), error
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_FAILURE)
    for record in records.records:
        event = record.event_log_entry.dagster_event
        if event is not None:
            data_error = getattr(event.event_specific_data, "error", None)
            return None, _framework_message(data_error) or event.message
    return None, None


# --------------------------------------------------------------------------- the ledger


def read_announced(connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Announced]:
    keys = sorted(set(keys))
    if not keys:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("run_failure/announced.sql"),
            {"job_names": [job for job, _ in keys], "partition_keys": [day for _, day in keys]},
        )
        rows = cursor.fetchall()
    return {
        (job, day): Announced(AlertKind(kind), run_id, ended_at)
        for job, day, kind, run_id, ended_at in rows
    }


def claim(connection, action: AlertAction, now: dt.datetime) -> int | None:
    """Record the alert before it is sent; None when it was claimed before."""
    run = action.run
    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("run_failure/claim.sql"),
            {
                "kind": action.kind,
                "job_name": run.job_name,
                "partition_key": run.partition_key,
                "run_id": run.run_id,
                "run_ended_at": run.ended_at,
                "resolves_run_id": action.resolves,
                "step_key": run.step,
                "error": run.error,
                "dedup_key": action.dedup_key,
                "now": now,
            },
        )
        row = cursor.fetchone()
    connection.commit()
    return int(row[0]) if row else None


def pending_retries(connection) -> list[tuple[int, AlertAction, list[str]]]:
    """(alert id, the alert, channels that took it) for failed deliveries."""
    with connection.cursor() as cursor:
        cursor.execute(load_sql("run_failure/retries.sql"), {"max_attempts": MAX_ATTEMPTS})
        rows = cursor.fetchall()
    connection.commit()
    retries = []
    for alert_id, kind, job, day, run_id, ended_at, resolves, step, error, channels in rows:
        outcome = RunOutcome.FAILURE if kind == AlertKind.FAILURE else RunOutcome.SUCCESS
        run = FinishedRun(run_id, job, day, outcome, ended_at, step, error)
        retries.append((alert_id, AlertAction(AlertKind(kind), run, resolves), list(channels)))
    return retries


def mark(
    connection, alert_id: int, status: str, channels: list[str], errors: list[str], now
) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("run_failure/mark.sql"),
            {
                "alert_id": alert_id,
                "status": status,
                "channels": sorted(channels),
                "errors": errors,
                "now": now,
            },
        )
    connection.commit()


# --------------------------------------------------------------------------- sending


def alert_channels(
    smtp: SmtpResource, webhook: WebhookResource, log
) -> dict[str, Callable[[AlertAction], None]]:
    """The configured channels, each a function delivering one alert."""
    channels: dict[str, Callable[[AlertAction], None]] = {}
    recipients = os.environ.get("ALERT_EMAIL_TO", "").strip()
    if smtp.configured() and recipients:

        def email(action: AlertAction) -> None:
            subject, body = alert_text(action)
            smtp.send(recipients, subject, body)

        channels["email"] = email
    elif smtp.configured() or recipients:
        missing = "ALERT_EMAIL_TO" if smtp.configured() else "SMTP_HOST"
        log.warning(f"{missing} is not set: run-failure alerts are not mailed")
    if webhook.configured():
        channels["webhook"] = lambda action: webhook.post(webhook_payload(action))
    return channels


def deliver(
    connection,
    alert_id: int,
    action: AlertAction,
    channels: dict[str, Callable[[AlertAction], None]],
    delivered: list[str],
    now: dt.datetime,
) -> str:
    """Send to the channels that have not taken it; record the outcome; one line."""
    errors: list[str] = []
    took = list(delivered)
    for name in channels_to_try(channels, delivered):
        try:
            channels[name](action)
        except NotifyError as error:
            errors.append(scrub(str(error)))
        except Exception as error:  # noqa: BLE001 - a broken channel must not stop the others
            errors.append(scrub(f"{name}: {type(error).__name__}: {error}"))
        else:
            took.append(name)
    status = delivery_status(took, failed=bool(errors))
    mark(connection, alert_id, status, took, errors, now)
    run = action.run
    what = f"{action.kind} {run.job_name} {run.partition_key or '-'} (run {run.run_id[:8]})"
    if errors:
        return f"{what} NOT delivered: {'; '.join(errors)}; retried next tick"
    return f"{what} " + (f"sent via {', '.join(sorted(took))}" if took else "recorded and logged")


def check_runs(
    instance,
    *,
    smtp: SmtpResource,
    webhook: WebhookResource,
    postgres: PostgresResource,
    cursor_text: str | None,
    now: dt.datetime,
    log=_log,
) -> tuple[str | None, str]:
    """One sensor tick → (the new cursor, a one-line summary)."""
    runs, newest = finished_runs(instance, _since(cursor_text, now))
    try:
        with raw_connection(postgres.billing_engine()) as connection:
            channels = alert_channels(smtp, webhook, log)
            results = [
                deliver(connection, alert_id, action, channels, delivered, now)
                for alert_id, action, delivered in pending_retries(connection)
            ]
            for action in plan_alerts(runs, read_announced(connection, (r.key for r in runs))):
                if action.kind == AlertKind.FAILURE:
                    step, error = failure_details(instance, action.run.run_id)
                    action = replace(action, run=with_failure(action.run, step, scrub(error or "")))
                alert_id = claim(connection, action, now)
                if alert_id is not None:
                    results.append(deliver(connection, alert_id, action, channels, [], now))
    except (DatabaseUnavailable, sa.exc.SQLAlchemyError, OSError) as error:
        # Without the ledger an alert could go out on every tick: wait for it (the
        # freshness alert still pages when a night is lost). The cursor stays.
        reason = scrub(str(error).splitlines()[0] if str(error) else type(error).__name__)
        log.error(f"run-failure alerts wait: billing.run_failure_alerts unavailable ({reason})")
        return cursor_text, f"billing database unavailable; nothing sent ({reason})"
    for line in results:
        (log.error if "NOT delivered" in line else log.warning)(f"run-failure alert: {line}")
    cursor = json.dumps({"updated_after": newest.isoformat()}) if newest else cursor_text
    summary = "; ".join(results) or f"nothing to announce ({len(runs)} finished run(s) checked)"
    return cursor, summary


@sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "One alert (e-mail and/or webhook, PagerDuty Events v2 when configured) per failed "
        "daily_billing or issue_credits run, naming the day, the failed step and its error; "
        "one recovery when a later run of the same job and day succeeds."
    ),
)
def run_failure_alerts(
    context: SensorEvaluationContext,
    smtp: SmtpResource,
    webhook: WebhookResource,
    postgres: PostgresResource,
) -> SkipReason:
    cursor, summary = check_runs(
        context.instance,
        smtp=smtp,
        webhook=webhook,
        postgres=postgres,
        cursor_text=context.cursor,
        now=utc_now(),
        log=context.log,
    )
    if cursor:
        context.update_cursor(cursor)
    return SkipReason(summary)
