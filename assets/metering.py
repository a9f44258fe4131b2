"""Metering: instance heartbeats → billed seconds per (org, day, tier), DESIGN §3.

The pure part works on whole-second integers (epoch seconds) in numpy arrays so a
day of 10,000 instances (~29 M heartbeats with the look-back day) fits in memory
and runs in seconds. Every interval is half-open [start, end).

The asset at the bottom wires PostgreSQL to `compute_billed_usage`.
"""

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)

SECONDS_PER_DAY = 86_400
_NAT = np.iinfo(np.int64).min  # NaT as int64 microseconds

QUARANTINE_REASONS = (
    "null_instance_id",
    "null_sent_at",
    "unknown_instance",
    "unknown_tier",
    "future",
    "after_stop",
)

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
    known_tiers: frozenset[str] = field(
        default_factory=lambda: frozenset({"small", "medium", "large", "gpu"})
    )

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
        day_start = dt.datetime.combine(usage_date, dt.time(), tzinfo=dt.UTC)
        margin = dt.timedelta(seconds=span + self.max_gap_s + self.heartbeat_interval_s)
        return (
            day_start - margin,
            day_start + dt.timedelta(days=1, seconds=self.max_gap_s),
        )

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


def _day_bounds(usage_date: dt.date) -> tuple[int, int]:
    day_start = int(dt.datetime.combine(usage_date, dt.time(), tzinfo=dt.UTC).timestamp())
    return day_start, day_start + SECONDS_PER_DAY


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
    instances: pd.DataFrame, throttle: pd.DataFrame, rules: MeteringRules
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
        tier_known=np.array([tier in rules.known_tiers for tier in tiers], dtype=bool),
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
    day_start, day_end = _day_bounds(usage_date)
    run_second = pd.Timestamp(run_time).as_unit("ns").value // 1_000_000_000

    position = _instance_positions(heartbeats["instance_id"], table.ids)
    sent, sent_missing = epoch_seconds(heartbeats["sent_at"])
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
    reason_code = np.select(conditions, np.arange(1, len(conditions) + 1), 0)

    # A bad row belongs to the day of its sent_at, or of its received_at when the
    # sent_at cannot be trusted (null or in the future).
    bad = reason_code > 0
    if bad.any():
        received, _ = epoch_seconds(heartbeats["received_at"])
        by_received = sent_missing | (reason_code == 5)
        stamp = np.where(by_received, received, sent)
        in_day = bad & (stamp >= day_start) & (stamp < day_end)
        quarantine = heartbeats.loc[in_day, QUARANTINE_COLUMNS[:-1]].copy()
        quarantine["reason"] = [QUARANTINE_REASONS[code - 1] for code in reason_code[in_day]]
        quarantine = quarantine.reset_index(drop=True)
    else:
        quarantine = pd.DataFrame(columns=QUARANTINE_COLUMNS)

    good = ~bad
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
        by_id = sorted(in_second, key=lambda position: instance_id[rows[position]].encode())
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
) -> MeteringResult:
    """DESIGN §3 for one UTC day. `heartbeats` may span any days; the result is
    exact for `usage_date` given the heartbeats of `rules.lookback_window(day)`."""
    rules = rules or MeteringRules()
    table = _instance_table(instances, throttle, rules)
    clean, quarantine, duplicates = clean_heartbeats(heartbeats, table, usage_date, run_time, rules)
    sessions, pauses, within, over_limit = split_sessions_and_runs(clean, table, rules)
    day_start, day_end = _day_bounds(usage_date)
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


