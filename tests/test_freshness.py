"""Freshness (DESIGN §9): the pure rule, the alert sensor against a real Dagster
instance, real PostgreSQL, a real SMTP server and a real webhook receiver, and the
dead man's switch ping."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from builders import mark_reconciled
from conftest import free_port
from dagster import (
    DagsterEventType,
    DagsterInstance,
    asset,
    build_run_status_sensor_context,
    build_sensor_context,
    materialize,
)

from pipelines.freshness import (
    AlertCursor,
    Freshness,
    after_delivery,
    due_day,
    evaluate_freshness,
    next_alert_step,
)
from pipelines.sensors import deadmans_switch, freshness_sensor
from resources.db import PostgresResource
from resources.notify import SmtpResource, WebhookResource

UTC = dt.UTC
D = dt.date(2026, 11, 20)


def at(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour, minute), tzinfo=UTC)


# --------------------------------------------------------------------------- pure rule


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (at(D, 5, 59), D - dt.timedelta(days=2)),  # before 06:00: the day before yesterday
        (at(D, 6, 0), D - dt.timedelta(days=1)),  # from 06:00: yesterday
        (at(D, 23, 59), D - dt.timedelta(days=1)),
    ],
)
def test_due_day_turns_at_0600_utc(now, expected):
    assert due_day(now) == expected
    # Any timezone, same instant, same answer.
    assert due_day(now.astimezone(dt.timezone(dt.timedelta(hours=-8)))) == expected


def test_fresh_when_recent_success_and_yesterday_reconciled():
    now = at(D, 7)
    result = evaluate_freshness(at(D, 2, 30), {D - dt.timedelta(days=1)}, now)
    assert result == Freshness(
        False, [], at(D, 2, 30), D - dt.timedelta(days=1), D - dt.timedelta(days=1), now
    )


def test_never_run_is_stale_with_both_reasons():
    result = evaluate_freshness(None, set(), at(D, 7))
    assert result.stale and result.never_run and result.newest_day is None
    assert result.reasons[0] == "the reconciliation has never succeeded"
    assert "2026-11-19 is not reconciled (due by 2026-11-20 06:00 UTC)" in result.reasons[1]


def test_success_older_than_24h_is_stale_even_with_the_day_reconciled():
    days = {D - dt.timedelta(days=1)}
    assert not evaluate_freshness(at(D, 7) - dt.timedelta(hours=24), days, at(D, 7)).stale
    result = evaluate_freshness(at(D, 7) - dt.timedelta(hours=24, seconds=1), days, at(D, 7))
    assert result.stale and len(result.reasons) == 1
    assert result.reasons[0].startswith("last successful reconciliation 24.0 h ago")


def test_yesterday_must_be_reconciled_by_0600():
    recent = at(D, 3)
    older = {D - dt.timedelta(days=2)}
    # 05:59: only the day before yesterday is due — fresh.
    assert not evaluate_freshness(recent, older, at(D, 5, 59)).stale
    # 06:00: yesterday is due and missing — stale, although the last success is recent.
    result = evaluate_freshness(recent, older, at(D, 6))
    assert result.stale and result.reasons == [
        "usage day 2026-11-19 is not reconciled (due by 2026-11-20 06:00 UTC)"
    ]
    assert result.newest_day == D - dt.timedelta(days=2)


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate_freshness(None, set(), dt.datetime(2026, 11, 20, 7))


def test_alert_state_machine_owes_one_alert_per_change():
    stale = evaluate_freshness(None, set(), at(D, 7))
    fresh = evaluate_freshness(at(D, 3), {D - dt.timedelta(days=1)}, at(D, 7))
    step = next_alert_step(AlertCursor(), fresh, ["email"])
    assert step.state is None  # fresh from the start: nothing to recover from
    step = next_alert_step(AlertCursor(), stale, ["email", "webhook"])
    assert step.state == "stale" and step.channels == ["email", "webhook"]
    # The webhook failed: stay owed, and only the webhook is retried.
    cursor = after_delivery(step, ["email"], failed=True)
    retry = next_alert_step(AlertCursor.load(cursor.dump()), stale, ["email", "webhook"])
    assert retry.channels == ["webhook"]
    done = after_delivery(retry, ["webhook"], failed=False)
    assert done.notified == "stale" and done.pending is None
    assert next_alert_step(done, stale, ["email", "webhook"]).state is None
    assert next_alert_step(done, fresh, ["email", "webhook"]).state == "fresh"


# --------------------------------------------------------------------------- servers


class Receiver:
    """A real HTTP server on loopback recording requests; answers `statuses` in turn
    (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                receiver.requests.append((self.command, self.path, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, format, *args):  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self) -> list[dict]:
        return [json.loads(body) for method, _, body in self.requests if method == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


# --------------------------------------------------------------------------- the sensor


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


class Ticks:
    """Evaluates the real sensor tick after tick, carrying the cursor like the daemon."""

    def __init__(self, instance: DagsterInstance, clock: Clock) -> None:
        self.instance = instance
        self.clock = clock
        self.sensor = freshness_sensor(clock=clock)
        self.cursor: str | None = None
        self.summaries: list[str] = []

    def tick(self, advance: dt.timedelta = dt.timedelta(minutes=5)) -> str:
        self.clock.now += advance
        context = build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={
                "smtp": SmtpResource(),
                "webhook": WebhookResource(),
                "postgres": PostgresResource(),
            },
        )
        data = self.sensor.evaluate_tick(context)
        assert not data.run_requests
        self.cursor = data.cursor
        self.summaries.append(data.skip_message or "")
        return data.skip_message or ""


def alert_rows(engine: sa.Engine) -> list[dict]:
    with engine.connect() as connection:
        return [
            dict(row._mapping)
            for row in connection.execute(
                sa.text("SELECT * FROM billing.freshness_alerts ORDER BY alert_id")
            )
        ]


@pytest.fixture()
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


@pytest.fixture()
def alert_env(monkeypatch, smtp_server, receiver):
    monkeypatch.setenv("ALERT_EMAIL_TO", "oncall@example.test")
    monkeypatch.setenv("ALERT_WEBHOOK_URL", f"{receiver.url}/hooks/tally")
    return smtp_server, receiver


def test_one_alert_when_stale_and_one_on_recovery(engine, instance, alert_env):
    smtp, hook = alert_env
    ticks = Ticks(instance, Clock(dt.datetime.now(UTC)))

    # Never reconciled: stale → one e-mail and one webhook, then silence.
    assert "stale alert sent via email, webhook" in ticks.tick()
    for _ in range(4):
        assert ticks.tick() == "stale; nothing to send"
    assert len(smtp.messages) == 1 and len(hook.posts()) == 1
    message = smtp.messages[0]
    assert message["To"] == "oncall@example.test"
    assert message["From"] == "tally@example.test"
    assert message["Subject"] == "[tally] STALE: billing reconciliation is missing"
    assert "the reconciliation has never succeeded" in message.get_content()
    payload = hook.posts()[0]
    assert payload["status"] == "firing" and payload["state"] == "stale"
    assert payload["alert"] == "BillingReconciliationStale" and payload["never_run"] is True
    assert hook.requests[0][1] == "/hooks/tally"

    # The reconciliation catches up: one recovery alert, then silence.
    yesterday = (ticks.clock.now + dt.timedelta(minutes=5)).date() - dt.timedelta(days=1)
    succeeded = mark_reconciled(engine, yesterday - dt.timedelta(days=1), yesterday)
    assert "fresh alert sent via email, webhook" in ticks.tick()
    for _ in range(4):
        assert ticks.tick() == "fresh; nothing to send"
    assert len(smtp.messages) == 2 and len(hook.posts()) == 2
    assert smtp.messages[1]["Subject"].startswith("[tally] RECOVERED")
    recovered = hook.posts()[1]
    assert recovered["status"] == "resolved" and recovered["newest_day"] == yesterday.isoformat()
    assert recovered["last_success_at"].startswith(succeeded.strftime("%Y-%m-%dT%H:%M:%S"))

    rows = alert_rows(engine)
    assert [(row["state"], row["status"], row["channels"]) for row in rows] == [
        ("stale", "sent", ["email", "webhook"]),
        ("fresh", "sent", ["email", "webhook"]),
    ]
    assert rows[0]["reasons"][0] == "the reconciliation has never succeeded"
    assert rows[1]["reasons"] == [] and rows[1]["newest_day"] == yesterday
    assert all(row["sent_at"] is not None and row["attempts"] == 1 for row in rows)

    # A day later nothing new was reconciled: stale again, one more alert.
    assert "stale alert sent" in ticks.tick(dt.timedelta(hours=30))
    assert ticks.tick() == "stale; nothing to send"
    assert len(smtp.messages) == 3 and "last successful reconciliation" in (
        smtp.messages[2].get_content()
    )


def test_failed_delivery_is_retried_next_tick_without_duplicates(engine, instance, alert_env):
    smtp, hook = alert_env
    hook.statuses = [500, 503]
    ticks = Ticks(instance, Clock(dt.datetime.now(UTC)))

    summary = ticks.tick()
    assert "NOT delivered" in summary and "alert webhook at 127.0.0.1 failed" in summary
    row = alert_rows(engine)[0]
    assert (row["status"], row["channels"], row["sent_at"]) == ("failed", ["email"], None)
    assert row["errors"] == ["alert webhook at 127.0.0.1 failed: HTTPStatusError"]

    assert "NOT delivered" in ticks.tick()  # 503: still owed
    assert ticks.tick() == "stale alert sent via email, webhook"
    assert ticks.tick() == "stale; nothing to send"
    assert len(smtp.messages) == 1  # e-mail went out once; only the webhook was retried
    assert len(hook.requests) == 3 and len(hook.posts()) == 3
    [row] = alert_rows(engine)
    assert (row["status"], row["attempts"], row["errors"]) == ("sent", 3, [])
    assert row["sent_at"] is not None


def test_recovery_before_delivery_supersedes_the_owed_alert(engine, instance, alert_env):
    smtp, hook = alert_env
    hook.statuses = [500]
    ticks = Ticks(instance, Clock(dt.datetime.now(UTC)))
    assert "NOT delivered" in ticks.tick()
    # The due day is reconciled before the retry: fresh again, the stale alert is moot.
    mark_reconciled(engine, due_day(ticks.clock.now + dt.timedelta(minutes=5)))
    assert ticks.tick() == "fresh; nothing to send"
    assert ticks.tick() == "fresh; nothing to send"
    [row] = alert_rows(engine)
    assert row["status"] == "superseded"
    assert len(smtp.messages) == 1 and len(hook.posts()) == 1  # no "recovered" for it


def test_lost_cursor_is_rebuilt_from_the_alert_table(engine, instance, alert_env):
    smtp, _ = alert_env
    ticks = Ticks(instance, Clock(dt.datetime.now(UTC)))
    ticks.tick()
    ticks.cursor = None  # sensor reset / redeployed
    assert ticks.tick() == "stale; nothing to send"
    assert len(smtp.messages) == 1 and len(alert_rows(engine)) == 1


def test_without_smtp_or_webhook_the_alert_is_recorded_and_logged(
    engine, instance, monkeypatch, capfd
):
    for variable in ("SMTP_HOST", "ALERT_WEBHOOK_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("ALERT_EMAIL_TO", "oncall@example.test")
    ticks = Ticks(instance, Clock(dt.datetime.now(UTC)))
    assert "stale alert recorded and logged" in ticks.tick()
    assert ticks.tick() == "stale; nothing to send"
    [row] = alert_rows(engine)
    assert (row["status"], row["channels"]) == ("logged", [])
    logged = capfd.readouterr().err
    assert "billing reconciliation stale: the reconciliation has never succeeded" in logged
    assert "ALERT_EMAIL_TO is set but SMTP_HOST is not" in logged


def test_smtp_password_never_in_errors_or_logs(engine, instance, monkeypatch, capfd, caplog):
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult
    from conftest import SmtpCapture

    password = "hunter2-SMTP-secret"
    capture = SmtpCapture()
    port = free_port()
    controller = Controller(
        capture,
        hostname="127.0.0.1",
        port=port,
        authenticator=lambda *args: AuthResult(success=False, handled=False),
        auth_require_tls=False,
    )
    controller.start()
    try:
        monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
        monkeypatch.setenv("SMTP_PORT", str(port))
        monkeypatch.setenv("SMTP_USERNAME", "tally")
        monkeypatch.setenv("SMTP_PASSWORD", password)
        monkeypatch.setenv("ALERT_EMAIL_TO", "oncall@example.test")
        monkeypatch.delenv("ALERT_WEBHOOK_URL", raising=False)
        ticks = Ticks(instance, Clock(dt.datetime.now(UTC)))
        summary = ticks.tick()
    finally:
        controller.stop()
    assert f"SMTP 127.0.0.1:{port} did not take the message" in summary
    [row] = alert_rows(engine)
    assert row["status"] == "failed" and not capture.messages
    for text in (
        summary,
        ticks.cursor,
        " ".join(row["errors"]),
        capfd.readouterr().err,
        caplog.text,
    ):
        assert password not in text


def test_the_sensor_in_definitions_is_wired(engine, instance, monkeypatch):
    """The registered sensor (real clock, resources from Definitions) evaluates."""
    from dagster import DefaultSensorStatus

    from pipelines.definitions import defs

    for variable in ("SMTP_HOST", "ALERT_WEBHOOK_URL", "ALERT_EMAIL_TO"):
        monkeypatch.delenv(variable, raising=False)
    repository = defs.get_repository_def()
    sensor = repository.get_sensor_def("reconciliation_freshness")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    assert 60 <= sensor.minimum_interval_seconds <= 900
    now = dt.datetime.now(UTC)
    mark_reconciled(engine, due_day(now), now.date() - dt.timedelta(days=1))
    context = build_sensor_context(
        instance=instance, resources=repository.get_top_level_resources()
    )
    data = sensor.evaluate_tick(context)
    assert data.skip_message == "fresh; nothing to send"
    assert json.loads(data.cursor)["notified"] == "fresh"


# --------------------------------------------------------------------------- dead man's switch


@asset(name="reconciliation")
def reconciliation_stand_in() -> None:
    """A stand-in materializing asset key `reconciliation` in a real run."""


@asset(name="unrelated")
def unrelated() -> None:
    pass


def _success_context(instance: DagsterInstance, run_id: str):
    run = instance.get_run_by_id(run_id)
    [record] = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_SUCCESS).records
    return build_run_status_sensor_context(
        sensor_name="deadmans_switch",
        dagster_event=record.event_log_entry.dagster_event,
        dagster_instance=instance,
        dagster_run=run,
    )


def test_deadmans_switch_pinged_after_a_successful_reconciliation(instance, receiver, monkeypatch):
    monkeypatch.setenv("DEADMANS_SWITCH_URL", f"{receiver.url}/ping/abc-123")
    reconciled = materialize([reconciliation_stand_in], instance=instance)
    other = materialize([unrelated], instance=instance)

    deadmans_switch(_success_context(instance, other.run_id))
    assert receiver.requests == []  # nothing reconciled in that run
    deadmans_switch(_success_context(instance, reconciled.run_id))
    assert [(method, path) for method, path, _ in receiver.requests] == [("GET", "/ping/abc-123")]

    receiver.statuses = [500]  # a failing switch is logged, never raises
    deadmans_switch(_success_context(instance, reconciled.run_id))
    monkeypatch.delenv("DEADMANS_SWITCH_URL")
    deadmans_switch(_success_context(instance, reconciled.run_id))
    assert len(receiver.requests) == 2


def test_real_reconciliation_makes_it_fresh_and_pings_the_switch(
    engine, providers_env, instance, receiver, monkeypatch
):
    """The real pipeline (metering → push to the sandbox → provider_usage →
    reconciliation) reconciles the due days: the sensor recovers, the switch is pinged."""
    from builders import add_heartbeats, add_instance, add_org, every_minute

    from assets.metering import billed_usage
    from assets.provider_usage import provider_usage
    from assets.push import usage_push
    from assets.reconcile import reconciliation
    from resources.providers import ProvidersResource
    from resources.settings import RunMode

    for variable in ("SMTP_HOST", "ALERT_WEBHOOK_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("DEADMANS_SWITCH_URL", f"{receiver.url}/ping/daily")
    now = dt.datetime.now(UTC)
    days = sorted({due_day(now), now.date() - dt.timedelta(days=1)})
    add_org(engine, "org-s", provider="stripe", customer="cus_S0001")
    add_instance(engine, "i-s1", "org-s", "small")
    for day in days:
        add_heartbeats(engine, every_minute("i-s1", at(day, 1), 60))

    ticks = Ticks(instance, Clock(now - dt.timedelta(minutes=10)))
    assert "stale alert recorded and logged" in ticks.tick()
    for day in days:
        result = materialize(
            [billed_usage, usage_push, provider_usage, reconciliation],
            partition_key=day.isoformat(),
            instance=instance,
            resources={
                "postgres": PostgresResource(),
                "run_mode": RunMode(),
                "providers": ProvidersResource(),
            },
        )
        assert result.success
        deadmans_switch(_success_context(instance, result.run_id))
    assert "fresh alert recorded and logged" in ticks.tick()
    assert [row["state"] for row in alert_rows(engine)] == ["stale", "fresh"]
    assert [path for _, path, _ in receiver.requests] == ["/ping/daily"] * len(days)
