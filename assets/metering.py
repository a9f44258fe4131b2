"""Metering: instance heartbeats → billed seconds per (org, day, tier), DESIGN §3.

The rules are pure functions on whole-second integers (epoch seconds) in numpy
arrays, so a day of 10,000 instances (~29 M heartbeats with the look-back day) fits
in memory and runs in seconds. Every interval is half-open [start, end).

The thin asset at the bottom wires the extract (`assets.extract`) to
`compute_in_org_chunks` and writes `billing.billed_usage`. The tiers it bills are
the priced ones (`Pricing.tier_rates`, `TALLY_PRICING_FILE` included); a heartbeat
of any other tier is quarantined as `unknown_tier`.
"""

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd
import psycopg
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)
from sqlalchemy.engine import Engine

from assets.config import pricing_or_fail
from assets.extract import DayExtract, HeartbeatColumns, extract_day
from assets.markdown import markdown_table
from assets.pricing import Pricing
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.calendar import day_bounds, day_bounds_epoch
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)

# The tiers the pure functions bill when not told: the default pricing's. The
# asset passes the configured ones (`Pricing.known_tiers`).
DEFAULT_KNOWN_TIERS: frozenset[str] = Pricing().known_tiers


class QuarantineReason(StrEnum):
    """Why a heartbeat is never billed (DESIGN §3.1), stored in
    `billing.quarantine.reason`. In order of precedence: a row gets the first that
    applies."""

    NULL_INSTANCE_ID = "null_instance_id"
    NULL_SENT_AT = "null_sent_at"
    UNKNOWN_INSTANCE = "unknown_instance"
    UNKNOWN_TIER = "unknown_tier"
    FUTURE = "future"
    AFTER_STOP = "after_stop"


# Reason code k (1-based) of `clean_heartbeats` is QUARANTINE_REASONS[k - 1].
QUARANTINE_REASONS: tuple[QuarantineReason, ...] = tuple(QuarantineReason)
_FUTURE_CODE = QUARANTINE_REASONS.index(QuarantineReason.FUTURE) + 1

BILLED_COLUMNS = [
    "org_id",
    "usage_date",
    "tier",
    "runtime_seconds",
    "idle_paused_seconds",
    "over_continuous_seconds",
    "over_daily_seconds",
    "billable_seconds",
]
SECONDS_COLUMNS = BILLED_COLUMNS[3:]
QUARANTINE_COLUMNS = ["instance_id", "sent_at", "active", "received_at", "reason"]


@dataclass(frozen=True)
class MeteringRules:
    heartbeat_interval_s: int = 60
    max_gap_s: int = 300
    future_tolerance_s: int = 300
    default_continuous_limit_s: int = 8 * 3600
    default_daily_limit_s: int = 24 * 3600
    default_idle_timeout_s: int = 30 * 60
    # Every throttle limit is at most 24 h: exact only then (DESIGN §3.4).
    max_throttle_limit_s: int = 24 * 3600

    def throttle_defaults_s(self) -> dict[str, int]:
        """The limit an org without a (valid) setting gets, by throttle column."""
        return {
            "continuous_limit_s": self.default_continuous_limit_s,
            "daily_limit_s": self.default_daily_limit_s,
            "idle_timeout_s": self.default_idle_timeout_s,
        }

    def lookback_window(
        self, usage_date: dt.date, lookback_span_s: int | None = None
    ) -> tuple[dt.datetime, dt.datetime]:
        """Heartbeats that determine `usage_date` exactly.

        Before midnight: a run alive at midnight matters through its start s, and only
        while s > midnight − L (L its continuous limit). If s is the end of an idle
        pause, seeing that pause needs the idle stretch from s − T (T the idle timeout)
        on, and a stretch or session seen from W onwards is seen from W + G at the
        latest. So W = midnight − (L + T + G + H) is exact, with L + T the largest any
        org has (`lookback_span_s`). After the day: the next heartbeat can extend a
        session into the day only if it is at most G later."""
        span = lookback_span_s or (self.default_continuous_limit_s + self.default_idle_timeout_s)
        midnight, next_midnight = day_bounds(usage_date)
        margin = dt.timedelta(seconds=span + self.max_gap_s + self.heartbeat_interval_s)
        return midnight - margin, next_midnight + dt.timedelta(seconds=self.max_gap_s)

    def lookback_span_s(self, throttle: pd.DataFrame) -> int:
        """The largest continuous limit + idle timeout of any org (defaults included)."""
        spans = [self.default_continuous_limit_s + self.default_idle_timeout_s]
        if len(throttle):
            spans.append(int((throttle["continuous_limit_s"] + throttle["idle_timeout_s"]).max()))
        return max(spans)


