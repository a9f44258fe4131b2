"""Default Stripe rate limits follow the key's mode (issue 10, item 2): test keys are
limited far below live ones; explicit settings win. (No future timestamps: the push
plan refuses a day before its noon — tests/test_push_plan.py.)"""

from __future__ import annotations

import pytest

from resources.providers.resource import (
    STRIPE_RATE_LIMITS,
    ProvidersResource,
    StripeKeyMode,
    stripe_key_mode,
    stripe_rate_limits,
)


@pytest.mark.parametrize(
    ("key", "mode"),
    [
        ("sk_test_abc", StripeKeyMode.TEST),
        ("rk_test_abc", StripeKeyMode.TEST),
        ("sk_live_abc", StripeKeyMode.LIVE),
        ("rk_live_abc", StripeKeyMode.LIVE),
    ],
)
def test_the_key_says_its_mode(key, mode):
    assert stripe_key_mode(key) is mode


def test_default_limits_follow_the_key_and_settings_override_them():
    test_writes, test_reads = STRIPE_RATE_LIMITS[StripeKeyMode.TEST]
    live_writes, live_reads = STRIPE_RATE_LIMITS[StripeKeyMode.LIVE]
    assert test_writes < live_writes and test_reads < live_reads
    assert stripe_rate_limits(ProvidersResource(), "sk_test_x") == (test_writes, test_reads)
    assert stripe_rate_limits(ProvidersResource(), "sk_live_x") == (live_writes, live_reads)
    chosen = ProvidersResource(stripe_writes_per_second=7, stripe_reads_per_second=3)
    assert stripe_rate_limits(chosen, "sk_live_x") == (7, 3)


def test_the_client_built_for_a_test_key_uses_the_test_limits(monkeypatch):
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_limits")
    client = ProvidersResource().client("stripe")
    writes, reads = STRIPE_RATE_LIMITS[StripeKeyMode.TEST]
    assert client.write_guard.limiter.per_second == writes
    assert client.read_guard.limiter.per_second == reads
