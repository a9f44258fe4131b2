"""Reconciliation end to end: real PostgreSQL, the sandbox as a real HTTP server, the
real SDKs, real Dagster runs. Every discrepancy kind is produced by what actually
happens (a push, a cancellation at Stripe, usage added at the provider, a plan
changed, counters off), never by writing discrepancy rows."""

from __future__ import annotations

import calendar
import datetime as dt
from decimal import Decimal

import sqlalchemy as sa
from builders import (
    add_counter,
    add_heartbeats,
    add_instance,
    add_org,
    at,
    discrepancy_rows,
    every_minute,
)
from dagster import AssetCheckSeverity, materialize

from assets.credits import credit_proposals
from assets.discrepancy import KINDS, MONEY_MOVING
from assets.metering import billed_usage
from assets.provider_usage import provider_usage
from assets.push import usage_push
from assets.reconcile import reconciliation
from resources.db import PostgresResource
from resources.providers import ProvidersResource
from resources.settings import RunMode

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
RECONCILE = [provider_usage, reconciliation, credit_proposals]
PIPELINE = [billed_usage, usage_push, *RECONCILE]


def resources(report_only: bool = False, **provider_settings):
    return {
        "postgres": PostgresResource(),
        "run_mode": RunMode(report_only=report_only),
        "providers": ProvidersResource(**provider_settings),
    }


def run(assets, day=DAY, report_only=False, **provider_settings):
    return materialize(
        assets,
        partition_key=day.isoformat(),
        resources=resources(report_only, **provider_settings),
    )


def metadata_of(result, node: str) -> dict:
    return {
        key: value.value
        for key, value in result.asset_materializations_for_node(node)[0].metadata.items()
    }


def check_of(result, name: str):
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def used(engine, org, instance, tier, start_hour, minutes, *, day=DAY, counter=True, **extra):
    """An instance that ran `minutes` from `start_hour` and stopped properly after."""
    stopped = at(day, start_hour, minutes + 10)
    add_instance(engine, instance, org, tier, status="stopped", stopped_at=stopped, **extra)
    add_heartbeats(engine, every_minute(instance, at(day, start_hour), minutes))
    if counter:
        add_counter(engine, org, day, tier, minutes * 60)


def cancel_at_stripe(stripe_client, org: str, tier: str, day=DAY) -> None:
    """Someone cancels tally's meter event in the Stripe dashboard."""
    stripe_client.v1.billing.meter_event_adjustments.create(
        {
            "event_name": f"tally_instance_seconds_{tier}",
            "type": "cancel",
            "cancel": {"identifier": f"tally:{org}:{day.isoformat()}:{tier}:1"},
        }
    )


def add_at_provider(sandbox, provider: str, customer: str, tier: str, seconds: int, day=DAY):
    sandbox.post(
        "/_sandbox/events",
        json=[
            {
                "provider": provider,
                "customer": customer,
                "tier": tier,
                "seconds": seconds,
                "date": day.isoformat(),
            }
        ],
    ).raise_for_status()


def kinds_found(rows) -> set[tuple]:
    return {(row["kind"], row["org_id"], row["tier"], row["instance_id"]) for row in rows}


def by_kind(rows, kind: str, org: str) -> dict:
    (row,) = [r for r in rows if r["kind"] == kind and r["org_id"] == org]
    return row