@dataclass
class MeteringResult:
    billed: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates_collapsed: int


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def epoch_seconds(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floor tz-aware timestamps to whole epoch seconds → (int64 seconds, is-null mask)."""
    stamps = pd.to_datetime(values, utc=True)
    missing = stamps.isna().to_numpy()
    micros = stamps.dt.as_unit("us").to_numpy(dtype="datetime64[us]").view("int64")
    seconds = np.floor_divide(micros, 1_000_000)
    seconds[missing] = 0
    return seconds, missing


def _overlap(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.maximum(0, np.minimum(ends, hi) - np.maximum(starts, lo))


@dataclass
class _InstanceTable:
    """Per-instance arrays aligned with `instances` rows."""

    ids: np.ndarray  # object, instance_id
    org: np.ndarray  # object, org_id
    tier: np.ndarray  # object
    tier_known: np.ndarray  # bool
    stopped_at: np.ndarray  # int64 epoch seconds, max int when not stopped
    continuous_limit: np.ndarray  # int64 seconds
    daily_limit: np.ndarray  # int64 seconds
    idle_timeout: np.ndarray  # int64 seconds


def _instance_table(
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    rules: MeteringRules,
    known_tiers: frozenset[str],
) -> _InstanceTable:
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
    return _InstanceTable(
        ids=instances["instance_id"].to_numpy(dtype=object),
        org=instances["org_id"].to_numpy(dtype=object),
        tier=tiers,
        tier_known=np.array([tier in known_tiers for tier in tiers], dtype=bool),
        stopped_at=stopped,
        continuous_limit=_limit("continuous_limit_s", rules.default_continuous_limit_s),
        daily_limit=_limit("daily_limit_s", rules.default_daily_limit_s),
        idle_timeout=_limit("idle_timeout_s", rules.default_idle_timeout_s),
    )


def _instance_positions(heartbeat_ids: pd.Series, instance_ids: np.ndarray) -> np.ndarray:
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
class _CleanHeartbeats:
    instance: np.ndarray  # int64 row in the instance table, sorted with `sent`
    sent: np.ndarray  # int64 epoch seconds
    active: np.ndarray  # bool


def _reason_codes(
    position: np.ndarray,
    sent: np.ndarray,
    sent_missing: np.ndarray,
    table: _InstanceTable,
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
    by_received = sent_missing | (reason_code == _FUTURE_CODE)
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
    table = _instance_table(instances, throttle, rules, known_tiers)
    position = _instance_positions(heartbeats["instance_id"], table.ids)
    sent, sent_missing = epoch_seconds(heartbeats["sent_at"])
    keep = _reason_codes(position, sent, sent_missing, table, run_time, rules) == 0
    billable = heartbeats.loc[keep, ["instance_id", "sent_at", "active"]].reset_index(drop=True)
    billable["org_id"] = table.org[position[keep]]
    billable["tier"] = table.tier[position[keep]]
    return billable


def clean_heartbeats(
    heartbeats: pd.DataFrame,
    table: _InstanceTable,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules,
) -> tuple[_CleanHeartbeats, pd.DataFrame, int]:
    """Rule 3.1: quarantine bad rows (those belonging to the day are returned), floor
    to the second, collapse duplicates (active if any copy is). Returns clean
    heartbeats sorted by (instance, sent), the day's quarantine and its duplicate count."""
    day_start, day_end = day_bounds_epoch(usage_date)
    position = _instance_positions(heartbeats["instance_id"], table.ids)
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
    clean = _CleanHeartbeats(
        instance=key >> 33,
        sent=((key >> 1) & 0xFFFFFFFF) + base,
        active=(key & 1).astype(bool),
    )
    return clean, quarantine, duplicates


@dataclass
class _Intervals:
    instance: np.ndarray
    start: np.ndarray
    end: np.ndarray


def split_sessions_and_runs(
    clean: _CleanHeartbeats, table: _InstanceTable, rules: MeteringRules
) -> tuple[_Intervals, _Intervals, _Intervals, _Intervals]:
    """Rules 3.2–3.4 → (sessions, idle-paused spans, within-limit runs, over-limit spans)."""
    instance, sent, active = clean.instance, clean.sent, clean.active
    count = len(sent)
    if count == 0:
        empty = _Intervals(*(np.empty(0, dtype=np.int64) for _ in range(3)))
        return empty, empty, empty, empty

    new_session = np.ones(count, dtype=bool)
    new_session[1:] = (instance[1:] != instance[:-1]) | (np.diff(sent) > rules.max_gap_s)
    session_first = np.flatnonzero(new_session)
    session_last = np.append(session_first[1:] - 1, count - 1)
    session_of_row = np.cumsum(new_session) - 1
    sessions = _Intervals(
        instance[session_first],
        sent[session_first],
        sent[session_last] + rules.heartbeat_interval_s,
    )

    # Idle stretches: maximal runs of inactive heartbeats inside a session. Each ends
    # at the next active heartbeat of the session or at the session's end.
    previous_active_or_new = np.ones(count, dtype=bool)
    previous_active_or_new[1:] = active[:-1]
    stretch_first = np.flatnonzero(~active & (new_session | previous_active_or_new))
    boundary = np.flatnonzero(active | new_session)
    following = np.searchsorted(boundary, stretch_first, side="right")
    next_index = np.append(boundary, count)[following]
    stretch_session = session_of_row[stretch_first]
    ends_at_active = next_index < count
    ends_at_active[ends_at_active] = ~new_session[next_index[ends_at_active]]
    stretch_start = sent[stretch_first]
    stretch_end = np.where(
        ends_at_active,
        sent[np.minimum(next_index, count - 1)],
        sessions.end[stretch_session],
    )
    timeout = table.idle_timeout[instance[stretch_first]]
    paused = stretch_end - stretch_start > timeout
    pauses = _Intervals(
        instance[stretch_first][paused],
        (stretch_start + timeout)[paused],
        stretch_end[paused],
    )
    pause_session = stretch_session[paused]

    # Runs: the session with its pauses cut out. A run starts at a session start or
    # at a pause's end inside the session; it ends at a pause start or session end.
    session_ends_paused = np.zeros(len(session_first), dtype=bool)
    session_ends_paused[pause_session[pauses.end == sessions.end[pause_session]]] = True
    resumes = pauses.end < sessions.end[pause_session]
    run_instance = np.concatenate([sessions.instance, pauses.instance[resumes]])
    run_start = np.concatenate([sessions.start, pauses.end[resumes]])
    end_instance = np.concatenate([pauses.instance, sessions.instance[~session_ends_paused]])
    run_end = np.concatenate([pauses.start, sessions.end[~session_ends_paused]])
    start_order = np.lexsort((run_start, run_instance))
    end_order = np.lexsort((run_end, end_instance))
    run_instance, run_start, run_end = (
        run_instance[start_order],
        run_start[start_order],
        run_end[end_order],
    )

    limit_end = run_start + table.continuous_limit[run_instance]
    within = _Intervals(run_instance, run_start, np.minimum(run_end, limit_end))
    over = run_end > limit_end
    over_limit = _Intervals(run_instance[over], limit_end[over], run_end[over])
    return sessions, pauses, within, over_limit


def apply_daily_cap(
    org: np.ndarray,
    instance_id: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    daily_limit: np.ndarray,
) -> np.ndarray:
    """Rule 3.6 on one day's within-limit intervals (already clipped to the day).

    Returns billable seconds per interval. Per org, C(t) counts instance-seconds
    before t; the second T with C(T) ≤ L < C(T+1) bills its first L − C(T) running
    instances by instance_id in byte order; everything after T is over the cap."""
    billable = end - start
    if len(billable) == 0:
        return billable
    totals = pd.Series(billable).groupby(org).sum()
    limits = pd.Series(daily_limit).groupby(org).first()
    capped_orgs = totals.index[totals.to_numpy() > limits.loc[totals.index].to_numpy()]
    for capped_org in capped_orgs:
        rows = np.flatnonzero(org == capped_org)
        limit = int(limits.loc[capped_org])
        times = np.concatenate([start[rows], end[rows]])
        steps = np.concatenate([np.ones(len(rows), np.int64), -np.ones(len(rows), np.int64)])
        order = np.argsort(times, kind="stable")
        times, steps = times[order], steps[order]
        points, first = np.unique(times, return_index=True)
        running = np.cumsum(np.add.reduceat(steps, first))  # instances running after point i
        consumed = np.concatenate([[0], np.cumsum(running[:-1] * np.diff(points))])
        crossing = int(np.flatnonzero(consumed > limit)[0]) - 1
        remaining = limit - int(consumed[crossing])
        cap_second = int(points[crossing]) + remaining // int(running[crossing])
        extra = remaining - (cap_second - int(points[crossing])) * int(running[crossing])
        row_start, row_end = start[rows], end[rows]
        billed = np.maximum(0, np.minimum(row_end, cap_second) - row_start)
        in_second = np.flatnonzero((row_start <= cap_second) & (row_end > cap_second))
        by_id = sorted(in_second, key=lambda position: str(instance_id[rows[position]]).encode())
        billed[by_id[:extra]] += 1
        billable[rows] = billed
    return billable


def compute_billed_usage(
    heartbeats: pd.DataFrame,
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules | None = None,
    *,
    known_tiers: frozenset[str] | None = None,
) -> MeteringResult:
    """DESIGN §3 for one UTC day. `heartbeats` may span any days; the result is
    exact for `usage_date` given the heartbeats of `rules.lookback_window(day)`.
    `known_tiers`: the priced tiers (default: the default pricing's); instances of
    any other tier are quarantined as `unknown_tier`."""
    rules = rules or MeteringRules()
    tiers = DEFAULT_KNOWN_TIERS if known_tiers is None else known_tiers
    table = _instance_table(instances, throttle, rules, tiers)
    clean, quarantine, duplicates = clean_heartbeats(heartbeats, table, usage_date, run_time, rules)
    sessions, pauses, within, over_limit = split_sessions_and_runs(clean, table, rules)
    day_start, day_end = day_bounds_epoch(usage_date)
    instance_count = len(table.ids)

    def per_instance(intervals: _Intervals) -> np.ndarray:
        seconds = _overlap(intervals.start, intervals.end, day_start, day_end)
        return np.bincount(intervals.instance, weights=seconds, minlength=instance_count)

    clipped_start = np.maximum(within.start, day_start)
    clipped_end = np.minimum(within.end, day_end)
    in_day = clipped_end > clipped_start
    within_instance = within.instance[in_day]
    billable = apply_daily_cap(
        table.org[within_instance],
        table.ids[within_instance],
        clipped_start[in_day],
        clipped_end[in_day],
        table.daily_limit[within_instance],
    )
    candidates = np.bincount(
        within_instance,
        weights=clipped_end[in_day] - clipped_start[in_day],
        minlength=instance_count,
    )
    billable_seconds = np.bincount(within_instance, weights=billable, minlength=instance_count)
    per_instance_seconds = pd.DataFrame(
        {
            "org_id": table.org,
            "tier": table.tier,
            "runtime_seconds": per_instance(sessions),
            "idle_paused_seconds": per_instance(pauses),
            "over_continuous_seconds": per_instance(over_limit),
            "over_daily_seconds": candidates - billable_seconds,
            "billable_seconds": billable_seconds,
        }
    )
    per_instance_seconds = per_instance_seconds[per_instance_seconds["runtime_seconds"] > 0]
    billed = (
        per_instance_seconds.groupby(["org_id", "tier"], as_index=False, sort=True)[SECONDS_COLUMNS]
        .sum()
        .astype({"org_id": "str", "tier": "str"} | {column: "int64" for column in SECONDS_COLUMNS})
    )
    billed.insert(1, "usage_date", usage_date)
    return MeteringResult(
        billed=billed[BILLED_COLUMNS].reset_index(drop=True),
        quarantine=quarantine,
        duplicates_collapsed=duplicates,
    )


def compute_in_org_chunks(
    heartbeats: HeartbeatColumns | pd.DataFrame,
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules | None = None,
    max_rows_per_chunk: int = 2_000_000,
    *,
    known_tiers: frozenset[str] | None = None,
) -> MeteringResult:
    """`compute_billed_usage` over groups of whole orgs of at most ~max_rows_per_chunk
    heartbeats each, so working memory stays bounded as instances grow. The daily cap
    is per org and an org never spans two groups, so the result is identical. Rows
    with a null or unknown instance go to the first group only."""
    if isinstance(heartbeats, pd.DataFrame):
        heartbeats = HeartbeatColumns.from_frame(heartbeats)
    instance_ids = instances["instance_id"].astype(str).to_numpy(dtype=object)
    position_of_code = pd.Index(instance_ids).get_indexer(heartbeats.categories)
    org_codes, org_names = pd.factorize(instances["org_id"], sort=True)
    code = heartbeats.code
    position = np.where(code >= 0, np.append(position_of_code, -1)[code], -1)
    rows_per_org = np.bincount(org_codes[position[position >= 0]], minlength=len(org_names)).astype(
        np.int64
    )
    chunk_of_org = (np.cumsum(rows_per_org) - rows_per_org) // max_rows_per_chunk
    row_chunk = np.zeros(len(code), dtype=np.int32)
    known = position >= 0
    row_chunk[known] = chunk_of_org[org_codes[position[known]]]
    del position, known
    instance_chunk = chunk_of_org[org_codes] if len(org_codes) else np.empty(0, np.int64)
    chunk_count = int(chunk_of_org.max()) + 1 if len(chunk_of_org) else 1
    parts: list[MeteringResult] = []
    for chunk in range(chunk_count):
        rows = np.flatnonzero(row_chunk == chunk)
        parts.append(
            compute_billed_usage(
                heartbeats.take(rows).to_frame(),
                instances[instance_chunk == chunk],
                throttle,
                usage_date,
                run_time,
                rules,
                known_tiers=known_tiers,
            )
        )
    if len(parts) == 1:
        return parts[0]
    billed = pd.concat([part.billed for part in parts], ignore_index=True)
    quarantines = [part.quarantine for part in parts if len(part.quarantine)]
    return MeteringResult(
        billed=billed.sort_values(["org_id", "tier"], kind="stable").reset_index(drop=True),
        quarantine=(
            pd.concat(quarantines, ignore_index=True) if quarantines else parts[0].quarantine
        ),
        duplicates_collapsed=sum(part.duplicates_collapsed for part in parts),
    )


# ---------------------------------------------------------------------------
# I/O: write billing tables, checks, the asset (the extract is assets/extract.py)
# ---------------------------------------------------------------------------


def not_future_before(run_time: dt.datetime, rules: MeteringRules) -> dt.datetime:
    """sent_at earlier than this is not `future` at `run_time` (floored seconds:
    future means floor(sent_at) > floor(run_time) + tolerance)."""
    run_second = pd.Timestamp(run_time).floor("s").to_pydatetime()
    return run_second + dt.timedelta(seconds=rules.future_tolerance_s + 1)


def _release_rejudged_future(
    cursor: psycopg.Cursor, usage_date: dt.date, run_time: dt.datetime, rules: MeteringRules
) -> None:
    """Rows another day quarantined as `future` that this day has judged now (its
    sent_at is in this day and no longer in the future): out of that quarantine."""
    day_start, day_end = day_bounds(usage_date)
    cursor.execute(
        load_sql("metering/delete_rejudged_future.sql"),
        {
            "reason": QuarantineReason.FUTURE.value,
            "usage_date": usage_date,
            "day_start": day_start,
            "day_end": day_end,
            "not_future_before": not_future_before(run_time, rules),
        },
    )


def write_billed_usage(
    billing_engine: Engine,
    usage_date: dt.date,
    result: MeteringResult,
    *,
    run_time: dt.datetime | None = None,
    rules: MeteringRules | None = None,
) -> None:
    """Replace the day's rows in one transaction (a re-run replaces, never adds).
    Given the run time, `future` rows of other days that this day judged leave
    their quarantine in the same transaction."""
    quarantine_rows = (
        (usage_date, *(None if pd.isna(value) else value for value in row))
        for row in result.quarantine.itertuples(index=False)
    )
    with raw_connection(billing_engine) as connection, connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "billed_usage",
            usage_date,
            deletes=["metering/delete_billed_usage.sql", "metering/delete_quarantine.sql"],
            copies=[
                (
                    "metering/copy_billed_usage.sql",
                    result.billed.itertuples(index=False, name=None),
                ),
                ("metering/copy_quarantine.sql", quarantine_rows),
            ],
        )
        if run_time is not None:
            _release_rejudged_future(cursor, usage_date, run_time, rules or MeteringRules())


