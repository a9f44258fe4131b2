"""Every night at 02:00 UTC, yesterday's partition, and a re-read of every earlier
day still settling (pipelines/settling.py)."""

from __future__ import annotations

import datetime as dt

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from pipelines.jobs import daily_billing
from pipelines.settling import RESETTLE_ASSETS, settling_days
from resources.db import PostgresResource


@schedule(
    job=daily_billing,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    name="daily_billing_schedule",
    description="02:00 UTC: meter, push and reconcile yesterday.",
    # On from the first deploy: a billing pipeline that waits for a switch bills nothing.
    default_status=DefaultScheduleStatus.RUNNING,
)
def daily_billing_schedule(
    context: ScheduleEvaluationContext, postgres: PostgresResource
) -> list[RunRequest]:
    yesterday = (context.scheduled_execution_time.astimezone(dt.UTC) - dt.timedelta(days=1)).date()
    # run_key makes a repeated tick for the same day a no-op.
    requests = [
        RunRequest(run_key=f"daily_billing:{yesterday}", partition_key=yesterday.isoformat())
    ]
    try:
        earlier = settling_days(postgres.billing_engine(), yesterday + dt.timedelta(days=1))
    except Exception as error:  # noqa: BLE001 - yesterday's run must be requested anyway
        context.log.error(f"settling days not read: {str(error).splitlines()[0]}")
        earlier = []
    # Earlier days still settling: re-read and re-reconciled, nothing re-pushed.
    requests += [
        RunRequest(
            run_key=f"settle:{day}:{yesterday}",
            partition_key=day.isoformat(),
            asset_selection=list(RESETTLE_ASSETS),
            tags={"tally/resettle": "true"},
        )
        for day in earlier
        if day != yesterday
    ]
    return requests
