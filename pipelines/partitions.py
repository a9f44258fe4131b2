"""One partition is one UTC usage day."""

from __future__ import annotations

import datetime as dt
import os
import warnings

from dagster import (
    DailyPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    PartitionsDefinition,
    PreviewWarning,
    StaticPartitionsDefinition,
)

from assets.shards import ALL, Shard, shard_keys
from resources.settings import SettingInvalid

# The daily assets' checks share `daily_partitions` so each result names its day (a
# preview in Dagster 1.13); say so once here, not on every command's import.
warnings.filterwarnings(
    "ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning
)


def default_first_day(today: dt.date) -> dt.date:
    """The first of the month two months before `today`: Stripe's 35-day window and
    the month to date of quotas, without years of empty partitions a backfill's
    "All" would turn into runs that push."""
    month = today.replace(day=1)
    for _ in range(2):
        month = (month - dt.timedelta(days=1)).replace(day=1)
    return month


def first_partition_day(today: dt.date | None = None) -> dt.date:
    """`TALLY_FIRST_DAY` (YYYY-MM-DD) sets the first partition (older backfills);
    unset, `default_first_day`."""
    configured = os.environ.get("TALLY_FIRST_DAY")
    if configured:
        try:
            return dt.date.fromisoformat(configured)
        except ValueError:
            raise SettingInvalid(
                f"TALLY_FIRST_DAY={configured!r} is not a date; set it as YYYY-MM-DD"
            ) from None
    return default_first_day(today or dt.datetime.now(dt.UTC).date())


# end_offset=1 includes today's (still growing) day so it can be metered on demand;
# the schedule always asks for yesterday.
daily_partitions = DailyPartitionsDefinition(
    start_date=first_partition_day().isoformat(), timezone="UTC", end_offset=1
)


def partition_day(partition_key: str) -> dt.date:
    return dt.date.fromisoformat(partition_key)


DAY_DIMENSION = "day"
SHARD_DIMENSION = "shard"


def shard_partitions(count: int) -> PartitionsDefinition:
    """The partitions of the stages that run per org shard (metering, push, read-back):
    the days alone with one shard, else day × shard (a static dimension of `count`
    keys, assets/shards.py), so each shard of a day is its own run."""
    if count <= 1:
        return daily_partitions
    return MultiPartitionsDefinition(
        {
            DAY_DIMENSION: daily_partitions,
            SHARD_DIMENSION: StaticPartitionsDefinition(shard_keys(count)),
        }
    )


def shard_count_of(partitions_def: PartitionsDefinition | None) -> int:
    if isinstance(partitions_def, MultiPartitionsDefinition):
        shards = partitions_def.get_partitions_def_for_dimension(SHARD_DIMENSION)
        return len(shards.get_partition_keys())
    return 1


def day_and_shard(
    partition_key: str, partitions_def: PartitionsDefinition | None
) -> tuple[dt.date, Shard]:
    """The usage day and the org shard of a partition key (a day, or day|shard)."""
    count = shard_count_of(partitions_def)
    if count == 1:
        return partition_day(partition_key), ALL
    keys = partitions_def.get_partition_key_from_str(partition_key).keys_by_dimension  # type: ignore[union-attr]
    return partition_day(keys[DAY_DIMENSION]), Shard.of_key(keys[SHARD_DIMENSION], count)


def shard_partition_key(day: dt.date, shard: Shard) -> str:
    """The partition key of one shard of a day (the day itself unsharded)."""
    if not shard.sharded:
        return day.isoformat()
    return MultiPartitionKey({DAY_DIMENSION: day.isoformat(), SHARD_DIMENSION: shard.key})