def read_billed_usage(billing_engine: Engine, usage_date: dt.date) -> pd.DataFrame:
    """The day's rows as stored (the checks run on what was written)."""
    with raw_connection(billing_engine) as connection:
        stored = read_frame(
            connection, "metering/read_billed_usage.sql", {"usage_date": usage_date}
        )
    if stored.empty:
        stored = pd.DataFrame(columns=BILLED_COLUMNS).astype({c: "int64" for c in SECONDS_COLUMNS})
    return stored


# Preview column → billed_usage column (hours, two decimals).
_PREVIEW_HOURS = {
    "runtime h": "runtime_seconds",
    "billable h": "billable_seconds",
    "idle h": "idle_paused_seconds",
    "over cont. h": "over_continuous_seconds",
    "over daily h": "over_daily_seconds",
}


def _markdown_preview(billed: pd.DataFrame, limit: int = 15) -> str:
    """The day's largest rows by billable seconds."""
    top = billed.sort_values("billable_seconds", ascending=False).head(limit)
    rows = (
        [row["org_id"], row["tier"], *(f"{row[c] / 3600:.2f}" for c in _PREVIEW_HOURS.values())]
        for row in top.to_dict("records")
    )
    return markdown_table(
        ["org", "tier", *_PREVIEW_HOURS],
        rows,
        numeric=_PREVIEW_HOURS,
        empty="_no usage on this day_",
    )


