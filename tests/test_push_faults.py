"""Exactly once under faults: lost answers, 5xx, 429, concurrent runs, SIGKILL.

The sandbox is a real HTTP server on loopback; runs are real Dagster executions
(in-process `materialize`, or `tally run` as a subprocess)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from conftest import POLAR_TOKEN, STRIPE_KEY
from test_push import DAY, run_day, sandbox_usage

from pipelines.cli import failure_messages

ROOT = Path(__file__).resolve().parents[1]


def many_orgs(engine, count: int, tiers=("small", "gpu"), providers=("stripe", "polar")):
    for number in range(count):
        provider = providers[number % len(providers)]
        org = f"org-{number:03d}"
        customer = f"cus_{number:05d}" if provider == "stripe" else f"ext_{org}"
        add_org(engine, org, provider=provider, customer=customer)
        for tier_number, tier in enumerate(tiers):
            instance = f"i-{number:03d}-{tier}"
            add_instance(engine, instance, org, tier)
            add_heartbeats(
                engine,
                every_minute(instance, at(DAY, 1 + tier_number), 10 + number % 7 + tier_number),
            )


def expected_usage(engine, day=DAY) -> dict[tuple[str, str, str], int]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT o.provider, o.provider_customer_id, b.tier, b.billable_seconds "
                "FROM billing.billed_usage b JOIN organizations o USING (org_id) "
                "WHERE b.usage_date = :d AND b.billable_seconds > 0"
            ),
            {"d": day},
        ).all()
    return {(row[0], row[1], row[2]): row[3] for row in rows}


def ledger(engine, day=DAY) -> list[tuple]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT org_id, tier, seq, quantity, status FROM billing.usage_push_ledger "
                    "WHERE usage_date = :d ORDER BY org_id, tier, seq"
                ),
                {"d": day},
            )
        ]


def faults(sandbox, **settings) -> None:
    sandbox.post("/_sandbox/faults", json=settings).raise_for_status()


def clear_faults(sandbox) -> None:
    faults(sandbox, error_rate=0, drop_after_store_rate=0, latency_ms=0, rate_limit_per_s=0)


def test_lost_answers_then_rerun_is_exact(engine, providers_env):
    many_orgs(engine, 4)
    faults(providers_env, drop_after_store_rate=1.0, seed=1)
    failed = run_day(raise_on_error=False)
    assert not failed.success
    pending = [row for row in ledger(engine) if row[4] == "pending"]
    assert pending, "the lost answers must leave pending rows behind"
    # The events were stored although every answer was lost.
    assert sandbox_usage(providers_env) == expected_usage(engine)
    clear_faults(providers_env)
    rerun = run_day()
    assert rerun.success
    assert sandbox_usage(providers_env) == expected_usage(engine)
    assert {row[4] for row in ledger(engine)} == {"sent"}
    assert len(ledger(engine)) == len(expected_usage(engine))


def test_errors_drops_and_rate_limits_converge_exactly(engine, providers_env):
    many_orgs(engine, 12)
    faults(providers_env, error_rate=0.2, drop_after_store_rate=0.1, rate_limit_per_s=40, seed=7)
    outcomes = [run_day(raise_on_error=False).success for _ in range(4)]
    assert outcomes[-1], f"still failing after re-runs: {outcomes}"
    stats = providers_env.get("/_sandbox/stats").json()
    assert sandbox_usage(providers_env) == expected_usage(engine)
    assert {row[4] for row in ledger(engine)} == {"sent"}
    assert stats  # the sandbox counted the traffic it faulted


def tally_run(day: dt.date, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "run",
            "--start-date",
            day.isoformat(),
            "--end-date",
            day.isoformat(),
        ],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_two_concurrent_runs_send_once(engine, providers_env, dagster_home):
    many_orgs(engine, 10)
    faults(providers_env, latency_ms=30)
    first, second = tally_run(DAY), tally_run(DAY)
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    # Each run either ran the day or, while the other held it, refused it with BUSY
    # (tests/test_day_run_lock.py); at least one ran it, and nothing went out twice.
    ran = [process.returncode == 0 for process in (first, second)]
    assert any(ran), outputs
    for process, (out, _) in zip((first, second), outputs, strict=True):
        assert process.returncode == 0 or "BUSY" in out, outputs
    assert sandbox_usage(providers_env) == expected_usage(engine)
    assert len(ledger(engine)) == len(expected_usage(engine))


def test_sigkill_mid_push_then_rerun_is_exact(engine, providers_env, dagster_home):
    many_orgs(engine, 40, tiers=("small",), providers=("stripe",))
    # Each wave of concurrent sends takes 1 s, so the kill after the first wave lands
    # with the rest still to go, however loaded the machine is.
    faults(providers_env, latency_ms=1000)
    process = tally_run(DAY)
    deadline = time.monotonic() + 120
    delivered = 0
    while time.monotonic() < deadline and process.poll() is None:
        delivered = len(sandbox_usage(providers_env))
        if delivered >= 3:
            break
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    partial = sandbox_usage(providers_env)
    assert 0 < len(partial) < 40
    clear_faults(providers_env)
    rerun = tally_run(DAY)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert sandbox_usage(providers_env) == expected_usage(engine)
    assert len(ledger(engine)) == 40


def test_late_heartbeats_push_only_the_delta_and_fewer_seconds_cancel(engine, providers_env):
    add_org(engine, "org-s", provider="stripe", customer="cus_LATE1")
    add_instance(engine, "i-late", "org-s", "medium")
    add_heartbeats(engine, every_minute("i-late", at(DAY, 8), 60))
    run_day()
    assert sandbox_usage(providers_env) == {("stripe", "cus_LATE1", "medium"): 3600}
    # Late heartbeats: 30 more minutes → only 1800 s go out, as seq 2.
    add_heartbeats(engine, every_minute("i-late", at(DAY, 12), 30))
    run_day()
    assert sandbox_usage(providers_env) == {("stripe", "cus_LATE1", "medium"): 5400}
    assert [(row[2], row[3], row[4]) for row in ledger(engine)] == [
        (1, 3600, "sent"),
        (2, 1800, "sent"),
    ]
    # A daily limit of 60 min lowers billable to 3600 s: young events are cancelled
    # and the new total sent as one event; never a negative event.
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO throttle_settings VALUES ('org-s', 480, 60, 30)"))
    run_day()
    assert sandbox_usage(providers_env) == {("stripe", "cus_LATE1", "medium"): 3600}
    assert [(row[2], row[3], row[4]) for row in ledger(engine)] == [
        (1, 3600, "cancelled"),
        (2, 1800, "cancelled"),
        (3, 3600, "sent"),
    ]


def test_fewer_seconds_after_the_cancel_window_becomes_a_credit_proposal(engine, providers_env):
    add_org(engine, "org-s", provider="stripe", customer="cus_OLD01")
    add_org(engine, "org-p", provider="polar", customer="ext_org-p")
    add_instance(engine, "i-s", "org-s", "small")
    add_instance(engine, "i-p", "org-p", "small")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 8), 120))
    add_heartbeats(engine, every_minute("i-p", at(DAY, 8), 120))
    run_day()
    with engine.begin() as connection:
        # The Stripe event was sent two days ago: too old to cancel.
        connection.execute(
            sa.text(
                "UPDATE billing.usage_push_ledger SET sent_at = now() - interval '2 days' "
                "WHERE org_id = 'org-s'"
            )
        )
        connection.execute(
            sa.text(
                "INSERT INTO throttle_settings VALUES ('org-s', 480, 60, 30), "
                "('org-p', 480, 90, 30)"
            )
        )
    run_day()
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_OLD01", "small"): 7200,
        ("polar", "ext_org-p", "small"): 7200,
    }
    with engine.connect() as connection:
        proposals = connection.execute(
            sa.text("SELECT org_id, seconds, kind FROM billing.credit_proposals ORDER BY org_id")
        ).all()
    assert [tuple(row) for row in proposals] == [
        ("org-p", 1800, "push_over_sent"),
        ("org-s", 3600, "push_over_sent"),
    ]


def test_secrets_never_in_logs_metadata_or_errors(engine, providers_env, dagster_home):
    many_orgs(engine, 2, tiers=("small",))
    faults(providers_env, error_rate=1.0)
    process = tally_run(DAY)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "usage_push: " in out and "stripe: gave up" in out
    assert "Traceback" not in out + err
    from dagster import DagsterInstance, RunsFilter

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        run = instance.get_runs(RunsFilter(job_name="daily_billing"))[0]
        records = instance.all_logs(run.run_id)
    texts = [out, err] + [repr(record.dagster_event) + record.user_message for record in records]
    for text in texts:
        assert STRIPE_KEY not in text and POLAR_TOKEN not in text


@pytest.mark.parametrize("variable", ["STRIPE_API_KEY", "POLAR_ACCESS_TOKEN"])
def test_missing_key_names_the_variable_and_other_provider_still_pushed(
    engine, providers_env, monkeypatch, variable
):
    many_orgs(engine, 2, tiers=("small",))
    monkeypatch.delenv(variable)
    result = run_day(raise_on_error=False)
    assert not result.success
    messages = dict(failure_messages(result))
    assert variable in messages["usage_push"]
    pushed = {key[0] for key in sandbox_usage(providers_env)}
    assert pushed == {"stripe", "polar"} - {"stripe" if "STRIPE" in variable else "polar"}


def test_pending_row_past_the_dedupe_window_is_verified_not_resent(engine, providers_env):
    """Pending rows left for two days: Stripe no longer dedupes their identifiers, so
    a blind re-send would count twice. tally asks Stripe what it holds first."""
    add_org(engine, "org-s", provider="stripe", customer="cus_STALE1")
    add_org(engine, "org-t", provider="stripe", customer="cus_STALE2")
    add_instance(engine, "i-s", "org-s", "small")
    add_instance(engine, "i-t", "org-t", "large")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 8), 60))
    add_heartbeats(engine, every_minute("i-t", at(DAY, 8), 30))
    run_day()
    # org-s: delivered, but the answer never reached the ledger (still pending).
    # org-t: 10 late minutes whose event never reached Stripe (pending, seq 2).
    add_heartbeats(engine, every_minute("i-t", at(DAY, 8, 30), 10))
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE billing.usage_push_ledger SET status = 'pending', sent_at = NULL "
                "WHERE org_id = 'org-s'"
            )
        )
        connection.execute(
            sa.text(
                "INSERT INTO billing.usage_push_ledger (org_id, usage_date, tier, seq, provider, "
                "customer_id, quantity, identifier, status) VALUES ('org-t', :day, 'large', 2, "
                "'stripe', 'cus_STALE2', 600, :identifier, 'pending')"
            ),
            {"day": DAY, "identifier": f"tally:org-t:{DAY.isoformat()}:large:2"},
        )
        connection.execute(
            sa.text("UPDATE billing.usage_push_ledger SET created_at = now() - interval '2 days'")
        )
    providers_env.post("/_sandbox/clock", json={"advance_seconds": 2 * 86_400}).raise_for_status()
    result = run_day()
    assert sandbox_usage(providers_env) == {
        ("stripe", "cus_STALE1", "small"): 3600,
        ("stripe", "cus_STALE2", "large"): 2400,
    }
    assert {row[4] for row in ledger(engine)} == {"sent"}
    metadata = result.asset_materializations_for_node("usage_push")[0].metadata
    assert metadata["verified_delivered"].value == 1 and metadata["resent"].value == 1
