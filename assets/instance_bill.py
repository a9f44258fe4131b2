"""One instance's bill for one day, explained: its sessions, idle cuts, continuous-cap
and daily-cap cuts, from the metering rules themselves (`clean_heartbeats`,
`meter_day`, `compute_billed_usage`) run on its org's heartbeats — the daily cap is
per org, so the other instances of the org take part. Pure: frames in, a bill out.
`tally org ORG --instance I --day D` (pipelines/org_report.py) prints it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from assets.heartbeat_cleaning import clean_heartbeats, instance_table
from assets.metering import compute_billed_usage, meter_day
from assets.metering_rules import SECONDS_COLUMNS, MeteringRules
from resources.calendar import day_bounds_epoch


@dataclass(frozen=True)
class Span:
    """[start, end) in epoch seconds; `seconds` is the part inside the usage day."""

    start: int
    end: int
    seconds: int


@dataclass(frozen=True)
class InstanceBill:
    instance_id: str
    org_id: str
    tier: str
    usage_date: dt.date
    sessions: list[Span]
    idle_cuts: list[Span]  # idle-paused: an idle stretch longer than the idle timeout
    continuous_cuts: list[Span]  # a run beyond the continuous limit
    daily_cuts: list[Span]  # within-limit seconds after the org's daily cap was reached
    seconds: dict[str, int]  # SECONDS_COLUMNS for the day, as billed_usage_instances
    limits: dict[str, int]  # continuous_limit_s, daily_limit_s, idle_timeout_s


def _spans(starts: np.ndarray, ends: np.ndarray, day_start: int, day_end: int) -> list[Span]:
    inside = np.maximum(0, np.minimum(ends, day_end) - np.maximum(starts, day_start))
    return [
        Span(int(start), int(end), int(seconds))
        for start, end, seconds in sorted(zip(starts, ends, inside, strict=True))
        if seconds > 0
    ]


def explain_instance(
    heartbeats: pd.DataFrame,
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    instance_id: str,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: MeteringRules,
    known_tiers: frozenset[str],
) -> InstanceBill:
    """`heartbeats`/`instances`/`throttle`: the org's, as the day's metering saw them
    (its look-back window). The totals are `compute_billed_usage`'s row for the
    instance; the spans are the same computation's intervals for that instance."""
    table = instance_table(instances, throttle, rules, known_tiers)
    position = int(np.flatnonzero(table.ids == instance_id)[0])
    clean, _, _ = clean_heartbeats(heartbeats, table, usage_date, run_time, rules)
    day = meter_day(clean, table, rules, usage_date)
    day_start, day_end = day_bounds_epoch(usage_date)

    def own(intervals) -> tuple[np.ndarray, np.ndarray]:
        mine = intervals.instance == position
        return intervals.start[mine], intervals.end[mine]

    within = own(day.within_in_day)
    billable = day.billable[day.within_in_day.instance == position]
    # Each within-limit run's billable seconds are its prefix; the rest is over the cap.
    daily = (within[0] + billable, within[1])
    result = compute_billed_usage(
        heartbeats, instances, throttle, usage_date, run_time, rules, known_tiers=known_tiers
    )
    row = result.instances[result.instances["instance_id"] == instance_id]
    seconds = {column: int(row[column].iloc[0]) if len(row) else 0 for column in SECONDS_COLUMNS}
    return InstanceBill(
        instance_id=instance_id,
        org_id=str(table.org[position]),
        tier=str(table.tier[position]),
        usage_date=usage_date,
        sessions=_spans(*own(day.sessions), day_start, day_end),
        idle_cuts=_spans(*own(day.pauses), day_start, day_end),
        continuous_cuts=_spans(*own(day.over_limit), day_start, day_end),
        daily_cuts=_spans(*daily, day_start, day_end),
        seconds=seconds,
        limits={
            "continuous_limit_s": int(table.continuous_limit[position]),
            "daily_limit_s": int(table.daily_limit[position]),
            "idle_timeout_s": int(table.idle_timeout[position]),
        },
    )
