"""One partition is one UTC usage day."""

from __future__ import annotations

import datetime as dt
import os
import warnings

from dagster import DailyPartitionsDefinition, PreviewWarning

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
