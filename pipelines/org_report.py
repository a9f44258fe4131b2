"""`tally org ORG_ID [--month YYYY-MM] [--json]`: one org's month for support staff.

Plan, included / used / left hours, overage, expected charges, budget alerts and
open discrepancies. The numbers come from billing.billed_usage of the month through
the same functions as the `quota_usage` asset (assets/quota.py), so they are current
even when a day was re-metered after its quota partition ran. The org and its plan
come from the control plane, read separately from the billing database.

`--json` prints one object that follows `JSON_SCHEMA` (schema id
`tally.org_report/1`, documented in docs/quota.md): hours as numbers rounded to
0.01 h next to exact integer seconds, money as strings with two decimals (USD).
Fields are only ever added under the same schema id.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from resources.calendar import next_month

if TYPE_CHECKING:  # pandas, SQLAlchemy and the pricing load lazily: `tally --help` stays fast
    import pandas as pd
    from sqlalchemy.engine import Engine

    from assets.pricing import Plan, Pricing

SCHEMA_ID = "tally.org_report/1"
OPEN_STATUSES_EXCLUDED = ("resolved", "closed", "explained", "credited", "dismissed")

_HOURS = {"type": "number", "minimum": 0}
_SECONDS = {"type": "integer", "minimum": 0}
_MONEY = {"type": "string", "pattern": r"^\d+\.\d{2}$"}
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}


def _object(properties: dict) -> dict:
    return {
        "type": "object",
        "required": sorted(properties),
        "additionalProperties": False,
        "properties": properties,
    }


JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "tally org report",
    **_object(
        {
            "schema": {"const": SCHEMA_ID},
            "org": _object(
                {
                    "org_id": {"type": "string"},
                    "name": {"type": "string"},
                    "billing_email": {"type": ["string", "null"]},
                    "provider": {"type": "string"},
                }
            ),
            "month": {"type": "string", "pattern": r"^\d{4}-\d{2}$"},
            "as_of": {"oneOf": [_DATE, {"type": "null"}]},
            "plan": _object(
                {
                    "name": {"type": "string"},
                    "monthly_fee": _MONEY,
                    "included_hours": _HOURS,
                    "overage_billable": {"type": "boolean"},
                }
            ),
            "usage": _object(
                {
                    "billable_hours": _HOURS,
                    "included_hours": _HOURS,
                    "included_used_hours": _HOURS,
                    "included_left_hours": _HOURS,
                    "overage_hours": _HOURS,
                    "used_pct": {"type": ["number", "null"], "minimum": 0},
                    "billable_seconds": _SECONDS,
                    "included_seconds": _SECONDS,
                    "included_used_seconds": _SECONDS,
                    "included_left_seconds": _SECONDS,
                    "overage_seconds": _SECONDS,
                }
            ),
            "tiers": {
                "type": "array",
                "items": _object(
                    {
                        "tier": {"type": "string"},
                        "billable_hours": _HOURS,
                        "included_hours": _HOURS,
                        "overage_hours": _HOURS,
                        "billable_seconds": _SECONDS,
                        "included_seconds": _SECONDS,
                        "overage_seconds": _SECONDS,
                        "overage_amount": _MONEY,
                    }
                ),
            },
            "charges": _object(
                {
                    "currency": {"const": "USD"},
                    "base_fee": _MONEY,
                    "overage": _MONEY,
                    "expected": _MONEY,
                }
            ),
            "free_tier_overage": {"type": "boolean"},
            "alerts": {
                "type": "array",
                "items": _object(
                    {
                        "kind": {"enum": ["included_hours", "spend"]},
                        "threshold": {"type": "integer"},
                        "spend": {"oneOf": [_MONEY, {"type": "null"}]},
                        "status": {"type": "string"},
                        "usage_date": _DATE,
                        "used_hours": _HOURS,
                        "included_hours": _HOURS,
                        "recipient": {"type": ["string", "null"]},
                        "attempts": {"type": "integer", "minimum": 0},
                        "sent_at": {"type": ["string", "null"]},
                        "last_error": {"type": ["string", "null"]},
                    }
                ),
            },
            "explanations": {
                "type": "array",
                "items": _object(
                    {
                        "usage_date": _DATE,
                        "kind": {"type": "string"},
                        "tier": {"type": "string"},
                        "explanation": {"type": "string"},
                        "explained_by": {"type": "string"},
                        "explained_at": {"type": "string"},
                        "revoked_at": {"type": ["string", "null"]},
                        "revoked_by": {"type": ["string", "null"]},
                    }
                ),
            },
            "discrepancies": _object(
                {
                    "tracked": {"type": "boolean"},
                    "open": {"type": "integer", "minimum": 0},
                    "items": {
                        "type": "array",
                        "items": _object(
                            {
                                "usage_date": _DATE,
                                "kind": {"type": "string"},
                                "tier": {"type": ["string", "null"]},
                                "detail": {"type": "object"},
                            }
                        ),
                    },
                }
            ),
        }
    ),
}


class ReportError(ValueError):
    """A mistake the user can fix (unknown org, month in the future, …)."""


def parse_month(value: str) -> dt.date:
    """YYYY-MM → the first day of that month (argparse `type=`)."""
    try:
        return dt.datetime.strptime(value, "%Y-%m").date()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a month; use YYYY-MM, e.g. 2026-11"
        ) from None


def _hours_number(seconds: int) -> float:
    from assets.quota import hours

    return float(hours(seconds))


def _discrepancy_open(detail: dict) -> bool:
    """Open unless reconciliation marked it explained (or resolved, should it grow that)."""
    if detail.get("explained") is True or detail.get("resolved_at"):
        return False
    return str(detail.get("status") or "").lower() not in OPEN_STATUSES_EXCLUDED


def _lookup_org(control_engine: Engine, org_id: str) -> pd.Series:
    """The org's control-plane row; ReportError when there is no such org (or table)."""
    from psycopg.errors import UndefinedTable

    from resources.db import raw_connection, read_frame

    try:
        with raw_connection(control_engine) as connection:
            org = read_frame(connection, "org_report/lookup.sql", {"org_id": org_id})
    except UndefinedTable:
        raise ReportError(
            "no organizations table in the control-plane database; "
            "point DATABASE_URL at the control plane"
        ) from None
    if org.empty:
        raise ReportError(f"no organization '{org_id}' in the control plane; check the id")
    return org.iloc[0]


