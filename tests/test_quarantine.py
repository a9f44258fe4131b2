"""Quarantine never fails the day and never loses or double-counts a row (issue 9,
findings 6 and 7): real PostgreSQL, real Dagster execution."""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter

import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, billed_rows, every_minute
from dagster import materialize

import assets.metering
from assets.metering import billed_usage
from resources.db import PostgresResource, raw_connection
from resources.settings import RunMode

DAY = dt.date(2026, 11, 20)
NEXT = DAY + dt.timedelta(days=1)
RESOURCES = {"postgres": PostgresResource(), "run_mode": RunMode(report_only=True)}
BLOCKING = (
    "runtime_identity",
    "billable_within_daily_limit",
    "no_negative_seconds",
    "great_expectations_extract",
    "great_expectations_output",
)


def _materialize(day: dt.date, monkeypatch=None, run_time: dt.datetime | None = None):
    if run_time is not None:
        monkeypatch.setattr(assets.metering, "current_run_time", lambda: run_time)
    return materialize(
        [billed_usage], partition_key=day.isoformat(), resources=RESOURCES, raise_on_error=False
    )


def _checks(result) -> dict:
    return {check.check_name: check for check in result.get_asset_check_evaluations()}


def _quarantine(engine, day: dt.date) -> Counter:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT reason FROM billing.quarantine WHERE usage_date = :d"), {"d": day}
        )
        return Counter(reason for (reason,) in rows)


def _billable(engine, day: dt.date) -> dict[str, int]:
    return {row["org_id"]: row["billable_seconds"] for row in billed_rows(engine, day)}


def _assert_day_passes(result) -> dict:
    assert result.success
    checks = _checks(result)
    for name in BLOCKING:
        assert checks[name].passed, (name, checks[name].metadata)
    return {key: value.value for key, value in checks["no_quarantined_heartbeats"].metadata.items()}


# --------------------------------------------------------------------------- finding 6


def test_an_unknown_tier_among_ten_instances_is_quarantined_and_the_rest_billed(engine):
    add_org(engine, "org-a")
    for number in range(10):
        tier = "xlarge" if number == 0 else "small"
        add_instance(engine, f"i-{number}", "org-a", tier)
        add_heartbeats(engine, every_minute(f"i-{number}", at(DAY, 9), 30))
    counts = _assert_day_passes(_materialize(DAY))
    assert counts["quarantined_unknown_tier"] == 30
    assert _billable(engine, DAY) == {"org-a": 9 * 1800}
    assert _quarantine(engine, DAY) == Counter({"unknown_tier": 30})


def test_six_percent_null_instance_ids_are_quarantined_and_the_rest_billed(engine):
    add_org(engine, "org-a")
    add_instance(engine, "i-a", "org-a", "medium")
    add_heartbeats(engine, every_minute("i-a", at(DAY, 8), 100))
    add_heartbeats(engine, [(None, at(DAY, 8, seconds=30 + 60 * k), True) for k in range(6)])
    add_heartbeats(engine, [("i-ghost", at(DAY, 9), True)])
    counts = _assert_day_passes(_materialize(DAY))
    assert counts["quarantined_null_instance_id"] == 6
    assert counts["quarantined_unknown_instance"] == 1
    assert _billable(engine, DAY) == {"org-a": 6000}


