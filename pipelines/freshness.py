"""Freshness of the reconciliation (DESIGN §9) and the alert state machine.

The reconciliation is fresh when both hold:
- a real (not report-only) reconciliation succeeded within the last 24 h;
- the latest usage day whose deadline has passed is reconciled: day D is due at
  06:00 UTC on D + 1 ("yesterday's partition by 06:00").

The pure part (`evaluate_freshness`, `next_alert_step`) has no Dagster and no I/O.
The thin readers at the bottom take the facts from the billing database itself —
`billing.reconciliations`, written by each real reconciliation in its own
transaction — and the alert history from `billing.freshness_alerts`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

RECONCILIATION_ASSET = "reconciliation"
MAX_AGE = dt.timedelta(hours=24)
DEADLINE = dt.time(6, 0)  # UTC, on the day after the usage day


class FreshnessState(StrEnum):
    """billing.freshness_alerts.state."""

    FRESH = "fresh"
    STALE = "stale"


class AlertDelivery(StrEnum):
    """billing.freshness_alerts.status: how an alert went out."""

    SENT = "sent"
    LOGGED = "logged"  # no SMTP / webhook configured
    FAILED = "failed"
    SUPERSEDED = "superseded"  # recovered before it was delivered


FRESH, STALE = FreshnessState.FRESH, FreshnessState.STALE


@dataclass(frozen=True)
class Freshness:
    stale: bool
    reasons: list[str]
    last_success_at: dt.datetime | None
    newest_day: dt.date | None
    due_day: dt.date | None = None
    checked_at: dt.datetime | None = None

    @property
    def state(self) -> str:
        return STALE if self.stale else FRESH

    @property
    def never_run(self) -> bool:
        return self.last_success_at is None

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "stale": self.stale,
            "never_run": self.never_run,
            "reasons": list(self.reasons),
            "last_success_at": _iso(self.last_success_at),
            "newest_day": self.newest_day.isoformat() if self.newest_day else None,
            "due_day": self.due_day.isoformat() if self.due_day else None,
            "checked_at": _iso(self.checked_at),
        }


def _utc(value: dt.datetime, name: str) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None


def due_day(now: dt.datetime, deadline: dt.time = DEADLINE) -> dt.date:
    """The latest usage day whose reconciliation deadline has passed at `now`:
    yesterday from 06:00 UTC on, the day before yesterday before that."""
    now = _utc(now, "now")
    shifted = now - dt.timedelta(hours=deadline.hour, minutes=deadline.minute)
    return shifted.date() - dt.timedelta(days=1)


def _hours(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"


def evaluate_freshness(
    last_success_at: dt.datetime | None,
    reconciled_days: Collection[dt.date],
    now: dt.datetime,
    *,
    max_age: dt.timedelta = MAX_AGE,
    deadline: dt.time = DEADLINE,
) -> Freshness:
    """Stale when the last success is older than `max_age` (or there is none) or the
    due day (see `due_day`) is not among `reconciled_days`. Reasons say which."""
    now = _utc(now, "now")
    last = _utc(last_success_at, "last_success_at") if last_success_at else None
    due = due_day(now, deadline)
    reasons: list[str] = []
    if last is None:
        reasons.append("the reconciliation has never succeeded")
    elif now - last > max_age:
        reasons.append(
            f"last successful reconciliation {_hours(now - last)} ago "
            f"(at {_iso(last)}; limit {_hours(max_age)})"
        )
    if due not in reconciled_days:
        deadline_at = dt.datetime.combine(due + dt.timedelta(days=1), deadline, tzinfo=dt.UTC)
        reasons.append(
            f"usage day {due.isoformat()} is not reconciled "
            f"(due by {deadline_at.strftime('%Y-%m-%d %H:%M')} UTC)"
        )
    return Freshness(
        stale=bool(reasons),
        reasons=reasons,
        last_success_at=last,
        newest_day=max(reconciled_days) if reconciled_days else None,
        due_day=due,
        checked_at=now,
    )


def unreadable_freshness(now: dt.datetime, problem: str) -> Freshness:
    """Stale because the billing database's record cannot be read (`problem`)."""
    now = _utc(now, "now")
    return Freshness(
        stale=True,
        reasons=[f"the billing database cannot be read ({problem})"],
        last_success_at=None,
        newest_day=None,
        due_day=due_day(now),
        checked_at=now,
    )


# ---------------------------------------------------------------------------
# Alert state machine (kept in the sensor cursor)
# ---------------------------------------------------------------------------