def billed_usage_checks(
    billed: pd.DataFrame, throttle: pd.DataFrame, rules: MeteringRules
) -> dict[str, tuple[bool, dict]]:
    """The blocking invariants of DESIGN §4 on rows read back from the table."""
    identity_broken = billed["runtime_seconds"] != billed[SECONDS_COLUMNS[1:]].sum(axis=1)
    negative = (billed[SECONDS_COLUMNS] < 0).any(axis=1)
    per_org = billed.groupby("org_id")["billable_seconds"].sum()
    limits = (
        throttle.set_index("org_id")["daily_limit_s"]
        .reindex(per_org.index)
        .fillna(rules.default_daily_limit_s)
    )
    over_cap = per_org[per_org > limits]
    return {
        "runtime_identity": (not identity_broken.any(), {"violations": int(identity_broken.sum())}),
        "billable_within_daily_limit": (
            over_cap.empty,
            {"orgs_over_limit": over_cap.index.tolist()[:20]},
        ),
        "no_negative_seconds": (not negative.any(), {"negative_rows": int(negative.sum())}),
    }


def _billable_sample(
    extract: DayExtract, run_time: dt.datetime, rules: MeteringRules, known_tiers: frozenset[str]
) -> pd.DataFrame:
    """An evenly spread sample of the extract, after quarantine (what reaches billing)."""
    from assets.quality import sample_positions

    sample = extract.heartbeats.take(sample_positions(len(extract.heartbeats))).to_frame()
    return billable_heartbeats(
        sample, extract.instances, extract.throttle, run_time, rules, known_tiers
    )


