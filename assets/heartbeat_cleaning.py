"""Rule 1 of DESIGN §3, clean: which heartbeats can be billed and which are
quarantined with a reason (null ids or times, unknown instance or tier, future,
after stop), and the per-instance table the later rules look up. Pure."""

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from assets.metering_rules import (
    FUTURE_CODE,
    QUARANTINE_COLUMNS,
    QUARANTINE_REASONS,
    MeteringRules,
    epoch_seconds,
)
from resources.calendar import day_bounds_epoch


@dataclass
class InstanceTable:
    """Per-instance arrays aligned with `instances` rows."""

    ids: np.ndarray  # object, instance_id
    org: np.ndarray  # object, org_id
    tier: np.ndarray  # object
    tier_known: np.ndarray  # bool
    stopped_at: np.ndarray  # int64 epoch seconds, max int when not stopped
    continuous_limit: np.ndarray  # int64 seconds
    daily_limit: np.ndarray  # int64 seconds
    idle_timeout: np.ndarray  # int64 seconds


def instance_table(
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    rules: MeteringRules,
    known_tiers: frozenset[str],
) -> InstanceTable:
    stopped, not_stopped = epoch_seconds(instances["stopped_at"])
    stopped[not_stopped] = np.iinfo(np.int64).max
    limits = instances[["org_id"]].merge(
        throttle[["org_id", "continuous_limit_s", "daily_limit_s", "idle_timeout_s"]],
        on="org_id",
        how="left",
    )

    def _limit(column: str, default: int) -> np.ndarray:
        return limits[column].fillna(default).to_numpy(dtype="int64")

    tiers = instances["tier"].to_numpy(dtype=object)
    return InstanceTable(
        ids=instances["instance_id"].to_numpy(dtype=object),
        org=instances["org_id"].to_numpy(dtype=object),
        tier=tiers,
        tier_known=np.array([tier in known_tiers for tier in tiers], dtype=bool),
        stopped_at=stopped,
        continuous_limit=_limit("continuous_limit_s", rules.default_continuous_limit_s),
        daily_limit=_limit("daily_limit_s", rules.default_daily_limit_s),
        idle_timeout=_limit("idle_timeout_s", rules.default_idle_timeout_s),
    )


def instance_positions(heartbeat_ids: pd.Series, instance_ids: np.ndarray) -> np.ndarray:
    """Row of each heartbeat's instance in the instance table; -1 unknown, -2 null id."""
    categorical = (
        heartbeat_ids
        if isinstance(heartbeat_ids.dtype, pd.CategoricalDtype)
        else heartbeat_ids.astype("category")
    )
    codes = categorical.cat.codes.to_numpy()
    lookup = pd.Index(instance_ids).get_indexer(categorical.cat.categories)
    positions = np.append(lookup, -2)[np.where(codes >= 0, codes, len(lookup))]
    return positions.astype(np.int64)


@dataclass
class CleanHeartbeats:
    instance: np.ndarray  # int64 row in the instance table, sorted with `sent`
    sent: np.ndarray  # int64 epoch seconds
    active: np.ndarray  # bool


def _reason_codes(
    position: np.ndarray,
    sent: np.ndarray,
    sent_missing: np.ndarray,
    table: InstanceTable,
    run_time: dt.datetime,
    rules: MeteringRules,
) -> np.ndarray:
    """Per heartbeat: 0 if it may be billed, else k for QUARANTINE_REASONS[k - 1]
    (the first that applies)."""
    run_second = pd.Timestamp(run_time).as_unit("ns").value // 1_000_000_000
    # Unknown or null instances look up a sentinel row appended at the end.
    lookup = np.where(position >= 0, position, len(table.ids))
    tier_known = np.append(table.tier_known, True)[lookup]
    stopped_at = np.append(table.stopped_at, np.iinfo(np.int64).max)[lookup]
    conditions = [
        position == -2,
        sent_missing,
        position == -1,
        ~tier_known,
        sent > run_second + rules.future_tolerance_s,
        sent >= stopped_at,
    ]
    return np.select(conditions, np.arange(1, len(conditions) + 1), 0)