def _org_plan(org_id: str, plan_name: str) -> tuple[Pricing, Plan]:
    """The pricing configuration and the org's plan in it; ReportError when unpriced."""
    from assets.pricing import PricingError, current_pricing

    try:
        pricing = current_pricing()
        return pricing, pricing.plan(plan_name)
    except PricingError as error:
        raise ReportError(f"{org_id}: {error}") from None


@dataclass
class _MonthRows:
    """What the billing database holds of the org's month."""

    usage: pd.DataFrame
    as_of: dt.date | None  # the newest metered day of the month, if any
    alerts: pd.DataFrame
    tracked: bool  # billing.discrepancies exists
    discrepancies: pd.DataFrame | None  # None unless tracked
    explanations: pd.DataFrame | None = None  # `tally explain`; None unless tracked


def _read_month(billing_engine: Engine, org_id: str, month: dt.date) -> _MonthRows:
    import pandas as pd

    from resources.db import raw_connection, read_frame

    span = {"org_id": org_id, "month_start": month, "next_month": next_month(month)}
    with raw_connection(billing_engine) as connection:
        usage = read_frame(connection, "org_report/month_usage.sql", span)
        as_of = read_frame(connection, "org_report/as_of.sql", span)["as_of"].iloc[0]
        alerts = read_frame(connection, "org_report/alerts.sql", span)
        tracked = bool(
            read_frame(connection, "org_report/discrepancies_exists.sql")["present"].iloc[0]
        )
        found = read_frame(connection, "org_report/discrepancies.sql", span) if tracked else None
        explained = read_frame(connection, "org_report/explanations.sql", span) if tracked else None
    as_of = None if as_of is None or pd.isna(as_of) else as_of
    return _MonthRows(usage, as_of, alerts, tracked, found, explained)


