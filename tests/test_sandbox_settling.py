"""The sandbox processes Stripe meter events and cancels asynchronously
(`processing_delay_s`), and Polar answers 429 with an empty body: over HTTP,
with the real SDKs."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
import stripe
from polar.base import PolarRateLimitError
from sandbox_fixture import create_customers
from test_sandbox_stripe import DAY, HOUR, advance, send, tier_meter, usage

DELAY = 600


def noon_yesterday(sandbox) -> int:
    now = int(sandbox.state.now())
    return now - now % DAY - DAY + 12 * HOUR


def summary_total(client: stripe.StripeClient, meter_id: str, customer: str, day: int) -> int:
    page = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": customer, "start_time": day, "end_time": day + DAY}
    )
    return sum(summary.aggregated_value for summary in page.data)


@pytest.fixture
def delayed(sandbox_clean, stripe_client):
    create_customers(sandbox_clean, "stripe", "cus_a")
    answer = sandbox_clean.post("/_sandbox/faults", json={"processing_delay_s": DELAY})
    assert answer.json()["processing_delay_s"] == DELAY
    return tier_meter(stripe_client)


def test_a_meter_event_reaches_summaries_only_after_the_processing_delay(
    sandbox_clean, stripe_client, delayed, stripe_spec
):
    noon = noon_yesterday(sandbox_clean)
    day = noon - noon % DAY
    send(stripe_client, "cus_a", 3600, noon, "tally:org-a:d:small:1")

    assert summary_total(stripe_client, delayed.id, "cus_a", day) == 0
    raw = sandbox_clean.get(
        f"/v1/billing/meters/{delayed.id}/event_summaries",
        params={"customer": "cus_a", "start_time": day, "end_time": day + DAY},
        headers={"Authorization": "Bearer sk_test_x"},
    )
    stripe_spec.response("/v1/billing/meters/{id}/event_summaries", "get", 200, raw.json())
    accepted = {"provider": "stripe", "customer": "cus_a", "tier": "small", "seconds": 3600}
    assert usage(sandbox_clean, day) == [accepted]  # accepted: what will be there
    date = datetime.fromtimestamp(day, UTC).date().isoformat()
    processed = sandbox_clean.get("/_sandbox/usage", params={"date": date, "processed": "true"})
    assert processed.json() == []

    advance(sandbox_clean, DELAY - 5)
    assert summary_total(stripe_client, delayed.id, "cus_a", day) == 0
    advance(sandbox_clean, 5)
    assert summary_total(stripe_client, delayed.id, "cus_a", day) == 3600
    processed = sandbox_clean.get("/_sandbox/usage", params={"date": date, "processed": "true"})
    assert processed.json() == [accepted]


def test_a_cancel_is_pending_then_applied(sandbox_clean, stripe_client, delayed):
    noon = noon_yesterday(sandbox_clean)
    day = noon - noon % DAY
    send(stripe_client, "cus_a", 1200, noon, "keep")
    send(stripe_client, "cus_a", 500, noon, "drop")
    advance(sandbox_clean, DELAY)
    assert summary_total(stripe_client, delayed.id, "cus_a", day) == 1700

    adjustment = stripe_client.v1.billing.meter_event_adjustments.create(
        {
            "event_name": "tally_instance_seconds_small",
            "type": "cancel",
            "cancel": {"identifier": "drop"},
        }
    )
    assert adjustment.status == "pending"
    assert summary_total(stripe_client, delayed.id, "cus_a", day) == 1700  # not applied yet
    assert usage(sandbox_clean, day)[0]["seconds"] == 1200  # accepted view: already gone
    advance(sandbox_clean, DELAY)
    assert summary_total(stripe_client, delayed.id, "cus_a", day) == 1200


def test_a_cancel_of_an_unprocessed_event_never_shows_it(sandbox_clean, stripe_client, delayed):
    noon = noon_yesterday(sandbox_clean)
    day = noon - noon % DAY
    send(stripe_client, "cus_a", 900, noon, "soon-cancelled")
    stripe_client.v1.billing.meter_event_adjustments.create(
        {
            "event_name": "tally_instance_seconds_small",
            "type": "cancel",
            "cancel": {"identifier": "soon-cancelled"},
        }
    )
    for _ in range(3):
        advance(sandbox_clean, DELAY)
        assert summary_total(stripe_client, delayed.id, "cus_a", day) == 0


def test_processing_delay_is_validated(sandbox_clean):
    bad = sandbox_clean.post("/_sandbox/faults", json={"processing_delay_s": -1})
    assert bad.status_code == 400
    assert "processing_delay_s" in bad.json()["error"]
    assert sandbox_clean.get("/_sandbox/faults").json()["processing_delay_s"] == 0


def test_polar_answers_429_with_an_empty_body(sandbox_clean, polar_client):
    sandbox_clean.post("/_sandbox/faults", json={"polar_rate_limit_per_s": 1}).raise_for_status()
    answers = [
        httpx.get(sandbox_clean.url("/v1/meters/"), headers={"Authorization": "Bearer polar_oat_x"})
        for _ in range(5)
    ]
    limited = [a for a in answers if a.status_code == 429]
    assert limited, [a.status_code for a in answers]
    assert all(a.content == b"" for a in limited)
    assert all(int(a.headers["Retry-After"]) >= 1 for a in limited)
    with pytest.raises(PolarRateLimitError):
        for _ in range(5):
            polar_client.meters.list()
