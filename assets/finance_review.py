"""The finance review (issue 12): the four questions finance asks — billed yesterday,
at risk, credits to approve, anything stale — answered on one unpartitioned asset.

`build_review` is pure (frames in, a `FinanceReview` out): open credit proposals
across days, unexplained money-moving discrepancies across days, and for yesterday
and the month to date the usage at list price, the expected invoice after included
hours and plan fees (the `quota_usage` rules, `quota_month_to_date`), revenue leakage
and over-charge kept apart (`money_effect`, the kinds' own classification) and the
informational findings with their potential dollars. `review_metadata` turns it into
Dagster table metadata; `tally review` prints the same review (pipelines/review.py).
No `from __future__ import annotations`: Dagster reads the asset's context annotation.

The asset at the bottom reads, calls and reports; a run-status sensor
(`pipelines/review_refresh.py`) refreshes it after each `daily_billing` and `issue_credits`
run, and `tally run` / `tally demo` materialize it after their days.
"""

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, asset

from assets.config import pricing_or_fail
from assets.discrepancy import MoneyEffect, as_int, as_text, missing, money_effect
from assets.pricing import Pricing, PricingError, to_cents
from assets.quota import quota_month_to_date
from pipelines.retry import STEP_RETRY
from resources.calendar import month_start
from resources.db import PostgresResource

ZERO = Decimal("0.00")


class Period:
    """The two spans the totals cover."""

    YESTERDAY = "yesterday"
    MONTH_TO_DATE = "month_to_date"


def usd(amount: Decimal | None) -> str:
    """Money as people read it: `$1,234.56`, `-$1.94`, `–` for no amount."""
    if amount is None:
        return "–"
    cents = to_cents(Decimal(amount))
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents):,.2f}"


def hours_1(seconds: int) -> float:
    """Hours to one decimal (what people think in, not seconds)."""
    return round(int(seconds) / 3600, 1)


def _decimal(value: Any) -> Decimal | None:
    return None if missing(value) else Decimal(value)


def _day(value: Any) -> dt.date:
    """A usage date or the UTC date of a timestamp, as a plain date."""
    if isinstance(value, dt.datetime):
        return pd.Timestamp(value).tz_convert("UTC").date() if value.tzinfo else value.date()
    return value if isinstance(value, dt.date) else pd.Timestamp(value).date()


@dataclass(frozen=True)
class ProposalLine:
    proposal_id: int
    org_id: str
    org_name: str
    usage_date: dt.date
    kind: str
    tier: str
    hours: float
    amount: Decimal | None  # at list rates
    net_amount: Decimal | None  # net of included hours: what would be handed back
    escalation: str
    age_days: int

    @property
    def handed_back(self) -> Decimal | None:
        """Net of included hours; a proposal not yet priced net counts at list."""
        return self.net_amount if self.net_amount is not None else self.amount


@dataclass(frozen=True)
class DiscrepancyLine:
    usage_date: dt.date
    kind: str
    effect: MoneyEffect
    org_id: str
    org_name: str
    tier: str
    hours: float
    dollar_impact: Decimal | None
    age_days: int
    detail: str


@dataclass(frozen=True)
class KindLine:
    """Per period and kind: how many, how many hours, how many dollars."""

    period: str
    kind: str
    effect: MoneyEffect
    found: int
    unexplained: int
    hours: float
    dollars: Decimal  # |impact| of the unexplained rows; potential when informational


@dataclass(frozen=True)
class PeriodTotals:
    period: str
    start: dt.date
    end: dt.date
    billable_hours: float
    usage_at_list: Decimal
    plan_fees: Decimal
    overage_charges: Decimal
    expected_invoice: Decimal
    leakage: Decimal  # unexplained money-moving, charged too little
    over_charge: Decimal  # unexplained money-moving, charged too much
    informational_count: int
    informational_potential: Decimal  # potential dollars, nothing charged wrongly yet


@dataclass(frozen=True)
class FinanceReview:
    as_of: dt.date  # "yesterday"
    today: dt.date
    proposals: list[ProposalLine]
    unexplained: list[DiscrepancyLine]
    periods: list[PeriodTotals]
    kinds: list[KindLine]
    stale: bool | None = None
    stale_reasons: list[str] = field(default_factory=list)

    def period(self, name: str) -> PeriodTotals:
        return next(period for period in self.periods if period.period == name)

    @property
    def credits_to_approve(self) -> Decimal:
        return sum((_net(line) or ZERO for line in self.proposals), ZERO)

    @property
    def at_risk_leakage(self) -> Decimal:
        return self._at_risk(MoneyEffect.LEAKAGE)

    @property
    def at_risk_over_charge(self) -> Decimal:
        return self._at_risk(MoneyEffect.OVER_CHARGE)

    @property
    def at_risk(self) -> Decimal:
        """Unexplained money-moving dollars across all days, each row once."""
        return self.at_risk_leakage + self.at_risk_over_charge

    def _at_risk(self, effect: MoneyEffect) -> Decimal:
        return sum(
            (abs(line.dollar_impact or ZERO) for line in self.unexplained if line.effect == effect),
            ZERO,
        )


