"""Alerts that reach people: alerts recorded while SMTP was unset are sent once it is
configured (next budget_alerts run, ledger first, exactly once); usage-only orgs get
spend alerts at the dollar thresholds of their plan (pricing configuration);
`tally alerts test --org O` e-mails the billing address. Real PostgreSQL, real
Dagster, aiosmtpd."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from builders import add_billed, add_org, query_rows
from dagster import materialize

from assets.budget_alerts import AlertKind, budget_alerts
from assets.pricing import PricingError, pricing_from_mapping
from assets.quota import quota_usage
from pipelines.cli import main
from resources.db import PostgresResource
from resources.notify import SmtpResource
from resources.settings import RunMode

H = 3600
YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
# Two consecutive days of one month whose alerts are still due: yesterday and the day
# before, or the last two days of the month that ended yesterday.
SECOND = YESTERDAY if YESTERDAY.day > 1 else YESTERDAY - dt.timedelta(days=1)
FIRST = SECOND - dt.timedelta(days=1)


def run(day: dt.date = YESTERDAY):
    return materialize(
        [quota_usage, budget_alerts],
        partition_key=day.isoformat(),
        resources={"postgres": PostgresResource(), "smtp": SmtpResource(), "run_mode": RunMode()},
    )


def ledger(engine) -> list[tuple]:
    return query_rows(
        engine,
        "SELECT org_id, kind, threshold, status, attempts, spend "
        "FROM billing.budget_alert_ledger ORDER BY org_id, kind, threshold",
    )


def test_alerts_recorded_without_smtp_are_sent_once_it_is_configured(
    engine, smtp_server, monkeypatch
):
    add_org(engine, "org-b", plan="base-plus-usage")  # 100 included hours
    add_billed(engine, [("org-b", YESTERDAY, "small", 55 * H)])  # 55 %: the 50 % alert
    monkeypatch.delenv("SMTP_HOST")
    run()
    run()  # still unset: stays recorded, not mailed, no attempt
    assert ledger(engine) == [("org-b", "included_hours", 50, "not_mailed", 0, None)]
    assert smtp_server.messages == []

    monkeypatch.setenv("SMTP_HOST", smtp_server.host)
    result = run()
    metadata = result.asset_materializations_for_node("budget_alerts")[0].metadata
    assert metadata["sent"].value == 1
    assert ledger(engine) == [("org-b", "included_hours", 50, "sent", 1, None)]
    (message,) = smtp_server.messages
    assert message["To"] == "billing@org-b.test" and "50%" in message["Subject"]

    run()  # exactly once
    assert len(smtp_server.messages) == 1
    assert ledger(engine)[0][3:5] == ("sent", 1)


def test_owed_alerts_of_one_month_collapse_to_the_highest_when_sent(
    engine, smtp_server, monkeypatch
):
    add_org(engine, "org-b", plan="base-plus-usage")
    monkeypatch.delenv("SMTP_HOST")
    add_billed(engine, [("org-b", FIRST, "small", 55 * H)])
    run(FIRST)
    add_billed(engine, [("org-b", SECOND, "small", 40 * H)])  # 95 % on the second day
    run(SECOND)
    assert [row[2:4] for row in ledger(engine)] == [(50, "not_mailed"), (90, "not_mailed")]

    monkeypatch.setenv("SMTP_HOST", smtp_server.host)
    run(SECOND)
    assert [row[2:4] for row in ledger(engine)] == [(50, "superseded"), (90, "sent")]
    (message,) = smtp_server.messages
    assert "90%" in message["Subject"]


def test_usage_only_orgs_get_spend_alerts_at_the_plans_dollar_thresholds(engine, smtp_server):
    add_org(engine, "org-u", plan="usage-only")  # defaults: $100, $500, $1000
    add_org(engine, "org-b", plan="base-plus-usage")  # has included hours: no spend alert
    add_billed(
        engine,
        [("org-u", FIRST, "gpu", 44 * H), ("org-b", FIRST, "gpu", 40 * H)],  # $110.00, 40 %
    )
    run(FIRST)
    assert ledger(engine) == [("org-u", "spend", 100, "sent", 1, 110)]
    (message,) = smtp_server.messages
    assert message["To"] == "billing@org-u.test"
    assert message["Subject"] == f"org-u Inc.: $100 spend alert for {FIRST:%B %Y}"
    text = message.get_body(("plain",)).get_content()
    assert "Charges so far: $110.00 for 44.00 billable hours" in text
    assert "$100" in message.get_body(("html",)).get_content()

    add_billed(engine, [("org-u", SECOND, "gpu", 160 * H)])  # $510.00 month to date
    run(SECOND)
    assert [row[2:4] for row in ledger(engine)] == [(100, "sent"), (500, "sent")]
    assert len(smtp_server.messages) == 2 and "$500" in smtp_server.messages[1]["Subject"]
    run(SECOND)
    assert len(smtp_server.messages) == 2


def test_spend_thresholds_come_from_the_pricing_file(engine, smtp_server, monkeypatch, tmp_path):
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text("plans:\n  usage-only:\n    spend_alerts: [5, 20]\n")
    monkeypatch.setenv("TALLY_PRICING_FILE", str(pricing))
    add_org(engine, "org-u", plan="usage-only")
    add_billed(engine, [("org-u", YESTERDAY, "small", 120 * H)])  # $6.00
    run()
    assert [row[1:4] for row in ledger(engine)] == [("spend", 5, "sent")]
    assert "$5 spend alert" in smtp_server.messages[0]["Subject"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("[0, 10]", "whole number of dollars > 0"), ("'lots'", "must be a list of whole dollars")],
)
def test_bad_spend_thresholds_name_the_key(value, fragment):
    import yaml

    with pytest.raises(PricingError, match="plans.usage-only.spend_alerts") as error:
        pricing_from_mapping(yaml.safe_load(f"plans:\n  usage-only:\n    spend_alerts: {value}"))
    assert fragment in str(error.value)


def test_alert_kinds_match_the_ledger_constraint(engine):
    with engine.connect() as connection:
        definition = connection.execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = 'billing.budget_alert_ledger'::regclass "
                "AND conname = 'budget_alert_ledger_kind_check'"
            )
        ).scalar_one()
    for kind in AlertKind:
        assert f"'{kind.value}'" in definition
    assert definition.count("::text") == len(AlertKind)


def test_tally_alerts_test_mails_the_billing_address(engine, smtp_server, capsys):
    add_org(engine, "org-t", plan="usage-only")
    assert main(["alerts", "test", "--org", "org-t"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["test e-mail sent to billing@org-t.test for org-t"]
    (message,) = smtp_server.messages
    assert message["To"] == "billing@org-t.test"
    assert message["Subject"] == "org-t Inc.: test of tally budget alerts"
    assert "test of the budget alerts for org-t" in message.get_body(("plain",)).get_content()


def test_tally_alerts_test_mistakes_are_one_line_exit_2(engine, smtp_server, monkeypatch, capsys):
    assert main(["alerts", "test", "--org", "nobody"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no organization 'nobody'" in err[0]
    add_org(engine, "org-t")
    monkeypatch.delenv("SMTP_HOST")
    assert main(["alerts", "test", "--org", "org-t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SMTP_HOST is not set" in err[0]
    assert smtp_server.messages == []
