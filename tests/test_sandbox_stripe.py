"""The sandbox's Stripe API, driven through the real `stripe` SDK over loopback."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sandbox_fixture import create_customers
from stripe._encode import _api_encode

from resources.sandbox.common import decode_form

DAY = 86_400
HOUR = 3_600


def tier_meter(client: stripe.StripeClient, tier: str = "small") -> stripe.billing.Meter:
    return client.v1.billing.meters.create(
        {
            "display_name": f"Instance seconds ({tier})",
            "event_name": f"tally_instance_seconds_{tier}",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )


def send(
    client: stripe.StripeClient,
    customer: str,
    seconds: int,
    timestamp: int,
    identifier: str,
    tier: str = "small",
    options: dict[str, Any] | None = None,
) -> stripe.billing.MeterEvent:
    params = {
        "event_name": f"tally_instance_seconds_{tier}",
        "payload": {"stripe_customer_id": customer, "value": str(seconds)},
        "identifier": identifier,
        "timestamp": timestamp,
    }
    return client.v1.billing.meter_events.create(params, options or {})


def yesterday_noon(sandbox: Any) -> tuple[int, int]:
    now = int(sandbox.state.now())
    day = now - now % DAY - DAY
    return day, day + 12 * HOUR


def usage(sandbox: Any, day: int) -> list[dict[str, Any]]:
    date = datetime.fromtimestamp(day, UTC).date().isoformat()
    response = sandbox.get("/_sandbox/usage", params={"date": date})
    response.raise_for_status()
    return response.json()


def advance(sandbox: Any, seconds: int) -> None:
    sandbox.post("/_sandbox/clock", json={"advance_seconds": seconds}).raise_for_status()


@pytest.fixture(autouse=True)
def _known_customers(request):
    """Stripe counts meter events only for customers that exist: these tests' do."""
    if {"sandbox_clean", "stripe_client"} & set(request.fixturenames):
        create_customers(
            request.getfixturevalue("sandbox_clean"), "stripe", "cus_a", "cus_b", "cus_s"
        )


def test_meters_create_list_retrieve_paginate(stripe_client, stripe_spec):
    created = [tier_meter(stripe_client, tier) for tier in ("small", "medium", "large")]
    meter = created[0]
    assert meter.object == "billing.meter"
    assert meter.status == "active"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "value"
    stripe_spec.response("/v1/billing/meters", "post", 200, meter.to_dict())

    first = stripe_client.v1.billing.meters.list({"limit": 2})
    assert [m.id for m in first.data] == [created[2].id, created[1].id]  # newest first
    assert first.has_more is True
    stripe_spec.response("/v1/billing/meters", "get", 200, first.to_dict())
    second = stripe_client.v1.billing.meters.list({"limit": 2, "starting_after": first.data[-1].id})
    assert [m.id for m in second.data] == [created[0].id]
    assert second.has_more is False
    assert {m.id for m in first.auto_paging_iter()} == {m.id for m in created}
    assert stripe_client.v1.billing.meters.list({"status": "inactive"}).data == []

    assert stripe_client.v1.billing.meters.retrieve(meter.id).event_name == meter.event_name
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.billing.meters.retrieve("mtr_nope")
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    stripe_spec.schema("error", missing.value.json_body)

    with pytest.raises(stripe.InvalidRequestError) as clash:
        tier_meter(stripe_client, "small")
    assert clash.value.http_status == 400
    assert clash.value.param == "event_name"


def test_meter_event_and_duplicate_identifier(stripe_client, stripe_spec, sandbox_clean):
    tier_meter(stripe_client)
    day, noon = yesterday_noon(sandbox_clean)
    event = send(stripe_client, "cus_a", 3600, noon, "tally:org-a:d1:small:1")
    assert event.object == "billing.meter_event"
    assert event.identifier == "tally:org-a:d1:small:1"
    assert event.payload.to_dict() == {"stripe_customer_id": "cus_a", "value": "3600"}
    assert event.timestamp == noon
    stripe_spec.response("/v1/billing/meter_events", "post", 200, event.to_dict())

    # Stripe refuses a repeated identifier within 24 h: 400, message only, no code.
    with pytest.raises(stripe.InvalidRequestError) as dup:
        send(stripe_client, "cus_a", 3600, noon, "tally:org-a:d1:small:1")
    assert dup.value.http_status == 400
    assert dup.value.code is None
    assert "An event already exists with identifier tally:org-a:d1:small:1" in str(
        dup.value.user_message
    )
    assert dup.value.headers["stripe-should-retry"] == "false"
    stripe_spec.schema("error", dup.value.json_body)
    assert usage(sandbox_clean, day) == [
        {"provider": "stripe", "customer": "cus_a", "tier": "small", "seconds": 3600}
    ]

    # The uniqueness window is 24 h: afterwards the identifier is accepted again.
    advance(sandbox_clean, 25 * HOUR)
    send(stripe_client, "cus_a", 100, noon, "tally:org-a:d1:small:1")
    assert usage(sandbox_clean, day)[0]["seconds"] == 3700


