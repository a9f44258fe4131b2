"""Counted once (issue 12): which discrepancy rows move money, decided on hand-built
frames through the reconciliation rules. A second of over-charge is in one
money-moving total only; usage that would never be charged moves no money."""

from __future__ import annotations

from decimal import Decimal

import pytest
from test_reconcile_rules import billed, inputs, ledger, orgs, recorded

from assets.discrepancy import (
    MONEY_MOVING,
    DiscrepancyKind,
    MoneyEffect,
    money_effect,
    never_charged,
)
from assets.pricing import Pricing
from assets.reconcile import compute_discrepancies


def rows_by_kind(result) -> dict[str, dict]:
    return {row["kind"]: row for row in result.to_dict("records")}


def test_cap_exceeded_made_of_provider_over_seconds_is_informational():
    """The demo's story: 2 h recorded twice at the provider on an org at its cap."""
    result = compute_discrepancies(
        inputs(
            orgs=orgs(("o1", "usage-only", "stripe", "cus_1", 3600)),
            billed=billed(("o1", "small", 7200, 3600)),
            ledger=ledger(("o1", "small", 3600, 0)),
            provider_usage=recorded(("o1", "small", 3600 + 7200)),
        )
    )
    found = rows_by_kind(result)
    over, cap = found["provider_over"], found["cap_exceeded"]
    assert (over["delta_seconds"], over["dollar_impact"], over["money_moving"]) == (
        7200,
        Decimal("0.10"),
        True,
    )
    assert cap["delta_seconds"] == 7200 and cap["money_moving"] is False
    assert "counted as provider_over (7200 s)" in cap["detail"]
    moving = result[result["money_moving"].astype(bool)]
    assert sum(moving["dollar_impact"]) == Decimal("0.10")  # once, not $0.20


def test_cap_exceeded_keeps_only_the_seconds_provider_over_does_not_count():
    """The limit was lowered after the day was billed: 3600 s billable, limit 1800 s,
    600 s more at the provider. 2400 s over the cap, 600 of them provider_over."""
    result = compute_discrepancies(
        inputs(
            orgs=orgs(("o1", "usage-only", "stripe", "cus_1", 1800)),
            billed=billed(("o1", "large", 3600, 3600)),
            ledger=ledger(("o1", "large", 3600, 0)),
            provider_usage=recorded(("o1", "large", 4200)),
        )
    )
    found = rows_by_kind(result)
    assert found["provider_over"]["delta_seconds"] == 600
    cap = found["cap_exceeded"]
    assert cap["money_moving"] is True and cap["delta_seconds"] == 1800
    assert cap["dollar_impact"] == Decimal("0.10")  # 1800 s × $0.20/h
    assert "600 s of it counted as provider_over, the other 1800 s here" in cap["detail"]
    moving = result[result["money_moving"].astype(bool)]
    assert int(sum(moving["delta_seconds"])) == 2400  # every second over the cap, once


def test_cap_exceeded_without_provider_over_stays_money_moving():
    result = compute_discrepancies(
        inputs(
            orgs=orgs(("o1", "usage-only", "stripe", "cus_1", 1800)),
            billed=billed(("o1", "small", 3600, 3600)),
            ledger=ledger(("o1", "small", 3600, 0)),
            provider_usage=recorded(("o1", "small", 3600)),
        )
    )
    cap = rows_by_kind(result)["cap_exceeded"]
    assert (cap["money_moving"], cap["delta_seconds"]) == (True, 1800)
    assert "provider_over" not in cap["detail"]


@pytest.mark.parametrize(
    ("plan", "customer", "money_moving"),
    [
        ("free-tier", "", False),  # never charged: no usage billed, nobody to charge
        ("free-tier", "cus_1", True),  # a customer exists: the push should reach it
        ("usage-only", "", True),  # revenue leakage: the usage is owed
        ("base-plus-usage", "", True),
    ],
)
def test_unpushed_usage_moves_money_unless_it_would_never_be_charged(plan, customer, money_moving):
    result = compute_discrepancies(
        inputs(
            orgs=orgs(("o1", plan, "stripe", customer, 86_400)),
            billed=billed(("o1", "small", 3600, 3600)),
            ledger=ledger(),
        )
    )
    unpushed = rows_by_kind(result)["unpushed"]
    assert unpushed["money_moving"] is money_moving
    assert ("would never be charged" in unpushed["detail"]) is not money_moving


def test_never_charged_names_the_plan_and_the_missing_customer():
    pricing = Pricing()
    reason = never_charged("free-tier", None, pricing)
    assert reason is not None and "'free-tier' bills no usage" in reason
    assert "no provider customer id" in reason
    assert never_charged("usage-only", None, pricing) is None
    assert never_charged("free-tier", "cus_1", pricing) is None
    assert never_charged("no-such-plan", None, pricing) is None  # unknown: stay loud


@pytest.mark.parametrize(
    ("moving", "impact", "delta", "effect"),
    [
        (True, Decimal("-1.94"), -3600, MoneyEffect.LEAKAGE),
        (True, Decimal("0.10"), 7200, MoneyEffect.OVER_CHARGE),
        (True, None, -60, MoneyEffect.LEAKAGE),  # no rate: the seconds' sign decides
        (True, None, 60, MoneyEffect.OVER_CHARGE),
        (False, Decimal("60.00"), 7200, MoneyEffect.INFORMATIONAL),
        (False, Decimal("-0.95"), -3600, MoneyEffect.INFORMATIONAL),
    ],
)
def test_money_effect_follows_the_flag_and_the_sign(moving, impact, delta, effect):
    assert money_effect(moving, impact, delta) == effect


def test_kinds_over_charge_and_leakage_come_from_the_one_money_moving_set():
    """provider_over is the over-charge kind, unpushed/missing/under leak revenue; the
    informational kinds never count as money."""
    assert DiscrepancyKind.PROVIDER_OVER in MONEY_MOVING
    for kind in ("stuck_instance", "zombie_instance", "counter_drift", "plan_mismatch"):
        assert DiscrepancyKind(kind) not in MONEY_MOVING