def _copy_heartbeats(engine, rows) -> None:
    """Many heartbeats at once (COPY), for days beyond the check's sample size."""
    buffer = io.StringIO()
    for instance_id, sent_at, active in rows:
        instance = "\\N" if instance_id is None else instance_id
        buffer.write(f"{instance}\t{sent_at.isoformat()}\t{'t' if active else 'f'}\t{sent_at}\n")
    with raw_connection(engine) as connection, connection.cursor() as cursor:
        with cursor.copy(
            "COPY heartbeats (instance_id, sent_at, active, received_at) FROM STDIN"
        ) as copy:
            copy.write(buffer.getvalue())


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-rows-early", "bad-rows-late"])
def test_a_day_beyond_the_sample_size_quarantines_and_counts_every_bad_row(engine, bad_first):
    """60,480 heartbeats (more than the 50,000-row sample): one unknown tier among 42
    instances and 6 % NULL instance ids, early or late in the day — quarantined and
    counted the same either way, and the day passes."""
    add_org(engine, "org-a")
    add_org(engine, "org-b")
    rows = []
    for number in range(42):
        tier = "xlarge" if number == (0 if bad_first else 41) else "small"
        add_instance(engine, f"i-{number:02}", "org-a" if number % 2 else "org-b", tier)
        rows += every_minute(f"i-{number:02}", at(DAY), 1440)
    start = at(DAY, 0 if bad_first else 20)
    rows += [(None, start + dt.timedelta(seconds=k), True) for k in range(3630)]
    _copy_heartbeats(engine, rows)
    counts = _assert_day_passes(_materialize(DAY))
    assert counts["quarantined_unknown_tier"] == 1440
    assert counts["quarantined_null_instance_id"] == 3630
    # 41 small instances 24 h each, 8 h of each within the continuous limit; each
    # org's 20 or 21 instances reach its 24 h daily limit.
    rows = {row["org_id"]: row for row in billed_rows(engine, DAY)}
    assert {org: row["billable_seconds"] for org, row in rows.items()} == {
        "org-a": 86_400,
        "org-b": 86_400,
    }
    assert sum(row["over_continuous_seconds"] for row in rows.values()) == 41 * 16 * 3600


# --------------------------------------------------------------------------- finding 7


def test_null_sent_at_is_quarantined_on_the_day_it_was_received(engine):
    add_org(engine, "org-a")
    add_instance(engine, "i-a", "org-a", "small")
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10), 60))
    add_heartbeats(
        engine,
        [
            ("i-a", None, True, at(DAY, 12)),
            ("i-a", None, False, at(DAY, 23, 59)),
            (None, None, True, at(DAY, 13)),
            ("i-a", None, True, at(NEXT, 0, 1)),  # received the next day: not this day's
        ],
    )
    counts = _assert_day_passes(_materialize(DAY))
    assert counts["quarantined_null_sent_at"] == 2
    assert _quarantine(engine, DAY) == Counter({"null_sent_at": 2, "null_instance_id": 1})
    assert _billable(engine, DAY) == {"org-a": 3600}
    _assert_day_passes(_materialize(NEXT))
    assert _quarantine(engine, NEXT) == Counter({"null_sent_at": 1})


def _future_world(engine) -> None:
    """i-a's clock runs ahead: heartbeats sent at NEXT 01:00-01:09 arrive at
    DAY 23:50-23:59."""
    add_org(engine, "org-a")
    add_instance(engine, "i-a", "org-a", "small")
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10), 60))
    add_heartbeats(
        engine,
        [("i-a", at(NEXT, 1, k), True, at(DAY, 23, 50 + k)) for k in range(10)],
    )