def test_meter_event_timestamp_window(stripe_client, stripe_spec, sandbox_clean):
    tier_meter(stripe_client)
    now = int(sandbox_clean.state.now())
    with pytest.raises(stripe.InvalidRequestError) as old:
        send(stripe_client, "cus_a", 1, now - 35 * DAY - HOUR, "old")
    assert (old.value.http_status, old.value.code) == (400, "timestamp_too_far_in_past")
    assert old.value.param == "timestamp"
    stripe_spec.schema("error", old.value.json_body)
    with pytest.raises(stripe.InvalidRequestError) as future:
        send(stripe_client, "cus_a", 1, now + 10 * 60, "future")
    assert (future.value.http_status, future.value.code) == (400, "timestamp_in_future")

    send(stripe_client, "cus_a", 1, now - 34 * DAY, "recent-enough")
    send(stripe_client, "cus_a", 1, now + 4 * 60, "slightly-ahead")
    # The window follows the injectable clock: 36 days later the same timestamp is too old.
    advance(sandbox_clean, 2 * DAY)
    with pytest.raises(stripe.InvalidRequestError) as later:
        send(stripe_client, "cus_a", 1, now - 34 * DAY, "recent-enough-2")
    assert later.value.code == "timestamp_too_far_in_past"


def test_meter_event_validation_errors(stripe_client, sandbox_clean):
    tier_meter(stripe_client)
    _, noon = yesterday_noon(sandbox_clean)
    with pytest.raises(stripe.InvalidRequestError) as no_meter:
        send(stripe_client, "cus_a", 1, noon, "x1", tier="gpu")
    assert (no_meter.value.http_status, no_meter.value.code) == (400, "no_meter")
    with pytest.raises(stripe.InvalidRequestError) as no_customer:
        stripe_client.v1.billing.meter_events.create(
            {"event_name": "tally_instance_seconds_small", "payload": {"value": "5"}}
        )
    assert no_customer.value.code == "meter_event_no_customer_defined"
    with pytest.raises(stripe.InvalidRequestError) as bad_value:
        send_raw_value(stripe_client, "1.5")
    assert bad_value.value.code == "meter_event_invalid_value"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.billing.meter_events.create({"event_name": "tally_instance_seconds_small"})
    assert (missing.value.code, missing.value.param) == ("parameter_missing", "payload")


def send_raw_value(client: stripe.StripeClient, value: str) -> None:
    client.v1.billing.meter_events.create(
        {
            "event_name": "tally_instance_seconds_small",
            "payload": {"stripe_customer_id": "cus_a", "value": value},
        }
    )


def test_cancel_within_24_hours_only(stripe_client, stripe_spec, sandbox_clean):
    meter = tier_meter(stripe_client)
    day, noon = yesterday_noon(sandbox_clean)
    send(stripe_client, "cus_a", 500, noon, "ev-1")
    send(stripe_client, "cus_a", 700, noon, "ev-2")

    adjustment = stripe_client.v1.billing.meter_event_adjustments.create(
        {
            "event_name": "tally_instance_seconds_small",
            "type": "cancel",
            "cancel": {"identifier": "ev-1"},
        }
    )
    assert adjustment.object == "billing.meter_event_adjustment"
    assert adjustment.cancel.identifier == "ev-1"
    assert adjustment.type == "cancel"
    stripe_spec.response("/v1/billing/meter_event_adjustments", "post", 200, adjustment.to_dict())
    summaries = stripe_client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": "cus_a", "start_time": day, "end_time": day + DAY}
    )
    assert summaries.data[0].aggregated_value == 700
    assert usage(sandbox_clean, day)[0]["seconds"] == 700

    advance(sandbox_clean, 25 * HOUR)
    with pytest.raises(stripe.InvalidRequestError) as late:
        stripe_client.v1.billing.meter_event_adjustments.create(
            {
                "event_name": "tally_instance_seconds_small",
                "type": "cancel",
                "cancel": {"identifier": "ev-2"},
            }
        )
    assert late.value.http_status == 400
    assert "24 hours" in str(late.value.user_message)
    assert usage(sandbox_clean, day)[0]["seconds"] == 700
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        stripe_client.v1.billing.meter_event_adjustments.create(
            {
                "event_name": "tally_instance_seconds_small",
                "type": "cancel",
                "cancel": {"identifier": "never-sent"},
            }
        )
    assert unknown.value.param == "cancel[identifier]"


