"""Billing periods: Stripe finalizes each period's invoice at period end + grace with
the usage it has processed by then; Polar bills by ingestion time. Over HTTP, with
the real `stripe` SDK and polar-sdk, answers validated against the excerpts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import stripe
from test_sandbox_polar import usage_event
from test_sandbox_stripe import HOUR, send, tier_meter

STRIPE_AUTH = {"Authorization": "Bearer sk_test_x"}
POLAR_AUTH = {"Authorization": "Bearer polar_oat_x"}


def epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def set_clock(sandbox, text: str) -> None:
    sandbox.post("/_sandbox/clock", json={"now": epoch(text)}).raise_for_status()


def subscribe(sandbox, provider: str, customer: str, **extra) -> str:
    body = {
        "provider": provider,
        "customer": customer,
        "plan": "usage-only",
        "period_start": "2025-02-01",
        "interval": "month",
        **extra,
    }
    answer = sandbox.post("/_sandbox/subscriptions", json=body)
    answer.raise_for_status()
    return answer.json()[0]["id"]


def quantities(invoice) -> dict[str, int]:
    return {line.pricing.price_details.price: line.quantity for line in invoice.lines.data}


@pytest.fixture
def february(sandbox_clean, stripe_client):
    """cus_feb on a monthly subscription from 1 Feb 2025; the clock on 28 Feb 2025."""
    set_clock(sandbox_clean, "2025-02-28T18:00:00")
    sandbox_clean.post(
        "/_sandbox/customers", json={"provider": "stripe", "customer": "cus_feb"}
    ).raise_for_status()
    tier_meter(stripe_client, "small")
    tier_meter(stripe_client, "gpu")
    sub_id = subscribe(sandbox_clean, "stripe", "cus_feb", unit_amounts={"small": "0.01"})
    last_day_noon = epoch("2025-02-28T12:00:00")
    send(stripe_client, "cus_feb", 3600, last_day_noon, "feb-small", tier="small")
    send(stripe_client, "cus_feb", 60, last_day_noon, "feb-gpu", tier="gpu")
    send(stripe_client, "cus_feb", 999, epoch("2025-01-31T12:00:00"), "before-the-period")
    return sub_id


def test_the_invoice_finalizes_at_period_end_plus_grace_with_per_tier_quantities(
    sandbox_clean, stripe_client, stripe_invoices_spec, february
):
    assert stripe_client.v1.invoices.list({"customer": "cus_feb"}).data == []
    set_clock(sandbox_clean, "2025-03-01T00:30:00")
    draft = stripe_client.v1.invoices.list({"customer": "cus_feb"}).data[0]
    assert draft.status == "draft"
    assert draft.automatically_finalizes_at == epoch("2025-03-01T01:00:00")
    assert draft.parent.subscription_details.subscription == february
    assert (draft.period_start, draft.period_end) == (
        epoch("2025-02-01T00:00:00"),
        epoch("2025-03-01T00:00:00"),
    )

    # Usage processed inside the grace is still on the invoice.
    send(stripe_client, "cus_feb", 100, epoch("2025-02-28T13:00:00"), "in-grace")
    set_clock(sandbox_clean, "2025-03-01T00:59:59")
    assert stripe_client.v1.invoices.retrieve(draft.id).status == "draft"
    set_clock(sandbox_clean, "2025-03-01T01:00:00")
    final = stripe_client.v1.invoices.retrieve(draft.id)
    assert final.status == "open"
    assert final.status_transitions.finalized_at == epoch("2025-03-01T01:00:00")
    assert final.automatically_finalizes_at is None
    assert quantities(final) == {"price_tally_small": 3700, "price_tally_gpu": 60}
    assert {line.amount for line in final.lines.data if line.quantity == 3700} == {37}
    assert final.total == 37
    for line in final.lines.data:
        assert (line.period.start, line.period.end) == (final.period_start, final.period_end)
        assert line.parent.subscription_item_details.subscription == february

    for path, params in (
        ("/v1/invoices", {"customer": "cus_feb", "status": "open"}),
        (f"/v1/invoices/{draft.id}", {}),
        (f"/v1/invoices/{draft.id}/lines", {}),
    ):
        raw = sandbox_clean.get(path, params=params, headers=STRIPE_AUTH)
        template = path.replace(draft.id, "{invoice}")
        stripe_invoices_spec.response(template, "get", 200, raw.json())
    lines = stripe_client.v1.invoices.line_items.list(draft.id)
    assert sorted(line.quantity for line in lines.data) == [60, 3700]
    assert stripe_client.v1.invoices.list({"subscription": february, "status": "draft"}).data == []


def test_usage_for_a_finalized_period_is_on_no_invoice(
    sandbox_clean, stripe_client, stripe_invoices_spec, february
):
    set_clock(sandbox_clean, "2025-03-01T02:00:00")
    late = epoch("2025-02-28T20:00:00")
    send(stripe_client, "cus_feb", 50, late, "pushed-after-finalization")
    # The meter still has it ...
    summaries = stripe_client.v1.billing.meters.event_summaries.list(
        stripe_client.v1.billing.meters.list().data[-1].id,
        {
            "customer": "cus_feb",
            "start_time": epoch("2025-02-28T00:00:00"),
            "end_time": epoch("2025-03-01T00:00:00"),
        },
    )
    assert sum(s.aggregated_value for s in summaries.data) == 3650
    # ... no invoice does.
    february_invoice = stripe_client.v1.invoices.list({"customer": "cus_feb"}).data[0]
    assert quantities(february_invoice)["price_tally_small"] == 3600
    preview = stripe_client.v1.invoices.create_preview({"customer": "cus_feb"})
    assert preview.id.startswith("upcoming_in")
    assert preview.period_start == epoch("2025-03-01T00:00:00")
    assert quantities(preview)["price_tally_small"] == 0
    march_event = epoch("2025-03-01T01:30:00")
    send(stripe_client, "cus_feb", 25, march_event, "march")
    assert (
        quantities(stripe_client.v1.invoices.create_preview({"subscription": february}))[
            "price_tally_small"
        ]
        == 25
    )
    raw = sandbox_clean.post(
        "/v1/invoices/create_preview", data={"customer": "cus_feb"}, headers=STRIPE_AUTH
    )
    stripe_invoices_spec.response("/v1/invoices/create_preview", "post", 200, raw.json())
    set_clock(sandbox_clean, "2025-04-01T01:00:00")
    march = stripe_client.v1.invoices.list({"customer": "cus_feb", "status": "open"}).data[0]
    assert march.period_start == epoch("2025-03-01T00:00:00")
    assert quantities(march)["price_tally_small"] == 25


def test_a_longer_grace_takes_later_usage_and_processing_delay_can_miss_it(
    sandbox_clean, stripe_client, february
):
    sandbox_clean.post("/_sandbox/settings", json={"finalization_grace_s": 6 * HOUR})
    assert sandbox_clean.get("/_sandbox/settings").json() == {"finalization_grace_s": 6 * HOUR}
    set_clock(sandbox_clean, "2025-03-01T02:00:00")
    send(stripe_client, "cus_feb", 50, epoch("2025-02-28T20:00:00"), "late-but-in-grace")
    sandbox_clean.post("/_sandbox/faults", json={"processing_delay_s": 2 * HOUR})
    set_clock(sandbox_clean, "2025-03-01T05:00:00")
    send(stripe_client, "cus_feb", 7, epoch("2025-02-28T21:00:00"), "processed-after-finalization")
    set_clock(sandbox_clean, "2025-03-01T09:00:00")
    invoice = stripe_client.v1.invoices.list({"customer": "cus_feb"}).data[0]
    assert invoice.status_transitions.finalized_at == epoch("2025-03-01T06:00:00")
    assert quantities(invoice)["price_tally_small"] == 3650
    bad = sandbox_clean.post("/_sandbox/settings", json={"finalization_grace_s": 73 * HOUR})
    assert bad.status_code == 400 and "finalization_grace_s" in bad.json()["error"]


def test_stripe_subscriptions_in_every_status(sandbox_clean, stripe_client, stripe_invoices_spec):
    statuses = ["active", "past_due", "canceled", "trialing", "incomplete", "unpaid", "paused"]
    for n, status in enumerate(statuses):
        subscribe(sandbox_clean, "stripe", f"cus_s{n}", status=status)
    default = {s.customer: s.status for s in stripe_client.v1.subscriptions.list({"limit": 100})}
    assert sorted(default.values()) == sorted(set(statuses) - {"canceled"})
    every = stripe_client.v1.subscriptions.list({"status": "all", "limit": 100}).data
    assert sorted(s.status for s in every) == sorted(statuses)
    past_due = stripe_client.v1.subscriptions.list({"status": "past_due"}).data
    assert [s.customer for s in past_due] == ["cus_s1"]
    one = stripe_client.v1.subscriptions.retrieve(past_due[0].id)
    assert one.metadata["plan"] == "usage-only"
    raw = sandbox_clean.get(f"/v1/subscriptions/{one.id}", headers=STRIPE_AUTH)
    stripe_invoices_spec.response(
        "/v1/subscriptions/{subscription_exposed_id}", "get", 200, raw.json()
    )
    bad = sandbox_clean.post(
        "/_sandbox/subscriptions",
        json={"provider": "stripe", "customer": "c", "plan": "p", "status": "sleepy"},
    )
    assert bad.status_code == 400 and "status" in bad.json()["error"]
    sandbox_clean.post(
        "/_sandbox/plans", json={"provider": "stripe", "customer": "cus_plain", "plan": "p"}
    ).raise_for_status()
    with pytest.raises(stripe.InvalidRequestError) as none:  # no periods: nothing upcoming
        stripe_client.v1.invoices.create_preview({"customer": "cus_plain"})
    assert none.value.code == "invoice_upcoming_none"


def test_polar_orders_bill_by_ingestion_time(sandbox_clean, polar_client, polar_orders_spec):
    set_clock(sandbox_clean, "2025-02-27T12:00:00")
    polar_client.meters.create(
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
    sandbox_clean.post("/_sandbox/customers", json={"provider": "polar", "customer": "ext_p"})
    subscribe(sandbox_clean, "polar", "ext_p", unit_amounts={"small": 1})
    polar_client.events.ingest(
        events=[usage_event("ext_p", "small", 100, epoch("2025-02-27T06:00:00"), "feb-27")]
    )
    set_clock(sandbox_clean, "2025-03-01T02:00:00")
    # Stamped on 28 February, ingested on 1 March: March's cycle bills it.
    polar_client.events.ingest(
        events=[usage_event("ext_p", "small", 50, epoch("2025-02-28T12:00:00"), "feb-28-late")]
    )
    orders = polar_client.orders.list(external_customer_id="ext_p")
    assert [o.total_amount for o in orders.items] == [100]
    feb = orders.items[0]
    assert feb.billing_reason == "subscription_cycle" and feb.status == "paid"
    assert [item.label for item in feb.items] == ["small: 100 units"]
    raw = sandbox_clean.get("/v1/orders/", headers=POLAR_AUTH)
    polar_orders_spec.response("/v1/orders/", "get", 200, raw.json())
    raw = sandbox_clean.get(f"/v1/orders/{feb.id}", headers=POLAR_AUTH)
    polar_orders_spec.response("/v1/orders/{id}", "get", 200, raw.json())
    assert polar_client.orders.get(id=feb.id).invoice_number == feb.invoice_number

    set_clock(sandbox_clean, "2025-04-01T00:00:00")
    newest_first = polar_client.orders.list(external_customer_id="ext_p").items
    assert [o.total_amount for o in newest_first] == [50, 100]
    sub = polar_client.subscriptions.get(id=feb.subscription_id)
    assert sub.current_period_start == "2025-04-01T00:00:00Z"
