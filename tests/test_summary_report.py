"""The demo's month-to-date section: an org no alert went to shows `-`, not `nan`
(issue 12: the demo report printed `nan` in its alerts column)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from pipelines.summary import month_to_date_report

DAY = dt.date(2026, 11, 20)


def quota_row(connection, org: str, seconds: int) -> None:
    connection.execute(
        sa.text(
            "INSERT INTO billing.quota_usage (org_id, usage_date, month, plan, "
            "included_seconds, billable_seconds, included_used_seconds, "
            "included_left_seconds, overage_seconds, used_pct, base_fee, overage_charges, "
            "expected_charges, free_tier_overage) VALUES (:org, :day, :month, "
            "'free-tier', 36000, :s, :s, 36000 - :s, 0, :s / 360.0, 0, 0, 0, false)"
        ),
        {"org": org, "day": DAY, "month": DAY.replace(day=1), "s": seconds},
    )


def test_month_to_date_alerts_column_shows_sent_thresholds_or_a_dash(engine):
    with engine.begin() as connection:
        quota_row(connection, "org-quiet", 3600)
        quota_row(connection, "org-loud", 34_000)
        connection.execute(
            sa.text(
                "INSERT INTO billing.budget_alert_ledger (org_id, month, threshold, status, "
                "usage_date, included_seconds, billable_seconds) "
                "VALUES ('org-loud', :month, 90, 'sent', :day, 36000, 34000)"
            ),
            {"month": DAY.replace(day=1), "day": DAY},
        )
    lines = month_to_date_report(DAY)
    by_org = {line.split()[0]: line for line in lines[1:]}
    assert "nan" not in "\n".join(lines)
    assert by_org["org-quiet"].split()[6] == "-"
    assert by_org["org-loud"].split()[6] == "90%"