@dataclass
class HeartbeatColumns:
    """Heartbeats as compact columns (≈ 21 bytes a row instead of a DataFrame's
    objects): `code` indexes `categories` (instance ids; -1 null id), stamps are
    Unix microseconds (NaT as int64 min), `active` is 1/0/2 (2 = null)."""

    code: np.ndarray
    sent_us: np.ndarray
    active: np.ndarray
    received_us: np.ndarray
    categories: list[str]

    def __len__(self) -> int:
        return len(self.code)

    def take(self, rows: np.ndarray) -> "HeartbeatColumns":
        return HeartbeatColumns(
            self.code[rows],
            self.sent_us[rows],
            self.active[rows],
            self.received_us[rows],
            self.categories,
        )

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "instance_id": pd.Categorical.from_codes(
                    self.code, categories=pd.Index(self.categories, dtype=object)
                ),
                "sent_at": pd.Series(self.sent_us.view("M8[us]")).dt.tz_localize("UTC"),
                "active": pd.Series(pd.arrays.BooleanArray(self.active == 1, self.active == 2)),
                "received_at": pd.Series(self.received_us.view("M8[us]")).dt.tz_localize("UTC"),
            }
        )

    @staticmethod
    def from_frame(heartbeats: pd.DataFrame) -> "HeartbeatColumns":
        ids = heartbeats["instance_id"]
        categorical = ids if isinstance(ids.dtype, pd.CategoricalDtype) else ids.astype("category")
        active = heartbeats["active"].astype("boolean")
        return HeartbeatColumns(
            code=categorical.cat.codes.to_numpy().astype(np.int32),
            sent_us=_micros(heartbeats["sent_at"]),
            active=np.where(active.isna(), 2, active.fillna(False).astype(int)).astype(np.int8),
            received_us=_micros(heartbeats["received_at"]),
            categories=[str(value) for value in categorical.cat.categories],
        )

    @staticmethod
    def concat(parts: list["HeartbeatColumns"], categories: list[str]) -> "HeartbeatColumns":
        """Concatenate column by column, freeing each part's column as it goes."""
        columns = {}
        for name, dtype in (
            ("code", np.int32),
            ("sent_us", np.int64),
            ("active", np.int8),
            ("received_us", np.int64),
        ):
            columns[name] = (
                np.concatenate([getattr(part, name) for part in parts])
                if parts
                else np.empty(0, dtype)
            )
            for part in parts:
                setattr(part, name, None)
        return HeartbeatColumns(categories=categories, **columns)


def _micros(values: pd.Series) -> np.ndarray:
    stamps = pd.to_datetime(values, utc=True).dt.as_unit("us")
    result = stamps.to_numpy(dtype="datetime64[us]").view("int64").copy()
    result[stamps.isna().to_numpy()] = _NAT
    return result


def compute_in_org_chunks(
    heartbeats: "HeartbeatColumns | pd.DataFrame",
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules | None = None,
    max_rows_per_chunk: int = 2_000_000,
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
# I/O: extract from the control plane, write billing tables, the asset
# ---------------------------------------------------------------------------

# Binary COPY row of extract_heartbeats_binary.sql: field count, then (length, value)
# for code int4, sent_at timestamptz, active int2, received_at timestamptz.
_BINARY_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("code_len", ">i4"),
        ("code", ">i4"),
        ("sent_len", ">i4"),
        ("sent", ">i8"),
        ("active_len", ">i4"),
        ("active", ">i2"),
        ("received_len", ">i4"),
        ("received", ">i8"),
    ]
)
_BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in Unix microseconds
_PARSE_BLOCK = 8 << 20


def _parse_binary_block(buffer: bytearray, final: bool) -> tuple[HeartbeatColumns, int]:
    rows = len(buffer) // _BINARY_ROW.itemsize
    if final:
        trailer = bytes(buffer[rows * _BINARY_ROW.itemsize :])
        if trailer != b"\xff\xff":
            raise RuntimeError(f"unexpected end of binary COPY stream ({trailer[:8]!r})")
    block = np.frombuffer(buffer, dtype=_BINARY_ROW, count=rows)
    if rows and not (
        (block["fields"] == 4).all()
        and (block["code_len"] == 4).all()
        and (block["sent_len"] == 8).all()
        and (block["active_len"] == 2).all()
        and (block["received_len"] == 8).all()
    ):
        raise RuntimeError("binary COPY rows are not the expected 40-byte layout")
    columns = HeartbeatColumns(
        code=block["code"].astype(np.int32),
        sent_us=block["sent"].astype(np.int64) + _PG_EPOCH_US,
        active=block["active"].astype(np.int8),
        received_us=block["received"].astype(np.int64) + _PG_EPOCH_US,
        categories=[],
    )
    del block
    return columns, rows * _BINARY_ROW.itemsize


