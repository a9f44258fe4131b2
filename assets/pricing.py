"""Pricing and plans (DESIGN §3): configuration with defaults, validated on load.

Money is Decimal; amounts are computed unrounded and rounded half-up to cents
only at the end (`to_cents`). `TALLY_PRICING_FILE` (YAML or JSON) overrides the
defaults; a bad key or value raises PricingError naming it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import cache
from pathlib import Path

CENT = Decimal("0.01")
SECONDS_PER_HOUR = Decimal(3600)

DEFAULT_TIER_RATES = {
    "small": Decimal("0.05"),
    "medium": Decimal("0.10"),
    "large": Decimal("0.20"),
    "gpu": Decimal("2.50"),
}


class PricingError(ValueError):
    """A pricing setting is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_fee: Decimal
    included_hours: Decimal
    overage_billable: bool
    # Whole-dollar month-to-date charges that send a spend alert (budget_alerts), for
    # plans without included hours (their hours alerts never fire). Ascending.
    spend_alerts: tuple[int, ...] = ()


DEFAULT_PLANS = {
    "free-tier": Plan("free-tier", Decimal("0"), Decimal("10"), False),
    "base-plus-usage": Plan("base-plus-usage", Decimal("20"), Decimal("100"), True),
    "usage-only": Plan("usage-only", Decimal("0"), Decimal("0"), True, (100, 500, 1000)),
}
PLAN_KEYS = ("monthly_fee", "included_hours", "overage_billable", "spend_alerts")


@dataclass(frozen=True)
class Pricing:
    tier_rates: dict[str, Decimal] = field(default_factory=lambda: dict(DEFAULT_TIER_RATES))
    plans: dict[str, Plan] = field(default_factory=lambda: dict(DEFAULT_PLANS))

    def rate(self, tier: str) -> Decimal:
        """Dollars per hour; an unknown tier is a configuration error, not $0."""
        try:
            return self.tier_rates[tier]
        except KeyError:
            raise PricingError(
                f"no rate for tier {tier!r}; add it under tier_rates in TALLY_PRICING_FILE"
            ) from None

    @property
    def known_tiers(self) -> frozenset[str]:
        """The tiers tally meters and bills: exactly those with a rate."""
        return frozenset(self.tier_rates)

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise PricingError(
                f"unknown plan {name!r}; known plans: {', '.join(sorted(self.plans))}"
            ) from None

    def amount(self, seconds: int, tier: str) -> Decimal:
        """Unrounded dollars for `seconds` of `tier`."""
        return Decimal(seconds) / SECONDS_PER_HOUR * self.rate(tier)

    def tiers_by_price(self) -> list[str]:
        """Most expensive first (included hours are used on these first)."""
        return sorted(self.tier_rates, key=lambda tier: (-self.tier_rates[tier], tier))


def to_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def _decimal(value: object, key: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise PricingError(f"{key} = {value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise PricingError(f"{key} = {value!r} must be a non-negative number")
    return number


def pricing_from_mapping(data: dict) -> Pricing:
    """Build Pricing from {tier_rates: {tier: $/h}, plans: {name: {monthly_fee,
    included_hours, overage_billable}}}; omitted sections keep the defaults."""
    if not isinstance(data, dict):
        raise PricingError("pricing file must be a mapping with tier_rates and/or plans")
    unknown = set(data) - {"tier_rates", "plans"}
    if unknown:
        raise PricingError(
            f"unknown pricing key {sorted(unknown)[0]!r}; expected tier_rates or plans"
        )
    for section in ("tier_rates", "plans"):
        if not isinstance(data.get(section) or {}, dict):
            raise PricingError(f"{section} must be a mapping, got {type(data[section]).__name__}")
    rates = dict(DEFAULT_TIER_RATES)
    for tier, rate in (data.get("tier_rates") or {}).items():
        rates[str(tier)] = _decimal(rate, f"tier_rates.{tier}")
    plans = dict(DEFAULT_PLANS)
    for name, settings in (data.get("plans") or {}).items():
        if not isinstance(settings, dict):
            raise PricingError(f"plans.{name} must be a mapping")
        extra = set(settings) - set(PLAN_KEYS)
        if extra:
            raise PricingError(
                f"unknown key plans.{name}.{sorted(extra)[0]}; expected "
                "monthly_fee, included_hours, overage_billable or spend_alerts"
            )
        base = plans.get(name, Plan(name, Decimal(0), Decimal(0), True))
        overage = settings.get("overage_billable", base.overage_billable)
        if not isinstance(overage, bool):
            raise PricingError(f"plans.{name}.overage_billable must be true or false")
        plans[name] = Plan(
            name,
            _decimal(settings.get("monthly_fee", base.monthly_fee), f"plans.{name}.monthly_fee"),
            _decimal(
                settings.get("included_hours", base.included_hours), f"plans.{name}.included_hours"
            ),
            overage,
            _spend_alerts(settings.get("spend_alerts", base.spend_alerts), name),
        )
    return Pricing(rates, plans)


def _spend_alerts(value: object, plan: str) -> tuple[int, ...]:
    """A list of positive whole dollars (an empty list turns spend alerts off)."""
    key = f"plans.{plan}.spend_alerts"
    if not isinstance(value, list | tuple):
        raise PricingError(f"{key} must be a list of whole dollars, e.g. [100, 500]")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise PricingError(f"{key} = {list(value)!r}: each must be a whole number of dollars > 0")
    return tuple(sorted(set(value)))


@cache
def _load(path: str) -> Pricing:
    import yaml

    file = Path(path)
    if not file.exists():
        raise PricingError(f"TALLY_PRICING_FILE {path} does not exist; fix the path or unset it")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise PricingError(
            f"TALLY_PRICING_FILE {path} is not valid YAML/JSON: {str(error).splitlines()[0]}"
        ) from None
    return pricing_from_mapping(data or {})


def current_pricing() -> Pricing:
    path = os.environ.get("TALLY_PRICING_FILE")
    return _load(path) if path else Pricing()
