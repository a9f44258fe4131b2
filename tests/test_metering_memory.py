"""Memory stays flat as instances grow (issue 13): the day is extracted and metered
one group of whole orgs at a time, so the peak depends on the group size, not on
the number of instances. Real PostgreSQL; allocations traced with tracemalloc
(numpy and pandas report theirs), small sizes (the big ones are the benchmark's)."""

from __future__ import annotations

import datetime as dt
import tracemalloc

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import CONTROL_TABLES

from assets.extract import HeartbeatSpill, extract_day
from assets.metering import compute_in_org_chunks
from assets.metering_rules import MeteringRules

DAY = dt.date(2026, 11, 20)
RUN_TIME = dt.datetime(2026, 11, 21, 2, tzinfo=dt.UTC)
RULES = MeteringRules()
ROWS_PER_GROUP = 12_000  # a handful of instances a group
PER_ORG = 4
BATCH_BYTES = 256 << 10  # ADBC record batches of a few thousand rows


def _meter(engine: sa.Engine, *, in_memory: bool) -> tuple[int, int, int]:
    """(traced peak bytes, heartbeats, largest group's rows) of extracting and
    metering the day; `in_memory` holds the whole window at once (as before)."""
    tracemalloc.start()
    try:
        extract = extract_day(
            engine, DAY, RUN_TIME, RULES, rows_per_group=ROWS_PER_GROUP, batch_bytes=BATCH_BYTES
        )
        spill = extract.heartbeats
        assert isinstance(spill, HeartbeatSpill)
        heartbeats = spill.take(np.arange(len(spill))) if in_memory else spill
        result = compute_in_org_chunks(
            heartbeats,
            extract.instances,
            extract.throttle,
            DAY,
            RUN_TIME,
            RULES,
            max_rows_per_chunk=ROWS_PER_GROUP,
        )
        assert result.billed["billable_seconds"].sum() > 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, len(spill), int(spill.rows_per_group().max())


def _uniform_day(engine: sa.Engine, instances: int) -> None:
    """`instances` instances, PER_ORG an org, a heartbeat a minute for the day and
    the day before with an idle stretch every 7 hours (as the benchmark's data)."""
    with engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {', '.join(CONTROL_TABLES)} CASCADE"))
        connection.execute(
            sa.text(
                "INSERT INTO organizations (org_id, name, plan, provider, provider_customer_id) "
                "SELECT 'org-' || o, 'Org ' || o, 'usage-only', 'stripe', 'cus_' || o "
                "FROM generate_series(1, :orgs) o"
            ),
            {"orgs": instances // PER_ORG},
        )
        connection.execute(
            sa.text(
                "INSERT INTO instances (instance_id, org_id, tier, status, created_at) "
                "SELECT 'i-' || lpad(i::text, 6, '0'), 'org-' || (1 + i % :orgs), "
                "(ARRAY['small','medium','large','gpu'])[1 + i % 4], 'running', '2026-01-01' "
                "FROM generate_series(1, :instances) i"
            ),
            {"orgs": instances // PER_ORG, "instances": instances},
        )
        connection.execute(
            sa.text(
                "INSERT INTO heartbeats (instance_id, sent_at, active, received_at) "
                "SELECT 'i-' || lpad(i::text, 6, '0'), m + make_interval(secs => (i % 50) / 10.0), "
                "       ((extract(epoch FROM m)::bigint / 60 + i) % 420) >= 40, "
                "       m + interval '1 second' "
                "FROM generate_series(1, :instances) i, "
                "     generate_series(CAST(:start AS timestamptz), "
                "                     CAST(:end AS timestamptz) - interval '1 minute', "
                "                     interval '1 minute') m"
            ),
            {
                "instances": instances,
                "start": dt.datetime.combine(DAY - dt.timedelta(days=1), dt.time(), dt.UTC),
                "end": dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), dt.UTC),
            },
        )


@pytest.fixture(scope="module")
def measured(database_url: str) -> dict[int, dict[str, tuple[int, int, int]]]:
    from resources import db

    engine = db.engine_for(database_url)
    sizes: dict[int, dict[str, tuple[int, int, int]]] = {}
    for instances in (40, 160):
        _uniform_day(engine, instances)
        sizes[instances] = {
            "spilled": _meter(engine, in_memory=False),
            "in_memory": _meter(engine, in_memory=True),
        }
    with engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {', '.join(CONTROL_TABLES)} CASCADE"))
    return sizes


def test_peak_memory_does_not_grow_with_instances(measured) -> None:
    small, big = measured[40], measured[160]
    assert big["spilled"][1] > 3.5 * small["spilled"][1]  # 4× the heartbeats
    # Holding the whole window at once (the old extract) grows with the data...
    in_memory_growth = big["in_memory"][0] - small["in_memory"][0]
    assert big["in_memory"][0] > 2.5 * small["in_memory"][0], measured
    # ...group by group, only the result (rows per org and instance) grows: a few
    # per cent of that, and the peak stays well under 1.5× while the data is 4×.
    spilled_growth = big["spilled"][0] - small["spilled"][0]
    assert spilled_growth < 0.1 * in_memory_growth, measured
    assert big["spilled"][0] < 1.5 * small["spilled"][0], measured


def test_groups_are_bounded_by_the_group_size(measured) -> None:
    for sizes in measured.values():
        _, heartbeats, largest = sizes["spilled"]
        assert heartbeats > 3 * ROWS_PER_GROUP  # several groups
        # Whole orgs: a group may pass the size by less than one org's rows.
        assert largest <= ROWS_PER_GROUP + heartbeats / (sizes is measured[40] and 10 or 40)
