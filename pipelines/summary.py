"""Plain-text summaries of what the pipeline stored, for the CLI and the demo."""

from __future__ import annotations

import datetime as dt

from resources.db import billing_url, engine_for, load_sql, raw_connection


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:,.1f}"


def day_summary(usage_date: dt.date) -> dict[str, int]:
    with raw_connection(engine_for(billing_url())) as connection:
        cursor = connection.execute(load_sql("day_summary.sql"), {"usage_date": usage_date})
        columns = [column.name for column in cursor.description]
        return dict(zip(columns, cursor.fetchone(), strict=True))


def day_summary_line(usage_date: dt.date) -> str:
    summary = day_summary(usage_date)
    return (
        f"orgs {summary['orgs']:>4}  billable {_hours(summary['billable_seconds']):>8} h"
        f"  of runtime {_hours(summary['runtime_seconds']):>8} h"
        f"  quarantined {summary['quarantined']}"
    )


SUMMARY_HEADER = (
    "day         orgs   runtime h  billable h    idle h  over-cont h  over-daily h"
    "  quarantined   pushed h"
)


def day_summary_row(usage_date: dt.date) -> str:
    s = day_summary(usage_date)
    return (
        f"{usage_date}  {s['orgs']:>4}  {_hours(s['runtime_seconds']):>10}  "
        f"{_hours(s['billable_seconds']):>10}  {_hours(s['idle_paused_seconds']):>8}  "
        f"{_hours(s['over_continuous_seconds']):>11}  {_hours(s['over_daily_seconds']):>12}  "
        f"{s['quarantined']:>11}  {_hours(s['pushed_seconds']):>9}"
    )
