"""Run-failure alerts (issue 11 item 2): one alert per failed daily_billing or
issue_credits run over a real SMTP server and a real loopback webhook receiver (tally
JSON and PagerDuty Events v2), one recovery, nothing twice — across repeated ticks
and a lost sensor cursor. Real Dagster runs fail against the sandbox in outage; the
registered sensor is evaluated on that instance. The decision table is tested
directly."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute, query_rows
from conftest import free_port
from dagster import DagsterInstance, build_sensor_context

from pipelines.run_failure import (
    AlertAction,
    AlertKind,
    AlertStatus,
    Announced,
    FinishedRun,
    RunOutcome,
    one_line,
    plan_alerts,
)
from resources.notify import pagerduty_event

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
T0 = dt.datetime(2025, 6, 2, 2, 0, tzinfo=dt.UTC)
ONCALL = "oncall@example.test"
ROUTING_KEY = "R0UTINGKEY0123456789abcdef012345"

# --------------------------------------------------------------------------- decision table


def run(run_id: str, outcome: RunOutcome, minute: int, *, job="daily_billing", day="2025-06-01"):
    return FinishedRun(run_id, job, day, outcome, T0 + dt.timedelta(minutes=minute))


F, S = RunOutcome.FAILURE, RunOutcome.SUCCESS
KEY = ("daily_billing", "2025-06-01")


def told(kind: AlertKind, run_id: str, minute: int) -> dict:
    return {KEY: Announced(kind, run_id, T0 + dt.timedelta(minutes=minute))}


@pytest.mark.parametrize(
    ("runs", "announced", "expected"),
    [
        # a failure nobody was told about → one failure alert
        ([run("f1", F, 1)], {}, [("failure", "f1", None)]),
        # already announced (repeated tick, lost cursor) → nothing
        ([run("f1", F, 1)], told(AlertKind.FAILURE, "f1", 1), []),
        # a later success after an announced failure → one recovery naming it
        (
            [run("f1", F, 1), run("s1", S, 5)],
            told(AlertKind.FAILURE, "f1", 1),
            [("recovery", "s1", "f1")],
        ),
        # the recovery was announced → nothing more
        ([run("f1", F, 1), run("s1", S, 5)], told(AlertKind.RECOVERY, "s1", 5), []),
        # failure and recovery both unseen (sensor was down): both, in order
        (
            [run("s1", S, 5), run("f1", F, 1)],
            {},
            [("failure", "f1", None), ("recovery", "s1", "f1")],
        ),
        # a success with no failure before it → nothing
        ([run("s0", S, 1)], {}, []),
        # a success that ended before the announced failure is no recovery
        ([run("s0", S, 0), run("f1", F, 1)], told(AlertKind.FAILURE, "f1", 1), []),
        # an old failure after a newer announcement is old news (never re-opens)
        ([run("f0", F, 0)], told(AlertKind.RECOVERY, "s1", 5), []),
        # each failed run is announced, a second failure too; one recovery ends both
        (
            [run("f1", F, 1), run("f2", F, 2), run("s1", S, 3), run("s2", S, 4)],
            {},
            [("failure", "f1", None), ("failure", "f2", None), ("recovery", "s1", "f2")],
        ),
        # days and jobs are separate incidents
        (
            [
                run("f1", F, 1),
                run("s9", S, 2, day="2025-06-02"),
                run("c1", F, 3, job="issue_credits", day=""),
            ],
            {},
            [("failure", "f1", None), ("failure", "c1", None)],
        ),
        # jobs nobody pages for → nothing
        ([run("x1", F, 1, job="refresh_finance_review")], {}, []),
    ],
)
def test_plan_alerts_decision_table(runs, announced, expected) -> None:
    actions = plan_alerts(runs, announced)
    assert [(a.kind.value, a.run.run_id, a.resolves) for a in actions] == expected


def test_dedup_key_is_one_incident_per_job_and_day() -> None:
    failure = AlertAction(AlertKind.FAILURE, run("f1", F, 1))
    recovery = AlertAction(AlertKind.RECOVERY, run("s1", S, 2), resolves="f1")
    other_day = AlertAction(AlertKind.FAILURE, run("f2", F, 1, day="2025-06-02"))
    assert failure.dedup_key == recovery.dedup_key == "tally/daily_billing/2025-06-01"
    assert other_day.dedup_key != failure.dedup_key


def test_one_line_keeps_the_first_line_only() -> None:
    assert one_line("\n  stripe: 503   Service Unavailable \nTraceback (most recent") == (
        "stripe: 503 Service Unavailable"
    )
    assert len(one_line("x" * 1000)) == 300
    assert one_line(None) == "no error message"


def test_pagerduty_translation() -> None:
    firing = {
        "alert": "A",
        "status": "firing",
        "summary": "s",
        "dedup_key": "k",
        "severity": "error",
        "source": "tally/daily_billing",
        "day": "2025-06-01",
    }
    event = pagerduty_event(firing, "rk")
    assert event == {
        "routing_key": "rk",
        "event_action": "trigger",
        "dedup_key": "k",
        "payload": {
            "summary": "s",
            "source": "tally/daily_billing",
            "severity": "error",
            "custom_details": {"alert": "A", "status": "firing", "day": "2025-06-01"},
        },
    }
    resolved = pagerduty_event({**firing, "status": "resolved"}, "rk")
    assert resolved == {"routing_key": "rk", "event_action": "resolve", "dedup_key": "k"}
    # The freshness alert's payload (no dedup_key) resolves under its alert name.
    stale = pagerduty_event({"alert": "BillingReconciliationStale", "status": "firing"}, "rk")
    assert stale["dedup_key"] == "BillingReconciliationStale"
    assert stale["payload"]["severity"] == "critical"


# --------------------------------------------------------------------------- servers


class Receiver:
    """A real HTTP server on loopback recording POST bodies; answers `statuses` in
    turn (then 202, as PagerDuty does)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server hook
                length = int(self.headers.get("Content-Length") or 0)
                receiver.bodies.append(json.loads(self.rfile.read(length) or b"null"))
                receiver.paths.append(self.path)
                status = receiver.statuses.pop(0) if receiver.statuses else 202
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format, *args):  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture()
def alert_env(monkeypatch, smtp_server, receiver):
    monkeypatch.setenv("ALERT_EMAIL_TO", ONCALL)
    monkeypatch.setenv("ALERT_WEBHOOK_URL", f"{receiver.url}/hooks/tally")
    monkeypatch.delenv("ALERT_WEBHOOK_FORMAT", raising=False)
    monkeypatch.delenv("PAGERDUTY_ROUTING_KEY", raising=False)
    return smtp_server, receiver


