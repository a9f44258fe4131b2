"""Every night at 02:00 UTC, yesterday's partition."""

from __future__ import annotations

from dagster import build_schedule_from_partitioned_job

from pipelines.jobs import daily_billing

# With end_offset=1 the newest partition is today's; offset -1 asks for yesterday.
daily_billing_schedule = build_schedule_from_partitioned_job(
    daily_billing,
    name="daily_billing_schedule",
    hour_of_day=2,
    minute_of_hour=0,
    description="02:00 UTC: meter, push and reconcile yesterday.",
)
