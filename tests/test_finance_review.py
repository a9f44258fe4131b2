"""The finance review asset (issue 12) over real data: real PostgreSQL, the sandbox as
a real HTTP server, a real `daily_billing` run, the run-status sensor evaluated on the
real instance's event log, and the review materialized by the job it requests."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from builders import add_heartbeats, add_instance, add_org, at, every_minute
from dagster import AssetKey, DagsterInstance, build_sensor_context
from test_reconcile import DAY, add_at_provider

from assets.finance_review import (
    DISCREPANCY_TABLE,
    KIND_TABLE,
    PROPOSAL_TABLE,
    TOTALS_TABLE,
    usd,
)
from assets.pricing import Pricing, to_cents
from pipelines.definitions import defs
from pipelines.freshness import read_freshness
from pipelines.review_refresh import finance_review_after_runs

PRICING = Pricing()


def world(engine) -> None:
    """org-cap at its 1 h daily cap, 2 h recorded twice at Stripe (the demo's double
    charge); org-base on base-plus-usage; org-free on free tier without customer id."""
    add_org(engine, "org-cap", customer="cus_cap", throttle=(480, 60, 30))
    add_org(engine, "org-base", plan="base-plus-usage", customer="cus_base")
    add_org(engine, "org-free", plan="free-tier", customer="")
    for instance, org, tier, hour, minutes in (
        ("i-cap1", "org-cap", "small", 1, 60),
        ("i-cap2", "org-cap", "small", 3, 60),
        ("i-base", "org-base", "gpu", 2, 45),
        ("i-free", "org-free", "small", 1, 60),
    ):
        add_instance(
            engine, instance, org, tier, status="stopped", stopped_at=at(DAY, hour, minutes + 10)
        )
        add_heartbeats(engine, every_minute(instance, at(DAY, hour), minutes))


def run_job(instance, name: str, **kwargs):
    result = defs.resolve_job_def(name).execute_in_process(instance=instance, **kwargs)
    assert result.success
    return result


def tick(instance, cursor: str | None):
    """One real evaluation of the sensor on the instance's event log."""
    context = build_sensor_context(
        instance=instance, cursor=cursor, repository_def=defs.get_repository_def()
    )
    result = finance_review_after_runs.evaluate_tick(context)
    return result.run_requests or [], result.cursor


def review_of(instance) -> dict:
    run_job(instance, "refresh_finance_review")
    (event,) = instance.fetch_materializations(
        AssetKey("finance_review"), limit=1, ascending=False
    ).records
    return event.asset_materialization.metadata


def rows(table) -> list[dict]:
    return [record.data for record in table.value.records]


def columns(table) -> list[tuple[str, str]]:
    return [(column.name, column.type) for column in table.value.schema.columns]


