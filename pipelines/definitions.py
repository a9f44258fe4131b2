"""The one Dagster code location of tally. `TALLY_SHARDS` (default 1) splits every
day into that many org shards (assets/shards.py): metering, push and read-back then
run per (day, shard) in `meter_shard` runs, and `daily_billing` combines them."""

from __future__ import annotations

import functools

from dagster import (
    AssetsDefinition,
    Definitions,
    load_asset_checks_from_modules,
    load_assets_from_modules,
)

import assets.budget_alerts
import assets.credits
import assets.finance_review
import assets.metering
import assets.provider_usage
import assets.push
import assets.quota
import assets.reconcile
from assets.shards import shard_count
from pipelines.jobs import daily_billing, issue_credits, sharded_jobs
from pipelines.late import late_heartbeats, late_heartbeats_sensor
from pipelines.logs import tally_console
from pipelines.partitions import shard_partitions
from pipelines.review_refresh import finance_review_after_runs, refresh_finance_review
from pipelines.run_failure_sensor import run_failure_alerts
from pipelines.schedules import build_daily_billing_schedule, daily_billing_schedule
from pipelines.sensors import deadmans_switch, reconciliation_freshness
from pipelines.shard_runs import shards_combined_sensor
from resources.db import PostgresResource
from resources.notify import SmtpResource, WebhookResource
from resources.providers import ProvidersResource
from resources.settings import RunMode

STAGE_MODULES = [
    assets.metering,
    assets.push,
    assets.provider_usage,
    assets.reconcile,
    assets.credits,
    assets.quota,
    assets.budget_alerts,
    assets.finance_review,
]
# Built per layout (assets/shards.py); the other stages' assets are the modules'.
LAYOUT_ASSETS = {"billed_usage", "usage_push", "provider_usage", "reconciliation"}

RESOURCES = {
    "postgres": PostgresResource(),
    "run_mode": RunMode(),
    "providers": ProvidersResource(),
    "smtp": SmtpResource(),
    "webhook": WebhookResource(),
}
SENSORS = [
    reconciliation_freshness,
    deadmans_switch,
    finance_review_after_runs,
    run_failure_alerts,
    late_heartbeats,
]


def sharded_assets(count: int) -> list:
    """The stage assets with metering, push and read-back over day × shard, the
    shared customers' read-back and a reconciliation after it."""
    partitions = shard_partitions(count)
    others = [
        definition
        for definition in load_assets_from_modules(STAGE_MODULES)
        if isinstance(definition, AssetsDefinition)
        and not {key.path[-1] for key in definition.keys} & LAYOUT_ASSETS
    ]
    return [
        assets.metering.build_billed_usage(partitions),
        assets.push.build_usage_push(partitions),
        assets.provider_usage.build_provider_usage(partitions),
        assets.provider_usage.build_shared_provider_usage(count),
        assets.reconcile.build_reconciliation(("provider_usage", "shared_provider_usage")),
        *others,
    ]


def build_definitions(count: int = 1) -> Definitions:
    """The code location for `count` org shards a day (1: one run a day)."""
    if count <= 1:
        return Definitions(
            assets=load_assets_from_modules(STAGE_MODULES),
            asset_checks=load_asset_checks_from_modules(STAGE_MODULES),
            jobs=[daily_billing, issue_credits, refresh_finance_review],
            schedules=[daily_billing_schedule],
            sensors=SENSORS,
            resources=RESOURCES,
            # Dagster's console logger, or JSON lines with TALLY_LOG_FORMAT=json.
            loggers={"console": tally_console},
        )
    meter_shard, combine = sharded_jobs()
    return Definitions(
        assets=sharded_assets(count),
        jobs=[meter_shard, combine, issue_credits, refresh_finance_review],
        schedules=[build_daily_billing_schedule(meter_shard, count)],
        sensors=[
            *(sensor for sensor in SENSORS if sensor is not late_heartbeats),
            late_heartbeats_sensor(shard_count=count),
            shards_combined_sensor(count),
        ],
        resources=RESOURCES,
        loggers={"console": tally_console},
    )


@functools.cache
def definitions_for(count: int) -> Definitions:
    """One Definitions per layout in a process (`tally run` builds the sharded one)."""
    return build_definitions(count)


defs = definitions_for(shard_count())
