"""Customers exist only once created: Stripe accepts usage for an unknown customer,
never counts it and reports a meter error; Polar counts it. Over HTTP, real SDKs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import stripe
from test_sandbox_polar import usage_event
from test_sandbox_settling import noon_yesterday, summary_total
from test_sandbox_stripe import DAY, advance, send, tier_meter, usage


def test_admin_customers_have_the_ids_given_and_the_stripe_api_lists_them(
    sandbox_clean, stripe_client, stripe_invoices_spec
):
    created = sandbox_clean.post(
        "/_sandbox/customers",
        json=[
            {
                "provider": "stripe",
                "customer": f"cus_{n:02d}",
                "name": f"Org {n}",
                "email": f"o{n}@x.test",
            }
            for n in range(12)
        ],
    )
    assert created.json() == {"created": 12, "updated": 0}
    again = sandbox_clean.post(
        "/_sandbox/customers", json={"provider": "stripe", "customer": "cus_03", "name": "Renamed"}
    )
    assert again.json() == {"created": 0, "updated": 1}

    one = stripe_client.v1.customers.retrieve("cus_03")
    assert (one.id, one.name, one.email) == ("cus_03", "Renamed", "o3@x.test")
    raw = sandbox_clean.get("/v1/customers/cus_03", headers={"Authorization": "Bearer sk_test_x"})
    stripe_invoices_spec.response("/v1/customers/{customer}", "get", 200, raw.json())

    first = stripe_client.v1.customers.list({"limit": 5})
    assert first.has_more and len(first.data) == 5
    seen = [c.id for c in first.data]
    page = first
    while page.has_more:
        page = stripe_client.v1.customers.list({"limit": 5, "starting_after": page.data[-1].id})
        seen += [c.id for c in page.data]
    assert seen == [f"cus_{n:02d}" for n in reversed(range(12))]
    raw = sandbox_clean.get(
        "/v1/customers", params={"limit": 3}, headers={"Authorization": "Bearer sk_test_x"}
    )
    stripe_invoices_spec.response("/v1/customers", "get", 200, raw.json())

    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.customers.retrieve("cus_never")
    assert missing.value.http_status == 404


def test_stripe_never_counts_an_unknown_customer_and_reports_a_meter_error(
    sandbox_clean, stripe_client
):
    meter = tier_meter(stripe_client)
    sandbox_clean.post("/_sandbox/customers", json={"provider": "stripe", "customer": "cus_known"})
    noon = noon_yesterday(sandbox_clean)
    day = noon - noon % DAY
    accepted = send(stripe_client, "cus_ghost", 3600, noon, "tally:org-g:d:small:1")
    assert accepted.identifier == "tally:org-g:d:small:1"  # accepted: a 200, like Stripe
    send(stripe_client, "cus_known", 60, noon, "tally:org-k:d:small:1")

    assert summary_total(stripe_client, meter.id, "cus_ghost", day) == 0
    assert usage(sandbox_clean, day) == [
        {"provider": "stripe", "customer": "cus_known", "tier": "small", "seconds": 60}
    ]
    errors = sandbox_clean.get("/_sandbox/meter_errors").json()
    assert [(e["customer"], e["identifier"], e["code"], e["value"]) for e in errors] == [
        ("cus_ghost", "tally:org-g:d:small:1", "meter_event_customer_not_found", 3600)
    ]

    # As Stripe exposes it: a v1.billing.meter.error_report_triggered thin event.
    events = stripe_client.v2.core.events.list({"object_id": meter.id})
    report = events.data[0]
    assert report.type == "v1.billing.meter.error_report_triggered"
    assert report.related_object.id == meter.id
    kinds = report.data.reason.error_types
    assert report.data.reason.error_count == 1
    assert kinds[0].code == "meter_event_customer_not_found"
    assert kinds[0].sample_errors[0].request.identifier == "tally:org-g:d:small:1"
    assert stripe_client.v2.core.events.retrieve(report.id).id == report.id

    # Creating the customer afterwards does not rescue the dropped event.
    sandbox_clean.post("/_sandbox/customers", json={"provider": "stripe", "customer": "cus_ghost"})
    advance(sandbox_clean, 3600)
    assert summary_total(stripe_client, meter.id, "cus_ghost", day) == 0


def test_a_customer_created_before_a_delayed_event_is_processed_is_counted(
    sandbox_clean, stripe_client
):
    meter = tier_meter(stripe_client)
    sandbox_clean.post("/_sandbox/faults", json={"processing_delay_s": 300}).raise_for_status()
    noon = noon_yesterday(sandbox_clean)
    day = noon - noon % DAY
    send(stripe_client, "cus_late", 120, noon, "early")
    stripe_client.v1.customers.create({"id": "cus_late", "name": "Late"})
    advance(sandbox_clean, 300)
    assert summary_total(stripe_client, meter.id, "cus_late", day) == 120
    assert sandbox_clean.get("/_sandbox/meter_errors").json() == []


def test_planted_stripe_usage_for_an_unknown_customer_is_not_counted(sandbox_clean):
    day = noon_yesterday(sandbox_clean)
    date = datetime.fromtimestamp(day, UTC).date().isoformat()
    rows = [
        {
            "provider": "stripe",
            "customer": "cus_nobody",
            "tier": "small",
            "seconds": 5,
            "date": date,
        }
    ]
    assert sandbox_clean.post("/_sandbox/events", json=rows).json() == {"inserted": 1}
    assert sandbox_clean.get("/_sandbox/usage", params={"date": date}).json() == []
    assert [e["customer"] for e in sandbox_clean.get("/_sandbox/meter_errors").json()] == [
        "cus_nobody"
    ]


def test_polar_counts_events_for_unknown_external_customers(
    sandbox_clean, polar_client, polar_spec
):
    now = int(sandbox_clean.state.now())
    meter = polar_client.meters.create(
        name="small",
        aggregation={"func": "sum", "property": "metadata.seconds"},
        filter={
            "conjunction": "and",
            "clauses": [
                {"property": "name", "operator": "eq", "value": "tally.instance_usage"},
                {"property": "metadata.tier", "operator": "eq", "value": "small"},
            ],
        },
    )
    answer = polar_client.events.ingest(
        events=[usage_event("ext_nobody", "small", 700, now - 3600, "tally:org-n:d:small:1")]
    )
    assert answer.inserted == 1
    quantities = polar_client.meters.quantities(
        id=meter.id,
        start_timestamp=datetime.fromtimestamp(now - 7200, UTC),
        end_timestamp=datetime.fromtimestamp(now, UTC),
        interval="day",
        external_customer_id="ext_nobody",
    )
    assert quantities.total == 700
    # ... while Polar has no such customer: bulk list and lookup say so.
    listed = polar_client.customers.list(query="ext_nobody")
    assert listed.items == []
    raw = sandbox_clean.get(
        "/v1/customers/", params={"limit": 100}, headers={"Authorization": "Bearer polar_oat_x"}
    )
    polar_spec.response("/v1/customers/", "get", 200, raw.json())


def test_polar_admin_customers_list_by_external_id_and_paginate(
    sandbox_clean, polar_client, polar_orders_spec
):
    rows = [{"provider": "polar", "customer": f"ext_{n}", "name": f"Org {n}"} for n in range(7)]
    assert sandbox_clean.post("/_sandbox/customers", json=rows).json()["created"] == 7
    first = polar_client.customers.list(limit=3)
    assert first.pagination.total_count == 7 and first.pagination.max_page == 3
    assert [c.external_id for c in first.items] == ["ext_6", "ext_5", "ext_4"]
    oldest = polar_client.customers.list(limit=3, page=3, sorting=["created_at"])
    assert [c.external_id for c in oldest.items] == ["ext_6"]
    found = polar_client.customers.get_external(external_id="ext_2")
    assert found.name == "Org 2"
    raw = sandbox_clean.get(
        f"/v1/customers/{found.id}", headers={"Authorization": "Bearer polar_oat_x"}
    )
    polar_orders_spec.response("/v1/customers/{id}", "get", 200, raw.json())