def _check_results(
    stored: pd.DataFrame,
    extract: DayExtract,
    result: MeteringResult,
    run_time: dt.datetime,
    rules: MeteringRules,
    known_tiers: frozenset[str],
) -> list[AssetCheckResult]:
    """The invariants, the Great Expectations suites (against the priced tiers) on
    a sample of what reaches billing and on the stored rows, and the quarantine
    warning. Quarantined rows never fail a blocking check: they are counted."""
    from assets.quality import great_expectations_checks

    checks = [
        AssetCheckResult(check_name=name, passed=passed, metadata=details)
        for name, (passed, details) in billed_usage_checks(stored, extract.throttle, rules).items()
    ]
    billable = _billable_sample(extract, run_time, rules, known_tiers)
    checks += great_expectations_checks(billable, extract.instances, stored, known_tiers)
    checks.append(_quarantine_warning(extract, result))
    return checks


def _quarantine_warning(extract: DayExtract, result: MeteringResult) -> AssetCheckResult:
    """WARN (never blocking) when rows were quarantined or a throttle setting was
    out of bounds (that org billed with the default)."""
    reasons = result.quarantine["reason"].value_counts().to_dict()
    return AssetCheckResult(
        check_name="no_quarantined_heartbeats",
        passed=not reasons and not extract.invalid_throttle,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "quarantined": len(result.quarantine),
            **{f"quarantined_{reason}": int(n) for reason, n in reasons.items()},
            **_invalid_throttle_metadata(extract),
        },
    )


