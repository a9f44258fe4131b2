"""Slow, obviously-correct reference implementation of DESIGN §3 (billing rules).

Written directly from the spec, independently of `assets.metering`, to be compared
against the fast vectorised `compute_billed_usage`. Everything is plain Python:

1. clean row by row (floor to whole seconds, quarantine with the first matching
   reason, collapse duplicates with "active if any copy is active");
2. per instance, split into sessions (gap > G starts a new one) and label every
   second of each session that touches day D: paused / over_continuous / candidate;
3. per org, walk the seconds of day D in time order and, inside one second, the
   candidate instances in ascending instance_id, counting against the daily limit L;
4. count labels per (org, tier).

Only sessions touching day D are walked, but each of those from its first second,
so a run that started on an earlier day keeps its true start.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pandas as pd

DAY = 86_400
# The spec's default tiers (the default pricing's); callers may pass others.
DEFAULT_TIERS = frozenset({"small", "medium", "large", "gpu"})

PAUSED = "idle_paused"
OVER_CONTINUOUS = "over_continuous"
CANDIDATE = "candidate"  # before the daily cap: becomes billable or over_daily
BILLABLE = "billable"
OVER_DAILY = "over_daily"

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
QUARANTINE_COLUMNS = ["instance_id", "sent_at", "active", "received_at", "reason"]


@dataclass(frozen=True)
class ReferenceRules:
    """Same fields and defaults as `assets.metering.MeteringRules` (duck-typed)."""

    heartbeat_interval_s: int = 60
    max_gap_s: int = 300
    future_tolerance_s: int = 300
    default_continuous_limit_s: int = 8 * 3600
    default_daily_limit_s: int = 24 * 3600
    default_idle_timeout_s: int = 30 * 60


@dataclass(frozen=True)
class ReferenceRun:
    """One run (a session minus its idle-paused spans), for property checks."""

    instance_id: str
    org_id: str
    tier: str
    start: int  # epoch seconds, inclusive
    end: int  # epoch seconds, exclusive
    continuous_limit: int
    not_over_continuous_in_day: int  # candidate seconds of this run inside day D


@dataclass
class ReferenceResult:
    billed: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates_collapsed: int
    # (instance_id, epoch second in D) -> PAUSED / OVER_CONTINUOUS / BILLABLE / OVER_DAILY
    labels: dict[tuple[str, int], str]
    runs: list[ReferenceRun]
    daily_limit_by_org: dict[str, int]


def to_seconds(value: Any) -> int | None:
    """A tz-aware timestamp floored to whole epoch seconds; None for null."""
    if value is None or pd.isna(value):
        return None
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        raise ValueError(f"naive timestamp {value!r}")
    # timetuple() drops the sub-second part: a floor for every time after 1970.
    return calendar.timegm(ts.tz_convert("UTC").timetuple())


def day_bounds(usage_date: dt.date) -> tuple[int, int]:
    start = calendar.timegm(usage_date.timetuple())
    return start, start + DAY


def _opt_str(value: Any) -> str | None:
    if value is None or pd.isna(value):
        return None
    return str(value)


def _is_active(value: Any) -> bool:
    """Null `active` counts as active (DESIGN §3.1)."""
    if value is None or pd.isna(value):
        return True
    return bool(value)


def split_sessions(beats: list[tuple[int, bool]], max_gap: int) -> list[list[tuple[int, bool]]]:
    """Sorted, deduplicated beats -> sessions; a gap > max_gap (strictly) starts a new one."""
    sessions: list[list[tuple[int, bool]]] = []
    for t, active in beats:
        if sessions and t - sessions[-1][-1][0] <= max_gap:
            sessions[-1].append((t, active))
        else:
            sessions.append([(t, active)])
    return sessions


def paused_seconds(session: list[tuple[int, bool]], end: int, idle_timeout: int) -> set[int]:
    """Every second of the session that is idle-paused (DESIGN §3.3)."""
    paused: set[int] = set()
    for i, (a, active) in enumerate(session):
        if active:
            continue
        if i > 0 and not session[i - 1][1]:
            continue  # not the first heartbeat of its idle stretch
        b = end  # the session's end, unless an active heartbeat comes first
        for t, later_active in session[i + 1 :]:
            if later_active:
                b = t
                break
        if b - a > idle_timeout:
            paused.update(range(a + idle_timeout, b))
    return paused


def reference_billed_usage(
    heartbeats: pd.DataFrame,
    instances: pd.DataFrame,
    throttle: pd.DataFrame,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: Any = None,
    *,
    known_tiers: frozenset[str] = DEFAULT_TIERS,
) -> ReferenceResult:
    rules = ReferenceRules() if rules is None else rules
    H = rules.heartbeat_interval_s
    G = rules.max_gap_s
    assert G >= H, "with G < H sessions of one instance could overlap; not supported"
    d0, d1 = day_bounds(usage_date)
    run_s = to_seconds(run_time)
    assert run_s is not None

    # ---- lookups -------------------------------------------------------------
    instance_info: dict[str, tuple[str, str | None, int | None]] = {}
    for row in instances.itertuples(index=False):
        instance_info[str(row.instance_id)] = (
            str(row.org_id),
            _opt_str(row.tier),
            to_seconds(row.stopped_at),
        )
    limits_by_org: dict[str, tuple[int, int, int]] = {}
    for row in throttle.itertuples(index=False):
        limits_by_org[str(row.org_id)] = (
            int(row.continuous_limit_s),
            int(row.daily_limit_s),
            int(row.idle_timeout_s),
        )
    default_limits = (
        rules.default_continuous_limit_s,
        rules.default_daily_limit_s,
        rules.default_idle_timeout_s,
    )

    def limits(org: str) -> tuple[int, int, int]:
        return limits_by_org.get(org, default_limits)

    # ---- 1. clean ------------------------------------------------------------
    quarantined: list[dict[str, Any]] = []
    copies: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for row in heartbeats.itertuples(index=False):
        iid = _opt_str(row.instance_id)
        sent = to_seconds(row.sent_at)
        received = to_seconds(row.received_at)
        info = instance_info.get(iid) if iid is not None else None
        if iid is None:
            reason = "null_instance_id"
        elif sent is None:
            reason = "null_sent_at"
        elif info is None:
            reason = "unknown_instance"
        elif info[1] not in known_tiers:
            reason = "unknown_tier"
        elif sent > run_s + rules.future_tolerance_s:
            reason = "future"
        elif info[2] is not None and sent >= info[2]:
            reason = "after_stop"
        else:
            reason = None
        if reason is None:
            assert iid is not None and sent is not None
            copies[(iid, sent)].append(_is_active(row.active))
            continue
        if sent is None or reason == "future":
            belongs = received is not None and d0 <= received < d1
        else:
            belongs = d0 <= sent < d1
        if belongs:
            quarantined.append(
                {
                    "instance_id": iid,
                    "sent_at": row.sent_at,
                    "active": row.active,
                    "received_at": row.received_at,
                    "reason": reason,
                }
            )

    duplicates_collapsed = 0
    beats_by_instance: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for (iid, sent), actives in copies.items():
        if d0 <= sent < d1:
            duplicates_collapsed += len(actives) - 1
        beats_by_instance[iid].append((sent, any(actives)))

    # ---- 2-4. sessions, idle pause, runs: label each second --------------------
    labels: dict[tuple[str, int], str] = {}
    runs: list[ReferenceRun] = []
    for iid, beats in beats_by_instance.items():
        org, tier, _stopped = instance_info[iid]
        assert tier is not None
        continuous_limit, _daily, idle_timeout = limits(org)
        for session in split_sessions(sorted(beats), G):
            first = session[0][0]
            end = session[-1][0] + H  # the session covers [first, last + H)
            if end <= d0 or first >= d1:
                continue  # does not touch day D
            paused = paused_seconds(session, end, idle_timeout)
            run_start: int | None = None
            run_in_day = 0
            for sec in range(first, end + 1):
                if sec == end or sec in paused:
                    if run_start is not None:  # the run [run_start, sec) ends here
                        runs.append(
                            ReferenceRun(
                                iid, org, tier, run_start, sec, continuous_limit, run_in_day
                            )
                        )
                    run_start, run_in_day = None, 0
                    if sec == end:
                        break
                    label = PAUSED
                else:
                    if run_start is None:
                        run_start = sec
                    if sec - run_start >= continuous_limit:  # [s + limit, e) is over
                        label = OVER_CONTINUOUS
                    else:
                        label = CANDIDATE
                        if d0 <= sec < d1:
                            run_in_day += 1
                if d0 <= sec < d1:
                    labels[(iid, sec)] = label

    # ---- 6. daily cap per org -------------------------------------------------
    org_of = {iid: info[0] for iid, info in instance_info.items()}
    candidates: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (iid, sec), label in labels.items():
        if label == CANDIDATE:
            candidates[org_of[iid]][sec].append(iid)
    daily_limit_by_org: dict[str, int] = {}
    for org, by_second in candidates.items():
        daily_limit = limits(org)[1]
        daily_limit_by_org[org] = daily_limit
        billed_so_far = 0
        for sec in sorted(by_second):
            for iid in sorted(by_second[sec]):  # Python str order == byte order here
                if billed_so_far < daily_limit:
                    labels[(iid, sec)] = BILLABLE
                    billed_so_far += 1
                else:
                    labels[(iid, sec)] = OVER_DAILY

    # ---- 7. aggregate per (org, tier) -------------------------------------------
    column_of = {
        PAUSED: "idle_paused_seconds",
        OVER_CONTINUOUS: "over_continuous_seconds",
        OVER_DAILY: "over_daily_seconds",
        BILLABLE: "billable_seconds",
    }
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for (iid, _sec), label in labels.items():
        org, tier, _ = instance_info[iid]
        assert tier is not None
        key = (org, tier)
        if key not in totals:
            totals[key] = {name: 0 for name in BILLED_COLUMNS[3:]}
        totals[key]["runtime_seconds"] += 1
        totals[key][column_of[label]] += 1
    rows = [
        {"org_id": org, "usage_date": usage_date, "tier": tier, **counts}
        for (org, tier), counts in sorted(totals.items())
        if counts["runtime_seconds"] > 0
    ]
    billed = pd.DataFrame(rows, columns=BILLED_COLUMNS)
    for name in BILLED_COLUMNS[3:]:
        billed[name] = billed[name].astype("int64")
    quarantine = pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS)
    return ReferenceResult(
        billed=billed,
        quarantine=quarantine,
        duplicates_collapsed=duplicates_collapsed,
        labels=labels,
        runs=runs,
        daily_limit_by_org=daily_limit_by_org,
    )
