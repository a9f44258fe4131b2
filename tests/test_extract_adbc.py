"""The metering extract through ADBC (issue 13): the look-back window read by the
ADBC PostgreSQL driver and spilled per group of whole orgs gives exactly the rows a
plain read of the window gives, and exactly the metering result of the full history.
Real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import gc
import os
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at

from assets.extract import HeartbeatSpill, extract_day, spill_root
from assets.metering import compute_billed_usage, compute_in_org_chunks
from assets.metering_rules import MeteringRules
from pipelines.seed import SeedSpec, seed
from resources.db import libpq_uri, raw_connection, read_frame

DAY = dt.date(2026, 11, 20)
RUN_TIME = dt.datetime(2026, 11, 21, 2, tzinfo=dt.UTC)
RULES = MeteringRules()


@pytest.fixture()
def world(engine: sa.Engine) -> sa.Engine:
    """A seeded control plane (anomalies included) plus rows every path must keep:
    a null instance id, an id no instance has, a null `active`, a future row and a
    row with a null sent_at received on the day."""
    seed(engine, SeedSpec(orgs=12, instances=60, days=2, end_date=DAY, seed=5))
    add_org(engine, "org-edge", create_customer=False)
    add_instance(engine, "i-edge", "org-edge")
    add_heartbeats(
        engine,
        [
            (None, at(DAY, 3), True),
            ("i-ghost", at(DAY, 4), True),
            ("i-edge", at(DAY, 5), None),
            ("i-edge", at(DAY, 5, 1), True),
            ("i-edge", RUN_TIME + dt.timedelta(hours=3), True, at(DAY, 6)),
            ("i-edge", None, True, at(DAY, 7)),
        ],
    )
    return engine


def _rows(frame: pd.DataFrame) -> Counter:
    """Rows as comparable tuples (ids as text or None, stamps in µs, active or None)."""

    def value(item):
        if item is None or item is pd.NA or (isinstance(item, float) and pd.isna(item)):
            return None
        if isinstance(item, pd.Timestamp | dt.datetime):
            return None if pd.isna(item) else pd.Timestamp(item).as_unit("us").value
        return item if isinstance(item, str) else bool(item)

    return Counter(
        tuple(value(item) for item in row)
        for row in frame[["instance_id", "sent_at", "active", "received_at"]].itertuples(
            index=False
        )
    )


def _spilled_frame(spill: HeartbeatSpill) -> pd.DataFrame:
    frames = [spill.group(group).to_frame() for group in range(spill.groups)]
    return pd.concat(frames, ignore_index=True).astype({"instance_id": object})


def _plain_window(engine: sa.Engine) -> pd.DataFrame:
    """The window and the untrusted rows outside it, read with plain SQL."""
    window_start, window_end = RULES.lookback_window(DAY)
    with engine.connect() as connection:
        return pd.read_sql(
            sa.text(
                "SELECT instance_id, sent_at, active, received_at FROM heartbeats "
                "WHERE (sent_at >= :ws AND sent_at < :we) "
                "   OR ((sent_at IS NULL OR sent_at >= :future) "
                "       AND received_at >= :ds AND received_at < :de)"
            ),
            connection,
            params={
                "ws": window_start,
                "we": window_end,
                "future": RUN_TIME + dt.timedelta(seconds=RULES.future_tolerance_s),
                "ds": at(DAY),
                "de": at(DAY + dt.timedelta(days=1)),
            },
        )


@pytest.mark.parametrize("rows_per_group", [1_500, 10_000_000])
def test_the_spilled_extract_is_the_window_and_meters_like_the_full_history(
    world: sa.Engine, rows_per_group: int
) -> None:
    extract = extract_day(world, DAY, RUN_TIME, RULES, rows_per_group=rows_per_group)
    spill = extract.heartbeats
    assert isinstance(spill, HeartbeatSpill)
    assert (spill.groups > 5) == (rows_per_group == 1_500)

    # Exactly the rows of the window (and the untrusted rows of the day), no more.
    plain = _plain_window(world)
    assert len(spill) == len(plain) == sum(spill.rows_per_group())
    assert _rows(_spilled_frame(spill)) == _rows(plain)

    # Groups hold whole orgs; rows of no instance (null, unknown id) are in group 0.
    instances = extract.instances.assign(group=spill.instance_group)
    assert (instances.groupby("org_id")["group"].nunique() == 1).all()
    for group in range(1, spill.groups):
        ids = set(spill.group(group).to_frame()["instance_id"].astype(object))
        assert ids <= set(instances.loc[instances["group"] == group, "instance_id"])
    first = spill.group(0).to_frame()["instance_id"].astype(object)
    assert first.isna().sum() == plain["instance_id"].isna().sum() > 0
    assert (first == "i-ghost").sum() == 1

    # Metered group by group: the same as metering the whole history at once.
    with raw_connection(world) as connection:
        history = read_frame(connection, "extract/instances.sql")
        everything = pd.read_sql("SELECT * FROM heartbeats", world)
    assert len(everything) > len(spill)
    whole = compute_billed_usage(everything, history, extract.throttle, DAY, RUN_TIME, RULES)
    grouped = compute_in_org_chunks(
        spill, extract.instances, extract.throttle, DAY, RUN_TIME, RULES
    )
    pd.testing.assert_frame_equal(whole.billed, grouped.billed)
    assert whole.billed["billable_seconds"].sum() > 0
    assert grouped.duplicates_collapsed == whole.duplicates_collapsed > 0
    key = ["reason", "instance_id", "sent_at"]

    def quarantine(result):
        frame = result.quarantine.astype({"instance_id": object})
        return frame.sort_values(key, na_position="first").reset_index(drop=True)[key]

    pd.testing.assert_frame_equal(quarantine(whole), quarantine(grouped))
    assert {"future", "unknown_instance"} <= set(grouped.quarantine["reason"])


def test_take_picks_rows_in_the_groups_laid_end_to_end(world: sa.Engine) -> None:
    spill = extract_day(world, DAY, RUN_TIME, RULES, rows_per_group=1_500).heartbeats
    assert isinstance(spill, HeartbeatSpill) and spill.groups > 5
    everything = spill.take(np.arange(len(spill)))
    assert len(everything) == len(spill)
    offset = 0
    for group in range(spill.groups):
        rows = spill.group(group)
        assert (everything.sent_us[offset : offset + len(rows)] == rows.sent_us).all()
        ids = [rows.categories[code] if code >= 0 else None for code in rows.code]
        assert ids == [
            everything.categories[code] if code >= 0 else None
            for code in everything.code[offset : offset + len(rows)]
        ]
        offset += len(rows)
    picks = np.array([0, 7, len(spill) // 2, len(spill) - 1])
    some = spill.take(picks)
    for name in ("code", "sent_us", "active", "received_us"):
        assert (getattr(some, name) == getattr(everything, name)[picks]).all()


def test_the_spill_directory_goes_with_the_extract(world: sa.Engine) -> None:
    extract = extract_day(world, DAY, RUN_TIME, RULES, rows_per_group=2_000)
    spill = extract.heartbeats
    assert isinstance(spill, HeartbeatSpill)
    directory = spill.directory
    assert directory.parent == spill_root() and any(directory.glob("*.arrow"))
    spill.close()
    assert not directory.exists()

    collected = extract_day(world, DAY, RUN_TIME, RULES).heartbeats
    assert isinstance(collected, HeartbeatSpill)
    directory = collected.directory
    assert directory.exists()
    del collected
    gc.collect()
    assert not directory.exists()

    # A directory left by a process that died is removed by the next extract.
    dead_pid = max(int(pid) for pid in os.listdir("/proc") if pid.isdigit()) + 10_000
    stale = spill_root() / f"{dead_pid}-leftover"
    stale.mkdir()
    (stale / "group-00000-part-0.arrow").write_bytes(b"x")
    mine = spill_root() / f"{os.getpid()}-mine"
    mine.mkdir()
    spill_root()
    assert not stale.exists() and mine.exists()
    mine.rmdir()


def test_libpq_uri_is_the_engines_database_without_the_driver_suffix() -> None:
    engine = sa.create_engine("postgresql+psycopg://tally:s%40cret@db.example:6543/billing")
    assert libpq_uri(engine) == "postgresql://tally:s%40cret@db.example:6543/billing"
    socket = sa.create_engine("postgresql+psycopg://postgres@/tally?host=/run/pg")
    assert libpq_uri(socket).startswith("postgresql://postgres@/tally?host=")
