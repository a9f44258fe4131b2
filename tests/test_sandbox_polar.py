"""The sandbox's Polar API, driven through the real polar-sdk (2026-10) over loopback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from polar import PolarServerError
from polar.base import PolarClientError
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound

DAY = 86_400
HOUR = 3_600
EVENT = "tally.instance_usage"


def at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def usage_event(customer: str, tier: str, seconds: int, ts: float, ident: str) -> dict[str, Any]:
    return {
        "name": EVENT,
        "external_customer_id": customer,
        "external_id": ident,
        "timestamp": at(ts),
        "metadata": {
            "tier": tier,
            "seconds": seconds,
            "usage_date": datetime.fromtimestamp(ts, UTC).date().isoformat(),
        },
    }


def tier_meter(polar: Any, tier: str) -> Any:
    return polar.meters.create(
        name=f"Instance seconds ({tier})",
        filter={
            "conjunction": "and",
            "clauses": [
                {"property": "name", "operator": "eq", "value": EVENT},
                {"property": "metadata.tier", "operator": "eq", "value": tier},
            ],
        },
        aggregation={"func": "sum", "property": "metadata.seconds"},
    )


def days(sandbox: Any, back: int = 3) -> int:
    now = sandbox.state.now()
    return int(now - now % DAY) - back * DAY


def usage(sandbox: Any, ts: float) -> list[dict[str, Any]]:
    date = datetime.fromtimestamp(ts, UTC).date().isoformat()
    return sandbox.get("/_sandbox/usage", params={"date": date}).json()


def as_json(sdk_object: Any) -> Any:
    """An SDK dataclass back to JSON-shaped data (for schema validation)."""
    import dataclasses

    if dataclasses.is_dataclass(sdk_object):
        return {
            f.name: as_json(getattr(sdk_object, f.name)) for f in dataclasses.fields(sdk_object)
        }
    if isinstance(sdk_object, list):
        return [as_json(item) for item in sdk_object]
    if isinstance(sdk_object, dict):
        return {k: as_json(v) for k, v in sdk_object.items()}
    return sdk_object


def test_ingest_counts_inserted_and_permanent_duplicates(polar_client, polar_spec, sandbox_clean):
    day = days(sandbox_clean)
    noon = day + 12 * HOUR
    batch = [
        usage_event("org-a", "small", 3600, noon, "tally:org-a:d:small:1"),
        usage_event("org-b", "gpu", 60, noon, "tally:org-b:d:gpu:1"),
        usage_event("org-a", "small", 3600, noon, "tally:org-a:d:small:1"),  # same batch dup
    ]
    first = polar_client.events.ingest(events=batch)
    assert (first.inserted, first.duplicates) == (2, 1)
    raw = httpx.post(
        sandbox_clean.url("/v1/events/ingest"),
        json={"events": batch},
        headers={"Authorization": "Bearer t"},
    )
    assert raw.status_code == 200
    assert raw.json() == {"inserted": 0, "duplicates": 3}
    polar_spec.response("/v1/events/ingest", "post", 200, raw.json())

    sandbox_clean.post("/_sandbox/clock", json={"advance_seconds": 400 * DAY})
    later = polar_client.events.ingest(events=batch[:1])
    assert (later.inserted, later.duplicates) == (0, 1)  # dedupe by external_id is permanent
    assert usage(sandbox_clean, noon) == [
        {"provider": "polar", "customer": "org-a", "tier": "small", "seconds": 3600},
        {"provider": "polar", "customer": "org-b", "tier": "gpu", "seconds": 60},
    ]


def test_future_timestamp_rejects_the_whole_batch(polar_client, polar_spec, sandbox_clean):
    now = sandbox_clean.state.now()
    good = usage_event("org-a", "small", 10, now - HOUR, "ok-1")
    future = usage_event("org-a", "small", 10, now + HOUR, "future-1")
    with pytest.raises(HTTPValidationError) as rejected:
        polar_client.events.ingest(events=[good, future])
    assert rejected.value.status_code == 422
    detail = rejected.value.error.detail
    assert [d.loc[-1] for d in detail] == ["timestamp"]
    assert detail[0].loc[:3] == ["body", "events", 1]
    assert "past" in detail[0].msg
    assert usage(sandbox_clean, now - HOUR) == []  # nothing from the batch was stored

    raw = httpx.post(
        sandbox_clean.url("/v1/events/ingest"),
        json={"events": [future]},
        headers={"Authorization": "Bearer t"},
    )
    assert raw.status_code == 422
    polar_spec.response("/v1/events/ingest", "post", 422, raw.json())
    # A small clock skew is tolerated.
    skewed = polar_client.events.ingest(events=[usage_event("org-a", "small", 1, now + 1, "s")])
    assert skewed.inserted == 1


def test_unknown_customer_id_rejects_the_batch(polar_client, sandbox_clean):
    now = sandbox_clean.state.now()
    known = polar_client.customers.create(email="a@org-a.test", external_id="org-a")
    ok = {
        "name": EVENT,
        "customer_id": known.id,
        "external_id": "c-1",
        "timestamp": at(now - 60),
        "metadata": {"tier": "small", "seconds": 5},
    }
    unknown = {**ok, "customer_id": "00000000-0000-4000-8000-000000000000", "external_id": "c-2"}
    with pytest.raises(HTTPValidationError) as rejected:
        polar_client.events.ingest(events=[ok, unknown])
    assert rejected.value.error.detail[0].loc == ["body", "events", 1, "customer_id"]
    assert polar_client.events.ingest(events=[ok]).inserted == 1
    # An event sent by Polar customer id counts for the customer's external id.
    assert usage(sandbox_clean, now - 60) == [
        {"provider": "polar", "customer": "org-a", "tier": "small", "seconds": 5}
    ]


def test_meters_create_list_get(polar_client, polar_spec, sandbox_clean):
    created = [tier_meter(polar_client, t) for t in ("small", "medium", "large", "gpu")]
    meter = created[0]
    assert meter.aggregation.func == "sum"
    assert meter.aggregation.property == "seconds"  # Polar strips the metadata. prefix
    assert meter.filter.clauses[1].property == "tier"
    raw = httpx.post(
        sandbox_clean.url("/v1/meters/"),
        json={
            "name": "by count",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "count"},
        },
        headers={"Authorization": "Bearer t"},
    )
    assert raw.status_code == 201
    polar_spec.response("/v1/meters/", "post", 201, raw.json())

    page = polar_client.meters.list(limit=3)
    assert page.pagination.total_count == 5 and page.pagination.max_page == 2
    assert [m.name for m in page.items] == sorted(m.name for m in page.items)
    polar_spec.response("/v1/meters/", "get", 200, as_json(page))
    assert len(list(polar_client.meters.iter_list(limit=2))) == 5
    assert polar_client.meters.get(meter.id).name == meter.name
    polar_spec.response("/v1/meters/{id}", "get", 200, as_json(polar_client.meters.get(meter.id)))
    with pytest.raises(ResourceNotFound) as missing:
        polar_client.meters.get("00000000-0000-4000-8000-000000000000")
    assert missing.value.status_code == 404
    with pytest.raises(HTTPValidationError):
        polar_client.meters.create(
            name="x", filter={"conjunction": "and", "clauses": []}, aggregation={"func": "sum"}
        )


def test_quantities_many_customers_buckets_include_the_end(polar_client, polar_spec, sandbox_clean):
    day1 = days(sandbox_clean, 3)
    day2 = day1 + DAY
    small = tier_meter(polar_client, "small")
    polar_client.events.ingest(
        events=[
            usage_event("org-a", "small", 100, day1 + 12 * HOUR, "a1"),
            usage_event("org-a", "small", 50, day2 + 12 * HOUR, "a2"),
            usage_event("org-b", "small", 30, day2 + 13 * HOUR, "b2"),
            usage_event("org-c", "small", 1000, day2 + 12 * HOUR, "c2"),
            usage_event("org-a", "medium", 7, day2 + 12 * HOUR, "a2m"),
        ]
    )
    # end = day2 00:00 exactly: the bucket of the end is included (generate_series semantics).
    both = polar_client.meters.quantities(
        small.id,
        start_timestamp=at(day1),
        end_timestamp=at(day2),
        interval="day",
        external_customer_id=["org-a", "org-b"],
    )
    assert [(q.timestamp, q.quantity) for q in both.quantities] == [
        (at(day1).replace("+00:00", "Z"), 100.0),
        (at(day2).replace("+00:00", "Z"), 80.0),
    ]
    assert both.total == 180.0
    polar_spec.response("/v1/meters/{id}/quantities", "get", 200, as_json(both))

    everyone = polar_client.meters.quantities(
        small.id, start_timestamp=at(day1), end_timestamp=at(day2 + HOUR), interval="day"
    )
    assert [q.quantity for q in everyone.quantities] == [100.0, 1080.0]
    hourly = polar_client.meters.quantities(
        small.id,
        start_timestamp=at(day2 + 12 * HOUR),
        end_timestamp=at(day2 + 13 * HOUR),
        interval="hour",
        external_customer_id="org-b",
    )
    assert [q.quantity for q in hourly.quantities] == [0.0, 30.0]
    monthly = polar_client.meters.quantities(
        small.id,
        start_timestamp=at(day1),
        end_timestamp=at(day2),
        interval="month",
        external_customer_id=["org-a", "org-c"],
    )
    assert monthly.total == 1150.0
    assert sum(q.quantity for q in monthly.quantities) == 1150.0
    per_customer_max = polar_client.meters.quantities(
        small.id,
        start_timestamp=at(day2),
        end_timestamp=at(day2),
        interval="day",
        customer_aggregation_function="max",
    )
    assert per_customer_max.quantities[0].quantity == 1000.0

    customer = polar_client.customers.create(email="b@org-b.test", external_id="org-b")
    by_id = polar_client.meters.quantities(
        small.id,
        start_timestamp=at(day1),
        end_timestamp=at(day2),
        interval="day",
        customer_id=[customer.id],
    )
    assert by_id.total == 30.0

    with pytest.raises(HTTPValidationError) as bad:
        polar_client.meters.quantities(
            small.id, start_timestamp="yesterday", end_timestamp=at(day2), interval="day"
        )
    assert bad.value.error.detail[0].loc == ["query", "start_timestamp"]


def test_meter_created_after_events_counts_them(polar_client, sandbox_clean):
    day = days(sandbox_clean, 2)
    polar_client.events.ingest(events=[usage_event("org-a", "gpu", 90, day + HOUR, "early")])
    gpu = tier_meter(polar_client, "gpu")
    result = polar_client.meters.quantities(
        gpu.id, start_timestamp=at(day), end_timestamp=at(day), interval="day"
    )
    assert result.total == 90.0


def test_customers(polar_client, polar_spec, sandbox_clean):
    created = polar_client.customers.create(
        email="ops@acme.test", external_id="org-acme", name="Acme"
    )
    assert created.external_id == "org-acme"
    assert polar_client.customers.get_external("org-acme").id == created.id
    assert polar_client.customers.get(created.id).email == "ops@acme.test"
    raw = httpx.post(
        sandbox_clean.url("/v1/customers/"),
        json={"email": "x@y.test", "external_id": "org-x"},
        headers={"Authorization": "Bearer t"},
    )
    assert raw.status_code == 201
    polar_spec.response("/v1/customers/", "post", 201, raw.json())
    listing = polar_client.customers.list(limit=10)
    assert [c.external_id for c in listing.items] == ["org-x", "org-acme"]
    polar_spec.response("/v1/customers/", "get", 200, as_json(listing))
    polar_spec.response(
        "/v1/customers/external/{external_id}",
        "get",
        200,
        as_json(polar_client.customers.get_external("org-x")),
    )
    with pytest.raises(HTTPValidationError):
        polar_client.customers.create(email="other@acme.test", external_id="org-acme")
    with pytest.raises(ResourceNotFound):
        polar_client.customers.get_external("org-nobody")


def test_subscriptions_carry_the_plan(polar_client, polar_spec, sandbox_clean):
    assert polar_client.subscriptions.list(external_customer_id="org-a").items == []
    sandbox_clean.post(
        "/_sandbox/plans",
        json=[
            {"provider": "polar", "customer": "org-a", "plan": "base-plus-usage"},
            {"provider": "polar", "customer": "org-b", "plan": "free-tier"},
        ],
    ).raise_for_status()
    subs = polar_client.subscriptions.list(external_customer_id=["org-a"])
    assert len(subs.items) == 1
    sub = subs.items[0]
    assert sub.product.name == "base-plus-usage"
    assert sub.metadata["plan"] == "base-plus-usage"
    assert sub.customer.external_id == "org-a"
    assert sub.status == "active"
    polar_spec.response("/v1/subscriptions/", "get", 200, as_json(subs))
    assert polar_client.subscriptions.list().pagination.total_count == 2
    assert polar_client.customers.get_external("org-b").email == "org-b@sandbox.invalid"


def test_events_list(polar_client, polar_spec, sandbox_clean):
    now = sandbox_clean.state.now()
    polar_client.events.ingest(
        events=[
            usage_event("org-a", "small", 1, now - 2 * HOUR, "l1"),
            usage_event("org-b", "small", 2, now - HOUR, "l2"),
        ]
    )
    listed = polar_client.events.list(external_customer_id="org-b")
    assert [e.metadata["seconds"] for e in listed.items] == [2]
    everything = httpx.get(sandbox_clean.url("/v1/events/"), headers={"Authorization": "Bearer t"})
    assert [e["external_customer_id"] for e in everything.json()["items"]] == ["org-b", "org-a"]
    polar_spec.response("/v1/events/", "get", 200, everything.json())


def test_authentication_and_unknown_routes(sandbox_clean, polar_client):
    response = httpx.get(sandbox_clean.url("/v1/meters/"))
    assert response.status_code == 401
    unknown = httpx.get(
        sandbox_clean.url("/v1/meters/x/nope"), headers={"Authorization": "Bearer t"}
    )
    assert unknown.status_code == 404
    # The SDK surfaces non-documented errors as client errors, 5xx as server errors.
    assert issubclass(PolarServerError, Exception) and issubclass(PolarClientError, Exception)
    assert polar_client.meters.list().items == []


def test_quantities_window_edge_dates(polar_client, sandbox_clean):
    """Buckets truncate both ends: an end mid-day still includes that whole day."""
    day = days(sandbox_clean, 4)
    meter = tier_meter(polar_client, "large")
    polar_client.events.ingest(
        events=[
            usage_event("org-a", "large", 5, day + 23 * HOUR, "late"),
            usage_event("org-a", "large", 6, day + DAY + 22 * HOUR, "next-late"),
        ]
    )
    result = polar_client.meters.quantities(
        meter.id,
        start_timestamp=at(day + 20 * HOUR),
        end_timestamp=at(day + DAY + HOUR),
        interval="day",
    )
    assert [q.quantity for q in result.quantities] == [5.0, 6.0]
    week = polar_client.meters.quantities(
        meter.id,
        start_timestamp=at(day),
        end_timestamp=at(day + DAY),
        interval="week",
    )
    assert week.total == 11.0
    first_monday = datetime.fromtimestamp(day, UTC) - timedelta(
        days=datetime.fromtimestamp(day, UTC).weekday()
    )
    assert week.quantities[0].timestamp == first_monday.isoformat().replace("+00:00", "Z")