def _explanation_items(rows: _MonthRows) -> list[dict]:
    import pandas as pd

    def when(value) -> str | None:
        return None if value is None or pd.isna(value) else value.isoformat()

    found = rows.explanations
    return [
        {
            "usage_date": row.usage_date.isoformat(),
            "kind": row.kind,
            "tier": row.tier,
            "explanation": row.explanation,
            "explained_by": row.explained_by,
            "explained_at": when(row.explained_at),
            "revoked_at": when(row.revoked_at),
            "revoked_by": None
            if row.revoked_by is None or pd.isna(row.revoked_by)
            else row.revoked_by,
        }
        for row in ([] if found is None else found.itertuples(index=False))
    ]


def _org_section(org_id: str, org_row: pd.Series) -> dict:
    return {
        "org_id": org_id,
        "name": org_row["name"],
        "billing_email": org_row["billing_email"],
        "provider": org_row["provider"],
    }


def _plan_section(plan: Plan, quota: pd.Series) -> dict:
    return {
        "name": plan.name,
        "monthly_fee": str(quota["base_fee"]),
        "included_hours": float(plan.included_hours),
        "overage_billable": plan.overage_billable,
    }


_USAGE_AMOUNTS = ("billable", "included", "included_used", "included_left", "overage")


def _usage_section(quota: pd.Series) -> dict:
    return {
        **{
            f"{name}_hours": _hours_number(int(quota[f"{name}_seconds"])) for name in _USAGE_AMOUNTS
        },
        "used_pct": None if quota["used_pct"] is None else float(quota["used_pct"]),
        **{f"{name}_seconds": int(quota[f"{name}_seconds"]) for name in _USAGE_AMOUNTS},
    }


def _tier_items(tiers: pd.DataFrame) -> list[dict]:
    return [
        {
            "tier": row.tier,
            "billable_hours": _hours_number(row.billable_seconds),
            "included_hours": _hours_number(row.included_seconds),
            "overage_hours": _hours_number(row.overage_seconds),
            "billable_seconds": int(row.billable_seconds),
            "included_seconds": int(row.included_seconds),
            "overage_seconds": int(row.overage_seconds),
            "overage_amount": str(row.overage_amount),
        }
        for row in tiers.itertuples(index=False)
    ]


def _charges_section(quota: pd.Series) -> dict:
    return {
        "currency": "USD",
        "base_fee": str(quota["base_fee"]),
        "overage": str(quota["overage_charges"]),
        "expected": str(quota["expected_charges"]),
    }


def _alert_items(alerts: pd.DataFrame) -> list[dict]:
    import pandas as pd

    return [
        {
            "kind": row.kind,
            "threshold": int(row.threshold),
            "spend": None if row.spend is None or pd.isna(row.spend) else _money(row.spend),
            "status": row.status,
            "usage_date": row.usage_date.isoformat(),
            "used_hours": _hours_number(row.billable_seconds),
            "included_hours": _hours_number(row.included_seconds),
            "recipient": row.recipient,
            "attempts": int(row.attempts),
            "sent_at": None if pd.isna(row.sent_at) else row.sent_at.isoformat(),
            "last_error": row.last_error,
        }
        for row in alerts.itertuples(index=False)
    ]


def _discrepancies_section(rows: _MonthRows) -> dict:
    found = rows.discrepancies if rows.tracked else None
    details = [] if found is None else [row.detail for row in found.itertuples(index=False)]
    open_items = [
        {
            "usage_date": str(detail.get("usage_date"))[:10],
            "kind": str(detail.get("kind")),
            "tier": detail.get("tier"),
            "detail": detail,
        }
        for detail in details
        if _discrepancy_open(detail)
    ]
    return {"tracked": rows.tracked, "open": len(open_items), "items": open_items}