def _day_quarantine(
    heartbeats: pd.DataFrame,
    reason_code: np.ndarray,
    sent: np.ndarray,
    sent_missing: np.ndarray,
    usage_date: dt.date,
) -> pd.DataFrame:
    """The bad rows that belong to the day: by their sent_at, or by their
    received_at when the sent_at cannot be trusted (null or in the future)."""
    bad = reason_code > 0
    if not bad.any():
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    day_start, day_end = day_bounds_epoch(usage_date)
    received, _ = epoch_seconds(heartbeats["received_at"])
    by_received = sent_missing | (reason_code == FUTURE_CODE)
    stamp = np.where(by_received, received, sent)
    in_day = bad & (stamp >= day_start) & (stamp < day_end)
    quarantine = heartbeats.loc[in_day, QUARANTINE_COLUMNS[:-1]].copy()
    quarantine["reason"] = [QUARANTINE_REASONS[code - 1].value for code in reason_code[in_day]]
    return quarantine.reset_index(drop=True)


def billable_heartbeats(
    heartbeats: pd.DataFrame,
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    run_time: dt.datetime,
    rules: MeteringRules,
    known_tiers: frozenset[str],
) -> pd.DataFrame:
    """The heartbeats that pass rule 3.1 (nothing to quarantine), with their
    instance's org and tier: what reaches billing, for the extract's quality suite."""
    table = instance_table(instances, throttle, rules, known_tiers)
    position = instance_positions(heartbeats["instance_id"], table.ids)
    sent, sent_missing = epoch_seconds(heartbeats["sent_at"])
    keep = _reason_codes(position, sent, sent_missing, table, run_time, rules) == 0
    billable = heartbeats.loc[keep, ["instance_id", "sent_at", "active"]].reset_index(drop=True)
    billable["org_id"] = table.org[position[keep]]
    billable["tier"] = table.tier[position[keep]]
    return billable


def clean_heartbeats(
    heartbeats: pd.DataFrame,
    table: InstanceTable,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules,
) -> tuple[CleanHeartbeats, pd.DataFrame, int]:
    """Rule 3.1: quarantine bad rows (those belonging to the day are returned), floor
    to the second, collapse duplicates (active if any copy is). Returns clean
    heartbeats sorted by (instance, sent), the day's quarantine and its duplicate count."""
    day_start, day_end = day_bounds_epoch(usage_date)
    position = instance_positions(heartbeats["instance_id"], table.ids)
    sent, sent_missing = epoch_seconds(heartbeats["sent_at"])
    reason_code = _reason_codes(position, sent, sent_missing, table, run_time, rules)
    quarantine = _day_quarantine(heartbeats, reason_code, sent, sent_missing, usage_date)

    good = reason_code == 0
    is_active = heartbeats["active"].astype("boolean").fillna(True).to_numpy(dtype=bool)[good]
    instance = position[good]
    sent = sent[good]

    # One int64 key per row: instance, second, active bit. Sorting it orders rows by
    # (instance, sent) and puts an active copy last among duplicates.
    base = int(sent.min()) if len(sent) else 0
    key = (instance << 33) | ((sent - base) << 1) | is_active.astype(np.int64)
    key.sort()
    second_key = key >> 1
    last_copy = np.ones(len(key), dtype=bool)
    last_copy[:-1] = second_key[1:] != second_key[:-1]
    removed = key[~last_copy]
    removed_sent = ((removed >> 1) & 0xFFFFFFFF) + base
    duplicates = int(((removed_sent >= day_start) & (removed_sent < day_end)).sum())
    key = key[last_copy]
    clean = CleanHeartbeats(
        instance=key >> 33,
        sent=((key >> 1) & 0xFFFFFFFF) + base,
        active=(key & 1).astype(bool),
    )
    return clean, quarantine, duplicates
