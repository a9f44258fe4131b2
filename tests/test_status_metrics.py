"""`tally status` (exit codes, text and JSON) and the Prometheus metrics, against a
real Dagster instance and real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from builders import mark_reconciled
from conftest import free_port
from dagster import AssetMaterialization, DagsterInstance
from prometheus_client.parser import text_string_to_metric_families

from pipelines.freshness import AlertCursor, due_day, evaluate_freshness, record_alert
from pipelines.metrics import build_registry, exposition, metrics_server
from resources.db import raw_connection

UTC = dt.UTC
METRIC_NAMES = (
    "billing_reconciliation_last_success_timestamp",
    "billing_reconciliation_duration_seconds",
    "billing_reconciliation_discrepancies_total",
    "tally_usage_push_pending",
    "tally_provider_errors_total",
)


def tally(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        cwd=Path(__file__).resolve().parents[1],
    )


def materialize_in_dagster_only(instance: DagsterInstance, *days: dt.date) -> None:
    """Reconciliation materializations in a Dagster home, with nothing written to the
    billing database: what a home that ran against another database holds."""
    for day in days:
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key="reconciliation", partition=day.isoformat())
        )


def test_status_exit_codes_never_stale_fresh(engine, dagster_home):
    with DagsterInstance.from_config(str(dagster_home)):
        never = tally("status")
        assert never.returncode == 1, never.stderr
        assert never.stdout.startswith("reconciliation: NEVER RUN")
        assert "the reconciliation has never succeeded" in never.stdout
        assert "last alert:    none recorded" in never.stdout

        # Reconciled, but only a day long past: stale, and the last alert is shown.
        now = dt.datetime.now(UTC)
        mark_reconciled(engine, now.date() - dt.timedelta(days=5))
        stale = evaluate_freshness(None, set(), now)
        with raw_connection(engine) as connection:
            record_alert(
                connection,
                AlertCursor(),
                stale,
                delivered=["email"],
                errors=[],
                status="sent",
                now=now,
            )
        result = tally("status", "--json")
        assert result.returncode == 1, result.stderr
        document = json.loads(result.stdout)
        assert document["stale"] is True and document["never_run"] is False
        assert document["newest_day"] == (now.date() - dt.timedelta(days=5)).isoformat()
        assert any("is not reconciled" in reason for reason in document["reasons"])
        assert document["last_alert"]["state"] == "stale"
        assert document["last_alert"]["channels"] == ["email"]
        text = tally("status")
        assert text.returncode == 1 and text.stdout.startswith("reconciliation: STALE")
        assert "last alert:    STALE at " in text.stdout and "via email" in text.stdout

        # The due days reconciled just now: fresh, exit 0.
        mark_reconciled(engine, due_day(now), now.date() - dt.timedelta(days=1))
        fresh = tally("status")
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        assert fresh.stdout.startswith("reconciliation: FRESH")
        assert "stale:" not in fresh.stdout
        assert fresh.stderr == ""


# --------------------------------------------------------------------------- metrics


def push_errors(instance: DagsterInstance, day: str, stripe: int, polar: int) -> None:
    instance.report_runless_asset_event(
        AssetMaterialization(
            asset_key="usage_push",
            partition=day,
            metadata={"sent": 3, "stripe_errors": stripe, "polar_errors": polar},
        )
    )


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def seed_billing(engine: sa.Engine) -> bool:
    """Two pending ledger rows and one sent; discrepancies when the table exists."""
    with engine.begin() as connection:
        for seq, status in enumerate(("pending", "pending", "sent"), start=1):
            connection.execute(
                sa.text(
                    "INSERT INTO billing.usage_push_ledger (org_id, usage_date, tier, seq, "
                    "provider, customer_id, quantity, identifier, status) VALUES ('org-a', "
                    "'2026-11-20', 'small', :seq, 'stripe', 'cus_A', 60, :identifier, :status)"
                ),
                {"seq": seq, "identifier": f"tally:org-a:2026-11-20:small:{seq}", "status": status},
            )
        if not connection.execute(sa.text("SELECT to_regclass('billing.discrepancies')")).scalar():
            return False
        for kind in ("provider_over", "provider_over", "unpushed"):
            connection.execute(
                sa.text(
                    "INSERT INTO billing.discrepancies (usage_date, kind, org_id, tier, "
                    "delta_seconds, money_moving, detail) VALUES ('2026-11-20', :kind, 'org-a', "
                    "'small', 60, true, 'test')"
                ),
                {"kind": kind},
            )
    return True


def test_metrics_values_at_scrape_time(engine):
    with DagsterInstance.ephemeral() as instance:
        registry = build_registry(instance, lambda: engine)
        before = samples(exposition(registry))
        assert before[("billing_reconciliation_last_success_timestamp", ())] == 0.0
        assert ("billing_reconciliation_duration_seconds", ()) not in before
        assert before[("tally_usage_push_pending", ())] == 0.0

        reconciled_at = mark_reconciled(engine, dt.date(2026, 11, 20), run_seconds=42.5)
        push_errors(instance, "2026-11-19", stripe=2, polar=0)
        push_errors(instance, "2026-11-20", stripe=3, polar=1)
        has_discrepancies = seed_billing(engine)

        text = exposition(registry)
        for name in METRIC_NAMES:
            assert f"# TYPE {name} " in text or f"# TYPE {name.removesuffix('_total')} " in text
        found = samples(text)
        assert found[("billing_reconciliation_last_success_timestamp", ())] == pytest.approx(
            reconciled_at.timestamp(), abs=1e-3
        )
        assert found[("billing_reconciliation_duration_seconds", ())] == pytest.approx(
            42.5, abs=1e-3
        )
        assert found[("tally_usage_push_pending", ())] == 2.0
        assert found[("tally_provider_errors_total", (("provider", "stripe"),))] == 5.0
        assert found[("tally_provider_errors_total", (("provider", "polar"),))] == 1.0
        if has_discrepancies:
            assert (
                found[("billing_reconciliation_discrepancies_total", (("kind", "provider_over"),))]
                == 2.0
            )
            assert (
                found[("billing_reconciliation_discrepancies_total", (("kind", "unpushed"),))]
                == 1.0
            )

        # Errors are summed incrementally: a new push adds once, nothing counted twice.
        push_errors(instance, "2026-11-21", stripe=4, polar=0)
        again = samples(exposition(registry))
        assert again[("tally_provider_errors_total", (("provider", "stripe"),))] == 9.0
        assert again[("tally_provider_errors_total", (("provider", "polar"),))] == 1.0

        # Served over HTTP as Prometheus scrapes it.
        server = metrics_server(registry, "127.0.0.1", free_port())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            answer = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
        finally:
            server.shutdown()
            server.server_close()
        assert answer.status_code == 200
        assert samples(answer.text)[("tally_usage_push_pending", ())] == 2.0


def test_metrics_once_prints_the_exposition(engine, dagster_home):
    mark_reconciled(engine, dt.date(2026, 11, 20))
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        push_errors(instance, "2026-11-20", stripe=1, polar=2)
    seed_billing(engine)
    result = tally("metrics", "--once")
    assert result.returncode == 0, result.stderr
    for name in METRIC_NAMES:
        assert f"# HELP {name} " in result.stdout
    found = samples(result.stdout)
    assert found[("billing_reconciliation_last_success_timestamp", ())] > 0
    assert found[("tally_usage_push_pending", ())] == 2.0
    assert found[("tally_provider_errors_total", (("provider", "polar"),))] == 2.0


def test_status_reads_the_billing_database_not_the_local_dagster_home(engine, dagster_home):
    """Issue 10 finding 7: a Dagster home full of reconciliations against another
    database does not make a never-reconciled billing database fresh."""
    now = dt.datetime.now(UTC)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        materialize_in_dagster_only(instance, due_day(now), now.date() - dt.timedelta(days=1))
    result = tally("status", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["never_run"] is True and document["stale"] is True
    assert "the reconciliation has never succeeded" in document["reasons"]
    # Once this billing database records its own reconciliation of the due day: fresh.
    mark_reconciled(engine, due_day(now))
    assert tally("status").returncode == 0


def test_status_shows_the_last_failed_run_and_the_schedule(engine, dagster_home, providers_env):
    from builders import add_heartbeats, add_instance, add_org, at, every_minute

    day = dt.datetime.now(UTC).date() - dt.timedelta(days=1)
    add_org(engine, "org-s", provider="stripe", customer="cus_STATUS1")
    add_instance(engine, "i-s", "org-s", "small")
    add_heartbeats(engine, every_minute("i-s", at(day, 1), 30))
    providers_env.post("/_sandbox/faults", json={"error_rate": 1.0}).raise_for_status()
    try:
        failed = tally("run", "--start-date", day.isoformat(), "--end-date", day.isoformat())
    finally:
        providers_env.post("/_sandbox/faults", json={"error_rate": 0}).raise_for_status()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    document = json.loads(tally("status", "--json").stdout)
    last = document["last_failed_run"]
    assert last is not None and last["day"] == day.isoformat()
    assert last["step"] == "usage_push" and "stripe" in last["message"]
    assert failed.stdout.count(last["run_id"][:8]) == 1  # the run the CLI printed
    assert document["schedule"] == {
        "name": "daily_billing_schedule",
        "status": "running",
        "source": "code default",
        "daemon_heartbeat_at": None,
        "daemon_alive": False,
    }
    text = tally("status").stdout
    assert f"last failure:  run {last['run_id']} (day {day})" in text
    assert "daily_billing_schedule RUNNING" in text and "no dagster-daemon" in text
