"""Issue 9, finding 8: an out-of-order backfill (a later day of the month metered and
quota'd first, then an earlier day) recomputes the month to date of every later day
already computed, in the same run, and the budget alerts are evaluated on the result
(real PostgreSQL, real Dagster, a real SMTP server: aiosmtpd, fixture `smtp_server`)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pandas as pd
import sqlalchemy as sa
from builders import add_billed, add_heartbeats, add_instance, add_org, at, every_minute
from dagster import materialize

from assets.budget_alerts import alert_crossings, budget_alerts
from assets.metering import billed_usage
from assets.quota import later_days_of_month, quota_usage
from pipelines.org_report import build_report
from resources import db
from resources.db import PostgresResource
from resources.notify import SmtpResource
from resources.settings import RunMode

H = 3600
YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
# $20 a month, 10 included hours, overage billed at tier rates (gpu $2.50/h): 8 h of
# gpu on each of two days is 16 h -> 10 included, 6 over = $15.00 -> $35.00.
PRICING = "plans:\n  starter: {monthly_fee: 20, included_hours: 10, overage_billable: true}\n"


def two_days() -> tuple[dt.date, dt.date]:
    """Two past days of one month whose alerts are still worth sending (not expired):
    D1 six days before D2, D2 yesterday or the last day of a month that just ended."""
    d2 = YESTERDAY if YESTERDAY.day >= 7 else YESTERDAY.replace(day=1) - dt.timedelta(days=1)
    return d2 - dt.timedelta(days=6), d2


def run(day: dt.date, *, metering: bool = True, alerts: bool = True):
    assets = [billed_usage] if metering else []
    assets += [quota_usage, budget_alerts] if alerts else [quota_usage]
    return materialize(
        assets,
        partition_key=day.isoformat(),
        resources={
            "postgres": PostgresResource(),
            "smtp": SmtpResource(),
            "run_mode": RunMode(report_only=False),
        },
    )


def quota_rows(engine, day: dt.date) -> tuple[list[dict], list[dict]]:
    with engine.connect() as connection:
        orgs = connection.execute(
            sa.text(
                "SELECT org_id, usage_date, month, plan, included_seconds, billable_seconds, "
                "included_used_seconds, included_left_seconds, overage_seconds, used_pct, "
                "base_fee, overage_charges, expected_charges, free_tier_overage "
                "FROM billing.quota_usage WHERE usage_date = :d ORDER BY org_id"
            ),
            {"d": day},
        )
        tiers = connection.execute(
            sa.text(
                "SELECT org_id, usage_date, tier, billable_seconds, included_seconds, "
                "overage_seconds, overage_amount FROM billing.quota_usage_tiers "
                "WHERE usage_date = :d ORDER BY org_id, tier"
            ),
            {"d": day},
        )
        return [dict(r._mapping) for r in orgs], [dict(r._mapping) for r in tiers]


def ledger(engine) -> list[tuple]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT org_id, threshold, status, usage_date, billable_seconds "
                    "FROM billing.budget_alert_ledger ORDER BY org_id, threshold"
                )
            )
        ]


def test_earlier_day_after_later_day_recomputes_month_to_date_and_alerts_in_the_same_run(
    engine, smtp_server, tmp_path, monkeypatch
):
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text(PRICING)
    monkeypatch.setenv("TALLY_PRICING_FILE", str(pricing))
    d1, d2 = two_days()
    add_org(engine, "org-s", plan="starter")
    add_instance(engine, "i-gpu", "org-s", "gpu")
    for day in (d1, d2):  # 8 h of gpu each day, 01:00-09:00
        add_heartbeats(engine, every_minute("i-gpu", at(day, 1), 8 * 60))

    run(d2)  # the later day first: 8 of 10 h (80 %): the 50 % alert
    assert [m["Subject"] for m in smtp_server.messages] == [
        "org-s Inc.: 50% of included hours used for " + d2.strftime("%B %Y")
    ]
    first, _ = quota_rows(engine, d2)
    assert (first[0]["billable_seconds"], first[0]["expected_charges"]) == (8 * H, Decimal("20"))

    result = run(d1)  # then the earlier day: d2's month to date is now 16 h
    (orgs_d2,), tiers_d2 = quota_rows(engine, d2)
    assert orgs_d2["billable_seconds"] == 16 * H
    assert (orgs_d2["included_used_seconds"], orgs_d2["overage_seconds"]) == (10 * H, 6 * H)
    assert orgs_d2["expected_charges"] == Decimal("35.00")
    assert [(t["tier"], t["overage_amount"]) for t in tiers_d2] == [("gpu", Decimal("15.00"))]
    metadata = result.asset_materializations_for_node("quota_usage")[0].metadata
    assert metadata["later_days_recomputed"].value == 1
    assert d2.isoformat() in metadata["later_days_recomputed_dates"].value

    # The 90 % alert goes out in the run that re-metered d1, as of d2 (16 h); the 50 %
    # alert is not sent again (one e-mail per org, month and threshold, ever).
    assert len(smtp_server.messages) == 2
    ninety = smtp_server.messages[1]
    assert ninety["To"] == "billing@org-s.test" and "90% of included hours" in ninety["Subject"]
    assert "16.00 of 10.00 included hours" in ninety.get_body(("plain",)).get_content()
    assert d2.isoformat() in ninety.get_body(("plain",)).get_content()
    assert ledger(engine) == [
        ("org-s", 50, "sent", d2, 8 * H),
        ("org-s", 90, "sent", d2, 16 * H),
    ]

    # The truth: the same as computing d1 then d2 in order.
    out_of_order = {day: quota_rows(engine, day) for day in (d1, d2)}
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE billing.quota_usage, billing.quota_usage_tiers"))
    for day in (d1, d2):
        run(day, metering=False, alerts=False)
    assert {day: quota_rows(engine, day) for day in (d1, d2)} == out_of_order

    # ... and what `tally org` says for the month.
    report = build_report(
        "org-s",
        d2.replace(day=1),
        control_engine=db.control_engine(),
        billing_engine=db.billing_engine(),
        today=YESTERDAY + dt.timedelta(days=1),
    )
    assert report["usage"]["billable_seconds"] == orgs_d2["billable_seconds"]
    assert report["charges"]["expected"] == "35.00"

    # Re-running every day again changes nothing and sends nothing.
    for day in (d1, d2):
        run(day)
    assert {day: quota_rows(engine, day) for day in (d1, d2)} == out_of_order
    assert len(smtp_server.messages) == 2


def test_recompute_stays_in_the_month_and_keeps_days_never_computed_out(engine):
    # base-plus-usage (100 h). Oct 5 and Nov 2 already computed; Oct 20 has usage
    # but was never computed. Re-running Oct 3 recomputes Oct 5 only: Oct 20 stays
    # uncomputed (it is not "already computed") and November is another month.
    oct3, oct5, oct20 = (dt.date(2025, 10, day) for day in (3, 5, 20))
    nov2 = dt.date(2025, 11, 2)
    add_org(engine, "org-b", plan="base-plus-usage")
    add_billed(engine, [("org-b", oct5, "small", 5 * H), ("org-b", oct20, "small", H)])
    add_billed(engine, [("org-b", nov2, "small", 2 * H)])
    run(oct5, metering=False, alerts=False)
    run(nov2, metering=False, alerts=False)
    november = quota_rows(engine, nov2)
    add_billed(engine, [("org-b", oct3, "gpu", 3 * H)])

    result = run(oct3, metering=False, alerts=False)
    assert quota_rows(engine, oct5)[0][0]["billable_seconds"] == 8 * H  # 3 + 5
    assert quota_rows(engine, oct20) == ([], [])
    assert quota_rows(engine, nov2) == november
    metadata = result.asset_materializations_for_node("quota_usage")[0].metadata
    assert metadata["later_days_recomputed"].value == 1
    assert metadata["usage_date"].value == oct3.isoformat()


def test_later_days_of_month_are_the_computed_days_after_the_day_in_order():
    day = dt.date(2025, 10, 10)
    computed = [
        dt.date(2025, 10, 31),
        dt.date(2025, 10, 10),  # the day itself
        dt.date(2025, 10, 9),
        dt.date(2025, 11, 1),  # next month
        dt.date(2025, 10, 11),
        dt.date(2025, 10, 11),
    ]
    assert later_days_of_month(day, computed) == [dt.date(2025, 10, 11), dt.date(2025, 10, 31)]
    assert later_days_of_month(day, []) == []


def test_crossings_over_several_days_keep_the_first_day_per_threshold():
    month = dt.date(2026, 11, 1)
    quota = pd.DataFrame(
        [
            ("org-a", dt.date(2026, 11, 9), 9 * H),  # 90 % on the 9th
            ("org-a", dt.date(2026, 11, 5), 6 * H),  # 50 % on the 5th
            ("org-b", dt.date(2026, 11, 5), H),
            ("org-b", dt.date(2026, 11, 9), 5 * H),  # 50 % on the 9th
        ],
        columns=["org_id", "usage_date", "billable_seconds"],
    ).assign(month=month, included_seconds=10 * H)
    crossings = alert_crossings(quota)
    assert list(
        zip(crossings["org_id"], crossings["threshold"], crossings["usage_date"], strict=True)
    ) == [
        ("org-a", 50, dt.date(2026, 11, 5)),
        ("org-a", 90, dt.date(2026, 11, 9)),
        ("org-b", 50, dt.date(2026, 11, 9)),
    ]
