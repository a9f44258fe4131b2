"""One CLI run of a usage day at a time (issue 9, item 9): a second `tally run` of a
day already running refuses that day with one clear line (exit 1), sends nothing for
it, and still runs its other days; the money stays exact. The real CLI, the real
PostgreSQL advisory lock held on another connection."""

from __future__ import annotations

import contextlib
import datetime as dt
import io

import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from test_push import DAY, sandbox_usage
from test_push_faults import expected_usage, ledger

EARLY = DAY - dt.timedelta(days=1)

# The lock `tally run` takes per day (sql/db/day_run_try_lock.sql), as pg_locks shows it.
HELD = sa.text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND classid::bigint = (hashtext('tally_run')::bigint & 4294967295) "
    "AND objid::bigint = (hashtext(:day)::bigint & 4294967295)"
)


def day_lock_held(engine, day: dt.date) -> bool:
    with engine.connect() as connection:
        return bool(connection.execute(HELD, {"day": day.isoformat()}).scalar())


def tally_run(start: dt.date, end: dt.date) -> tuple[int, str, str]:
    """`tally run` through the real CLI (`pipelines.cli.main`) in this process, on its
    own database connections: (exit code, stdout, stderr)."""
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "--start-date", start.isoformat(), "--end-date", end.isoformat()])
    return code, out.getvalue(), err.getvalue()


def test_a_second_run_of_a_running_day_refuses_it_and_runs_its_other_days(
    engine, providers_env, dagster_home
):
    """This test process holds EARLY through the very lock a running `tally run`
    holds (pipelines/day_lock.py), so the refusal is not a race; two real runs of one
    day are tests/test_push_faults.py::test_two_concurrent_runs_send_once."""
    from pipelines.day_lock import day_run_lock

    for number in range(3):
        org = f"org-{number:03d}"
        add_org(engine, org, provider="stripe", customer=f"cus_EARLY{number:03d}")
        add_instance(engine, f"i-{number:03d}", org, "small")
        add_heartbeats(engine, every_minute(f"i-{number:03d}", at(EARLY, 2), 10 + number))
    add_org(engine, "org-late", provider="stripe", customer="cus_LATEDAY")
    add_instance(engine, "i-late", "org-late", "small")
    add_heartbeats(engine, every_minute("i-late", at(DAY, 3), 45))

    with day_run_lock(EARLY) as held:
        assert held and day_lock_held(engine, EARLY)
        code, out, err = tally_run(EARLY, DAY)
    assert code == 1, (out, err)
    busy = [line for line in out.splitlines() if "BUSY" in line]
    assert len(busy) == 1 and str(EARLY) in busy[0], out
    assert "another tally run of this day is in progress" in busy[0]
    assert "Traceback" not in out + err
    # Nothing was done for the busy day; its other day ran in full.
    assert sandbox_usage(providers_env, EARLY) == {} and ledger(engine, EARLY) == []
    assert any(str(DAY) in line and " ok " in line for line in out.splitlines()), out
    assert sandbox_usage(providers_env, DAY) == {("stripe", "cus_LATEDAY", "small"): 2700}

    # Released: the day runs, exactly.
    assert not day_lock_held(engine, EARLY)
    code, out, err = tally_run(EARLY, EARLY)
    assert code == 0, (out, err)
    assert sandbox_usage(providers_env, EARLY) == expected_usage(engine, EARLY)
    assert len(expected_usage(engine, EARLY)) == 3
    assert [row[4] for row in ledger(engine, EARLY)] == ["sent"] * 3
