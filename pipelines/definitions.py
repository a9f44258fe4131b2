"""The one Dagster code location of tally."""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

import assets.metering
import assets.push
from pipelines.jobs import daily_billing
from pipelines.schedules import daily_billing_schedule
from resources.db import PostgresResource
from resources.providers import ProvidersResource
from resources.settings import RunMode

STAGE_MODULES = [assets.metering, assets.push]

defs = Definitions(
    assets=load_assets_from_modules(STAGE_MODULES),
    asset_checks=load_asset_checks_from_modules(STAGE_MODULES),
    jobs=[daily_billing],
    schedules=[daily_billing_schedule],
    resources={
        "postgres": PostgresResource(),
        "run_mode": RunMode(),
        "providers": ProvidersResource(),
    },
)
