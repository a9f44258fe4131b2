"""Keeping the finance review current: the `refresh_finance_review` job and the
run-status sensor that requests it after each successful `daily_billing` and
`issue_credits` run (the credits job materializes no asset, so an eager automation
condition on the review would never see a credit applied; a run-status sensor sees
both). Without the daemon (`tally run`, `tally demo`) pipelines/runner.py runs the
job itself after its days.

No `from __future__ import annotations`: Dagster reads the sensor's annotations."""

from dagster import (
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunStatusSensorContext,
    define_asset_job,
    run_status_sensor,
)

from pipelines.jobs import daily_billing, issue_credits

REVIEW_ASSET = "finance_review"

refresh_finance_review = define_asset_job(
    "refresh_finance_review",
    selection=AssetSelection.assets(REVIEW_ASSET),
    description="Materialize the finance review from what the billing database holds now.",
)


@run_status_sensor(
    run_status=DagsterRunStatus.SUCCESS,
    name="finance_review_after_runs",
    monitored_jobs=[daily_billing, issue_credits],
    request_job=refresh_finance_review,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "After each successful daily_billing or issue_credits run, refresh the "
        "finance_review asset (one review run per finished run)."
    ),
)
def finance_review_after_runs(context: RunStatusSensorContext) -> RunRequest:
    run = context.dagster_run
    return RunRequest(
        run_key=f"finance-review-after-{run.run_id}",
        tags={"tally/after_run": run.run_id, "tally/after_job": run.job_name},
    )