def test_fully_cancelled_usage_disappears(stripe_client, sandbox_clean):
    tier_meter(stripe_client)
    day, noon = yesterday_noon(sandbox_clean)
    send(stripe_client, "cus_a", 42, noon, "only")
    cancel = {
        "event_name": "tally_instance_seconds_small",
        "type": "cancel",
        "cancel": {"identifier": "only"},
    }
    stripe_client.v1.billing.meter_event_adjustments.create(cancel)
    stripe_client.v1.billing.meter_event_adjustments.create(cancel)  # second cancel: no-op
    assert usage(sandbox_clean, day) == []


def test_event_summaries_windows_and_pagination(stripe_client, stripe_spec, sandbox_clean):
    meter = tier_meter(stripe_client)
    now = int(sandbox_clean.state.now())
    start = now - now % DAY - 5 * DAY
    for offset, value in ((0, 10), (2, 20), (3, 30)):
        send(stripe_client, "cus_a", value, start + offset * DAY + 12 * HOUR, f"e{offset}")
    send(stripe_client, "cus_a", 5, start + 2 * DAY + 13 * HOUR, "e2b")
    send(stripe_client, "cus_b", 999, start + 2 * DAY + 12 * HOUR, "other-customer")
    summaries = stripe_client.v1.billing.meters.event_summaries

    with pytest.raises(stripe.InvalidRequestError) as no_customer:
        summaries.list(meter.id, {"start_time": start, "end_time": start + DAY})
    assert (no_customer.value.code, no_customer.value.param) == ("parameter_missing", "customer")
    with pytest.raises(stripe.InvalidRequestError) as misaligned:
        summaries.list(
            meter.id,
            {
                "customer": "cus_a",
                "start_time": start + HOUR,
                "end_time": start + DAY,
                "value_grouping_window": "day",
            },
        )
    assert misaligned.value.param == "start_time"
    with pytest.raises(stripe.InvalidRequestError) as minute:
        summaries.list(
            meter.id, {"customer": "cus_a", "start_time": start + 30, "end_time": start + DAY}
        )
    assert minute.value.param == "start_time"

    whole = summaries.list(
        meter.id, {"customer": "cus_a", "start_time": start, "end_time": start + 5 * DAY}
    )
    assert [(s.start_time, s.end_time, s.aggregated_value) for s in whole.data] == [
        (start, start + 5 * DAY, 65)
    ]
    stripe_spec.response("/v1/billing/meters/{id}/event_summaries", "get", 200, whole.to_dict())

    params = {
        "customer": "cus_a",
        "start_time": start,
        "end_time": start + 5 * DAY,
        "value_grouping_window": "day",
        "limit": 2,
    }
    page = summaries.list(meter.id, params)
    assert [(s.start_time, s.aggregated_value) for s in page.data] == [
        (start + 3 * DAY, 30),
        (start + 2 * DAY, 25),
    ]
    assert page.has_more is True
    assert all(s.end_time - s.start_time == DAY for s in page.data)
    stripe_spec.response("/v1/billing/meters/{id}/event_summaries", "get", 200, page.to_dict())
    following = summaries.list(meter.id, {**params, "starting_after": page.data[-1].id})
    assert [(s.start_time, s.aggregated_value) for s in following.data] == [(start, 10)]
    assert following.has_more is False
    assert [s.aggregated_value for s in page.auto_paging_iter()] == [30, 25, 10]

    hourly = summaries.list(
        meter.id,
        {
            "customer": "cus_a",
            "start_time": start + 2 * DAY,
            "end_time": start + 3 * DAY,
            "value_grouping_window": "hour",
        },
    )
    assert [(s.start_time - start - 2 * DAY, s.aggregated_value) for s in hourly.data] == [
        (13 * HOUR, 5),
        (12 * HOUR, 20),
    ]
    nobody = summaries.list(
        meter.id,
        {
            "customer": "cus_zz",
            "start_time": start,
            "end_time": start + DAY,
            "value_grouping_window": "day",
        },
    )
    assert nobody.data == []


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 86_399), st.integers(0, 10_000)), max_size=12
    )
)
def test_summaries_day_windows_add_up_to_whole_range(sandbox, events):
    sandbox.reset()
    create_customers(sandbox, "stripe", "cus_h")
    client = stripe.StripeClient("sk_test_h", base_addresses=sandbox.stripe_base_addresses)
    meter = tier_meter(client)
    now = int(sandbox.state.now())
    start = now - now % DAY - 7 * DAY
    for i, (day, second, value) in enumerate(events):
        send(client, "cus_h", value, start + day * DAY + second, f"h{i}")
    base = {"customer": "cus_h", "start_time": start, "end_time": start + 7 * DAY}
    whole = client.v1.billing.meters.event_summaries.list(meter.id, base)
    daily = client.v1.billing.meters.event_summaries.list(
        meter.id, {**base, "value_grouping_window": "day", "limit": 100}
    )
    expected_days = {}
    for day, _, value in events:
        expected_days[start + day * DAY] = expected_days.get(start + day * DAY, 0) + value
    assert whole.data[0].aggregated_value == sum(v for _, _, v in events)
    assert {s.start_time: s.aggregated_value for s in daily.data} == expected_days


