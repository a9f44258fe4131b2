"""One CLI run of a usage day at a time: `tally run` and `tally demo` hold a session
advisory lock on the billing database while a day runs, so a second process asked
for the same day refuses it with one line instead of running beside the first.
(Runs launched by the daemon queue per partition in dagster.yaml; the push's own
lock keeps the money exact either way.)"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from resources.db import billing_engine, load_sql, raw_connection


@contextmanager
def day_run_lock(usage_date: dt.date, part: str | None = None) -> Iterator[bool]:
    """Yields True while this process holds `usage_date` (or one org shard's `part`
    of it), False when another does."""
    key = usage_date.isoformat() if part is None else f"{usage_date.isoformat()}/{part}"
    params = {"usage_date": key}
    with raw_connection(billing_engine()) as connection:
        row = connection.execute(load_sql("db/day_run_try_lock.sql"), params).fetchone()
        held = bool(row and row[0])
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.execute(load_sql("db/day_run_unlock.sql"), params)
                connection.commit()
