"""`tally export-discrepancies`: billing.discrepancies of a date range as CSV."""

from __future__ import annotations

import csv
import datetime as dt
from typing import IO

import psycopg
from sqlalchemy import Engine

from resources.db import load_sql, raw_connection


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def export_discrepancies(
    engine: Engine, start_date: dt.date, end_date: dt.date, stream: IO[str]
) -> int:
    """Write the discrepancies of [start_date, end_date] as CSV (header first) to
    `stream`, streamed from a server-side cursor. Returns the number of rows."""
    writer = csv.writer(stream)
    count = 0
    with raw_connection(engine) as connection:
        with connection.cursor(name="tally_export_discrepancies") as cursor:
            cursor.execute(
                load_sql("export/discrepancies.sql"),
                {"start_date": start_date, "end_date": end_date},
            )
            header_written = False
            for row in cursor:
                if not header_written:
                    writer.writerow(_header(cursor))
                    header_written = True
                writer.writerow([_csv_value(value) for value in row])
                count += 1
            if not header_written:
                writer.writerow(_header(cursor))
    return count


def _header(cursor: psycopg.Cursor) -> list[str]:
    return [column.name for column in cursor.description or ()]
