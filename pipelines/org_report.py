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
                        "threshold": {"type": "integer"},
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
            "threshold": int(row.threshold),
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
        f"{alert['threshold']}% {alert['status']}"
        + (f" {alert['sent_at'][:16].replace('T', ' ')} UTC" if alert["sent_at"] else "")
        + f" (as of {alert['usage_date']}: {alert['used_hours']:.2f}"
        f" of {alert['included_hours']:.2f} h)"
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
