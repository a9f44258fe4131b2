"""Database plumbing: migrations, URLs, errors that name the fix."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from resources import db


def test_migrations_apply_once_and_concurrently(database_url):
    engine = db.engine_for(database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP SCHEMA billing CASCADE"))
    db._MIGRATED.clear()
    applied: list[list[str]] = []
    threads = [
        threading.Thread(target=lambda: applied.append(db.migrate(engine))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    versions = sorted(path.stem for path in db.MIGRATIONS_DIR.glob("*.sql"))
    # Exactly one process applied each migration; the others found nothing to do.
    assert sorted(version for batch in applied for version in batch) == versions
    assert db.migrate(engine) == []
    with engine.connect() as connection:
        recorded = (
            connection.execute(
                sa.text("SELECT version FROM billing.schema_migrations ORDER BY version")
            )
            .scalars()
            .all()
        )
    assert recorded == versions


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg://u@h/d"),
    ],
)
def test_urls_always_use_psycopg3(given, expected):
    assert db.normalize_url(given) == expected


def test_unreachable_database_names_the_fix_without_the_password():
    with pytest.raises(db.DatabaseUnavailable) as caught:
        db.engine_for("postgresql://postgres:hunter2@127.0.0.1:1/nowhere")
    message = str(caught.value)
    assert "hunter2" not in message and "DATABASE_URL" in message and "\n" not in message
