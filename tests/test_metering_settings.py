"""Bad throttle settings (issue 9, finding 5): validated per org at extraction; a bad
value is reported with the org, the column and the value, that org is billed with
the default for that column (`MeteringRules`), every other org is billed, and
nothing is retried."""

from __future__ import annotations

import datetime as dt
import logging

import pandas as pd
import pytest
from builders import add_heartbeats, add_instance, add_org, at, billed_rows, every_minute
from dagster import AssetCheckSeverity, DagsterEventType, DagsterInstance, materialize

from assets.metering import MeteringRules, billed_usage
from resources.db import PostgresResource
from resources.settings import RunMode

DAY = dt.date(2026, 11, 20)
RESOURCES = {"postgres": PostgresResource(), "run_mode": RunMode(report_only=True)}
MAX_INT4 = 2_147_483_647

# org-bad: active 09:00-10:00, idle 10:00-11:00, active 11:00-12:00. With the default
# idle timeout (30 min) [10:30, 11:00) is idle-paused: 10,800 s runtime, 9,000 billable.
DEFAULT_BILLING = {
    "org_id": "org-bad",
    "tier": "small",
    "runtime_seconds": 10_800,
    "idle_paused_seconds": 1_800,
    "over_continuous_seconds": 0,
    "over_daily_seconds": 0,
    "billable_seconds": 9_000,
}
# org-good: a valid 60-minute continuous limit over 2 h of activity.
GOOD_BILLING = {
    "org_id": "org-good",
    "tier": "medium",
    "runtime_seconds": 7_200,
    "idle_paused_seconds": 0,
    "over_continuous_seconds": 3_600,
    "over_daily_seconds": 0,
    "billable_seconds": 3_600,
}
PLAIN_BILLING = {
    "org_id": "org-plain",
    "tier": "large",
    "runtime_seconds": 1_800,
    "idle_paused_seconds": 0,
    "over_continuous_seconds": 0,
    "over_daily_seconds": 0,
    "billable_seconds": 1_800,
}

BAD_SETTINGS = [
    # (column, value, default minutes) — the four, and the edges of the bounds.
    ("idle_timeout_minutes", -30, 30),
    ("daily_limit_minutes", -60, 1440),
    ("daily_limit_minutes", MAX_INT4, 1440),
    ("continuous_limit_minutes", -60, 480),
    ("continuous_limit_minutes", MAX_INT4, 480),
    ("idle_timeout_minutes", MAX_INT4, 30),
    ("daily_limit_minutes", 0, 1440),
    ("daily_limit_minutes", 1441, 1440),
    ("idle_timeout_minutes", 0, 30),
]


def _world(engine, column: str, value: int) -> None:
    settings = {"continuous_limit_minutes": 480, "daily_limit_minutes": 1440}
    settings["idle_timeout_minutes"] = 30
    settings[column] = value
    add_org(engine, "org-bad", throttle=tuple(settings.values()))
    add_org(engine, "org-good", throttle=(60, 1440, 30))
    add_org(engine, "org-plain")
    add_instance(engine, "i-bad", "org-bad", "small")
    add_instance(engine, "i-good", "org-good", "medium")
    add_instance(engine, "i-plain", "org-plain", "large")
    add_heartbeats(engine, every_minute("i-bad", at(DAY, 9), 60))
    add_heartbeats(engine, every_minute("i-bad", at(DAY, 10), 60, active=False))
    add_heartbeats(engine, every_minute("i-bad", at(DAY, 11), 60))
    add_heartbeats(engine, every_minute("i-good", at(DAY, 9), 120))
    add_heartbeats(engine, every_minute("i-plain", at(DAY, 15), 30))


@pytest.mark.parametrize(("column", "value", "default"), BAD_SETTINGS)
def test_bad_throttle_setting_bills_that_org_with_the_default_and_everyone_else(
    engine, column, value, default
):
    _world(engine, column, value)
    instance = DagsterInstance.ephemeral()
    result = materialize(
        [billed_usage],
        partition_key=DAY.isoformat(),
        resources=RESOURCES,
        instance=instance,
        raise_on_error=False,
    )
    assert result.success
    assert billed_rows(engine, DAY) == [DEFAULT_BILLING, GOOD_BILLING, PLAIN_BILLING]

    line = f"org org-bad: {column} = {value} is not in 1..1440; billed with the default {default}"
    metadata = result.asset_materializations_for_node("billed_usage")[0].metadata
    assert metadata["invalid_throttle_settings"].value == 1
    assert metadata["invalid_throttle_settings_detail"].value == line

    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    warning = checks["no_quarantined_heartbeats"]
    assert not warning.passed and warning.severity == AssetCheckSeverity.WARN
    assert warning.metadata["invalid_throttle_settings"].value == 1
    blocking = ("runtime_identity", "billable_within_daily_limit", "no_negative_seconds")
    assert all(checks[name].passed for name in blocking)

    warnings = [
        entry.user_message
        for entry in instance.all_logs(result.run_id)
        if entry.level == logging.WARNING
    ]
    assert any(line in message for message in warnings), warnings
    event_types = [event.event_type for event in result.all_events]
    assert event_types.count(DagsterEventType.STEP_START) == 1
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types


def test_valid_settings_are_not_reported(engine):
    _world(engine, "idle_timeout_minutes", 30)
    result = materialize([billed_usage], partition_key=DAY.isoformat(), resources=RESOURCES)
    metadata = result.asset_materializations_for_node("billed_usage")[0].metadata
    assert metadata["invalid_throttle_settings"].value == 0
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["no_quarantined_heartbeats"].passed
    assert billed_rows(engine, DAY) == [DEFAULT_BILLING, GOOD_BILLING, PLAIN_BILLING]


def test_checked_throttle_replaces_only_the_bad_column():
    from assets.extract import THROTTLE_MINUTES_COLUMNS, checked_throttle

    raw = pd.DataFrame(
        [
            {"org_id": "ok", **dict(zip(THROTTLE_MINUTES_COLUMNS, (1440, 1, 1440), strict=True))},
            {"org_id": "x", **dict(zip(THROTTLE_MINUTES_COLUMNS, (120, -60, 0), strict=True))},
        ]
    )
    throttle, invalid = checked_throttle(raw, MeteringRules())
    assert throttle.to_dict("records") == [
        {
            "org_id": "ok",
            "continuous_limit_s": 86_400,
            "daily_limit_s": 60,
            "idle_timeout_s": 86_400,
        },
        {
            "org_id": "x",
            "continuous_limit_s": 7_200,
            "daily_limit_s": 86_400,
            "idle_timeout_s": 1_800,
        },
    ]
    assert [setting.describe() for setting in invalid] == [
        "org x: daily_limit_minutes = -60 is not in 1..1440; billed with the default 1440",
        "org x: idle_timeout_minutes = 0 is not in 1..1440; billed with the default 30",
    ]


def test_checked_throttle_of_no_rows_keeps_the_columns():
    from assets.extract import THROTTLE_MINUTES_COLUMNS, checked_throttle

    empty = pd.DataFrame(columns=["org_id", *THROTTLE_MINUTES_COLUMNS])
    throttle, invalid = checked_throttle(empty, MeteringRules())
    assert list(throttle.columns) == [
        "org_id",
        "continuous_limit_s",
        "daily_limit_s",
        "idle_timeout_s",
    ]
    assert throttle.empty and invalid == []
