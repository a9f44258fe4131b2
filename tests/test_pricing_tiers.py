"""Tiers come from the pricing configuration: a tier that exists only in
TALLY_PRICING_FILE is metered, pushed, read back and priced by the real
`daily_billing` job (one org on Stripe, one on Polar); a bad pricing file fails
`billed_usage` at once, without retries, with one line naming the setting."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pandas as pd
import pytest
import sqlalchemy as sa
from builders import (
    add_counter,
    add_heartbeats,
    add_instance,
    add_org,
    at,
    billed_rows,
    every_minute,
)
from dagster import DagsterEventType, DagsterInstance, materialize

import assets.pricing
from assets.metering import billed_usage, compute_billed_usage
from assets.pricing import Pricing, pricing_from_mapping
from pipelines.definitions import defs
from resources.db import PostgresResource
from resources.settings import RunMode

try:
    from tests.metering_reference import reference_billed_usage
except ImportError:  # tests/ on sys.path instead of the project root
    from metering_reference import reference_billed_usage  # type: ignore[no-redef]

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
H = 3600


@pytest.fixture()
def pricing_file(tmp_path, monkeypatch):
    """Write TALLY_PRICING_FILE with the given text; the loader's cache is cleared
    before and after so no other test sees this file's pricing."""

    def write(text: str):
        path = tmp_path / "pricing.yaml"
        path.write_text(text)
        monkeypatch.setenv("TALLY_PRICING_FILE", str(path))
        assets.pricing._load.cache_clear()
        return path

    assets.pricing._load.cache_clear()
    yield write
    assets.pricing._load.cache_clear()


def _one_xlarge_hour() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    start = pd.Timestamp("2024-03-10 09:00", tz="UTC")
    sent = [start + pd.Timedelta(minutes=k) for k in range(60)]
    heartbeats = pd.DataFrame(
        {
            "instance_id": ["i-x"] * 60,
            "sent_at": sent,
            "active": [True] * 60,
            "received_at": [stamp + pd.Timedelta(seconds=1) for stamp in sent],
        }
    )
    instances = pd.DataFrame(
        {
            "instance_id": ["i-x"],
            "org_id": ["org-x"],
            "tier": ["xlarge"],
            "status": ["running"],
            "stopped_at": pd.to_datetime([None], utc=True),
        }
    )
    throttle = pd.DataFrame(
        columns=["org_id", "continuous_limit_s", "daily_limit_s", "idle_timeout_s"]
    ).astype({"continuous_limit_s": "int64", "daily_limit_s": "int64", "idle_timeout_s": "int64"})
    return heartbeats, instances, throttle


@pytest.mark.parametrize("compute", [compute_billed_usage, reference_billed_usage])
def test_the_rules_bill_the_tiers_they_are_given(compute):
    day, run_time = dt.date(2024, 3, 10), dt.datetime(2024, 3, 11, 2, tzinfo=dt.UTC)
    priced = pricing_from_mapping({"tier_rates": {"xlarge": "4.00"}}).known_tiers
    assert priced == Pricing().known_tiers | {"xlarge"}

    default = compute(*_one_xlarge_hour(), day, run_time)
    assert default.billed.empty  # not a default tier: quarantined, never billed
    assert set(default.quarantine["reason"]) == {"unknown_tier"}

    result = compute(*_one_xlarge_hour(), day, run_time, known_tiers=priced)
    assert result.quarantine.empty
    assert [(r.org_id, r.tier, r.billable_seconds) for r in result.billed.itertuples()] == [
        ("org-x", "xlarge", H)
    ]


def used(engine, org: str, instance: str, tier: str, start_hour: int, minutes: int) -> None:
    """An instance that ran `minutes` from `start_hour`, stopped properly after, and
    the control plane's counter agreeing (so reconciliation has nothing to report)."""
    stopped = at(DAY, start_hour, minutes + 10)
    add_instance(engine, instance, org, tier, status="stopped", stopped_at=stopped)
    add_heartbeats(engine, every_minute(instance, at(DAY, start_hour), minutes))
    add_counter(engine, org, DAY, tier, minutes * 60)


def _rows(engine, sql: str, **params) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(sql), params)]


