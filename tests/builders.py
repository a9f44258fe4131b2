"""Small helpers to put control-plane rows into the test database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

UTC = dt.UTC

# The provider sandbox in use (set by the `providers_env` fixture): Stripe counts
# usage only for customers that exist, so every org added here gets its customer.
_sandbox: Any = None
_customers: list[dict[str, str]] = []  # added since the database was emptied


def use_sandbox(sandbox: Any) -> None:
    """Create every org's customer in `sandbox` from now on (None: stop), and
    create those of the orgs added before it was set."""
    global _sandbox
    _sandbox = sandbox
    if sandbox is not None and _customers:
        sandbox.post("/_sandbox/customers", json=_customers).raise_for_status()


def forget_orgs() -> None:
    """The database was emptied: its orgs' customers are no longer pending."""
    _customers.clear()


def register_customer(provider: str, customer: str, name: str = "", email: str = "") -> None:
    """An org's customer (added or moved to): created in the sandbox in use."""
    if not customer:  # an org without a usable customer id is never pushed
        return
    row = {"provider": provider, "customer": customer}
    row.update({key: value for key, value in (("name", name), ("email", email)) if value})
    _customers.append(row)
    if _sandbox is not None:
        _sandbox.post("/_sandbox/customers", json=row).raise_for_status()


def at(day: dt.date, hours: int = 0, minutes: int = 0, seconds: float = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=UTC) + dt.timedelta(
        hours=hours, minutes=minutes, seconds=seconds
    )


def add_org(
    engine: sa.Engine,
    org_id: str,
    *,
    plan: str = "usage-only",
    provider: str = "stripe",
    customer: str | None = None,
    email: str | None = None,
    throttle: tuple[int, int, int] | None = None,
    create_customer: bool = True,
) -> None:
    """Insert an org; with a sandbox in use (`use_sandbox`) its provider customer is
    created there too, unless `create_customer=False` (a customer the provider has
    never heard of)."""
    values = {
        "org": org_id,
        "name": f"{org_id} Inc.",
        "email": email or f"billing@{org_id}.test",
        "plan": plan,
        "provider": provider,
        "customer": customer if customer is not None else f"cus_{org_id}",
    }
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO organizations (org_id, name, billing_email, plan, provider, "
                "provider_customer_id) VALUES (:org, :name, :email, :plan, :provider, :customer)"
            ),
            values,
        )
        if throttle:
            connection.execute(
                sa.text("INSERT INTO throttle_settings VALUES (:org, :c, :d, :i)"),
                {"org": org_id, "c": throttle[0], "d": throttle[1], "i": throttle[2]},
            )
    if create_customer and provider in ("stripe", "polar"):
        register_customer(provider, values["customer"], values["name"], values["email"])


def add_instance(
    engine: sa.Engine,
    instance_id: str,
    org_id: str,
    tier: str = "small",
    *,
    status: str = "running",
    stopped_at: dt.datetime | None = None,
    created_at: dt.datetime | None = None,
    last_heartbeat: dt.datetime | None = None,
) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO instances VALUES "
                "(:id, :org, :tier, :status, :created, :stopped, :last)"
            ),
            {
                "id": instance_id,
                "org": org_id,
                "tier": tier,
                "status": status,
                "created": created_at or dt.datetime(2020, 1, 1, tzinfo=UTC),
                "stopped": stopped_at,
                "last": last_heartbeat,
            },
        )


def add_heartbeats(engine: sa.Engine, rows: Iterable[tuple]) -> int:
    """rows: (instance_id, sent_at, active[, received_at])."""
    payload = []
    for row in rows:
        instance_id, sent_at, active = row[:3]
        received = row[3] if len(row) > 3 else (sent_at or dt.datetime.now(UTC))
        payload.append({"i": instance_id, "s": sent_at, "a": active, "r": received})
    if payload:
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO heartbeats VALUES (:i, :s, :a, :r)"), payload)
    return len(payload)


def every_minute(
    instance_id: str,
    start: dt.datetime,
    minutes: int,
    *,
    active: bool = True,
    step_seconds: int = 60,
) -> list[tuple]:
    return [
        (instance_id, start + dt.timedelta(seconds=step_seconds * k), active)
        for k in range(minutes)
    ]


def billed_rows(engine: sa.Engine, day: dt.date) -> list[dict]:
    with engine.connect() as connection:
        return [
            dict(row._mapping)
            for row in connection.execute(
                sa.text(
                    "SELECT org_id, tier, runtime_seconds, idle_paused_seconds, "
                    "over_continuous_seconds, over_daily_seconds, billable_seconds "
                    "FROM billing.billed_usage WHERE usage_date = :d ORDER BY org_id, tier"
                ),
                {"d": day},
            )
        ]


def add_billed(engine: sa.Engine, rows: Iterable[tuple]) -> None:
    """rows: (org_id, usage_date, tier, billable_seconds) straight into
    billing.billed_usage (runtime = billable), for the stages after metering."""
    payload = [
        {"org": org, "day": day, "tier": tier, "seconds": seconds}
        for org, day, tier, seconds in rows
    ]
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO billing.billed_usage (org_id, usage_date, tier, runtime_seconds, "
                "idle_paused_seconds, over_continuous_seconds, over_daily_seconds, "
                "billable_seconds) VALUES (:org, :day, :tier, :seconds, 0, 0, 0, :seconds)"
            ),
            payload,
        )


def add_counter(
    engine: sa.Engine,
    org_id: str,
    day: dt.date,
    tier: str,
    seconds: int,
    *,
    updated_at: dt.datetime | None = None,
) -> None:
    """A control-plane usage counter (usage_counters) row."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO usage_counters (org_id, usage_date, tier, runtime_seconds, "
                "updated_at) VALUES (:org, :day, :tier, :seconds, :updated)"
            ),
            {
                "org": org_id,
                "day": day,
                "tier": tier,
                "seconds": seconds,
                "updated": updated_at or dt.datetime.now(UTC),
            },
        )


def discrepancy_rows(engine: sa.Engine, day: dt.date) -> list[dict]:
    """billing.discrepancies of one day, as dicts."""
    with engine.connect() as connection:
        return [
            dict(row._mapping)
            for row in connection.execute(
                sa.text(
                    "SELECT * FROM billing.discrepancies WHERE usage_date = :d "
                    "ORDER BY kind, org_id, tier NULLS FIRST, instance_id NULLS FIRST"
                ),
                {"d": day},
            )
        ]


def query_rows(engine: sa.Engine, sql: str, params: dict | None = None) -> list[tuple]:
    """The rows of one query, as tuples."""
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(sql), params or {})]


def mark_reconciled(
    engine: sa.Engine,
    *days: dt.date,
    at: dt.datetime | None = None,
    run_seconds: float = 0.0,
) -> dt.datetime:
    """Record real reconciliations of `days` in billing.reconciliations, as the
    reconciliation asset does (pipelines/freshness.py), by a run that began
    `run_seconds` earlier; returns the time written."""
    from pipelines.freshness import record_reconciliation
    from resources.db import raw_connection

    when = at or dt.datetime.now(dt.UTC)
    began = when - dt.timedelta(seconds=run_seconds)
    with raw_connection(engine) as connection, connection.cursor() as cursor:
        for day in days:
            record_reconciliation(cursor, day, f"test-{day.isoformat()}", began, when)
    return when
