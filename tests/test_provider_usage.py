"""provider_usage against the sandbox: one Stripe summaries call per (customer, meter);
Polar asked for many customers at once and narrowed down only where totals differ."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from builders import add_org, discrepancy_rows
from dagster import materialize
from test_reconcile import DAY, add_at_provider, metadata_of, resources, run, used

from assets.metering import billed_usage
from assets.provider_usage import provider_usage
from assets.push import usage_push
from assets.reconcile import reconciliation
from resources.providers import narrow_down

QUANTITIES = "GET /v1/meters/{id}/quantities"
SUMMARIES = "GET /v1/billing/meters/{id}/event_summaries"


def endpoint_calls(sandbox, provider: str, endpoint: str) -> int:
    stats = sandbox.get("/_sandbox/stats").json()
    return stats["providers"][provider]["endpoints"].get(endpoint, 0)


def stored_usage(engine) -> dict[str, tuple[int, bool]]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT org_id, tier, seconds, exact FROM billing.provider_usage")
        ).all()
    return {(row.org_id, row.tier): (row.seconds, row.exact) for row in rows}


def test_polar_calls_stay_far_below_one_per_customer(engine, providers_env):
    sandbox = providers_env
    orgs = [f"org-p{number:02d}" for number in range(40)]
    for number, org in enumerate(orgs):
        add_org(engine, org, provider="polar", customer=f"ext_{org}")
        used(engine, org, f"i-{org}", "small", 1, 10 + number % 5, counter=False)
    run([billed_usage, usage_push])
    add_at_provider(sandbox, "polar", "ext_org-p17", "small", 300)  # one double charge
    sandbox.post("/_sandbox/stats/reset").raise_for_status()

    result = run([provider_usage, reconciliation], polar_group_size=8)
    meta = metadata_of(result, "provider_usage")
    # 4 tier meters: 4 whole-day totals; small differs → 5 groups of 8; the group of
    # org-p17 is halved 3 times (only left halves are asked; right = difference).
    assert endpoint_calls(sandbox, "polar", QUANTITIES) == 4 + 5 + 3
    assert meta["polar_one_call_per_customer_would_be"] == 160
    # + meters listed once, 4 tier meters created, subscriptions listed once
    # + the bulk customer list (one page for any number of customers: issue 10)
    assert meta["polar_calls"] == 12 + 1 + 4 + 1 + 1
    stored = stored_usage(engine)
    assert stored[("org-p17", "small")] == (60 * (10 + 17 % 5) + 300, True)
    assert stored[("org-p03", "small")] == (60 * 13, False)  # inferred: its group agreed
    assert len(stored) == 40
    rows = discrepancy_rows(engine, DAY)
    assert [(r["kind"], r["org_id"], r["delta_seconds"]) for r in rows] == [
        ("provider_over", "org-p17", 300)
    ]


def test_stripe_reads_one_summary_per_customer_and_meter(engine, providers_env):
    for number in range(3):
        add_org(engine, f"org-s{number}", customer=f"cus_s{number}")
        used(engine, f"org-s{number}", f"i-s{number}", "small", 1, 30, counter=False)
        used(engine, f"org-s{number}", f"i-g{number}", "gpu", 2, 15, counter=False)
    add_org(engine, "org-idle", customer="cus_idle")  # no usage at all: still read
    run([billed_usage, usage_push])
    add_at_provider(providers_env, "stripe", "cus_idle", "gpu", 600)
    providers_env.post("/_sandbox/stats/reset").raise_for_status()
    result = run([provider_usage, reconciliation], stripe_reads_per_second=50)
    # Meters exist for small and gpu only (Stripe refuses events without a meter).
    assert endpoint_calls(providers_env, "stripe", SUMMARIES) == 4 * 2
    # meters, subscriptions; then the bulk lists of customers and invoices (with the
    # meters and all subscriptions to map invoice lines to tiers): never per customer
    assert metadata_of(result, "provider_usage")["stripe_calls"] == 8 + 1 + 1 + 4
    stored = stored_usage(engine)
    assert stored[("org-s1", "small")] == (1800, True)
    assert stored[("org-s2", "gpu")] == (900, True)
    assert stored[("org-idle", "gpu")] == (600, True)
    (row,) = discrepancy_rows(engine, DAY)
    assert (row["kind"], row["org_id"], row["tier"], row["delta_seconds"]) == (
        "provider_over",
        "org-idle",
        "gpu",
        600,
    )


@pytest.mark.parametrize("group_size", [1, 3, 100])
def test_narrow_down_finds_every_difference(group_size):
    customers = [f"c{number:03d}" for number in range(37)]
    expected = {customer: 100 + number for number, customer in enumerate(customers)}
    actual = dict(expected)
    actual["c005"] += 40
    actual["c030"] = 0
    actual["c031"] -= 7
    orphans = 25  # seconds held for a customer tally does not know
    calls: list[list[str] | None] = []

    def total_of(group):
        calls.append(group)
        if group is None:
            return sum(actual.values()) + orphans
        return sum(actual[customer] for customer in group)

    values, exact, unattributed = narrow_down(customers, expected, total_of, group_size)
    assert values == actual
    assert {"c005", "c030", "c031"} <= exact
    assert unattributed == orphans
    assert len(calls) < len(customers) or group_size == 1


def test_narrow_down_asks_once_when_everything_agrees():
    customers = ["a", "b", "c"]
    expected = {"a": 10, "b": 0, "c": 5}
    calls = []

    def total_of(group):
        calls.append(group)
        return 15

    values, exact, unattributed = narrow_down(customers, expected, total_of, 2)
    assert (values, exact, unattributed, calls) == (expected, set(), 0, [None])


def test_missing_credentials_fail_the_read_once_naming_the_variable(
    engine, providers_env, monkeypatch
):
    add_org(engine, "org-s", customer="cus_s")
    monkeypatch.delenv("STRIPE_API_KEY")
    result = materialize(
        [provider_usage],
        partition_key=DAY.isoformat(),
        resources=resources(),
        raise_on_error=False,
    )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert len(failures) == 1 and not any(e.is_step_up_for_retry for e in result.all_events)
    description = failures[0].step_failure_data.user_failure_data.description
    assert description.startswith("stripe: STRIPE_API_KEY is not set")
