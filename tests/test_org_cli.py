"""`tally org ORG_ID [--month YYYY-MM] [--json]` for support staff."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from builders import add_billed, add_org
from dagster import materialize
from jsonschema import Draft202012Validator

from assets.budget_alerts import budget_alerts
from assets.quota import quota_usage
from pipelines.cli import main
from pipelines.org_report import JSON_SCHEMA
from resources.db import PostgresResource
from resources.notify import SmtpResource
from resources.settings import RunMode

H = 3600
YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
MONTH = f"{YESTERDAY:%Y-%m}"


@pytest.fixture()
def org_b(engine, smtp_server):
    """base-plus-usage (100 h) on one day: gpu 20 h (included, 20), large 30 h (50),
    small 55 h (50 included, 5 over) -> 105 h, 5 h x $0.05 = $0.25 over, $20.25.
    Both thresholds crossed at once: 90 % mailed, 50 % superseded."""
    add_org(engine, "org-b", plan="base-plus-usage", provider="polar")
    add_billed(
        engine,
        [
            ("org-b", YESTERDAY, "gpu", 20 * H),
            ("org-b", YESTERDAY, "large", 30 * H),
            ("org-b", YESTERDAY, "small", 55 * H),
        ],
    )
    materialize(
        [quota_usage, budget_alerts],
        partition_key=YESTERDAY.isoformat(),
        resources={"postgres": PostgresResource(), "smtp": SmtpResource(), "run_mode": RunMode()},
    )
    assert len(smtp_server.messages) == 1
    return engine


def test_json_follows_the_documented_schema(org_b):
    with org_b.begin() as connection:
        tracked = connection.execute(
            sa.text("SELECT to_regclass('billing.discrepancies') IS NOT NULL")
        ).scalar()
        if tracked:  # reconciliation's table (0003): one open, one explained
            connection.execute(
                sa.text(
                    "INSERT INTO billing.discrepancies (usage_date, kind, org_id, tier, "
                    "delta_seconds, money_moving, explained, detail) VALUES "
                    "(:day, 'provider_under', 'org-b', 'gpu', -600, true, false, 'short'), "
                    "(:day, 'counter_drift', 'org-b', 'small', 120, false, true, 'known')"
                ),
                {"day": YESTERDAY},
            )
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "org", "org-b", "--month", MONTH, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    Draft202012Validator(JSON_SCHEMA).validate(report)
    assert report["schema"] == "tally.org_report/1"
    assert report["org"] == {
        "org_id": "org-b",
        "name": "org-b Inc.",
        "billing_email": "billing@org-b.test",
        "provider": "polar",
    }
    assert report["month"] == MONTH and report["as_of"] == YESTERDAY.isoformat()
    assert report["plan"] == {
        "name": "base-plus-usage",
        "monthly_fee": "20.00",
        "included_hours": 100.0,
        "overage_billable": True,
    }
    usage = report["usage"]
    assert (usage["billable_hours"], usage["included_used_hours"]) == (105.0, 100.0)
    assert (usage["included_left_hours"], usage["overage_hours"]) == (0.0, 5.0)
    assert usage["used_pct"] == 105.0 and usage["overage_seconds"] == 5 * H
    assert [(t["tier"], t["included_hours"], t["overage_hours"]) for t in report["tiers"]] == [
        ("gpu", 20.0, 0.0),
        ("large", 30.0, 0.0),
        ("small", 50.0, 5.0),
    ]
    assert report["charges"] == {
        "currency": "USD",
        "base_fee": "20.00",
        "overage": "0.25",
        "expected": "20.25",
    }
    assert report["free_tier_overage"] is False
    assert [(a["threshold"], a["status"]) for a in report["alerts"]] == [
        (50, "superseded"),
        (90, "sent"),
    ]
    assert report["alerts"][1]["sent_at"] and report["alerts"][1]["used_hours"] == 105.0
    found = report["discrepancies"]
    assert found["tracked"] is tracked and found["open"] == (1 if tracked else 0)
    if tracked:
        (item,) = found["items"]
        assert (item["usage_date"], item["kind"], item["tier"]) == (
            YESTERDAY.isoformat(),
            "provider_under",
            "gpu",
        )
        assert item["detail"]["delta_seconds"] == -600


def test_text_report_for_support(org_b, capsys):
    assert main(["org", "org-b", "--month", MONTH]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("org-b  org-b Inc.  <billing@org-b.test>")
    text = "\n".join(lines)
    assert "included       100.00 h: used 100.00 h, left 0.00 h" in text
    assert "overage        5.00 h" in text
    assert "expected       $20.25  (base $20.00 + overage $0.25)" in text
    assert "90% sent" in text and "50% superseded" in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["org", "nope", "--month", "2025-10"], "no organization 'nope'"),
        (["org", "org-b", "--month", "2026-13"], "not a month"),
        (["org", "org-b", "--month", "2999-01"], "is in the future"),
        (["org"], "ORG_ID"),
    ],
)
def test_mistakes_are_one_line_exit_2(engine, capsys, args, fragment):
    add_org(engine, "org-b", plan="base-plus-usage")
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], captured.err
    assert captured.out == ""
