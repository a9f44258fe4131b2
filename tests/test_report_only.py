"""`--report-only` erases nothing (issue 10, finding 6): on a reconciled day it
replaces no discrepancy, provider read, credit proposal, alert ledger or correction,
and freshness never counts it. Real PostgreSQL, the sandbox over HTTP, real runs."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from builders import add_org
from dagster import DagsterInstance, materialize
from test_reconcile import DAY, PIPELINE, add_at_provider, resources, run, used

from pipelines.freshness import last_reconciliation

EVIDENCE = {
    "discrepancies": "SELECT kind, org_id, tier, provider, delta_seconds, explained, detail "
    "FROM billing.discrepancies ORDER BY 1, 2, 3",
    "provider_usage": "SELECT org_id, tier, provider, customer_id, seconds "
    "FROM billing.provider_usage ORDER BY 1, 2, 3, 4",
    "provider_reads": "SELECT provider, status, customers FROM billing.provider_reads ORDER BY 1",
    "credit_proposals": "SELECT proposal_id, org_id, kind, seconds, amount, status "
    "FROM billing.credit_proposals ORDER BY 1",
    "budget_alert_ledger": "SELECT * FROM billing.budget_alert_ledger ORDER BY 1, 2, 3",
    "billing_corrections": "SELECT * FROM billing.billing_corrections ORDER BY 1",
}


def dump(engine) -> dict[str, list[tuple]]:
    with engine.connect() as connection:
        return {
            name: [tuple(row) for row in connection.execute(sa.text(query))]
            for name, query in EVIDENCE.items()
        }


def test_report_only_on_a_reconciled_day_replaces_nothing(engine, providers_env):
    add_org(engine, "org-s", customer="cus_S1")
    add_org(engine, "org-p", provider="polar", customer="ext_P1")
    used(engine, "org-s", "i-s1", "small", 1, 60)
    used(engine, "org-p", "i-p1", "large", 3, 90)
    run(PIPELINE)
    # Evidence worth keeping: a double charge at Stripe (provider_over, a proposal)
    # and usage the push has not sent yet (unpushed).
    add_at_provider(providers_env, "stripe", "cus_S1", "small", 1800)
    run(PIPELINE)
    used(engine, "org-s", "i-s2", "medium", 5, 30, counter=False)
    materialize(PIPELINE[:1] + PIPELINE[2:], partition_key=DAY.isoformat(), resources=resources())
    before = dump(engine)
    assert {row[0] for row in before["discrepancies"]} >= {"provider_over", "unpushed"}
    assert [row[2] for row in before["credit_proposals"]] == ["provider_over"]

    result = run(PIPELINE, report_only=True)
    assert dump(engine) == before
    meta = result.asset_materializations_for_node("reconciliation")[0].metadata
    assert meta["report_only"].value is True and meta["kept_real_reconciliation"].value is True


def test_report_only_never_counts_as_a_reconciliation(engine, providers_env, dagster_home):
    add_org(engine, "org-s", customer="cus_S1")
    used(engine, "org-s", "i-s1", "small", 1, 60)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        materialize(
            PIPELINE,
            partition_key=DAY.isoformat(),
            resources=resources(report_only=True),
            instance=instance,
        )
        facts = last_reconciliation(engine)
        assert facts.success_at is None and DAY not in facts.reconciled_days
        materialize(
            PIPELINE, partition_key=DAY.isoformat(), resources=resources(), instance=instance
        )
        real = last_reconciliation(engine)
        assert real.success_at is not None and DAY in real.reconciled_days
        materialize(
            PIPELINE,
            partition_key=(DAY - dt.timedelta(days=1)).isoformat(),
            resources=resources(report_only=True),
            instance=instance,
        )
        after = last_reconciliation(engine)
        assert after.success_at == real.success_at and after.run_id == real.run_id
        assert after.reconciled_days == real.reconciled_days
