"""billed_usage on a real PostgreSQL with real Dagster execution."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, billed_rows, every_minute
from dagster import AssetCheckSeverity, build_schedule_context, materialize

from assets.metering import billed_usage
from pipelines.definitions import defs
from resources.db import PostgresResource
from resources.settings import RunMode

DAY = dt.date(2026, 11, 20)
RESOURCES = {"postgres": PostgresResource(), "run_mode": RunMode(report_only=True)}


def _materialize(day: dt.date = DAY):
    return materialize([billed_usage], partition_key=day.isoformat(), resources=RESOURCES)


def _checks(result) -> dict:
    return {
        evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()
    }


def _world(engine) -> None:
    add_org(engine, "org-a", throttle=(120, 1440, 30))
    add_org(engine, "org-b")
    add_instance(engine, "i-a1", "org-a", "gpu")
    add_instance(engine, "i-b1", "org-b", "small", status="stopped", stopped_at=at(DAY, 12))
    # org-a: 23:00 on D-1 to 02:00 on D, continuous limit 2 h → over from 01:00 on D.
    add_heartbeats(engine, every_minute("i-a1", at(DAY, -1), 180))
    # org-b: 11:00–12:00, then heartbeats after the stop (quarantined after_stop).
    add_heartbeats(engine, every_minute("i-b1", at(DAY, 11), 60))
    add_heartbeats(engine, every_minute("i-b1", at(DAY, 12), 5))
    add_heartbeats(engine, [(None, at(DAY, 3), True), ("i-ghost", at(DAY, 4), True)])


def test_definitions_load():
    repository = defs.get_repository_def()
    assert repository.has_job("daily_billing")
    assert {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()} >= {
        "billed_usage"
    }


def test_partition_materializes_with_checks_and_rerun_changes_nothing(engine):
    _world(engine)
    first = _materialize()
    assert first.success
    expected = [
        {
            "org_id": "org-a",
            "tier": "gpu",
            "runtime_seconds": 7200,
            "idle_paused_seconds": 0,
            "over_continuous_seconds": 3600,
            "over_daily_seconds": 0,
            "billable_seconds": 3600,
        },
        {
            "org_id": "org-b",
            "tier": "small",
            "runtime_seconds": 3600,
            "idle_paused_seconds": 0,
            "over_continuous_seconds": 0,
            "over_daily_seconds": 0,
            "billable_seconds": 3600,
        },
    ]
    assert billed_rows(engine, DAY) == expected
    checks = _checks(first)
    for blocking in (
        "runtime_identity",
        "billable_within_daily_limit",
        "no_negative_seconds",
        "great_expectations_extract",
        "great_expectations_output",
    ):
        assert checks[blocking].passed, blocking
    quarantine = checks["no_quarantined_heartbeats"]
    assert not quarantine.passed and quarantine.severity == AssetCheckSeverity.WARN
    counts = {key: value.value for key, value in quarantine.metadata.items()}
    assert counts["quarantined"] == 7
    assert counts["quarantined_after_stop"] == 5
    assert counts["quarantined_null_instance_id"] == 1
    assert counts["quarantined_unknown_instance"] == 1

    metadata = first.asset_materializations_for_node("billed_usage")[0].metadata
    assert metadata["billable_hours"].value == 2.0
    assert metadata["over_continuous_hours"].value == 1.0

    second = _materialize()
    assert second.success
    assert billed_rows(engine, DAY) == expected
    with engine.connect() as connection:
        assert (
            connection.execute(
                sa.text("SELECT count(*) FROM billing.quarantine WHERE usage_date = :d"), {"d": DAY}
            ).scalar()
            == 7
        )


def test_late_heartbeats_replace_the_day_on_rerun(engine):
    _world(engine)
    _materialize()
    add_heartbeats(engine, every_minute("i-b1", at(DAY, 9), 30))
    _materialize()
    rows = {row["org_id"]: row for row in billed_rows(engine, DAY)}
    assert rows["org-b"]["billable_seconds"] == 3600 + 1800


def test_failed_invariant_blocks(engine):
    """A billed row breaking the identity is caught by the blocking check."""
    import pandas as pd

    from assets.metering_checks import billed_usage_checks

    broken = pd.DataFrame(
        [
            {
                "org_id": "o",
                "tier": "small",
                "runtime_seconds": 10,
                "idle_paused_seconds": 0,
                "over_continuous_seconds": 0,
                "over_daily_seconds": 0,
                "billable_seconds": 11,
            }
        ]
    )
    throttle = pd.DataFrame(
        [{"org_id": "o", "continuous_limit_s": 60, "daily_limit_s": 5, "idle_timeout_s": 60}]
    )
    from assets.metering import MeteringRules

    results = billed_usage_checks(broken, throttle, MeteringRules())
    assert not results["runtime_identity"][0]
    assert not results["billable_within_daily_limit"][0]
    assert results["no_negative_seconds"][0]


def test_schedule_asks_for_yesterday_at_0200(engine):
    schedule = defs.get_repository_def().get_schedule_def("daily_billing_schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone in (None, "UTC")
    tick = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.UTC)
    context = build_schedule_context(
        scheduled_execution_time=tick,
        repository_def=defs.get_repository_def(),
        resources={"postgres": PostgresResource()},  # no day settling: yesterday only
    )
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [request.partition_key for request in requests] == ["2026-11-26"]


def test_run_limits_retries_and_timeout_are_configured():
    """One run per partition (queue tag limit), 1 h timeout, step retries with backoff."""
    import yaml
    from dagster import AssetKey, Backoff

    from resources.db import PROJECT_ROOT

    job = defs.resolve_job_def("daily_billing")
    assert job.tags["dagster/max_runtime"] == "3600"
    settings = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    limits = settings["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {
        "key": "dagster/partition",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in limits
    assert settings["run_monitoring"]["max_runtime_seconds"] == 3600
    for key in ("billed_usage", "usage_push", "reconciliation", "quota_usage"):
        policy = defs.resolve_assets_def(AssetKey(key)).op.retry_policy
        assert policy.max_retries == 3 and policy.backoff == Backoff.EXPONENTIAL, key
