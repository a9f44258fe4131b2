"""The pure reconciliation rules on hand-built frames: boundaries and arithmetic."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pandas as pd
import pytest

from assets.credits import credit_candidates
from assets.discrepancy import ReconcileInputs
from assets.finance import billed_vs_recorded_png, finance_totals, top_discrepancies_markdown
from assets.pricing import Pricing
from assets.reconcile import compute_discrepancies

DAY = dt.date(2026, 3, 10)
NOW = dt.datetime(2026, 3, 11, 2, 0, tzinfo=dt.UTC)
UTC = dt.UTC


def frame(rows, columns):
    return pd.DataFrame(rows, columns=columns)


def orgs(*rows):
    return frame(
        [(org, plan, provider, customer, limit) for org, plan, provider, customer, limit in rows],
        ["org_id", "plan", "provider", "provider_customer_id", "daily_limit_s"],
    )


def inputs(**frames) -> ReconcileInputs:
    frames.setdefault("orgs", orgs(("o1", "usage-only", "stripe", "cus_1", 86_400)))
    reads = frame([("stripe", "read", [], None)], ["provider", "status", "unread_tiers", "note"])
    frames.setdefault("reads", reads)
    return ReconcileInputs(usage_date=DAY, now=frames.pop("now", NOW), **frames)


def billed(*rows):
    return frame(rows, ["org_id", "tier", "runtime_seconds", "billable_seconds"])


def ledger(*rows):
    return frame(rows, ["org_id", "tier", "sent_seconds", "pending_seconds"])


def recorded(*rows):
    return frame(
        [(org, tier, "stripe", "cus_1", seconds, True) for org, tier, seconds in rows],
        ["org_id", "tier", "provider", "customer_id", "seconds", "exact"],
    )


def counters(*rows):
    return frame(
        [(org, tier, seconds, NOW) for org, tier, seconds in rows],
        ["org_id", "tier", "runtime_seconds", "updated_at"],
    )


def kinds(result) -> list[tuple]:
    return [(row.kind, row.org_id, row.tier, row.delta_seconds) for row in result.itertuples()]


@pytest.mark.parametrize(
    ("runtime", "counter", "drift"),
    [
        (3600, 3660, False),  # 60 s: within the 60 s floor
        (3600, 3661, True),
        (80_000, 80_800, False),  # exactly 1 %
        (80_000, 80_801, True),
        (0, 61, True),  # counted, never metered
    ],
)
def test_counter_drift_tolerance_is_max_of_60_s_and_1_percent(runtime, counter, drift):
    result = compute_discrepancies(
        inputs(
            billed=billed(("o1", "small", runtime, runtime)),
            ledger=ledger(("o1", "small", runtime, 0)),
            provider_usage=recorded(("o1", "small", runtime)),
            counters=counters(("o1", "small", counter)),
        )
    )
    expected = [("counter_drift", "o1", "small", counter - runtime)] if drift else []
    assert kinds(result) == expected


def test_tier_mismatch_replaces_per_tier_provider_kinds():
    result = compute_discrepancies(
        inputs(
            billed=billed(("o1", "small", 7200, 7200), ("o1", "gpu", 3600, 3600)),
            ledger=ledger(("o1", "small", 7200, 0), ("o1", "gpu", 3600, 0)),
            provider_usage=recorded(("o1", "small", 3600), ("o1", "gpu", 7200)),
        )
    )
    assert kinds(result) == [
        ("tier_mismatch", "o1", "gpu", 3600),
        ("tier_mismatch", "o1", "small", -3600),
    ]
    credit = credit_candidates(result, pd.DataFrame())
    (row,) = credit.itertuples()
    # 3600 s of gpu ($2.50/h) billed instead of small ($0.05/h): $2.45 back
    assert (row.kind, row.tier, row.seconds, row.amount) == (
        "tier_mismatch",
        "gpu",
        3600,
        Decimal("2.45"),
    )


def test_pending_rows_and_refusals_are_in_the_unpushed_detail():
    result = compute_discrepancies(
        inputs(
            billed=billed(("o1", "medium", 5000, 5000)),
            ledger=ledger(("o1", "medium", 3000, 2000)),
            provider_usage=recorded(("o1", "medium", 3000)),
            refusals=frame(
                [("o1", "medium", "stripe", 2000, "Stripe said no")],
                ["org_id", "tier", "provider", "seconds", "reason"],
            ),
        )
    )
    (row,) = result.itertuples()
    assert (row.kind, row.delta_seconds, row.dollar_impact) == ("unpushed", -2000, Decimal("-0.06"))
    assert "2000 s pending" in row.detail and "Stripe said no" in row.detail


def test_unread_tiers_and_unread_providers_are_not_compared():
    reads = frame(
        [("stripe", "read", ["gpu"], None), ("polar", "not_configured", [], "no key")],
        ["provider", "status", "unread_tiers", "note"],
    )
    result = compute_discrepancies(
        inputs(
            orgs=orgs(
                ("o1", "usage-only", "stripe", "cus_1", 86_400),
                ("o2", "usage-only", "polar", "ext_2", 86_400),
            ),
            reads=reads,
            billed=billed(("o1", "gpu", 3600, 3600), ("o2", "small", 3600, 3600)),
            ledger=ledger(("o1", "gpu", 3600, 0), ("o2", "small", 3600, 0)),
        )
    )
    assert kinds(result) == []


def test_cap_exceeded_prices_the_excess_at_the_recorded_tier_mix():
    result = compute_discrepancies(
        inputs(
            orgs=orgs(("o1", "usage-only", "stripe", "cus_1", 3600)),
            billed=billed(("o1", "small", 1800, 1800), ("o1", "large", 1800, 1800)),
            ledger=ledger(("o1", "small", 1800, 0), ("o1", "large", 1800, 0)),
            provider_usage=recorded(("o1", "small", 1800), ("o1", "large", 3600)),
        )
    )
    cap = result[result["kind"] == "cap_exceeded"].iloc[0]
    # 5400 s recorded, limit 3600: 1800 s over; the mix is 1/3 small, 2/3 large:
    # (0.025 + 0.20) × 1800 / 5400 = 0.075
    assert (cap["provider_seconds"], cap["delta_seconds"]) == (5400, 1800)
    assert cap["dollar_impact"] == Decimal("0.08")
    assert kinds(result[result["kind"] == "provider_over"]) == [
        ("provider_over", "o1", "large", 1800)
    ]


def test_stuck_is_measured_until_now_for_today_and_zombies_counted_in_heartbeats():
    today = NOW.date()
    instances = frame(
        [
            (
                "i-1",
                "o1",
                "gpu",
                "running",
                dt.datetime(2026, 1, 1, tzinfo=UTC),
                None,
                NOW - dt.timedelta(minutes=16),
            ),
            (
                "i-2",
                "o1",
                "gpu",
                "running",
                dt.datetime(2026, 1, 1, tzinfo=UTC),
                None,
                NOW - dt.timedelta(minutes=14),
            ),
            ("i-3", "o1", "gpu", "running", NOW + dt.timedelta(hours=1), None, None),
            (
                "i-4",
                "o1",
                "small",
                "stopped",
                dt.datetime(2026, 1, 1, tzinfo=UTC),
                dt.datetime(2026, 3, 11, 0, 30, tzinfo=UTC),
                None,
            ),
        ],
        ["instance_id", "org_id", "tier", "status", "created_at", "stopped_at", "last_heartbeat"],
    )
    zombies = frame(
        [
            (
                "i-4",
                5,
                dt.datetime(2026, 3, 11, 0, 31, tzinfo=UTC),
                dt.datetime(2026, 3, 11, 0, 35, tzinfo=UTC),
            )
        ],
        ["instance_id", "heartbeats", "first_at", "last_at"],
    )
    result = compute_discrepancies(
        ReconcileInputs(
            usage_date=today,
            now=NOW,
            instances=instances,
            zombies=zombies,
            orgs=orgs(("o1", "usage-only", "stripe", "cus_1", 86_400)),
        )
    )
    assert kinds(result) == [
        ("stuck_instance", "o1", "gpu", -16 * 60),
        ("zombie_instance", "o1", "small", -300),
    ]
    assert result.iloc[0]["instance_id"] == "i-1"


def test_provider_over_already_proposed_by_push_is_not_proposed_again():
    result = compute_discrepancies(
        inputs(
            billed=billed(("o1", "gpu", 1800, 1800)),
            ledger=ledger(("o1", "gpu", 3600, 0)),
            provider_usage=recorded(("o1", "gpu", 4000)),
        )
    )
    assert kinds(result) == [("provider_over", "o1", "gpu", 2200)]
    proposals = frame(
        [(7, "o1", "gpu", "push_over_sent", "stripe", 1800, None, "proposed")],
        ["proposal_id", "org_id", "tier", "kind", "provider", "seconds", "amount", "status"],
    )
    (credit,) = credit_candidates(result, proposals).itertuples()
    assert (credit.seconds, credit.amount) == (400, Decimal("0.28"))  # 400 s × $2.50/h
    assert "1800 s already proposed by usage_push" in credit.evidence


def test_finance_metadata_table_and_chart():
    data = inputs(
        billed=billed(("o1", "gpu", 1800, 1800)),
        ledger=ledger(("o1", "gpu", 1800, 0)),
        provider_usage=recorded(("o1", "gpu", 3600)),
    )
    result = compute_discrepancies(data)
    credits = credit_candidates(result, pd.DataFrame())
    table = top_discrepancies_markdown(result, credits)
    assert table.splitlines()[2] == (
        "| provider_over | o1 | gpu | 1,800 s | 1,800 s | 3,600 s | – | +1,800 s | $1.25 | "
        "$1.25 | no |"
    )
    totals = finance_totals(data, Pricing())
    assert totals == {"gpu": {"billed": 1800, "sent": 1800, "recorded": 3600}}
    png = billed_vs_recorded_png(totals, DAY)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 60_000