@dataclass
class AlertCursor:
    """What on-call was last told (`notified`) and the alert being delivered, if any.

    `pending` is the state an alert is owed for; `delivered` the channels that
    already took it (a retry only goes to the others); `alert_id` its row in
    billing.freshness_alerts."""

    notified: str = FRESH
    pending: str | None = None
    delivered: list[str] = field(default_factory=list)
    alert_id: int | None = None

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str | None) -> AlertCursor | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                notified=data.get("notified", FRESH),
                pending=data.get("pending"),
                delivered=list(data.get("delivered") or []),
                alert_id=data.get("alert_id"),
            )
        except (ValueError, AttributeError):
            return None


@dataclass(frozen=True)
class AlertStep:
    """What this tick must do: nothing, or send `state` to `channels`."""

    state: str | None
    channels: list[str]
    cursor: AlertCursor


def next_alert_step(
    cursor: AlertCursor, freshness: Freshness, configured: Iterable[str]
) -> AlertStep:
    """One alert per change of state, not one per tick.

    Same state as the one on-call knows → nothing (an owed alert for a state that
    has since flipped back is dropped). Otherwise the alert is owed: send it to
    the configured channels that have not taken it yet."""
    current = freshness.state
    if current == cursor.notified:
        return AlertStep(None, [], AlertCursor(notified=current))
    if cursor.pending == current:
        owed = AlertCursor(cursor.notified, current, list(cursor.delivered), cursor.alert_id)
    else:
        owed = AlertCursor(cursor.notified, current, [], None)
    channels = [channel for channel in configured if channel not in owed.delivered]
    return AlertStep(current, channels, owed)


def after_delivery(step: AlertStep, delivered: Iterable[str], failed: bool) -> AlertCursor:
    """The cursor once this tick's sends are done: notified only when nothing failed."""
    assert step.state is not None
    channels = sorted(set(step.cursor.delivered) | set(delivered))
    if failed:
        return AlertCursor(step.cursor.notified, step.state, channels, step.cursor.alert_id)
    return AlertCursor(step.state, None, [], step.cursor.alert_id)


def alert_text(freshness: Freshness) -> tuple[str, str]:
    """(subject, body) of the e-mail; the webhook carries the same facts as JSON."""
    last = _iso(freshness.last_success_at) or "never"
    newest = freshness.newest_day.isoformat() if freshness.newest_day else "none"
    if freshness.stale:
        subject = "[tally] STALE: billing reconciliation is missing"
        lines = [
            "The billing reconciliation is stale (replaces BillingReconciliationMissing).",
            "",
            *[f"- {reason}" for reason in freshness.reasons],
            "",
            f"Last successful reconciliation: {last}",
            f"Newest reconciled usage day:    {newest}",
            "",
            "Next steps: `tally status` for the current state; the failed runs of",
            "daily_billing in `tally ui`; re-run missing days with",
            "`tally run --start-date YYYY-MM-DD --end-date YYYY-MM-DD`. See docs/alerts.md.",
        ]
    else:
        subject = "[tally] RECOVERED: billing reconciliation is fresh again"
        lines = [
            "The billing reconciliation is fresh again.",
            "",
            f"Last successful reconciliation: {last}",
            f"Newest reconciled usage day:    {newest}",
        ]
    lines += ["", f"Checked at {_iso(freshness.checked_at)}."]
    return subject, "\n".join(lines) + "\n"


def webhook_payload(freshness: Freshness) -> dict[str, Any]:
    subject, _ = alert_text(freshness)
    return {
        "alert": "BillingReconciliationStale",
        "replaces": "BillingReconciliationMissing",
        "status": "firing" if freshness.stale else "resolved",
        "summary": subject,
        **freshness.as_json(),
    }


# ---------------------------------------------------------------------------
# I/O: billing.reconciliations and billing.freshness_alerts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LastReconciliation:
    success_at: dt.datetime | None
    run_id: str | None
    duration_seconds: float | None
    reconciled_days: frozenset[dt.date]


def record_reconciliation(
    cursor,
    usage_date: dt.date,
    run_id: str,
    run_started_at: dt.datetime,
    reconciled_at: dt.datetime,
) -> None:
    """Write the day's real reconciliation into `billing.reconciliations`; call it in
    the transaction that writes the day's discrepancies, so one never lands alone."""
    from resources.db import load_sql

    cursor.execute(
        load_sql("freshness/record_reconciliation.sql"),
        {
            "usage_date": usage_date,
            "run_id": run_id,
            "run_started_at": _utc(run_started_at, "run_started_at"),
            "reconciled_at": _utc(reconciled_at, "reconciled_at"),
        },
    )


