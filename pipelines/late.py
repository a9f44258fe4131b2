"""Late heartbeats, for operators (DESIGN §5 `tally late`): which days got heartbeats
after they were billed, a re-run of those days in date order (days past the Stripe
window are reported, not pushed), and the `late_heartbeats` sensor that requests
those runs when the daemon is up. What counts as late: assets/late_heartbeats.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from assets.late_heartbeats import LateDay, find_late_days
from pipelines.jobs import METER_SHARD
from pipelines.shard_runs import shard_day_requests
from resources.calendar import STRIPE_EVENT_WINDOW
from resources.db import PostgresResource

# `tally late` looks back over the Stripe window and a little past it, so days that
# can no longer be pushed are still reported.
LIST_LOOKBACK = STRIPE_EVENT_WINDOW + dt.timedelta(days=10)
SENSOR_INTERVAL_SECONDS = 3600


def late_line(day: LateDay) -> str:
    metered = day.metered_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    line = (
        f"{day.usage_date}  {day.late_heartbeats:>8,} late heartbeat(s) since billed at {metered}"
    )
    if day.past_stripe_window:
        line += "  (past the Stripe window: reported, not re-run)"
    return line


def to_rerun(late: list[LateDay]) -> list[dt.date]:
    """The days a re-run can still push, in date order."""
    return [day.usage_date for day in late if not day.past_stripe_window]


def find_late(now: dt.datetime, since: dt.date | None = None) -> list[LateDay]:
    """Late days from `since` (default: the Stripe window and ten days more) to today;
    reads only (a billing database never metered has none)."""
    from resources.db import billing_engine, control_engine

    today = now.astimezone(dt.UTC).date()
    start = since or (today - LIST_LOOKBACK)
    billing = billing_engine(apply_migrations=False)
    return find_late_days(control_engine(), billing, start, today, now)


def late_run_requests(day: LateDay, shard_count: int = 1) -> list[RunRequest]:
    """One run per (day, late count): a sensor tick that sees the same late rows
    again asks for nothing new (run_key), new late rows ask for another run — with
    org shards, one `meter_shard` run per shard (the combine follows them)."""
    run_key = f"late:{day.usage_date}:{day.metered_at.timestamp():.0f}:{day.late_heartbeats}"
    tags = {"tally/source": "late_heartbeats", "tally/late_heartbeats": str(day.late_heartbeats)}
    if shard_count > 1:
        return shard_day_requests(day.usage_date, shard_count, run_key, tags=tags)
    return [RunRequest(run_key=run_key, partition_key=day.usage_date.isoformat(), tags=tags)]


def late_heartbeats_sensor(
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    minimum_interval_seconds: int = SENSOR_INTERVAL_SECONDS,
    shard_count: int = 1,
):
    """Requests a `daily_billing` run (with shards, `meter_shard` runs) of every day
    with late heartbeats that can still be pushed, oldest first; `clock` is
    injectable for tests."""

    @sensor(
        name="late_heartbeats",
        job_name=METER_SHARD if shard_count > 1 else "daily_billing",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Re-runs days that got heartbeats after they were billed (`tally late`)",
    )
    def _late(context: SensorEvaluationContext, postgres: PostgresResource):
        now = clock()
        today = now.date()
        late = find_late_days(
            postgres.control_engine(), postgres.billing_engine(), today - LIST_LOOKBACK, today, now
        )
        old = [day for day in late if day.past_stripe_window]
        for day in old:
            context.log.warning(f"late heartbeats past the Stripe window: {late_line(day)}")
        requests = [
            request
            for day in late
            if not day.past_stripe_window
            for request in late_run_requests(day, shard_count)
        ]
        if not requests:
            return SkipReason(
                f"no late heartbeats to bill ({len(old)} day(s) past the Stripe window)"
                if old
                else "no late heartbeats"
            )
        return requests

    return _late


late_heartbeats = late_heartbeats_sensor()
