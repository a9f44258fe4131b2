"""Late heartbeats (issue 10, item 5): heartbeats received after their day was billed
are counted per day (WARN check `no_late_heartbeats`), listed by `tally late`, billed
by `tally late --run` (only the delta is pushed; days past the Stripe window are
reported, not re-run), requested by the `late_heartbeats` sensor, and the month's
later quota days follow. Real PostgreSQL, the sandbox over HTTP, real runs."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import subprocess

import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from dagster import DagsterInstance, build_sensor_context
from test_push import sandbox_usage

from assets.late_heartbeats import MeteredDay, late_days
from pipelines.late import late_heartbeats_sensor
from resources.db import PostgresResource

NOW = dt.datetime.now(dt.UTC)
TODAY = NOW.date()
# Two days of one month, both inside the Stripe window, whatever today is.
EARLY = (TODAY - dt.timedelta(days=3)).replace(day=1)
LATER = EARLY + dt.timedelta(days=1)
OLD = TODAY - dt.timedelta(days=40)  # past the Stripe window


def tally(*args: str) -> subprocess.CompletedProcess:
    """The real CLI (`pipelines.cli.main`) in this process: its output and exit code."""
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run(start: dt.date, end: dt.date) -> None:
    result = tally("run", "--start-date", start.isoformat(), "--end-date", end.isoformat())
    assert result.returncode == 0, result.stdout + result.stderr


def late_json() -> list[dict]:
    result = tally("late", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ledger(engine, day: dt.date) -> list[tuple]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT seq, quantity, status FROM billing.usage_push_ledger "
                    "WHERE usage_date = :d ORDER BY seq"
                ),
                {"d": day},
            )
        ]


def month_to_date(engine, day: dt.date) -> int:
    with engine.connect() as connection:
        return connection.execute(
            sa.text(
                "SELECT billable_seconds FROM billing.quota_usage "
                "WHERE org_id = 'org-late' AND usage_date = :d"
            ),
            {"d": day},
        ).scalar_one()


# --------------------------------------------------------------------------- the rule


def metered(day: dt.date, seen: int) -> MeteredDay:
    start = at(day) - dt.timedelta(hours=6)
    return MeteredDay(day, start, at(day + dt.timedelta(days=1)), seen, at(day, 26))


@pytest.mark.parametrize(
    ("seen", "now_count", "late"),
    [
        (100, 100, None),  # nothing arrived since
        (100, 101, 1),  # one late heartbeat
        (100, 40, None),  # rows deleted (retention): fewer is not late
        (0, 7, 7),  # a day billed with nothing, then heartbeats
    ],
)
def test_late_days_decision(seen, now_count, late):
    found = late_days([(metered(EARLY, seen), now_count)], NOW)
    assert [day.late_heartbeats for day in found] == ([late] if late else [])


def test_late_days_in_date_order_and_past_the_stripe_window_marked():
    found = late_days([(metered(LATER, 0), 3), (metered(OLD, 5), 6), (metered(EARLY, 1), 2)], NOW)
    assert [(day.usage_date, day.past_stripe_window) for day in found] == [
        (OLD, True),
        (EARLY, False),
        (LATER, False),
    ]


# --------------------------------------------------------------------------- end to end


def test_late_heartbeats_are_listed_billed_as_a_delta_and_quota_follows(
    engine, providers_env, dagster_home
):
    add_org(engine, "org-late", provider="stripe", customer="cus_LATEHB1")
    add_instance(engine, "i-late", "org-late", "small")
    add_heartbeats(engine, every_minute("i-late", at(EARLY, 1), 30))
    add_heartbeats(engine, every_minute("i-late", at(LATER, 1), 60))
    run(EARLY, LATER)
    assert sandbox_usage(providers_env, EARLY) == {("stripe", "cus_LATEHB1", "small"): 1800}
    assert late_json() == []
    assert "no day got heartbeats after it was billed" in tally("late").stdout
    assert month_to_date(engine, LATER) == 1800 + 3600

    # Two hours of EARLY's heartbeats arrive after EARLY was billed.
    add_heartbeats(engine, every_minute("i-late", at(EARLY, 10), 120))
    [listed] = late_json()
    assert listed["usage_date"] == EARLY.isoformat()
    assert listed["late_heartbeats"] == 120 and listed["past_stripe_window"] is False
    text = tally("late")
    assert f"{EARLY}       120 late heartbeat(s)" in text.stdout
    assert "tally late --run" in text.stdout

    # The next run of a later day warns about it.
    from pipelines.definitions import defs

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        result = defs.resolve_job_def("daily_billing").execute_in_process(
            partition_key=LATER.isoformat(), instance=instance
        )
    [check] = [
        evaluation
        for evaluation in result.get_asset_check_evaluations()
        if evaluation.check_name == "no_late_heartbeats"
    ]
    assert not check.passed and check.severity.value == "WARN"
    assert check.metadata["late_heartbeats"].value == 120
    assert check.metadata["by_day"].value == f"{EARLY}: 120"

    # The sensor asks for exactly that day, once per late count.
    sensor = late_heartbeats_sensor(clock=lambda: NOW)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        context = build_sensor_context(
            instance=instance,
            resources={"postgres": PostgresResource()},
            repository_def=defs.get_repository_def(),
        )
        requests = sensor.evaluate_tick(context).run_requests
        again = sensor.evaluate_tick(context).run_requests
    assert [request.partition_key for request in requests] == [EARLY.isoformat()]
    assert [request.run_key for request in again] == [request.run_key for request in requests]

    # `tally late --run` bills them: only the 7,200 new seconds go out, as seq 2.
    rerun = tally("late", "--run")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "re-running 1 day(s) in date order" in rerun.stdout
    assert sandbox_usage(providers_env, EARLY) == {("stripe", "cus_LATEHB1", "small"): 9000}
    assert ledger(engine, EARLY) == [(1, 1800, "sent"), (2, 7200, "sent")]
    assert sandbox_usage(providers_env, LATER) == {("stripe", "cus_LATEHB1", "small"): 3600}
    # The month's later day already computed is recomputed in the same run.
    assert month_to_date(engine, LATER) == 9000 + 3600
    assert late_json() == []
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        context = build_sensor_context(
            instance=instance,
            resources={"postgres": PostgresResource()},
            repository_def=defs.get_repository_def(),
        )
        assert sensor.evaluate_tick(context).run_requests == []


def test_a_late_day_past_the_stripe_window_is_reported_not_rerun(
    engine, providers_env, dagster_home
):
    add_org(engine, "org-old", provider="stripe", customer="cus_LATEOLD")
    add_instance(engine, "i-old", "org-old", "small")
    add_heartbeats(engine, every_minute("i-old", at(OLD, 1), 30))
    run(OLD, OLD)
    add_heartbeats(engine, every_minute("i-old", at(OLD, 5), 15))
    [listed] = late_json()
    assert (listed["usage_date"], listed["late_heartbeats"]) == (OLD.isoformat(), 15)
    assert listed["past_stripe_window"] is True
    result = tally("late", "--run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "past the Stripe window: reported, not re-run" in result.stdout
    assert "nothing to re-run" in result.stdout
    assert late_json() == [listed]  # still late: nothing was re-run
    assert sandbox_usage(providers_env, OLD) == {}


def test_a_report_only_run_leaves_the_day_late(engine, providers_env, dagster_home):
    add_org(engine, "org-ro", provider="stripe", customer="cus_LATERO1")
    add_instance(engine, "i-ro", "org-ro", "small")
    add_heartbeats(engine, every_minute("i-ro", at(EARLY, 1), 30))
    run(EARLY, EARLY)
    add_heartbeats(engine, every_minute("i-ro", at(EARLY, 6), 10))
    report = tally(
        "run", "--start-date", EARLY.isoformat(), "--end-date", EARLY.isoformat(), "--report-only"
    )
    assert report.returncode == 0, report.stdout + report.stderr
    # Nothing was pushed, so the day still owes its late seconds.
    assert [day["late_heartbeats"] for day in late_json()] == [10]
    assert sandbox_usage(providers_env, EARLY) == {("stripe", "cus_LATERO1", "small"): 1800}
