"""The sandbox's /_sandbox admin contract, fault injection, rate limits, clock, server."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import stripe
from polar import PolarServerError
from polar.base import PolarRateLimitError
from sandbox_fixture import create_customers

from resources.sandbox.app import create_app
from resources.sandbox.testing import running_sandbox

DAY = 86_400
HOUR = 3_600
AUTH = {"Authorization": "Bearer sk_test_admin"}


def iso_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def yesterday(sandbox) -> int:
    now = int(sandbox.state.now())
    return now - now % DAY - DAY


def small_meter(client: stripe.StripeClient) -> stripe.billing.Meter:
    return client.v1.billing.meters.create(
        {
            "display_name": "small",
            "event_name": "tally_instance_seconds_small",
            "default_aggregation": {"formula": "sum"},
        }
    )


def stripe_event(
    client: stripe.StripeClient, ident: str, ts: int, value: int = 60, customer: str = "cus_a"
) -> stripe.billing.MeterEvent:
    return client.v1.billing.meter_events.create(
        {
            "event_name": "tally_instance_seconds_small",
            "identifier": ident,
            "timestamp": ts,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
        }
    )


def polar_event(ident: str, ts: float, seconds: int = 60, customer: str = "org-a") -> dict:
    return {
        "name": "tally.instance_usage",
        "external_customer_id": customer,
        "external_id": ident,
        "timestamp": datetime.fromtimestamp(ts, UTC).isoformat(),
        "metadata": {"tier": "small", "seconds": seconds, "usage_date": iso_date(ts)},
    }


def faults(sandbox, **config) -> dict:
    response = sandbox.post("/_sandbox/faults", json=config)
    response.raise_for_status()
    return response.json()


@pytest.fixture(autouse=True)
def _known_customers(request):
    """Stripe counts meter events only for customers that exist: these tests' do."""
    if {"sandbox_clean", "stripe_client"} & set(request.fixturenames):
        create_customers(request.getfixturevalue("sandbox_clean"), "stripe", "cus_a")


