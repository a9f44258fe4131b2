"""Metering benchmark: `tally run --report-only` for one day vs a bare COPY.

10,000 instances (1,000 orgs) × one heartbeat a minute for the day and the day
before (≈ 28.8 M rows) in PostgreSQL. Prints the wall time of the run, of a bare
`COPY (the day's heartbeats) TO STDOUT` measured in the same process, their ratio
and the run's peak RSS. Run by hand:

    .venv/bin/python benchmarks/metering.py [--instances 10000] [--database-url URL]

Uses BENCH_DATABASE_URL / --database-url, else the server at 127.0.0.1:5432, else
the embedded one; creates (and leaves, for re-runs with --reuse) database
`tally_bench`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import server_url  # noqa: E402

from resources import db  # noqa: E402

DAY = dt.date(2026, 11, 20)


def build(url: str, instances: int, orgs: int) -> None:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text("DROP DATABASE IF EXISTS tally_bench WITH (FORCE)"))
        connection.execute(sa.text("CREATE DATABASE tally_bench"))
    bench_url = sa.engine.make_url(url).set(database="tally_bench")
    engine = sa.create_engine(bench_url)
    db.create_control_plane(engine)
    started = time.monotonic()
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO organizations (org_id, name, plan, provider, provider_customer_id) "
                "SELECT 'org-' || o, 'Org ' || o, 'usage-only', 'stripe', 'cus_' || o "
                "FROM generate_series(1, :orgs) o"
            ),
            {"orgs": orgs},
        )
        connection.execute(
            sa.text(
                "INSERT INTO instances (instance_id, org_id, tier, status, created_at) "
                "SELECT 'i-' || lpad(i::text, 6, '0'), 'org-' || (1 + i % :orgs), "
                "(ARRAY['small','medium','large','gpu'])[1 + i % 4], 'running', '2026-01-01' "
                "FROM generate_series(1, :instances) i"
            ),
            {"orgs": orgs, "instances": instances},
        )
        connection.execute(sa.text("DROP INDEX heartbeats_sent_at"))
        # One heartbeat a minute with sub-second jitter; a 40-minute idle stretch
        # every 7 hours so idle pauses and continuous limits both apply.
        connection.execute(
            sa.text(
                "INSERT INTO heartbeats (instance_id, sent_at, active, received_at) "
                "SELECT 'i-' || lpad(i::text, 6, '0'), "
                "       m + make_interval(secs => (i % 50) / 10.0), "
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
        connection.execute(sa.text("CREATE INDEX heartbeats_sent_at ON heartbeats (sent_at)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE heartbeats"))
        rows = connection.execute(sa.text("SELECT count(*) FROM heartbeats")).scalar()
    print(f"loaded {rows:,} heartbeats in {time.monotonic() - started:.0f} s", flush=True)


def bare_copy_seconds(bench_url: str) -> tuple[float, int]:
    engine = sa.create_engine(bench_url)
    day_start = dt.datetime.combine(DAY, dt.time(), dt.UTC)
    with db.raw_connection(engine) as connection, connection.cursor() as cursor:
        started = time.monotonic()
        size = 0
        with cursor.copy(
            "COPY (SELECT * FROM heartbeats WHERE sent_at >= %(start)s AND sent_at < %(end)s) "
            "TO STDOUT",
            {"start": day_start, "end": day_start + dt.timedelta(days=1)},
        ) as copy:
            for chunk in copy:
                size += len(chunk)
        return time.monotonic() - started, size


def tally_run_seconds(bench_url: str) -> tuple[float, float, str]:
    env = {**os.environ, "DATABASE_URL": bench_url, "TALLY_HOME": str(ROOT / ".tally" / "bench")}
    env.pop("BILLING_DATABASE_URL", None)
    env.pop("DAGSTER_HOME", None)
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "run",
            "--start-date",
            DAY.isoformat(),
            "--end-date",
            DAY.isoformat(),
            "--report-only",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"tally run failed:\n{result.stdout}\n{result.stderr}")
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return elapsed, peak_rss_mib, result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--orgs", type=int, default=1_000)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--reuse", action="store_true", help="keep an existing tally_bench")
    args = parser.parse_args()
    url = server_url(args.database_url)
    bench_url = (
        sa.engine.make_url(url).set(database="tally_bench").render_as_string(hide_password=False)
    )
    if not args.reuse:
        build(url, args.instances, args.orgs)
    copy_seconds, copy_bytes = bare_copy_seconds(bench_url)
    run_seconds, peak_rss, last_line = tally_run_seconds(bench_url)
    print(last_line)
    print(
        f"bare COPY of the day's heartbeats : {copy_seconds:8.2f} s ({copy_bytes / 2**20:,.0f} MiB)"
    )
    print(f"tally run --report-only (one day) : {run_seconds:8.2f} s")
    print(f"ratio run / COPY                  : {run_seconds / copy_seconds:8.2f}  (target ≤ 3)")
    print(f"peak RSS of tally run             : {peak_rss:8.0f} MiB (target ≤ 2048)")


if __name__ == "__main__":
    main()
