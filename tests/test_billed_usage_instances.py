"""billing.billed_usage_instances: per-instance seconds written with billed_usage,
summing exactly to the (org, tier) rows; the over_daily split of rule 3.6 per
instance; the blocking check `instances_sum_to_orgs`; against the slow reference."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict

import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute, query_rows
from dagster import materialize
from hypothesis import HealthCheck, given, settings

try:
    from tests.metering_reference import BILLABLE, OVER_CONTINUOUS, OVER_DAILY, PAUSED
    from tests.test_metering_properties import D, daily_cap_worlds, fast, reference, worlds
except ImportError:  # tests/ on sys.path instead of the project root
    from metering_reference import (  # type: ignore[no-redef]
        BILLABLE,
        OVER_CONTINUOUS,
        OVER_DAILY,
        PAUSED,
    )
    from test_metering_properties import (  # type: ignore[no-redef]
        D,
        daily_cap_worlds,
        fast,
        reference,
        worlds,
    )

from assets.metering import billed_usage, instances_sum_check
from resources.db import PostgresResource
from resources.settings import RunMode

DAY = dt.date(2026, 11, 20)
RESOURCES = {"postgres": PostgresResource(), "run_mode": RunMode(report_only=True)}
SECONDS = [
    "runtime_seconds",
    "idle_paused_seconds",
    "over_continuous_seconds",
    "over_daily_seconds",
    "billable_seconds",
]
_INSTANCE_SQL = (
    "SELECT org_id, instance_id, tier, runtime_seconds, idle_paused_seconds, "
    "over_continuous_seconds, over_daily_seconds, billable_seconds "
    "FROM billing.billed_usage_instances WHERE usage_date = :d ORDER BY org_id, instance_id"
)
_ORG_SQL = (
    "SELECT org_id, tier, runtime_seconds, idle_paused_seconds, over_continuous_seconds, "
    "over_daily_seconds, billable_seconds FROM billing.billed_usage WHERE usage_date = :d "
    "ORDER BY org_id, tier"
)


def _materialize():
    return materialize([billed_usage], partition_key=DAY.isoformat(), resources=RESOURCES)


def _world(engine) -> None:
    # org-cap: daily limit 1 h, two instances from 10:00 and a third ("B-3", sorts
    # before "a-…" in byte order) from 10:20: 1 h is reached at 10:26:40 —
    # 20 min × 2 = 2400 s, then 3 instances × 400 s = 1200 s.
    add_org(engine, "org-cap", throttle=(480, 60, 30))
    add_instance(engine, "a-1", "org-cap", "small")
    add_instance(engine, "a-2", "org-cap", "medium")
    add_instance(engine, "B-3", "org-cap", "small")
    add_heartbeats(engine, every_minute("a-1", at(DAY, 10), 60))
    add_heartbeats(engine, every_minute("a-2", at(DAY, 10), 60))
    add_heartbeats(engine, every_minute("B-3", at(DAY, 10, 20), 40))
    # org-idle: idle 40 min (timeout 30) then active; continuous limit 1 h.
    add_org(engine, "org-idle", throttle=(60, 1440, 30))
    add_instance(engine, "i-idle", "org-idle", "gpu")
    add_heartbeats(engine, every_minute("i-idle", at(DAY, 1), 40, active=False))
    add_heartbeats(engine, every_minute("i-idle", at(DAY, 1, 40), 100))


def _by_instance(engine) -> dict[str, dict]:
    rows = query_rows(engine, _INSTANCE_SQL, {"d": DAY})
    return {
        row[1]: dict(zip(["org_id", "tier", *SECONDS], (row[0], *row[2:]), strict=True))
        for row in rows
    }


def test_per_instance_rows_written_with_billed_usage_and_sum_to_orgs(engine):
    _world(engine)
    first = _materialize()
    assert first.success
    checks = {e.check_name: e for e in first.get_asset_check_evaluations()}
    assert checks["instances_sum_to_orgs"].passed
    assert checks["instances_sum_to_orgs"].metadata["mismatched_rows"].value == 0

    rows = _by_instance(engine)
    assert set(rows) == {"a-1", "a-2", "B-3", "i-idle"}
    # Before T = 10:26:40 everything is billed; in T none (remaining 0); after, over.
    assert rows["a-1"]["billable_seconds"] == 1600
    assert rows["a-2"]["billable_seconds"] == 1600
    assert rows["B-3"]["billable_seconds"] == 400
    assert rows["a-1"]["over_daily_seconds"] == 3600 - 1600
    assert rows["B-3"]["over_daily_seconds"] == 2400 - 400
    # Idle 01:00–01:40: [01:30, 01:40) paused; the run 01:40–03:20 is over from 02:40.
    idle = rows["i-idle"]
    assert idle["runtime_seconds"] == 140 * 60
    assert idle["idle_paused_seconds"] == 600
    assert idle["over_continuous_seconds"] == 40 * 60
    assert idle["billable_seconds"] == 30 * 60 + 60 * 60
    for row in rows.values():
        assert row["runtime_seconds"] == sum(row[column] for column in SECONDS[1:])

    sums: dict[tuple, list[int]] = defaultdict(lambda: [0] * 5)
    for row in rows.values():
        key = (row["org_id"], row["tier"])
        sums[key] = [a + row[c] for a, c in zip(sums[key], SECONDS, strict=True)]
    orgs = {(r[0], r[1]): list(r[2:]) for r in query_rows(engine, _ORG_SQL, {"d": DAY})}
    assert orgs == dict(sums)

    # A re-run replaces, never adds.
    assert _materialize().success
    assert _by_instance(engine) == rows


def test_instances_sum_check_fails_when_the_tables_disagree(engine):
    _world(engine)
    assert _materialize().success
    billing = PostgresResource().billing_engine()
    assert instances_sum_check(billing, DAY).passed
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE billing.billed_usage_instances SET billable_seconds = billable_seconds "
                "- 1, over_daily_seconds = over_daily_seconds + 1 "
                "WHERE usage_date = :d AND instance_id = 'a-1'"
            ),
            {"d": DAY},
        )
    broken = instances_sum_check(billing, DAY)
    assert not broken.passed
    assert broken.metadata["mismatched"].value == "org-cap/small"
    with engine.begin() as connection:
        connection.execute(
            sa.text("DELETE FROM billing.billed_usage_instances WHERE instance_id = 'i-idle'")
        )
    assert instances_sum_check(billing, DAY).metadata["mismatched_rows"].value == 2


# --------------------------------------------------------------------------- properties

_COLUMN_OF_LABEL = {
    PAUSED: "idle_paused_seconds",
    OVER_CONTINUOUS: "over_continuous_seconds",
    OVER_DAILY: "over_daily_seconds",
    BILLABLE: "billable_seconds",
}


def _reference_instances(world) -> dict[str, tuple[int, ...]]:
    """Per instance: the reference's per-second labels of day D, counted."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for (instance_id, _second), label in reference(world).labels.items():
        counts[instance_id]["runtime_seconds"] += 1
        counts[instance_id][_COLUMN_OF_LABEL[label]] += 1
    return {iid: tuple(c[column] for column in SECONDS) for iid, c in counts.items()}


def _fast_instances(result) -> dict[str, tuple[int, ...]]:
    assert (result.instances["usage_date"] == D).all()
    return {
        row.instance_id: tuple(int(getattr(row, column)) for column in SECONDS)
        for row in result.instances.itertuples(index=False)
    }


def _sums_match(result) -> None:
    summed = result.instances.groupby(["org_id", "tier"], sort=True)[SECONDS].sum().reset_index()
    billed = result.billed[["org_id", "tier", *SECONDS]].reset_index(drop=True)
    assert summed.astype({c: "int64" for c in SECONDS}).equals(billed.astype(summed.dtypes))


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(world=worlds())
def test_per_instance_matches_the_reference_and_sums_to_orgs(world):
    result = fast(world)
    assert _fast_instances(result) == _reference_instances(world)
    _sums_match(result)


@PROPERTY_SETTINGS
@given(world=daily_cap_worlds())
def test_per_instance_daily_cap_split_matches_the_reference(world):
    # Several instances share the cap second: who is billed in it is the byte order.
    result = fast(world)
    assert _fast_instances(result) == _reference_instances(world)
    _sums_match(result)
