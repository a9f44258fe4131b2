"""The first partition: recent by default, TALLY_FIRST_DAY when set (issue 11)."""

from __future__ import annotations

import datetime as dt

import pytest

from pipelines.partitions import default_first_day, first_partition_day


@pytest.mark.parametrize(
    ("today", "first"),
    [
        (dt.date(2026, 12, 2), dt.date(2026, 10, 1)),
        (dt.date(2026, 3, 1), dt.date(2026, 1, 1)),
        (dt.date(2026, 1, 31), dt.date(2025, 11, 1)),
        (dt.date(2026, 2, 28), dt.date(2025, 12, 1)),
    ],
)
def test_default_first_day_covers_stripes_window_and_the_month_to_date(today, first) -> None:
    assert default_first_day(today) == first
    # Always more than Stripe's 35 days back, and on a first of the month.
    assert (today - first).days > 35 and first.day == 1


def test_tally_first_day_sets_the_first_partition(monkeypatch) -> None:
    monkeypatch.setenv("TALLY_FIRST_DAY", "2024-06-01")
    assert first_partition_day(dt.date(2026, 12, 2)) == dt.date(2024, 6, 1)
    monkeypatch.delenv("TALLY_FIRST_DAY")
    assert first_partition_day(dt.date(2026, 12, 2)) == dt.date(2026, 10, 1)


def test_a_malformed_tally_first_day_names_the_variable_and_the_format(monkeypatch) -> None:
    monkeypatch.setenv("TALLY_FIRST_DAY", "last tuesday")
    with pytest.raises(ValueError, match=r"TALLY_FIRST_DAY='last tuesday' .* YYYY-MM-DD"):
        first_partition_day()
