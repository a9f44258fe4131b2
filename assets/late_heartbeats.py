"""Late heartbeats: heartbeats appended to a day's look-back window after the day
was metered (DESIGN §5 `tally late`). The heartbeats table is append-only, so a
window that holds more heartbeats now than its metering counted has late ones; a
re-run of that day bills them (the push sends only the delta).

The pure part (`late_days`) decides; the thin readers below it count."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from resources.calendar import past_stripe_window


@dataclass(frozen=True)
class MeteredDay:
    """A row of billing.metered_days: what the day's last real metering saw."""

    usage_date: dt.date
    window_start: dt.datetime
    window_end: dt.datetime
    heartbeats_seen: int
    counted_at: dt.datetime
    part: str = "all"  # the org shard that metered it (assets/shards.py)


@dataclass(frozen=True)
class LateDay:
    usage_date: dt.date
    late_heartbeats: int
    metered_at: dt.datetime
    past_stripe_window: bool  # too old to push to Stripe: reported, not re-run

    def as_json(self) -> dict[str, object]:
        return {
            "usage_date": self.usage_date.isoformat(),
            "late_heartbeats": self.late_heartbeats,
            "metered_at": self.metered_at.astimezone(dt.UTC).isoformat(),
            "past_stripe_window": self.past_stripe_window,
        }


def late_days(counted: Iterable[tuple[MeteredDay, int]], now: dt.datetime) -> list[LateDay]:
    """Days whose window now holds more heartbeats than their metering saw, in date
    order; a sharded day sums its shards' late heartbeats. Fewer than seen (rows
    deleted by retention) is not lateness."""
    found: dict[dt.date, LateDay] = {}
    for day, count in counted:
        if count <= day.heartbeats_seen:
            continue
        earlier = found.get(day.usage_date)
        found[day.usage_date] = LateDay(
            day.usage_date,
            count - day.heartbeats_seen + (earlier.late_heartbeats if earlier else 0),
            max(day.counted_at, earlier.metered_at) if earlier else day.counted_at,
            past_stripe_window(day.usage_date, now),
        )
    return sorted(found.values(), key=lambda late: late.usage_date)


# ---------------------------------------------------------------------------
# Thin readers: billing.metered_days, and the control plane's heartbeats now
# ---------------------------------------------------------------------------


def read_metered_days(billing_engine, since: dt.date, until: dt.date) -> list[MeteredDay]:
    from resources.db import load_sql, raw_connection

    with raw_connection(billing_engine) as connection, connection.cursor() as cursor:
        cursor.execute(load_sql("late/metered_days_exist.sql"))
        exists = cursor.fetchone()
        if not (exists and exists[0]):
            return []
        cursor.execute(load_sql("late/metered_days.sql"), {"since": since, "until": until})
        return [
            MeteredDay(row[0], row[1], row[2], row[3], row[4], part=row[6])
            for row in cursor.fetchall()
        ]


def find_late_days(
    control_engine,
    billing_engine,
    since: dt.date,
    until: dt.date,
    now: dt.datetime,
    part: str | None = None,
) -> list[LateDay]:
    """Late days among the days metered in [since, until]: one index range count per
    day (per shard of a sharded day) on the control plane (heartbeats_sent_at)."""
    from assets.extract import ShardFilter, count_window
    from assets.shards import UNSHARDED_PART, Shard
    from resources.db import raw_connection, read_frame

    metered = read_metered_days(billing_engine, since, until)
    if part is not None:  # one org shard's own check looks at its own windows only
        metered = [day for day in metered if day.part == part]
    if not metered:
        return []
    with raw_connection(control_engine) as connection:
        instances = None
        filters: dict[str, ShardFilter | None] = {UNSHARDED_PART: None}
        for day in metered:
            if day.part not in filters:
                if instances is None:
                    instances = read_frame(connection, "extract/instances.sql")
                index, count = (int(n) for n in day.part.split("/"))
                filters[day.part] = ShardFilter.of(instances, Shard(index, count))
        counted = [
            (
                day,
                count_window(
                    connection, day.window_start, day.window_end, filters[day.part]
                ).heartbeats,
            )
            for day in metered
        ]
    return late_days(counted, now)
