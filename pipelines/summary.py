"""Plain-text summaries of what the pipeline stored, for the CLI and the demo."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

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


def _number(value: object) -> float:
    """A SQL number for a format spec; NULL (NaN in a frame) is 0, never `nan`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(number) else number


def _text(value: object, empty: str = "-") -> str:
    """A SQL text; NULL (None or NaN in a frame) and '' print as `empty`."""
    return value if isinstance(value, str) and value else empty


def discrepancy_report(start: dt.date, end: dt.date) -> list[str]:
    """Kinds found in the range, money-moving first, then informational (whose dollars
    are potential: nothing was charged wrongly)."""
    rows = _rows("summary/discrepancy_kinds.sql", {"start_date": start, "end_date": end})
    if not rows:
        return ["no discrepancies"]
    lines: list[str] = []
    for moving, title, money in (
        (True, "money-moving (charged wrongly until explained)", "dollar impact"),
        (False, "informational (nothing charged wrongly yet)", "potential $"),
    ):
        chosen = [row for row in rows if bool(row["money_moving"]) is moving]
        if not chosen:
            continue
        if lines:
            lines.append("")
        lines.append(title)
        lines.append(f"kind                       found  unexplained    hours  {money:>14}")
        for row in chosen:
            lines.append(
                f"{_text(row['kind']):<25}  {int(_number(row['found'])):>5}  "
                f"{int(_number(row['unexplained'])):>11}  {_hours(int(_number(row['seconds']))):>7}"
                f"  {_number(row['dollars']):>14,.2f}"
            )
    return lines


def report_month_day(days: Sequence[dt.date]) -> dt.date:
    """The day whose month to date the report shows: the last of `days` in the month
    holding most of them (the later month on a tie), so a week that starts late in
    one month is reported on that month, not on the day or two after it."""
    if not days:
        raise ValueError("no days to report on")
    by_month: dict[dt.date, list[dt.date]] = {}
    for day in days:
        by_month.setdefault(day.replace(day=1), []).append(day)
    month = max(by_month, key=lambda first: (len(by_month[first]), first))
    return max(by_month[month])


def month_to_date_report(as_of: dt.date) -> list[str]:
    rows = _rows("summary/month_to_date.sql", {"usage_date": as_of})
    lines = [
        "org        plan              used h  included h  overage h  expected $  "
        "alerts    proposed credit $"
    ]
    for row in rows:
        flag = " (free-tier overage, not charged)" if row["free_tier_overage"] is True else ""
        lines.append(
            f"{_text(row['org_id']):<9}  {_text(row['plan']):<15}  "
            f"{_hours(int(_number(row['billable_seconds']))):>8}  "
            f"{_hours(int(_number(row['included_seconds']))):>10}  "
            f"{_hours(int(_number(row['overage_seconds']))):>9}  "
            f"{_number(row['expected_charges']):>10,.2f}  {_text(row['alerts']):<8}  "
            f"{_number(row['proposed_credits']):>17,.2f}{flag}"
        )
    return lines


def credits_report(start: dt.date, end: dt.date) -> list[str]:
    """Credit proposals of the range under the month of their usage day."""
    rows = _rows("summary/credits_by_month.sql", {"start_date": start, "end_date": end})
    if not rows:
        return ["no credit proposals"]
    lines = ["month    status     proposals        amount $"]
    for row in rows:
        month = row["month"]
        label = month.strftime("%Y-%m") if isinstance(month, dt.date) else _text(month)
        lines.append(
            f"{label:<7}  {_text(row['status']):<9}  {int(_number(row['proposals'])):>9}  "
            f"{_number(row['amount']):>14,.2f}"
        )
    return lines