def build_report(
    org_id: str,
    month: dt.date,
    *,
    control_engine: Engine,
    billing_engine: Engine,
    today: dt.date,
) -> dict:
    """The report as a JSON-ready dict (see JSON_SCHEMA)."""
    import pandas as pd

    from assets.quota import quota_month_to_date

    if month > today.replace(day=1):
        raise ReportError(f"--month {month:%Y-%m} is in the future (this month is {today:%Y-%m})")
    org_row = _lookup_org(control_engine, org_id)
    pricing, plan = _org_plan(org_id, org_row["plan"])
    rows = _read_month(billing_engine, org_id, month)
    month_end = next_month(month) - dt.timedelta(days=1)
    result = quota_month_to_date(
        rows.usage,
        pd.DataFrame({"org_id": [org_id], "plan": [plan.name]}),
        rows.as_of or min(month_end, today),
        pricing,
    )
    quota = result.orgs.iloc[0]
    return {
        "schema": SCHEMA_ID,
        "org": _org_section(org_id, org_row),
        "month": f"{month:%Y-%m}",
        "as_of": rows.as_of.isoformat() if rows.as_of else None,
        "plan": _plan_section(plan, quota),
        "usage": _usage_section(quota),
        "tiers": _tier_items(result.tiers),
        "charges": _charges_section(quota),
        "free_tier_overage": bool(quota["free_tier_overage"]),
        "alerts": _alert_items(rows.alerts),
        "explanations": _explanation_items(rows),
        "discrepancies": _discrepancies_section(rows),
    }


def render_text(report: dict) -> str:
    org, plan, usage, charges = report["org"], report["plan"], report["usage"], report["charges"]
    overage_rule = (
        "overage billed at tier rates"
        if plan["overage_billable"]
        else ("overage not billed (flagged)")
    )
    through = f"data through {report['as_of']}" if report["as_of"] else "no metered day yet"
    used_pct = "" if usage["used_pct"] is None else f"  ({usage['used_pct']:.2f} % of included)"
    lines = [
        f"{org['org_id']}  {org['name']}  <{org['billing_email'] or 'no billing e-mail'}>"
        f"  provider {org['provider']}",
        f"plan           {plan['name']}: ${plan['monthly_fee']}/month, "
        f"{plan['included_hours']:.2f} included hours, {overage_rule}",
        f"month          {report['month']} ({through})",
        f"used           {usage['billable_hours']:.2f} h{used_pct}",
        f"included       {usage['included_hours']:.2f} h: "
        f"used {usage['included_used_hours']:.2f} h, left {usage['included_left_hours']:.2f} h",
        f"overage        {usage['overage_hours']:.2f} h"
        + ("  FREE-TIER OVERAGE (not charged)" if report["free_tier_overage"] else ""),
    ]
    if report["tiers"]:
        lines.append("by tier        tier      billable h  included h  overage h  overage $")
        for tier in report["tiers"]:
            lines.append(
                f"               {tier['tier']:<8} {tier['billable_hours']:>11.2f} "
                f"{tier['included_hours']:>11.2f} {tier['overage_hours']:>10.2f} "
                f"{tier['overage_amount']:>10}"
            )
    lines.append(
        f"expected       ${charges['expected']}  (base ${charges['base_fee']}"
        f" + overage ${charges['overage']})"
    )
    alerts = [
        (
            f"${alert['threshold']} spend {alert['status']}"
            if alert["kind"] == "spend"
            else f"{alert['threshold']}% {alert['status']}"
        )
        + (f" {alert['sent_at'][:16].replace('T', ' ')} UTC" if alert["sent_at"] else "")
        + (
            f" (as of {alert['usage_date']}: ${alert['spend']})"
            if alert["kind"] == "spend"
            else f" (as of {alert['usage_date']}: {alert['used_hours']:.2f}"
            f" of {alert['included_hours']:.2f} h)"
        )
        for alert in report["alerts"]
    ] or ["none"]
    lines.append(f"alerts         {alerts[0]}")
    lines.extend(f"               {alert}" for alert in alerts[1:])
    found = report["discrepancies"]
    if not found["tracked"]:
        lines.append("discrepancies  0 (reconciliation not set up: no billing.discrepancies)")
    else:
        kinds: dict[str, int] = {}
        for item in found["items"]:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
        lines.append(f"discrepancies  {found['open']} open" + (f": {by_kind}" if by_kind else ""))
    for item in report["explanations"]:
        tier = f" {item['tier']}" if item["tier"] else ""
        state = (
            f"REVOKED by {item['revoked_by']} {item['revoked_at'][:16]}"
            if item["revoked_at"]
            else f"by {item['explained_by']} {item['explained_at'][:16]}"
        )
        lines.append(
            f"explained      {item['usage_date']} {item['kind']}{tier}: "
            f"{item['explanation']} ({state})"
        )
    return "\n".join(lines)


