"""Metering benchmark: `tally run --report-only` for one day vs a bare COPY.

For each size (default 10,000 instances, 10 per org) × one heartbeat a minute for
the day and the day before (≈ 2,880 rows an instance) in PostgreSQL: the rows, a
bare `COPY (the day's heartbeats) TO STDOUT` measured in the same run, the wall
time of the run, their ratio and the run's own peak RSS (os.wait4 on the child).
Each figure is the median of --repeat runs. Then the same day as `--shards` org
shards at once (`TALLY_SHARDS`, one `tally run --shard K` process per shard, the
last combining the day), as the queued run coordinator runs a sharded day. Run by
hand:

    .venv/bin/python benchmarks/metering.py [--instances 10000,20000,40000] [--shards 4]

Uses BENCH_DATABASE_URL / --database-url, else the server at 127.0.0.1:5432, else
the embedded one; creates (and leaves, for re-runs with --reuse) one database per
size, `tally_bench_metering_<instances>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
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


def database_name(instances: int) -> str:
    return f"tally_bench_metering_{instances}"


def bench_url_for(url: str, instances: int) -> str:
    return (
        sa.engine.make_url(url)
        .set(database=database_name(instances))
        .render_as_string(hide_password=False)
    )


def build(url: str, instances: int, orgs: int) -> None:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    name = database_name(instances)
    with admin.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    engine = sa.create_engine(bench_url_for(url, instances))
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
    engine.dispose()
    print(
        f"{instances:,} instances: loaded {rows:,} heartbeats in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )


def existing_instances(bench_url: str) -> int | None:
    """How many instances the size's database holds (None: no such database)."""
    engine = sa.create_engine(bench_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT count(*) FROM instances")).scalar())
    except sa.exc.OperationalError:
        return None
    finally:
        engine.dispose()


def bare_copy_seconds(bench_url: str) -> tuple[float, int, int]:
    """The baseline: a text COPY of the day's heartbeats (seconds, bytes, rows)."""
    engine = sa.create_engine(bench_url)
    day_start = dt.datetime.combine(DAY, dt.time(), dt.UTC)
    with db.raw_connection(engine) as connection, connection.cursor() as cursor:
        started = time.monotonic()
        size = rows = 0
        with cursor.copy(
            "COPY (SELECT * FROM heartbeats WHERE sent_at >= %(start)s AND sent_at < %(end)s) "
            "TO STDOUT",
            {"start": day_start, "end": day_start + dt.timedelta(days=1)},
        ) as copy:
            for chunk in copy:
                size += len(chunk)
                rows += 1  # one CopyData message per row
        elapsed = time.monotonic() - started
    engine.dispose()
    return elapsed, size, rows


def tally_run(bench_url: str, shard: int | None = None, shards: int = 1) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": bench_url, "TALLY_HOME": str(ROOT / ".tally" / "bench")}
    env.pop("BILLING_DATABASE_URL", None)
    env.pop("DAGSTER_HOME", None)
    env["TALLY_SHARDS"] = str(shards)
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "run",
        "--start-date",
        DAY.isoformat(),
        "--end-date",
        DAY.isoformat(),
        "--report-only",
        *(["--shard", str(shard)] if shard is not None else []),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_child(process: subprocess.Popen) -> tuple[float, str]:
    """Wait for one child: (its own peak RSS in MiB, its output); exit on failure."""
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"tally run failed:\n{output}")
    return usage.ru_maxrss / 1024, output.strip().splitlines()[-1]


def tally_run_seconds(bench_url: str) -> tuple[float, float, str]:
    started = time.monotonic()
    peak_rss_mib, last_line = wait_child(tally_run(bench_url))
    return time.monotonic() - started, peak_rss_mib, last_line


