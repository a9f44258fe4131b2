"""Earlier days still settling (DESIGN §8): days whose last reconciliation has
`provider_settling` rows are re-read and re-reconciled — provider_usage and
reconciliation only, as materializations of those days — by every `tally run` and
by the nightly schedule, until they converge (up to Stripe's 35-day window)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection

from dagster import AssetKey

from assets.settlement import SettlementRules

# What a re-read of a settling day materializes: the read-back and what follows it.
RESETTLE_ASSETS = (AssetKey("provider_usage"), AssetKey("reconciliation"))


def settling_days(billing_engine, today: dt.date, skip: Collection[dt.date] = ()) -> list[dt.date]:
    """Days before today (within the look-back) whose reconciliation still settles."""
    from resources.db import load_sql, raw_connection

    since = today - dt.timedelta(days=SettlementRules().lookback_days)
    with raw_connection(billing_engine) as connection, connection.cursor() as cursor:
        cursor.execute(load_sql("settlement/discrepancies_exist.sql"))
        exists = cursor.fetchone()
        if not (exists and exists[0]):
            return []
        cursor.execute(load_sql("settlement/settling_days.sql"), {"since": since, "before": today})
        return [day for (day,) in cursor.fetchall() if day not in skip]


def resettle(instance, job, days: list[dt.date], echo: Callable[[str], None]) -> int:
    """Re-read and re-reconcile `days` in date order; returns how many failed."""
    from pipelines.summary import day_summary_line

    failures = 0
    for day in days:
        result = job.execute_in_process(
            partition_key=day.isoformat(),
            instance=instance,
            asset_selection=list(RESETTLE_ASSETS),
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
            raise_on_error=False,
            tags={"tally/source": "cli", "tally/resettle": "true"},
        )
        status = "ok" if result.success else "FAILED"
        echo(
            f"[settling] {day}  {status:<6} re-read and re-reconciled  "
            f"{day_summary_line(day)}  run {result.run_id}"
        )
        failures += not result.success
    return failures


def resettle_sharded(
    instance, meter, combine, days: list[dt.date], count: int, echo: Callable[[str], None]
) -> int:
    """`resettle` for org shards: each shard re-reads its customers (`meter_shard`,
    provider_usage only), then the combine re-reads the shared ones and reconciles."""
    from assets.shards import Shard
    from pipelines.partitions import shard_partition_key
    from pipelines.summary import day_summary_line

    config = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    tags = {"tally/source": "cli", "tally/resettle": "true"}
    failures = 0
    for day in days:
        results = [
            meter.execute_in_process(
                partition_key=shard_partition_key(day, Shard(index, count)),
                instance=instance,
                asset_selection=[AssetKey("provider_usage")],
                run_config=config,
                raise_on_error=False,
                tags=tags,
            )
            for index in range(count)
        ]
        if all(result.success for result in results):
            results.append(
                combine.execute_in_process(
                    partition_key=day.isoformat(),
                    instance=instance,
                    asset_selection=[AssetKey("shared_provider_usage"), AssetKey("reconciliation")],
                    run_config=config,
                    raise_on_error=False,
                    tags=tags,
                )
            )
        ok = all(result.success for result in results) and len(results) == count + 1
        echo(
            f"[settling] {day}  {'ok' if ok else 'FAILED':<6} re-read ({count} shards) and "
            f"re-reconciled  {day_summary_line(day)}  run {results[-1].run_id}"
        )
        failures += not ok
    return failures
