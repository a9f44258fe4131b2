"""The control-plane column lists match the schema tally creates for demo and tests."""

from __future__ import annotations

import sqlalchemy as sa

from resources.control_plane import COLUMNS, TABLES


def test_columns_match_the_source_schema(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        found = {
            table: [
                row[0]
                for row in connection.execute(
                    sa.text(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = :t "
                        "ORDER BY ordinal_position"
                    ),
                    {"t": table},
                )
            ]
            for table in TABLES
        }
    assert found == {table: COLUMNS[table] for table in TABLES}
