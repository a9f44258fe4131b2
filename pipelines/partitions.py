"""One partition is one UTC usage day."""

from __future__ import annotations

import datetime as dt
import os

from dagster import DailyPartitionsDefinition

DEFAULT_FIRST_DAY = "2020-01-01"


def first_partition_day() -> dt.date:
    """`TALLY_FIRST_DAY` (YYYY-MM-DD) moves the first partition for older backfills."""
    return dt.date.fromisoformat(os.environ.get("TALLY_FIRST_DAY") or DEFAULT_FIRST_DAY)


# end_offset=1 includes today's (still growing) day so it can be metered on demand;
# the schedule always asks for yesterday.
daily_partitions = DailyPartitionsDefinition(
    start_date=first_partition_day().isoformat(), timezone="UTC", end_offset=1
)


def partition_day(partition_key: str) -> dt.date:
    return dt.date.fromisoformat(partition_key)
