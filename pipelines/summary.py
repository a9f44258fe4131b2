"""Plain-text summaries of what the pipeline stored, for the CLI and the demo."""

from __future__ import annotations

import datetime as dt

from resources.db import billing_engine, raw_connection, read_frame


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:,.1f}"


def _rows(sql_name: str, params: dict) -> list[dict]:
    with raw_connection(billing_engine()) as connection:
        return read_frame(connection, sql_name, params).to_dict("records")


def day_summary(usage_date: dt.date) -> dict[str, int]:
    return _rows("summary/day.sql", {"usage_date": usage_date})[0]


def day_summary_line(usage_date: dt.date) -> str:
    summary = day_summary(usage_date)
    return (
        f"orgs {summary['orgs']:>4}  billable {_hours(summary['billable_seconds']):>8} h"
        f"  of runtime {_hours(summary['runtime_seconds']):>8} h"
        f"  quarantined {summary['quarantined']}"
    )


SUMMARY_HEADER = (
    "day         orgs  runtime h  billable h   idle h  over-cont h  over-daily h"
    "  quarantined  pushed h  recorded h  discrepancies"
)


def day_summary_row(usage_date: dt.date) -> str:
    s = day_summary(usage_date)
    return (
        f"{usage_date}  {s['orgs']:>4}  {_hours(s['runtime_seconds']):>9}  "
        f"{_hours(s['billable_seconds']):>10}  {_hours(s['idle_paused_seconds']):>7}  "
        f"{_hours(s['over_continuous_seconds']):>11}  {_hours(s['over_daily_seconds']):>12}  "
        f"{s['quarantined']:>11}  {_hours(s['pushed_seconds']):>8}  "
        f"{_hours(s['recorded_seconds']):>10}  {s['discrepancies']:>13}"
    )


def discrepancy_report(start: dt.date, end: dt.date) -> list[str]:
    rows = _rows("summary/discrepancy_kinds.sql", {"start_date": start, "end_date": end})
    if not rows:
        return ["no discrepancies"]
    lines = ["kind                  found  unexplained    hours   dollar impact"]
    for row in rows:
        lines.append(
            f"{row['kind']:<20}  {row['found']:>5}  {row['unexplained']:>11}  "
            f"{_hours(row['seconds']):>7}  {row['dollars']:>14,.2f}"
        )
    return lines


def month_to_date_report(as_of: dt.date) -> list[str]:
    rows = _rows("summary/month_to_date.sql", {"usage_date": as_of})
    lines = [
        "org        plan              used h  included h  overage h  expected $  "
        "alerts    proposed credit $"
    ]
    for row in rows:
        flag = " (free-tier overage, not charged)" if row["free_tier_overage"] else ""
        # No alert sent: SQL NULL, which the frame hands over as NaN (truthy).
        alerts = row["alerts"] if isinstance(row["alerts"], str) and row["alerts"] else "-"
        lines.append(
            f"{row['org_id']:<9}  {row['plan']:<15}  {_hours(row['billable_seconds']):>8}  "
            f"{_hours(row['included_seconds']):>10}  {_hours(row['overage_seconds']):>9}  "
            f"{row['expected_charges']:>10,.2f}  {alerts:<8}  "
            f"{row['proposed_credits']:>17,.2f}{flag}"
        )
    return lines