@dataclass
class ReviewInputs:
    """What the review reads, each frame as its SQL returns it (sql/finance_review/)."""

    as_of: dt.date
    today: dt.date
    orgs: pd.DataFrame  # org_id, name, plan, created_at
    proposals: pd.DataFrame  # open_proposals.sql
    unexplained: pd.DataFrame  # unexplained.sql
    discrepancies: pd.DataFrame  # period_discrepancies.sql, month start .. as_of
    usage: pd.DataFrame  # usage.sql, month start .. as_of
    stale: bool | None = None
    stale_reasons: list[str] = field(default_factory=list)


def _names(orgs: pd.DataFrame) -> dict[str, str]:
    return {str(row.org_id): str(row.name) for row in orgs.itertuples(index=False)}


def _net(line: ProposalLine) -> Decimal | None:
    return line.handed_back


def _proposal_lines(inputs: ReviewInputs, names: dict[str, str]) -> list[ProposalLine]:
    lines = []
    for row in inputs.proposals.itertuples(index=False):
        created = _day(row.created_at) if not missing(row.created_at) else _day(row.usage_date)
        lines.append(
            ProposalLine(
                proposal_id=int(row.proposal_id),
                org_id=str(row.org_id),
                org_name=names.get(str(row.org_id), ""),
                usage_date=_day(row.usage_date),
                kind=str(row.kind),
                tier=str(row.tier),
                hours=hours_1(int(row.seconds)),
                amount=_decimal(row.amount),
                net_amount=_decimal(row.net_amount),
                escalation=as_text(row.escalation) or "",
                age_days=(inputs.today - created).days,
            )
        )
    return lines


def _discrepancy_line(row: Any, today: dt.date, names: dict[str, str]) -> DiscrepancyLine:
    impact = _decimal(row.dollar_impact)
    return DiscrepancyLine(
        usage_date=_day(row.usage_date),
        kind=str(row.kind),
        effect=money_effect(row.money_moving, impact, as_int(row.delta_seconds)),
        org_id=str(row.org_id),
        org_name=names.get(str(row.org_id), ""),
        tier=as_text(row.tier) or as_text(row.instance_id) or "",
        hours=hours_1(abs(int(row.delta_seconds))),
        dollar_impact=impact,
        age_days=(today - _day(row.usage_date)).days,
        detail=str(row.detail),
    )


def _usage_at_list(usage: pd.DataFrame, pricing: Pricing) -> Decimal:
    total = Decimal(0)
    for row in usage.itertuples(index=False):
        try:
            total += pricing.amount(int(row.billable_seconds), str(row.tier))
        except PricingError:
            continue  # an unpriced tier fails the quota stage loudly; here it adds $0
    return to_cents(total)


def _invoice(usage: pd.DataFrame, orgs: pd.DataFrame, as_of: dt.date, pricing: Pricing):
    """(plan fees, overage charges, expected invoice) of the month to date `as_of`,
    by the quota stage's own rules (included hours first, then overage)."""
    known = orgs[orgs["plan"].isin(list(pricing.plans))] if not orgs.empty else orgs
    if known.empty:
        return ZERO, ZERO, ZERO
    priced = usage[usage["tier"].isin(list(pricing.tier_rates))] if not usage.empty else usage
    result = quota_month_to_date(priced, known, as_of, pricing).orgs
    return (
        sum(result["base_fee"], ZERO),
        sum(result["overage_charges"], ZERO),
        sum(result["expected_charges"], ZERO),
    )


