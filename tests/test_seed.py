"""pipelines.seed: deterministic synthetic control-plane data and its COPY loader."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import uuid

import numpy as np
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

from pipelines.seed import (
    COLUMNS,
    TABLES,
    SeedSpec,
    add_cli_arguments,
    generate,
    iter_heartbeat_chunks,
    load,
    run_from_args,
    seed,
    spec_from_args,
)
from resources.db import SQL_DIR

SERVER = os.environ.get("TALLY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
END = dt.date(2024, 3, 10)
SPEC = SeedSpec(orgs=20, instances=60, days=7, end_date=END, seed=7)
WINDOW_START = pd.Timestamp("2024-03-03", tz="UTC")  # look-back day
WINDOW_END = pd.Timestamp("2024-03-11", tz="UTC")


@pytest.fixture(scope="module")
def _seed_db():
    """A fresh scratch database, dropped afterwards."""
    name = f"tally_seed_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(f"{SERVER.replace('postgresql://', 'postgresql+psycopg://')}/{name}")
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return generate(SPEC)


def _clean(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Billable heartbeats per DESIGN §3.1: floored, known, not future, before stop,
    deduplicated; with org and tier."""
    hb = frames["heartbeats"].dropna(subset=["instance_id", "sent_at"])
    hb = hb[hb["sent_at"] < WINDOW_END + pd.Timedelta(days=365)]
    hb = hb.merge(frames["instances"], on="instance_id")  # drops unknown instances
    hb = hb[hb["stopped_at"].isna() | (hb["sent_at"] < hb["stopped_at"])]
    hb = hb.assign(
        sec=hb["sent_at"].dt.floor("s").astype("int64") // 10**6,
        active=hb["active"].fillna(True).astype(bool),
    )
    hb = hb.groupby(["instance_id", "sec"], as_index=False).agg(
        active=("active", "any"), org_id=("org_id", "first"), tier=("tier", "first")
    )
    return hb.sort_values(["instance_id", "sec"], ignore_index=True)


def _sessions(clean: pd.DataFrame) -> pd.DataFrame:
    gap = clean.groupby("instance_id")["sec"].diff()
    session = (gap.isna() | (gap > 300)).cumsum()
    return clean.assign(session=session).groupby("session").agg(
        instance_id=("instance_id", "first"), org_id=("org_id", "first"),
        tier=("tier", "first"), start=("sec", "min"), last=("sec", "max"),
    ).assign(end=lambda s: s["last"] + 60)


def _coverage(sessions: pd.DataFrame) -> pd.Series:
    parts = []
    for day in SPEC.usage_dates:
        d0 = int(pd.Timestamp(day, tz="UTC").timestamp())
        overlap = (np.minimum(sessions["end"], d0 + 86_400)
                   - np.maximum(sessions["start"], d0)).clip(lower=0)
        parts.append(sessions.assign(usage_date=day, seconds=overlap))
    covered = pd.concat(parts)
    covered = covered[covered["seconds"] > 0]
    return covered.groupby(["org_id", "usage_date", "tier"])["seconds"].sum()


def test_columns_match_source_schema(frames):
    schema = (SQL_DIR / "source_schema.sql").read_text()
    for table in TABLES:
        body = re.search(rf"CREATE TABLE {table} \((.*?)\n\);", schema, re.S).group(1)
        names = [line.split()[0] for line in body.splitlines()
                 if line.strip() and not line.strip().startswith(("PRIMARY", "--"))]
        assert list(frames[table].columns) == names == COLUMNS[table]


def test_same_spec_same_frames_other_seed_other_frames(frames):
    again = generate(SPEC)
    for table in TABLES:
        pd.testing.assert_frame_equal(frames[table], again[table], check_exact=True)
    other = generate(SeedSpec(orgs=20, instances=60, days=7, end_date=END, seed=8))
    assert not frames["heartbeats"].equals(other["heartbeats"])
    assert not frames["instances"].equals(other["instances"])


def test_chunks_concatenate_to_generated_heartbeats(frames):
    chunks = list(iter_heartbeat_chunks(SPEC))
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), frames["heartbeats"])


