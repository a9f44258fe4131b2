"""Customers and invoices as the providers hold them (issue 10, item 4): a customer the
provider does not have is `unknown_customer` on each provider; usage pushed after
its period's invoice finalized is `pushed_after_finalization`; a finalized invoice
whose metered seconds differ from what tally billed for its days is
`invoice_mismatch` with the dollars. Real sandbox over HTTP, PostgreSQL, Dagster."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa
from builders import add_org, discrepancy_rows
from test_reconcile import PIPELINE, RECONCILE, add_at_provider, run, used

from assets.discrepancy import MONEY_MOVING

NOW = dt.datetime.now(dt.UTC)
TODAY = NOW.date()
YESTERDAY = TODAY - dt.timedelta(days=1)
LONG_AGO = TODAY - dt.timedelta(days=3)


def list_price(seconds: int, tier: str) -> Decimal:
    from assets.config import pricing_or_fail
    from assets.pricing import to_cents

    return to_cents(pricing_or_fail().amount(seconds, tier))


def rows_of(engine, day, *kinds: str) -> list[dict]:
    return [row for row in discrepancy_rows(engine, day) if row["kind"] in kinds]


def subscribe(sandbox, customer: str, period_start: dt.date) -> None:
    sandbox.post(
        "/_sandbox/subscriptions",
        json={
            "provider": "stripe",
            "customer": customer,
            "plan": "usage-only",
            "period_start": period_start.isoformat(),
            "interval": "day",
        },
    ).raise_for_status()


def grace(sandbox, seconds: int) -> None:
    sandbox.post("/_sandbox/settings", json={"finalization_grace_s": seconds}).raise_for_status()


def test_a_customer_the_provider_does_not_have_on_each_provider(engine, providers_env):
    add_org(engine, "org-s", customer="cus_NOBODY", create_customer=False)
    add_org(engine, "org-p", provider="polar", customer="ext_nobody", create_customer=False)
    add_org(engine, "org-ok", customer="cus_KNOWN1")
    used(engine, "org-s", "i-s", "small", 1, 60, day=YESTERDAY)
    used(engine, "org-p", "i-p", "small", 1, 30, day=YESTERDAY)
    used(engine, "org-ok", "i-ok", "small", 1, 60, day=YESTERDAY)
    run(PIPELINE, day=YESTERDAY)
    found = sorted(
        (row["kind"], row["org_id"], row["provider"], row["customer_id"], row["delta_seconds"])
        for row in discrepancy_rows(engine, YESTERDAY)
    )
    # Stripe never counted its events, Polar counted them for nobody: one row each,
    # standing for the seconds (no provider_missing beside it).
    assert found == [
        ("unknown_customer", "org-p", "polar", "ext_nobody", -1800),
        ("unknown_customer", "org-s", "stripe", "cus_NOBODY", -3600),
    ]
    for row in discrepancy_rows(engine, YESTERDAY):
        assert row["money_moving"] and row["dollar_impact"] < 0
        assert "has no customer" in row["detail"]
    assert "unknown_customer" in {kind.value for kind in MONEY_MOVING}


def test_usage_pushed_after_its_invoice_finalized_is_on_no_invoice(engine, providers_env):
    add_org(engine, "org-f", customer="cus_FINAL1")
    subscribe(providers_env, "cus_FINAL1", LONG_AGO)  # daily periods: that day's is done
    used(engine, "org-f", "i-f", "medium", 2, 60, day=LONG_AGO)
    run(PIPELINE, day=LONG_AGO)  # pushed now: long after LONG_AGO's invoice finalized
    [row] = rows_of(engine, LONG_AGO, "pushed_after_finalization")
    assert (row["org_id"], row["tier"], row["customer_id"]) == ("org-f", "medium", "cus_FINAL1")
    assert row["delta_seconds"] == -3600 and row["money_moving"]
    assert row["dollar_impact"] == -list_price(3600, "medium")
    assert "finalized" in row["detail"] and "on no invoice" in row["detail"]


def test_usage_pushed_before_finalization_is_invoiced_and_the_invoice_is_checked(
    engine, providers_env
):
    add_org(engine, "org-i", customer="cus_INVOICE1")
    # A grace long enough that the invoice of yesterday's period finalizes a minute
    # after the push (as a 6 h grace does for the 02:00 run).
    midnight = dt.datetime.combine(TODAY, dt.time(), tzinfo=dt.UTC)
    grace(providers_env, int((dt.datetime.now(dt.UTC) - midnight).total_seconds()) + 60)
    subscribe(providers_env, "cus_INVOICE1", YESTERDAY)
    used(engine, "org-i", "i-i", "gpu", 1, 60, day=YESTERDAY)
    run(PIPELINE, day=YESTERDAY)
    assert rows_of(engine, YESTERDAY, "pushed_after_finalization") == []
    # A stray half hour reaches the invoice before it finalizes.
    add_at_provider(providers_env, "stripe", "cus_INVOICE1", "gpu", 1800, day=YESTERDAY)
    providers_env.post("/_sandbox/clock", json={"advance_seconds": 120}).raise_for_status()
    run(RECONCILE, day=TODAY)  # the day the invoice was finalized
    [row] = rows_of(engine, TODAY, "invoice_mismatch")
    assert (row["org_id"], row["tier"], row["customer_id"]) == ("org-i", "gpu", "cus_INVOICE1")
    assert (row["billable_seconds"], row["provider_seconds"]) == (3600, 5400)
    assert row["delta_seconds"] == 1800 and row["dollar_impact"] == list_price(1800, "gpu")
    assert not row["money_moving"]  # the day's provider_over moves that money
    # Yesterday re-reconciled: the stray half hour is its over-charge (the money), and
    # what tally pushed is on the invoice (finalized after the push).
    run(RECONCILE, day=YESTERDAY)
    kinds = [row["kind"] for row in discrepancy_rows(engine, YESTERDAY)]
    assert kinds == ["provider_over"]
    with engine.connect() as connection:
        finalized = connection.execute(
            sa.text("SELECT count(DISTINCT invoice_id) FROM billing.provider_invoices")
        ).scalar()
    assert finalized == 1
