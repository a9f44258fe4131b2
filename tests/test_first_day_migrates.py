"""The first `tally run` on a brand-new billing database migrates it before anything
can fail: a failing first day reports its own failure, never a missing billing
table (issue 9, item 9b)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute

from resources import db

ROOT = Path(__file__).resolve().parents[1]
TALLY = Path(sys.executable).with_name("tally")
DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)
MIGRATIONS = sorted(path.stem for path in db.MIGRATIONS_DIR.glob("*.sql"))


@pytest.fixture()
def new_billing_url(database_url):
    """A brand-new, empty database for BILLING_DATABASE_URL (no schema at all)."""
    server = sa.engine.make_url(database_url)
    name = f"tally_new_billing_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def applied_migrations(url: str) -> list[str]:
    engine = sa.create_engine(db.normalize_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            if not connection.execute(
                sa.text("SELECT to_regclass('billing.schema_migrations') IS NOT NULL")
            ).scalar():
                return []
            return sorted(
                connection.execute(sa.text("SELECT version FROM billing.schema_migrations"))
                .scalars()
                .all()
            )
    finally:
        engine.dispose()


def test_run_migrates_a_new_billing_database_before_the_first_day(
    engine, new_billing_url, dagster_home, monkeypatch, capsys
):
    from pipelines import cli

    monkeypatch.setenv("BILLING_DATABASE_URL", new_billing_url)
    seen: list[list[str]] = []

    def first_day_fails_at_once(days, *, report_only, echo, shard=None):
        seen.append(applied_migrations(new_billing_url))  # what the day finds
        return len(days)

    monkeypatch.setattr(cli, "run_days", first_day_fails_at_once)
    code = cli.main(["run", "--start-date", str(DAY), "--end-date", str(DAY), "--report-only"])
    assert code == cli.EXIT_FAILED, capsys.readouterr()
    assert seen == [MIGRATIONS]


def test_failing_first_day_on_a_new_billing_database_names_its_failure(
    engine, new_billing_url, dagster_home, tmp_path
):
    add_org(engine, "org-a")
    add_instance(engine, "i-a", "org-a", "small")
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10), 30))
    command = [str(TALLY)] if TALLY.exists() else [sys.executable, "-m", "pipelines.cli"]
    result = subprocess.run(
        [*command, "run", "--start-date", str(DAY), "--end-date", str(DAY), "--report-only"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={
            **os.environ,
            "BILLING_DATABASE_URL": new_billing_url,
            "TALLY_PRICING_FILE": str(tmp_path / "missing-pricing.yaml"),
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "TALLY_PRICING_FILE" in result.stdout and "does not exist" in result.stdout, output
    for wrong in ("UndefinedTable", "unexpected", "Traceback"):
        assert wrong not in output, output
    assert applied_migrations(new_billing_url) == MIGRATIONS