@settings(max_examples=50, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(["event_name", "identifier", "payload", "metadata", "expand"]),
        st.one_of(
            st.text(min_size=1, max_size=8),
            st.dictionaries(
                st.text("abc_", min_size=1, max_size=5), st.text(max_size=5), max_size=3
            ),
            st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
        ),
        max_size=4,
    )
)
def test_form_decoding_inverts_the_sdk_encoder(params):
    from urllib.parse import urlencode

    body = urlencode(list(_api_encode(params))).encode()
    expected = {k: v for k, v in params.items() if v != {}}
    assert decode_form(body) == expected


def test_idempotency_key_replay_and_conflict(stripe_client, sandbox_clean):
    tier_meter(stripe_client)
    day, noon = yesterday_noon(sandbox_clean)
    first = send(stripe_client, "cus_a", 60, noon, "idem-1", options={"idempotency_key": "k-1"})
    again = send(stripe_client, "cus_a", 60, noon, "idem-1", options={"idempotency_key": "k-1"})
    assert again.to_dict() == first.to_dict()
    assert usage(sandbox_clean, day)[0]["seconds"] == 60  # stored once, no duplicate error

    with pytest.raises(stripe.IdempotencyError) as conflict:
        send(stripe_client, "cus_a", 61, noon, "idem-1", options={"idempotency_key": "k-1"})
    assert conflict.value.http_status == 400

    body = {
        "event_name": "tally_instance_seconds_small",
        "identifier": "idem-2",
        "payload[stripe_customer_id]": "cus_a",
        "payload[value]": "7",
        "timestamp": str(noon),
    }
    headers = {"Authorization": "Bearer sk_test_raw", "Idempotency-Key": "k-2"}
    raw1 = httpx.post(sandbox_clean.url("/v1/billing/meter_events"), data=body, headers=headers)
    raw2 = httpx.post(sandbox_clean.url("/v1/billing/meter_events"), data=body, headers=headers)
    assert raw1.status_code == raw2.status_code == 200
    assert raw1.json() == raw2.json()
    assert raw2.headers["idempotent-replayed"] == "true"
    other = httpx.post(
        sandbox_clean.url("/v1/billing/meter_events"),
        data={**body, "payload[value]": "8"},
        headers=headers,
    )
    assert other.status_code == 400
    assert other.json()["error"]["type"] == "idempotency_error"
    assert usage(sandbox_clean, day)[0]["seconds"] == 67