def sharded_run_seconds(bench_url: str, shards: int) -> tuple[float, float, str]:
    """`tally run --shard K --report-only` for every shard at once (TALLY_SHARDS =
    `shards`), as the queued run coordinator would run them: wall time until the
    last one (which combines the day) ends, the largest process's peak RSS, and the
    combining process's last line."""
    started = time.monotonic()
    processes = [tally_run(bench_url, shard, shards) for shard in range(shards)]
    results = [wait_child(process) for process in processes]
    combined = [line for _, line in results if "combined" in line or "review" in line]
    return (
        time.monotonic() - started,
        max(peak for peak, _ in results),
        combined[-1] if combined else results[-1][1],
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--instances", default="10000", help="comma-separated sizes, e.g. 10000,20000,40000"
    )
    parser.add_argument("--per-org", type=int, default=10, help="instances per org")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--reuse", action="store_true", help="keep an existing size database")
    parser.add_argument(
        "--shards",
        type=int,
        default=4,
        help="also run each size as this many org shards in parallel (0: skip)",
    )
    parser.add_argument(
        "--shard-repeat", type=int, default=1, help="sharded runs per size (median)"
    )
    args = parser.parse_args()
    try:
        sizes = [int(size) for size in args.instances.split(",")]
    except ValueError:
        parser.error(f"--instances {args.instances!r}: give sizes like 10000,20000,40000")
    url = server_url(args.database_url)
    rows_out = []
    for instances in sizes:
        bench_url = bench_url_for(url, instances)
        if not (args.reuse and existing_instances(bench_url) == instances):
            build(url, instances, max(1, instances // args.per_org))
        copies, runs, ratios, peaks = [], [], [], []
        day_rows = 0
        last_line = ""
        for _ in range(args.repeat):
            # Paired: the baseline and the run back to back, so a busy machine
            # slows both and the ratio keeps its meaning.
            copy_seconds, _, day_rows = bare_copy_seconds(bench_url)
            run_seconds, peak_rss, last_line = tally_run_seconds(bench_url)
            copies.append(copy_seconds)
            runs.append(run_seconds)
            ratios.append(run_seconds / copy_seconds)
            peaks.append(peak_rss)
            print(
                f"  {instances:,}: COPY {copy_seconds:.2f} s, run {run_seconds:.2f} s "
                f"(×{ratios[-1]:.2f}), {peak_rss:,.0f} MiB",
                flush=True,
            )
        print(f"  {last_line}")
        sharded: list[tuple[float, float, float]] = []
        for _ in range(args.shard_repeat if args.shards > 1 else 0):
            copy_seconds, _, _ = bare_copy_seconds(bench_url)
            run_seconds, peak_rss, line = sharded_run_seconds(bench_url, args.shards)
            sharded.append((copy_seconds, run_seconds, peak_rss))
            print(
                f"  {instances:,} in {args.shards} shards at once: COPY {copy_seconds:.2f} s, "
                f"run {run_seconds:.2f} s (×{run_seconds / copy_seconds:.2f}), "
                f"{peak_rss:,.0f} MiB per process",
                flush=True,
            )
        rows_out.append((instances, day_rows, copies, runs, ratios, peaks, sharded))
    print()
    print("| instances | day rows | COPY s | tally s | ratio run / COPY | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for instances, day_rows, copies, runs, ratios, peaks, sharded in rows_out:
        print(
            f"| {instances:,} | {day_rows:,} | {median(copies):.2f} | {median(runs):.2f} | "
            f"**{median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) | "
            f"{max(peaks):,.0f} |"
        )
        if sharded:
            shard_ratios = [run / copy for copy, run, _ in sharded]
            print(
                f"| {instances:,}, {args.shards} shards at once | {day_rows:,} | "
                f"{median([c for c, _, _ in sharded]):.2f} | "
                f"{median([r for _, r, _ in sharded]):.2f} | "
                f"{median(shard_ratios):.2f} ({min(shard_ratios):.2f}–{max(shard_ratios):.2f}) | "
                f"{max(p for _, _, p in sharded):,.0f} per process |"
            )
    print(
        f"(medians of {args.repeat} paired runs ({args.shard_repeat} sharded), ratio range in "
        "brackets, peak RSS the "
        f"largest; load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
