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
import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psycopg
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    MaterializeResult,
    PartitionsDefinition,
    asset,
)
from sqlalchemy.engine import Engine

from assets.config import pricing_or_fail
from assets.extract import HeartbeatColumns, HeartbeatSpill, WindowSeen, extract_day
from assets.heartbeat_cleaning import (
    CleanHeartbeats,
    InstanceTable,
    clean_heartbeats,
    instance_table,
)
from assets.late_heartbeats import find_late_days
from assets.metering_checks import check_results, late_heartbeats_check, materialization_metadata
from assets.metering_rules import (
    BILLED_COLUMNS,
    DEFAULT_KNOWN_TIERS,
    SECONDS_COLUMNS,
    MeteringResult,
    MeteringRules,
    QuarantineReason,
)
from assets.shards import ALL, Shard
from pipelines.partitions import daily_partitions, day_and_shard
from pipelines.retry import STEP_RETRY
from resources.calendar import day_bounds, day_bounds_epoch
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)
from resources.settings import RunMode

METERING_THREADS = 2  # spilled groups metered at once (assets/extract.py group size)

# billing.billed_usage_instances (migration 0014), one row per instance with runtime.
INSTANCE_COLUMNS = ["org_id", "usage_date", "instance_id", "tier", *SECONDS_COLUMNS]

# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def _overlap(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.maximum(0, np.minimum(ends, hi) - np.maximum(starts, lo))


@dataclass
class _Intervals:
    instance: np.ndarray
    start: np.ndarray
    end: np.ndarray


