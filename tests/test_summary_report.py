"""The demo report (issue 12): no `nan` anywhere (an org no alert went to shows `-`),
month to date on the month holding most of the demo's days, credits under their own
month, and the kinds table split into money-moving and informational."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from pipelines.summary import (
    credits_report,
    discrepancy_report,
    month_to_date_report,
    report_month_day,
)

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


def discrepancy(connection, day, kind, org, seconds, dollars, *, moving, explained=False):
    connection.execute(
        sa.text(
            "INSERT INTO billing.discrepancies (usage_date, kind, org_id, delta_seconds, "
            "dollar_impact, money_moving, explained, detail) "
            "VALUES (:day, :kind, :org, :s, :d, :moving, :explained, 'test')"
        ),
        {
            "day": day,
            "kind": kind,
            "org": org,
            "s": seconds,
            "d": dollars,
            "moving": moving,
            "explained": explained,
        },
    )


def proposal(connection, org: str, day: dt.date, amount: str, status: str = "proposed"):
    connection.execute(
        sa.text(
            "INSERT INTO billing.credit_proposals (org_id, usage_date, tier, provider, kind, "
            "seconds, amount, evidence, status) "
            "VALUES (:org, :day, 'small', 'stripe', 'provider_over', 7200, :amount, 'x', :status)"
        ),
        {"org": org, "day": day, "amount": amount, "status": status},
    )


def test_kinds_table_puts_money_moving_and_informational_apart_without_nan(engine):
    with engine.begin() as connection:
        discrepancy(connection, DAY, "provider_over", "org-a", 7200, "0.10", moving=True)
        # Informational on this day: the same seconds as the provider_over.
        discrepancy(connection, DAY, "cap_exceeded", "org-a", 7200, "0.30", moving=False)
        discrepancy(connection, DAY, "stuck_instance", "org-b", -3600, None, moving=False)
    lines = discrepancy_report(DAY, DAY)
    text = "\n".join(lines)
    assert "nan" not in text.lower()
    money = lines.index("money-moving (charged wrongly until explained)")
    info = lines.index("informational (nothing charged wrongly yet)")
    assert money < info
    moving_kinds = [line.split()[0] for line in lines[money + 2 : info - 1]]
    info_kinds = [line.split()[0] for line in lines[info + 2 :]]
    assert moving_kinds == ["provider_over"]
    assert sorted(info_kinds) == ["cap_exceeded", "stuck_instance"]
    assert "potential $" in lines[info + 1]
    stuck = next(line for line in lines if line.startswith("stuck_instance"))
    assert stuck.split()[-1] == "0.00"  # no rate: 0.00, never nan


def test_month_to_date_covers_the_month_holding_most_of_the_days():
    late_november = [dt.date(2026, 11, 26) + dt.timedelta(days=n) for n in range(7)]
    assert late_november[-1] == dt.date(2026, 12, 2)
    assert report_month_day(late_november) == dt.date(2026, 11, 30)
    early_december = [dt.date(2026, 11, 29) + dt.timedelta(days=n) for n in range(7)]
    assert report_month_day(early_december) == early_december[-1]
    tie = [dt.date(2026, 11, 30), dt.date(2026, 12, 1)]
    assert report_month_day(tie) == dt.date(2026, 12, 1)  # the later month on a tie


def test_credits_show_under_their_own_month(engine):
    november, december = dt.date(2026, 11, 28), dt.date(2026, 12, 1)
    with engine.begin() as connection:
        quota_row(connection, "org-a", 3600)  # as of DAY, 2026-11-20: November
        connection.execute(
            sa.text(
                "INSERT INTO billing.quota_usage (org_id, usage_date, month, plan, "
                "included_seconds, billable_seconds, included_used_seconds, "
                "included_left_seconds, overage_seconds, used_pct, base_fee, "
                "overage_charges, expected_charges, free_tier_overage) VALUES ('org-a', "
                ":day, :month, 'free-tier', 36000, 0, 0, 36000, 0, 0, 0, 0, 0, false)"
            ),
            {"day": december, "month": december},
        )
        proposal(connection, "org-a", november, "1.25")
        connection.execute(
            sa.text(
                "INSERT INTO billing.credit_proposals (org_id, usage_date, tier, provider, "
                "kind, seconds, amount, evidence) VALUES ('org-a', :day, 'gpu', 'stripe', "
                "'provider_over', 60, 0.04, 'x')"
            ),
            {"day": december},
        )
    in_november = {line.split()[0]: line for line in month_to_date_report(DAY)[1:]}
    in_december = {line.split()[0]: line for line in month_to_date_report(december)[1:]}
    assert in_november["org-a"].split()[-1] == "1.25"
    assert in_december["org-a"].split()[-1] == "0.04"  # November's credit stays there
    by_month = credits_report(november, december)
    assert [line.split()[:2] + line.split()[-1:] for line in by_month[1:]] == [
        ["2026-11", "proposed", "1.25"],
        ["2026-12", "proposed", "0.04"],
    ]