def test_injected_usage_is_visible_everywhere(sandbox_clean, stripe_client, polar_client):
    day = yesterday(sandbox_clean)
    date = iso_date(day)
    polar_meter = polar_client.meters.create(
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
    rows = [
        {"provider": "stripe", "customer": "cus_a", "tier": "small", "seconds": 3600, "date": date},
        {"provider": "stripe", "customer": "cus_a", "tier": "small", "seconds": 3600, "date": date},
        {"provider": "stripe", "customer": "cus_a", "tier": "gpu", "seconds": 60, "date": date},
        {"provider": "polar", "customer": "org-a", "tier": "small", "seconds": 120, "date": date},
    ]
    assert sandbox_clean.post("/_sandbox/events", json=rows).json() == {"inserted": 4}
    assert sandbox_clean.get("/_sandbox/usage", params={"date": date}).json() == [
        {"provider": "polar", "customer": "org-a", "tier": "small", "seconds": 120},
        {"provider": "stripe", "customer": "cus_a", "tier": "gpu", "seconds": 60},
        {"provider": "stripe", "customer": "cus_a", "tier": "small", "seconds": 7200},
    ]
    assert sandbox_clean.get("/_sandbox/usage", params={"date": iso_date(day - DAY)}).json() == []

    meters = {m.event_name: m for m in stripe_client.v1.billing.meters.list().data}
    assert set(meters) == {"tally_instance_seconds_small", "tally_instance_seconds_gpu"}
    summary = stripe_client.v1.billing.meters.event_summaries.list(
        meters["tally_instance_seconds_small"].id,
        {
            "customer": "cus_a",
            "start_time": day,
            "end_time": day + DAY,
            "value_grouping_window": "day",
        },
    )
    assert [s.aggregated_value for s in summary.data] == [7200]
    stamp = datetime.fromtimestamp(day, UTC).isoformat()
    quantities = polar_client.meters.quantities(
        polar_meter.id,
        start_timestamp=stamp,
        end_timestamp=stamp,
        interval="day",
        external_customer_id="org-a",
    )
    assert quantities.total == 120.0


def test_admin_rejects_bad_input(sandbox_clean):
    assert sandbox_clean.get("/_sandbox/usage").status_code == 400
    assert sandbox_clean.get("/_sandbox/usage", params={"date": "2025-13-01"}).status_code == 400
    bad_rows = [
        {"provider": "paypal", "customer": "c", "tier": "t", "seconds": 1, "date": "2025-01-01"}
    ]
    response = sandbox_clean.post("/_sandbox/events", json=bad_rows)
    assert response.status_code == 400 and "provider" in response.json()["error"]
    assert (
        sandbox_clean.post(
            "/_sandbox/events",
            json=[
                {
                    "provider": "stripe",
                    "customer": "c",
                    "tier": "t",
                    "seconds": "x",
                    "date": "2025-01-01",
                }
            ],
        ).status_code
        == 400
    )
    assert sandbox_clean.post("/_sandbox/faults", json={"error_rate": 2}).status_code == 400
    assert sandbox_clean.post("/_sandbox/clock", json={"later": 1}).status_code == 400
    assert sandbox_clean.post("/_sandbox/plans", json={"provider": "stripe"}).status_code == 400


def test_error_rate_fails_provider_calls_but_never_admin(
    sandbox_clean, stripe_client, polar_client, stripe_spec
):
    small_meter(stripe_client)
    day = yesterday(sandbox_clean)
    assert faults(sandbox_clean, error_rate=1.0)["error_rate"] == 1.0
    with pytest.raises(stripe.APIError) as failed:
        stripe_event(stripe_client, "e-1", day + 12 * HOUR)
    assert failed.value.http_status == 500
    stripe_spec.schema("error", failed.value.json_body)
    with pytest.raises(PolarServerError) as polar_failed:
        polar_client.events.ingest(events=[polar_event("p-1", day + 12 * HOUR)])
    assert polar_failed.value.status_code == 500
    assert sandbox_clean.get("/_sandbox/usage", params={"date": iso_date(day)}).json() == []
    stats = sandbox_clean.get("/_sandbox/stats").json()
    assert stats["providers"]["stripe"]["server_errors"] == 1
    assert stats["providers"]["polar"]["server_errors"] == 1
    assert stats["server_errors_total"] == 2

    faults(sandbox_clean, error_rate=0)
    assert stripe_event(stripe_client, "e-1", day + 12 * HOUR).identifier == "e-1"


def test_drop_after_store_keeps_the_event_and_fails_the_answer(
    sandbox_clean, stripe_client, polar_client
):
    small_meter(stripe_client)
    day = yesterday(sandbox_clean)
    date = iso_date(day)
    faults(sandbox_clean, drop_after_store_rate=1.0)
    with pytest.raises(stripe.APIError) as lost:
        stripe_event(stripe_client, "tally:o:d:small:1", day + 12 * HOUR, 500)
    assert lost.value.http_status == 500
    with pytest.raises(PolarServerError):
        polar_client.events.ingest(events=[polar_event("tally:p:d:small:1", day + 12 * HOUR, 70)])
    assert sandbox_clean.get("/_sandbox/usage", params={"date": date}).json() == [
        {"provider": "polar", "customer": "org-a", "tier": "small", "seconds": 70},
        {"provider": "stripe", "customer": "cus_a", "tier": "small", "seconds": 500},
    ]
    assert (
        sandbox_clean.get("/_sandbox/stats").json()["providers"]["stripe"]["dropped_after_store"]
        == 1
    )

    faults(sandbox_clean, drop_after_store_rate=0.0)
    with pytest.raises(stripe.InvalidRequestError) as resent:  # the resend is a duplicate
        stripe_event(stripe_client, "tally:o:d:small:1", day + 12 * HOUR, 500)
    assert "already exists" in str(resent.value.user_message)
    again = polar_client.events.ingest(events=[polar_event("tally:p:d:small:1", day + 12 * HOUR)])
    assert (again.inserted, again.duplicates) == (0, 1)


def test_drop_after_store_then_idempotent_replay(sandbox_clean, stripe_client):
    small_meter(stripe_client)
    day = yesterday(sandbox_clean)
    body = {
        "event_name": "tally_instance_seconds_small",
        "identifier": "replayed",
        "payload[stripe_customer_id]": "cus_a",
        "payload[value]": "9",
        "timestamp": str(day + 12 * HOUR),
    }
    headers = {**AUTH, "Idempotency-Key": "retry-me"}
    faults(sandbox_clean, drop_after_store_rate=1.0)
    first = httpx.post(sandbox_clean.url("/v1/billing/meter_events"), data=body, headers=headers)
    assert first.status_code == 500
    faults(sandbox_clean, drop_after_store_rate=0.0)
    retry = httpx.post(sandbox_clean.url("/v1/billing/meter_events"), data=body, headers=headers)
    assert retry.status_code == 200
    assert retry.json()["identifier"] == "replayed"
    assert retry.headers["idempotent-replayed"] == "true"


def test_rate_limit_answers_429_with_integer_retry_after(
    sandbox_clean, stripe_client, polar_client, stripe_spec
):
    faults(sandbox_clean, stripe_rate_limit_per_s=1)
    assert stripe_client.v1.billing.meters.list().data == []
    with pytest.raises(stripe.RateLimitError) as limited:
        stripe_client.v1.billing.meters.list()
    assert limited.value.http_status == 429
    assert int(limited.value.headers["retry-after"]) >= 1
    stripe_spec.schema("error", limited.value.json_body)
    raw = httpx.get(sandbox_clean.url("/v1/billing/meters"), headers=AUTH)
    assert raw.status_code == 429 and raw.headers["retry-after"].isdigit()
    assert polar_client.meters.list().items == []  # Polar has its own (unlimited) bucket
    assert sandbox_clean.get("/_sandbox/stats").json()["providers"]["stripe"]["rate_limited"] == 2

    faults(sandbox_clean, rate_limit_per_s=1)
    polar_client.meters.list()
    with pytest.raises(PolarRateLimitError) as polar_limited:
        polar_client.meters.list()
    assert polar_limited.value.status_code == 429
    assert isinstance(polar_limited.value.retry_after, int) and polar_limited.value.retry_after >= 1
    for _ in range(5):  # admin endpoints are never limited
        assert sandbox_clean.get("/_sandbox/stats").status_code == 200

    faults(sandbox_clean, rate_limit_per_s=None)
    assert len([stripe_client.v1.billing.meters.list() for _ in range(5)]) == 5


def test_latency_slows_provider_answers(sandbox_clean, stripe_client):
    # Half a second: far above what an unslowed loopback request takes even on a
    # loaded machine, so the admin endpoint's bound is about latency, not load.
    faults(sandbox_clean, latency_ms=500)
    started = time.monotonic()
    stripe_client.v1.billing.meters.list()
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    sandbox_clean.get("/_sandbox/stats")
    assert time.monotonic() - started < 0.5


def test_seeded_faults_are_deterministic(sandbox_clean):
    def outcomes() -> list[int]:
        faults(sandbox_clean, error_rate=0.5, seed=1234)
        with httpx.Client(base_url=sandbox_clean.base_url, headers=AUTH) as client:
            return [client.get("/v1/billing/meters").status_code for _ in range(24)]

    first = outcomes()
    assert set(first) == {200, 500}
    sandbox_clean.reset()
    assert outcomes() == first
    assert faults(sandbox_clean)["seed"] == 1234


def test_reset_clears_state_faults_and_clock(sandbox_clean, stripe_client):
    small_meter(stripe_client)
    faults(sandbox_clean, error_rate=1.0, rate_limit_per_s=5)
    sandbox_clean.post("/_sandbox/clock", json={"advance_seconds": 3 * DAY})
    sandbox_clean.reset()
    assert sandbox_clean.get("/_sandbox/faults").json() == {
        "error_rate": 0.0,
        "drop_after_store_rate": 0.0,
        "latency_ms": 0.0,
        "processing_delay_s": 0.0,
        "stripe_rate_limit_per_s": None,
        "polar_rate_limit_per_s": None,
        "seed": None,
    }
    assert stripe_client.v1.billing.meters.list().data == []
    assert sandbox_clean.get("/_sandbox/clock").json()["offset_seconds"] == 0
    assert sandbox_clean.get("/_sandbox/stats").json()["requests_total"] == 1


def test_clock_endpoint_moves_the_injectable_clock(sandbox_clean):
    before = sandbox_clean.get("/_sandbox/clock").json()["now"]
    moved = sandbox_clean.post("/_sandbox/clock", json={"advance_seconds": 2 * DAY}).json()
    assert moved["offset_seconds"] == 2 * DAY
    assert moved["now"] - before >= 2 * DAY
    pinned = sandbox_clean.post("/_sandbox/clock", json={"now": 1_700_000_000}).json()
    assert abs(pinned["now"] - 1_700_000_000) < 5
    sandbox_clean.state.set_clock_offset(0)
    assert sandbox_clean.get("/_sandbox/clock").json()["offset_seconds"] == 0


def test_create_app_uses_the_injected_clock():
    fake_now = [1_750_000_000.0]
    app = create_app(clock=lambda: fake_now[0])

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
            form = {
                "display_name": "small",
                "event_name": "tally_instance_seconds_small",
                "default_aggregation[formula]": "sum",
            }
            meter = await client.post("/v1/billing/meters", data=form, headers=AUTH)
            event = {
                "event_name": "tally_instance_seconds_small",
                "identifier": "clocked",
                "payload[stripe_customer_id]": "cus_a",
                "payload[value]": "5",
                "timestamp": str(1_750_000_000 - 10 * DAY),
            }
            sent = await client.post("/v1/billing/meter_events", data=event, headers=AUTH)
            fake_now[0] += 25 * HOUR
            cancel = {
                "event_name": "tally_instance_seconds_small",
                "type": "cancel",
                "cancel[identifier]": "clocked",
            }
            late = await client.post(
                "/v1/billing/meter_event_adjustments", data=cancel, headers=AUTH
            )
            return [meter, sent, late]

    meter, sent, late = asyncio.run(scenario())
    assert meter.json()["created"] == 1_750_000_000
    assert sent.status_code == 200
    assert late.status_code == 400 and "24 hours" in late.json()["error"]["message"]
    assert app.state.sandbox.now() == fake_now[0]


def test_running_sandbox_with_injected_clock():
    with running_sandbox(clock=lambda: 1_600_000_000.0) as sandbox:
        assert sandbox.base_url.startswith("http://127.0.0.1:")
        assert sandbox.get("/_sandbox/clock").json()["now"] == 1_600_000_000.0
        assert sandbox.state is sandbox.app.state.sandbox
    with pytest.raises(httpx.ConnectError):
        httpx.get(sandbox.url("/_sandbox/health"))


def test_shared_paths_go_to_the_right_provider(sandbox_clean):
    stripe_list = httpx.get(sandbox_clean.url("/v1/customers"), headers=AUTH).json()
    assert stripe_list["object"] == "list"
    polar_list = httpx.get(sandbox_clean.url("/v1/customers/"), headers=AUTH).json()
    assert set(polar_list) == {"items", "pagination"}
    polar_subs = httpx.get(
        sandbox_clean.url("/v1/subscriptions"), headers={**AUTH, "Polar-Version": "2026-10"}
    ).json()
    assert "pagination" in polar_subs
    counts = sandbox_clean.get("/_sandbox/stats").json()["providers"]
    assert counts["stripe"]["endpoints"] == {"GET /v1/customers": 1}
    assert counts["polar"]["endpoints"] == {"GET /v1/customers/": 1, "GET /v1/subscriptions/": 1}


def test_serve_runs_a_blocking_server():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from resources.sandbox.server import serve; serve('127.0.0.1', {port})"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=repo, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until uvicorn reports it is listening
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("the sandbox server exited before listening")
        health = httpx.get(f"http://127.0.0.1:{port}/_sandbox/health")
        assert health.json() == {"ok": True}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_stripe_saves_a_500_per_idempotency_key_and_replays_it(sandbox_clean, stripe_client):
    """As Stripe does: the answer to a keyed request, a 500 included, is replayed to
    every retry with that key (24 h of sandbox time); a new key is a new request."""
    small_meter(stripe_client)
    form = {
        "event_name": "tally_instance_seconds_small",
        "identifier": "saved-500",
        "timestamp": str(int(time.time()) - 3600),
        "payload[stripe_customer_id]": "cus_a",
        "payload[value]": "60",
    }
    with httpx.Client(base_url=sandbox_clean.base_url, headers=AUTH) as client:
        faults(sandbox_clean, error_rate=1.0)
        first = client.post(
            "/v1/billing/meter_events", data=form, headers={"Idempotency-Key": "k1"}
        )
        assert first.status_code == 500
        faults(sandbox_clean, error_rate=0)
        again = client.post(
            "/v1/billing/meter_events", data=form, headers={"Idempotency-Key": "k1"}
        )
        assert again.status_code == 500 and again.headers.get("Idempotent-Replayed") == "true"
        fresh = client.post(
            "/v1/billing/meter_events", data=form, headers={"Idempotency-Key": "k2"}
        )
        assert fresh.status_code == 200
        sandbox_clean.post("/_sandbox/clock", json={"advance_seconds": 86_401}).raise_for_status()
        expired = client.post(
            "/v1/billing/meter_events", data=form, headers={"Idempotency-Key": "k1"}
        )
        assert expired.headers.get("Idempotent-Replayed") != "true"
