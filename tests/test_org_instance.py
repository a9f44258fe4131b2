"""`tally org ORG --instance I --day D [--json]`: one instance's bill explained from
the metering rules, agreeing with billing.billed_usage_instances for the day."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from builders import add_heartbeats, add_instance, add_org, at, every_minute, query_rows
from dagster import materialize

from assets.metering import billed_usage
from pipelines.cli import main
from resources.db import PostgresResource
from resources.settings import RunMode

DAY = dt.date(2026, 11, 20)
SECONDS = [
    "runtime_seconds",
    "idle_paused_seconds",
    "over_continuous_seconds",
    "over_daily_seconds",
    "billable_seconds",
]


@pytest.fixture()
def metered(engine):
    # Continuous limit 2 h, daily limit 3 h, idle timeout 30 min.
    add_org(engine, "org-x", throttle=(120, 180, 30))
    add_instance(engine, "i-a", "org-x", "gpu")
    add_instance(engine, "i-b", "org-x", "small")
    # i-a: 23:00 on D-1 → 02:00 on D (the run started the day before: over from 01:00),
    # then idle 40 min from 10:00 and active 10:40–12:00.
    add_heartbeats(engine, every_minute("i-a", at(DAY, -1), 180))
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10), 40, active=False))
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10, 40), 80))
    # i-b: 09:00–12:00, over the continuous limit from 11:00; with i-a the org
    # reaches its 3 h at 10:30.
    add_heartbeats(engine, every_minute("i-b", at(DAY, 9), 180))
    result = materialize(
        [billed_usage],
        partition_key=DAY.isoformat(),
        resources={"postgres": PostgresResource(), "run_mode": RunMode(report_only=True)},
    )
    assert result.success
    return engine


def _stored(engine, instance: str) -> dict[str, int]:
    (row,) = query_rows(
        engine,
        f"SELECT {', '.join(SECONDS)} FROM billing.billed_usage_instances "
        "WHERE usage_date = :d AND instance_id = :i",
        {"d": DAY, "i": instance},
    )
    return dict(zip(SECONDS, row, strict=True))


def _instance(capsys, instance: str, *extra: str) -> str:
    capsys.readouterr()
    code = main(["org", "org-x", "--instance", instance, "--day", DAY.isoformat(), *extra])
    assert code == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_json_explains_the_instance_and_agrees_with_billed_usage(metered, capsys):
    report = json.loads(_instance(capsys, "i-a", "--json"))
    assert report["schema"] == "tally.org_instance/1"
    assert report["agrees_with_billed_usage"] is True
    assert report["seconds"] == report["stored_seconds"] == _stored(metered, "i-a")
    sessions = [(s["start"], s["end"], s["seconds_in_day"]) for s in report["sessions"]]
    assert sessions == [
        ("2026-11-19T23:00:00Z", "2026-11-20T02:00:00Z", 7200),
        ("2026-11-20T10:00:00Z", "2026-11-20T12:00:00Z", 7200),
    ]
    assert [(c["start"], c["end"]) for c in report["idle_cuts"]] == [
        ("2026-11-20T10:30:00Z", "2026-11-20T10:40:00Z")
    ]
    assert [(c["start"], c["seconds_in_day"]) for c in report["continuous_cap_cuts"]] == [
        ("2026-11-20T01:00:00Z", 3600)
    ]
    # Org billable before 09:00: i-a 1 h (00:00–01:00). 09:00–10:00 i-b (1 h, 2 h in
    # total), 10:00–10:30 both (3 h at 10:30). i-a's later run 10:40–12:00 is all cut.
    assert [(c["start"], c["end"]) for c in report["daily_cap_cuts"]] == [
        ("2026-11-20T10:40:00Z", "2026-11-20T12:00:00Z")
    ]
    assert report["seconds"] == {
        "runtime_seconds": 4 * 3600,
        "idle_paused_seconds": 600,
        "over_continuous_seconds": 3600,
        "over_daily_seconds": 80 * 60,
        "billable_seconds": 3600 + 1800,
    }
    assert report["list_amount"] == "3.75"  # 1.5 h × $2.50


def test_every_instance_of_the_org_agrees(metered, capsys):
    for instance in ("i-a", "i-b"):
        report = json.loads(_instance(capsys, instance, "--json"))
        assert report["seconds"] == _stored(metered, instance), instance
        spans = sum(c["seconds_in_day"] for c in report["daily_cap_cuts"])
        assert spans == report["seconds"]["over_daily_seconds"]
        idle = sum(c["seconds_in_day"] for c in report["idle_cuts"])
        assert idle == report["seconds"]["idle_paused_seconds"]


def test_text_for_support(metered, capsys):
    text = _instance(capsys, "i-b")
    assert "i-b  (small)  of org-x" in text
    assert "billed         1.50 h  $0.08 at list price  (matches billed usage)" in text
    assert "daily cap      10:30:00 - 11:00:00  0.50 h in the day" in text
    assert "continuous cap 11:00:00 - 12:00:00  1.00 h in the day" in text
    assert "idle cuts      none" in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["org", "nobody", "--instance", "i-a", "--day", DAY.isoformat()], "no organization"),
        (["org", "org-x", "--instance", "i-zz", "--day", DAY.isoformat()], "no instance 'i-zz'"),
        (["org", "org-x", "--instance", "i-a", "--day", "2026-11-25"], "not been metered"),
        (["org", "org-x", "--instance", "i-a"], "--instance and --day go together"),
        (["org", "org-x", "--instance", "i-a", "--day", "20-11-2026"], "not a date"),
    ],
)
def test_mistakes_are_one_line_exit_2(metered, capsys, args, fragment):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
