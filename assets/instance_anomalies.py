"""Per-instance anomalies the control plane shows (DESIGN §8): instances stuck
"running" without heartbeats, and zombies heartbeating after they stopped. Both
are unbilled time, reported for support to chase. Pure functions."""

from __future__ import annotations

from typing import Any

from assets.discrepancy import (
    DiscrepancyKind,
    ReconcileInputs,
    ReconcileRules,
    as_utc,
    discrepancy_row,
    list_dollars,
)
from assets.pricing import Pricing
from resources.calendar import SECONDS_PER_DAY, day_bounds

Kind = DiscrepancyKind


def _iso(value: Any) -> str:
    stamp = as_utc(value)
    return stamp.isoformat() if stamp is not None else "?"


def _unbilled_row(
    inputs: ReconcileInputs,
    pricing: Pricing,
    kind: DiscrepancyKind,
    instance: Any,
    seconds: int,
    detail: str,
) -> dict:
    """One instance's unbilled seconds (negative delta), priced at its tier's rate."""
    return discrepancy_row(
        inputs.usage_date,
        kind,
        instance.org_id,
        tier=instance.tier,
        instance_id=instance.instance_id,
        delta=-seconds,
        dollars=list_dollars(pricing, -seconds, instance.tier),
        detail=detail,
    )


def instance_discrepancies(
    inputs: ReconcileInputs, pricing: Pricing, rules: ReconcileRules
) -> list[dict]:
    """stuck_instance: running, last heartbeat more than 15 min before the end of the
    day (or now, for today); seconds = the day's span without heartbeats.
    zombie_instance: heartbeats after stopped_at (quarantined by billed_usage);
    seconds = those heartbeats × the heartbeat interval. Both are unbilled time."""
    day = inputs.usage_date
    day_start, day_end = day_bounds(day)
    as_of = min(inputs.now, day_end)
    instances = inputs.get("instances")
    rows = []
    if as_of > day_start:
        for row in instances.sort_values("instance_id").itertuples(index=False):
            if row.status != "running":
                continue
            created = as_utc(row.created_at)
            if created is not None and created >= as_of:
                continue
            last = as_utc(row.last_heartbeat)
            silent_since = last if last is not None else created
            if silent_since is None or as_of - silent_since <= rules.stuck_after:
                continue
            span = int((as_of - max(silent_since, day_start)).total_seconds())
            seen = f"last heartbeat {last.isoformat()}" if last else "no heartbeat ever"
            detail = (
                f"status running but {seen}: silent for more than "
                f"{int(rules.stuck_after.total_seconds() // 60)} min as of "
                f"{as_of.isoformat()}; {span} s of the day unaccounted"
            )
            rows.append(_unbilled_row(inputs, pricing, Kind.STUCK_INSTANCE, row, span, detail))
    by_id = {row.instance_id: row for row in instances.itertuples(index=False)}
    for row in inputs.get("zombies").sort_values("instance_id").itertuples(index=False):
        instance = by_id.get(row.instance_id)
        if instance is None:
            continue
        seconds = min(int(row.heartbeats) * rules.metering.heartbeat_interval_s, SECONDS_PER_DAY)
        stopped = as_utc(instance.stopped_at)
        detail = (
            f"{int(row.heartbeats)} heartbeats after stopped_at "
            f"{_iso(stopped)} (first {_iso(row.first_at)}, last {_iso(row.last_at)})"
            f"; quarantined, not billed: the instance may still be running"
        )
        rows.append(_unbilled_row(inputs, pricing, Kind.ZOMBIE_INSTANCE, instance, seconds, detail))
    return rows
