"""Jobs. `daily_billing` materializes one usage day end to end; with org shards
(`TALLY_SHARDS` > 1) `meter_shard` meters, pushes and reads back one shard of a
day and `daily_billing` combines the day's shards (shared read-back, reconciliation,
credits, quota)."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job, job

from assets.credits import apply_credits

RUN_TIMEOUT_SECONDS = 3600

# Tags enforced by dagster.yaml: one run per partition at a time (the
# `dagster/partition` tag concurrency limit: a day, or one shard of a day) and a
# 1 h run timeout.
DAILY_BILLING_TAGS = {"dagster/max_runtime": str(RUN_TIMEOUT_SECONDS)}

DAY_STAGES = AssetSelection.groups("metering", "push", "reconcile", "quota")
# The stages each org shard runs on its own (partitioned day × shard).
SHARD_STAGE_ASSETS = ("billed_usage", "usage_push", "provider_usage")
METER_SHARD = "meter_shard"

daily_billing = define_asset_job(
    "daily_billing",
    selection=DAY_STAGES,
    tags=DAILY_BILLING_TAGS,
    description="Meter, push, read back and reconcile one UTC usage day.",
)


def sharded_jobs():
    """(meter_shard, daily_billing) of the sharded graph."""
    meter_shard = define_asset_job(
        METER_SHARD,
        selection=AssetSelection.assets(*SHARD_STAGE_ASSETS),
        tags=DAILY_BILLING_TAGS,
        description="Meter, push and read back one org shard of a UTC usage day.",
    )
    combine = define_asset_job(
        "daily_billing",
        selection=DAY_STAGES - AssetSelection.assets(*SHARD_STAGE_ASSETS),
        tags=DAILY_BILLING_TAGS,
        description=(
            "Combine a day's org shards once every shard ran: read back the customers "
            "shared by several shards, reconcile, propose credits, quota."
        ),
    )
    return meter_shard, combine


@job(
    tags={"dagster/max_runtime": str(RUN_TIMEOUT_SECONDS)},
    description=(
        "Apply approved credit proposals (config: proposal_ids, approver) at the provider "
        "and record them in billing.billing_corrections; never twice."
    ),
)
def issue_credits():
    apply_credits()