def test_a_tier_only_in_the_pricing_file_is_metered_pushed_read_back_and_priced(
    engine, providers_env, pricing_file
):
    pricing_file("tier_rates:\n  xlarge: '4.00'\n")
    add_org(engine, "org-sx", provider="stripe", customer="cus_XL01")
    add_org(engine, "org-px", provider="polar", customer="ext_org-px")
    used(engine, "org-sx", "i-sx", "xlarge", 9, 60)
    used(engine, "org-sx", "i-ss", "small", 9, 60)
    used(engine, "org-px", "i-px", "xlarge", 10, 30)

    result = defs.resolve_job_def("daily_billing").execute_in_process(
        partition_key=DAY.isoformat(), instance=DagsterInstance.ephemeral(), raise_on_error=False
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["no_quarantined_heartbeats"].passed
    assert checks["great_expectations_extract"].passed
    assert checks["great_expectations_output"].passed
    assert result.success

    # Metered: billable seconds, nothing quarantined as unknown_tier.
    assert [(r["org_id"], r["tier"], r["billable_seconds"]) for r in billed_rows(engine, DAY)] == [
        ("org-px", "xlarge", 1800),
        ("org-sx", "small", H),
        ("org-sx", "xlarge", H),
    ]
    assert _rows(engine, "SELECT reason FROM billing.quarantine WHERE usage_date = :d", d=DAY) == []

    # Pushed: the providers hold it.
    answer = providers_env.get(f"/_sandbox/usage?date={DAY.isoformat()}").json()
    assert {(row["provider"], row["customer"], row["tier"]): row["seconds"] for row in answer} == {
        ("stripe", "cus_XL01", "small"): H,
        ("stripe", "cus_XL01", "xlarge"): H,
        ("polar", "ext_org-px", "xlarge"): 1800,
    }

    # Read back: billing.provider_usage has the tier for both providers.
    assert _rows(
        engine,
        "SELECT org_id, tier, provider, seconds FROM billing.provider_usage "
        "WHERE usage_date = :d ORDER BY org_id, tier",
        d=DAY,
    ) == [
        ("org-px", "xlarge", "polar", 1800),
        ("org-sx", "small", "stripe", H),
        ("org-sx", "xlarge", "stripe", H),
    ]

    # Priced at $4.00/h: 1 h + 0.5 h of xlarge, 1 h of small at $0.05/h = $6.05.
    reconciliation = {
        key: value.value
        for key, value in result.asset_materializations_for_node("reconciliation")[
            0
        ].metadata.items()
    }
    for figure in ("billed_dollars", "sent_dollars", "recorded_dollars"):
        assert reconciliation[figure] == pytest.approx(6.05), figure
    assert reconciliation["absolute_impact_dollars"] == 0
    assert (
        _rows(engine, "SELECT kind FROM billing.discrepancies WHERE usage_date = :d", d=DAY) == []
    )
    assert _rows(
        engine,
        "SELECT org_id, tier, overage_amount FROM billing.quota_usage_tiers "
        "WHERE usage_date = :d ORDER BY org_id, tier",
        d=DAY,
    ) == [
        ("org-px", "xlarge", Decimal("2.00")),
        ("org-sx", "small", Decimal("0.05")),
        ("org-sx", "xlarge", Decimal("4.00")),
    ]
    assert _rows(
        engine,
        "SELECT org_id, expected_charges FROM billing.quota_usage "
        "WHERE usage_date = :d ORDER BY org_id",
        d=DAY,
    ) == [("org-px", Decimal("2.00")), ("org-sx", Decimal("4.05"))]


def test_bad_pricing_file_fails_billed_usage_once_with_one_line(engine, pricing_file):
    from pipelines.cli import failure_messages

    pricing_file("tier_rates:\n  xlarge: -4\n")
    add_org(engine, "org-a")
    add_instance(engine, "i-a", "org-a", "small")
    add_heartbeats(engine, every_minute("i-a", at(DAY, 9), 10))

    result = materialize(
        [billed_usage],
        partition_key=DAY.isoformat(),
        resources={"postgres": PostgresResource(), "run_mode": RunMode(report_only=True)},
        raise_on_error=False,
    )
    assert not result.success
    assert failure_messages(result) == [
        (
            "billed_usage",
            "pricing configuration: tier_rates.xlarge = -4 must be a non-negative number",
        )
    ]
    event_types = [event.event_type for event in result.all_events]
    assert event_types.count(DagsterEventType.STEP_START) == 1
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types
    assert event_types.count(DagsterEventType.STEP_FAILURE) == 1
    assert billed_rows(engine, DAY) == []


PRICING_READERS = [
    "billed_usage",
    "provider_usage",
    "reconciliation",
    "credit_proposals",
    "quota_usage",
    "budget_alerts",
]


@pytest.mark.parametrize("asset_key", PRICING_READERS)
def test_every_asset_that_reads_pricing_fails_once_with_the_same_line(
    engine, pricing_file, providers_env, smtp_server, asset_key
):
    """One policy for configuration errors: whichever asset reads a bad pricing file
    fails its step at once (never retried) with the same one-line message."""
    from dagster import AssetKey

    from pipelines.runner import failure_messages

    pricing_file("tier_rates:\n  xlarge: -4\n")
    add_org(engine, "org-a")
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        partition_key=DAY.isoformat(),
        asset_selection=[AssetKey(asset_key)],
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    assert failure_messages(result) == [
        (asset_key, "pricing configuration: tier_rates.xlarge = -4 must be a non-negative number")
    ]
    event_types = [event.event_type for event in result.all_events]
    assert event_types.count(DagsterEventType.STEP_START) == 1
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types
