"""Every night at 02:00 UTC, yesterday's partition, and a re-read of every earlier
day still settling (pipelines/settling.py). With org shards, one `meter_shard` run
per shard of the day; the `shards_combined` sensor combines them."""

from __future__ import annotations

import datetime as dt

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from pipelines.jobs import METER_SHARD, daily_billing
from pipelines.settling import RESETTLE_ASSETS, settling_days
from pipelines.shard_runs import shard_day_requests
from resources.db import PostgresResource

# A shard's re-read of a settling day: its read-back alone (the combine re-reconciles).
SHARD_RESETTLE_ASSETS = [key for key in RESETTLE_ASSETS if key.path[-1] == "provider_usage"]


def daily_requests(
    context: ScheduleEvaluationContext, postgres: PostgresResource, shard_count: int
) -> list[RunRequest]:
    yesterday = (context.scheduled_execution_time.astimezone(dt.UTC) - dt.timedelta(days=1)).date()
    # run_key makes a repeated tick for the same day a no-op.
    if shard_count > 1:
        requests = shard_day_requests(yesterday, shard_count, f"{METER_SHARD}:{yesterday}")
    else:
        requests = [
            RunRequest(run_key=f"daily_billing:{yesterday}", partition_key=yesterday.isoformat())
        ]
    try:
        earlier = settling_days(postgres.billing_engine(), yesterday + dt.timedelta(days=1))
    except Exception as error:  # noqa: BLE001 - yesterday's run must be requested anyway
        context.log.error(f"settling days not read: {str(error).splitlines()[0]}")
        earlier = []
    # Earlier days still settling: re-read and re-reconciled, nothing re-pushed.
    for day in earlier:
        if day == yesterday:
            continue
        if shard_count > 1:
            requests += shard_day_requests(
                day,
                shard_count,
                f"settle:{day}:{yesterday}",
                asset_selection=SHARD_RESETTLE_ASSETS,
                tags={"tally/resettle": "true"},
            )
        else:
            requests.append(
                RunRequest(
                    run_key=f"settle:{day}:{yesterday}",
                    partition_key=day.isoformat(),
                    asset_selection=list(RESETTLE_ASSETS),
                    tags={"tally/resettle": "true"},
                )
            )
    return requests


def build_daily_billing_schedule(job=daily_billing, shard_count: int = 1):
    """The 02:00 schedule of `job` (daily_billing, or meter_shard with shards)."""

    @schedule(
        job=job,
        cron_schedule="0 2 * * *",
        execution_timezone="UTC",
        name="daily_billing_schedule",
        description=(
            "02:00 UTC: meter, push and reconcile yesterday"
            + (f" ({shard_count} org shards, then combined)." if shard_count > 1 else ".")
        ),
        # On from the first deploy: a billing pipeline that waits for a switch bills nothing.
        default_status=DefaultScheduleStatus.RUNNING,
    )
    def daily_billing_schedule(
        context: ScheduleEvaluationContext, postgres: PostgresResource
    ) -> list[RunRequest]:
        return daily_requests(context, postgres, shard_count)

    return daily_billing_schedule


daily_billing_schedule = build_daily_billing_schedule()