def test_every_kind_is_found_with_its_seconds_dollars_and_credit(
    engine, providers_env, stripe_client
):
    sandbox = providers_env
    for org in (
        "org-clean",
        "org-missing",
        "org-under",
        "org-tier",
        "org-drift",
        "org-nocounter",
        "org-plan",
        "org-stuck",
        "org-zombie",
    ):
        add_org(engine, org)
    add_org(engine, "org-over", customer="cus_over")
    add_org(engine, "org-pover", provider="polar", customer="ext_pover")
    add_org(engine, "org-cap", throttle=(480, 60, 30))  # 1 h a day
    add_org(engine, "org-nocust", customer="")
    used(engine, "org-clean", "i-clean", "small", 1, 60)
    used(engine, "org-over", "i-over", "gpu", 2, 30)
    used(engine, "org-pover", "i-pover", "large", 3, 90)
    used(engine, "org-missing", "i-missing", "medium", 1, 60)
    used(engine, "org-under", "i-under", "small", 1, 60)
    used(engine, "org-tier", "i-tier", "small", 1, 60)
    used(engine, "org-drift", "i-drift", "small", 1, 60, counter=False)
    add_counter(engine, "org-drift", DAY, "small", 3960)  # the control plane counts 10 % more
    used(engine, "org-nocounter", "i-nocounter", "small", 1, 60, counter=False)
    used(engine, "org-cap", "i-cap1", "small", 1, 60, counter=False)
    used(engine, "org-cap", "i-cap2", "small", 1, 60, counter=False)
    add_counter(engine, "org-cap", DAY, "small", 7200)
    used(engine, "org-plan", "i-plan", "small", 1, 60)
    add_instance(
        engine, "i-stuck", "org-stuck", "small", status="running", last_heartbeat=at(DAY, 5)
    )
    add_heartbeats(engine, every_minute("i-stuck", at(DAY, 4), 60))
    add_counter(engine, "org-stuck", DAY, "small", 3600)
    add_instance(engine, "i-zombie", "org-zombie", "small", status="stopped", stopped_at=at(DAY, 3))
    add_heartbeats(engine, every_minute("i-zombie", at(DAY, 2), 120))  # 60 after the stop
    add_counter(engine, "org-zombie", DAY, "small", 3600)
    used(engine, "org-nocust", "i-nocust", "small", 1, 60)

    run([billed_usage, usage_push])
    # What goes wrong at the providers after the push:
    add_at_provider(sandbox, "stripe", "cus_over", "gpu", 1800)  # double charge
    add_at_provider(sandbox, "polar", "ext_pover", "large", 600)
    cancel_at_stripe(stripe_client, "org-missing", "medium")  # usage lost
    cancel_at_stripe(stripe_client, "org-under", "small")
    add_at_provider(sandbox, "stripe", "cus_org-under", "small", 1800)  # half of it
    cancel_at_stripe(stripe_client, "org-tier", "small")
    add_at_provider(sandbox, "stripe", "cus_org-tier", "medium", 3600)  # the wrong meter
    add_at_provider(sandbox, "stripe", "cus_org-cap", "small", 1800)  # over the daily cap
    sandbox.post(
        "/_sandbox/plans",
        json={"provider": "stripe", "customer": "cus_org-plan", "plan": "base-plus-usage"},
    ).raise_for_status()

    result = run(RECONCILE)
    rows = discrepancy_rows(engine, DAY)
    assert kinds_found(rows) == {
        ("provider_over", "org-over", "gpu", None),
        ("provider_over", "org-pover", "large", None),
        ("provider_over", "org-cap", "small", None),
        ("cap_exceeded", "org-cap", None, None),
        ("provider_missing", "org-missing", "medium", None),
        ("provider_under", "org-under", "small", None),
        ("tier_mismatch", "org-tier", "small", None),
        ("tier_mismatch", "org-tier", "medium", None),
        ("counter_drift", "org-drift", "small", None),
        ("missing_counter", "org-nocounter", "small", None),
        ("plan_mismatch", "org-plan", None, None),
        ("stuck_instance", "org-stuck", "small", "i-stuck"),
        ("zombie_instance", "org-zombie", "small", "i-zombie"),
        ("unpushed", "org-nocust", "small", None),
    }
    # The kinds decide, except that org-cap's excess over its cap is the provider_over
    # seconds counted already (counted once, issue 12).
    assert all(
        row["money_moving"] == (row["kind"] in MONEY_MOVING and row["kind"] != "cap_exceeded")
        for row in rows
    )
    assert "counted as provider_over (1800 s)" in by_kind(rows, "cap_exceeded", "org-cap")["detail"]
    assert not any(row["explained"] for row in rows)

    over = by_kind(rows, "provider_over", "org-over")
    assert (over["billable_seconds"], over["sent_seconds"], over["provider_seconds"]) == (
        1800,
        1800,
        3600,
    )
    assert over["delta_seconds"] == 1800 and over["dollar_impact"] == Decimal("1.25")
    polar_over = by_kind(rows, "provider_over", "org-pover")
    assert polar_over["provider"] == "polar" and polar_over["delta_seconds"] == 600
    assert polar_over["dollar_impact"] == Decimal("0.03")  # 600 s × $0.20/h = 0.0333…
    missing = by_kind(rows, "provider_missing", "org-missing")
    assert missing["delta_seconds"] == -3600 and missing["dollar_impact"] == Decimal("-0.10")
    under = by_kind(rows, "provider_under", "org-under")
    assert (under["provider_seconds"], under["delta_seconds"]) == (1800, -1800)
    tiers = {r["tier"]: r["delta_seconds"] for r in rows if r["kind"] == "tier_mismatch"}
    assert tiers == {"small": -3600, "medium": 3600}
    drift = by_kind(rows, "counter_drift", "org-drift")
    assert (drift["counter_seconds"], drift["delta_seconds"]) == (3960, 360)
    assert by_kind(rows, "missing_counter", "org-nocounter")["delta_seconds"] == -3600
    cap = by_kind(rows, "cap_exceeded", "org-cap")
    assert (cap["provider_seconds"], cap["delta_seconds"]) == (5400, 1800)
    plan = by_kind(rows, "plan_mismatch", "org-plan")
    days = calendar.monthrange(DAY.year, DAY.month)[1]
    assert plan["dollar_impact"] == (Decimal(20) / days).quantize(Decimal("0.01"))
    assert "base-plus-usage" in plan["detail"] and "usage-only" in plan["detail"]
    stuck = by_kind(rows, "stuck_instance", "org-stuck")
    assert stuck["delta_seconds"] == -19 * 3600  # silent from 05:00 to midnight
    assert stuck["dollar_impact"] == Decimal("-0.95")
    zombie = by_kind(rows, "zombie_instance", "org-zombie")
    assert zombie["delta_seconds"] == -3600 and "60 heartbeats after stopped_at" in zombie["detail"]
    unpushed = by_kind(rows, "unpushed", "org-nocust")
    assert unpushed["delta_seconds"] == -3600 and "provider_customer_id" in unpushed["detail"]

    check = check_of(result, "no_unexplained_discrepancies")
    assert not check.passed and check.severity == AssetCheckSeverity.ERROR
    assert check_of(result, "usage_counters_fresh").passed
    meta = metadata_of(result, "reconciliation")
    counted = {kind: meta[f"count_{kind}"] for kind in KINDS}
    assert counted == {kind: sum(row["kind"] == kind for row in rows) for kind in KINDS}
    assert meta["count_push_window_expired"] == 0 and meta["discrepancies"] == len(rows)
    assert "| provider_over | org-over | gpu |" in meta["largest_discrepancies"]
    assert "$1.25 | $1.25 | no |" in meta["largest_discrepancies"]  # impact, proposed credit
    assert meta["billed_vs_recorded_chart"].startswith("![billed vs recorded per tier](data:")

    with engine.connect() as connection:
        proposals = connection.execute(
            sa.text(
                "SELECT org_id, tier, kind, seconds, amount, escalation, customer_id, status "
                "FROM billing.credit_proposals ORDER BY org_id, kind"
            )
        ).all()
    assert [tuple(p) for p in proposals] == [
        (
            "org-cap",
            "small",
            "provider_over",
            1800,
            Decimal("0.03"),
            "support_agent",
            "cus_org-cap",
            "proposed",
        ),
        (
            "org-over",
            "gpu",
            "provider_over",
            1800,
            Decimal("1.25"),
            "support_agent",
            "cus_over",
            "proposed",
        ),
        (
            "org-pover",
            "large",
            "provider_over",
            600,
            Decimal("0.03"),
            "support_agent",
            "ext_pover",
            "proposed",
        ),
        (
            "org-tier",
            "medium",
            "tier_mismatch",
            3600,
            Decimal("0.05"),
            "support_agent",
            "cus_org-tier",
            "proposed",
        ),
    ]

    # Reconciling the day again replaces its rows: same result, nothing doubled.
    run([reconciliation, credit_proposals])
    assert kinds_found(discrepancy_rows(engine, DAY)) == kinds_found(rows)
    assert len(discrepancy_rows(engine, DAY)) == len(rows)