def test_customers_and_balance_transactions(stripe_client, stripe_spec):
    customer = stripe_client.v1.customers.create({"email": "ops@acme.test", "name": "Acme"})
    assert customer.id.startswith("cus_")
    assert stripe_client.v1.customers.retrieve(customer.id).email == "ops@acme.test"
    mirrored = stripe_client.v1.customers.create({"id": "cus_org42", "name": "Org 42"})
    assert mirrored.id == "cus_org42"
    listed = stripe_client.v1.customers.list({"limit": 10})
    assert [c.id for c in listed.data][:2] == ["cus_org42", customer.id]  # newest first

    credit = stripe_client.v1.customers.balance_transactions.create(
        customer.id,
        {
            "amount": -1250,
            "currency": "usd",
            "description": "tally credit: over-charge",
            "metadata": {"proposal_id": "p-1", "approver": "lead@acme.test"},
        },
    )
    assert credit.object == "customer_balance_transaction"
    assert (credit.amount, credit.ending_balance, credit.type) == (-1250, -1250, "adjustment")
    assert credit.metadata["proposal_id"] == "p-1"
    stripe_spec.response(
        "/v1/customers/{customer}/balance_transactions", "post", 200, credit.to_dict()
    )
    second = stripe_client.v1.customers.balance_transactions.create(
        customer.id, {"amount": -250, "currency": "usd"}
    )
    assert second.ending_balance == -1500
    assert stripe_client.v1.customers.retrieve(customer.id).balance == -1500
    txns = stripe_client.v1.customers.balance_transactions.list(customer.id, {"limit": 1})
    assert [t.id for t in txns.data] == [second.id] and txns.has_more is True
    stripe_spec.response(
        "/v1/customers/{customer}/balance_transactions", "get", 200, txns.to_dict()
    )
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.customers.balance_transactions.create(
            "cus_unknown", {"amount": -1, "currency": "usd"}
        )
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")
    with pytest.raises(stripe.InvalidRequestError) as no_currency:
        stripe_client.v1.customers.balance_transactions.create(customer.id, {"amount": -1})
    assert no_currency.value.param == "currency"


def test_subscriptions_carry_the_plan(stripe_client, stripe_spec, sandbox_clean):
    assert stripe_client.v1.subscriptions.list({"customer": "cus_org1"}).data == []
    sandbox_clean.post(
        "/_sandbox/plans",
        json={"provider": "stripe", "customer": "cus_org1", "plan": "base-plus-usage"},
    ).raise_for_status()
    subs = stripe_client.v1.subscriptions.list({"customer": "cus_org1"})
    assert len(subs.data) == 1
    assert subs.data[0].metadata["plan"] == "base-plus-usage"
    assert subs.data[0].customer == "cus_org1"
    assert subs.data[0].status == "active"
    stripe_spec.response("/v1/subscriptions", "get", 200, subs.to_dict())

    sandbox_clean.post(
        "/_sandbox/plans", json={"provider": "stripe", "customer": "cus_org1", "plan": "usage-only"}
    ).raise_for_status()
    again = stripe_client.v1.subscriptions.list({"customer": "cus_org1"})
    assert again.data[0].id == subs.data[0].id
    assert again.data[0].metadata["plan"] == "usage-only"
    assert stripe_client.v1.subscriptions.list({"status": "canceled"}).data == []


def test_v2_meter_event_stream_and_create(stripe_client, stripe_spec, sandbox_clean):
    tier_meter(stripe_client)
    day, noon = yesterday_noon(sandbox_clean)
    session = stripe_client.v2.billing.meter_event_session.create()
    assert session.authentication_token
    stripe_spec.schema("v2.billing.meter_event_session", session.to_dict())
    stamp = datetime.fromtimestamp(noon, UTC).isoformat()
    event = {
        "event_name": "tally_instance_seconds_small",
        "identifier": "stream-1",
        "payload": {"stripe_customer_id": "cus_s", "value": "30"},
        "timestamp": stamp,
    }
    bad = {"event_name": "no_such_meter", "payload": {"stripe_customer_id": "cus_s", "value": "1"}}
    stripe_client.v2.billing.meter_event_stream.create(
        {"events": [event, event, bad]}, {"api_key": session.authentication_token}
    )
    assert usage(sandbox_clean, day) == [
        {"provider": "stripe", "customer": "cus_s", "tier": "small", "seconds": 30}
    ]
    with pytest.raises(stripe.InvalidRequestError) as dup:
        stripe_client.v2.billing.meter_events.create(event)
    assert (dup.value.http_status, dup.value.code) == (400, "duplicate_meter_event")

    advance(sandbox_clean, 16 * 60)  # session tokens live 15 minutes
    with pytest.raises(stripe.StripeError) as expired:
        stripe_client.v2.billing.meter_event_stream.create(
            {"events": [event]}, {"api_key": session.authentication_token}
        )
    assert expired.value.http_status == 401


def test_authentication_is_required(sandbox_clean, stripe_spec):
    response = httpx.get(sandbox_clean.url("/v1/billing/meters"))
    assert response.status_code == 401
    stripe_spec.schema("error", response.json())
    unknown = httpx.get(
        sandbox_clean.url("/v1/nothing_here"), headers={"Authorization": "Bearer sk_test_x"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.AuthenticationError):
        stripe.StripeClient(
            "", base_addresses=sandbox_clean.stripe_base_addresses
        ).v1.billing.meters.list()