# --------------------------------------------------------------------------- helpers


class Ticks:
    """Evaluates the registered sensor (resources from Definitions) on a real
    instance, carrying the cursor like the daemon."""

    def __init__(self, instance: DagsterInstance) -> None:
        from pipelines.definitions import defs

        self.repository = defs.get_repository_def()
        self.sensor = self.repository.get_sensor_def("run_failure_alerts")
        self.instance = instance
        self.cursor: str | None = None

    def tick(self, *, cursor: str | None | bool = True) -> str:
        """One evaluation; `cursor=None` evaluates as a restarted sensor with no cursor."""
        context = build_sensor_context(
            instance=self.instance,
            cursor=self.cursor if cursor is True else None,
            resources=self.repository.get_top_level_resources(),
        )
        data = self.sensor.evaluate_tick(context)
        assert not data.run_requests
        self.cursor = data.cursor or self.cursor
        return data.skip_message or ""


def faults(sandbox, **settings) -> None:
    sandbox.post("/_sandbox/faults", json=settings).raise_for_status()


def run_day(instance: DagsterInstance):
    from pipelines.definitions import defs

    return defs.resolve_job_def("daily_billing").execute_in_process(
        partition_key=DAY.isoformat(), instance=instance, raise_on_error=False
    )


def alerts_mailed(smtp) -> list:
    return [message for message in smtp.messages if message["To"] == ONCALL]


