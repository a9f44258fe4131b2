"""Providers as they really behave (issue 10, item 3): Stripe processes meter events
and cancels asynchronously (the sandbox's `processing_delay_s`). Usage on its way is
`provider_settling` (WARN, no credit), the read-back polls while it settles, later
runs re-read earlier settling days until they converge, and a real double charge is
still an over-charge at once. Real sandbox over HTTP, PostgreSQL, Dagster runs."""

from __future__ import annotations

import contextlib
import datetime as dt
import io

import pytest
import sqlalchemy as sa
from builders import add_org, discrepancy_rows
from dagster import AssetCheckSeverity, build_schedule_context
from test_reconcile import PIPELINE, RECONCILE, add_at_provider, check_of, metadata_of, run, used

from assets.discrepancy import DiscrepancyKind as Kind
from assets.settlement import Activity, SettlementRules, may_be_settling
from resources.db import PostgresResource

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)
NEXT = DAY + dt.timedelta(days=1)
NOW = dt.datetime.now(dt.UTC)
RULES = SettlementRules(window=dt.timedelta(hours=2))


@pytest.fixture()
def settling(monkeypatch):
    """The production settlement window; no waiting unless a test asks for it."""
    monkeypatch.setenv("TALLY_SETTLE_WINDOW_S", "7200")
    monkeypatch.setenv("TALLY_SETTLE_WAIT_S", "0")


def faults(sandbox, **settings) -> None:
    sandbox.post("/_sandbox/faults", json=settings).raise_for_status()


def advance(sandbox, seconds: int) -> None:
    sandbox.post("/_sandbox/clock", json={"advance_seconds": seconds}).raise_for_status()


def kinds(engine, day=DAY) -> list[tuple[str, str, bool]]:
    return sorted(
        (r["kind"], r["org_id"], r["money_moving"]) for r in discrepancy_rows(engine, day)
    )


def proposals(engine, day=DAY) -> list[tuple]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT org_id, kind, status FROM billing.credit_proposals "
                    "WHERE usage_date = :d ORDER BY proposal_id"
                ),
                {"d": day},
            )
        ]


# --------------------------------------------------------------------------- the rule

ACTIVE = ("stripe", "cus_A")
SENT_NOW = {ACTIVE: Activity(last_sent_at=NOW - dt.timedelta(minutes=5))}
CANCELLED_NOW = {ACTIVE: Activity(NOW - dt.timedelta(hours=5), NOW - dt.timedelta(minutes=5))}
SENT_LONG_AGO = {ACTIVE: Activity(last_sent_at=NOW - dt.timedelta(hours=3))}


@pytest.mark.parametrize(
    ("kind", "target", "activity", "settles"),
    [
        (Kind.PROVIDER_MISSING, ACTIVE, SENT_NOW, True),  # events on their way
        (Kind.PROVIDER_UNDER, ACTIVE, SENT_NOW, True),
        (Kind.PROVIDER_MISSING, ACTIVE, SENT_LONG_AGO, False),  # past the window: lost
        (Kind.PROVIDER_OVER, ACTIVE, SENT_NOW, False),  # a double charge is no lag
        (Kind.PROVIDER_OVER, ACTIVE, CANCELLED_NOW, True),  # a cancel not yet applied
        (Kind.CAP_EXCEEDED, ACTIVE, CANCELLED_NOW, True),
        (Kind.PROVIDER_UNDER, ACTIVE, CANCELLED_NOW, False),  # the send was long ago
        (Kind.TIER_MISMATCH, ACTIVE, SENT_NOW, False),  # totals agree: not lag
        (Kind.PROVIDER_MISSING, ("polar", "ext_A"), {("polar", "ext_A"): Activity(NOW)}, False),
        (Kind.PROVIDER_MISSING, None, SENT_NOW, False),
    ],
)
def test_which_differences_may_be_settling(kind, target, activity, settles):
    assert (may_be_settling(kind, target, activity, NOW, RULES) is not None) is settles


def test_a_window_of_zero_settles_nothing():
    rules = SettlementRules(window=dt.timedelta(0))
    assert may_be_settling(Kind.PROVIDER_MISSING, ACTIVE, SENT_NOW, NOW, rules) is None


# --------------------------------------------------------------------------- end to end