def test_organizations_and_throttle(frames):
    orgs = frames["organizations"]
    assert orgs["org_id"].tolist() == [f"org-{i:04d}" for i in range(1, 21)]
    assert set(orgs["plan"]) == {"free-tier", "base-plus-usage", "usage-only"}
    assert orgs["provider"].tolist() == ["stripe", "polar"] * 10
    assert orgs["provider_customer_id"].isna().sum() == 1
    ids = orgs.dropna(subset=["provider_customer_id"])
    stripe = ids[ids["provider"] == "stripe"]["provider_customer_id"]
    assert stripe.str.fullmatch(r"cus_[A-Za-z0-9]{10}").all()
    polar = ids[ids["provider"] == "polar"]
    assert (polar["provider_customer_id"] == "ext_" + polar["org_id"]).all()
    throttle = frames["throttle_settings"]
    assert 5 <= len(throttle) <= 8 and throttle["org_id"].isin(orgs["org_id"]).all()
    assert throttle["continuous_limit_minutes"].between(120, 240).any()
    assert throttle["daily_limit_minutes"].between(240, 600).any()
    assert throttle["idle_timeout_minutes"].between(10, 20).any()


def test_instances(frames):
    inst = frames["instances"]
    assert inst["instance_id"].str.fullmatch(r"i-[0-9a-f]{8}").all()
    assert inst["instance_id"].is_unique and len(inst) == 60
    assert set(inst["org_id"]) == set(frames["organizations"]["org_id"])
    assert set(inst["status"]) == {"running", "paused", "stopped"}
    assert set(inst["tier"]) <= {"small", "medium", "large", "gpu"}
    stopped = inst[inst["status"] == "stopped"]
    assert stopped["stopped_at"].notna().all()
    assert stopped["stopped_at"].between(WINDOW_START + pd.Timedelta(days=1), WINDOW_END).all()
    assert inst.loc[inst["status"] != "stopped", "stopped_at"].isna().all()
    # last_heartbeat = newest sent_at (ignoring clocks decades ahead)
    hb = frames["heartbeats"]
    hb = hb[hb["sent_at"] < WINDOW_END + pd.Timedelta(days=1)]
    newest = hb.groupby("instance_id")["sent_at"].max()
    merged = inst.set_index("instance_id")["last_heartbeat"].dropna()
    pd.testing.assert_series_equal(merged, newest.reindex(merged.index), check_names=False)
    # stuck: 'running' yet silent for hours before the end
    running = inst[inst["status"] == "running"]
    assert (running["last_heartbeat"] < WINDOW_END - pd.Timedelta(hours=3)).sum() >= 2


def test_every_anomaly_kind_is_present(frames):
    hb = frames["heartbeats"]
    known = set(frames["instances"]["instance_id"])
    assert hb["instance_id"].isna().any()
    assert hb["sent_at"].isna().any()
    assert hb["active"].isna().any()
    assert (hb["instance_id"].notna() & ~hb["instance_id"].isin(known)).any()
    assert (hb["sent_at"] > WINDOW_END + pd.Timedelta(days=3650)).any()
    assert hb["received_at"].notna().all()
    sane = hb[hb["sent_at"] < WINDOW_END]
    assert (sane["received_at"] >= sane["sent_at"]).all()
    assert (sane["received_at"] - sane["sent_at"] < pd.Timedelta(minutes=3)).all()

    # duplicates of (instance_id, second): exact, and some with conflicting active
    keyed = hb.dropna(subset=["instance_id", "sent_at"]).assign(
        sec=lambda f: f["sent_at"].dt.floor("s"))
    dup = keyed[keyed.duplicated(["instance_id", "sec"], keep=False)]
    share = dup.groupby(["instance_id", "sec"]).ngroups / len(keyed)
    assert 0.0005 < share < 0.005
    assert keyed.duplicated(["instance_id", "sent_at", "active"]).any()
    assert (dup.groupby(["instance_id", "sec"])["active"].nunique() > 1).any()

    # zombies: stopped instances heartbeating after stopped_at
    merged = hb.merge(frames["instances"], on="instance_id")
    after = merged[merged["sent_at"] >= merged["stopped_at"]]
    assert len(after) > 0 and (after["status"] == "stopped").all()


