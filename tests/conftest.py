"""Shared fixtures: a real PostgreSQL database per test session (the server at
127.0.0.1:5432 when it answers, else the embedded one), a Dagster home, helpers
to load control-plane rows."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

# Keep everything this suite writes out of the developer's .tally/.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tally-tests-"))
os.environ["TALLY_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["TALLY_STEP_RETRY_DELAY_S"] = "0.05"
# Tests meter fixed days back to 2025 (month boundaries, backfills); production
# partitions start two months back unless TALLY_FIRST_DAY says otherwise.
os.environ["TALLY_FIRST_DAY"] = "2020-01-01"
# The sandbox processes usage at once unless a test sets processing_delay_s, so the
# suite reconciles as if every push had settled; the settlement tests
# (tests/test_settling.py) set the production window themselves.
os.environ["TALLY_SETTLE_WINDOW_S"] = "0"
for variable in ("DATABASE_URL", "BILLING_DATABASE_URL"):
    os.environ.pop(variable, None)

import builders  # noqa: E402

from resources import db  # noqa: E402

pytest_plugins = ["sandbox_fixture"]

STRIPE_KEY = "sk_test_tallySECRETkey0123456789"
POLAR_TOKEN = "polar_oat_tallySECRETtoken0123"

CONTROL_TABLES = ["heartbeats", "usage_counters", "throttle_settings", "instances", "organizations"]


def _local_server_url() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
    except OSError:
        return None
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    try:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except sa.exc.OperationalError:
        return None
    return url


@pytest.fixture(scope="session")
def database_url() -> str:
    """A fresh database for this test process, created from sql/source_schema.sql."""
    server_url = _local_server_url() or db.embedded_database_url()
    name = f"tally_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    os.environ["DATABASE_URL"] = url
    engine = db.engine_for(url)
    db.create_control_plane(engine)
    db.migrate(engine)
    yield url
    engine.dispose()
    db._engine.cache_clear()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def engine(database_url: str) -> sa.Engine:
    """The test database, emptied: control-plane tables and every billing table."""
    engine = db.engine_for(database_url)
    with engine.begin() as connection:
        billing_tables = (
            connection.execute(
                sa.text(
                    "SELECT quote_ident(table_name) FROM information_schema.tables "
                    "WHERE table_schema = 'billing' AND table_name <> 'schema_migrations'"
                )
            )
            .scalars()
            .all()
        )
        tables = CONTROL_TABLES + [f"billing.{table}" for table in billing_tables]
        connection.execute(sa.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    builders.forget_orgs()
    return engine


@pytest.fixture()
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture()
def providers_env(sandbox_clean, monkeypatch):
    """Provider keys and bases pointing at a freshly reset sandbox. Orgs added with
    `builders.add_org` (before or during the test) get their customers there."""
    monkeypatch.setenv("STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", sandbox_clean.base_url)
    monkeypatch.setenv("POLAR_ACCESS_TOKEN", POLAR_TOKEN)
    monkeypatch.setenv("POLAR_API_BASE", sandbox_clean.base_url)
    builders.use_sandbox(sandbox_clean)
    yield sandbox_clean
    builders.use_sandbox(None)


# --------------------------------------------------------------------------- SMTP


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SmtpCapture:
    """What a loopback aiosmtpd server received: `messages` (parsed, in order) and
    `envelopes` (aiosmtpd envelopes: mail_from, rcpt_tos, content)."""

    def __init__(self) -> None:
        self.messages: list = []
        self.envelopes: list = []
        self.host = "127.0.0.1"
        self.port = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook
        from email import message_from_bytes
        from email.policy import default

        self.envelopes.append(envelope)
        self.messages.append(message_from_bytes(envelope.content, policy=default))
        return "250 Message accepted for delivery"


@pytest.fixture()
def smtp_server(monkeypatch: pytest.MonkeyPatch):
    """A real SMTP server (aiosmtpd) on a free loopback port; SMTP_HOST, SMTP_PORT
    and EMAIL_FROM_ADDRESS point at it (no SMTP credentials)."""
    from aiosmtpd.controller import Controller

    capture = SmtpCapture()
    capture.port = free_port()
    controller = Controller(capture, hostname=capture.host, port=capture.port)
    controller.start()
    monkeypatch.setenv("SMTP_HOST", capture.host)
    monkeypatch.setenv("SMTP_PORT", str(capture.port))
    monkeypatch.setenv("EMAIL_FROM_ADDRESS", "tally@example.test")
    monkeypatch.delenv("SMTP_USERNAME", raising=False)
    monkeypatch.delenv("SMTP_PASSWORD", raising=False)
    try:
        yield capture
    finally:
        controller.stop()
