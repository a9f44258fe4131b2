"""A snapshot of the whole Dagster graph: a regrouped asset, a lost dependency, a check
that stops blocking or a schedule that changes its cron fails here first."""

from __future__ import annotations

from dagster import DailyPartitionsDefinition

from pipelines.definitions import defs

ASSETS = {
    # asset: (group, upstream asset keys)
    "billed_usage": ("metering", []),
    "usage_push": ("push", ["billed_usage"]),
    "provider_usage": ("reconcile", ["usage_push"]),
    "reconciliation": ("reconcile", ["provider_usage"]),
    "credit_proposals": ("reconcile", ["reconciliation"]),
    "quota_usage": ("quota", ["billed_usage"]),
    "budget_alerts": ("quota", ["quota_usage"]),
    # Unpartitioned: refreshed after every daily_billing and issue_credits run.
    "finance_review": ("review", ["credit_proposals", "quota_usage", "reconciliation"]),
}
UNPARTITIONED = {"finance_review"}
DAILY = {name: spec for name, spec in ASSETS.items() if name not in UNPARTITIONED}

CHECKS = {
    # (asset, check): blocking
    ("billed_usage", "billable_within_daily_limit"): True,
    ("billed_usage", "great_expectations_extract"): True,
    ("billed_usage", "great_expectations_output"): True,
    ("billed_usage", "instances_sum_to_orgs"): True,
    ("billed_usage", "no_negative_seconds"): True,
    ("billed_usage", "no_late_heartbeats"): False,
    ("billed_usage", "no_quarantined_heartbeats"): False,
    ("billed_usage", "runtime_identity"): True,
    ("budget_alerts", "no_interrupted_alerts"): False,
    ("quota_usage", "orgs_have_known_plans"): True,
    ("reconciliation", "no_unexplained_discrepancies"): False,
    ("reconciliation", "usage_counters_fresh"): False,
}


def _graph():
    return defs.resolve_asset_graph()


def test_assets_groups_and_dependencies() -> None:
    graph = _graph()
    found = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        found[key.to_user_string()] = (
            node.group_name,
            sorted(parent.to_user_string() for parent in node.parent_keys),
        )
    assert found == ASSETS


def test_every_asset_is_partitioned_by_utc_day() -> None:
    graph = _graph()
    for key in graph.get_all_asset_keys():
        partitions = graph.get(key).partitions_def
        if key.to_user_string() in UNPARTITIONED:
            assert partitions is None, key
            continue
        assert isinstance(partitions, DailyPartitionsDefinition), key
        assert partitions.timezone == "UTC"
        assert partitions.end_offset == 1  # today can be metered on demand


def test_checks_and_their_blocking_flags() -> None:
    graph = _graph()
    found = {
        (check.asset_key.to_user_string(), check.name): graph.get_check_spec(check).blocking
        for check in graph.asset_check_keys
    }
    assert found == CHECKS


def test_daily_billing_selects_every_stage_but_credits_job() -> None:
    job = defs.resolve_job_def("daily_billing")
    assert sorted(job.graph.node_dict) == sorted(DAILY)
    assert job.tags["dagster/max_runtime"] == "3600"
    credits = defs.resolve_job_def("issue_credits")
    assert sorted(credits.graph.node_dict) == ["apply_credits"]
    review = defs.resolve_job_def("refresh_finance_review")
    assert sorted(review.graph.node_dict) == sorted(UNPARTITIONED)


def test_schedule_and_sensors() -> None:
    schedule = defs.resolve_schedule_def("daily_billing_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone, schedule.job_name) == (
        "0 2 * * *",
        "UTC",
        "daily_billing",
    )
    assert schedule.default_status.value == "RUNNING"
    sensors = {sensor.name: sensor.default_status.value for sensor in defs.sensors}
    assert sensors == {
        "reconciliation_freshness": "RUNNING",
        "deadmans_switch": "RUNNING",
        "run_failure_alerts": "RUNNING",
        "finance_review_after_runs": "RUNNING",
        "late_heartbeats": "RUNNING",
    }


def test_every_asset_retries_with_the_shared_policy() -> None:
    from pipelines.retry import STEP_RETRY

    job = defs.resolve_job_def("daily_billing")
    for name in DAILY:
        assert job.graph.node_dict[name].definition.retry_policy == STEP_RETRY, name


def test_every_asset_check_says_what_it_checks() -> None:
    """Finance reads check results in the UI: none without a description (issue 12)."""
    from dagster import AssetsDefinition

    undescribed = [
        f"{spec.asset_key.to_user_string()}.{spec.name}"
        for assets_def in defs.assets or []
        if isinstance(assets_def, AssetsDefinition)
        for spec in assets_def.check_specs
        if not spec.description
    ]
    assert undescribed == []


# -- the sharded graph (TALLY_SHARDS > 1) ---------------------------------------------

SHARDED = {
    **ASSETS,
    "shared_provider_usage": ("reconcile", ["provider_usage"]),
    "reconciliation": ("reconcile", ["provider_usage", "shared_provider_usage"]),
}
PER_SHARD = {"billed_usage", "usage_push", "provider_usage"}


def test_the_sharded_graph_runs_metering_push_and_read_back_per_day_and_shard() -> None:
    from dagster import MultiPartitionsDefinition

    from pipelines.definitions import build_definitions

    sharded = build_definitions(4)
    graph = sharded.resolve_asset_graph()
    found = {
        key.to_user_string(): (
            graph.get(key).group_name,
            sorted(parent.to_user_string() for parent in graph.get(key).parent_keys),
        )
        for key in graph.get_all_asset_keys()
    }
    assert found == SHARDED
    for name in PER_SHARD:
        partitions = graph.get(
            next(k for k in graph.get_all_asset_keys() if k.to_user_string() == name)
        ).partitions_def
        assert isinstance(partitions, MultiPartitionsDefinition), name
        dimensions = {d.name: d.partitions_def for d in partitions.partitions_defs}
        assert dimensions["shard"].get_partition_keys() == ["0", "1", "2", "3"]
        assert isinstance(dimensions["day"], DailyPartitionsDefinition)
    checks = {
        (check.asset_key.to_user_string(), check.name): graph.get_check_spec(check).blocking
        for check in graph.asset_check_keys
    }
    assert checks == CHECKS  # every shard runs the same checks on its own rows
    meter = sharded.resolve_job_def("meter_shard")
    assert sorted(meter.graph.node_dict) == sorted(PER_SHARD)
    combine = sharded.resolve_job_def("daily_billing")
    assert sorted(combine.graph.node_dict) == sorted(set(SHARDED) - PER_SHARD - UNPARTITIONED)
    assert sharded.resolve_schedule_def("daily_billing_schedule").job_name == "meter_shard"
    sensors = {sensor.name for sensor in sharded.sensors}
    assert sensors == {
        "reconciliation_freshness",
        "deadmans_switch",
        "run_failure_alerts",
        "finance_review_after_runs",
        "late_heartbeats",
        "shards_combined",
    }