def _period_totals(
    name: str,
    start: dt.date,
    end: dt.date,
    inputs: ReviewInputs,
    pricing: Pricing,
) -> tuple[PeriodTotals, list[KindLine]]:
    usage = inputs.usage
    in_span = usage[(usage["usage_date"] >= start) & (usage["usage_date"] <= end)]
    fees, overage, expected = _invoice(usage, inputs.orgs, end, pricing)
    if start > month_start(end):
        # One day inside a month: what that day added to the month's invoices.
        before = _invoice(usage, inputs.orgs, start - dt.timedelta(days=1), pricing)
        fees, overage, expected = fees - before[0], overage - before[1], expected - before[2]
    found = inputs.discrepancies
    found = found[(found["usage_date"] >= start) & (found["usage_date"] <= end)]
    money: dict[MoneyEffect, Decimal] = {effect: ZERO for effect in MoneyEffect}
    informational = 0
    per_kind: dict[tuple[str, MoneyEffect], list] = {}
    for row in found.itertuples(index=False):
        impact = _decimal(row.dollar_impact)
        effect = money_effect(row.money_moving, impact, as_int(row.delta_seconds))
        entry = per_kind.setdefault((str(row.kind), effect), [0, 0, 0, ZERO])
        entry[0] += 1
        entry[2] += abs(int(row.delta_seconds))
        if bool(row.explained):
            continue
        entry[1] += 1
        entry[3] += abs(impact or ZERO)
        money[effect] += abs(impact or ZERO)
        informational += effect == MoneyEffect.INFORMATIONAL
    kinds = [
        KindLine(name, kind, effect, count, open_, hours_1(seconds), to_cents(dollars))
        for (kind, effect), (count, open_, seconds, dollars) in sorted(
            per_kind.items(), key=lambda item: (list(MoneyEffect).index(item[0][1]), item[0][0])
        )
    ]
    totals = PeriodTotals(
        period=name,
        start=start,
        end=end,
        billable_hours=hours_1(int(in_span["billable_seconds"].sum()) if not in_span.empty else 0),
        usage_at_list=_usage_at_list(in_span, pricing),
        plan_fees=to_cents(fees),
        overage_charges=to_cents(overage),
        expected_invoice=to_cents(expected),
        leakage=to_cents(money[MoneyEffect.LEAKAGE]),
        over_charge=to_cents(money[MoneyEffect.OVER_CHARGE]),
        informational_count=informational,
        informational_potential=to_cents(money[MoneyEffect.INFORMATIONAL]),
    )
    return totals, kinds


def build_review(inputs: ReviewInputs, pricing: Pricing | None = None) -> FinanceReview:
    """The whole review from what the billing database and the control plane hold."""
    pricing = pricing or Pricing()
    names = _names(inputs.orgs)
    unexplained = [
        _discrepancy_line(row, inputs.today, names)
        for row in inputs.unexplained.itertuples(index=False)
    ]
    periods, kinds = [], []
    for name, start in (
        (Period.YESTERDAY, inputs.as_of),
        (Period.MONTH_TO_DATE, month_start(inputs.as_of)),
    ):
        totals, lines = _period_totals(name, start, inputs.as_of, inputs, pricing)
        periods.append(totals)
        kinds += lines
    return FinanceReview(
        as_of=inputs.as_of,
        today=inputs.today,
        proposals=_proposal_lines(inputs, names),
        unexplained=unexplained,
        periods=periods,
        kinds=kinds,
        stale=inputs.stale,
        stale_reasons=list(inputs.stale_reasons),
    )


# ---------------------------------------------------------------------------
# Dagster table metadata (typed, sortable columns; money as text with a number twin)
# ---------------------------------------------------------------------------


def _money(name: str, amount: Decimal | None) -> dict[str, Any]:
    """`name` as `$1,234.56` and `name_usd` as a float for plots and sorting."""
    return {name: usd(amount), f"{name}_usd": None if amount is None else float(amount)}


def _money_columns(name: str, what: str) -> list[tuple[str, str, str]]:
    return [(name, "string", what), (f"{name}_usd", "float", f"{what}, in USD (number)")]


