"""The one Dagster code location of tally."""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

import assets.budget_alerts
import assets.credits
import assets.finance_review
import assets.metering
import assets.provider_usage
import assets.push
import assets.quota
import assets.reconcile
from pipelines.jobs import daily_billing, issue_credits
from pipelines.late import late_heartbeats
from pipelines.logs import tally_console
from pipelines.review_refresh import finance_review_after_runs, refresh_finance_review
from pipelines.run_failure_sensor import run_failure_alerts
from pipelines.schedules import daily_billing_schedule
from pipelines.sensors import deadmans_switch, reconciliation_freshness
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

defs = Definitions(
    assets=load_assets_from_modules(STAGE_MODULES),
    asset_checks=load_asset_checks_from_modules(STAGE_MODULES),
    jobs=[daily_billing, issue_credits, refresh_finance_review],
    schedules=[daily_billing_schedule],
    sensors=[
        reconciliation_freshness,
        deadmans_switch,
        finance_review_after_runs,
        run_failure_alerts,
        late_heartbeats,
    ],
    resources={
        "postgres": PostgresResource(),
        "run_mode": RunMode(),
        "providers": ProvidersResource(),
        "smtp": SmtpResource(),
        "webhook": WebhookResource(),
    },
    # Dagster's console logger, or JSON lines with TALLY_LOG_FORMAT=json (pipelines/logs.py).
    loggers={"console": tally_console},
)
