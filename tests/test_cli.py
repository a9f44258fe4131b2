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
    assert sorted(run.tags["dagster/partition"] for run in runs) == [
        previous.isoformat(),
        DAY.isoformat(),
    ]
