"""The facts of metering (DESIGN §3): its rules' parameters (`MeteringRules`, the
one owner of the heartbeat interval, gap, default throttle limits and their
bounds), why a heartbeat is quarantined, the billed columns, and whole-second
time. A leaf: no Dagster, no I/O."""

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import pandas as pd

from assets.pricing import Pricing
from resources.calendar import day_bounds

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
FUTURE_CODE = QUARANTINE_REASONS.index(QuarantineReason.FUTURE) + 1

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
    # How far back each day's metering looks for earlier days' late heartbeats.
    late_lookback_days: int = 7

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
    # The same seconds per instance (`assets.metering.INSTANCE_COLUMNS`); they sum
    # exactly to `billed` per (org, tier).
    instances: pd.DataFrame = field(default_factory=pd.DataFrame)


def epoch_seconds(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floor tz-aware timestamps to whole epoch seconds → (int64 seconds, is-null mask)."""
    stamps = pd.to_datetime(values, utc=True)
    missing = stamps.isna().to_numpy()
    micros = stamps.dt.as_unit("us").to_numpy(dtype="datetime64[us]").view("int64")
    seconds = np.floor_divide(micros, 1_000_000)
    seconds[missing] = 0
    return seconds, missing
