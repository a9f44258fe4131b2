"""Billing periods of a sandbox subscription: pure date arithmetic, no state.

A subscription has an anchor (its first period's start, midnight UTC) and an
interval; period k runs [start_k, start_{k+1}). Months keep the anchor's day of
month and clamp to the month's last day (a period anchored on the 31st ends on
30 April, then 31 May), as Stripe's billing cycle anchor does.
"""

from __future__ import annotations

from calendar import monthrange
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class Interval(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


MAX_PERIODS = 10_000  # a guard against an anchor centuries before the clock


@dataclass(frozen=True)
class Period:
    index: int
    start: int  # epoch seconds, inclusive
    end: int  # epoch seconds, exclusive


def _add_months(anchor: datetime, months: int) -> datetime:
    month0 = anchor.month - 1 + months
    year, month = anchor.year + month0 // 12, month0 % 12 + 1
    day = min(anchor.day, monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_start(anchor: int, interval: Interval, index: int) -> int:
    base = datetime.fromtimestamp(anchor, UTC)
    if interval is Interval.DAY:
        moved = base + timedelta(days=index)
    elif interval is Interval.WEEK:
        moved = base + timedelta(weeks=index)
    elif interval is Interval.MONTH:
        moved = _add_months(base, index)
    else:
        moved = _add_months(base, 12 * index)
    return int(moved.timestamp())


def period(anchor: int, interval: Interval, index: int) -> Period:
    return Period(
        index, period_start(anchor, interval, index), period_start(anchor, interval, index + 1)
    )


def period_at(anchor: int, interval: Interval, ts: float) -> Period | None:
    """The period holding `ts`, or None before the anchor (or absurdly far after)."""
    if ts < anchor:
        return None
    for index in range(MAX_PERIODS):
        current = period(anchor, interval, index)
        if current.start <= ts < current.end:
            return current
    return None


def ended_by(anchor: int, interval: Interval, ts: float, first: int = 0) -> list[Period]:
    """Periods from index `first` on whose end is at or before `ts`."""
    out = []
    for index in range(first, MAX_PERIODS):
        current = period(anchor, interval, index)
        if current.end > ts:
            break
        out.append(current)
    return out
