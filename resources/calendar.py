"""The UTC usage-day calendar: the one owner of day and month bounds, of "noon UTC
of the usage day" (the timestamp every provider event carries, DESIGN §6) and of
Stripe's 35-day window. A leaf module (standard library only), so stages,
providers and the CLI can all import it."""

from __future__ import annotations

import calendar as _calendar
import datetime as dt

SECONDS_PER_DAY = 86_400
ONE_DAY = dt.timedelta(days=1)
# Stripe refuses meter events whose timestamp is more than 35 days old.
STRIPE_EVENT_WINDOW = dt.timedelta(days=35)


def day_start(day: dt.date) -> dt.datetime:
    """Midnight UTC opening `day`."""
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[midnight, next midnight) of `day`, UTC."""
    start = day_start(day)
    return start, start + ONE_DAY


def day_bounds_epoch(day: dt.date) -> tuple[int, int]:
    """`day_bounds` as whole epoch seconds."""
    start = int(day_start(day).timestamp())
    return start, start + SECONDS_PER_DAY


def usage_noon(day: dt.date) -> dt.datetime:
    """Noon UTC of the usage day: the timestamp of every event tally sends for it."""
    return dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)


def past_stripe_window(day: dt.date, now: dt.datetime) -> bool:
    """True when Stripe no longer accepts events for `day` (noon older than 35 days)."""
    return now - usage_noon(day) > STRIPE_EVENT_WINDOW


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def next_month(day: dt.date) -> dt.date:
    """The first day of the month after `day`'s."""
    return (month_start(day) + dt.timedelta(days=32)).replace(day=1)


def days_in_month(day: dt.date) -> int:
    return _calendar.monthrange(day.year, day.month)[1]