PROPOSAL_TABLE = [
    ("proposal_id", "int", "the id issue_credits and `tally credits` take"),
    ("org_id", "string", "organization"),
    ("org_name", "string", "customer name"),
    ("usage_date", "date", "usage day the over-charge is on"),
    ("kind", "string", "what the credit hands back"),
    ("tier", "string", "tier"),
    ("hours", "float", "hours credited"),
    *_money_columns("amount", "credit amount at list rates"),
    *_money_columns("net_amount", "credit net of included hours (what is handed back)"),
    ("escalation", "string", "who must approve (by the net amount)"),
    ("age_days", "int", "days since proposed"),
]
DISCREPANCY_TABLE = [
    ("usage_date", "date", "usage day"),
    ("kind", "string", "discrepancy kind"),
    ("effect", "string", "leakage (charged too little) or over_charge"),
    ("org_id", "string", "organization"),
    ("org_name", "string", "customer name"),
    ("tier", "string", "tier or instance"),
    ("hours", "float", "hours affected"),
    *_money_columns("dollar_impact", "signed impact at list rates"),
    ("age_days", "int", "days since the usage day"),
    ("detail", "string", "what reconciliation found"),
]
TOTALS_TABLE = [
    ("period", "string", "yesterday or month_to_date"),
    ("start", "date", "first usage day"),
    ("end", "date", "last usage day"),
    ("billable_hours", "float", "billable hours"),
    *_money_columns("usage_at_list", "billable usage at list tier rates"),
    *_money_columns("plan_fees", "plan fees (yesterday: what the day added)"),
    *_money_columns("overage_charges", "overage after included hours"),
    *_money_columns("expected_invoice", "expected invoice: plan fees + overage"),
    *_money_columns("revenue_leakage", "unexplained money-moving, charged too little"),
    *_money_columns("over_charge", "unexplained money-moving, charged too much"),
    ("informational_findings", "int", "unexplained informational findings"),
    *_money_columns("informational_potential", "POTENTIAL dollars of informational findings"),
]
KIND_TABLE = [
    ("period", "string", "yesterday or month_to_date"),
    ("kind", "string", "discrepancy kind"),
    ("effect", "string", "leakage, over_charge or informational"),
    ("found", "int", "rows found"),
    ("unexplained", "int", "rows not explained"),
    ("hours", "float", "hours affected"),
    *_money_columns("dollars", "unexplained |impact| (potential when informational)"),
]


def _table(columns: list[tuple[str, str, str]], records: list[dict[str, Any]]):
    from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

    schema = TableSchema(
        columns=[TableColumn(name, kind, description) for name, kind, description in columns]
    )
    names = [name for name, _, _ in columns]
    return MetadataValue.table(
        records=[TableRecord({name: record[name] for name in names}) for record in records],
        schema=schema,
    )


def proposal_records(review: FinanceReview) -> list[dict[str, Any]]:
    return [
        {
            "proposal_id": line.proposal_id,
            "org_id": line.org_id,
            "org_name": line.org_name,
            "usage_date": line.usage_date.isoformat(),
            "kind": line.kind,
            "tier": line.tier,
            "hours": line.hours,
            **_money("amount", line.amount),
            **_money("net_amount", _net(line)),
            "escalation": line.escalation,
            "age_days": line.age_days,
        }
        for line in review.proposals
    ]


def discrepancy_records(review: FinanceReview) -> list[dict[str, Any]]:
    return [
        {
            "usage_date": line.usage_date.isoformat(),
            "kind": line.kind,
            "effect": line.effect.value,
            "org_id": line.org_id,
            "org_name": line.org_name,
            "tier": line.tier,
            "hours": line.hours,
            **_money("dollar_impact", line.dollar_impact),
            "age_days": line.age_days,
            "detail": line.detail,
        }
        for line in review.unexplained
    ]


def totals_records(review: FinanceReview) -> list[dict[str, Any]]:
    return [
        {
            "period": totals.period,
            "start": totals.start.isoformat(),
            "end": totals.end.isoformat(),
            "billable_hours": totals.billable_hours,
            **_money("usage_at_list", totals.usage_at_list),
            **_money("plan_fees", totals.plan_fees),
            **_money("overage_charges", totals.overage_charges),
            **_money("expected_invoice", totals.expected_invoice),
            **_money("revenue_leakage", totals.leakage),
            **_money("over_charge", totals.over_charge),
            "informational_findings": totals.informational_count,
            **_money("informational_potential", totals.informational_potential),
        }
        for totals in review.periods
    ]


def kind_records(review: FinanceReview) -> list[dict[str, Any]]:
    return [
        {
            "period": line.period,
            "kind": line.kind,
            "effect": line.effect.value,
            "found": line.found,
            "unexplained": line.unexplained,
            "hours": line.hours,
            **_money("dollars", line.dollars),
        }
        for line in review.kinds
    ]


def headline(review: FinanceReview) -> dict[str, Any]:
    """The four answers as plain values (numbers for plots, text for reading)."""
    yesterday = review.period(Period.YESTERDAY)
    month = review.period(Period.MONTH_TO_DATE)
    return {
        "as_of": review.as_of.isoformat(),
        "billed_yesterday_usd": float(yesterday.expected_invoice),
        "usage_at_list_yesterday_usd": float(yesterday.usage_at_list),
        "expected_invoice_month_to_date_usd": float(month.expected_invoice),
        "at_risk_usd": float(review.at_risk),
        "at_risk_leakage_usd": float(review.at_risk_leakage),
        "at_risk_over_charge_usd": float(review.at_risk_over_charge),
        "unexplained_money_moving": len(review.unexplained),
        "credits_to_approve": len(review.proposals),
        "credits_to_approve_usd": float(review.credits_to_approve),
        "stale": review.stale,
        "freshness": (
            "unknown"
            if review.stale is None
            else ("STALE: " + "; ".join(review.stale_reasons) if review.stale else "fresh")
        ),
    }


