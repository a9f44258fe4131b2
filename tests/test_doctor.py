"""`tally doctor` (issue 11, item 5): one OK / FAIL line per check, exit 1 on any
failure, never a traceback or a secret. All OK against the real sandbox, PostgreSQL
and aiosmtpd; then each failure alone names itself."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import uvicorn
from builders import add_org
from conftest import POLAR_TOKEN, STRIPE_KEY, free_port

from pipelines import doctor
from pipelines.cli import main
from pipelines.status import DeploymentFacts
from resources import db

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = sorted(path.stem for path in db.MIGRATIONS_DIR.glob("*.sql"))
NOW = dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC)
WRONG_KEY = "sk_test_wrongKEY0123456789abcdef"


def run_doctor(capsys) -> tuple[int, list[str]]:
    code = main(["doctor"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out.strip().splitlines()


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith("OK  ")]


@pytest.fixture()
def healthy(engine, providers_env, smtp_server, dagster_home):
    """Everything a deployment needs: orgs on both providers, keys, SMTP."""
    add_org(engine, "org-s", provider="stripe")
    add_org(engine, "org-p", provider="polar")
    return providers_env


# --------------------------------------------------------------------------- real parts


def test_everything_ok_is_one_ok_line_per_check_and_exit_0(healthy, smtp_server, capsys):
    code, lines = run_doctor(capsys)
    assert code == 0, lines
    assert lines and failures(lines) == [], lines
    text = "\n".join(lines)
    for expected in (
        "OK  config: DATABASE_URL / BILLING_DATABASE_URL",
        "OK  config: first partition 2020-01-01",
        "OK  config: pricing",
        "OK  control plane: tables present",
        f"OK  billing database: migrated ({len(MIGRATIONS)} migrations applied)",
        f"OK  stripe: key accepted by a read-only call (list meters, {healthy.base_url})",
        f"OK  polar: key accepted by a read-only call (list meters, {healthy.base_url})",
        f"OK  smtp: 127.0.0.1:{smtp_server.port} answers EHLO and NOOP",
        "OK  schedule: daily_billing_schedule RUNNING",
        "OK  daemon: local instance",
    ):
        assert expected in text, text
    assert STRIPE_KEY not in text and POLAR_TOKEN not in text
    assert smtp_server.messages == []  # connected, mailed nothing


class StripeKeyCheck:
    """Stripe's own 401 for a key it does not know, in front of the sandbox app
    (the sandbox accepts any bearer key; Stripe does not)."""

    def __init__(self, app, accepted: set[str]) -> None:
        self.app, self.accepted = app, accepted

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        bearer = headers.get(b"authorization", b"").decode().partition(" ")[2]
        if (
            scope["type"] != "http"
            or scope["path"].startswith("/_sandbox")
            or (bearer in self.accepted)
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": {
                    "message": f"Invalid API Key provided: {bearer[:8]}****{bearer[-4:]}",
                    "type": "invalid_request_error",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` on a real loopback port (uvicorn in a thread) until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Listening before the server runs: a client's connection waits in the backlog
    # until uvicorn accepts it, so nothing has to wait for the server to start.
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_a_wrong_stripe_key_fails_the_stripe_line(healthy, monkeypatch, capsys):
    with serving(StripeKeyCheck(healthy.app, {STRIPE_KEY, POLAR_TOKEN})) as stripe_base:
        monkeypatch.setenv("STRIPE_API_BASE", stripe_base)
        monkeypatch.setenv("STRIPE_API_KEY", WRONG_KEY)
        code, lines = run_doctor(capsys)
    assert code == 1
    (failed,) = failures(lines)
    assert failed.startswith("FAIL stripe: STRIPE_API_KEY not accepted (Invalid API Key"), failed
    assert f"— set STRIPE_API_KEY to a valid secret key for {stripe_base}" in failed
    assert "OK  polar: key accepted" in "\n".join(lines)
    assert WRONG_KEY not in "\n".join(lines) and POLAR_TOKEN not in "\n".join(lines)


def test_a_key_missing_for_a_provider_in_use_fails(healthy, monkeypatch, capsys):
    monkeypatch.delenv("POLAR_ACCESS_TOKEN")
    code, lines = run_doctor(capsys)
    assert code == 1
    assert failures(lines) == [
        "FAIL polar: POLAR_ACCESS_TOKEN is not set and 1 org(s) are billed through polar "
        "— export POLAR_ACCESS_TOKEN=… (the key of that polar account)"
    ]


def test_smtp_with_nothing_listening_fails_the_smtp_line(healthy, monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("SMTP_PORT", str(port))
    code, lines = run_doctor(capsys)
    assert code == 1
    (failed,) = failures(lines)
    assert failed.startswith(f"FAIL smtp: cannot reach 127.0.0.1:{port} (Connection refused)")
    assert "— check SMTP_HOST / SMTP_PORT" in failed


def test_smtp_unset_is_ok_and_says_alerts_are_not_mailed(healthy, monkeypatch, capsys):
    monkeypatch.delenv("SMTP_HOST")
    code, lines = run_doctor(capsys)
    assert code == 0
    assert "OK  smtp: not configured (alerts are recorded, not mailed)" in lines


@pytest.fixture()
def empty_database(database_url) -> Iterator[str]:
    """A brand-new database on the same server: never migrated."""
    server = sa.engine.make_url(database_url)
    name = f"tally_doctor_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield server.set(database=name).render_as_string(hide_password=False)
    db._engine.cache_clear()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_pending_migrations_are_reported_never_applied(
    healthy, empty_database, monkeypatch, capsys
):
    monkeypatch.setenv("BILLING_DATABASE_URL", empty_database)
    code, lines = run_doctor(capsys)
    assert code == 1
    (failed,) = failures(lines)
    assert failed.startswith(
        f"FAIL billing database: {len(MIGRATIONS)} migrations pending "
        f"({MIGRATIONS[0]} … {MIGRATIONS[-1]}) — run `tally run"
    ), failed
    engine = sa.create_engine(db.normalize_url(empty_database), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        migrated = connection.execute(
            sa.text("SELECT to_regclass('billing.schema_migrations') IS NOT NULL")
        ).scalar()
    engine.dispose()
    assert migrated is False  # the doctor looked and changed nothing


def test_an_unreachable_database_url_fails_its_line_without_the_password(
    healthy, database_url, smtp_server
):
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql://postgres:s3cretPW@127.0.0.1:{port}/nope",
        "BILLING_DATABASE_URL": database_url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr == ""
    lines = result.stdout.strip().splitlines()
    (failed,) = failures(lines)
    assert failed.startswith(
        f"FAIL control plane database: cannot connect to PostgreSQL at "
        f"postgresql+psycopg://postgres:***@127.0.0.1:{port}/nope"
    ), failed
    assert "— check DATABASE_URL" in failed
    # Providers of unknown orgs: the ones whose keys are set are still checked.
    assert any(line.startswith("OK  stripe: key accepted") for line in lines)
    assert "s3cretPW" not in result.stdout
    assert STRIPE_KEY not in result.stdout and POLAR_TOKEN not in result.stdout


def test_a_bad_setting_is_a_config_line_not_an_exit_2(healthy, monkeypatch, capsys):
    monkeypatch.setenv("TALLY_LOG_FORMAT", "xml")
    code, lines = run_doctor(capsys)
    assert code == 1
    assert failures(lines) == [
        "FAIL config: TALLY_LOG_FORMAT='xml' is not a log format — use text or json (or unset it)"
    ]


# --------------------------------------------------------------------------- decisions


def facts(*, status="running", beat: dt.datetime | None = None) -> DeploymentFacts:
    return DeploymentFacts(
        last_failure=None,
        schedule_status=status,
        schedule_source="set in this instance",
        daemon_heartbeat_at=beat,
        checked_at=NOW,
    )


def test_line_format_and_exit_code():
    ok, bad = doctor.Check("smtp: x"), doctor.Check("smtp", "down", "start it")
    assert doctor.line(ok) == "OK  smtp: x"
    assert doctor.line(bad) == "FAIL smtp: down — start it"
    assert doctor.exit_code([ok]) == 0 and doctor.exit_code([ok, bad]) == 1
    split = doctor.from_error("config", "X is wrong; set X")
    assert (split.problem, split.fix) == ("X is wrong", "set X")


def test_migrations_decision():
    assert doctor.migrations_check({"0001_a", "0002_b"}, ["0001_a", "0002_b"]).ok
    pending = doctor.migrations_check({"0001_a"}, ["0001_a", "0002_b", "0003_c"])
    assert pending.problem == "2 migrations pending (0002_b … 0003_c)"


def test_schedule_and_daemon_decisions():
    assert doctor.schedule_check(facts()).ok
    stopped = doctor.schedule_check(facts(status="stopped"))
    assert not stopped.ok and "STOPPED" in (stopped.problem or "")
    alive = facts(beat=NOW - dt.timedelta(seconds=30))
    dead = facts(beat=NOW - dt.timedelta(hours=2))
    assert doctor.daemon_check(alive, local=False).ok
    assert doctor.daemon_check(dead, local=True).ok  # a laptop between `tally ui` sessions
    down = doctor.daemon_check(dead, local=False)
    assert not down.ok and "2026-11-21T01:00:00Z" in (down.problem or "")
    never = doctor.daemon_check(facts(), local=False)
    assert not never.ok and "ever run" in (never.problem or "")


def test_provider_answer_decisions():
    variables = ("STRIPE_API_KEY", "STRIPE_API_BASE")
    assert doctor.provider_answer_check("stripe", variables, None, None).ok
    down = doctor.provider_answer_check("stripe", variables, "http://x", "gave up after 6 attempts")
    assert "no answer from http://x" in (down.problem or "") and "STRIPE_API_BASE" in down.fix
    rejected = doctor.provider_answer_check("stripe", variables, None, "Invalid API Key")
    assert rejected.problem == "STRIPE_API_KEY not accepted (Invalid API Key)"