def _invalid_throttle_metadata(extract: DayExtract) -> dict:
    """How many throttle values were out of bounds, and one line per value."""
    lines = [setting.describe() for setting in extract.invalid_throttle]
    return {
        "invalid_throttle_settings": len(lines),
        "invalid_throttle_settings_detail": MetadataValue.text("\n".join(lines)),
    }


def _materialization_metadata(
    usage_date: dt.date, stored: pd.DataFrame, extract: DayExtract, result: MeteringResult
) -> dict:
    hours = {column: float(stored[column].sum()) / 3600 for column in SECONDS_COLUMNS}
    return {
        **_invalid_throttle_metadata(extract),
        "usage_date": usage_date.isoformat(),
        "rows": len(stored),
        "orgs": int(stored["org_id"].nunique()),
        "heartbeats_extracted": len(extract.heartbeats),
        "duplicates_collapsed": result.duplicates_collapsed,
        "quarantined": len(result.quarantine),
        "runtime_hours": MetadataValue.float(round(hours["runtime_seconds"], 3)),
        "billable_hours": MetadataValue.float(round(hours["billable_seconds"], 3)),
        "idle_paused_hours": MetadataValue.float(round(hours["idle_paused_seconds"], 3)),
        "over_continuous_hours": MetadataValue.float(round(hours["over_continuous_seconds"], 3)),
        "over_daily_hours": MetadataValue.float(round(hours["over_daily_seconds"], 3)),
        "preview": MetadataValue.md(_markdown_preview(stored)),
    }