def test_usage_on_its_way_is_settling_then_converges_on_the_next_run(
    engine, providers_env, dagster_home, settling
):
    add_org(engine, "org-s", customer="cus_SETTLE1")
    used(engine, "org-s", "i-s", "small", 1, 60, day=DAY)
    faults(providers_env, processing_delay_s=3600)
    result = run(PIPELINE, day=DAY)
    assert kinds(engine) == [("provider_settling", "org-s", False)]
    [row] = discrepancy_rows(engine, DAY)
    assert row["detail"].startswith("would be provider_missing")
    assert (row["sent_seconds"], row["provider_seconds"]) == (3600, 0)
    assert proposals(engine) == []
    check = check_of(result, "no_unexplained_discrepancies")
    assert not check.passed and check.severity == AssetCheckSeverity.WARN

    # An hour of sandbox time later Stripe has processed it; the next `tally run`
    # (another day) re-reads the settling day, which comes out clean.
    advance(providers_env, 3601)
    from pipelines.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "--start-date", NEXT.isoformat(), "--end-date", NEXT.isoformat()])
    assert code == 0, out.getvalue()
    assert f"[settling] {DAY}  ok" in out.getvalue()
    assert kinds(engine) == []
    assert proposals(engine) == []


def test_a_cancel_not_yet_applied_proposes_no_credit(engine, providers_env, settling):
    add_org(engine, "org-c", customer="cus_SETTLE2")
    used(engine, "org-c", "i-c", "small", 1, 120, day=DAY)
    run(PIPELINE, day=DAY)
    assert kinds(engine) == []
    # The daily limit falls to 1 h: the young event is cancelled and 1 h re-sent, and
    # Stripe has applied neither yet.
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO throttle_settings VALUES ('org-c', 480, 60, 30)"))
    faults(providers_env, processing_delay_s=3600)
    run(PIPELINE, day=DAY)
    # Stripe still holds the cancelled 2 h: over billable and over the daily limit,
    # both the cancel's lag — settling, not money-moving.
    assert kinds(engine) == [("provider_settling", "org-c", False)] * 2
    details = sorted(row["detail"].split(":")[0] for row in discrepancy_rows(engine, DAY))
    assert details == ["would be cap_exceeded", "would be provider_over"]
    assert proposals(engine) == []
    advance(providers_env, 3601)
    run(RECONCILE, day=DAY)
    assert kinds(engine) == []
    assert proposals(engine) == []


def test_the_read_back_waits_while_usage_settles(engine, providers_env, monkeypatch):
    monkeypatch.setenv("TALLY_SETTLE_WINDOW_S", "7200")
    monkeypatch.setenv("TALLY_SETTLE_WAIT_S", "60")
    monkeypatch.setenv("TALLY_SETTLE_POLL_S", "1")
    add_org(engine, "org-w", customer="cus_SETTLE3")
    used(engine, "org-w", "i-w", "small", 1, 60, day=DAY)
    faults(providers_env, processing_delay_s=2)  # two real seconds (the sandbox clock)
    result = run(PIPELINE, day=DAY)
    read = metadata_of(result, "provider_usage")
    assert read["settle_polls"] >= 1 and read["still_settling"] == "none"
    assert kinds(engine) == []


def test_a_double_charge_is_an_over_charge_at_once(engine, providers_env, settling):
    add_org(engine, "org-d", customer="cus_SETTLE4")
    used(engine, "org-d", "i-d", "gpu", 1, 30, day=DAY)
    run(PIPELINE[:2], day=DAY)
    add_at_provider(providers_env, "stripe", "cus_SETTLE4", "gpu", 1800, day=DAY)
    run(RECONCILE, day=DAY)
    assert kinds(engine) == [("provider_over", "org-d", True)]
    assert [row[:2] for row in proposals(engine)] == [("org-d", "provider_over")]


def test_the_schedule_re_reads_earlier_settling_days(engine):
    from pipelines.definitions import defs

    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO billing.discrepancies (usage_date, kind, org_id, delta_seconds, "
                "money_moving, detail) VALUES (:d, 'provider_settling', 'org-x', -60, false, 'x')"
            ),
            {"d": DAY},
        )
    tick = dt.datetime.combine(NEXT + dt.timedelta(days=1), dt.time(2), tzinfo=dt.UTC)
    context = build_schedule_context(
        scheduled_execution_time=tick,
        repository_def=defs.get_repository_def(),
        resources={"postgres": PostgresResource()},
    )
    schedule = defs.get_repository_def().get_schedule_def("daily_billing_schedule")
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [request.partition_key for request in requests] == [NEXT.isoformat(), DAY.isoformat()]
    resettle = requests[1]
    assert {key.to_user_string() for key in resettle.asset_selection} == {
        "provider_usage",
        "reconciliation",
    }
