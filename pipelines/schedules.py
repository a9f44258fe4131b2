"""Every night at 02:00 UTC, yesterday's partition."""

from __future__ import annotations

import datetime as dt

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from pipelines.jobs import daily_billing


@schedule(
    job=daily_billing,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    name="daily_billing_schedule",
    description="02:00 UTC: meter, push and reconcile yesterday.",
    # On from the first deploy: a billing pipeline that waits for a switch bills nothing.
    default_status=DefaultScheduleStatus.RUNNING,
)
def daily_billing_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    yesterday = (context.scheduled_execution_time.astimezone(dt.UTC) - dt.timedelta(days=1)).date()
    # run_key makes a repeated tick for the same day a no-op.
    return RunRequest(run_key=f"daily_billing:{yesterday}", partition_key=yesterday.isoformat())