def _copy_window_part(
    control_engine, codes: pd.DataFrame, part_start: dt.datetime, part_end: dt.datetime
) -> tuple[HeartbeatColumns, pd.DataFrame]:
    """Stream one time slice of the window as binary rows; rows with a null or
    unknown instance id come back separately as text (usually none)."""
    params = {"part_start": part_start, "part_end": part_end}
    parts: list[HeartbeatColumns] = []
    with raw_connection(control_engine) as connection, connection.cursor() as cursor:
        cursor.execute(load_sql("extract_codes_table.sql"))
        with cursor.copy(load_sql("extract_codes_copy.sql")) as copy:
            for instance_id, code in codes.itertuples(index=False):
                copy.write_row((instance_id, code))
        cursor.execute(load_sql("extract_codes_analyze.sql"))
        buffer = bytearray()
        header_done = False
        with cursor.copy(load_sql("extract_heartbeats_binary.sql"), params) as copy:
            for chunk in copy:
                buffer += chunk
                if not header_done and len(buffer) >= 19:
                    if bytes(buffer[:11]) != _BINARY_SIGNATURE:
                        raise RuntimeError("not a PostgreSQL binary COPY stream")
                    extension = int.from_bytes(buffer[15:19], "big")
                    del buffer[: 19 + extension]
                    header_done = True
                if header_done and len(buffer) >= _PARSE_BLOCK:
                    block, used = _parse_binary_block(buffer, final=False)
                    parts.append(block)
                    del buffer[:used]
        if header_done:
            block, used = _parse_binary_block(buffer, final=True)
            parts.append(block)
        columns = HeartbeatColumns.concat(parts, [])
        unknown = columns.code < 0
        text_rows = pd.DataFrame(columns=["instance_id", "sent_at", "active", "received_at"])
        if unknown.any():
            stamps = pd.to_datetime(np.unique(columns.sent_us[unknown]), unit="us", utc=True)
            text_rows = read_frame(
                connection,
                "extract_unknown_heartbeats.sql",
                {**params, "sent_at": list(stamps.to_pydatetime())},
            )
            columns = columns.take(np.flatnonzero(~unknown))
    return columns, text_rows


def _text_rows_to_columns(
    rows: pd.DataFrame, category_index: dict[str, int], categories: list[str]
) -> HeartbeatColumns:
    codes = np.empty(len(rows), dtype=np.int32)
    for position, instance_id in enumerate(rows["instance_id"]):
        if instance_id is None or (isinstance(instance_id, float) and np.isnan(instance_id)):
            codes[position] = -1
            continue
        code = category_index.get(instance_id)
        if code is None:
            code = category_index[instance_id] = len(categories)
            categories.append(instance_id)
        codes[position] = code

    active = rows["active"].astype("boolean")
    return HeartbeatColumns(
        code=codes,
        sent_us=_micros(rows["sent_at"]),
        active=np.where(active.isna(), 2, active.fillna(False).astype(int)).astype(np.int8),
        received_us=_micros(rows["received_at"]),
        categories=[],
    )


@dataclass
class DayExtract:
    heartbeats: HeartbeatColumns
    instances: pd.DataFrame
    throttle: pd.DataFrame


def extract_day(
    control_engine, usage_date: dt.date, run_time: dt.datetime, rules: MeteringRules
) -> DayExtract:
    """Instances, throttle settings and the day's heartbeats. The look-back window
    streams as binary COPY in two time slices on two connections at once (the
    server formats nothing and both cores work); untrusted rows come as text."""
    from concurrent.futures import ThreadPoolExecutor

    day_start = dt.datetime.combine(usage_date, dt.time(), tzinfo=dt.UTC)
    with raw_connection(control_engine) as connection:
        instances = read_frame(connection, "extract_instances.sql")
        throttle = read_frame(connection, "extract_throttle.sql")
        window_start, window_end = rules.lookback_window(
            usage_date, rules.lookback_span_s(throttle)
        )
        untrusted = read_frame(
            connection,
            "extract_untrusted_heartbeats.sql",
            {
                "window_start": window_start,
                "window_end": window_end,
                "future_after": run_time + dt.timedelta(seconds=rules.future_tolerance_s),
                "day_start": day_start,
                "day_end": day_start + dt.timedelta(days=1),
            },
        )
    if instances.empty:
        instances = pd.DataFrame(columns=["instance_id", "org_id", "tier", "status", "stopped_at"])
    instances["stopped_at"] = pd.to_datetime(instances["stopped_at"], utc=True)
    categories = instances["instance_id"].astype(str).tolist()
    category_index = {instance_id: code for code, instance_id in enumerate(categories)}
    codes = pd.DataFrame({"instance_id": categories, "code": range(len(categories))})

    middle = window_start + (window_end - window_start) / 2
    slices = [(window_start, middle), (middle, window_end)]
    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        results = list(
            pool.map(lambda bounds: _copy_window_part(control_engine, codes, *bounds), slices)
        )
    parts = [columns for columns, _ in results]
    for text_rows in [rows for _, rows in results] + [untrusted]:
        if len(text_rows):
            parts.append(_text_rows_to_columns(text_rows, category_index, categories))
    heartbeats = HeartbeatColumns.concat(parts, categories)
    del parts, results
    return DayExtract(heartbeats, instances, throttle)