def _json_default(value: object) -> str:
    if isinstance(value, Decimal | dt.date | dt.datetime):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def run_org_report(org_id: str, month: dt.date | None, *, as_json: bool) -> int:
    """Print the report; ReportError for user mistakes. Returns the exit code (0)."""
    from resources.db import billing_engine, control_engine

    today = dt.datetime.now(dt.UTC).date()
    # Migrated: a fresh database answers "nothing yet", not an SQL error.
    billing = billing_engine()
    report = build_report(
        org_id,
        month or today.replace(day=1),
        control_engine=control_engine(),
        billing_engine=billing,
        today=today,
    )
    print(json.dumps(report, indent=2, default=_json_default) if as_json else render_text(report))
    return 0


# --------------------------------------------------------------------------- --days

DAYS_SCHEMA_ID = "tally.org_days/1"
INSTANCE_SCHEMA_ID = "tally.org_instance/1"


def _money(amount: Decimal) -> str:
    from assets.pricing import to_cents

    return str(to_cents(Decimal(amount)))


def _hours_or_none(seconds: int | None) -> float | None:
    return None if seconds is None else _hours_number(seconds)


def _read_days(billing_engine: Engine, org_id: str, month: dt.date) -> dict[str, pd.DataFrame]:
    from resources.db import raw_connection, read_frame

    span = {"org_id": org_id, "month_start": month, "next_month": next_month(month)}
    with raw_connection(billing_engine) as connection:
        return {
            "billed": read_frame(connection, "org_report/days_billed.sql", span),
            "sent": read_frame(connection, "org_report/days_sent.sql", span),
            "provider": read_frame(connection, "org_report/days_provider.sql", span),
            "proposals": read_frame(connection, "org_report/days_proposals.sql", span),
            "corrections": read_frame(connection, "org_report/days_corrections.sql", span),
            "explanations": read_frame(connection, "org_report/explanations.sql", span),
        }


def _by_day_tier(frame: pd.DataFrame) -> dict[tuple[dt.date, str], object]:
    return {(row.usage_date, row.tier): row for row in frame.itertuples(index=False)}


def _when(value: object) -> str | None:
    import pandas as pd

    return None if value is None or pd.isna(value) else value.isoformat()  # type: ignore[attr-defined]


