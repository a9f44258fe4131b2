"""Control plane and billing in two databases (BILLING_DATABASE_URL): every stage
reads each side from its own database and never joins across them."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from dagster import DagsterInstance
from test_push import DAY, sandbox_usage

from pipelines.definitions import defs
from resources import db


@pytest.fixture()
def billing_database(database_url, monkeypatch):
    name = f"tally_billing_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("BILLING_DATABASE_URL", url)
    yield db.engine_for(url)
    db._engine.cache_clear()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_whole_day_with_billing_in_its_own_database(engine, billing_database, providers_env):
    add_org(engine, "org-s", provider="stripe", customer="cus_SEP01", plan="base-plus-usage")
    add_org(engine, "org-p", provider="polar", customer="ext_org-p")
    add_instance(engine, "i-s", "org-s", "gpu")
    add_instance(engine, "i-p", "org-p", "small")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 9), 60))
    add_heartbeats(engine, every_minute("i-p", at(DAY, 9), 30))
    result = defs.resolve_job_def("daily_billing").execute_in_process(
        partition_key=DAY.isoformat(), instance=DagsterInstance.ephemeral()
    )
    assert result.success
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_SEP01", "gpu"): 3600,
        ("polar", "ext_org-p", "small"): 1800,
    }
    with billing_database.connect() as connection:
        billed = connection.execute(
            sa.text("SELECT org_id, billable_seconds FROM billing.billed_usage ORDER BY org_id")
        ).all()
        quota = connection.execute(
            sa.text("SELECT org_id, billable_seconds FROM billing.quota_usage ORDER BY org_id")
        ).all()
        kinds = connection.execute(sa.text("SELECT kind FROM billing.discrepancies")).all()
    assert [tuple(row) for row in billed] == [("org-p", 1800), ("org-s", 3600)]
    assert [tuple(row) for row in quota] == [("org-p", 1800), ("org-s", 3600)]
    # Push and read-back agree across the two databases; the builder's instances have
    # no counters and no last_heartbeat, which the control-plane kinds report.
    assert {row[0] for row in kinds} <= {"missing_counter", "stuck_instance"}
    with engine.connect() as connection:
        assert (
            connection.execute(sa.text("SELECT count(*) FROM billing.billed_usage")).scalar() == 0
        )