def ledger(engine: sa.Engine) -> list[tuple]:
    return query_rows(
        engine,
        "SELECT kind, job_name, partition_key, run_id, step_key, status, channels "
        "FROM billing.run_failure_alerts ORDER BY alert_id",
    )


def one_usage_day(engine: sa.Engine) -> None:
    add_org(engine, "org-s", provider="stripe", customer="cus_RUNFAIL1")
    add_instance(engine, "i-s", "org-s", "small")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 1), 60))


# --------------------------------------------------------------------------- the sensor


@pytest.mark.parametrize("webhook_format", ["json", "pagerduty"])
def test_failed_night_alerts_once_and_recovers_once(
    engine, providers_env, dagster_home, alert_env, monkeypatch, webhook_format
):
    smtp, hook = alert_env
    if webhook_format == "pagerduty":
        monkeypatch.setenv("ALERT_WEBHOOK_FORMAT", "pagerduty")
        monkeypatch.setenv("PAGERDUTY_ROUTING_KEY", ROUTING_KEY)
    one_usage_day(engine)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        ticks = Ticks(instance)
        assert ticks.tick().startswith("nothing to announce")

        faults(providers_env, error_rate=1.0)  # Stripe and Polar answer 5xx
        try:
            outage = run_day(instance)
        finally:
            faults(providers_env, error_rate=0)
        assert not outage.success
        summary = ticks.tick()
        assert "failure daily_billing" in summary and "sent via email, webhook" in summary

        [mail] = alerts_mailed(smtp)
        body = mail.get_content()
        assert mail["Subject"] == f"[tally] FAILED: daily_billing for {DAY} at usage_push"
        assert f"Day:    {DAY}" in body and "Step:   usage_push" in body
        assert outage.run_id in body
        error_line = next(line for line in body.splitlines() if line.startswith("Error:  "))
        assert "stripe" in error_line.lower() and "Traceback" not in body
        [post] = hook.bodies
        if webhook_format == "pagerduty":
            assert post["routing_key"] == ROUTING_KEY and post["event_action"] == "trigger"
            assert post["dedup_key"] == f"tally/daily_billing/{DAY}"
            assert set(post["payload"]) == {"summary", "source", "severity", "custom_details"}
            details = post["payload"]["custom_details"]
            assert post["payload"]["summary"] == mail["Subject"]
        else:
            assert post["status"] == "firing" and post["summary"] == mail["Subject"]
            details = post
        assert (details["job"], details["day"], details["step"]) == (
            "daily_billing",
            DAY.isoformat(),
            "usage_push",
        )
        assert details["run_id"] == outage.run_id
        assert details["error"] == error_line.removeprefix("Error:  ")

        # Repeated ticks and a restarted sensor (no cursor): nothing new.
        assert ticks.tick().startswith("nothing to announce")
        assert ticks.tick(cursor=None).startswith("nothing to announce")
        assert len(alerts_mailed(smtp)) == 1 and len(hook.bodies) == 1

        # A successful re-run of the day: one recovery, naming the failed run.
        rerun = run_day(instance)
        assert rerun.success
        assert "recovery daily_billing" in ticks.tick()
        recovered = alerts_mailed(smtp)[1]
        assert recovered["Subject"] == f"[tally] RECOVERED: daily_billing for {DAY}"
        assert outage.run_id in recovered.get_content()
        resolve = hook.bodies[1]
        if webhook_format == "pagerduty":
            assert resolve == {
                "routing_key": ROUTING_KEY,
                "event_action": "resolve",
                "dedup_key": f"tally/daily_billing/{DAY}",
            }
        else:
            assert resolve["status"] == "resolved"
            assert resolve["resolves_run_id"] == outage.run_id
            assert resolve["dedup_key"] == post["dedup_key"]

        assert ticks.tick().startswith("nothing to announce")
        assert ticks.tick(cursor=None).startswith("nothing to announce")
        assert len(alerts_mailed(smtp)) == 2 and len(hook.bodies) == 2
        assert all(path == "/hooks/tally" for path in hook.paths)
    assert ledger(engine) == [
        (
            "failure",
            "daily_billing",
            DAY.isoformat(),
            outage.run_id,
            "usage_push",
            AlertStatus.SENT.value,
            ["email", "webhook"],
        ),
        (
            "recovery",
            "daily_billing",
            DAY.isoformat(),
            rerun.run_id,
            None,
            AlertStatus.SENT.value,
            ["email", "webhook"],
        ),
    ]


