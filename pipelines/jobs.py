"""Jobs. `daily_billing` materializes one usage day end to end."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job, job

from assets.credits import apply_credits

RUN_TIMEOUT_SECONDS = 3600

# Tags enforced by dagster.yaml: one run per partition at a time (the
# `dagster/partition` tag concurrency limit) and a 1 h run timeout.
DAILY_BILLING_TAGS = {"dagster/max_runtime": str(RUN_TIMEOUT_SECONDS)}

daily_billing = define_asset_job(
    "daily_billing",
    selection=AssetSelection.groups("metering", "push", "reconcile", "quota"),
    tags=DAILY_BILLING_TAGS,
    description="Meter, push, read back and reconcile one UTC usage day.",
)


@job(
    tags={"dagster/max_runtime": str(RUN_TIMEOUT_SECONDS)},
    description=(
        "Apply approved credit proposals (config: proposal_ids, approver) at the provider "
        "and record them in billing.billing_corrections; never twice."
    ),
)
def issue_credits():
    apply_credits()
