"""quota_usage: included hours, overage and expected charges, by hand-computed cases,
then the asset on real PostgreSQL and Dagster (month boundary, backfill, re-run)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pandas as pd
import pytest
import sqlalchemy as sa
from builders import add_billed, add_org
from dagster import materialize

from assets.pricing import Pricing
from assets.quota import allocate_included, quota_month_to_date, quota_usage
from resources.db import PostgresResource

H = 3600
PRICING = Pricing()
D1, D2, D3 = dt.date(2025, 10, 1), dt.date(2025, 10, 2), dt.date(2025, 10, 3)


def usage_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["org_id", "usage_date", "tier", "billable_seconds"])


def orgs_frame(plans: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({"org_id": list(plans), "plan": list(plans.values())})


# base-plus-usage: $20 a month, 100 included hours. Rates small .05, medium .10,
# large .20, gpu 2.50 $/h.
#   day 1: small 30 h, gpu 20 h, medium 10 h -> by price: gpu 20 (cum 20), medium 10 (30),
#          small 30 (60): all included, 40 h left.
#   day 2: large 30 h, small 25 h -> large 30 (cum 90) included; small: 10 included, 15 over.
#   day 3: gpu 2 h -> 2 h over (nothing left).
# overage = small 15 h x .05 = 0.75 + gpu 2 h x 2.50 = 5.00 -> 5.75; expected 20 + 5.75.
# (Most expensive first over the whole month would give 20.85; cheapest first within
# a day 28.00: the order matters.)
MIXED = [
    ("org-b", D1, "small", 30 * H),
    ("org-b", D1, "gpu", 20 * H),
    ("org-b", D1, "medium", 10 * H),
    ("org-b", D2, "large", 30 * H),
    ("org-b", D2, "small", 25 * H),
    ("org-b", D3, "gpu", 2 * H),
]


def test_included_hours_go_by_date_then_most_expensive_tier():
    allocated = allocate_included(usage_frame(MIXED), {"org-b": 100 * H}, PRICING)
    steps = [
        (row.usage_date, row.tier, row.included_seconds // H, row.overage_seconds // H)
        for row in allocated.itertuples(index=False)
    ]
    assert steps == [
        (D1, "gpu", 20, 0),
        (D1, "medium", 10, 0),
        (D1, "small", 30, 0),
        (D2, "large", 30, 0),
        (D2, "small", 10, 15),
        (D3, "gpu", 0, 2),
    ]


def test_month_to_date_totals_and_charges_for_mixed_tiers():
    result = quota_month_to_date(
        usage_frame(MIXED), orgs_frame({"org-b": "base-plus-usage"}), D3, PRICING
    )
    org = result.orgs.iloc[0]
    assert (org.billable_seconds, org.included_used_seconds, org.included_left_seconds) == (
        117 * H,
        100 * H,
        0,
    )
    assert org.overage_seconds == 17 * H and org.used_pct == Decimal("117.00")
    assert org.base_fee == Decimal("20.00") and org.overage_charges == Decimal("5.75")
    assert org.expected_charges == Decimal("25.75") and not org.free_tier_overage
    tiers = {row.tier: row for row in result.tiers.itertuples(index=False)}
    assert {
        tier: (r.billable_seconds // H, r.included_seconds // H) for tier, r in tiers.items()
    } == {
        "gpu": (22, 20),
        "large": (30, 30),
        "medium": (10, 10),
        "small": (55, 40),
    }
    assert tiers["gpu"].overage_amount == Decimal("5.00")
    assert tiers["small"].overage_amount == Decimal("0.75")

    # As of day 2 the month to date stops there: 115 h, 15 small hours over = $0.75.
    as_of_d2 = quota_month_to_date(
        usage_frame(MIXED), orgs_frame({"org-b": "base-plus-usage"}), D2, PRICING
    ).orgs.iloc[0]
    assert as_of_d2.billable_seconds == 115 * H and as_of_d2.expected_charges == Decimal("20.75")


def test_money_is_rounded_half_up_once_at_the_end():
    # usage-only: small 360 s = 0.1 h x $0.05 = $0.005; medium 180 s = 0.05 h x $0.10 =
    # $0.005. Sum $0.010 -> $0.01 (rounding each tier first would give $0.02; banker's
    # rounding of a lone $0.005 would give $0.00).
    usage = usage_frame([("org-u", D1, "small", 360), ("org-u", D1, "medium", 180)])
    result = quota_month_to_date(usage, orgs_frame({"org-u": "usage-only"}), D1, PRICING)
    org = result.orgs.iloc[0]
    assert org.expected_charges == Decimal("0.01") and org.used_pct is None
    assert org.included_seconds == 0 and org.overage_seconds == 540
    only_small = quota_month_to_date(
        usage.iloc[:1], orgs_frame({"org-u": "usage-only"}), D1, PRICING
    ).orgs.iloc[0]
    assert only_small.expected_charges == Decimal("0.01")


def test_free_tier_overage_is_flagged_not_charged():
    # free-tier: 10 included hours. Day 1 medium 8 h (2 h left); day 2 gpu 4 h: 2 h
    # included, 2 h over -> flagged; it would have cost 2 x 2.50 = $5.00, charged $0.00.
    usage = usage_frame([("org-f", D1, "medium", 8 * H), ("org-f", D2, "gpu", 4 * H)])
    result = quota_month_to_date(usage, orgs_frame({"org-f": "free-tier"}), D2, PRICING)
    org = result.orgs.iloc[0]
    assert org.free_tier_overage and org.overage_seconds == 2 * H
    assert org.expected_charges == Decimal("0.00") and org.overage_charges == Decimal("0.00")
    assert result.tiers.set_index("tier").loc["gpu", "overage_amount"] == Decimal("5.00")
    day_one = quota_month_to_date(usage, orgs_frame({"org-f": "free-tier"}), D1, PRICING)
    assert not day_one.orgs.iloc[0].free_tier_overage
    assert day_one.orgs.iloc[0].included_left_seconds == 2 * H


def test_unknown_plans_are_reported_not_priced():
    usage = usage_frame([("org-x", D1, "small", H), ("org-ghost", D1, "small", H)])
    result = quota_month_to_date(usage, orgs_frame({"org-x": "enterprise"}), D1, PRICING)
    assert result.unknown_plans == {"org-x": "enterprise", "org-ghost": None}
    assert result.orgs.empty


# --------------------------------------------------------------------------- asset


def run_quota(day: dt.date, raise_on_error: bool = True):
    return materialize(
        [quota_usage],
        partition_key=day.isoformat(),
        resources={"postgres": PostgresResource()},
        raise_on_error=raise_on_error,
    )


def stored(engine, day: dt.date) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT org_id, month, plan, included_seconds, billable_seconds, "
                "included_used_seconds, included_left_seconds, overage_seconds, used_pct, "
                "base_fee, overage_charges, expected_charges, free_tier_overage "
                "FROM billing.quota_usage WHERE usage_date = :d"
            ),
            {"d": day},
        )
        return {row.org_id: dict(row._mapping) for row in rows}


def test_asset_month_boundary_backfill_and_rerun(engine):
    # Backfill of a past month. base-plus-usage org-b: Oct 30 gpu 60 h, Oct 31 medium 50 h
    # (October: 110 h, gpu 60 + medium 40 included, medium 10 h over = $1.00 -> $21.00).
    # Nov 1 small 5 h starts a new month: 5 of 100 h used, expected $20.00.
    # free-tier org-f: Oct 31 gpu 12 h (2 h over, flagged), nothing in November.
    oct30, oct31, nov1 = dt.date(2025, 10, 30), dt.date(2025, 10, 31), dt.date(2025, 11, 1)
    add_org(engine, "org-b", plan="base-plus-usage")
    add_org(engine, "org-f", plan="free-tier")
    add_billed(
        engine,
        [
            ("org-b", oct30, "gpu", 60 * H),
            ("org-b", oct31, "medium", 50 * H),
            ("org-b", nov1, "small", 5 * H),
            ("org-f", oct31, "gpu", 12 * H),
        ],
    )
    november = run_quota(nov1)  # backfills in any order
    run_quota(oct31)

    october = stored(engine, oct31)
    assert october["org-b"]["billable_seconds"] == 110 * H
    assert october["org-b"]["overage_seconds"] == 10 * H
    assert october["org-b"]["expected_charges"] == Decimal("21.00")
    assert october["org-f"]["free_tier_overage"] and october["org-f"]["overage_seconds"] == 2 * H
    assert october["org-f"]["expected_charges"] == Decimal("0.00")

    first = stored(engine, nov1)
    # org-f has no November usage and was created after 2025-11-01: not in that month.
    assert set(first) == {"org-b"}
    assert first["org-b"]["month"] == nov1
    assert (first["org-b"]["billable_seconds"], first["org-b"]["included_left_seconds"]) == (
        5 * H,
        95 * H,
    )
    assert first["org-b"]["expected_charges"] == Decimal("20.00")
    metadata = november.asset_materializations_for_node("quota_usage")[0].metadata
    assert metadata["orgs_over_50_pct"].value == 0
    assert metadata["expected_revenue_month_to_date"].value == 20.0

    run_quota(nov1)  # a re-run replaces, never adds
    assert stored(engine, nov1) == first
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM billing.quota_usage")).scalar() == 3


def test_asset_finance_metadata_and_unknown_plan_blocks(engine):
    day = dt.date(2025, 10, 31)
    add_org(engine, "org-f", plan="free-tier")  # 10 h
    add_org(engine, "org-b", plan="base-plus-usage")  # 100 h
    add_org(engine, "org-odd", plan="enterprise")
    # org-f 9.5 h = 95 % (over 50 and 90); org-b 120 h = 120 % (over all three):
    # org-b 20 h small over = $1.00 -> $21.00; revenue 0 + 21.00.
    add_billed(
        engine,
        [
            ("org-f", day, "small", 9 * H + 1800),
            ("org-b", day, "small", 120 * H),
            ("org-odd", day, "small", H),
        ],
    )
    result = run_quota(day, raise_on_error=False)
    assert not result.success  # the blocking check stops the line on an unpriced plan
    metadata = result.asset_materializations_for_node("quota_usage")[0].metadata
    assert [metadata[f"orgs_over_{n}_pct"].value for n in (50, 90, 100)] == [2, 2, 1]
    assert metadata["expected_revenue_month_to_date_exact"].value == "$21.00"
    assert "org-b" in metadata["orgs_near_or_over_quota"].value
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "orgs_have_known_plans" and not check.passed
    assert "org-odd='enterprise'" in check.metadata["examples"].value


@pytest.mark.parametrize("bad", ["tier_rates:\n  gpu: -1\n", "plans:\n  free-tier:\n    fee: 1\n"])
def test_bad_pricing_file_fails_the_step_naming_the_key(engine, tmp_path, monkeypatch, bad):
    from pipelines.runner import failure_messages

    path = tmp_path / "pricing.yaml"
    path.write_text(bad)
    monkeypatch.setenv("TALLY_PRICING_FILE", str(path))
    result = run_quota(dt.date(2025, 10, 31), raise_on_error=False)
    assert not result.success
    ((step, message),) = failure_messages(result)
    expected = "tier_rates.gpu" if "gpu" in bad else "plans.free-tier.fee"
    assert step == "quota_usage" and expected in message