def run_credits(instance: DagsterInstance, approver: str):
    from pipelines.definitions import defs

    return defs.resolve_job_def("issue_credits").execute_in_process(
        run_config={
            "ops": {
                "apply_credits": {
                    "config": {
                        "proposal_ids": [987654],
                        "approver": approver,
                    }
                }
            }
        },
        instance=instance,
        raise_on_error=False,
    )


def test_issue_credits_failure_and_a_retried_webhook(engine, dagster_home, alert_env):
    """The webhook refuses the first post: the ledger says failed, the next tick sends
    to the webhook only (the e-mail went out once), then one recovery."""
    smtp, hook = alert_env
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        ticks = Ticks(instance)
        failed = run_credits(instance, approver=" ")
        assert not failed.success
        hook.statuses = [500]
        summary = ticks.tick()
        assert "NOT delivered" in summary and "alert webhook at 127.0.0.1 failed" in summary
        [mail] = alerts_mailed(smtp)
        assert mail["Subject"] == "[tally] FAILED: issue_credits for no partition at apply_credits"
        assert "Error:  approver is empty; set the approver's name or e-mail" in mail.get_content()
        assert [row[5] for row in ledger(engine)] == ["failed"]

        assert "sent via email, webhook" in ticks.tick()
        assert len(alerts_mailed(smtp)) == 1
        assert [body["status"] for body in hook.bodies] == ["firing", "firing"]
        assert ticks.tick().startswith("nothing to announce")

        assert run_credits(instance, approver="finance@example.test").success
        assert "recovery issue_credits" in ticks.tick()
        assert ticks.tick(cursor=None).startswith("nothing to announce")
        assert [m["Subject"] for m in alerts_mailed(smtp)][1] == (
            "[tally] RECOVERED: issue_credits for no partition"
        )
        assert [body["status"] for body in hook.bodies] == ["firing", "firing", "resolved"]
    assert [(row[0], row[5]) for row in ledger(engine)] == [
        ("failure", "sent"),
        ("recovery", "sent"),
    ]


def test_without_channels_the_alert_is_recorded_once(engine, dagster_home, monkeypatch):
    for variable in ("SMTP_HOST", "ALERT_WEBHOOK_URL", "ALERT_EMAIL_TO", "ALERT_WEBHOOK_FORMAT"):
        monkeypatch.delenv(variable, raising=False)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        ticks = Ticks(instance)
        failed = run_credits(instance, approver="")
        assert "recorded and logged" in ticks.tick()
        assert ticks.tick(cursor=None).startswith("nothing to announce")
    assert [(row[0], row[3], row[5]) for row in ledger(engine)] == [
        ("failure", failed.run_id, "logged")
    ]


@pytest.mark.parametrize(("enum", "column"), [(AlertKind, "kind"), (AlertStatus, "status")])
def test_enums_match_the_ledger_check_constraints(engine, enum, column) -> None:
    from test_enums import allowed_values

    assert {member.value for member in enum} == allowed_values(
        engine, "billing.run_failure_alerts", column
    )