def review_metadata(review: FinanceReview) -> dict[str, Any]:
    """What finance reads on the asset: headline numbers, then the four tables."""
    from dagster import MetadataValue

    values = headline(review)
    metadata: dict[str, Any] = {
        key: (MetadataValue.float(value) if isinstance(value, float) else value)
        for key, value in values.items()
        if value is not None
    }
    metadata["totals"] = _table(TOTALS_TABLE, totals_records(review))
    metadata["open_credit_proposals"] = _table(PROPOSAL_TABLE, proposal_records(review))
    metadata["unexplained_money_moving"] = _table(DISCREPANCY_TABLE, discrepancy_records(review))
    metadata["discrepancies_by_kind"] = _table(KIND_TABLE, kind_records(review))
    return metadata


# ---------------------------------------------------------------------------
# I/O and the asset
# ---------------------------------------------------------------------------

_FRAMES = {
    "orgs": ["org_id", "name", "plan", "created_at"],
    "proposals": [
        "proposal_id",
        "org_id",
        "usage_date",
        "tier",
        "kind",
        "seconds",
        "amount",
        "net_amount",
        "escalation",
        "created_at",
    ],
    "discrepancies": [
        "usage_date",
        "kind",
        "org_id",
        "tier",
        "instance_id",
        "provider",
        "delta_seconds",
        "dollar_impact",
        "money_moving",
        "explained",
        "detail",
    ],
    "usage": ["org_id", "usage_date", "tier", "billable_seconds"],
}


def _columns(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return pd.DataFrame(columns=_FRAMES[name]) if frame.empty else frame


def load_review_inputs(
    control_engine, billing_engine, as_of: dt.date, today: dt.date
) -> ReviewInputs:
    """Read the control plane and the billing database (separately) for the review."""
    from resources.db import raw_connection, read_frame

    span = {"start_date": month_start(as_of), "end_date": as_of}
    with raw_connection(control_engine) as connection:
        orgs = read_frame(connection, "finance_review/orgs.sql")
    with raw_connection(billing_engine) as connection:
        proposals = read_frame(connection, "finance_review/open_proposals.sql")
        unexplained = read_frame(connection, "finance_review/unexplained.sql")
        discrepancies = read_frame(connection, "finance_review/period_discrepancies.sql", span)
        usage = read_frame(connection, "finance_review/usage.sql", span)
    return ReviewInputs(
        as_of=as_of,
        today=today,
        orgs=_columns(orgs, "orgs"),
        proposals=_columns(proposals, "proposals"),
        unexplained=_columns(unexplained, "discrepancies"),
        discrepancies=_columns(discrepancies, "discrepancies"),
        usage=_columns(usage, "usage"),
    )


def yesterday(now: dt.datetime) -> dt.date:
    return now.astimezone(dt.UTC).date() - dt.timedelta(days=1)


def review_now(control_engine, billing_engine, now: dt.datetime, pricing: Pricing) -> FinanceReview:
    """The review as of `now`: yesterday's and this month's numbers, the open items of
    every day, and whether the reconciliation is stale (pipelines/freshness.py, from
    the billing database's own record of reconciled days)."""
    from pipelines.freshness import read_freshness

    inputs = load_review_inputs(control_engine, billing_engine, yesterday(now), now.date())
    freshness, _ = read_freshness(billing_engine, now)
    inputs.stale, inputs.stale_reasons = freshness.stale, list(freshness.reasons)
    return build_review(inputs, pricing)


@asset(
    group_name="review",
    deps=["reconciliation", "credit_proposals", "quota_usage"],
    retry_policy=STEP_RETRY,
    description=(
        "Finance review: billed yesterday and month to date (list price, expected invoice "
        "after included hours and plan fees), revenue leakage and over-charge kept apart, "
        "informational findings as potential dollars, open credit proposals and "
        "unexplained money-moving discrepancies of every day, and freshness. Refreshed "
        "after every daily_billing and issue_credits run."
    ),
)
def finance_review(context: AssetExecutionContext, postgres: PostgresResource) -> MaterializeResult:
    review = review_now(
        postgres.control_engine(),
        postgres.billing_engine(),
        dt.datetime.now(dt.UTC),
        pricing_or_fail(),
    )
    return MaterializeResult(metadata=review_metadata(review))
