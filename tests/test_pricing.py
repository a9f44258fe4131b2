"""Pricing configuration (DESIGN §3): defaults, overrides, and errors that name the key."""

from __future__ import annotations

from decimal import Decimal

import pytest

from assets.pricing import (
    DEFAULT_PLANS,
    Pricing,
    PricingError,
    current_pricing,
    pricing_from_mapping,
    to_cents,
)


def test_defaults_are_the_designed_prices():
    pricing = Pricing()
    assert {tier: pricing.rate(tier) for tier in ("small", "medium", "large", "gpu")} == {
        "small": Decimal("0.05"),
        "medium": Decimal("0.10"),
        "large": Decimal("0.20"),
        "gpu": Decimal("2.50"),
    }
    free, base, usage = (pricing.plan(n) for n in ("free-tier", "base-plus-usage", "usage-only"))
    assert (free.monthly_fee, free.included_hours, free.overage_billable) == (0, 10, False)
    assert (base.monthly_fee, base.included_hours, base.overage_billable) == (20, 100, True)
    assert (usage.monthly_fee, usage.included_hours, usage.overage_billable) == (0, 0, True)
    assert pricing.tiers_by_price() == ["gpu", "large", "medium", "small"]
    # 1 h 30 min of gpu = 1.5 x 2.50 = 3.75 (unrounded Decimal, exact here).
    assert pricing.amount(5400, "gpu") == Decimal("3.75")


def test_cents_round_half_up():
    assert to_cents(Decimal("0.005")) == Decimal("0.01")
    assert to_cents(Decimal("0.125")) == Decimal("0.13")  # banker's rounding: 0.12
    assert to_cents(Decimal("0.0049999")) == Decimal("0.00")


def test_file_overrides_only_what_it_names(tmp_path, monkeypatch):
    path = tmp_path / "pricing.yaml"
    path.write_text(
        "tier_rates:\n  gpu: '3.00'\n  xlarge: 0.4\n"
        "plans:\n  base-plus-usage:\n    included_hours: 150\n"
        "  team:\n    monthly_fee: 99\n    included_hours: 500\n"
    )
    monkeypatch.setenv("TALLY_PRICING_FILE", str(path))
    pricing = current_pricing()
    assert pricing.rate("gpu") == Decimal("3.00") and pricing.rate("small") == Decimal("0.05")
    assert pricing.tiers_by_price()[:2] == ["gpu", "xlarge"]
    base = pricing.plan("base-plus-usage")
    assert (base.monthly_fee, base.included_hours) == (Decimal("20"), Decimal("150"))
    team = pricing.plan("team")
    assert (team.monthly_fee, team.included_hours, team.overage_billable) == (99, 500, True)
    assert pricing.plan("free-tier") == DEFAULT_PLANS["free-tier"]


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"tiers": {}}, "'tiers'"),
        ({"tier_rates": ["small"]}, "tier_rates must be a mapping"),
        ({"tier_rates": {"gpu": -1}}, "tier_rates.gpu"),
        ({"tier_rates": {"small": "five cents"}}, "tier_rates.small"),
        ({"tier_rates": {"large": "NaN"}}, "tier_rates.large"),
        ({"plans": ["free-tier"]}, "plans must be a mapping"),
        ({"plans": {"team": 5}}, "plans.team must be a mapping"),
        ({"plans": {"team": {"fee": 5}}}, "plans.team.fee"),
        ({"plans": {"free-tier": {"monthly_fee": "x"}}}, "plans.free-tier.monthly_fee"),
        ({"plans": {"free-tier": {"included_hours": -10}}}, "plans.free-tier.included_hours"),
        (
            {"plans": {"usage-only": {"overage_billable": "yes"}}},
            "plans.usage-only.overage_billable",
        ),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_settings_name_the_key(data, named):
    with pytest.raises(PricingError) as error:
        pricing_from_mapping(data)
    assert named in str(error.value)


def test_bad_files_say_what_to_fix(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("TALLY_PRICING_FILE", str(missing))
    with pytest.raises(PricingError) as error:
        current_pricing()
    assert str(missing) in str(error.value) and "does not exist" in str(error.value)

    broken = tmp_path / "broken.yaml"
    broken.write_text("tier_rates: {gpu: [\n")
    monkeypatch.setenv("TALLY_PRICING_FILE", str(broken))
    with pytest.raises(PricingError, match="not valid YAML/JSON"):
        current_pricing()


def test_lookups_refuse_what_is_not_configured():
    with pytest.raises(PricingError, match="no rate for tier 'xlarge'"):
        Pricing().rate("xlarge")
    with pytest.raises(PricingError, match="unknown plan 'enterprise'.*free-tier"):
        Pricing().plan("enterprise")
