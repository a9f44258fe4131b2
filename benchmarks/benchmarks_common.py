"""Shared by the benchmarks: which PostgreSQL server to build benchmark data on."""

from __future__ import annotations

import sqlalchemy as sa

from resources import db

LOCAL_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def server_url(explicit: str | None) -> str:
    """--database-url / BENCH_DATABASE_URL, else 127.0.0.1:5432, else the embedded one."""
    if explicit:
        return db.normalize_url(explicit)
    try:
        engine = sa.create_engine(LOCAL_SERVER)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
        return LOCAL_SERVER
    except sa.exc.OperationalError:
        return db.embedded_database_url()
