"""Check results name their usage day and have no "Skipped" twin (issue 12, item 3).

An unpartitioned check on a daily asset was planned for the run's partition but its
result was stored without one: the UI showed the result as "Partition —" and the
planned row, never resolved, as "Skipped" beside it. The daily assets' checks are
partitioned like their asset, so the plan and the result are one row of the day."""

from __future__ import annotations

import datetime as dt

from builders import add_heartbeats, add_instance, add_org, at, every_minute
from dagster import AssetsDefinition, DagsterInstance
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from pipelines.definitions import defs


def test_every_check_of_a_daily_asset_is_partitioned_like_it() -> None:
    unpartitioned = [
        f"{spec.asset_key.to_user_string()}.{spec.name}"
        for assets_def in defs.assets or []
        if isinstance(assets_def, AssetsDefinition) and assets_def.partitions_def is not None
        for spec in assets_def.check_specs
        if spec.partitions_def != assets_def.partitions_def
    ]
    assert unpartitioned == []


def test_a_days_run_stores_one_result_per_check_under_its_day(engine, providers_env) -> None:
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)
    add_org(engine, "org-a")
    add_instance(engine, "i-a1", "org-a", "small")
    add_heartbeats(engine, every_minute("i-a1", at(day, 1), 90))
    job = defs.resolve_job_def("daily_billing")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            partition_key=day.isoformat(), instance=instance, raise_on_error=False
        )
        assert result.success
        evaluations = result.get_asset_check_evaluations()
        check_keys = defs.resolve_asset_graph().asset_check_keys
        daily_checks = {key for key in check_keys if job.asset_layer.has(key.asset_key)}
        assert {(e.asset_key, e.check_name) for e in evaluations} == {
            (key.asset_key, key.name) for key in daily_checks
        }
        assert {evaluation.partition for evaluation in evaluations} == {day.isoformat()}

        stored = {
            key: instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
            for key in daily_checks
        }
    for key, records in stored.items():
        name = f"{key.asset_key.to_user_string()}.{key.name}"
        # One row per check and run: the planned row became the result (no "Skipped").
        assert [record.run_id for record in records] == [result.run_id], name
        (record,) = records
        assert record.partition == day.isoformat(), name
        assert record.status in (
            AssetCheckExecutionRecordStatus.SUCCEEDED,
            AssetCheckExecutionRecordStatus.FAILED,
        ), name