def split_sessions_and_runs(
    clean: CleanHeartbeats, table: InstanceTable, rules: MeteringRules
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


@dataclass
class DayIntervals:
    """Rules 3.2–3.6 for one day as intervals of instance-table rows: sessions, idle
    pauses and over-continuous spans (unclipped), the within-limit runs clipped to
    the day, and the billable seconds of each of those (each a prefix of its run:
    the rest is over the daily cap). `compute_billed_usage` sums them; `tally org
    --instance` lists one instance's."""

    sessions: _Intervals
    pauses: _Intervals
    over_limit: _Intervals
    within_in_day: _Intervals
    billable: np.ndarray


def meter_day(
    clean: CleanHeartbeats, table: InstanceTable, rules: MeteringRules, usage_date: dt.date
) -> DayIntervals:
    sessions, pauses, within, over_limit = split_sessions_and_runs(clean, table, rules)
    day_start, day_end = day_bounds_epoch(usage_date)
    clipped_start = np.maximum(within.start, day_start)
    clipped_end = np.minimum(within.end, day_end)
    in_day = clipped_end > clipped_start
    within_in_day = _Intervals(within.instance[in_day], clipped_start[in_day], clipped_end[in_day])
    billable = apply_daily_cap(
        table.org[within_in_day.instance],
        table.ids[within_in_day.instance],
        within_in_day.start,
        within_in_day.end,
        table.daily_limit[within_in_day.instance],
    )
    return DayIntervals(sessions, pauses, over_limit, within_in_day, billable)


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
    table = instance_table(instances, throttle, rules, tiers)
    clean, quarantine, duplicates = clean_heartbeats(heartbeats, table, usage_date, run_time, rules)
    day = meter_day(clean, table, rules, usage_date)
    day_start, day_end = day_bounds_epoch(usage_date)
    instance_count = len(table.ids)

    def per_instance(intervals: _Intervals) -> np.ndarray:
        seconds = _overlap(intervals.start, intervals.end, day_start, day_end)
        return np.bincount(intervals.instance, weights=seconds, minlength=instance_count)

    within = day.within_in_day
    candidates = np.bincount(
        within.instance, weights=within.end - within.start, minlength=instance_count
    )
    billable_seconds = np.bincount(within.instance, weights=day.billable, minlength=instance_count)
    sessions, pauses, over_limit = day.sessions, day.pauses, day.over_limit
    per_instance_seconds = pd.DataFrame(
        {
            "org_id": table.org,
            "instance_id": table.ids,
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
        instances=_instance_rows(per_instance_seconds, usage_date),
    )


def _instance_rows(per_instance_seconds: pd.DataFrame, usage_date: dt.date) -> pd.DataFrame:
    """billing.billed_usage_instances rows: the per-instance seconds the (org, tier)
    rows are the sums of, so they add up exactly. An instance's over_daily is its
    within-limit seconds of the day minus those rule 3.6 bills it (docs/metering.md)."""
    rows = per_instance_seconds.astype(
        {"org_id": "str", "instance_id": "str", "tier": "str"}
        | {column: "int64" for column in SECONDS_COLUMNS}
    )
    rows.insert(1, "usage_date", usage_date)
    return rows.sort_values(["org_id", "instance_id"], kind="stable")[INSTANCE_COLUMNS].reset_index(
        drop=True
    )


def compute_in_org_chunks(
    heartbeats: HeartbeatColumns | HeartbeatSpill | pd.DataFrame,
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
    with a null or unknown instance go to the first group only. A spilled extract
    is metered one spilled group at a time (each read, metered and dropped)."""
    if isinstance(heartbeats, HeartbeatSpill):
        spill = heartbeats

        def meter_group(group: int) -> MeteringResult:
            return compute_in_org_chunks(
                spill.group(group),
                instances[spill.instance_group == group],
                throttle,
                usage_date,
                run_time,
                rules,
                max_rows_per_chunk,
                known_tiers=known_tiers,
            )

        # numpy's sorts and pandas' group-bys release the GIL: two groups at once
        # use both cores; map keeps group order, so the result is the same.
        with ThreadPoolExecutor(max_workers=METERING_THREADS) as pool:
            return _combine(list(pool.map(meter_group, range(spill.groups))))
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
    return _combine(parts)


def _combine(parts: list[MeteringResult]) -> MeteringResult:
    """The results of groups of whole orgs as one (orgs never span two groups)."""
    if len(parts) == 1:
        return parts[0]
    billed = pd.concat([part.billed for part in parts], ignore_index=True)
    instance_rows = pd.concat([part.instances for part in parts], ignore_index=True)
    quarantines = [part.quarantine for part in parts if len(part.quarantine)]
    return MeteringResult(
        billed=billed.sort_values(["org_id", "tier"], kind="stable").reset_index(drop=True),
        quarantine=(
            pd.concat(quarantines, ignore_index=True) if quarantines else parts[0].quarantine
        ),
        duplicates_collapsed=sum(part.duplicates_collapsed for part in parts),
        instances=instance_rows.sort_values(["org_id", "instance_id"], kind="stable").reset_index(
            drop=True
        ),
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
    cursor: psycopg.Cursor,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules,
    shard: Shard,
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
            **shard.params(),
        },
    )


def write_billed_usage(
    billing_engine: Engine,
    usage_date: dt.date,
    result: MeteringResult,
    *,
    run_time: dt.datetime | None = None,
    rules: MeteringRules | None = None,
    seen: WindowSeen | None = None,
    run_id: str | None = None,
    shard: Shard = ALL,
) -> None:
    """Replace the day's rows of `shard` in one transaction (a re-run replaces,
    never adds; assets/shards.py).
    Given the run time, `future` rows of other days that this day judged leave
    their quarantine in the same transaction; given what the extract `seen` of the
    window, billing.metered_days records it (late heartbeats are counted from it)."""
    part = shard.label
    quarantine_rows = (
        (usage_date, *(None if pd.isna(value) else value for value in row), part)
        for row in result.quarantine.itertuples(index=False)
    )
    with raw_connection(billing_engine) as connection, connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "billed_usage",
            usage_date,
            deletes=[
                "metering/delete_billed_usage.sql",
                "metering/delete_billed_usage_instances.sql",
                "metering/delete_quarantine.sql",
            ],
            copies=[
                (
                    "metering/copy_billed_usage.sql",
                    ((*row, part) for row in result.billed.itertuples(index=False, name=None)),
                ),
                (
                    "metering/copy_billed_usage_instances.sql",
                    (
                        (*row, part)
                        for row in result.instances[INSTANCE_COLUMNS].itertuples(
                            index=False, name=None
                        )
                    )
                    if len(result.instances)
                    else iter(()),
                ),
                ("metering/copy_quarantine.sql", quarantine_rows),
            ],
            params=shard.params(),
        )
        if run_time is not None:
            _release_rejudged_future(cursor, usage_date, run_time, rules or MeteringRules(), shard)
        if seen is not None:
            cursor.execute(
                load_sql("metering/delete_metered_day_layouts.sql"),
                {"usage_date": usage_date, **shard.params()},
            )
            cursor.execute(
                load_sql("metering/upsert_metered_day.sql"),
                {
                    "usage_date": usage_date,
                    "part": part,
                    "window_start": seen.window_start,
                    "window_end": seen.window_end,
                    "heartbeats_seen": seen.heartbeats,
                    "counted_at": seen.counted_at,
                    "run_id": run_id,
                },
            )


def read_billed_usage(
    billing_engine: Engine, usage_date: dt.date, shard: Shard = ALL
) -> pd.DataFrame:
    """The day's rows of `shard` as stored (the checks run on what was written)."""
    with raw_connection(billing_engine) as connection:
        stored = read_frame(
            connection,
            "metering/read_billed_usage.sql",
            {"usage_date": usage_date, "part": shard.label},
        )
    if stored.empty:
        stored = pd.DataFrame(columns=BILLED_COLUMNS).astype({c: "int64" for c in SECONDS_COLUMNS})
    return stored


def instances_sum_check(
    billing_engine: Engine, usage_date: dt.date, shard: Shard = ALL
) -> AssetCheckResult:
    """Blocking: per (org, tier) the stored per-instance rows sum exactly to the
    stored billed_usage row (a row on one side only is a mismatch)."""
    with raw_connection(billing_engine) as connection:
        mismatched = read_frame(
            connection,
            "metering/instances_vs_orgs.sql",
            {"usage_date": usage_date, "part": shard.label},
        )
    return AssetCheckResult(
        check_name="instances_sum_to_orgs",
        passed=mismatched.empty,
        metadata={
            "usage_date": usage_date.isoformat(),
            "mismatched_rows": len(mismatched),
            "mismatched": ", ".join(
                f"{row.org_id}/{row.tier}" for row in mismatched.head(20).itertuples()
            )
            or "none",
        },
    )


def current_run_time() -> dt.datetime:
    """The run time that judges `future` rows (tests move it)."""
    return dt.datetime.now(dt.UTC)


def warm_great_expectations() -> None:
    """Import Great Expectations (seconds of pure Python, the run's largest fixed
    cost) on a thread while the extract waits on the database and native decoding;
    the checks' own import then finds it loaded."""
    threading.Thread(
        target=importlib.import_module, args=("great_expectations",), daemon=True
    ).start()


def billed_usage_checks(partitions_def: PartitionsDefinition) -> list[AssetCheckSpec]:
    """The checks of every billed_usage partition (a day, or a day's org shard)."""
    return [
        AssetCheckSpec(
            "runtime_identity",
            asset="billed_usage",
            partitions_def=partitions_def,
            blocking=True,
            description="runtime = idle + over continuous + over daily + billable",
        ),
        AssetCheckSpec(
            "billable_within_daily_limit",
            asset="billed_usage",
            partitions_def=partitions_def,
            blocking=True,
            description="no org is billed more than its daily limit on the day",
        ),
        AssetCheckSpec(
            "no_negative_seconds",
            asset="billed_usage",
            partitions_def=partitions_def,
            blocking=True,
            description="no seconds column of any row is negative",
        ),
        AssetCheckSpec(
            "great_expectations_extract",
            asset="billed_usage",
            partitions_def=partitions_def,
            blocking=True,
            description="Great Expectations on a spread sample of the heartbeats that reach "
            "billing: instance, time and org present, tier priced; instance ids unique",
        ),
        AssetCheckSpec(
            "great_expectations_output",
            asset="billed_usage",
            partitions_def=partitions_def,
            blocking=True,
            description="Great Expectations on the stored rows: one row per (org, tier), "
            "tier priced, org present, no negative seconds",
        ),
        AssetCheckSpec(
            "instances_sum_to_orgs",
            asset="billed_usage",
            partitions_def=partitions_def,
            blocking=True,
            description="billing.billed_usage_instances sums exactly to billing.billed_usage "
            "per (org, tier), every seconds column",
        ),
        AssetCheckSpec(
            "no_quarantined_heartbeats",
            asset="billed_usage",
            partitions_def=partitions_def,
            description="WARN when heartbeats were quarantined or a throttle setting was out "
            "of bounds (that org billed with the default)",
        ),
        AssetCheckSpec(
            "no_late_heartbeats",
            asset="billed_usage",
            partitions_def=partitions_def,
            description="WARN when heartbeats arrived for an earlier day (up to "
            f"{MeteringRules().late_lookback_days} days back) after it was billed; "
            "`tally late --run` bills them",
        ),
    ]


def meter_partition(
    context: AssetExecutionContext, postgres: PostgresResource, run_mode: RunMode
) -> MaterializeResult:
    """Meter one partition: a usage day, or one org shard of it (assets/shards.py)."""
    usage_date, shard = day_and_shard(context.partition_key, context.assets_def.partitions_def)
    known_tiers = pricing_or_fail().known_tiers  # a bad pricing file fails here, not retried
    run_time = current_run_time()
    rules = MeteringRules()
    warm_great_expectations()
    extract = extract_day(postgres.control_engine(), usage_date, run_time, rules, shard=shard)
    context.log.info(
        f"{usage_date} ({shard.label}): {len(extract.heartbeats):,} heartbeats extracted"
    )
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
    write_billed_usage(
        billing_engine,
        usage_date,
        result,
        run_time=run_time,
        rules=rules,
        # A report-only run pushes nothing: the day stays late until a real run.
        seen=None if run_mode.report_only else extract.seen,
        run_id=context.run.run_id,
        shard=shard,
    )
    stored = read_billed_usage(billing_engine, usage_date, shard)
    late = find_late_days(
        postgres.control_engine(),
        billing_engine,
        usage_date - dt.timedelta(days=rules.late_lookback_days),
        usage_date - dt.timedelta(days=1),
        run_time,
        part=shard.label if shard.sharded else None,
    )
    return MaterializeResult(
        metadata=materialization_metadata(usage_date, stored, extract, result),
        check_results=[
            *check_results(stored, extract, result, run_time, rules, known_tiers),
            instances_sum_check(billing_engine, usage_date, shard),
            late_heartbeats_check(late),
        ],
    )


def build_billed_usage(partitions_def: PartitionsDefinition = daily_partitions) -> AssetsDefinition:
    """The billed_usage asset over `partitions_def` (the days, or day × shard)."""

    @asset(
        name="billed_usage",
        partitions_def=partitions_def,
        group_name="metering",
        retry_policy=STEP_RETRY,
        check_specs=billed_usage_checks(partitions_def),
        description="Billed instance seconds per (org, day, tier) with throttle caps (DESIGN §3).",
    )
    def billed_usage(
        context: AssetExecutionContext, postgres: PostgresResource, run_mode: RunMode
    ) -> MaterializeResult:
        return meter_partition(context, postgres, run_mode)

    return billed_usage


billed_usage = build_billed_usage()
