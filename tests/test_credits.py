"""Credit proposals and the issue_credits job against the sandbox: amounts,
escalation, and a credit applied once however often (or concurrently) the job runs."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pandas as pd
import pytest
import sqlalchemy as sa
from builders import add_org, discrepancy_rows
from test_reconcile import (
    DAY,
    PIPELINE,
    RECONCILE,
    add_at_provider,
    check_of,
    run,
    used,
)

from assets.credits import PROPOSAL_COLUMNS, escalation_level, plan_proposals
from assets.metering import billed_usage
from assets.push import usage_push
from assets.reconcile import reconciliation
from pipelines.jobs import issue_credits
from resources.db import PostgresResource
from resources.notify import SmtpResource
from resources.providers import ProvidersResource


def issue(proposal_ids, approver="lead@example.com", raise_on_error=True, ticket="SUP-1"):
    # lead@example.com is a support_lead on the repository's roster (config/approvers.toml).
    return issue_credits.execute_in_process(
        run_config={
            "ops": {
                "apply_credits": {
                    "config": {
                        "proposal_ids": list(proposal_ids),
                        "approver": approver,
                        "ticket": ticket,
                    }
                }
            }
        },
        resources={
            "postgres": PostgresResource(),
            "providers": ProvidersResource(),
            "smtp": SmtpResource(),
        },
        raise_on_error=raise_on_error,
    )


def proposals(engine) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT * FROM billing.credit_proposals ORDER BY proposal_id")
        ).all()
    return {row.org_id: dict(row._mapping) for row in rows}


def corrections(engine) -> list[dict]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT * FROM billing.billing_corrections ORDER BY proposal_id")
        ).all()
    return [dict(row._mapping) for row in rows]


def stripe_balance(stripe_client, customer: str) -> tuple[int, list]:
    transactions = stripe_client.v1.customers.balance_transactions.list(customer, {"limit": 100})
    return stripe_client.v1.customers.retrieve(customer).balance, transactions.data


def over_charged_world(engine, sandbox):
    add_org(engine, "org-over", customer="cus_over")
    add_org(engine, "org-pover", provider="polar", customer="ext_pover")
    used(engine, "org-over", "i-over", "gpu", 2, 30)
    used(engine, "org-pover", "i-pover", "large", 3, 90)
    run([billed_usage, usage_push])
    add_at_provider(sandbox, "stripe", "cus_over", "gpu", 1800)
    add_at_provider(sandbox, "polar", "ext_pover", "large", 600)
    run(RECONCILE)
    return proposals(engine)


def test_issue_credits_applies_each_proposal_once(engine, providers_env, stripe_client):
    found = over_charged_world(engine, providers_env)
    stripe_id = found["org-over"]["proposal_id"]
    polar_id = found["org-pover"]["proposal_id"]
    assert found["org-over"]["amount"] == Decimal("1.25")
    assert found["org-over"]["escalation"] == "support_agent"
    assert "1800 s × $2.50/h = $1.25" in found["org-over"]["evidence"]

    # Two runs at once (the provider answers slowly so they overlap), then a third.
    providers_env.post("/_sandbox/faults", json={"latency_ms": 200}).raise_for_status()
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(issue([stripe_id, polar_id])))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    again = issue([stripe_id, polar_id])

    assert all(result.success for result in results) and again.success
    # Whichever run got each row lock first applied it; the other found it done.
    per_proposal = {
        pid: sorted(r.output_for_node("apply_credits")[pid] for r in results)
        for pid in (stripe_id, polar_id)
    }
    assert per_proposal == {stripe_id: ["already", "applied"], polar_id: ["already", "manual"]}
    assert again.output_for_node("apply_credits") == {stripe_id: "already", polar_id: "already"}
    balance, transactions = stripe_balance(stripe_client, "cus_over")
    assert balance == -125 and len(transactions) == 1
    assert transactions[0].metadata["tally_proposal_id"] == str(stripe_id)

    stripe_row, polar_row = corrections(engine)
    assert (stripe_row["proposal_id"], stripe_row["method"]) == (
        stripe_id,
        "stripe_balance_transaction",
    )
    assert stripe_row["provider_reference"] == transactions[0].id
    assert stripe_row["amount"] == Decimal("1.25") and stripe_row["customer_id"] == "cus_over"
    assert stripe_row["approved_by"] == "lead@example.com" and stripe_row["reason"]
    assert (polar_row["method"], polar_row["provider_reference"]) == ("manual", None)
    assert "Polar dashboard" in polar_row["reason"]
    after = proposals(engine)
    assert (after["org-over"]["status"], after["org-pover"]["status"]) == ("applied", "manual")
    assert after["org-over"]["approved_by"] == "lead@example.com"

    # Reconciled again, the credited over-charges are explained; no new proposal.
    result = run([reconciliation, *RECONCILE[2:]])
    rows = discrepancy_rows(engine, DAY)
    assert {row["kind"] for row in rows} == {"provider_over"}
    assert all(row["explained"] and "already credited" in row["detail"] for row in rows)
    assert check_of(result, "no_unexplained_discrepancies").passed
    assert len(proposals(engine)) == 2


def test_a_crash_after_the_provider_call_is_not_credited_twice(
    engine, providers_env, stripe_client
):
    found = over_charged_world(engine, providers_env)
    proposal_id = found["org-over"]["proposal_id"]
    # The job called Stripe, then died before its transaction committed.
    reader = ProvidersResource().client("stripe")
    first = reader.apply_credit("cus_over", 125, "usd", "lost answer", proposal_id)
    assert issue([proposal_id]).output_for_node("apply_credits") == {proposal_id: "applied"}
    balance, transactions = stripe_balance(stripe_client, "cus_over")
    assert balance == -125 and len(transactions) == 1
    assert corrections(engine)[0]["provider_reference"] == first.reference


def test_unknown_proposals_are_skipped_and_an_approver_is_required(engine, providers_env):
    found = over_charged_world(engine, providers_env)
    result = issue([999_999])
    assert result.output_for_node("apply_credits") == {999_999: "skipped"}
    failed = issue([found["org-over"]["proposal_id"]], approver="  ", raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.is_step_failure]
    assert "approver is empty" in failure.step_failure_data.user_failure_data.description
    assert corrections(engine) == []
    assert proposals(engine)["org-over"]["status"] == "proposed"


def test_usage_push_over_sent_is_priced_and_never_proposed_twice(engine, providers_env):
    add_org(engine, "org-late", customer="cus_late")
    used(engine, "org-late", "i-late", "gpu", 1, 60)
    run([billed_usage, usage_push])
    # A day later the control plane drops half the heartbeats (bad data removed) and
    # the Stripe event is too old to cancel: usage_push proposes a push_over_sent credit.
    with engine.begin() as connection:
        connection.execute(
            sa.text("DELETE FROM heartbeats WHERE sent_at >= :cut"),
            {"cut": dt.datetime.combine(DAY, dt.time(1, 30), tzinfo=dt.UTC)},
        )
        connection.execute(
            sa.text("UPDATE billing.usage_push_ledger SET sent_at = sent_at - interval '2 days'")
        )
    run(PIPELINE)
    (row,) = [r for r in discrepancy_rows(engine, DAY) if r["kind"] == "provider_over"]
    assert (row["provider_seconds"], row["billable_seconds"], row["delta_seconds"]) == (
        3600,
        1800,
        1800,
    )
    assert "1800 s proposed by usage_push" in row["detail"]
    (proposal,) = proposals(engine).values()
    assert (proposal["kind"], proposal["seconds"], proposal["amount"]) == (
        "push_over_sent",
        1800,
        Decimal("1.25"),
    )
    assert (proposal["escalation"], proposal["customer_id"]) == ("support_agent", "cus_late")


@pytest.mark.parametrize(
    ("amount", "systemic", "level"),
    [
        ("0.01", False, "support_agent"),
        ("50.00", False, "support_agent"),
        ("50.01", False, "support_lead"),
        ("500.00", False, "support_lead"),
        ("500.01", False, "vp_engineering"),
        ("0.01", True, "engineering"),
        ("9000", True, "engineering"),
    ],
)
def test_escalation_levels(amount, systemic, level):
    assert escalation_level(Decimal(amount), systemic) == level


def _candidates(orgs, kind="provider_over", amount="60.00"):
    return pd.DataFrame(
        [[org, "gpu", "stripe", kind, 86_400, Decimal(amount), "evidence"] for org in orgs],
        columns=["org_id", "tier", "provider", "kind", "seconds", "amount", "evidence"],
    )


def test_the_same_kind_on_five_orgs_goes_to_engineering():
    orgs = pd.DataFrame({"org_id": [f"o{n}" for n in range(6)], "provider_customer_id": "cus_x"})
    empty = pd.DataFrame()
    upserts, _, _ = plan_proposals(DAY, _candidates(["o0", "o1", "o2", "o3"]), empty, orgs)
    assert {u["escalation"] for u in upserts} == {"support_lead"}
    upserts, _, _ = plan_proposals(DAY, _candidates(["o0", "o1", "o2", "o3", "o4"]), empty, orgs)
    assert {u["escalation"] for u in upserts} == {"engineering"}
    assert all(u["systemic"] and "5 orgs" in u["evidence"] for u in upserts)


def test_proposals_are_withdrawn_when_the_over_charge_is_gone_and_push_rows_priced():
    existing = pd.DataFrame(
        [
            [
                1,
                "o1",
                DAY,
                "gpu",
                "stripe",
                "provider_over",
                100,
                Decimal("0.07"),
                "e",
                None,
                "support_agent",
                False,
                "proposed",
            ],
            [
                2,
                "o2",
                DAY,
                "small",
                "stripe",
                "provider_over",
                100,
                Decimal("0.01"),
                "e",
                None,
                "support_agent",
                False,
                "applied",
            ],
            [
                3,
                "o3",
                DAY,
                "large",
                "polar",
                "push_over_sent",
                7200,
                None,
                "e",
                None,
                None,
                False,
                "proposed",
            ],
        ],
        columns=PROPOSAL_COLUMNS,
    )
    orgs = pd.DataFrame({"org_id": ["o1", "o2", "o3"], "provider_customer_id": ["a", "b", "c"]})
    upserts, updates, withdraw = plan_proposals(DAY, _candidates([]), existing, orgs)
    assert upserts == [] and withdraw == [1]  # the applied one stays applied
    assert updates == [
        {
            "proposal_id": 3,
            "amount": Decimal("0.40"),
            "customer_id": "c",
            "escalation": "support_agent",
            "systemic": False,
            "net_amount": Decimal("0.40"),
            "included_seconds": 0,
        }
    ]