def clean_world(engine, day=DAY):
    add_org(engine, "org-s", customer="cus_S1", plan="base-plus-usage")
    add_org(engine, "org-p", provider="polar", customer="ext_P1")
    used(engine, "org-s", "i-s1", "small", 1, 60, day=day)
    used(engine, "org-s", "i-s2", "gpu", 2, 45, day=day)
    used(engine, "org-p", "i-p1", "large", 3, 90, day=day)


def test_clean_day_has_no_discrepancy_at_all(engine, providers_env):
    clean_world(engine)
    providers_env.post(
        "/_sandbox/plans",
        json=[
            {"provider": "stripe", "customer": "cus_S1", "plan": "base-plus-usage"},
            {"provider": "polar", "customer": "ext_P1", "plan": "usage-only"},
        ],
    ).raise_for_status()
    result = run(PIPELINE)
    assert discrepancy_rows(engine, DAY) == []
    assert check_of(result, "no_unexplained_discrepancies").passed
    assert check_of(result, "usage_counters_fresh").passed
    meta = metadata_of(result, "reconciliation")
    assert meta["billed_hours"] == meta["recorded_hours"] == meta["sent_hours"] == 3.25
    assert meta["billed_dollars"] == meta["recorded_dollars"] == 2.23  # 0.05+1.875+0.30
    assert all(meta[f"count_{kind}"] == 0 for kind in KINDS)
    assert meta["largest_discrepancies"] == "_no discrepancies on this day_"
    usage = metadata_of(result, "provider_usage")
    assert usage["customers"] == 2
    # Stripe: one summary per (customer, meter) + meters + subscriptions; Polar: the
    # whole day per tier meter agrees with the ledger, so one total per meter.
    assert usage["stripe_calls"] == 2 + 1 + 1 + 4  # + customers, meters, subs, invoices
    stats = providers_env.get("/_sandbox/stats").json()["providers"]["polar"]["endpoints"]
    assert stats["GET /v1/meters/{id}/quantities"] == 4
    with engine.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT org_id, tier, seconds FROM billing.provider_usage ORDER BY 1, 2")
        ).all()
    assert [tuple(r) for r in stored] == [
        ("org-p", "large", 5400),
        ("org-s", "gpu", 2700),
        ("org-s", "small", 3600),
    ]