def test_session_shapes(frames):
    clean = _clean(frames)
    gaps = clean.groupby("instance_id")["sec"].diff().dropna()
    assert ((gaps > 90) & (gaps <= 300)).any()  # missed beats inside a session
    assert ((gaps > 300) & (gaps < 700)).any()  # short breaks: new session
    assert gaps.between(56, 64).mean() > 0.9  # ~60 s cadence with jitter
    sent = frames["heartbeats"]["sent_at"].dropna()
    assert (sent.dt.microsecond != 0).mean() > 0.9  # sub-second fractions
    sessions = _sessions(clean)
    crosses = (sessions["start"] // 86_400) != ((sessions["end"] - 1) // 86_400)
    assert crosses.sum() >= 5
    assert (sessions["end"] - sessions["start"] > 8 * 3600).any()  # continuous cap bites
    # idle stretches: runs of inactive beats, some longer than 30 min, some shorter
    run = (clean["active"] != clean["active"].shift()) | (
        clean["instance_id"] != clean["instance_id"].shift())
    runs = clean.assign(run=run.cumsum())[~clean["active"]].groupby("run")["sec"].agg(
        ["min", "max"])
    span = runs["max"] - runs["min"] + 60
    assert (span > 1800).any() and ((span >= 600) & (span <= 1800)).any()
    assert 0.6 < clean["active"].mean() < 0.98


def test_counters_follow_coverage_with_drift_and_gaps(frames):
    truth = _coverage(_sessions(_clean(frames)))
    counters = frames["usage_counters"].set_index(["org_id", "usage_date", "tier"])[
        "runtime_seconds"]
    assert counters.index.is_unique
    assert set(counters.index.get_level_values("usage_date")) == set(SPEC.usage_dates)
    assert not (set(counters.index) - set(truth.index))  # no counter without usage
    missing = set(truth.index) - set(counters.index)
    assert 1 <= len(missing) <= 0.1 * len(truth)
    both = pd.concat([counters, truth.reindex(counters.index)], axis=1, keys=["c", "t"])
    error = (both["c"] - both["t"]).abs() / both["t"]
    assert (error <= 0.01).mean() > 0.8
    assert (error == 0).mean() > 0.8
    assert ((error >= 0.019) & (error <= 0.151)).any()
    assert error.max() <= 0.151
    reconciled = frames["usage_counters"]["last_reconciled_at"]
    assert reconciled.notna().any() and reconciled.isna().any()
    updated = frames["usage_counters"]["updated_at"]
    dates = pd.to_datetime(frames["usage_counters"]["usage_date"]).dt.tz_localize("UTC")
    assert (updated - dates == pd.Timedelta(hours=23, minutes=59, seconds=59)).all()


def test_without_anomalies_everything_is_clean():
    spec = SeedSpec(orgs=6, instances=15, days=2, end_date=END, anomalies=False)
    frames = generate(spec)
    hb = frames["heartbeats"]
    assert not hb.isna().any().any()
    assert hb["instance_id"].isin(frames["instances"]["instance_id"]).all()
    assert not hb.duplicated(["instance_id", "sent_at"]).any()
    merged = hb.merge(frames["instances"], on="instance_id")
    assert not (merged["sent_at"] >= merged["stopped_at"]).any()
    counters = frames["usage_counters"].set_index(["org_id", "usage_date", "tier"])[
        "runtime_seconds"]
    global SPEC  # _coverage walks SPEC.usage_dates
    saved, SPEC = SPEC, spec
    try:
        truth = _coverage(_sessions(_clean(frames)))
    finally:
        SPEC = saved
    pd.testing.assert_series_equal(
        counters.sort_index(), truth.sort_index().astype("int64"), check_names=False)


def test_load_copies_every_row(_seed_db, frames):
    counts = seed(_seed_db, SPEC)
    assert counts == {table: len(frames[table]) for table in TABLES}
    with _seed_db.connect() as connection:
        for table in TABLES:
            assert connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() \
                == len(frames[table])
        stats = connection.execute(sa.text(
            "SELECT count(*) FILTER (WHERE instance_id IS NULL),"
            " count(*) FILTER (WHERE sent_at IS NULL), count(*) FILTER (WHERE active IS NULL),"
            " count(*) FILTER (WHERE active), min(sent_at), max(received_at),"
            " count(DISTINCT instance_id) FROM heartbeats")).one()
        index = connection.execute(sa.text(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'heartbeats'")).scalars().all()
        db_instances = pd.read_sql("SELECT * FROM instances ORDER BY instance_id", connection)
        db_counters = connection.execute(sa.text(
            "SELECT sum(runtime_seconds)::bigint, min(usage_date) FROM usage_counters")).one()
    hb = frames["heartbeats"]
    assert stats == (
        hb["instance_id"].isna().sum(), hb["sent_at"].isna().sum(), hb["active"].isna().sum(),
        hb["active"].sum(), hb["sent_at"].min().to_pydatetime(),
        hb["received_at"].max().to_pydatetime(), hb["instance_id"].nunique(),
    )
    assert index == ["CREATE INDEX heartbeats_sent_at ON public.heartbeats USING btree (sent_at)"]
    expected = frames["instances"].sort_values("instance_id", ignore_index=True)
    pd.testing.assert_frame_equal(
        db_instances, expected, check_dtype=False, check_index_type=False)
    assert db_counters == (frames["usage_counters"]["runtime_seconds"].sum(), SPEC.usage_dates[0])

    # replace=True truncates first; replace=False appends
    small = generate(SeedSpec(orgs=2, instances=3, days=1, end_date=END))
    assert load(_seed_db, small) == {t: len(small[t]) for t in TABLES}
    with _seed_db.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM heartbeats")).scalar() \
            == len(small["heartbeats"])
    more = {"heartbeats": small["heartbeats"]}
    assert load(_seed_db, more, replace=False) == {"heartbeats": len(small["heartbeats"])}
    with _seed_db.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM heartbeats")).scalar() \
            == 2 * len(small["heartbeats"])


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--orgs", "0"], "--orgs"),
        (["--orgs", "many"], "--orgs"),
        (["--instances", "-3"], "--instances"),
        (["--days", "0"], "--days"),
        (["--days", "1.5"], "--days"),
        (["--seed", "-1"], "--seed"),
        (["--orgs", "10", "--instances", "5"], "--instances"),
        (["--end-date", "2024-13-01"], "--end-date"),
        (["--end-date", "yesterday"], "--end-date"),
    ],
)
def test_cli_rejects_bad_flags(argv, flag):
    with pytest.raises(ValueError, match=re.escape(flag)) as error:
        run_from_args(_parse(*argv), engine=None)  # fails before touching the database
    assert "\n" not in str(error.value)


def test_cli_defaults_and_run(_seed_db):
    spec = spec_from_args(_parse())
    assert (spec.orgs, spec.instances, spec.days, spec.seed, spec.anomalies) == (20, 60, 7, 7, True)
    assert spec.end_date == dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    args = _parse("--orgs", "3", "--instances", "4", "--days", "1", "--seed", "5",
                  "--end-date", "2024-03-10", "--no-anomalies")
    expected = generate(SeedSpec(orgs=3, instances=4, days=1, end_date=END, seed=5,
                                 anomalies=False))
    assert run_from_args(args, _seed_db) == {t: len(expected[t]) for t in TABLES}


def test_spec_validation_and_generate_size_limit():
    with pytest.raises(ValueError, match="instances"):
        SeedSpec(orgs=5, instances=4)
    with pytest.raises(ValueError, match="providers"):
        SeedSpec(providers=("paypal",))
    with pytest.raises(ValueError, match="iter_heartbeat_chunks"):
        generate(SeedSpec(orgs=10, instances=100_000, days=7))
    assert SeedSpec(end_date=dt.datetime(2024, 1, 2, 5, tzinfo=dt.UTC)).end_date == dt.date(
        2024, 1, 2)