def _quarantined_sent_in(engine, day: dt.date) -> Counter:
    """Quarantine rows (usage_date, reason) of heartbeats sent during `day`."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT usage_date, reason FROM billing.quarantine "
                "WHERE sent_at >= :start AND sent_at < :end"
            ),
            {"start": at(day), "end": at(day + dt.timedelta(days=1))},
        )
        return Counter((usage_date, reason) for usage_date, reason in rows)


def test_a_future_row_leaves_the_quarantine_when_its_own_day_bills_it(engine, monkeypatch):
    _future_world(engine)
    # DAY metered just after midnight: NEXT 01:00 is beyond run time + 5 min.
    _assert_day_passes(_materialize(DAY, monkeypatch, at(NEXT, 0, 10)))
    assert _quarantined_sent_in(engine, NEXT) == Counter({(DAY, "future"): 10})
    assert _billable(engine, DAY) == {"org-a": 3600}

    # NEXT metered while they are still in the future: not billed, they stay.
    _assert_day_passes(_materialize(NEXT, monkeypatch, at(NEXT, 0, 20)))
    assert _billable(engine, NEXT) == {}
    assert _quarantined_sent_in(engine, NEXT) == Counter({(DAY, "future"): 10})

    # NEXT metered on schedule: billed on their own day and out of DAY's quarantine.
    _assert_day_passes(_materialize(NEXT, monkeypatch, at(NEXT + dt.timedelta(days=1), 2)))
    assert _billable(engine, NEXT) == {"org-a": 600}
    assert _quarantined_sent_in(engine, NEXT) == Counter()

    # A re-run of DAY afterwards neither bills nor quarantines them again.
    _assert_day_passes(_materialize(DAY, monkeypatch, at(NEXT + dt.timedelta(days=1), 3)))
    assert _billable(engine, DAY) == {"org-a": 3600}
    assert _quarantined_sent_in(engine, NEXT) == Counter()
    assert _billable(engine, NEXT) == {"org-a": 600}


def test_a_future_row_judged_otherwise_on_its_own_day_moves_there(engine, monkeypatch):
    """Re-judged on its own day as after_stop: in that day's quarantine only."""
    add_org(engine, "org-a")
    add_instance(engine, "i-s", "org-a", "small", status="stopped", stopped_at=at(NEXT, 0, 30))
    add_heartbeats(engine, [("i-s", at(NEXT, 1, k), True, at(DAY, 23, 50 + k)) for k in range(3)])
    _assert_day_passes(_materialize(DAY, monkeypatch, at(NEXT, 0, 10)))
    assert _quarantined_sent_in(engine, NEXT) == Counter({(DAY, "future"): 3})
    _assert_day_passes(_materialize(NEXT, monkeypatch, at(NEXT + dt.timedelta(days=1), 2)))
    assert _quarantined_sent_in(engine, NEXT) == Counter({(NEXT, "after_stop"): 3})


# --------------------------------------------------------------------------- the suite itself


def test_sample_positions_spread_over_the_whole_extract():
    from assets.quality import sample_positions

    assert sample_positions(4, 10).tolist() == [0, 1, 2, 3]
    assert sample_positions(10, 3).tolist() == [0, 4, 9]
    positions = sample_positions(120_000)
    assert len(positions) == 50_000 and positions[0] == 0 and positions[-1] == 119_999


def test_extract_suite_fails_only_on_what_would_bill_wrongly():
    """What reaches billing is validated strictly: an unpriced tier or a null
    sent_at there (quarantine broken) fails; a duplicate instance id fails."""
    import pandas as pd

    from assets.quality import validate_extract

    tiers = frozenset({"small"})
    sent = pd.Timestamp("2026-11-20 10:00", tz="UTC")
    billable = pd.DataFrame(
        {
            "instance_id": ["i-a", "i-a"],
            "sent_at": [sent, sent + pd.Timedelta(minutes=1)],
            "active": pd.array([True, None], dtype="boolean"),
            "org_id": ["org-a", "org-a"],
            "tier": ["small", "small"],
        }
    )
    instances = pd.DataFrame(
        {"instance_id": ["i-a", "i-x"], "org_id": ["org-a", "org-a"], "tier": ["small", "xlarge"]}
    )
    assert validate_extract(billable, instances, tiers).success
    wrong_tier = billable.assign(tier=["small", "xlarge"])
    assert not validate_extract(wrong_tier, instances, tiers).success
    null_sent = billable.assign(sent_at=[sent, pd.NaT])
    assert not validate_extract(null_sent, instances, tiers).success
    duplicated = pd.concat([instances, instances.head(1)], ignore_index=True)
    assert not validate_extract(billable, duplicated, tiers).success