def _day_item(
    day: dt.date, tables: dict[str, pd.DataFrame], pricing: Pricing, lookups: dict
) -> dict:
    tiers = sorted(
        {tier for (usage_date, tier) in lookups["tiers"] if usage_date == day},
        key=lambda tier: (-pricing.tier_rates.get(tier, Decimal(0)), tier),
    )
    tier_items = []
    for tier in tiers:
        billed = lookups["billed"].get((day, tier))
        sent = lookups["sent"].get((day, tier))
        provider = lookups["provider"].get((day, tier))
        billable = int(billed.billable_seconds) if billed is not None else 0
        rate = pricing.tier_rates.get(tier)
        tier_items.append(
            {
                "tier": tier,
                "billable_hours": _hours_number(billable),
                "billable_seconds": billable,
                "runtime_seconds": int(billed.runtime_seconds) if billed is not None else 0,
                "list_amount": _money(pricing.amount(billable, tier)) if rate else "0.00",
                "sent_seconds": int(sent.sent_seconds) if sent is not None else 0,
                "unsent_seconds": int(sent.unsent_seconds) if sent is not None else 0,
                "provider_seconds": None if provider is None else int(provider.provider_seconds),
                "provider_hours": None
                if provider is None
                else _hours_number(int(provider.provider_seconds)),
            }
        )
    proposals = tables["proposals"]
    corrections = tables["corrections"]
    explanations = tables["explanations"]
    return {
        "usage_date": day.isoformat(),
        "tiers": tier_items,
        "list_amount": _money(sum((Decimal(t["list_amount"]) for t in tier_items), Decimal(0))),
        "credits_proposed": [
            {
                "proposal_id": int(row.proposal_id),
                "tier": row.tier,
                "kind": row.kind,
                "seconds": int(row.seconds),
                "amount": None if row.amount is None else _money(row.amount),
                "status": row.status,
            }
            for row in proposals[proposals["usage_date"] == day].itertuples(index=False)
        ],
        "credits_applied": [
            {
                "proposal_id": int(row.proposal_id),
                "tier": row.tier,
                "amount": _money(row.amount),
                "method": row.method,
                "approved_by": row.approved_by,
                "applied_at": _when(row.applied_at),
            }
            for row in corrections[corrections["usage_date"] == day].itertuples(index=False)
        ],
        "explanations": [
            {
                "kind": row.kind,
                "tier": row.tier,
                "explanation": row.explanation,
                "explained_by": row.explained_by,
                "revoked": _when(row.revoked_at) is not None,
            }
            for row in explanations[explanations["usage_date"] == day].itertuples(index=False)
        ],
    }


def build_days_report(
    org_id: str,
    month: dt.date,
    *,
    control_engine: Engine,
    billing_engine: Engine,
    today: dt.date,
) -> dict:
    """Per day of the month (days with anything on record): billable hours per tier
    at list price, what the ledger sent, what the provider recorded, credits proposed
    and applied, explanations. Schema id `tally.org_days/1` (docs/quota.md)."""
    if month > today.replace(day=1):
        raise ReportError(f"--month {month:%Y-%m} is in the future (this month is {today:%Y-%m})")
    org_row = _lookup_org(control_engine, org_id)
    pricing, _ = _org_plan(org_id, org_row["plan"])
    tables = _read_days(billing_engine, org_id, month)
    lookups: dict = {
        "billed": _by_day_tier(tables["billed"]),
        "sent": _by_day_tier(tables["sent"]),
        "provider": _by_day_tier(tables["provider"]),
    }
    lookups["tiers"] = set(lookups["billed"]) | set(lookups["sent"]) | set(lookups["provider"])
    days = sorted(
        {day for day, _ in lookups["tiers"]}
        | {
            row.usage_date
            for name in ("proposals", "corrections", "explanations")
            for row in tables[name].itertuples(index=False)
        }
    )
    return {
        "schema": DAYS_SCHEMA_ID,
        "org": _org_section(org_id, org_row),
        "month": f"{month:%Y-%m}",
        "currency": "USD",
        "days": [_day_item(day, tables, pricing, lookups) for day in days],
    }


def _hours_text(hours: float | None) -> str:
    return "-" if hours is None else f"{hours:.2f}"