def current_run_time() -> dt.datetime:
    """The run time that judges `future` rows (tests move it)."""
    return dt.datetime.now(dt.UTC)


@asset(
    partitions_def=daily_partitions,
    group_name="metering",
    retry_policy=STEP_RETRY,
    check_specs=[
        AssetCheckSpec(
            "runtime_identity",
            asset="billed_usage",
            blocking=True,
            description="runtime = idle + over continuous + over daily + billable",
        ),
        AssetCheckSpec("billable_within_daily_limit", asset="billed_usage", blocking=True),
        AssetCheckSpec("no_negative_seconds", asset="billed_usage", blocking=True),
        AssetCheckSpec("great_expectations_extract", asset="billed_usage", blocking=True),
        AssetCheckSpec("great_expectations_output", asset="billed_usage", blocking=True),
        AssetCheckSpec(
            "no_quarantined_heartbeats",
            asset="billed_usage",
            description="WARN when heartbeats were quarantined or a throttle setting was out "
            "of bounds (that org billed with the default)",
        ),
    ],
    description="Billed instance seconds per (org, day, tier) with throttle caps (DESIGN §3).",
)
def billed_usage(context: AssetExecutionContext, postgres: PostgresResource) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    known_tiers = pricing_or_fail().known_tiers  # a bad pricing file fails here, not retried
    run_time = current_run_time()
    rules = MeteringRules()
    extract = extract_day(postgres.control_engine(), usage_date, run_time, rules)
    context.log.info(f"{usage_date}: {len(extract.heartbeats):,} heartbeats extracted")
    for setting in extract.invalid_throttle:
        context.log.warning(f"throttle_settings: {setting.describe()}")
    result = compute_in_org_chunks(
        extract.heartbeats,
        extract.instances,
        extract.throttle,
        usage_date,
        run_time,
        rules,
        known_tiers=known_tiers,
    )
    billing_engine = postgres.billing_engine()
    write_billed_usage(billing_engine, usage_date, result, run_time=run_time, rules=rules)
    stored = read_billed_usage(billing_engine, usage_date)
    return MaterializeResult(
        metadata=_materialization_metadata(usage_date, stored, extract, result),
        check_results=_check_results(stored, extract, result, run_time, rules, known_tiers),
    )