def write_billed_usage(billing_engine, usage_date: dt.date, result: MeteringResult) -> None:
    """Replace the day's rows in one transaction (a re-run replaces, never adds)."""
    quarantine_rows = (
        (usage_date, *(None if pd.isna(value) else value for value in row))
        for row in result.quarantine.itertuples(index=False)
    )
    with raw_connection(billing_engine) as connection, connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "billed_usage",
            usage_date,
            deletes=["delete_billed_usage.sql", "delete_quarantine.sql"],
            copies=[
                ("copy_billed_usage.sql", result.billed.itertuples(index=False, name=None)),
                ("copy_quarantine.sql", quarantine_rows),
            ],
        )


def _markdown_preview(billed: pd.DataFrame, limit: int = 15) -> str:
    if billed.empty:
        return "_no usage on this day_"
    top = billed.sort_values("billable_seconds", ascending=False).head(limit)
    lines = [
        "| org | tier | runtime h | billable h | idle h | over cont. h | over daily h |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in top.itertuples(index=False):
        lines.append(
            f"| {row.org_id} | {row.tier} | {row.runtime_seconds / 3600:.2f} | "
            f"{row.billable_seconds / 3600:.2f} | {row.idle_paused_seconds / 3600:.2f} | "
            f"{row.over_continuous_seconds / 3600:.2f} | {row.over_daily_seconds / 3600:.2f} |"
        )
    return "\n".join(lines)


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
            description="WARN when heartbeats were quarantined",
        ),
    ],
    description="Billed instance seconds per (org, day, tier) with throttle caps (DESIGN §3).",
)
def billed_usage(context: AssetExecutionContext, postgres: PostgresResource) -> MaterializeResult:
    from assets.quality import EXTRACT_SAMPLE_ROWS, validate_billed, validate_extract

    usage_date = partition_day(context.partition_key)
    run_time = dt.datetime.now(dt.UTC)
    rules = MeteringRules()
    extract = extract_day(postgres.control_engine(), usage_date, run_time, rules)
    context.log.info(f"{usage_date}: {len(extract.heartbeats):,} heartbeats extracted")
    extract_sample = extract.heartbeats.take(
        np.arange(min(len(extract.heartbeats), EXTRACT_SAMPLE_ROWS))
    )
    result = compute_in_org_chunks(
        extract.heartbeats, extract.instances, extract.throttle, usage_date, run_time, rules
    )
    billing_engine = postgres.billing_engine()
    write_billed_usage(billing_engine, usage_date, result)
    with raw_connection(billing_engine) as connection:
        stored = read_frame(connection, "read_billed_usage.sql", {"usage_date": usage_date})
    if stored.empty:
        stored = pd.DataFrame(columns=BILLED_COLUMNS).astype({c: "int64" for c in SECONDS_COLUMNS})

    checks = [
        AssetCheckResult(check_name=name, passed=passed, metadata=details)
        for name, (passed, details) in billed_usage_checks(stored, extract.throttle, rules).items()
    ]
    for outcome, name in (
        (
            validate_extract(extract_sample.to_frame(), extract.instances, rules.known_tiers),
            "great_expectations_extract",
        ),
        (validate_billed(stored, rules.known_tiers), "great_expectations_output"),
    ):
        checks.append(
            AssetCheckResult(
                check_name=name,
                passed=outcome.success,
                metadata={"expectations": outcome.evaluated, "failed": ", ".join(outcome.failed)},
            )
        )
    reasons = result.quarantine["reason"].value_counts().to_dict()
    checks.append(
        AssetCheckResult(
            check_name="no_quarantined_heartbeats",
            passed=not reasons,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "quarantined": len(result.quarantine),
                **{f"quarantined_{reason}": int(n) for reason, n in reasons.items()},
            },
        )
    )
    hours = {column: float(stored[column].sum()) / 3600 for column in SECONDS_COLUMNS}
    return MaterializeResult(
        metadata={
            "usage_date": usage_date.isoformat(),
            "rows": len(stored),
            "orgs": int(stored["org_id"].nunique()),
            "heartbeats_extracted": len(extract.heartbeats),
            "duplicates_collapsed": result.duplicates_collapsed,
            "quarantined": len(result.quarantine),
            "runtime_hours": MetadataValue.float(round(hours["runtime_seconds"], 3)),
            "billable_hours": MetadataValue.float(round(hours["billable_seconds"], 3)),
            "idle_paused_hours": MetadataValue.float(round(hours["idle_paused_seconds"], 3)),
            "over_continuous_hours": MetadataValue.float(
                round(hours["over_continuous_seconds"], 3)
            ),
            "over_daily_hours": MetadataValue.float(round(hours["over_daily_seconds"], 3)),
            "preview": MetadataValue.md(_markdown_preview(stored)),
        },
        check_results=checks,
    )