def test_review_after_a_daily_run_counts_the_double_charge_once(
    engine, providers_env, dagster_home
):
    world(engine)
    # The provider records 2 h more than tally sent (as `tally demo` simulates).
    add_at_provider(providers_env, "stripe", "cus_cap", "small", 7200)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert tick(instance, None)[0] == []  # the sensor starts from now
        _, cursor = tick(instance, None)
        daily = run_job(instance, "daily_billing", partition_key=DAY.isoformat())
        requests, cursor = tick(instance, cursor)
        assert [r.tags["tally/after_run"] for r in requests] == [daily.run_id]
        assert finance_review_after_runs.job_name == "refresh_finance_review"
        meta = review_of(instance)
        # The review's own run requests nothing more (no loop).
        assert tick(instance, cursor)[0] == []
        freshness, _ = read_freshness(engine, dt.datetime.now(dt.UTC))

    # Typed, sortable columns, money as text with a number twin.
    for key, spec in (
        ("totals", TOTALS_TABLE),
        ("open_credit_proposals", PROPOSAL_TABLE),
        ("unexplained_money_moving", DISCREPANCY_TABLE),
        ("discrepancies_by_kind", KIND_TABLE),
    ):
        assert columns(meta[key]) == [(name, kind) for name, kind, _ in spec], key
    assert ("amount", "string") in columns(meta["open_credit_proposals"])
    assert ("amount_usd", "float") in columns(meta["open_credit_proposals"])

    over_charge = to_cents(PRICING.amount(7200, "small"))  # 2 h at the small rate, once
    yesterday, month = rows(meta["totals"])
    assert (yesterday["period"], month["period"]) == ("yesterday", "month_to_date")
    assert yesterday["over_charge"] == usd(over_charge) == "$0.10"
    assert yesterday["over_charge_usd"] == float(over_charge)
    assert yesterday["revenue_leakage_usd"] == 0.0  # the free-tier usage is never charged
    list_price = to_cents(
        PRICING.amount(3600, "small") + PRICING.amount(2700, "gpu") + PRICING.amount(3600, "small")
    )
    assert yesterday["usage_at_list"] == usd(list_price) == "$1.98"
    assert yesterday["billable_hours"] == 2.8  # 1 h capped + 0.75 h + 1 h, one decimal
    # Plan fee of base-plus-usage; org-cap's usage-only hour is overage; org-base and
    # org-free stay inside their included hours.
    expected = PRICING.plans["base-plus-usage"].monthly_fee + PRICING.amount(3600, "small")
    assert yesterday["expected_invoice"] == month["expected_invoice"] == usd(to_cents(expected))
    # Informational, as potential dollars: cap_exceeded (the same seconds as the
    # provider_over) and the free-tier org's unpushed hour.
    by_kind = {(row["period"], row["kind"]): row for row in rows(meta["discrepancies_by_kind"])}
    assert by_kind[("yesterday", "provider_over")]["effect"] == "over_charge"
    assert by_kind[("yesterday", "cap_exceeded")]["effect"] == "informational"
    assert by_kind[("yesterday", "unpushed")]["effect"] == "informational"
    informational = [
        row
        for (period, _), row in by_kind.items()
        if period == "yesterday"
        if row["effect"] == "informational"
    ]
    assert yesterday["informational_findings"] == sum(row["unexplained"] for row in informational)
    assert yesterday["informational_potential_usd"] == float(
        sum(Decimal(str(row["dollars_usd"])) for row in informational)
    )

    (proposal,) = rows(meta["open_credit_proposals"])
    assert (proposal["org_id"], proposal["org_name"], proposal["kind"]) == (
        "org-cap",
        "org-cap Inc.",
        "provider_over",
    )
    assert (proposal["amount"], proposal["hours"], proposal["escalation"]) == (
        "$0.10",
        2.0,
        "support_agent",
    )
    assert proposal["usage_date"] == DAY.isoformat() and proposal["age_days"] == 0
    (unexplained,) = rows(meta["unexplained_money_moving"])
    assert (unexplained["kind"], unexplained["org_name"], unexplained["dollar_impact"]) == (
        "provider_over",
        "org-cap Inc.",
        "$0.10",
    )
    assert unexplained["age_days"] == (dt.datetime.now(dt.UTC).date() - DAY).days

    # The headline: plain numbers a reader sees first.
    assert meta["at_risk_usd"].value == float(over_charge)
    assert meta["at_risk_over_charge_usd"].value == float(over_charge)
    assert meta["at_risk_leakage_usd"].value == 0.0
    assert meta["credits_to_approve"].value == 1
    assert meta["credits_to_approve_usd"].value == float(over_charge)
    assert meta["billed_yesterday_usd"].value == float(to_cents(expected))
    assert meta["stale"].value is freshness.stale
    assert meta["freshness"].value.startswith("STALE" if freshness.stale else "fresh")


def test_a_credit_run_refreshes_the_review_and_empties_what_to_approve(
    engine, providers_env, dagster_home
):
    world(engine)
    add_at_provider(providers_env, "stripe", "cus_cap", "small", 7200)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        run_job(instance, "daily_billing", partition_key=DAY.isoformat())
        before = review_of(instance)
        (proposal,) = rows(before["open_credit_proposals"])
        _, cursor = tick(instance, None)
        credits = run_job(
            instance,
            "issue_credits",
            run_config={
                "ops": {
                    "apply_credits": {
                        "config": {
                            "proposal_ids": [proposal["proposal_id"]],
                            "approver": "support-agent@example.test",
                            "ticket": "SUP-1",
                        }
                    }
                }
            },
        )
        requests, _ = tick(instance, cursor)
        assert [r.tags["tally/after_job"] for r in requests] == ["issue_credits"]
        assert requests[0].tags["tally/after_run"] == credits.run_id
        after = review_of(instance)
    assert rows(after["open_credit_proposals"]) == []
    assert after["credits_to_approve"].value == 0
    assert after["credits_to_approve_usd"].value == 0.0


def test_tally_review_prints_the_assets_numbers(engine, providers_env, dagster_home, capsys):
    import json
    import re

    from pipelines.cli import main

    world(engine)
    add_at_provider(providers_env, "stripe", "cus_cap", "small", 7200)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        run_job(instance, "daily_billing", partition_key=DAY.isoformat())
        meta = review_of(instance)
    assert main(["review", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "tally.finance_review/1"
    headline = document["headline"]
    assert headline["at_risk"] == f"{meta['at_risk_usd'].value:.2f}" == "0.10"
    assert headline["billed_yesterday"] == f"{meta['billed_yesterday_usd'].value:.2f}"
    assert headline["credits_to_approve_count"] == meta["credits_to_approve"].value == 1
    money = re.compile(r"^-?\d+\.\d{2}$")
    for period, row in zip(document["totals"], rows(meta["totals"]), strict=True):
        assert period["period"] == row["period"]
        for name in ("usage_at_list", "expected_invoice", "over_charge"):
            assert money.match(period[name]) and float(period[name]) == row[f"{name}_usd"]
    assert [p["proposal_id"] for p in document["open_credit_proposals"]] == [
        row["proposal_id"] for row in rows(meta["open_credit_proposals"])
    ]
    assert main(["review"]) == 0
    text = capsys.readouterr().out
    assert "at risk              $0.10: leakage $0.00, over-charge $0.10" in text
    assert "org-cap (org-cap Inc.)" in text