def last_reconciliation(engine) -> LastReconciliation:
    """Facts from the billing database's own record of real reconciliations
    (`billing.reconciliations`): a database never reconciled — or never migrated —
    has none, whatever any Dagster home holds. Report-only runs never write there."""
    from resources.db import load_sql, raw_connection

    with raw_connection(engine) as connection, connection.cursor() as cursor:
        cursor.execute(load_sql("freshness/reconciliations_table_exists.sql"))
        row = cursor.fetchone()
        if not (row and row[0]):
            return LastReconciliation(None, None, None, frozenset())
        cursor.execute(load_sql("freshness/reconciled_days.sql"))
        days = frozenset(day for (day,) in cursor.fetchall())
        cursor.execute(load_sql("freshness/last_reconciliation.sql"))
        latest = cursor.fetchone()
    if latest is None:
        return LastReconciliation(None, None, None, days)
    reconciled_at, run_id, duration = latest
    return LastReconciliation(
        reconciled_at.astimezone(dt.UTC), run_id, max(0.0, float(duration)), days
    )


def read_freshness(engine, now: dt.datetime) -> tuple[Freshness, LastReconciliation]:
    """Freshness of the billing database behind `engine` at `now`."""
    facts = last_reconciliation(engine)
    return evaluate_freshness(facts.success_at, facts.reconciled_days, now), facts


def _table_exists(cursor) -> bool:
    from resources.db import load_sql

    cursor.execute(load_sql("freshness/alerts_table_exists.sql"))
    return bool(cursor.fetchone()[0])


def record_alert(
    connection,
    cursor_state: AlertCursor,
    freshness: Freshness,
    *,
    delivered: list[str],
    errors: list[str],
    status: str,
    now: dt.datetime,
) -> int:
    """Insert (first attempt) or update (retry) the alert's row; returns its id."""
    from resources.db import load_sql

    params = {
        "alert_id": cursor_state.alert_id,
        "state": freshness.state,
        "reasons": list(freshness.reasons),
        "last_success_at": freshness.last_success_at,
        "newest_day": freshness.newest_day,
        "channels": sorted(delivered),
        "errors": list(errors),
        "status": status,
        "now": now,
    }
    with connection.cursor() as cursor:
        row = None
        if cursor_state.alert_id is not None:
            cursor.execute(load_sql("freshness/alert_update.sql"), params)
            row = cursor.fetchone()
        if row is None:
            cursor.execute(load_sql("freshness/alert_insert.sql"), params)
            row = cursor.fetchone()
    connection.commit()
    return int(row[0])


def latest_alert(connection) -> dict[str, Any] | None:
    """The newest row of billing.freshness_alerts (None when there is none)."""
    from resources.db import load_sql

    with connection.cursor() as cursor:
        if not _table_exists(cursor):
            return None
        cursor.execute(load_sql("freshness/alert_latest.sql"))
        row = cursor.fetchone()
        if row is None:
            return None
        names = [column.name for column in cursor.description]
    alert = dict(zip(names, row, strict=True))
    for name in ("detected_at", "sent_at", "updated_at", "last_success_at"):
        alert[name] = _iso(alert.get(name))
    if alert.get("newest_day"):
        alert["newest_day"] = alert["newest_day"].isoformat()
    return alert


def cursor_from_history(alert: dict[str, Any] | None) -> AlertCursor:
    """Rebuild the state machine from the table when the sensor cursor is empty
    (sensor reset or new deployment): never re-send what was already sent."""
    if not alert:
        return AlertCursor()
    state = alert["state"]
    other = FRESH if state == STALE else STALE
    if alert["status"] == AlertDelivery.FAILED:
        return AlertCursor(other, state, list(alert.get("channels") or []), alert["alert_id"])
    if alert["status"] == AlertDelivery.SUPERSEDED:
        return AlertCursor(other, None, [], None)
    return AlertCursor(state, None, [], alert["alert_id"])


def supersede_alert(connection, alert_id: int, now: dt.datetime) -> None:
    """An owed alert whose state flipped back before delivery is never sent."""
    from resources.db import load_sql

    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("freshness/alert_supersede.sql"), {"alert_id": alert_id, "now": now}
        )
    connection.commit()