def test_report_only_reports_everything_unpushed_and_explained(engine, providers_env):
    clean_world(engine)
    providers_env.post("/_sandbox/stats/reset").raise_for_status()
    result = run(PIPELINE, report_only=True)
    rows = discrepancy_rows(engine, DAY)
    assert {(r["kind"], r["org_id"], r["tier"]) for r in rows} == {
        ("unpushed", "org-s", "small"),
        ("unpushed", "org-s", "gpu"),
        ("unpushed", "org-p", "large"),
    }
    assert all(r["explained"] and "report-only" in r["detail"] for r in rows)
    gpu = by_kind([r for r in rows if r["tier"] == "gpu"], "unpushed", "org-s")
    assert gpu["delta_seconds"] == -2700 and gpu["dollar_impact"] == Decimal("-1.88")
    assert check_of(result, "no_unexplained_discrepancies").passed
    # Report-only: nothing leaves the machine, not even a read.
    with engine.connect() as connection:
        reads = dict(
            connection.execute(sa.text("SELECT provider, status FROM billing.provider_reads")).all()
        )
    assert reads == {"stripe": "skipped", "polar": "skipped"}
    assert providers_env.get(f"/_sandbox/usage?date={DAY.isoformat()}").json() == []
    assert providers_env.get("/_sandbox/stats").json()["requests_total"] == 0


def test_report_only_without_credentials_skips_the_reads(engine, providers_env, monkeypatch):
    clean_world(engine)
    monkeypatch.delenv("STRIPE_API_KEY")
    monkeypatch.delenv("POLAR_ACCESS_TOKEN")
    result = run(PIPELINE, report_only=True)
    assert metadata_of(result, "provider_usage")["stripe_status"] == "skipped"
    rows = discrepancy_rows(engine, DAY)
    assert {r["kind"] for r in rows} == {"unpushed"} and len(rows) == 3


def test_push_window_expired_for_a_stripe_day_older_than_35_days(engine, providers_env):
    old = DAY - dt.timedelta(days=40)
    add_org(engine, "org-old", customer="cus_old")
    used(engine, "org-old", "i-old", "medium", 6, 120, day=old)
    result = run(PIPELINE, day=old)
    (row,) = discrepancy_rows(engine, old)
    assert (row["kind"], row["org_id"], row["tier"]) == ("push_window_expired", "org-old", "medium")
    assert row["delta_seconds"] == -7200 and row["dollar_impact"] == Decimal("-0.20")
    assert "older than 35 days" in row["detail"] and row["money_moving"]
    assert check_of(result, "no_unexplained_discrepancies").severity == AssetCheckSeverity.ERROR


def test_explanations_and_applied_credits_clear_the_check(engine, providers_env):
    add_org(engine, "org-old", customer="cus_old")
    old = DAY - dt.timedelta(days=40)
    used(engine, "org-old", "i-old", "small", 6, 60, day=old)
    run(PIPELINE, day=old)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO billing.discrepancy_explanations (usage_date, kind, org_id, tier, "
                "explanation, explained_by) VALUES (:d, 'push_window_expired', 'org-old', "
                "'small', 'invoiced by hand, INV-42', 'finance@example.com')"
            ),
            {"d": old},
        )
    result = run([reconciliation], day=old)
    (row,) = discrepancy_rows(engine, old)
    assert row["explained"] and "INV-42" in row["detail"]
    assert check_of(result, "no_unexplained_discrepancies").passed


def test_stale_or_missing_counters_warn(engine, providers_env):
    add_org(engine, "org-a", customer="cus_a")
    used(engine, "org-a", "i-a", "small", 1, 60, counter=False)
    add_counter(
        engine,
        "org-a",
        DAY - dt.timedelta(days=9),
        "small",
        60,
        updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
    )
    result = run(PIPELINE)
    check = check_of(result, "usage_counters_fresh")
    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    problem = check.metadata["problem"].value
    assert "no usage counter for this day" in problem and "h old" in problem
    # No counter at all for the day: one warning, not a missing_counter row per org.
    assert discrepancy_rows(engine, DAY) == []
