"""Great Expectations suites on metering's extract and output.

GE validates DataFrames in memory (ephemeral context, no files). The extract suite
validates what reaches billing — an evenly spread, bounded sample of the extract
after quarantine — so a 29 M-row day costs milliseconds, not minutes, and rows that
are quarantined (and counted by metering, whatever the day's size) never fail it.
Tier expectations take the known tiers as a parameter: the priced ones
(`Pricing.known_tiers`), never a list of their own."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from dagster import AssetCheckResult

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
EXTRACT_SAMPLE_ROWS = 50_000


@dataclass(frozen=True)
class SuiteOutcome:
    suite: str
    success: bool
    evaluated: int
    failed: list[str]


@cache
def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _validate(name: str, frame: pd.DataFrame, expectations: list) -> SuiteOutcome:
    import great_expectations as gx

    context = _context()
    source = context.data_sources.add_or_update_pandas(f"tally_{name}")
    asset = source.add_dataframe_asset(f"{name}_{id(frame)}")
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    result = batch.validate(suite)
    failed = [
        f"{outcome.expectation_config.type}({outcome.expectation_config.kwargs.get('column', '')})"
        for outcome in result.results
        if not outcome.success
    ]
    return SuiteOutcome(name, bool(result.success), len(result.results), failed)


def sample_positions(rows: int, size: int | None = None) -> np.ndarray:
    """At most `size` (default EXTRACT_SAMPLE_ROWS) row positions spread evenly over
    `rows`, so the sample sees every part of the extract, not just its head."""
    size = EXTRACT_SAMPLE_ROWS if size is None else size
    if rows <= size:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, size).astype(np.int64))


def validate_extract(
    billable: pd.DataFrame, instances: pd.DataFrame, known_tiers: frozenset[str]
) -> SuiteOutcome:
    """What of the extract reaches billing (`metering.billable_heartbeats`: after
    quarantine, with each row's org and tier), and the instance table it is joined
    on. Quarantinable rows (null or unknown ids, unknown tiers, null or future
    sent_at) are counted by metering, never failures here: every expectation is
    strict because a failure would mean wrong numbers."""
    import great_expectations as gx

    frame = pd.DataFrame(
        {
            "instance_id": billable["instance_id"].astype(object),
            "sent_at": billable["sent_at"],
            "active": billable["active"].astype(object),
            "org_id": billable["org_id"].astype(object),
            "tier": billable["tier"].astype(object),
        }
    )
    outcome = _validate(
        "metering_extract_heartbeats",
        frame,
        [
            gx.expectations.ExpectTableColumnsToMatchSet(column_set=list(frame.columns)),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="instance_id"),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="sent_at"),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="org_id"),
            gx.expectations.ExpectColumnValuesToBeInSet(
                column="tier", value_set=sorted(known_tiers)
            ),
        ],
    )
    instance_outcome = _validate(
        "metering_extract_instances",
        instances[["instance_id", "org_id"]].astype(object),
        [
            gx.expectations.ExpectColumnValuesToBeUnique(column="instance_id"),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="org_id"),
        ],
    )
    return SuiteOutcome(
        "metering_extract",
        outcome.success and instance_outcome.success,
        outcome.evaluated + instance_outcome.evaluated,
        outcome.failed + instance_outcome.failed,
    )


def validate_billed(billed: pd.DataFrame, known_tiers: frozenset[str]) -> SuiteOutcome:
    import great_expectations as gx

    seconds = [
        "runtime_seconds",
        "idle_paused_seconds",
        "over_continuous_seconds",
        "over_daily_seconds",
        "billable_seconds",
    ]
    expectations = [
        gx.expectations.ExpectCompoundColumnsToBeUnique(column_list=["org_id", "tier"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="tier", value_set=sorted(known_tiers)),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="org_id"),
    ] + [
        gx.expectations.ExpectColumnValuesToBeBetween(
            column=column, min_value=0, max_value=86_400 * 100_000
        )
        for column in seconds
    ]
    frame = billed.drop(columns=["usage_date"], errors="ignore")
    return _validate("metering_output", frame, expectations)


def great_expectations_checks(
    billable: pd.DataFrame,
    instances: pd.DataFrame,
    billed: pd.DataFrame,
    known_tiers: frozenset[str],
) -> list[AssetCheckResult]:
    """billed_usage's two suites as asset check results: what of the extract reaches
    billing (a sample, `sample_positions`, after quarantine) and the stored rows,
    against `known_tiers`."""
    from dagster import AssetCheckResult

    outcomes = (
        ("great_expectations_extract", validate_extract(billable, instances, known_tiers)),
        ("great_expectations_output", validate_billed(billed, known_tiers)),
    )
    return [
        AssetCheckResult(
            check_name=name,
            passed=outcome.success,
            metadata={"expectations": outcome.evaluated, "failed": ", ".join(outcome.failed)},
        )
        for name, outcome in outcomes
    ]
