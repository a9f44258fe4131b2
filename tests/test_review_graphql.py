"""The finance review as the UI loads it (issue 12, item 9): a real `dagster-webserver`
on the instance a real daily run and the review's refresh wrote to, its asset read
through GraphQL. The tables are Dagster table metadata with a typed schema (sortable
columns in the UI, not markdown) and carry the columns the issue asks for."""

from __future__ import annotations

import json
import os

import pytest
from conftest import free_port
from dagster import DagsterInstance
from dagster_processes import GraphQL, dagster_processes, wait_for
from test_finance_review import run_job, world
from test_reconcile import DAY, add_at_provider

pytestmark = pytest.mark.xdist_group("dagster_processes")

START_S = 120.0

REVIEW = """
{
  assetNodes(assetKeys: [{path: ["finance_review"]}]) {
    description
    assetMaterializations(limit: 1) {
      runId
      metadataEntries {
        label
        __typename
        ... on TableMetadataEntry {
          table { schema { columns { name type description } } records }
        }
        ... on FloatMetadataEntry { floatValue }
        ... on IntMetadataEntry { intValue }
      }
    }
  }
}"""

# The columns, as the review names them (name, type).
OPEN_PROPOSALS = {
    "proposal_id": "int",  # id
    "org_id": "string",  # org
    "org_name": "string",  # and name
    "usage_date": "date",  # day
    "kind": "string",
    "amount": "string",  # $1,234.56 ...
    "amount_usd": "float",  # ... with a numeric twin for plots
    "escalation": "string",  # escalation level
    "age_days": "int",  # age
}
UNEXPLAINED = {
    "usage_date": "date",
    "kind": "string",
    "org_id": "string",
    "org_name": "string",
    "dollar_impact": "string",
    "dollar_impact_usd": "float",
    "age_days": "int",
}
TOTALS = {
    "period": "string",  # yesterday and month to date
    "usage_at_list": "string",
    "expected_invoice": "string",  # after included hours and plan fees
    "revenue_leakage": "string",
    "over_charge": "string",  # kept apart from leakage
    "informational_findings": "int",
    "informational_potential": "string",  # labelled as potential
    "informational_potential_usd": "float",
}


def test_the_review_asset_through_the_webservers_graphql(
    engine, providers_env, dagster_home, tmp_path
) -> None:
    world(engine)
    add_at_provider(providers_env, "stripe", "cus_cap", "small", 7200)  # a double charge
    port = free_port()
    graphql = GraphQL(port)
    # The webserver loads its code location while the runs write to the same instance.
    with (
        dagster_processes(dict(os.environ), tmp_path, webserver_port=port, daemon=False) as ps,
        DagsterInstance.from_config(str(dagster_home)) as instance,
    ):
        run_job(instance, "daily_billing", partition_key=DAY.isoformat())
        refresh = run_job(instance, "refresh_finance_review")
        wait_for(
            graphql.location_loaded,
            START_S,
            "the code location",
            context=lambda: ps["webserver"].tail(),
        )
        (node,) = graphql(REVIEW)["assetNodes"]

    assert "Finance review" in node["description"]
    (materialization,) = node["assetMaterializations"]
    assert materialization["runId"] == refresh.run_id
    entries = {
        entry["label"]: entry for entry in node["assetMaterializations"][0]["metadataEntries"]
    }
    tables = {
        label: entry["table"]
        for label, entry in entries.items()
        if entry["__typename"] == "TableMetadataEntry"
    }
    assert set(tables) == {
        "totals",
        "open_credit_proposals",
        "unexplained_money_moving",
        "discrepancies_by_kind",
    }
    for label, wanted in (
        ("open_credit_proposals", OPEN_PROPOSALS),
        ("unexplained_money_moving", UNEXPLAINED),
        ("totals", TOTALS),
    ):
        columns = {column["name"]: column for column in tables[label]["schema"]["columns"]}
        assert {name: columns[name]["type"] for name in wanted if name in columns} == wanted, label
        assert all(column["description"] for column in columns.values()), label

    # The records the UI renders: one open proposal, named, in dollars, with its age.
    (proposal,) = [json.loads(record) for record in tables["open_credit_proposals"]["records"]]
    assert (proposal["org_id"], proposal["org_name"], proposal["kind"]) == (
        "org-cap",
        "org-cap Inc.",
        "provider_over",
    )
    assert proposal["usage_date"] == DAY.isoformat()
    assert proposal["amount"] == "$0.10" and proposal["amount_usd"] == 0.1
    assert proposal["escalation"] == "support_agent" and proposal["age_days"] == 0
    periods = [json.loads(record)["period"] for record in tables["totals"]["records"]]
    assert periods == ["yesterday", "month_to_date"]
    # The headline numbers beside the tables, as numbers.
    assert entries["credits_to_approve_usd"]["floatValue"] == 0.1
    assert entries["at_risk_over_charge_usd"]["floatValue"] == 0.1
