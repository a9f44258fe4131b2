"""Runs of a sharded day (`TALLY_SHARDS` > 1): one `meter_shard` run per org shard,
then the day's `daily_billing` combining them — requested by the `shards_combined`
sensor under the daemon, and by `tally run` itself. The decision (`shards_ready`)
is pure; the sensor and the runner read the runs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from assets.shards import Shard, shard_keys
from pipelines.jobs import METER_SHARD
from pipelines.partitions import DAY_DIMENSION, SHARD_DIMENSION, shard_partition_key

DAY_TAG = f"dagster/partition/{DAY_DIMENSION}"
SHARD_TAG = f"dagster/partition/{SHARD_DIMENSION}"
LOOKBACK = dt.timedelta(days=3)  # shard runs this recent are combined by the sensor


@dataclass(frozen=True)
class ShardRun:
    """A `meter_shard` run as the combine decision sees it."""

    run_id: str
    day: dt.date
    shard: str
    status: DagsterRunStatus
    created: float


@dataclass(frozen=True)
class ShardState:
    """Where a day's shards stand: every shard's latest run (None: never run)."""

    day: dt.date
    latest: dict[str, ShardRun | None]

    @property
    def ready(self) -> bool:
        """Every shard's latest run succeeded (none still running)."""
        return all(
            run is not None and run.status == DagsterRunStatus.SUCCESS
            for run in self.latest.values()
        )

    @property
    def waiting_for(self) -> list[str]:
        """Shards whose latest run has not succeeded, with why."""
        return [
            f"shard {key}: {'never run' if run is None else run.status.value.lower()}"
            for key, run in sorted(self.latest.items())
            if run is None or run.status != DagsterRunStatus.SUCCESS
        ]

    @property
    def run_key(self) -> str:
        """One combine per set of shard runs: a shard re-run asks for another."""
        ids = ",".join(run.run_id[:8] for _, run in sorted(self.latest.items()) if run)
        return f"combine:{self.day}:{ids}"


def shards_ready(day: dt.date, count: int, runs: Iterable[ShardRun]) -> ShardState:
    """The latest run of each of the day's `count` shards."""
    latest: dict[str, ShardRun | None] = dict.fromkeys(shard_keys(count))
    for run in runs:
        if run.day != day or run.shard not in latest:
            continue
        known = latest[run.shard]
        if known is None or run.created > known.created:
            latest[run.shard] = run
    return ShardState(day, latest)


def _shard_run(record) -> ShardRun | None:
    tags = record.dagster_run.tags
    try:
        day = dt.date.fromisoformat(tags.get(DAY_TAG, ""))
    except ValueError:
        return None
    return ShardRun(
        record.dagster_run.run_id,
        day,
        tags.get(SHARD_TAG, ""),
        record.dagster_run.status,
        record.create_timestamp.timestamp(),
    )


def shard_runs(instance, days: Iterable[dt.date] | None = None, since=None) -> list[ShardRun]:
    """`meter_shard` runs of `days` (or created since `since`) in the instance."""
    filters = []
    if days is not None:
        filters = [
            RunsFilter(job_name=METER_SHARD, tags={DAY_TAG: day.isoformat()}) for day in days
        ]
    else:
        filters = [RunsFilter(job_name=METER_SHARD, created_after=since)]
    found: list[ShardRun] = []
    for runs_filter in filters:
        for record in instance.get_run_records(filters=runs_filter, limit=1000):
            run = _shard_run(record)
            if run is not None:
                found.append(run)
    return found


def shard_day_requests(day: dt.date, count: int, run_key: str, **extra) -> list[RunRequest]:
    """A `meter_shard` run request for every shard of `day`."""
    return [
        RunRequest(
            run_key=f"{run_key}:{shard.key}",
            partition_key=shard_partition_key(day, shard),
            job_name=METER_SHARD,
            **extra,
        )
        for shard in (Shard(index, count) for index in range(count))
    ]


def shards_combined_sensor(count: int, minimum_interval_seconds: int = 60):
    """Requests a day's `daily_billing` (the combine) once every shard's latest
    `meter_shard` run succeeded; again after any shard re-runs."""

    @sensor(
        name="shards_combined",
        job_name="daily_billing",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            f"Combines a day's {count} org shards (daily_billing) once every shard's "
            "latest meter_shard run succeeded"
        ),
    )
    def shards_combined(context: SensorEvaluationContext):
        since = dt.datetime.now(dt.UTC) - LOOKBACK
        runs = shard_runs(context.instance, since=since)
        days = sorted({run.day for run in runs})
        states = [shards_ready(day, count, runs) for day in days]
        requests = [
            RunRequest(run_key=state.run_key, partition_key=state.day.isoformat())
            for state in states
            if state.ready
        ]
        if not requests:
            waiting = "; ".join(f"{state.day}: {', '.join(state.waiting_for)}" for state in states)
            return SkipReason(f"no day has all its shards done ({waiting or 'no shard runs'})")
        return requests

    return shards_combined
