"""Great Expectations suites on metering's extract and output.

GE validates DataFrames in memory (ephemeral context, no files). The extract is
validated on a bounded sample so a 29 M-row day costs milliseconds, not minutes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache

import pandas as pd

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


def validate_extract(
    heartbeats: pd.DataFrame, instances: pd.DataFrame, known_tiers: frozenset[str]
) -> SuiteOutcome:
    """Shape of the control-plane extract. Heartbeats are untrusted: nulls are
    allowed in small proportion (they are quarantined), columns must be there."""
    import great_expectations as gx

    sample = heartbeats.head(EXTRACT_SAMPLE_ROWS)
    frame = pd.DataFrame(
        {
            "instance_id": sample["instance_id"].astype(object),
            "sent_at": sample["sent_at"],
            "active": sample["active"].astype(object),
        }
    )
    outcome = _validate(
        "metering_extract_heartbeats",
        frame,
        [
            gx.expectations.ExpectTableColumnsToMatchSet(
                column_set=["instance_id", "sent_at", "active"]
            ),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="instance_id", mostly=0.95),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="sent_at", mostly=0.95),
        ],
    )
    instance_outcome = _validate(
        "metering_extract_instances",
        instances[["instance_id", "org_id", "tier"]].astype(object),
        [
            gx.expectations.ExpectColumnValuesToBeUnique(column="instance_id"),
            gx.expectations.ExpectColumnValuesToNotBeNull(column="org_id"),
            gx.expectations.ExpectColumnValuesToBeInSet(
                column="tier", value_set=sorted(known_tiers), mostly=0.99
            ),
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
