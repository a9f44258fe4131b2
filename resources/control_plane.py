"""The control-plane tables tally reads, and their columns, as sql/source_schema.sql
defines them (the one list; the seeder writes them, reconciliation reads them;
tests/test_control_plane.py checks it against the database)."""

from __future__ import annotations

TABLES = ("organizations", "throttle_settings", "instances", "heartbeats", "usage_counters")
COLUMNS: dict[str, list[str]] = {
    "organizations": [
        "org_id",
        "name",
        "billing_email",
        "plan",
        "provider",
        "provider_customer_id",
        "created_at",
    ],
    "throttle_settings": [
        "org_id",
        "continuous_limit_minutes",
        "daily_limit_minutes",
        "idle_timeout_minutes",
    ],
    "instances": [
        "instance_id",
        "org_id",
        "tier",
        "status",
        "created_at",
        "stopped_at",
        "last_heartbeat",
    ],
    "heartbeats": ["instance_id", "sent_at", "active", "received_at"],
    "usage_counters": [
        "org_id",
        "usage_date",
        "tier",
        "runtime_seconds",
        "last_reconciled_at",
        "updated_at",
    ],
}
