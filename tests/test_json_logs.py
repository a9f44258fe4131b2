"""`TALLY_LOG_FORMAT=json` (issue 11 item 7): a real `tally run` writes one JSON object
per log event on stderr, carrying the day, the stage and the run id, with WARN lines
for refused pushes and unexplained money-moving discrepancies — and never a secret."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from conftest import POLAR_TOKEN, STRIPE_KEY

from pipelines.cli import main
from pipelines.logs import JsonFormatter, scrub

ROOT = Path(__file__).resolve().parents[1]
DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
SMTP_SECRET = "smtp-PASSWORD-never-logged-42"


def record(message: str, **extra) -> logging.LogRecord:
    entry = logging.LogRecord("tally", logging.WARNING, __file__, 1, message, (), None)
    entry.__dict__.update(extra)
    return entry


def test_formatter_scrubs_secret_values_and_key_shapes(monkeypatch) -> None:
    monkeypatch.setenv("STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_SECRET)
    line = JsonFormatter().format(
        record(
            f"login with {SMTP_SECRET} and {STRIPE_KEY}; also sk_live_abc123 polar_oat_x1y2",
            provider="stripe",
            day="2025-06-01",
            counts={"refused": 2, "detail": f"key={POLAR_TOKEN}"},
        )
    )
    fields = json.loads(line)
    assert fields["level"] == "WARNING" and fields["provider"] == "stripe"
    assert fields["day"] == "2025-06-01" and fields["counts"]["refused"] == 2
    assert fields["message"].count("[redacted]") == 4
    for secret in (SMTP_SECRET, STRIPE_KEY, POLAR_TOKEN, "sk_live_abc123", "polar_oat_x1y2"):
        assert secret not in line
    assert scrub("no secrets here") == "no secrets here"


def test_an_unknown_log_format_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TALLY_LOG_FORMAT", "xml")
    assert main(["status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "tally: error: TALLY_LOG_FORMAT='xml' is not a log format; use text or json (or unset it)"
    )


def tally_run(day: dt.date) -> subprocess.CompletedProcess:
    env = {**os.environ, "TALLY_LOG_FORMAT": "json", "SMTP_PASSWORD": SMTP_SECRET}
    return subprocess.run(
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
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tally_run_logs_json_lines_with_day_stage_and_run_id(engine, providers_env, dagster_home):
    add_org(engine, "org-ok", provider="stripe", customer="cus_JSONLOG1")
    add_instance(engine, "i-ok", "org-ok", "small")
    add_heartbeats(engine, every_minute("i-ok", at(DAY, 1), 60))
    # No usable customer id: its push is refused (and its usage stays unbilled).
    add_org(engine, "org-nocus", provider="stripe", customer="")
    add_instance(engine, "i-nocus", "org-nocus", "small")
    add_heartbeats(engine, every_minute("i-nocus", at(DAY, 2), 60))

    done = tally_run(DAY)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every stderr line is a JSON log event
    assert len(events) > 5
    assert all({"time", "level", "message"} <= set(event) for event in events)

    [progress] = [line for line in done.stdout.splitlines() if line.startswith("[1/1]")]
    short_run_id = progress.rsplit("run ", 1)[1].strip()
    ours = [e for e in events if e.get("run_id", "").startswith(short_run_id)]
    assert ours and all(e["day"] == DAY.isoformat() for e in ours)
    stages = {e.get("stage") for e in ours}
    assert {"billed_usage", "usage_push", "reconciliation"} <= stages
    materialized = [e for e in ours if e.get("event") == "ASSET_MATERIALIZATION"]
    assert any(e["stage"] == "usage_push" and e["counts"]["sent"] >= 1 for e in materialized)

    [refused] = [e for e in ours if e["level"] == "WARNING" and e["stage"] == "usage_push"]
    assert refused["counts"] == {"refused": 1, "cancels_refused": 0}
    assert f"{DAY}: 1 push(es) refused" in refused["message"]

    [money] = [e for e in ours if e["level"] == "WARNING" and e["stage"] == "reconciliation"]
    assert money["counts"] == {"unpushed": 1}
    assert "1 unexplained money-moving discrepancies" in money["message"]
    # Libraries speak from WARNING on (the Stripe SDK logs every request at INFO).
    assert not [e for e in events if e["logger"] == "stripe" and e["level"] == "INFO"]

    output = done.stdout + done.stderr
    for secret in (STRIPE_KEY, POLAR_TOKEN, SMTP_SECRET):
        assert secret not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("value", ["", "text"])
def test_text_format_keeps_the_console_as_it_was(value, monkeypatch) -> None:
    from pipelines.logs import LogFormat, configure_logging

    monkeypatch.setenv("TALLY_LOG_FORMAT", value)
    handlers = list(logging.getLogger().handlers)
    assert configure_logging() == LogFormat.TEXT
    assert logging.getLogger().handlers == handlers
