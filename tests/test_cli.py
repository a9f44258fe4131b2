"""The `tally` command line, run as a real subprocess."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import add_heartbeats, add_instance, add_org, at, billed_rows, every_minute

DAY = dt.date(2026, 11, 20)


def tally(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "--start-date", "2026-13-01", "--end-date", "2026-11-20"], "not a date"),
        (["run", "--start-date", "2026-11-20", "--end-date", "2026-11-19"], "before --start-date"),
        (["run", "--start-date", "2026-11-20"], "--end-date"),
        (["run", "--start-date", "1999-01-01", "--end-date", "1999-01-02"], "TALLY_FIRST_DAY"),
        (["frobnicate"], "invalid choice"),
        ([], "no command"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, fragment):
    result = tally(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_one_line_exit_2():
    result = tally(
        "run",
        "--start-date",
        "2026-11-20",
        "--end-date",
        "2026-11-20",
        env={"DATABASE_URL": "postgresql://postgres:s3cret@127.0.0.1:1/nope"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to PostgreSQL" in lines[0], result.stderr
    assert "s3cret" not in result.stderr and "DATABASE_URL" in lines[0]


def test_run_over_a_range_records_runs(engine, dagster_home):
    add_org(engine, "org-a")
    add_instance(engine, "i-a", "org-a", "medium")
    previous = DAY - dt.timedelta(days=1)
    add_heartbeats(engine, every_minute("i-a", at(previous, 10), 60))
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10), 90))
    result = tally(
        "run", "--start-date", previous.isoformat(), "--end-date", DAY.isoformat(), "--report-only"
    )
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert progress[0].startswith(f"[1/2] {previous}") and " ok " in progress[0]
    assert progress[1].startswith(f"[2/2] {DAY}")
    assert billed_rows(engine, previous)[0]["billable_seconds"] == 3600
    assert billed_rows(engine, DAY)[0]["billable_seconds"] == 5400

    from dagster import DagsterInstance, RunsFilter

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs(RunsFilter(job_name="daily_billing"))
        reviews = instance.get_runs(RunsFilter(job_name="refresh_finance_review"))
    assert sorted(run.tags["dagster/partition"] for run in runs) == [
        previous.isoformat(),
        DAY.isoformat(),
    ]
    # No daemon here: the run refreshes the finance review itself, once, after its days.
    assert len(reviews) == 1 and "finance review refreshed" in result.stdout


def test_seed_loads_the_control_plane_and_rejects_bad_flags(engine):
    result = tally("seed", "--orgs", "3", "--instances", "6", "--days", "1", "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert "organizations=3" in result.stdout and "instances=6" in result.stdout
    import sqlalchemy as sa

    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM heartbeats")).scalar() > 1000
    bad = tally("seed", "--orgs", "5", "--instances", "2")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--instances" in bad.stderr


def test_demo_end_to_end(tmp_path):
    """`tally demo` on its own embedded PostgreSQL and sandbox: seeds, runs, reports."""
    env = {"TALLY_HOME": str(tmp_path / "home"), "DAGSTER_HOME": ""}
    env_clean = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "BILLING_DATABASE_URL", "DAGSTER_HOME")
    }
    demo_env = {**env_clean, "TALLY_HOME": env["TALLY_HOME"]}
    root = Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "demo",
                "--days",
                "2",
                "--orgs",
                "5",
                "--instances",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=root,
            env=demo_env,
        )
    finally:
        # The demo leaves its PostgreSQL and sandbox up for `tally ui`: stop them.
        subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "stop"],
            capture_output=True,
            timeout=120,
            cwd=root,
            env=demo_env,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("day "))
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert len(rows) == 2
    for row in rows:
        dt.date.fromisoformat(row[0])
        runtime, billable, pushed = (float(row[i].replace(",", "")) for i in (2, 3, 8))
        assert 0 < billable <= runtime
        assert 0 < pushed <= billable
    assert (tmp_path / "home" / "pg").is_dir()