def render_days_text(report: dict) -> str:
    org = report["org"]
    lines = [f"{org['org_id']}  {org['name']}  {report['month']}, per day (UTC), amounts USD"]
    if not report["days"]:
        lines.append("no metered usage, credits or explanations this month")
    for day in report["days"]:
        lines.append("")
        lines.append(f"{day['usage_date']}  list price ${day['list_amount']}")
        if day["tiers"]:
            lines.append("  tier      billable h    list $   sent h  provider h")
        for tier in day["tiers"]:
            unsent = (
                f"  ({_hours_number(tier['unsent_seconds']):.2f} h not yet sent)"
                if tier["unsent_seconds"]
                else ""
            )
            lines.append(
                f"  {tier['tier']:<8} {tier['billable_hours']:>11.2f} {tier['list_amount']:>9}"
                f" {_hours_number(tier['sent_seconds']):>8.2f} "
                f"{_hours_text(tier['provider_hours']):>11}{unsent}"
            )
        for credit in day["credits_proposed"]:
            amount = f"${credit['amount']}" if credit["amount"] is not None else "no amount"
            lines.append(
                f"  credit proposed #{credit['proposal_id']} {credit['tier']} {credit['kind']}"
                f" {amount} ({credit['status']})"
            )
        for credit in day["credits_applied"]:
            lines.append(
                f"  credit applied  #{credit['proposal_id']} {credit['tier']} ${credit['amount']}"
                f" by {credit['approved_by']} ({credit['method']})"
            )
        for item in day["explanations"]:
            tier = f" {item['tier']}" if item["tier"] else ""
            revoked = " (revoked)" if item["revoked"] else ""
            lines.append(
                f"  explained       {item['kind']}{tier}: {item['explanation']}"
                f" - {item['explained_by']}{revoked}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- --instance


def _instance_inputs(
    control_engine: Engine, org_id: str, instance_id: str, usage_date: dt.date, metered_at
):
    """What the day's metering saw of the org: its instances, throttle and the
    heartbeats of the look-back window received by the time the day was metered."""
    from assets.extract import checked_throttle
    from assets.metering_rules import MeteringRules
    from resources.db import raw_connection, read_frame

    rules = MeteringRules()
    with raw_connection(control_engine) as connection:
        found = read_frame(
            connection,
            "org_report/instance_lookup.sql",
            {"org_id": org_id, "instance_id": instance_id},
        )
        if found.empty:
            raise ReportError(
                f"no instance '{instance_id}' in organization '{org_id}'; check the id"
            )
        instances = read_frame(connection, "org_report/org_instances.sql", {"org_id": org_id})
        raw_throttle = read_frame(connection, "org_report/org_throttle.sql", {"org_id": org_id})
        throttle, _ = checked_throttle(raw_throttle, rules)
        window_start, window_end = rules.lookback_window(
            usage_date, rules.lookback_span_s(throttle)
        )
        heartbeats = read_frame(
            connection,
            "org_report/org_heartbeats.sql",
            {
                "org_id": org_id,
                "window_start": window_start,
                "window_end": window_end,
                "metered_at": metered_at,
            },
        )
    return instances, throttle, heartbeats, rules


def _stamp(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span_items(spans) -> list[dict]:
    return [
        {
            "start": _stamp(span.start),
            "end": _stamp(span.end),
            "seconds": span.end - span.start,
            "seconds_in_day": span.seconds,
        }
        for span in spans
    ]


def build_instance_report(
    org_id: str,
    instance_id: str,
    usage_date: dt.date,
    *,
    control_engine: Engine,
    billing_engine: Engine,
) -> dict:
    """One instance's bill for one day from the metering rules (assets/instance_bill.py),
    beside the stored billed_usage_instances row. Schema id `tally.org_instance/1`."""
    import pandas as pd

    from assets.instance_bill import explain_instance
    from resources.db import raw_connection, read_frame

    org_row = _lookup_org(control_engine, org_id)
    pricing, _ = _org_plan(org_id, org_row["plan"])
    with raw_connection(billing_engine) as connection:
        stored = read_frame(
            connection,
            "org_report/instance_day.sql",
            {"org_id": org_id, "instance_id": instance_id, "usage_date": usage_date},
        ).iloc[0]
    metered_at = stored["metered_at"]
    instances, throttle, heartbeats, rules = _instance_inputs(
        control_engine, org_id, instance_id, usage_date, metered_at
    )
    if metered_at is None or pd.isna(metered_at):
        raise ReportError(
            f"{usage_date} has not been metered yet; run `tally run --start-date {usage_date} "
            f"--end-date {usage_date}` first"
        )
    bill = explain_instance(
        heartbeats,
        instances,
        throttle,
        instance_id,
        usage_date,
        metered_at.to_pydatetime(),
        rules,
        pricing.known_tiers,
    )
    from assets.metering_rules import SECONDS_COLUMNS

    stored_seconds = {
        column: 0 if pd.isna(stored[column]) else int(stored[column]) for column in SECONDS_COLUMNS
    }
    rate = pricing.tier_rates.get(bill.tier)
    return {
        "schema": INSTANCE_SCHEMA_ID,
        "org": _org_section(org_id, org_row),
        "instance_id": instance_id,
        "tier": bill.tier,
        "usage_date": usage_date.isoformat(),
        "metered_at": metered_at.isoformat(),
        "limits": bill.limits,
        "seconds": bill.seconds,
        "hours": {
            column.removesuffix("_seconds"): _hours_number(value)
            for column, value in bill.seconds.items()
        },
        "list_amount": _money(pricing.amount(bill.seconds["billable_seconds"], bill.tier))
        if rate
        else "0.00",
        "stored_seconds": stored_seconds,
        "agrees_with_billed_usage": stored_seconds == bill.seconds,
        "sessions": _span_items(bill.sessions),
        "idle_cuts": _span_items(bill.idle_cuts),
        "continuous_cap_cuts": _span_items(bill.continuous_cuts),
        "daily_cap_cuts": _span_items(bill.daily_cuts),
    }


def render_instance_text(report: dict) -> str:
    hours, limits = report["hours"], report["limits"]

    def spans(title: str, items: list[dict]) -> list[str]:
        if not items:
            return [f"{title:<15}none"]
        rows = [
            f"{item['start'][11:19]} - {item['end'][11:19]}"
            + (
                f" ({item['start'][:10]} - {item['end'][:10]})"
                if item["start"][:10] != item["end"][:10]
                else ""
            )
            + f"  {item['seconds_in_day'] / 3600:.2f} h in the day"
            for item in items
        ]
        return [f"{title:<15}{rows[0]}", *(f"{'':<15}{row}" for row in rows[1:])]

    agrees = (
        "matches billed usage"
        if report["agrees_with_billed_usage"]
        else f"DIFFERS from billed usage as stored: {report['stored_seconds']}"
    )
    return "\n".join(
        [
            f"{report['instance_id']}  ({report['tier']})  of {report['org']['org_id']}"
            f"  {report['org']['name']}  on {report['usage_date']} (UTC)",
            f"billed         {hours['billable']:.2f} h  ${report['list_amount']} at list price"
            f"  ({agrees})",
            f"ran            {hours['runtime']:.2f} h = {hours['billable']:.2f} billed"
            f" + {hours['idle_paused']:.2f} idle + {hours['over_continuous']:.2f} over the"
            f" continuous limit + {hours['over_daily']:.2f} over the daily cap",
            f"limits         continuous {limits['continuous_limit_s'] / 3600:g} h, org daily "
            f"{limits['daily_limit_s'] / 3600:g} h, idle timeout "
            f"{limits['idle_timeout_s'] // 60} min",
            *spans("sessions", report["sessions"]),
            *spans("idle cuts", report["idle_cuts"]),
            *spans("continuous cap", report["continuous_cap_cuts"]),
            *spans("daily cap", report["daily_cap_cuts"]),
        ]
    )


def run_org_days(org_id: str, month: dt.date | None, *, as_json: bool) -> int:
    from resources.db import billing_engine, control_engine

    today = dt.datetime.now(dt.UTC).date()
    report = build_days_report(
        org_id,
        month or today.replace(day=1),
        control_engine=control_engine(),
        billing_engine=billing_engine(),
        today=today,
    )
    print(json.dumps(report, indent=2) if as_json else render_days_text(report))
    return 0


def run_org_instance(org_id: str, instance_id: str, usage_date: dt.date, *, as_json: bool) -> int:
    from resources.db import billing_engine, control_engine

    report = build_instance_report(
        org_id,
        instance_id,
        usage_date,
        control_engine=control_engine(),
        billing_engine=billing_engine(),
    )
    print(json.dumps(report, indent=2) if as_json else render_instance_text(report))
    return 0
