"""Edge cases of the billing rules (DESIGN §3), with expected numbers worked out by hand.

Every test runs twice: against the fast `assets.metering.compute_billed_usage` and
against the slow reference in `tests/metering_reference.py`; both must match the hand
numbers in the comments. Unless a test says otherwise: H = 60 s, G = 300 s, continuous
limit 8 h, daily limit 24 h, idle timeout 30 min; D = 2024-03-10; run time D+1 02:00.

Expected rows are (runtime, idle_paused, over_continuous, over_daily, billable).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

try:
    from tests.metering_reference import (
        QUARANTINE_COLUMNS,
        ReferenceRules,
        reference_billed_usage,
        to_seconds,
    )
except ImportError:  # tests/ on sys.path instead of the project root
    from metering_reference import (  # type: ignore[no-redef]
        QUARANTINE_COLUMNS,
        ReferenceRules,
        reference_billed_usage,
        to_seconds,
    )

D = dt.date(2024, 3, 10)
RUN_TIME = dt.datetime(2024, 3, 11, 2, 0, tzinfo=dt.UTC)
SECONDS = [
    "runtime_seconds",
    "idle_paused_seconds",
    "over_continuous_seconds",
    "over_daily_seconds",
    "billable_seconds",
]
QUARANTINE_REASONS = {
    "null_instance_id",
    "null_sent_at",
    "unknown_instance",
    "unknown_tier",
    "future",
    "after_stop",
}


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------


def at(hms: str, day: int = 0) -> pd.Timestamp:
    """'HH:MM:SS[.ffffff]' UTC on day D + `day`."""
    return pd.Timestamp(f"{D + dt.timedelta(days=day)} {hms}", tz="UTC")


def beat(iid: str | None, sent: Any, active: Any = True, received: Any = None) -> dict:
    if received is None:
        received = (sent if sent is not None else at("12:00:00")) + pd.Timedelta(seconds=1)
    return {"instance_id": iid, "sent_at": sent, "active": active, "received_at": received}


def every(iid: str, start: pd.Timestamp, count: int, step: int = 60, active: Any = True):
    """`count` heartbeats of `iid`, `step` seconds apart, from `start`."""
    return [beat(iid, start + pd.Timedelta(seconds=step * k), active) for k in range(count)]


def pattern(iid: str, start: pd.Timestamp, flags: str, step: int = 60) -> list[dict]:
    """One heartbeat per character, `step` s apart: 'A' active, 'I' inactive, 'N' null."""
    value = {"A": True, "I": False, "N": None}
    return [
        beat(iid, start + pd.Timedelta(seconds=step * k), value[flag])
        for k, flag in enumerate(flags)
    ]


def heartbeats_frame(rows: list[dict], active_dtype: str = "object") -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["instance_id", "sent_at", "active", "received_at"])
    frame["instance_id"] = frame["instance_id"].astype(object)
    frame["sent_at"] = pd.to_datetime(frame["sent_at"], utc=True)
    frame["received_at"] = pd.to_datetime(frame["received_at"], utc=True)
    frame["active"] = frame["active"].astype(active_dtype)
    return frame


def instances_frame(*rows: tuple) -> pd.DataFrame:
    """Rows (instance_id, org_id, tier) or (instance_id, org_id, tier, stopped_at)."""
    records = []
    for row in rows:
        iid, org, tier, *rest = row
        stopped = rest[0] if rest else None
        records.append(
            {
                "instance_id": iid,
                "org_id": org,
                "tier": tier,
                "status": "stopped" if stopped is not None else "running",
                "stopped_at": stopped,
            }
        )
    frame = pd.DataFrame(records, columns=["instance_id", "org_id", "tier", "status", "stopped_at"])
    frame["stopped_at"] = pd.to_datetime(frame["stopped_at"], utc=True)
    return frame


def throttle_frame(*rows: tuple[str, int, int, int]) -> pd.DataFrame:
    """Rows (org_id, continuous_limit_s, daily_limit_s, idle_timeout_s)."""
    frame = pd.DataFrame(
        rows, columns=["org_id", "continuous_limit_s", "daily_limit_s", "idle_timeout_s"]
    )
    return frame.astype(
        {"continuous_limit_s": "int64", "daily_limit_s": "int64", "idle_timeout_s": "int64"}
    )


def throttle(org: str, cont: int = 8 * 3600, daily: int = 24 * 3600, idle: int = 1800):
    return throttle_frame((org, cont, daily, idle))


# ---------------------------------------------------------------------------
# the two implementations
# ---------------------------------------------------------------------------

Compute = Callable[..., Any]


@pytest.fixture(params=["reference", "fast"])
def compute(request) -> Compute:
    """compute(heartbeat rows | frame, instances, throttle=None, usage_date=D,
    run_time=RUN_TIME, **rule fields) with the implementation under test."""
    if request.param == "reference":
        make_rules, function = ReferenceRules, reference_billed_usage
    else:
        from assets.metering import MeteringRules, compute_billed_usage

        make_rules, function = MeteringRules, compute_billed_usage

    def run(
        heartbeats,
        instances: pd.DataFrame,
        throttle: pd.DataFrame | None = None,
        usage_date: dt.date = D,
        run_time: dt.datetime = RUN_TIME,
        **rule_fields,
    ):
        if not isinstance(heartbeats, pd.DataFrame):
            heartbeats = heartbeats_frame(heartbeats)
        if throttle is None:
            throttle = throttle_frame()
        result = function(
            heartbeats.copy(),
            instances.copy(),
            throttle.copy(),
            usage_date,
            run_time,
            make_rules(**rule_fields),
        )
        check_shape(result, usage_date)
        return result

    return run


def check_shape(result, usage_date: dt.date) -> None:
    billed = result.billed
    assert list(billed.columns[:8]) == [
        "org_id",
        "usage_date",
        "tier",
        *SECONDS,
    ]
    for column in SECONDS:
        assert billed[column].dtype == "int64", column
    keys = list(zip(billed["org_id"], billed["tier"], strict=True))
    assert keys == sorted(keys), "rows sorted by (org_id, tier) in byte order"
    assert len(set(keys)) == len(keys)
    for row in billed.itertuples(index=False):
        assert pd.Timestamp(row.usage_date).date() == usage_date
        assert row.runtime_seconds > 0
        values = [getattr(row, column) for column in SECONDS]
        assert min(values) >= 0
        # DESIGN §3.7: runtime = idle_paused + over_continuous + over_daily + billable
        assert row.runtime_seconds == sum(values[1:])
    assert set(QUARANTINE_COLUMNS) <= set(result.quarantine.columns)
    assert set(result.quarantine["reason"]) <= QUARANTINE_REASONS
    assert int(result.duplicates_collapsed) >= 0


def billed(result) -> dict[tuple[str, str], tuple[int, ...]]:
    return {
        (row.org_id, row.tier): tuple(int(getattr(row, column)) for column in SECONDS)
        for row in result.billed.itertuples(index=False)
    }


def quarantined(result) -> Counter:
    """Multiset of (instance_id, floored sent_at epoch seconds or None, reason)."""
    return Counter(
        (None if pd.isna(row.instance_id) else row.instance_id, to_seconds(row.sent_at), row.reason)
        for row in result.quarantine.itertuples(index=False)
    )


def sec(ts: pd.Timestamp) -> int:
    value = to_seconds(ts)
    assert value is not None
    return value


ONE = instances_frame(("i-1", "org-a", "small"))


# ---------------------------------------------------------------------------
# 3.2 sessions
# ---------------------------------------------------------------------------


def test_gap_of_exactly_max_gap_continues_the_session(compute):
    # 10:00:00 and 10:05:00: gap 300 = G, not > G -> one session [10:00, 10:06) = 360 s.
    result = compute([beat("i-1", at("10:00:00")), beat("i-1", at("10:05:00"))], ONE)
    assert billed(result) == {("org-a", "small"): (360, 0, 0, 0, 360)}


def test_gap_one_second_over_max_gap_starts_a_new_session(compute):
    # 10:00:00 and 10:05:01: gap 301 > G -> [10:00:00, 10:01:00) + [10:05:01, 10:06:01) = 120 s.
    result = compute([beat("i-1", at("10:00:00")), beat("i-1", at("10:05:01"))], ONE)
    assert billed(result) == {("org-a", "small"): (120, 0, 0, 0, 120)}


def test_session_uses_the_rules_heartbeat_interval_and_gap(compute):
    # H = 10, G = 30: 10:00:00, 10:00:30 (gap 30, joined), 10:01:01 (gap 31, new session):
    # [10:00:00, 10:00:40) = 40 s + [10:01:01, 10:01:11) = 10 s -> 50 s.
    rows = [beat("i-1", at(t)) for t in ("10:00:00", "10:00:30", "10:01:01")]
    result = compute(rows, ONE, heartbeat_interval_s=10, max_gap_s=30)
    assert billed(result) == {("org-a", "small"): (50, 0, 0, 0, 50)}


def test_single_heartbeat_covers_one_interval(compute):
    # [10:00:00, 10:01:00) = 60 s.
    result = compute([beat("i-1", at("10:00:00"))], ONE)
    assert billed(result) == {("org-a", "small"): (60, 0, 0, 0, 60)}


# ---------------------------------------------------------------------------
# 3.3 idle pause (idle timeout 120 s via throttle unless stated)
# ---------------------------------------------------------------------------

IDLE_120 = throttle("org-a", idle=120)


def test_idle_of_exactly_the_timeout_is_not_paused(compute):
    # A 10:00, I 10:01, I 10:02, A 10:03 -> stretch a = 10:01, b = 10:03: b - a = 120,
    # not > 120 -> nothing paused. Session [10:00, 10:04) = 240 s.
    result = compute(pattern("i-1", at("10:00:00"), "AIIA"), ONE, IDLE_120)
    assert billed(result) == {("org-a", "small"): (240, 0, 0, 0, 240)}


def test_idle_one_second_over_the_timeout_pauses_one_second(compute):
    # A 10:00:00, I 10:01:00, I 10:02:00, A 10:03:01 -> a = 10:01:00, b = 10:03:01, b - a = 121
    # -> paused [10:03:00, 10:03:01) = 1 s. Session [10:00:00, 10:04:01) = 241 s.
    rows = pattern("i-1", at("10:00:00"), "AII") + [beat("i-1", at("10:03:01"), True)]
    result = compute(rows, ONE, IDLE_120)
    assert billed(result) == {("org-a", "small"): (241, 1, 0, 0, 240)}


def test_idle_stretch_running_to_the_end_of_the_session(compute):
    # A 10:00, I 10:01, I 10:02, I 10:03; session end 10:04 -> a = 10:01, b = 10:04 (180 > 120)
    # -> paused [10:03, 10:04) = 60 s of the 240 s session.
    result = compute(pattern("i-1", at("10:00:00"), "AIII"), ONE, IDLE_120)
    assert billed(result) == {("org-a", "small"): (240, 60, 0, 0, 180)}


def test_idle_stretch_at_the_start_of_the_session(compute):
    # I 10:00, I 10:01, I 10:02, A 10:03, A 10:04 -> a = 10:00, b = 10:03 (180 > 120)
    # -> paused [10:02, 10:03) = 60 s. Session [10:00, 10:05) = 300 s.
    result = compute(pattern("i-1", at("10:00:00"), "IIIAA"), ONE, IDLE_120)
    assert billed(result) == {("org-a", "small"): (300, 60, 0, 0, 240)}


def test_two_idle_stretches_in_one_session(compute):
    # A I I I A I I A (10:00 .. 10:07), end 10:08 = 480 s.
    # Stretch 1: a = 10:01, b = 10:04 (180 > 120) -> paused [10:03, 10:04) = 60.
    # Stretch 2: a = 10:05, b = 10:07 (120, not > 120) -> nothing.
    result = compute(pattern("i-1", at("10:00:00"), "AIIIAIIA"), ONE, IDLE_120)
    assert billed(result) == {("org-a", "small"): (480, 60, 0, 0, 420)}


def test_default_idle_timeout_of_30_minutes(compute):
    # Default rules. A 10:00, then inactive every minute 10:01 .. 10:40; end 10:41 = 2460 s.
    # a = 10:01, b = 10:41: 2400 > 1800 -> paused [10:31, 10:41) = 600 s.
    rows = pattern("i-1", at("10:00:00"), "A" + "I" * 40)
    result = compute(rows, ONE)
    assert billed(result) == {("org-a", "small"): (2460, 600, 0, 0, 1860)}


def test_idle_stretch_crossing_midnight(compute):
    # I D 23:57, I 23:59, I D+1 00:01, A 00:03 (gaps 120) -> session [23:57, D+1 00:04).
    # a = 23:57, b = 00:03 (360 > 120) -> paused [23:59, D+1 00:03).
    # Day D: runtime [23:57, 24:00) = 180, paused [23:59, 24:00) = 60.
    # Day D+1: runtime [00:00, 00:04) = 240, paused [00:00, 00:03) = 180.
    rows = pattern("i-1", at("23:57:00"), "IIIA", step=120)
    assert billed(compute(rows, ONE, IDLE_120)) == {("org-a", "small"): (180, 60, 0, 0, 120)}
    next_day = compute(rows, ONE, IDLE_120, usage_date=D + dt.timedelta(days=1))
    assert billed(next_day) == {("org-a", "small"): (240, 180, 0, 0, 60)}


# ---------------------------------------------------------------------------
# 3.4 runs and the continuous limit
# ---------------------------------------------------------------------------


def test_continuous_limit_exactly_vs_one_second_more(compute):
    # Continuous limit 120 s. i-1: 10:00:00, 10:01:00 -> run [10:00, 10:02) = 120, not > 120.
    # i-2: 10:00:00, 10:01:01 -> run [10:00:00, 10:02:01) = 121 -> over [10:02:00, 10:02:01) = 1.
    instances = instances_frame(("i-1", "org-a", "small"), ("i-2", "org-a", "medium"))
    rows = [
        beat("i-1", at("10:00:00")),
        beat("i-1", at("10:01:00")),
        beat("i-2", at("10:00:00")),
        beat("i-2", at("10:01:01")),
    ]
    result = compute(rows, instances, throttle("org-a", cont=120))
    assert billed(result) == {
        ("org-a", "medium"): (121, 0, 1, 0, 120),
        ("org-a", "small"): (120, 0, 0, 0, 120),
    }


def test_idle_pause_splits_the_session_into_runs(compute):
    # Continuous limit 300, idle 120. A A A I I I A A A A A A (10:00 .. 10:11), end 10:12 = 720.
    # Idle a = 10:03, b = 10:06 (180 > 120) -> paused [10:05, 10:06) = 60.
    # Runs [10:00, 10:05) = 300 (not > 300) and [10:06, 10:12) = 360 -> over [10:11, 10:12) = 60.
    rows = pattern("i-1", at("10:00:00"), "AAAIIIAAAAAA")
    result = compute(rows, ONE, throttle("org-a", cont=300, idle=120))
    assert billed(result) == {("org-a", "small"): (720, 60, 60, 0, 600)}


def test_short_idle_stretch_does_not_split_the_run(compute):
    # Continuous limit 300, idle 120. A A I I A A A (10:00 .. 10:06), end 10:07 = 420.
    # Idle a = 10:02, b = 10:04 (120, not > 120) -> no pause; one run of 420 s
    # -> over [10:05, 10:07) = 120.
    rows = pattern("i-1", at("10:00:00"), "AAIIAAA")
    result = compute(rows, ONE, throttle("org-a", cont=300, idle=120))
    assert billed(result) == {("org-a", "small"): (420, 0, 120, 0, 300)}


def test_run_crossing_midnight_hits_the_limit_after_midnight(compute):
    # Continuous limit 1 h. Active every minute D-1 23:30 .. D 00:45 (76 heartbeats);
    # session [D-1 23:30, D 00:46), one run from 23:30 -> over from D 00:30.
    # Day D: runtime [00:00, 00:46) = 2760, over [00:30, 00:46) = 960, billable 1800.
    # Day D-1: runtime [23:30, 24:00) = 1800, all billable.
    rows = every("i-1", at("23:30:00", day=-1), 76)
    limits = throttle("org-a", cont=3600)
    assert billed(compute(rows, ONE, limits)) == {("org-a", "small"): (2760, 0, 960, 0, 1800)}
    previous = compute(rows, ONE, limits, usage_date=D - dt.timedelta(days=1))
    assert billed(previous) == {("org-a", "small"): (1800, 0, 0, 0, 1800)}


def test_run_crossing_midnight_hit_the_limit_before_midnight(compute):
    # Continuous limit 10 min. Active every minute D-1 23:40 .. D 00:10 (31 heartbeats);
    # session [D-1 23:40, D 00:11), over from D-1 23:50.
    # Day D: runtime [00:00, 00:11) = 660, all over the continuous limit.
    # Day D-1: runtime 1200 = 600 billable + 600 over.
    rows = every("i-1", at("23:40:00", day=-1), 31)
    limits = throttle("org-a", cont=600)
    assert billed(compute(rows, ONE, limits)) == {("org-a", "small"): (660, 0, 660, 0, 0)}
    previous = compute(rows, ONE, limits, usage_date=D - dt.timedelta(days=1))
    assert billed(previous) == {("org-a", "small"): (1200, 0, 600, 0, 600)}


def test_default_continuous_limit_of_8_hours_across_midnight(compute):
    # Default rules. Active every minute D-1 20:00 .. D+1 00:02 (28 h + 2 min -> 1683 beats).
    # One run from D-1 20:00 -> over from D 04:00. Day D: runtime 86400, billable
    # [00:00, 04:00) = 14400, over_continuous 72000.
    rows = every("i-1", at("20:00:00", day=-1), 28 * 60 + 3)
    assert billed(compute(rows, ONE)) == {("org-a", "small"): (86400, 0, 72000, 0, 14400)}


# ---------------------------------------------------------------------------
# 3.5 day split
# ---------------------------------------------------------------------------


def test_next_day_heartbeat_extends_the_session_to_midnight(compute):
    # D 23:58:30 and D+1 00:03:00 (gap 270) -> session [23:58:30, D+1 00:04:00).
    # Day D: [23:58:30, 24:00) = 90 s. Day D+1: [00:00, 00:04) = 240 s.
    rows = [beat("i-1", at("23:58:30")), beat("i-1", at("00:03:00", day=1))]
    assert billed(compute(rows, ONE)) == {("org-a", "small"): (90, 0, 0, 0, 90)}
    next_day = compute(rows, ONE, usage_date=D + dt.timedelta(days=1))
    assert billed(next_day) == {("org-a", "small"): (240, 0, 0, 0, 240)}


def test_no_runtime_on_the_day_gives_no_rows(compute):
    # Heartbeats only on D-1 (ending 10:01 on D-1) -> nothing on D.
    result = compute(every("i-1", at("10:00:00", day=-1), 2), ONE)
    assert billed(result) == {}
    assert len(result.billed) == 0
    assert int(result.duplicates_collapsed) == 0


def test_empty_inputs(compute):
    result = compute([], ONE)
    assert billed(result) == {}
    assert len(result.quarantine) == 0
    assert int(result.duplicates_collapsed) == 0


# ---------------------------------------------------------------------------
# 3.6 daily cap
# ---------------------------------------------------------------------------

THREE = instances_frame(
    ("i-a", "org-a", "medium"), ("i-B", "org-a", "small"), ("i-c", "org-a", "large")
)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        # Each instance covers [10:00:00, 10:01:00): C(10:00:00 + k) = 3k. Byte order of the
        # ids: "i-B" (0x42) < "i-a" (0x61) < "i-c".
        # L = 100: T = 10:00:33 (C = 99 <= 100 < 102); L - C(T) = 1 -> only i-B billed in T.
        # i-B 34 billed, i-a 33, i-c 33 (= 100); the rest of each 60 s is over the cap.
        (100, {"small": (60, 0, 0, 26, 34), "medium": (60, 0, 0, 27, 33),
               "large": (60, 0, 0, 27, 33)}),
        # L = 101: same T, L - C(T) = 2 -> i-B and i-a billed in T: 34, 34, 33 (= 101).
        (101, {"small": (60, 0, 0, 26, 34), "medium": (60, 0, 0, 26, 34),
               "large": (60, 0, 0, 27, 33)}),
        # L = 102: T = 10:00:34 (C = 102 <= 102 < 105); L - C(T) = 0 -> 34 each (= 102).
        (102, {"small": (60, 0, 0, 26, 34), "medium": (60, 0, 0, 26, 34),
               "large": (60, 0, 0, 26, 34)}),
        # L = 180 = C(end of day): all billed.
        (180, {"small": (60, 0, 0, 0, 60), "medium": (60, 0, 0, 0, 60),
               "large": (60, 0, 0, 0, 60)}),
        # L = 0: everything over the cap.
        (0, {"small": (60, 0, 0, 60, 0), "medium": (60, 0, 0, 60, 0),
             "large": (60, 0, 0, 60, 0)}),
    ],
)  # fmt: skip
def test_daily_cap_splits_the_crossing_second_by_instance_id(compute, limit, expected):
    rows = [beat(iid, at("10:00:00")) for iid in ("i-c", "i-a", "i-B")]
    result = compute(rows, THREE, throttle("org-a", daily=limit))
    assert billed(result) == {("org-a", tier): values for tier, values in expected.items()}


def test_daily_cap_counts_only_instances_running_in_the_crossing_second(compute):
    # i-a (small) covers [10:00:00, 10:01:00), i-B (medium) [10:00:30, 10:01:30); L = 61.
    # C(10:00:30) = 30, then +2 a second: C(10:00:45) = 60 <= 61 < 62 -> T = 10:00:45,
    # L - C(T) = 1 -> i-B ("i-B" < "i-a") is billed in T.
    # i-a: [10:00:00, 10:00:45) = 45 billed, 15 over. i-B: [10:00:30, 10:00:46) = 16, 44 over.
    instances = instances_frame(("i-a", "org-a", "small"), ("i-B", "org-a", "medium"))
    rows = [beat("i-a", at("10:00:00")), beat("i-B", at("10:00:30"))]
    result = compute(rows, instances, throttle("org-a", daily=61))
    assert billed(result) == {
        ("org-a", "medium"): (60, 0, 0, 44, 16),
        ("org-a", "small"): (60, 0, 0, 15, 45),
    }


def test_daily_cap_is_per_org_across_tiers(compute):
    # org-a, L = 90: i-1 (small) [10:00, 10:01) then i-2 (gpu) [10:01, 10:02).
    # C(10:01:30) = 90 -> T = 10:01:30, L - C(T) = 0: i-2 billed [10:01:00, 10:01:30) = 30.
    instances = instances_frame(("i-1", "org-a", "small"), ("i-2", "org-a", "gpu"))
    rows = [beat("i-1", at("10:00:00")), beat("i-2", at("10:01:00"))]
    result = compute(rows, instances, throttle("org-a", daily=90))
    assert billed(result) == {
        ("org-a", "gpu"): (60, 0, 0, 30, 30),
        ("org-a", "small"): (60, 0, 0, 0, 60),
    }


def test_daily_cap_counts_only_seconds_not_paused_or_over_continuous(compute):
    # Continuous limit 60, L = 50. 10:00, 10:01 -> run [10:00, 10:02) = 120:
    # over_continuous [10:01, 10:02) = 60; the other 60 s compete for L = 50 -> 50 + 10 over.
    result = compute(every("i-1", at("10:00:00"), 2), ONE, throttle("org-a", cont=60, daily=50))
    assert billed(result) == {("org-a", "small"): (120, 0, 60, 10, 50)}


def test_default_daily_limit_of_24_hours(compute):
    # Continuous limit 48 h so only the daily cap bites. i-a and i-b active every minute
    # 00:00 .. 23:59 of D: each covers the whole day (86400 s). C(t) = 2t, L = 86400
    # -> T = 12:00:00 with L - C(T) = 0: each billed 43200, 43200 over the cap.
    instances = instances_frame(("i-a", "org-a", "small"), ("i-b", "org-a", "medium"))
    rows = every("i-a", at("00:00:00"), 1440) + every("i-b", at("00:00:00"), 1440)
    result = compute(rows, instances, throttle("org-a", cont=48 * 3600))
    assert billed(result) == {
        ("org-a", "medium"): (86400, 0, 0, 43200, 43200),
        ("org-a", "small"): (86400, 0, 0, 43200, 43200),
    }


# ---------------------------------------------------------------------------
# per-org throttle settings
# ---------------------------------------------------------------------------


def test_throttle_limits_differ_per_org(compute):
    # Each org's instance: 10:00, 10:01 -> 120 s.
    # org-a (continuous 90, daily 100): over_continuous 30, 90 <= 100 billed.
    # org-b (continuous 8 h, daily 50): 50 billed, 70 over the cap.
    # org-c (no throttle row -> defaults): 120 billed.
    instances = instances_frame(
        ("i-1", "org-a", "small"), ("i-2", "org-b", "small"), ("i-3", "org-c", "small")
    )
    rows = [b for iid in ("i-1", "i-2", "i-3") for b in every(iid, at("10:00:00"), 2)]
    limits = throttle_frame(("org-a", 90, 100, 1800), ("org-b", 8 * 3600, 50, 1800))
    assert billed(compute(rows, instances, limits)) == {
        ("org-a", "small"): (120, 0, 30, 0, 90),
        ("org-b", "small"): (120, 0, 0, 70, 50),
        ("org-c", "small"): (120, 0, 0, 0, 120),
    }


def test_idle_timeout_differs_per_org(compute):
    # A 10:00, I 10:01, I 10:02, A 10:03 -> a = 10:01, b = 10:03 (120 s), session 240 s.
    # org-a idle 60: paused [10:02, 10:03) = 60. org-b idle 600: nothing paused.
    instances = instances_frame(("i-1", "org-a", "gpu"), ("i-2", "org-b", "gpu"))
    rows = pattern("i-1", at("10:00:00"), "AIIA") + pattern("i-2", at("10:00:00"), "AIIA")
    limits = throttle_frame(("org-a", 8 * 3600, 86400, 60), ("org-b", 8 * 3600, 86400, 600))
    assert billed(compute(rows, instances, limits)) == {
        ("org-a", "gpu"): (240, 60, 0, 0, 180),
        ("org-b", "gpu"): (240, 0, 0, 0, 240),
    }


# ---------------------------------------------------------------------------
# 3.1 cleaning: duplicates, null active, sub-second timestamps, quarantine
# ---------------------------------------------------------------------------


def test_duplicates_with_conflicting_active_collapse_to_active(compute):
    # Idle 60. 10:00 A; 10:01 I+A; 10:02 I; 10:03 I+I; 10:04 A x3
    # -> A A I I A: a = 10:02, b = 10:04 (120 > 60) -> paused [10:03, 10:04) = 60 of 300.
    # (Were 10:01 inactive: a = 10:01 and 120 s paused.) Extra copies on D: 1 + 1 + 2 = 4;
    # the pairs on D-1 12:00 and D+1 00:30 are not D's.
    rows = [
        beat("i-1", at("10:00:00"), True),
        beat("i-1", at("10:01:00"), False),
        beat("i-1", at("10:01:00"), True),
        beat("i-1", at("10:02:00"), False),
        beat("i-1", at("10:03:00"), False),
        beat("i-1", at("10:03:00"), False),
        *[beat("i-1", at("10:04:00"), True) for _ in range(3)],
        *[beat("i-1", at("12:00:00", day=-1), True) for _ in range(2)],
        *[beat("i-1", at("00:30:00", day=1), False) for _ in range(2)],
    ]
    result = compute(rows, ONE, throttle("org-a", idle=60))
    assert billed(result) == {("org-a", "small"): (300, 60, 0, 0, 240)}
    assert int(result.duplicates_collapsed) == 4
    assert len(result.quarantine) == 0


@pytest.mark.parametrize("active_dtype", ["object", "boolean"])
def test_null_active_counts_as_active(compute, active_dtype):
    # Idle 60. i-1: A 10:00, null 10:01, I 10:02, I 10:03, A 10:04 -> the null is active:
    # a = 10:02, b = 10:04 -> paused [10:03, 10:04) = 60 of 300 s.
    # i-2: the same, but 10:01 sent twice (inactive + null) -> active: the same numbers.
    instances = instances_frame(("i-1", "org-a", "small"), ("i-2", "org-a", "medium"))
    rows = pattern("i-1", at("10:00:00"), "ANIIA") + pattern("i-2", at("10:00:00"), "AIIIA")
    rows.append(beat("i-2", at("10:01:00"), None))
    result = compute(heartbeats_frame(rows, active_dtype), instances, throttle("org-a", idle=60))
    assert billed(result) == {
        ("org-a", "medium"): (300, 60, 0, 0, 240),
        ("org-a", "small"): (300, 60, 0, 0, 240),
    }
    assert int(result.duplicates_collapsed) == 1


def test_sub_second_heartbeats_are_floored(compute):
    # 10:00:00.999 and 10:00:00.001 both floor to 10:00:00 (one duplicate); 10:05:00.500 floors
    # to 10:05:00: gap exactly 300 -> one session [10:00:00, 10:06:00) = 360 s.
    rows = [
        beat("i-1", at("10:00:00.999")),
        beat("i-1", at("10:00:00.001")),
        beat("i-1", at("10:05:00.500")),
    ]
    result = compute(rows, ONE)
    assert billed(result) == {("org-a", "small"): (360, 0, 0, 0, 360)}
    assert int(result.duplicates_collapsed) == 1


def test_future_and_after_stop_compare_floored_seconds(compute):
    # Run time D 12:00:00.900 floors to 12:00:00; tolerance 300 -> future means > 12:05:00.
    # i-1: 12:05:00.950 (floors to 12:05:00, not future) billed [12:05:00, 12:06:00) = 60;
    #      12:05:01.000 is future (received D 12:00:00 -> D's quarantine).
    # i-s stopped at 11:00:00.700 (floors to 11:00:00): 10:59:59.900 -> 10:59:59 is clean,
    #      billed [10:59:59, 11:00:59) = 60; 11:00:00.200 -> 11:00:00 >= stop: after_stop.
    instances = instances_frame(
        ("i-1", "org-a", "small"), ("i-s", "org-a", "medium", at("11:00:00.700"))
    )
    rows = [
        beat("i-1", at("12:05:00.950")),
        beat("i-1", at("12:05:01"), received=at("12:00:00")),
        beat("i-s", at("10:59:59.900")),
        beat("i-s", at("11:00:00.200")),
    ]
    result = compute(rows, instances, run_time=at("12:00:00.900").to_pydatetime())
    assert billed(result) == {
        ("org-a", "medium"): (60, 0, 0, 0, 60),
        ("org-a", "small"): (60, 0, 0, 0, 60),
    }
    assert quarantined(result) == Counter(
        {
            ("i-1", sec(at("12:05:01")), "future"): 1,
            ("i-s", sec(at("11:00:00")), "after_stop"): 1,
        }
    )


def test_run_time_with_nanoseconds_is_floored(compute):
    # run_time is a datetime; a pandas Timestamp is one too and may carry nanoseconds:
    # D 12:00:00.9999999 floors to 12:00:00, so sent_at 12:05:01 (> 12:05:00) is future.
    # (A float epoch 1710072000.9999999 rounds up to ...001.0 and would miss it.)
    rows = [beat("i-1", at("12:05:01"), received=at("12:00:00"))]
    result = compute(rows, ONE, run_time=at("12:00:00.9999999"))
    assert billed(result) == {}
    assert quarantined(result) == Counter({("i-1", sec(at("12:05:01")), "future"): 1})


def test_every_quarantine_reason_and_its_day(compute):
    # Run time D+1 02:00 -> future means sent_at > D+1 02:05:00. i-t has an unknown tier;
    # i-s stopped at D 12:00:00.
    instances = instances_frame(
        ("i-1", "org-a", "small"),
        ("i-t", "org-a", "tpu"),
        ("i-s", "org-a", "medium", at("12:00:00")),
    )
    nat = None
    rows = [
        # null instance_id: sent in D -> D's; null sent, received in D -> D's;
        # null sent, received D-1 -> not D's; sent D-1 (received D) -> not D's.
        beat(None, at("10:00:00")),
        beat(None, nat, received=at("09:00:00")),
        beat(None, nat, received=at("23:59:59", day=-1)),
        beat(None, at("23:00:00", day=-1), received=at("00:10:00")),
        # null sent_at (checked before unknown instance), by received_at.
        beat("i-1", nat, received=at("11:00:00")),
        beat("i-1", nat, received=at("00:00:00", day=1)),
        beat("ghost", nat, received=at("11:30:00")),
        # unknown instance, by sent_at even if received the next day; both copies kept.
        beat("ghost", at("23:59:59"), received=at("00:10:00", day=1)),
        beat("ghost", at("10:00:00")),
        beat("ghost", at("10:00:00")),
        # unknown tier (checked before future): belongs by sent_at D+1 -> not D's.
        beat("i-t", at("10:00:00")),
        beat("i-t", at("03:00:00", day=1), received=at("23:00:00")),
        # future, by received_at; exactly run time + 300 is not future (clean, on D+1).
        beat("i-1", at("02:05:01", day=1), received=at("23:00:00")),
        beat("i-1", at("02:05:01", day=1), received=at("00:00:00", day=1)),
        beat("i-1", at("02:05:00", day=1), received=at("23:00:00")),
        # after_stop at exactly stopped_at; one second before is billed [11:59:59, 12:00:59);
        # future is checked before after_stop.
        beat("i-s", at("12:00:00")),
        beat("i-s", at("11:59:59")),
        beat("i-s", at("03:00:00", day=1), received=at("23:00:00")),
        # clean
        beat("i-1", at("10:00:00")),
    ]
    result = compute(rows, instances)
    assert billed(result) == {
        ("org-a", "medium"): (60, 0, 0, 0, 60),
        ("org-a", "small"): (60, 0, 0, 0, 60),
    }
    assert int(result.duplicates_collapsed) == 0
    assert quarantined(result) == Counter(
        {
            (None, sec(at("10:00:00")), "null_instance_id"): 1,
            (None, None, "null_instance_id"): 1,
            ("i-1", None, "null_sent_at"): 1,
            ("ghost", None, "null_sent_at"): 1,
            ("ghost", sec(at("23:59:59")), "unknown_instance"): 1,
            ("ghost", sec(at("10:00:00")), "unknown_instance"): 2,
            ("i-t", sec(at("10:00:00")), "unknown_tier"): 1,
            ("i-1", sec(at("02:05:01", day=1)), "future"): 1,
            ("i-s", sec(at("12:00:00")), "after_stop"): 1,
            ("i-s", sec(at("03:00:00", day=1)), "future"): 1,
        }
    )


def test_quarantined_heartbeats_do_not_join_sessions(compute):
    # i-s stopped at 10:03:00. 10:00:00 and 10:05:00 would be one session, but 10:05:00 is
    # after_stop, so only [10:00:00, 10:01:00) = 60 s. (Coverage is not cut at the stop.)
    instances = instances_frame(("i-s", "org-a", "small", at("10:03:00")))
    rows = [beat("i-s", at("10:00:00")), beat("i-s", at("10:05:00"))]
    result = compute(rows, instances)
    assert billed(result) == {("org-a", "small"): (60, 0, 0, 0, 60)}
    assert quarantined(result) == Counter({("i-s", sec(at("10:05:00")), "after_stop"): 1})


# ---------------------------------------------------------------------------
# 3.7 output
# ---------------------------------------------------------------------------


def test_instances_of_a_tier_are_summed_per_org_and_tier(compute):
    # org-a: i-1 small 10:00, 10:01 (120) + i-2 small 10:00 (60) = 180; i-3 gpu 60.
    # org-B: i-4 small 60. Rows sorted by (org_id, tier) in byte order: "org-B" < "org-a".
    instances = instances_frame(
        ("i-1", "org-a", "small"),
        ("i-2", "org-a", "small"),
        ("i-3", "org-a", "gpu"),
        ("i-4", "org-B", "small"),
    )
    rows = every("i-1", at("10:00:00"), 2) + [
        beat(iid, at("10:00:00")) for iid in ("i-2", "i-3", "i-4")
    ]
    result = compute(rows, instances)
    assert billed(result) == {
        ("org-B", "small"): (60, 0, 0, 0, 60),
        ("org-a", "gpu"): (60, 0, 0, 0, 60),
        ("org-a", "small"): (180, 0, 0, 0, 180),
    }
    assert list(zip(result.billed["org_id"], result.billed["tier"], strict=True)) == [
        ("org-B", "small"),
        ("org-a", "gpu"),
        ("org-a", "small"),
    ]


def test_identity_with_every_category_at_once(compute):
    # org-a, continuous 300, daily 500, idle 120; i-1 (small) A A A I I I A A A A A A from
    # 10:00 (as in test_idle_pause_splits_the_session_into_runs): 720 = 60 paused + 60 over
    # continuous + 600 candidates; i-2 (gpu) active 12:00, 12:01 -> 120 candidates.
    # Candidates: 600 (10:00 - 10:11) then 120; C reaches 500 inside i-1's second run
    # -> i-1 billed 500, 100 over the cap; i-2 all 120 over the cap.
    instances = instances_frame(("i-1", "org-a", "small"), ("i-2", "org-a", "gpu"))
    rows = pattern("i-1", at("10:00:00"), "AAAIIIAAAAAA") + every("i-2", at("12:00:00"), 2)
    result = compute(rows, instances, throttle("org-a", cont=300, daily=500, idle=120))
    assert billed(result) == {
        ("org-a", "gpu"): (120, 0, 0, 120, 0),
        ("org-a", "small"): (720, 60, 60, 100, 500),
    }


# ---------------------------------------------------------------------------
# 3.4 the production look-back window
# ---------------------------------------------------------------------------


def test_lookback_window_is_exact_with_default_limits():
    # Default rules (H 60, G 300, continuous 8 h, idle 30 min). The look-back window of
    # `MeteringRules.lookback_window` must give the same day D as the full history.
    # Heartbeats every minute: inactive D-1 15:29 .. 16:03, active 16:04 .. D 01:00.
    # Full history: idle stretch a = 15:29, b = 16:04 (35 min > 30) -> paused
    # [15:59, 16:04); the run starts at 16:04 -> over the 8 h limit from D 00:04.
    # Day D: runtime [00:00, 01:01) = 3660, billable [00:00, 00:04) = 240, over 3420.
    # A window that starts after 15:29 but within 30 min of 16:04 sees no pause, so the
    # run would start at its first heartbeat and be over the limit before midnight.
    # (Any window starting at or before D - (8 h + 30 min + G) is exact; D-1 00:00 is.)
    from assets.metering import MeteringRules, compute_billed_usage

    inactive = pattern("i-1", at("15:29:00", day=-1), "I" * 35)
    active = every("i-1", at("16:04:00", day=-1), 8 * 60 + 57)
    heartbeats = heartbeats_frame(inactive + active)
    assert heartbeats["sent_at"].max() == at("01:00:00")
    rules = MeteringRules()
    no_throttle = throttle_frame()
    expected = {("org-a", "small"): (3660, 0, 3420, 0, 240)}

    full = compute_billed_usage(heartbeats, ONE, no_throttle, D, RUN_TIME, rules)
    assert billed(full) == expected
    reference = reference_billed_usage(heartbeats, ONE, no_throttle, D, RUN_TIME, rules)
    assert billed(reference) == expected

    start, end = rules.lookback_window(D, rules.lookback_span_s(no_throttle))
    sent = heartbeats["sent_at"]
    window = heartbeats[(sent >= start) & (sent < end)].reset_index(drop=True)
    windowed = compute_billed_usage(window, ONE, no_throttle, D, RUN_TIME, rules)
    assert billed(windowed) == expected
