"""Exactly once when the world changes between runs (issue 9, findings 1 and 2):
a re-sent event's acceptance time, a cancel the provider refuses, an org that moves
provider. Time passes through the sandbox clock and the ledger's own times; runs
are real Dagster executions against the sandbox over HTTP."""

from __future__ import annotations

import builders
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute, query_rows
from test_customer_changes import money_moving
from test_push import DAY, run_day, sandbox_usage
from test_push_faults import ledger
from test_reconcile import RECONCILE, run


def advance(sandbox, hours: float) -> None:
    sandbox.post("/_sandbox/clock", json={"advance_seconds": int(hours * 3600)}).raise_for_status()


def shift_ledger(engine, hours: float) -> None:
    """The ledger's own times move back, as if `hours` had passed since."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE billing.usage_push_ledger SET "
                "created_at = created_at - make_interval(secs => :s), "
                "sent_at = sent_at - make_interval(secs => :s)"
            ),
            {"s": hours * 3600},
        )


def daily_limit(engine, org: str, minutes: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO throttle_settings VALUES (:o, 480, :m, 30)"),
            {"o": org, "m": minutes},
        )


def reconciled(engine) -> list[tuple]:
    """Read back and reconcile the day; its money-moving discrepancies."""
    run(RECONCILE)
    return money_moving(engine)


def proposals(engine) -> list[tuple]:
    return query_rows(
        engine,
        "SELECT org_id, provider, customer_id, kind, seconds "
        "FROM billing.credit_proposals ORDER BY 1",
    )


def test_a_resent_duplicate_keeps_its_first_acceptance_and_is_never_replaced(engine, providers_env):
    """Finding 1. A crash left a delivered Stripe event pending; a re-run 20 h later
    re-sends it (duplicate). Five hours later billable falls: the event is 25 h old
    at Stripe, so no cancel, no new event — a credit proposal."""
    add_org(engine, "org-s", customer="cus_DUP1")
    add_instance(engine, "i-s", "org-s", "small")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 8), 60))
    run_day()
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE billing.usage_push_ledger SET status = 'pending', sent_at = NULL")
        )
    shift_ledger(engine, 20)
    advance(providers_env, 20)
    result = run_day()
    assert result.asset_materializations_for_node("usage_push")[0].metadata["resent"].value == 1
    shift_ledger(engine, 5)
    advance(providers_env, 5)
    daily_limit(engine, "org-s", 30)
    run_day()
    assert sandbox_usage(providers_env) == {("stripe", "cus_DUP1", "small"): 3600}
    assert [(row[2], row[3], row[4]) for row in ledger(engine)] == [(1, 3600, "sent")]
    assert proposals(engine) == [("org-s", "stripe", "cus_DUP1", "push_over_sent", 1800)]
    # Reconciliation sees the over-charge the proposal hands back, and proposes no
    # second credit for the same seconds.
    assert reconciled(engine) == [
        ("cap_exceeded", "org-s", None, "stripe", 1800),
        ("provider_over", "org-s", "small", "stripe", 1800),
    ]
    assert proposals(engine) == [("org-s", "stripe", "cus_DUP1", "push_over_sent", 1800)]


def test_a_refused_cancel_is_never_replaced_and_becomes_a_credit(engine, providers_env):
    """The ledger thinks the event is young, Stripe says it is too late: the row is
    cancel_refused (never marked sent), nothing replaces it, a credit is proposed."""
    add_org(engine, "org-s", customer="cus_REF1")
    add_instance(engine, "i-s", "org-s", "small")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 8), 60))
    run_day()
    advance(providers_env, 25)  # Stripe's clock: 25 h since it accepted the event
    daily_limit(engine, "org-s", 30)
    result = run_day()
    assert sandbox_usage(providers_env) == {("stripe", "cus_REF1", "small"): 3600}
    rows = ledger(engine)
    assert [(row[2], row[3], row[4]) for row in rows] == [(1, 3600, "cancel_refused")]
    assert proposals(engine) == [("org-s", "stripe", "cus_REF1", "push_over_sent", 1800)]
    metadata = result.asset_materializations_for_node("usage_push")[0].metadata
    assert metadata["cancels_refused"].value == 1 and metadata["sent"].value == 0
    # A later run does not try again, and sends nothing.
    run_day()
    assert sandbox_usage(providers_env) == {("stripe", "cus_REF1", "small"): 3600}
    assert [(row[2], row[3], row[4]) for row in ledger(engine)] == [(1, 3600, "cancel_refused")]
    assert reconciled(engine) == [
        ("cap_exceeded", "org-s", None, "stripe", 1800),
        ("provider_over", "org-s", "small", "stripe", 1800),
    ]
    assert proposals(engine) == [("org-s", "stripe", "cus_REF1", "push_over_sent", 1800)]


def _moved_org(engine, providers_env):
    add_org(engine, "org-x", customer="cus_x")
    add_instance(engine, "i-x1", "org-x", "small")
    add_heartbeats(engine, every_minute("i-x1", at(DAY, 1), 120))
    run_day()
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE organizations SET provider = 'polar', provider_customer_id = 'ext_x' "
                "WHERE org_id = 'org-x'"
            )
        )
    builders.register_customer("polar", "ext_x")  # the provider knows the new customer
    add_instance(engine, "i-x2", "org-x", "small")
    add_heartbeats(engine, every_minute("i-x2", at(DAY, 5), 60))
    run_day()
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_x", "small"): 7200,
        ("polar", "ext_x", "small"): 3600,
    }


def test_a_move_then_a_correction_cancels_at_the_old_provider_and_sends_to_the_new(
    engine, providers_env
):
    """Finding 2: billable falls to 9,000 s; the young Stripe event is cancelled at
    Stripe and the remainder sent to Polar under the Polar id — never to Stripe
    under ext_x."""
    _moved_org(engine, providers_env)
    daily_limit(engine, "org-x", 150)
    run_day()
    assert sandbox_usage(providers_env) == {("polar", "ext_x", "small"): 9000}
    assert [(row[2], row[3], row[4]) for row in ledger(engine)] == [
        (1, 7200, "cancelled"),
        (2, 3600, "sent"),
        (3, 5400, "sent"),
    ]
    with engine.connect() as connection:
        accounts = connection.execute(
            sa.text("SELECT seq, provider, customer_id FROM billing.usage_push_ledger ORDER BY 1")
        ).all()
    assert [tuple(row) for row in accounts] == [
        (1, "stripe", "cus_x"),
        (2, "polar", "ext_x"),
        (3, "polar", "ext_x"),
    ]
    assert reconciled(engine) == [] and proposals(engine) == []


def test_a_move_then_a_late_correction_credits_the_customer_that_was_charged(engine, providers_env):
    """Finding 2, past Stripe's cancel window: 1,800 s too many stand; the credit is
    proposed at Stripe cus_x (where they were charged) and nothing new is sent."""
    _moved_org(engine, providers_env)
    shift_ledger(engine, 30)
    advance(providers_env, 30)
    daily_limit(engine, "org-x", 150)
    run_day()
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_x", "small"): 7200,
        ("polar", "ext_x", "small"): 3600,
    }
    assert proposals(engine) == [("org-x", "stripe", "cus_x", "push_over_sent", 1800)]
    assert reconciled(engine) == [
        ("cap_exceeded", "org-x", None, "polar", 1800),
        ("provider_over", "org-x", "small", "stripe", 1800),
    ]
    assert proposals(engine) == [("org-x", "stripe", "cus_x", "push_over_sent", 1800)]


def test_saved_5xx_replays_do_not_block_retries_and_one_failure_keeps_the_rest(
    engine, providers_env
):
    """Issue 10, push: Stripe replays a saved 500 to every retry with the same
    Idempotency-Key, so each attempt needs its own; and an event whose retries run
    out must not discard the other events' answers nor stop the day's push."""
    from test_push_faults import clear_faults, expected_usage, faults, many_orgs

    many_orgs(engine, 40, tiers=("small",), providers=("stripe",))
    faults(providers_env, error_rate=0.75, seed=7)
    failed = run_day(raise_on_error=False)
    assert not failed.success
    statuses = [row[4] for row in ledger(engine)]
    # Answered events are marked sent even though others ran out of retries.
    assert statuses.count("sent") >= 1 and statuses.count("pending") >= 1
    sent_seconds = sum(row[3] for row in ledger(engine) if row[4] == "sent")
    assert sent_seconds <= sum(sandbox_usage(providers_env).values())
    # With 20 % errors and 10 % lost answers, re-runs converge on exactly billable.
    faults(providers_env, error_rate=0.2, drop_after_store_rate=0.1, seed=11)
    for _ in range(6):
        if run_day(raise_on_error=False).success:
            break
    clear_faults(providers_env)
    assert run_day().success
    assert sandbox_usage(providers_env) == expected_usage(engine)
    assert {row[4] for row in ledger(engine)} == {"sent"}
