"""budget_alerts: 50 % / 90 % e-mails through the ledger, on real PostgreSQL, real
Dagster and a real SMTP server (aiosmtpd on loopback, fixture `smtp_server`)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import sqlalchemy as sa
from builders import add_billed, add_heartbeats, add_instance, add_org, at, every_minute
from conftest import free_port
from dagster import materialize

from assets.budget_alerts import alert_crossings, budget_alerts, settle_alerts
from assets.metering import billed_usage
from assets.quota import quota_usage
from pipelines.runner import failure_messages
from resources.db import PostgresResource
from resources.notify import SmtpResource
from resources.settings import RunMode

H = 3600
TODAY = dt.datetime.now(dt.UTC).date()
YESTERDAY = TODAY - dt.timedelta(days=1)


def alert_week() -> list[dt.date]:
    """Seven past days of one month whose alerts are still worth sending: the week up
    to yesterday, or the last week of the month that ended less than 7 days ago."""
    end = YESTERDAY if YESTERDAY.day >= 7 else YESTERDAY.replace(day=1) - dt.timedelta(days=1)
    return [end - dt.timedelta(days=offset) for offset in range(6, -1, -1)]


def run(day: dt.date, *, metering: bool = False, report_only: bool = False, ok: bool = True):
    assets = (
        [billed_usage, quota_usage, budget_alerts] if metering else [quota_usage, budget_alerts]
    )
    return materialize(
        assets,
        partition_key=day.isoformat(),
        resources={
            "postgres": PostgresResource(),
            "smtp": SmtpResource(),
            "run_mode": RunMode(report_only=report_only),
        },
        raise_on_error=ok,
    )


def ledger(engine) -> list[dict]:
    with engine.connect() as connection:
        return [
            dict(row._mapping)
            for row in connection.execute(
                sa.text(
                    "SELECT org_id, threshold, status, usage_date, billable_seconds, attempts, "
                    "recipient, last_error FROM billing.budget_alert_ledger "
                    "ORDER BY org_id, threshold"
                )
            )
        ]


def parts(message) -> tuple[str, str]:
    return (
        message.get_body(("plain",)).get_content(),
        message.get_body(("html",)).get_content(),
    )


def test_one_alert_per_threshold_over_a_week_never_again(engine, smtp_server):
    week = alert_week()
    add_org(engine, "org-free", plan="free-tier")  # 10 included hours
    add_org(engine, "org-base", plan="base-plus-usage")  # 100 included hours
    add_org(engine, "org-usage", plan="usage-only")  # none: never alerted
    add_instance(engine, "i-free", "org-free", "small")
    add_instance(engine, "i-base", "org-base", "medium")
    add_instance(engine, "i-usage", "org-usage", "gpu")
    # org-free, hours per day 2, 2, 2, 1, 2, 1, 1 -> month to date 2, 4, 6 (60 %: the
    # 50 % alert), 7, 9 (90 %: the 90 % alert), 10, 11. org-base 1 h a day: 7 % at the
    # end of the week, under quota. org-usage 3 h a day, no included hours.
    for day, free_hours in zip(week, [2, 2, 2, 1, 2, 1, 1], strict=True):
        add_heartbeats(engine, every_minute("i-free", at(day, 1), 60 * free_hours))
        add_heartbeats(engine, every_minute("i-base", at(day, 4), 60))
        add_heartbeats(engine, every_minute("i-usage", at(day, 6), 180))

    received = []
    for day in week:
        run(day, metering=True)
        received.append(len(smtp_server.messages))
    assert received == [0, 0, 1, 1, 2, 2, 2]
    assert [m["To"] for m in smtp_server.messages] == ["billing@org-free.test"] * 2
    assert "50%" in smtp_server.messages[0]["Subject"]
    assert "90%" in smtp_server.messages[1]["Subject"]
    first_ledger = ledger(engine)
    assert [(r["org_id"], r["threshold"], r["status"], r["usage_date"]) for r in first_ledger] == [
        ("org-free", 50, "sent", week[2]),
        ("org-free", 90, "sent", week[4]),
    ]

    for day in week:  # the whole week again: nothing new
        run(day, metering=True)
    # An earlier day recomputed with more usage (day 2 now 3 h: 50 % already on day 2).
    add_heartbeats(engine, every_minute("i-free", at(week[1], 8), 60))
    run(week[1], metering=True)
    assert len(smtp_server.messages) == 2
    assert ledger(engine) == first_ledger


def test_email_shows_used_and_included_hours_and_threshold(engine, smtp_server):
    # base-plus-usage (100 h): gpu 10 h + small 42.5 h = 52.5 h -> 52.5 %: the 50 % alert.
    add_org(engine, "org-b", plan="base-plus-usage", email="finance@acme.test")
    add_billed(
        engine, [("org-b", YESTERDAY, "gpu", 10 * H), ("org-b", YESTERDAY, "small", 42 * H + 1800)]
    )
    run(YESTERDAY)
    (message,) = smtp_server.messages
    assert message["To"] == "finance@acme.test" and message["From"] == "tally@example.test"
    assert "50% of included hours" in message["Subject"] and "org-b Inc." in message["Subject"]
    for body in parts(message):
        assert "52.50 of 100.00 included hours (52.5%)" in body
        assert "47.50 included hours" in body  # left
        assert "50%" in body and YESTERDAY.isoformat() in body
    assert "billed at the hourly rate" in parts(message)[0]


def test_smtp_unreachable_then_reachable_sends_exactly_once(engine, smtp_server, monkeypatch):
    add_org(engine, "org-f", plan="free-tier")
    add_billed(engine, [("org-f", YESTERDAY, "small", 6 * H)])  # 60 %
    closed = free_port()
    monkeypatch.setenv("SMTP_PORT", str(closed))
    down = run(YESTERDAY, ok=False)
    assert not down.success
    ((step, message),) = failure_messages(down)
    assert step == "budget_alerts" and f"127.0.0.1:{closed}" in message and "owed" in message
    (row,) = ledger(engine)
    assert row["status"] == "failed" and row["attempts"] >= 1 and str(closed) in row["last_error"]
    assert smtp_server.messages == []

    monkeypatch.setenv("SMTP_PORT", str(smtp_server.port))
    run(TODAY)  # the next run (any day) sends what is owed
    run(YESTERDAY)
    assert len(smtp_server.messages) == 1
    (row,) = ledger(engine)
    assert row["status"] == "sent" and row["threshold"] == 50


def test_crash_while_sending_is_not_resent_until_requeued(engine, smtp_server):
    # A run that died between the SMTP hand-off and its bookkeeping leaves 'pending'.
    add_org(engine, "org-f", plan="free-tier")
    add_billed(engine, [("org-f", YESTERDAY, "small", 6 * H)])
    run(YESTERDAY)
    assert len(smtp_server.messages) == 1
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO billing.budget_alert_ledger (org_id, month, threshold, status, "
                "usage_date, billable_seconds, included_seconds, recipient, attempts) VALUES "
                "('org-f', :month, 90, 'pending', :day, 33000, 36000, 'billing@org-f.test', 1)"
            ),
            {"month": YESTERDAY.replace(day=1), "day": YESTERDAY},
        )
    result = run(YESTERDAY)
    assert len(smtp_server.messages) == 1  # at most once: unknown outcome is not re-sent
    assert [r["status"] for r in ledger(engine)] == ["sent", "interrupted"]
    check = result.get_asset_check_evaluations()[-1]
    assert check.check_name == "no_interrupted_alerts" and not check.passed

    with engine.begin() as connection:  # support checked the mail log: it never left
        connection.execute(
            sa.text("UPDATE billing.budget_alert_ledger SET status = 'failed' WHERE threshold = 90")
        )
    run(YESTERDAY)
    run(YESTERDAY)
    assert len(smtp_server.messages) == 2 and "90%" in smtp_server.messages[1]["Subject"]


def test_report_only_sends_and_records_nothing(engine, smtp_server):
    add_org(engine, "org-f", plan="free-tier")
    add_billed(engine, [("org-f", YESTERDAY, "small", 9 * H)])  # 90 %: both thresholds
    result = run(YESTERDAY, report_only=True)
    metadata = result.asset_materializations_for_node("budget_alerts")[0].metadata
    assert metadata["alerts_due"].value == 2 and metadata["report_only"].value is True
    assert smtp_server.messages == [] and ledger(engine) == []

    run(YESTERDAY)  # crossed together: one e-mail, the 90 % one
    assert [r["status"] for r in ledger(engine)] == ["superseded", "sent"]
    assert len(smtp_server.messages) == 1 and "90%" in smtp_server.messages[0]["Subject"]


def test_without_smtp_alerts_are_recorded_not_mailed(engine, smtp_server, monkeypatch):
    add_org(engine, "org-f", plan="free-tier")
    add_billed(engine, [("org-f", YESTERDAY, "small", 5 * H)])  # exactly 50 %
    monkeypatch.delenv("SMTP_HOST")
    result = run(YESTERDAY)
    assert [(r["threshold"], r["status"]) for r in ledger(engine)] == [(50, "not_mailed")]
    assert (
        result.asset_materializations_for_node("budget_alerts")[0].metadata["not_mailed"].value == 1
    )
    monkeypatch.setenv("SMTP_HOST", smtp_server.host)
    run(YESTERDAY)  # owed while SMTP was unset: sent now, once (tests/test_alerts_owed.py)
    assert len(smtp_server.messages) == 1
    assert [(r["threshold"], r["status"]) for r in ledger(engine)] == [(50, "sent")]


# --------------------------------------------------------------------------- pure


def test_crossings_need_included_hours_and_the_full_share():
    month = dt.date(2026, 11, 1)
    quota = pd.DataFrame(
        [
            ("at-50", 5 * H, 10 * H),  # exactly 50 %
            ("under", 5 * H - 1, 10 * H),  # one second short
            ("at-90", 90 * H, 100 * H),
            ("usage-only", 500 * H, 0),
        ],
        columns=["org_id", "billable_seconds", "included_seconds"],
    ).assign(month=month, usage_date=dt.date(2026, 11, 5))
    crossings = alert_crossings(quota)
    assert list(zip(crossings["org_id"], crossings["threshold"], strict=True)) == [
        ("at-50", 50),
        ("at-90", 50),
        ("at-90", 90),
    ]


def test_settle_precedence():
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    nov, jan = dt.date(2026, 11, 1), dt.date(2026, 1, 1)
    oct_ = dt.date(2026, 10, 1)
    rows = [
        ("crashed", nov, 50, "pending", "a@x.test"),
        ("old", jan, 50, "queued", "a@x.test"),  # backfill of January: expired
        ("october", oct_, 90, "failed", "a@x.test"),  # past its grace (Nov 8)
        ("both", nov, 50, "queued", "a@x.test"),
        ("both", nov, 90, "queued", "a@x.test"),
        ("done", nov, 50, "sent", "a@x.test"),
        ("done", nov, 90, "queued", "a@x.test"),
        ("nobody", nov, 50, "queued", None),
    ]
    ledger_frame = pd.DataFrame(
        rows, columns=["org_id", "month", "threshold", "status", "recipient"]
    )
    actions = settle_alerts(ledger_frame, now, mail_enabled=True)
    assert list(zip(actions["org_id"], actions["threshold"], actions["action"], strict=True)) == [
        ("crashed", 50, "interrupted"),
        ("old", 50, "expired"),
        ("october", 90, "expired"),
        ("both", 50, "superseded"),
        ("both", 90, "send"),
        ("done", 90, "send"),
        ("nobody", 50, "no_address"),
    ]
    early_december = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)  # November still in grace
    unmailed = settle_alerts(ledger_frame, early_december, mail_enabled=False)
    assert unmailed.set_index(["org_id", "threshold"])["action"].to_dict()[("both", 90)] == (
        "not_mailed"
    )
