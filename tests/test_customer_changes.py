"""Money safety when customers change or are shared (issue 9, findings 3 and 4).

Read-back attributes a customer's usage to its orgs by the ledger; reconciliation
compares each (provider, customer) with what the ledger sent there and the org's
total across them with billable. Real PostgreSQL, the sandbox over HTTP with the
real SDKs, real Dagster runs."""

from __future__ import annotations

import builders
import sqlalchemy as sa
from builders import add_org, discrepancy_rows, query_rows
from test_push import sandbox_usage
from test_reconcile import DAY, PIPELINE, add_at_provider, run, used

from assets.discrepancy import MONEY_MOVING


def money_moving(engine) -> list[tuple]:
    return [
        (row["kind"], row["org_id"], row["tier"], row["provider"], row["delta_seconds"])
        for row in discrepancy_rows(engine, DAY)
        if row["kind"] in MONEY_MOVING
    ]


def proposals(engine) -> list[tuple]:
    return query_rows(
        engine,
        "SELECT org_id, tier, provider, customer_id, kind, seconds "
        "FROM billing.credit_proposals WHERE status <> 'withdrawn' ORDER BY 1, 2",
    )


def provider_rows(engine) -> list[tuple]:
    return query_rows(
        engine,
        "SELECT org_id, tier, provider, customer_id, seconds "
        "FROM billing.provider_usage ORDER BY 1, 2, 3, 4",
    )


def move(engine, org: str, *, provider: str, customer: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE organizations SET provider = :p, provider_customer_id = :c "
                "WHERE org_id = :o"
            ),
            {"p": provider, "c": customer, "o": org},
        )
    builders.register_customer(provider, customer)  # the provider knows the new customer


# -- attribution, directly ------------------------------------------------------------


def test_a_shared_customer_is_split_by_the_ledger_and_only_the_difference_is_anybodys():
    from assets.provider_usage import ProviderDay, attribute_to_orgs

    day = ProviderDay(
        current={"cus_shared": ["org-a", "org-b"]},
        sent={("cus_shared", "gpu"): {"org-a": 3600, "org-b": 28_800}},
    )
    exact = attribute_to_orgs({("cus_shared", "gpu"): 32_400}, day)
    assert exact == [
        ("org-b", ("cus_shared", "gpu"), 28_800),
        ("org-a", ("cus_shared", "gpu"), 3600),
    ]
    over = attribute_to_orgs({("cus_shared", "gpu"): 36_000}, day)
    assert over == [
        ("org-b", ("cus_shared", "gpu"), 32_400),
        ("org-a", ("cus_shared", "gpu"), 3600),
    ]
    # A shortfall larger than the biggest share is taken from the next org too.
    short = attribute_to_orgs({("cus_shared", "gpu"): 1800}, day)
    assert short == [("org-a", ("cus_shared", "gpu"), 1800)]
    # Usage at a customer nobody was sent to goes to its current org; at a customer
    # nobody is billed to and nothing was sent to, to nobody.
    day.current["cus_solo"] = ["org-c"]
    assert attribute_to_orgs({("cus_solo", "small"): 60, ("cus_else", "small"): 5}, day) == [
        ("org-c", ("cus_solo", "small"), 60)
    ]


# -- end to end ---------------------------------------------------------------------


def test_two_orgs_sharing_a_customer_get_no_false_credit(engine, providers_env):
    """Finding 3: org-a (1 h gpu) and org-b (8 h gpu) billed to one Stripe customer,
    org-c and org-d to one Polar customer: exact push, no discrepancy, no proposal;
    then a planted extra hour at the Stripe customer: one provider_over, one proposal."""
    add_org(engine, "org-a", customer="cus_shared")
    add_org(engine, "org-b", customer="cus_shared")
    add_org(engine, "org-c", provider="polar", customer="ext_shared")
    add_org(engine, "org-d", provider="polar", customer="ext_shared")
    used(engine, "org-a", "i-a", "gpu", 1, 60)
    used(engine, "org-b", "i-b", "gpu", 1, 480)
    used(engine, "org-c", "i-c", "small", 1, 60)
    used(engine, "org-d", "i-d", "small", 1, 120)
    run(PIPELINE)
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_shared", "gpu"): 32_400,
        ("polar", "ext_shared", "small"): 10_800,
    }
    assert provider_rows(engine) == [
        ("org-a", "gpu", "stripe", "cus_shared", 3600),
        ("org-b", "gpu", "stripe", "cus_shared", 28_800),
        ("org-c", "small", "polar", "ext_shared", 3600),
        ("org-d", "small", "polar", "ext_shared", 7200),
    ]
    assert money_moving(engine) == []
    assert proposals(engine) == []

    add_at_provider(providers_env, "stripe", "cus_shared", "gpu", 3600)
    run(PIPELINE)
    assert money_moving(engine) == [("provider_over", "org-b", "gpu", "stripe", 3600)]
    assert proposals(engine) == [("org-b", "gpu", "stripe", "cus_shared", "provider_over", 3600)]


def test_a_renamed_customer_id_is_not_leakage(engine, providers_env):
    """Finding 4: cus_old → cus_new, both pushed exactly: no provider_under."""
    add_org(engine, "org-r", customer="cus_old")
    used(engine, "org-r", "i-r1", "small", 1, 120)
    run(PIPELINE)
    move(engine, "org-r", provider="stripe", customer="cus_new")
    used(engine, "org-r", "i-r2", "small", 5, 60, counter=False)
    run(PIPELINE)
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_old", "small"): 7200,
        ("stripe", "cus_new", "small"): 3600,
    }
    assert money_moving(engine) == []
    assert provider_rows(engine) == [
        ("org-r", "small", "stripe", "cus_new", 3600),
        ("org-r", "small", "stripe", "cus_old", 7200),
    ]


def test_a_move_to_another_provider_is_not_a_missing_usage(engine, providers_env):
    """Finding 4: Stripe cus_x got 7,200 s, the org moved to Polar ext_x and got
    3,600 s more: no provider_missing, the old customer is still read."""
    add_org(engine, "org-x", customer="cus_x")
    used(engine, "org-x", "i-x1", "medium", 1, 120)
    run(PIPELINE)
    move(engine, "org-x", provider="polar", customer="ext_x")
    used(engine, "org-x", "i-x2", "medium", 5, 60, counter=False)
    run(PIPELINE)
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_x", "medium"): 7200,
        ("polar", "ext_x", "medium"): 3600,
    }
    assert money_moving(engine) == []
    # A real double charge at the old customer still shows, at that customer.
    add_at_provider(providers_env, "stripe", "cus_x", "medium", 1800)
    run(PIPELINE)
    assert money_moving(engine) == [("provider_over", "org-x", "medium", "stripe", 1800)]
    assert proposals(engine) == [("org-x", "medium", "stripe", "cus_x", "provider_over", 1800)]
